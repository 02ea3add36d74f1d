// KIVI fused products on the packed stream (CUDA cores): q·Kᵀ and p·V for all query heads of a
// layer in one launch each, every KV head's bytes read once for its whole GQA group.
//
// Both fold the group's scale into the other operand and the 1.0 offset of unitCode into the min
// term:  Σ x·(c·s + m) = Σ (x·s)·f·2^b + Σ x·(m - 2^b·s),  f = 1 + c·2^-b,
// so each element costs one shift, one LOP3 and one FFMA per query head, all in fp32.
#pragma once
#include "common/last_block.cuh"
#include "kivi/cuda_util.cuh"

namespace packkv::kivi {

constexpr int kQkThreads = 128;  // 32 quads; a quad owns a chunk of CT tokens x all channels

struct QkArgs {
  const uint32_t* codes;    // u32 [H][Tq/F][D]
  const uint16_t* scales;   // f16 [H][Tq/G][D]
  const uint16_t* mins;     // f16 [H][Tq/G][D]
  const uint16_t* residual; // f16 [H][Trem][D]
  const uint16_t* q;        // f16 [H*NR][D]: this query step's heads
  float* scores;            // f32 [H*NR][T]
  int D, T, Tq, Trem, G;
  int chunkBlocks;          // blocks over quantized tokens; blocks after them take residual tokens
  int ringStages;           // tensor-core q·Kᵀ: cp.async stages per warp (2: persistent, 1: one tile each)
  bool vecIn, vecOut;       // 16/8-byte loads aligned; 16-byte score stores aligned
};

template <int NR>
__device__ void qkResidual(const QkArgs& a, const float* qs, int h, int blk) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int r = blk * (kQkThreads / 32) + warp;
  if (r >= a.Trem) return;
  const uint16_t* row = a.residual + (size_t(h) * a.Trem + r) * a.D;
  float acc[NR] = {};
  for (int c = lane; c < a.D; c += 32) {
    const float x = halfBits(row[c]);
#pragma unroll
    for (int i = 0; i < NR; ++i) acc[i] = fmaf(qs[i * a.D + c], x, acc[i]);
  }
#pragma unroll
  for (int i = 0; i < NR; ++i) {
#pragma unroll
    for (int o = 16; o >= 1; o >>= 1) acc[i] += __shfl_xor_sync(0xffffffffu, acc[i], o);
    if (lane == 0) a.scores[size_t(h * NR + i) * a.T + a.Tq + r] = acc[i];
  }
}

/** The channel loop of one quad's chunk: CT tokens x NR heads of partial scores per lane. */
template <int B, int NR, int CT, bool VEC>
__device__ __forceinline__ void qkChunkLoop(const QkArgs& a, const float4* qShared4, const uint32_t* cw,
                                            const uint16_t* sc, const uint16_t* mn, int shift, int sub,
                                            float (&acc)[CT * NR], float (&qmk)[NR]) {
  constexpr int F = 32 / B;
  constexpr int WPC = F >= CT ? 1 : CT / F;
  constexpr float KM = float(1u << B);
#pragma unroll 2
  for (int c = sub * 4; c < a.D; c += 16) {
    uint32_t w[WPC][4];
#pragma unroll
    for (int wi = 0; wi < WPC; ++wi) load4(cw + size_t(wi) * a.D + c, VEC, w[wi]);
    float s[4], m[4];
    load4(sc + c, VEC, s);
    load4(mn + c, VEC, m);
    float qv[NR][4];
#pragma unroll
    for (int i = 0; i < NR; ++i) {
      const float4 v = qShared4[(i * a.D + c) / 4];
      qv[i][0] = v.x, qv[i][1] = v.y, qv[i][2] = v.z, qv[i][3] = v.w;
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float mk = fmaf(-KM, s[j], m[j]);
      float qsj[NR];
#pragma unroll
      for (int i = 0; i < NR; ++i) {
        qsj[i] = qv[i][j] * s[j];
        qmk[i] = fmaf(qv[i][j], mk, qmk[i]);
      }
      const uint32_t first = w[0][j] >> shift;
#pragma unroll
      for (int t = 0; t < CT; ++t) {
        const float f = unitCode<B>(F > CT ? first : w[t / F][j], t % F);
#pragma unroll
        for (int i = 0; i < NR; ++i) acc[t * NR + i] = fmaf(qsj[i], f, acc[t * NR + i]);
      }
    }
  }
}

/**
 * q·Kᵀ. Grid (chunkBlocks + residual blocks, H). A quad of lanes owns CT consecutive tokens; lane
 * `sub` reads channels 4·sub + 16·k (16-byte word loads), accumulates CT x NR partial scores,
 * and the quad reduce-scatters them so each lane stores CT/4 tokens of every head.
 */
template <int B, int NR, int CT>
__global__ void __launch_bounds__(kQkThreads) qkKernel(QkArgs a) {
  constexpr int F = 32 / B;                     // codes per word (tokens)
  constexpr float KM = float(1u << B);
  extern __shared__ float4 qShared4[];          // q as f32 [NR][D]
  float* qShared = reinterpret_cast<float*>(qShared4);
  const int h = blockIdx.y;
  for (int i = threadIdx.x; i < NR * a.D; i += blockDim.x) qShared[i] = halfBits(a.q[size_t(h) * NR * a.D + i]);
  __syncthreads();
  if (int(blockIdx.x) >= a.chunkBlocks) {
    qkResidual<NR>(a, qShared, h, blockIdx.x - a.chunkBlocks);
    return;
  }
  const int lane = threadIdx.x & 31, sub = lane & 3;
  const unsigned quadMask = 0xFu << (lane & 28);
  const int t0 = (blockIdx.x * (kQkThreads / 4) + (threadIdx.x >> 2)) * CT;
  if (t0 >= a.Tq) return;  // the whole quad leaves together
  const int rows = a.Tq / F, groups = a.Tq / a.G;
  const uint32_t* cw = a.codes + (size_t(h) * rows + t0 / F) * a.D;
  const int shift = F > CT ? (t0 % F) * B : 0;
  const size_t sOff = (size_t(h) * groups + t0 / a.G) * a.D;
  const uint16_t* sc = a.scales + sOff;
  const uint16_t* mn = a.mins + sOff;

  float acc[CT * NR] = {};
  float qmk[NR] = {};
  // One loop per load width, chosen once: a runtime width inside the loop gets both paths predicated.
  if (a.vecIn) qkChunkLoop<B, NR, CT, true>(a, qShared4, cw, sc, mn, shift, sub, acc, qmk);
  else qkChunkLoop<B, NR, CT, false>(a, qShared4, cw, sc, mn, shift, sub, acc, qmk);
#pragma unroll
  for (int k = 0; k < CT * NR; ++k) acc[k] = fmaf(KM, acc[k], qmk[k % NR]);
  ReduceScatter<CT * NR, 2>::run(acc, lane, quadMask);
  // This lane now holds tokens t0 + sub·CT/4 + u (u < CT/4) of every head at acc[u·NR + i].
  constexpr int PER = CT / 4;
  const int tl = t0 + sub * PER;
#pragma unroll
  for (int i = 0; i < NR; ++i) {
    float* dst = a.scores + size_t(h * NR + i) * a.T + tl;
    if constexpr (PER == 4) {
      if (a.vecOut) {
        *reinterpret_cast<float4*>(dst) = make_float4(acc[i], acc[NR + i], acc[2 * NR + i], acc[3 * NR + i]);
        continue;
      }
    }
#pragma unroll
    for (int u = 0; u < PER; ++u) dst[u] = acc[u * NR + i];
  }
}

struct PvArgs {
  const uint32_t* codes;    // u32 [H][D/F][Tq]
  const uint16_t* scales;   // f16 [H][D/G][Tq]
  const uint16_t* mins;     // f16 [H][D/G][Tq]
  const uint16_t* residual; // f16 [H][Trem][D]
  const uint16_t* p;        // f16 [H*NR][T]: this query step's heads
  float* out;               // f32 [H*NR][D]
  float* partial;           // f32 [H][splits (+1 residual)][NR][D]
  unsigned* counters;       // [H], zero between launches
  int D, T, Tq, Trem, G;
  int splits, splitTokens;  // quantized token ranges (splitTokens a multiple of 128)
  bool vec;                 // 16/8-byte loads aligned (Tq and T multiples of 4, aligned sections)
  bool pipe;                // cp.async staging (Tq and T multiples of 8, 16-byte aligned sections)
};

/** Four tokens of one lane's channel chunk; VEC: 16/8-byte loads of 4 valid tokens. */
template <int B, int NR, int CC, bool VEC>
__device__ __forceinline__ void pvStep(const PvArgs& a, const uint32_t* cw, size_t sOff, const uint16_t* pHead, int t,
                                       int valid, int shift, float (&acc)[CC * NR], float (&pmk)[NR]) {
  constexpr int F = 32 / B;
  constexpr int WPC = CC >= F ? CC / F : 1;
  constexpr float KM = float(1u << B);
  uint32_t w[WPC][4];
  float s[4], m[4], pr[NR][4];
  if constexpr (VEC) {
#pragma unroll
    for (int wi = 0; wi < WPC; ++wi) load4(cw + size_t(wi) * a.Tq + t, true, w[wi]);
    load4(a.scales + sOff + t, true, s);
    load4(a.mins + sOff + t, true, m);
#pragma unroll
    for (int i = 0; i < NR; ++i) load4(pHead + size_t(i) * a.T + t, true, pr[i]);
  } else {
#pragma unroll
    for (int wi = 0; wi < WPC; ++wi) load4Tail(cw + size_t(wi) * a.Tq + t, valid, w[wi]);
    load4Tail(a.scales + sOff + t, valid, s);
    load4Tail(a.mins + sOff + t, valid, m);
#pragma unroll
    for (int i = 0; i < NR; ++i) load4Tail(pHead + size_t(i) * a.T + t, valid, pr[i]);
  }
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const float mk = fmaf(-KM, s[u], m[u]);
    float ps[NR];
#pragma unroll
    for (int i = 0; i < NR; ++i) {
      ps[i] = pr[i][u] * s[u];
      pmk[i] = fmaf(pr[i][u], mk, pmk[i]);
    }
    const uint32_t first = w[0][u] >> shift;
#pragma unroll
    for (int j = 0; j < CC; ++j) {
      const float f = unitCode<B>(F > CC ? first : w[j / F][u], j % F);
#pragma unroll
      for (int i = 0; i < NR; ++i) acc[j * NR + i] = fmaf(ps[i], f, acc[j * NR + i]);
    }
  }
}

/** One split of quantized tokens: warp w owns channel chunks w·CC (+ warps·CC ...), lanes own 4 tokens. */
template <int B, int NR, int CC>
__device__ void pvQuantized(const PvArgs& a, int h, int split, int totalSplits) {
  constexpr int F = 32 / B;
  constexpr float KM = float(1u << B);
  constexpr int V = CC * NR;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  const int rows = a.D / F, groups = a.D / a.G;
  const int tBegin = split * a.splitTokens, tEnd = min(a.Tq, tBegin + a.splitTokens);
  const uint16_t* pHead = a.p + size_t(h) * NR * a.T;
  float* dst = a.partial + (size_t(h) * totalSplits + split) * NR * a.D;
  for (int c0 = warp * CC; c0 < a.D; c0 += warps * CC) {
    const uint32_t* cw = a.codes + (size_t(h) * rows + c0 / F) * a.Tq;
    const int shift = F > CC ? (c0 % F) * B : 0;
    const size_t sOff = (size_t(h) * groups + c0 / a.G) * a.Tq;
    float acc[V] = {};
    float pmk[NR] = {};
    int t = tBegin + lane * 4;
    if (a.vec)  // full 4-token steps with 16-byte loads, then at most one guarded tail step
      for (; t + 4 <= tEnd; t += 128) pvStep<B, NR, CC, true>(a, cw, sOff, pHead, t, 4, shift, acc, pmk);
    for (; t < tEnd; t += 128) pvStep<B, NR, CC, false>(a, cw, sOff, pHead, t, min(4, tEnd - t), shift, acc, pmk);
#pragma unroll
    for (int k = 0; k < V; ++k) acc[k] = fmaf(KM, acc[k], pmk[k % NR]);
    ReduceScatter<V, 16>::run(acc, lane, 0xffffffffu);
    if constexpr (V >= 32) {
#pragma unroll
      for (int k = 0; k < V / 32; ++k) {
        const int idx = lane * (V / 32) + k;
        dst[(idx % NR) * a.D + c0 + idx / NR] = acc[k];
      }
    } else if (lane % (32 / V) == 0) {
      const int idx = lane / (32 / V);
      dst[(idx % NR) * a.D + c0 + idx / NR] = acc[0];
    }
  }
}

/** Partial-sum slots of the residual block: its warps take every kResidualSlots-th fp16 token. */
constexpr int kResidualSlots = 8;
/** Partial-sum slots per head: one per quantized split, kResidualSlots for the fp16 tokens. */
__host__ __device__ inline int pvSlots(int splits, int Trem) { return splits + (Trem > 0 ? kResidualSlots : 0); }

/**
 * The residual block: fp16 tokens Tq..T-1. Warp w (and w + warps, .. below kResidualSlots) sums
 * tokens r ≡ w (mod kResidualSlots) into slot split + w, each lane 4 channels x NR heads, so the
 * loads are independent and coalesced (one thread per channel walking all tokens serially took
 * ~19 µs at 4096 tokens, more than the whole quantized part). pvFinish adds the slots in order.
 */
template <int NR>
__device__ void pvResidual(const PvArgs& a, int h, int split, int slots) {
  const uint16_t* pHead = a.p + size_t(h) * NR * a.T + a.Tq;
  const int warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int w = warp; w < kResidualSlots; w += warps) {
    float* dst = a.partial + (size_t(h) * slots + split + w) * NR * a.D;
    for (int c = 4 * lane; c < a.D; c += 128) {
      float acc[NR][4] = {};
#pragma unroll 4
      for (int r = w; r < a.Trem; r += kResidualSlots) {
        const uint16_t* row = a.residual + (size_t(h) * a.Trem + r) * a.D + c;
        float x[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) x[j] = halfBits(row[j]);
#pragma unroll
        for (int i = 0; i < NR; ++i) {
          const float pr = halfBits(pHead[size_t(i) * a.T + r]);
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(pr, x[j], acc[i][j]);
        }
      }
#pragma unroll
      for (int i = 0; i < NR; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) dst[i * a.D + c + j] = acc[i][j];
    }
  }
}

/** After a block's partials are written: the head's last block adds the `slots` partials in order
 *  (deterministic) into the output (common/last_block.cuh addPartials, one level: two levels were
 *  not faster here). blockDim <= 256. */
template <int NR>
__device__ void pvFinish(const PvArgs& a, int h, int blocks, int slots) {
  __shared__ float4 scratch[256];
  gpu::addPartials<false, false>(a.counters, gridDim.y, unsigned(h), a.partial + size_t(h) * slots * NR * a.D,
                                 size_t(NR) * a.D, blocks, slots, a.out + size_t(h) * NR * a.D, NR * a.D,
                                 reinterpret_cast<float*>(scratch), 4 * 256);
}

/** p·V. Grid (splits + residual split, H): each block writes its split's partial sums. */
template <int B, int NR, int CC>
__global__ void __launch_bounds__(256) pvKernel(PvArgs a) {
  const int h = blockIdx.y, split = blockIdx.x;
  const int slots = pvSlots(a.splits, a.Trem);
  if (split < a.splits) pvQuantized<B, NR, CC>(a, h, split, slots);
  else pvResidual<NR>(a, h, split, slots);
  pvFinish<NR>(a, h, gridDim.x, slots);
}

}  // namespace packkv::kivi
