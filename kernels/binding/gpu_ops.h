// Timed GPU runs of a codec's stream for the addon: upload, warm up, time with CUDA events, check.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace packkv::binding {

enum class GpuOp { Decode, Qk, Pv, Encode };

struct GpuRun {
  std::vector<float> result;
  double medianMs = 0;  // median of the timed repeats (CUDA events)
  double minMs = 0;
  int repeats = 0;
  std::string device;
};

/**
 * Runs op on the stream's body in device memory: x is q [nq][qHeads][dim] (Qk) or
 * p [nq][qHeads][tokens] (Pv), converted to fp16 as attention holds them; unused for Decode.
 * The output buffer is poisoned with NaN before every run, so an unwritten output fails the check.
 * Encode: x is the tensor the stream was encoded from (f32 [heads][tokens][dim]); the GPU encoder
 * runs on it with the stream's codec and parameters into a 0xA5-poisoned buffer, and its body and
 * byte breakdown must equal the stream's (the CPU encoder's) byte for byte, else CodecError.
 * `result` stays empty.
 * Throws CodecError / CudaError with the reason (no device, no kernels for the codec, launch failure).
 */
GpuRun runOnGpu(GpuOp op, const uint8_t* stream, size_t streamBytes, const float* x, size_t xLen, uint32_t qHeads,
                uint32_t nq, int repeats);

/** Codecs with CUDA kernels in this build (empty without CUDA). */
std::vector<std::string> gpuCodecNames();

}  // namespace packkv::binding
