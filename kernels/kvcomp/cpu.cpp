// KVComp CPU reference: relative-step quantizer, canonical Huffman codes, fused products on the stream.
//
// The arithmetic is the spec's (kvcomp.md §1.4): scale = (hi - lo) * rel in fp16,
// zp = round(lo / scale), code = round(x / scale) - zp, x̂ = (code + zp) * scale, round half to
// even; K one unit per k_block tokens over all heads and channels, V one unit per token.
// Fixes of the original's weaknesses (§1.13), each named in docs/codecs/kvcomp.md:
//  * codebook drift and the 65-symbol tree: one canonical book per stream, built from the
//    histogram of the whole tensor with add-one smoothing over the whole alphabet
//    0..floor(1/rel)+1, so every code that can occur has a codeword; codewords <= 12 bits
//    (package-merge) and one 4096-entry table lookup per symbol instead of a bit-serial tree walk.
//  * capacity: no per-vector or per-block byte limits (u16 bit counts per vector, u32 segment
//    offsets), and a segment is stored raw at ceil(log2 A) bits when Huffman would not be smaller.
//  * int8 zero point: stored at the narrowest of int8/int16/int32 that holds the stream's zero points.
//  * scale 0 (constant unit) and zero-point overflow: the step is floored at the power of two
//    >= max|x| * 2^-24 (and >= 2^-24), so |zp| <= 2^24 and fp16 constants come back exactly.
//  * the fp16 scale is rounded up, never below rel * (hi - lo), so codes stay within the alphabet.
//  * fused products accumulate in double (the original: fp16 multiply-add) and map GQA heads.
//  * any head_dim (segments are per KV head, not 64-channel slices); deterministic bytes (no
//    atomic arena appends); the fp16 tail and the codebook are counted (the paper's CR omits both).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "codec.h"
#include "registry.h"
#include "common/half.h"
#include "common/layout.h"
#include "kvcomp/format.h"
#include "kvcomp/huffman.h"

namespace packkv {
namespace {

using kvcomp::Geometry;
using kvcomp::Layout;

[[noreturn]] void fail(const std::string& message) { throw CodecError("codec 'kvcomp': " + message); }

struct Settings {
  double rel;
  uint32_t block, recent;
};

Settings settingsOf(const Params& p, TensorKind kind) {
  const char* k = kind == TensorKind::Key ? "k_" : "v_";
  return {p.real(std::string(k) + "rel"), uint32_t(p.integer(std::string(k) + "block")),
          uint32_t(p.integer(std::string(k) + "recent"))};
}

Geometry geometryFor(const Params& p, TensorKind kind, const Shape& s) {
  Settings st = settingsOf(p, kind);
  return kvcomp::geometryOf(s, kind, st.block, st.recent);
}

void check(const Params& p, TensorKind, const Shape& s) {
  for (const char* k : {"k_", "v_"}) {
    std::string pre(k);
    int block = p.integer(pre + "block"), recent = p.integer(pre + "recent");
    if (recent < block || recent % block != 0)
      fail(pre + "recent=" + std::to_string(recent) + " must be a positive multiple of " + pre + "block=" +
           std::to_string(block) + " (the fp16 tail holds recent - block + T mod block tokens)");
  }
  if (uint64_t(s.dim) * kvcomp::kMaxCodeLength > 0xFFFF)
    fail("head_dim=" + std::to_string(s.dim) + " is too large: a key vector's bit count must fit 16 bits (head_dim <= 5461)");
}

// ---- quantizer ------------------------------------------------------------------------------

/** One quantization unit: its fp16 step and integer zero point. */
struct Unit {
  uint16_t scaleHalf;
  double scale;
  int64_t zp;

  Unit(float lo, float hi, double rel) {
    double maxAbs = std::max(std::fabs(double(lo)), std::fabs(double(hi)));
    int exp = 0;
    std::frexp(maxAbs, &exp);  // maxAbs < 2^exp
    double floorStep = std::ldexp(1.0, std::max(exp - 24, -24));
    double want = std::max((double(hi) - double(lo)) * rel, floorStep);
    if (!(want <= 65504.0))
      fail("a quantization unit spans [" + std::to_string(lo) + ", " + std::to_string(hi) +
           "]: its step exceeds the fp16 range of scales");
    float wantF = float(want);
    if (double(wantF) < want) wantF = std::nextafter(wantF, INFINITY);
    scaleHalf = floatToHalfUp(wantF);
    scale = halfToFloat(scaleHalf);
    zp = int64_t(std::nearbyint(double(lo) / scale));
  }
  int64_t code(float x) const { return int64_t(std::nearbyint(double(x) / scale)) - zp; }
};

/** Element index of symbol i of vector v in segment (block b, head h). */
size_t elementOf(const Geometry& g, TensorKind kind, uint32_t tokens, uint32_t seg, uint32_t v, uint32_t i) {
  uint32_t b = seg / g.heads, h = seg % g.heads;
  uint32_t t = b * g.block + (kind == TensorKind::Key ? v : i), d = kind == TensorKind::Key ? i : v;
  return (size_t(h) * tokens + t) * g.dim + d;
}

uint32_t unitOf(const Geometry& g, TensorKind kind, uint32_t seg, uint32_t v, uint32_t i) {
  uint32_t b = seg / g.heads;
  return kind == TensorKind::Key ? b : b * g.block + i;
}

std::vector<Unit> quantUnits(const float* x, const Shape& s, TensorKind kind, const Geometry& g, double rel) {
  std::vector<float> lo(g.units, INFINITY), hi(g.units, -INFINITY);
  for (uint32_t h = 0; h < s.heads; ++h)
    for (uint32_t t = 0; t < g.codedTokens; ++t) {
      uint32_t u = kind == TensorKind::Key ? t / g.block : t;
      const float* row = x + (size_t(h) * s.tokens + t) * s.dim;
      auto [mn, mx] = std::minmax_element(row, row + s.dim);
      lo[u] = std::min(lo[u], *mn);
      hi[u] = std::max(hi[u], *mx);
    }
  std::vector<Unit> units;
  units.reserve(g.units);
  for (uint32_t u = 0; u < g.units; ++u) units.emplace_back(lo[u], hi[u], rel);
  return units;
}

// ---- encode ---------------------------------------------------------------------------------

/** The spec's integer codes in stream order (segment, vector, symbol). */
std::vector<uint16_t> streamCodes(const float* x, const Shape& s, TensorKind kind, const Geometry& g,
                                  const std::vector<Unit>& units, int64_t& maxCode) {
  std::vector<uint16_t> codes(size_t(g.segments) * g.vecsPerSeg * g.symsPerVec);
  maxCode = 0;
  size_t k = 0;
  for (uint32_t seg = 0; seg < g.segments; ++seg)
    for (uint32_t v = 0; v < g.vecsPerSeg; ++v)
      for (uint32_t i = 0; i < g.symsPerVec; ++i) {
        int64_t c = units[unitOf(g, kind, seg, v, i)].code(x[elementOf(g, kind, s.tokens, seg, v, i)]);
        if (c < 0) fail("internal: negative code");
        maxCode = std::max(maxCode, c);
        codes[k++] = uint16_t(c);
      }
  return codes;
}

/** The stream's codebook: alphabet 0..A-1, A = floor(1/rel) + 2, add-one smoothed, <= 12-bit codewords. */
std::vector<uint8_t> buildCodebook(const std::vector<uint16_t>& codes, double rel, int64_t maxCode) {
  auto alphabet = uint32_t(std::max<int64_t>(int64_t(std::floor(1.0 / rel)) + 2, maxCode + 1));
  if (alphabet > 4096) fail("internal: alphabet of " + std::to_string(alphabet) + " codes exceeds 4096");
  std::vector<uint64_t> weight(alphabet, 1);  // add-one smoothing: every code gets a codeword
  for (uint16_t c : codes) ++weight[c];
  return kvcomp::limitedCodeLengths(weight, kvcomp::kMaxCodeLength);
}

/** The coded segments, Huffman or raw (when Huffman would not be smaller), and their tables. */
struct Arena {
  std::vector<uint8_t> bytes;
  std::vector<uint32_t> segTable;
  std::vector<uint16_t> vecBits;
};

Arena writeArena(const std::vector<uint16_t>& codes, const Geometry& g, const std::vector<uint8_t>& length) {
  const std::vector<uint32_t> codeword = kvcomp::canonicalCodes(length);
  const uint32_t rawBits = kvcomp::rawWidth(uint32_t(length.size())), perSeg = g.vecsPerSeg * g.symsPerVec;
  Arena a;
  a.segTable.resize(g.segments);
  a.vecBits.resize(size_t(g.segments) * g.vecsPerSeg);
  kvcomp::BitWriter bits(a.bytes);
  for (uint32_t seg = 0; seg < g.segments; ++seg) {
    const uint16_t* sc = codes.data() + size_t(seg) * perSeg;
    uint64_t huffman = 0;
    for (uint32_t i = 0; i < perSeg; ++i) huffman += length[sc[i]];
    bool raw = huffman >= uint64_t(perSeg) * rawBits;
    if (a.bytes.size() >= kvcomp::kRawSegmentFlag) fail("a tensor's coded bytes exceed 2 GiB; split it");
    a.segTable[seg] = uint32_t(a.bytes.size()) | (raw ? kvcomp::kRawSegmentFlag : 0u);
    for (uint32_t v = 0; v < g.vecsPerSeg; ++v) {
      uint32_t vb = 0;
      for (uint32_t i = 0; i < g.symsPerVec; ++i) {
        uint16_t c = sc[size_t(v) * g.symsPerVec + i];
        uint32_t len = raw ? rawBits : length[c];
        bits.put(raw ? c : codeword[c], len);
        vb += len;
      }
      a.vecBits[size_t(seg) * g.vecsPerSeg + v] = uint16_t(vb);
    }
    bits.flush();
  }
  return a;
}

template <typename T>
void putAt(std::vector<uint8_t>& out, uint64_t off, T v) { std::memcpy(out.data() + off, &v, sizeof(T)); }

EncodedBody encode(const float* x, const Shape& s, TensorKind kind, const Params& p) {
  for (size_t i = 0, n = s.elements(); i < n; ++i)
    if (std::fabs(x[i]) > 65504.f)
      fail("value " + std::to_string(x[i]) + " is outside the fp16 range (|x| <= 65504) of its scales and tail");
  const Settings st = settingsOf(p, kind);
  const Geometry g = kvcomp::geometryOf(s, kind, st.block, st.recent);
  const std::vector<Unit> units = quantUnits(x, s, kind, g, st.rel);
  int64_t maxCode = 0;
  const std::vector<uint16_t> codes = streamCodes(x, s, kind, g, units, maxCode);
  std::vector<uint8_t> length;
  uint32_t zpBytes = 1;
  if (g.segments > 0) length = buildCodebook(codes, st.rel, maxCode);
  for (const Unit& u : units) zpBytes = std::max<uint32_t>(zpBytes, u.zp == int8_t(u.zp) ? 1 : u.zp == int16_t(u.zp) ? 2 : 4);
  const Arena arena = writeArena(codes, g, length);
  const uint32_t alphabet = uint32_t(length.size());
  const uint32_t maxLength = length.empty() ? 0 : *std::max_element(length.begin(), length.end());

  const Layout l = kvcomp::layoutOf(g, alphabet, zpBytes, maxLength, arena.bytes.size());
  EncodedBody out;
  out.bytes.assign(l.total, 0);
  putAt<uint16_t>(out.bytes, 0, uint16_t(alphabet));
  putAt<uint8_t>(out.bytes, 2, uint8_t(zpBytes));
  putAt<uint8_t>(out.bytes, 3, uint8_t(maxLength));
  putAt<uint32_t>(out.bytes, 4, uint32_t(arena.bytes.size()));
  for (uint32_t sym = 0; sym < alphabet; ++sym) out.bytes[l.lengthsOff + sym / 2] |= uint8_t(length[sym] << (4 * (sym & 1)));
  for (uint32_t u = 0; u < g.units; ++u) {
    putAt<uint16_t>(out.bytes, l.scaleOff + 2ull * u, units[u].scaleHalf);
    uint64_t at = l.zpOff + uint64_t(zpBytes) * u;
    if (zpBytes == 1) putAt<int8_t>(out.bytes, at, int8_t(units[u].zp));
    else if (zpBytes == 2) putAt<int16_t>(out.bytes, at, int16_t(units[u].zp));
    else putAt<int32_t>(out.bytes, at, int32_t(units[u].zp));
  }
  if (g.segments) {
    std::memcpy(out.bytes.data() + l.segOff, arena.segTable.data(), 4 * arena.segTable.size());
    std::memcpy(out.bytes.data() + l.vecOff, arena.vecBits.data(), 2 * arena.vecBits.size());
  }
  if (!arena.bytes.empty()) std::memcpy(out.bytes.data() + l.arenaOff, arena.bytes.data(), arena.bytes.size());
  for (uint32_t h = 0; h < s.heads; ++h)
    for (uint32_t t = 0; t < g.tailTokens; ++t)
      for (uint32_t d = 0; d < s.dim; ++d)
        putAt<uint16_t>(out.bytes, l.tailOff + 2 * ((size_t(h) * g.tailTokens + t) * s.dim + d),
                        floatToHalf(x[(size_t(h) * s.tokens + g.codedTokens + t) * s.dim + d]));
  out.breakdown = l.breakdown;
  return out;
}

// ---- reading a stream -------------------------------------------------------------------------

template <typename T>
T getAt(const uint8_t* body, uint64_t off) {
  T v;
  std::memcpy(&v, body + off, sizeof(T));
  return v;
}

/** A validated view of a body: codebook table, per-vector bit positions, unit parameters. */
struct Stream {
  const StreamView& sv;
  TensorKind kind;
  Layout l;
  const uint8_t* body;
  std::vector<uint16_t> table;     // one-step Huffman decode table
  uint32_t rawBits = 0;
  std::vector<uint64_t> vecStart;  // absolute bit position in the arena of every vector
  std::vector<uint8_t> segRaw;
  kvcomp::BitSource arena{};

  explicit Stream(const StreamView& s) : sv(s), kind(s.header.kind), body(s.body) {
    Geometry g = geometryFor(s.params, kind, s.header.shape);
    if (s.bodyBytes < kvcomp::kBodyHeaderBytes) requireBodyBytes(s, kvcomp::kBodyHeaderBytes);
    uint32_t alphabet = getAt<uint16_t>(body, 0), zpBytes = getAt<uint8_t>(body, 2), maxLength = getAt<uint8_t>(body, 3);
    if (zpBytes != 1 && zpBytes != 2 && zpBytes != 4) corrupt("zero-point width " + std::to_string(zpBytes));
    l = kvcomp::layoutOf(g, alphabet, zpBytes, maxLength, getAt<uint32_t>(body, 4));
    requireBodyBytes(s, l.total);
    arena = {body + l.arenaOff, l.arenaBytes};
    if (g.segments == 0) return;
    std::vector<uint8_t> length(alphabet);
    for (uint32_t sym = 0; sym < alphabet; ++sym) length[sym] = (body[l.lengthsOff + sym / 2] >> (4 * (sym & 1))) & 15;
    if (alphabet < 2 || maxLength > kvcomp::kMaxCodeLength || !kvcomp::buildDecodeTable(length, maxLength, table))
      corrupt("the codebook is not a complete prefix code of at most 12-bit codewords");
    rawBits = kvcomp::rawWidth(alphabet);
    locateVectors();
  }

  [[noreturn]] void corrupt(const std::string& what) const { fail("corrupt stream: " + what); }

  /** Vector starts from the tables; each segment's bits must fill exactly its bytes. */
  void locateVectors() {
    vecStart.resize(size_t(l.segments) * l.vecsPerSeg);
    segRaw.resize(l.segments);
    uint64_t expect = 0;
    for (uint32_t seg = 0; seg < l.segments; ++seg) {
      uint32_t entry = getAt<uint32_t>(body, l.segOff + 4ull * seg);
      segRaw[seg] = (entry & kvcomp::kRawSegmentFlag) != 0;
      if ((entry & ~kvcomp::kRawSegmentFlag) != expect) corrupt("segment " + std::to_string(seg) + " offset");
      uint64_t bit = expect * 8;
      for (uint32_t v = 0; v < l.vecsPerSeg; ++v) {
        size_t vi = size_t(seg) * l.vecsPerSeg + v;
        uint16_t vb = getAt<uint16_t>(body, l.vecOff + 2 * vi);
        if (segRaw[seg] && vb != l.symsPerVec * rawBits) corrupt("raw vector bit count");
        vecStart[vi] = bit;
        bit += vb;
      }
      expect = (bit + 7) / 8;
    }
    if (expect != l.arenaBytes) corrupt("segment sizes do not add up to the arena");
  }

  double scale(uint32_t u) const { return halfToFloat(getAt<uint16_t>(body, l.scaleOff + 2ull * u)); }
  int64_t zp(uint32_t u) const {
    uint64_t at = l.zpOff + uint64_t(l.zpBytes) * u;
    return l.zpBytes == 1 ? getAt<int8_t>(body, at) : l.zpBytes == 2 ? getAt<int16_t>(body, at) : getAt<int32_t>(body, at);
  }
  float tail(uint32_t h, uint32_t t, uint32_t d) const {
    size_t i = (size_t(h) * l.tailTokens + (t - l.codedTokens)) * l.dim + d;
    return halfToFloat(getAt<uint16_t>(body, l.tailOff + 2 * i));
  }

  /** Decodes vector v of segment seg into out[symsPerVec]: the codes only, never the values. */
  void decodeVector(uint32_t seg, uint32_t v, uint16_t* out) const {
    size_t vi = size_t(seg) * l.vecsPerSeg + v;
    uint64_t pos = vecStart[vi];
    const uint32_t n = l.symsPerVec;
    uint32_t i = 0;
    if (segRaw[seg]) {
      const uint32_t w = rawBits, perWindow = 57 / w;
      while (i < n) {
        uint64_t win = arena.window(pos);
        for (uint32_t k = 0; k < perWindow && i < n; ++k, win <<= w, pos += w) {
          out[i] = uint16_t(win >> (64 - w));
          if (out[i++] >= l.alphabet) corrupt("raw code past the alphabet");
        }
      }
      return;
    }
    const uint32_t L = l.maxLength, perWindow = 57 / L;
    const uint16_t* tab = table.data();
    while (i < n) {
      uint64_t win = arena.window(pos);
      for (uint32_t k = 0; k < perWindow && i < n; ++k) {
        uint16_t e = tab[win >> (64 - L)];
        win <<= (e & 15);
        pos += (e & 15);
        out[i++] = uint16_t(e >> 4);
      }
    }
    if (pos != vecStart[vi] + getAt<uint16_t>(body, l.vecOff + 2 * vi)) corrupt("vector " + std::to_string(vi) + " does not decode to its bit count");
  }
};

/** x̂ = (code + zp) * scale, exact product rounded once to fp32. */
inline float dequant(uint16_t code, int64_t zp, double scale) { return float(double(int64_t(code) + zp) * scale); }

void decode(const StreamView& s, float* out) {
  Stream r(s);
  const Layout& l = r.l;
  const uint32_t T = s.header.shape.tokens;
  std::vector<uint16_t> codes(l.symsPerVec);
  for (uint32_t seg = 0; seg < l.segments; ++seg)
    for (uint32_t v = 0; v < l.vecsPerSeg; ++v) {
      r.decodeVector(seg, v, codes.data());
      for (uint32_t i = 0; i < l.symsPerVec; ++i) {
        uint32_t u = unitOf(l, r.kind, seg, v, i);
        out[elementOf(l, r.kind, T, seg, v, i)] = dequant(codes[i], r.zp(u), r.scale(u));
      }
    }
  for (uint32_t h = 0; h < l.heads; ++h)
    for (uint32_t t = l.codedTokens; t < T; ++t)
      for (uint32_t d = 0; d < l.dim; ++d) out[(size_t(h) * T + t) * l.dim + d] = r.tail(h, t, d);
}

// q·Kᵀ: score_t = scale_b · (Σ_d q_d c_td + zp_b Σ_d q_d). Each key vector is decoded once into a
// register-sized buffer and dotted with every query head that reads its KV head (GQA).
void qk(const StreamView& s, const float* q, uint32_t qHeads, uint32_t nq, float* scores) {
  Stream r(s);
  const Layout& l = r.l;
  const uint32_t T = s.header.shape.tokens, D = l.dim, group = qHeads / l.heads;
  std::vector<uint16_t> codes(D);
  std::vector<double> qsum(size_t(nq) * group);
  for (uint32_t kh = 0; kh < l.heads; ++kh) {
    auto query = [&](uint32_t n, uint32_t j) { return q + (size_t(n) * qHeads + kh * group + j) * D; };
    auto score = [&](uint32_t n, uint32_t j) { return scores + (size_t(n) * qHeads + kh * group + j) * T; };
    for (uint32_t n = 0; n < nq; ++n)
      for (uint32_t j = 0; j < group; ++j) {
        double sum = 0;
        for (uint32_t d = 0; d < D; ++d) sum += query(n, j)[d];
        qsum[size_t(n) * group + j] = sum;
      }
    for (uint32_t b = 0; b < l.blocks; ++b) {
      const double sc = r.scale(b), zp = double(r.zp(b));
      for (uint32_t v = 0; v < l.block; ++v) {
        r.decodeVector(b * l.heads + kh, v, codes.data());
        for (uint32_t n = 0; n < nq; ++n)
          for (uint32_t j = 0; j < group; ++j) {
            const float* qv = query(n, j);
            double acc = 0;
            for (uint32_t d = 0; d < D; ++d) acc += double(qv[d]) * codes[d];
            score(n, j)[b * l.block + v] = float(sc * (acc + zp * qsum[size_t(n) * group + j]));
          }
      }
    }
    for (uint32_t t = l.codedTokens; t < T; ++t)
      for (uint32_t n = 0; n < nq; ++n)
        for (uint32_t j = 0; j < group; ++j) {
          double acc = 0;
          for (uint32_t d = 0; d < D; ++d) acc += double(query(n, j)[d]) * r.tail(kh, t, d);
          score(n, j)[t] = float(acc);
        }
  }
}

// p·V: out_d = Σ_t (p_t scale_t) c_td + Σ_t p_t scale_t zp_t. A value vector is one channel over
// a block of tokens; it is decoded once and accumulated into every query head of its KV head.
void pv(const StreamView& s, const float* p, uint32_t qHeads, uint32_t nq, float* outAll) {
  Stream r(s);
  const Layout& l = r.l;
  const uint32_t T = s.header.shape.tokens, D = l.dim, B = l.block, group = qHeads / l.heads;
  const size_t readers = size_t(nq) * group;
  std::vector<uint16_t> codes(B);
  std::vector<double> acc(readers * D), ps(readers * B), shift(readers);
  for (uint32_t kh = 0; kh < l.heads; ++kh) {
    auto probs = [&](size_t nj) { return p + (size_t(nj / group) * qHeads + kh * group + nj % group) * T; };
    std::fill(acc.begin(), acc.end(), 0.0);
    for (uint32_t b = 0; b < l.blocks; ++b) {
      for (size_t nj = 0; nj < readers; ++nj) {
        shift[nj] = 0;
        for (uint32_t i = 0; i < B; ++i) {
          uint32_t t = b * B + i;
          ps[nj * B + i] = double(probs(nj)[t]) * r.scale(t);
          shift[nj] += ps[nj * B + i] * double(r.zp(t));
        }
      }
      for (uint32_t d = 0; d < D; ++d) {
        r.decodeVector(b * l.heads + kh, d, codes.data());
        for (size_t nj = 0; nj < readers; ++nj) {
          const double* w = ps.data() + nj * B;
          double a = shift[nj];
          for (uint32_t i = 0; i < B; ++i) a += w[i] * codes[i];
          acc[nj * D + d] += a;
        }
      }
    }
    for (size_t nj = 0; nj < readers; ++nj) {
      for (uint32_t t = l.codedTokens; t < T; ++t) {
        double pt = probs(nj)[t];
        for (uint32_t d = 0; d < D; ++d) acc[nj * D + d] += pt * r.tail(kh, t, d);
      }
      float* out = outAll + (size_t(nj / group) * qHeads + kh * group + nj % group) * D;
      for (uint32_t d = 0; d < D; ++d) out[d] = float(acc[nj * D + d]);
    }
  }
}

}  // namespace

const CodecDef kKvcompCodec = {
    20,
    "kvcomp",
    "error-bounded uniform quantization with a relative step (K per 64-token block, V per token, "
    "over all heads), then canonical Huffman coding of the integers; fp16 recent tail (KVComp, arXiv 2509.00579)",
    {
        {"k_rel", ParamType::Float, "0.05", {}, 0.001, 1,
         "K relative step: scale = k_rel * (max - min) of a block, |error| <= scale/2", "K+"},
        {"v_rel", ParamType::Float, "0.1", {}, 0.001, 1,
         "V relative step: scale = v_rel * (max - min) of a token, |error| <= scale/2", "V+"},
        {"k_block", ParamType::Int, "64", {"16", "32", "64", "128", "256"}, 0, 0,
         "tokens per K quantization block and per K Huffman segment"},
        {"v_block", ParamType::Int, "128", {"16", "32", "64", "128", "256"}, 0, 0,
         "tokens per V Huffman vector (one channel over v_block tokens)"},
        {"k_recent", ParamType::Int, "128", {}, 16, 1 << 20,
         "K recent window (multiple of k_block): the newest k_recent - k_block + T mod k_block tokens stay fp16"},
        {"v_recent", ParamType::Int, "256", {}, 16, 1 << 20,
         "V recent window (multiple of v_block): the newest v_recent - v_block + T mod v_block tokens stay fp16"},
    },
    {"kvcomp", "kvcomp:k_rel=0.03,v_rel=0.06"},
    check,
    encode,
    decode,
    qk,
    pv,
};
static const CodecRegistrar registrar(kKvcompCodec);

}  // namespace packkv
