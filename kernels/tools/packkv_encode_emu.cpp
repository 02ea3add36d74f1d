// packkv_encode_emu: runs the GPU encoder's block functions (packkv/cuda_encode.cuh) on the CPU,
// thread by thread and phase by phase, and compares their bytes and Breakdown with cpu.cpp's encoder;
// also checks the fp16/double twins against half.h (every float) and the quantizer against quant.h.
// No GPU needed:
//   g++ -std=c++17 -O2 -fopenmp -Wno-unknown-pragmas -Ikernels kernels/tools/packkv_encode_emu.cpp
//       kernels/registry.cpp kernels/packkv/cpu.cpp -o /tmp/packkv_encode_emu && /tmp/packkv_encode_emu
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/half.h"
#include "packkv/cuda_encode.cuh"
#include "packkv/quant.h"
#include "registry.h"

using namespace packkv;
using namespace packkv::packkv_gpu::enc;
namespace pc = packkv::packkv_codec;

namespace {

struct HostExec {
  template <class F>
  void phase(F&& f) const {
    for (uint32_t t = 0; t < kThreads; ++t) f(t);
  }
};

int failures = 0;
#define EXPECT(cond, ...)                 \
  do {                                    \
    if (!(cond)) {                        \
      if (++failures <= 20) {             \
        std::printf("FAIL: " __VA_ARGS__); \
        std::printf("\n");                \
      }                                   \
    }                                     \
  } while (0)

uint64_t dbits(double d) {
  uint64_t u;
  std::memcpy(&u, &d, 8);
  return u;
}

/** The twins against half.h over every float / half. */
void checkTwins() {
  long bad = 0;
#pragma omp parallel for reduction(+ : bad) schedule(static)
  for (int64_t i = 0; i <= 0xFFFFFFFFll; ++i) {
    const uint32_t u = uint32_t(i);
    const float f = u2f(u);
    bad += floatToHalfBits(u) != floatToHalf(f);
    if (std::isnan(f)) continue;
    bad += dbits(toDouble(u)) != dbits(double(f));
    bad += keyBits(orderKey(u)) != (u == 0x80000000u ? 0u : u);
    if (std::fabs(f) <= 65504.f) bad += floatToHalfDownBits(u) != floatToHalfDown(f) || floatToHalfUpBits(u) != floatToHalfUp(f);
  }
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = halfToFloat(uint16_t(h));
    if (!std::isnan(f) && dbits(halfToDouble(uint16_t(h))) != dbits(double(f))) ++bad;
  }
  // order keys: consecutive finite floats, walked in value order, have increasing keys
  EXPECT(bad == 0, "%ld float/half twin mismatches", bad);
  std::printf("twins: every float checked against half.h (%ld mismatches)\n", bad);
}

/** quantizeToken/codeOf against quant.h's quantizer/code on random and edge-case tokens. */
void checkQuantizer() {
  std::mt19937_64 rng(7);
  long n = 0, bad = 0, errors = 0;
  const float specials[] = {0.f, -0.f, 1e-40f, -1e-40f, 1.17549435e-38f, 65504.f, -65504.f, 65520.f, 1e30f, -3e38f,
                            6.0e-8f, 1e-30f, 5.96e-8f, 1.0f, -1.0f, 1e-7f};
  for (int it = 0; it < 400000; ++it) {
    const int len = 1 + int(rng() % 8);
    std::vector<float> v(len);
    const int mode = int(rng() % 6);
    for (float& x : v) {
      if (mode == 0) x = specials[rng() % 16];
      else if (mode == 1) x = u2f(uint32_t(rng()));  // any bits (non-finite skipped below)
      else if (mode == 2) x = float(std::ldexp(double(int64_t(rng() % 2001) - 1000), -int(rng() % 160)));
      else if (mode == 3) x = float((double(rng() % 100000) - 50000) * 1e-3);
      else if (mode == 4) x = v[0];  // constant tokens
      else x = float(std::ldexp(double(rng() % 65536) - 32768, int(rng() % 20) - 10));
    }
    bool finite = true;
    for (float x : v) finite &= std::isfinite(x);
    if (!finite) continue;
    const double rel = 0.0041 + double(rng() % 10000) / 10000 * 0.99;
    const bool hp = rng() & 1;
    pc::Config c{rel, 64, 64, 16, pc::Repack::None, hp};
    float lo = INFINITY, hi = -INFINITY, maxAbs = 0;
    for (float x : v) lo = std::min(lo, x), hi = std::max(hi, x), maxAbs = std::max(maxAbs, std::fabs(x));
    bool cpuOk = true;
    pc::TokenQuant cq;
    std::vector<uint32_t> cpuCodes;
    try {
      cq = pc::quantizer(lo, hi, maxAbs, c, TensorKind::Key, 0);
      for (float x : v) cpuCodes.push_back(cq.code(x, hp));
    } catch (const CodecError&) {
      cpuOk = false;
    }
    TokenQ gq;
    bool gpuOk = quantizeToken(f2u(lo), f2u(hi), f2u(maxAbs), rel, hp, gq);
    std::vector<uint32_t> gpuCodes;
    for (size_t i = 0; gpuOk && i < v.size(); ++i) {
      uint32_t code = 0;
      gpuOk = codeOf(f2u(v[i]), gq, hp, code);
      gpuCodes.push_back(code);
    }
    ++n;
    errors += !cpuOk;
    bool same = cpuOk == gpuOk;
    if (same && cpuOk)
      same = cq.scaleHalf == gq.scaleHalf && cq.loHalf == gq.loHalf && cq.zp == gq.zp && cpuCodes == gpuCodes;
    if (!same && ++bad <= 5)
      std::printf("  quantizer mismatch: mode %d lo %.9g hi %.9g rel %.6f hp %d cpu %d gpu %d\n", mode, lo, hi, rel, hp,
                  cpuOk, gpuOk);
  }
  EXPECT(bad == 0, "%ld of %ld tokens quantized differently", bad, n);
  std::printf("quantizer: %ld random/edge tokens, %ld of them CPU errors (%ld mismatches)\n", n, errors, bad);
}

/** The GPU encoder, emulated: the same block functions, blocks in a loop. */
EncodedBody emulate(const float* x, const Shape& s, TensorKind kind, const pc::Config& c, std::string& error) {
  const pc::Layout l = pc::layoutOf(s, c);
  std::vector<uint8_t> body;
  Args a = argsOf(x, nullptr, s, c, l);
  body.assign(l.fixedBytes() + a.segBound, 0xA5);
  a.body = body.data();
  std::vector<uint64_t> scratch((carveScratch(a, nullptr) + 7) / 8);
  carveScratch(a, reinterpret_cast<uint8_t*>(scratch.data()));
  *a.state = State{0, 0, 0, kNoToken, 0};
  HostExec ex;
  const uint32_t nseg = a.nb * a.H;
  if (a.Tc > 0) {
    for (uint32_t blk = 0; blk < (a.Tc + kTokensPerBlock - 1) / kTokensPerBlock; ++blk) {
      QuantSmem sm{};
      quantizeBlock(ex, a, blk, sm);
    }
    if (c.repack == pc::Repack::Median) {
      std::vector<uint64_t> dyn((medianSmemBytes(a.B) + 7) / 8);
      for (uint32_t b = 0; b < a.nb; ++b) {
        uint32_t maxCode = 0;
        medianBlock(ex, a, b, reinterpret_cast<unsigned char*>(dyn.data()), maxCode);
      }
    } else if (c.repack == pc::Repack::Greedy) {
      std::vector<Quad> dyn((greedySmemBytes(a.B, a.L) + 15) / 16);  // 16-byte aligned, like shared memory
      for (uint32_t b = 0; b < a.nb; ++b) {
        GreedySmem sm{};
        greedyBlock(ex, a, b, reinterpret_cast<unsigned char*>(dyn.data()), sm);
      }
    }
    for (uint32_t sg = 0; sg < nseg; ++sg) {
      StatsSmem sm{};
      statsBlock(ex, a, sg, sm);
    }
    ScanSmem scan{};
    scanBlock(ex, a, scan);
    for (uint32_t sg = 0; sg < nseg; ++sg) {
      SegmentSmem sm{};
      segmentBlock(ex, a, sg, sm);
    }
  }
  unsigned long long nonFinite = 0;
  for (uint64_t i = 0; i < fixedItems(a); ++i) fixedItem(a, i, nonFinite);
  a.state->nonFinite += nonFinite;
  const State st = *a.state;
  EncodedBody out;
  if (st.nonFinite) error = std::to_string(st.nonFinite) + " non-finite";
  else if (st.errToken != kNoToken) error = "token " + std::to_string(st.errToken);
  else if (st.flags) error = "flags " + std::to_string(st.flags);
  if (!error.empty()) return out;
  out.bytes.assign(body.begin(), body.begin() + l.fixedBytes() + st.segTotal);
  // the bytes past the body must be untouched
  for (size_t i = out.bytes.size(); i < body.size(); ++i)
    if (body[i] != 0xA5) {
      error = "wrote past the body at " + std::to_string(i);
      break;
    }
  out.breakdown.payload = st.payload;
  out.breakdown.scales = l.scaleBytes;
  out.breakdown.zeros = l.zeroBytes;
  out.breakdown.residual = l.bufferBytes;
  out.breakdown.metadata = l.offsetBytes + (st.segTotal - st.payload) + l.permBytes;
  return out;
}

double normal(std::mt19937_64& rng) { return std::normal_distribution<double>(0, 1)(rng); }

/** gpu_bench-like K/V data (fp16-rounded), with optional adversarial tokens. */
std::vector<float> makeData(const Shape& s, TensorKind kind, uint64_t seed, bool adversarial) {
  std::mt19937_64 rng(seed);
  std::vector<float> x(s.elements());
  for (uint32_t h = 0; h < s.heads; ++h)
    for (uint32_t t = 0; t < s.tokens; ++t)
      for (uint32_t d = 0; d < s.dim; ++d) {
        double v = kind == TensorKind::Key ? 0.5 * std::sin(0.37 * d) + (d % 32 == 7 ? 10.0 : 1.0) * normal(rng)
                                           : 0.5 * normal(rng);
        x[(size_t(h) * s.tokens + t) * s.dim + d] = halfToFloat(floatToHalf(float(v)));
      }
  if (adversarial)
    for (uint32_t t = 0; t < s.tokens; t += 7) {
      const int kindOf = int(rng() % 5);
      for (uint32_t h = 0; h < s.heads; ++h)
        for (uint32_t d = 0; d < s.dim; ++d) {
          float& v = x[(size_t(h) * s.tokens + t) * s.dim + d];
          if (kindOf == 0) v = 0.75f;                                  // constant token
          else if (kindOf == 1) v = (d + h) % 3 ? 0.f : -0.f;          // signed zeros only
          else if (kindOf == 2) v = (d % 2 ? 1e-40f : -0.f) * (h + 1);  // subnormals and −0
          else if (kindOf == 3 && d == 5) v = 3000.f;                   // one outlier
          else if (kindOf == 4) v = float(int(rng() % 5)) - 2.f;        // few distinct values, −0 included
        }
    }
  return x;
}

void checkEncode(const std::string& spec, const Shape& s, TensorKind kind, uint64_t seed, bool adversarial,
                 uint32_t badToken = kNoToken, float badValue = 0) {
  ParsedSpec ps = parseSpec(spec);
  std::vector<float> x = makeData(s, kind, seed, adversarial);
  if (badToken != kNoToken) x[(size_t(s.heads - 1) * s.tokens + badToken) * s.dim + 3] = badValue;
  const CodecDef& cpu = findCodec("packkv");
  EncodedBody want;
  std::string cpuError, gpuError;
  size_t nonFinite = 0;  // encodeStream rejects these before the codec runs
  for (float v : x) nonFinite += !std::isfinite(v);
  try {
    cpu.check(ps.params, kind, s);
    if (nonFinite) cpuError = std::to_string(nonFinite) + " non-finite";
    else want = cpu.encode(x.data(), s, kind, ps.params);
  } catch (const CodecError& e) {
    cpuError = e.what();
  }
  const Params& p = ps.params;
  const std::string& r = p.text("repack");
  pc::Config c{p.real(kind == TensorKind::Key ? "k_rel" : "v_rel"), uint32_t(p.integer("block")),
               uint32_t(p.integer("buffer")), uint32_t(p.integer("pack")),
               r == "none" ? pc::Repack::None : r == "greedy" ? pc::Repack::Greedy : pc::Repack::Median,
               p.text("zp") == "hp"};
  EncodedBody got = emulate(x.data(), s, kind, c, gpuError);
  bool ok;
  if (!cpuError.empty() || !gpuError.empty()) {
    ok = !cpuError.empty() && !gpuError.empty() && (nonFinite == 0) == (gpuError.find("non-finite") == std::string::npos);
    if (ok && nonFinite) ok = cpuError == gpuError;
    if (ok && gpuError.rfind("token ", 0) == 0)  // the same first failing token as the CPU's message
      ok = cpuError.find(" " + gpuError + ":") != std::string::npos || cpuError.find(" " + gpuError + " ") != std::string::npos;
  } else {
    const Breakdown &g = got.breakdown, &w = want.breakdown;
    ok = got.bytes == want.bytes && g.payload == w.payload && g.metadata == w.metadata && g.scales == w.scales &&
         g.zeros == w.zeros && g.residual == w.residual;
    if (!ok && got.bytes.size() == want.bytes.size()) {
      size_t i = 0;
      while (i < got.bytes.size() && got.bytes[i] == want.bytes[i]) ++i;
      std::printf("  first differing byte %zu of %zu\n", i, got.bytes.size());
    } else if (!ok) {
      std::printf("  sizes %zu (emu) vs %zu (cpu)\n", got.bytes.size(), want.bytes.size());
    }
  }
  std::printf("%-4s %-62s %s H%u T%-5u D%-3u %s %zu bytes%s%s\n", ok ? "ok" : "FAIL", spec.c_str(), kindName(kind),
              s.heads, s.tokens, s.dim, adversarial ? "adv" : "   ", want.bytes.size(),
              cpuError.empty() ? "" : (" cpu: " + cpuError).c_str(), gpuError.empty() ? "" : (" emu: " + gpuError).c_str());
  if (!ok) ++failures;
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
  if (!quick) checkTwins();
  checkQuantizer();
  const char* specs[] = {
      "packkv",
      "packkv:repack=none",
      "packkv:repack=greedy",
      "packkv:repack=none,zp=hp,pack=8",
      "packkv:repack=median,zp=hp,pack=32,block=64",
      "packkv:repack=greedy,zp=hp,pack=8,block=32,buffer=40",
      "packkv:repack=greedy,pack=32,block=128,buffer=128",
      "packkv:repack=median,pack=8,block=128,buffer=200,k_rel=0.02,v_rel=0.03",
      "packkv:repack=greedy,k_rel=0.005,v_rel=0.9,pack=16,block=48,buffer=64",
      "packkv:repack=none,zp=hp,k_rel=0.3,v_rel=0.005,block=16,buffer=16,pack=16",
  };
  const Shape shapes[] = {{2, 1000, 128}, {8, 700, 128}, {3, 333, 64}, {1, 90, 32}, {2, 50, 128}, {2, 200, 33}};
  uint64_t seed = 1;
  for (const char* spec : specs)
    for (const Shape& s : shapes)
      for (TensorKind kind : {TensorKind::Key, TensorKind::Value})
        for (bool adv : {false, true}) checkEncode(spec, s, kind, seed++, adv);
  // errors: the first failing token must be the CPU's (a later token fails too)
  checkEncode("packkv:zp=hp", {2, 1000, 128}, TensorKind::Key, 99, false, 77, -1e6f);
  checkEncode("packkv:zp=hp", {2, 1000, 128}, TensorKind::Value, 98, false, 500, -7e4f);
  checkEncode("packkv:zp=int", {2, 1000, 128}, TensorKind::Key, 97, false, 300, 3e38f);
  checkEncode("packkv:zp=int", {2, 1000, 128}, TensorKind::Key, 96, false, 999, NAN);  // in the buffer
  checkEncode("packkv:zp=hp", {2, 1000, 128}, TensorKind::Key, 95, false, 10, -INFINITY);
  std::printf(failures ? "\n%d FAILURES\n" : "\nall checks passed\n", failures);
  return failures ? 1 : 0;
}
