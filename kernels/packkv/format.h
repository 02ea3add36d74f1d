// PackKV stream layout (../shared/specs/packkv.md): per-token error-bounded quantization, token
// repacking inside blocks, packs of P codes bit-packed at each pack's own width.
//
// T tokens, H heads, D = head_dim, B = block, P = pack, R = buffer, G = B/P packs per channel.
// Compressed tokens Tc = nb·B, the oldest ones, with
//   nb = max(0, floor((T + B − T mod B − R) / B))           (spec §1, whole dump appended)
// so the recent fp16 buffer keeps Tr = T − Tc tokens (R − B ≤ Tr < R once T ≥ R, all of them below).
// "Stored order": inside a block, tokens in the order the repack permutation put them.
//
// body (little-endian, no padding):
//   scale   f16 [Tc]               per compressed token (all heads and channels), stored order
//   zero    i32 [Tc]               zp=int: integer zero point, x̂ = (code + zp)·scale
//        or f16 [Tc]               zp=hp:  lo rounded down,    x̂ = code·scale + lo
//   offset  u32 [nb][H]            byte offset of segment (b, h) from the first segment
//   segment [nb][H]:
//     u8     mw                    bits per pack minimum in this segment
//     width  4 bits [G][D]         pack widths w, low nibble first (ceil(G·D/2) bytes)
//     min    mw bits [G][D]        pack minimum codes m, LSB first (ceil(G·D·mw/8) bytes)
//     pack   [G][D]                P codes − m at w bits each, value k at bit k·w (P·w/8 bytes)
//   perm    [nb][ceil(B·pb/8)]     repack≠none: stored slot j -> token j' of the block, pb = ceil(log2 B)
//   buffer  f16 [H][Tr][D]         the recent tokens, raw
// A pack is P consecutive stored tokens of one (block, head, channel); pack (g, c) is the
// g·D + c-th of its segment, so the lanes of a warp read consecutive channels of one token group.
//
// Bits per compressed element (w̄ mean pack width, mw̄ mean min width, z = 4 int | 2 hp bytes):
//   w̄ + (4 + mw̄)/P + (16 + 8z + pb)/(H·D) + 40/(B·D)       (+ < 16/(B·D) of byte rounding)
// At B=64, P=16, H=2, D=128, zp=int: w̄ + (4 + mw̄)/16 + 0.19 (+0.023 with repack); buffer tokens: 16.
#pragma once
#include <cstdint>
#include <vector>

#include "codec.h"

namespace packkv::packkv_codec {

enum class Repack : uint8_t { None, Greedy, Median };

/** The parameters of one stream, for the tensor kind it holds. */
struct Config {
  double rel;  // k_rel for K, v_rel for V
  uint32_t block, buffer, pack;
  Repack repack;
  bool hpZero;  // zp=hp: fp16 lo instead of an int32 zero point
};

/** Section sizes fixed by shape and parameters; the segments' size depends on the widths. */
struct Layout {
  uint32_t blocks, compressedTokens, bufferTokens;  // nb, Tc, Tr
  uint32_t packsPerChannel, packsPerSegment;       // G, G·D
  uint32_t zeroSize, permBits;                     // z, pb (0 when repack=none)
  uint64_t scaleOff, zeroOff, offsetOff, segmentsOff;
  uint64_t scaleBytes, zeroBytes, offsetBytes, permBlockBytes, permBytes, bufferBytes;
  /** Every byte except the segments: body bytes = fixedBytes + segments. */
  uint64_t fixedBytes() const { return segmentsOff + permBytes + bufferBytes; }
};

/** Bits needed to hold v: ceil(log2(v + 1)), 0 for 0. */
inline uint32_t bitLength(uint32_t v) { return v ? 32u - uint32_t(__builtin_clz(v)) : 0u; }

inline uint32_t compressedBlocks(uint32_t tokens, uint32_t block, uint32_t buffer) {
  int64_t moved = int64_t(tokens) + block - tokens % block - buffer;  // < 0 for short dumps
  return moved > 0 ? uint32_t(moved / block) : 0u;
}

inline Layout layoutOf(const Shape& s, const Config& c) {
  Layout l{};
  l.blocks = compressedBlocks(s.tokens, c.block, c.buffer);
  l.compressedTokens = l.blocks * c.block;
  l.bufferTokens = s.tokens - l.compressedTokens;
  l.packsPerChannel = c.block / c.pack;
  l.packsPerSegment = l.packsPerChannel * s.dim;
  l.zeroSize = c.hpZero ? 2 : 4;
  l.permBits = c.repack == Repack::None ? 0 : bitLength(c.block - 1);
  l.scaleBytes = uint64_t(l.compressedTokens) * 2;
  l.zeroBytes = uint64_t(l.compressedTokens) * l.zeroSize;
  l.offsetBytes = uint64_t(l.blocks) * s.heads * 4;
  l.permBlockBytes = (uint64_t(c.block) * l.permBits + 7) / 8;
  l.permBytes = l.permBlockBytes * l.blocks;
  l.bufferBytes = uint64_t(s.heads) * l.bufferTokens * s.dim * 2;
  l.scaleOff = 0;
  l.zeroOff = l.scaleOff + l.scaleBytes;
  l.offsetOff = l.zeroOff + l.zeroBytes;
  l.segmentsOff = l.offsetOff + l.offsetBytes;
  return l;
}

/** Bytes of a segment's header, widths and mins (the payload follows). */
inline uint64_t segmentHeadBytes(uint32_t packsPerSegment, uint32_t minBits) {
  return 1 + (uint64_t(packsPerSegment) * 4 + 7) / 8 + (uint64_t(packsPerSegment) * minBits + 7) / 8;
}

/** Appends values of a given width LSB first; flush() pads to a byte. */
struct BitWriter {
  std::vector<uint8_t>& out;
  uint64_t acc = 0;
  uint32_t n = 0;
  void put(uint32_t v, uint32_t bits) {
    acc |= uint64_t(v) << n;
    for (n += bits; n >= 8; n -= 8) out.push_back(uint8_t(acc)), acc >>= 8;
  }
  void flush() {
    if (n) out.push_back(uint8_t(acc));
    acc = 0, n = 0;
  }
};

/** Reads values of a given width LSB first, never past the last byte it needs. */
struct BitReader {
  const uint8_t* p;
  uint64_t acc = 0;
  uint32_t n = 0;
  uint32_t get(uint32_t bits) {
    if (bits == 0) return 0;
    while (n < bits) acc |= uint64_t(*p++) << n, n += 8;
    uint32_t v = uint32_t(acc & ((uint64_t(1) << bits) - 1));
    acc >>= bits, n -= bits;
    return v;
  }
};

/** Walks one segment's packs in stored order, unpacking each into the caller's registers. */
struct PackCursor {
  const uint8_t* widths;
  BitReader mins;
  const uint8_t* payload;
  uint32_t minBits, pack, i = 0;

  /** vals[0..pack) = code − m; returns m, sets w. */
  uint32_t next(uint32_t* vals, uint32_t& w) {
    w = (widths[i >> 1] >> ((i & 1) * 4)) & 15u;
    ++i;
    BitReader codes{payload};
    for (uint32_t k = 0; k < pack; ++k) vals[k] = codes.get(w);
    payload += pack * w / 8;
    return mins.get(minBits);
  }
};

}  // namespace packkv::packkv_codec
