// KVComp encode on the GPU, byte for byte the body cpu.cpp writes (format.h), and its Breakdown.
//
// Passes (one launch each, all on the caller's stream; scratch from the stream-ordered allocator):
//   1 range   warp per row (head, token): min/max of every quantization unit as order-preserving
//             u32 keys (atomicMin/Max, exact, blind to fast-math flush-to-zero), and the first
//             element that is NaN, ±Inf or |x| > 65504 (cpu.cpp's input check).
//   2 units   thread per unit: cpu.cpp's Unit (fp16 step rounded up, power-of-two floor, zp) in
//             double, from the same operations in the same order.
//   3 codes   warp per coded row: code = rint(x / scale) - zp without a division (x·(1/scale),
//             then an exact fma residual fixes the rounding; the same integer as cpu.cpp's
//             double division, ties to even included), stored u16 in x order; a shared-memory
//             histogram (warp-aggregated with __match_any_sync) merged into 64-bit global bins;
//             the largest code.
//   host     the histogram (<= 4096 bins) comes back with the status word and the codebook is
//             built with huffman.h's package-merge itself: the O(alphabet) step, and the same
//             function guarantees the same tie rules; the host must wait here anyway, because the
//             body's layout (alphabet, zero-point width) depends on the data.
//   4 sizes   block per segment, thread per vector: the segment's codes are staged into shared
//             memory (odd word stride per vector: conflict-free), each vector's Huffman bits, the
//             segment total, the raw/Huffman choice (raw unless Huffman is smaller), the u16
//             vector table.
//   5 scan    one block: exclusive scan of the segment byte sizes -> segment table, arena size.
//   6 write   block per segment: exclusive scan of the vector bit counts gives each thread its
//             first bit; codes are appended MSB first into a 64-bit register and flushed as
//             32-bit big-endian words with atomicOr into a zeroed shared buffer (the words at a
//             vector's two ends are shared with its neighbours), then the bytes go to the arena.
//   7 tail    fp16 tail (round to nearest even) after the arena, whose size only the device knows.
// Everything per element or per vector is a __host__ __device__ helper below, so
// kernels/tools/kvcomp_encode_emu.cpp runs the same code on the host against cpu.cpp.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "kvcomp/format.h"
#include "kvcomp/huffman.h"

#include "common/bits.h"

#ifdef __CUDACC__
#define KVE_HD __host__ __device__ __forceinline__
#else
#define KVE_HD inline
#endif

namespace packkv::kvcomp::enc {

constexpr uint32_t kAlphabetLimit = 4096;
constexpr uint32_t kHalfMaxBits = 0x477FE000u;  // bits of 65504.f

using bits::bitsOf;
using bits::doubleOf;
using bits::floatOf;

/** Order-preserving u32 key of a float (NaN excluded): a < b  <=>  key(a) < key(b). */
KVE_HD uint32_t orderedKey(float f) {
  const uint32_t u = bitsOf(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
KVE_HD float keyValue(uint32_t k) { return floatOf((k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k); }

/** cpu.cpp rejects |x| > 65504; NaN and ±Inf fall in the same test. */
KVE_HD bool outOfRange(float x) { return (bitsOf(x) & 0x7FFFFFFFu) > kHalfMaxBits; }
KVE_HD bool nonFinite(float x) { return (bitsOf(x) & 0x7F800000u) == 0x7F800000u; }

/** double(f) exactly, subnormals included (a fast-math conversion may flush them). */
KVE_HD double exactDouble(float f) {
  const uint32_t u = bitsOf(f);
  if ((u & 0x7F800000u) != 0) return double(f);
  const double m = double(int32_t(u & 0x7FFFFFu)) * doubleOf(uint64_t(1023 - 149) << 52);  // * 2^-149, exact
  return (u & 0x80000000u) ? -m : m;
}

/** 2^e for -1022 <= e <= 1023. */
KVE_HD double pow2(int e) { return doubleOf(uint64_t(e + 1023) << 52); }

/** binary16 -> binary32, exact (finite inputs). */
KVE_HD float halfValue(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
  if (exp == 0) {
    const float f = float(man) * (1.0f / 16777216.0f);  // man * 2^-24: exact, a normal float
    return sign ? -f : f;
  }
  return floatOf(sign | ((exp + 112) << 23) | (man << 13));
}

/** binary32 -> binary16, round to nearest even, |f| <= 65504 (half.h's floatToHalf, integer only). */
KVE_HD uint16_t halfNearest(float f) {
  const uint32_t u = bitsOf(f), absu = u & 0x7FFFFFFFu;
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  if (absu >= 0x38800000u) {  // a normal half
    uint32_t half = ((absu >> 23) - 112) << 10 | ((absu & 0x7FFFFFu) >> 13);
    const uint32_t rest = absu & 0x1FFFu;
    if (rest > 0x1000u || (rest == 0x1000u && (half & 1u))) half += 1;
    return uint16_t(sign | half);
  }
  // subnormal half: |f| / 2^-24 rounded to nearest even
  const uint32_t e = absu >> 23;
  const uint32_t m = e ? ((absu & 0x7FFFFFu) | 0x800000u) : (absu & 0x7FFFFFu);
  const uint32_t shift = 126 - (e ? e : 1);  // |f| = m * 2^(e - 150) = m / 2^shift units of 2^-24
  if (shift >= 32) return sign;
  const uint32_t q = m >> shift, rest = m & ((1u << shift) - 1), halfway = 1u << (shift - 1);
  return uint16_t(sign | (q + ((rest > halfway || (rest == halfway && (q & 1u))) ? 1u : 0u)));
}

/** The smallest binary16 >= f, for 2^-24 <= f <= 65504 (half.h's floatToHalfUp there). */
KVE_HD uint16_t halfCeil(float f) {
  const uint32_t u = bitsOf(f);
  if (u >= 0x38800000u) {
    uint32_t half = ((u >> 23) - 112) << 10 | ((u & 0x7FFFFFu) >> 13);
    if (u & 0x1FFFu) half += 1;
    return uint16_t(half);
  }
  const uint32_t m = (u & 0x7FFFFFu) | 0x800000u, shift = 126 - (u >> 23);  // f >= 2^-24: a normal float
  return uint16_t((m >> shift) + ((m & ((1u << shift) - 1)) ? 1u : 0u));
}

/**
 * nearbyint(x / s) (round half to even) for x a float value and s > 0 a binary16 value, inv ~ 1/s:
 * q = x·inv is within a few ulps of x/s, so r = rint(q) is the answer or off by one; d = x - r·s
 * is exact in one fma (|d| ~ s, both terms on a grid of 2^min(ulp)), and its comparison with s/2
 * decides. Rounding the double quotient first (cpu.cpp) gives the same integer: x/s is never
 * within a double ulp of a half-integer without being one (its numerator lives on that grid).
 */
KVE_HD int64_t roundQuotient(double x, double s, double inv) {
#ifdef __CUDA_ARCH__
  double r = rint(__dmul_rn(x, inv));
  const double d = __fma_rn(-r, s, x);
#else
  double r = std::nearbyint(x * inv);
  const double d = std::fma(-r, s, x);
#endif
  const double half = 0.5 * s;
  const bool odd = (int64_t(r) & 1) != 0;
  if (d > half || (d == half && odd)) r += 1.0;
  else if (d < -half || (d == -half && odd)) r -= 1.0;
  return int64_t(r);
}

/** cpu.cpp's Unit: the fp16 step (rounded up, floored at a power of two) and the zero point. */
struct UnitParams {
  uint16_t scaleHalf;
  bool tooWide;  // the step exceeds 65504 (cpu.cpp fails)
  double scale, inv;
  int64_t zp;
};

KVE_HD UnitParams unitParams(float lo, float hi, double rel) {
  UnitParams p;
  const double dlo = exactDouble(lo), dhi = exactDouble(hi);
  const double alo = dlo < 0 ? -dlo : dlo, ahi = dhi < 0 ? -dhi : dhi;
  const double maxAbs = alo < ahi ? ahi : alo;
  const int exp = maxAbs == 0 ? 0 : int((bitsOf(maxAbs) >> 52) & 0x7FF) - 1022;  // frexp: maxAbs < 2^exp
  const double floorStep = pow2(exp - 24 > -24 ? exp - 24 : -24);
#ifdef __CUDA_ARCH__
  const double span = __dmul_rn(__dsub_rn(dhi, dlo), rel);
#else
  const double span = (dhi - dlo) * rel;
#endif
  double want = span < floorStep ? floorStep : span;
  p.tooWide = !(want <= 65504.0);
  if (p.tooWide) want = 65504.0;
#ifdef __CUDA_ARCH__
  const float wantF = __double2float_ru(want);
#else
  float wantF = float(want);
  if (double(wantF) < want) wantF = std::nextafter(wantF, INFINITY);
#endif
  p.scaleHalf = halfCeil(wantF);
  p.scale = double(halfValue(p.scaleHalf));
#ifdef __CUDA_ARCH__
  p.inv = __drcp_rn(p.scale);
#else
  p.inv = 1.0 / p.scale;
#endif
  p.zp = roundQuotient(dlo, p.scale, p.inv);
  return p;
}

KVE_HD uint32_t zpBytesOf(int64_t zp) { return zp == int8_t(zp) ? 1 : zp == int16_t(zp) ? 2 : 4; }

// ---- segments ---------------------------------------------------------------------------------
// A segment (token block b, KV head h) is one contiguous chunk of the x-order codes: rows
// t = b·block .. b·block + block - 1 of head h, dim codes each. Staged in shared memory as
// vecsPerSeg rows of symsPerVec u16 (K: row = token; V: row = channel, transposed), each row an
// odd number of 32-bit words so that thread v reading row v hits bank v mod 32.

KVE_HD uint32_t tileRowU16(uint32_t symsPerVec) { return 2 * (((symsPerVec + 1) / 2) | 1u); }

/** Tile slot of element e (x order: e = t·dim + d) of a segment's chunk. */
KVE_HD uint32_t tileSlot(bool key, uint32_t e, uint32_t dim, uint32_t rowU16) {
  const uint32_t t = e / dim, d = e - t * dim;
  return key ? t * rowU16 + d : d * rowU16 + t;
}

/** Huffman bits of one vector. */
KVE_HD uint32_t vectorBits(const uint16_t* row, uint32_t n, const uint8_t* lengths) {
  uint32_t bits = 0;
  for (uint32_t i = 0; i < n; ++i) bits += lengths[row[i]];
  return bits;
}

/**
 * Appends one vector's codes MSB first, starting at bit `bit` of the segment: orWord(k, w) ORs
 * 32-bit word k (bit 31 first). The first and last words may be shared with the neighbours.
 * book[c] = codeword << 4 | length; raw segments store c at w bits.
 */
#ifdef __CUDACC__
#pragma nv_exec_check_disable
#endif
template <typename OrWord>
KVE_HD void writeVector(const uint16_t* row, uint32_t n, uint32_t bit, const uint16_t* book, bool raw, uint32_t w,
                        OrWord&& orWord) {
  uint32_t word = bit >> 5, pending = bit & 31;  // `pending` leading zero bits stand for the word's earlier bits
  uint64_t acc = 0;
  for (uint32_t i = 0; i < n; ++i) {
    const uint32_t c = row[i];
    uint32_t code, len;
    if (raw) {
      code = c;
      len = w;
    } else {
      const uint32_t e = book[c];
      code = e >> 4;
      len = e & 15;
    }
    acc = (acc << len) | code;
    pending += len;
    if (pending >= 32) {
      pending -= 32;
      orWord(word++, uint32_t(acc >> pending));
      acc &= (uint64_t(1) << pending) - 1;
    }
  }
  if (pending) orWord(word, uint32_t(acc << (32 - pending)));
}

/** Byte k of a segment held as big-endian-ordered 32-bit words. */
KVE_HD uint8_t segmentByte(const uint32_t* words, uint32_t k) { return uint8_t(words[k >> 2] >> (24 - 8 * (k & 3))); }

// ---- host pieces (shared with the emulator) -----------------------------------------------------

/** The device's report after the code pass. */
struct Status {
  unsigned long long firstBad;  // first element index that is NaN, ±Inf or |x| > 65504 (~0: none)
  unsigned long long nonFinite; // NaN/Inf count
  long long maxCode;            // largest code (cpu.cpp starts at 0)
  unsigned long long arenaBytes;
  unsigned int badUnit;         // first unit whose step exceeds fp16 (~0: none)
  unsigned int negative;        // some code < 0
  unsigned int zpBytes;         // 1, 2 or 4
  unsigned int overflow;        // a segment starts at or past 2 GiB
};

inline Status initialStatus() {
  Status s{};
  s.firstBad = ~0ull;
  s.badUnit = ~0u;
  s.zpBytes = 1;
  return s;
}

/** The stream's codebook from the code histogram, as cpu.cpp's buildCodebook. */
struct Codebook {
  uint32_t alphabet = 0, maxLength = 0, rawBits = 0;
  std::vector<uint8_t> lengths;
  std::vector<uint16_t> book;  // codeword << 4 | length
};

/** alphabet = max(floor(1/rel) + 2, maxCode + 1); the caller checks it is <= 4096. */
inline uint32_t alphabetOf(double rel, int64_t maxCode) {
  const int64_t a = int64_t(std::floor(1.0 / rel)) + 2;
  return uint32_t(a > maxCode + 1 ? a : maxCode + 1);
}

inline Codebook codebookOf(const unsigned long long* histogram, uint32_t alphabet) {
  Codebook cb;
  cb.alphabet = alphabet;
  std::vector<uint64_t> weight(alphabet);
  for (uint32_t c = 0; c < alphabet; ++c) weight[c] = 1 + histogram[c];  // add-one smoothing
  cb.lengths = limitedCodeLengths(weight, kMaxCodeLength);
  for (uint8_t l : cb.lengths) cb.maxLength = l > cb.maxLength ? l : cb.maxLength;
  const std::vector<uint32_t> code = canonicalCodes(cb.lengths);
  cb.book.resize(alphabet);
  for (uint32_t c = 0; c < alphabet; ++c) cb.book[c] = uint16_t(code[c] << 4 | cb.lengths[c]);
  cb.rawBits = rawWidth(alphabet);
  return cb;
}

/** Body bytes [0, scaleOff): header (arena size left 0 for the scan pass), code lengths, padding. */
inline std::vector<uint8_t> bodyPrefix(const Layout& l, const Codebook& cb) {
  std::vector<uint8_t> out(l.scaleOff, 0);
  out[0] = uint8_t(l.alphabet & 0xFF);
  out[1] = uint8_t(l.alphabet >> 8);
  out[2] = uint8_t(l.zpBytes);
  out[3] = uint8_t(l.maxLength);
  for (uint32_t s = 0; s < cb.alphabet; ++s) out[l.lengthsOff + s / 2] |= uint8_t(cb.lengths[s] << (4 * (s & 1)));
  return out;
}

/** cpu.cpp's messages (its prefix, not the GPU one), so both paths read the same. */
[[noreturn]] inline void failLikeCpu(const std::string& m) { throw CodecError("codec 'kvcomp': " + m); }

inline void reportBadInput(const Status& st, float firstBadValue) {
  if (st.nonFinite)
    failLikeCpu(std::to_string(st.nonFinite) + " non-finite values (NaN/Inf) cannot be compressed");
  if (st.firstBad != ~0ull)
    failLikeCpu("value " + std::to_string(firstBadValue) +
                " is outside the fp16 range (|x| <= 65504) of its scales and tail");
}

inline void reportBadUnit(float lo, float hi) {
  failLikeCpu("a quantization unit spans [" + std::to_string(lo) + ", " + std::to_string(hi) +
              "]: its step exceeds the fp16 range of scales");
}

}  // namespace packkv::kvcomp::enc

// ---- the kernels and their host driver (cuda.cu's; a tool that links cuda.cu defines
// KVCOMP_ENCODE_NO_KERNELS to take the helpers only) ----------------------------------------------
#if defined(__CUDACC__) && !defined(KVCOMP_ENCODE_NO_KERNELS)
#include <cuda_runtime.h>

#include <algorithm>

#include "common/cuda_check.h"
#include "common/gpu_codec.h"

namespace packkv::kvcomp::enc {

/** Everything a pass needs: shape, scratch pointers and, after the codebook, the body layout. */
struct Plan {
  const float* x;
  uint8_t* body;
  uint32_t heads, T, dim, block, Tc, tailTokens, units, segments, vecsPerSeg, symsPerVec, histBins;
  bool key;
  double rel;
  uint32_t *loKey, *hiKey;
  uint16_t* scaleHalf;
  long long* zp;
  uint16_t* codes;  // x order over the coded tokens: [heads][Tc][dim]
  Status* status;
  unsigned long long* hist;  // [kAlphabetLimit], right after status
  uint32_t* segInfo;         // bytes | kRawSegmentFlag
  unsigned long long* segStart;
  uint16_t* book;
  uint8_t* lengths;
  uint32_t alphabet, rawBits, zpBytes, rowU16, tileBytes;
  uint64_t scaleOff, zpOff, segOff, vecOff, arenaOff;
};

constexpr uint32_t kRowBatch = 4;  // 32-float chunks of a row loaded together (head_dim 128: the whole row)

__global__ void rangeKernel(Plan p) {
  const uint32_t lane = threadIdx.x & 31;
  const uint64_t rows = uint64_t(p.heads) * p.T, warps = (uint64_t(gridDim.x) * blockDim.x) >> 5;
  for (uint64_t row = (uint64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; row < rows; row += warps) {
    const float* r = p.x + row * p.dim;
    uint32_t lo = ~0u, hi = 0;
    for (uint32_t d0 = lane; d0 < p.dim; d0 += 32 * kRowBatch) {
      float v[kRowBatch];  // a batch of loads in flight before the first use
#pragma unroll
      for (uint32_t j = 0; j < kRowBatch; ++j) v[j] = d0 + 32 * j < p.dim ? __ldg(r + d0 + 32 * j) : 0.f;
#pragma unroll
      for (uint32_t j = 0; j < kRowBatch; ++j) {
        const uint32_t d = d0 + 32 * j;
        if (d >= p.dim) continue;
        if (outOfRange(v[j])) {
          atomicMin(&p.status->firstBad, (unsigned long long)(row * p.dim + d));
          if (nonFinite(v[j])) atomicAdd(&p.status->nonFinite, 1ull);
          continue;
        }
        const uint32_t k = orderedKey(v[j]);
        lo = min(lo, k);
        hi = max(hi, k);
      }
    }
    lo = __reduce_min_sync(0xffffffffu, lo);
    hi = __reduce_max_sync(0xffffffffu, hi);
    const uint32_t t = uint32_t(row % p.T);
    if (lane == 0 && t < p.Tc) {
      const uint32_t u = p.key ? t / p.block : t;
      atomicMin(p.loKey + u, lo);
      atomicMax(p.hiKey + u, hi);
    }
  }
}

__global__ void unitKernel(Plan p) {
  const uint32_t u = blockIdx.x * blockDim.x + threadIdx.x;
  if (u >= p.units) return;
  const UnitParams q = unitParams(keyValue(p.loKey[u]), keyValue(p.hiKey[u]), p.rel);
  if (q.tooWide) atomicMin(&p.status->badUnit, u);
  p.scaleHalf[u] = q.scaleHalf;
  p.zp[u] = q.zp;
  const uint32_t need = zpBytesOf(q.zp);
  if (need > 1) atomicMax(&p.status->zpBytes, need);
}

__global__ void codeKernel(Plan p) {
  extern __shared__ uint32_t binCounts[];
  for (uint32_t b = threadIdx.x; b < p.histBins; b += blockDim.x) binCounts[b] = 0;
  __syncthreads();
  const uint32_t lane = threadIdx.x & 31;
  const uint64_t rows = uint64_t(p.heads) * p.Tc, warps = (uint64_t(gridDim.x) * blockDim.x) >> 5;
  long long maxCode = 0;
  bool negative = false;
  for (uint64_t row = (uint64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; row < rows; row += warps) {
    const uint32_t h = uint32_t(row / p.Tc), t = uint32_t(row - uint64_t(h) * p.Tc);
    const uint32_t u = p.key ? t / p.block : t;
    const double s = double(halfValue(p.scaleHalf[u])), inv = __drcp_rn(s);
    const long long zp = p.zp[u];
    const float* r = p.x + (uint64_t(h) * p.T + t) * p.dim;
    uint16_t* out = p.codes + row * p.dim;
    for (uint32_t b0 = 0; b0 < p.dim; b0 += 32 * kRowBatch) {
      float xv[kRowBatch];  // a batch of loads in flight before the first use
#pragma unroll
      for (uint32_t j = 0; j < kRowBatch; ++j) xv[j] = b0 + 32 * j + lane < p.dim ? __ldg(r + b0 + 32 * j + lane) : 0.f;
#pragma unroll
      for (uint32_t j = 0; j < kRowBatch; ++j) {
        const uint32_t d0 = b0 + 32 * j;
        if (d0 >= p.dim) break;  // warp-uniform
        const uint32_t d = d0 + lane;
        const bool on = d < p.dim;
        long long c = -1;
        if (on) {
          c = roundQuotient(exactDouble(xv[j]), s, inv) - zp;
          out[d] = uint16_t(c);
          maxCode = max(maxCode, c);
          negative |= c < 0;
        }
        const bool inBins = on && c >= 0 && c < p.histBins;
        const uint32_t peers = __match_any_sync(0xffffffffu, inBins ? uint32_t(c) : 0xFFFFFFFFu);
        if (inBins) {
          if (lane == uint32_t(__ffs(peers) - 1)) atomicAdd(binCounts + c, uint32_t(__popc(peers)));
        } else if (on && c >= p.histBins && c < kAlphabetLimit) {
          atomicAdd(p.hist + c, 1ull);
        }
      }
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) maxCode = max(maxCode, __shfl_xor_sync(0xffffffffu, maxCode, o));
  if (lane == 0) atomicMax(&p.status->maxCode, maxCode);
  if (__any_sync(0xffffffffu, negative) && lane == 0) atomicOr(&p.status->negative, 1u);
  __syncthreads();
  for (uint32_t b = threadIdx.x; b < p.histBins; b += blockDim.x)
    if (binCounts[b]) atomicAdd(p.hist + b, (unsigned long long)binCounts[b]);
}

/** Scales and zero points into the body (their offsets depend on the alphabet). */
__global__ void unitStoreKernel(Plan p) {
  const uint32_t u = blockIdx.x * blockDim.x + threadIdx.x;
  if (u >= p.units) return;
  *reinterpret_cast<uint16_t*>(p.body + p.scaleOff + 2ull * u) = p.scaleHalf[u];
  uint8_t* z = p.body + p.zpOff + uint64_t(p.zpBytes) * u;
  const long long zp = p.zp[u];
  if (p.zpBytes == 1) *reinterpret_cast<int8_t*>(z) = int8_t(zp);
  else if (p.zpBytes == 2) *reinterpret_cast<int16_t*>(z) = int16_t(zp);
  else *reinterpret_cast<int32_t*>(z) = int32_t(zp);
}

/** The segment's codes into tile rows (all threads of the block). */
__device__ __forceinline__ void stageTile(const Plan& p, uint32_t seg, uint16_t* tile) {
  const uint32_t b = seg / p.heads, h = seg - b * p.heads, perSeg = p.block * p.dim;
  const uint16_t* chunk = p.codes + (uint64_t(h) * p.Tc + uint64_t(b) * p.block) * p.dim;
  for (uint32_t e = threadIdx.x; e < perSeg; e += blockDim.x) tile[tileSlot(p.key, e, p.dim, p.rowU16)] = chunk[e];
}

__global__ void sizeKernel(Plan p) {
  extern __shared__ __align__(16) uint8_t encSmem[];
  __shared__ uint32_t total;
  uint16_t* tile = reinterpret_cast<uint16_t*>(encSmem);
  uint8_t* lens = encSmem + p.tileBytes;
  const uint32_t seg = blockIdx.x, v = threadIdx.x;
  stageTile(p, seg, tile);
  for (uint32_t c = threadIdx.x; c < p.alphabet; c += blockDim.x) lens[c] = p.lengths[c];
  if (threadIdx.x == 0) total = 0;
  __syncthreads();
  const uint32_t bits = v < p.vecsPerSeg ? vectorBits(tile + v * p.rowU16, p.symsPerVec, lens) : 0;
  const uint32_t warpBits = __reduce_add_sync(0xffffffffu, bits);
  if ((threadIdx.x & 31) == 0) atomicAdd(&total, warpBits);
  __syncthreads();
  const uint64_t rawBits = uint64_t(p.vecsPerSeg) * p.symsPerVec * p.rawBits;
  const bool raw = uint64_t(total) >= rawBits;
  uint16_t* vecTable = reinterpret_cast<uint16_t*>(p.body + p.vecOff);
  if (v < p.vecsPerSeg) vecTable[uint64_t(seg) * p.vecsPerSeg + v] = uint16_t(raw ? p.symsPerVec * p.rawBits : bits);
  if (threadIdx.x == 0)
    p.segInfo[seg] = (raw ? kRawSegmentFlag : 0u) | uint32_t(((raw ? rawBits : uint64_t(total)) + 7) / 8);
}

/** Segment byte offsets (exclusive scan, one block of 1024 threads), the segment table, the arena size. */
__global__ void __launch_bounds__(1024) scanKernel(Plan p) {
  __shared__ unsigned long long warpSums[32];
  __shared__ unsigned long long carry;
  const uint32_t lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  uint32_t* segTable = reinterpret_cast<uint32_t*>(p.body + p.segOff);
  for (uint32_t base = 0; base < p.segments; base += 1024) {
    const uint32_t i = base + threadIdx.x;
    const uint32_t info = i < p.segments ? p.segInfo[i] : 0u;
    const unsigned long long bytes = info & ~kRawSegmentFlag;
    unsigned long long inc = bytes;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const unsigned long long y = __shfl_up_sync(0xffffffffu, inc, o);
      if (lane >= uint32_t(o)) inc += y;
    }
    if (lane == 31) warpSums[warp] = inc;
    __syncthreads();
    if (warp == 0) {
      unsigned long long w = warpSums[lane];
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const unsigned long long y = __shfl_up_sync(0xffffffffu, w, o);
        if (lane >= uint32_t(o)) w += y;
      }
      warpSums[lane] = w;
    }
    __syncthreads();
    const unsigned long long start = carry + (warp ? warpSums[warp - 1] : 0ull) + inc - bytes;
    if (i < p.segments) {
      p.segStart[i] = start;
      segTable[i] = uint32_t(start) | (info & kRawSegmentFlag);
      if (start >= kRawSegmentFlag) p.status->overflow = 1;
    }
    __syncthreads();
    if (threadIdx.x == 0) carry += warpSums[31];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    p.status->arenaBytes = carry;
    *reinterpret_cast<uint32_t*>(p.body + 4) = uint32_t(carry);
  }
}

/** Exclusive scan over the block (blockDim a multiple of 32, at most 1024). */
__device__ __forceinline__ uint32_t blockExclusiveScan(uint32_t x, uint32_t* warpSums) {
  const uint32_t lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  uint32_t inc = x;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const uint32_t y = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= uint32_t(o)) inc += y;
  }
  if (lane == 31) warpSums[warp] = inc;
  __syncthreads();
  if (warp == 0) {
    uint32_t w = lane < warps ? warpSums[lane] : 0u;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const uint32_t y = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= uint32_t(o)) w += y;
    }
    warpSums[lane] = w;
  }
  __syncthreads();
  return inc - x + (warp ? warpSums[warp - 1] : 0u);
}

__global__ void writeKernel(Plan p) {
  extern __shared__ __align__(16) uint8_t encSmem[];
  __shared__ uint32_t warpSums[32];
  uint16_t* tile = reinterpret_cast<uint16_t*>(encSmem);
  uint16_t* book = reinterpret_cast<uint16_t*>(encSmem + p.tileBytes);
  uint32_t* words = reinterpret_cast<uint32_t*>(encSmem + p.tileBytes + (2 * p.alphabet + 3) / 4 * 4);
  const uint32_t seg = blockIdx.x, v = threadIdx.x;
  stageTile(p, seg, tile);
  const uint32_t info = p.segInfo[seg], bytes = info & ~kRawSegmentFlag;
  const bool raw = (info & kRawSegmentFlag) != 0;
  if (!raw)
    for (uint32_t c = threadIdx.x; c < p.alphabet; c += blockDim.x) book[c] = p.book[c];
  for (uint32_t k = threadIdx.x; k < (bytes + 3) / 4; k += blockDim.x) words[k] = 0;
  const uint16_t* vecTable = reinterpret_cast<const uint16_t*>(p.body + p.vecOff);
  const uint32_t vb = v < p.vecsPerSeg ? vecTable[uint64_t(seg) * p.vecsPerSeg + v] : 0u;
  const uint32_t bit = blockExclusiveScan(vb, warpSums);  // its barriers also publish tile, book, words
  if (v < p.vecsPerSeg)
    writeVector(tile + v * p.rowU16, p.symsPerVec, bit, book, raw, p.rawBits,
                [&](uint32_t k, uint32_t w) { atomicOr(words + k, w); });
  __syncthreads();
  uint8_t* dst = p.body + p.arenaOff + p.segStart[seg];
  for (uint32_t k = threadIdx.x; k < bytes; k += blockDim.x) dst[k] = segmentByte(words, k);
}

/** The fp16 tail after the arena (and the pad byte before it), whose offset only the device knows. */
__global__ void tailKernel(Plan p) {
  const uint64_t arenaEnd = p.arenaOff + p.status->arenaBytes, tailOff = (arenaEnd + 1) / 2 * 2;
  if (blockIdx.x == 0 && threadIdx.x == 0 && tailOff > arenaEnd) p.body[arenaEnd] = 0;
  uint16_t* tail = reinterpret_cast<uint16_t*>(p.body + tailOff);
  const uint64_t per = uint64_t(p.tailTokens) * p.dim, n = per * p.heads;
  for (uint64_t idx = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < n; idx += uint64_t(gridDim.x) * blockDim.x) {
    const uint64_t h = idx / per, rest = idx - h * per;
    tail[idx] = halfNearest(__ldg(p.x + (h * p.T + p.Tc) * p.dim + rest));
  }
}

[[noreturn]] inline void failOnGpu(const std::string& m) { throw CodecError("codec 'kvcomp' on the GPU: " + m); }

template <typename Kernel>
void allowSmem(Kernel kernel, size_t smem, const char* what) {
  if (smem > 227 * 1024)
    failOnGpu(std::string(what) + " needs " + std::to_string(smem) + " bytes of shared memory per segment (at most 227 KiB)");
  if (smem > 48 * 1024) PACKKV_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
}

/** Scratch from the stream-ordered pool, handed back on every exit. */
struct Scratch {
  void* ptr = nullptr;
  cudaStream_t stream;
  Scratch(size_t bytes, cudaStream_t s) : stream(s) { PACKKV_CUDA_CHECK(cudaMallocAsync(&ptr, bytes, s)); }
  ~Scratch() {
    if (ptr) cudaFreeAsync(ptr, stream);
  }
};

/** x f32 [heads][T][dim] (device) -> the CPU encoder's body at `body` (device). Synchronizes. */
inline Breakdown encodeOnDevice(const float* x, const Shape& s, TensorKind kind, double rel, const Geometry& g,
                                uint8_t* body, cudaStream_t stream) {
  Plan p{};
  p.x = x;
  p.body = body;
  p.heads = s.heads, p.T = s.tokens, p.dim = s.dim, p.block = g.block, p.Tc = g.codedTokens;
  p.tailTokens = g.tailTokens, p.units = g.units, p.segments = g.segments;
  p.vecsPerSeg = g.vecsPerSeg, p.symsPerVec = g.symsPerVec;
  p.key = kind == TensorKind::Key;
  p.rel = rel;
  p.histBins = uint32_t(std::min<int64_t>(kAlphabetLimit, int64_t(std::floor(1.0 / rel)) + 2));
  const uint32_t segThreads = (g.vecsPerSeg + 31) / 32 * 32;
  if (g.segments && segThreads > 1024)
    failOnGpu("vectors per segment = " + std::string(p.key ? "k_block" : "head_dim") + " = " +
              std::to_string(g.vecsPerSeg) + " is above 1024");

  // Scratch: one allocation, 16-byte aligned pieces.
  const uint64_t coded = uint64_t(s.heads) * g.codedTokens * s.dim;
  size_t off = 0;
  auto piece = [&](size_t bytes) { size_t at = off; off += (bytes + 15) / 16 * 16; return at; };
  const size_t statusAt = piece(sizeof(Status)), histAt = piece(8ull * kAlphabetLimit);
  const size_t loAt = piece(4ull * g.units), hiAt = piece(4ull * g.units), scaleAt = piece(2ull * g.units);
  const size_t zpAt = piece(8ull * g.units), codesAt = piece(2 * coded), segInfoAt = piece(4ull * g.segments);
  const size_t segStartAt = piece(8ull * g.segments), bookAt = piece(2ull * kAlphabetLimit), lenAt = piece(kAlphabetLimit);
  Scratch scratch(off, stream);
  uint8_t* base = static_cast<uint8_t*>(scratch.ptr);
  p.status = reinterpret_cast<Status*>(base + statusAt);
  p.hist = reinterpret_cast<unsigned long long*>(base + histAt);
  p.loKey = reinterpret_cast<uint32_t*>(base + loAt);
  p.hiKey = reinterpret_cast<uint32_t*>(base + hiAt);
  p.scaleHalf = reinterpret_cast<uint16_t*>(base + scaleAt);
  p.zp = reinterpret_cast<long long*>(base + zpAt);
  p.codes = reinterpret_cast<uint16_t*>(base + codesAt);
  p.segInfo = reinterpret_cast<uint32_t*>(base + segInfoAt);
  p.segStart = reinterpret_cast<unsigned long long*>(base + segStartAt);
  p.book = reinterpret_cast<uint16_t*>(base + bookAt);
  p.lengths = base + lenAt;

  const Status init = initialStatus();
  PACKKV_CUDA_CHECK(cudaMemcpyAsync(p.status, &init, sizeof(Status), cudaMemcpyHostToDevice, stream));
  PACKKV_CUDA_CHECK(cudaMemsetAsync(p.hist, 0, 8ull * kAlphabetLimit, stream));
  if (g.units) {
    PACKKV_CUDA_CHECK(cudaMemsetAsync(p.loKey, 0xFF, 4ull * g.units, stream));
    PACKKV_CUDA_CHECK(cudaMemsetAsync(p.hiKey, 0, 4ull * g.units, stream));
  }
  const uint32_t sms = uint32_t(gpu::multiprocessors());
  const uint64_t rows = uint64_t(s.heads) * s.tokens;
  rangeKernel<<<unsigned(std::min<uint64_t>((rows + 7) / 8, uint64_t(sms) * 16)), 256, 0, stream>>>(p);
  PACKKV_LAUNCH_CHECK();
  if (g.segments) {
    unitKernel<<<(g.units + 255) / 256, 256, 0, stream>>>(p);
    PACKKV_LAUNCH_CHECK();
    const uint64_t codedRows = uint64_t(s.heads) * g.codedTokens;
    codeKernel<<<unsigned(std::min<uint64_t>((codedRows + 7) / 8, uint64_t(sms) * 8)), 256, 4 * p.histBins, stream>>>(p);
    PACKKV_LAUNCH_CHECK();
  }
  // The host's one look at the data: errors, zero-point width, histogram -> codebook.
  std::vector<uint8_t> report(histAt + 8ull * kAlphabetLimit);
  PACKKV_CUDA_CHECK(cudaMemcpyAsync(report.data(), base, report.size(), cudaMemcpyDeviceToHost, stream));
  PACKKV_CUDA_CHECK(cudaStreamSynchronize(stream));
  Status st;
  std::memcpy(&st, report.data() + statusAt, sizeof(Status));
  if (st.nonFinite || st.firstBad != ~0ull) {
    float value = 0;
    PACKKV_CUDA_CHECK(cudaMemcpy(&value, x + st.firstBad, 4, cudaMemcpyDeviceToHost));
    reportBadInput(st, value);
  }
  if (st.badUnit != ~0u) {
    uint32_t lo = 0, hi = 0;
    PACKKV_CUDA_CHECK(cudaMemcpy(&lo, p.loKey + st.badUnit, 4, cudaMemcpyDeviceToHost));
    PACKKV_CUDA_CHECK(cudaMemcpy(&hi, p.hiKey + st.badUnit, 4, cudaMemcpyDeviceToHost));
    reportBadUnit(keyValue(lo), keyValue(hi));
  }
  Codebook cb;
  if (g.segments) {
    if (st.negative) failLikeCpu("internal: negative code");
    const uint32_t alphabet = alphabetOf(rel, st.maxCode);
    if (alphabet > kAlphabetLimit) failLikeCpu("internal: alphabet of " + std::to_string(alphabet) + " codes exceeds 4096");
    std::vector<unsigned long long> hist(kAlphabetLimit);
    std::memcpy(hist.data(), report.data() + histAt, 8ull * kAlphabetLimit);
    cb = codebookOf(hist.data(), alphabet);
  }
  p.zpBytes = st.zpBytes;
  const Layout lay = layoutOf(g, cb.alphabet, p.zpBytes, cb.maxLength, 0);
  p.alphabet = cb.alphabet, p.rawBits = cb.rawBits;
  p.scaleOff = lay.scaleOff, p.zpOff = lay.zpOff, p.segOff = lay.segOff, p.vecOff = lay.vecOff, p.arenaOff = lay.arenaOff;
  p.rowU16 = tileRowU16(g.symsPerVec);
  p.tileBytes = uint32_t(uint64_t(g.vecsPerSeg) * p.rowU16 * 2);

  const std::vector<uint8_t> prefix = bodyPrefix(lay, cb);
  PACKKV_CUDA_CHECK(cudaMemcpyAsync(body, prefix.data(), prefix.size(), cudaMemcpyHostToDevice, stream));
  if (lay.segOff > lay.scaleOff) PACKKV_CUDA_CHECK(cudaMemsetAsync(body + lay.scaleOff, 0, lay.segOff - lay.scaleOff, stream));
  if (g.segments) {
    PACKKV_CUDA_CHECK(cudaMemcpyAsync(p.book, cb.book.data(), 2ull * cb.alphabet, cudaMemcpyHostToDevice, stream));
    PACKKV_CUDA_CHECK(cudaMemcpyAsync(p.lengths, cb.lengths.data(), cb.alphabet, cudaMemcpyHostToDevice, stream));
    unitStoreKernel<<<(g.units + 255) / 256, 256, 0, stream>>>(p);
    PACKKV_LAUNCH_CHECK();
    const size_t sizeSmem = p.tileBytes + (cb.alphabet + 15) / 16 * 16;
    allowSmem(sizeKernel, sizeSmem, "encode");
    sizeKernel<<<g.segments, segThreads, sizeSmem, stream>>>(p);
    PACKKV_LAUNCH_CHECK();
    scanKernel<<<1, 1024, 0, stream>>>(p);
    PACKKV_LAUNCH_CHECK();
    const uint64_t maxSegBytes = (uint64_t(g.vecsPerSeg) * g.symsPerVec * cb.rawBits + 7) / 8;
    const size_t writeSmem = p.tileBytes + (2ull * cb.alphabet + 3) / 4 * 4 + (maxSegBytes + 3) / 4 * 4;
    allowSmem(writeKernel, writeSmem, "encode");
    writeKernel<<<g.segments, segThreads, writeSmem, stream>>>(p);
    PACKKV_LAUNCH_CHECK();
  }
  const uint64_t tailElems = uint64_t(s.heads) * g.tailTokens * s.dim;
  tailKernel<<<unsigned(std::max<uint64_t>(1, std::min<uint64_t>((tailElems + 255) / 256, uint64_t(sms) * 8))), 256, 0,
               stream>>>(p);
  PACKKV_LAUNCH_CHECK();
  PACKKV_CUDA_CHECK(cudaMemcpyAsync(&st, p.status, sizeof(Status), cudaMemcpyDeviceToHost, stream));
  PACKKV_CUDA_CHECK(cudaStreamSynchronize(stream));
  if (st.overflow) failLikeCpu("a tensor's coded bytes exceed 2 GiB; split it");
  return layoutOf(g, cb.alphabet, p.zpBytes, cb.maxLength, st.arenaBytes).breakdown;
}

}  // namespace packkv::kvcomp::enc
#endif  // __CUDACC__ && !KVCOMP_ENCODE_NO_KERNELS
