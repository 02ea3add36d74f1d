// KIVI: asymmetric min-max integer quantization, K per channel over token groups, V per token
// over channel groups, fp16 residual window (../shared/specs/kivi.md). Our stream stores the
// layout the fused products read (the spec's §2.7 kernel layout), so no per-step re-layout.
//
// b = bits in {1,2,4,8}, F = 32/b codes per u32 word (LSB first: code i at bit i*b),
// G = group, R = residual. Codes of a group share one fp16 scale and one fp16 min.
//
// K stream (packing along tokens):              V stream (packing along channels):
//   Tq = T - r,  r = T mod R (R>0) else T mod G    Tq = 0 if T <= R, else T - R (R>0); T if R=0
//   codes u32 [H][Tq/F][D]                         codes u32 [H][D/F][Tq]
//   scale f16 [H][Tq/G][D]                         scale f16 [H][⌈D/G⌉][Tq]
//   min   f16 [H][Tq/G][D]                         min   f16 [H][⌈D/G⌉][Tq]
//   residual f16 [H][r][D]                         residual f16 [H][T-Tq][D]
//
// A V group that head_dim does not fill (D mod G channels) is a partial last group of its own.
// Bits per quantized element: b + 32/G (2-bit, G=32: 3 bits, 5.33×); residual tokens cost 16.
#pragma once
#include <cstdint>

#include "codec.h"

namespace packkv::kivi {

struct Layout {
  uint32_t bits, perWord, group, residualLen;  // b, F, G, R
  uint32_t quantTokens, residualTokens;        // Tq, T - Tq
  uint32_t valueGroups;                        // ceil(D/G): V channel groups, the last may be partial
  uint64_t codesOff, scaleOff, minOff, residualOff, total;
  uint64_t codesBytes, scaleBytes, minBytes, residualBytes;
};

inline Layout layoutOf(const Shape& s, TensorKind kind, uint32_t bits, uint32_t group, uint32_t residual) {
  Layout l{};
  l.bits = bits;
  l.perWord = 32 / bits;
  l.group = group;
  l.residualLen = residual;
  if (kind == TensorKind::Key) {
    uint32_t r = residual > 0 ? s.tokens % residual : s.tokens % group;
    l.quantTokens = s.tokens - r;
  } else {
    l.quantTokens = residual == 0 ? s.tokens : (s.tokens <= residual ? 0 : s.tokens - residual);
  }
  l.residualTokens = s.tokens - l.quantTokens;
  l.valueGroups = (s.dim + group - 1) / group;
  uint64_t q = uint64_t(s.heads) * l.quantTokens * s.dim;  // quantized elements
  l.codesBytes = q / l.perWord * 4;
  l.scaleBytes = kind == TensorKind::Key ? q / group * 2 : uint64_t(s.heads) * l.valueGroups * l.quantTokens * 2;
  l.minBytes = l.scaleBytes;
  l.residualBytes = uint64_t(s.heads) * l.residualTokens * s.dim * 2;
  l.codesOff = 0;
  l.scaleOff = l.codesOff + l.codesBytes;
  l.minOff = l.scaleOff + l.scaleBytes;
  l.residualOff = l.minOff + l.minBytes;
  l.total = l.residualOff + l.residualBytes;
  return l;
}

}  // namespace packkv::kivi
