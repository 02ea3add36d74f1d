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
// mode=s: decode runs here (the fp16 sinks/window rows and the offloaded tokens put back in token
// order); encode round-trips through the CPU encoder. The products (approximate channel scoring and
// per-query top-k in q·Kᵀ, sparse p·V) have no CUDA kernels yet and throw a CodecError.
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "common/cuda_check.h"
#include "common/gpu_codec.h"
#include "common/layout.h"
#include "registry.h"
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
  return 256;
}

Breakdown encode(const float* x, const Shape& s, TensorKind kind, const Params& p, uint8_t* body, const gpu::Launch& l) {
  const CodecDef& cpu = findCodec("tailorkv");
  cpu.check(p, kind, s);
  if (modeOf(p) == Mode::Quant) {
    Params kp = kiviParams(p, kind, s);
    return asKivi([&] { return kiviRow().encode(x, s, kind, kp, body, l); });
  }
  std::vector<float> hx(s.elements());
  PACKKV_CUDA_CHECK(cudaMemcpyAsync(hx.data(), x, hx.size() * sizeof(float), cudaMemcpyDeviceToHost, l.stream));
  PACKKV_CUDA_CHECK(cudaStreamSynchronize(l.stream));
  for (float v : hx)
    if (!std::isfinite(v)) throw CodecError("codec 'tailorkv': non-finite values (NaN/Inf) cannot be compressed");
  EncodedBody e = cpu.encode(hx.data(), s, kind, p);
  PACKKV_CUDA_CHECK(cudaMemcpyAsync(body, e.bytes.data(), e.bytes.size(), cudaMemcpyHostToDevice, l.stream));
  PACKKV_CUDA_CHECK(cudaStreamSynchronize(l.stream));
  return e.breakdown;
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
  throw CodecError("tailorkv mode=s has no CUDA kernels yet (q·Kᵀ with channel scoring and top-k)");
}

void pv(const StreamView& s, const uint16_t* p, uint32_t qHeads, uint32_t nq, float* out, const gpu::Launch& l) {
  if (modeOf(s.params) == Mode::Quant) return asKivi([&] { kiviRow().pv(kiviView(s), p, qHeads, nq, out, l); });
  throw CodecError("tailorkv mode=s has no CUDA kernels yet (sparse p·V)");
}

}  // namespace

const gpu::GpuCodecDef kTailorKvGpuCodec = {"tailorkv", bodyBytes, workspaceBytes, encode, decode, qk, pv};
static const gpu::GpuCodecRegistrar registrar(kTailorKvGpuCodec);

}  // namespace packkv
