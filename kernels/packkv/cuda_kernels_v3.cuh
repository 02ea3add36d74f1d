// PackKV products, version 3 (docs/kernels.md "packkv", v3): tensor cores (mma.sync m16n8k16,
// f16 x f16 -> f32), head_dim 128. Fixes v2's issue bound (~11 instructions per element per head
// group: per-head FFMAs and an 8-lane reduce-scatter) by turning every code into an exact f16
// integer once and letting the MMA do the per-head products.
//
// Staging is v2's (segments copied to shared memory with cp.async, double-buffered). A warp owns
// one item = pack group (b, g): P stored slots x 128 channels. Per item:
//   1. unpack: lane l owns the 4 consecutive packs g·D + 4l + j; their payload offset is the sum of
//      the widths of the segment's earlier groups (nibbles, 32 lanes in parallel) plus one shuffle
//      scan of the lanes' own width totals. Each 8-code chunk (w bytes, w ≤ 8) is read as one
//      unaligned 64-bit window and becomes four f16x2 words with PRMT/SHR/LOP3 and one HSUB2 each:
//      bits 0x6400 | v are the f16 1024 + v (exact), minus the per-pack f16 (1024 − m), gives the
//      exact integer v + m (< 2048). The 16 bytes go to the warp's f16 tile [16-slot tile][channel]
//      [16 slots] with one 16-byte store; within each 8-slot half the slots are stored in the order
//      0,4,1,5,2,6,3,7 (what the PRMT pairing yields), undone when scores are written / p is read.
//      Rows are swizzled (rotate inside 4-row groups, flip the 16-byte half) so both the stores
//      (lane l: channel 4l + j) and ldmatrix's 8-row reads are bank-conflict free.
//   2. q·Kᵀ: ldmatrix.x4.trans gives A = codes [16 slots x 16 channels]; B = q [16 channels x 8
//      heads] is q's own f16 bits (exact), read once per block. The f32 accumulator of D/16 MMAs
//      is the exact-products dot Σ q·(v + m); score = scale·(dot + zp·Σq) or scale·dot + lo·Σq.
//   3. p·V: ldmatrix.x4 (no transpose) gives A = codes [16 channels x 16 slots]; B = p·scale
//      [16 slots x (hi, lo) per head], the f32 value split into two f16 columns after a per-stage,
//      per-head power-of-two normalization (max |p·scale| in [2^14, 2^15)), so the product keeps
//      ~22 bits. The MMAs of a warp accumulate over its items of one stage in registers (at most a
//      few hundred slots: the tensor cores' truncating accumulation cannot pile up), then are added
//      into the warp's fp32 sums in shared memory together with the stage's zero-point term
//      Σ p·scale·zp (or Σ p·lo) — the term that cancels against them, so the long sums stay at the
//      size of the result. Block partials are added in split order as in v2 (deterministic).
// The recent fp16 buffer tokens use v2's FFMA loops. Grids are one wave (resident blocks per SM,
// from the occupancy API, times SMs). Segments larger than a stage (block 512) are read in place
// from global memory through the same code, correct but slow (the width prefix is then O(G²)
// global byte loads). Emulated on the host by kernels/tools/packkv_v3_emu.cpp.
#pragma once
#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#include <cuda_fp16.h>

#include "packkv/cuda_kernels_v2.cuh"
#endif

namespace packkv::packkv_gpu::v3 {

constexpr int kD = 128;          // head_dim of the v3 kernels (others use v2)
constexpr int kLanePacks = kD / 32;
constexpr uint32_t kMagic = 0x64006400u;  // f16x2 (1024, 1024)
constexpr int kNormTop = 14;      // p·V: max |p·scale·2^e| in [2^14, 2^15)

/** f16 tile bytes per warp: ceil(P/16) tiles of 16 slots x kD channels x 32 bytes. */
__host__ __device__ constexpr int tileBytes(int P) { return (P >= 16 ? P / 16 : 1) * kD * 32; }

/** Slot (0..7) of an 8-slot half stored at position p. */
__host__ __device__ __forceinline__ int slotAt(int p) { return (p >> 1) + 4 * (p & 1); }

/** Byte offset of (channel c, 8-slot half) inside one 16-slot tile: rows rotated inside groups of
 *  4 and halves flipped so that 8 lanes storing channels 4l + j, and ldmatrix reading 8
 *  consecutive channels, touch 8 different 16-byte bank groups. */
__host__ __device__ __forceinline__ uint32_t rowOffset(int c, int half) {
  const int row = (c & ~3) | ((c + (c >> 2)) & 3);
  const int ph = half ^ ((c >> 2) & 1) ^ ((c >> 4) & 1);
  return uint32_t(row * 32 + ph * 16);
}

// ---- portable bit helpers (host versions for the emulator) -----------------------------------

__host__ __device__ __forceinline__ uint32_t fshr(uint32_t lo, uint32_t hi, uint32_t sh) {  // sh ≤ 32
#ifdef __CUDA_ARCH__
  return __funnelshift_rc(lo, hi, sh);
#else
  const uint64_t v = (uint64_t(hi) << 32) | lo;
  return sh >= 32 ? hi : uint32_t(v >> sh);
#endif
}
__host__ __device__ __forceinline__ uint32_t lowHalves(uint32_t a, uint32_t b) {  // (a.lo16, b.lo16)
#ifdef __CUDA_ARCH__
  return __byte_perm(a, b, 0x5410);
#else
  return (a & 0xFFFFu) | (b << 16);
#endif
}
/** x − y on f16x2 bit patterns; exact here (integers below 2048). */
__host__ __device__ __forceinline__ uint32_t hsub2Bits(uint32_t x, uint32_t y) {
#ifdef __CUDA_ARCH__
  const __half2 r = __hsub2(*reinterpret_cast<const __half2*>(&x), *reinterpret_cast<const __half2*>(&y));
  return *reinterpret_cast<const uint32_t*>(&r);
#else
  auto toF = [](uint32_t b) {  // normal, positive f16 only (what the tile holds)
    const int e = int((b >> 10) & 31) - 15;
    return std::ldexp(1.0 + double(b & 1023) / 1024.0, e);
  };
  auto toH = [](double v) -> uint32_t {  // exact integers 0 < v < 2048, 0 → 0
    if (v == 0) return 0;
    int e = 0;
    const double f = std::frexp(v, &e);  // v = f·2^e, f in [0.5, 1)
    return uint32_t((e - 1 + 15) << 10) | uint32_t(std::lround((f * 2 - 1) * 1024));
  };
  const uint32_t lo = toH(toF(x & 0xFFFFu) - toF(y & 0xFFFFu)), hi = toH(toF(x >> 16) - toF(y >> 16));
  return lo | (hi << 16);
#endif
}
__host__ __device__ __forceinline__ uint32_t halfBitsOfInt(uint32_t v) {  // exact for v ≤ 2048
#ifdef __CUDA_ARCH__
  return __half_as_ushort(__uint2half_rn(v));
#else
  if (v == 0) return 0;
  int e = 31 - __builtin_clz(v);
  return uint32_t((e + 15) << 10) | (((v << (10 - (e > 10 ? 10 : e))) >> (e > 10 ? e - 10 : 0)) & 1023u);
#endif
}

/** Bits of `bits` ≤ 24 at bit pos, any memory (v2's readBitsAny, host-callable). */
__host__ __device__ __forceinline__ uint32_t bitsAt(const uint8_t* base, uint32_t pos, uint32_t bits) {
  if (bits == 0) return 0;
  const uint8_t* p = base + (pos >> 3);
  const uint32_t sh = pos & 7u;
  uint32_t v = p[0];
  if (sh + bits > 8) v |= uint32_t(p[1]) << 8;
  if (sh + bits > 16) v |= uint32_t(p[2]) << 16;
  if (sh + bits > 24) v |= uint32_t(p[3]) << 24;
  return (v >> sh) & ((1u << bits) - 1u);
}

/** One segment's parts (v2::SegAny without the device-only constructor). */
struct Seg3 {
  const uint8_t *widths, *mins, *payload;
  const uint32_t* limit;  // one past the last whole word that may be read
  uint32_t mw;
};
__host__ __device__ __forceinline__ Seg3 seg3At(const uint8_t* seg, uint32_t GD, const uint32_t* limit) {
  Seg3 s;
  s.mw = seg[0];
  s.widths = seg + 1;
  s.mins = s.widths + (GD * 4 + 7) / 8;
  s.payload = s.mins + (GD * s.mw + 7) / 8;
  s.limit = limit;
  return s;
}
__host__ __device__ __forceinline__ uint32_t nibbleAt(const uint8_t* widths, uint32_t i) {
  return (widths[i >> 1] >> ((i & 1) * 4)) & 15u;
}

/** The 3 aligned words around an 8-code chunk at byte p (fast path), or ok = false. */
struct Window {
  uint32_t x0, x1, x2;
  bool ok;
};
__host__ __device__ __forceinline__ Window loadWindow(const uint8_t* p, uint32_t w, uint32_t m, const uint32_t* limit) {
  const uintptr_t addr = reinterpret_cast<uintptr_t>(p);
  const uint32_t* wp = reinterpret_cast<const uint32_t*>(addr & ~uintptr_t(3));
  Window x{0u, 0u, 0u, w <= 8 && m < 1024 && wp + 3 <= limit};
  if (x.ok) x.x0 = wp[0], x.x1 = wp[1], x.x2 = wp[2];
  return x;
}

/**
 * Chunk (codes 8k..8k+7) of a pack at byte p, width w, min m, as 4 f16x2 words of v + m in
 * stored-position order (slots 0,4 | 1,5 | 2,6 | 3,7), from its window (fast path: w ≤ 8,
 * m < 1024, window below `limit`); otherwise code by code from p (exact while v + m ≤ 2048).
 */
__host__ __device__ __forceinline__ void chunkHalves(const Window& x, const uint8_t* p, uint32_t w, uint32_t m,
                                                     uint32_t mask2, uint32_t mh, uint32_t (&h)[4]) {
  if (x.ok) {
    const uint32_t sh = uint32_t(reinterpret_cast<uintptr_t>(p) & 3) * 8;
    const uint32_t lo = fshr(x.x0, x.x1, sh), hi = fshr(x.x1, x.x2, sh);
    const uint32_t z = fshr(lo, hi, 4 * w);  // codes 4..7 at the bottom
    const uint32_t u01 = lowHalves(lo, z), u23 = lowHalves(lo >> (2 * w), z >> (2 * w));
    h[0] = hsub2Bits((u01 & mask2) | kMagic, mh);
    h[1] = hsub2Bits(((u01 >> w) & mask2) | kMagic, mh);
    h[2] = hsub2Bits((u23 & mask2) | kMagic, mh);
    h[3] = hsub2Bits(((u23 >> w) & mask2) | kMagic, mh);
  } else {
    uint32_t v[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) v[k] = halfBitsOfInt((w <= 15 ? bitsAt(p, uint32_t(k) * w, w) : 0u) + m);
#pragma unroll
    for (int q = 0; q < 4; ++q) h[q] = v[q] | (v[q + 4] << 16);
  }
}

/**
 * This lane's part of unpacking item (g) of segment s into the warp's tile: packs g·kD + 4·lane + j,
 * whose payload starts at byte `off` (the caller's width prefix).
 */
template <int P>
__host__ __device__ __forceinline__ void unpackLane(const Seg3& s, int g, int lane, uint32_t off, uint8_t* tile) {
  const uint32_t i0 = uint32_t(g * kD + lane * kLanePacks);
  uint32_t mins[kLanePacks];
  {  // the lane's 4 mins in one window (4·mw ≤ 32 bits when mw ≤ 8)
    const uint32_t mw = s.mw;
    if (mw <= 6) {
      const uint32_t all = bitsAt(s.mins, i0 * mw, kLanePacks * mw);
#pragma unroll
      for (int j = 0; j < kLanePacks; ++j) mins[j] = (all >> (j * mw)) & ((1u << mw) - 1u);
    } else {
#pragma unroll
      for (int j = 0; j < kLanePacks; ++j) mins[j] = bitsAt(s.mins, (i0 + j) * mw, mw);
    }
  }
  // Every load first (window words of all chunks), then the arithmetic and the tile stores: the
  // stores cannot be proven not to alias the loads, so interleaving them would serialize.
  uint32_t ws[kLanePacks];
  const uint8_t* ps[kLanePacks];
  Window win[kLanePacks][P / 8];
#pragma unroll
  for (int j = 0; j < kLanePacks; ++j) {
    ws[j] = nibbleAt(s.widths, i0 + j);
    ps[j] = s.payload + off;
    off += uint32_t(P / 8) * ws[j];
  }
#pragma unroll
  for (int j = 0; j < kLanePacks; ++j) {
#pragma unroll
    for (int k = 0; k < P / 8; ++k) win[j][k] = loadWindow(ps[j] + k * ws[j], ws[j], mins[j], s.limit);
  }
#pragma unroll
  for (int j = 0; j < kLanePacks; ++j) {
    const uint32_t w = ws[j], m = mins[j];
    const uint32_t mask2 = ((1u << w) - 1u) * 0x10001u;
    const uint32_t mh = hsub2Bits(0x68006800u, kMagic + (m < 1024 ? m : 0u) * 0x10001u);  // f16x2 1024 − m
    const int c = lane * kLanePacks + j;
#pragma unroll
    for (int k = 0; k < P / 8; ++k) {
      uint32_t hv[4];
      chunkHalves(win[j][k], ps[j] + k * w, w, m, mask2, mh, hv);
      uint32_t* dst = reinterpret_cast<uint32_t*>(tile + (k >> 1) * (kD * 32) + rowOffset(c, k & 1));
#ifdef __CUDA_ARCH__
      *reinterpret_cast<uint4*>(dst) = make_uint4(hv[0], hv[1], hv[2], hv[3]);
#else
      for (int q = 0; q < 4; ++q) dst[q] = hv[q];
#endif
    }
  }
}

/** Width total of this lane's packs of group g and the exclusive prefix before them (in widths). */
__host__ __device__ __forceinline__ uint32_t laneWidths(const Seg3& s, int g, int lane) {
  const uint32_t i0 = uint32_t(g * kD + lane * kLanePacks);
  uint32_t own = 0;
#pragma unroll
  for (int j = 0; j < kLanePacks; ++j) own += nibbleAt(s.widths, i0 + j);
  return own;
}

#ifdef __CUDACC__

using v2::cpAsyncWait0;
using v2::cpAsyncWait1;
using v2::issueStage;
using v2::kBufBytes;
using v2::kMaxSegs;
using v2::kPvSlots;
using v2::runOf;

/** Unpacks item g of segment s into tile (whole warp). */
template <int P>
__device__ __forceinline__ void unpackItem(const Seg3& s, int g, int lane, uint8_t* tile) {
  uint32_t pre = 0;
#pragma unroll 4
  for (int q = lane; q < g * kD / 2; q += 32) {
    const uint32_t x = s.widths[q];
    pre += (x & 15u) + (x >> 4);
  }
#pragma unroll
  for (int o = 16; o >= 1; o >>= 1) pre += __shfl_xor_sync(0xffffffffu, pre, o);
  const uint32_t own = laneWidths(s, g, lane);
  uint32_t incl = own;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const uint32_t n = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += n;
  }
  unpackLane<P>(s, g, lane, uint32_t(P / 8) * (pre + incl - own), tile);
}

__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <bool TRANS>
__device__ __forceinline__ void ldsm4(uint32_t (&r)[4], const uint8_t* p) {
  const unsigned s = unsigned(__cvta_generic_to_shared(p));
  if (TRANS)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s)
                 : "memory");
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s)
                 : "memory");
}

__device__ __forceinline__ Seg3 segOf(const Args& a, int n, const uint8_t* sBuf, int sOffK, int bb, int h) {
  return n > 0 ? seg3At(sBuf + sOffK, uint32_t(a.GD), reinterpret_cast<const uint32_t*>(sBuf + kBufBytes))
               : seg3At(a.segments + __ldg(a.offsets + size_t(bb) * a.H + h), uint32_t(a.GD), a.endWords);
}

// ---- q·Kᵀ -----------------------------------------------------------------------------------------

/** Dynamic shared memory of qkKernel. */
__host__ __device__ constexpr size_t qkSmemBytes(int P, int NR) {
  return 2 * size_t(kBufBytes) + size_t(kWarps) * tileBytes(P) + size_t(kD / 16) * 32 * 8 +
         (size_t(NR) * kD + NR) * sizeof(float);
}

/** The GQA group's queries of KV head h, once per block (all threads; ends after a barrier for sQ
 *  and sQf, Σq written by threads < NR before the caller's next barrier): q as f32 [NR][kD], its
 *  own f16 bits as the MMA B fragments (k 2tig.., column g | k 2tig+8.., column g) per 16-channel
 *  block, and Σq per head summed in double. */
template <int NR>
__device__ __forceinline__ void stageQ(const Args& a, int h, float* sQ, uint2* sQf, float* sQsum) {
  constexpr int D = kD;
  const uint16_t* qHead = a.in + size_t(h) * NR * D;
  for (int i = threadIdx.x; i < NR * D; i += blockDim.x) sQ[i] = halfFrom(qHead[i]);
  for (int i = threadIdx.x; i < (D / 16) * 32; i += blockDim.x) {  // B: (k 2tig.., col g), (k 2tig+8.., col g)
    const int kb = i >> 5, l = i & 31, col = l >> 2, tig = l & 3;
    uint2 f = make_uint2(0u, 0u);
    if (col < NR) {
      const uint16_t* qc = qHead + col * D + kb * 16 + 2 * tig;
      f.x = uint32_t(qc[0]) | (uint32_t(qc[1]) << 16);
      f.y = uint32_t(qc[8]) | (uint32_t(qc[9]) << 16);
    }
    sQf[i] = f;
  }
  __syncthreads();
  if (threadIdx.x < NR) {
    double sum = 0.0;
    for (int d = 0; d < D; ++d) sum += double(sQ[threadIdx.x * D + d]);
    sQsum[threadIdx.x] = float(sum);
  }
}

template <int P, int NR>
__global__ void __launch_bounds__(kWarps * 32) qkKernel(Args a) {
  constexpr int D = kD, MT = P >= 16 ? P / 16 : 1, ROWS = P >= 16 ? 2 * MT : 1;
  extern __shared__ __align__(16) uint8_t sMem[];  // stages | tiles | q B fragments | q f32 | Σq
  __shared__ int sOff[2][kMaxSegs];
  const int h = blockIdx.y;
  uint8_t* sTiles = sMem + 2 * kBufBytes;
  uint2* sQf = reinterpret_cast<uint2*>(sTiles + kWarps * tileBytes(P));
  float* sQ = reinterpret_cast<float*>(sQf + (D / 16) * 32);
  float* sQsum = sQ + NR * D;
  int bBeg, bEnd;
  runOf(a, bBeg, bEnd);
  const int quant = max(1, kWarps / a.G);
  int n = issueStage(a, h, bBeg, bEnd, kMaxSegs, quant, sMem, sOff[0]);
  stageQ<NR>(a, h, sQ, sQf, sQsum);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gr = lane >> 2, tig = lane & 3;
  uint8_t* tile = sTiles + warp * tileBytes(P);
  uint2 bq[D / 16];  // this lane's q B fragments, for the whole kernel
#pragma unroll
  for (int kb = 0; kb < D / 16; ++kb) bq[kb] = sQf[kb * 32 + lane];
  // ldmatrix.trans rows: matrix j = lane/8 covers slots (j&1)·8.. of channels (j>>1)·8 + lane%8.
  const int ldCh = (lane >> 4) * 8 + (lane & 7), ldHalf = P >= 16 ? (lane >> 3) & 1 : 0;
  const uint32_t ldEven = rowOffset(ldCh, ldHalf), ldOdd = rowOffset(16 + ldCh, ldHalf) - 16 * 32;
  int buf = 0;
  for (int b = bBeg; b < bEnd;) {
    const int bn = b + (n > 0 ? n : 1);
    const int nn = issueStage(a, h, bn, bEnd, kMaxSegs, quant, sMem + (buf ^ 1) * kBufBytes, sOff[buf ^ 1]);
    cpAsyncWait1();
    __syncthreads();
    const uint8_t* sBuf = sMem + buf * kBufBytes;
    const int items = (n > 0 ? n : 1) * a.G;
    for (int it = warp; it < items; it += kWarps) {
      const int k = it / a.G, g = it % a.G, bb = b + k;
      const Seg3 s = segOf(a, n, sBuf, sOff[buf][k], bb, h);
      // This thread's output rows (slots), fetched early: row gr (+8) of each 16-slot tile.
      int tok[ROWS];
      float sc[ROWS], z[ROWS];
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const int j = g * P + (r >> 1) * 16 + (r & 1) * 8 + slotAt(gr), slot = bb * a.B + j;
        tok[r] = originOf(a, bb, j);
        sc[r] = scaleOf(a, slot);
        z[r] = zeroOf(a, slot);
      }
      __syncwarp();  // the previous item's ldmatrix reads are done
      unpackItem<P>(s, g, lane, tile);
      __syncwarp();
      float acc[MT][4] = {}, acc2[MT][4] = {};  // even / odd k-blocks: two MMA chains
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        uint32_t af[D / 16][4];
#pragma unroll
        for (int kb = 0; kb < D / 16; ++kb)
          ldsm4<true>(af[kb], tile + mt * D * 32 + kb * 16 * 32 + ((kb & 1) ? ldOdd : ldEven));
#pragma unroll
        for (int kb = 0; kb < D / 16; ++kb) mma16816((kb & 1) ? acc2[mt] : acc[mt], af[kb], bq[kb].x, bq[kb].y);
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mt][e] += acc2[mt][e];
      }
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int head = 2 * tig + e;
          if (head < NR) {
            const float dot = acc[r >> 1][(r & 1) * 2 + e], qsum = sQsum[head];
            a.out[size_t(h * NR + head) * a.T + tok[r]] =
                a.hp ? fmaf(sc[r], dot, z[r] * qsum) : sc[r] * fmaf(z[r], qsum, dot);
          }
        }
      }
    }
    __syncthreads();  // buf is free for the stage after next
    b = bn, n = nn, buf ^= 1;
  }
  cpAsyncWait0();
  // The recent fp16 tokens: 8 lanes per token, over all blocks of this head (as v2).
  constexpr int LPG = 8, SPW = 32 / LPG, GROUPS = kWarps * SPW;
  const int sub = lane / LPG, lp = lane % LPG;
  const unsigned mask = ((1u << LPG) - 1u) << (sub * LPG);
  for (int r = (blockIdx.x * kWarps + warp) * SPW + sub; r < a.Tr; r += gridDim.x * GROUPS) {
    qkBufferToken<NR, LPG>(a, sQ, D, h, r, lp, mask);
  }
}

// ---- p·V --------------------------------------------------------------------------------------------

__host__ __device__ constexpr size_t pvSmemBytes(int P, int NR) {
  return 2 * size_t(kBufBytes) + size_t(kWarps) * tileBytes(P) +
         (2 * size_t(kPvSlots) + size_t(kWarps) * kD + kWarps) * NR * sizeof(float);
}

/** 2^e with max·2^e in [2^kNormTop, 2^(kNormTop+1)); 1 for 0. */
__device__ __forceinline__ float normalizer(float maxAbs) {
  if (!(maxAbs > 0.f)) return 1.f;
  const int e = kNormTop - (int((__float_as_uint(maxAbs) >> 23) & 0xFF) - 127);
  return __uint_as_float(uint32_t(min(max(127 + e, 1), 254)) << 23);
}

/** Per head: the stage's normalizer (block max of |p·scale| in sMax [kWarps][NR]); bScale for this
 *  lane's B column head 4nt + gr/2, cInv = its inverse for the C head 4nt + tig. */
template <int NR, int NT>
__device__ __forceinline__ void stageNormalizers(const float* sMax, int gr, int tig, float (&bScale)[NT],
                                                 float (&cInv)[NT]) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int hb = min(4 * nt + (gr >> 1), NR - 1), hc = min(4 * nt + tig, NR - 1);
    float mb = 0.f, mc = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mb = fmaxf(mb, sMax[w * NR + hb]), mc = fmaxf(mc, sMax[w * NR + hc]);
    bScale[nt] = normalizer(mb);
    cInv[nt] = 1.f / normalizer(mc);  // a power of two: exact
  }
}

/** B fragments of one pack group: (k 2tig, 2tig+1 | 2tig+8, 2tig+9; column gr) = slots tig, tig+4 |
 *  8+tig, 12+tig of ps (sPs at the group's first slot), p·scale·bScale split into f16 hi (even
 *  columns) and lo (odd columns) for the heads 4nt + gr/2 < NR, zeros elsewhere. */
template <int P, int NR, int MT, int NT>
__device__ __forceinline__ void pvBFragments(const float* ps0, const float (&bScale)[NT], int gr, int tig,
                                             uint32_t (&bf)[MT][NT][2]) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int head = 4 * nt + (gr >> 1);
      float x[4] = {0.f, 0.f, 0.f, 0.f};
      if (head < NR) {
        const float* ps = ps0 + head * kPvSlots + mt * 16 + tig;
        x[0] = ps[0] * bScale[nt], x[1] = ps[4] * bScale[nt];
        if (P >= 16) x[2] = ps[8] * bScale[nt], x[3] = ps[12] * bScale[nt];
      }
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        const __half2 hi = __floats2half2_rn(x[2 * q], x[2 * q + 1]);
        const float2 hf = __half22float2(hi);
        const __half2 lo = __floats2half2_rn(x[2 * q] - hf.x, x[2 * q + 1] - hf.y);
        const __half2 v = (gr & 1) ? lo : hi;
        bf[mt][nt][q] = *reinterpret_cast<const uint32_t*>(&v);
      }
    }
  }
}

/** A stage's MMA sums (cAcc, scaled back by cInv) and zero-point terms (zs, reduced over the warp)
 *  into this warp's fp32 accumulators acc [NR][kD]. */
template <int NR, int NT, int MC>
__device__ __forceinline__ void addStageSums(const float (&cAcc)[MC][NT][4], float (&zs)[NR], const float (&cInv)[NT],
                                             int gr, int tig, float* acc) {
#pragma unroll
  for (int i = 0; i < NR; ++i) {
#pragma unroll
    for (int o = 16; o >= 1; o >>= 1) zs[i] += __shfl_xor_sync(0xffffffffu, zs[i], o);
  }
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int head = 4 * nt + tig;
    if (head < NR) {
      float zh = zs[0];
#pragma unroll
      for (int i = 1; i < NR; ++i) zh = head == i ? zs[i] : zh;
#pragma unroll
      for (int mc = 0; mc < MC; ++mc) {
        float* dst = acc + head * kD + mc * 16 + gr;
        dst[0] += fmaf(cAcc[mc][nt][0] + cAcc[mc][nt][1], cInv[nt], zh);
        dst[8] += fmaf(cAcc[mc][nt][2] + cAcc[mc][nt][3], cInv[nt], zh);
      }
    }
  }
}

template <int P, int NR>
__global__ void __launch_bounds__(kWarps * 32) pvKernel(Args a) {
  constexpr int D = kD, MT = P >= 16 ? P / 16 : 1, NT = (2 * NR + 7) / 8, MC = D / 16;
  __shared__ int sOff[2][kMaxSegs];
  extern __shared__ __align__(16) uint8_t sMem[];  // stages | tiles | ps [NR][slots] | zsrc | acc [kWarps][NR][D] | max [kWarps][NR]
  const int h = blockIdx.y;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gr = lane >> 2, tig = lane & 3;
  uint8_t* tile = sMem + 2 * kBufBytes + warp * tileBytes(P);
  float* sPs = reinterpret_cast<float*>(sMem + 2 * kBufBytes + kWarps * tileBytes(P));
  float* sZs = sPs + NR * kPvSlots;
  float* sAcc = sZs + NR * kPvSlots;
  float* sMax = sAcc + kWarps * NR * D;
  const int maxSegs = max(1, min(kMaxSegs, kPvSlots / a.B));
  int bBeg, bEnd;
  runOf(a, bBeg, bEnd);
  int n = issueStage(a, h, bBeg, bEnd, maxSegs, 1, sMem, sOff[0]);
  for (int i = threadIdx.x; i < kWarps * NR * D; i += blockDim.x) sAcc[i] = 0.f;
  float* acc = sAcc + warp * NR * D;
  const uint16_t* pHead = a.in + size_t(h) * NR * a.T;
  // ldmatrix rows (no transpose): matrix j = lane/8 covers channels (j&1)·8 + lane%8, slots (j>>1)·8..
  const int ldCh = ((lane >> 3) & 1) * 8 + (lane & 7), ldHalf = P >= 16 ? lane >> 4 : 0;
  const uint32_t ldEven = rowOffset(ldCh, ldHalf), ldOdd = rowOffset(16 + ldCh, ldHalf) - 16 * 32;
  int buf = 0;
  for (int b = bBeg; b < bEnd;) {
    const int bn = b + (n > 0 ? n : 1);
    const int nn = issueStage(a, h, bn, bEnd, maxSegs, 1, sMem + (buf ^ 1) * kBufBytes, sOff[buf ^ 1]);
    const int nseg = n > 0 ? n : 1;
    // p·scale and the zero-point source of every slot of the stage (nseg·B ≤ kPvSlots), loads
    // first: origin, scale and zero of this thread's slots, then their p, then the stores.
    float mx[NR] = {};
    {
      constexpr int PER = kPvSlots / (kWarps * 32);
      int tok[PER];
      float sc[PER], z[PER];
      uint16_t pv[PER][NR];
#pragma unroll
      for (int u = 0; u < PER; ++u) {
        const int idx = threadIdx.x + u * kWarps * 32;
        tok[u] = -1;
        if (idx < nseg * a.B) {
          const int k = idx / a.B, j = idx % a.B, bb = b + k, slot = bb * a.B + j;
          tok[u] = originOf(a, bb, j);
          sc[u] = scaleOf(a, slot), z[u] = zeroOf(a, slot);
        }
      }
#pragma unroll
      for (int u = 0; u < PER; ++u)
#pragma unroll
        for (int i = 0; i < NR; ++i) pv[u][i] = tok[u] >= 0 ? __ldg(pHead + size_t(i) * a.T + tok[u]) : uint16_t(0);
#pragma unroll
      for (int u = 0; u < PER; ++u) {
        const int idx = threadIdx.x + u * kWarps * 32;
        if (tok[u] >= 0) {
#pragma unroll
          for (int i = 0; i < NR; ++i) {
            const float pt = halfFrom(pv[u][i]), ps = pt * sc[u];
            sPs[i * kPvSlots + idx] = ps;
            sZs[i * kPvSlots + idx] = (a.hp ? pt : ps) * z[u];
            mx[i] = fmaxf(mx[i], fabsf(ps));
          }
        }
      }
    }
#pragma unroll
    for (int i = 0; i < NR; ++i) {
#pragma unroll
      for (int o = 16; o >= 1; o >>= 1) mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], o));
      if (lane == 0) sMax[warp * NR + i] = mx[i];
    }
    cpAsyncWait1();
    __syncthreads();
    // Per head: the stage's normalizer; this lane's B column head (4nt + gr/2) and C head (4nt + tig).
    float bScale[NT], cInv[NT];
    stageNormalizers<NR, NT>(sMax, gr, tig, bScale, cInv);
    const uint8_t* sBuf = sMem + buf * kBufBytes;
    float cAcc[MC][NT][4] = {};
    float zs[NR] = {};
    const int items = nseg * a.G;
    for (int it = warp; it < items; it += kWarps) {
      const int k = it / a.G, g = it % a.G, bb = b + k;
      const Seg3 s = segOf(a, n, sBuf, sOff[buf][k], bb, h);
      const int base = k * a.B + g * P;  // this item's first slot in sPs
      if (lane < P) {
#pragma unroll
        for (int i = 0; i < NR; ++i) zs[i] += sZs[i * kPvSlots + base + lane];
      }
      uint32_t bf[MT][NT][2];
      pvBFragments<P, NR, MT, NT>(sPs + base, bScale, gr, tig, bf);
      __syncwarp();  // the previous item's ldmatrix reads are done
      unpackItem<P>(s, g, lane, tile);
      __syncwarp();
#pragma unroll
      for (int mc = 0; mc < MC; ++mc) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          uint32_t af[4];
          ldsm4<false>(af, tile + mt * D * 32 + mc * 16 * 32 + ((mc & 1) ? ldOdd : ldEven));
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) mma16816(cAcc[mc][nt], af, bf[mt][nt][0], bf[mt][nt][1]);
        }
      }
    }
    // The stage's sums into this warp's fp32 accumulators, with its zero-point term.
    addStageSums<NR, NT, MC>(cAcc, zs, cInv, gr, tig, acc);
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

#endif  // __CUDACC__

}  // namespace packkv::packkv_gpu::v3
