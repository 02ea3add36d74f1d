// Probes the CUDA runtime: device count, name and compute capability (no crash without a driver).
#include <cuda_runtime.h>

#include <cstdio>

#include "common/cuda_probe.h"

namespace packkv {

CudaStatus probeCuda() {
  CudaStatus st;
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    st.reason = std::string("no usable CUDA device (") + cudaGetErrorString(err) + ")";
    cudaGetLastError();  // clear the sticky-free error so later probes start clean
    return st;
  }
  if (count == 0) {
    st.reason = "no usable CUDA device (the driver reports 0 devices)";
    return st;
  }
  cudaDeviceProp prop{};
  err = cudaGetDeviceProperties(&prop, 0);
  if (err != cudaSuccess) {
    st.reason = std::string("no usable CUDA device (") + cudaGetErrorString(err) + ")";
    return st;
  }
  char buf[256];
  std::snprintf(buf, sizeof buf, "%s (sm_%d%d, %.1f GiB)", prop.name, prop.major, prop.minor,
                double(prop.totalGlobalMem) / (1024.0 * 1024.0 * 1024.0));
  st.usable = true;
  st.device = buf;
  return st;
}

}  // namespace packkv
