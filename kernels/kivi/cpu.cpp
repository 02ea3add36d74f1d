// KIVI CPU reference: encode, decode and the fused products on the packed stream.
//
// Fixes of the original's weaknesses (kivi.md §2.3, §2.7):
//  * constant groups: scale 0 gives NaN in the original; here code 0 and min = the value.
//  * fp16 scale and min are rounded outward (min toward -inf, scale toward +inf), so
//    (x - min)/scale never exceeds 2^b - 1 and the error bound |x - x̂| <= scale/2 holds
//    exactly (round-to-nearest fp16 could push the top code past the range and clamp).
//  * the stream is stored in the kernel layout, so the products need no per-step transpose.
//  * 1- and 8-bit widths beside 2 and 4 (1-bit is TailorKV's).
//  * a group that does not divide head_dim leaves a partial last V channel group instead of an
//    error; fp16 residual tokens outside the fp16 range are refused instead of becoming inf.
// TailorKV's quantized layers use this codec's functions (kernels/tailorkv/cpu.cpp).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "codec.h"
#include "registry.h"
#include "common/bitpack.h"
#include "common/half.h"
#include "common/layout.h"
#include "kivi/format.h"

namespace packkv {
namespace {

using kivi::Layout;

Layout layoutFor(const Params& p, TensorKind kind, const Shape& s) {
  return kivi::layoutOf(s, kind, uint32_t(p.integer("bits")), uint32_t(p.integer("group")),
                        uint32_t(p.integer("residual")));
}

void check(const Params& p, TensorKind kind, const Shape& s) {
  int bits = p.integer("bits"), group = p.integer("group"), residual = p.integer("residual");
  int perWord = 32 / bits;
  auto fail = [](const std::string& m) { throw CodecError("codec 'kivi': " + m); };
  if (group % perWord != 0)
    fail("group=" + std::to_string(group) + " must be a multiple of " + std::to_string(perWord) +
         " (codes per 32-bit word at bits=" + std::to_string(bits) + ")");
  if (residual % group != 0)
    fail("residual=" + std::to_string(residual) + " must be a multiple of group=" + std::to_string(group));
  if (kind == TensorKind::Value && s.dim % perWord != 0)
    fail("head_dim=" + std::to_string(s.dim) + " must be a multiple of " + std::to_string(perWord));
}

/** Min-max quantizer of one group: fp16 min rounded down, fp16 scale rounded up. */
struct GroupQuant {
  uint16_t minHalf, scaleHalf;
  float min, scale;
  uint32_t levels;

  GroupQuant(float lo, float hi, uint32_t bits) : levels((1u << bits) - 1u) {
    if (!(std::fabs(lo) <= 65504.f && std::fabs(hi) <= 65504.f))
      throw CodecError("codec 'kivi': value out of the fp16 range of its scales (|x| > 65504)");
    minHalf = floatToHalfDown(lo);
    min = halfToFloat(minHalf);
    double step = (double(hi) - double(min)) / levels;
    float stepF = float(step);
    if (double(stepF) < step) stepF = std::nextafter(stepF, INFINITY);
    scaleHalf = floatToHalfUp(stepF);
    scale = halfToFloat(scaleHalf);
  }

  uint32_t code(float x) const {
    if (scale == 0.f) return 0;
    float v = std::clamp((x - min) / scale, 0.f, float(levels));
    return uint32_t(std::nearbyint(v));
  }
};

template <typename T>
T* at(std::vector<uint8_t>& bytes, uint64_t off) { return reinterpret_cast<T*>(bytes.data() + off); }
template <typename T>
const T* at(const uint8_t* body, uint64_t off) { return reinterpret_cast<const T*>(body + off); }

void encodeKeys(const float* x, const Shape& s, const Layout& l, std::vector<uint8_t>& out) {
  uint32_t* codes = at<uint32_t>(out, l.codesOff);
  uint16_t* scales = at<uint16_t>(out, l.scaleOff);
  uint16_t* mins = at<uint16_t>(out, l.minOff);
  uint32_t groups = l.quantTokens / l.group, rows = l.quantTokens / l.perWord;
  for (uint32_t h = 0; h < s.heads; ++h) {
    const float* xh = x + size_t(h) * s.tokens * s.dim;
    for (uint32_t g = 0; g < groups; ++g)
      for (uint32_t d = 0; d < s.dim; ++d) {
        float lo = INFINITY, hi = -INFINITY;
        for (uint32_t t = g * l.group; t < (g + 1) * l.group; ++t) {
          lo = std::min(lo, xh[size_t(t) * s.dim + d]);
          hi = std::max(hi, xh[size_t(t) * s.dim + d]);
        }
        GroupQuant gq(lo, hi, l.bits);
        size_t si = (size_t(h) * groups + g) * s.dim + d;
        scales[si] = gq.scaleHalf;
        mins[si] = gq.minHalf;
        for (uint32_t t = g * l.group; t < (g + 1) * l.group; ++t) {
          uint32_t row = t / l.perWord;
          packCode(codes[(size_t(h) * rows + row) * s.dim + d], t % l.perWord, l.bits, gq.code(xh[size_t(t) * s.dim + d]));
        }
      }
  }
}

void encodeValues(const float* x, const Shape& s, const Layout& l, std::vector<uint8_t>& out) {
  uint32_t* codes = at<uint32_t>(out, l.codesOff);
  uint16_t* scales = at<uint16_t>(out, l.scaleOff);
  uint16_t* mins = at<uint16_t>(out, l.minOff);
  uint32_t groups = l.valueGroups, rows = s.dim / l.perWord, tq = l.quantTokens;
  for (uint32_t h = 0; h < s.heads; ++h)
    for (uint32_t t = 0; t < tq; ++t) {
      const float* xt = x + (size_t(h) * s.tokens + t) * s.dim;
      for (uint32_t g = 0; g < groups; ++g) {
        uint32_t d0 = g * l.group, d1 = std::min(s.dim, d0 + l.group);
        auto [lo, hi] = std::minmax_element(xt + d0, xt + d1);
        GroupQuant gq(*lo, *hi, l.bits);
        size_t si = (size_t(h) * groups + g) * tq + t;
        scales[si] = gq.scaleHalf;
        mins[si] = gq.minHalf;
        for (uint32_t d = d0; d < d1; ++d)
          packCode(codes[(size_t(h) * rows + d / l.perWord) * tq + t], d % l.perWord, l.bits, gq.code(xt[d]));
      }
    }
}

void encodeResidual(const float* x, const Shape& s, const Layout& l, std::vector<uint8_t>& out) {
  uint16_t* res = at<uint16_t>(out, l.residualOff);
  for (uint32_t h = 0; h < s.heads; ++h)
    for (uint32_t t = 0; t < l.residualTokens; ++t)
      for (uint32_t d = 0; d < s.dim; ++d) {
        uint16_t v = floatToHalf(x[(size_t(h) * s.tokens + l.quantTokens + t) * s.dim + d]);
        if ((v & 0x7C00u) == 0x7C00u)
          throw CodecError("codec 'kivi': residual value out of the fp16 range (|x| > 65504)");
        res[(size_t(h) * l.residualTokens + t) * s.dim + d] = v;
      }
}

EncodedBody encode(const float* x, const Shape& s, TensorKind kind, const Params& p) {
  Layout l = layoutFor(p, kind, s);
  EncodedBody out;
  out.bytes.assign(l.total, 0);
  if (kind == TensorKind::Key) encodeKeys(x, s, l, out.bytes);
  else encodeValues(x, s, l, out.bytes);
  encodeResidual(x, s, l, out.bytes);
  out.breakdown.payload = l.codesBytes;
  out.breakdown.scales = l.scaleBytes;
  out.breakdown.zeros = l.minBytes;
  out.breakdown.residual = l.residualBytes;
  return out;
}

/** Reads a quantized element back: code * scale + min, in fp32 (what the GPU computes too). */
struct Reader {
  const StreamView& s;
  Layout l;
  const uint32_t* codes;
  const uint16_t* scales;
  const uint16_t* mins;
  const uint16_t* residual;

  explicit Reader(const StreamView& sv) : s(sv), l(layoutFor(sv.params, sv.header.kind, sv.header.shape)) {
    requireBodyBytes(s, l.total);
    codes = at<uint32_t>(s.body, l.codesOff);
    scales = at<uint16_t>(s.body, l.scaleOff);
    mins = at<uint16_t>(s.body, l.minOff);
    residual = at<uint16_t>(s.body, l.residualOff);
  }

  /** K[h][t][d] for t < Tq. */
  float key(uint32_t h, uint32_t t, uint32_t d) const {
    uint32_t D = s.header.shape.dim, rows = l.quantTokens / l.perWord, groups = l.quantTokens / l.group;
    uint32_t word = codes[(size_t(h) * rows + t / l.perWord) * D + d];
    size_t si = (size_t(h) * groups + t / l.group) * D + d;
    return float(unpackCode(word, t % l.perWord, l.bits)) * halfToFloat(scales[si]) + halfToFloat(mins[si]);
  }
  /** V[h][t][d] for t < Tq. */
  float value(uint32_t h, uint32_t t, uint32_t d) const {
    uint32_t D = s.header.shape.dim, tq = l.quantTokens, rows = D / l.perWord, groups = l.valueGroups;
    uint32_t word = codes[(size_t(h) * rows + d / l.perWord) * tq + t];
    size_t si = (size_t(h) * groups + d / l.group) * tq + t;
    return float(unpackCode(word, d % l.perWord, l.bits)) * halfToFloat(scales[si]) + halfToFloat(mins[si]);
  }
  float residualAt(uint32_t h, uint32_t t, uint32_t d) const {
    return halfToFloat(residual[(size_t(h) * l.residualTokens + (t - l.quantTokens)) * s.header.shape.dim + d]);
  }
  float element(uint32_t h, uint32_t t, uint32_t d) const {
    if (t >= l.quantTokens) return residualAt(h, t, d);
    return s.header.kind == TensorKind::Key ? key(h, t, d) : value(h, t, d);
  }
};

void decode(const StreamView& s, float* out) {
  Reader r(s);
  const Shape& sh = s.header.shape;
  for (uint32_t h = 0; h < sh.heads; ++h)
    for (uint32_t t = 0; t < sh.tokens; ++t)
      for (uint32_t d = 0; d < sh.dim; ++d) out[(size_t(h) * sh.tokens + t) * sh.dim + d] = r.element(h, t, d);
}

// q·Kᵀ per group: Σ_d q_d (c_td s_gd + m_gd) = Σ_d (q_d s_gd) c_td + Σ_d q_d m_gd, so the scale
// is folded into the query once per group and the codes are read straight from the words.
void qk(const StreamView& s, const float* q, uint32_t qHeads, uint32_t nq, float* scores) {
  Reader r(s);
  const Shape& sh = s.header.shape;
  const Layout& l = r.l;
  uint32_t D = sh.dim, groups = l.quantTokens / l.group, rows = l.quantTokens / l.perWord;
  std::vector<double> qs(D);
  for (uint32_t n = 0; n < nq; ++n)
    for (uint32_t h = 0; h < qHeads; ++h) {
      uint32_t kh = kvHeadOf(h, qHeads, sh.heads);
      const float* qv = q + (size_t(n) * qHeads + h) * D;
      float* out = scores + (size_t(n) * qHeads + h) * sh.tokens;
      for (uint32_t g = 0; g < groups; ++g) {
        double qm = 0;
        for (uint32_t d = 0; d < D; ++d) {
          size_t si = (size_t(kh) * groups + g) * D + d;
          qs[d] = double(qv[d]) * halfToFloat(r.scales[si]);
          qm += double(qv[d]) * halfToFloat(r.mins[si]);
        }
        for (uint32_t t = g * l.group; t < (g + 1) * l.group; ++t) {
          const uint32_t* words = r.codes + (size_t(kh) * rows + t / l.perWord) * D;
          double acc = qm;
          for (uint32_t d = 0; d < D; ++d) acc += qs[d] * unpackCode(words[d], t % l.perWord, l.bits);
          out[t] = float(acc);
        }
      }
      for (uint32_t t = l.quantTokens; t < sh.tokens; ++t) {
        double acc = 0;
        for (uint32_t d = 0; d < D; ++d) acc += double(qv[d]) * r.residualAt(kh, t, d);
        out[t] = float(acc);
      }
    }
}

// p·V per packed channel row: each word holds F channels of one token; scale and min apply per
// (channel group, token), so Σ_t p_t (c s + m) is accumulated with the scale folded into p_t.
void pv(const StreamView& s, const float* p, uint32_t qHeads, uint32_t nq, float* outAll) {
  Reader r(s);
  const Shape& sh = s.header.shape;
  const Layout& l = r.l;
  uint32_t D = sh.dim, tq = l.quantTokens, rows = D / l.perWord, groups = l.valueGroups;
  std::vector<double> acc(D);
  for (uint32_t n = 0; n < nq; ++n)
    for (uint32_t h = 0; h < qHeads; ++h) {
      uint32_t kh = kvHeadOf(h, qHeads, sh.heads);
      const float* pr = p + (size_t(n) * qHeads + h) * sh.tokens;
      std::fill(acc.begin(), acc.end(), 0.0);
      for (uint32_t row = 0; row < rows; ++row) {
        uint32_t g = row * l.perWord / l.group;
        const uint32_t* words = r.codes + (size_t(kh) * rows + row) * tq;
        const uint16_t* sc = r.scales + (size_t(kh) * groups + g) * tq;
        const uint16_t* mn = r.mins + (size_t(kh) * groups + g) * tq;
        for (uint32_t t = 0; t < tq; ++t) {
          double ps = double(pr[t]) * halfToFloat(sc[t]), pm = double(pr[t]) * halfToFloat(mn[t]);
          for (uint32_t i = 0; i < l.perWord; ++i) acc[row * l.perWord + i] += ps * unpackCode(words[t], i, l.bits) + pm;
        }
      }
      for (uint32_t t = tq; t < sh.tokens; ++t)
        for (uint32_t d = 0; d < D; ++d) acc[d] += double(pr[t]) * r.residualAt(kh, t, d);
      float* out = outAll + (size_t(n) * qHeads + h) * D;
      for (uint32_t d = 0; d < D; ++d) out[d] = float(acc[d]);
    }
}

}  // namespace

const CodecDef kKiviCodec = {
    10,
    "kivi",
    "asymmetric min-max integer quantization: K per channel over token groups, V per token over "
    "channel groups, fp16 residual window (KIVI, ICML 2024)",
    {
        {"bits", ParamType::Int, "2", {"1", "2", "4", "8"}, 0, 0, "code width in bits", "KV-"},
        {"group", ParamType::Int, "32", {}, 1, 4096, "tokens per K group and channels per V group"},
        {"residual", ParamType::Int, "128", {}, 0, 1 << 20,
         "fp16 residual window R: K keeps T mod R recent tokens, V the last R (multiple of group; 0 = none)"},
    },
    {"kivi:bits=2", "kivi:bits=4"},
    check,
    encode,
    decode,
    qk,
    pv,
};
static const CodecRegistrar registrar(kKiviCodec);

}  // namespace packkv
