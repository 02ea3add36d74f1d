// KVComp GPU encode checked without a GPU: runs cuda_encode.cuh's per-thread helpers with every
// block phase as a loop over thread ids (vectors written in reverse order, so the result cannot
// depend on thread order) and compares the body and Breakdown byte for byte with cpu.cpp's
// encoder, plus the bad-input messages; also checks the exact-division trick and the fp16
// conversions against half.h / double division on many values.
//
//   g++ -std=c++17 -O2 -Ikernels kernels/tools/kvcomp_encode_emu.cpp kernels/kvcomp/cpu.cpp
//       kernels/registry.cpp -o /tmp/kvcomp_encode_emu && /tmp/kvcomp_encode_emu
//
// Built with nvcc (-x cu) and linked with the CUDA objects, `--gpu` instead runs the real
// kernels (the registered GPU encode) on the same inputs, compares them with cpu.cpp and times
// encode at the bench geometry (8 KV heads, head_dim 128).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "codec.h"
#include "common/half.h"
#define KVCOMP_ENCODE_NO_KERNELS  // the GPU mode calls the kernels of the linked cuda.cu
#include "kvcomp/cuda_encode.cuh"
#include "kvcomp/format.h"
#include "registry.h"
#ifdef __CUDACC__
#include "common/cuda_check.h"
#include "common/gpu_codec.h"
#endif

using namespace packkv;
using namespace packkv::kvcomp;
using namespace packkv::kvcomp::enc;

namespace {

struct Result {
  std::vector<uint8_t> body;  // room of the bound, the encoder's body at its start
  Breakdown breakdown;
  std::string error;
};

uint64_t boundBytes(const Geometry& g) {
  const uint64_t perSeg = uint64_t(g.vecsPerSeg) * g.symsPerVec;
  return layoutOf(g, kAlphabetLimit, 4, 12, uint64_t(g.segments) * ((perSeg * 12 + 7) / 8)).total;
}

template <typename T>
void store(std::vector<uint8_t>& b, uint64_t off, T v) { std::memcpy(b.data() + off, &v, sizeof(T)); }
template <typename T>
T load(const std::vector<uint8_t>& b, uint64_t off) {
  T v;
  std::memcpy(&v, b.data() + off, sizeof(T));
  return v;
}

/** The GPU passes of cuda_encode.cuh, each block phase a loop over thread ids. */
Result emulate(const float* x, const Shape& s, TensorKind kind, const Params& prm) {
  const bool key = kind == TensorKind::Key;
  const double rel = prm.real(key ? "k_rel" : "v_rel");
  const Geometry g = geometryOf(s, kind, uint32_t(prm.integer(key ? "k_block" : "v_block")),
                                uint32_t(prm.integer(key ? "k_recent" : "v_recent")));
  Result res;
  res.body.assign(boundBytes(g), 0xA5);
  std::vector<uint8_t>& body = res.body;
  try {
    Status st = initialStatus();
    // 1 range
    std::vector<uint32_t> lo(g.units, ~0u), hi(g.units, 0);
    for (uint64_t row = 0; row < uint64_t(s.heads) * s.tokens; ++row) {
      uint32_t mn = ~0u, mx = 0;
      for (uint32_t d = 0; d < s.dim; ++d) {
        const float v = x[row * s.dim + d];
        if (outOfRange(v)) {
          st.firstBad = std::min<unsigned long long>(st.firstBad, row * s.dim + d);
          st.nonFinite += nonFinite(v);
          continue;
        }
        mn = std::min(mn, orderedKey(v));
        mx = std::max(mx, orderedKey(v));
      }
      const uint32_t t = uint32_t(row % s.tokens);
      if (t < g.codedTokens) {
        const uint32_t u = key ? t / g.block : t;
        lo[u] = std::min(lo[u], mn);
        hi[u] = std::max(hi[u], mx);
      }
    }
    // 2 units
    std::vector<uint16_t> scaleHalf(g.units);
    std::vector<long long> zp(g.units);
    for (uint32_t u = 0; u < g.units; ++u) {
      const UnitParams q = unitParams(keyValue(lo[u]), keyValue(hi[u]), rel);
      if (q.tooWide) st.badUnit = std::min(st.badUnit, u);
      scaleHalf[u] = q.scaleHalf;
      zp[u] = q.zp;
      st.zpBytes = std::max(st.zpBytes, zpBytesOf(q.zp));
    }
    // 3 codes
    std::vector<uint16_t> codes(uint64_t(s.heads) * g.codedTokens * s.dim);
    std::vector<unsigned long long> hist(kAlphabetLimit, 0);
    if (g.segments)
      for (uint64_t row = 0; row < uint64_t(s.heads) * g.codedTokens; ++row) {
        const uint32_t h = uint32_t(row / g.codedTokens), t = uint32_t(row % g.codedTokens), u = key ? t / g.block : t;
        const double sc = double(halfValue(scaleHalf[u])), inv = 1.0 / sc;
        for (uint32_t d = 0; d < s.dim; ++d) {
          const float v = x[(uint64_t(h) * s.tokens + t) * s.dim + d];
          if (outOfRange(v)) continue;  // an error below; keep the host's conversions defined
          const long long c = roundQuotient(exactDouble(v), sc, inv) - zp[u];
          codes[row * s.dim + d] = uint16_t(c);
          st.maxCode = std::max(st.maxCode, c);
          st.negative |= c < 0;
          if (c >= 0 && c < kAlphabetLimit) ++hist[c];
        }
      }
    // host
    if (st.nonFinite || st.firstBad != ~0ull) reportBadInput(st, x[st.firstBad]);
    if (st.badUnit != ~0u) reportBadUnit(keyValue(lo[st.badUnit]), keyValue(hi[st.badUnit]));
    Codebook cb;
    if (g.segments) {
      if (st.negative) failLikeCpu("internal: negative code");
      const uint32_t alphabet = alphabetOf(rel, st.maxCode);
      if (alphabet > kAlphabetLimit) failLikeCpu("internal: alphabet exceeds 4096");
      cb = codebookOf(hist.data(), alphabet);
    }
    const Layout lay = layoutOf(g, cb.alphabet, st.zpBytes, cb.maxLength, 0);
    const std::vector<uint8_t> prefix = bodyPrefix(lay, cb);
    std::memcpy(body.data(), prefix.data(), prefix.size());
    std::fill(body.begin() + lay.scaleOff, body.begin() + lay.segOff, 0);
    for (uint32_t u = 0; u < g.units; ++u) {
      store<uint16_t>(body, lay.scaleOff + 2ull * u, scaleHalf[u]);
      const uint64_t at = lay.zpOff + uint64_t(st.zpBytes) * u;
      if (st.zpBytes == 1) store<int8_t>(body, at, int8_t(zp[u]));
      else if (st.zpBytes == 2) store<int16_t>(body, at, int16_t(zp[u]));
      else store<int32_t>(body, at, int32_t(zp[u]));
    }
    // 4 sizes, 5 scan, 6 write
    const uint32_t rowU16 = tileRowU16(g.symsPerVec), perSeg = g.block * s.dim;
    std::vector<uint16_t> tile(size_t(g.vecsPerSeg) * rowU16);
    std::vector<uint32_t> segInfo(g.segments);
    auto stage = [&](uint32_t seg) {
      const uint32_t b = seg / s.heads, h = seg % s.heads;
      const uint16_t* chunk = codes.data() + (uint64_t(h) * g.codedTokens + uint64_t(b) * g.block) * s.dim;
      std::fill(tile.begin(), tile.end(), 0xEEEE);
      for (uint32_t e = 0; e < perSeg; ++e) tile[tileSlot(key, e, s.dim, rowU16)] = chunk[e];
    };
    for (uint32_t seg = 0; seg < g.segments; ++seg) {
      stage(seg);
      std::vector<uint32_t> bits(g.vecsPerSeg);
      uint32_t total = 0;
      for (uint32_t v = 0; v < g.vecsPerSeg; ++v) total += bits[v] = vectorBits(&tile[size_t(v) * rowU16], g.symsPerVec, cb.lengths.data());
      const uint64_t rawBits = uint64_t(perSeg) * cb.rawBits;
      const bool raw = uint64_t(total) >= rawBits;
      for (uint32_t v = 0; v < g.vecsPerSeg; ++v)
        store<uint16_t>(body, lay.vecOff + 2 * (uint64_t(seg) * g.vecsPerSeg + v), uint16_t(raw ? g.symsPerVec * cb.rawBits : bits[v]));
      segInfo[seg] = (raw ? kRawSegmentFlag : 0u) | uint32_t(((raw ? rawBits : total) + 7) / 8);
    }
    std::vector<uint64_t> segStart(g.segments);
    uint64_t carry = 0;
    for (uint32_t seg = 0; seg < g.segments; ++seg) {
      segStart[seg] = carry;
      store<uint32_t>(body, lay.segOff + 4ull * seg, uint32_t(carry) | (segInfo[seg] & kRawSegmentFlag));
      if (carry >= kRawSegmentFlag) st.overflow = 1;
      carry += segInfo[seg] & ~kRawSegmentFlag;
    }
    st.arenaBytes = carry;
    if (g.segments) store<uint32_t>(body, 4, uint32_t(carry));
    for (uint32_t seg = 0; seg < g.segments; ++seg) {
      stage(seg);
      const uint32_t bytes = segInfo[seg] & ~kRawSegmentFlag;
      const bool raw = (segInfo[seg] & kRawSegmentFlag) != 0;
      std::vector<uint32_t> words((bytes + 3) / 4 + 1, 0), start(g.vecsPerSeg);
      uint32_t acc = 0;
      for (uint32_t v = 0; v < g.vecsPerSeg; ++v) {
        start[v] = acc;
        acc += load<uint16_t>(body, lay.vecOff + 2 * (uint64_t(seg) * g.vecsPerSeg + v));
      }
      for (uint32_t v = g.vecsPerSeg; v-- > 0;)
        writeVector(&tile[size_t(v) * rowU16], g.symsPerVec, start[v], cb.book.data(), raw, cb.rawBits,
                    [&](uint32_t k, uint32_t w) {
                      if (k >= (bytes + 3) / 4) throw std::runtime_error("word past the segment");
                      words[k] |= w;
                    });
      for (uint32_t k = 0; k < bytes; ++k) body[lay.arenaOff + segStart[seg] + k] = segmentByte(words.data(), k);
    }
    // 7 tail
    const uint64_t arenaEnd = lay.arenaOff + st.arenaBytes, tailOff = (arenaEnd + 1) / 2 * 2;
    if (tailOff > arenaEnd) body[arenaEnd] = 0;
    for (uint32_t h = 0; h < s.heads; ++h)
      for (uint32_t t = 0; t < g.tailTokens; ++t)
        for (uint32_t d = 0; d < s.dim; ++d)
          store<uint16_t>(body, tailOff + 2 * ((uint64_t(h) * g.tailTokens + t) * s.dim + d),
                          halfNearest(x[(uint64_t(h) * s.tokens + g.codedTokens + t) * s.dim + d]));
    if (st.overflow) failLikeCpu("a tensor's coded bytes exceed 2 GiB; split it");
    res.breakdown = layoutOf(g, cb.alphabet, st.zpBytes, cb.maxLength, st.arenaBytes).breakdown;
  } catch (const CodecError& e) {
    res.error = e.what();
  }
  return res;
}

// ---- inputs ---------------------------------------------------------------------------------------

float roundHalf(double v) { return halfToFloat(floatToHalf(float(v))); }

/** K-like (channel offsets, outlier channels) or V-like data, fp16-representable unless `raw32`. */
std::vector<float> makeData(const Shape& s, TensorKind kind, uint64_t seed, int special) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> n01(0, 1);
  std::vector<float> x(s.elements());
  for (uint32_t h = 0; h < s.heads; ++h)
    for (uint32_t t = 0; t < s.tokens; ++t)
      for (uint32_t d = 0; d < s.dim; ++d) {
        double v = kind == TensorKind::Key ? 0.5 * std::sin(0.37 * d + h) + (d % 32 == 7 ? 10.0 : 1.0) * n01(rng)
                                           : 0.5 * n01(rng);
        if (special == 1) v = v * 1e-3 + 300.0;                    // large DC offset: wide zero points
        if (special == 3 && t % 17 == 0) v = 0.25;                 // constant-ish rows (V units)
        x[(size_t(h) * s.tokens + t) * s.dim + d] = special == 2 ? float(v * 1e-39) : roundHalf(v);
      }
  if (special == 4) std::fill(x.begin(), x.end(), 1.5f);  // every unit constant: floor step
  return x;
}

struct Coverage {
  uint64_t raw = 0, huffman = 0, zpWidth[5] = {}, tails = 0;
  uint32_t maxAlphabet = 0;
} coverage;

bool compareCase(const std::string& spec, TensorKind kind, const Shape& s, const std::vector<float>& x, const char* what) {
  const ParsedSpec ps = parseSpec(spec);
  std::string cpuError;
  EncodedBody want;
  try {
    want = ps.codec->encode(x.data(), s, kind, ps.params);
  } catch (const CodecError& e) {
    cpuError = e.what();
  }
  Result got = emulate(x.data(), s, kind, ps.params);
  bool ok;
  if (!cpuError.empty() || !got.error.empty()) {
    ok = cpuError == got.error;
  } else {
    const Breakdown& a = got.breakdown;
    const Breakdown& b = want.breakdown;
    ok = got.body.size() >= want.bytes.size() && std::memcmp(got.body.data(), want.bytes.data(), want.bytes.size()) == 0 &&
         a.payload == b.payload && a.scales == b.scales && a.zeros == b.zeros && a.residual == b.residual &&
         a.metadata == b.metadata && a.host == b.host;
  }
  if (cpuError.empty() && want.bytes.size() >= kBodyHeaderBytes) {  // what the cases cover
    const Geometry g = geometryOf(s, kind, uint32_t(ps.params.integer(kind == TensorKind::Key ? "k_block" : "v_block")),
                                  uint32_t(ps.params.integer(kind == TensorKind::Key ? "k_recent" : "v_recent")));
    const Layout l = layoutOf(g, load<uint16_t>(want.bytes, 0), want.bytes[2], want.bytes[3], load<uint32_t>(want.bytes, 4));
    for (uint32_t seg = 0; seg < g.segments; ++seg)
      (load<uint32_t>(want.bytes, l.segOff + 4ull * seg) & kRawSegmentFlag ? coverage.raw : coverage.huffman)++;
    coverage.zpWidth[want.bytes[2]]++;
    coverage.maxAlphabet = std::max<uint32_t>(coverage.maxAlphabet, l.alphabet);
    coverage.tails += g.tailTokens > 0;
  }
  if (!ok) {
    size_t first = 0;
    while (first < want.bytes.size() && first < got.body.size() && got.body[first] == want.bytes[first]) ++first;
    std::printf("MISMATCH %s %s %s H=%u T=%u D=%u: cpu '%s' emu '%s' first differing byte %zu of %zu\n", what,
                spec.c_str(), kindName(kind), s.heads, s.tokens, s.dim, cpuError.c_str(), got.error.c_str(), first,
                want.bytes.size());
  }
  return ok;
}

// ---- scalar helpers against the references ----------------------------------------------------------

bool checkScalars() {
  std::mt19937_64 rng(7);
  uint64_t bad = 0, n = 0;
  // roundQuotient vs nearbyint(double division), ties included (x = (k + 0.5) s).
  for (int i = 0; i < 4000000; ++i) {
    const uint16_t sh = uint16_t(1 + rng() % 0x7BFF);
    const double sc = halfToFloat(sh);
    float x;
    switch (i % 4) {
      case 0: x = roundHalf(std::ldexp(double(int64_t(rng() % 2000001) - 1000000), -int(rng() % 30))); break;
      case 1: x = float((double(int64_t(rng() % 4001) - 2000) + 0.5) * sc); break;  // a tie when exact
      case 2: {
        uint32_t u = uint32_t(rng());
        std::memcpy(&x, &u, 4);
        if (!(std::fabs(x) <= 65504.f)) x = 1.0f;
        break;
      }
      default: x = float(double(int64_t(rng() % 40001) - 20000) * sc * 0.25); break;
    }
    if (std::fabs(double(x) / sc) > 1e15) continue;
    ++n;
    if (roundQuotient(exactDouble(x), sc, 1.0 / sc) != int64_t(std::nearbyint(double(x) / sc))) ++bad;
  }
  std::printf("roundQuotient: %llu / %llu differ from nearbyint(x / s)\n", (unsigned long long)bad, (unsigned long long)n);
  uint64_t badHalf = 0, badCeil = 0, badDouble = 0;
  for (uint64_t u = 0; u < (1ull << 32); u += 97) {  // every 97th float
    float f;
    uint32_t b = uint32_t(u);
    std::memcpy(&f, &b, 4);
    if (!(std::fabs(f) <= 65504.f)) continue;
    if (halfNearest(f) != floatToHalf(f)) ++badHalf;
    if (f >= 5.9604644775390625e-8f && halfCeil(f) != floatToHalfUp(f)) ++badCeil;
    if (exactDouble(f) != double(f)) ++badDouble;
  }
  std::printf("halfNearest %llu, halfCeil %llu, exactDouble %llu mismatches (every 97th float)\n",
              (unsigned long long)badHalf, (unsigned long long)badCeil, (unsigned long long)badDouble);
  return bad == 0 && badHalf == 0 && badCeil == 0 && badDouble == 0;
}

struct Case {
  std::string spec;
  TensorKind kind;
  Shape shape;
  int special;
};

std::vector<Case> cases() {
  std::vector<Case> out;
  const double rels[] = {0.001, 0.004, 0.01, 0.05, 0.1, 0.3, 0.5, 0.9, 1.0};
  const uint32_t blocks[] = {16, 32, 64, 128, 256};
  int i = 0;
  for (double rel : rels)
    for (uint32_t blk : blocks)
      for (uint32_t dim : {64u, 128u}) {
        ++i;
        const uint32_t tokens = blk * (3 + i % 4) + 2 * blk + (i * 37) % blk;  // a partial fp16 tail
        char spec[200];
        std::snprintf(spec, sizeof spec, "kvcomp:k_rel=%g,v_rel=%g,k_block=%u,v_block=%u,k_recent=%u,v_recent=%u", rel, rel,
                      blk, blk, blk * (1 + i % 3), blk * (1 + (i + 1) % 3));
        out.push_back({spec, TensorKind::Key, {uint32_t(1 + i % 4), tokens, dim}, 0});
        out.push_back({spec, TensorKind::Value, {uint32_t(1 + (i + 2) % 4), tokens, dim}, 0});
      }
  // special data: wide zero points, float subnormals, constant rows, constant tensor, head_dim 96/40
  for (int special = 1; special <= 4; ++special)
    for (TensorKind k : {TensorKind::Key, TensorKind::Value}) {
      out.push_back({"kvcomp:k_rel=0.05,v_rel=0.1", k, {2, 700, 128}, special});
      out.push_back({"kvcomp:k_rel=0.001,v_rel=0.001,k_block=32,v_block=64", k, {3, 333, 96}, special});
    }
  out.push_back({"kvcomp", TensorKind::Key, {2, 100, 128}, 0});     // no coded tokens: all tail
  out.push_back({"kvcomp", TensorKind::Value, {2, 200, 40}, 0});    // no coded tokens
  out.push_back({"kvcomp:v_block=32,v_recent=32", TensorKind::Value, {1, 96, 40}, 0});  // no tail
  return out;
}

}  // namespace

#ifdef __CUDACC__
/** The registered GPU encode on the same cases, then timed at the bench geometry. */
int runGpu() {
  const gpu::GpuCodecDef* codec = gpu::findGpuCodec("kvcomp");
  cudaStream_t stream;
  PACKKV_CUDA_CHECK(cudaStreamCreate(&stream));
  int failures = 0, n = 0;
  auto gpuEncode = [&](const ParsedSpec& ps, TensorKind kind, const Shape& s, const std::vector<float>& x,
                       std::vector<uint8_t>& body, Breakdown& bd, std::string& err) {
    const size_t room = codec->bodyBytes(s, kind, ps.params);
    float* dx;
    uint8_t* db;
    PACKKV_CUDA_CHECK(cudaMalloc(&dx, x.size() * 4));
    PACKKV_CUDA_CHECK(cudaMalloc(&db, room));
    PACKKV_CUDA_CHECK(cudaMemcpy(dx, x.data(), x.size() * 4, cudaMemcpyHostToDevice));
    PACKKV_CUDA_CHECK(cudaMemset(db, 0xA5, room));
    try {
      bd = codec->encode(dx, s, kind, ps.params, db, gpu::Launch{stream, nullptr, 0});
    } catch (const CodecError& e) {
      err = e.what();
    }
    body.resize(room);
    PACKKV_CUDA_CHECK(cudaMemcpy(body.data(), db, room, cudaMemcpyDeviceToHost));
    cudaFree(dx);
    cudaFree(db);
  };
  std::vector<Case> all = cases();
  all.push_back({"kvcomp:k_rel=1", TensorKind::Key, {2, 700, 64}, 5});
  all.push_back({"kvcomp", TensorKind::Key, {2, 700, 64}, 6});
  all.push_back({"kvcomp", TensorKind::Value, {2, 700, 64}, 7});
  for (const Case& c : all) {
    std::vector<float> x = makeData(c.shape, c.kind, 1000 + n, c.special > 4 ? 0 : c.special);
    if (c.special == 5) x[5] = -65504.f, x[9] = 65504.f;         // a unit too wide for an fp16 step
    if (c.special == 6) x[777] = 70000.f, x[900] = -1e6f;        // out of range
    if (c.special == 7) x[1234] = NAN, x[2000] = INFINITY;       // non-finite
    const ParsedSpec ps = parseSpec(c.spec);
    std::string cpuErr, gpuErr;
    EncodedBody want;
    try {
      if (c.special == 7) (void)encodeStream(ps, c.kind, x.data(), c.shape, nullptr);  // the framing path's check
      want = ps.codec->encode(x.data(), c.shape, c.kind, ps.params);
    } catch (const CodecError& e) {
      cpuErr = e.what();
    }
    std::vector<uint8_t> body;
    Breakdown bd;
    gpuEncode(ps, c.kind, c.shape, x, body, bd, gpuErr);
    bool ok = cpuErr.empty() && gpuErr.empty()
                  ? std::memcmp(body.data(), want.bytes.data(), want.bytes.size()) == 0 && bd.payload == want.breakdown.payload &&
                        bd.metadata == want.breakdown.metadata && bd.residual == want.breakdown.residual &&
                        bd.scales == want.breakdown.scales && bd.zeros == want.breakdown.zeros
                  : cpuErr == gpuErr;
    if (!ok) std::printf("GPU MISMATCH %s %s T=%u D=%u: cpu '%s' gpu '%s'\n", c.spec.c_str(), kindName(c.kind), c.shape.tokens,
                         c.shape.dim, cpuErr.c_str(), gpuErr.c_str());
    failures += !ok;
    ++n;
  }
  std::printf("gpu encode: %d / %d cases identical to cpu.cpp (bytes, Breakdown, errors)\n", n - failures, n);
  // Timing: x resident on the device, encode (which synchronizes) timed on the host clock.
  for (uint32_t tokens : {4096u, 32768u, 131072u})
    for (TensorKind kind : {TensorKind::Key, TensorKind::Value}) {
      const Shape s{8, tokens, 128};
      const std::vector<float> x = makeData(s, kind, 42, 0);
      float* dx;
      PACKKV_CUDA_CHECK(cudaMalloc(&dx, x.size() * 4));
      PACKKV_CUDA_CHECK(cudaMemcpy(dx, x.data(), x.size() * 4, cudaMemcpyHostToDevice));
      for (const char* spec : {"kvcomp", "kvcomp:k_rel=0.01,v_rel=0.01", "kvcomp:k_rel=0.5,v_rel=0.9"}) {
        const ParsedSpec ps = parseSpec(spec);
        const size_t room = codec->bodyBytes(s, kind, ps.params);
        uint8_t* db;
        PACKKV_CUDA_CHECK(cudaMalloc(&db, room));
        std::vector<double> us;
        Breakdown bd;
        for (int r = 0; r < 13; ++r) {
          const auto t0 = std::chrono::steady_clock::now();
          bd = codec->encode(dx, s, kind, ps.params, db, gpu::Launch{stream, nullptr, 0});
          const auto t1 = std::chrono::steady_clock::now();
          if (r >= 3) us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
        }
        std::sort(us.begin(), us.end());
        const double med = us[us.size() / 2];
        std::printf("encode %-30s %s T=%-6u %9.1f us (min %9.1f)  %7.1f GB/s of fp16 input  CR %.2f\n", spec, kindName(kind),
                    tokens, med, us[0], 2.0 * s.elements() / (med * 1e3), 2.0 * s.elements() / double(bd.device()));
        cudaFree(db);
      }
      cudaFree(dx);
    }
  return failures ? 1 : 0;
}
#endif

int main(int argc, char** argv) {
#ifdef __CUDACC__
  if (argc > 1 && std::string(argv[1]) == "--gpu") return runGpu();
#endif
  (void)argc;
  (void)argv;
  bool ok = checkScalars();
  int n = 0, failures = 0;
  for (const Case& c : cases()) {
    const std::vector<float> x = makeData(c.shape, c.kind, 1000 + n, c.special);
    failures += !compareCase(c.spec, c.kind, c.shape, x, "data");
    ++n;
  }
  // error paths: a unit too wide for an fp16 step, out-of-range values (cpu.cpp's own messages)
  {
    Shape s{2, 700, 64};
    std::vector<float> x = makeData(s, TensorKind::Key, 5, 0);
    x[5] = -65504.f, x[9] = 65504.f;
    failures += !compareCase("kvcomp:k_rel=1", TensorKind::Key, s, x, "too-wide");
    x = makeData(s, TensorKind::Key, 6, 0);
    x[777] = 70000.f, x[900] = -1e6f;
    failures += !compareCase("kvcomp", TensorKind::Key, s, x, "out-of-range");
    n += 2;
  }
  std::printf("covered: %llu raw and %llu Huffman segments, zero points of 1/2/4 bytes in %llu/%llu/%llu cases, "
              "alphabets up to %u, %llu cases with an fp16 tail\n", (unsigned long long)coverage.raw,
              (unsigned long long)coverage.huffman, (unsigned long long)coverage.zpWidth[1],
              (unsigned long long)coverage.zpWidth[2], (unsigned long long)coverage.zpWidth[4], coverage.maxAlphabet,
              (unsigned long long)coverage.tails);
  std::printf("emulated encode: %d / %d cases identical to cpu.cpp (bytes, Breakdown, errors)\n", n - failures, n);
  return ok && failures == 0 ? 0 : 1;
}
