// PackKV products, version 4 (docs/kernels.md "packkv", v4): v3's tensor-core kernels (head_dim
// 128) with the unpack cut down to what the data needs. Fixes v3's issue bound (~16 instructions
// per element, ~10 of them unpacking: 64-bit generic addresses and bounds checks per 8-code chunk,
// byte-wise width/min parsing, a per-item width prefix over byte loads) and the p·V error that grew
// with T (the Σ p·scale·code − Σ p·scale·zp cancellation).
//
//   * Staged segments are read with 32-bit shared addresses (ld.shared.u32, no generic pointers)
//     and no per-chunk checks: the stage buffer has kPad bytes past its end, so every 3-word window
//     of a pack of width ≤ 8 stays inside it. The checks happen once per item and warp: the
//     segment's min width ≤ 10 (mins < 1024) and no width nibble > 8 (a SWAR test on the lane's own
//     16 width bits, one vote). Items that fail, and segments larger than a stage (read in place),
//     take the byte-wise slow path (unpackSlow, not inlined, so it costs the fast path no registers).
//   * Metadata word-wise: a lane's 4 width nibbles are one 16-bit field (2 loads + a funnel shift),
//     its 4 mins one ≤ 40-bit field (3 loads, 2 funnel shifts); the widths of the item's earlier
//     pack groups are summed 8 nibbles per aligned word (SWAR), spread over the lanes.
//   * q·Kᵀ: the stored slot -> (token, scale, zero) table of a stage is built once per stage by the
//     block (coalesced, 4x less work than per item), read from shared memory by the epilogue.
//   * p·V: every segment's codes are centred by an integer c (from the zero point of the segment's
//     first slot: c = −zp, or −rint(lo/scale) for zp=hp, clamped to ±512): the tile holds the exact
//     f16 integer v + m − c (HSUB2 with the per-pack f16 1024 − m + c) and the slot's zero-point
//     term becomes p·scale·(zp + c) (int: exact integer sum; hp: p·fma(scale, c, lo)), so the two
//     sums no longer cancel and stay at the size of the result.
// Everything else (staging, tiles, swizzle, MMAs, grids, the fp16 buffer) is v3's. The lane
// phases are __host__ __device__ and run on the host in kernels/tools/packkv_v3_emu.cpp.
#pragma once
#include <cstdint>
#include <cstring>

#include "packkv/cuda_kernels_v3.cuh"

namespace packkv::packkv_gpu::v4 {

using v3::bitsAt;
using v3::fshr;
using v3::kD;
using v3::kLanePacks;
using v3::kMagic;
using v3::lowHalves;
using v3::nibbleAt;
using v3::rowOffset;
using v3::Seg3;
using v3::seg3At;
using v3::slotAt;
using v3::tileBytes;

constexpr int kQkSlots = 512;  // q·Kᵀ: slots per stage whose (token, scale, zero) are tabled
constexpr int kMaxCentre = 512;

// ---- shared memory through 32-bit addresses (host: offsets into an emulated array) -------------

#ifndef __CUDA_ARCH__
/** The emulator's shared memory: every u32 "shared address" is an offset into it. */
inline uint8_t*& emuSmem() {
  static uint8_t* p = nullptr;
  return p;
}
#endif

__host__ __device__ __forceinline__ uint32_t lds32(uint32_t addr) {  // addr 4-byte aligned
#ifdef __CUDA_ARCH__
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(v) : "r"(addr));
  return v;
#else
  uint32_t v;
  std::memcpy(&v, emuSmem() + addr, 4);
  return v;
#endif
}
__host__ __device__ __forceinline__ void sts128(uint32_t addr, uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
#ifdef __CUDA_ARCH__
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(a), "r"(b), "r"(c), "r"(d) : "memory");
#else
  const uint32_t v[4] = {a, b, c, d};
  std::memcpy(emuSmem() + addr, v, 16);
#endif
}
__host__ __device__ __forceinline__ uint32_t lds8(uint32_t addr) { return (lds32(addr & ~3u) >> ((addr & 3u) * 8)) & 0xFFu; }

/** f16 bits of an integer |v| ≤ 2048 (exact). */
__host__ __device__ __forceinline__ uint32_t halfBitsOfSigned(int v) {
#ifdef __CUDA_ARCH__
  return __half_as_ushort(__int2half_rn(v));
#else
  return v < 0 ? 0x8000u | v3::halfBitsOfInt(uint32_t(-v)) : v3::halfBitsOfInt(uint32_t(v));
#endif
}

/** x − y on f16x2 bit patterns, exact when both and the result are integers of magnitude < 2048. */
__host__ __device__ __forceinline__ uint32_t hsub2Exact(uint32_t x, uint32_t y) {
#ifdef __CUDA_ARCH__
  return v3::hsub2Bits(x, y);
#else
  auto toD = [](uint32_t b) {
    const int e = int((b >> 10) & 31);
    const double f = e ? std::ldexp(1.0 + double(b & 1023) / 1024.0, e - 15) : std::ldexp(double(b & 1023), -24);
    return (b & 0x8000u) ? -f : f;
  };
  auto toH = [](double v) -> uint32_t {
    const long iv = std::lround(v);
    if (double(iv) != v || iv > 2048 || iv < -2048) return 0x7E00u;  // NaN: not exact, the check fails
    return halfBitsOfSigned(int(iv));
  };
  return toH(toD(x & 0xFFFFu) - toD(y & 0xFFFFu)) | (toH(toD(x >> 16) - toD(y >> 16)) << 16);
#endif
}

// ---- one segment in shared memory ------------------------------------------------------------------

struct Seg4 {
  uint32_t widths, mins, payload, mw;  // shared addresses, min width
};
__host__ __device__ __forceinline__ Seg4 seg4At(uint32_t seg, uint32_t GD) {
  Seg4 s;
  s.mw = lds8(seg);
  s.widths = seg + 1;
  s.mins = s.widths + (GD * 4 + 7) / 8;
  s.payload = s.mins + (GD * s.mw + 7) / 8;
  return s;
}

/** A lane's view of item (segment, g): its 4 width nibbles, its share of the earlier groups'
 *  width sum, and whether one of its widths is > 8 (fast path impossible). */
struct LaneMeta {
  uint32_t wbits, earlier;
  bool bad;
};
__host__ __device__ __forceinline__ LaneMeta laneMeta(const Seg4& s, int g, int lane) {
  LaneMeta m;
  const uint32_t wl = s.widths + uint32_t(g) * (kD / 2) + 2u * uint32_t(lane);
  const uint32_t wa = wl & ~3u;
  m.wbits = fshr(lds32(wa), lds32(wa + 4), (wl & 3u) * 8) & 0xFFFFu;
  m.bad = ((((m.wbits & 0x7777u) + 0x7777u) & m.wbits) & 0x8888u) != 0;  // a nibble 9..15
  // Widths of groups < g: bytes [widths, widths + g·kD/2), word-aligned, edges masked.
  const uint32_t base = s.widths & ~3u, lead = s.widths & 3u, end = lead + uint32_t(g) * (kD / 2);
  uint32_t earlier = 0;
  for (uint32_t i = uint32_t(lane); g > 0 && 4 * i < end; i += 32) {
    uint32_t v = lds32(base + 4 * i);
    if (i == 0) v &= ~0u << (8 * lead);
    const uint32_t rem = end - 4 * i;
    if (rem < 4) v &= (1u << (8 * rem)) - 1u;
    const uint32_t y = (v & 0x0F0F0F0Fu) + ((v >> 4) & 0x0F0F0F0Fu);  // bytes ≤ 30
    earlier += (y * 0x01010101u) >> 24;                                  // ≤ 120
  }
  m.earlier = earlier;
  return m;
}
__host__ __device__ __forceinline__ uint32_t ownWidths(uint32_t wbits) {
  const uint32_t y = (wbits & 0x0F0Fu) + ((wbits >> 4) & 0x0F0Fu);
  return (y & 0xFFu) + (y >> 8);
}

/**
 * Fast path: this lane's 4 packs g·kD + 4·lane + j into the warp's tile (shared address `tile`),
 * payload of its first pack at byte `off` of the segment's payload, as the f16 integers
 * v + m − centre. Needs every width ≤ 8 and mw ≤ 10 (the caller's check).
 */
template <int P>
__host__ __device__ __forceinline__ void unpackLaneFast(const Seg4& s, int g, int lane, uint32_t wbits, uint32_t off,
                                                        uint32_t tile, int centre) {
  const uint32_t i0 = uint32_t(g * kD + lane * kLanePacks), mw = s.mw;
  const uint32_t pos = (s.mins & 3u) * 8 + i0 * mw;
  const uint32_t ma = (s.mins & ~3u) + (pos >> 5) * 4, msh = pos & 31u;
  const uint32_t mx0 = lds32(ma), mx1 = lds32(ma + 4), mx2 = lds32(ma + 8);
  uint32_t ws[kLanePacks], addr[kLanePacks];
  uint32_t x[kLanePacks][P / 8][3];
  uint32_t p = s.payload + off;
#pragma unroll
  for (int j = 0; j < kLanePacks; ++j) {
    ws[j] = (wbits >> (4 * j)) & 15u;
    addr[j] = p;
    p += uint32_t(P / 8) * ws[j];
  }
#pragma unroll
  for (int j = 0; j < kLanePacks; ++j) {
#pragma unroll
    for (int k = 0; k < P / 8; ++k) {
      const uint32_t wa = (addr[j] + uint32_t(k) * ws[j]) & ~3u;
      x[j][k][0] = lds32(wa), x[j][k][1] = lds32(wa + 4), x[j][k][2] = lds32(wa + 8);
    }
  }
  const uint32_t mlo = fshr(mx0, mx1, msh), mhi = fshr(mx1, mx2, msh), mmask = (1u << mw) - 1u;
#pragma unroll
  for (int j = 0; j < kLanePacks; ++j) {
    const uint32_t w = ws[j], m = fshr(mlo, mhi, uint32_t(j) * mw) & mmask;
    const uint32_t mask2 = ((1u << w) - 1u) * 0x10001u;
    const uint32_t mh = halfBitsOfSigned(1024 - int(m) + centre) * 0x10001u;  // f16x2 1024 − m + c
    const int c = lane * kLanePacks + j;
#pragma unroll
    for (int k = 0; k < P / 8; ++k) {
      const uint32_t sh = ((addr[j] + uint32_t(k) * w) & 3u) * 8;
      const uint32_t lo = fshr(x[j][k][0], x[j][k][1], sh), hi = fshr(x[j][k][1], x[j][k][2], sh);
      const uint32_t z = fshr(lo, hi, 4 * w);  // codes 4..7 at the bottom
      const uint32_t u01 = lowHalves(lo, z), u23 = lowHalves(lo >> (2 * w), z >> (2 * w));
      sts128(tile + uint32_t(k >> 1) * (kD * 32) + rowOffset(c, k & 1), hsub2Exact((u01 & mask2) | kMagic, mh),
             hsub2Exact(((u01 >> w) & mask2) | kMagic, mh), hsub2Exact((u23 & mask2) | kMagic, mh),
             hsub2Exact(((u23 >> w) & mask2) | kMagic, mh));
    }
  }
}

/**
 * Slow path, any segment in any memory (generic pointers, byte reads only, so nothing past the
 * pack's own bytes is read): this lane's 4 packs as v + m − centre, exact while |v + m − c| ≤ 2048.
 * `off` as for the fast path (v3's width prefix).
 */
template <int P>
__host__ __device__ __forceinline__ void unpackLaneSlow(const Seg3& s, int g, int lane, uint32_t off, uint8_t* tile,
                                                        int centre) {
  const uint32_t i0 = uint32_t(g * kD + lane * kLanePacks);
#pragma unroll 1
  for (int j = 0; j < kLanePacks; ++j) {
    const uint32_t w = nibbleAt(s.widths, i0 + j), m = bitsAt(s.mins, (i0 + j) * s.mw, s.mw);
    const uint8_t* p = s.payload + off;
    off += uint32_t(P / 8) * w;
    const int c = lane * kLanePacks + j;
#pragma unroll 1
    for (int k = 0; k < P / 8; ++k) {
      uint32_t hv[8];
      for (int q = 0; q < 8; ++q)
        hv[q] = halfBitsOfSigned(int((w <= 15 ? bitsAt(p, uint32_t(8 * k + q) * w, w) : 0u) + m) - centre);
      uint8_t* dst = tile + (k >> 1) * (kD * 32) + rowOffset(c, k & 1);
      for (int q = 0; q < 4; ++q)  // stored positions 2q, 2q+1 = slots q, q+4
        reinterpret_cast<uint32_t*>(dst)[q] = hv[q] | (hv[q + 4] << 16);
    }
  }
}

/** Integer centre of p·V's codes for token block b (as both the tile and the zero term use it). */
__host__ __device__ __forceinline__ int centreOf(bool hp, int32_t zp0, float scale0, float lo0) {
  float c = hp ? -rintf(lo0 / scale0) : -float(zp0);
  c = c > float(kMaxCentre) ? float(kMaxCentre) : c < -float(kMaxCentre) ? -float(kMaxCentre) : c;
  return c == c ? int(c) : 0;
}

#ifdef __CUDACC__

using v2::cpAsyncWait0;
using v2::cpAsyncWait1;
using v2::issueStage;
using v2::kBufBytes;
using v2::kMaxSegs;
using v2::kPvSlots;
using v2::runOf;
using v3::ldsm4;
using v3::mma16816;
using v3::normalizer;
using v3::addStageSums;
using v3::stageQ;
using v3::pvBFragments;
using v3::stageNormalizers;

/** The slow path for a whole warp: v3's width prefix, then unpackLaneSlow. Not inlined. */
template <int P>
__device__ __noinline__ void unpackSlow(Seg3 s, int g, int lane, uint8_t* tile, int centre) {
  uint32_t pre = 0;
  for (int q = lane; q < g * kD / 2; q += 32) {
    const uint32_t x = s.widths[q];
    pre += (x & 15u) + (x >> 4);
  }
#pragma unroll
  for (int o = 16; o >= 1; o >>= 1) pre += __shfl_xor_sync(0xffffffffu, pre, o);
  const uint32_t own = v3::laneWidths(s, g, lane);
  uint32_t incl = own;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const uint32_t n = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += n;
  }
  unpackLaneSlow<P>(s, g, lane, uint32_t(P / 8) * (pre + incl - own), tile, centre);
}

/**
 * Unpacks item g of a segment into the warp's tile. staged: the segment is in shared memory at
 * shared address segAddr (generic segPtr); otherwise segPtr is in global memory.
 */
template <int P>
__device__ __forceinline__ void unpackItem(const Args& a, bool staged, uint32_t segAddr, const uint8_t* segPtr, int g,
                                           int lane, uint8_t* tile, int centre) {
  if (staged) {
    const Seg4 s = seg4At(segAddr, uint32_t(a.GD));
    const LaneMeta m = laneMeta(s, g, lane);
    if (!__any_sync(0xffffffffu, m.bad) && s.mw <= 10) {
      uint32_t earlier = m.earlier;
#pragma unroll
      for (int o = 16; o >= 1; o >>= 1) earlier += __shfl_xor_sync(0xffffffffu, earlier, o);
      const uint32_t own = ownWidths(m.wbits);
      uint32_t incl = own;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const uint32_t n = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += n;
      }
      unpackLaneFast<P>(s, g, lane, m.wbits, uint32_t(P / 8) * (earlier + incl - own),
                        unsigned(__cvta_generic_to_shared(tile)), centre);
      return;
    }
  }
  unpackSlow<P>(seg3At(segPtr, uint32_t(a.GD), nullptr), g, lane, tile, centre);
}

// ---- q·Kᵀ -----------------------------------------------------------------------------------------

/** Dynamic shared memory of qkKernel. */
__host__ __device__ constexpr size_t qkSmemBytes(int P, int NR) {
  return 2 * size_t(kBufBytes) + size_t(kWarps) * tileBytes(P) + size_t(kD / 16) * 32 * 8 +
         (size_t(NR) * kD + ((NR + 1) & ~1)) * sizeof(float) + size_t(kQkSlots) * 12;
}

template <int P, int NR>
__global__ void __launch_bounds__(kWarps * 32) qkKernel(Args a) {
  constexpr int D = kD, MT = P >= 16 ? P / 16 : 1, ROWS = P >= 16 ? 2 * MT : 1;
  extern __shared__ __align__(16) uint8_t sMem[];  // stages | tiles | q B fragments | q f32 | Σq | slot table
  __shared__ int sOff[2][kMaxSegs];
  const int h = blockIdx.y;
  uint8_t* sTiles = sMem + 2 * kBufBytes;
  uint2* sQf = reinterpret_cast<uint2*>(sTiles + kWarps * tileBytes(P));
  float* sQ = reinterpret_cast<float*>(sQf + (D / 16) * 32);
  float* sQsum = sQ + NR * D;
  float2* sSz = reinterpret_cast<float2*>(sQsum + ((NR + 1) & ~1));  // (scale, zero) [kQkSlots]
  int* sTok = reinterpret_cast<int*>(sSz + kQkSlots);                  // original token [kQkSlots]
  int bBeg, bEnd;
  runOf(a, bBeg, bEnd);
  const int maxSegs = max(1, min(kMaxSegs, kQkSlots / a.B));
  int n = issueStage(a, h, bBeg, bEnd, maxSegs, 1, sMem, sOff[0]);
  stageQ<NR>(a, h, sQ, sQf, sQsum);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gr = lane >> 2, tig = lane & 3;
  uint8_t* tile = sTiles + warp * tileBytes(P);
  uint2 bq[D / 16];  // this lane's q B fragments, for the whole kernel
#pragma unroll
  for (int kb = 0; kb < D / 16; ++kb) bq[kb] = sQf[kb * 32 + lane];
  const int ldCh = (lane >> 4) * 8 + (lane & 7), ldHalf = P >= 16 ? (lane >> 3) & 1 : 0;
  const uint32_t ldEven = rowOffset(ldCh, ldHalf), ldOdd = rowOffset(16 + ldCh, ldHalf) - 16 * 32;
  const uint32_t sMemAddr = unsigned(__cvta_generic_to_shared(sMem));
  int buf = 0;
  for (int b = bBeg; b < bEnd;) {
    const int bn = b + (n > 0 ? n : 1);
    const int nn = issueStage(a, h, bn, bEnd, maxSegs, 1, sMem + (buf ^ 1) * kBufBytes, sOff[buf ^ 1]);
    const int nseg = n > 0 ? n : 1;
    {  // the stage's slot table (the previous stage's readers passed the loop's last barrier)
      constexpr int PER = kQkSlots / (kWarps * 32);
      int tok[PER];
      float sc[PER], z[PER];
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
      for (int u = 0; u < PER; ++u) {
        const int idx = threadIdx.x + u * kWarps * 32;
        if (tok[u] >= 0) sTok[idx] = tok[u], sSz[idx] = make_float2(sc[u], z[u]);
      }
    }
    cpAsyncWait1();
    __syncthreads();
    const uint8_t* sBuf = sMem + buf * kBufBytes;
    const int items = nseg * a.G;
    for (int it = warp; it < items; it += kWarps) {
      const int k = it / a.G, g = it % a.G, bb = b + k;
      int tok[ROWS];
      float2 sz[ROWS];
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const int idx = k * a.B + g * P + (r >> 1) * 16 + (r & 1) * 8 + slotAt(gr);
        tok[r] = sTok[idx], sz[r] = sSz[idx];
      }
      __syncwarp();  // the previous item's ldmatrix reads are done
      if (n > 0)
        unpackItem<P>(a, true, sMemAddr + uint32_t(buf * kBufBytes + sOff[buf][k]), sBuf + sOff[buf][k], g, lane,
                      tile, 0);
      else
        unpackItem<P>(a, false, 0u, a.segments + __ldg(a.offsets + size_t(bb) * a.H + h), g, lane, tile, 0);
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
                a.hp ? fmaf(sz[r].x, dot, sz[r].y * qsum) : sz[r].x * fmaf(sz[r].y, qsum, dot);
          }
        }
      }
    }
    __syncthreads();  // buf and the slot table are free for the next stages
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

__host__ __device__ constexpr size_t pvSmemBytes(int P, int NR) { return v3::pvSmemBytes(P, NR); }

/** The centre of token block bb (reads its first slot's scale and zero). */
__device__ __forceinline__ int blockCentre(const Args& a, int bb) {
  const int slot = bb * a.B;
  const float sc = scaleOf(a, slot);
  return a.hp ? centreOf(true, 0, sc, zeroOf(a, slot))
              : centreOf(false, __ldg(reinterpret_cast<const int*>(a.zero) + slot), sc, 0.f);
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
  const int ldCh = ((lane >> 3) & 1) * 8 + (lane & 7), ldHalf = P >= 16 ? lane >> 4 : 0;
  const uint32_t ldEven = rowOffset(ldCh, ldHalf), ldOdd = rowOffset(16 + ldCh, ldHalf) - 16 * 32;
  const uint32_t sMemAddr = unsigned(__cvta_generic_to_shared(sMem));
  int buf = 0;
  for (int b = bBeg; b < bEnd;) {
    const int bn = b + (n > 0 ? n : 1);
    const int nn = issueStage(a, h, bn, bEnd, maxSegs, 1, sMem + (buf ^ 1) * kBufBytes, sOff[buf ^ 1]);
    const int nseg = n > 0 ? n : 1;
    // p·scale and the centred zero-point term p·scale·(zp + c) (hp: p·(lo + scale·c)) of every
    // slot of the stage; loads first, then the stores.
    float mx[NR] = {};
    {
      constexpr int PER = kPvSlots / (kWarps * 32);
      int tok[PER], zi[PER], cen[PER];
      float sc[PER], z[PER];
      uint16_t pv[PER][NR];
#pragma unroll
      for (int u = 0; u < PER; ++u) {
        const int idx = threadIdx.x + u * kWarps * 32;
        tok[u] = -1;
        if (idx < nseg * a.B) {
          const int k = idx / a.B, j = idx % a.B, bb = b + k, slot = bb * a.B + j;
          tok[u] = originOf(a, bb, j);
          sc[u] = scaleOf(a, slot);
          z[u] = zeroOf(a, slot);
          zi[u] = a.hp ? 0 : __ldg(reinterpret_cast<const int*>(a.zero) + slot);
          cen[u] = blockCentre(a, bb);
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
          const float zc = a.hp ? fmaf(sc[u], float(cen[u]), z[u]) : float(int64_t(zi[u]) + cen[u]);
#pragma unroll
          for (int i = 0; i < NR; ++i) {
            const float pt = halfFrom(pv[u][i]), ps = pt * sc[u];
            sPs[i * kPvSlots + idx] = ps;
            sZs[i * kPvSlots + idx] = (a.hp ? pt : ps) * zc;
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
      const int base = k * a.B + g * P;  // this item's first slot in sPs
      const int centre = blockCentre(a, bb);
      if (lane < P) {
#pragma unroll
        for (int i = 0; i < NR; ++i) zs[i] += sZs[i * kPvSlots + base + lane];
      }
      uint32_t bf[MT][NT][2];
      pvBFragments<P, NR, MT, NT>(sPs + base, bScale, gr, tig, bf);
      __syncwarp();  // the previous item's ldmatrix reads are done
      if (n > 0)
        unpackItem<P>(a, true, sMemAddr + uint32_t(buf * kBufBytes + sOff[buf][k]), sBuf + sOff[buf][k], g, lane,
                      tile, centre);
      else
        unpackItem<P>(a, false, 0u, a.segments + __ldg(a.offsets + size_t(bb) * a.H + h), g, lane, tile, centre);
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
  __syncthreads();
  // The recent fp16 tokens: a warp per token, over all blocks of this head.
  pvBufferTokens<NR>(a, acc, pHead, D, h, warp, lane);
  __syncthreads();
  pvFinish<NR>(a, sAcc, D, h);
}

#endif  // __CUDACC__

}  // namespace packkv::packkv_gpu::v4
