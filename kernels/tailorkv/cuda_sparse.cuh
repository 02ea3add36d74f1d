// TailorKV mode=s kernels (format.h layout; cpu.cpp's encodeSparse / qkSparse / pvSparse are the
// reference, and these match them bit for bit where the CPU is exact):
//
//   encode   one pass writing the fp16 sinks/window rows, the offloaded rows (K channel-major,
//            V token-major) and max|K| per channel rounded up (__float2half_ru = floatToHalfUp).
//   q·Kᵀ     four launches per query step, all KV heads and query heads in each:
//            approxKernel    per (token chunk, KV head): GQA-mean query q̄ and channel scores
//                            |q̄|·max|K| in double, top-`channels` by rank (ties to the lower
//                            index), approximate scores Σ_c q̄_c·K[c][m] in double in ascending
//                            channel order (the CPU's order: the same doubles), their ordered
//                            64-bit keys, a histogram of the top 12 key bits, and kMaskedScore
//                            into every offloaded position of every query head.
//            candidateKernel the boundary bin of the top `budget` (from that histogram): tokens
//                            above it are selected, tokens in it become candidates.
//            finalSelectKernel one block per KV head: radix select over the candidates on the
//                            96-bit key (ordered score, ~index) in 12-bit digits, so ties go to
//                            the lower index exactly as cpu.cpp's topK breaks them.
//            exactKernel     device rows and the selected rows: q·k in double in channel order
//                            (the CPU's sum, bit for bit), rounded to f32.
//   p·V      one launch: blocks over (row splits, KV head) read the device rows and only the
//            offloaded rows whose p is non-zero for some query head of the group (ballot per
//            32 rows; zero rows issue no load), f32 FMAs, block partials summed in split order
//            by the head's last block (deterministic).
//
// Spec weakness fixed here (tailorkv.md §3.5): the original gathers a transposed K copy of the
// whole prompt for the scoring and pins K, V and Kᵀ; here the scoring reads only the `channels`
// rows of the channel-major host K and the exact scores gather the selected tokens from the same
// copy (1× host bytes). Offloaded bytes read per step and KV head: channels·M·2 (scoring) +
// budget·D·2 (selected rows) for q·Kᵀ, and nnz(p)·D·2 for p·V.
#pragma once
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

#include "tailorkv/format.h"

namespace packkv::tailorkv::sparse {

constexpr uint32_t kDigitBits = 12, kBins = 1u << kDigitBits, kDigits = 8;  // 96-bit key, 8 digits
constexpr uint32_t kApproxThreads = 256, kSelectThreads = 1024, kExactThreads = 128, kPvThreads = 256;
constexpr uint32_t kMaxGroup = 8;  // query heads per KV head the kernels accumulate for
constexpr uint32_t kUnrolledChannels = 16;  // scoring channels whose loads are issued together

/** Token index of device row i: the sinks first, then the recent window (cpu.cpp deviceToken). */
__host__ __device__ inline uint32_t deviceTokenOf(uint32_t i, uint32_t sinks, uint32_t window, uint32_t tokens) {
  return i < sinks ? i : tokens - window + (i - sinks);
}

/** Order-preserving u64 of a double (-0 folded onto +0, since the CPU's == ties them). */
__host__ __device__ inline uint64_t orderedKey(double v) {
#ifdef __CUDA_ARCH__
  uint64_t b = uint64_t(__double_as_longlong(v));
#else
  uint64_t b;
  std::memcpy(&b, &v, 8);
#endif
  if (b == 0x8000000000000000ull) b = 0;
  return (b & 0x8000000000000000ull) ? ~b : (b | 0x8000000000000000ull);
}

/** Digit j (0 = most significant) of the 96-bit key (ordered score, ~index): larger is better. */
__host__ __device__ inline uint32_t digitOf(uint64_t key, uint32_t idx, uint32_t j) {
  const uint32_t lo = ~idx;
  const int low = 84 - 12 * int(j);
  if (low >= 32) return uint32_t(key >> (low - 32)) & (kBins - 1);
  if (low == 0) return lo & (kBins - 1);
  return (uint32_t(key << (32 - low)) | (lo >> low)) & (kBins - 1);
}

/** Sum of the bins thread t covers, counted from the top bin down (per bins each). */
__host__ __device__ inline uint32_t binsSum(const uint32_t* hist, uint32_t t, uint32_t per) {
  uint32_t s = 0;
  for (uint32_t j = 0; j < per; ++j) s += hist[kBins - 1 - t * per - j];
  return s;
}

/** The bin holding the need-th largest element, if thread t covers it: above(bin) < need <=
 *  above(bin) + count(bin); `before` = elements in the bins above thread t's. */
__host__ __device__ inline bool findBoundary(const uint32_t* hist, uint32_t t, uint32_t per, uint32_t before,
                                             uint32_t need, uint32_t* out /* bin, above, count */) {
  uint32_t acc = before;
  for (uint32_t j = 0; j < per; ++j) {
    const uint32_t b = kBins - 1 - t * per - j, c = hist[b];
    if (acc < need && need <= acc + c) {
      out[0] = b, out[1] = acc, out[2] = c;
      return true;
    }
    acc += c;
  }
  return false;
}

struct QkArgs {
  const __half* q;  // [qHeads][D] of this query step
  const uint16_t *dev, *maxAbs, *host;
  float* scores;  // [qHeads][T] of this query step
  uint32_t H, T, D, G, sinks, window, M, devTokens, channels, k, chunk;
  uint32_t* hist;      // [H][kBins], zero between calls
  uint32_t* counters;  // [H][2]: selected so far, candidates; zero between calls
  uint64_t* keys;      // [H][M]
  uint64_t* candKey[2];
  uint32_t* candIdx[2];  // [H][M] each
  uint32_t* sel;         // [H][k]
};

/** Bytes of the q·Kᵀ workspace after its 256-byte flag area, and the pointers into it. */
inline uint64_t qkWorkspaceBytes(uint64_t H, uint64_t M, uint64_t k) {
  auto up = [](uint64_t b) { return (b + 255) / 256 * 256; };
  return up(H * kBins * 4) + up(H * 8) + 3 * up(H * M * 8) + 2 * up(H * M * 4) + up(H * k * 4);
}
inline void qkWorkspaceSplit(QkArgs& a, uint8_t* base) {
  auto up = [](uint64_t b) { return (b + 255) / 256 * 256; };
  const uint64_t H = a.H, M = a.M;
  a.hist = reinterpret_cast<uint32_t*>(base), base += up(H * kBins * 4);
  a.counters = reinterpret_cast<uint32_t*>(base), base += up(H * 8);
  a.keys = reinterpret_cast<uint64_t*>(base), base += up(H * M * 8);
  for (int i = 0; i < 2; ++i) a.candKey[i] = reinterpret_cast<uint64_t*>(base), base += up(H * M * 8);
  for (int i = 0; i < 2; ++i) a.candIdx[i] = reinterpret_cast<uint32_t*>(base), base += up(H * M * 4);
  a.sel = reinterpret_cast<uint32_t*>(base);
}

#ifdef __CUDACC__

__device__ inline float halfBits(uint16_t h) { return __half2float(__ushort_as_half(h)); }
__device__ inline uint32_t laneId() { return threadIdx.x & 31u; }

/** Exclusive prefix sum over the block (blockDim a multiple of 32); sWarp holds 32 words. */
__device__ inline uint32_t blockExclusiveScan(uint32_t v, uint32_t* sWarp) {
  const uint32_t lane = laneId(), warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  uint32_t incl = v;
  for (uint32_t o = 1; o < 32; o <<= 1) {
    uint32_t n = __shfl_up_sync(0xFFFFFFFFu, incl, o);
    if (lane >= o) incl += n;
  }
  if (lane == 31) sWarp[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    uint32_t w = lane < warps ? sWarp[lane] : 0, wi = w;
    for (uint32_t o = 1; o < 32; o <<= 1) {
      uint32_t n = __shfl_up_sync(0xFFFFFFFFu, wi, o);
      if (lane >= o) wi += n;
    }
    if (lane < warps) sWarp[lane] = wi - w;  // exclusive
  }
  __syncthreads();
  const uint32_t r = sWarp[warp] + incl - v;
  __syncthreads();  // sWarp is reused by the caller
  return r;
}

/** The boundary bin of hist (kBins bins, shared or global) for `need`, into sOut[0..2] (shared). */
__device__ inline void blockBoundary(const uint32_t* hist, uint32_t need, uint32_t* sWarp, uint32_t* sOut) {
  const uint32_t per = kBins / blockDim.x;
  const uint32_t local = binsSum(hist, threadIdx.x, per);
  const uint32_t before = blockExclusiveScan(local, sWarp);
  findBoundary(hist, threadIdx.x, per, before, need, sOut);
  __syncthreads();
}

/** Adds 1 to hist[bin] for every live lane, one atomic per distinct bin in the warp. */
__device__ inline void warpHistAdd(uint32_t* hist, uint32_t bin, bool live) {
  const uint32_t liveMask = __ballot_sync(0xFFFFFFFFu, live);
  if (!live) return;
  const uint32_t peers = __match_any_sync(liveMask, bin);
  if (laneId() == uint32_t(__ffs(peers) - 1)) atomicAdd(&hist[bin], uint32_t(__popc(peers)));
}

/** Reserves one slot per lane with `take` in a global/shared counter; returns this lane's slot. */
__device__ inline uint32_t warpAppend(uint32_t* counter, bool take) {
  const uint32_t m = __ballot_sync(0xFFFFFFFFu, take);
  if (!m) return 0;
  const uint32_t leader = uint32_t(__ffs(m) - 1);
  uint32_t base = 0;
  if (laneId() == leader) base = atomicAdd(counter, uint32_t(__popc(m)));
  base = __shfl_sync(0xFFFFFFFFu, base, leader);
  return base + uint32_t(__popc(m & ((1u << laneId()) - 1u)));
}

/**
 * q̄ (double) and the channel choice of KV head h: sel channels ascending in ch[0..C), their q̄ in
 * qsel[0..C). Scratch: qbar[D], flags[D] (u32). cpu.cpp: qbar, channelScore, topK(channels).
 */
__device__ void chooseChannels(const QkArgs& a, uint32_t h, double* qbar, double* qsel, uint32_t* flags,
                               uint32_t* ch) {
  const uint32_t D = a.D, C = a.channels < D ? a.channels : D;
  for (uint32_t d = threadIdx.x; d < D; d += blockDim.x) {
    double s = 0.0;
    for (uint32_t g = 0; g < a.G; ++g) s = __dadd_rn(s, double(__half2float(a.q[size_t(h * a.G + g) * D + d])));
    s = __ddiv_rn(s, double(a.G));
    qbar[d] = s;
    qsel[d] = __dmul_rn(fabs(s), double(halfBits(a.maxAbs[size_t(h) * D + d])));  // channel score
  }
  __syncthreads();
  for (uint32_t d = threadIdx.x; d < D; d += blockDim.x) {
    const double sd = qsel[d];
    uint32_t rank = 0;
    for (uint32_t j = 0; j < D; ++j) rank += (qsel[j] > sd || (qsel[j] == sd && j < d)) ? 1u : 0u;
    flags[d] = rank < C ? 1u : 0u;
  }
  __syncthreads();
  if (threadIdx.x < 32) {
    uint32_t count = 0;
    for (uint32_t base = 0; base < D; base += 32) {
      const uint32_t d = base + laneId();
      const bool f = d < D && flags[d];
      const uint32_t m = __ballot_sync(0xFFFFFFFFu, f);
      if (f) ch[count + __popc(m & ((1u << laneId()) - 1u))] = d;
      count += __popc(m);
    }
    __syncwarp();
    for (uint32_t i = laneId(); i < C; i += 32) qsel[i] = qbar[ch[i]];
  }
  __syncthreads();
}

/** grid (chunks, H): approximate scores, their keys and top-digit histogram, masked outputs. */
__global__ void __launch_bounds__(kApproxThreads) approxKernel(QkArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  double* qbar = reinterpret_cast<double*>(smem);
  double* qsel = qbar + a.D;
  uint32_t* hist = reinterpret_cast<uint32_t*>(qsel + a.D);  // kBins; the flags first
  uint32_t* ch = hist + kBins;
  const uint32_t h = blockIdx.y, M = a.M, C = a.channels < a.D ? a.channels : a.D;
  const uint32_t m0 = blockIdx.x * a.chunk, m1 = min(M, m0 + a.chunk);
  const bool select = a.k > 0;
  if (select) {
    chooseChannels(a, h, qbar, qsel, hist, ch);
    for (uint32_t b = threadIdx.x; b < kBins; b += blockDim.x) hist[b] = 0;
    __syncthreads();
  }
  const uint16_t* hk = a.host + size_t(h) * a.D * M;
  for (uint32_t base = m0; base < m1; base += blockDim.x) {
    const uint32_t m = base + threadIdx.x;
    const bool live = m < m1;
    if (live)
      for (uint32_t g = 0; g < a.G; ++g) a.scores[size_t(h * a.G + g) * a.T + a.sinks + m] = kMaskedScore;
    if (!select) continue;
    double acc = 0.0;
    if (live && C <= kUnrolledChannels) {  // all channel loads in flight, then the CPU's sum order
      uint16_t v[kUnrolledChannels];
#pragma unroll
      for (uint32_t i = 0; i < kUnrolledChannels; ++i) v[i] = i < C ? __ldg(hk + size_t(ch[i]) * M + m) : uint16_t(0);
#pragma unroll
      for (uint32_t i = 0; i < kUnrolledChannels; ++i)
        if (i < C) acc = __dadd_rn(acc, __dmul_rn(qsel[i], double(halfBits(v[i]))));
    } else if (live) {
      for (uint32_t i = 0; i < C; ++i) acc = __dadd_rn(acc, __dmul_rn(qsel[i], double(halfBits(hk[size_t(ch[i]) * M + m]))));
    }
    const uint64_t key = orderedKey(acc);
    if (live) a.keys[size_t(h) * M + m] = key;
    warpHistAdd(hist, uint32_t(key >> 52), live);
  }
  if (!select) return;
  __syncthreads();
  for (uint32_t b = threadIdx.x; b < kBins; b += blockDim.x)
    if (hist[b]) atomicAdd(&a.hist[size_t(h) * kBins + b], hist[b]);
}

/** grid (chunks, H): tokens above the boundary bin are selected, those in it become candidates. */
__global__ void __launch_bounds__(kApproxThreads) candidateKernel(QkArgs a) {
  __shared__ uint32_t hist[kBins], sWarp[32], sB[3];
  const uint32_t h = blockIdx.y, M = a.M;
#pragma unroll
  for (uint32_t i = 0; i < kBins / kApproxThreads; ++i)
    hist[i * kApproxThreads + threadIdx.x] = a.hist[size_t(h) * kBins + i * kApproxThreads + threadIdx.x];
  __syncthreads();
  blockBoundary(hist, a.k, sWarp, sB);
  const uint32_t b1 = sB[0];
  const uint32_t m0 = blockIdx.x * a.chunk, m1 = min(M, m0 + a.chunk);
  for (uint32_t base = m0; base < m1; base += blockDim.x) {
    const uint32_t m = base + threadIdx.x;
    const bool live = m < m1;
    const uint64_t key = live ? a.keys[size_t(h) * M + m] : 0;
    const uint32_t d = uint32_t(key >> 52);
    const bool above = live && d > b1, cand = live && d == b1;
    const uint32_t ps = warpAppend(&a.counters[2 * h], above);
    if (above) a.sel[size_t(h) * a.k + ps] = m;
    const uint32_t pc = warpAppend(&a.counters[2 * h + 1], cand);
    if (cand) {
      a.candKey[0][size_t(h) * M + pc] = key;
      a.candIdx[0][size_t(h) * M + pc] = m;
    }
  }
}

/** grid H, kSelectThreads: the remaining digits over the candidates; hands hist/counters back zeroed. */
__global__ void __launch_bounds__(kSelectThreads) finalSelectKernel(QkArgs a) {
  __shared__ uint32_t hist[kBins], sWarp[32], sB[3], sSel, sNext;
  const uint32_t h = blockIdx.x, M = a.M;
  const uint32_t above0 = a.counters[2 * h];
  uint32_t n = a.counters[2 * h + 1], need = a.k - above0;
  if (threadIdx.x == 0) sSel = above0, sNext = 0;
  uint32_t* sel = a.sel + size_t(h) * a.k;
  int src = 0;
  __syncthreads();
  for (uint32_t j = 1;; ++j) {
    const uint64_t* key = a.candKey[src] + size_t(h) * M;
    const uint32_t* idx = a.candIdx[src] + size_t(h) * M;
    if (need == n || j >= kDigits) {  // every remaining candidate is selected
      const uint32_t at = sSel;
      for (uint32_t i = threadIdx.x; i < n; i += blockDim.x) sel[at + i] = idx[i];
      break;
    }
    for (uint32_t b = threadIdx.x; b < kBins; b += blockDim.x) hist[b] = 0;
    __syncthreads();
    for (uint32_t base = 0; base < n; base += blockDim.x) {
      const uint32_t i = base + threadIdx.x;
      const bool live = i < n;
      warpHistAdd(hist, live ? digitOf(key[i], idx[i], j) : 0, live);
    }
    __syncthreads();
    blockBoundary(hist, need, sWarp, sB);
    const uint32_t b = sB[0];
    uint64_t* dstKey = a.candKey[src ^ 1] + size_t(h) * M;
    uint32_t* dstIdx = a.candIdx[src ^ 1] + size_t(h) * M;
    for (uint32_t base = 0; base < n; base += blockDim.x) {
      const uint32_t i = base + threadIdx.x;
      const bool live = i < n;
      const uint32_t d = live ? digitOf(key[i], idx[i], j) : 0;
      const bool up = live && d > b, same = live && d == b;
      const uint32_t ps = warpAppend(&sSel, up);
      if (up) sel[ps] = idx[i];
      const uint32_t pn = warpAppend(&sNext, same);
      if (same) dstKey[pn] = key[i], dstIdx[pn] = idx[i];
    }
    need -= sB[1];
    n = sB[2];
    src ^= 1;
    __syncthreads();
    if (threadIdx.x == 0) sNext = 0;
    __syncthreads();
  }
  for (uint32_t b = threadIdx.x; b < kBins; b += blockDim.x) a.hist[size_t(h) * kBins + b] = 0;
  if (threadIdx.x == 0) a.counters[2 * h] = 0, a.counters[2 * h + 1] = 0;
}

/** Rows per exactKernel block, and its dynamic shared memory (q, the rows, their tokens). */
__host__ __device__ inline uint32_t exactRowsOf(uint32_t D) { return D >= 4096 ? 1 : (4096 / D < 32 ? 4096 / D : 32); }
__host__ __device__ inline size_t exactSmemOf(uint32_t D, uint32_t G) {
  return size_t(G) * D * 4 + size_t(exactRowsOf(D)) * (D + 1) * 4 + exactRowsOf(D) * 8;
}

/**
 * grid (rows/exactRowsOf(D), H): exact scores of the device rows and the selected rows. The rows
 * are staged in shared memory with all loads in flight (a selected key is D scattered halves of
 * the channel-major host K), then one thread per (row, query head) sums q·k in double in channel
 * order: cpu.cpp's sum, bit for bit.
 */
__global__ void __launch_bounds__(kExactThreads) exactKernel(QkArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  const uint32_t h = blockIdx.y, D = a.D, G = a.G, R = exactRowsOf(D), S = D + 1;
  float* qs = reinterpret_cast<float*>(smem);  // [G][D]
  float* ks = qs + G * D;                      // [R][D+1]
  uint32_t* sTok = reinterpret_cast<uint32_t*>(ks + R * S);
  uint32_t* sSrc = sTok + R;  // device row, or offloaded token m
  const uint32_t r0 = blockIdx.x * R, total = a.devTokens + a.k;
  const uint32_t rows = total - r0 < R ? total - r0 : R;
  for (uint32_t i = threadIdx.x; i < G * D; i += blockDim.x) qs[i] = __half2float(a.q[size_t(h) * G * D + i]);
  for (uint32_t lr = threadIdx.x; lr < rows; lr += blockDim.x) {
    const uint32_t r = r0 + lr;
    if (r < a.devTokens) sSrc[lr] = r, sTok[lr] = deviceTokenOf(r, a.sinks, a.window, a.T);
    else sSrc[lr] = a.sel[size_t(h) * a.k + (r - a.devTokens)], sTok[lr] = a.sinks + sSrc[lr];
  }
  __syncthreads();
  const uint32_t n = rows * D;
  for (uint32_t i0 = threadIdx.x; i0 < n; i0 += 8 * kExactThreads) {
    uint16_t v[8];
#pragma unroll
    for (uint32_t u = 0; u < 8; ++u) {
      const uint32_t i = i0 + u * kExactThreads, lr = i / D, d = i % D;
      v[u] = 0;
      if (i < n)
        v[u] = r0 + lr < a.devTokens ? __ldg(a.dev + (size_t(h) * a.devTokens + sSrc[lr]) * D + d)
                                     : __ldg(a.host + (size_t(h) * D + d) * a.M + sSrc[lr]);
    }
#pragma unroll
    for (uint32_t u = 0; u < 8; ++u) {
      const uint32_t i = i0 + u * kExactThreads;
      if (i < n) ks[(i / D) * S + i % D] = halfBits(v[u]);
    }
  }
  __syncthreads();
  for (uint32_t p = threadIdx.x; p < R * G; p += blockDim.x) {
    const uint32_t lr = p % R, g = p / R;
    if (lr >= rows) continue;
    double acc = 0.0;
    for (uint32_t d = 0; d < D; ++d) acc = __dadd_rn(acc, __dmul_rn(double(qs[g * D + d]), double(ks[lr * S + d])));
    a.scores[size_t(h * G + g) * a.T + sTok[lr]] = __double2float_rn(acc);
  }
}

// ---- p·V ------------------------------------------------------------------------------------

struct PvArgs {
  const __half* p;  // [qHeads][T] of this query step
  const uint16_t *dev, *host;
  float* out;  // [qHeads][D] of this query step
  uint32_t H, T, sinks, window, M, devTokens, splits, tilesPerBlock;
  unsigned* counters;  // [H], zero between calls
  float* partial;      // [H][splits][G*D]
};

/** grid (splits, H): a lane owns 8 channels of a row (D/8 lanes per row), G·8 f32 accumulators. */
template <int D, int G>
__global__ void __launch_bounds__(kPvThreads) pvKernel(PvArgs a) {
  constexpr int L = D / 8, RPL = 32 / L, W = kPvThreads / 32;
  __shared__ __align__(16) float red[W][G * D];
  __shared__ bool sLast;
  const uint32_t h = blockIdx.y, lane = laneId(), warp = threadIdx.x >> 5;
  const uint32_t rows = a.devTokens + a.M, tiles = (rows + 31) / 32;
  const uint32_t t0 = blockIdx.x * a.tilesPerBlock, t1 = min(tiles, t0 + a.tilesPerBlock);
  const uint32_t sub = lane / L, c8 = (lane % L) * 8;
  const __half* ph = a.p + size_t(h) * G * a.T;
  float acc[G][8];
#pragma unroll
  for (int g = 0; g < G; ++g)
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[g][e] = 0.f;
  for (uint32_t tile = t0 + warp; tile < t1; tile += W) {
    const uint32_t r = tile * 32 + lane;
    float pr[G];
    bool nz = false;
#pragma unroll
    for (int g = 0; g < G; ++g) {
      pr[g] = 0.f;
      if (r < rows) {
        const uint32_t token = r < a.devTokens ? deviceTokenOf(r, a.sinks, a.window, a.T) : a.sinks + (r - a.devTokens);
        pr[g] = __half2float(ph[size_t(g) * a.T + token]);
      }
      nz = nz || pr[g] != 0.f;
    }
    const uint32_t mask = __ballot_sync(0xFFFFFFFFu, nz);
    constexpr int NJ = 32 / RPL, B = NJ < 8 ? NJ : 8;
#pragma unroll
    for (int j0 = 0; j0 < NJ; j0 += B) {
      uint4 v[B];  // the batch's row loads all in flight before the first FMA
#pragma unroll
      for (int b = 0; b < B; ++b) {
        const uint32_t row = uint32_t((j0 + b) * RPL) + sub, rr = tile * 32 + row;
        v[b] = make_uint4(0, 0, 0, 0);
        if ((mask >> row) & 1u) {
          const uint16_t* src = rr < a.devTokens ? a.dev + (size_t(h) * a.devTokens + rr) * D
                                                 : a.host + (size_t(h) * a.M + (rr - a.devTokens)) * D;
          v[b] = __ldg(reinterpret_cast<const uint4*>(src + c8));
        }
      }
#pragma unroll
      for (int b = 0; b < B; ++b) {
        const uint32_t row = uint32_t((j0 + b) * RPL) + sub;
        float pg[G];
#pragma unroll
        for (int g = 0; g < G; ++g) pg[g] = __shfl_sync(0xFFFFFFFFu, pr[g], row);
        const uint32_t w[4] = {v[b].x, v[b].y, v[b].z, v[b].w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[e]));
#pragma unroll
          for (int g = 0; g < G; ++g) {
            acc[g][2 * e] = fmaf(pg[g], f.x, acc[g][2 * e]);
            acc[g][2 * e + 1] = fmaf(pg[g], f.y, acc[g][2 * e + 1]);
          }
        }
      }
    }
  }
#pragma unroll
  for (int o = L; o < 32; o <<= 1)
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[g][e] += __shfl_xor_sync(0xFFFFFFFFu, acc[g][e], o);
  if (sub == 0)
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
      for (int e = 0; e < 8; ++e) red[warp][g * D + c8 + e] = acc[g][e];
  __syncthreads();
  float* mine = a.partial + (size_t(h) * a.splits + blockIdx.x) * G * D;
  for (uint32_t i = threadIdx.x; i < uint32_t(G * D); i += blockDim.x) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < W; ++w) s += red[w][i];
    mine[i] = s;
  }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) sLast = atomicAdd(&a.counters[h], 1u) == a.splits - 1;
  __syncthreads();
  if (!sLast) return;
  __threadfence();
  const float* all = a.partial + size_t(h) * a.splits * G * D;
  for (uint32_t i = threadIdx.x; i < uint32_t(G * D); i += blockDim.x) {
    float s = 0.f;
    for (uint32_t b = 0; b < a.splits; ++b) s += __ldcg(all + size_t(b) * G * D + i);
    a.out[size_t(h) * G * D + i] = s;
  }
  if (threadIdx.x == 0) a.counters[h] = 0;
}

// ---- encode ---------------------------------------------------------------------------------

struct EncodeArgs {
  const float* x;  // [H][T][D]
  uint16_t *dev, *maxAbs, *host;
  uint32_t H, T, D, sinks, window, M, devTokens;
  bool key;
  int* bad;  // set when a value rounds outside the fp16 range (cpu.cpp toHalf)
};

__device__ inline uint16_t toHalfChecked(float v, int* bad) {
  const uint16_t b = __half_as_ushort(__float2half_rn(v));
  if ((b & 0x7C00u) == 0x7C00u) atomicOr(bad, 1);
  return b;
}

/** Grid-stride over the body's fp16 elements, writes coalesced (device rows, then host rows). */
__global__ void encodeRowsKernel(EncodeArgs a) {
  const size_t nDev = size_t(a.H) * a.devTokens * a.D, nHost = size_t(a.H) * a.M * a.D;
  for (size_t e = blockIdx.x * size_t(blockDim.x) + threadIdx.x; e < nDev + nHost; e += size_t(gridDim.x) * blockDim.x) {
    if (e < nDev) {
      const uint32_t d = uint32_t(e % a.D), i = uint32_t(e / a.D % a.devTokens), h = uint32_t(e / a.D / a.devTokens);
      const uint32_t t = deviceTokenOf(i, a.sinks, a.window, a.T);
      a.dev[e] = toHalfChecked(a.x[(size_t(h) * a.T + t) * a.D + d], a.bad);
    } else {
      const size_t f = e - nDev;
      uint32_t h, d, m;
      if (a.key) m = uint32_t(f % a.M), d = uint32_t(f / a.M % a.D), h = uint32_t(f / a.M / a.D);
      else d = uint32_t(f % a.D), m = uint32_t(f / a.D % a.M), h = uint32_t(f / a.D / a.M);
      a.host[f] = toHalfChecked(a.x[(size_t(h) * a.T + a.sinks + m) * a.D + d], a.bad);
    }
  }
}

/** grid H, 1024 threads: max over all T tokens of |K| per channel, rounded up to fp16. */
__global__ void __launch_bounds__(1024) maxAbsKernel(EncodeArgs a) {
  __shared__ float red[1024];
  const uint32_t h = blockIdx.x, slices = blockDim.x / a.D, d = threadIdx.x % a.D, s = threadIdx.x / a.D;
  float mx = 0.f;
  if (s < slices)
    for (uint32_t t = s; t < a.T; t += slices) mx = fmaxf(mx, fabsf(a.x[(size_t(h) * a.T + t) * a.D + d]));
  red[threadIdx.x] = mx;
  __syncthreads();
  if (threadIdx.x < a.D) {
    for (uint32_t j = 1; j < slices; ++j) mx = fmaxf(mx, red[j * a.D + threadIdx.x]);
    a.maxAbs[size_t(h) * a.D + threadIdx.x] = __half_as_ushort(__float2half_ru(mx));
  }
}

#endif  // __CUDACC__

}  // namespace packkv::tailorkv::sparse
