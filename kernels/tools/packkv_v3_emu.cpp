// Host emulation of the packkv v3 and v4 tensor-core products' unpack phase (cuda_kernels_v3.cuh,
// cuda_kernels_v4.cuh): builds random segments in the format.h layout (pack widths 0..8, min
// widths 0..8, pack 8/16/32; widths up to 10 for the slow paths), runs each lane's unpack with the
// warp's width scan done in a loop, then reads the f16 tile back the way ldmatrix (.trans for
// q·Kᵀ, plain for p·V) fills mma.m16n8k16's A fragments and checks every element against the
// code + min it must hold (v4: minus the p·V centre), at the slot the epilogue assumes. v4 runs
// its fast path (32-bit "shared" addresses into an emulated array, word-wise widths/mins, SWAR
// prefix of the earlier groups, per-item check) where the device would, else its slow path; the
// test requires the fast path wherever every width is ≤ 8. Also checks that the tile stores and
// the ldmatrix row reads are free of shared-memory bank conflicts.
// Build: g++ -std=c++17 -O2 -Ikernels kernels/tools/packkv_v3_emu.cpp kernels/packkv/cpu.cpp kernels/registry.cpp
#define __host__
#define __device__
#define __forceinline__ inline
#include <cstdio>
#include <cstring>
#include <random>
#include <set>
#include <vector>

#include "packkv/cuda_kernels_v3.cuh"
#include "packkv/cuda_kernels_v4.cuh"
#include "packkv/format.h"

using namespace packkv::packkv_gpu::v3;
using packkv::packkv_codec::BitWriter;

namespace {

constexpr int D = kD;

double halfValue(uint16_t b) {
  const int e = (b >> 10) & 31;
  const double f = e ? 1.0 + (b & 1023) / 1024.0 : (b & 1023) / 1024.0;
  return (b & 0x8000u ? -1.0 : 1.0) * std::ldexp(f, (e ? e : 1) - 15);
}

struct Segment {
  std::vector<uint8_t> bytes;        // the segment as format.h lays it out, plus 32 bytes of slack
  std::vector<uint32_t> code;        // [G·P slots][D]: code − m + m (the value the tile must hold)
};

Segment makeSegment(int G, int P, std::mt19937& rng, int maxW) {
  const int GD = G * D;
  std::vector<uint32_t> w(GD), m(GD);
  std::vector<std::vector<uint32_t>> v(GD, std::vector<uint32_t>(P));
  uint32_t maxMin = 0;
  for (int i = 0; i < GD; ++i) {
    w[i] = rng() % (maxW + 1);
    m[i] = rng() % 200;
    if (rng() % 7 == 0) m[i] = 0;
    maxMin = std::max(maxMin, m[i]);
    for (int k = 0; k < P; ++k) v[i][k] = w[i] ? rng() & ((1u << w[i]) - 1u) : 0;
  }
  const uint32_t mw = packkv::packkv_codec::bitLength(maxMin);
  Segment s;
  s.bytes.push_back(uint8_t(mw));
  BitWriter bw{s.bytes};
  for (int i = 0; i < GD; ++i) bw.put(w[i], 4);
  bw.flush();
  for (int i = 0; i < GD; ++i) bw.put(m[i], mw);
  bw.flush();
  for (int i = 0; i < GD; ++i)
    for (int k = 0; k < P; ++k) bw.put(v[i][k], w[i]);
  bw.flush();
  s.bytes.resize(s.bytes.size() + 32, 0xA5);
  s.code.resize(size_t(G) * P * D);
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < D; ++c)
      for (int k = 0; k < P; ++k) s.code[size_t(g * P + k) * D + c] = v[g * D + c][k] + m[g * D + c];
  return s;
}

int failures = 0;
void expect(bool ok, const char* what, int a, int b, int c) {
  if (!ok && ++failures <= 10) std::printf("FAIL %s (%d %d %d)\n", what, a, b, c);
}

/** The 8 f16 values ldmatrix delivers to `lane` for register j, given per-lane row addresses. */
uint16_t tileHalf(const std::vector<uint8_t>& tile, uint32_t rowAddr, int col) {
  uint16_t h;
  std::memcpy(&h, tile.data() + rowAddr + 2 * col, 2);
  return h;
}

int fastItems = 0, slowItems = 0;

/** Checks a filled tile of item g through both ldmatrix read patterns: element = code − centre. */
template <int P>
void checkTile(const std::vector<uint8_t>& tile, const Segment& seg, int g, int centre);

template <int P>
void run(std::mt19937& rng, int G, int maxW) {
  Segment seg = makeSegment(G, P, rng, maxW);
  // Copy to a 4-byte-misaligned position as in a staged buffer (segments start anywhere).
  const int shift = int(rng() % 4);
  std::vector<uint32_t> words((seg.bytes.size() + shift + 3) / 4 + 1, 0);
  uint8_t* base = reinterpret_cast<uint8_t*>(words.data()) + shift;
  std::memcpy(base, seg.bytes.data(), seg.bytes.size());
  const uint32_t* limit = words.data() + words.size();
  const Seg3 s = seg3At(base, uint32_t(G * D), limit);
  for (int g = 0; g < G; ++g) {
    std::vector<uint8_t> tile(tileBytes(P), 0xEE);
    uint32_t pre = 0;
    for (int i = 0; i < g * D; ++i) pre += nibbleAt(s.widths, uint32_t(i));
    uint32_t run = 0;
    std::set<std::pair<int, int>> stores;  // (store instruction, lane group) -> slots, for conflicts
    for (int lane = 0; lane < 32; ++lane) {
      unpackLane<P>(s, g, lane, uint32_t(P / 8) * (pre + run), tile.data());
      run += laneWidths(s, g, lane);
    }
    // Bank conflicts of the stores: per (pack j, chunk k), 8-lane phases hit 8 distinct 16 B slots.
    for (int j = 0; j < kLanePacks; ++j)
      for (int k = 0; k < P / 8; ++k)
        for (int ph = 0; ph < 4; ++ph) {
          std::set<uint32_t> slots;
          for (int l = ph * 8; l < ph * 8 + 8; ++l) slots.insert((rowOffset(l * kLanePacks + j, k & 1) / 16) % 8);
          expect(slots.size() == 8, "store bank conflict", j, k, ph);
        }
    checkTile<P>(tile, seg, g, 0);
  }
  // v4: the segment and a tile in the emulated shared memory (u32 addresses = offsets).
  std::vector<uint8_t> smem(4 + seg.bytes.size() + 64 + tileBytes(P), 0x5A);
  const uint32_t segAddr = uint32_t(rng() % 4), tileAddr = uint32_t((segAddr + seg.bytes.size() + 15) & ~size_t(15));
  std::copy(seg.bytes.begin(), seg.bytes.end(), smem.begin() + segAddr);
  packkv::packkv_gpu::v4::emuSmem() = smem.data();
  const packkv::packkv_gpu::v4::Seg4 s4 = packkv::packkv_gpu::v4::seg4At(segAddr, uint32_t(G * D));
  const Seg3 s3 = seg3At(smem.data() + segAddr, uint32_t(G * D), nullptr);
  for (int g = 0; g < G; ++g) {
    namespace v4 = packkv::packkv_gpu::v4;
    const int centre = rng() % 3 == 0 ? 0 : int(rng() % (2 * v4::kMaxCentre + 1)) - v4::kMaxCentre;
    std::fill(smem.begin() + tileAddr, smem.begin() + tileAddr + tileBytes(P), 0xEE);
    v4::LaneMeta m[32];
    bool bad = s4.mw > 10, anyWide = false;
    uint32_t earlier = 0;
    for (int lane = 0; lane < 32; ++lane) {
      m[lane] = v4::laneMeta(s4, g, lane);
      bad = bad || m[lane].bad, earlier += m[lane].earlier;
      for (int j = 0; j < kLanePacks; ++j) anyWide = anyWide || nibbleAt(s3.widths, uint32_t(g * D + lane * kLanePacks + j)) > 8;
    }
    expect(bad == anyWide, "v4 fast-path check", g, int(bad), int(anyWide));
    uint32_t pre = 0;  // v3's prefix, for the slow path and as a check of the SWAR sum
    for (int i = 0; i < g * D; ++i) pre += nibbleAt(s3.widths, uint32_t(i));
    expect(earlier == pre, "v4 earlier-group width sum", g, int(earlier), int(pre));
    uint32_t run = 0;
    for (int lane = 0; lane < 32; ++lane) {
      if (!bad)
        v4::unpackLaneFast<P>(s4, g, lane, m[lane].wbits, uint32_t(P / 8) * (earlier + run), tileAddr, centre);
      else
        v4::unpackLaneSlow<P>(s3, g, lane, uint32_t(P / 8) * (pre + run), smem.data() + tileAddr, centre);
      run += v4::ownWidths(m[lane].wbits);
    }
    (bad ? slowItems : fastItems)++;
    checkTile<P>(std::vector<uint8_t>(smem.begin() + tileAddr, smem.begin() + tileAddr + tileBytes(P)), seg, g, centre);
  }
}

template <int P>
void checkTile(const std::vector<uint8_t>& tile, const Segment& seg, int g, int centre) {
  constexpr int MT = P >= 16 ? P / 16 : 1;
  {
    // q·Kᵀ: ldmatrix.x4.trans, lane gives row (channel (lane>>4)·8 + lane%8, half (lane>>3)&1).
    for (int mt = 0; mt < MT; ++mt)
      for (int kb = 0; kb < D / 16; ++kb) {
        uint32_t addr[32];
        for (int lane = 0; lane < 32; ++lane) {
          const int ch = (lane >> 4) * 8 + (lane & 7), half = P >= 16 ? (lane >> 3) & 1 : 0;
          const uint32_t even = rowOffset(ch, half), odd = rowOffset(16 + ch, half) - 16 * 32;
          addr[lane] = uint32_t(mt * D * 32 + kb * 16 * 32) + ((kb & 1) ? odd : even);
          expect(addr[lane] == uint32_t(mt * D * 32) + rowOffset(kb * 16 + ch, half), "trans address", mt, kb, lane);
        }
        for (int j = 0; j < 4; ++j) {
          std::set<uint32_t> slots;
          for (int r = 0; r < 8; ++r) slots.insert((addr[8 * j + r] / 16) % 8);
          expect(slots.size() == 8, "ldmatrix.trans bank conflict", mt, kb, j);
        }
        for (int t = 0; t < 32; ++t) {
          const int gr = t >> 2, tig = t & 3;
          for (int j = 0; j < 4; ++j)
            for (int e = 0; e < 2; ++e) {
              // .trans: thread t gets (stored row 2·tig + e, column gr) of matrix j.
              const uint16_t hv = tileHalf(tile, addr[8 * j + 2 * tig + e], gr);
              // A fragment j: row = gr + 8·(j&1), k = 2tig + e + 8·(j>>1).
              const int row = gr + 8 * (j & 1), kk = 2 * tig + e + 8 * (j >> 1);
              if (P < 16 && row >= 8) continue;  // duplicate rows, not written out
              const int slot = g * P + mt * 16 + (row >> 3) * 8 + slotAt(row & 7), ch = kb * 16 + kk;
              expect(halfValue(hv) == double(seg.code[size_t(slot) * D + ch]) - centre, "q·Kᵀ A element", slot, ch, t);
            }
        }
      }
    // p·V: ldmatrix.x4, lane gives row (channel ((lane>>3)&1)·8 + lane%8, half lane>>4).
    for (int mt = 0; mt < MT; ++mt)
      for (int mc = 0; mc < D / 16; ++mc) {
        uint32_t addr[32];
        for (int lane = 0; lane < 32; ++lane) {
          const int ch = ((lane >> 3) & 1) * 8 + (lane & 7), half = P >= 16 ? lane >> 4 : 0;
          const uint32_t even = rowOffset(ch, half), odd = rowOffset(16 + ch, half) - 16 * 32;
          addr[lane] = uint32_t(mt * D * 32 + mc * 16 * 32) + ((mc & 1) ? odd : even);
        }
        for (int j = 0; j < 4; ++j) {
          std::set<uint32_t> slots;
          for (int r = 0; r < 8; ++r) slots.insert((addr[8 * j + r] / 16) % 8);
          expect(slots.size() == 8, "ldmatrix bank conflict", mt, mc, j);
        }
        for (int t = 0; t < 32; ++t) {
          const int gr = t >> 2, tig = t & 3;
          for (int j = 0; j < 4; ++j)
            for (int e = 0; e < 2; ++e) {
              const uint16_t hv = tileHalf(tile, addr[8 * j + gr], 2 * tig + e);  // (row gr, cols 2tig+e)
              const int row = gr + 8 * (j & 1), kk = 2 * tig + e + 8 * (j >> 1);  // row = channel, k = position
              if (P < 16 && kk >= 8) continue;  // B rows 8..15 are zero for P = 8
              // B fragment slots: position kk -> slot (kk>>3)·8 + slotAt(kk&7): tig, tig+4, 8+tig, 12+tig.
              const int slot = g * P + mt * 16 + (kk >> 3) * 8 + slotAt(kk & 7), ch = mc * 16 + row;
              expect(halfValue(hv) == double(seg.code[size_t(slot) * D + ch]) - centre, "p·V A element", slot, ch, t);
            }
        }
      }
  }
}

}  // namespace

int main() {
  std::mt19937 rng(12345);
  // B fragment slot order used by pvKernel: k = 2tig, 2tig+1, 2tig+8, 2tig+9.
  for (int tig = 0; tig < 4; ++tig) {
    expect(slotAt(2 * tig) == tig && slotAt(2 * tig + 1) == tig + 4, "B slots", tig, 0, 0);
  }
  for (int rep = 0; rep < 40; ++rep) {
    const int maxW = rep % 5 == 0 ? 8 : rep % 5 == 1 ? 3 : rep % 5 == 2 ? 0 : rep % 5 == 3 ? 5 : 10;  // 10: slow path
    run<8>(rng, 1 + rep % 8, maxW);
    run<16>(rng, 1 + rep % 4, maxW);
    run<32>(rng, 1 + rep % 2, maxW);
  }
  // halfBitsOfInt / hsub2Bits host models.
  for (uint32_t v = 0; v <= 2048; ++v) expect(halfValue(uint16_t(halfBitsOfInt(v))) == double(v), "halfBitsOfInt", v, 0, 0);
  // v4 host models: signed f16 integers and exact f16x2 subtraction with negative results.
  for (int v = -2048; v <= 2048; ++v)
    expect(halfValue(uint16_t(packkv::packkv_gpu::v4::halfBitsOfSigned(v))) == double(v), "halfBitsOfSigned", v, 0, 0);
  expect(fastItems > 0 && slowItems > 0, "v4 fast and slow paths both taken", fastItems, slowItems, 0);
  std::printf("v4 items: %d fast, %d slow\n", fastItems, slowItems);
  std::printf("%s (%d failures)\n", failures ? "FAILED" : "all ok", failures);
  return failures ? 1 : 0;
}
