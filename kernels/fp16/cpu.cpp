// fp16 baseline: CPU reference (round to nearest binary16; products in double).
#include <cstring>
#include <vector>

#include "codec.h"
#include "registry.h"
#include "common/half.h"
#include "common/layout.h"
#include "fp16/format.h"

namespace packkv {
namespace {

void check(const Params&, TensorKind, const Shape&) {}

EncodedBody encode(const float* x, const Shape& shape, TensorKind, const Params&) {
  size_t n = shape.elements();
  EncodedBody out;
  out.bytes.resize(n * 2);
  for (size_t i = 0; i < n; ++i) {
    uint16_t h = floatToHalf(x[i]);
    std::memcpy(out.bytes.data() + 2 * i, &h, 2);
  }
  out.breakdown.payload = n * 2;
  return out;
}

const uint16_t* halves(const StreamView& s) {
  requireBodyBytes(s, fp16::bodyBytes(s.header.shape.heads, s.header.shape.tokens, s.header.shape.dim));
  return reinterpret_cast<const uint16_t*>(s.body);  // body is 16-byte aligned within the stream
}

void decode(const StreamView& s, float* out) {
  const uint16_t* h = halves(s);
  size_t n = s.header.shape.elements();
  for (size_t i = 0; i < n; ++i) out[i] = halfToFloat(h[i]);
}

void qk(const StreamView& s, const float* q, uint32_t qHeads, uint32_t nq, float* scores) {
  const uint16_t* k = halves(s);
  const Shape& sh = s.header.shape;
  for (uint32_t n = 0; n < nq; ++n)
    for (uint32_t h = 0; h < qHeads; ++h) {
      const float* qv = q + (size_t(n) * qHeads + h) * sh.dim;
      const uint16_t* kh = k + size_t(kvHeadOf(h, qHeads, sh.heads)) * sh.tokens * sh.dim;
      float* out = scores + (size_t(n) * qHeads + h) * sh.tokens;
      for (uint32_t t = 0; t < sh.tokens; ++t) {
        double acc = 0;
        for (uint32_t d = 0; d < sh.dim; ++d) acc += double(qv[d]) * halfToFloat(kh[size_t(t) * sh.dim + d]);
        out[t] = float(acc);
      }
    }
}

void pv(const StreamView& s, const float* p, uint32_t qHeads, uint32_t nq, float* outAll) {
  const uint16_t* v = halves(s);
  const Shape& sh = s.header.shape;
  std::vector<double> acc(sh.dim);
  for (uint32_t n = 0; n < nq; ++n)
    for (uint32_t h = 0; h < qHeads; ++h) {
      const float* pr = p + (size_t(n) * qHeads + h) * sh.tokens;
      const uint16_t* vh = v + size_t(kvHeadOf(h, qHeads, sh.heads)) * sh.tokens * sh.dim;
      std::fill(acc.begin(), acc.end(), 0.0);
      for (uint32_t t = 0; t < sh.tokens; ++t)
        for (uint32_t d = 0; d < sh.dim; ++d) acc[d] += double(pr[t]) * halfToFloat(vh[size_t(t) * sh.dim + d]);
      float* out = outAll + (size_t(n) * qHeads + h) * sh.dim;
      for (uint32_t d = 0; d < sh.dim; ++d) out[d] = float(acc[d]);
    }
}

}  // namespace

const CodecDef kFp16Codec = {
    0,
    "fp16",
    "uncompressed binary16 baseline (cuBLAS on the GPU); every ratio is computed against it",
    {},
    {"fp16"},
    check,
    encode,
    decode,
    qk,
    pv,
};
static const CodecRegistrar registrar(kFp16Codec);

}  // namespace packkv
