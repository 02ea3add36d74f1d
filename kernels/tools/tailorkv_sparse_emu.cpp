// Host emulation of TailorKV mode=s q·Kᵀ on the GPU (kernels/tailorkv/cuda_sparse.cuh): the two
// kernels' phases (scoreKernel: approximate scores, linear bins, histogram, boundary; selectKernel:
// tokens above the boundary, candidates, the last block's rank or radix select, exact scores) run as
// loops over blocks and thread ids with the same __host__ __device__ helpers (orderedKey, linBinOf,
// ranksBefore, digitOf, binsSum, findBoundary), and the scores must equal cpu.cpp's bit for bit
// (the selection exactly). Cases: bench-like data, ties (zero query, quantized keys: the radix
// fallback), budget >= offloaded tokens, channels = head_dim, tiny shapes; each case prints how
// many KV heads took the rank, all-candidates and radix paths.
//
//   nvcc -std=c++17 -O2 -x cu -Ikernels -c kernels/tools/tailorkv_sparse_emu.cpp -o /tmp/emu.o && nvcc /tmp/emu.o \
//        build-h4/CMakeFiles/packkv_codecs.dir/kernels/{registry.cpp.o,fp16/cpu.cpp.o,kivi/cpu.cpp.o,tailorkv/cpu.cpp.o} \
//        -o /tmp/tailorkv_sparse_emu && /tmp/tailorkv_sparse_emu
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/half.h"
#include "registry.h"
#include "tailorkv/cuda_sparse.cuh"
#include "tailorkv/format.h"

using namespace packkv;
namespace sp = packkv::tailorkv::sparse;

namespace {

struct PathCounts {
  uint32_t rank = 0, all = 0, radix = 0, none = 0;
};

/** Boundary bin of hist (bins bins) for need, as a block of `threads` threads finds it. */
void boundaryOf(const std::vector<uint32_t>& h, uint32_t bins, uint32_t need, uint32_t threads, uint32_t out[3]) {
  const uint32_t per = bins / threads;
  uint32_t before = 0, found = 0;
  for (uint32_t t = 0; t < threads; ++t) {  // exclusive scan, then each thread's search
    found += sp::findBoundary(h.data(), bins, t, per, before, need, out) ? 1 : 0;
    before += sp::binsSum(h.data(), bins, t, per);
  }
  if (found != 1) std::printf("  boundary found by %u threads (need %u)\n", found, need), std::exit(1);
}

/** radixSelect over the candidates (ck, ci), need of them, from digit 0. */
std::vector<uint32_t> emulateRadix(std::vector<uint64_t> ck, std::vector<uint32_t> ci, uint32_t need) {
  std::vector<uint32_t> hist(sp::kBins), sel;
  uint32_t n = uint32_t(ck.size()), b[3];
  for (uint32_t j = 0;; ++j) {
    if (need == n || j >= sp::kDigits) {
      if (need != n) std::printf("  ran out of digits: need %u of %u\n", need, n), std::exit(1);
      sel.insert(sel.end(), ci.begin(), ci.end());
      break;
    }
    std::fill(hist.begin(), hist.end(), 0);
    for (uint32_t i = 0; i < n; ++i) hist[sp::digitOf(ck[i], ci[i], j)]++;
    boundaryOf(hist, sp::kBins, need, sp::kQkThreads, b);
    std::vector<uint64_t> nk;
    std::vector<uint32_t> ni;
    for (uint32_t i = n; i-- > 0;) {  // reverse order: the GPU's append order is arbitrary
      const uint32_t d = sp::digitOf(ck[i], ci[i], j);
      if (d > b[0]) sel.push_back(ci[i]);
      else if (d == b[0]) nk.push_back(ck[i]), ni.push_back(ci[i]);
    }
    need -= b[1], n = b[2];
    if (nk.size() != n) std::printf("  pass %u: %zu next, want %u\n", j, nk.size(), n), std::exit(1);
    ck.swap(nk), ci.swap(ni);
  }
  return sel;
}

/** scoreKernel's bins + boundary and selectKernel's selection over the scores of one KV head. */
std::vector<uint32_t> emulateSelect(const std::vector<double>& approx, double bound, uint32_t k, uint32_t selChunk,
                                    PathCounts& paths) {
  const uint32_t M = uint32_t(approx.size());
  const double scale = sp::linScaleOf(bound);
  std::vector<uint32_t> hist(sp::kLinBins, 0), bins(M), sel;
  for (uint32_t m = 0; m < M; ++m) hist[bins[m] = sp::linBinOf(approx[m], bound, scale)]++;
  int32_t boundary = -1;
  uint32_t above = M, count = 0, b[3];
  if (k < M) {
    boundaryOf(hist, sp::kLinBins, k, sp::kQkThreads, b);
    boundary = int32_t(b[0]), above = b[1], count = b[2];
  }
  std::vector<uint64_t> ck;
  std::vector<uint32_t> ci;
  for (uint32_t c0 = M; c0 > 0;) {  // select blocks in reverse: the candidates' order is arbitrary
    c0 = c0 > selChunk ? (c0 - 1) / selChunk * selChunk : 0;
    for (uint32_t m = c0; m < std::min(M, c0 + selChunk); ++m) {
      if (int32_t(bins[m]) > boundary) sel.push_back(m);
      else if (int32_t(bins[m]) == boundary) ck.push_back(sp::orderedKey(approx[m])), ci.push_back(m);
    }
  }
  if (sel.size() != above || ck.size() != count) std::printf("  select counts differ\n"), std::exit(1);
  const uint32_t need = k - above, n = uint32_t(ck.size());
  if (need == 0) {
    paths.none++;
  } else if (need == n) {
    paths.all++;
    sel.insert(sel.end(), ci.begin(), ci.end());
  } else if (n <= sp::kRankMax) {
    paths.rank++;
    for (uint32_t t = 0; t < n; ++t) {  // thread t
      uint32_t rank = 0;
      for (uint32_t j = 0; j < n; ++j) rank += sp::ranksBefore(ck[j], ci[j], ck[t], ci[t]) ? 1 : 0;
      if (rank < need) sel.push_back(ci[t]);
    }
  } else {
    paths.radix++;
    std::vector<uint32_t> w = emulateRadix(ck, ci, need);
    sel.insert(sel.end(), w.begin(), w.end());
  }
  if (sel.size() != k) std::printf("  selected %zu, want %u\n", sel.size(), k), std::exit(1);
  return sel;
}

/** scoreKernel + selectKernel for one query step, as the GPU computes them. */
std::vector<float> emulateQk(const StreamView& s, const std::vector<float>& q, uint32_t qHeads, PathCounts& paths) {
  const Shape& sh = s.header.shape;
  const tailorkv::SparseLayout l = tailorkv::sparseLayoutOf(sh, TensorKind::Key, uint32_t(s.params.integer("sinks")),
                                                            uint32_t(s.params.integer("window")));
  const uint32_t D = sh.dim, M = l.hostTokens, G = qHeads / sh.heads, T = sh.tokens;
  const uint32_t budget = uint32_t(s.params.integer("budget")), C = std::min<uint32_t>(s.params.integer("channels"), D);
  const uint32_t k = M > 0 ? std::min(budget, M) : 0;
  const uint16_t* dev = reinterpret_cast<const uint16_t*>(s.body + l.deviceOff);
  const uint16_t* maxAbs = reinterpret_cast<const uint16_t*>(s.body + l.maxAbsOff);
  const uint16_t* host = reinterpret_cast<const uint16_t*>(s.body + l.hostOff);
  std::vector<float> scores(size_t(qHeads) * T, NAN);
  for (uint32_t h = 0; h < sh.heads; ++h) {
    std::vector<double> qbar(D), cs(D), qsel(C);
    std::vector<uint32_t> ch;
    for (uint32_t d = 0; d < D; ++d) {
      double acc = 0.0;
      for (uint32_t g = 0; g < G; ++g) acc += double(q[size_t(h * G + g) * D + d]);
      acc /= double(G);
      qbar[d] = acc;
      cs[d] = std::fabs(acc) * double(halfToFloat(maxAbs[size_t(h) * D + d]));
    }
    for (uint32_t d = 0; d < D; ++d) {  // rank per thread, then the ascending list
      uint32_t rank = 0;
      for (uint32_t j = 0; j < D; ++j) rank += (cs[j] > cs[d] || (cs[j] == cs[d] && j < d)) ? 1 : 0;
      if (rank < C) ch.push_back(d);
    }
    for (uint32_t i = 0; i < C; ++i) qsel[i] = qbar[ch[i]];
    double bound = 0.0;  // scoreKernel's thread 0
    for (uint32_t i = 0; i < C; ++i)
      bound = sp::addRn(bound, sp::mulRn(std::fabs(qsel[i]), double(halfToFloat(maxAbs[size_t(h) * D + ch[i]]))));
    std::vector<double> approx(M);
    for (uint32_t m = 0; m < M; ++m) {
      for (uint32_t g = 0; g < G; ++g) scores[size_t(h * G + g) * T + l.sinks + m] = tailorkv::kMaskedScore;
      double acc = 0.0;
      for (uint32_t i = 0; i < C; ++i) acc += qsel[i] * double(halfToFloat(host[(size_t(h) * D + ch[i]) * M + m]));
      approx[m] = acc;
    }
    std::vector<uint32_t> sel = k ? emulateSelect(approx, bound, k, sp::selectChunkOf(M, k, D), paths) : std::vector<uint32_t>{};
    for (uint32_t r = 0; r < l.deviceTokens + k; ++r) {
      for (uint32_t g = 0; g < G; ++g) {
        double acc = 0.0;
        uint32_t token;
        for (uint32_t d = 0; d < D; ++d) {
          uint16_t kv;
          if (r < l.deviceTokens) kv = dev[(size_t(h) * l.deviceTokens + r) * D + d];
          else kv = host[(size_t(h) * D + d) * M + sel[r - l.deviceTokens]];
          acc += double(q[size_t(h * G + g) * D + d]) * double(halfToFloat(kv));
        }
        token = r < l.deviceTokens ? sp::deviceTokenOf(r, l.sinks, l.window, T) : l.sinks + sel[r - l.deviceTokens];
        scores[size_t(h * G + g) * T + token] = float(acc);
      }
    }
  }
  return scores;
}

float h16(double v) { return halfToFloat(floatToHalf(float(v))); }

bool runCase(const char* name, const std::string& spec, Shape sh, uint32_t qHeads, int kind, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> nd;
  std::vector<float> x(sh.elements()), q(size_t(qHeads) * sh.dim);
  for (size_t i = 0; i < x.size(); ++i) {
    const uint32_t d = uint32_t(i % sh.dim);
    double v = 0.5 * std::sin(0.37 * d) + (d % 32 == 7 ? 10.0 : 1.0) * nd(rng);
    if (kind == 1) v = std::round(v * 2) / 2;  // coarse keys: many tied approximate scores
    x[i] = h16(v);
  }
  for (auto& v : q) v = kind == 2 ? 0.f : h16(0.3 * nd(rng));  // kind 2: zero query, all scores tie
  ParsedSpec ps = parseSpec(spec);
  std::vector<uint8_t> stream = encodeStream(ps, TensorKind::Key, x.data(), sh, nullptr);
  StreamView v = openStream(stream.data(), stream.size());
  std::vector<float> ref(size_t(qHeads) * sh.tokens);
  qkStream(v, q.data(), qHeads, 1, ref.data());
  PathCounts paths;
  std::vector<float> got = emulateQk(v, q, qHeads, paths);
  size_t bad = 0;
  for (size_t i = 0; i < ref.size(); ++i) bad += std::memcmp(&ref[i], &got[i], 4) != 0;
  std::printf("  %-20s %-58s T=%-6u %2u/%u heads D=%-3u  %s (%zu differ)  heads: rank %u, all %u, radix %u, none %u\n",
              name, spec.c_str(), sh.tokens, qHeads, sh.heads, sh.dim, bad ? "FAIL" : "bit-identical", bad, paths.rank,
              paths.all, paths.radix, paths.none);
  return bad == 0;
}

}  // namespace

int main() {
  bool ok = true;
  std::printf("TailorKV mode=s q·Kᵀ: GPU phases emulated on the host vs cpu.cpp\n");
  ok &= runCase("bench-like", "tailorkv:mode=s", {8, 4096, 128}, 32, 0, 1);
  ok &= runCase("bench-like", "tailorkv:mode=s,sinks=64,window=64,budget=896,channels=12", {8, 32768, 128}, 32, 0, 2);
  ok &= runCase("bench-like small", "tailorkv:mode=s,sinks=4,window=28,budget=32,channels=4", {8, 32768, 128}, 32, 0, 3);
  ok &= runCase("coarse keys (ties)", "tailorkv:mode=s,budget=300,channels=2", {4, 8192, 64}, 16, 1, 4);
  ok &= runCase("zero query (all tie)", "tailorkv:mode=s,budget=100", {2, 5000, 64}, 4, 2, 5);
  ok &= runCase("budget >= M", "tailorkv:mode=s,sinks=8,window=8,budget=500", {2, 300, 64}, 6, 0, 6);
  ok &= runCase("channels = D", "tailorkv:mode=s,channels=64,budget=7", {3, 1000, 64}, 3, 0, 7);
  ok &= runCase("no offload", "tailorkv:mode=s,sinks=50,window=50", {2, 64, 64}, 2, 0, 8);
  ok &= runCase("budget 0", "tailorkv:mode=s,budget=0", {2, 700, 64}, 8, 0, 9);
  ok &= runCase("GQA 3", "tailorkv:mode=s,budget=64,channels=5", {2, 3000, 128}, 6, 0, 10);
  std::printf("%s\n", ok ? "all cases bit-identical" : "SOME CASES DIFFER");
  return ok ? 0 : 1;
}
