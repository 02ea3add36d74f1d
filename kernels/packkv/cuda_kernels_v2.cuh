// PackKV products, version 2 (docs/kernels.md "packkv", v2): segments staged in shared memory.
//
// A block owns one KV head (blockIdx.y) and a contiguous run of token blocks [bBeg, bEnd). It
// walks the run in stages: as many consecutive segments (b, h) as fit in kStageBytes are copied
// into shared memory with 16-byte cp.async loads (all independent, one memory latency per stage),
// double-buffered, so stage s+1 is in flight while stage s is computed. Widths, mins and payload
// windows are then parsed from shared memory (generic loads); the compute is v1's. A segment
// larger than a stage (not at sane widths) is read in place from global memory.
// 16-byte chunks are aligned in global memory; a chunk that would leave [body, endWords) is
// copied byte by byte (only its segment's bytes). Bytes past a segment's end in shared memory are
// never used (window loads only feed bits of the pack they read).
#pragma once
#include "packkv/cuda_kernels.cuh"

namespace packkv::packkv_gpu::v2 {

constexpr int kStageBytes = 12288;  // per buffer
constexpr int kPad = 32;            // window loads past a segment's end stay inside the buffer
constexpr int kBufBytes = kStageBytes + kPad;
constexpr int kMaxSegs = 32;

__device__ __forceinline__ uint32_t readBitsAny(const uint8_t* base, uint32_t pos, uint32_t bits) {
  if (bits == 0) return 0;
  const uint8_t* p = base + (pos >> 3);
  const uint32_t sh = pos & 7u;
  uint32_t v = p[0];
  if (sh + bits > 8) v |= uint32_t(p[1]) << 8;
  if (sh + bits > 16) v |= uint32_t(p[2]) << 16;
  if (sh + bits > 24) v |= uint32_t(p[3]) << 24;
  return (v >> sh) & ((1u << bits) - 1u);
}
__device__ __forceinline__ uint32_t widthAny(const uint8_t* widths, uint32_t i) {
  return (widths[i >> 1] >> ((i & 1) * 4)) & 15u;
}

/** packCodes (cuda_kernels.cuh) with plain loads: p in shared or global memory, limit = the last
 *  whole word that may be read. */
template <int P, bool UNIT>
__device__ __forceinline__ void packCodesAny(const uint8_t* p, uint32_t w, const uint32_t* limit, uint32_t (&u)[P]) {
  const uint32_t sh23 = 23u - w;
  const uint32_t mask = (1u << w) - 1u, umask = mask << sh23;
  const uintptr_t addr = reinterpret_cast<uintptr_t>(p);
  const uint32_t* wp = reinterpret_cast<const uint32_t*>(addr & ~uintptr_t(3));
  const uint32_t sh = uint32_t(addr & 3) * 8;
  const uint32_t nbits = uint32_t(P) * w;
  const uint32_t need = (sh + nbits + 31) >> 5;
  if (nbits <= 64 && wp + need <= limit) {
    const uint32_t w0 = wp[0], w1 = need > 1 ? wp[1] : 0u, w2 = need > 2 ? wp[2] : 0u;
    uint32_t lo = __funnelshift_r(w0, w1, sh), hi = __funnelshift_r(w1, w2, sh);
#pragma unroll
    for (int k = 0; k < P; ++k) {
      u[k] = UNIT ? (((lo << sh23) & umask) | kOne) : (lo & mask);
      lo = __funnelshift_r(lo, hi, w);
      hi >>= w;
    }
  } else if (nbits <= 128 && wp + need <= limit) {
    uint32_t x[5];
#pragma unroll
    for (int k = 0; k < 5; ++k) x[k] = uint32_t(k) < need ? wp[k] : 0u;
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
      const uint32_t v = readBitsAny(p, uint32_t(k) * w, w);
      u[k] = UNIT ? ((v << sh23) | kOne) : v;
    }
  }
}

/**
 * The P codes as UNIT floats for any w ≤ 15 (w = 0 gives f = 1). Packs split into chunks of 8
 * codes (8·w bits = w bytes, so chunk c starts at byte p + c·w): each chunk is ≤ 64 bits for
 * w ≤ 8 and is unpacked from a 3-word window with one code path (no divergence between widths).
 */
template <int P>
__device__ __forceinline__ void unitCodes(const uint8_t* p, uint32_t w, const uint32_t* limit, uint32_t (&u)[P]) {
  const uint32_t sh23 = 23u - w, umask = ((1u << w) - 1u) << sh23;
  const uintptr_t last = (reinterpret_cast<uintptr_t>(p) + uint32_t(P / 8 - 1) * w) & ~uintptr_t(3);
  if (w <= 8 && reinterpret_cast<const uint32_t*>(last) + 3 <= limit) {
#pragma unroll
    for (int c = 0; c < P / 8; ++c) {
      const uintptr_t addr = reinterpret_cast<uintptr_t>(p) + uint32_t(c) * w;
      const uint32_t* wp = reinterpret_cast<const uint32_t*>(addr & ~uintptr_t(3));
      const uint32_t sh = uint32_t(addr & 3) * 8;
      const uint32_t x0 = wp[0], x1 = wp[1], x2 = wp[2];
      uint32_t lo = __funnelshift_r(x0, x1, sh), hi = __funnelshift_r(x1, x2, sh);
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        u[c * 8 + k] = ((lo << sh23) & umask) | kOne;
        lo = __funnelshift_r(lo, hi, w);
        hi >>= w;
      }
    }
  } else if (w == 0) {
#pragma unroll
    for (int k = 0; k < P; ++k) u[k] = kOne;
  } else {
    packCodesAny<P, true>(p, w, limit, u);
  }
}

/** A segment's parts, wherever it lies. */
struct SegAny {
  const uint8_t *widths, *mins, *payload;
  const uint32_t* limit;
  uint32_t mw;
};
__device__ __forceinline__ SegAny segAt(const Args& a, const uint8_t* seg, const uint32_t* limit) {
  SegAny s;
  s.mw = seg[0];
  s.widths = seg + 1;
  s.mins = s.widths + (uint32_t(a.GD) * 4 + 7) / 8;
  s.payload = s.mins + (uint32_t(a.GD) * s.mw + 7) / 8;
  s.limit = limit;
  return s;
}

template <int LPG>
__device__ __forceinline__ uint32_t widthsBeforeAny(const SegAny& s, int g, int D, int CPT, int lp, unsigned mask) {
  uint32_t pre = 0;
  const int bytes = g * D / 2;
  for (int q = lp; q < bytes; q += LPG) {
    const uint32_t x = s.widths[q];
    pre += (x & 15u) + (x >> 4);
  }
#pragma unroll
  for (int o = LPG / 2; o >= 1; o >>= 1) pre += __shfl_xor_sync(mask, pre, o, LPG);
  const uint32_t i0 = uint32_t(g * D + lp * CPT);
  uint32_t own = 0;
  for (int j = 0; j < CPT; ++j) own += widthAny(s.widths, i0 + j);
  uint32_t incl = own;
#pragma unroll
  for (int o = 1; o < LPG; o <<= 1) {
    const uint32_t n = __shfl_up_sync(mask, incl, o, LPG);
    if (lp >= o) incl += n;
  }
  return pre + incl - own;
}

__device__ __forceinline__ void cpAsync16(void* smem, const void* gmem) {
  const unsigned s = unsigned(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cpAsyncWait1() { asm volatile("cp.async.wait_group 1;\n" ::); }
__device__ __forceinline__ void cpAsyncWait0() { asm volatile("cp.async.wait_group 0;\n" ::); }

/**
 * Called by every thread of the block: plans the stage of segments b, b+1, .. (< bEnd, at most
 * maxSegs) of head h that fit in buf, issues their copies and commits one cp.async group (also
 * when empty). sOff[k] = the position of segment b+k's first byte in buf. Returns the number of
 * segments, -1 when segment b alone does not fit (read it in place), 0 when b ≥ bEnd. Every warp
 * computes the same plan; warp 0 writes sOff.
 */
__device__ __forceinline__ int issueStage(const Args& a, int h, int b, int bEnd, int maxSegs, int quant, uint8_t* buf,
                                          int* sOff) {
  const int lane = threadIdx.x & 31;
  int n = 0;
  if (b < bEnd) {
    const int bb = b + lane;
    uint32_t start = 0, end = 0, size = kStageBytes + 1;
    uintptr_t g0 = 0;
    if (bb < bEnd && lane < maxSegs) {
      const size_t i = size_t(bb) * a.H + h;
      start = __ldg(a.offsets + i);
      end = i + 1 < size_t(a.nb) * a.H ? __ldg(a.offsets + i + 1) : uint32_t(a.perm - a.segments);
      g0 = reinterpret_cast<uintptr_t>(a.segments) + start;
      const uint64_t chunks = ((g0 & 15) + uint64_t(end - start) + 15) & ~uint64_t(15);
      size = uint32_t(chunks < uint64_t(kStageBytes) ? chunks : uint64_t(kStageBytes + 1));
    }
    uint32_t incl = size;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const uint32_t v = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += v;  // ≤ 32·(kStageBytes + 1): no overflow
    }
    n = __popc(__ballot_sync(0xffffffffu, incl <= uint32_t(kStageBytes)));
    if (n > quant && b + n < bEnd) n -= n % quant;  // whole rounds of items, except the last stage
    if (n == 0) {  // segment b alone is larger than a stage: read in place
      cpAsyncCommit();
      return -1;
    }
    const uint32_t dst = incl - size;
    if (threadIdx.x < 32 && lane < n) sOff[lane] = int(dst + uint32_t(g0 & 15));
    const uintptr_t lo = reinterpret_cast<uintptr_t>(a.scale), hi = reinterpret_cast<uintptr_t>(a.endWords);
    for (int k = 0; k < n; ++k) {
      const uintptr_t gk = __shfl_sync(0xffffffffu, g0, k);
      const uint32_t bytes = __shfl_sync(0xffffffffu, size, k), dk = __shfl_sync(0xffffffffu, dst, k);
      const uint32_t len = __shfl_sync(0xffffffffu, end - start, k);
      const uintptr_t base = gk & ~uintptr_t(15);
      for (uint32_t c = threadIdx.x * 16; c < bytes; c += blockDim.x * 16) {
        const uintptr_t src = base + c;
        if (src >= lo && src + 16 <= hi) {
          cpAsync16(buf + dk + c, reinterpret_cast<const void*>(src));
        } else {
          for (int q = 0; q < 16; ++q) {
            const uintptr_t s = src + q;
            if (s >= gk && s < gk + len) buf[dk + c + q] = __ldg(reinterpret_cast<const uint8_t*>(s));
          }
        }
      }
    }
  }
  cpAsyncCommit();
  return n;
}

/** Token block range of this block: blockIdx.x of gridDim.x equal runs. */
__device__ __forceinline__ void runOf(const Args& a, int& bBeg, int& bEnd) {
  const int per = (a.nb + gridDim.x - 1) / gridDim.x;
  bBeg = min(a.nb, int(blockIdx.x) * per);
  bEnd = min(a.nb, bBeg + per);
}

// ---- q·Kᵀ -----------------------------------------------------------------------------------------

template <int P, int NR>
__global__ void __launch_bounds__(kWarps * 32) qkKernel(Args a) {
  constexpr int LPG = 8, SPW = 32 / LPG, GROUPS = kWarps * SPW;
  constexpr int NH = NR < 64 / P ? NR : 64 / P;
  constexpr int V = P * NH, PER = P / LPG;
  extern __shared__ __align__(16) uint8_t sMem[];  // [2][kBufBytes] stages, q f32 [NR][D], Σq [NR]
  __shared__ int sOff[2][kMaxSegs];
  const int h = blockIdx.y, D = a.D;
  float* sQ = reinterpret_cast<float*>(sMem + 2 * kBufBytes);
  float* sQsum = sQ + NR * D;
  int bBeg, bEnd;
  runOf(a, bBeg, bEnd);
  const int quant = max(1, GROUPS / a.G);  // segments per round of the 8-lane groups
  int n = issueStage(a, h, bBeg, bEnd, kMaxSegs, quant, sMem, sOff[0]);  // in flight while q loads
  for (int i = threadIdx.x; i < NR * D; i += blockDim.x) sQ[i] = halfFrom(a.in[size_t(h) * NR * D + i]);
  __syncthreads();
  if (threadIdx.x < NR) {
    double sum = 0.0;
    for (int d = 0; d < D; ++d) sum += double(sQ[threadIdx.x * D + d]);
    sQsum[threadIdx.x] = float(sum);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, sub = lane / LPG, lp = lane % LPG;
  const unsigned mask = ((1u << LPG) - 1u) << (sub * LPG);
  const int CPT = D / LPG;
  const int gid = warp * SPW + sub;
  int buf = 0;
  for (int b = bBeg; b < bEnd;) {
    const int bn = b + (n > 0 ? n : 1);
    const int nn = issueStage(a, h, bn, bEnd, kMaxSegs, quant, sMem + (buf ^ 1) * kBufBytes, sOff[buf ^ 1]);
    cpAsyncWait1();
    __syncthreads();
    const uint8_t* sBuf = sMem + buf * kBufBytes;
    const uint32_t* sLimit = reinterpret_cast<const uint32_t*>(sBuf + kBufBytes);
    const int items = (n > 0 ? n : 1) * a.G;
    for (int it = gid; it < items; it += GROUPS) {
      const int k = it / a.G, g = it % a.G, bb = b + k;
      const SegAny s = n > 0 ? segAt(a, sBuf + sOff[buf][k], sLimit)
                             : segAt(a, a.segments + __ldg(a.offsets + size_t(bb) * a.H + h), a.endWords);
      // This lane's output tokens, fetched early (their latency overlaps the products).
      int tok[PER];
      float sc[PER], z[PER];
#pragma unroll
      for (int t = 0; t < PER; ++t) {
        const int j = g * P + lp * PER + t, slot = bb * a.B + j;
        tok[t] = originOf(a, bb, j);
        sc[t] = scaleOf(a, slot);
        z[t] = zeroOf(a, slot);
      }
      const uint32_t before = widthsBeforeAny<LPG>(s, g, D, CPT, lp, mask);
      const uint32_t i0 = uint32_t(g * D + lp * CPT);
#pragma unroll 1
      for (int pass = 0; pass < NR / NH; ++pass) {
        float acc[V] = {};
        float cst[NH] = {};
        const uint8_t* addr = s.payload + (P / 8) * before;
        for (int j = 0; j < CPT; ++j) {
          const uint32_t w = widthAny(s.widths, i0 + j);
          const float m = float(readBitsAny(s.mins, (i0 + j) * s.mw, s.mw));
          const float* qd = sQ + pass * NH * D + lp * CPT + j;
          if (__all_sync(__activemask(), w == 0)) {  // warp-uniform skip of empty packs
#pragma unroll
            for (int i = 0; i < NH; ++i) cst[i] = fmaf(qd[i * D], m, cst[i]);
            continue;
          }
          uint32_t u[P];
          unitCodes<P>(addr, w, s.limit, u);  // w = 0: f = 1, pw = 1, the terms sum to q·m
          addr += (P / 8) * w;
          const float pw = pow2(w);
#pragma unroll
          for (int i = 0; i < NH; ++i) {
            const float q = qd[i * D], qs = q * pw;
            cst[i] = fmaf(q, m - pw, cst[i]);
#pragma unroll
            for (int kk = 0; kk < P; ++kk) acc[kk * NH + i] = fmaf(qs, __uint_as_float(u[kk]), acc[kk * NH + i]);
          }
        }
#pragma unroll
        for (int kk = 0; kk < V; ++kk) acc[kk] += cst[kk % NH];
        ReduceScatter<V, LPG / 2>::run(acc, lane, mask);
#pragma unroll
        for (int t = 0; t < PER; ++t) {
#pragma unroll
          for (int i = 0; i < NH; ++i) {
            const int head = pass * NH + i;
            const float dot = acc[t * NH + i], qsum = sQsum[head];
            a.out[size_t(h * NR + head) * a.T + tok[t]] = a.hp ? fmaf(sc[t], dot, z[t] * qsum) : sc[t] * fmaf(z[t], qsum, dot);
          }
        }
      }
    }
    __syncthreads();  // buf is free for the stage after next
    b = bn, n = nn, buf ^= 1;
  }
  cpAsyncWait0();
  // The recent fp16 tokens: 8 lanes per token, over all blocks of this head.
  for (int r = (blockIdx.x * kWarps + warp) * SPW + sub; r < a.Tr; r += gridDim.x * GROUPS) {
    qkBufferToken<NR, LPG>(a, sQ, D, h, r, lp, mask);
  }
}

// ---- p·V --------------------------------------------------------------------------------------------

/** Slots per stage whose p·scale (and zero-point term) are precomputed into shared memory. */
constexpr int kPvSlots = 256;

/**
 * As v1's p·V (a warp per pack group, lane l owns channels l·CPT.., sums in shared memory), over
 * staged segments; per stage, all threads first compute ps = p_t·scale_t and the zero-point
 * source (ps·zp or p·lo) of every slot and head into shared memory (independent loads, one
 * latency per stage). Stages hold at most kPvSlots / B segments.
 */
template <int P, int NR>
__global__ void __launch_bounds__(kWarps * 32) pvKernel(Args a) {
  __shared__ int sOff[2][kMaxSegs];
  extern __shared__ __align__(16) uint8_t sMem[];  // [2][kBufBytes], ps f32 [NR][kPvSlots], zsrc [NR][kPvSlots], acc [kWarps][NR][D]
  const int h = blockIdx.y, D = a.D;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float* sPs = reinterpret_cast<float*>(sMem + 2 * kBufBytes);
  float* sZs = sPs + NR * kPvSlots;
  float* sAcc = sZs + NR * kPvSlots;
  const int maxSegs = max(1, min(kMaxSegs, kPvSlots / a.B));
  int bBeg, bEnd;
  runOf(a, bBeg, bEnd);
  int n = issueStage(a, h, bBeg, bEnd, maxSegs, 1, sMem, sOff[0]);
  for (int i = threadIdx.x; i < kWarps * NR * D; i += blockDim.x) sAcc[i] = 0.f;
  float* acc = sAcc + warp * NR * D;
  const int CPT = D / 32;
  const uint16_t* pHead = a.in + size_t(h) * NR * a.T;
  int buf = 0;
  for (int b = bBeg; b < bEnd;) {
    const int bn = b + (n > 0 ? n : 1);
    const int nn = issueStage(a, h, bn, bEnd, maxSegs, 1, sMem + (buf ^ 1) * kBufBytes, sOff[buf ^ 1]);
    const int nseg = n > 0 ? n : 1;
    for (int idx = threadIdx.x; idx < nseg * a.B; idx += blockDim.x) {
      const int k = idx / a.B, j = idx % a.B, bb = b + k, slot = bb * a.B + j;
      const int tok = originOf(a, bb, j);
      const float sc = scaleOf(a, slot), z = zeroOf(a, slot);
#pragma unroll
      for (int i = 0; i < NR; ++i) {
        const float pt = halfFrom(pHead[size_t(i) * a.T + tok]), ps = pt * sc;
        sPs[i * kPvSlots + idx] = ps;
        sZs[i * kPvSlots + idx] = (a.hp ? pt : ps) * z;
      }
    }
    cpAsyncWait1();
    __syncthreads();
    const uint8_t* sBuf = sMem + buf * kBufBytes;
    const uint32_t* sLimit = reinterpret_cast<const uint32_t*>(sBuf + kBufBytes);
    const int items = nseg * a.G;
    for (int it = warp; it < items; it += kWarps) {
      const int k = it / a.G, g = it % a.G, bb = b + k;
      const SegAny s = n > 0 ? segAt(a, sBuf + sOff[buf][k], sLimit)
                             : segAt(a, a.segments + __ldg(a.offsets + size_t(bb) * a.H + h), a.endWords);
      const uint32_t before = widthsBeforeAny<32>(s, g, D, CPT, lane, 0xffffffffu);
      const int base = k * a.B + g * P;  // this group's first slot in sPs
      float psSum[NR], zs[NR];
#pragma unroll
      for (int i = 0; i < NR; ++i) {
        psSum[i] = lane < P ? sPs[i * kPvSlots + base + lane] : 0.f;
        zs[i] = lane < P ? sZs[i * kPvSlots + base + lane] : 0.f;
#pragma unroll
        for (int o = 16; o >= 1; o >>= 1) {
          psSum[i] += __shfl_xor_sync(0xffffffffu, psSum[i], o);
          zs[i] += __shfl_xor_sync(0xffffffffu, zs[i], o);
        }
      }
      const uint8_t* addr = s.payload + (P / 8) * before;
      const uint32_t i0 = uint32_t(g * D + lane * CPT);
      for (int j = 0; j < CPT; ++j) {
        const int d = lane * CPT + j;
        const uint32_t w = widthAny(s.widths, i0 + j);
        const float m = float(readBitsAny(s.mins, (i0 + j) * s.mw, s.mw));
        if (__all_sync(0xffffffffu, w == 0)) {  // warp-uniform skip of empty packs
#pragma unroll
          for (int i = 0; i < NR; ++i) acc[i * D + d] += fmaf(m, psSum[i], zs[i]);
          continue;
        }
        uint32_t u[P];
        unitCodes<P>(addr, w, s.limit, u);  // w = 0: f = 1, pw = 1, t − Σps ≈ 0
        addr += (P / 8) * w;
        const float pw = pow2(w);
#pragma unroll
        for (int i = 0; i < NR; ++i) {
          const float4* ps4 = reinterpret_cast<const float4*>(sPs + i * kPvSlots + base);
          float t = 0.f;
#pragma unroll
          for (int kk = 0; kk < P; kk += 4) {
            const float4 q = ps4[kk / 4];
            t = fmaf(q.x, __uint_as_float(u[kk]), t);
            t = fmaf(q.y, __uint_as_float(u[kk + 1]), t);
            t = fmaf(q.z, __uint_as_float(u[kk + 2]), t);
            t = fmaf(q.w, __uint_as_float(u[kk + 3]), t);
          }
          acc[i * D + d] += fmaf(pw, t - psSum[i], fmaf(m, psSum[i], zs[i]));
        }
      }
    }
    __syncthreads();
    b = bn, n = nn, buf ^= 1;
  }
  cpAsyncWait0();
  __syncthreads();  // sAcc zeroed (no stage ran when the run is empty)
  // The recent fp16 tokens: a warp per token, over all blocks of this head.
  pvBufferTokens<NR>(a, acc, pHead, D, h, warp, lane);
  __syncthreads();
  pvFinish<NR>(a, sAcc, D, h);
}

}  // namespace packkv::packkv_gpu::v2
