// fp16 baseline on the GPU: cuBLAS strided-batched GEMMs, one batch entry per KV head with its
// GQA group of query heads as the N dimension (every KV head's bytes read once, all in one call).
#include <cuda_fp16.h>

#include "common/cublas_dl.h"
#include "common/cuda_check.h"
#include "common/gpu_codec.h"
#include "common/layout.h"
#include "fp16/format.h"

namespace packkv {
namespace {

uint64_t bodyBytes(const Shape& s, TensorKind, const Params&) { return fp16::bodyBytes(s.heads, s.tokens, s.dim); }
size_t workspaceBytes(const StreamView&, uint32_t) { return 0; }

__global__ void encodeKernel(const float* __restrict__ x, __half* __restrict__ out, size_t n, int* bad) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    float v = x[i];
    if (!isfinite(v)) atomicOr(bad, 1);
    out[i] = __float2half_rn(v);
  }
}

__global__ void decodeKernel(const __half* __restrict__ in, float* __restrict__ out, size_t n) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    out[i] = __half2float(in[i]);
}

unsigned gridFor(size_t n) { return unsigned(std::min<size_t>((n + 255) / 256, size_t(gpu::multiprocessors()) * 16)); }

Breakdown encode(const float* x, const Shape& s, TensorKind, const Params&, uint8_t* body, const gpu::Launch& l) {
  if (!l.workspace || l.workspaceBytes < sizeof(int)) throw CodecError("codec 'fp16' GPU encode needs a workspace");
  int* bad = static_cast<int*>(l.workspace);
  size_t n = s.elements();
  encodeKernel<<<gridFor(n), 256, 0, l.stream>>>(x, reinterpret_cast<__half*>(body), n, bad);
  PACKKV_LAUNCH_CHECK();
  int hostBad = 0;
  PACKKV_CUDA_CHECK(cudaMemcpyAsync(&hostBad, bad, sizeof(int), cudaMemcpyDeviceToHost, l.stream));
  PACKKV_CUDA_CHECK(cudaStreamSynchronize(l.stream));
  if (hostBad) {
    PACKKV_CUDA_CHECK(cudaMemsetAsync(bad, 0, sizeof(int), l.stream));
    throw CodecError("codec 'fp16': non-finite values (NaN/Inf) cannot be compressed");
  }
  Breakdown b;
  b.payload = n * 2;
  return b;
}

void decode(const StreamView& s, float* out, const gpu::Launch& l) {
  size_t n = s.header.shape.elements();
  requireBodyBytes(s, n * 2);
  decodeKernel<<<gridFor(n), 256, 0, l.stream>>>(reinterpret_cast<const __half*>(s.body), out, n);
  PACKKV_LAUNCH_CHECK();
}

// Row-major K_h [T][D] is column-major D x T (ld D); q_h's group [n][D] is column-major D x n.
// scores_h (column-major T x n, ld T) = K_hᵀ q_h: m = T, n = group, k = D.
void qk(const StreamView& s, const uint16_t* q, uint32_t qHeads, uint32_t nq, float* scores, const gpu::Launch& l) {
  requireBodyBytes(s, s.header.shape.elements() * 2);
  const Shape& sh = s.header.shape;
  int group = int(qHeads / sh.heads);  // gpu::qkStream/pvStream checked GQA and kind
  for (uint32_t n = 0; n < nq; ++n)
    cublas::gemmF16F32(l.stream, cublas::Op::T, cublas::Op::N, int(sh.tokens), group, int(sh.dim), s.body, int(sh.dim),
                       (long long)sh.tokens * sh.dim, q + size_t(n) * qHeads * sh.dim, int(sh.dim),
                       (long long)group * sh.dim, scores + size_t(n) * qHeads * sh.tokens, int(sh.tokens),
                       (long long)group * sh.tokens, int(sh.heads));
}

// out_h (column-major D x n, ld D) = V_h (column-major D x T) p_h (column-major T x n, ld T).
void pv(const StreamView& s, const uint16_t* p, uint32_t qHeads, uint32_t nq, float* out, const gpu::Launch& l) {
  requireBodyBytes(s, s.header.shape.elements() * 2);
  const Shape& sh = s.header.shape;
  int group = int(qHeads / sh.heads);  // gpu::qkStream/pvStream checked GQA and kind
  for (uint32_t n = 0; n < nq; ++n)
    cublas::gemmF16F32(l.stream, cublas::Op::N, cublas::Op::N, int(sh.dim), group, int(sh.tokens), s.body, int(sh.dim),
                       (long long)sh.tokens * sh.dim, p + size_t(n) * qHeads * sh.tokens, int(sh.tokens),
                       (long long)group * sh.tokens, out + size_t(n) * qHeads * sh.dim, int(sh.dim),
                       (long long)group * sh.dim, int(sh.heads));
}

}  // namespace

const gpu::GpuCodecDef kFp16GpuCodec = {"fp16", bodyBytes, workspaceBytes, encode, decode, qk, pv};
static const gpu::GpuCodecRegistrar registrar(kFp16GpuCodec);

}  // namespace packkv
