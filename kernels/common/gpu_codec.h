// The CUDA side of a codec's registry row: encode / decode / q·Kᵀ / p·V on device memory.
//
// A GPU call takes a StreamView whose header and params were parsed on the host (openStream) and
// whose `body` points to the same body bytes in device memory. Queries and probabilities are
// binary16 in device memory (what attention holds), results are fp32:
//   q      f16 [nq][qHeads][dim]     -> scores f32 [nq][qHeads][tokens]
//   p      f16 [nq][qHeads][tokens]  -> out    f32 [nq][qHeads][dim]
// Calls are asynchronous on Launch::stream except where noted.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>
#include <vector>

#include "codec.h"

namespace packkv::gpu {

/** Where a call runs, and its device scratch. */
struct Launch {
  cudaStream_t stream = nullptr;
  /** Device scratch of at least GpuCodecDef::workspaceBytes, zero-filled once before its first
   *  use; the kernels hand it back zero-filled (reduction counters, error flags). */
  void* workspace = nullptr;
  size_t workspaceBytes = 0;
};

struct GpuCodecDef {
  std::string name;  // the CPU codec's name
  /** Body bytes the encoder writes for this shape (the CPU encoder's body, byte for byte). */
  uint64_t (*bodyBytes)(const Shape&, TensorKind, const Params&);
  /** Scratch the calls on this stream need for `qHeads` query heads. */
  size_t (*workspaceBytes)(const StreamView&, uint32_t qHeads);
  /** x f32 [heads][tokens][dim] (device) -> body (device); synchronizes to report bad input. */
  Breakdown (*encode)(const float* x, const Shape&, TensorKind, const Params&, uint8_t* body, const Launch&);
  void (*decode)(const StreamView&, float* out, const Launch&);
  void (*qk)(const StreamView&, const uint16_t* q, uint32_t qHeads, uint32_t nq, float* scores, const Launch&);
  void (*pv)(const StreamView&, const uint16_t* p, uint32_t qHeads, uint32_t nq, float* out, const Launch&);
};

/** A codec's cuda.cu registers its row with `static const GpuCodecRegistrar reg(kMyGpuCodec);`. */
struct GpuCodecRegistrar {
  explicit GpuCodecRegistrar(const GpuCodecDef& codec);
};
/** The GPU row of a codec, or nullptr when it has no CUDA kernels. */
const GpuCodecDef* findGpuCodec(const std::string& name);
const std::vector<const GpuCodecDef*>& allGpuCodecs();

/** Checked entry points (kind, GQA, device support), like registry.h's for the CPU. */
void decodeStream(const StreamView& s, float* out, const Launch& l);
void qkStream(const StreamView& s, const uint16_t* q, uint32_t qHeads, uint32_t nq, float* scores, const Launch& l);
void pvStream(const StreamView& s, const uint16_t* p, uint32_t qHeads, uint32_t nq, float* out, const Launch& l);
size_t workspaceBytes(const StreamView& s, uint32_t qHeads);

/** Multiprocessors of the current device (cached per device). */
int multiprocessors();

}  // namespace packkv::gpu
