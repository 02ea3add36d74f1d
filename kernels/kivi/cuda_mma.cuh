// KIVI fused products on tensor cores: mma.sync m16n8k16, f16 x f16 -> f32 accumulation.
//
// The codes go into the f16 operand exactly, as 1 + c·2^-b built from the bits with a shift and
// one LOP3 per two codes (a PRMT pairs two words first). p·V centers them, (c - 2^(b-1))·2^-b with
// one HSUB2: tensor cores truncate when they accumulate, and over thousands of MMAs the
// all-positive operand piled that bias up (relative error 4e-5 at 128k tokens, growing with T);
// q·Kᵀ accumulates D/16 MMAs per tile and keeps the uncentered operand. The other operand is the
// group-scaled query (q·s) or probability (p·s) as an f16 pair hi + lo (to ~2^-22), one N column
// each: N column 2i, 2i+1 = query head i's hi and lo, 4 heads per n-tile. Per scale group,
//   x·(c·s + m) = 2^b·(x·s)·unit + x·(m - 2^b·s)             (q·Kᵀ, unit = 1 + c·2^-b)
//               = 2^b·(x·s)·centered + x·(m + 2^(b-1)·s)      (p·V)
// where the second term is fp32 FFMA. q and p are pre-scaled by a power of two so hi and lo stay
// normal f16 numbers:
//   q·Kᵀ: per head, max|q·2^e| in [64, 128): overflow needs a key group range over ~1000·2^b;
//   p·V:  p·2^10 (p <= 1): overflow needs a value group range over ~64·(2^b - 1).
// The B fragments (x·s hi/lo) are computed once per warp into shared memory, each product by one
// lane, instead of 8x redundantly in fragment order.
// Fragment layouts (PTX ISA, mma.m16n8k16 .f16): g = lane / 4, tig = lane % 4;
//   A regs: (row g, k 2tig..+1), (row g+8, k 2tig..+1), (row g, k 2tig+8..+9), (row g+8, k 2tig+8..+9)
//   B regs: (k 2tig..+1, col g), (k 2tig+8..+9, col g);  C: (row g, col 2tig..+1), (row g+8, ...)
// K slots {2tig, 2tig+1, 2tig+8, 2tig+9} are mapped to 4 consecutive channels (q·Kᵀ) or tokens
// (p·V) 4tig..4tig+3, so each thread's A operand comes from one 16-byte load and its B operand
// from one 8-byte shared load.
// Both kernels stream their input through cp.async stages in shared memory (no registers held by
// loads in flight): q·Kᵀ warps are persistent (one wave, q scaled once per warp, the next tile
// loading while this one computes), p·V warps keep up to 8 steps in flight. p·V masks each code
// where it sits in its byte (a lane's own mask, centre and final power of two) instead of
// shifting every word first.
#pragma once
#include <type_traits>

#include "kivi/cuda_products.cuh"

namespace packkv::kivi {

constexpr int kMmaQkWarps = kQkThreads / 32;  // same block shape as qkKernel (residual path shared)
constexpr int kStageStride = 36;              // floats per staged score row (bank-conflict-free)
constexpr int kBStride = 8 * 16 + 16;         // halves per staged B block: 8 columns x 16 k + pad

__device__ __forceinline__ void mma16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

/**
 * c += A·B with the MMA on a zero accumulator and the add in fp32 (round to nearest): the tensor
 * cores align and truncate the addends of their accumulation, so thousands of MMAs into one
 * accumulator drift (p·V rel. L2 grew linearly with T: 5.8e-6 at 128k tokens, 2 bits); here each
 * MMA's 16-term sum is rounded once and the long sum is ordinary fp32 arithmetic.
 */
__device__ __forceinline__ void mma16816Add(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                            uint32_t b0, uint32_t b1) {
  float d[4] = {0.f, 0.f, 0.f, 0.f};
  mma16816(d, a0, a1, a2, a3, b0, b1);
#pragma unroll
  for (int i = 0; i < 4; ++i) c[i] = __fadd_rn(c[i], d[i]);
}

/** (a & mask) | magic in one LOP3: with both constants as immediates the compiler emits two. */
template <uint32_t kMask>
__device__ __forceinline__ uint32_t andOr(uint32_t a, uint32_t magic) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(a), "n"(kMask), "r"(magic));
  return r;
}

/** (a & mask) | magic in one LOP3 with a run-time (lane-dependent) mask. */
__device__ __forceinline__ uint32_t andOrReg(uint32_t a, uint32_t mask, uint32_t magic) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(a), "r"(mask), "r"(magic));
  return r;
}

/** Both halves of x: the b-bit code at bit 8·k of each half, moved by S bits to the top of the
 *  f16 mantissa, as the f16x2 pair 1 + c·2^-b (exact). `one` holds 0x3C003C00 (f16x2 1.0). */
template <int B, int S>
__device__ __forceinline__ uint32_t unitCode2(uint32_t x, uint32_t one) {
  constexpr uint32_t kMask = (((1u << B) - 1u) << (10 - B)) * 0x00010001u;
  return andOr<kMask>(S >= 0 ? (x << S) : (x >> -S), one);
}

/** unitCode2 - 1.5 = (c - 2^(b-1))·2^-b, exact: centered, so long tensor-core accumulations do
 *  not pile up truncation (see the file comment). */
template <int B, int S>
__device__ __forceinline__ uint32_t centeredCode2(uint32_t x, uint32_t one) {
  const uint32_t unit = unitCode2<B, S>(x, one);
  __half2 v = __hsub2(*reinterpret_cast<const __half2*>(&unit), __half2half2(__ushort_as_half(0x3E00)));
  return *reinterpret_cast<const uint32_t*>(&v);
}

/** (x0, x1) -> f16x2 hi = f16(x), lo = f16(x - hi). */
__device__ __forceinline__ void splitHiLo(float x0, float x1, uint32_t& hi, uint32_t& lo) {
  const __half2 h = __floats2half2_rn(x0, x1);
  const float2 hf = __half22float2(h);
  const __half2 l = __floats2half2_rn(x0 - hf.x, x1 - hf.y);
  hi = *reinterpret_cast<const uint32_t*>(&h);
  lo = *reinterpret_cast<const uint32_t*>(&l);
}

/** 2^e with max|x|·2^e in [2^top, 2^(top+1)); 1 for x = 0. */
__device__ __forceinline__ float pow2Normalizer(float maxAbs, int top) {
  if (!(maxAbs > 0.f)) return 1.f;
  const int e = top - (int((__float_as_uint(maxAbs) >> 23) & 0xFF) - 127);
  return __uint_as_float(uint32_t(min(max(127 + e, 1), 254)) << 23);
}

/** Stores hi and lo of (x0..x3) as B columns col and col+1 at k offset k0 of a staged block. */
__device__ __forceinline__ void stageHiLo(uint16_t* block, int col, int k0, const float (&x)[4]) {
  uint32_t hi01, lo01, hi23, lo23;
  splitHiLo(x[0], x[1], hi01, lo01);
  splitHiLo(x[2], x[3], hi23, lo23);
  *reinterpret_cast<uint2*>(block + col * 16 + k0) = make_uint2(hi01, hi23);
  *reinterpret_cast<uint2*>(block + (col + 1) * 16 + k0) = make_uint2(lo01, lo23);
}

/** 16 bytes global -> shared without registers (cp.async, L2 only); both 16-byte aligned. */
__device__ __forceinline__ void cpAsync16(void* smem, const void* gmem) {
  const unsigned s = unsigned(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cpAsyncWait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

/** Four u32 words / four binary16 values from shared memory (16 / 8 bytes, aligned). */
__device__ __forceinline__ void lds4(const uint32_t* p, uint32_t (&w)[4]) {
  const uint4 v = *reinterpret_cast<const uint4*>(p);
  w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
}
__device__ __forceinline__ void lds4(const uint16_t* p, float (&f)[4]) {
  const uint2 v = *reinterpret_cast<const uint2*>(p);
  const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&v.x));
  const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&v.y));
  f[0] = a.x, f[1] = a.y, f[2] = b.x, f[3] = b.y;
}

// ---- q·Kᵀ -------------------------------------------------------------------------------------

/** u32 words of one q·Kᵀ ring stage: a 32-token tile's b code rows of d words (each padded by
 *  4 words: the two rows a 2-bit warp reads at once would share banks), its d scales and d mins. */
__host__ __device__ constexpr int qkRingWords(int bits, int d) { return bits * (d + 4) + d; }

/** Dynamic shared memory of qkMmaKernel: q for the residual blocks, or staged scores, B and each
 *  warp's ring stages (2 when warps walk several tiles, 1 when each takes one). */
__host__ __device__ constexpr size_t qkMmaSmemBytes(int nr, int d, int bits, int stages) {
  const size_t residual = size_t(nr) * d * sizeof(float);
  const size_t tiles = kMmaQkWarps * size_t(nr) * kStageStride * sizeof(float) +
                       size_t(kMmaQkWarps) * ((nr + 3) / 4) * (d / 16) * kBStride * sizeof(uint16_t) +
                       size_t(kMmaQkWarps) * stages * qkRingWords(bits, d) * sizeof(uint32_t);
  return residual > tiles ? residual : tiles;
}

/** v[i] for a lane-dependent i (i < N): a select chain, no local-memory indexing. */
template <int N>
__device__ __forceinline__ float pick(const float (&v)[N], int i) {
  float r = v[0];
#pragma unroll
  for (int k = 1; k < N; ++k) r = i == k ? v[k] : r;
  return r;
}

/**
 * q·Kᵀ on tensor cores, head_dim 16·KB (requires aligned sections and 32-token tiles in one
 * group). M = 16 tokens (two m-tiles per 32-token tile), N = 4 heads x (hi, lo), K = 16 channels.
 * Thread g owns code row g % R (R = 32/F rows per tile) and its tokens at positions
 * g/R + (8/R)·k: after a right shift by b·(g/R), token k's code sits at bit 8k, so two PRMTs per
 * channel pair and one LOP3 per two codes build the A fragments. Each tile accumulates only
 * D/16 MMAs, so the uncentered 1 + c·2^-b operand is accurate here (about 1e-7). A warp keeps
 * the q slices it scales in registers: no block-wide barrier before the first load of a tile.
 * Persistent: chunkBlocks (one wave, cuda.cu) x warps walk the tiles with that stride; each warp
 * scales q once (was once per tile: ~20% of the instructions, ncu of the one-tile-per-warp
 * version: 22M instructions, 70% of the issue slots busy) and double-buffers its tiles' codes,
 * scales and mins through cp.async (16-byte sections).
 */
template <int B, int NR, int KB>
__global__ void __launch_bounds__(kQkThreads, 8) qkMmaKernel(QkArgs a) {
  constexpr int F = 32 / B, R = 32 / F, NT = (NR + 3) / 4, D = 16 * KB;
  constexpr int C4 = (D / 4 + 31) / 32;  // 4-channel slices per lane
  constexpr float KM = float(1u << B);
  extern __shared__ float4 smem4[];
  const int h = blockIdx.y;
  if (int(blockIdx.x) >= a.chunkBlocks) {
    float* qShared = reinterpret_cast<float*>(smem4);
    for (int i = threadIdx.x; i < NR * D; i += blockDim.x) qShared[i] = halfBits(a.q[size_t(h) * NR * D + i]);
    __syncthreads();
    qkResidual<NR>(a, qShared, h, blockIdx.x - a.chunkBlocks);
    return;
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tig = lane & 3;
  const int tiles = a.Tq / 32, stride = a.chunkBlocks * kMmaQkWarps;
  int tile = blockIdx.x * kMmaQkWarps + warp;
  if (tile >= tiles) return;  // uniform across the warp; no block barrier follows
  const int rows = a.Tq / F, groups = a.Tq / a.G;

  float* stage = reinterpret_cast<float*>(smem4) + warp * NR * kStageStride;
  uint16_t* bBase = reinterpret_cast<uint16_t*>(reinterpret_cast<float*>(smem4) + kMmaQkWarps * NR * kStageStride);
  uint16_t* bStage = bBase + warp * NT * KB * kBStride;
  constexpr int RW = qkRingWords(B, D);
  // With one stage (a.ringStages == 1) each warp takes one tile: the next-tile issue finds no
  // tile and writes nothing.
  uint32_t* ring = reinterpret_cast<uint32_t*>(bBase + kMmaQkWarps * NT * KB * kBStride) + warp * a.ringStages * RW;
  // Tile t's codes (R rows of D words, contiguous), scales and mins into ring stage buf: 16-byte
  // cp.async chunks, no registers held while they fly.
  auto issue = [&](int t, int buf) {
    if (t < tiles) {
      constexpr int CC = R * D / 4, CS = D / 8, CR = D / 4;  // chunks: codes, scales (mins), per code row
      const uint32_t* codeSrc = a.codes + (size_t(h) * rows + size_t(t) * 32 / F) * D;
      const size_t sOff = (size_t(h) * groups + size_t(t) * 32 / a.G) * D;
      uint32_t* dst = ring + buf * RW;
#pragma unroll
      for (int c = lane; c < CC + 2 * CS; c += 32) {
        const void* src = c < CC        ? static_cast<const void*>(codeSrc + 4 * c)
                          : c < CC + CS ? static_cast<const void*>(a.scales + sOff + 8 * (c - CC))
                                        : static_cast<const void*>(a.mins + sOff + 8 * (c - CC - CS));
        cpAsync16(dst + (c < CC ? 4 * c + 4 * (c / CR) : 4 * c + 4 * R), src);
      }
    }
    cpAsyncCommit();
  };
  issue(tile, 0);

  // Once per warp (was once per tile): this lane's q slices, scaled per head by 2^e with
  // max|q·2^e| in [64, 128); the warp reduces its own copy of the maximum.
  float q[C4][NR][4];
#pragma unroll
  for (int j = 0; j < C4; ++j)
    if (lane + 32 * j < D / 4)
#pragma unroll
      for (int i = 0; i < NR; ++i) load4(a.q + size_t(h * NR + i) * D + 4 * (lane + 32 * j), true, q[j][i]);
  float inv[NR];
#pragma unroll
  for (int i = 0; i < NR; ++i) {
    float mx = 0.f;
#pragma unroll
    for (int j = 0; j < C4; ++j)
      if (lane + 32 * j < D / 4)
#pragma unroll
        for (int u = 0; u < 4; ++u) mx = fmaxf(mx, fabsf(q[j][i][u]));
#pragma unroll
    for (int o = 16; o >= 1; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    const float scale = pow2Normalizer(mx, 6);
    inv[i] = __frcp_rn(scale);
#pragma unroll
    for (int j = 0; j < C4; ++j)
#pragma unroll
      for (int u = 0; u < 4; ++u) q[j][i][u] *= scale;
  }
  float invC[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) invC[nt] = pick(inv, (4 * nt + tig) % NR);

  const uint16_t* bRead = bStage + g * 16 + 4 * tig;  // this thread's B fragment in block (nt, kb)
  const int preShift = B * (g / R);
  const uint32_t one = 0x3C003C00u;
  for (int k = 0; tile < tiles; tile += stride, ++k) {
    issue(tile + stride, (k + 1) & 1);  // the next tile's loads fly while this one is computed
    cpAsyncWait<1>();
    __syncwarp();
    const uint32_t* stg = ring + (k & 1) * RW;
    const uint16_t* stgHalves = reinterpret_cast<const uint16_t*>(stg + R * (D + 4));
    const int t0 = tile * 32;

    // B: each lane scales its channels for every head, stages hi/lo, and sums its min terms.
    float qmk[NR] = {};
#pragma unroll
    for (int j = 0; j < C4; ++j) {
      const int c4 = lane + 32 * j;
      if (c4 >= D / 4) break;
      const int kb = c4 >> 2, k0 = (c4 & 3) * 4;
      float s[4], m[4], mk[4];  // mk = m - 2^b s: the min term of the uncentered codes
      lds4(stgHalves + 4 * c4, s);
      lds4(stgHalves + D + 4 * c4, m);
#pragma unroll
      for (int u = 0; u < 4; ++u) mk[u] = fmaf(-KM, s[u], m[u]);
#pragma unroll
      for (int i = 0; i < NR; ++i) {
        float qs[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          qs[u] = q[j][i][u] * s[u];
          qmk[i] = fmaf(q[j][i][u], mk[u], qmk[i]);
        }
        stageHiLo(bStage + ((i / 4) * KB + kb) * kBStride, 2 * (i % 4), k0, qs);
      }
    }
    // qmk: reduce-scatter over the warp; head i's sum ends in lanes i·(32/NR) ...
    ReduceScatter<NR, 16>::run(qmk, lane, 0xffffffffu);
    float bias[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) bias[nt] = __shfl_sync(0xffffffffu, qmk[0], ((4 * nt + tig) % NR) * (32 / NR));
    __syncwarp();

    const uint32_t* cw = stg + (g % R) * (D + 4) + 4 * tig;
    float acc[2][NT][4] = {};
#pragma unroll
    for (int kb = 0; kb < KB; ++kb) {
      const uint4 wv = *reinterpret_cast<const uint4*>(cw + 16 * kb);
      const uint32_t w0 = wv.x >> preShift, w1 = wv.y >> preShift;
      const uint32_t w2 = wv.z >> preShift, w3 = wv.w >> preShift;
      // Channel pairs (4tig, 4tig+1) and (4tig+2, 4tig+3); tokens k = 0, 1 (low bytes), 2, 3 (high).
      const uint32_t x01 = __byte_perm(w0, w1, 0x5410), x01h = __byte_perm(w0, w1, 0x7632);
      const uint32_t x23 = __byte_perm(w2, w3, 0x5410), x23h = __byte_perm(w2, w3, 0x7632);
      const uint32_t a00 = unitCode2<B, 10 - B>(x01, one), a01 = unitCode2<B, 2 - B>(x01, one);
      const uint32_t a02 = unitCode2<B, 10 - B>(x23, one), a03 = unitCode2<B, 2 - B>(x23, one);
      const uint32_t a10 = unitCode2<B, 10 - B>(x01h, one), a11 = unitCode2<B, 2 - B>(x01h, one);
      const uint32_t a12 = unitCode2<B, 10 - B>(x23h, one), a13 = unitCode2<B, 2 - B>(x23h, one);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const uint2 bb = *reinterpret_cast<const uint2*>(bRead + (nt * KB + kb) * kBStride);
        mma16816(acc[0][nt], a00, a01, a02, a03, bb.x, bb.y);  // tokens k = 0 (row g), 1 (row g+8)
        mma16816(acc[1][nt], a10, a11, a12, a13, bb.x, bb.y);  // tokens k = 2, 3
      }
    }
    // score = 2^-e (Σ q'(m - 2^b s) + 2^b Σ (q's)(1 + c 2^-b)); C columns (hi, lo) of head 4nt+tig.
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int head = 4 * nt + tig;
      if (head < NR) {
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {  // token k of this thread: m-tile kk/2, row g (+8 if odd)
          const float* c = acc[kk >> 1][nt];
          const float v = (kk & 1) ? c[2] + c[3] : c[0] + c[1];
          const int tok = (g % R) * F + g / R + (8 / R) * kk;
          stage[head * kStageStride + tok] = fmaf(KM, v, bias[nt]) * invC[nt];
        }
      }
    }
    __syncwarp();
    for (int f = lane; f < NR * 8; f += 32) {
      const int head = f >> 3, col = (f & 7) * 4;
      const float4 v = *reinterpret_cast<const float4*>(stage + head * kStageStride + col);
      float* dst = a.scores + size_t(h * NR + head) * a.T + t0 + col;
      if (a.vecOut) *reinterpret_cast<float4*>(dst) = v;
      else dst[0] = v.x, dst[1] = v.y, dst[2] = v.z, dst[3] = v.w;
    }
    __syncwarp();  // the staged B, the scores and ring stage k & 1 are rewritten next
  }
  cpAsyncWait<0>();
}

// ---- p·V --------------------------------------------------------------------------------------

constexpr int kMmaPvWarps = 8;  // 4 token lanes x 2 channel halves
constexpr int kMmaPvDim = 128;     // head_dim of the tensor-core p·V (8 m-tiles of 16 channels)
constexpr float kPScale = 1024.f;  // p·2^10 keeps p·s a normal f16 pair for p down to ~1e-7

/**
 * One split of quantized tokens on tensor cores, head_dim 128, channel groups of 16·GM. M = 16
 * channels per m-tile, N = 4 heads x (hi, lo), K = 16 tokens per step. Warp w takes channel half
 * w % 2 (4 m-tiles) and steps w / 2, w / 2 + 2, ... of the split, so a step's code words fit in
 * registers and are all requested before any is used. Per step the lanes first stage p·s hi/lo
 * for every (group, token, head) of the half once, then thread g builds channels 16mt + g and
 * 16mt + g + 8 of each m-tile for tokens 4tig..4tig+3.
 *
 * Pipelined (a.pipe: 16-byte aligned sections, Tq and T multiples of 8): a warp's full steps
 * stream through a ring of PS stages in shared memory, filled with cp.async 16 bytes per lane
 * (the step's code rows, scales, mins and p: one chunk per lane at 2 bits / 4 heads) PS - 1 steps
 * ahead, so each warp keeps PS - 1 steps of loads in flight without holding them in registers.
 * (Profiled without it: 23.5M instructions, 25% occupancy from 110 registers, half the issue
 * slots empty, half the stalls on global loads.) Partial steps use the direct loads.
 */
template <int B, int NR, int GM>
__device__ void pvMmaQuantized(const PvArgs& a, int h, int split, int totalSplits) {
  constexpr int F = 32 / B, NT = (NR + 3) / 4, MT = kMmaPvDim / 32, NG = MT / GM;  // per channel half
  constexpr int HS = 8 / NG;                 // lanes = NG groups x 4 token quads x HS head slices
  constexpr int HPL = (NR + HS - 1) / HS;    // heads per lane when staging B
  constexpr int BLOCK = 8 * NT * 16 + 16;    // halves per staged (group) block: 8·NT columns x 16 tokens + pad
  constexpr float KM = float(1u << B), KH = 0.5f * KM;
  constexpr int rows = kMmaPvDim / F;
  __shared__ __align__(16) uint16_t bStage[kMmaPvWarps][NG * BLOCK];
  __shared__ float biasS[kMmaPvWarps][NG][NR];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tig = lane & 3;
  const int half = warp & 1, c0 = half * (kMmaPvDim / 2);
  const int tBegin = split * a.splitTokens, tEnd = min(a.Tq, tBegin + a.splitTokens);
  // Staging role: channel group gi (of this half), token quad, head slice hs.
  const int gi = lane / (4 * HS), quad = lane & 3, hs = (lane >> 2) % HS;
  const size_t sOff = (size_t(h) * (kMmaPvDim / a.G) + c0 / a.G + gi) * a.Tq;
  const uint16_t* pHead = a.p + size_t(h) * NR * a.T;
  // Thread g's codes sit at bit preShift = (b·g) mod 8 of their byte in every m-tile (rows g and
  // g + 8 alike). Instead of shifting each word down, the LOP3 masks the code where it is: the f16
  // 1 + c·2^(preShift-10), centered by the lane's own constant, and the accumulators are scaled
  // by 2^(10-preShift) at the end (was: a SHF per word, 16 per step at 2 bits).
  const int preShift = (B * g) % 8;
  const uint32_t codeMask = (((1u << B) - 1u) << preShift) * 0x00010001u;
  const uint32_t centerBits = (0x3C00u | ((1u << (B - 1)) << preShift)) * 0x00010001u;
  const __half2 center = *reinterpret_cast<const __half2*>(&centerBits);
  const float codeScale = __uint_as_float(uint32_t(127 + 10 - preShift) << 23);
  auto centered = [&](uint32_t x) {
    const uint32_t unit = andOrReg(x, codeMask, 0x3C003C00u);
    const __half2 v = __hsub2(*reinterpret_cast<const __half2*>(&unit), center);
    return *reinterpret_cast<const uint32_t*>(&v);
  };
  float acc[MT][NT][4] = {};
  float pmk[HPL] = {};

  const uint32_t* codesHead = a.codes + size_t(h) * rows * a.Tq + 4 * tig;
  // Pipeline stage (u32 words): code rows c0/F.. of the half [RH][16 tokens], scales and mins of
  // its groups [NG][16] f16, p [NR][16] f16; CH 16-byte chunks.
  constexpr int RH = (kMmaPvDim / 2) / F, CH = RH * 4 + NG * 4 + NR * 2, SW = CH * 4;
  // Stages per warp: up to 8 in what the staged B leaves of 42 KB (was ~3 KB per warp: 4 stages
  // at 2 bits), so that the kernel's static shared memory stays under 48 KB.
  constexpr int kFit = (43008 - kMmaPvWarps * NG * BLOCK * 2) / (kMmaPvWarps * SW * 4);
  constexpr int PS = kFit >= 8 ? 8 : kFit <= 2 ? 2 : kFit;
  constexpr int SC = RH * 16, SM = SC + NG * 8, SP = SM + NG * 8;  // section offsets
  // The ring and the warps' channel sums (written after the last step) share shared memory.
  constexpr int kRingWords = kMmaPvWarps * PS * SW, kSumWords = kMmaPvWarps * NR * (kMmaPvDim / 2);
  __shared__ __align__(16) uint32_t ringMem[kRingWords > kSumWords ? kRingWords : kSumWords];
  auto ring = reinterpret_cast<uint32_t(*)[PS][SW]>(ringMem);
  auto warpSums = reinterpret_cast<float(*)[NR][kMmaPvDim / 2]>(ringMem);
  // SMEM: the step's data is stage `stg` of the ring; else global memory at token t0.
  auto step = [&](int t0, auto vecTag, auto smemTag, const uint32_t* stg) {
    constexpr bool VEC = decltype(vecTag)::value, SMEM = decltype(smemTag)::value;
    const int tA = t0 + 4 * tig, validA = VEC ? 4 : max(0, min(4, tEnd - tA));
    // Every code word of the step first (one 16-byte load per m-tile and row).
    uint32_t wa[MT][4], wb[F >= 16 ? 1 : MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      if constexpr (SMEM) {
        lds4(stg + ((16 * mt + g) / F) * 16 + 4 * tig, wa[mt]);
        if constexpr (F < 16) lds4(stg + ((16 * mt + g + 8) / F) * 16 + 4 * tig, wb[mt]);
        continue;
      }
      const uint32_t* rowA = codesHead + size_t((c0 + 16 * mt + g) / F) * a.Tq + t0;
      if constexpr (VEC) load4(rowA, true, wa[mt]);
      else load4Tail(rowA, validA, wa[mt]);
      if constexpr (F < 16) {
        const uint32_t* rowB = codesHead + size_t((c0 + 16 * mt + g + 8) / F) * a.Tq + t0;
        if constexpr (VEC) load4(rowB, true, wb[mt]);
        else load4Tail(rowB, validA, wb[mt]);
      }
    }
    {  // stage B: p'·s hi/lo of this lane's group, 4 tokens, HPL heads; min terms in fp32
      const int t = t0 + 4 * quad, valid = VEC ? 4 : max(0, min(4, tEnd - t));
      const uint16_t* stgHalves = reinterpret_cast<const uint16_t*>(stg);
      float s[4], m[4];
      if constexpr (SMEM) {
        lds4(stgHalves + 2 * SC + gi * 16 + 4 * quad, s);
        lds4(stgHalves + 2 * SM + gi * 16 + 4 * quad, m);
      } else if constexpr (VEC) {
        load4(a.scales + sOff + t, true, s);
        load4(a.mins + sOff + t, true, m);
      } else {
        load4Tail(a.scales + sOff + t, valid, s);
        load4Tail(a.mins + sOff + t, valid, m);
      }
      float sp[4], mk[4];  // s·2^10 and (m + 2^(b-1) s)·2^10: p's pre-scale folded in once per token
#pragma unroll
      for (int j = 0; j < 4; ++j) sp[j] = s[j] * kPScale, mk[j] = fmaf(KH, s[j], m[j]) * kPScale;
#pragma unroll
      for (int k = 0; k < HPL; ++k) {
        const int head = hs * HPL + k;
        if (head >= NR) break;
        float pr[4];
        if constexpr (SMEM) lds4(stgHalves + 2 * SP + head * 16 + 4 * quad, pr);
        else if constexpr (VEC) load4(pHead + size_t(head) * a.T + t, true, pr);
        else load4Tail(pHead + size_t(head) * a.T + t, valid, pr);
        float ps[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          ps[j] = pr[j] * sp[j];
          pmk[k] = fmaf(pr[j], mk[j], pmk[k]);
        }
        stageHiLo(bStage[warp] + gi * BLOCK, 8 * (head / 4) + 2 * (head % 4), 4 * quad, ps);
      }
    }
    __syncwarp();
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const int cA = c0 + 16 * mt + g, cB = cA + 8;
      const uint32_t(&xa)[4] = wa[mt];
      const uint32_t(&xb)[4] = wb[F >= 16 ? 0 : mt];
      // The byte holding each channel's code; PRMT puts the token pairs in bytes 0 and 2 (and 1, 3).
      const uint32_t selA = uint32_t(B * (cA % F) / 8) * 0x1111u + 0x4400u;
      const uint32_t selB = uint32_t(B * (cB % F) / 8) * 0x1111u + 0x4400u;
      const uint32_t a0 = centered(__byte_perm(xa[0], xa[1], selA));
      const uint32_t a1 = centered(F >= 16 ? __byte_perm(xa[0], xa[1], selB) : __byte_perm(xb[0], xb[1], selB));
      const uint32_t a2 = centered(__byte_perm(xa[2], xa[3], selA));
      const uint32_t a3 = centered(F >= 16 ? __byte_perm(xa[2], xa[3], selB) : __byte_perm(xb[2], xb[3], selB));
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const uint2 bb =
            *reinterpret_cast<const uint2*>(bStage[warp] + (mt / GM) * BLOCK + (8 * nt + g) * 16 + 4 * tig);
        mma16816Add(acc[mt][nt], a0, a1, a2, a3, bb.x, bb.y);
      }
    }
    __syncwarp();  // the next step overwrites the staged B
  };
  constexpr int kStepStride = 16 * (kMmaPvWarps / 2);
  int t0 = tBegin + 16 * (warp >> 1);
  if (a.pipe) {
    const int full = t0 + 16 <= tEnd ? (tEnd - 16 - t0) / kStepStride + 1 : 0;
    // Chunk c of step k: code row c/4 (tokens 4(c%4)..), then scales, mins, p (8 tokens each).
    const uint32_t* codeRows = a.codes + (size_t(h) * rows + c0 / F) * a.Tq;
    const size_t groupRow = size_t(h) * (kMmaPvDim / a.G) + c0 / a.G;
    // A lane's chunks are the same in every step: their step-0 sources and byte strides are found
    // once (was a 4-way select and 64-bit index arithmetic per chunk and step).
    constexpr int NCH = (CH + 31) / 32;
    const char* srcBase[NCH];
    int srcStride[NCH];
#pragma unroll
    for (int j = 0; j < NCH; ++j) {
      const int c = lane + 32 * j;
      const void* src = codeRows;
      if (c < RH * 4) src = codeRows + size_t(c >> 2) * a.Tq + t0 + 4 * (c & 3);
      else if (c < RH * 4 + NG * 2)
        src = a.scales + (groupRow + ((c - RH * 4) >> 1)) * a.Tq + t0 + 8 * (c & 1);
      else if (c < RH * 4 + NG * 4)
        src = a.mins + (groupRow + ((c - RH * 4 - NG * 2) >> 1)) * a.Tq + t0 + 8 * (c & 1);
      else if (c < CH) src = pHead + size_t((c - RH * 4 - NG * 4) >> 1) * a.T + t0 + 8 * (c & 1);
      srcBase[j] = static_cast<const char*>(src);
      srcStride[j] = (c < RH * 4 ? 4 : 2) * kStepStride;  // bytes per step: u32 codes, f16 otherwise
    }
    auto issue = [&](int k) {
      if (k < full) {
        uint32_t* dst = ring[warp][k % PS];
#pragma unroll
        for (int j = 0; j < NCH; ++j)
          if (lane + 32 * j < CH) cpAsync16(dst + 4 * (lane + 32 * j), srcBase[j] + size_t(k) * srcStride[j]);
      }
      cpAsyncCommit();  // empty groups past the end keep the wait count uniform
    };
#pragma unroll
    for (int k = 0; k < PS - 1; ++k) issue(k);
    for (int k = 0; k < full; ++k) {
      cpAsyncWait<PS - 2>();
      __syncwarp();
      step(t0 + k * kStepStride, std::true_type{}, std::true_type{}, ring[warp][k % PS]);
      __syncwarp();  // every lane is done with stage k before it is refilled
      issue(k + PS - 1);
    }
    cpAsyncWait<0>();
    t0 += full * kStepStride;
  } else if (a.vec) {
    for (; t0 + 16 <= tEnd; t0 += kStepStride) step(t0, std::true_type{}, std::false_type{}, nullptr);
  }
  for (; t0 < tEnd; t0 += kStepStride) step(t0, std::false_type{}, std::false_type{}, nullptr);

  // Min terms: sum over the token quads, then per (group, head) in shared memory.
#pragma unroll
  for (int k = 0; k < HPL; ++k) {
    float v = pmk[k];
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    v += __shfl_xor_sync(0xffffffffu, v, 2);
    const int head = hs * HPL + k;
    if (quad == 0 && head < NR) biasS[warp][gi][head] = v;
  }
  __syncthreads();  // every warp is past its last ring stage before warpSums overwrites the ring
  constexpr float invScale = 1.f / kPScale;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int head = 4 * nt + tig;
    if (head < NR) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const float b = biasS[warp][mt / GM][head];
        const float* c = acc[mt][nt];
        warpSums[warp][head][16 * mt + g] = fmaf(codeScale, c[0] + c[1], b) * invScale;
        warpSums[warp][head][16 * mt + g + 8] = fmaf(codeScale, c[2] + c[3], b) * invScale;
      }
    }
  }
  __syncthreads();
  float* dst = a.partial + (size_t(h) * totalSplits + split) * NR * kMmaPvDim;
  for (int idx = threadIdx.x; idx < NR * kMmaPvDim; idx += blockDim.x) {
    const int head = idx / kMmaPvDim, d = idx % kMmaPvDim, hf = d / (kMmaPvDim / 2), dd = d % (kMmaPvDim / 2);
    float sum = 0.f;
#pragma unroll
    for (int w = hf; w < kMmaPvWarps; w += 2) sum += warpSums[w][head][dd];
    dst[idx] = sum;
  }
}

/** Resident p·V blocks per multiprocessor, which sets the register cap (80 for 3 blocks: spill-free
 *  at 1 and 2 bits with 4 query heads per KV head, spilling at 8; 4 and 8 bits keep 2 blocks). The
 *  split plan (cuda.cu pvSplits) launches 2 per multiprocessor, at most this many; a 2-block bound at
 *  1–2 bits too (no spills) measured no faster at 4 query heads per KV head (docs/kernels.md KIVI #15). */
__host__ __device__ constexpr int pvMmaBlocksPerSm(int bits) { return bits <= 2 ? 3 : 2; }

template <int B, int NR, int GM>
__global__ void __launch_bounds__(kMmaPvWarps * 32, pvMmaBlocksPerSm(B)) pvMmaKernel(PvArgs a) {
  const int h = blockIdx.y, split = blockIdx.x;
  const int slots = pvSlots(a.splits, a.Trem);
  if (split < a.splits) pvMmaQuantized<B, NR, GM>(a, h, split, slots);
  else pvResidual<NR>(a, h, split, slots);
  pvFinish<NR>(a, h, gridDim.x, slots);
}

}  // namespace packkv::kivi
