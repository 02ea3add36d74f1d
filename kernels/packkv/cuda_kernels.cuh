// PackKV on the GPU: device kernels over the packed stream (format.h), matching cpu.cpp.
//
// Work item = one pack group (b, g): the P stored slots g·P .. g·P+P-1 of block b, all D channels
// of one KV head h, i.e. the packs g·D .. g·D+D-1 of segment (b, h). A group of LPG lanes owns an
// item; lane l owns the CPT = D/LPG consecutive packs g·D + l·CPT + j (consecutive channels), so
// its payload is one contiguous byte range. Its start is found in registers: the widths of the
// segment's earlier groups are summed (nibbles, LPG lanes in parallel) and the lanes' own totals
// are scanned with shuffles; payload bytes = Σ widths · P/8.
//
// A pack's P codes are unpacked into registers from 2 (P·w ≤ 64) or 4 (≤ 128) u32 windows with
// funnel shifts (one LOP3 + one SHL + 2 shifts per code); longer packs use byte reads. The
// products use each code as the float f = 1 + v·2^-w (mantissa bits, no conversion):
// v = 2^w (f − 1), so Σ x·(v + m) = 2^w Σ x·f + (m − 2^w) Σ x, all in fp32.
#pragma once
#include <cuda_fp16.h>

#include <cstdint>

#include "common/last_block.cuh"

namespace packkv::packkv_gpu {

constexpr int kWarps = 4;  // warps per block of every kernel
constexpr uint32_t kOne = 0x3F800000u;

/** Section pointers and shape of one stream body in device memory. */
struct Args {
  const uint8_t* scale;     // f16 [Tc]
  const uint8_t* zero;      // i32 [Tc] (zp=int) or f16 [Tc] (zp=hp)
  const uint32_t* offsets;  // u32 [nb][H]
  const uint8_t* segments;
  const uint8_t* perm;      // [nb][permBlockBytes] (pb > 0)
  const uint8_t* buffer;    // f16 [H][Tr][D], any alignment
  const uint32_t* endWords; // the body's last whole u32 word ends here: window loads stay below it
  int H, T, D, B, P, nb, Tc, Tr, G, GD;  // G packs per channel, GD = G·D packs per segment
  int pb, permBlockBytes;
  bool hp;
  // products: this query step's inputs and outputs
  const uint16_t* in;       // q f16 [qHeads][D] or p f16 [qHeads][T]
  float* out;               // scores [qHeads][T], out [qHeads][D], or decode f32 [H][T][D]
  float* partial;           // p·V: f32 [H][splits][NR][D]
  unsigned* counters;       // p·V: [H], zero between launches
  int splits;
};

__device__ __forceinline__ float halfFrom(uint16_t h) { return __half2float(__ushort_as_half(h)); }
/** binary16 at any byte address. */
__device__ __forceinline__ float halfAtBytes(const uint8_t* p) {
  return halfFrom(uint16_t(__ldg(p) | (uint32_t(__ldg(p + 1)) << 8)));
}
/** `bits` (≤ 24) bits at bit `pos` of a byte array, LSB first (format.h's BitReader order). */
__device__ __forceinline__ uint32_t readBits(const uint8_t* base, uint64_t pos, uint32_t bits) {
  if (bits == 0) return 0;
  const uint8_t* p = base + (pos >> 3);
  const uint32_t sh = uint32_t(pos & 7);
  uint32_t v = __ldg(p);
  if (sh + bits > 8) v |= uint32_t(__ldg(p + 1)) << 8;
  if (sh + bits > 16) v |= uint32_t(__ldg(p + 2)) << 16;
  if (sh + bits > 24) v |= uint32_t(__ldg(p + 3)) << 24;
  return (v >> sh) & ((1u << bits) - 1u);
}
__device__ __forceinline__ uint32_t widthOf(const uint8_t* widths, uint32_t i) {
  return (__ldg(widths + (i >> 1)) >> ((i & 1) * 4)) & 15u;
}
__device__ __forceinline__ float pow2(uint32_t w) { return __uint_as_float((127u + w) << 23); }

/**
 * The P codes of the pack at byte `p` with width w ≥ 1: UNIT ? the bits of f = 1 + v·2^-w : v.
 * Word loads never pass endWords (the last whole word of the body); packs there use byte reads.
 */
template <int P, bool UNIT>
__device__ __forceinline__ void packCodes(const uint8_t* p, uint32_t w, const uint32_t* endWords, uint32_t (&u)[P]) {
  const uint32_t sh23 = 23u - w;
  const uint32_t mask = (1u << w) - 1u, umask = mask << sh23;
  const uintptr_t addr = reinterpret_cast<uintptr_t>(p);
  const uint32_t* wp = reinterpret_cast<const uint32_t*>(addr & ~uintptr_t(3));
  const uint32_t sh = uint32_t(addr & 3) * 8;
  const uint32_t nbits = uint32_t(P) * w;
  const uint32_t need = (sh + nbits + 31) >> 5;
  if (nbits <= 64 && wp + need <= endWords) {
    const uint32_t w0 = __ldg(wp), w1 = need > 1 ? __ldg(wp + 1) : 0u, w2 = need > 2 ? __ldg(wp + 2) : 0u;
    uint32_t lo = __funnelshift_r(w0, w1, sh), hi = __funnelshift_r(w1, w2, sh);
#pragma unroll
    for (int k = 0; k < P; ++k) {
      u[k] = UNIT ? (((lo << sh23) & umask) | kOne) : (lo & mask);
      lo = __funnelshift_r(lo, hi, w);
      hi >>= w;
    }
  } else if (nbits <= 128 && wp + need <= endWords) {
    uint32_t x[5];
#pragma unroll
    for (int k = 0; k < 5; ++k) x[k] = uint32_t(k) < need ? __ldg(wp + k) : 0u;
    uint32_t r0 = __funnelshift_r(x[0], x[1], sh), r1 = __funnelshift_r(x[1], x[2], sh);
    uint32_t r2 = __funnelshift_r(x[2], x[3], sh), r3 = __funnelshift_r(x[3], x[4], sh);
#pragma unroll
    for (int k = 0; k < P; ++k) {
      u[k] = UNIT ? (((r0 << sh23) & umask) | kOne) : (r0 & mask);
      r0 = __funnelshift_r(r0, r1, w);
      r1 = __funnelshift_r(r1, r2, w);
      r2 = __funnelshift_r(r2, r3, w);
      r3 >>= w;
    }
  } else {
#pragma unroll
    for (int k = 0; k < P; ++k) {
      const uint32_t v = readBits(p, uint64_t(k) * w, w);
      u[k] = UNIT ? ((v << sh23) | kOne) : v;
    }
  }
}

/** Segment (b, h): its min width and the starts of its widths, mins and payload. */
struct Seg {
  const uint8_t *widths, *mins, *payload;
  uint32_t mw;
};
__device__ __forceinline__ Seg segmentOf(const Args& a, int b, int h) {
  const uint8_t* seg = a.segments + __ldg(a.offsets + size_t(b) * a.H + h);
  Seg s;
  s.mw = __ldg(seg);
  s.widths = seg + 1;
  s.mins = s.widths + (uint32_t(a.GD) * 4 + 7) / 8;
  s.payload = s.mins + (uint64_t(a.GD) * s.mw + 7) / 8;
  return s;
}

/** Sum of the widths of packs [0, g·D) and of this lane's predecessors in its LPG-lane group. */
template <int LPG>
__device__ __forceinline__ uint32_t widthsBefore(const Seg& s, int g, int D, int CPT, int lp, unsigned mask) {
  uint32_t pre = 0;
  const int bytes = g * D / 2;  // D is even
  for (int q = lp; q < bytes; q += LPG) {
    const uint32_t x = __ldg(s.widths + q);
    pre += (x & 15u) + (x >> 4);
  }
#pragma unroll
  for (int o = LPG / 2; o >= 1; o >>= 1) pre += __shfl_xor_sync(mask, pre, o, LPG);
  const uint32_t i0 = uint32_t(g * D + lp * CPT);
  uint32_t own = 0;
  for (int j = 0; j < CPT; ++j) own += widthOf(s.widths, i0 + j);
  uint32_t incl = own;
#pragma unroll
  for (int o = 1; o < LPG; o <<= 1) {
    const uint32_t n = __shfl_up_sync(mask, incl, o, LPG);
    if (lp >= o) incl += n;
  }
  return pre + incl - own;
}

/** Stored slot j of block b -> original token. */
__device__ __forceinline__ int originOf(const Args& a, int b, int j) {
  if (a.pb == 0) return b * a.B + j;
  return b * a.B + int(readBits(a.perm + size_t(b) * a.permBlockBytes, uint64_t(j) * a.pb, a.pb));
}
__device__ __forceinline__ float scaleOf(const Args& a, int slot) {
  return halfFrom(__ldg(reinterpret_cast<const unsigned short*>(a.scale) + slot));
}
/** zp (int) or lo (hp) of a slot, as float (products). */
__device__ __forceinline__ float zeroOf(const Args& a, int slot) {
  return a.hp ? halfFrom(__ldg(reinterpret_cast<const unsigned short*>(a.zero) + slot))
              : float(__ldg(reinterpret_cast<const int*>(a.zero) + slot));
}
/** The same, exactly, as double (decode). */
__device__ __forceinline__ double zeroOfExact(const Args& a, int slot) {
  return a.hp ? double(halfFrom(__ldg(reinterpret_cast<const unsigned short*>(a.zero) + slot)))
              : double(__ldg(reinterpret_cast<const int*>(a.zero) + slot));
}

/** Reduce-scatter over an aligned group of lanes (offsets O, O/2, .., 1): afterwards lane l of
 *  the group holds in v[k] (k < C/(2·O)) the group's sum of index l·C/(2·O) + k. */
template <int C, int O>
struct ReduceScatter {
  template <int V>
  static __device__ __forceinline__ void run(float (&v)[V], int lane, unsigned mask) {
    if constexpr (O >= 1) {
      static_assert(C >= 2, "more lanes than values");
      constexpr int H = C / 2;
      const bool upper = lane & O;
#pragma unroll
      for (int k = 0; k < H; ++k) {
        const float send = upper ? v[k] : v[k + H];
        const float keep = upper ? v[k + H] : v[k];
        v[k] = keep + __shfl_xor_sync(mask, send, O);
      }
      ReduceScatter<H, O / 2>::run(v, lane, mask);
    }
  }
};

// ---- decode: one warp per pack group; values in double exactly as cpu.cpp's Reader::value -----

template <int P>
__global__ void __launch_bounds__(kWarps * 32) decodeKernel(Args a) {
  __shared__ int sTok[kWarps][P];
  __shared__ double sScale[kWarps][P], sZero[kWarps][P];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int CPT = a.D / 32;
  const size_t items = size_t(a.H) * a.nb * a.G;
  for (size_t item = size_t(blockIdx.x) * kWarps + warp; item < items; item += size_t(gridDim.x) * kWarps) {
    const int g = int(item % a.G), b = int(item / a.G % a.nb), h = int(item / a.G / a.nb);
    const Seg s = segmentOf(a, b, h);
    const uint32_t before = widthsBefore<32>(s, g, a.D, CPT, lane, 0xffffffffu);
    __syncwarp();  // the previous item's reads of sTok/sScale/sZero are done
    if (lane < P) {
      const int slot = b * a.B + g * P + lane;
      sTok[warp][lane] = originOf(a, b, g * P + lane);
      sScale[warp][lane] = double(scaleOf(a, slot));
      sZero[warp][lane] = zeroOfExact(a, slot);
    }
    __syncwarp();
    const uint8_t* addr = s.payload + uint64_t(P / 8) * before;
    const uint32_t i0 = uint32_t(g * a.D + lane * CPT);
    for (int j = 0; j < CPT; ++j) {
      const uint32_t w = widthOf(s.widths, i0 + j);
      const uint32_t m = readBits(s.mins, uint64_t(i0 + j) * s.mw, s.mw);
      uint32_t u[P];
      if (w) packCodes<P, false>(addr, w, a.endWords, u);
      else {
#pragma unroll
        for (int k = 0; k < P; ++k) u[k] = 0;
      }
      addr += (P / 8) * w;
      const int d = lane * CPT + j;
#pragma unroll
      for (int k = 0; k < P; ++k) {
        const double code = double(u[k] + m), sc = sScale[warp][k], z = sZero[warp][k];
        const double x = a.hp ? __dadd_rn(__dmul_rn(code, sc), z) : __dmul_rn(__dadd_rn(code, z), sc);
        a.out[(size_t(h) * a.T + sTok[warp][k]) * a.D + d] = __double2float_rn(x);
      }
    }
  }
}

__global__ void decodeBufferKernel(Args a) {
  const size_t n = size_t(a.H) * a.Tr * a.D;
  for (size_t idx = blockIdx.x * size_t(blockDim.x) + threadIdx.x; idx < n; idx += size_t(gridDim.x) * blockDim.x) {
    const size_t h = idx / (size_t(a.Tr) * a.D), rest = idx % (size_t(a.Tr) * a.D);
    a.out[(h * a.T + a.Tc) * a.D + rest] = halfAtBytes(a.buffer + 2 * idx);
  }
}

// ---- q·Kᵀ: 8 lanes per pack group, 4 groups per warp; grid (blocks, KV heads) --------------------

/** The scores of recent fp16 token r for the NR query heads of KV head h (sQ f32 [NR][D]): the LPG
 *  lanes of a group (mask) split the channels and reduce; lane lp = 0 writes (q·Kᵀ v1-v4). */
template <int NR, int LPG>
__device__ __forceinline__ void qkBufferToken(const Args& a, const float* sQ, int D, int h, int r, int lp,
                                              unsigned mask) {
  const uint8_t* row = a.buffer + (size_t(h) * a.Tr + r) * D * 2;
  float acc[NR] = {};
  for (int d = lp; d < D; d += LPG) {
    const float x = halfAtBytes(row + 2 * d);
#pragma unroll
    for (int i = 0; i < NR; ++i) acc[i] = fmaf(sQ[i * D + d], x, acc[i]);
  }
#pragma unroll
  for (int i = 0; i < NR; ++i) {
#pragma unroll
    for (int o = LPG / 2; o >= 1; o >>= 1) acc[i] += __shfl_xor_sync(mask, acc[i], o, LPG);
    if (lp == 0) a.out[size_t(h * NR + i) * a.T + a.Tc + r] = acc[i];
  }
}

/**
 * Lane l of an 8-lane group owns CPT = D/8 channels of one pack group and accumulates P tokens x NH
 * query heads of partial dot products; the group reduce-scatters them, so lane l ends with tokens
 * l·P/8 .. of all NH heads and writes their scores at the tokens' original positions. NR > NH
 * heads (P·NH ≤ 64 accumulators) take NR/NH passes over the packs.
 */
template <int P, int NR>
__global__ void __launch_bounds__(kWarps * 32) qkKernel(Args a) {
  constexpr int LPG = 8, SPW = 32 / LPG;
  constexpr int NH = NR < 64 / P ? NR : 64 / P;
  constexpr int V = P * NH, PER = P / LPG;  // accumulators; tokens per lane after the reduction
  extern __shared__ float sQ[];             // q f32 [NR][D], then Σ_d q [NR]
  const int h = blockIdx.y, D = a.D;
  float* sQsum = sQ + NR * D;
  for (int i = threadIdx.x; i < NR * D; i += blockDim.x) sQ[i] = halfFrom(a.in[size_t(h) * NR * D + i]);
  __syncthreads();
  if (threadIdx.x < NR) {
    double sum = 0.0;  // exact enough that zp·Σq cancels cleanly against Σ q·(code + m)
    for (int d = 0; d < D; ++d) sum += double(sQ[threadIdx.x * D + d]);
    sQsum[threadIdx.x] = float(sum);
  }
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, sub = lane / LPG, lp = lane % LPG;
  const unsigned mask = ((1u << LPG) - 1u) << (sub * LPG);
  const int CPT = D / LPG;
  const int quantItems = a.nb * a.G, items = quantItems + a.Tr;
  for (int item = (blockIdx.x * kWarps + warp) * SPW + sub; item < items; item += gridDim.x * kWarps * SPW) {
    if (item >= quantItems) {  // a recent fp16 token
      qkBufferToken<NR, LPG>(a, sQ, D, h, item - quantItems, lp, mask);
      continue;
    }
    const int b = item / a.G, g = item % a.G;
    const Seg s = segmentOf(a, b, h);
    const uint32_t before = widthsBefore<LPG>(s, g, D, CPT, lp, mask);
    const uint32_t i0 = uint32_t(g * D + lp * CPT);
#pragma unroll 1
    for (int pass = 0; pass < NR / NH; ++pass) {
      float acc[V] = {};
      float cst[NH] = {};
      const uint8_t* addr = s.payload + uint64_t(P / 8) * before;
      for (int j = 0; j < CPT; ++j) {
        const uint32_t w = widthOf(s.widths, i0 + j);
        const float m = float(readBits(s.mins, uint64_t(i0 + j) * s.mw, s.mw));
        const float* qd = sQ + pass * NH * D + lp * CPT + j;
        if (w == 0) {
#pragma unroll
          for (int i = 0; i < NH; ++i) cst[i] = fmaf(qd[i * D], m, cst[i]);
          continue;
        }
        uint32_t u[P];
        packCodes<P, true>(addr, w, a.endWords, u);
        addr += (P / 8) * w;
        const float pw = pow2(w);
#pragma unroll
        for (int i = 0; i < NH; ++i) {
          const float q = qd[i * D], qs = q * pw;
          cst[i] = fmaf(q, m - pw, cst[i]);
#pragma unroll
          for (int k = 0; k < P; ++k) acc[k * NH + i] = fmaf(qs, __uint_as_float(u[k]), acc[k * NH + i]);
        }
      }
#pragma unroll
      for (int k = 0; k < V; ++k) acc[k] += cst[k % NH];
      ReduceScatter<V, LPG / 2>::run(acc, lane, mask);
      // This lane holds tokens k = lp·PER + t (t < PER) of heads pass·NH + i at acc[t·NH + i].
#pragma unroll
      for (int t = 0; t < PER; ++t) {
        const int j = g * P + lp * PER + t, slot = b * a.B + j;
        const int tok = originOf(a, b, j);
        const float sc = scaleOf(a, slot), z = zeroOf(a, slot);
#pragma unroll
        for (int i = 0; i < NH; ++i) {
          const int head = pass * NH + i;
          const float dot = acc[t * NH + i], qsum = sQsum[head];
          a.out[size_t(h * NR + head) * a.T + tok] = a.hp ? fmaf(sc, dot, z * qsum) : sc * fmaf(z, qsum, dot);
        }
      }
    }
  }
}

// ---- p·V: one warp per pack group; grid (splits, KV heads), partials reduced by the last block ----

/**
 * The end of every p·V kernel version (all threads, after the barrier that completes the warps'
 * sums in sAcc [kWarps][NR][D]): the block's partial sums in warp order into its slot of the
 * workspace, then the head's last block adds the partials in split order (deterministic) and
 * resets the head's counter for the next launch.
 */
template <int NR>
__device__ __forceinline__ void pvFinish(const Args& a, float* sAcc, int D, int h) {
  float* dst = a.partial + (size_t(h) * a.splits + blockIdx.x) * NR * D;
  for (int idx = threadIdx.x; idx < NR * D; idx += blockDim.x) {
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += sAcc[w * NR * D + idx];
    dst[idx] = sum;
  }
  // The head's last block adds the splits in order (gpu::addPartials, one level: 16-byte loads,
  // 8 in flight per thread; was one dependent load per split and thread); sAcc is its scratch.
  gpu::addPartials<false, false>(a.counters, gridDim.y, unsigned(h), a.partial + size_t(h) * a.splits * NR * D,
                                 size_t(NR) * D, a.splits, a.splits, a.out + size_t(h) * NR * D, NR * D, sAcc,
                                 kWarps * NR * D);
}

/** The recent fp16 tokens into the warps' accumulators (acc = this warp's [NR][D]): a warp per
 *  token over all blocks of head h, D / 32 channels per lane (p·V kernels v2-v4). */
template <int NR>
__device__ __forceinline__ void pvBufferTokens(const Args& a, float* acc, const uint16_t* pHead, int D, int h,
                                               int warp, int lane) {
  const int CPT = D / 32;
  for (int r = blockIdx.x * kWarps + warp; r < a.Tr; r += a.splits * kWarps) {
    const uint8_t* row = a.buffer + (size_t(h) * a.Tr + r) * D * 2;
    float pr[NR];
#pragma unroll
    for (int i = 0; i < NR; ++i) pr[i] = halfFrom(pHead[size_t(i) * a.T + a.Tc + r]);
    for (int j = 0; j < CPT; ++j) {
      const int d = lane * CPT + j;
      const float x = halfAtBytes(row + 2 * d);
#pragma unroll
      for (int i = 0; i < NR; ++i) acc[i * D + d] = fmaf(pr[i], x, acc[i * D + d]);
    }
  }
}

/**
 * Lane l owns channels l·CPT .. (CPT = D/32) and keeps their NR sums in shared memory (its own
 * words: no atomics). Per pack group, lanes k < P compute ps = p_t·scale_t of slot k for the NR
 * heads (shared with the warp through shared memory), Σ ps and the zero-point term
 * zs = Σ ps·zp (or Σ p·lo). Per pack: out += 2^w (Σ_k ps_k f_k − Σ ps) + (m Σ ps + zs): the
 * zero-point term enters each channel once per group, next to the min term it cancels, so the
 * long fp32 sums stay at the size of the result.
 */
template <int P, int NR>
__global__ void __launch_bounds__(kWarps * 32) pvKernel(Args a) {
  __shared__ __align__(16) float sPs[kWarps][NR][P];
  extern __shared__ float sAcc[];  // f32 [kWarps][NR][D]
  const int h = blockIdx.y, D = a.D;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int i = threadIdx.x; i < kWarps * NR * D; i += blockDim.x) sAcc[i] = 0.f;
  __syncthreads();
  float* acc = sAcc + warp * NR * D;
  const int CPT = D / 32;
  const uint16_t* pHead = a.in + size_t(h) * NR * a.T;
  const int quantItems = a.nb * a.G, items = quantItems + a.Tr;
  for (int item = blockIdx.x * kWarps + warp; item < items; item += a.splits * kWarps) {
    if (item >= quantItems) {  // a recent fp16 token
      const int r = item - quantItems;
      const uint8_t* row = a.buffer + (size_t(h) * a.Tr + r) * D * 2;
      float pr[NR];
#pragma unroll
      for (int i = 0; i < NR; ++i) pr[i] = halfFrom(pHead[size_t(i) * a.T + a.Tc + r]);
      for (int j = 0; j < CPT; ++j) {
        const int d = lane * CPT + j;
        const float x = halfAtBytes(row + 2 * d);
#pragma unroll
        for (int i = 0; i < NR; ++i) acc[i * D + d] = fmaf(pr[i], x, acc[i * D + d]);
      }
      continue;
    }
    const int b = item / a.G, g = item % a.G;
    const Seg s = segmentOf(a, b, h);
    const uint32_t before = widthsBefore<32>(s, g, D, CPT, lane, 0xffffffffu);
    float psSum[NR], zs[NR];
    __syncwarp();  // the previous item's reads of sPs are done
    if (lane < P) {
      const int j = g * P + lane, slot = b * a.B + j;
      const int tok = originOf(a, b, j);
      const float sc = scaleOf(a, slot), z = zeroOf(a, slot);
#pragma unroll
      for (int i = 0; i < NR; ++i) {
        const float pt = halfFrom(pHead[size_t(i) * a.T + tok]), ps = pt * sc;
        sPs[warp][i][lane] = ps;
        psSum[i] = ps;
        zs[i] = (a.hp ? pt : ps) * z;
      }
    } else {
#pragma unroll
      for (int i = 0; i < NR; ++i) psSum[i] = 0.f, zs[i] = 0.f;
    }
#pragma unroll
    for (int i = 0; i < NR; ++i)
#pragma unroll
      for (int o = 16; o >= 1; o >>= 1) {
        psSum[i] += __shfl_xor_sync(0xffffffffu, psSum[i], o);
        zs[i] += __shfl_xor_sync(0xffffffffu, zs[i], o);
      }
    __syncwarp();
    const uint8_t* addr = s.payload + uint64_t(P / 8) * before;
    const uint32_t i0 = uint32_t(g * D + lane * CPT);
    for (int j = 0; j < CPT; ++j) {
      const int d = lane * CPT + j;
      const uint32_t w = widthOf(s.widths, i0 + j);
      const float m = float(readBits(s.mins, uint64_t(i0 + j) * s.mw, s.mw));
      if (w == 0) {
#pragma unroll
        for (int i = 0; i < NR; ++i) acc[i * D + d] += fmaf(m, psSum[i], zs[i]);
        continue;
      }
      uint32_t u[P];
      packCodes<P, true>(addr, w, a.endWords, u);
      addr += (P / 8) * w;
      const float pw = pow2(w);
#pragma unroll
      for (int i = 0; i < NR; ++i) {
        const float4* ps4 = reinterpret_cast<const float4*>(sPs[warp][i]);
        float t = 0.f;
#pragma unroll
        for (int k = 0; k < P; k += 4) {
          const float4 q = ps4[k / 4];
          t = fmaf(q.x, __uint_as_float(u[k]), t);
          t = fmaf(q.y, __uint_as_float(u[k + 1]), t);
          t = fmaf(q.z, __uint_as_float(u[k + 2]), t);
          t = fmaf(q.w, __uint_as_float(u[k + 3]), t);
        }
        acc[i * D + d] += fmaf(pw, t - psSum[i], fmaf(m, psSum[i], zs[i]));
      }
    }
  }
  __syncthreads();
  pvFinish<NR>(a, sAcc, D, h);
}

}  // namespace packkv::packkv_gpu
