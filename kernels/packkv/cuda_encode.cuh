// PackKV encode on the GPU: the exact bytes and Breakdown of cpu.cpp's encoder (format.h), built by
// six kernels on the caller's stream, one synchronization at the end to read the sizes and errors.
//
//   quantize   warp per compressed token: min/max/max|x| (integer keys, first index on ties like
//              the CPU's sequential std::min), quant.h's quantizer in double, codes u8 [Tc][H·D]
//   repack     block per token block: median (bitwise radix select of the lower median, then the
//              stable descending rank) or greedy (exact integer cosine seed, then the least
//              width-sum candidate, ties to the lowest token; candidates evaluated in parallel)
//   stats      block per segment (b, h): pack mins and widths, min width, segment bytes
//   scan       one block: exclusive scan of segment sizes -> the u32 offset table, totals
//   segments   block per segment: min-width byte, width nibbles, mins, payload (byte aligned packs)
//   fixed      grid-stride: per-slot scale/zero, permutation bits, fp16 recent buffer
//
// Spec weaknesses this keeps fixed (see cpu.cpp's header): codes from the stored fp16 scale/lo,
// exact constant tokens, int32 zero points, the stored permutation.
//
// Exactness: the build uses --use_fast_math (flush-to-zero float arithmetic), so no value the
// bytes depend on goes through float arithmetic or float comparisons: floats are ordered as
// integer keys, widened to double bit by bit, and every quantizer step runs in double (never
// flushed), matching half.h / quant.h / repack.h operation for operation. The fp16 conversions are
// integer twins of half.h (`__host__ __device__`, checked over all 2^32 floats by
// tools/packkv_encode_emu.cpp).
//
// Every block function is written once as a sequence of phases over thread ids (Exec::phase ends in
// __syncthreads() on the device, loops over the ids on the host), so the emulator runs the same
// code on the CPU and compares its bytes with the CPU encoder's.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "common/bits.h"
#include "packkv/format.h"
#include "packkv/quant.h"
#ifdef __CUDACC__
#include "common/cuda_check.h"
#include "common/gpu_codec.h"
#endif

#ifdef __CUDACC__
#define PKE_HD __host__ __device__
#else
#define PKE_HD
#endif

namespace packkv::packkv_gpu::enc {

using packkv_codec::Repack;

constexpr uint32_t kThreads = 256;  // every encode kernel's block size (the emulator's too)
constexpr uint32_t kNoToken = 0xFFFFFFFFu;
enum : uint32_t { kFlagWidth = 1, kFlagOffsets = 2, kFlagRoom = 4 };

// ---- bits, exact conversions (no float arithmetic) -------------------------------------------------

using bits::doubleOf;
using bits::floatOf;
/** The float's bits (common/bits.h). */
PKE_HD inline uint32_t f2u(float f) { return bits::bitsOf(f); }
PKE_HD inline float u2f(uint32_t u) { return floatOf(u); }
PKE_HD inline double u2d(uint64_t u) { return doubleOf(u); }
PKE_HD inline uint32_t bitLen(uint32_t v) {
#ifdef __CUDA_ARCH__
  return 32u - uint32_t(__clz(v));
#else
  return v ? 32u - uint32_t(__builtin_clz(v)) : 0u;
#endif
}
PKE_HD inline double rintD(double v) {
#ifdef __CUDA_ARCH__
  return rint(v);
#else
  return __builtin_nearbyint(v);
#endif
}

/** double(f), bit by bit (a float→double convert may flush subnormals under fast math). */
PKE_HD inline double toDouble(uint32_t u) {
  const uint64_t sign = uint64_t(u >> 31) << 63;
  const uint32_t e = (u >> 23) & 0xFFu, m = u & 0x7FFFFFu;
  if (e == 0) {
    const double d = double(m) * 0x1p-149;  // exact: m < 2^23
    return sign ? -d : d;
  }
  const uint64_t exp = e == 255 ? 0x7FFu : uint64_t(e) - 127 + 1023;
  return u2d(sign | (exp << 52) | (uint64_t(m) << 29));
}

/** half.h's halfToFloat, as a double (exact). */
PKE_HD inline double halfToDouble(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
  if (exp == 0) {
    const double d = double(man) * 0x1p-24;
    return sign ? -d : d;
  }
  if (exp == 31) return toDouble(sign | 0x7F800000u | (man << 13));
  return toDouble(sign | ((exp + 112) << 23) | (man << 13));
}

/** half.h's floatToHalf (round to nearest even), on the float's bits. */
PKE_HD inline uint16_t floatToHalfBits(uint32_t u) {
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t absu = u & 0x7FFFFFFFu;
  if (absu >= 0x7F800000u) return uint16_t(sign | 0x7C00u | (absu > 0x7F800000u ? 0x200u : 0u));
  if (absu >= 0x477FF000u) return uint16_t(sign | 0x7C00u);
  if (absu < 0x38800000u) {  // |f| < 2^-14: nearbyint(|f|·2^24), 0 for float subnormals
    const uint32_t e = absu >> 23;
    if (e == 0) return sign;
    const uint32_t mant = (absu & 0x7FFFFFu) | 0x800000u, shift = 126 - e;  // |f|·2^24 = mant / 2^shift
    if (shift >= 32) return sign;
    uint32_t q = mant >> shift;
    const uint64_t rest = uint64_t(mant) & ((uint64_t(1) << shift) - 1), half = uint64_t(1) << (shift - 1);
    if (rest > half || (rest == half && (q & 1u))) ++q;
    return uint16_t(sign | q);
  }
  const uint32_t exp = (absu >> 23) - 112, man = absu & 0x7FFFFFu, rest = man & 0x1FFFu;
  uint32_t half = (exp << 10) | (man >> 13);
  if (rest > 0x1000u || (rest == 0x1000u && (half & 1u))) half += 1;
  return uint16_t(sign | half);
}
PKE_HD inline uint16_t halfNextUp(uint16_t h) {
  if (h == 0x8000u) return 0x0001u;
  return (h & 0x8000u) ? uint16_t(h - 1) : uint16_t(h + 1);
}
PKE_HD inline uint16_t halfNextDown(uint16_t h) {
  if (h == 0x0000u) return 0x8001u;
  return (h & 0x8000u) ? uint16_t(h + 1) : uint16_t(h - 1);
}
PKE_HD inline uint16_t floatToHalfDownBits(uint32_t u) {
  const uint16_t h = floatToHalfBits(u);
  return halfToDouble(h) > toDouble(u) ? halfNextDown(h) : h;
}
PKE_HD inline uint16_t floatToHalfUpBits(uint32_t u) {
  const uint16_t h = floatToHalfBits(u);
  return halfToDouble(h) < toDouble(u) ? halfNextUp(h) : h;
}

/** Float order as unsigned keys (−0 keyed as +0, so they tie like the float compare). */
PKE_HD inline uint32_t orderKey(uint32_t u) {
  if (u == 0x80000000u) u = 0;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
PKE_HD inline uint32_t keyBits(uint32_t k) { return (k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k; }

// ---- quant.h's quantizer in double -----------------------------------------------------------------

struct TokenQ {
  uint16_t scaleHalf, loHalf;
  int32_t zp;
  double scale, lo;
};

/** quant.h's halfAtLeast; false where it throws (past the fp16 maximum). */
PKE_HD inline bool halfAtLeast(double v, uint16_t& out) {
#ifdef __CUDA_ARCH__
  uint32_t f = f2u(__double2float_rn(v));  // a flushed subnormal still ends at 1e-30f below
#else
  uint32_t f = f2u(float(v));
#endif
  if (toDouble(f) < v) f += 1;  // v > 0, f ≥ +0: nextafter toward +inf
  if (!(toDouble(f) <= 65504.0)) return false;
  const uint32_t tiny = f2u(1e-30f);
  if (toDouble(f) < toDouble(tiny)) f = tiny;
  out = floatToHalfUpBits(f);
  return true;
}

/** quant.h's quantizer(lo, hi, maxAbs); false where it throws (the host re-runs it for the text). */
PKE_HD inline bool quantizeToken(uint32_t loBits, uint32_t hiBits, uint32_t maxAbsBits, double rel, bool hp,
                                 TokenQ& q) {
  q.scaleHalf = 0x3C00, q.loHalf = 0, q.zp = 0, q.scale = 1, q.lo = 0;
  const double lo = toDouble(loBits), hi = toDouble(hiBits);
  if (hp) {
    if (!(lo <= 65504.0 && lo >= -65504.0)) return false;
    q.loHalf = floatToHalfDownBits(loBits);
    q.lo = halfToDouble(q.loHalf);
    const double range = hi - q.lo;
    if (range > 0 && !halfAtLeast(range * rel, q.scaleHalf)) return false;
  } else if (hi > lo) {
    const double a = (hi - lo) * rel, b = toDouble(maxAbsBits) / 1073741824.0;
    if (!halfAtLeast(a < b ? b : a, q.scaleHalf)) return false;
  } else if (lo != 0) {
    if (!(lo <= 65504.0 && lo >= -65504.0)) return false;
    const uint16_t h = floatToHalfBits(loBits & 0x7FFFFFFFu);
    q.scaleHalf = h < 1 ? uint16_t(1) : h;
  }
  q.scale = halfToDouble(q.scaleHalf);
  if (!hp) q.zp = int32_t(rintD(lo / q.scale));
  return true;
}

/** TokenQuant::code; false where it throws. */
PKE_HD inline bool codeOf(uint32_t xBits, const TokenQ& q, bool hp, uint32_t& code) {
  const double x = toDouble(xBits);
  const double v = hp ? rintD((x - q.lo) / q.scale) : rintD(x / q.scale) - double(q.zp);
  if (!(v >= 0 && v <= 32767)) return false;
  code = uint32_t(v);
  return true;
}

// ---- block reductions: one atomic per warp on the device, a plain update on the host -------------
// Every lane of a warp calls these together (phase loops are warp-uniform); identity values for
// lanes with nothing to add.

#ifdef __CUDA_ARCH__
__device__ inline bool warpSame(const void* p) {
  const unsigned long long v = reinterpret_cast<unsigned long long>(p);
  return __all_sync(0xFFFFFFFFu, v == __shfl_sync(0xFFFFFFFFu, v, 0));
}
#endif

/** __syncwarp() on the device; the host runs a warp's lanes in order. */
PKE_HD inline void syncWarp() {
#ifdef __CUDA_ARCH__
  __syncwarp();
#endif
}

PKE_HD inline void addTo(unsigned long long* p, unsigned long long v) {
#ifdef __CUDA_ARCH__
  if (warpSame(p)) {
    for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
    if ((threadIdx.x & 31) == 0) atomicAdd(p, v);
  } else if (v) {
    atomicAdd(p, v);
  }
#else
  *p += v;
#endif
}
PKE_HD inline void minTo(unsigned long long* p, unsigned long long v) {
#ifdef __CUDA_ARCH__
  if (warpSame(p)) {
    for (int o = 16; o; o >>= 1) {
      const unsigned long long w = __shfl_xor_sync(0xFFFFFFFFu, v, o);
      v = w < v ? w : v;
    }
    if ((threadIdx.x & 31) == 0) atomicMin(p, v);
  } else {
    atomicMin(p, v);
  }
#else
  if (v < *p) *p = v;
#endif
}
PKE_HD inline void maxTo(uint32_t* p, uint32_t v) {
#ifdef __CUDA_ARCH__
  if (warpSame(p)) {
    v = __reduce_max_sync(0xFFFFFFFFu, v);
    if ((threadIdx.x & 31) == 0) atomicMax(p, v);
  } else {
    atomicMax(p, v);
  }
#else
  if (v > *p) *p = v;
#endif
}
/** Single-thread updates of global state. */
PKE_HD inline void globalMin(uint32_t* p, uint32_t v) {
#ifdef __CUDA_ARCH__
  atomicMin(p, v);
#else
  if (v < *p) *p = v;
#endif
}
PKE_HD inline void globalAdd(unsigned long long* p, unsigned long long v) {
#ifdef __CUDA_ARCH__
  atomicAdd(p, v);
#else
  *p += v;
#endif
}
PKE_HD inline void globalOr(uint32_t* p, uint32_t v) {
#ifdef __CUDA_ARCH__
  atomicOr(p, v);
#else
  *p |= v;
#endif
}

/** Byte `byteIdx` of `count` values of `bits` bits each, LSB first (format.h's BitWriter). */
template <typename Get>
PKE_HD inline uint32_t gatherByte(const Get& get, uint32_t count, uint32_t bits, uint64_t byteIdx) {
  const uint64_t first = byteIdx * 8;
  uint64_t v = first / bits, last = (first + 7) / bits;
  if (last >= count) last = count - 1;
  uint32_t byte = 0;
  for (; v <= last; ++v) {
    const int64_t shift = int64_t(v * bits) - int64_t(first);
    const uint32_t val = get(uint32_t(v));
    byte |= shift >= 0 ? val << shift : val >> -shift;
  }
  return byte & 0xFFu;
}

/** format.h's segmentHeadBytes, callable on the device. */
PKE_HD inline uint64_t segmentHead(uint32_t packsPerSegment, uint32_t minBits) {
  return 1 + (uint64_t(packsPerSegment) + 1) / 2 + (uint64_t(packsPerSegment) * minBits + 7) / 8;
}

PKE_HD inline void storeLE(uint8_t* p, uint32_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) p[i] = uint8_t(v >> (8 * i));
}

// ---- arguments and state ------------------------------------------------------------------------

/** Device-side results read back once at the end. */
struct State {
  unsigned long long nonFinite, segTotal, payload;
  uint32_t errToken, flags;
};

struct Args {
  const float* x;
  uint8_t* body;
  uint32_t H, T, D, L, B, P, G, GD, nb, Tc, Tr, pb, permBlockBytes;
  bool hp;
  Repack repack;
  double rel;
  uint64_t zeroOff, offsetOff, segmentsOff, permBytes, segBound;
  // scratch
  uint8_t* codes;       // [Tc][L]: codes ≤ 1/rel + 1 < 256 for the rel that check() accepts
  uint16_t* scaleHalf;  // [Tc] original order
  uint32_t* zero;       // [Tc] zp (int) or loHalf (hp)
  uint32_t* perm;       // [nb][B] slot -> block token; nullptr for repack=none
  uint16_t* mins;       // [nb·H][GD]
  uint8_t* widths;      // [nb·H][GD]
  uint32_t* segSize;    // [nb·H] bytes
  uint32_t* segPayload;
  uint8_t* segMinBits;
  uint64_t* segOffset;  // [nb·H] from the first segment
  State* state;

  PKE_HD uint32_t permAt(uint32_t b, uint32_t j) const { return perm ? perm[size_t(b) * B + j] : j; }
  PKE_HD uint32_t code(uint32_t token, uint32_t i) const { return codes[size_t(token) * L + i]; }
};

// ---- quantize: a warp per compressed token, kTokensPerBlock tokens per block --------------------
// Each lane keeps its min/max/max|x| in registers over the token's H·D values and the warp reduces
// once; lane 0 runs the double-precision quantizer while the block's other warps run theirs (a
// block per token serialized that step, 1.4 ms at 128k tokens on the H100).

constexpr uint32_t kTokensPerBlock = kThreads / 32;

struct QuantSmem {
  unsigned long long loKey[kTokensPerBlock], nonFinite[kTokensPerBlock];
  uint32_t hiKey[kTokensPerBlock], absMax[kTokensPerBlock], bad[kTokensPerBlock];
  TokenQ q[kTokensPerBlock];
};

/** Block `blk` quantizes tokens blk·kTokensPerBlock + warp (warp-uniform: a warp past Tc idles). */
#pragma nv_exec_check_disable
template <class Exec>
PKE_HD void quantizeBlock(const Exec& ex, const Args& a, uint32_t blk, QuantSmem& sm) {
  auto xAt = [&](uint32_t t, uint32_t e) { return f2u(a.x[(size_t(e / a.D) * a.T + t) * a.D + e % a.D]); };
  ex.phase([&](uint32_t tid) {
    const uint32_t w = tid / 32, t = blk * kTokensPerBlock + w, lane = tid % 32;
    if (t >= a.Tc) return;
    unsigned long long lo = ~0ull, nf = 0;
    uint32_t hi = 0, abs = 0;
    for (uint32_t e = lane; e < a.L; e += 32) {
      const uint32_t u = xAt(t, e);
      if ((u & 0x7F800000u) == 0x7F800000u) {
        ++nf;
      } else {
        const uint32_t k = orderKey(u);
        const unsigned long long key = (uint64_t(k) << 32) | e;
        lo = key < lo ? key : lo, hi = k > hi ? k : hi, abs = (u & 0x7FFFFFFFu) > abs ? (u & 0x7FFFFFFFu) : abs;
      }
    }
    if (lane == 0) sm.loKey[w] = ~0ull, sm.nonFinite[w] = 0, sm.hiKey[w] = 0, sm.absMax[w] = 0, sm.bad[w] = 0;
    syncWarp();
    minTo(&sm.loKey[w], lo);
    maxTo(&sm.hiKey[w], hi);
    maxTo(&sm.absMax[w], abs);
    addTo(&sm.nonFinite[w], nf);
  });
  ex.phase([&](uint32_t tid) {
    const uint32_t w = tid / 32, t = blk * kTokensPerBlock + w;
    if (tid % 32 != 0 || t >= a.Tc) return;
    if (sm.nonFinite[w]) {
      globalAdd(&a.state->nonFinite, sm.nonFinite[w]);
      sm.bad[w] = 1;
      return;
    }
    const uint32_t loBits = xAt(t, uint32_t(sm.loKey[w] & 0xFFFFFFFFu));  // the first minimum, its own zero sign
    if (!quantizeToken(loBits, keyBits(sm.hiKey[w]), sm.absMax[w], a.rel, a.hp, sm.q[w])) {
      globalMin(&a.state->errToken, t);
      sm.bad[w] = 1;
    }
    a.scaleHalf[t] = sm.q[w].scaleHalf;
    a.zero[t] = a.hp ? uint32_t(sm.q[w].loHalf) : uint32_t(sm.q[w].zp);
  });
  ex.phase([&](uint32_t tid) {
    const uint32_t w = tid / 32, t = blk * kTokensPerBlock + w, lane = tid % 32;
    if (t >= a.Tc || sm.bad[w]) return;
    const TokenQ q = sm.q[w];
    for (uint32_t e = lane; e < a.L; e += 32) {
      uint32_t c = 0;
      if (!codeOf(xAt(t, e), q, a.hp, c) || c > 255) globalMin(&a.state->errToken, t);  // > 255: not for a valid rel
      a.codes[size_t(t) * a.L + e] = uint8_t(c);
    }
  });
}

// ---- repack: one block per token block ------------------------------------------------------------

/** median: bytes of dynamic shared memory. */
PKE_HD inline size_t medianSmemBytes(uint32_t B) { return size_t(B) * (8 + 4); }

/** repack.h's medianOrder: the lower median by a bitwise select, then the stable descending rank. */
#pragma nv_exec_check_disable
template <class Exec>
PKE_HD void medianBlock(const Exec& ex, const Args& a, uint32_t b, unsigned char* smem, uint32_t& maxCode) {
  unsigned long long* below = reinterpret_cast<unsigned long long*>(smem);  // [B] count of codes < candidate
  uint32_t* med = reinterpret_cast<uint32_t*>(below + a.B);                 // [B] median bits so far
  const uint32_t B = a.B, L = a.L, k = (L - 1) / 2, t0 = b * B;
  const size_t n = size_t(B) * L;
  ex.phase([&](uint32_t tid) {
    for (uint32_t t = tid; t < B; t += kThreads) below[t] = 0, med[t] = 0;
    if (tid == 0) maxCode = 0;
  });
  ex.phase([&](uint32_t tid) {
    uint32_t m = 0;
    for (size_t i = tid; i < n; i += kThreads) {
      const uint32_t c = a.codes[size_t(t0) * L + i];
      m = c > m ? c : m;
    }
    maxTo(&maxCode, m);
  });
  for (int bit = int(bitLen(maxCode)) - 1; bit >= 0; --bit) {
    ex.phase([&](uint32_t tid) {  // codes below the candidate, a warp per token
      const uint32_t warp = tid / 32, lane = tid % 32;
      for (uint32_t t = warp; t < B; t += kThreads / 32) {
        const uint32_t cand = med[t] | (1u << bit);
        const uint8_t* row = a.codes + size_t(t0 + t) * L;
        uint32_t count = 0;
        for (uint32_t i = lane; i < L; i += 32) count += row[i] < cand;
        addTo(&below[t], count);
      }
    });
    ex.phase([&](uint32_t tid) {
      for (uint32_t t = tid; t < B; t += kThreads) {
        if (below[t] <= k) med[t] |= 1u << bit;  // at most k codes below: the median is ≥ cand
        below[t] = 0;
      }
    });
  }
  ex.phase([&](uint32_t tid) {
    for (uint32_t t = tid; t < B; t += kThreads) {
      uint32_t rank = 0;
      for (uint32_t u = 0; u < B; ++u) rank += med[u] > med[t] || (med[u] == med[t] && u < t);
      a.perm[size_t(b) * B + rank] = t;
    }
  });
}

struct alignas(16) Quad {
  uint32_t x, y, z, w;
};

struct GreedySmem {
  unsigned long long best[2];
  uint32_t sel;
};
/** greedy: bytes of dynamic shared memory (lo|hi or the mean per element, per-candidate sums). */
PKE_HD inline size_t greedySmemBytes(uint32_t B, uint32_t L) { return size_t(B) * (3 * 8 + 4) + size_t(L) * 4; }

/** repack.h's greedyOrder: warps evaluate candidates in parallel; the choices are the CPU's. */
#pragma nv_exec_check_disable
template <class Exec>
PKE_HD void greedyBlock(const Exec& ex, const Args& a, uint32_t b, unsigned char* smem, GreedySmem& sm) {
  const uint32_t B = a.B, L = a.L, P = a.P, t0 = b * B, warps = kThreads / 32;
  unsigned long long* dot = reinterpret_cast<unsigned long long*>(smem);  // [B]
  unsigned long long* norm = dot + B;                                      // [B]
  unsigned long long* wsum = norm + B;                                     // [B]
  uint32_t* rem = reinterpret_cast<uint32_t*>(wsum + B);                   // [B] 1 while remaining
  uint32_t* lohi = rem + B;  // [L] mean (seed phase), then lo | hi << 16 of the pack so far
  const uint8_t* codes = a.codes + size_t(t0) * L;
  ex.phase([&](uint32_t tid) {
    for (uint32_t t = tid; t < B; t += kThreads) dot[t] = 0, norm[t] = 0, wsum[t] = 0, rem[t] = 1;
    if (tid == 0) sm.best[0] = sm.best[1] = ~0ull;
  });
  uint32_t pos = 0, par = 0;
  while (pos < B) {
    const double remaining = double(B - pos);
    ex.phase([&](uint32_t tid) {  // the rounded mean of the remaining tokens
      for (uint32_t i = tid; i < L; i += kThreads) {
        uint64_t s = 0;
        for (uint32_t t = 0; t < B; ++t)
          if (rem[t]) s += codes[size_t(t) * L + i];
        lohi[i] = uint32_t(rintD(double(s) / remaining));
      }
    });
    ex.phase([&](uint32_t tid) {  // dot(token, mean) and |token|² per remaining token, a warp each
      const uint32_t warp = tid / 32, lane = tid % 32;
      for (uint32_t t = warp; t < B; t += warps) {
        if (!rem[t]) continue;
        uint64_t d = 0, nn = 0;
        for (uint32_t i = lane; i < L; i += 32) {
          const uint64_t v = codes[size_t(t) * L + i];
          d += v * lohi[i], nn += v * v;
        }
        addTo(&dot[t], d);
        addTo(&norm[t], nn);
      }
    });
    ex.phase([&](uint32_t tid) {  // the seed: the first maximum of dot²/|t|², compared exactly
      if (tid != 0) return;
      unsigned __int128 bestNum = 0, bestDen = 1;
      uint32_t best = kNoToken;
      for (uint32_t t = 0; t < B; ++t) {
        if (!rem[t]) continue;
        const unsigned __int128 num = norm[t] ? (unsigned __int128)dot[t] * dot[t] : 0, den = norm[t] ? norm[t] : 1;
        if (best == kNoToken || num * bestDen > bestNum * den) best = t, bestNum = num, bestDen = den;
        dot[t] = 0, norm[t] = 0;
      }
      sm.sel = best;
      rem[best] = 0;
      a.perm[size_t(b) * B + pos] = best;
    });
    ++pos;
    ex.phase([&](uint32_t tid) {
      for (uint32_t i = tid; i < L; i += kThreads) {
        const uint32_t c = codes[size_t(sm.sel) * L + i];
        lohi[i] = c | (c << 16);
      }
    });
    for (uint32_t added = 1; added < P; ++added, ++pos, par ^= 1) {
      ex.phase([&](uint32_t tid) {  // Σ_i width(pack ∪ {t}) per remaining token, a warp each
        const uint32_t warp = tid / 32, lane = tid % 32;
        for (uint32_t t = warp; t < B; t += warps) {
          if (!rem[t]) continue;
          auto width = [](uint32_t v, uint32_t lh) {
            const uint32_t lo = lh & 0xFFFFu, hi = lh >> 16;
            return bitLen((hi > v ? hi : v) - (lo < v ? lo : v));
          };
          uint32_t s = 0;
          if (L % 4 == 0) {  // 4 codes per load; rows and lohi are 4- and 16-byte aligned
            const uint32_t* row = reinterpret_cast<const uint32_t*>(codes + size_t(t) * L);
            const Quad* lh4 = reinterpret_cast<const Quad*>(lohi);
            for (uint32_t j = lane; j < L / 4; j += 32) {
              const uint32_t w = row[j];
              const Quad lh = lh4[j];
              s += width(w & 255u, lh.x) + width((w >> 8) & 255u, lh.y) + width((w >> 16) & 255u, lh.z) +
                   width(w >> 24, lh.w);
            }
          } else {
            for (uint32_t i = lane; i < L; i += 32) s += width(codes[size_t(t) * L + i], lohi[i]);
          }
          addTo(&wsum[t], s);
        }
      });
      ex.phase([&](uint32_t tid) {  // the least sum, ties to the lowest token
        for (uint32_t base = 0; base < B; base += kThreads) {
          const uint32_t t = base + tid;
          const bool on = t < B && rem[t];
          minTo(&sm.best[par], on ? (wsum[t] << 32) | t : ~0ull);
          if (t < B) wsum[t] = 0;
        }
      });
      ex.phase([&](uint32_t tid) {
        const uint32_t t = uint32_t(sm.best[par] & 0xFFFFFFFFu);
        for (uint32_t i = tid; i < L; i += kThreads) {
          const uint32_t c = codes[size_t(t) * L + i], lh = lohi[i], lo = lh & 0xFFFFu, hi = lh >> 16;
          lohi[i] = (lo < c ? lo : c) | ((hi > c ? hi : c) << 16);
        }
        if (tid == 0) {
          rem[t] = 0;
          a.perm[size_t(b) * B + pos] = t;
          sm.best[par ^ 1] = ~0ull;
        }
      });
    }
  }
}

// ---- segment statistics: one block per (block, head) -----------------------------------------------

struct StatsSmem {
  unsigned long long payload;
  uint32_t maxMin;
};

#pragma nv_exec_check_disable
template <class Exec>
PKE_HD void statsBlock(const Exec& ex, const Args& a, uint32_t s, StatsSmem& sm) {
  const uint32_t b = s / a.H, h = s % a.H;
  ex.phase([&](uint32_t tid) {
    if (tid == 0) sm.payload = 0, sm.maxMin = 0;
  });
  ex.phase([&](uint32_t tid) {
    for (uint32_t i0 = 0; i0 < a.GD; i0 += kThreads) {
      const uint32_t i = i0 + tid;
      uint32_t lo = 0, w = 0;
      if (i < a.GD) {
        const uint32_t g = i / a.D, d = i % a.D;
        uint32_t hi = 0;
        lo = 0xFFFFFFFFu;
        for (uint32_t k = 0; k < a.P; ++k) {
          const uint32_t c = a.code(b * a.B + a.permAt(b, g * a.P + k), h * a.D + d);
          lo = c < lo ? c : lo, hi = c > hi ? c : hi;
        }
        w = bitLen(hi - lo);
        if (w > 15) globalOr(&a.state->flags, kFlagWidth);
        a.mins[size_t(s) * a.GD + i] = uint16_t(lo);
        a.widths[size_t(s) * a.GD + i] = uint8_t(w);
      }
      maxTo(&sm.maxMin, lo);
      addTo(&sm.payload, a.P * w / 8);
    }
  });
  ex.phase([&](uint32_t tid) {
    if (tid != 0) return;
    const uint32_t minBits = bitLen(sm.maxMin);
    a.segMinBits[s] = uint8_t(minBits);
    a.segPayload[s] = uint32_t(sm.payload);
    a.segSize[s] = uint32_t(segmentHead(a.GD, minBits) + sm.payload);
  });
}

// ---- scan: one block over all segments -----------------------------------------------------------

struct ScanSmem {
  unsigned long long part[kThreads];
  unsigned long long payload;
};

#pragma nv_exec_check_disable
template <class Exec>
PKE_HD void scanBlock(const Exec& ex, const Args& a, ScanSmem& sm) {
  const uint32_t n = a.nb * a.H, chunk = (n + kThreads - 1) / kThreads;
  ex.phase([&](uint32_t tid) {
    if (tid == 0) sm.payload = 0;
  });
  // A thread's run is read kScanBatch sizes at a time, all loads issued before the stores (which
  // the compiler must otherwise order after each load: one memory latency per segment).
  constexpr uint32_t kScanBatch = 16;
  ex.phase([&](uint32_t tid) {
    unsigned long long size = 0, payload = 0;
    const uint32_t end = tid * chunk + chunk < n ? tid * chunk + chunk : n;
    for (uint32_t s0 = tid * chunk; s0 < end; s0 += kScanBatch) {
      uint32_t sz[kScanBatch], pl[kScanBatch];
      for (uint32_t k = 0; k < kScanBatch; ++k) sz[k] = s0 + k < end ? a.segSize[s0 + k] : 0;
      for (uint32_t k = 0; k < kScanBatch; ++k) pl[k] = s0 + k < end ? a.segPayload[s0 + k] : 0;
      for (uint32_t k = 0; k < kScanBatch; ++k) size += sz[k], payload += pl[k];
    }
    sm.part[tid] = size;
    addTo(&sm.payload, payload);
  });
  ex.phase([&](uint32_t tid) {
    unsigned long long at = 0;
    for (uint32_t j = 0; j < tid; ++j) at += sm.part[j];
    const uint32_t end = tid * chunk + chunk < n ? tid * chunk + chunk : n;
    for (uint32_t s0 = tid * chunk; s0 < end; s0 += kScanBatch) {
      uint32_t sz[kScanBatch];
      for (uint32_t k = 0; k < kScanBatch; ++k) sz[k] = s0 + k < end ? a.segSize[s0 + k] : 0;
      for (uint32_t k = 0; k < kScanBatch && s0 + k < end; ++k) {
        if (at > 0xFFFFFFFFull) globalOr(&a.state->flags, kFlagOffsets);
        a.segOffset[s0 + k] = at;
        storeLE(a.body + a.offsetOff + 4 * size_t(s0 + k), uint32_t(at), 4);
        at += sz[k];
      }
    }
    if (tid == kThreads - 1) {
      a.state->segTotal = at;
      a.state->payload = sm.payload;
      if (at > a.segBound) globalOr(&a.state->flags, kFlagRoom);
    }
  });
}

// ---- segment bytes: one block per (block, head) ---------------------------------------------------

struct SegmentSmem {
  unsigned long long part[kThreads];
};

#pragma nv_exec_check_disable
template <class Exec>
PKE_HD void segmentBlock(const Exec& ex, const Args& a, uint32_t s, SegmentSmem& sm) {
  if (a.state->flags & kFlagRoom) return;  // uniform: written by the scan kernel
  const uint32_t b = s / a.H, h = s % a.H, GD = a.GD, P = a.P, minBits = a.segMinBits[s];
  const uint16_t* mins = a.mins + size_t(s) * GD;
  const uint8_t* widths = a.widths + size_t(s) * GD;
  uint8_t* seg = a.body + a.segmentsOff + a.segOffset[s];
  uint8_t* minAt = seg + 1 + (GD + 1) / 2;
  uint8_t* payloadAt = seg + segmentHead(GD, minBits);
  const uint32_t chunk = (GD + kThreads - 1) / kThreads;
  ex.phase([&](uint32_t tid) {
    if (tid == 0) seg[0] = uint8_t(minBits);
    for (uint32_t j = tid; j < (GD + 1) / 2; j += kThreads)
      seg[1 + j] = uint8_t(widths[2 * j] | (2 * j + 1 < GD ? widths[2 * j + 1] << 4 : 0));
    if (minBits) {
      const uint64_t minBytes = (uint64_t(GD) * minBits + 7) / 8;
      for (uint64_t j = tid; j < minBytes; j += kThreads)
        minAt[j] = uint8_t(gatherByte([&](uint32_t v) { return uint32_t(mins[v]); }, GD, minBits, j));
    }
    unsigned long long bytes = 0;
    for (uint32_t i = tid * chunk; i < GD && i < (tid + 1) * chunk; ++i) bytes += P * widths[i] / 8;
    sm.part[tid] = bytes;
  });
  ex.phase([&](uint32_t tid) {
    unsigned long long at = 0;
    for (uint32_t j = 0; j < tid; ++j) at += sm.part[j];
    uint8_t* out = payloadAt + at;
    for (uint32_t i = tid * chunk; i < GD && i < (tid + 1) * chunk; ++i) {
      const uint32_t w = widths[i], m = mins[i], g = i / a.D, d = i % a.D;
      if (w == 0) continue;
      uint64_t acc = 0;
      uint32_t bits = 0;
      for (uint32_t k = 0; k < P; ++k) {
        acc |= uint64_t(a.code(b * a.B + a.permAt(b, g * P + k), h * a.D + d) - m) << bits;
        for (bits += w; bits >= 8; bits -= 8) *out++ = uint8_t(acc), acc >>= 8;
      }
    }
  });
}

// ---- fixed sections: per-slot scale/zero, permutation, fp16 buffer (one item per thread) ----------

/** Item i of slots (Tc), then permutation bytes (nb·permBlockBytes), then buffer elements. */
PKE_HD inline void fixedItem(const Args& a, uint64_t item, unsigned long long& nonFinite) {
  if (item < a.Tc) {
    const uint32_t slot = uint32_t(item), b = slot / a.B, t = b * a.B + a.permAt(b, slot % a.B);
    storeLE(a.body + 2 * size_t(slot), a.scaleHalf[t], 2);
    storeLE(a.body + a.zeroOff + (a.hp ? 2 : 4) * size_t(slot), a.zero[t], a.hp ? 2 : 4);
    return;
  }
  item -= a.Tc;
  const bool room = !(a.state->flags & kFlagRoom);
  uint8_t* permSection = a.body + a.segmentsOff + a.state->segTotal;
  if (item < a.permBytes) {
    const uint32_t b = uint32_t(item / a.permBlockBytes);
    if (room)
      permSection[item] = uint8_t(gatherByte([&](uint32_t v) { return a.permAt(b, v); }, a.B, a.pb, item % a.permBlockBytes));
    return;
  }
  item -= a.permBytes;
  const uint32_t d = uint32_t(item % a.D), i = uint32_t(item / a.D % a.Tr), h = uint32_t(item / a.D / a.Tr);
  const uint32_t u = f2u(a.x[(size_t(h) * a.T + a.Tc + i) * a.D + d]);
  if ((u & 0x7F800000u) == 0x7F800000u) ++nonFinite;
  if (room) storeLE(permSection + a.permBytes + 2 * item, floatToHalfBits(u), 2);
}
PKE_HD inline uint64_t fixedItems(const Args& a) {
  return uint64_t(a.Tc) + a.permBytes + uint64_t(a.H) * a.Tr * a.D;
}

/** The geometry of one encode; the scratch pointers are the caller's. */
inline Args argsOf(const float* x, uint8_t* body, const Shape& s, const packkv_codec::Config& c,
                   const packkv_codec::Layout& l) {
  Args a{};
  a.x = x, a.body = body;
  a.H = s.heads, a.T = s.tokens, a.D = s.dim, a.L = s.heads * s.dim, a.B = c.block, a.P = c.pack;
  a.G = l.packsPerChannel, a.GD = l.packsPerSegment, a.nb = l.blocks, a.Tc = l.compressedTokens, a.Tr = l.bufferTokens;
  a.pb = l.permBits, a.permBlockBytes = uint32_t(l.permBlockBytes);
  a.hp = c.hpZero, a.repack = c.repack, a.rel = c.rel;
  a.zeroOff = l.zeroOff, a.offsetOff = l.offsetOff, a.segmentsOff = l.segmentsOff, a.permBytes = l.permBytes;
  // bodyBytes()'s room for the segments: every min and pack at 8 bits (codes ≤ 1/rel + 1 < 256)
  a.segBound = uint64_t(l.blocks) * s.heads * (segmentHead(l.packsPerSegment, 8) + uint64_t(l.packsPerSegment) * c.pack);
  return a;
}

/** Scratch bytes and the carving of one allocation into Args' scratch arrays (256-byte aligned). */
inline size_t carveScratch(Args& a, uint8_t* base) {
  size_t at = 0;
  auto take = [&](auto*& ptr, size_t bytes) {
    using T = std::remove_reference_t<decltype(*ptr)>;
    ptr = base ? reinterpret_cast<T*>(base + at) : nullptr;
    at += (bytes + 255) / 256 * 256;
  };
  const size_t nseg = size_t(a.nb) * a.H;
  take(a.state, sizeof(State));
  take(a.codes, size_t(a.Tc) * a.L);
  take(a.scaleHalf, size_t(a.Tc) * 2);
  take(a.zero, size_t(a.Tc) * 4);
  take(a.perm, a.repack == Repack::None ? 0 : size_t(a.nb) * a.B * 4);
  if (a.repack == Repack::None) a.perm = nullptr;
  take(a.mins, nseg * a.GD * 2);
  take(a.widths, nseg * a.GD);
  take(a.segSize, nseg * 4);
  take(a.segPayload, nseg * 4);
  take(a.segMinBits, nseg);
  take(a.segOffset, nseg * 8);
  return at;
}

#ifdef __CUDACC__

struct DeviceExec {
  template <class F>
  __device__ void phase(F&& f) const {
    f(threadIdx.x);
    __syncthreads();
  }
};

__global__ void __launch_bounds__(kThreads) quantizeKernel(Args a) {
  __shared__ QuantSmem sm;
  quantizeBlock(DeviceExec{}, a, blockIdx.x, sm);
}
__global__ void __launch_bounds__(kThreads) medianKernel(Args a) {
  __shared__ uint32_t maxCode;
  extern __shared__ unsigned long long dynMedian[];
  medianBlock(DeviceExec{}, a, blockIdx.x, reinterpret_cast<unsigned char*>(dynMedian), maxCode);
}
__global__ void __launch_bounds__(kThreads) greedyKernel(Args a) {
  __shared__ GreedySmem sm;
  extern __shared__ Quad dynGreedy[];
  greedyBlock(DeviceExec{}, a, blockIdx.x, reinterpret_cast<unsigned char*>(dynGreedy), sm);
}
__global__ void __launch_bounds__(kThreads) statsKernel(Args a) {
  __shared__ StatsSmem sm;
  statsBlock(DeviceExec{}, a, blockIdx.x, sm);
}
__global__ void __launch_bounds__(kThreads) scanKernel(Args a) {
  __shared__ ScanSmem sm;
  scanBlock(DeviceExec{}, a, sm);
}
__global__ void __launch_bounds__(kThreads) segmentKernel(Args a) {
  __shared__ SegmentSmem sm;
  segmentBlock(DeviceExec{}, a, blockIdx.x, sm);
}
__global__ void __launch_bounds__(kThreads) fixedKernel(Args a) {
  unsigned long long nonFinite = 0;
  const uint64_t n = fixedItems(a);
  for (uint64_t i = uint64_t(blockIdx.x) * kThreads + threadIdx.x; i < n; i += uint64_t(gridDim.x) * kThreads)
    fixedItem(a, i, nonFinite);
  if (nonFinite) atomicAdd(&a.state->nonFinite, nonFinite);
}

[[noreturn]] inline void encodeFail(const std::string& m) { throw CodecError("codec 'packkv' on the GPU: " + m); }

/** Dynamic shared memory above the 48 KB default, once per kernel and size. */
template <typename K>
void allowDynamicSmem(K kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return;
  int device = 0, optin = 0;
  PACKKV_CUDA_CHECK(cudaGetDevice(&device));
  PACKKV_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (bytes > size_t(optin))
    encodeFail("repack needs " + std::to_string(bytes) + " bytes of shared memory per token block, the device has " +
               std::to_string(optin) + " (fewer heads·head_dim or a smaller block)");
  PACKKV_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
}

/** Frees the scratch on the stream on every exit, errors included. */
struct ScratchGuard {
  void* ptr = nullptr;
  cudaStream_t stream = nullptr;
  ~ScratchGuard() {
    if (ptr) cudaFreeAsync(ptr, stream);
  }
};

/** The CPU's error text for token t: re-runs quant.h on its values (the GPU flagged it). */
[[noreturn]] inline void throwTokenError(const Args& a, const packkv_codec::Config& c, TensorKind kind, uint32_t t,
                                         cudaStream_t stream) {
  std::vector<float> v(a.L);
  for (uint32_t h = 0; h < a.H; ++h)
    PACKKV_CUDA_CHECK(cudaMemcpyAsync(v.data() + size_t(h) * a.D, a.x + (size_t(h) * a.T + t) * a.D, a.D * sizeof(float),
                                      cudaMemcpyDeviceToHost, stream));
  PACKKV_CUDA_CHECK(cudaStreamSynchronize(stream));
  float lo = INFINITY, hi = -INFINITY, maxAbs = 0;
  for (float x : v) lo = std::min(lo, x), hi = std::max(hi, x), maxAbs = std::max(maxAbs, std::fabs(x));
  const packkv_codec::TokenQuant q = packkv_codec::quantizer(lo, hi, maxAbs, c, kind, t);  // throws
  for (float x : v) (void)q.code(x, c.hpZero);                                               // or this
  encodeFail("internal error: token " + std::to_string(t) + " failed on the GPU but not on the CPU");
}

/** x f32 [H][T][D] (device) -> the CPU encoder's body at `body` (device); synchronizes. */
inline Breakdown encodeOnDevice(const float* x, const Shape& s, TensorKind kind, const packkv_codec::Config& c,
                                uint8_t* body, cudaStream_t stream) {
  const packkv_codec::Layout l = packkv_codec::layoutOf(s, c);
  Args a = argsOf(x, body, s, c, l);
  const size_t scratchBytes = carveScratch(a, nullptr);
  ScratchGuard scratch{nullptr, stream};
  PACKKV_CUDA_CHECK(cudaMallocAsync(&scratch.ptr, scratchBytes, stream));
  carveScratch(a, static_cast<uint8_t*>(scratch.ptr));
  const State init{0, 0, 0, kNoToken, 0};
  PACKKV_CUDA_CHECK(cudaMemcpyAsync(a.state, &init, sizeof(State), cudaMemcpyHostToDevice, stream));

  const uint32_t nseg = a.nb * a.H;
  if (a.Tc > 0) {
    quantizeKernel<<<(a.Tc + kTokensPerBlock - 1) / kTokensPerBlock, kThreads, 0, stream>>>(a);
    PACKKV_LAUNCH_CHECK();
    if (a.repack == Repack::Median) {
      const size_t smem = medianSmemBytes(a.B);
      allowDynamicSmem(medianKernel, smem);
      medianKernel<<<a.nb, kThreads, smem, stream>>>(a);
      PACKKV_LAUNCH_CHECK();
    } else if (a.repack == Repack::Greedy) {
      const size_t smem = greedySmemBytes(a.B, a.L);
      allowDynamicSmem(greedyKernel, smem);
      greedyKernel<<<a.nb, kThreads, smem, stream>>>(a);
      PACKKV_LAUNCH_CHECK();
    }
    statsKernel<<<nseg, kThreads, 0, stream>>>(a);
    PACKKV_LAUNCH_CHECK();
    scanKernel<<<1, kThreads, 0, stream>>>(a);
    PACKKV_LAUNCH_CHECK();
    segmentKernel<<<nseg, kThreads, 0, stream>>>(a);
    PACKKV_LAUNCH_CHECK();
  }
  const uint64_t items = fixedItems(a);
  if (items > 0) {
    const uint64_t cap = uint64_t(gpu::multiprocessors()) * 32;
    fixedKernel<<<unsigned(std::min<uint64_t>((items + kThreads - 1) / kThreads, cap)), kThreads, 0, stream>>>(a);
    PACKKV_LAUNCH_CHECK();
  }
  State got{};
  PACKKV_CUDA_CHECK(cudaMemcpyAsync(&got, a.state, sizeof(State), cudaMemcpyDeviceToHost, stream));
  PACKKV_CUDA_CHECK(cudaStreamSynchronize(stream));

  if (got.nonFinite)
    throw CodecError("codec 'packkv': " + std::to_string(got.nonFinite) + " non-finite values (NaN/Inf) cannot be compressed");
  if (got.errToken != kNoToken) throwTokenError(a, c, kind, got.errToken, stream);
  if (got.flags & kFlagWidth) packkv_codec::fail("internal error: pack width > 15");
  if (got.flags & kFlagOffsets) packkv_codec::fail("stream too large: segment offsets exceed 32 bits");
  if (got.flags & kFlagRoom)
    encodeFail("internal error: " + std::to_string(got.segTotal) + " segment bytes exceed bodyBytes()' bound " +
               std::to_string(a.segBound));
  Breakdown out;
  out.payload = got.payload;
  out.scales = l.scaleBytes;
  out.zeros = l.zeroBytes;
  out.residual = l.bufferBytes;
  out.metadata = l.offsetBytes + (got.segTotal - got.payload) + l.permBytes;
  return out;
}

#endif  // __CUDACC__

}  // namespace packkv::packkv_gpu::enc
