// TailorKV (../shared/specs/tailorkv.md): each layer is either quantization-friendly (mode=q:
// KIVI min-max quantization of every token at 1/2/4 bits with an fp16 residual) or
// sparsity-friendly (mode=s: sinks and a recent window stay fp16 on the device, the other
// tokens are offloaded to the host and a top-k of them is fetched per query). mode=auto is
// resolved per layer on the TypeScript side (cli/layer-policy.ts) before anything is encoded.
//
// mode=q, b = bits in {1,2,4}, F = 32/b codes per u32 word (LSB first), G = group,
// R = residual, Gd = ceil(D/G) value channel groups (the last one D mod G wide when G ∤ D):
//
//   K stream (packing along tokens):              V stream (packing along channels):
//     Tq = T - r, r = T mod R (R>0) else T mod G     Tq = 0 if T <= R, else T - R (R>0); T if R=0
//     codes    u32 [H][Tq/F][D]   payload            codes    u32 [H][D/F][Tq]  payload
//     scale    f16 [H][Tq/G][D]   scales             scale    f16 [H][Gd][Tq]   scales
//     min      f16 [H][Tq/G][D]   zeros              min      f16 [H][Gd][Tq]   zeros
//     residual f16 [H][T-Tq][D]   residual           residual f16 [H][T-Tq][D]  residual
//
//   bits per element: K  (Tq·(b + 32/G) + 16·r) / T
//                     V  (Tq·(b + 32·Gd/D) + 16·(T-Tq)) / T
//   (1-bit, G=64: 1.5 bits per quantized element, 10.7×; 2-bit, G=64: 2.5 bits, 6.4×)
//
// mode=s, S' = min(sinks, T), W' = min(window, T - S'), M = T - S' - W' offloaded tokens
// t in [S', T - W'):
//
//   K stream:                                      V stream:
//     device f16 [H][S'+W'][D]  residual            device f16 [H][S'+W'][D]  residual
//            (sinks, then the window)                       (sinks, then the window)
//     maxabs f16 [H][D]         metadata            host   f16 [H][M][D]      host
//            (max over all T of |K|, rounded up)
//     host   f16 [H][D][M]      host (channel-major)
//
//   device bits per element: K 16·(S'+W')/T + 16/T,  V 16·(S'+W')/T;  host: 16·M/T
//   (T=1024, sinks 8, window 56: 1.0 + 0.016 bits on the device, 15.8× K and 16× V)
#pragma once
#include <cstdint>

#include "codec.h"
#include "kivi/format.h"

namespace packkv::tailorkv {

enum class Mode : uint8_t { Auto, Quant, Sparse };

/** Score q·Kᵀ reports for an offloaded token the top-k did not select: softmax weight exactly 0. */
constexpr float kMaskedScore = -1e30f;

struct SparseLayout {
  uint32_t sinks, window, hostTokens;  // S', W', M
  uint32_t deviceTokens;               // S' + W'
  uint64_t deviceOff, maxAbsOff, hostOff, total;
  uint64_t deviceBytes, maxAbsBytes, hostBytes;
};

inline SparseLayout sparseLayoutOf(const Shape& s, TensorKind kind, uint32_t sinks, uint32_t window) {
  SparseLayout l{};
  l.sinks = sinks < s.tokens ? sinks : s.tokens;
  uint32_t left = s.tokens - l.sinks;
  l.window = window < left ? window : left;
  l.deviceTokens = l.sinks + l.window;
  l.hostTokens = s.tokens - l.deviceTokens;
  l.deviceBytes = uint64_t(s.heads) * l.deviceTokens * s.dim * 2;
  l.maxAbsBytes = kind == TensorKind::Key ? uint64_t(s.heads) * s.dim * 2 : 0;
  l.hostBytes = uint64_t(s.heads) * l.hostTokens * s.dim * 2;
  l.deviceOff = 0;
  l.maxAbsOff = l.deviceOff + l.deviceBytes;
  l.hostOff = l.maxAbsOff + l.maxAbsBytes;
  l.total = l.hostOff + l.hostBytes;
  return l;
}

}  // namespace packkv::tailorkv
