// PackKV on the GPU: decode (bit-identical to cpu.cpp) and the fused products q·Kᵀ / p·V over the
// packed stream (packkv/cuda_kernels.cuh; versions v2-v4 in cuda_kernels_v*.cuh, v4 the default for
// head_dim 128, PACKKV_GPU_KERNEL=v1|v2|v3 selects an older one), dispatched from one table over
// pack size x GQA group.
// Encode runs on the GPU (packkv/cuda_encode.cuh), byte-identical to cpu.cpp's encoder.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "common/cuda_check.h"
#include "common/gpu_codec.h"
#include "common/layout.h"
#include "packkv/cuda_encode.cuh"
#include "packkv/cuda_kernels.cuh"
#include "packkv/cuda_kernels_v2.cuh"
#include "packkv/cuda_kernels_v3.cuh"
#include "packkv/cuda_kernels_v4.cuh"
#include "packkv/format.h"
#include "registry.h"

namespace packkv {
namespace {

using namespace packkv_codec;
using packkv_gpu::Args;
using packkv_gpu::kWarps;

[[noreturn]] void gpuFail(const std::string& m) { throw CodecError("codec 'packkv' on the GPU: " + m); }

Config configOf(const Params& p, TensorKind kind) {  // as cpu.cpp's
  const std::string& repack = p.text("repack");
  return Config{p.real(kind == TensorKind::Key ? "k_rel" : "v_rel"), uint32_t(p.integer("block")),
                uint32_t(p.integer("buffer")), uint32_t(p.integer("pack")),
                repack == "none" ? Repack::None : repack == "greedy" ? Repack::Greedy : Repack::Median,
                p.text("zp") == "hp"};
}

int packIndex(uint32_t pack) {
  if (pack == 8) return 0;
  if (pack == 16) return 1;
  if (pack == 32) return 2;
  gpuFail("pack=" + std::to_string(pack) + " is not supported (8, 16 or 32)");
}
int groupIndex(uint32_t group) {
  if (group == 1) return 0;
  if (group == 2) return 1;
  if (group == 4) return 2;
  if (group == 8) return 3;
  gpuFail(std::to_string(group) + " query heads per KV head is not supported (1, 2, 4 or 8)");
}

/** The stream's sections as kernel arguments; checks what the kernels assume. */
Args argsOf(const StreamView& s, Layout* layoutOut = nullptr, Config* configOut = nullptr) {
  const Shape& sh = s.header.shape;
  const Config c = configOf(s.params, s.header.kind);
  const Layout l = layoutOf(sh, c);
  if (s.bodyBytes < l.fixedBytes() || (l.blocks == 0 && s.bodyBytes != l.fixedBytes()))
    requireBodyBytes(s, l.fixedBytes());  // throws: the body cannot hold its fixed sections
  if (sh.dim % 32 != 0 || sh.dim > 256) gpuFail("head_dim=" + std::to_string(sh.dim) + " must be a multiple of 32, at most 256");
  if (reinterpret_cast<uintptr_t>(s.body) % 4 != 0) gpuFail("the stream body must be 4-byte aligned in device memory");
  packIndex(c.pack);
  const uint64_t segmentBytes = s.bodyBytes - l.fixedBytes();
  Args a{};
  a.scale = s.body + l.scaleOff;
  a.zero = s.body + l.zeroOff;
  a.offsets = reinterpret_cast<const uint32_t*>(s.body + l.offsetOff);
  a.segments = s.body + l.segmentsOff;
  a.perm = a.segments + segmentBytes;
  a.buffer = a.perm + l.permBytes;
  a.endWords = reinterpret_cast<const uint32_t*>(s.body) + s.bodyBytes / 4;
  a.H = int(sh.heads), a.T = int(sh.tokens), a.D = int(sh.dim), a.B = int(c.block), a.P = int(c.pack);
  a.nb = int(l.blocks), a.Tc = int(l.compressedTokens), a.Tr = int(l.bufferTokens);
  a.G = int(l.packsPerChannel), a.GD = int(l.packsPerSegment);
  a.pb = int(l.permBits), a.permBlockBytes = int(l.permBlockBytes);
  a.hp = c.hpZero;
  if (layoutOut) *layoutOut = l;
  if (configOut) *configOut = c;
  return a;
}

// ---- the dispatch table: pack size x GQA group size ----------------------------------------------

struct Launchers {
  void (*qk)(const Args&, dim3, size_t smem, cudaStream_t);
  void (*pv)(const Args&, dim3, size_t smem, cudaStream_t);
  void (*decode)(const Args&, unsigned grid, cudaStream_t);
  void (*qk2)(const Args&, dim3, size_t smem, cudaStream_t);
  void (*pv2)(const Args&, dim3, size_t smem, cudaStream_t);
  void (*qk3)(const Args&, dim3, size_t smem, cudaStream_t);
  void (*pv3)(const Args&, dim3, size_t smem, cudaStream_t);
  int (*qk3Blocks)(size_t smem);  // v3 blocks resident per SM (grid = one wave)
  int (*pv3Blocks)(size_t smem);
  void (*qk4)(const Args&, dim3, size_t smem, cudaStream_t);
  void (*pv4)(const Args&, dim3, size_t smem, cudaStream_t);
  int (*qk4Blocks)(size_t smem);
  int (*pv4Blocks)(size_t smem);
};

/** Products kernel version from PACKKV_GPU_KERNEL (v1, v2, v3 or v4; default v4). v3 and v4 (tensor
 *  cores, cuda_kernels_v3/v4.cuh) need head_dim 128 (others run v2); v4 also block ≤ 256 (larger
 *  blocks run v3). */
int kernelVersion() {
  static const int v = [] {
    const char* e = std::getenv("PACKKV_GPU_KERNEL");
    const std::string s = e ? e : "";
    return s == "v1" ? 1 : s == "v2" ? 2 : s == "v3" ? 3 : 4;
  }();
  return v;
}
bool useV2() { return kernelVersion() >= 2; }
bool useV4(const Args& a) {
  return kernelVersion() == 4 && a.D == packkv_gpu::v4::kD && a.B <= packkv_gpu::v2::kPvSlots;
}
bool useV3(const Args& a) { return kernelVersion() >= 3 && a.D == packkv_gpu::v3::kD && !useV4(a); }

/** Opts kernel K into more than 48 KB of dynamic shared memory (once per size it grows to; one
 *  record per kernel, as the attribute is). */
template <auto K>
void allowSmem(size_t smem) {
  static size_t allowed = 48 * 1024;
  if (smem <= allowed) return;
  PACKKV_CUDA_CHECK(cudaFuncSetAttribute(K, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  allowed = smem;
}

template <int P, int NR>
void launchQk(const Args& a, dim3 grid, size_t smem, cudaStream_t st) {
  packkv_gpu::qkKernel<P, NR><<<grid, kWarps * 32, smem, st>>>(a);
  PACKKV_LAUNCH_CHECK();
}
template <int P, int NR>
void launchPv(const Args& a, dim3 grid, size_t smem, cudaStream_t st) {
  packkv_gpu::pvKernel<P, NR><<<grid, kWarps * 32, smem, st>>>(a);
  PACKKV_LAUNCH_CHECK();
}
template <int P, int NR>
void launchQk2(const Args& a, dim3 grid, size_t smem, cudaStream_t st) {
  allowSmem<packkv_gpu::v2::qkKernel<P, NR>>(smem);
  packkv_gpu::v2::qkKernel<P, NR><<<grid, kWarps * 32, smem, st>>>(a);
  PACKKV_LAUNCH_CHECK();
}
template <int P, int NR>
void launchPv2(const Args& a, dim3 grid, size_t smem, cudaStream_t st) {
  allowSmem<packkv_gpu::v2::pvKernel<P, NR>>(smem);
  packkv_gpu::v2::pvKernel<P, NR><<<grid, kWarps * 32, smem, st>>>(a);
  PACKKV_LAUNCH_CHECK();
}
template <int P, int NR>
void launchQk3(const Args& a, dim3 grid, size_t smem, cudaStream_t st) {
  allowSmem<packkv_gpu::v3::qkKernel<P, NR>>(smem);
  packkv_gpu::v3::qkKernel<P, NR><<<grid, kWarps * 32, smem, st>>>(a);
  PACKKV_LAUNCH_CHECK();
}
template <int P, int NR>
void launchPv3(const Args& a, dim3 grid, size_t smem, cudaStream_t st) {
  allowSmem<packkv_gpu::v3::pvKernel<P, NR>>(smem);
  packkv_gpu::v3::pvKernel<P, NR><<<grid, kWarps * 32, smem, st>>>(a);
  PACKKV_LAUNCH_CHECK();
}
template <int P, int NR>
void launchQk4(const Args& a, dim3 grid, size_t smem, cudaStream_t st) {
  allowSmem<packkv_gpu::v4::qkKernel<P, NR>>(smem);
  packkv_gpu::v4::qkKernel<P, NR><<<grid, kWarps * 32, smem, st>>>(a);
  PACKKV_LAUNCH_CHECK();
}
template <int P, int NR>
void launchPv4(const Args& a, dim3 grid, size_t smem, cudaStream_t st) {
  allowSmem<packkv_gpu::v4::pvKernel<P, NR>>(smem);
  packkv_gpu::v4::pvKernel<P, NR><<<grid, kWarps * 32, smem, st>>>(a);
  PACKKV_LAUNCH_CHECK();
}
/** Blocks of kernel K resident per multiprocessor at this dynamic shared memory (cached). */
template <auto K>
int residentBlocks(size_t smem) {
  static size_t cachedSmem = 0;
  static int cached = 0;
  if (cachedSmem != smem) {
    allowSmem<K>(smem);
    int n = 0;
    PACKKV_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, K, kWarps * 32, smem));
    cached = std::max(1, n), cachedSmem = smem;
  }
  return cached;
}
template <int P>
void launchDecode(const Args& a, unsigned grid, cudaStream_t st) {
  packkv_gpu::decodeKernel<P><<<grid, kWarps * 32, 0, st>>>(a);
  PACKKV_LAUNCH_CHECK();
}

template <int P, int NR>
constexpr Launchers row() {
  return {launchQk<P, NR>, launchPv<P, NR>, launchDecode<P>, launchQk2<P, NR>, launchPv2<P, NR>,
          launchQk3<P, NR>, launchPv3<P, NR>, residentBlocks<packkv_gpu::v3::qkKernel<P, NR>>,
          residentBlocks<packkv_gpu::v3::pvKernel<P, NR>>, launchQk4<P, NR>, launchPv4<P, NR>,
          residentBlocks<packkv_gpu::v4::qkKernel<P, NR>>, residentBlocks<packkv_gpu::v4::pvKernel<P, NR>>};
}

// [pack 8, 16, 32][query heads per KV head 1, 2, 4, 8]
const Launchers kTable[3][4] = {
    {row<8, 1>(), row<8, 2>(), row<8, 4>(), row<8, 8>()},
    {row<16, 1>(), row<16, 2>(), row<16, 4>(), row<16, 8>()},
    {row<32, 1>(), row<32, 2>(), row<32, 4>(), row<32, 8>()},
};

// ---- the GpuCodecDef entries ---------------------------------------------------------------------

/** The body is data dependent (pack widths): an upper bound, every pack at 8 bits and mins at 8
 *  bits (codes stay below 1/rel + 2 ≤ 252 for the valid rel > 0.004). */
uint64_t bodyBytes(const Shape& s, TensorKind kind, const Params& p) {
  const Config c = configOf(p, kind);
  const Layout l = layoutOf(s, c);
  const uint64_t segment = segmentHeadBytes(l.packsPerSegment, 8) + uint64_t(l.packsPerSegment) * c.pack;
  return l.fixedBytes() + uint64_t(l.blocks) * s.heads * segment;
}

/** p·V blocks per KV head: about four blocks per multiprocessor over all heads. */
int pvSplits(const Args& a) {
  const int items = a.nb * a.G + a.Tr;
  const int want = std::max(1, (4 * gpu::multiprocessors() + a.H - 1) / a.H);
  return std::max(1, std::min(want, (items + kWarps - 1) / kWarps));
}

constexpr size_t kCounterBytes = 256;

size_t workspaceBytes(const StreamView& s, uint32_t qHeads) {
  if (s.header.kind != TensorKind::Value) return 0;
  const Shape& sh = s.header.shape;
  const Config c = configOf(s.params, s.header.kind);
  const Layout l = layoutOf(sh, c);
  Args a{};
  a.H = int(sh.heads), a.nb = int(l.blocks), a.G = int(l.packsPerChannel), a.Tr = int(l.bufferTokens);
  const size_t counters = (sh.heads * sizeof(unsigned) + kCounterBytes - 1) / kCounterBytes * kCounterBytes;
  return counters + size_t(sh.heads) * pvSplits(a) * qHeads / sh.heads * sh.dim * sizeof(float);
}

/** Encode kernels (cuda_encode.cuh): the CPU encoder's body and Breakdown, bit for bit, written
 *  compact at the start of the bodyBytes() room; synchronizes once to read sizes and errors. */
Breakdown encode(const float* x, const Shape& s, TensorKind kind, const Params& p, uint8_t* body, const gpu::Launch& l) {
  findCodec("packkv").check(p, kind, s);
  return packkv_gpu::enc::encodeOnDevice(x, s, kind, configOf(p, kind), body, l.stream);
}

void decode(const StreamView& s, float* out, const gpu::Launch& l) {
  Config c;
  Args a = argsOf(s, nullptr, &c);
  a.out = out;
  const Launchers& fn = kTable[packIndex(c.pack)][0];
  const size_t items = size_t(a.H) * a.nb * a.G;
  const int sms = gpu::multiprocessors();
  if (items > 0) fn.decode(a, unsigned(std::min<size_t>((items + kWarps - 1) / kWarps, size_t(sms) * 16)), l.stream);
  const size_t rest = size_t(a.H) * a.Tr * a.D;
  if (rest > 0) {
    packkv_gpu::decodeBufferKernel<<<unsigned(std::min<size_t>((rest + 255) / 256, size_t(sms) * 16)), 256, 0,
                                     l.stream>>>(a);
    PACKKV_LAUNCH_CHECK();
  }
}

void qk(const StreamView& s, const uint16_t* q, uint32_t qHeads, uint32_t nq, float* scores, const gpu::Launch& l) {
  Config c;
  Args a = argsOf(s, nullptr, &c);
  const uint32_t group = qHeads / uint32_t(a.H);
  const Launchers& fn = kTable[packIndex(c.pack)][groupIndex(group)];
  const int items = a.nb * a.G + a.Tr;
  if (items == 0) return;
  if (useV2()) {  // runs of token blocks per block, about 4 blocks per SM over all heads
    const bool v4 = useV4(a), v3 = useV3(a);
    const size_t smem = v4   ? packkv_gpu::v4::qkSmemBytes(a.P, int(group))
                        : v3 ? packkv_gpu::v3::qkSmemBytes(a.P, int(group))
                             : 2 * size_t(packkv_gpu::v2::kBufBytes) + (size_t(group) * a.D + group) * sizeof(float);
    // v2: about 4 blocks per SM over all heads; v3/v4: as many as are resident at once (one wave).
    const int perSm = v4 ? fn.qk4Blocks(smem) : v3 ? fn.qk3Blocks(smem) : 4;
    const int splits = std::max(1, std::min(std::max(a.nb, 1), v3 || v4 ? perSm * gpu::multiprocessors() / a.H
                                                                         : (perSm * gpu::multiprocessors() + a.H - 1) / a.H));
    const dim3 grid(unsigned(splits), unsigned(a.H));
    for (uint32_t n = 0; n < nq; ++n) {
      a.in = q + size_t(n) * qHeads * a.D;
      a.out = scores + size_t(n) * qHeads * a.T;
      (v4 ? fn.qk4 : v3 ? fn.qk3 : fn.qk2)(a, grid, smem, l.stream);
    }
    return;
  }
  const int perBlock = kWarps * 4;  // 8-lane groups per block
  const int cap = std::max(1, 8 * gpu::multiprocessors() / a.H);
  const dim3 grid(unsigned(std::min((items + perBlock - 1) / perBlock, cap)), unsigned(a.H));
  const size_t smem = (size_t(group) * a.D + group) * sizeof(float);
  for (uint32_t n = 0; n < nq; ++n) {
    a.in = q + size_t(n) * qHeads * a.D;
    a.out = scores + size_t(n) * qHeads * a.T;
    fn.qk(a, grid, smem, l.stream);
  }
}

void pv(const StreamView& s, const uint16_t* p, uint32_t qHeads, uint32_t nq, float* out, const gpu::Launch& l) {
  Config c;
  Args a = argsOf(s, nullptr, &c);
  const uint32_t group = qHeads / uint32_t(a.H);
  const Launchers& fn = kTable[packIndex(c.pack)][groupIndex(group)];
  if (a.nb * a.G + a.Tr == 0) {  // no tokens: the sums are empty
    PACKKV_CUDA_CHECK(cudaMemsetAsync(out, 0, size_t(nq) * qHeads * a.D * sizeof(float), l.stream));
    return;
  }
  const size_t need = workspaceBytes(s, qHeads);
  if (!l.workspace || l.workspaceBytes < need)
    gpuFail("p·V needs " + std::to_string(need) + " bytes of workspace, got " + std::to_string(l.workspaceBytes));
  const bool v2 = useV2() && a.B <= packkv_gpu::v2::kPvSlots, v3 = v2 && useV3(a), v4 = v2 && useV4(a);
  const size_t smem = v4   ? packkv_gpu::v4::pvSmemBytes(a.P, int(group))
                      : v3 ? packkv_gpu::v3::pvSmemBytes(a.P, int(group))
                      : v2 ? 2 * size_t(packkv_gpu::v2::kBufBytes) +
                                 (2 * size_t(packkv_gpu::v2::kPvSlots) + size_t(kWarps) * a.D) * group * sizeof(float)
                           : size_t(kWarps) * group * a.D * sizeof(float);
  a.splits = pvSplits(a);  // the workspace holds this many partials per head
  if (v3 || v4)  // one wave
    a.splits = std::max(1, std::min(a.splits, (v4 ? fn.pv4Blocks(smem) : fn.pv3Blocks(smem)) * gpu::multiprocessors() / a.H));
  a.counters = static_cast<unsigned*>(l.workspace);
  a.partial = reinterpret_cast<float*>(static_cast<uint8_t*>(l.workspace) +
                                       (a.H * sizeof(unsigned) + kCounterBytes - 1) / kCounterBytes * kCounterBytes);
  const dim3 grid(unsigned(a.splits), unsigned(a.H));
  for (uint32_t n = 0; n < nq; ++n) {
    a.in = p + size_t(n) * qHeads * a.T;
    a.out = out + size_t(n) * qHeads * a.D;
    (v4 ? fn.pv4 : v3 ? fn.pv3 : v2 ? fn.pv2 : fn.pv)(a, grid, smem, l.stream);
  }
}

}  // namespace

const gpu::GpuCodecDef kPackkvGpuCodec = {"packkv", bodyBytes, workspaceBytes, encode, decode, qk, pv};
static const gpu::GpuCodecRegistrar registrar(kPackkvGpuCodec);

}  // namespace packkv
