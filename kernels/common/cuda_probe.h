// Whether a CUDA device is usable from this process, and why not.
#pragma once
#include <string>

namespace packkv {
struct CudaStatus {
  bool usable = false;
  std::string device;  // e.g. "NVIDIA H100 80GB HBM3 (sm_90, 79.1 GiB)"
  std::string reason;  // why not usable
};
/** Never throws; safe on machines with no driver. */
CudaStatus probeCuda();
}  // namespace packkv
