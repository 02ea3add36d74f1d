// The GPU codec table (filled by each codec's cuda.cu) and small device queries.
#include <map>
#include <mutex>

#include "common/cuda_check.h"
#include "common/gpu_codec.h"
#include "registry.h"

namespace packkv::gpu {

static std::vector<const GpuCodecDef*>& registered() {
  static std::vector<const GpuCodecDef*> codecs;
  return codecs;
}

GpuCodecRegistrar::GpuCodecRegistrar(const GpuCodecDef& codec) { registered().push_back(&codec); }

const std::vector<const GpuCodecDef*>& allGpuCodecs() { return registered(); }

const GpuCodecDef* findGpuCodec(const std::string& name) {
  for (auto* c : registered())
    if (c->name == name) return c;
  return nullptr;
}

static const GpuCodecDef& gpuCodecOf(const StreamView& s) {
  const GpuCodecDef* c = findGpuCodec(s.header.codec);
  if (!c) throw CodecError("codec '" + s.header.codec + "' has no CUDA kernels in this build");
  return *c;
}

static void requireKind(const StreamView& s, TensorKind want, const char* op) {
  if (s.header.kind != want)
    throw CodecError(std::string(op) + " needs a " + kindName(want) + " stream, got a " + kindName(s.header.kind) +
                     " stream");
}

void decodeStream(const StreamView& s, float* out, const Launch& l) { gpuCodecOf(s).decode(s, out, l); }

void qkStream(const StreamView& s, const uint16_t* q, uint32_t qHeads, uint32_t nq, float* scores, const Launch& l) {
  requireKind(s, TensorKind::Key, "q·Kᵀ");
  checkGqa(qHeads, s.header.shape.heads);
  gpuCodecOf(s).qk(s, q, qHeads, nq, scores, l);
}

void pvStream(const StreamView& s, const uint16_t* p, uint32_t qHeads, uint32_t nq, float* out, const Launch& l) {
  requireKind(s, TensorKind::Value, "p·V");
  checkGqa(qHeads, s.header.shape.heads);
  gpuCodecOf(s).pv(s, p, qHeads, nq, out, l);
}

size_t workspaceBytes(const StreamView& s, uint32_t qHeads) { return gpuCodecOf(s).workspaceBytes(s, qHeads); }

int multiprocessors() {
  static std::mutex mutex;
  static std::map<int, int> byDevice;
  int device = 0;
  PACKKV_CUDA_CHECK(cudaGetDevice(&device));
  std::lock_guard<std::mutex> lock(mutex);
  auto it = byDevice.find(device);
  if (it != byDevice.end()) return it->second;
  int sms = 0;
  PACKKV_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  byDevice[device] = sms;
  return sms;
}

}  // namespace packkv::gpu
