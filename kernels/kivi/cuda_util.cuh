// Device helpers of the KIVI kernels: code extraction, guarded vector loads, lane reductions.
#pragma once
#include <cuda_fp16.h>

#include <cstdint>

namespace packkv::kivi {

/**
 * Code `pos` of a b-bit packed word as the float 1 + code·2^-b: the code is moved to the top
 * mantissa bits under the exponent of 1.0 (a shift and a LOP3, no int->float conversion). Callers
 * fold the offset into the group's min term: code = 2^b (f - 1). pos must be a compile-time
 * constant (an unrolled loop index) so the shift is an immediate.
 */
template <int B>
__device__ __forceinline__ float unitCode(uint32_t word, int pos) {
  constexpr uint32_t kMask = ((1u << B) - 1u) << (23 - B);
  const int shift = (23 - B) - pos * B;
  const uint32_t x = shift >= 0 ? (word << shift) : (word >> -shift);
  return __uint_as_float((x & kMask) | 0x3F800000u);
}

__device__ __forceinline__ float halfBits(uint16_t h) { return __half2float(__ushort_as_half(h)); }

/** Four consecutive u32 words: one 16-byte load when `vec` (caller checked alignment). */
__device__ __forceinline__ void load4(const uint32_t* p, bool vec, uint32_t (&w)[4]) {
  if (vec) {
    uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
    w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) w[k] = __ldg(p + k);
  }
}

/** Four consecutive binary16 values as floats: one 8-byte load when `vec`. */
__device__ __forceinline__ void load4(const uint16_t* p, bool vec, float (&f)[4]) {
  if (vec) {
    uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
    float2 a = __half22float2(*reinterpret_cast<const __half2*>(&v.x));
    float2 b = __half22float2(*reinterpret_cast<const __half2*>(&v.y));
    f[0] = a.x, f[1] = a.y, f[2] = b.x, f[3] = b.y;
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) f[k] = halfBits(__ldg(p + k));
  }
}

/** The first `valid` (0..4) of four values, zeros after: the tail of a token range. */
__device__ __forceinline__ void load4Tail(const uint32_t* p, int valid, uint32_t (&w)[4]) {
#pragma unroll
  for (int k = 0; k < 4; ++k) w[k] = k < valid ? __ldg(p + k) : 0u;
}
__device__ __forceinline__ void load4Tail(const uint16_t* p, int valid, float (&f)[4]) {
#pragma unroll
  for (int k = 0; k < 4; ++k) f[k] = k < valid ? halfBits(__ldg(p + k)) : 0.f;
}

/**
 * Sums v[0..C) over the LANES lanes of an aligned lane group (offsets O, O/2, .., 1) and leaves
 * each lane a distinct share: reduce-scatter while more than one value is held, then butterfly.
 * Afterwards, with V the starting count: if V >= LANES, lane l holds sums of indices
 * l*(V/LANES) + k in v[k]; otherwise every lane holds in v[0] the sum of index l / (LANES/V).
 */
template <int C, int O>
struct ReduceScatter {
  template <int V>
  static __device__ __forceinline__ void run(float (&v)[V], int lane, unsigned mask) {
    if constexpr (O >= 1) {
      if constexpr (C > 1) {
        constexpr int H = C / 2;
        const bool upper = lane & O;
#pragma unroll
        for (int k = 0; k < H; ++k) {
          const float send = upper ? v[k] : v[k + H];
          const float keep = upper ? v[k + H] : v[k];
          v[k] = keep + __shfl_xor_sync(mask, send, O);
        }
        ReduceScatter<H, O / 2>::run(v, lane, mask);
      } else {
        v[0] += __shfl_xor_sync(mask, v[0], O);
        ReduceScatter<1, O / 2>::run(v, lane, mask);
      }
    }
  }
};

}  // namespace packkv::kivi
