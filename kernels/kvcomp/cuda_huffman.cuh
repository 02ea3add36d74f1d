// KVComp on the GPU, the per-thread pieces: the body layout read from the stream's 8-byte header,
// the canonical Huffman decode table built cooperatively from the 4-bit code lengths, and the
// bit reader that walks one vector (one thread per vector) out of a segment staged in shared
// memory. Everything here is __host__ __device__ and free of warp intrinsics but one, so a host program
// can run the same code (block phases as loops over thread ids) against cpu.cpp.
//
// Warp intrinsics: only PairReader::anyLane (__any_sync on the device, the lane's own flag on the
// host, which gives the same codes: see PairReader::next).
//
// Lookups: 32 lanes reading random entries of the 4096-entry table cost ~5 shared-memory
// wavefronts per code (bank conflicts, measured by emulating a warp over the bench's keys). A
// first-level table of the next n1 <= 8 bits, replicated once per lane so that lane l only ever
// reads bank l, resolves every code of at most n1 bits in one conflict-free wavefront; longer
// codes (3% of the warp-steps for K at k_rel=0.05) fall back to the full table. Measured on the
// H100 it is slower (more instructions per code, 16 KiB less room for blocks): the loop is bound
// by instructions, not by those conflicts, so it is off unless PACKKV_KVCOMP_T1 asks for it.
// The tensor-core products (second half of this file) use a 32-bit table and PairReader instead:
// 37 SASS instructions per 4-code step (9.25 per code), after which the table's bank conflicts
// (~5.5 wavefronts per warp lookup for K at k_rel=0.05, kvcomp_t1_emu) bound them: ncu on the
// H100 at 128k tokens, q·Kᵀ, shared-memory pipe 88% busy, 68% of its load wavefronts conflicts.
// The per-lane first level there (PairReader::next<.., FIRST>, a warp-uniform vote per pair for
// escapes) removes the conflicts (pipe 33%) but costs 14 more instructions per step; measured
// slower (K 162 vs 152 us, V 231 vs 170 us with an 8-bit level that takes V's third block per SM),
// so off by default too (PACKKV_KVCOMP_T1 / PACKKV_KVCOMP_T1V).
#pragma once
#include <cstdint>

#ifdef __CUDACC__
#include <cuda_fp16.h>
#endif

#ifdef __CUDACC__
#define KVC_HD __host__ __device__ __forceinline__
#else
#define KVC_HD inline
#endif

namespace packkv::kvcomp::gpu {

constexpr uint32_t kTableEntries = 4096;  // 2^kMaxCodeLength u16 entries: symbol << 4 | length
constexpr uint32_t kMaxAlphabet = 4096;

KVC_HD uint64_t alignUpD(uint64_t off, uint64_t to) { return (off + to - 1) / to * to; }

KVC_HD uint32_t bswap32(uint32_t x) {
#ifdef __CUDA_ARCH__
  return __byte_perm(x, 0, 0x0123);
#else
  return __builtin_bswap32(x);
#endif
}

/** Rounded-once fp32 of (code + zp) * scale: what cpu.cpp's dequant computes in double. */
KVC_HD float dequantExact(uint32_t code, int64_t zp, float scale) {
#ifdef __CUDA_ARCH__
  return __double2float_rn(__dmul_rn(double(int64_t(code) + zp), double(scale)));
#else
  return float(double(int64_t(code) + zp) * double(scale));
#endif
}

/** The data-dependent half of format.h's Layout, from the body's 8-byte header. */
struct DevLayout {
  uint32_t alphabet, zpBytes, maxLength, arenaBytes;
  uint64_t lengthsOff, scaleOff, zpOff, segOff, vecOff, arenaOff;
};

KVC_HD DevLayout layoutFromHeader(const uint8_t* body, uint32_t units, uint32_t segments, uint32_t vecsPerSeg) {
  DevLayout l;
  l.alphabet = uint32_t(body[0]) | uint32_t(body[1]) << 8;
  l.zpBytes = body[2];
  l.maxLength = body[3];
  l.arenaBytes = uint32_t(body[4]) | uint32_t(body[5]) << 8 | uint32_t(body[6]) << 16 | uint32_t(body[7]) << 24;
  if (l.zpBytes != 1 && l.zpBytes != 2 && l.zpBytes != 4) l.zpBytes = 1;  // corrupt: cpu.cpp rejects it
  l.lengthsOff = 8;
  l.scaleOff = alignUpD(l.lengthsOff + (l.alphabet + 1) / 2, 2);
  l.zpOff = alignUpD(l.scaleOff + 2ull * units, l.zpBytes);
  l.segOff = alignUpD(l.zpOff + uint64_t(l.zpBytes) * units, 4);
  l.vecOff = l.segOff + 4ull * segments;
  l.arenaOff = l.vecOff + 2ull * segments * vecsPerSeg;
  return l;
}

KVC_HD float halfBitsToFloat(uint16_t h) {
#ifdef __CUDA_ARCH__
  return __half2float(__ushort_as_half(h));
#else
  uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu, bits;
  if (exp == 0) {
    float f = float(man) * (1.0f / 16777216.0f);
    return sign ? -f : f;
  }
  bits = exp == 31 ? (sign | 0x7F800000u | (man << 13)) : (sign | ((exp + 112) << 23) | (man << 13));
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
#endif
}

/** The unit's zero point as loaded (1, 2 or 4 bytes, sign-extended by the load itself): the
 *  tensor-core kernels prefetch it a segment ahead and widen it where they use it. */
KVC_HD int32_t zeroPointRaw(const uint8_t* body, const DevLayout& l, uint32_t u) {
  const uint8_t* p = body + l.zpOff + uint64_t(l.zpBytes) * u;
  if (l.zpBytes == 1) return int8_t(p[0]);
  if (l.zpBytes == 2) return int16_t(*reinterpret_cast<const uint16_t*>(p));
  return int32_t(*reinterpret_cast<const uint32_t*>(p));
}

KVC_HD int64_t zeroPoint(const uint8_t* body, const DevLayout& l, uint32_t u) { return zeroPointRaw(body, l, u); }

KVC_HD uint16_t scaleBits(const uint8_t* body, const DevLayout& l, uint32_t u) {
  return *reinterpret_cast<const uint16_t*>(body + l.scaleOff + 2ull * u);
}

KVC_HD float scaleOf(const uint8_t* body, const DevLayout& l, uint32_t u) { return halfBitsToFloat(scaleBits(body, l, u)); }

// ---- the decode table, in five block phases (a __syncthreads() between phases) ----------------
// Canonical codes (huffman.h canonicalCodes): lengths ascending, then symbol; first[l] is the first
// code of length l, codes of length l are first[l] .. first[l] + count[l] - 1.

struct TableScratch {
  uint32_t count[16], offset[16], first[16];
  uint32_t complete;  // the codes of length <= L fill all 2^L entries (Kraft sum >= 1): no default entries needed
};

KVC_HD uint32_t popc32(uint32_t x) {
#ifdef __CUDA_ARCH__
  return __popc(x);
#else
  return uint32_t(__builtin_popcount(x));
#endif
}

/** How many of the first n (1..4) bytes of x equal l, every byte of x and l at most 15 (higher
 *  bytes may hold anything: the add below carries only upwards). */
KVC_HD uint32_t bytesEqual(uint32_t x, uint32_t l, uint32_t n) {
  const uint32_t d = x ^ (l * 0x01010101u);                      // zero bytes where equal
  const uint32_t nonzero = (d + 0x7F7F7F7Fu) & 0x80808080u;      // bytes <= 15: no carry between the first n
  const uint32_t keep = n >= 4 ? 0x80808080u : 0x80808080u & ((1u << (8 * n)) - 1u);
  return popc32(~nonzero & keep);
}

/** Word k of the lengths (bytes 4k..4k+3, little-endian), lens 4-byte aligned. */
KVC_HD uint32_t lensWord(const uint8_t* lens, uint32_t k) {
#ifdef __CUDA_ARCH__
  return reinterpret_cast<const uint32_t*>(lens)[k];
#else
  uint32_t x;
  __builtin_memcpy(&x, lens + 4 * k, 4);
  return x;
#endif
}

/** Phase 1, threads over symbols: the 4-bit lengths. lens must have room for the alphabet rounded
 *  up to 4 bytes (phases 2 and 4 read it a word at a time). */
KVC_HD void tableLengths(uint32_t tid, uint32_t threads, const uint8_t* body, uint32_t alphabet, uint8_t* lens) {
  for (uint32_t s = tid; s < alphabet; s += threads) lens[s] = (body[8 + s / 2] >> (4 * (s & 1))) & 15;
}
/** Phase 2, thread l in 1..12 counts the codes of length l, four lengths per 32-bit word (was a
 *  byte per step: a chain of `alphabet` dependent shared-memory loads per thread). */
KVC_HD void tableCount(uint32_t tid, const uint8_t* lens, uint32_t alphabet, TableScratch& ts) {
  if (tid >= 1 && tid <= 12) {
    uint32_t c = 0;
#ifdef __CUDA_ARCH__
#pragma unroll 4
#endif
    for (uint32_t k = 0; 4 * k < alphabet; ++k) c += bytesEqual(lensWord(lens, k), tid, alphabet - 4 * k);
    ts.count[tid] = c;
  }
}
/** Phase 3, thread 0: offsets into the sorted symbol list and first codes per length, and whether
 *  the codes of length <= L cover the whole 2^L-entry table. */
KVC_HD void tableOffsets(uint32_t tid, uint32_t L, TableScratch& ts) {
  if (tid != 0) return;
  uint32_t c[13];
  for (uint32_t l = 1; l <= 12; ++l) c[l] = ts.count[l];  // all loads before the dependent sums
  uint32_t off = 0, next = 0, kraft = 0;  // kraft: sum over l <= L of count[l] * 2^(12 - l)
  for (uint32_t l = 1; l <= 12; ++l) {
    ts.offset[l] = off;
    ts.first[l] = next;
    off += c[l];
    next = (next + c[l]) << 1;
    if (l <= L) kraft += c[l] << (12 - l);
  }
  ts.complete = kraft >= 4096u;
}
/** tableSort's serial form (above this alphabet the per-symbol ranks cost more than it). */
constexpr uint32_t kSortRanksUpTo = 1024;
/**
 * Phase 4: the symbols with lengths 1..12 listed by (length, symbol), each entry symbol | length
 * << 12 (symbols < 4096). Alphabets up to kSortRanksUpTo: threads over symbols, each finding its
 * rank among the earlier symbols of its length a word (four lengths) at a time; larger ones:
 * thread l in 1..12 walks the alphabet (was the only form: `alphabet` dependent steps).
 */
KVC_HD void tableSort(uint32_t tid, uint32_t threads, const uint8_t* lens, uint32_t alphabet, const TableScratch& ts,
                      uint16_t* sorted) {
  if (alphabet > kSortRanksUpTo) {
    if (tid >= 1 && tid <= 12) {
      uint32_t at = ts.offset[tid];
      for (uint32_t s = 0; s < alphabet; ++s)
        if (lens[s] == tid) sorted[at++] = uint16_t(s | tid << 12);
    }
    return;
  }
  for (uint32_t s = tid; s < alphabet; s += threads) {
    const uint32_t l = lens[s];
    if (l == 0 || l > 12) continue;
    uint32_t rank = 0;
#ifdef __CUDA_ARCH__
#pragma unroll 4
#endif
    for (uint32_t k = 0; k < s / 4; ++k) rank += bytesEqual(lensWord(lens, k), l, 4);
    if (s & 3) rank += bytesEqual(lensWord(lens, s / 4), l, s & 3);
    sorted[ts.offset[l] + rank] = uint16_t(s | l << 12);
  }
}
/** Phase 5, threads over the 2^L entries: the codeword that prefixes each L-bit window. */
KVC_HD void tableFill(uint32_t tid, uint32_t threads, uint32_t L, const TableScratch& ts, const uint16_t* sorted,
                      uint16_t* table) {
  for (uint32_t e = tid; e < (1u << L); e += threads) {
    uint16_t entry = 0;  // only an incomplete (corrupt) codebook leaves entries undefined
    for (uint32_t l = 1; l <= L; ++l) {
      const uint32_t prefix = e >> (L - l), k = prefix - ts.first[l];
      if (prefix >= ts.first[l] && k < ts.count[l]) {
        entry = uint16_t((uint32_t(sorted[ts.offset[l] + k] & 0xFFFu) << 4) | l);
        break;
      }
    }
    table[e] = entry;
  }
}
/**
 * Phase 6, threads over the words of the first-level table (after tableFill): the entry of the
 * n1-bit prefix i for lane l is u16 ((i >> 1) * 64 + 2 l + (i & 1)), i.e. in word (i >> 1) * 32 + l,
 * bank l; 0 where the code is longer than n1 bits. 2^n1 * 32 u16 entries (16 KiB at n1 = 8).
 */
KVC_HD void tableFirstLevel(uint32_t tid, uint32_t threads, uint32_t L, uint32_t n1, const uint16_t* table,
                            uint32_t* t1) {
  const uint32_t words = (1u << n1) / 2 * 32;
  for (uint32_t k = tid; k < words; k += threads) {
    const uint32_t pair = k >> 5;
    uint32_t word = 0;
    for (uint32_t h = 0; h < 2; ++h) {
      const uint16_t e = table[(2 * pair + h) << (L - n1)];
      if ((e & 15) <= n1) word |= uint32_t(e) << (16 * h);
    }
    t1[k] = word;
  }
}

/** Bits of the first-level table: min(L, n1max), at least 1. */
KVC_HD uint32_t firstLevelBits(uint32_t L, uint32_t n1max) { return L < n1max ? (L > 1 ? L : 1) : n1max; }

// ---- one vector ----------------------------------------------------------------------------------

/** The decode tables of a block, and this thread's lane (which bank of the first level it reads). */
struct Lookup {
  const uint16_t* table;  // full table, 2^L entries
  const uint16_t* t1;     // first level (tableFirstLevel), or nullptr: full table only
  uint32_t L, n1, lane2;  // lane2 = 2 * (lane & 31)
  bool paired = false;    // tensor-core path: table is tablePairFill's, t1 its first level of n1 bits
};

/** One code off the top of buf: its symbol and length (a raw w-bit field, or a table lookup). */
template <bool RAW, bool FIRST>
KVC_HD void nextCode(uint64_t& buf, uint32_t& nb, const Lookup& lk, uint32_t w, uint32_t& sym) {
  const uint32_t hi = uint32_t(buf >> 32);
  uint32_t len;
  if (RAW) {
    sym = hi >> (32 - w);
    len = w;
  } else if (FIRST) {
    const uint32_t i1 = hi >> (32 - lk.n1);
    uint32_t e = lk.t1[((i1 >> 1) << 6) | lk.lane2 | (i1 & 1)];
    if (e == 0) e = lk.table[hi >> (32 - lk.L)];  // a code longer than n1 bits
    sym = e >> 4;
    len = e & 15;
  } else {
    const uint32_t e = lk.table[hi >> (32 - lk.L)];
    sym = e >> 4;
    len = e & 15;
  }
  buf <<= len;
  nb -= len;
}

/**
 * Walks the n codes of one vector whose first bit is bit p of the staged words `st` (MSB-first
 * u32 words, big-endian order already applied). A 64-bit register holds the next 32..64 bits;
 * one table lookup per code (or a w-bit field in a raw segment). Codes come two at a time
 * between refills (two codes take at most 24 <= 32 bits), so the divergent refill branch runs
 * once per pair. sink(i, symbol) receives each code. Reads stay below capWords (garbage in, no
 * fault out).
 */
#ifdef __CUDACC__
#pragma nv_exec_check_disable
#endif
template <bool RAW, bool FIRST, typename Sink>
KVC_HD void walkVector(const uint32_t* st, uint32_t capWords, uint32_t p, uint32_t n, const Lookup& lk,
                       uint32_t w, Sink&& sink) {
  uint32_t i0 = p >> 5;
  if (i0 > capWords - 2) i0 = capWords - 2;
  const uint32_t sh = p & 31;
  uint64_t buf = ((uint64_t(st[i0]) << 32) | st[i0 + 1]) << sh;
  uint32_t nb = 64 - sh, nx = i0 + 2;  // nb >= 33: valid bits in buf
  uint32_t i = 0;
#ifdef __CUDA_ARCH__
#pragma unroll 2
#endif
  for (; i + 1 < n; i += 2) {
    uint32_t s0, s1;
    nextCode<RAW, FIRST>(buf, nb, lk, w, s0);
    nextCode<RAW, FIRST>(buf, nb, lk, w, s1);
    if (nb < 32) {
      buf |= uint64_t(st[nx < capWords ? nx : capWords - 1]) << (32 - nb);
      ++nx;
      nb += 32;
    }
    sink(i, s0);
    sink(i + 1, s1);
  }
  if (i < n) {
    uint32_t s0;
    nextCode<RAW, FIRST>(buf, nb, lk, w, s0);
    sink(i, s0);
  }
}


// ---- the tensor-core path (products, head_dim / v_block = 128, vectors per segment % 32 == 0) ----
// Fewer instructions per code: a 32-bit table entry holds both the code length (bits 0..4, the
// funnel shifts read only those) and the fp16 of (symbol - center) (bits 16..31), so two codes
// are decoded from one 32-bit window with no branch and no bit-buffer bookkeeping, their values
// packed into one half2 with one byte permute, and four codes of each lane go into one
// mma.m16n8k16 as a B column (see mmaRow / cOwner for the fragment mapping). The zero point
// enters once per vector ((zp + center) * sum q) for K and once per segment for V.

/** fp16 bits of the integer v, |v| <= 2048 (exact). */
KVC_HD uint32_t intToHalfBits(int32_t v) {
#ifdef __CUDA_ARCH__
  return __half_as_ushort(__int2half_rn(v));
#else
  if (v == 0) return 0;
  const uint32_t sign = v < 0 ? 0x8000u : 0u, a = uint32_t(v < 0 ? -v : v);
  uint32_t e = 0;
  while ((2u << e) <= a) ++e;  // 2^e <= a < 2^(e+1)
  const uint32_t man = e <= 10 ? (a << (10 - e)) & 0x3FFu : (a >> (e - 10)) & 0x3FFu;
  return sign | ((e + 15) << 10) | man;
#endif
}

/** The center subtracted from every symbol (exact fp16 values for any alphabet <= 4096). */
KVC_HD int32_t symbolCenter(uint32_t alphabet) { return int32_t(alphabet / 2); }

/** Phase 5a for the tensor-core path, only when !ts.complete (an incomplete, corrupt codebook): every
 *  entry "length 0", so the entries no code covers stay defined. A barrier before phase 5. */
KVC_HD void tableClear32(uint32_t tid, uint32_t threads, uint32_t L, int32_t center, uint32_t* table) {
  for (uint32_t e = tid; e < (1u << L); e += threads) table[e] = intToHalfBits(-center) << 16;
}
/**
 * Phase 5 for the tensor-core path: the same codewords as tableFill, as fp16(sym - center) << 16 |
 * len. Canonical codes of length l cover the consecutive entries (first[l] + k) << (L - l), 2^(L-l)
 * of them, so each code writes its own range: warps over the sorted codes, lanes over a range's
 * entries (threads a multiple of 32). Was a search over the lengths per entry (about a dozen
 * dependent shared-memory loads for each of a thread's 16 entries).
 */
KVC_HD void tableFill32(uint32_t tid, uint32_t threads, uint32_t L, const TableScratch& ts, const uint16_t* sorted,
                        int32_t center, uint32_t* table) {
  const uint32_t warps = threads / 32, lane = tid & 31, codes = ts.offset[L] + ts.count[L];
  for (uint32_t i = tid / 32; i < codes; i += warps) {
    const uint32_t e = sorted[i], l = e >> 12, code = ts.first[l] + i - ts.offset[l];
    if (code >= (1u << l)) continue;  // over-full (corrupt) codebook: the code lies outside the table
    const uint32_t start = code << (L - l), end = start + (1u << (L - l));
    const uint32_t entry = (intToHalfBits(int32_t(e & 0xFFFu) - center) << 16) | l;
    for (uint32_t k = start + lane; k < end; k += 32) table[k] = entry;
  }
}

/**
 * Tensor-core path with a first level (PACKKV_KVCOMP_T1 = n1): tableFirstLevel's per-lane layout
 * (entry of prefix i for lane l in word i * 32 + l, bank l: conflict-free) with 32-bit entries as
 * tableFill32's; 0 where the code is longer than n1 bits (then the u16 full table answers).
 * 2^n1 * 128 bytes.
 */
KVC_HD void tableFirstLevel32(uint32_t tid, uint32_t threads, uint32_t L, uint32_t n1, const uint16_t* table,
                              int32_t center, uint32_t* t1) {
  for (uint32_t k = tid; k < (32u << n1); k += threads) {
    const uint16_t e = table[(k >> 5) << (L - n1)];
    const uint32_t len = e & 15u;
    t1[k] = len != 0 && len <= n1 ? (intToHalfBits(int32_t(e >> 4) - center) << 16) | len : 0u;
  }
}

// ---- the pair table (tensor-core products, alphabets of at most kPairAlphabet symbols) ---------
// One lookup decodes two codes: entry e of the 4096-entry table is the 12-bit window e; its low
// half is fp16(s0 - center) with the length l0 in bits 0..4, its high half fp16(s1 - center)
// with l1 in bits 16..20 when the second code also fits in the 12 bits (l0 + l1 <= 12), else 0.
// fp16 of an integer |v| <= 64 has its low five mantissa bits zero, so the lengths ride in those
// bits and one AND (0xFFE0FFE0) leaves the half2 {s0, s1} that the mma takes. A 2^n1-entry first
// level holds the pairs that fit in n1 bits (most of them for K: codes of 1-3 bits), so a warp's
// lookups touch at most 2^n1 / 32 words per bank instead of random words of 4096: ~3.7 instead of
// ~22 wavefronts per warp and four codes for K at k_rel = 0.05 (kvcomp_t1_emu).
constexpr uint32_t kPairAlphabet = 128;  // symbols - center within [-64, 64]
constexpr uint32_t kPairBits = 12;       // the pair table's window
constexpr uint32_t kPairEntries = 1u << kPairBits;

/**
 * Phase 5b of the pair path (alphabet <= kPairAlphabet), after tableFill's u16 table `single` of
 * 2^L entries (symbol << 4 | length): the 4096 pair entries, two reads of `single` each.
 */
KVC_HD void tablePairFill(uint32_t tid, uint32_t threads, uint32_t L, const uint16_t* single, int32_t center,
                          uint32_t* table) {
  for (uint32_t e = tid; e < kPairEntries; e += threads) {
    const uint32_t u0 = single[e >> (kPairBits - L)], l0 = u0 & 15u;
    uint32_t entry = 0;  // 0: no code (an incomplete, corrupt codebook)
    if (l0) {
      entry = intToHalfBits(int32_t(u0 >> 4) - center) | l0;
      const uint32_t u1 = single[((e << l0) & (kPairEntries - 1)) >> (kPairBits - L)], l1 = u1 & 15u;
      if (l1 && l0 + l1 <= kPairBits) entry |= (intToHalfBits(int32_t(u1 >> 4) - center) | l1) << 16;
    }
    table[e] = entry;
  }
}

/**
 * Phase 6 of the pair path (after tablePairFill): the n1-bit first level. A pair that fits in n1
 * bits as is; else the first code alone (high half 0) when it fits; else 0 (the full table answers).
 */
KVC_HD void tablePairFirst(uint32_t tid, uint32_t threads, uint32_t n1, const uint32_t* table, uint32_t* t1) {
  for (uint32_t i = tid; i < (1u << n1); i += threads) {
    const uint32_t e = table[i << (kPairBits - n1)], l0 = e & 31u, l1 = (e >> 16) & 31u;
    t1[i] = l1 && l0 + l1 <= n1 ? e : l0 && l0 <= n1 ? (e & 0xFFFFu) : 0u;
  }
}

/** Upper 32 bits of (hi:lo) << (s mod 32) (shf.l.wrap). */
KVC_HD uint32_t funnelL(uint32_t lo, uint32_t hi, uint32_t s) {
#ifdef __CUDA_ARCH__
  return __funnelshift_l(lo, hi, s);
#else
  return uint32_t(((uint64_t(hi) << 32 | lo) << (s & 31)) >> 32);
#endif
}

/** Bytes 2,3 of a and 2,3 of b: the half2 {a.value, b.value}. */
KVC_HD uint32_t packHighHalves(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __byte_perm(a, b, 0x7632);
#else
  return (a >> 16) | (b & 0xFFFF0000u);
#endif
}

/**
 * Two codes starting at bit p of st (MSB-first words): one 32-bit window (two codes <= 24 bits),
 * two lookups, p advanced by both lengths; returns half2 {value0, value1}. Raw segments take
 * w-bit fields instead (w <= 12). shiftR = 32 - L.
 */
template <bool RAW>
KVC_HD uint32_t decodePair(const uint32_t* st, uint32_t& p, const uint32_t* table, uint32_t shiftR, uint32_t w,
                           int32_t center) {
  const uint32_t k = p >> 5;
  const uint32_t top = funnelL(st[k + 1], st[k], p);
  uint32_t e0, e1;
  if (RAW) {
    e0 = (intToHalfBits(int32_t(top >> (32 - w)) - center) << 16) | w;
    e1 = (intToHalfBits(int32_t((top << w) >> (32 - w)) - center) << 16) | w;
  } else {
    e0 = table[top >> shiftR];
    e1 = table[funnelL(0, top, e0) >> shiftR];
  }
  p += (e0 + e1) & 31;
  return packHighHalves(e0, e1);
}

/**
 * decodePair with the window kept in registers: w0 w1 w2 = st[p/32 ..], so the next pair's
 * window is a select (w0 w1 or w1 w2: two codes advance p by < 32 bits) and the word read for
 * the pair after next is off the dependency chain (one shared-memory latency less per pair).
 */
/** *ptr when p, else old: a predicated shared-memory load on the device (no branch), a plain select on the host. */
KVC_HD uint32_t loadIf(bool p, const uint32_t* ptr, uint32_t old) {
#ifdef __CUDA_ARCH__
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
  asm("{\n .reg .pred q;\n setp.ne.b32 q, %2, 0;\n @q ld.shared.u32 %0, [%1];\n}\n" : "+r"(old) : "r"(addr), "r"(uint32_t(p)));
  return old;
#else
  return p ? *ptr : old;
#endif
}

struct PairReader {
  uint32_t w0, w1, w2, p;
  KVC_HD void start(const uint32_t* st, uint32_t p0) {
    p = p0;
    w0 = st[p0 >> 5];
    w1 = st[(p0 >> 5) + 1];
    w2 = st[(p0 >> 5) + 2];
  }
  /**
   * FIRST: t1 = tableFirstLevel32 (shift1 = 32 - n1, this lane's bank), table = the u16 full table;
   * lookup() is the per-lane form (the emulator counts escapes with it), next() the warp form.
   */
  /** The u16 full table's entry for the window top, as a 32-bit entry (fp16 value << 16 | length). */
  static KVC_HD uint32_t fullEntry(uint32_t top, const uint32_t* table, uint32_t shiftR, int32_t center) {
    const uint32_t u = reinterpret_cast<const uint16_t*>(table)[top >> shiftR];
    return (intToHalfBits(int32_t(u >> 4) - center) << 16) | (u & 15u);
  }
  /** Whether any lane of the warp has b (a lane's own b on the host, which decodes lane by lane). */
  static KVC_HD bool anyLane(bool b) {
#ifdef __CUDA_ARCH__
    return __any_sync(0xffffffffu, b);
#else
    return b;
#endif
  }
  template <bool FIRST>
  static KVC_HD uint32_t lookup(uint32_t top, const uint32_t* table, uint32_t shiftR, int32_t center, const uint32_t* t1,
                                uint32_t shift1, uint32_t lane) {
    if (!FIRST) return table[top >> shiftR];
    uint32_t e = t1[((top >> shift1) << 5) | lane];
    if ((e & 31) == 0) {  // longer than n1 bits (rare): the u16 full table
      const uint32_t u = reinterpret_cast<const uint16_t*>(table)[top >> shiftR];
      e = (intToHalfBits(int32_t(u >> 4) - center) << 16) | (u & 15u);
    }
    return e;
  }
  /** Moves the window to bit pn (< p + 32): PRED reads the next word only where it moved (see next()). */
  template <bool PRED>
  KVC_HD void advance(const uint32_t* st, uint32_t pn) {
    const bool adv = (pn ^ p) >= 32u;
    w0 = adv ? w1 : w0;
    w1 = adv ? w2 : w1;
    if (!PRED || adv) w2 = st[(pn >> 5) + 2];
    p = pn;
  }
  /**
   * PRED: the next word is read only by lanes whose window advances (w2 = st[p/32 + 2] is the
   * same word otherwise): a warp's window load then costs the wavefronts of the few advancing
   * lanes (~1 lane in 8 for K at 2 bits per code) instead of all 32, whose words sit about one
   * vector (~8 words) apart, i.e. in ~4 banks.
   */
  template <bool RAW, bool FIRST = false, bool PRED = true>
  KVC_HD uint32_t next(const uint32_t* st, const uint32_t* table, uint32_t shiftR, uint32_t w, int32_t center,
                       const uint32_t* t1 = nullptr, uint32_t shift1 = 0, uint32_t lane = 0) {
    const uint32_t top = funnelL(w1, w0, p);
    uint32_t e0, e1;
    if (RAW) {
      e0 = (intToHalfBits(int32_t(top >> (32 - w)) - center) << 16) | w;
      e1 = (intToHalfBits(int32_t((top << w) >> (32 - w)) - center) << 16) | w;
    } else if (FIRST) {
      // Both codes from this lane's first level (conflict-free); if a lane of the warp meets a
      // code longer than n1 bits, the whole warp redoes the pair from the u16 full table: a
      // warp-uniform branch (no divergence, no reconvergence), taken for ~17% of K's pairs at
      // n1 = 6. The first-level entries equal the full table's, so lanes without an escape get
      // the same codes either way.
      e0 = t1[((top >> shift1) << 5) | lane];
      e1 = t1[((funnelL(0, top, e0) >> shift1) << 5) | lane];
      if (anyLane(((e0 & 31u) == 0u) | ((e1 & 31u) == 0u))) {
        e0 = fullEntry(top, table, shiftR, center);
        e1 = fullEntry(funnelL(0, top, e0), table, shiftR, center);
      }
    } else {
      e0 = table[top >> shiftR];
      e1 = table[funnelL(0, top, e0) >> shiftR];
    }
    advance<PRED>(st, p + ((e0 + e1) & 31));
    return packHighHalves(e0, e1);
  }
  /**
   * Two codes from the pair table (tablePairFill) through its first level t1 (tablePairFirst,
   * 32 - shift1 bits; t1 = table and shift1 = 20 without one): a second lookup only for the lanes
   * whose window misses the first level, a third only where the pair does not fit in 12 bits.
   * Returns the half2 {value0, value1}, as next().
   */
  template <bool PRED = true>
  KVC_HD uint32_t nextPaired(const uint32_t* st, const uint32_t* table, const uint32_t* t1, uint32_t shift1) {
    const uint32_t top = funnelL(w1, w0, p);
    uint32_t e = t1[top >> shift1];
    e = loadIf(e == 0u, table + (top >> (32 - kPairBits)), e);
    const uint32_t e2 = loadIf((e >> 16) == 0u, table + ((top << (e & 31u)) >> (32 - kPairBits)), 0u);
    e = (e >> 16) == 0u ? (e & 0xFFFFu) | (e2 << 16) : e;
    advance<PRED>(st, p + (e & 31u) + ((e >> 16) & 31u));
    return e & 0xFFE0FFE0u;
  }
};

// mma.m16n8k16 mapping. Lane l = 4g + r (g = l / 4, r = l % 4) holds B column g, rows k in
// {2r, 2r+1, 2r+8, 2r+9} = its own codes 4s..4s+3 of step s. Row m = 4j + r of A (tile mt covers
// rows 16 mt .. 16 mt + 15) holds head j's weights at those four k only, zero elsewhere, so
// C[4j + r][g] is lane (4g + r)'s own sum for head j: lanes never mix. A lane (g, t) carries a
// non-zero A fragment only when t == g % 4; its register i holds head mmaHead(mt, g, i) at codes
// 4s + mmaCode(i), 4s + mmaCode(i) + 1.
KVC_HD uint32_t mmaHead(uint32_t mt, uint32_t g, uint32_t i) { return 4 * mt + (g >> 2) + 2 * (i & 1); }
KVC_HD uint32_t mmaCode(uint32_t i) { return i & 2; }
/** C register i of lane l in tile mt: the head and the lane whose sum it is. */
KVC_HD uint32_t cHead(uint32_t mt, uint32_t lane, uint32_t i) { return 4 * mt + (lane >> 4) + 2 * (i >> 1); }
KVC_HD uint32_t cOwner(uint32_t lane, uint32_t i) { return 8 * (lane & 3) + 4 * (i & 1) + ((lane >> 2) & 3); }
/** Words of one step's A fragments in shared memory: 8 groups + 1 zero slot, 4 words each. */
constexpr uint32_t kFragStepWords = 9 * 4;
/**
 * The fragment slot lane l reads: a lane (g, t) carries weights only when t == g % 4, and mmaHead
 * depends on g only through g / 4, so the carriers of groups 0-3 all read slot 0 and those of
 * groups 4-7 slot 4 (the same 16 bytes: a broadcast); the others read the zero slot 8. Only slots 0
 * and 4 have to be filled.
 */
KVC_HD uint32_t fragSlot(uint32_t lane) { return (lane & 3) == ((lane >> 2) & 3) ? ((lane >> 4) & 1) * 4 : 8u; }
/**
 * The word of the A fragments (tiles of 32 steps) that holds code k's weight for head j, in half
 * k & 1: tile j / 4, step k / 4, slot 4·(j & 1), register (k & 2) | ((j & 3) >> 1), which is the
 * inverse of mmaHead / mmaCode on slots 0 and 4.
 */
KVC_HD uint32_t fragWordOf(uint32_t k, uint32_t j) {
  const uint32_t jj = j & 3;
  return (j >> 2) * (32 * kFragStepWords) + (k >> 2) * kFragStepWords + 16 * (jj & 1) + ((k & 2) | (jj >> 1));
}

}  // namespace packkv::kvcomp::gpu
