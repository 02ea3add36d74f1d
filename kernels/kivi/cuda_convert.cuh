// KIVI encode and decode kernels: the same operations, in the same order, as cpu.cpp.
#pragma once
#include <cuda_fp16.h>

#include "kivi/cuda_util.cuh"

namespace packkv::kivi {

// ---- encode: one thread per group, the same operations as cpu.cpp's GroupQuant ------------------

struct DevQuant {
  uint16_t minBits, scaleBits;
  float min, scale;
};

inline __device__ DevQuant groupQuant(float lo, float hi, uint32_t levels, int* bad) {
  if (!(fabsf(lo) <= 65504.f && fabsf(hi) <= 65504.f)) atomicOr(bad, 2);
  DevQuant q;
  const __half minH = __float2half_rd(lo);  // fp16 min rounded down
  q.minBits = __half_as_ushort(minH);
  q.min = __half2float(minH);
  const double step = __ddiv_rn(__dsub_rn(double(hi), double(q.min)), double(levels));
  float stepF = __double2float_rn(step);
  if (double(stepF) < step) stepF = __uint_as_float(__float_as_uint(stepF) + 1u);  // next float up (step >= 0)
  const __half scaleH = __float2half_ru(stepF);  // fp16 scale rounded up
  q.scaleBits = __half_as_ushort(scaleH);
  q.scale = __half2float(scaleH);
  return q;
}

inline __device__ uint32_t quantCode(float x, const DevQuant& q, uint32_t levels) {
  if (q.scale == 0.f) return 0;
  const float v = __fdiv_rn(__fsub_rn(x, q.min), q.scale);
  return __float2uint_rn(fminf(fmaxf(v, 0.f), float(levels)));  // nearbyint: half to even
}

struct EncodeArgs {
  const float* x;  // f32 [H][T][D]
  uint32_t* codes;
  uint16_t *scales, *mins, *residual;
  int H, T, D, Tq, Trem, G;
  int* bad;  // bit 0 non-finite, bit 1 outside the fp16 range of the scales
};

template <int B>
__global__ void encodeKeys(EncodeArgs a) {
  constexpr int F = 32 / B;
  constexpr uint32_t kLevels = (1u << B) - 1u;
  const int groups = a.Tq / a.G, rows = a.Tq / F;
  const size_t n = size_t(a.H) * groups * a.D;
  for (size_t idx = blockIdx.x * size_t(blockDim.x) + threadIdx.x; idx < n; idx += size_t(gridDim.x) * blockDim.x) {
    const int d = int(idx % a.D), g = int(idx / a.D % groups), h = int(idx / a.D / groups);
    const float* xs = a.x + (size_t(h) * a.T + size_t(g) * a.G) * a.D + d;
    float lo = INFINITY, hi = -INFINITY;
    for (int t = 0; t < a.G; ++t) {
      const float v = xs[size_t(t) * a.D];
      if (!isfinite(v)) atomicOr(a.bad, 1);
      lo = fminf(lo, v), hi = fmaxf(hi, v);
    }
    const DevQuant q = groupQuant(lo, hi, kLevels, a.bad);
    a.scales[idx] = q.scaleBits;  // [H][groups][D] is idx's own order
    a.mins[idx] = q.minBits;
    for (int r = 0; r < a.G / F; ++r) {
      uint32_t word = 0;
#pragma unroll
      for (int k = 0; k < F; ++k) word |= quantCode(xs[size_t(r * F + k) * a.D], q, kLevels) << (k * B);
      a.codes[(size_t(h) * rows + size_t(g) * (a.G / F) + r) * a.D + d] = word;
    }
  }
}

template <int B>
__global__ void encodeValues(EncodeArgs a) {
  constexpr int F = 32 / B;
  constexpr uint32_t kLevels = (1u << B) - 1u;
  const int groups = a.D / a.G, rows = a.D / F;
  const size_t n = size_t(a.H) * groups * a.Tq;
  for (size_t idx = blockIdx.x * size_t(blockDim.x) + threadIdx.x; idx < n; idx += size_t(gridDim.x) * blockDim.x) {
    const int t = int(idx % a.Tq), g = int(idx / a.Tq % groups), h = int(idx / a.Tq / groups);
    const float* xs = a.x + (size_t(h) * a.T + t) * a.D + size_t(g) * a.G;
    float lo = INFINITY, hi = -INFINITY;
    for (int c = 0; c < a.G; ++c) {
      const float v = xs[c];
      if (!isfinite(v)) atomicOr(a.bad, 1);
      lo = fminf(lo, v), hi = fmaxf(hi, v);
    }
    const DevQuant q = groupQuant(lo, hi, kLevels, a.bad);
    a.scales[idx] = q.scaleBits;  // [H][groups][Tq] is idx's own order
    a.mins[idx] = q.minBits;
    for (int r = 0; r < a.G / F; ++r) {
      uint32_t word = 0;
#pragma unroll
      for (int k = 0; k < F; ++k) word |= quantCode(xs[r * F + k], q, kLevels) << (k * B);
      a.codes[(size_t(h) * rows + size_t(g) * (a.G / F) + r) * a.Tq + t] = word;
    }
  }
}

__global__ void encodeResidual(EncodeArgs a) {
  const size_t n = size_t(a.H) * a.Trem * a.D;
  for (size_t idx = blockIdx.x * size_t(blockDim.x) + threadIdx.x; idx < n; idx += size_t(gridDim.x) * blockDim.x) {
    const size_t h = idx / (size_t(a.Trem) * a.D), rest = idx % (size_t(a.Trem) * a.D);
    const float v = a.x[(h * a.T + a.Tq) * a.D + rest];
    if (!isfinite(v)) atomicOr(a.bad, 1);
    a.residual[idx] = __half_as_ushort(__float2half_rn(v));
  }
}

// ---- decode: code·scale + min with the CPU's rounding (no FMA contraction) -----------------------

struct DecodeArgs {
  const uint32_t* codes;
  const uint16_t *scales, *mins, *residual;
  float* out;  // f32 [H][T][D]
  int H, T, D, Tq, Trem, G;
};

__device__ __forceinline__ float dequant(uint32_t code, float scale, float min) {
  return __fadd_rn(__fmul_rn(float(code), scale), min);
}

template <int B>
__global__ void decodeKeys(DecodeArgs a) {
  constexpr int F = 32 / B;
  constexpr uint32_t kMask = (1u << B) - 1u;
  const int rows = a.Tq / F, groups = a.Tq / a.G, quads = a.D / 4;
  const size_t n = size_t(a.H) * rows * quads;
  for (size_t idx = blockIdx.x * size_t(blockDim.x) + threadIdx.x; idx < n; idx += size_t(gridDim.x) * blockDim.x) {
    const int c = int(idx % quads) * 4, row = int(idx / quads % rows), h = int(idx / quads / rows);
    uint32_t w[4];
    load4(a.codes + (size_t(h) * rows + row) * a.D + c, true, w);
    const size_t sOff = (size_t(h) * groups + size_t(row) * F / a.G) * a.D + c;
    float s[4], m[4];
    load4(a.scales + sOff, false, s);
    load4(a.mins + sOff, false, m);
#pragma unroll 4
    for (int k = 0; k < F; ++k) {
      float4 v;
      v.x = dequant((w[0] >> (k * B)) & kMask, s[0], m[0]);
      v.y = dequant((w[1] >> (k * B)) & kMask, s[1], m[1]);
      v.z = dequant((w[2] >> (k * B)) & kMask, s[2], m[2]);
      v.w = dequant((w[3] >> (k * B)) & kMask, s[3], m[3]);
      *reinterpret_cast<float4*>(a.out + (size_t(h) * a.T + size_t(row) * F + k) * a.D + c) = v;
    }
  }
}

template <int B>
__global__ void decodeValues(DecodeArgs a) {
  constexpr int F = 32 / B;
  constexpr uint32_t kMask = (1u << B) - 1u;
  const int rows = a.D / F, groups = a.D / a.G;
  const size_t n = size_t(a.H) * a.Tq * rows;
  for (size_t idx = blockIdx.x * size_t(blockDim.x) + threadIdx.x; idx < n; idx += size_t(gridDim.x) * blockDim.x) {
    const int row = int(idx % rows), t = int(idx / rows % a.Tq), h = int(idx / rows / a.Tq);
    const uint32_t w = a.codes[(size_t(h) * rows + row) * a.Tq + t];
    const size_t sOff = (size_t(h) * groups + size_t(row) * F / a.G) * a.Tq + t;
    const float s = halfBits(a.scales[sOff]), m = halfBits(a.mins[sOff]);
    float* dst = a.out + (size_t(h) * a.T + t) * a.D + size_t(row) * F;
#pragma unroll
    for (int k = 0; k < F; k += 4)
      *reinterpret_cast<float4*>(dst + k) =
          make_float4(dequant((w >> (k * B)) & kMask, s, m), dequant((w >> ((k + 1) * B)) & kMask, s, m),
                      dequant((w >> ((k + 2) * B)) & kMask, s, m), dequant((w >> ((k + 3) * B)) & kMask, s, m));
  }
}

__global__ void decodeResidual(DecodeArgs a) {
  const size_t n = size_t(a.H) * a.Trem * a.D;
  for (size_t idx = blockIdx.x * size_t(blockDim.x) + threadIdx.x; idx < n; idx += size_t(gridDim.x) * blockDim.x) {
    const size_t h = idx / (size_t(a.Trem) * a.D), rest = idx % (size_t(a.Trem) * a.D);
    a.out[(h * a.T + a.Tq) * a.D + rest] = halfBits(a.residual[idx]);
  }
}

}  // namespace packkv::kivi
