// PackKV CPU reference: encode, decode and the fused products on the packed stream.
//
// Fixes of the original's weaknesses (packkv.md §2–§4):
//  * codes are computed from the STORED fp16 scale (rounded up) and, with zp=hp, the stored fp16
//    lo (rounded down), so |x − x̂| ≤ scale/2 holds exactly for the stored scale (the original
//    quantizes with the fp32 scale and stores an fp16 one, adding the fp16 rounding to the bound)
//    and codes stay in [0, 1/rel + 1], 8 bits at most: no raw fallback width is ever needed.
//  * a constant token with zp=int: the original uses scale 1 and zp = round(lo), an error up to
//    0.5; here scale = fp16(|lo|) and zp = ±1, exact on fp16 data (0 stays 0).
//  * the zero point is int32 and computed in double; the scale is kept ≥ max|x|/2^30 so the zero
//    point can never overflow (only reachable with f32 data of tiny relative range).
//  * this harness encodes K and V separately, so one permutation shared by K and V (computed on
//    [K codes | V codes], stored nowhere) cannot be built: each tensor repacks on its own codes
//    and stores its permutation (ceil(log2 block) bits per token, counted as metadata), so decode
//    and both products work in the original token order (the spec's order=exact, always).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "codec.h"
#include "registry.h"
#include "common/half.h"
#include "common/layout.h"
#include "packkv/format.h"
#include "packkv/quant.h"
#include "packkv/repack.h"

namespace packkv {
namespace {

using namespace packkv_codec;

Config configOf(const Params& p, TensorKind kind) {
  const std::string& repack = p.text("repack");
  return Config{p.real(kind == TensorKind::Key ? "k_rel" : "v_rel"), uint32_t(p.integer("block")),
                uint32_t(p.integer("buffer")), uint32_t(p.integer("pack")),
                repack == "none" ? Repack::None : repack == "greedy" ? Repack::Greedy : Repack::Median,
                p.text("zp") == "hp"};
}

void check(const Params& p, TensorKind, const Shape&) {
  for (const char* name : {"k_rel", "v_rel"}) {
    double rel = p.real(name);
    if (!(rel > 0.004 && rel < 1))
      fail(std::string("parameter ") + name + "=" + p.text(name) +
           " is invalid: expected a number in (0.004, 1), both ends excluded (codes stay ≤ 1/rel + 1 < 256)");
  }
  int block = p.integer("block"), pack = p.integer("pack"), buffer = p.integer("buffer");
  if (block % pack != 0)
    fail("parameter block=" + std::to_string(block) + " must be a multiple of pack=" + std::to_string(pack));
  if (buffer < block)
    fail("parameter buffer=" + std::to_string(buffer) + " must be at least block=" + std::to_string(block) +
         " (the recent fp16 buffer fills a block before it is compressed)");
}

/** Writes segment (b, h): widths, mins, packs; returns its payload bytes. */
uint64_t writeSegment(const Quantized& qz, const std::vector<uint32_t>& origin, const Shape& s, const Layout& l,
                      const Config& c, uint32_t b, uint32_t h, std::vector<uint8_t>& out) {
  uint32_t L = s.heads * s.dim, P = c.pack;
  auto codeAt = [&](uint32_t g, uint32_t d, uint32_t k) {
    return qz.codes[size_t(origin[size_t(b) * c.block + g * P + k]) * L + h * s.dim + d];
  };
  std::vector<uint32_t> mins(l.packsPerSegment), widths(l.packsPerSegment);
  for (uint32_t g = 0, i = 0; g < l.packsPerChannel; ++g)
    for (uint32_t d = 0; d < s.dim; ++d, ++i) {
      uint32_t lo = UINT32_MAX, hi = 0;
      for (uint32_t k = 0; k < P; ++k) lo = std::min<uint32_t>(lo, codeAt(g, d, k)), hi = std::max<uint32_t>(hi, codeAt(g, d, k));
      mins[i] = lo, widths[i] = bitLength(hi - lo);
      if (widths[i] > 15) fail("internal error: pack width " + std::to_string(widths[i]) + " > 15");
    }
  uint32_t minBits = bitLength(*std::max_element(mins.begin(), mins.end()));
  out.push_back(uint8_t(minBits));
  BitWriter bw{out};
  for (uint32_t w : widths) bw.put(w, 4);
  bw.flush();
  for (uint32_t m : mins) bw.put(m, minBits);
  bw.flush();
  uint64_t payload = 0;
  for (uint32_t g = 0, i = 0; g < l.packsPerChannel; ++g)
    for (uint32_t d = 0; d < s.dim; ++d, ++i) {
      for (uint32_t k = 0; k < P; ++k) bw.put(codeAt(g, d, k) - mins[i], widths[i]);
      payload += P * widths[i] / 8;  // P is a multiple of 8: packs stay byte aligned
    }
  return payload;
}

EncodedBody encode(const float* x, const Shape& s, TensorKind kind, const Params& p) {
  Config c = configOf(p, kind);
  Layout l = layoutOf(s, c);
  Quantized qz = quantize(x, s, l, c, kind);
  uint32_t B = c.block, L = s.heads * s.dim;
  std::vector<uint32_t> origin(l.compressedTokens);  // stored slot -> original token
  std::vector<uint8_t> perms;
  BitWriter permWriter{perms};
  for (uint32_t b = 0; b < l.blocks; ++b) {
    std::vector<uint32_t> perm = repackOrder(c.repack, qz.codes.data() + size_t(b) * B * L, B, L, c.pack);
    for (uint32_t j = 0; j < B; ++j) origin[size_t(b) * B + j] = b * B + perm[j];
    if (c.repack != Repack::None) {
      for (uint32_t j = 0; j < B; ++j) permWriter.put(perm[j], l.permBits);
      permWriter.flush();
    }
  }
  std::vector<uint8_t> segments;
  std::vector<uint32_t> offsets;
  uint64_t payload = 0;
  for (uint32_t b = 0; b < l.blocks; ++b)
    for (uint32_t h = 0; h < s.heads; ++h) {
      if (segments.size() > UINT32_MAX) fail("stream too large: segment offsets exceed 32 bits");
      offsets.push_back(uint32_t(segments.size()));
      payload += writeSegment(qz, origin, s, l, c, b, h, segments);
    }

  EncodedBody out;
  out.bytes.assign(l.fixedBytes() + segments.size(), 0);
  uint8_t* body = out.bytes.data();
  for (uint32_t slot = 0; slot < l.compressedTokens; ++slot) {
    const TokenQuant& q = qz.quant[origin[slot]];
    std::memcpy(body + l.scaleOff + 2 * size_t(slot), &q.scaleHalf, 2);
    if (c.hpZero) std::memcpy(body + l.zeroOff + 2 * size_t(slot), &q.loHalf, 2);
    else std::memcpy(body + l.zeroOff + 4 * size_t(slot), &q.zp, 4);
  }
  if (!offsets.empty()) std::memcpy(body + l.offsetOff, offsets.data(), offsets.size() * 4);
  if (!segments.empty()) std::memcpy(body + l.segmentsOff, segments.data(), segments.size());
  uint8_t* permAt = body + l.segmentsOff + segments.size();
  if (!perms.empty()) std::memcpy(permAt, perms.data(), perms.size());
  uint8_t* buffer = permAt + l.permBytes;
  for (uint32_t h = 0; h < s.heads; ++h)
    for (uint32_t i = 0; i < l.bufferTokens; ++i)
      for (uint32_t d = 0; d < s.dim; ++d) {
        uint16_t v = floatToHalf(x[(size_t(h) * s.tokens + l.compressedTokens + i) * s.dim + d]);
        std::memcpy(buffer + ((size_t(h) * l.bufferTokens + i) * s.dim + d) * 2, &v, 2);
      }
  out.breakdown.payload = payload;
  out.breakdown.scales = l.scaleBytes;
  out.breakdown.zeros = l.zeroBytes;
  out.breakdown.residual = l.bufferBytes;
  out.breakdown.metadata = l.offsetBytes + (segments.size() - payload) + l.permBytes;
  return out;
}

template <typename T>
T load(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

/** A validated stream: section pointers, per-slot scale/zero and the slot -> token map. */
struct Reader {
  Config c;
  Layout l;
  uint32_t H, T, D;
  const uint8_t* segments;
  const uint8_t* buffer;
  std::vector<uint64_t> segmentAt;  // [nb][H] body offset of each segment
  std::vector<uint32_t> origin;     // stored slot -> original token
  std::vector<double> scale, zero;  // per slot: fp16 scale; zp (int) or lo (hp)

  explicit Reader(const StreamView& s)
      : c(configOf(s.params, s.header.kind)), l(layoutOf(s.header.shape, c)), H(s.header.shape.heads),
        T(s.header.shape.tokens), D(s.header.shape.dim) {
    auto corrupt = [](const std::string& m) { fail("stream is corrupt: " + m); };
    if (s.bodyBytes < l.fixedBytes())
      requireBodyBytes(s, l.fixedBytes());  // throws: shorter than its fixed sections
    uint64_t segmentBytes = s.bodyBytes - l.fixedBytes();
    segments = s.body + l.segmentsOff;
    for (uint64_t i = 0, expect = 0; i < uint64_t(l.blocks) * H; ++i) {
      if (load<uint32_t>(s.body + l.offsetOff + 4 * i) != expect || expect >= segmentBytes)
        corrupt("segment " + std::to_string(i) + " is not at offset " + std::to_string(expect));
      uint32_t minBits = segments[expect];
      if (minBits > 16) corrupt("segment " + std::to_string(i) + " has min width " + std::to_string(minBits));
      uint64_t head = segmentHeadBytes(l.packsPerSegment, minBits), payload = 0;
      if (expect + head > segmentBytes) corrupt("segment " + std::to_string(i) + " is truncated");
      for (uint32_t k = 0; k < l.packsPerSegment; ++k) payload += c.pack * ((segments[expect + 1 + k / 2] >> (k % 2 * 4)) & 15u) / 8;
      segmentAt.push_back(l.segmentsOff + expect);
      expect += head + payload;
      if (i + 1 == uint64_t(l.blocks) * H && expect != segmentBytes)
        corrupt("segments end at " + std::to_string(expect) + ", not " + std::to_string(segmentBytes));
    }
    if (l.blocks == 0 && segmentBytes != 0) requireBodyBytes(s, l.fixedBytes());
    const uint8_t* perms = segments + segmentBytes;
    buffer = perms + l.permBytes;
    origin.resize(l.compressedTokens);
    for (uint32_t b = 0; b < l.blocks; ++b) {
      BitReader pr{perms + b * l.permBlockBytes};
      std::vector<bool> seen(c.block, false);
      for (uint32_t j = 0; j < c.block; ++j) {
        uint32_t t = c.repack == Repack::None ? j : pr.get(l.permBits);
        if (t >= c.block || seen[t]) corrupt("block " + std::to_string(b) + " permutation repeats or overflows");
        seen[t] = true;
        origin[size_t(b) * c.block + j] = b * c.block + t;
      }
    }
    scale.resize(l.compressedTokens);
    zero.resize(l.compressedTokens);
    for (uint32_t slot = 0; slot < l.compressedTokens; ++slot) {
      scale[slot] = halfToFloat(load<uint16_t>(s.body + l.scaleOff + 2 * size_t(slot)));
      zero[slot] = c.hpZero ? double(halfToFloat(load<uint16_t>(s.body + l.zeroOff + 2 * size_t(slot))))
                            : double(load<int32_t>(s.body + l.zeroOff + 4 * size_t(slot)));
    }
  }

  PackCursor cursor(uint32_t b, uint32_t h, const uint8_t* body) const {
    const uint8_t* seg = body + segmentAt[size_t(b) * H + h];
    uint32_t minBits = seg[0];
    const uint8_t* mins = seg + 1 + (uint64_t(l.packsPerSegment) * 4 + 7) / 8;
    return PackCursor{seg + 1, BitReader{mins}, seg + segmentHeadBytes(l.packsPerSegment, minBits), minBits, c.pack};
  }
  /** x̂ of stored slot with integer code + m. */
  double value(uint32_t slot, uint32_t code) const {
    return c.hpZero ? double(code) * scale[slot] + zero[slot] : (double(code) + zero[slot]) * scale[slot];
  }
  float bufferAt(uint32_t h, uint32_t i, uint32_t d) const {
    return halfToFloat(load<uint16_t>(buffer + ((size_t(h) * l.bufferTokens + i) * D + d) * 2));
  }
};

void decode(const StreamView& s, float* out) {
  Reader r(s);
  uint32_t P = r.c.pack, vals[32], w;
  for (uint32_t b = 0; b < r.l.blocks; ++b)
    for (uint32_t h = 0; h < r.H; ++h) {
      PackCursor cur = r.cursor(b, h, s.body);
      for (uint32_t g = 0; g < r.l.packsPerChannel; ++g)
        for (uint32_t d = 0; d < r.D; ++d) {
          uint32_t m = cur.next(vals, w);
          for (uint32_t k = 0; k < P; ++k) {
            uint32_t slot = b * r.c.block + g * P + k;
            out[(size_t(h) * r.T + r.origin[slot]) * r.D + d] = float(r.value(slot, vals[k] + m));
          }
        }
    }
  for (uint32_t h = 0; h < r.H; ++h)
    for (uint32_t i = 0; i < r.l.bufferTokens; ++i)
      for (uint32_t d = 0; d < r.D; ++d) out[(size_t(h) * r.T + r.l.compressedTokens + i) * r.D + d] = r.bufferAt(h, i, d);
}

/** The (query, query head) rows that read KV head kh, as offsets of rows of `width`. */
std::vector<size_t> rowsOf(uint32_t kh, uint32_t qHeads, uint32_t kvHeads, uint32_t nq, size_t width) {
  std::vector<size_t> rows;
  uint32_t group = qHeads / kvHeads;
  for (uint32_t n = 0; n < nq; ++n)
    for (uint32_t h = kh * group; h < (kh + 1) * group; ++h) rows.push_back((size_t(n) * qHeads + h) * width);
  return rows;
}

// q·Kᵀ: score_t = scale_t·(Σ_c q_c·code_tc + Σ_c q_c·m_pc + zp_t·Σ_c q_c) (zp=int), or
// scale_t·(…) + lo_t·Σ_c q_c (zp=hp). Each pack is unpacked once into registers and applied to
// every query row that reads its KV head (GQA); the per-pack min enters once per pack.
void qk(const StreamView& s, const float* q, uint32_t qHeads, uint32_t nq, float* scores) {
  Reader r(s);
  uint32_t P = r.c.pack, vals[32], w;
  for (uint32_t kh = 0; kh < r.H; ++kh) {
    std::vector<size_t> qRows = rowsOf(kh, qHeads, r.H, nq, r.D), sRows = rowsOf(kh, qHeads, r.H, nq, r.T);
    size_t J = qRows.size();
    std::vector<double> qSum(J, 0), qMin(J), acc(J * P);
    for (size_t j = 0; j < J; ++j)
      for (uint32_t d = 0; d < r.D; ++d) qSum[j] += q[qRows[j] + d];
    for (uint32_t b = 0; b < r.l.blocks; ++b) {
      PackCursor cur = r.cursor(b, kh, s.body);
      for (uint32_t g = 0; g < r.l.packsPerChannel; ++g) {
        std::fill(acc.begin(), acc.end(), 0.0);
        std::fill(qMin.begin(), qMin.end(), 0.0);
        for (uint32_t d = 0; d < r.D; ++d) {
          uint32_t m = cur.next(vals, w);
          for (size_t j = 0; j < J; ++j) {
            double qd = q[qRows[j] + d];
            qMin[j] += qd * m;
            if (w == 0) continue;
            double* a = &acc[j * P];
            for (uint32_t k = 0; k < P; ++k) a[k] += qd * vals[k];
          }
        }
        for (uint32_t k = 0; k < P; ++k) {
          uint32_t slot = b * r.c.block + g * P + k, t = r.origin[slot];
          double sc = r.scale[slot], z = r.zero[slot];
          for (size_t j = 0; j < J; ++j) {
            double dot = acc[j * P + k] + qMin[j];
            scores[sRows[j] + t] = float(r.c.hpZero ? sc * dot + z * qSum[j] : sc * (dot + z * qSum[j]));
          }
        }
      }
    }
    for (uint32_t i = 0; i < r.l.bufferTokens; ++i)
      for (size_t j = 0; j < J; ++j) {
        double dot = 0;
        for (uint32_t d = 0; d < r.D; ++d) dot += double(q[qRows[j] + d]) * r.bufferAt(kh, i, d);
        scores[sRows[j] + r.l.compressedTokens + i] = float(dot);
      }
  }
}

// p·V: out_c = Σ_t (p_t·scale_t)·code_tc + m_pc·Σ_{t∈pack} p_t·scale_t + Σ_t p_t·scale_t·zp_t
// (zp=int; zp=hp adds Σ_t p_t·lo_t instead). p is read at each stored slot's original token.
void pv(const StreamView& s, const float* p, uint32_t qHeads, uint32_t nq, float* outAll) {
  Reader r(s);
  uint32_t P = r.c.pack, vals[32], w;
  for (uint32_t kh = 0; kh < r.H; ++kh) {
    std::vector<size_t> pRows = rowsOf(kh, qHeads, r.H, nq, r.T), oRows = rowsOf(kh, qHeads, r.H, nq, r.D);
    size_t J = pRows.size();
    std::vector<double> acc(J * r.D, 0), constant(J, 0), ps(J * P), psSum(J);
    for (uint32_t b = 0; b < r.l.blocks; ++b) {
      PackCursor cur = r.cursor(b, kh, s.body);
      for (uint32_t g = 0; g < r.l.packsPerChannel; ++g) {
        std::fill(psSum.begin(), psSum.end(), 0.0);
        for (uint32_t k = 0; k < P; ++k) {
          uint32_t slot = b * r.c.block + g * P + k, t = r.origin[slot];
          for (size_t j = 0; j < J; ++j) {
            double pt = p[pRows[j] + t], pts = pt * r.scale[slot];
            ps[j * P + k] = pts;
            psSum[j] += pts;
            constant[j] += r.c.hpZero ? pt * r.zero[slot] : pts * r.zero[slot];
          }
        }
        for (uint32_t d = 0; d < r.D; ++d) {
          uint32_t m = cur.next(vals, w);
          for (size_t j = 0; j < J; ++j) {
            double a = m * psSum[j];
            if (w != 0)
              for (uint32_t k = 0; k < P; ++k) a += ps[j * P + k] * vals[k];
            acc[j * r.D + d] += a;
          }
        }
      }
    }
    for (uint32_t i = 0; i < r.l.bufferTokens; ++i)
      for (size_t j = 0; j < J; ++j) {
        double pt = p[pRows[j] + r.l.compressedTokens + i];
        for (uint32_t d = 0; d < r.D; ++d) acc[j * r.D + d] += pt * r.bufferAt(kh, i, d);
      }
    for (size_t j = 0; j < J; ++j)
      for (uint32_t d = 0; d < r.D; ++d) outAll[oRows[j] + d] = float(acc[j * r.D + d] + constant[j]);
  }
}

}  // namespace

const CodecDef kPackkvCodec = {
    30,
    "packkv",
    "error-bounded per-token quantization (relative step), token repacking inside blocks, packs of "
    "integers bit-packed at each pack's own width, fp16 recent buffer (PackKV, IPDPS 2026)",
    {
        {"k_rel", ParamType::Float, "0.1", {}, 0.004, 1,
         "K step relative to each token's range over all heads and channels: scale = (max − min)·k_rel, "
         "|x − x̂| ≤ scale/2; in (0.004, 1)", "K+"},
        {"v_rel", ParamType::Float, "0.2", {}, 0.004, 1, "V step relative to each token's range, as k_rel", "V+"},
        {"block", ParamType::Int, "64", {}, 8, 1024,
         "tokens per block: the unit of repacking and of compression out of the buffer (multiple of pack)"},
        {"buffer", ParamType::Int, "192", {}, 8, 1 << 20,
         "recent fp16 buffer: keeps buffer − block to buffer − 1 of the newest tokens (≥ block)"},
        {"pack", ParamType::Int, "16", {"8", "16", "32"}, 0, 0,
         "stored tokens per pack: one bit width and one min per (pack, head, channel)"},
        {"repack", ParamType::Enum, "median", {"none", "greedy", "median"}, 0, 0,
         "token order inside a block: none, median (by median code, descending) or greedy (each pack "
         "grown by the token that widens it least); the permutation is stored"},
        {"zp", ParamType::Enum, "int", {"int", "hp"}, 0, 0,
         "zero point per token: int (int32, x̂ = (q + zp)·scale) or hp (fp16 min, x̂ = q·scale + min)"},
    },
    {"packkv:k_rel=0.1,v_rel=0.2,repack=median", "packkv:k_rel=0.1,v_rel=0.2,repack=greedy"},
    check,
    encode,
    decode,
    qk,
    pv,
};
static const CodecRegistrar registrar(kPackkvCodec);

}  // namespace packkv
