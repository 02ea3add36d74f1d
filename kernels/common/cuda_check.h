// Checking CUDA calls: every runtime call and every launch goes through PACKKV_CUDA_CHECK.
#pragma once
#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

namespace packkv {

/** A CUDA runtime failure, named with the call and its file:line. */
struct CudaError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

[[noreturn]] inline void throwCudaError(cudaError_t err, const char* expr, const char* file, int line) {
  throw CudaError(std::string(file) + ":" + std::to_string(line) + ": " + expr + " failed: " + cudaGetErrorName(err) +
                  " (" + cudaGetErrorString(err) + ")");
}

}  // namespace packkv

#define PACKKV_CUDA_CHECK(expr)                                                   \
  do {                                                                            \
    cudaError_t packkvErr_ = (expr);                                              \
    if (packkvErr_ != cudaSuccess) ::packkv::throwCudaError(packkvErr_, #expr, __FILE__, __LINE__); \
  } while (0)

/** After a <<<launch>>>: a bad configuration shows up here, a fault at the next synchronizing call. */
#define PACKKV_LAUNCH_CHECK() PACKKV_CUDA_CHECK(cudaGetLastError())
