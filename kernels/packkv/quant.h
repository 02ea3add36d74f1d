// PackKV's per-token quantizer (TokenQuant, spec §2) with the codec's fixes: codes from the stored
// fp16 scale (rounded up) and lo (rounded down), exact constant tokens, an int32 zero point that
// cannot overflow. |x − x̂| ≤ scale/2 for the scale in the stream; codes stay ≤ 1/rel + 1.
#pragma once
#include <algorithm>
#include <cmath>
#include <sstream>
#include <string>
#include <vector>

#include "codec.h"
#include "common/half.h"
#include "packkv/format.h"

namespace packkv::packkv_codec {

[[noreturn]] inline void fail(const std::string& message) { throw CodecError("codec 'packkv': " + message); }

inline std::string num(double v) {
  std::ostringstream os;
  os << v;
  return os.str();
}

/** One token's quantizer: x̂ = (q + zp)·scale (zp=int) or q·scale + lo (zp=hp). */
struct TokenQuant {
  uint16_t scaleHalf = 0x3C00, loHalf = 0;
  int32_t zp = 0;
  double scale = 1, lo = 0;

  uint32_t code(float x, bool hp) const {
    double q = hp ? std::nearbyint((double(x) - lo) / scale) : std::nearbyint(double(x) / scale) - zp;
    if (!(q >= 0 && q <= 32767)) fail("internal error: code " + num(q) + " outside [0, 32767]");
    return uint32_t(q);
  }
};

/** Smallest fp16 ≥ v > 0; a CodecError past the fp16 range. */
inline uint16_t halfAtLeast(double v, const std::string& what) {
  float f = float(v);
  if (double(f) < v) f = std::nextafter(f, INFINITY);
  if (!(f <= 65504.f)) fail(what + " = " + num(v) + " exceeds the fp16 maximum 65504");
  return floatToHalfUp(std::max(f, 1e-30f));
}

inline TokenQuant quantizer(float lo, float hi, float maxAbs, const Config& c, TensorKind kind, uint32_t t) {
  TokenQuant q;
  std::string token = std::string(kindName(kind)) + " token " + std::to_string(t);
  const char* relName = kind == TensorKind::Key ? "k_rel" : "v_rel";
  if (c.hpZero) {
    if (!(std::fabs(lo) <= 65504.f)) fail(token + ": its min " + num(lo) + " is outside fp16 (zp=hp); use zp=int");
    q.loHalf = floatToHalfDown(lo);
    q.lo = halfToFloat(q.loHalf);
    double range = double(hi) - q.lo;  // from the stored lo, so codes stay ≤ 1/rel + 1
    if (range > 0) q.scaleHalf = halfAtLeast(range * c.rel, token + ": scale (max − min)·" + relName);
  } else if (hi > lo) {
    double step = std::max((double(hi) - double(lo)) * c.rel, double(maxAbs) / 1073741824.0);
    q.scaleHalf = halfAtLeast(step, token + ": scale (max − min)·" + relName);
  } else if (lo != 0) {
    if (!(std::fabs(lo) <= 65504.f)) fail(token + " is constant " + num(lo) + ", outside fp16");
    q.scaleHalf = std::max<uint16_t>(floatToHalf(std::fabs(lo)), 1);
  }
  q.scale = halfToFloat(q.scaleHalf);
  if (!c.hpZero) q.zp = int32_t(std::nearbyint(double(lo) / q.scale));
  return q;
}

/** Per compressed token: stored scale/zero, and its codes [heads][dim]. */
struct Quantized {
  std::vector<TokenQuant> quant;
  std::vector<uint16_t> codes;  // [Tc][H·D], original token order
};

inline Quantized quantize(const float* x, const Shape& s, const Layout& l, const Config& c, TensorKind kind) {
  uint32_t L = s.heads * s.dim;
  Quantized out{std::vector<TokenQuant>(l.compressedTokens), std::vector<uint16_t>(size_t(l.compressedTokens) * L)};
  for (uint32_t t = 0; t < l.compressedTokens; ++t) {
    float lo = INFINITY, hi = -INFINITY, maxAbs = 0;
    for (uint32_t h = 0; h < s.heads; ++h)
      for (uint32_t d = 0; d < s.dim; ++d) {
        float v = x[(size_t(h) * s.tokens + t) * s.dim + d];
        lo = std::min(lo, v), hi = std::max(hi, v), maxAbs = std::max(maxAbs, std::fabs(v));
      }
    const TokenQuant& q = out.quant[t] = quantizer(lo, hi, maxAbs, c, kind, t);
    for (uint32_t h = 0; h < s.heads; ++h)
      for (uint32_t d = 0; d < s.dim; ++d)
        out.codes[size_t(t) * L + h * s.dim + d] = uint16_t(q.code(x[(size_t(h) * s.tokens + t) * s.dim + d], c.hpZero));
  }
  return out;
}

}  // namespace packkv::packkv_codec
