// Timed GPU runs for the addon (see gpu_ops.h). Built only with CUDA; otherwise runOnGpu says why not.
#include "binding/gpu_ops.h"

#include <algorithm>
#include <cmath>

#include "codec.h"
#include "registry.h"

#ifdef PACKKV_HAVE_CUDA
#include <cuda_runtime_api.h>

#include "common/cuda_check.h"
#include "common/cuda_probe.h"
#include "common/gpu_codec.h"
#include "common/half.h"
#endif

namespace packkv::binding {

#ifndef PACKKV_HAVE_CUDA
std::vector<std::string> gpuCodecNames() { return {}; }

GpuRun runOnGpu(GpuOp, const uint8_t*, size_t, const float*, size_t, uint32_t, uint32_t, int) {
  throw CodecError("this addon was built without CUDA (no nvcc at build time)");
}
#else

namespace {

/** A device allocation freed on scope exit. */
struct DeviceBuffer {
  void* ptr = nullptr;
  explicit DeviceBuffer(size_t bytes) {
    if (bytes) PACKKV_CUDA_CHECK(cudaMalloc(&ptr, bytes));
  }
  ~DeviceBuffer() {
    if (ptr) cudaFree(ptr);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  template <typename T>
  T* as() const { return static_cast<T*>(ptr); }
};

struct Events {
  cudaEvent_t start = nullptr, stop = nullptr;
  Events() {
    PACKKV_CUDA_CHECK(cudaEventCreate(&start));
    PACKKV_CUDA_CHECK(cudaEventCreate(&stop));
  }
  ~Events() {
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
  }
};

/** Median and minimum of the timed samples. */
void summarize(std::vector<float> times, GpuRun& run) {
  std::sort(times.begin(), times.end());
  run.repeats = int(times.size());
  run.medianMs = times.empty() ? 0 : times[times.size() / 2];
  run.minMs = times.empty() ? 0 : times.front();
}

bool sameBreakdown(const Breakdown& a, const Breakdown& b) {
  return a.payload == b.payload && a.scales == b.scales && a.zeros == b.zeros && a.residual == b.residual &&
         a.metadata == b.metadata && a.host == b.host;
}

/** GpuOp::Encode (see gpu_ops.h): times the codec's GPU encoder and checks it against the stream. */
GpuRun encodeOnGpu(const StreamView& host, const float* x, size_t xLen, int repeats, const std::string& device) {
  const Shape& sh = host.header.shape;
  const std::string who = "GPU encode of codec '" + host.header.codec + "' (" + kindName(host.header.kind) + ")";
  if (xLen != sh.elements())
    throw CodecError(who + ": the input has " + std::to_string(xLen) + " values, the stream's shape " +
                     std::to_string(sh.elements()));
  const gpu::GpuCodecDef* codec = gpu::findGpuCodec(host.header.codec);
  const size_t room = std::max<size_t>(codec->bodyBytes(sh, host.header.kind, host.params), host.bodyBytes);
  // Encoders keep their error flags in the workspace (KIVI's) or allocate their own scratch.
  const size_t wsBytes = std::max<size_t>(gpu::workspaceBytes(host, 1), 256);
  DeviceBuffer input(xLen * sizeof(float)), body(room), workspace(wsBytes);
  if (xLen) PACKKV_CUDA_CHECK(cudaMemcpy(input.ptr, x, xLen * sizeof(float), cudaMemcpyHostToDevice));
  PACKKV_CUDA_CHECK(cudaMemset(workspace.ptr, 0, wsBytes));
  gpu::Launch launch{nullptr, workspace.ptr, wsBytes};
  Events ev;
  std::vector<float> times;
  std::vector<uint8_t> got(host.bodyBytes);
  const int warmup = 1;
  for (int i = 0; i < warmup + repeats; ++i) {
    if (room) PACKKV_CUDA_CHECK(cudaMemset(body.ptr, 0xA5, room));  // unwritten bytes fail the check
    PACKKV_CUDA_CHECK(cudaEventRecord(ev.start, launch.stream));
    Breakdown b = codec->encode(input.as<float>(), sh, host.header.kind, host.params, body.as<uint8_t>(), launch);
    PACKKV_CUDA_CHECK(cudaEventRecord(ev.stop, launch.stream));
    PACKKV_CUDA_CHECK(cudaEventSynchronize(ev.stop));
    PACKKV_CUDA_CHECK(cudaGetLastError());
    float ms = 0;
    PACKKV_CUDA_CHECK(cudaEventElapsedTime(&ms, ev.start, ev.stop));
    if (i >= warmup) times.push_back(ms);
    if (i == 0) {
      if (!got.empty()) PACKKV_CUDA_CHECK(cudaMemcpy(got.data(), body.ptr, got.size(), cudaMemcpyDeviceToHost));
      auto diff = std::mismatch(got.begin(), got.end(), host.body);
      if (diff.first != got.end())
        throw CodecError(who + " differs from the CPU encoder at body byte " +
                         std::to_string(diff.first - got.begin()) + " of " + std::to_string(got.size()));
      if (!sameBreakdown(b, host.header.breakdown))
        throw CodecError(who + ": its byte breakdown differs from the CPU encoder's");
    }
  }
  GpuRun run;
  summarize(std::move(times), run);
  run.device = device;
  return run;
}

}  // namespace

std::vector<std::string> gpuCodecNames() {
  std::vector<std::string> names;
  for (const gpu::GpuCodecDef* c : gpu::allGpuCodecs()) names.push_back(c->name);
  return names;
}

GpuRun runOnGpu(GpuOp op, const uint8_t* stream, size_t streamBytes, const float* x, size_t xLen, uint32_t qHeads,
                uint32_t nq, int repeats) {
  CudaStatus st = probeCuda();
  if (!st.usable) throw CodecError(st.reason);
  StreamView host = openStream(stream, streamBytes);
  if (!gpu::findGpuCodec(host.header.codec))
    throw CodecError("codec '" + host.header.codec + "' has no CUDA kernels in this build");
  const Shape& sh = host.header.shape;
  if (op == GpuOp::Encode) return encodeOnGpu(host, x, xLen, repeats, st.device);
  size_t outLen = op == GpuOp::Decode ? sh.elements()
                  : op == GpuOp::Qk   ? size_t(nq) * qHeads * sh.tokens
                                      : size_t(nq) * qHeads * sh.dim;

  DeviceBuffer body(host.bodyBytes), input(xLen * 2), out(outLen * 4);
  PACKKV_CUDA_CHECK(cudaMemcpy(body.ptr, host.body, host.bodyBytes, cudaMemcpyHostToDevice));
  if (xLen) {
    std::vector<uint16_t> halves(xLen);
    for (size_t i = 0; i < xLen; ++i) halves[i] = floatToHalf(x[i]);
    PACKKV_CUDA_CHECK(cudaMemcpy(input.ptr, halves.data(), xLen * 2, cudaMemcpyHostToDevice));
  }
  StreamView dev = host;
  dev.body = body.as<uint8_t>();
  size_t wsBytes = op == GpuOp::Decode ? 0 : gpu::workspaceBytes(dev, qHeads);
  DeviceBuffer workspace(wsBytes);
  if (wsBytes) PACKKV_CUDA_CHECK(cudaMemset(workspace.ptr, 0, wsBytes));
  gpu::Launch launch{nullptr, workspace.ptr, wsBytes};

  auto once = [&]() {
    switch (op) {
      case GpuOp::Decode: gpu::decodeStream(dev, out.as<float>(), launch); break;
      case GpuOp::Qk: gpu::qkStream(dev, input.as<uint16_t>(), qHeads, nq, out.as<float>(), launch); break;
      case GpuOp::Pv: gpu::pvStream(dev, input.as<uint16_t>(), qHeads, nq, out.as<float>(), launch); break;
      case GpuOp::Encode: break;  // encodeOnGpu above
    }
  };
  Events ev;
  std::vector<float> times;
  const int warmup = 3;
  for (int i = 0; i < warmup + repeats; ++i) {
    PACKKV_CUDA_CHECK(cudaMemset(out.ptr, 0xFF, outLen * 4));  // NaN: an unwritten output fails below
    PACKKV_CUDA_CHECK(cudaEventRecord(ev.start, launch.stream));
    once();
    PACKKV_CUDA_CHECK(cudaEventRecord(ev.stop, launch.stream));
    PACKKV_CUDA_CHECK(cudaEventSynchronize(ev.stop));
    PACKKV_CUDA_CHECK(cudaGetLastError());
    float ms = 0;
    PACKKV_CUDA_CHECK(cudaEventElapsedTime(&ms, ev.start, ev.stop));
    if (i >= warmup) times.push_back(ms);
  }
  GpuRun run;
  run.result.resize(outLen);
  PACKKV_CUDA_CHECK(cudaMemcpy(run.result.data(), out.ptr, outLen * 4, cudaMemcpyDeviceToHost));
  size_t unwritten = 0;
  for (float v : run.result) unwritten += std::isnan(v);
  if (unwritten)
    throw CodecError("GPU " + std::string(op == GpuOp::Decode ? "decode" : op == GpuOp::Qk ? "q·Kᵀ" : "p·V") + " of codec '" +
                     host.header.codec + "' left " + std::to_string(unwritten) + " outputs unwritten (NaN)");
  summarize(std::move(times), run);
  run.device = st.device;
  return run;
}

#endif

}  // namespace packkv::binding
