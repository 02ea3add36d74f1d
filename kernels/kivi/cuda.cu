// KIVI on the GPU: host side. Encode/decode (bit-identical to cpu.cpp, kivi/cuda_convert.cuh) and
// the fused products (tensor cores: kivi/cuda_mma.cuh; CUDA cores: kivi/cuda_products.cuh),
// dispatched from one table over bits x query heads per KV head.
#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "common/cuda_check.h"
#include "common/gpu_codec.h"
#include "common/layout.h"
#include "kivi/cuda_convert.cuh"
#include "kivi/cuda_mma.cuh"
#include "kivi/format.h"

namespace packkv {
namespace {

using kivi::DecodeArgs;
using kivi::EncodeArgs;
using kivi::Layout;

Layout layoutFor(const Params& p, TensorKind kind, const Shape& s) {
  return kivi::layoutOf(s, kind, uint32_t(p.integer("bits")), uint32_t(p.integer("group")),
                        uint32_t(p.integer("residual")));
}

int bitsIndex(uint32_t bits) { return bits == 1 ? 0 : bits == 2 ? 1 : bits == 4 ? 2 : 3; }

/** What the kernels assume beyond cpu.cpp's check(); names the mismatch. */
void checkGpuShape(const Layout& l, const Shape& s, TensorKind kind) {
  auto fail = [](const std::string& m) { throw CodecError("codec 'kivi' on the GPU: " + m); };
  if (kind == TensorKind::Value && s.dim % l.group != 0)
    fail("a partial last V channel group (head_dim=" + std::to_string(s.dim) + ", group=" + std::to_string(l.group) +
         ") has no CUDA kernels");
  if (s.dim % 16 != 0 || s.dim > 1024) fail("head_dim=" + std::to_string(s.dim) + " must be a multiple of 16, at most 1024");
  if (l.group % 16 != 0) fail("group=" + std::to_string(l.group) + " must be a multiple of 16");
}

bool aligned(const void* p, size_t n) { return reinterpret_cast<uintptr_t>(p) % n == 0; }

unsigned gridFor(size_t n) {
  return unsigned(std::max<size_t>(1, std::min<size_t>((n + 255) / 256, size_t(gpu::multiprocessors()) * 16)));
}

// ---- the dispatch table: bits x GQA group size ---------------------------------------------------

struct Launchers {
  void (*qk)(kivi::QkArgs, int heads, cudaStream_t);
  void (*pv)(kivi::PvArgs, int heads, cudaStream_t);
  void (*encodeKeys)(EncodeArgs, unsigned grid, cudaStream_t);
  void (*encodeValues)(EncodeArgs, unsigned grid, cudaStream_t);
  void (*decodeKeys)(DecodeArgs, unsigned grid, cudaStream_t);
  void (*decodeValues)(DecodeArgs, unsigned grid, cudaStream_t);
};

/** Tensor-core kernels unless PACKKV_KIVI_KERNEL=simt (the CUDA-core kernels, for comparison). */
bool mmaAllowed() {
  const char* v = std::getenv("PACKKV_KIVI_KERNEL");
  return !(v && std::strcmp(v, "simt") == 0);
}

template <int B, int NR>
void launchQk(kivi::QkArgs a, int heads, cudaStream_t st) {
  const int residualBlocks = (a.Trem + kivi::kQkThreads / 32 - 1) / (kivi::kQkThreads / 32);
  // Tensor cores for head_dim 64 or 128, 32-token tiles inside one scale group, 16-byte aligned
  // sections (cp.async).
  if ((a.D == 64 || a.D == 128) && a.G % 32 == 0 && a.vecIn && aligned(a.codes, 16) && aligned(a.scales, 16) &&
      aligned(a.mins, 16) && mmaAllowed()) {
    // At 4 and 8 bits a tile's loads dominate: one tile per warp (one ring stage) measured faster
    // (4-bit 128k: 40.3 us one per warp, 42.8 us persistent), so only 1 and 2 bits walk tiles.
    a.ringStages = B <= 2 ? 2 : 1;
    const size_t smem = kivi::qkMmaSmemBytes(NR, a.D, B, a.ringStages);
    auto kernel = a.D == 64 ? kivi::qkMmaKernel<B, NR, 4> : kivi::qkMmaKernel<B, NR, 8>;
    // Persistent warps: one wave of resident blocks over all heads, each warp walking tiles.
    static int perSmOf[2] = {0, 0};  // [head_dim 64, 128]: resident blocks, found once
    int& perSm = perSmOf[a.D == 128];
    if (perSm == 0) {
      if (smem > 48 * 1024)
        PACKKV_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
      int n = 0;
      PACKKV_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kivi::kQkThreads, smem));
      perSm = std::max(1, n);
    }
    const int tileBlocks = (a.Tq / 32 + kivi::kMmaQkWarps - 1) / kivi::kMmaQkWarps;
    a.chunkBlocks = B <= 2 ? std::min(tileBlocks, std::max(1, perSm * gpu::multiprocessors() / heads)) : tileBlocks;
    dim3 grid(a.chunkBlocks + residualBlocks, heads);
    if (grid.x == 0) return;
    kernel<<<grid, kivi::kQkThreads, smem, st>>>(a);
    PACKKV_LAUNCH_CHECK();
    return;
  }
  constexpr int CT = NR <= 4 ? 16 : 8;  // tokens per quad: CT x NR accumulators per lane
  const int chunks = a.Tq / CT;
  a.chunkBlocks = (chunks + kivi::kQkThreads / 4 - 1) / (kivi::kQkThreads / 4);
  dim3 grid(a.chunkBlocks + residualBlocks, heads);
  if (grid.x == 0) return;
  kivi::qkKernel<B, NR, CT><<<grid, kivi::kQkThreads, NR * a.D * sizeof(float), st>>>(a);
  PACKKV_LAUNCH_CHECK();
}

template <int B, int NR>
void launchPv(kivi::PvArgs a, int heads, cudaStream_t st) {
  dim3 grid(a.splits + (a.Trem > 0 ? 1 : 0), heads);
  // Tensor cores for head_dim 128 with channel groups of 32 or 64 (KIVI's usual settings).
  if (a.D == kivi::kMmaPvDim && (a.G == 32 || a.G == 64) && mmaAllowed()) {
    if (a.G == 32) kivi::pvMmaKernel<B, NR, 2><<<grid, kivi::kMmaPvWarps * 32, 0, st>>>(a);
    else kivi::pvMmaKernel<B, NR, 4><<<grid, kivi::kMmaPvWarps * 32, 0, st>>>(a);
    PACKKV_LAUNCH_CHECK();
    return;
  }
  constexpr int CC = NR <= 4 ? 16 : 8;  // channels per warp chunk: CC x NR accumulators per lane
  const int warps = std::min(a.D / CC, 8);
  kivi::pvKernel<B, NR, CC><<<grid, warps * 32, 0, st>>>(a);
  PACKKV_LAUNCH_CHECK();
}

template <int B>
void launchEncodeKeys(EncodeArgs a, unsigned grid, cudaStream_t st) {
  kivi::encodeKeys<B><<<grid, 256, 0, st>>>(a);
  PACKKV_LAUNCH_CHECK();
}
template <int B>
void launchEncodeValues(EncodeArgs a, unsigned grid, cudaStream_t st) {
  kivi::encodeValues<B><<<grid, 256, 0, st>>>(a);
  PACKKV_LAUNCH_CHECK();
}
template <int B>
void launchDecodeKeys(DecodeArgs a, unsigned grid, cudaStream_t st) {
  kivi::decodeKeys<B><<<grid, 256, 0, st>>>(a);
  PACKKV_LAUNCH_CHECK();
}
template <int B>
void launchDecodeValues(DecodeArgs a, unsigned grid, cudaStream_t st) {
  kivi::decodeValues<B><<<grid, 256, 0, st>>>(a);
  PACKKV_LAUNCH_CHECK();
}

template <int B, int NR>
constexpr Launchers row() {
  return {launchQk<B, NR>, launchPv<B, NR>, launchEncodeKeys<B>, launchEncodeValues<B>, launchDecodeKeys<B>,
          launchDecodeValues<B>};
}

// [bits 1, 2, 4, 8][query heads per KV head 1, 2, 4, 8]
const Launchers kTable[4][4] = {
    {row<1, 1>(), row<1, 2>(), row<1, 4>(), row<1, 8>()},
    {row<2, 1>(), row<2, 2>(), row<2, 4>(), row<2, 8>()},
    {row<4, 1>(), row<4, 2>(), row<4, 4>(), row<4, 8>()},
    {row<8, 1>(), row<8, 2>(), row<8, 4>(), row<8, 8>()},
};

const Launchers& launchersFor(uint32_t bits, uint32_t group) {
  if (group != 1 && group != 2 && group != 4 && group != 8)
    throw CodecError("codec 'kivi' on the GPU: " + std::to_string(group) +
                     " query heads per KV head is not supported (1, 2, 4 or 8)");
  return kTable[bitsIndex(bits)][group == 1 ? 0 : group == 2 ? 1 : group == 4 ? 2 : 3];
}

// ---- the GpuCodecDef entries ---------------------------------------------------------------------

uint64_t bodyBytes(const Shape& s, TensorKind kind, const Params& p) { return layoutFor(p, kind, s).total; }

constexpr size_t kFlagBytes = 256;  // encode's error flag, then the p·V counters, then partials

/** PACKKV_KIVI_PV_PIPE=0 turns the cp.async pipeline of the tensor-core p·V off (to compare). */
bool pvPipeAllowed() {
  const char* v = std::getenv("PACKKV_KIVI_PV_PIPE");
  return !(v && std::strcmp(v, "0") == 0);
}

/**
 * p·V splits, 128-token multiples: two blocks per multiprocessor over all heads, a block per head
 * left for the fp16 residual (was one wave of the resident blocks, 3 per multiprocessor at 1 and
 * 2 bits). Measured, not derived: 2-bit p·V -10 / -20 / -14 / -10% at 16k / 32k / 64k / 128k
 * tokens (H100, same-process A/B; docs/kernels.md KIVI #14). At 32k the one wave left a third of
 * the multiprocessors with 3 blocks, but at 128k it was nearly balanced and 2 per multiprocessor
 * still won, so the mechanism is not isolated (fewer and longer splits, fewer partials for the
 * last block to sum, less contention among co-resident blocks all fit). 1 per multiprocessor and
 * unbalanced counts (24, 36, 40 splits per head) were slower.
 * PACKKV_KIVI_PV_BLOCKS_PER_SM = 1..3 overrides the 2 for comparisons (capped at the kernel's
 * resident blocks, 2 at 4 and 8 bits).
 */
void pvSplits(const Layout& l, uint32_t heads, int* splits, int* splitTokens) {
  if (l.quantTokens == 0) {
    *splits = 0, *splitTokens = 128;
    return;
  }
  int perSm = 2;
  if (const char* e = std::getenv("PACKKV_KIVI_PV_BLOCKS_PER_SM")) perSm = std::max(1, std::atoi(e));
  perSm = std::min(perSm, kivi::pvMmaBlocksPerSm(int(l.bits)));
  const int resident = perSm * gpu::multiprocessors();
  const int maxSplits = std::max(1, resident / int(heads) - (l.residualTokens > 0 ? 1 : 0));
  const int steps = int((l.quantTokens + 127) / 128);
  const int want = std::min(maxSplits, steps);
  *splitTokens = (steps + want - 1) / want * 128;
  *splits = int((l.quantTokens + *splitTokens - 1) / *splitTokens);
}

size_t workspaceBytes(const StreamView& s, uint32_t qHeads) {
  const Shape& sh = s.header.shape;
  size_t bytes = kFlagBytes + (sh.heads * sizeof(unsigned) + 255) / 256 * 256;
  if (s.header.kind == TensorKind::Value) {
    Layout l = layoutFor(s.params, s.header.kind, sh);
    int splits = 0, splitTokens = 0;
    pvSplits(l, sh.heads, &splits, &splitTokens);
    bytes += size_t(sh.heads) * kivi::pvSlots(splits, int(l.residualTokens)) * (qHeads / sh.heads) * sh.dim *
             sizeof(float);
  }
  return bytes;
}

void requireWorkspace(const StreamView& s, uint32_t qHeads, const gpu::Launch& l) {
  size_t need = workspaceBytes(s, qHeads);
  if (!l.workspace || l.workspaceBytes < need)
    throw CodecError("codec 'kivi' on the GPU needs " + std::to_string(need) + " bytes of workspace, got " +
                     std::to_string(l.workspaceBytes));
}

Breakdown encode(const float* x, const Shape& s, TensorKind kind, const Params& p, uint8_t* body, const gpu::Launch& l) {
  Layout lay = layoutFor(p, kind, s);
  checkGpuShape(lay, s, kind);
  if (!l.workspace || l.workspaceBytes < kFlagBytes) throw CodecError("codec 'kivi' GPU encode needs a workspace");
  int* bad = static_cast<int*>(l.workspace);
  EncodeArgs a{x,
               reinterpret_cast<uint32_t*>(body + lay.codesOff),
               reinterpret_cast<uint16_t*>(body + lay.scaleOff),
               reinterpret_cast<uint16_t*>(body + lay.minOff),
               reinterpret_cast<uint16_t*>(body + lay.residualOff),
               int(s.heads), int(s.tokens), int(s.dim), int(lay.quantTokens), int(lay.residualTokens), int(lay.group),
               bad};
  const Launchers& fn = launchersFor(lay.bits, 1);
  if (lay.quantTokens > 0) {
    if (kind == TensorKind::Key) fn.encodeKeys(a, gridFor(size_t(s.heads) * lay.quantTokens / lay.group * s.dim), l.stream);
    else fn.encodeValues(a, gridFor(size_t(s.heads) * lay.quantTokens * (s.dim / lay.group)), l.stream);
  }
  if (lay.residualTokens > 0) {
    kivi::encodeResidual<<<gridFor(size_t(s.heads) * lay.residualTokens * s.dim), 256, 0, l.stream>>>(a);
    PACKKV_LAUNCH_CHECK();
  }
  int hostBad = 0;
  PACKKV_CUDA_CHECK(cudaMemcpyAsync(&hostBad, bad, sizeof(int), cudaMemcpyDeviceToHost, l.stream));
  PACKKV_CUDA_CHECK(cudaStreamSynchronize(l.stream));
  if (hostBad) {
    PACKKV_CUDA_CHECK(cudaMemsetAsync(bad, 0, sizeof(int), l.stream));
    throw CodecError(hostBad & 1 ? "codec 'kivi': non-finite values (NaN/Inf) cannot be compressed"
                                 : "codec 'kivi': value out of the fp16 range of its scales (|x| > 65504)");
  }
  Breakdown b;
  b.payload = lay.codesBytes, b.scales = lay.scaleBytes, b.zeros = lay.minBytes, b.residual = lay.residualBytes;
  return b;
}

void decode(const StreamView& s, float* out, const gpu::Launch& l) {
  const Shape& sh = s.header.shape;
  Layout lay = layoutFor(s.params, s.header.kind, sh);
  requireBodyBytes(s, lay.total);
  checkGpuShape(lay, sh, s.header.kind);
  DecodeArgs a{reinterpret_cast<const uint32_t*>(s.body + lay.codesOff),
               reinterpret_cast<const uint16_t*>(s.body + lay.scaleOff),
               reinterpret_cast<const uint16_t*>(s.body + lay.minOff),
               reinterpret_cast<const uint16_t*>(s.body + lay.residualOff),
               out, int(sh.heads), int(sh.tokens), int(sh.dim), int(lay.quantTokens), int(lay.residualTokens),
               int(lay.group)};
  if (!aligned(s.body, 16) || !aligned(out, 16)) throw CodecError("codec 'kivi' GPU decode needs 16-byte aligned buffers");
  const Launchers& fn = launchersFor(lay.bits, 1);
  if (lay.quantTokens > 0) {
    if (s.header.kind == TensorKind::Key) fn.decodeKeys(a, gridFor(size_t(sh.heads) * lay.quantTokens / lay.perWord * sh.dim / 4), l.stream);
    else fn.decodeValues(a, gridFor(size_t(sh.heads) * lay.quantTokens * (sh.dim / lay.perWord)), l.stream);
  }
  if (lay.residualTokens > 0) {
    kivi::decodeResidual<<<gridFor(size_t(sh.heads) * lay.residualTokens * sh.dim), 256, 0, l.stream>>>(a);
    PACKKV_LAUNCH_CHECK();
  }
}

void qk(const StreamView& s, const uint16_t* q, uint32_t qHeads, uint32_t nq, float* scores, const gpu::Launch& l) {
  const Shape& sh = s.header.shape;
  Layout lay = layoutFor(s.params, s.header.kind, sh);
  requireBodyBytes(s, lay.total);
  checkGpuShape(lay, sh, s.header.kind);
  const uint32_t group = qHeads / sh.heads;
  const Launchers& fn = launchersFor(lay.bits, group);
  kivi::QkArgs a{};
  a.codes = reinterpret_cast<const uint32_t*>(s.body + lay.codesOff);
  a.scales = reinterpret_cast<const uint16_t*>(s.body + lay.scaleOff);
  a.mins = reinterpret_cast<const uint16_t*>(s.body + lay.minOff);
  a.residual = reinterpret_cast<const uint16_t*>(s.body + lay.residualOff);
  a.D = int(sh.dim), a.T = int(sh.tokens), a.Tq = int(lay.quantTokens), a.Trem = int(lay.residualTokens);
  a.G = int(lay.group);
  a.vecIn = aligned(a.codes, 16) && aligned(a.scales, 8) && aligned(a.mins, 8);
  for (uint32_t n = 0; n < nq; ++n) {
    a.q = q + size_t(n) * qHeads * sh.dim;
    a.scores = scores + size_t(n) * qHeads * sh.tokens;
    a.vecOut = sh.tokens % 4 == 0 && aligned(a.scores, 16);
    fn.qk(a, int(sh.heads), l.stream);
  }
}

void pv(const StreamView& s, const uint16_t* p, uint32_t qHeads, uint32_t nq, float* out, const gpu::Launch& l) {
  const Shape& sh = s.header.shape;
  Layout lay = layoutFor(s.params, s.header.kind, sh);
  requireBodyBytes(s, lay.total);
  checkGpuShape(lay, sh, s.header.kind);
  requireWorkspace(s, qHeads, l);
  const uint32_t group = qHeads / sh.heads;
  const Launchers& fn = launchersFor(lay.bits, group);
  kivi::PvArgs a{};
  a.codes = reinterpret_cast<const uint32_t*>(s.body + lay.codesOff);
  a.scales = reinterpret_cast<const uint16_t*>(s.body + lay.scaleOff);
  a.mins = reinterpret_cast<const uint16_t*>(s.body + lay.minOff);
  a.residual = reinterpret_cast<const uint16_t*>(s.body + lay.residualOff);
  a.counters = reinterpret_cast<unsigned*>(static_cast<uint8_t*>(l.workspace) + kFlagBytes);
  a.partial = reinterpret_cast<float*>(static_cast<uint8_t*>(l.workspace) + kFlagBytes +
                                       (sh.heads * sizeof(unsigned) + 255) / 256 * 256);
  a.D = int(sh.dim), a.T = int(sh.tokens), a.Tq = int(lay.quantTokens), a.Trem = int(lay.residualTokens);
  a.G = int(lay.group);
  pvSplits(lay, sh.heads, &a.splits, &a.splitTokens);
  if (a.splits == 0 && a.Trem == 0) return;
  for (uint32_t n = 0; n < nq; ++n) {
    a.p = p + size_t(n) * qHeads * sh.tokens;
    a.out = out + size_t(n) * qHeads * sh.dim;
    a.vec = lay.quantTokens % 4 == 0 && sh.tokens % 4 == 0 && aligned(a.codes, 16) && aligned(a.scales, 8) &&
            aligned(a.mins, 8) && aligned(a.p, 8);
    a.pipe = lay.quantTokens % 8 == 0 && sh.tokens % 8 == 0 && aligned(a.codes, 16) && aligned(a.scales, 16) &&
             aligned(a.mins, 16) && aligned(a.p, 16) && pvPipeAllowed();
    fn.pv(a, int(sh.heads), l.stream);
  }
}

}  // namespace

const gpu::GpuCodecDef kKiviGpuCodec = {"kivi", bodyBytes, workspaceBytes, encode, decode, qk, pv};
static const gpu::GpuCodecRegistrar registrar(kKiviGpuCodec);

}  // namespace packkv
