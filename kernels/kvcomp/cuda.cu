// KVComp on the GPU: decode (bit-identical to cpu.cpp) and the fused products q·Kᵀ / p·V straight
// from the Huffman-coded stream, all query heads of a layer in one launch.
//
// Work split (both kinds): a block owns one KV head (blockIdx.y) and walks token blocks b =
// blockIdx.x·spb + slot, ..., spb segments at a time (one slot per segment, one thread per vector
// of the segment: K a token's head_dim codes, V a channel's v_block codes). Per block, once: the
// 4096-entry canonical decode table is built in shared memory from the stream's code lengths.
// Per segment: its bytes are staged into shared memory with coalesced 4-byte loads (byte-swapped
// to MSB-first words), each vector's first bit is the segment start plus an exclusive scan of the
// u16 vector bit counts, and each thread walks its vector with one table lookup per code, turns
// the code into (code + zp) exactly in fp32 (magic-number conversion, no I2F), and multiplies it
// into every query head of the GQA group (q or p·scale read once from shared memory as a
// broadcast). The decoded tensor never touches global memory.
//   q·Kᵀ: score[t] = scale_b · Σ_d q_d (c_td + zp_b), one thread per token; fp16 tail tokens by
//         extra blocks, a warp per token (lanes over channels, shuffle sums).
//   p·V:  out[d] = Σ_t (p_t scale_t)(c_td + zp_t), one thread per channel; extra blocks take the
//         fp16 tail in 32-token chunks; each block writes one [G][D] partial (its slots added in
//         order) to the workspace, and the last blocks to finish add them in a fixed order, in
//         two levels (pvFinishHead, common/last_block.cuh addPartials; no second kernel).
// The decode loop takes codes two at a time between bit-buffer refills (two codes <= 24 bits), so
// its one divergent branch runs once per pair: the loop is bound by instructions per code.
// Tensor-core path (qkMmaKernel / pvMmaKernel; head_dim = v_block = 128, the bench's geometry):
// a 32-bit decode table (length + fp16 of symbol - center), a branch-free fully unrolled walk of
// two codes per 32-bit window (kg::PairReader, ~9.5 SASS instructions per code instead of ~20),
// four codes per lane per mma.m16n8k16 with a block-diagonal A (q, or p·scale split into fp16
// hi + lo), the zero point folded once per vector (K) or per segment (V), and the segment bytes
// double-buffered with cp.async so the next group's loads fly while this one decodes. Window
// words and A fragments are read only by the lanes that need them (PACKKV_KVCOMP_PRED; -8% time
// at 128k), the coded blocks take the fp16 tail (q·Kᵀ always, p·V when tail blocks would spill
// into a second wave), and V's staging holds raw codes of floor(1/rel) + 3 symbols (was one bit
// more), which gives it a third block per SM. Both issue their first group's loads before they
// build the decode table (buildTables; its scratch is the second staging buffer), so the table
// build overlaps the offset-table and segment loads (q·Kᵀ -20% at 4k, -8% at 32k tokens). Bound
// (ncu, 128k): q·Kᵀ by the decode table's shared-memory bank conflicts (pipe 88% busy), p·V by
// issue (0.53 per scheduler, 21 warps per SM).
// PACKKV_KVCOMP_MMA=0 selects the scalar kernels.
// encode runs on the GPU (cuda_encode.cuh), byte for byte cpu.cpp's body; bodyBytes() is an upper
// bound, since a Huffman body's size depends on data.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "common/cuda_check.h"
#include "common/gpu_codec.h"
#include "common/last_block.cuh"
#include "common/layout.h"
#include "kvcomp/cuda_encode.cuh"
#include "kvcomp/cuda_huffman.cuh"
#include "kvcomp/format.h"
#include "registry.h"

namespace packkv {
namespace {

using kvcomp::Geometry;
namespace kg = kvcomp::gpu;

[[noreturn]] void fail(const std::string& m) { throw CodecError("codec 'kvcomp' on the GPU: " + m); }

extern __shared__ __align__(16) uint8_t kvcSmem[];

constexpr uint32_t kTableBytes = kg::kTableEntries * 2;      // u16 entries (scalar decoders)
constexpr uint32_t kTable32Bytes = kg::kTableEntries * 4;    // u32 entries (tensor-core products)
constexpr uint32_t kPairFirstBytes = 256 * 4;                 // the pair table's first level, up to 8 bits
static_assert(kg::kPairEntries == kg::kTableEntries, "the pair table reuses the 32-bit table's room");
constexpr uint32_t kStagePadBytes = 256;  // slack after the staging area for decodePair's unchecked reads
constexpr uint32_t kScratchBytes = 512;  // TableScratch + 32 warp totals
constexpr uint32_t kMagic = 0x4B000000u;  // float bits of 2^23: (2^23 + c) for integer c < 2^23

/** What one launch needs: geometry, shared-memory plan and grid. */
struct Args {
  const uint8_t* body;
  uint64_t bodyBytes, tailOff;
  Geometry g;
  uint32_t T;
  uint32_t spb, capWords, alphaLimit, nx;
  uint32_t stageBytes;    // the staging area (16-byte multiple), from a.stOff to the end of shared memory
  uint32_t ntail;        // p·V: blocks per KV head over the fp16 tail (after the nx coded ones)
  uint32_t n1max;        // bits of the first-level decode table (0: full table only)
  uint32_t tableBytes;   // kTableBytes, or kTable32Bytes on the tensor-core path
  bool mma;              // the tensor-core product kernels (plan(): 128 codes per vector, whole warps per slot)
  bool pred;             // tensor-core path: predicated window / fragment loads (PACKKV_KVCOMP_PRED, default on)
  uint32_t pairBits;     // tensor-core path: pair table with a first level of this many bits (12: none; 0: off)
  uint32_t wOff, stOff;  // byte offsets of the weights and the staging area in shared memory
  const uint16_t* in;    // q f16 [qHeads][D] or p f16 [qHeads][T] of this query step
  float* out;            // scores [qHeads][T], p·V out [qHeads][D], or the decoded tensor
  float* partial;        // p·V: f32 [heads][nx + ntail][G][D], one slice per block
  unsigned* counters;    // p·V: gpu::addPartials' counters, zero between launches
};

constexpr uint32_t kMmaCodes = 128;  // codes per vector on the tensor-core path (head_dim for K, v_block for V)
constexpr uint32_t kMmaThreads = 256;  // block size of the tensor-core kernels (plan(): spb · vectors per segment)
constexpr uint32_t kMmaSteps = kMmaCodes / 4;
constexpr uint32_t kFragTileWords = kMmaSteps * kg::kFragStepWords;  // A fragments of one 16-row tile
__host__ __device__ constexpr uint32_t mmaTiles(uint32_t group) { return (4 * group + 15) / 16; }

// ---- device pieces ---------------------------------------------------------------------------

__device__ __forceinline__ uint32_t rawWidthD(uint32_t alphabet) {
  uint32_t w = 1;
  while (w < 12 && (1u << w) < alphabet) ++w;
  return w;
}

/**
 * Per block, once: the decode tables in shared memory from the stream's code lengths (lay: from
 * its header). scratch holds the lengths and the sorted symbols (and the pair fill's u16 table)
 * and is free again afterwards: the staging area's start (prologue), or its second buffer on the
 * tensor-core path, whose first group of segments is already loading into the first.
 */
__device__ void buildTables(const Args& a, const kg::DevLayout& lay, uint8_t* scratch, kg::Lookup& lk, uint32_t& w) {
  const uint32_t L = min(max(lay.maxLength, 1u), 12u);
  w = rawWidthD(lay.alphabet);
  const uint32_t A = min(min(lay.alphabet, a.alphaLimit), kg::kMaxAlphabet);
  uint16_t* table = reinterpret_cast<uint16_t*>(kvcSmem);
  kg::TableScratch& ts = *reinterpret_cast<kg::TableScratch*>(kvcSmem + a.tableBytes);
  uint8_t* lens = scratch;
  uint16_t* sorted = reinterpret_cast<uint16_t*>(scratch + (A + 15) / 16 * 16);
  const uint32_t tid = threadIdx.x, n = blockDim.x;
  kg::tableLengths(tid, n, a.body, A, lens);
  __syncthreads();
  kg::tableCount(tid, lens, A, ts);
  __syncthreads();
  kg::tableOffsets(tid, L, ts);
  __syncthreads();
  kg::tableSort(tid, n, lens, A, ts, sorted);
  __syncthreads();
  // the pair table when the stream's alphabet allows it (block-uniform: the header's alphabet)
  lk.paired = a.pairBits != 0 && lay.alphabet <= kg::kPairAlphabet;
  if (lk.paired) {  // the u16 table in the scratch, then the pairs from it
    uint16_t* single = reinterpret_cast<uint16_t*>(scratch + (3 * A + 31) / 16 * 16);
    kg::tableFill(tid, n, L, ts, sorted, single);
    __syncthreads();
    kg::tablePairFill(tid, n, L, single, kg::symbolCenter(lay.alphabet), reinterpret_cast<uint32_t*>(kvcSmem));
  } else if (a.mma && !a.n1max) {
    uint32_t* table32 = reinterpret_cast<uint32_t*>(kvcSmem);
    if (!ts.complete) {  // block-uniform (published by the sort's barrier); only corrupt codebooks
      kg::tableClear32(tid, n, L, kg::symbolCenter(lay.alphabet), table32);
      __syncthreads();
    }
    kg::tableFill32(tid, n, L, ts, sorted, kg::symbolCenter(lay.alphabet), table32);
  } else {
    kg::tableFill(tid, n, L, ts, sorted, table);
  }
  __syncthreads();
  lk.table = table;
  lk.L = L;
  lk.lane2 = 2 * (tid & 31);
  lk.t1 = nullptr;
  lk.n1 = 0;
  if (lk.paired) {
    lk.n1 = a.pairBits;
    if (a.pairBits < kg::kPairBits) {
      uint32_t* t1 = reinterpret_cast<uint32_t*>(kvcSmem + kTable32Bytes);
      kg::tablePairFirst(tid, n, a.pairBits, reinterpret_cast<const uint32_t*>(kvcSmem), t1);
      lk.t1 = reinterpret_cast<const uint16_t*>(t1);
      __syncthreads();
    } else {
      lk.t1 = table;  // no first level: the pair table itself, 12 bits
    }
    return;
  }
  if (a.n1max) {
    uint32_t* t1 = reinterpret_cast<uint32_t*>(kvcSmem + a.tableBytes + kScratchBytes);
    lk.n1 = kg::firstLevelBits(L, a.n1max);
    if (a.mma) kg::tableFirstLevel32(tid, n, L, lk.n1, table, kg::symbolCenter(lay.alphabet), t1);
    else kg::tableFirstLevel(tid, n, L, lk.n1, table, t1);
    lk.t1 = reinterpret_cast<const uint16_t*>(t1);
    __syncthreads();
  }
}

/** Per block, once: the stream's layout and its decode tables (scratch at the staging area). */
__device__ void prologue(const Args& a, kg::DevLayout& lay, kg::Lookup& lk, uint32_t& w) {
  lay = kg::layoutFromHeader(a.body, a.g.units, a.g.segments, a.g.vecsPerSeg);
  buildTables(a, lay, kvcSmem + a.stOff, lk, w);
}

/** One vector through the right decoder: raw w-bit fields, first-level + full table, or full table. */
template <typename Sink>
__device__ __forceinline__ void walk(bool raw, const uint32_t* st, uint32_t capWords, uint32_t bit, uint32_t n,
                                     const kg::Lookup& lk, uint32_t w, Sink&& sink) {
  if (raw) kg::walkVector<true, false>(st, capWords, bit, n, lk, w, sink);
  else if (lk.t1) kg::walkVector<false, true>(st, capWords, bit, n, lk, w, sink);
  else kg::walkVector<false, false>(st, capWords, bit, n, lk, w, sink);
}

/** Copies segment `seg` into st (threads v of nv of its slot); returns its first bit in st. */
__device__ uint32_t stageSegment(const Args& a, const kg::DevLayout& lay, uint32_t seg, uint32_t* st, uint32_t v,
                                 uint32_t nv, bool& raw) {
  const uint32_t* segTab = reinterpret_cast<const uint32_t*>(a.body + lay.segOff);
  const uint32_t e = __ldg(segTab + seg);
  raw = (e & kvcomp::kRawSegmentFlag) != 0;
  const uint64_t start = e & ~kvcomp::kRawSegmentFlag;
  const uint64_t end = seg + 1 < a.g.segments ? (__ldg(segTab + seg + 1) & ~kvcomp::kRawSegmentFlag) : lay.arenaBytes;
  const uint64_t absStart = lay.arenaOff + start;
  const uint64_t absEnd = min(max(lay.arenaOff + end, absStart), a.bodyBytes);
  const uint64_t w0 = absStart >> 2;
  const uint64_t w1 = (absEnd + 3) / 4, avail = w1 > w0 ? w1 - w0 : 0;
  const uint32_t n = uint32_t(avail < a.capWords - 4 ? avail : a.capWords - 4);
  for (uint32_t k = v; k < n + 4; k += nv) {
    uint32_t val = 0;
    if (k < n) {
      const uint64_t byte = (w0 + k) * 4;
      if (byte + 4 <= a.bodyBytes) {
        val = __ldg(reinterpret_cast<const uint32_t*>(a.body + byte));
      } else {
        for (uint32_t i = 0; i < 4; ++i)
          if (byte + i < a.bodyBytes) val |= uint32_t(a.body[byte + i]) << (8 * i);
      }
    }
    st[k] = kg::bswap32(val);
  }
  return uint32_t(absStart & 3) * 8;
}

/**
 * Exclusive scan of x over the vecs threads of a slot (vecs = 16 or a multiple of 32). The lane's
 * place in its segment is lane & (width - 1) (width 16 or 32) and the slot's first warp comes from
 * a shift when vecs / 32 is a power of two: no integer division (a runtime % in the shuffle loop
 * cost ~130 instructions per warp and segment, ~7% of q·Kᵀ's instructions, in the SASS).
 */
__device__ uint32_t slotScan(uint32_t x, uint32_t vecs, uint32_t* warpTotals) {
  const uint32_t tid = threadIdx.x, lane = tid & 31, width = vecs < 32 ? vecs : 32, inSeg = lane & (width - 1);
  uint32_t inc = x;
#pragma unroll
  for (uint32_t o = 1; o < 32; o <<= 1) {
    const uint32_t y = __shfl_up_sync(0xffffffffu, inc, o, width);
    if (inSeg >= o) inc += y;  // o >= width never passes: inSeg < width
  }
  if (vecs <= 32) return inc - x;
  const uint32_t warp = tid >> 5, wps = vecs >> 5;
  if (lane == 31) warpTotals[warp] = inc;
  __syncthreads();
  uint32_t add = 0;
  const uint32_t first = (wps & (wps - 1)) == 0 ? warp & ~(wps - 1) : warp / wps * wps;
  for (uint32_t k = first; k < warp; ++k) add += warpTotals[k];
  return inc - x + add;
}

template <int G>
__device__ __forceinline__ void loadWeights(const float* p, float (&w)[G]) {
  if constexpr (G == 1) {
    w[0] = p[0];
  } else if constexpr (G == 2) {
    const float2 v = *reinterpret_cast<const float2*>(p);
    w[0] = v.x, w[1] = v.y;
  } else {
#pragma unroll
    for (int k = 0; k < G; k += 4) {
      const float4 v = *reinterpret_cast<const float4*>(p + k);
      w[k] = v.x, w[k + 1] = v.y, w[k + 2] = v.z, w[k + 3] = v.w;
    }
  }
}

__device__ __forceinline__ float codeValue(uint32_t sym, float bias) {
  return __fadd_rn(__uint_as_float(kMagic | sym), bias);  // (2^23 + c) + (zp - 2^23) = c + zp, exact
}

__device__ __forceinline__ float biasOf(int64_t zp) { return __fsub_rn(float(zp), 8388608.f); }

__device__ __forceinline__ float tailAt(const Args& a, uint32_t h, uint32_t t, uint32_t d) {
  const uint16_t* tail = reinterpret_cast<const uint16_t*>(a.body + a.tailOff);
  return kg::halfBitsToFloat(__ldg(tail + (size_t(h) * a.g.tailTokens + t) * a.g.dim + d));
}

// ---- q·Kᵀ ------------------------------------------------------------------------------------

/** fp16 tail tokens of KV head h, a warp per token: lanes over channels, shuffle sums per head. */
template <int G>
__device__ void qkTail(const Args& a, const float* qs, uint32_t h) {
  const uint32_t lane = threadIdx.x & 31, warps = blockDim.x / 32, D = a.g.dim;
  for (uint32_t t = (blockIdx.x - a.nx) * warps + threadIdx.x / 32; t < a.g.tailTokens;
       t += (gridDim.x - a.nx) * warps) {
    float acc[G] = {};
    for (uint32_t d = lane; d < D; d += 32) {
      const float x = tailAt(a, h, t, d);
      float wq[G];
      loadWeights<G>(qs + d * G, wq);
#pragma unroll
      for (int j = 0; j < G; ++j) acc[j] = fmaf(wq[j], x, acc[j]);
    }
#pragma unroll
    for (int j = 0; j < G; ++j)
      for (uint32_t o = 16; o > 0; o >>= 1) acc[j] += __shfl_xor_sync(0xffffffffu, acc[j], o);
    if (lane < G) {
      float mine = acc[0];
#pragma unroll
      for (int j = 1; j < G; ++j) mine = lane == uint32_t(j) ? acc[j] : mine;
      a.out[(size_t(h) * G + lane) * a.T + a.g.codedTokens + t] = mine;
    }
  }
}

template <int G>
__global__ void __launch_bounds__(1024) qkKernel(Args a) {
  const uint32_t h = blockIdx.y, tid = threadIdx.x, D = a.g.dim, T = a.T;
  float* qs = reinterpret_cast<float*>(kvcSmem + a.wOff);  // [D][G]
  for (uint32_t idx = tid; idx < D * G; idx += blockDim.x)
    qs[idx] = kg::halfBitsToFloat(a.in[(size_t(h) * G + idx % G) * D + idx / G]);
  if (blockIdx.x >= a.nx) {  // fp16 tail tokens
    __syncthreads();
    qkTail<G>(a, qs, h);
    return;
  }
  kg::DevLayout lay;
  kg::Lookup lk;
  uint32_t w;
  prologue(a, lay, lk, w);
  uint32_t* warpTotals = reinterpret_cast<uint32_t*>(kvcSmem + a.tableBytes + sizeof(kg::TableScratch));
  const uint32_t vecs = a.g.vecsPerSeg, slot = tid / vecs, v = tid % vecs;
  uint32_t* st = reinterpret_cast<uint32_t*>(kvcSmem + a.stOff) + size_t(slot) * a.capWords;
  const uint16_t* vecBits = reinterpret_cast<const uint16_t*>(a.body + lay.vecOff);
  for (uint32_t bg = blockIdx.x; bg * a.spb < a.g.blocks; bg += a.nx) {
    const uint32_t b = bg * a.spb + slot, seg = b * a.g.heads + h;
    const bool active = b < a.g.blocks;
    __syncthreads();  // the previous segments are done with the staging area
    bool raw = false;
    uint32_t bit = 0, x = 0;
    if (active) {
      bit = stageSegment(a, lay, seg, st, v, vecs, raw);
      x = __ldg(vecBits + size_t(seg) * vecs + v);
    }
    bit += slotScan(x, vecs, warpTotals);
    __syncthreads();
    if (!active) continue;
    const float bias = biasOf(kg::zeroPoint(a.body, lay, b)), sc = kg::scaleOf(a.body, lay, b);
    float acc[G] = {};
    auto sink = [&](uint32_t i, uint32_t sym) {
      const float c = codeValue(sym, bias);
      float wq[G];
      loadWeights<G>(qs + i * G, wq);
#pragma unroll
      for (int j = 0; j < G; ++j) acc[j] = fmaf(wq[j], c, acc[j]);
    };
    walk(raw, st, a.capWords, bit, D, lk, w, sink);
    const uint32_t t = b * a.g.block + v;
#pragma unroll
    for (int j = 0; j < G; ++j) a.out[(size_t(h) * G + j) * T + t] = __fmul_rn(sc, acc[j]);
  }
}

// ---- p·V -------------------------------------------------------------------------------------

constexpr uint32_t kPvTailChunk = 32;  // fp16 tail tokens per p·V tail block

/**
 * Writes this block's [G][D] partial: the slots' sums added in slot order (deterministic) through
 * shared memory at `red` (spb * G * D floats, free by now).
 */
template <int G>
__device__ void pvWritePartial(const Args& a, uint32_t h, const float (&acc)[G], float* red) {
  const uint32_t D = a.g.dim, slot = threadIdx.x / D, d = threadIdx.x % D;
  __syncthreads();
#pragma unroll
  for (int j = 0; j < G; ++j) red[(size_t(slot) * G + j) * D + d] = acc[j];
  __syncthreads();
  float* out = a.partial + (size_t(h) * (a.nx + a.ntail) + blockIdx.x) * G * D;
  for (uint32_t idx = threadIdx.x; idx < G * D; idx += blockDim.x) {
    float sum = red[idx];
    for (uint32_t k = 1; k < a.spb; ++k) sum += red[size_t(k) * G * D + idx];
    out[idx] = sum;
  }
}

/**
 * After the block's partial slice is written: the head's slices added in block order into the
 * output (gpu::addPartials, two levels; it zeroes the slices it read, so the workspace goes back
 * zero-filled). Was a second kernel (pvReduceKernel), whose launch cost 4-7 µs at 4k-128k tokens
 * (measured by leaving it out). Scratch: the staging area (plan() keeps >= 16 bytes per thread).
 */
template <int G>
__device__ void pvFinishHead(const Args& a, uint32_t h) {
  const int blocks = int(a.nx + a.ntail);
  const size_t slice = size_t(G) * a.g.dim;
  gpu::addPartials<true, true>(a.counters, gridDim.y, h, a.partial + size_t(h) * blocks * slice, slice, blocks,
                               blocks, a.out + size_t(h) * slice, int(slice), reinterpret_cast<float*>(kvcSmem + a.stOff),
                               int(4 * blockDim.x));
}

template <int G>
__global__ void __launch_bounds__(1024) pvKernel(Args a) {
  const uint32_t h = blockIdx.y, tid = threadIdx.x, D = a.g.dim, B = a.g.block, T = a.T;
  float acc[G] = {};
  if (blockIdx.x >= a.nx) {  // fp16 tail tokens: slot k of chunk c takes tokens c*32 + k, + spb, ...
    const uint32_t slot = tid / D, d = tid % D, t0 = (blockIdx.x - a.nx) * kPvTailChunk;
    const uint32_t t1 = min(t0 + kPvTailChunk, a.g.tailTokens);
    const uint16_t* pr = a.in + size_t(h) * G * T + a.g.codedTokens;
#pragma unroll 4
    for (uint32_t t = t0 + slot; t < t1; t += a.spb) {
      const float x = tailAt(a, h, t, d);
#pragma unroll
      for (int j = 0; j < G; ++j) acc[j] = fmaf(kg::halfBitsToFloat(__ldg(pr + size_t(j) * T + t)), x, acc[j]);
    }
    pvWritePartial<G>(a, h, acc, reinterpret_cast<float*>(kvcSmem + a.stOff));
    pvFinishHead<G>(a, h);
    return;
  }
  kg::DevLayout lay;
  kg::Lookup lk;
  uint32_t w;
  prologue(a, lay, lk, w);
  uint32_t* warpTotals = reinterpret_cast<uint32_t*>(kvcSmem + a.tableBytes + sizeof(kg::TableScratch));
  const uint32_t vecs = a.g.vecsPerSeg, slot = tid / vecs, v = tid % vecs;  // v = channel
  uint32_t* st = reinterpret_cast<uint32_t*>(kvcSmem + a.stOff) + size_t(slot) * a.capWords;
  float* ps = reinterpret_cast<float*>(kvcSmem + a.wOff) + size_t(slot) * B * G;     // [B][G]: p·scale
  float* bias = reinterpret_cast<float*>(kvcSmem + a.wOff) + size_t(a.spb) * B * G + size_t(slot) * B;  // [B]
  const uint16_t* vecBits = reinterpret_cast<const uint16_t*>(a.body + lay.vecOff);
  for (uint32_t bg = blockIdx.x; bg * a.spb < a.g.blocks; bg += a.nx) {
    const uint32_t b = bg * a.spb + slot, seg = b * a.g.heads + h;
    const bool active = b < a.g.blocks;
    __syncthreads();
    bool raw = false;
    uint32_t bit = 0, x = 0;
    if (active) {
      bit = stageSegment(a, lay, seg, st, v, vecs, raw);
      x = __ldg(vecBits + size_t(seg) * vecs + v);
      for (uint32_t idx = v; idx < B * G; idx += vecs) {
        const uint32_t i = idx / G, j = idx % G, t = b * B + i;
        ps[idx] = __fmul_rn(kg::halfBitsToFloat(__ldg(a.in + (size_t(h) * G + j) * T + t)), kg::scaleOf(a.body, lay, t));
      }
      for (uint32_t i = v; i < B; i += vecs) bias[i] = biasOf(kg::zeroPoint(a.body, lay, b * B + i));
    }
    bit += slotScan(x, vecs, warpTotals);
    __syncthreads();
    if (!active) continue;
    auto sink = [&](uint32_t i, uint32_t sym) {
      const float c = codeValue(sym, bias[i]);
      float wp[G];
      loadWeights<G>(ps + i * G, wp);
#pragma unroll
      for (int j = 0; j < G; ++j) acc[j] = fmaf(wp[j], c, acc[j]);
    };
    walk(raw, st, a.capWords, bit, B, lk, w, sink);
  }
  pvWritePartial<G>(a, h, acc, reinterpret_cast<float*>(kvcSmem + a.stOff));
  pvFinishHead<G>(a, h);
}

// ---- tensor-core products (cuda_huffman.cuh decodePair / mmaHead / cOwner) ----------------------

__device__ __forceinline__ void mma16816(float (&c)[4], const uint4& a, uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
}

/**
 * One lane's 128 codes (fully unrolled, branch-free): per step 4 codes = two PairReader::next, then one
 * mma per A tile; SPLIT tiles of MT are added into the same accumulators (V: fp16 hi and lo
 * halves of the weights). frag = this lane's 4 words in tile 0, step 0. PRED (PACKKV_KVCOMP_PRED,
 * default on): window words read only by advancing lanes (PairReader::next), and the A fragment
 * read only by the 8 lanes that carry weights (the others hold zeros): one conflict-free
 * wavefront (8 x 16 contiguous bytes) instead of an LDS.128 over 32 lanes and 9 addresses.
 */
template <int MT, int SPLIT, bool RAW, bool FIRST, bool PRED, bool PAIRED = false>
__device__ __forceinline__ void mmaWalk(const uint32_t* st, uint32_t p, const uint32_t* table, uint32_t shiftR, uint32_t w,
                                        int32_t center, const uint32_t* frag, const kg::Lookup& lk, float (&c)[MT][4]) {
  const uint32_t* t1 = reinterpret_cast<const uint32_t*>(lk.t1);
  const uint32_t shift1 = 32 - lk.n1, lane = threadIdx.x & 31;
  const bool carrier = !PRED || (lane & 3) == ((lane >> 2) & 3);
  kg::PairReader rd;
  rd.start(st, p);
#pragma unroll
  for (uint32_t s = 0; s < kMmaSteps; ++s) {
    uint32_t b0, b1;
    if (PAIRED) {
      b0 = rd.nextPaired<PRED>(st, table, t1, shift1);
      b1 = rd.nextPaired<PRED>(st, table, t1, shift1);
    } else {
      b0 = rd.next<RAW, FIRST, PRED>(st, table, shiftR, w, center, t1, shift1, lane);
      b1 = rd.next<RAW, FIRST, PRED>(st, table, shiftR, w, center, t1, shift1, lane);
    }
#pragma unroll
    for (int sp = 0; sp < SPLIT; ++sp)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        uint4 af = make_uint4(0u, 0u, 0u, 0u);
        if (carrier) af = *reinterpret_cast<const uint4*>(frag + (sp * MT + mt) * kFragTileWords + s * kg::kFragStepWords);
        mma16816(c[mt], af, b0, b1);
      }
  }
}

/** mmaWalk for a segment: raw fields, first-level + full table, or full table; PRED as a.pred. */
template <int MT, int SPLIT>
__device__ __forceinline__ void mmaSegment(bool raw, bool pred, const uint32_t* st, uint32_t p, const uint32_t* table,
                                           uint32_t shiftR, uint32_t w, int32_t center, const uint32_t* frag,
                                           const kg::Lookup& lk, float (&c)[MT][4]) {
  if (raw) mmaWalk<MT, SPLIT, true, false, true>(st, p, table, shiftR, w, center, frag, lk, c);
  else if (lk.paired) {
    if (pred) mmaWalk<MT, SPLIT, false, false, true, true>(st, p, table, shiftR, w, center, frag, lk, c);
    else mmaWalk<MT, SPLIT, false, false, false, true>(st, p, table, shiftR, w, center, frag, lk, c);
  } else if (!pred) {
    if (lk.t1) mmaWalk<MT, SPLIT, false, true, false>(st, p, table, shiftR, w, center, frag, lk, c);
    else mmaWalk<MT, SPLIT, false, false, false>(st, p, table, shiftR, w, center, frag, lk, c);
  } else if (lk.t1) mmaWalk<MT, SPLIT, false, true, true>(st, p, table, shiftR, w, center, frag, lk, c);
  else mmaWalk<MT, SPLIT, false, false, true>(st, p, table, shiftR, w, center, frag, lk, c);
}

/** This lane's A-fragment words (kg::fragSlot: slot 0 or 4 when it carries weights, else the zero slot). */
__device__ __forceinline__ uint32_t fragLaneOffset(uint32_t lane) { return kg::fragSlot(lane) * 4; }

/** Decomposes a fragment word index of a tile: register i, group g (8 = zero slot), step s, tile mt. */
__device__ __forceinline__ void fragIndex(uint32_t idx, uint32_t& i, uint32_t& g, uint32_t& s, uint32_t& mt) {
  i = idx & 3;
  g = (idx >> 2) % 9;
  s = (idx / kg::kFragStepWords) % kMmaSteps;
  mt = idx / kFragTileWords;
}

__device__ __forceinline__ void cpAsync16(uint32_t* dst, const uint8_t* src, uint32_t srcBytes) {
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(srcBytes));
}
__device__ __forceinline__ void cpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cpAsyncWaitAll() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

/**
 * Starts copying segment `seg` into st (threads v of nv of its slot) with 16-byte cp.async from
 * the 16-byte-aligned chunk that holds its first byte; the words stay little-endian until
 * swapStaged. Returns the chunks this thread's slot copies and the segment's first bit in st.
 */
__device__ __forceinline__ uint32_t issueStage(const Args& a, const kg::DevLayout& lay, uint32_t seg, uint32_t* st,
                                               uint32_t v, uint32_t nv, uint32_t& bit0, bool& raw) {
  const uint32_t* segTab = reinterpret_cast<const uint32_t*>(a.body + lay.segOff);
  const uint32_t e = __ldg(segTab + seg);
  const uint32_t eNext = seg + 1 < a.g.segments ? __ldg(segTab + seg + 1) : 0u;
  raw = (e & kvcomp::kRawSegmentFlag) != 0;
  const uint64_t start = e & ~kvcomp::kRawSegmentFlag;
  const uint64_t end = seg + 1 < a.g.segments ? (eNext & ~kvcomp::kRawSegmentFlag) : lay.arenaBytes;
  const uint64_t absStart = min(lay.arenaOff + start, a.bodyBytes);
  const uint64_t absEnd = min(max(lay.arenaOff + end, absStart), a.bodyBytes);
  const uint64_t c0 = absStart >> 4, c1 = (absEnd + 15) >> 4;
  const uint32_t n = uint32_t(min(c1 - c0, uint64_t(a.capWords / 4 - 1)));
  for (uint32_t k = v; k < n; k += nv) {
    const uint64_t byte = (c0 + k) * 16;
    cpAsync16(st + 4 * k, a.body + byte, uint32_t(min(uint64_t(16), a.bodyBytes - byte)));
  }
  cpAsyncCommit();
  bit0 = uint32_t(absStart & 15) * 8;
  return n;
}

/** After cpAsyncWaitAll: this thread's chunks to MSB-first words. */
__device__ __forceinline__ void swapStaged(uint32_t* st, uint32_t n, uint32_t v, uint32_t nv) {
  for (uint32_t k = v; k < n; k += nv) {
    uint4 q = *reinterpret_cast<uint4*>(st + 4 * k);
    q.x = kg::bswap32(q.x), q.y = kg::bswap32(q.y), q.z = kg::bswap32(q.z), q.w = kg::bswap32(q.w);
    *reinterpret_cast<uint4*>(st + 4 * k) = q;
  }
}

template <int G>
__global__ void __launch_bounds__(kMmaThreads, 3) qkMmaKernel(Args a) {
  constexpr int MT = mmaTiles(G);
  const uint32_t h = blockIdx.y, tid = threadIdx.x, D = a.g.dim, T = a.T;
  if (blockIdx.x >= a.nx) {  // fp16 tail tokens, as qkKernel
    float* qs = reinterpret_cast<float*>(kvcSmem + a.wOff);
    for (uint32_t idx = tid; idx < D * G; idx += blockDim.x)
      qs[idx] = kg::halfBitsToFloat(a.in[(size_t(h) * G + idx % G) * D + idx / G]);
    __syncthreads();
    qkTail<G>(a, qs, h);
    return;
  }
  uint32_t* frag = reinterpret_cast<uint32_t*>(kvcSmem + a.wOff);  // [MT][steps][9][4] half2 of q
  float* qsum = reinterpret_cast<float*>(frag + MT * kFragTileWords);
  const uint16_t* qh = a.in + size_t(h) * G * D;
  // Only slots 0, 4 (the carriers', kg::fragSlot) and the zero slot 8 are read: 12 of a step's 36
  // words. Every load of this thread first, then the stores (the loop was one dependent q load
  // pair per word: ~3% of q·Kᵀ's stall samples at 32k tokens).
  {
    constexpr uint32_t kWords = MT * kMmaSteps * 12, kIt = (kWords + kMmaThreads - 1) / kMmaThreads;
    uint32_t val[kIt];
#pragma unroll
    for (uint32_t k = 0; k < kIt; ++k) {
      const uint32_t n = tid + k * kMmaThreads, i = n & 3, sl = (n >> 2) % 3, s = (n / 12) % kMmaSteps;
      const uint32_t mt = n / (12 * kMmaSteps), g = 4 * sl, j = kg::mmaHead(mt, g, i), d = 4 * s + kg::mmaCode(i);
      val[k] = n < kWords && sl < 2 && j < uint32_t(G) ? uint32_t(__ldg(qh + j * D + d)) | uint32_t(__ldg(qh + j * D + d + 1)) << 16 : 0u;
    }
#pragma unroll
    for (uint32_t k = 0; k < kIt; ++k) {
      const uint32_t n = tid + k * kMmaThreads, i = n & 3, sl = (n >> 2) % 3, s = (n / 12) % kMmaSteps;
      const uint32_t mt = n / (12 * kMmaSteps);
      if (n < kWords) frag[mt * kFragTileWords + s * kg::kFragStepWords + 16 * sl + i] = val[k];
    }
  }
  // Σ_d q_d per head: warp j sums head j (lanes over channels, then a shuffle tree), so the
  // prologue waits for one round of loads instead of a 128-long chain of dependent adds.
  for (uint32_t j = tid >> 5; j < uint32_t(G); j += blockDim.x >> 5) {
    float sum = 0.f;
    for (uint32_t d = tid & 31; d < D; d += 32) sum += kg::halfBitsToFloat(__ldg(qh + j * D + d));
#pragma unroll
    for (uint32_t o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if ((tid & 31) == 0) qsum[j] = sum;
  }
  const kg::DevLayout lay = kg::layoutFromHeader(a.body, a.g.units, a.g.segments, a.g.vecsPerSeg);
  uint32_t* warpTotals = reinterpret_cast<uint32_t*>(kvcSmem + a.tableBytes + sizeof(kg::TableScratch));
  const uint32_t vecs = a.g.vecsPerSeg, slot = tid / vecs, v = tid % vecs, lane = tid & 31;
  uint32_t* stAll = reinterpret_cast<uint32_t*>(kvcSmem + a.stOff);  // two buffers of spb * capWords words
  const uint16_t* vecBits = reinterpret_cast<const uint16_t*>(a.body + lay.vecOff);
  const uint32_t pMax = a.spb * a.capWords * 32;
  const int32_t center = kg::symbolCenter(lay.alphabet);
  const uint32_t* fragLane = frag + fragLaneOffset(lane);
  const uint32_t bufWords = a.spb * a.capWords;
  // Pipeline: the next group's segment bytes (cp.async) and its scalars (registers) are in
  // flight while this group decodes.
  // The scale and zero point stay as loaded (f16 bits, 32-bit integer) until they are used a
  // segment later: converting them here waited for the loads (ncu at 32k: ~4% of the stalls).
  uint32_t nChunks = 0, bit0 = 0, x = 0;
  bool raw = false;
  int32_t zp = 0;
  uint16_t sc = 0;
  uint32_t bg = blockIdx.x, buf = 0;
  auto issue = [&](uint32_t group, uint32_t into) {
    const uint32_t b = group * a.spb + slot, seg = b * a.g.heads + h;
    if (group * a.spb < a.g.blocks && b < a.g.blocks) {
      nChunks = issueStage(a, lay, seg, stAll + into * bufWords + slot * a.capWords, v, vecs, bit0, raw);
      x = __ldg(vecBits + size_t(seg) * vecs + v);
      zp = kg::zeroPointRaw(a.body, lay, b);
      sc = kg::scaleBits(a.body, lay, b);
    } else {
      nChunks = 0, x = 0;
    }
  };
  // The first group's loads go out before the decode tables are built (their scratch is the
  // second buffer): the table build no longer sits in front of a dependent chain of global loads
  // (offset table, then segment bytes). The build's barriers publish frag and qsum.
  issue(bg, 0);
  kg::Lookup lk;
  uint32_t w;
  buildTables(a, lay, kvcSmem + a.stOff + 4 * bufWords, lk, w);
  const uint32_t* table = reinterpret_cast<const uint32_t*>(kvcSmem);
  const uint32_t shiftR = 32 - lk.L;
  for (; bg * a.spb < a.g.blocks; bg += a.nx, buf ^= 1) {
    const uint32_t b = bg * a.spb + slot;
    const bool active = b < a.g.blocks;
    cpAsyncWaitAll();
    swapStaged(stAll + buf * bufWords + slot * a.capWords, nChunks, v, vecs);
    const bool rawC = raw;
    const float zpc = float(int64_t(zp) + center), scC = kg::halfBitsToFloat(sc);
    const uint32_t bit = bit0 + slotScan(active ? x : 0u, vecs, warpTotals);
    __syncthreads();  // the group is staged; the other buffer's last readers are done
    issue(bg + a.nx, buf ^ 1);
    if (!active) continue;  // slot-uniform: whole warps
    const uint32_t* stCur = stAll + buf * bufWords;
    const uint32_t p = min(slot * a.capWords * 32 + bit, pMax);
    float c[MT][4] = {};
    mmaSegment<MT, 1>(rawC, a.pred, stCur, p, table, shiftR, w, center, fragLane, lk, c);
    const uint32_t t0 = b * a.g.block + (v & ~31u);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (uint32_t i = 0; i < 4; ++i) {
        const uint32_t j = kg::cHead(mt, lane, i);
        if (j < uint32_t(G)) a.out[(size_t(h) * G + j) * T + t0 + kg::cOwner(lane, i)] = __fmul_rn(scC, fmaf(zpc, qsum[j], c[mt][i]));
      }
  }
  // fp16 tail tokens (launchQk adds no tail blocks when there are coded ones): a warp per token
  // as qkTail, q read from global memory, on the coded blocks from the last one down (those
  // have the fewest token-block groups). Extra blocks with 71 KB of shared memory each pushed
  // ~60 coded blocks into a second wave at 128k tokens.
  if (gridDim.x == a.nx) {
    const uint32_t warps = blockDim.x >> 5;
    for (uint32_t t = (a.nx - 1 - blockIdx.x) * warps + (tid >> 5); t < a.g.tailTokens; t += a.nx * warps) {
      float acc[G] = {};
      for (uint32_t d = lane; d < D; d += 32) {
        const float x = tailAt(a, h, t, d);
#pragma unroll
        for (int j = 0; j < G; ++j) acc[j] = fmaf(kg::halfBitsToFloat(__ldg(qh + j * D + d)), x, acc[j]);
      }
#pragma unroll
      for (int j = 0; j < G; ++j)
        for (uint32_t o = 16; o > 0; o >>= 1) acc[j] += __shfl_xor_sync(0xffffffffu, acc[j], o);
      if (lane < uint32_t(G)) {
        float mine = acc[0];
#pragma unroll
        for (int j = 1; j < G; ++j) mine = lane == uint32_t(j) ? acc[j] : mine;
        a.out[(size_t(h) * G + lane) * T + a.g.codedTokens + t] = mine;
      }
    }
  }
}

/**
 * pvMmaKernel's share of the fp16 tail (chunks of kPvTailChunk tokens, from the last coded block
 * down), added into red[j * D] for j < G: thread (slot, d) of the block, p rows at pr (stride T),
 * tail rows [t][D] of its KV head at tail. Not inlined, so the decode loop's register plan stays.
 */
template <int G>
__device__ __noinline__ void pvTailInto(const uint16_t* pr, const uint16_t* tail, uint32_t T, uint32_t tailTokens,
                                        uint32_t D, uint32_t nx, uint32_t spb, uint32_t slot, uint32_t d, float* red) {
  float tacc[G] = {};
  for (uint32_t t0 = (nx - 1 - blockIdx.x) * kPvTailChunk; t0 < tailTokens; t0 += nx * kPvTailChunk) {
    const uint32_t t1 = min(t0 + kPvTailChunk, tailTokens);
    for (uint32_t t = t0 + slot; t < t1; t += spb) {
      const float x = kg::halfBitsToFloat(__ldg(tail + size_t(t) * D + d));
#pragma unroll
      for (int j = 0; j < G; ++j) tacc[j] = fmaf(kg::halfBitsToFloat(__ldg(pr + size_t(j) * T + t)), x, tacc[j]);
    }
  }
#pragma unroll
  for (int j = 0; j < G; ++j) red[size_t(j) * D] += tacc[j];
}

/**
 * p·V on the tensor cores. Per segment (slot), the weights w = p·scale (exact in fp32) are scaled
 * by a power of two that brings the segment's largest below 2^15 and split into fp16 hi + lo
 * fragments (about 22 bits); Z_j = Σ_t w_jt (zp_t + center) is added once per segment.
 */
template <int G>
__global__ void __launch_bounds__(kMmaThreads, 3) pvMmaKernel(Args a) {
  constexpr int MT = mmaTiles(G);
  const uint32_t h = blockIdx.y, tid = threadIdx.x, D = a.g.dim, B = a.g.block, T = a.T;
  if (blockIdx.x >= a.nx) {  // fp16 tail tokens, as pvKernel
    float acc[G] = {};
    const uint32_t slot = tid / D, d = tid % D, t0 = (blockIdx.x - a.nx) * kPvTailChunk;
    const uint32_t t1 = min(t0 + kPvTailChunk, a.g.tailTokens);
    const uint16_t* pr = a.in + size_t(h) * G * T + a.g.codedTokens;
    for (uint32_t t = t0 + slot; t < t1; t += a.spb) {
      const float x = tailAt(a, h, t, d);
#pragma unroll
      for (int j = 0; j < G; ++j) acc[j] = fmaf(kg::halfBitsToFloat(__ldg(pr + size_t(j) * T + t)), x, acc[j]);
    }
    pvWritePartial<G>(a, h, acc, reinterpret_cast<float*>(kvcSmem + a.stOff));
    pvFinishHead<G>(a, h);
    return;
  }
  const kg::DevLayout lay = kg::layoutFromHeader(a.body, a.g.units, a.g.segments, a.g.vecsPerSeg);
  uint32_t* warpTotals = reinterpret_cast<uint32_t*>(kvcSmem + a.tableBytes + sizeof(kg::TableScratch));
  const uint32_t vecs = a.g.vecsPerSeg, slot = tid / vecs, v = tid % vecs, lane = tid & 31, warp = v >> 5;
  uint32_t* stAll = reinterpret_cast<uint32_t*>(kvcSmem + a.stOff);  // two buffers of spb * capWords words
  uint32_t* fragAll = reinterpret_cast<uint32_t*>(kvcSmem + a.wOff);
  uint32_t* frag = fragAll + size_t(slot) * 2 * MT * kFragTileWords;  // [hi, lo][MT][steps][9][4]
  float* inv = reinterpret_cast<float*>(fragAll + size_t(a.spb) * 2 * MT * kFragTileWords);  // [spb]
  float* wmax = inv + a.spb;                                                                  // [spb][32]
  float* zred = wmax + a.spb * 32;                                                            // [32 warps][G]
  const uint16_t* vecBits = reinterpret_cast<const uint16_t*>(a.body + lay.vecOff);
  const uint32_t pMax = a.spb * a.capWords * 32;
  const int32_t center = kg::symbolCenter(lay.alphabet);
  const uint32_t* fragLane = frag + fragLaneOffset(lane);
  float acc[MT][4] = {}, zown[G] = {};  // zown: Σ p·scale·(zp + centre) over this thread's tokens
  // A-fragment words that never carry weights (the zero slot, heads >= G): zero once; the
  // per-segment fill below writes only the others (so no barrier is needed between the two).
  for (uint32_t idx = v; idx < MT * kFragTileWords; idx += vecs) {
    uint32_t i, g, s, mt;
    fragIndex(idx, i, g, s, mt);
    if (g == 8 || kg::mmaHead(mt, g, i) >= uint32_t(G)) frag[idx] = frag[MT * kFragTileWords + idx] = 0u;
  }
  const uint32_t bufWords = a.spb * a.capWords;
  // Pipeline as qkMmaKernel; thread v also prefetches token v's p (G heads), scale and zero point
  // (tokens per segment == vectors per segment on this path).
  uint32_t nChunks = 0, bit0 = 0, x = 0;
  bool raw = false;
  uint16_t pw[G] = {};
  uint16_t tsc = 0;  // as loaded, converted at use (see qkMmaKernel)
  int32_t tzp = 0;
  uint32_t bg = blockIdx.x, buf = 0;
  auto issue = [&](uint32_t group, uint32_t into) {
    const uint32_t b = group * a.spb + slot, seg = b * a.g.heads + h;
    if (group * a.spb < a.g.blocks && b < a.g.blocks) {
      nChunks = issueStage(a, lay, seg, stAll + into * bufWords + slot * a.capWords, v, vecs, bit0, raw);
      x = __ldg(vecBits + size_t(seg) * vecs + v);
      const uint32_t t = b * B + v;
#pragma unroll
      for (int j = 0; j < G; ++j) pw[j] = __ldg(a.in + (size_t(h) * G + j) * T + t);
      tsc = kg::scaleBits(a.body, lay, t);
      tzp = kg::zeroPointRaw(a.body, lay, t);
    } else {
      nChunks = 0, x = 0;
    }
  };
  issue(bg, 0);  // before the table build, as qkMmaKernel (whose barriers publish the zeroed fragments)
  kg::Lookup lk;
  uint32_t w;
  buildTables(a, lay, kvcSmem + a.stOff + 4 * bufWords, lk, w);
  const uint32_t* table = reinterpret_cast<const uint32_t*>(kvcSmem);
  const uint32_t shiftR = 32 - lk.L;
  for (; bg * a.spb < a.g.blocks; bg += a.nx, buf ^= 1) {
    const uint32_t b = bg * a.spb + slot;
    const bool active = b < a.g.blocks;
    cpAsyncWaitAll();
    swapStaged(stAll + buf * bufWords + slot * a.capWords, nChunks, v, vecs);
    const bool rawC = raw;
    const uint32_t bitC = bit0, xC = active ? x : 0u;
    // Thread v owns token v of its slot's segment (tokens per segment == vectors per segment):
    // its G weights p·scale, their zero-point term (kept per thread, reduced once at the end),
    // and, once the segment's max |weight| is known, its own A-fragment halves (hi and lo of
    // weight·2^sh, two 16-bit stores per head). Was: weights through shared memory, a butterfly of
    // G + 1 values per warp and the fragment words filled by (group, register) with a loop over
    // the steps: 21% of p·V's instructions at 32k tokens (ncu).
    float wt[G];
    float mx = 0.f;
    if (active) {
      const float zpc = float(int64_t(tzp) + center), scT = kg::halfBitsToFloat(tsc);
#pragma unroll
      for (int j = 0; j < G; ++j) {
        wt[j] = __fmul_rn(kg::halfBitsToFloat(pw[j]), scT);
        mx = fmaxf(mx, fabsf(wt[j]));
        zown[j] = fmaf(wt[j], zpc, zown[j]);
      }
    }
#pragma unroll
    for (uint32_t o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    if (lane == 0) wmax[slot * 32 + warp] = mx;
    // slotScan's barrier (vecs = 128 > 32 on this path) also publishes wmax.
    const uint32_t bit = bitC + slotScan(xC, vecs, warpTotals);
    if (active) {
      mx = 0.f;
      for (uint32_t k = 0; k < vecs / 32; ++k) mx = fmaxf(mx, wmax[slot * 32 + k]);
      int e = 0;
      frexpf(mx, &e);  // mx < 2^e
      const int sh = mx > 0.f ? min(max(15 - e, -100), 100) : 0;
      const float mult = ldexpf(1.f, sh);
      __half* hiH = reinterpret_cast<__half*>(frag);
      __half* loH = reinterpret_cast<__half*>(frag + MT * kFragTileWords);
#pragma unroll
      for (int j = 0; j < G; ++j) {
        const float ws = __fmul_rn(wt[j], mult);
        const __half hi = __float2half_rn(ws), lo = __float2half_rn(__fsub_rn(ws, __half2float(hi)));
        const uint32_t at = 2 * kg::fragWordOf(v, uint32_t(j)) + (v & 1);
        hiH[at] = hi;
        loH[at] = lo;
      }
      if (v == 0) inv[slot] = ldexpf(1.f, -sh);
    }
    __syncthreads();
    issue(bg + a.nx, buf ^ 1);
    if (!active) continue;
    const uint32_t* stCur = stAll + buf * bufWords;
    const uint32_t p = min(slot * a.capWords * 32 + bit, pMax);
    float c[MT][4] = {};
    mmaSegment<MT, 2>(rawC, a.pred, stCur, p, table, shiftR, w, center, fragLane, lk, c);
    const float iv = inv[slot];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][i] = fmaf(c[mt][i], iv, acc[mt][i]);
  }
  // The zero-point terms of all the block's tokens, per head: warps, then the warps in order.
#pragma unroll
  for (int j = 0; j < G; ++j)
#pragma unroll
    for (uint32_t o = 16; o > 0; o >>= 1) zown[j] += __shfl_xor_sync(0xffffffffu, zown[j], o);
  if (lane == 0)
#pragma unroll
    for (int j = 0; j < G; ++j) zred[(tid >> 5) * G + j] = zown[j];
  // This block's [G][D] partial: each lane's sums through shared memory, slots added in order.
  float* red = reinterpret_cast<float*>(kvcSmem + a.stOff);
  __syncthreads();
  float zacc[G];
#pragma unroll
  for (int j = 0; j < G; ++j) {
    zacc[j] = 0.f;
    if (slot == 0)  // added once, into slot 0's rows
      for (uint32_t k = 0; k < (blockDim.x >> 5); ++k) zacc[j] += zred[k * G + j];
  }
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (uint32_t i = 0; i < 4; ++i) {
      const uint32_t j = kg::cHead(mt, lane, i);
      if (j < uint32_t(G)) red[(size_t(slot) * G + j) * D + (v & ~31u) + kg::cOwner(lane, i)] = acc[mt][i] + zacc[j];
    }
  __syncthreads();
  if (gridDim.x == a.nx && a.g.tailTokens) {
    // fp16 tail chunks of 32 tokens (launchPv adds no tail blocks when there are coded ones):
    // as the tail blocks' loop, on the coded blocks from the last one down (the fewest token-
    // block groups), added into this block's partial; thread (slot, d) owns red[slot][j][d].
    pvTailInto<G>(a.in + size_t(h) * G * T + a.g.codedTokens,
                  reinterpret_cast<const uint16_t*>(a.body + a.tailOff) + size_t(h) * a.g.tailTokens * D, T,
                  a.g.tailTokens, D, a.nx, a.spb, slot, v, red + size_t(slot) * G * D + v);
    __syncthreads();
  }
  float* out = a.partial + (size_t(h) * (a.nx + a.ntail) + blockIdx.x) * G * D;
  for (uint32_t idx = tid; idx < G * D; idx += blockDim.x) {
    float sum = red[idx];
    for (uint32_t k = 1; k < a.spb; ++k) sum += red[size_t(k) * G * D + idx];
    out[idx] = sum;
  }
  pvFinishHead<G>(a, h);
}

// ---- decode ----------------------------------------------------------------------------------

template <bool KEY>
__global__ void __launch_bounds__(1024) decodeKernel(Args a) {
  const uint32_t h = blockIdx.y, tid = threadIdx.x, D = a.g.dim, B = a.g.block, T = a.T;
  kg::DevLayout lay;
  kg::Lookup lk;
  uint32_t w;
  prologue(a, lay, lk, w);
  uint32_t* warpTotals = reinterpret_cast<uint32_t*>(kvcSmem + a.tableBytes + sizeof(kg::TableScratch));
  const uint32_t vecs = a.g.vecsPerSeg, slot = tid / vecs, v = tid % vecs;
  uint32_t* st = reinterpret_cast<uint32_t*>(kvcSmem + a.stOff) + size_t(slot) * a.capWords;
  const uint16_t* vecBits = reinterpret_cast<const uint16_t*>(a.body + lay.vecOff);
  for (uint32_t bg = blockIdx.x; bg * a.spb < a.g.blocks; bg += a.nx) {
    const uint32_t b = bg * a.spb + slot, seg = b * a.g.heads + h;
    const bool active = b < a.g.blocks;
    __syncthreads();
    bool raw = false;
    uint32_t bit = 0, x = 0;
    if (active) {
      bit = stageSegment(a, lay, seg, st, v, vecs, raw);
      x = __ldg(vecBits + size_t(seg) * vecs + v);
    }
    bit += slotScan(x, vecs, warpTotals);
    __syncthreads();
    if (!active) continue;
    if (KEY) {
      const int64_t zp = kg::zeroPoint(a.body, lay, b);
      const float sc = kg::scaleOf(a.body, lay, b);
      float* row = a.out + (size_t(h) * T + b * B + v) * D;
      auto sink = [&](uint32_t i, uint32_t sym) { row[i] = kg::dequantExact(sym, zp, sc); };
      walk(raw, st, a.capWords, bit, D, lk, w, sink);
    } else {
      float* col = a.out + (size_t(h) * T + b * B) * D + v;
      auto sink = [&](uint32_t i, uint32_t sym) {
        const uint32_t t = b * B + i;
        col[size_t(i) * D] = kg::dequantExact(sym, kg::zeroPoint(a.body, lay, t), kg::scaleOf(a.body, lay, t));
      };
      walk(raw, st, a.capWords, bit, B, lk, w, sink);
    }
  }
}

__global__ void decodeTailKernel(Args a) {
  const size_t n = size_t(a.g.heads) * a.g.tailTokens * a.g.dim;
  for (size_t idx = blockIdx.x * size_t(blockDim.x) + threadIdx.x; idx < n; idx += size_t(gridDim.x) * blockDim.x) {
    const size_t h = idx / (size_t(a.g.tailTokens) * a.g.dim), rest = idx % (size_t(a.g.tailTokens) * a.g.dim);
    const uint16_t* tail = reinterpret_cast<const uint16_t*>(a.body + a.tailOff);
    a.out[(h * a.T + a.g.codedTokens) * a.g.dim + rest] = kg::halfBitsToFloat(tail[idx]);
  }
}

// ---- host side -------------------------------------------------------------------------------

Geometry geometryFor(const Params& p, TensorKind kind, const Shape& s) {
  const char* k = kind == TensorKind::Key ? "k_" : "v_";
  return kvcomp::geometryOf(s, kind, uint32_t(p.integer(std::string(k) + "block")),
                            uint32_t(p.integer(std::string(k) + "recent")));
}

double relOf(const Params& p, TensorKind kind) { return p.real(kind == TensorKind::Key ? "k_rel" : "v_rel"); }

uint32_t groupIndex(uint32_t group) {
  if (group != 1 && group != 2 && group != 4 && group != 8)
    fail(std::to_string(group) + " query heads per KV head is not supported (1, 2, 4 or 8)");
  return group == 1 ? 0 : group == 2 ? 1 : group == 4 ? 2 : 3;
}

/** PACKKV_KVCOMP_MMA=0 turns the tensor-core product kernels off (the scalar ones run instead). */
bool mmaEnabled() {
  static const bool on = [] {
    const char* v = std::getenv("PACKKV_KVCOMP_MMA");
    return !(v && v[0] == '0');
  }();
  return on;
}

/** PACKKV_KVCOMP_PRED=0 turns the predicated window / fragment loads of the tensor-core path off. */
bool predEnabled() {
  static const bool on = [] {
    const char* v = std::getenv("PACKKV_KVCOMP_PRED");
    return !(v && v[0] == '0');
  }();
  return on;
}

/**
 * Bits of the first-level decode table of the tensor-core products (cuda_huffman.cuh; 2^bits *
 * 128 bytes of shared memory, with the u16 full table for escapes): PACKKV_KVCOMP_T1 = 1..8 for K
 * and V, PACKKV_KVCOMP_T1V overrides it for V; default 0 (full table only). Measured slower on
 * the H100 at 128k tokens: K 162 vs 152 us at 6 bits (conflicts gone, +14 instructions per step),
 * V 231 vs 170 us at 8 bits (32 KB more shared memory: 2 blocks per SM instead of 3). The scalar
 * kernels (decode, PACKKV_KVCOMP_MMA=0) never use it: there it measured slower too (K 294 vs 215 us).
 */
uint32_t envBits(const char* name, uint32_t otherwise) {
  const char* v = std::getenv(name);
  if (!v || !*v) return otherwise;
  return uint32_t(std::min(std::max(std::atoi(v), 0), 8));
}
uint32_t firstLevelMaxBits(TensorKind kind) {
  static const uint32_t k = envBits("PACKKV_KVCOMP_T1", 0u);
  static const uint32_t v = envBits("PACKKV_KVCOMP_T1V", k);
  return kind == TensorKind::Key ? k : v;
}

/**
 * The pair table of the tensor-core products (cuda_huffman.cuh tablePairFill: two codes per
 * lookup, alphabets <= 128, the full table otherwise) and the bits of its first level:
 * PACKKV_KVCOMP_PAIR = 1..8 (first level), 12 (no first level) or 0 (off: one code per lookup);
 * PACKKV_KVCOMP_PAIRV overrides it for V. Default 0 (off): measured slower, see docs/kernels.md.
 */
uint32_t envPairBits(const char* name, uint32_t otherwise) {
  const char* v = std::getenv(name);
  if (!v || !*v) return otherwise;
  const int b = std::atoi(v);
  return b <= 0 ? 0u : b >= int(kg::kPairBits) ? kg::kPairBits : uint32_t(std::min(b, 8));
}
uint32_t pairBitsOf(TensorKind kind) {
  static const uint32_t k = envPairBits("PACKKV_KVCOMP_PAIR", 0u);
  static const uint32_t v = envPairBits("PACKKV_KVCOMP_PAIRV", k);
  return kind == TensorKind::Key ? k : v;
}

/** The launch plan of a stream: shared memory, slots, grid; `group` query heads per KV head. */
Args plan(const StreamView& s, uint32_t group, bool forProducts, bool onDevice = true) {
  const Shape& sh = s.header.shape;
  const TensorKind kind = s.header.kind;
  Args a{};
  a.body = s.body;
  a.bodyBytes = s.bodyBytes;
  a.g = geometryFor(s.params, kind, sh);
  a.T = sh.tokens;
  const uint64_t tailBytes = 2ull * sh.heads * a.g.tailTokens * sh.dim;
  if (s.bodyBytes < tailBytes + kvcomp::kBodyHeaderBytes) requireBodyBytes(s, tailBytes + kvcomp::kBodyHeaderBytes);
  a.tailOff = s.bodyBytes - tailBytes;
  if (onDevice && reinterpret_cast<uintptr_t>(s.body) % 16 != 0) fail("the stream body must be 16-byte aligned in device memory");
  const uint32_t vecs = a.g.vecsPerSeg;
  if (a.g.segments > 0 && vecs != 16 && (vecs % 32 != 0 || vecs > 1024))
    fail("vectors per segment = " + std::string(kind == TensorKind::Key ? "k_block" : "head_dim") + " = " +
         std::to_string(vecs) + " must be 16 or a multiple of 32, at most 1024");
  a.spb = std::max<uint32_t>(1, 256 / std::max<uint32_t>(vecs, 1));
  // Staged bytes per segment: a segment is Huffman only when smaller than raw codes at
  // ceil(log2 A) bits, A = floor(1/rel) + 2 (cpu.cpp's alphabet: its scale is rounded up, so codes
  // stay below A); margin: one code more (was one bit more, which cost V its third block per SM:
  // 82 -> 74 KB of shared memory at v_rel = 0.1).
  const uint32_t alphaMin = uint32_t(std::floor(1.0 / relOf(s.params, kind))) + 2;
  const uint32_t width = std::min<uint32_t>(12, kvcomp::rawWidth(alphaMin + 1));
  const uint64_t perSeg = uint64_t(a.g.vecsPerSeg) * a.g.symsPerVec;
  a.capWords = uint32_t((perSeg * width + 7) / 8 / 4 + 1 + 4 + 1);
  // Tensor-core path: 128 codes per vector, whole warps per slot (V: tokens per segment ==
  // vectors per segment, one token per thread); two staging buffers of 16-byte chunks.
  a.mma = forProducts && mmaEnabled() && vecs % 32 == 0 && vecs <= 256 && a.g.symsPerVec == kMmaCodes &&
          (kind == TensorKind::Key || vecs == kMmaCodes);
  if (a.mma) a.capWords = (a.capWords + 4 + 3) / 4 * 4;
  a.pred = predEnabled();
  const uint32_t alphaNeed = std::min<uint32_t>(kg::kMaxAlphabet, 2 * alphaMin + 16);
  a.n1max = a.mma ? firstLevelMaxBits(kind) : 0;
  a.tableBytes = a.mma && !a.n1max ? kTable32Bytes : kTableBytes;  // with a first level: the u16 table for escapes
  a.pairBits = a.mma && !a.n1max ? pairBitsOf(kind) : 0;
  if (a.pairBits) a.tableBytes = kTable32Bytes + kPairFirstBytes;  // 4096 pair entries (= kTableEntries), then the first level
  // The table build's scratch: lengths and sorted symbols (3 bytes per symbol), and for the pair
  // table its u16 table. On the tensor-core path it is the second staging buffer (the first
  // group's segments load into the first meanwhile), which is made large enough for it.
  const uint64_t scratchNeed = a.pairBits ? 3ull * std::max(alphaNeed, kg::kPairAlphabet) + 32 + kTableBytes + 16
                                          : 3ull * alphaNeed + 32;
  if (a.mma)
    while (uint64_t(a.spb) * a.capWords * 4 < scratchNeed) a.capWords += 4;
  uint64_t stageBytes = std::max<uint64_t>(uint64_t(a.spb) * a.capWords * 4 * (a.mma ? 2 : 1), scratchNeed);
  if (a.mma) stageBytes += kStagePadBytes;
  stageBytes = (stageBytes + 15) / 16 * 16;
  uint64_t weights = 0;
  if (forProducts)
    weights = kind == TensorKind::Key ? uint64_t(sh.dim) * group * 4 : uint64_t(a.spb) * a.g.block * (group + 1) * 4;
  if (a.mma) {
    const uint64_t frag = uint64_t(mmaTiles(group)) * kMmaSteps * kg::kFragStepWords * 4;
    weights = kind == TensorKind::Key ? std::max<uint64_t>(weights, frag + 64)
                                      : uint64_t(a.spb) * (2 * frag + 4 + 4 * 32) + 4ull * 32 * group;
  }
  if (forProducts && kind == TensorKind::Value)  // pvWritePartial's slot sums and addPartials' scratch reuse the staging area
    stageBytes = std::max<uint64_t>({stageBytes, (uint64_t(a.spb) * group * sh.dim * 4 + 15) / 16 * 16,
                                     16ull * a.spb * a.g.vecsPerSeg});
  a.stageBytes = uint32_t(stageBytes);
  // symbols the scratch holds (a larger, corrupt alphabet is cut there: garbage out, no overrun)
  a.alphaLimit = uint32_t(((a.mma ? uint64_t(a.spb) * a.capWords * 4 : stageBytes) - 32 -
                           (a.pairBits ? kTableBytes + 16 : 0)) / 3);
  a.wOff = a.tableBytes + kScratchBytes + (a.n1max ? (1u << a.n1max) * (a.mma ? 128 : 64) : 0);
  a.stOff = uint32_t(a.wOff + (weights + 15) / 16 * 16);
  return a;
}

size_t smemOf(const Args& a) {
  return size_t(a.stOff) + a.stageBytes;
}

/** Blocks of a plan resident on one multiprocessor at once (threads and shared memory). */
uint32_t blocksPerSm(const Args& a, size_t smem) {
  const uint32_t threads = a.spb * a.g.vecsPerSeg;
  return std::max<uint32_t>(
      1, std::min<uint32_t>({2048 / std::max<uint32_t>(threads, 32), 32, uint32_t((227 * 1024) / (smem + 1024))}));
}

/** Blocks per KV head: about one resident wave over all heads, never more than token-block groups. */
uint32_t blocksPerHead(const Args& a, size_t smem) {
  const uint32_t perSm = blocksPerSm(a, smem);
  const uint32_t groups = (a.g.blocks + a.spb - 1) / a.spb;
  const uint32_t want = std::max<uint32_t>(1, uint32_t(gpu::multiprocessors()) * perSm / std::max<uint32_t>(a.g.heads, 1));
  return std::max<uint32_t>(1, std::min(groups, want));
}

template <typename Kernel>
void prepareSmem(Kernel kernel, size_t smem) {
  if (smem > 227 * 1024) fail("a segment needs " + std::to_string(smem) + " bytes of shared memory (at most 227 KiB)");
  if (smem > 48 * 1024) PACKKV_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
}

/** p·V blocks per KV head over the fp16 tail. */
uint32_t pvTailBlocks(const Args& a) { return (a.g.tailTokens + kPvTailChunk - 1) / kPvTailChunk; }

/** p·V blocks per KV head over the coded tokens: one resident wave, within addPartials' group counters. */
uint32_t pvCodedBlocks(const Args& a, size_t smem) {
  if (!a.g.segments) return 0;
  const uint32_t cap = uint32_t(gpu::kFinishGroup * gpu::kFinishMaxGroups) - pvTailBlocks(a);
  return std::max<uint32_t>(1, std::min(blocksPerHead(a, smem), cap));
}

// ---- the GpuCodecDef entries -----------------------------------------------------------------

uint64_t bodyBytes(const Shape& s, TensorKind kind, const Params& p) {
  // Data-dependent: the bound of a body whose every segment is raw at 12 bits, 4-byte zero
  // points and a 4096-symbol codebook. The CPU encoder's body is never larger.
  Geometry g = geometryFor(p, kind, s);
  const uint64_t perSeg = uint64_t(g.vecsPerSeg) * g.symsPerVec;
  return kvcomp::layoutOf(g, kg::kMaxAlphabet, 4, 12, uint64_t(g.segments) * ((perSeg * 12 + 7) / 8)).total;
}

/** p·V's reduction counters (gpu::addPartials: one per head, then kFinishMaxGroups per head). */
size_t counterBytes(uint32_t heads) {
  return (size_t(heads) * (1 + gpu::kFinishMaxGroups) * sizeof(unsigned) + 255) / 256 * 256;
}

size_t workspaceBytes(const StreamView& s, uint32_t qHeads) {
  const Shape& sh = s.header.shape;
  size_t bytes = counterBytes(sh.heads);
  if (s.header.kind == TensorKind::Value && sh.heads > 0 && qHeads % sh.heads == 0) {
    const uint32_t group = qHeads / sh.heads;
    Args a = plan(s, group, true, false);
    bytes += size_t(sh.heads) * (pvCodedBlocks(a, smemOf(a)) + pvTailBlocks(a)) * group * sh.dim * sizeof(float);
  }
  return bytes;
}

Breakdown encode(const float* x, const Shape& s, TensorKind kind, const Params& p, uint8_t* body, const gpu::Launch& l) {
  findCodec("kvcomp").check(p, kind, s);
  return kvcomp::enc::encodeOnDevice(x, s, kind, relOf(p, kind), geometryFor(p, kind, s), body, l.stream);
}

void decode(const StreamView& s, float* out, const gpu::Launch& l) {
  Args a = plan(s, 1, false);
  a.out = out;
  if (a.g.segments > 0) {
    const size_t smem = smemOf(a);
    a.nx = blocksPerHead(a, smem);
    dim3 grid(a.nx, a.g.heads);
    if (s.header.kind == TensorKind::Key) {
      prepareSmem(decodeKernel<true>, smem);
      decodeKernel<true><<<grid, a.spb * a.g.vecsPerSeg, smem, l.stream>>>(a);
    } else {
      prepareSmem(decodeKernel<false>, smem);
      decodeKernel<false><<<grid, a.spb * a.g.vecsPerSeg, smem, l.stream>>>(a);
    }
    PACKKV_LAUNCH_CHECK();
  }
  const size_t n = size_t(a.g.heads) * a.g.tailTokens * a.g.dim;
  if (n > 0) {
    const unsigned grid = unsigned(std::min<size_t>((n + 255) / 256, size_t(gpu::multiprocessors()) * 16));
    decodeTailKernel<<<grid, 256, 0, l.stream>>>(a);
    PACKKV_LAUNCH_CHECK();
  }
}

template <int G>
void launchQk(Args a, cudaStream_t st) {
  const size_t smem = smemOf(a);
  a.nx = a.g.segments ? blocksPerHead(a, smem) : 0;
  const uint32_t threads = std::max<uint32_t>(32, a.spb * a.g.vecsPerSeg);
  // a warp per token; the tensor-core kernel's coded blocks take the tail themselves
  const uint32_t tailBlocks = a.mma && a.nx > 0 ? 0 : (a.g.tailTokens + threads / 32 - 1) / (threads / 32);
  dim3 grid(a.nx + tailBlocks, a.g.heads);
  if (grid.x == 0 || grid.y == 0) return;
  if (a.mma) {
    prepareSmem(qkMmaKernel<G>, smem);
    qkMmaKernel<G><<<grid, threads, smem, st>>>(a);
  } else {
    prepareSmem(qkKernel<G>, smem);
    qkKernel<G><<<grid, threads, smem, st>>>(a);
  }
  PACKKV_LAUNCH_CHECK();
}

template <int G>
void launchPv(Args a, cudaStream_t st) {
  if (a.g.heads == 0) return;
  const size_t smem = smemOf(a);
  a.nx = pvCodedBlocks(a, smem);
  // pvMmaKernel's coded blocks take the fp16 tail themselves when separate tail blocks would
  // spill into a second wave (128k tokens: 53 x 8 blocks for 396 slots); otherwise (4k: 20 x 8)
  // the tail blocks run beside them, where their load latency stays hidden (absorbed at 4k, the
  // serial tail loop after the decode cost V 20.6 -> 25.2 us).
  const uint32_t tailBlocks = pvTailBlocks(a);
  const bool absorb = a.mma && a.nx > 0 &&
                      uint64_t(a.nx + tailBlocks) * a.g.heads > uint64_t(gpu::multiprocessors()) * blocksPerSm(a, smem);
  a.ntail = absorb ? 0 : tailBlocks;
  if (a.nx + a.ntail > 0) {
    if (a.mma) {
      prepareSmem(pvMmaKernel<G>, smem);
      pvMmaKernel<G><<<dim3(a.nx + a.ntail, a.g.heads), a.spb * a.g.vecsPerSeg, smem, st>>>(a);
    } else {
      prepareSmem(pvKernel<G>, smem);
      pvKernel<G><<<dim3(a.nx + a.ntail, a.g.heads), a.spb * a.g.vecsPerSeg, smem, st>>>(a);
    }
    PACKKV_LAUNCH_CHECK();
  } else {  // no tokens: the sums are empty
    PACKKV_CUDA_CHECK(cudaMemsetAsync(a.out, 0, sizeof(float) * a.g.heads * G * a.g.dim, st));
  }
}

void qk(const StreamView& s, const uint16_t* q, uint32_t qHeads, uint32_t nq, float* scores, const gpu::Launch& l) {
  const Shape& sh = s.header.shape;
  const uint32_t group = qHeads / sh.heads;
  const uint32_t gi = groupIndex(group);
  if (sh.dim > 1024) fail("head_dim=" + std::to_string(sh.dim) + " is above 1024");
  Args a = plan(s, group, true);
  for (uint32_t n = 0; n < nq; ++n) {
    a.in = q + size_t(n) * qHeads * sh.dim;
    a.out = scores + size_t(n) * qHeads * sh.tokens;
    switch (gi) {
      case 0: launchQk<1>(a, l.stream); break;
      case 1: launchQk<2>(a, l.stream); break;
      case 2: launchQk<4>(a, l.stream); break;
      default: launchQk<8>(a, l.stream); break;
    }
  }
}

void pv(const StreamView& s, const uint16_t* p, uint32_t qHeads, uint32_t nq, float* out, const gpu::Launch& l) {
  const Shape& sh = s.header.shape;
  const uint32_t group = qHeads / sh.heads;
  const uint32_t gi = groupIndex(group);
  if (sh.dim > 1024) fail("head_dim=" + std::to_string(sh.dim) + " is above 1024");
  const size_t need = workspaceBytes(s, qHeads);
  if (!l.workspace || l.workspaceBytes < need)
    fail("p·V needs " + std::to_string(need) + " bytes of workspace, got " + std::to_string(l.workspaceBytes));
  Args a = plan(s, group, true);
  a.counters = static_cast<unsigned*>(l.workspace);
  a.partial = reinterpret_cast<float*>(static_cast<uint8_t*>(l.workspace) + counterBytes(sh.heads));
  for (uint32_t n = 0; n < nq; ++n) {
    a.in = p + size_t(n) * qHeads * sh.tokens;
    a.out = out + size_t(n) * qHeads * sh.dim;
    switch (gi) {
      case 0: launchPv<1>(a, l.stream); break;
      case 1: launchPv<2>(a, l.stream); break;
      case 2: launchPv<4>(a, l.stream); break;
      default: launchPv<8>(a, l.stream); break;
    }
  }
}

}  // namespace

const gpu::GpuCodecDef kKvcompGpuCodec = {"kvcomp", bodyBytes, workspaceBytes, encode, decode, qk, pv};
static const gpu::GpuCodecRegistrar registrar(kKvcompGpuCodec);

}  // namespace packkv
