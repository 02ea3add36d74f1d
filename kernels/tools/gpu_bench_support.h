// packkv_gpubench support: device buffers, deterministic inputs, copy bandwidth, rows and table.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "codec.h"
#include "common/cublas_dl.h"
#include "common/cuda_check.h"
#include "common/half.h"

namespace packkv::bench {

/** A device allocation that frees itself. */
struct DeviceBuffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  explicit DeviceBuffer(size_t n) : bytes(n) { PACKKV_CUDA_CHECK(cudaMalloc(&ptr, std::max<size_t>(n, 16))); }
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr(o.ptr), bytes(o.bytes) { o.ptr = nullptr; }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() {
    if (ptr) cudaFree(ptr);
  }
  void upload(const void* src, size_t n) { PACKKV_CUDA_CHECK(cudaMemcpy(ptr, src, n, cudaMemcpyHostToDevice)); }
  void zero() { PACKKV_CUDA_CHECK(cudaMemset(ptr, 0, bytes)); }
  void poisonNaN() { PACKKV_CUDA_CHECK(cudaMemset(ptr, 0xFF, bytes)); }  // 0xFFFFFFFF is a NaN
  template <typename T>
  std::vector<T> download() const {
    std::vector<T> out(bytes / sizeof(T));
    PACKKV_CUDA_CHECK(cudaDeviceSynchronize());
    PACKKV_CUDA_CHECK(cudaMemcpy(out.data(), ptr, out.size() * sizeof(T), cudaMemcpyDeviceToHost));
    return out;
  }
};

struct EventPair {
  cudaEvent_t start, stop;
  EventPair() {
    PACKKV_CUDA_CHECK(cudaEventCreate(&start));
    PACKKV_CUDA_CHECK(cudaEventCreate(&stop));
  }
  ~EventPair() {
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
  }
  double elapsedMs() const {
    float ms = 0;
    PACKKV_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    return ms;
  }
};

inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  size_t n = v.size();
  return n == 0 ? NAN : n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

inline double relL2(const std::vector<float>& got, const std::vector<float>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    double d = double(got[i]) - double(ref[i]);
    num += d * d;
    den += double(ref[i]) * ref[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

inline std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, sep))
    if (!item.empty()) out.push_back(item);
  return out;
}

inline std::string cublasStatusText() {
  return cublas::available() ? cublas::loadedLibrary() : "unavailable: " + cublas::whyUnavailable();
}

// ---- deterministic inputs (counter-based hash, so any thread can make any element) --------------

inline uint64_t mix(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}
inline double uniform(uint64_t seed, uint64_t i) { return (double(mix(seed * 0x100000001B3ull ^ i) >> 11) + 0.5) / 9007199254740992.0; }
inline double normal(uint64_t seed, uint64_t i) {
  return std::sqrt(-2.0 * std::log(uniform(seed, 2 * i))) * std::cos(6.283185307179586 * uniform(seed, 2 * i + 1));
}
inline float roundHalf(double v) { return halfToFloat(floatToHalf(float(v))); }

/** K, V [heads][tokens][dim], q [qHeads][dim], p [qHeads][tokens]; all fp16-representable. */
struct Inputs {
  std::vector<float> keys, values, q, p;
  std::vector<uint16_t> qHalf, pHalf;
};

template <typename Fn>
void parallelFor(size_t n, Fn fn) {
  unsigned workers = std::max(1u, std::min(16u, std::thread::hardware_concurrency()));
  std::vector<std::thread> pool;
  for (unsigned w = 0; w < workers; ++w)
    pool.emplace_back([=] {
      for (size_t i = w; i < n; i += workers) fn(i);
    });
  for (auto& t : pool) t.join();
}

/**
 * Keys: per-channel offsets, unit noise, and a few outlier channels (every 32nd from 7) at 10x,
 * the pattern KIVI's per-channel key quantization targets. Values: smaller, no outliers.
 * Probabilities: softmax of noisy logits with sparse spikes (attention sinks and hits).
 */
inline Inputs makeInputs(const Shape& s, uint32_t qHeads, uint64_t seed) {
  Inputs in;
  const size_t n = s.elements();
  in.keys.resize(n);
  in.values.resize(n);
  const size_t rowsTotal = size_t(s.heads) * s.tokens;
  parallelFor((rowsTotal + 4095) / 4096, [&](size_t block) {
    for (size_t row = block * 4096; row < std::min(rowsTotal, (block + 1) * 4096); ++row)
      for (uint32_t d = 0; d < s.dim; ++d) {
        size_t i = row * s.dim + d;
        double sigma = d % 32 == 7 ? 10.0 : 1.0;
        in.keys[i] = roundHalf(0.5 * std::sin(0.37 * d) + sigma * normal(seed, i));
        in.values[i] = roundHalf(0.5 * normal(seed + 1, i));
      }
  });
  in.q.resize(size_t(qHeads) * s.dim);
  for (size_t i = 0; i < in.q.size(); ++i) in.q[i] = roundHalf(0.3 * normal(seed + 2, i));
  in.p.resize(size_t(qHeads) * s.tokens);
  parallelFor(qHeads, [&](size_t h) {
    std::vector<double> logits(s.tokens);
    double mx = -1e300, sum = 0;
    for (uint32_t t = 0; t < s.tokens; ++t) {
      size_t i = h * s.tokens + t;
      logits[t] = 1.5 * normal(seed + 3, i) + (uniform(seed + 4, i) < 1.0 / 512 ? 8.0 : 0.0) + (t < 4 ? 10.0 : 0.0);
      mx = std::max(mx, logits[t]);
    }
    for (auto& l : logits) sum += std::exp(l - mx);
    for (uint32_t t = 0; t < s.tokens; ++t) in.p[h * s.tokens + t] = roundHalf(std::exp(logits[t] - mx) / sum);
  });
  in.qHalf.resize(in.q.size());
  in.pHalf.resize(in.p.size());
  for (size_t i = 0; i < in.q.size(); ++i) in.qHalf[i] = floatToHalf(in.q[i]);
  for (size_t i = 0; i < in.p.size(); ++i) in.pHalf[i] = floatToHalf(in.p[i]);
  return in;
}

// ---- device -----------------------------------------------------------------------------------

struct DeviceInfo {
  std::string name;
  int sms = 0, driverVersion = 0, runtimeVersion = 0;
  size_t l2Bytes = 0;
};

inline DeviceInfo deviceInfo() {
  DeviceInfo d;
  cudaDeviceProp prop{};
  PACKKV_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  d.name = prop.name;
  d.sms = prop.multiProcessorCount;
  d.l2Bytes = size_t(prop.l2CacheSize);
  PACKKV_CUDA_CHECK(cudaDriverGetVersion(&d.driverVersion));
  PACKKV_CUDA_CHECK(cudaRuntimeGetVersion(&d.runtimeVersion));
  return d;
}

/** cudaMemcpy device-to-device of 1 GiB: (read + written bytes) / time, median of 10. */
inline double measureCopyGBps(cudaStream_t stream) {
  const size_t bytes = size_t(1) << 30;
  DeviceBuffer src(bytes), dst(bytes);
  PACKKV_CUDA_CHECK(cudaMemset(src.ptr, 0x3C, bytes));
  EventPair ev;
  std::vector<double> ms;
  for (int r = 0; r < 12; ++r) {
    PACKKV_CUDA_CHECK(cudaEventRecord(ev.start, stream));
    PACKKV_CUDA_CHECK(cudaMemcpyAsync(dst.ptr, src.ptr, bytes, cudaMemcpyDeviceToDevice, stream));
    PACKKV_CUDA_CHECK(cudaEventRecord(ev.stop, stream));
    PACKKV_CUDA_CHECK(cudaEventSynchronize(ev.stop));
    if (r >= 2) ms.push_back(ev.elapsedMs());
  }
  return 2.0 * bytes / (median(ms) * 1e-3) / 1e9;
}

// ---- result rows --------------------------------------------------------------------------------

struct Row {
  std::string codec;
  TensorKind kind;
  Shape shape;
  uint32_t qHeads;
  uint64_t bodyBytes, fp16Bytes, bytesRead, bytesWritten;
  double ratio, us, fp16Us, speedup, readGBps, pctCopy, relL2;
  int copies;
  bool finite, decodeExact, encodeExact;
  double directUs = NAN, graphUs = NAN;
  uint64_t hostBytes = 0;  // bytes of the body that a deployment keeps in host memory (TailorKV mode=s)
  double encodeUs = NAN, decodeUs = NAN;  // GPU encode of the f32 tensor / decode to f32, median
  std::string timedWith;
  /** Encode / decode throughput in GB/s of the fp16 tensor (what the cache holds uncompressed). */
  double encodeGBps() const { return fp16Bytes / (encodeUs * 1e-6) / 1e9; }
  double decodeGBps() const { return fp16Bytes / (decodeUs * 1e-6) / 1e9; }
  /** fp16 bytes ÷ the bytes that stay in GPU memory: the memory a deployment saves on the device. */
  double deviceRatio() const { return double(fp16Bytes) / double(bodyBytes - hostBytes); }
  double tolerance = 1e-5;  // relative L2 vs the CPU reference
  bool ok() const { return finite && relL2 < tolerance && decodeExact && encodeExact; }
};

inline Row makeRow(const std::string& codec, TensorKind kind, const Shape& s, uint32_t qHeads, uint64_t bodyBytes,
                   double us, int copies, double fp16Us, double copyGBps, double relL2, bool finite, bool decodeExact,
                   bool encodeExact) {
  Row r{codec, kind, s, qHeads, bodyBytes, s.elements() * 2, 0, 0, 0, us, fp16Us, 0, 0, 0, relL2, copies, finite,
        decodeExact, encodeExact};
  const bool key = kind == TensorKind::Key;
  r.bytesRead = bodyBytes + (key ? uint64_t(qHeads) * s.dim : uint64_t(qHeads) * s.tokens) * 2;  // + q or p (f16)
  r.bytesWritten = (key ? uint64_t(qHeads) * s.tokens : uint64_t(qHeads) * s.dim) * 4;           // f32 results
  r.ratio = double(r.fp16Bytes) / double(bodyBytes);  // deviceRatio() for streams with host bytes
  r.speedup = fp16Us / us;
  r.readGBps = r.bytesRead / (us * 1e-6) / 1e9;
  r.pctCopy = 100.0 * (r.bytesRead + r.bytesWritten) / (us * 1e-6) / 1e9 / copyGBps;
  return r;
}

/** A JSON number, or null for NaN/inf. */
inline std::string num(double v, const char* fmt = "%.4g") {
  if (!std::isfinite(v)) return "null";
  char buf[64];
  std::snprintf(buf, sizeof buf, fmt, v);
  return buf;
}

inline std::string rowJson(const Row& r, const DeviceInfo& d, const std::string& commit, double copyGBps) {
  std::ostringstream o;
  auto b = [](bool v) { return v ? "true" : "false"; };
  o << "{\"device\":\"" << d.name << "\",\"driverApi\":" << d.driverVersion << ",\"runtime\":" << d.runtimeVersion
    << ",\"commit\":\"" << commit << "\",\"codec\":\"" << r.codec << "\",\"tensor\":\"" << kindName(r.kind)
    << "\",\"tokens\":" << r.shape.tokens << ",\"kvHeads\":" << r.shape.heads << ",\"qHeads\":" << r.qHeads
    << ",\"headDim\":" << r.shape.dim << ",\"bodyBytes\":" << r.bodyBytes << ",\"fp16Bytes\":" << r.fp16Bytes
    << ",\"ratio\":" << num(r.ratio) << ",\"hostBytes\":" << r.hostBytes
    << ",\"deviceRatio\":" << num(r.deviceRatio()) << ",\"timeUs\":" << num(r.us, "%.3f") << ",\"timedWith\":\"" << r.timedWith
    << "\",\"graphUs\":" << num(r.graphUs, "%.3f") << ",\"directUs\":" << num(r.directUs, "%.3f")
    << ",\"copies\":" << r.copies << ",\"fp16TimeUs\":" << num(r.fp16Us, "%.3f") << ",\"speedup\":" << num(r.speedup)
    << ",\"bytesRead\":" << r.bytesRead << ",\"bytesWritten\":" << r.bytesWritten << ",\"readGBps\":"
    << num(r.readGBps, "%.1f") << ",\"copyGBps\":" << num(copyGBps, "%.1f") << ",\"pctCopy\":" << num(r.pctCopy, "%.1f")
    << ",\"encodeUs\":" << num(r.encodeUs, "%.3f") << ",\"encodeGBps\":" << num(r.encodeGBps(), "%.1f")
    << ",\"decodeUs\":" << num(r.decodeUs, "%.3f") << ",\"decodeGBps\":" << num(r.decodeGBps(), "%.1f")
    << ",\"relL2\":" << num(r.relL2, "%.3e") << ",\"tolerance\":" << num(r.tolerance) << ",\"finite\":" << b(r.finite) << ",\"decodeExact\":"
    << b(r.decodeExact) << ",\"encodeExact\":" << b(r.encodeExact) << "}";
  return o.str();
}

/** One line per codec x tokens: K and V side by side (Markdown, pasted into BENCHMARKS.md). */
inline void printTable(const std::vector<Row>& rows, const DeviceInfo& d, double copyGBps) {
  std::printf("\n%s, copy %.0f GB/s; time = median us; x = speed-up vs cuBLAS fp16 in the same run;\n"
              "ratio = fp16 bytes / bytes kept in GPU memory (TailorKV mode=s keeps its offloaded rows on the host);\n"
              "x / ratio = speed-up / ratio (the issue asks >= 0.8 for packkv and kivi at 32k-128k);\n"
              "GB/s = stream + q/p bytes read / time; %%copy = (read + written) / time / copy bandwidth;\n"
              "enc/dec = GPU encode (f32 in) / decode (f32 out) throughput in GB/s of the fp16 tensor, K/V\n\n",
              d.name.c_str(), copyGBps);
  std::printf("| codec | tokens | ratio K/V | K us | K x | K GB/s | K %%copy | V us | V x | V GB/s | V %%copy | enc GB/s | dec GB/s | x / ratio K/V | check |\n");
  std::printf("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
  for (const Row& k : rows) {
    if (k.kind != TensorKind::Key) continue;
    auto v = std::find_if(rows.begin(), rows.end(), [&](const Row& r) {
      return r.kind == TensorKind::Value && r.codec == k.codec && r.shape.tokens == k.shape.tokens;
    });
    if (v == rows.end()) continue;
    auto pair = [](double a, double b) {  // "-" where not timed (kernel variants)
      return std::isfinite(a) && std::isfinite(b) ? num(a, "%.0f") + "/" + num(b, "%.0f") : std::string("-");
    };
    std::printf("| %s | %u | %.2f/%.2f | %.1f | %.2f | %.0f | %.0f | %.1f | %.2f | %.0f | %.0f | %s | %s | %.2f/%.2f | %s |\n",
                k.codec.c_str(), k.shape.tokens, k.deviceRatio(), v->deviceRatio(), k.us, k.speedup, k.readGBps, k.pctCopy, v->us,
                v->speedup, v->readGBps, v->pctCopy, pair(k.encodeGBps(), v->encodeGBps()).c_str(),
                pair(k.decodeGBps(), v->decodeGBps()).c_str(), k.speedup / k.deviceRatio(),
                v->speedup / v->deviceRatio(), k.ok() && v->ok() ? "ok" : "FAIL");
  }
}

}  // namespace packkv::bench
