// Host emulation of the KVComp GPU decoder (kernels/kvcomp/cuda_huffman.cuh) against cpu.cpp: the
// block phases that build the decode tables run as loops over thread ids, segments are staged
// as stageSegment does (MSB-first words from 4-byte-aligned body offsets), and every vector is
// walked with each decoder (full table, first-level table of 1..8 bits, raw) for the lane it
// would run on; the dequantized values must equal the CPU decode bit for bit. It also counts the
// shared-memory wavefronts a warp's lookups cost (32 consecutive vectors in lockstep).
//   g++ -O2 -std=c++17 -Ikernels -I/usr/local/cuda/include kernels/tools/kvcomp_t1_emu.cpp \
//       build-X/CMakeFiles/packkv_codecs.dir/kernels/{*,*/cpu}.cpp.o -lpthread -o kvcomp_t1_emu
#include <cstdio>
#include <cstring>
#include <map>
#include <set>

#include "kvcomp/cuda_huffman.cuh"
#include "kvcomp/format.h"
#include "registry.h"
#include "tools/gpu_bench_support.h"

using namespace packkv;
namespace kg = packkv::kvcomp::gpu;

namespace {

struct Tables {
  std::vector<uint16_t> table = std::vector<uint16_t>(kg::kTableEntries);
  std::vector<uint32_t> t1 = std::vector<uint32_t>(256 * 32);
  uint32_t L = 0;
};

/** prologue(): the five table phases over 256 "threads", then the first level. */
Tables buildTables(const uint8_t* body, const kg::DevLayout& l, uint32_t n1) {
  Tables t;
  t.L = std::min(std::max(l.maxLength, 1u), 12u);
  const uint32_t A = l.alphabet, threads = 256;
  std::vector<uint8_t> lens(A);
  std::vector<uint16_t> sorted(A);
  kg::TableScratch ts{};
  for (uint32_t tid = 0; tid < threads; ++tid) kg::tableLengths(tid, threads, body, A, lens.data());
  for (uint32_t tid = 0; tid < threads; ++tid) kg::tableCount(tid, lens.data(), A, ts);
  for (uint32_t tid = 0; tid < threads; ++tid) kg::tableOffsets(tid, ts);
  for (uint32_t tid = 0; tid < threads; ++tid) kg::tableSort(tid, lens.data(), A, ts, sorted.data());
  for (uint32_t tid = 0; tid < threads; ++tid) kg::tableFill(tid, threads, t.L, ts, sorted.data(), t.table.data());
  if (n1)
    for (uint32_t tid = 0; tid < threads; ++tid)
      kg::tableFirstLevel(tid, threads, t.L, kg::firstLevelBits(t.L, n1), t.table.data(), t.t1.data());
  return t;
}

struct Result {
  bool exact = true;
  double steps = 0, wavefronts = 0, escapes = 0;
};

Result run(const StreamView& v, const std::vector<float>& cpuDecoded, uint32_t n1) {
  const Shape& s = v.header.shape;
  const TensorKind kind = v.header.kind;
  const kvcomp::Geometry g = kvcomp::geometryOf(s, kind, uint32_t(v.params.integer(kind == TensorKind::Key ? "k_block" : "v_block")),
                                                uint32_t(v.params.integer(kind == TensorKind::Key ? "k_recent" : "v_recent")));
  const uint8_t* body = v.body;
  const kg::DevLayout l = kg::layoutFromHeader(body, g.units, g.segments, g.vecsPerSeg);
  Tables t = buildTables(body, l, n1);
  const uint32_t w = kvcomp::rawWidth(l.alphabet);
  const uint32_t* segTab = reinterpret_cast<const uint32_t*>(body + l.segOff);
  const uint16_t* vecBits = reinterpret_cast<const uint16_t*>(body + l.vecOff);
  Result r;
  std::vector<uint32_t> st;
  for (uint32_t seg = 0; seg < g.segments; ++seg) {
    const bool raw = segTab[seg] & kvcomp::kRawSegmentFlag;
    const uint64_t start = l.arenaOff + (segTab[seg] & ~kvcomp::kRawSegmentFlag);
    const uint64_t end = l.arenaOff + (seg + 1 < g.segments ? segTab[seg + 1] & ~kvcomp::kRawSegmentFlag : l.arenaBytes);
    const uint64_t w0 = start >> 2, n = (end + 3) / 4 - w0;
    st.assign(n + 4, 0);
    for (uint64_t k = 0; k < n; ++k) {
      uint32_t val = 0;
      for (uint32_t i = 0; i < 4; ++i)
        if ((w0 + k) * 4 + i < v.bodyBytes) val |= uint32_t(body[(w0 + k) * 4 + i]) << (8 * i);
      st[k] = kg::bswap32(val);
    }
    uint32_t bit = uint32_t(start & 3) * 8;
    const uint32_t b = seg / g.heads, h = seg % g.heads;
    std::vector<std::vector<uint32_t>> syms(g.vecsPerSeg);
    for (uint32_t vv = 0; vv < g.vecsPerSeg; ++vv) {
      kg::Lookup lk{t.table.data(), n1 ? reinterpret_cast<const uint16_t*>(t.t1.data()) : nullptr, t.L,
                    n1 ? kg::firstLevelBits(t.L, n1) : 0, 2 * (vv & 31)};
      auto sink = [&](uint32_t i, uint32_t sym) {
        syms[vv].push_back(sym);
        const uint32_t tok = b * g.block + (kind == TensorKind::Key ? vv : i), d = kind == TensorKind::Key ? i : vv;
        const uint32_t u = kind == TensorKind::Key ? b : tok;
        const float x = kg::dequantExact(sym, kg::zeroPoint(body, l, u), kg::scaleOf(body, l, u));
        if (std::memcmp(&x, &cpuDecoded[(size_t(h) * s.tokens + tok) * s.dim + d], 4) != 0) r.exact = false;
      };
      const uint32_t cap = uint32_t(st.size());
      if (raw) kg::walkVector<true, false>(st.data(), cap, bit, g.symsPerVec, lk, w, sink);
      else if (n1) kg::walkVector<false, true>(st.data(), cap, bit, g.symsPerVec, lk, w, sink);
      else kg::walkVector<false, false>(st.data(), cap, bit, g.symsPerVec, lk, w, sink);
      bit += vecBits[size_t(seg) * g.vecsPerSeg + vv];
    }
    if (raw) continue;
    // Wavefronts per warp-step: distinct words per bank among the lanes' lookups (second-level
    // reads only for the lanes whose code is longer than n1).
    const uint32_t n1b = n1 ? kg::firstLevelBits(t.L, n1) : 0;
    for (uint32_t w0v = 0; w0v + 32 <= g.vecsPerSeg; w0v += 32) {
      std::vector<uint32_t> pos(32);
      uint32_t p0 = uint32_t(start & 3) * 8;
      for (uint32_t vv = 0; vv < w0v; ++vv) p0 += vecBits[size_t(seg) * g.vecsPerSeg + vv];
      for (uint32_t k = 0; k < 32; ++k) {
        pos[k] = p0;
        p0 += vecBits[size_t(seg) * g.vecsPerSeg + w0v + k];
      }
      for (uint32_t i = 0; i < g.symsPerVec; ++i) {
        std::map<uint32_t, std::set<uint32_t>> b1, b2;
        for (uint32_t k = 0; k < 32; ++k) {
          const uint64_t win = (uint64_t(st[pos[k] >> 5]) << 32 | st[(pos[k] >> 5) + 1]) << (pos[k] & 31);
          const uint32_t hi = uint32_t(win >> 32), full = hi >> (32 - t.L);
          const uint16_t e = t.table[full];
          if (n1b) {
            const uint32_t i1 = hi >> (32 - n1b);
            b1[k].insert(((i1 >> 1) << 5) | k);
            if ((e & 15) > n1b) b2[(full >> 1) & 31].insert(full >> 1);
          } else {
            b1[(full >> 1) & 31].insert(full >> 1);
          }
          pos[k] += e & 15;
        }
        size_t m1 = 0, m2 = 0;
        for (auto& x : b1) m1 = std::max(m1, x.second.size());
        for (auto& x : b2) m2 = std::max(m2, x.second.size());
        r.steps += 1;
        r.wavefronts += double(m1 + m2);
        r.escapes += m2 > 0;
      }
    }
  }
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  const uint32_t tokens = argc > 1 ? uint32_t(std::atoi(argv[1])) : 4096;
  bool allOk = true;
  for (uint32_t dim : {128u, 64u, 96u}) {
    Shape s{4, tokens, dim};
    bench::Inputs in = bench::makeInputs(s, 16, 77 + dim);
    for (const char* spec : {"kvcomp", "kvcomp:k_rel=0.01,v_rel=0.01", "kvcomp:k_rel=0.001,v_rel=0.003",
                             "kvcomp:k_rel=0.3,v_rel=0.9,k_block=16,v_block=32,k_recent=32,v_recent=64",
                             "kvcomp:k_block=256,k_recent=512,v_block=256,v_recent=256"}) {
      if (dim != 128 && std::strchr(spec, 'b')) continue;
      for (TensorKind kind : {TensorKind::Key, TensorKind::Value}) {
        ParsedSpec ps = parseSpec(spec);
        const std::vector<float>& x = kind == TensorKind::Key ? in.keys : in.values;
        std::vector<uint8_t> stream = encodeStream(ps, kind, x.data(), s, nullptr);
        StreamView v = openStream(stream.data(), stream.size());
        std::vector<float> ref(s.elements());
        decodeStream(v, ref.data());
        std::printf("dim %3u %-72s %s:", dim, spec, kindName(kind));
        for (uint32_t n1 : {0u, 1u, 4u, 6u, 7u, 8u}) {
          Result r = run(v, ref, n1);
          allOk &= r.exact;
          std::printf("  n1=%u %s wf %.2f esc %.3f", n1, r.exact ? "ok" : "MISMATCH", r.steps ? r.wavefronts / r.steps : 0.0,
                      r.steps ? r.escapes / r.steps : 0.0);
        }
        std::printf("\n");
      }
    }
  }
  std::printf(allOk ? "all bit-identical\n" : "MISMATCHES\n");
  return allOk ? 0 : 1;
}
