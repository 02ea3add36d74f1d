// KVComp: error-bounded uniform quantization with a relative step, then canonical Huffman coding
// of the integers (../shared/specs/kvcomp.md). K: one (scale, zero point) per k_block-token block
// over all heads and channels; V: one per token over all heads and channels. The newest tokens
// stay fp16 (spec §1.3): Tc = max(0, T - (T mod blk) - (recent - blk)) tokens are coded.
//
// A stream has one codebook. Codes are cut into segments, one per (token block, KV head):
//   K segment (k_block b, head h): k_block vectors (tokens), each head_dim codes (channels)
//   V segment (v_block b, head h): head_dim vectors (channels), each v_block codes (tokens)
// segment index = b * heads + h. Each segment is either Huffman coded or, when that would not be
// smaller, raw: every code at w = ceil(log2 A) bits. Bits are MSB first; a segment's vectors
// follow each other bit-contiguously and the segment is zero-padded to a byte.
//
// Body (little endian; "pad" aligns the next section and counts as metadata):
//   off 0   u16 A = alphabet size (codes 0..A-1)     u8 zero-point bytes z (1, 2 or 4)
//       3   u8 longest code length L (<= 12)         u32 arena bytes
//       8   code lengths, 4 bits per symbol (symbol 2i in the low nibble)   ceil(A/2) B   metadata
//           pad to 2 | scale  f16 [U]                                                       scales
//           pad to z | zero point int{8,16,32} [U]   (x̂ = (code + zp) * scale)              zeros
//           pad to 4 | segment table u32 [S]: arena byte offset | 0x80000000 if raw         metadata
//                      vector table  u16 [S * vecsPerSeg]: bits of each vector               metadata
//                      arena: the segments' bit streams                                     payload
//           pad to 2 | tail f16 [heads][T - Tc][head_dim]                                   residual
//   U = Tc / k_block (K) or Tc (V) quantization units, S = (Tc / block) * heads segments.
//
// Bytes per element (n = heads * Tc * head_dim coded elements, H̄ = average code length):
//   K: n * H̄/8 + 16/head_dim * n/8 (vector table) + (2 + z) * Tc/k_block + 4 * S + ceil(A/2) + 8
//   V: n * H̄/8 + 16/v_block  * n/8 (vector table) + (2 + z) * Tc         + 4 * S + ceil(A/2) + 8
//   plus 2 bytes per tail element and at most 7 padding bytes. Raw segments cost w bits per code.
//   At head_dim = v_block = 128 the per-vector table adds 0.125 bits per element, as in the spec.
#pragma once
#include <cstdint>

#include "codec.h"

namespace packkv::kvcomp {

constexpr uint32_t kMaxCodeLength = 12;  // 4096-entry one-step decode table (8 KiB of u16)
constexpr uint32_t kBodyHeaderBytes = 8;
constexpr uint32_t kRawSegmentFlag = 0x80000000u;

inline uint64_t alignUp(uint64_t off, uint64_t to) { return (off + to - 1) / to * to; }

/** Bits of a raw code: ceil(log2 A), at least 1. */
inline uint32_t rawWidth(uint32_t alphabet) {
  uint32_t w = 1;
  while ((1u << w) < alphabet) ++w;
  return w;
}

/** What the shape and parameters fix, before any data is seen. */
struct Geometry {
  uint32_t heads, dim;
  uint32_t block, recent;       // the tensor kind's block and recent window
  uint32_t codedTokens;         // Tc, a multiple of block
  uint32_t tailTokens;          // T - Tc, kept fp16
  uint32_t blocks;              // Tc / block
  uint32_t units;               // quantization units (scale + zero point each)
  uint32_t segments;            // blocks * heads
  uint32_t vecsPerSeg, symsPerVec;
};

inline Geometry geometryOf(const Shape& s, TensorKind kind, uint32_t block, uint32_t recent) {
  Geometry g{};
  g.heads = s.heads;
  g.dim = s.dim;
  g.block = block;
  g.recent = recent;
  uint32_t full = s.tokens - s.tokens % block;  // tokens in whole blocks
  uint32_t keep = recent - block;               // whole blocks the recent window keeps back
  g.codedTokens = full > keep ? full - keep : 0;
  g.tailTokens = s.tokens - g.codedTokens;
  g.blocks = g.codedTokens / block;
  g.segments = g.blocks * s.heads;
  if (kind == TensorKind::Key) {
    g.units = g.blocks;
    g.vecsPerSeg = block;
    g.symsPerVec = s.dim;
  } else {
    g.units = g.codedTokens;
    g.vecsPerSeg = s.dim;
    g.symsPerVec = block;
  }
  return g;
}

/** Section offsets of a body, given the four data-dependent fields of its 8-byte header. */
struct Layout : Geometry {
  uint32_t alphabet, zpBytes, maxLength;
  uint64_t arenaBytes;
  uint64_t lengthsOff, scaleOff, zpOff, segOff, vecOff, arenaOff, tailOff, total;
  Breakdown breakdown;
};

inline Layout layoutOf(const Geometry& g, uint32_t alphabet, uint32_t zpBytes, uint32_t maxLength,
                       uint64_t arenaBytes) {
  Layout l{};
  static_cast<Geometry&>(l) = g;
  l.alphabet = alphabet;
  l.zpBytes = zpBytes;
  l.maxLength = maxLength;
  l.arenaBytes = arenaBytes;
  uint64_t vectors = uint64_t(g.segments) * g.vecsPerSeg;
  l.lengthsOff = kBodyHeaderBytes;
  l.scaleOff = alignUp(l.lengthsOff + (alphabet + 1) / 2, 2);
  l.zpOff = alignUp(l.scaleOff + 2ull * g.units, zpBytes);
  l.segOff = alignUp(l.zpOff + uint64_t(zpBytes) * g.units, 4);
  l.vecOff = l.segOff + 4ull * g.segments;
  l.arenaOff = l.vecOff + 2 * vectors;
  l.tailOff = alignUp(l.arenaOff + arenaBytes, 2);
  l.total = l.tailOff + 2ull * g.heads * g.tailTokens * g.dim;
  Breakdown& b = l.breakdown;
  b.payload = arenaBytes;
  b.scales = 2ull * g.units;
  b.zeros = uint64_t(zpBytes) * g.units;
  b.residual = l.total - l.tailOff;
  b.metadata = l.total - b.payload - b.scales - b.zeros - b.residual;  // header, tables, padding
  return l;
}

}  // namespace packkv::kvcomp
