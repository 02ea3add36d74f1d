// Bit casts between floats and integers that compile the same for host and device (the GPU
// encoders' helpers run on both: in the kernels and in their host emulators, kernels/tools/*_emu.cpp).
#pragma once
#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#define PACKKV_BITS_HD __host__ __device__ __forceinline__
#else
#define PACKKV_BITS_HD inline
#endif

namespace packkv::bits {

PACKKV_BITS_HD uint32_t bitsOf(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}
PACKKV_BITS_HD float floatOf(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}
PACKKV_BITS_HD uint64_t bitsOf(double d) {
#ifdef __CUDA_ARCH__
  return uint64_t(__double_as_longlong(d));
#else
  uint64_t u;
  std::memcpy(&u, &d, 8);
  return u;
#endif
}
PACKKV_BITS_HD double doubleOf(uint64_t u) {
#ifdef __CUDA_ARCH__
  return __longlong_as_double((long long)u);
#else
  double d;
  std::memcpy(&d, &u, 8);
  return d;
#endif
}

}  // namespace packkv::bits
