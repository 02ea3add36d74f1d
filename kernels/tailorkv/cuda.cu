// TailorKV on the GPU.
//
// mode=q: the stream is KIVI's layout byte for byte whenever group divides head_dim (format.h:
// codes, scale/min and residual at the same offsets, the same GroupQuant and code·scale + min), so
// every call is handed to KIVI's GPU row (kivi/cuda.cu, found through the GPU registry) with the
// stream's bits/group/residual as KIVI parameters: its encode (bit-identical), decode, and fused
// q·Kᵀ / p·V (tensor-core kernels where KIVI uses them, all query heads per launch, each KV head's
// codes read once per GQA group). A V stream whose last channel group is partial (group ∤
// head_dim, which TailorKV allows and KIVI does not) is refused with a CodecError.
//
// mode=s (cuda_sparse.cuh): encode, decode, and the fused products run here. q·Kᵀ is two
// launches per query step over all KV and query heads (approximate channel scoring in double with
// a linear-bin histogram; then the top-`budget` select with the CPU's tie rule; exact scores of
// the device and selected rows, kMaskedScore elsewhere), or one launch of thread-block clusters
// where PACKKV_TAILORKV_CLUSTER asks for it (clusterPlanOf); p·V is one launch reading the device rows and the offloaded rows
// with p != 0. Limits beyond cpu.cpp's check(): head_dim <= 1024 (q·Kᵀ, encode), head_dim 64 or
// 128 and 1/2/4/8 query heads per KV head (p·V), at most 8 query heads per KV head (q·Kᵀ).
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "common/cuda_check.h"
#include "common/gpu_codec.h"
#include "common/layout.h"
#include "registry.h"
#include "tailorkv/cuda_sparse.cuh"
#include "tailorkv/format.h"

namespace packkv {
namespace {

using tailorkv::Mode;
using tailorkv::SparseLayout;

[[noreturn]] void fail(const std::string& m) { throw CodecError("codec 'tailorkv' on the GPU: " + m); }

Mode modeOf(const Params& p) {
  const std::string& m = p.text("mode");
  if (m == "q") return Mode::Quant;
  if (m == "s") return Mode::Sparse;
  fail("mode=auto streams do not exist: resolve the layer rule first (cli/layer-policy.ts)");
}

SparseLayout sparseLayout(const Params& p, TensorKind kind, const Shape& s) {
  return tailorkv::sparseLayoutOf(s, kind, uint32_t(p.integer("sinks")), uint32_t(p.integer("window")));
}

// ---- mode=q: KIVI's GPU row on a KIVI view of the stream --------------------------------------

const gpu::GpuCodecDef& kiviRow() {
  const gpu::GpuCodecDef* k = gpu::findGpuCodec("kivi");
  if (!k) fail("mode=q runs on KIVI's CUDA kernels, which are not in this build");
  return *k;
}

/** KIVI parameters of a mode=q stream; refuses what KIVI's layout cannot express. */
Params kiviParams(const Params& p, TensorKind kind, const Shape& s) {
  const int group = p.integer("group");
  if (kind == TensorKind::Value && s.dim % uint32_t(group) != 0)
    fail("mode=q V with group=" + std::to_string(group) + " not dividing head_dim=" + std::to_string(s.dim) +
         " (a partial last channel group) has no CUDA kernels");
  return parseSpec("kivi:bits=" + std::to_string(p.integer("bits")) + ",group=" + std::to_string(group) +
                   ",residual=" + std::to_string(p.integer("residual")))
      .params;
}

StreamView kiviView(const StreamView& s) {
  StreamView v = s;
  v.params = kiviParams(s.params, s.header.kind, s.header.shape);
  v.header.codec = "kivi";
  return v;
}

/** Runs a KIVI call, naming TailorKV in its errors. */
template <typename Fn>
auto asKivi(Fn&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const CodecError& e) {
    throw CodecError(std::string("codec 'tailorkv' mode=q (KIVI kernels): ") + e.what());
  }
}

// ---- mode=s: decode --------------------------------------------------------------------------

struct SparseArgs {
  const uint16_t *dev, *host;
  float* out;
  uint32_t H, T, D, sinks, window, M, devTokens;
  bool key;
};

__global__ void decodeSparseKernel(SparseArgs a) {
  const size_t n = size_t(a.H) * a.T * a.D;
  for (size_t idx = blockIdx.x * size_t(blockDim.x) + threadIdx.x; idx < n; idx += size_t(gridDim.x) * blockDim.x) {
    const uint32_t d = uint32_t(idx % a.D), t = uint32_t(idx / a.D % a.T), h = uint32_t(idx / a.D / a.T);
    uint16_t v;
    if (t < a.sinks) {
      v = a.dev[(size_t(h) * a.devTokens + t) * a.D + d];
    } else if (t >= a.T - a.window) {
      v = a.dev[(size_t(h) * a.devTokens + a.sinks + (t - (a.T - a.window))) * a.D + d];
    } else {
      const uint32_t m = t - a.sinks;
      v = a.key ? a.host[(size_t(h) * a.D + d) * a.M + m] : a.host[(size_t(h) * a.M + m) * a.D + d];
    }
    a.out[idx] = __half2float(__ushort_as_half(v));
  }
}

// ---- mode=s: encode and the products (kernels in cuda_sparse.cuh) ----------------------------

namespace sp = tailorkv::sparse;
constexpr size_t kFlagBytes = 256;  // encode's error flag; the products' buffers follow

/** Tokens the top-k keeps per query step and KV head (cpu.cpp: none without offloaded tokens). */
uint32_t selectedOf(const Params& p, const SparseLayout& lay) {
  const uint32_t budget = uint32_t(p.integer("budget"));
  return lay.hostTokens > 0 ? std::min(budget, lay.hostTokens) : 0;
}

/** Tokens per scoreKernel block: a multiple of kTile, so that all blocks are resident at once. */
uint32_t chunkOf(uint32_t M, uint32_t H, uint32_t devBlocks, size_t smem) {
  int perSm = 0;
  PACKKV_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&perSm, sp::scoreKernel<true>, sp::kQkThreads, smem));
  const uint64_t resident = uint64_t(std::max(perSm, 1)) * gpu::multiprocessors();
  const uint64_t slots = std::max<uint64_t>(H, resident > uint64_t(devBlocks) * H ? resident - uint64_t(devBlocks) * H : 0);
  const uint64_t tiles = std::max<uint64_t>(1, (uint64_t(M) * H + sp::kTile * slots - 1) / (sp::kTile * slots));
  return uint32_t(std::min<uint64_t>(tiles, 64) * sp::kTile);
}

/**
 * The plan of the one-launch q·Kᵀ (sp::clusterKernel) for M offloaded tokens, or size 0 for the two
 * launches. Opt-in: `PACKKV_TAILORKV_CLUSTER` = 2/4/8/16 sets the cluster size (16 is a
 * non-portable size), unset or 0 keeps the two launches; on the H100 the cluster path was 8% faster
 * at 4k tokens, even at 32k and slower from 64k (docs/kernels.md, TailorKV #6). It needs the kernel
 * built for sm_90+ (clusters, distributed shared memory), at most kClusterChunkMax tokens per block,
 * at most `PACKKV_TAILORKV_CLUSTER_TOKENS` offloaded tokens (default 65536) and ≤ 200 KB of shared
 * memory per block.
 */
/** clusterKernel's launch: cluster size (0: the two launches), tokens and list rows per block, shared memory. */
struct ClusterPlan {
  uint32_t size = 0, chunk = 0, listCap = 0;
  size_t smem = 0;
};

/** The launch configuration of plan p: grid (size, H) in clusters of `size` blocks; attr must outlive it. */
cudaLaunchConfig_t clusterLaunch(const ClusterPlan& p, uint32_t H, cudaStream_t st, cudaLaunchAttribute& attr) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(p.size, H), cfg.blockDim = dim3(sp::kClusterThreads), cfg.dynamicSmemBytes = p.smem;
  cfg.stream = st;
  attr = cudaLaunchAttribute{};
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = p.size, attr.val.clusterDim.y = 1, attr.val.clusterDim.z = 1;
  cfg.attrs = &attr, cfg.numAttrs = 1;
  return cfg;
}

ClusterPlan clusterPlanOf(uint32_t M, uint32_t devTokens, uint32_t H, uint32_t D, uint32_t G, bool vec) {
  static const uint32_t size = [] {
    const char* v = std::getenv("PACKKV_TAILORKV_CLUSTER");
    const long n = v ? std::strtol(v, nullptr, 10) : 0;
    return (n == 2 || n == 4 || n == 8 || n == 16) ? uint32_t(n) : 0u;
  }();
  static const uint64_t maxTokens = [] {
    const char* v = std::getenv("PACKKV_TAILORKV_CLUSTER_TOKENS");
    return v ? uint64_t(std::strtoull(v, nullptr, 10)) : uint64_t(65536);
  }();
  if (size == 0 || M == 0 || H == 0 || M > maxTokens) return {};
  const auto fn = vec ? sp::clusterKernel<true> : sp::clusterKernel<false>;
  static int binary = -1;
  if (binary < 0) {
    cudaFuncAttributes fa{};
    PACKKV_CUDA_CHECK(cudaFuncGetAttributes(&fa, sp::clusterKernel<true>));
    binary = fa.binaryVersion;
  }
  if (binary < 90) return {};
  ClusterPlan p;
  p.size = size, p.chunk = ((M + size - 1) / size + 7) / 8 * 8, p.listCap = p.chunk + (devTokens + size - 1) / size;
  if (p.chunk > sp::kClusterChunkMax) return {};
  p.smem = sp::clusterSmemOf(p.chunk, p.listCap, D, G).total;
  if (p.smem > (200u << 10)) return {};
  PACKKV_CUDA_CHECK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, int(p.smem)));
  if (size > 8) PACKKV_CUDA_CHECK(cudaFuncSetAttribute(fn, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t cfg = clusterLaunch(p, H, nullptr, attr);
  int clusters = 0;
  PACKKV_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&clusters, fn, &cfg));
  return clusters > 0 ? p : ClusterPlan{};
}

using PvFn = void (*)(sp::PvArgs);
struct PvEntry {
  uint32_t dim, group;
  PvFn fn;
};
const PvEntry kPvTable[] = {
    {64, 1, sp::pvKernel<64, 1>},   {64, 2, sp::pvKernel<64, 2>},   {64, 4, sp::pvKernel<64, 4>},
    {64, 8, sp::pvKernel<64, 8>},   {128, 1, sp::pvKernel<128, 1>}, {128, 2, sp::pvKernel<128, 2>},
    {128, 4, sp::pvKernel<128, 4>}, {128, 8, sp::pvKernel<128, 8>},
};
PvFn pvKernelFor(uint32_t dim, uint32_t group) {
  for (const PvEntry& e : kPvTable)
    if (e.dim == dim && e.group == group) return e.fn;
  return nullptr;
}

/** Row splits of p·V per KV head: one wave of resident blocks over all heads. */
uint32_t pvSplitsOf(PvFn fn, uint32_t rows, uint32_t H) {
  int perSm = 0;
  PACKKV_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&perSm, fn, sp::kPvThreads, 0));
  const uint32_t tiles = (rows + 31) / 32, resident = uint32_t(std::max(perSm, 1) * gpu::multiprocessors());
  const uint32_t byWork = std::max(1u, tiles / (2 * sp::kPvThreads / 32));  // >= 2 tiles per warp
  return std::max(1u, std::min(byWork, std::max(1u, resident / H)));
}

size_t sparseWorkspaceBytes(const StreamView& s, uint32_t qHeads) {
  const Shape& sh = s.header.shape;
  const SparseLayout lay = sparseLayout(s.params, s.header.kind, sh);
  if (s.header.kind == TensorKind::Key)
    return kFlagBytes + sp::qkWorkspaceBytes(sh.heads, lay.hostTokens, selectedOf(s.params, lay), sh.dim,
                                               sh.heads ? qHeads / sh.heads : 0);
  const uint32_t group = sh.heads ? qHeads / sh.heads : 0;
  PvFn fn = pvKernelFor(sh.dim, group);
  if (!fn) return kFlagBytes;
  const uint32_t splits = pvSplitsOf(fn, lay.deviceTokens + lay.hostTokens, sh.heads);
  return kFlagBytes + (size_t(sh.heads) * 4 + 255) / 256 * 256 + size_t(sh.heads) * splits * group * sh.dim * 4;
}

void requireWorkspace(const StreamView& s, uint32_t qHeads, const gpu::Launch& l) {
  const size_t need = sparseWorkspaceBytes(s, qHeads);
  if (!l.workspace || l.workspaceBytes < need)
    fail("mode=s needs " + std::to_string(need) + " bytes of workspace, got " + std::to_string(l.workspaceBytes));
}

Breakdown encodeSparse(const float* x, const Shape& s, TensorKind kind, const Params& p, uint8_t* body,
                       const gpu::Launch& l) {
  const SparseLayout lay = sparseLayout(p, kind, s);
  if (s.dim > 1024) fail("mode=s encode supports head_dim <= 1024, got " + std::to_string(s.dim));
  if (!l.workspace || l.workspaceBytes < sizeof(int)) fail("mode=s encode needs a workspace (its error flag)");
  int* bad = static_cast<int*>(l.workspace);
  sp::EncodeArgs a{x,
                   reinterpret_cast<uint16_t*>(body + lay.deviceOff),
                   reinterpret_cast<uint16_t*>(body + lay.maxAbsOff),
                   reinterpret_cast<uint16_t*>(body + lay.hostOff),
                   s.heads, s.tokens, s.dim, lay.sinks, lay.window, lay.hostTokens, lay.deviceTokens,
                   kind == TensorKind::Key, bad};
  const size_t n = size_t(s.heads) * (lay.deviceTokens + lay.hostTokens) * s.dim;
  const bool keyTiles = kind == TensorKind::Key && s.dim % 2 == 0 && reinterpret_cast<uintptr_t>(a.maxAbs) % 4 == 0;
  if (keyTiles && s.heads > 0 && s.dim > 0) {  // K: one tiled pass (rows, channel-major rows, max|K|)
    PACKKV_CUDA_CHECK(cudaMemsetAsync(a.maxAbs, 0, lay.maxAbsBytes, l.stream));
    const uint32_t tiles = (s.tokens + sp::keyTileOf(s.dim) - 1) / sp::keyTileOf(s.dim);
    if (tiles > 0) {
      sp::encodeKeyKernel<<<dim3(tiles, s.heads), 256, sp::keyTileSmemOf(s.dim), l.stream>>>(a);
      PACKKV_LAUNCH_CHECK();
    }
  } else if (n > 0) {
    const unsigned grid = unsigned(std::min<size_t>((n + 255) / 256, size_t(gpu::multiprocessors()) * 16));
    sp::encodeRowsKernel<<<grid, 256, 0, l.stream>>>(a);
    PACKKV_LAUNCH_CHECK();
  }
  if (!keyTiles && kind == TensorKind::Key && s.heads > 0 && s.dim > 0) {
    sp::maxAbsKernel<<<s.heads, 1024, 0, l.stream>>>(a);
    PACKKV_LAUNCH_CHECK();
  }
  int flag = 0;
  PACKKV_CUDA_CHECK(cudaMemcpyAsync(&flag, bad, sizeof flag, cudaMemcpyDeviceToHost, l.stream));
  PACKKV_CUDA_CHECK(cudaStreamSynchronize(l.stream));
  if (flag) {
    PACKKV_CUDA_CHECK(cudaMemsetAsync(bad, 0, sizeof(int), l.stream));  // hand the workspace back zeroed
    PACKKV_CUDA_CHECK(cudaStreamSynchronize(l.stream));
    throw CodecError("codec 'tailorkv': value out of the fp16 range (|x| > 65504) or not finite");
  }
  Breakdown b;
  b.residual = lay.deviceBytes;
  b.metadata = lay.maxAbsBytes;
  b.host = lay.hostBytes;
  return b;
}

void qkSparse(const StreamView& s, const uint16_t* q, uint32_t qHeads, uint32_t nq, float* scores,
              const gpu::Launch& l) {
  const Shape& sh = s.header.shape;
  const SparseLayout lay = sparseLayout(s.params, s.header.kind, sh);
  requireBodyBytes(s, lay.total);
  const uint32_t G = qHeads / sh.heads;
  if (sh.dim > 1024) fail("mode=s q·Kᵀ supports head_dim <= 1024, got " + std::to_string(sh.dim));
  if (G > sp::kMaxGroup)
    fail("mode=s q·Kᵀ supports at most " + std::to_string(sp::kMaxGroup) + " query heads per KV head, got " +
         std::to_string(G));
  requireWorkspace(s, qHeads, l);
  sp::QkArgs a{};
  a.dev = reinterpret_cast<const uint16_t*>(s.body + lay.deviceOff);
  a.maxAbs = reinterpret_cast<const uint16_t*>(s.body + lay.maxAbsOff);
  a.host = reinterpret_cast<const uint16_t*>(s.body + lay.hostOff);
  a.H = sh.heads, a.T = sh.tokens, a.D = sh.dim, a.G = G, a.sinks = lay.sinks, a.window = lay.window;
  a.M = lay.hostTokens, a.devTokens = lay.deviceTokens, a.channels = uint32_t(s.params.integer("channels"));
  a.k = selectedOf(s.params, lay);
  a.devBlocks = (a.devTokens + sp::exactRowsOf(a.D) - 1) / sp::exactRowsOf(a.D);
  a.selChunk = sp::selectChunkOf(a.M, a.k, a.D), a.selChunks = (a.M + a.selChunk - 1) / a.selChunk;
  // 16-byte channel-row loads and bin stores need M % 8 == 0 and an aligned host K.
  const bool vec = a.M % 8 == 0 && reinterpret_cast<uintptr_t>(a.host) % 16 == 0;
  const auto score = vec ? sp::scoreKernel<true> : sp::scoreKernel<false>;
  const auto select = vec ? sp::selectKernel<true> : sp::selectKernel<false>;
  const size_t scoreSmem = sp::scoreSmemOf(a.D, G), selectSmem = sp::selectSmemOf(a.selChunk, a.D, G);
  static bool smemRaised = false;  // up to ~66 KB at head_dim 1024 with 8 query heads per KV head
  if (!smemRaised) {
    for (auto fn : {sp::scoreKernel<true>, sp::scoreKernel<false>, sp::selectKernel<true>, sp::selectKernel<false>})
      PACKKV_CUDA_CHECK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, 96 << 10));
    smemRaised = true;
  }
  a.chunk = chunkOf(a.M, a.H, a.devBlocks, scoreSmem), a.chunks = (a.M + a.chunk - 1) / a.chunk;
  sp::qkWorkspaceSplit(a, static_cast<uint8_t*>(l.workspace) + kFlagBytes);
  const ClusterPlan cluster = a.k > 0 ? clusterPlanOf(a.M, a.devTokens, a.H, a.D, G, vec) : ClusterPlan{};
  if (cluster.size > 0) {  // one launch: a cluster of blocks per KV head
    sp::QkArgs c = a;
    c.chunk = cluster.chunk, c.chunks = cluster.size, c.listCap = cluster.listCap;
    cudaLaunchAttribute attr;
    const cudaLaunchConfig_t cfg = clusterLaunch(cluster, a.H, l.stream, attr);
    const auto fn = vec ? sp::clusterKernel<true> : sp::clusterKernel<false>;
    for (uint32_t n = 0; n < nq; ++n) {
      c.q = reinterpret_cast<const __half*>(q) + size_t(n) * qHeads * sh.dim;
      c.scores = scores + size_t(n) * qHeads * sh.tokens;
      PACKKV_CUDA_CHECK(cudaLaunchKernelEx(&cfg, fn, c));
    }
    return;
  }
  const uint32_t scoreBlocks = a.devBlocks + (a.M > 0 ? a.chunks : 0);
  static const bool pdl = [] {  // programmatic dependent launch of selectKernel: PACKKV_TAILORKV_PDL=1 (H100: no change, docs/kernels.md #5)
    const char* v = std::getenv("PACKKV_TAILORKV_PDL");
    return v && std::string(v) == "1";
  }();
  for (uint32_t n = 0; n < nq; ++n) {
    a.q = reinterpret_cast<const __half*>(q) + size_t(n) * qHeads * sh.dim;
    a.scores = scores + size_t(n) * qHeads * sh.tokens;
    if (scoreBlocks > 0 && sh.heads > 0) {
      score<<<dim3(scoreBlocks, a.H), sp::kQkThreads, scoreSmem, l.stream>>>(a);
      PACKKV_LAUNCH_CHECK();
    }
    if (a.M > 0 && a.k > 0 && sh.heads > 0) {
      cudaLaunchConfig_t cfg{};
      cfg.gridDim = dim3(a.selChunks, a.H), cfg.blockDim = dim3(sp::kQkThreads);
      cfg.dynamicSmemBytes = selectSmem, cfg.stream = l.stream;
      cudaLaunchAttribute attr{};
      attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;  // launch overlaps scoreKernel's tail
      attr.val.programmaticStreamSerializationAllowed = 1;
      cfg.attrs = &attr, cfg.numAttrs = pdl ? 1 : 0;
      PACKKV_CUDA_CHECK(cudaLaunchKernelEx(&cfg, select, a));
    }
  }
}

void pvSparse(const StreamView& s, const uint16_t* p, uint32_t qHeads, uint32_t nq, float* out,
              const gpu::Launch& l) {
  const Shape& sh = s.header.shape;
  const SparseLayout lay = sparseLayout(s.params, s.header.kind, sh);
  requireBodyBytes(s, lay.total);
  const uint32_t G = qHeads / sh.heads;
  PvFn fn = pvKernelFor(sh.dim, G);
  if (!fn)
    fail("mode=s p·V has CUDA kernels for head_dim 64/128 and 1/2/4/8 query heads per KV head, got head_dim " +
         std::to_string(sh.dim) + " with " + std::to_string(G));
  if (reinterpret_cast<uintptr_t>(s.body) % 16 != 0) fail("mode=s p·V needs a 16-byte aligned stream body");
  requireWorkspace(s, qHeads, l);
  const uint32_t rows = lay.deviceTokens + lay.hostTokens;
  sp::PvArgs a{};
  a.dev = reinterpret_cast<const uint16_t*>(s.body + lay.deviceOff);
  a.host = reinterpret_cast<const uint16_t*>(s.body + lay.hostOff);
  a.H = sh.heads, a.T = sh.tokens, a.sinks = lay.sinks, a.window = lay.window, a.M = lay.hostTokens;
  a.devTokens = lay.deviceTokens;
  a.splits = pvSplitsOf(fn, rows, sh.heads);
  a.tilesPerBlock = ((rows + 31) / 32 + a.splits - 1) / a.splits;
  uint8_t* ws = static_cast<uint8_t*>(l.workspace) + kFlagBytes;
  a.counters = reinterpret_cast<unsigned*>(ws);
  a.partial = reinterpret_cast<float*>(ws + (size_t(sh.heads) * 4 + 255) / 256 * 256);
  for (uint32_t n = 0; n < nq; ++n) {
    a.p = reinterpret_cast<const __half*>(p) + size_t(n) * qHeads * sh.tokens;
    a.out = out + size_t(n) * qHeads * sh.dim;
    fn<<<dim3(a.splits, sh.heads), sp::kPvThreads, 0, l.stream>>>(a);
    PACKKV_LAUNCH_CHECK();
  }
}

// ---- the GpuCodecDef entries -----------------------------------------------------------------

uint64_t bodyBytes(const Shape& s, TensorKind kind, const Params& p) {
  if (modeOf(p) == Mode::Quant)
    return kivi::layoutOf(s, kind, uint32_t(p.integer("bits")), uint32_t(p.integer("group")),
                                   uint32_t(p.integer("residual")))
        .total;
  return sparseLayout(p, kind, s).total;
}

size_t workspaceBytes(const StreamView& s, uint32_t qHeads) {
  if (modeOf(s.params) == Mode::Quant) return asKivi([&] { return kiviRow().workspaceBytes(kiviView(s), qHeads); });
  return sparseWorkspaceBytes(s, qHeads);
}

Breakdown encode(const float* x, const Shape& s, TensorKind kind, const Params& p, uint8_t* body, const gpu::Launch& l) {
  const CodecDef& cpu = findCodec("tailorkv");
  cpu.check(p, kind, s);
  if (modeOf(p) == Mode::Quant) {
    Params kp = kiviParams(p, kind, s);
    return asKivi([&] { return kiviRow().encode(x, s, kind, kp, body, l); });
  }
  return encodeSparse(x, s, kind, p, body, l);
}

void decode(const StreamView& s, float* out, const gpu::Launch& l) {
  if (modeOf(s.params) == Mode::Quant) return asKivi([&] { kiviRow().decode(kiviView(s), out, l); });
  const Shape& sh = s.header.shape;
  SparseLayout lay = sparseLayout(s.params, s.header.kind, sh);
  requireBodyBytes(s, lay.total);
  SparseArgs a{reinterpret_cast<const uint16_t*>(s.body + lay.deviceOff),
               reinterpret_cast<const uint16_t*>(s.body + lay.hostOff),
               out, sh.heads, sh.tokens, sh.dim, lay.sinks, lay.window, lay.hostTokens, lay.deviceTokens,
               s.header.kind == TensorKind::Key};
  const size_t n = sh.elements();
  if (n == 0) return;
  const unsigned grid = unsigned(std::min<size_t>((n + 255) / 256, size_t(gpu::multiprocessors()) * 16));
  decodeSparseKernel<<<grid, 256, 0, l.stream>>>(a);
  PACKKV_LAUNCH_CHECK();
}

void qk(const StreamView& s, const uint16_t* q, uint32_t qHeads, uint32_t nq, float* scores, const gpu::Launch& l) {
  if (modeOf(s.params) == Mode::Quant)
    return asKivi([&] { kiviRow().qk(kiviView(s), q, qHeads, nq, scores, l); });
  qkSparse(s, q, qHeads, nq, scores, l);
}

void pv(const StreamView& s, const uint16_t* p, uint32_t qHeads, uint32_t nq, float* out, const gpu::Launch& l) {
  if (modeOf(s.params) == Mode::Quant) return asKivi([&] { kiviRow().pv(kiviView(s), p, qHeads, nq, out, l); });
  pvSparse(s, p, qHeads, nq, out, l);
}

}  // namespace

const gpu::GpuCodecDef kTailorKvGpuCodec = {"tailorkv", bodyBytes, workspaceBytes, encode, decode, qk, pv};
static const gpu::GpuCodecRegistrar registrar(kTailorKvGpuCodec);

}  // namespace packkv
