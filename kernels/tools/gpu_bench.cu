// packkv_gpubench: the fused q·Kᵀ / p·V kernels on compressed KV streams against cuBLAS fp16,
// checked against the CPU reference (products, decode, encode), then timed with CUDA events.
//
//   packkv_gpubench OUT.jsonl [--tokens 4096,16384,32768,65536,131072] [--repeats 20]
//                   [--codecs fp16,kivi:bits=2,...;...] [--commit SHA] [--no-matrix]
//
// Timing: warm-up, then each repeat launches the op once on each of C copies of its input
// (C copies > 3x the L2, so no repeat reads from cache); a repeat's time / C, median of repeats.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <future>
#include <map>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "common/cublas_dl.h"
#include "common/cuda_check.h"
#include "common/gpu_codec.h"
#include "common/half.h"
#include "gpu_bench_support.h"
#include "registry.h"

using namespace packkv;
using namespace packkv::bench;

namespace {

struct Options {
  std::string out;
  std::vector<uint32_t> tokens{4096, 16384, 32768, 65536, 131072};
  std::vector<std::string> codecs{"fp16", "kivi:bits=2,group=32,residual=128", "kivi:bits=4,group=32,residual=128"};
  int repeats = 20;
  std::string commit = "unknown";
  bool matrix = true;  // small-shape correctness matrix over bits x GQA group x layouts
  bool matrixOnly = false;
  uint32_t kvHeads = 8, qHeads = 32, dim = 128;
};

/** One tensor's stream on the host and on the device, with its CPU references. */
struct Prepared {
  ParsedSpec spec;
  TensorKind kind;
  std::vector<uint8_t> stream;  // header + body (CPU encoder)
  StreamView hostView;
  std::vector<float> refProduct;  // CPU qk or pv
  std::vector<float> refDecode;   // CPU decode
};

Prepared prepare(const std::string& specText, TensorKind kind, const std::vector<float>& x, const Shape& shape,
                 const std::vector<float>& qOrP, uint32_t qHeads, bool wantDecode) {
  Prepared p{parseSpec(specText), kind, {}, {}, {}, {}};
  p.stream = encodeStream(p.spec, kind, x.data(), shape, nullptr);
  p.hostView = openStream(p.stream.data(), p.stream.size());
  if (kind == TensorKind::Key) {
    p.refProduct.resize(size_t(qHeads) * shape.tokens);
    qkStream(p.hostView, qOrP.data(), qHeads, 1, p.refProduct.data());
  } else {
    p.refProduct.resize(size_t(qHeads) * shape.dim);
    pvStream(p.hostView, qOrP.data(), qHeads, 1, p.refProduct.data());
  }
  if (wantDecode) {
    p.refDecode.resize(shape.elements());
    decodeStream(p.hostView, p.refDecode.data());
  }
  return p;
}

/** The device copy of a stream body (same header/params, device body pointer). */
StreamView deviceView(const Prepared& p, const DeviceBuffer& body) {
  StreamView v = p.hostView;
  v.body = static_cast<const uint8_t*>(body.ptr);
  return v;
}

struct CheckResult {
  double productRelL2 = NAN;
  bool productFinite = false, decodeExact = false, encodeExact = false;
  bool ok(double tol) const { return productFinite && productRelL2 < tol && decodeExact && encodeExact; }
};

/** Runs the GPU product once into a NaN-poisoned buffer and compares with the CPU reference. */
CheckResult check(const Prepared& p, const std::vector<float>& x, const DeviceBuffer& inputF16, uint32_t qHeads,
                  cudaStream_t stream) {
  CheckResult r;
  const Shape& sh = p.hostView.header.shape;
  DeviceBuffer body(p.hostView.bodyBytes);
  body.upload(p.hostView.body, p.hostView.bodyBytes);
  StreamView dv = deviceView(p, body);
  DeviceBuffer ws(std::max<size_t>(gpu::workspaceBytes(dv, qHeads), 256));
  ws.zero();
  gpu::Launch launch{stream, ws.ptr, ws.bytes};
  DeviceBuffer product(p.refProduct.size() * sizeof(float));
  product.poisonNaN();
  const uint16_t* in = static_cast<const uint16_t*>(inputF16.ptr);
  if (p.kind == TensorKind::Key) gpu::qkStream(dv, in, qHeads, 1, static_cast<float*>(product.ptr), launch);
  else gpu::pvStream(dv, in, qHeads, 1, static_cast<float*>(product.ptr), launch);
  std::vector<float> got = product.download<float>();
  r.productFinite = std::all_of(got.begin(), got.end(), [](float v) { return std::isfinite(v); });
  r.productRelL2 = relL2(got, p.refProduct);

  if (!p.refDecode.empty()) {
    DeviceBuffer dec(sh.elements() * sizeof(float));
    dec.poisonNaN();
    gpu::decodeStream(dv, static_cast<float*>(dec.ptr), launch);
    std::vector<float> got = dec.download<float>();
    r.decodeExact = std::memcmp(got.data(), p.refDecode.data(), got.size() * sizeof(float)) == 0;
  } else {
    r.decodeExact = true;
  }

  const gpu::GpuCodecDef* codec = gpu::findGpuCodec(p.spec.codec->name);
  DeviceBuffer xs(x.size() * sizeof(float));
  xs.upload(x.data(), xs.bytes);
  // The codec's bodyBytes is an upper bound where the body's size depends on the data (Huffman
  // codes, pack widths): the encoder gets that much room, and its first bytes must be the CPU body.
  const size_t room = std::max<size_t>(codec->bodyBytes(sh, p.kind, p.spec.params), p.hostView.bodyBytes);
  DeviceBuffer encoded(room);
  PACKKV_CUDA_CHECK(cudaMemset(encoded.ptr, 0xA5, encoded.bytes));  // unwritten bytes show up
  Breakdown gotParts = codec->encode(static_cast<const float*>(xs.ptr), sh, p.kind, p.spec.params,
                                     static_cast<uint8_t*>(encoded.ptr), launch);
  std::vector<uint8_t> gotBody = encoded.download<uint8_t>();
  const Breakdown& want = p.hostView.header.breakdown;
  r.encodeExact = std::memcmp(gotBody.data(), p.hostView.body, p.hostView.bodyBytes) == 0 &&
                  gotParts.payload == want.payload && gotParts.scales == want.scales && gotParts.zeros == want.zeros &&
                  gotParts.residual == want.residual && gotParts.metadata == want.metadata && gotParts.host == want.host;
  PACKKV_CUDA_CHECK(cudaStreamSynchronize(stream));
  return r;
}

struct Timing {
  double directUs = NAN;  // back-to-back launches from the host (includes host overhead)
  double graphUs = NAN;   // the same launches replayed from a CUDA graph (NaN when capture failed)
  int copies = 0;
};

/** Median time of the GPU product over >= repeats, rotating over copies whose total exceeds 3x L2. */
Timing timeProduct(const Prepared& p, const DeviceBuffer& inputF16, uint32_t qHeads, int repeats, size_t l2Bytes,
                   cudaStream_t stream) {
  const Shape& sh = p.hostView.header.shape;
  const size_t outBytes =
      (p.kind == TensorKind::Key ? size_t(qHeads) * sh.tokens : size_t(qHeads) * sh.dim) * sizeof(float);
  const size_t perCopy = p.hostView.bodyBytes + outBytes;
  Timing t;
  t.copies = int(std::min<size_t>(512, std::max<size_t>(2, (3 * l2Bytes + perCopy - 1) / perCopy)));
  std::vector<DeviceBuffer> bodies, outs;
  for (int c = 0; c < t.copies; ++c) {
    bodies.emplace_back(p.hostView.bodyBytes);
    if (c == 0) bodies[0].upload(p.hostView.body, p.hostView.bodyBytes);
    else PACKKV_CUDA_CHECK(cudaMemcpy(bodies[c].ptr, bodies[0].ptr, p.hostView.bodyBytes, cudaMemcpyDeviceToDevice));
    outs.emplace_back(outBytes);
  }
  StreamView dv = deviceView(p, bodies[0]);
  DeviceBuffer ws(std::max<size_t>(gpu::workspaceBytes(dv, qHeads), 256));
  ws.zero();
  gpu::Launch launch{stream, ws.ptr, ws.bytes};
  const uint16_t* in = static_cast<const uint16_t*>(inputF16.ptr);
  auto round = [&]() {
    for (int c = 0; c < t.copies; ++c) {
      dv.body = static_cast<const uint8_t*>(bodies[c].ptr);
      float* out = static_cast<float*>(outs[c].ptr);
      if (p.kind == TensorKind::Key) gpu::qkStream(dv, in, qHeads, 1, out, launch);
      else gpu::pvStream(dv, in, qHeads, 1, out, launch);
    }
  };
  for (int w = 0; w < 3; ++w) round();
  PACKKV_CUDA_CHECK(cudaStreamSynchronize(stream));
  EventPair ev;
  auto measure = [&](const std::function<void()>& once) {
    std::vector<double> samples;
    for (int r = 0; r < repeats; ++r) {
      PACKKV_CUDA_CHECK(cudaEventRecord(ev.start, stream));
      once();
      PACKKV_CUDA_CHECK(cudaEventRecord(ev.stop, stream));
      PACKKV_CUDA_CHECK(cudaEventSynchronize(ev.stop));
      samples.push_back(ev.elapsedMs() * 1000.0 / t.copies);
    }
    return median(samples);
  };
  t.directUs = measure(round);
  // Graph replay takes the host's launch overhead out (it matters below ~10 us per launch).
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  bool captured = false;
  if (cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal) == cudaSuccess) {
    try {
      round();
    } catch (const std::exception& e) {
      std::printf("    (graph capture failed: %s)\n", e.what());
    }
    captured = cudaStreamEndCapture(stream, &graph) == cudaSuccess && graph &&
               cudaGraphInstantiate(&exec, graph, 0) == cudaSuccess;
  }
  cudaGetLastError();  // a failed capture leaves an error we do not want to see later
  if (captured) {
    PACKKV_CUDA_CHECK(cudaGraphLaunch(exec, stream));
    PACKKV_CUDA_CHECK(cudaStreamSynchronize(stream));
    t.graphUs = measure([&] { PACKKV_CUDA_CHECK(cudaGraphLaunch(exec, stream)); });
  }
  if (exec) cudaGraphExecDestroy(exec);
  if (graph) cudaGraphDestroy(graph);
  return t;
}

/** Median GPU encode (f32 x in device memory → body) and decode (body → f32) times in µs. Encoders
 *  may synchronize (to read error flags or a data-dependent size), so each run is timed alone. */
std::pair<double, double> timeEncodeDecode(const Prepared& p, const std::vector<float>& x, int repeats,
                                           cudaStream_t stream) {
  const Shape& sh = p.hostView.header.shape;
  const gpu::GpuCodecDef* codec = gpu::findGpuCodec(p.spec.codec->name);
  DeviceBuffer xs(x.size() * sizeof(float)), body(std::max<size_t>(codec->bodyBytes(sh, p.kind, p.spec.params),
                                                                   p.hostView.bodyBytes));
  xs.upload(x.data(), xs.bytes);
  DeviceBuffer src(p.hostView.bodyBytes), out(sh.elements() * sizeof(float));
  src.upload(p.hostView.body, p.hostView.bodyBytes);
  StreamView dv = deviceView(p, src);
  DeviceBuffer ws(std::max<size_t>(gpu::workspaceBytes(dv, 1), 256));
  ws.zero();
  gpu::Launch launch{stream, ws.ptr, ws.bytes};
  EventPair ev;
  auto median_us = [&](const std::function<void()>& once) {
    once();  // warm-up
    PACKKV_CUDA_CHECK(cudaStreamSynchronize(stream));
    std::vector<double> samples;
    for (int r = 0; r < repeats; ++r) {
      PACKKV_CUDA_CHECK(cudaEventRecord(ev.start, stream));
      once();
      PACKKV_CUDA_CHECK(cudaEventRecord(ev.stop, stream));
      PACKKV_CUDA_CHECK(cudaEventSynchronize(ev.stop));
      samples.push_back(ev.elapsedMs() * 1000.0);
    }
    return median(samples);
  };
  double enc = median_us([&] {
    codec->encode(static_cast<const float*>(xs.ptr), sh, p.kind, p.spec.params, static_cast<uint8_t*>(body.ptr), launch);
  });
  double dec = median_us([&] { gpu::decodeStream(dv, static_cast<float*>(out.ptr), launch); });
  return {enc, dec};
}

/** KIVI runs its tensor-core kernels by default; "simt" selects the CUDA-core ones to compare. */
std::vector<const char*> variantsOf(const std::string& codec) {
  if (codec == "kivi") return {"", "simt"};
  return {""};
}
void setVariant(const char* v) {
  if (*v) setenv("PACKKV_KIVI_KERNEL", v, 1);
  else unsetenv("PACKKV_KIVI_KERNEL");
}
/** cuBLAS accumulates p·V over all tokens in its own order: its error vs the double-precision
 *  reference grows with T (2e-4 at 128k tokens on the H100); ours must stay under 1e-5. */
double toleranceOf(const std::string& codec) { return codec == "fp16" ? 1e-3 : 1e-5; }

/** Small shapes over every bits x GQA group x layout the kernels dispatch: correctness only. */
bool runMatrix(cudaStream_t stream) {
  std::printf("\ncorrectness matrix (bits x query heads per KV head x layout; CPU reference, rel L2 < 1e-5)\n");
  bool allOk = true;
  struct Case { uint32_t tokens; const char* layout; };
  const Case cases[] = {{4099, "group=32,residual=128"}, {4096, "group=64,residual=0"}, {300, "group=16,residual=256"}};
  for (const Case& c : cases)
    for (int bits : {1, 2, 4, 8})
      for (uint32_t group : {1u, 2u, 4u, 8u}) {
        const uint32_t kvHeads = 4, qHeads = kvHeads * group, dim = bits == 8 ? 64 : 128;
        Shape shape{kvHeads, c.tokens, dim};
        std::string spec = "kivi:bits=" + std::to_string(bits) + "," + c.layout;
        try {
          (void)encodeStream(parseSpec(spec), TensorKind::Key, std::vector<float>(shape.elements(), 0.f).data(),
                             shape, nullptr);
        } catch (const CodecError& e) {
          if (group == 1) std::printf("  %-36s skipped: %s\n", spec.c_str(), e.what());
          continue;
        }
        Inputs in = makeInputs(shape, qHeads, 1000 + bits * 10 + group);
        auto keys = std::async(std::launch::async, prepare, spec, TensorKind::Key, std::cref(in.keys), shape,
                               std::cref(in.q), qHeads, true);
        Prepared vals = prepare(spec, TensorKind::Value, in.values, shape, in.p, qHeads, true);
        Prepared ks = keys.get();
        DeviceBuffer q(in.qHalf.size() * 2), p(in.pHalf.size() * 2);
        q.upload(in.qHalf.data(), q.bytes);
        p.upload(in.pHalf.data(), p.bytes);
        for (const char* variant : variantsOf("kivi")) {
          setVariant(variant);
          CheckResult ck = check(ks, in.keys, q, qHeads, stream), cv = check(vals, in.values, p, qHeads, stream);
          bool ok = ck.ok(1e-5) && cv.ok(1e-5);
          allOk = allOk && ok;
          std::printf("  %-36s %-4s T=%-5u D=%-3u %2u/%u heads  K relL2 %.1e dec %s enc %s | V relL2 %.1e dec %s enc %s  %s\n",
                      spec.c_str(), *variant ? variant : "mma", c.tokens, dim, qHeads, kvHeads, ck.productRelL2,
                      ck.decodeExact ? "=" : "X", ck.encodeExact ? "=" : "X", cv.productRelL2,
                      cv.decodeExact ? "=" : "X", cv.encodeExact ? "=" : "X", ok ? "ok" : "FAIL");
        }
        setVariant("");
      }
  return allOk;
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) throw std::runtime_error(a + " needs a value");
      return argv[++i];
    };
    if (a == "--tokens") {
      o.tokens.clear();
      for (auto& s : split(next(), ',')) o.tokens.push_back(uint32_t(std::stoul(s)));
    } else if (a == "--codecs") o.codecs = split(next(), ';');
    else if (a == "--repeats") o.repeats = std::max(20, std::stoi(next()));
    else if (a == "--commit") o.commit = next();
    else if (a == "--no-matrix") o.matrix = false;
    else if (a == "--matrix-only") o.matrixOnly = true;
    else if (!a.empty() && a[0] != '-' && o.out.empty()) o.out = a;
    else throw std::runtime_error("unknown argument '" + a + "'");
  }
  if (o.out.empty()) throw std::runtime_error("usage: packkv_gpubench OUT.jsonl [--tokens ..] [--codecs a;b] [--repeats N]");
  return o;
}

int run(int argc, char** argv) {
  Options opt = parse(argc, argv);
  DeviceInfo dev = deviceInfo();
  std::printf("device: %s, %d SMs, L2 %.0f MB, driver API %d, runtime %d\n", dev.name.c_str(), dev.sms,
              dev.l2Bytes / 1e6, dev.driverVersion, dev.runtimeVersion);
  std::printf("cuBLAS: %s\n", cublasStatusText().c_str());
  cudaStream_t stream;
  PACKKV_CUDA_CHECK(cudaStreamCreate(&stream));  // blocking: ordered after cudaMemset/cudaMemcpy
  if (opt.matrixOnly) return runMatrix(stream) ? 0 : 2;
  const double copyGBps = measureCopyGBps(stream);
  std::printf("device-to-device copy: %.0f GB/s (1 GiB cudaMemcpy, read + write bytes / time, median of 10)\n",
              copyGBps);

  bool allOk = opt.matrix ? runMatrix(stream) : true;
  std::ofstream jsonl(opt.out, std::ios::trunc);
  if (!jsonl) throw std::runtime_error("cannot write " + opt.out);
  std::vector<Row> rows;
  for (uint32_t T : opt.tokens) {
    Shape shape{opt.kvHeads, T, opt.dim};
    Inputs in = makeInputs(shape, opt.qHeads, 7);
    DeviceBuffer q(in.qHalf.size() * 2), p(in.pHalf.size() * 2);
    q.upload(in.qHalf.data(), q.bytes);
    p.upload(in.pHalf.data(), p.bytes);
    // CPU encode + references for every codec and tensor, in parallel.
    std::vector<std::future<Prepared>> jobs;
    for (auto& spec : opt.codecs) {
      jobs.push_back(std::async(std::launch::async, prepare, spec, TensorKind::Key, std::cref(in.keys), shape,
                                std::cref(in.q), opt.qHeads, true));
      jobs.push_back(std::async(std::launch::async, prepare, spec, TensorKind::Value, std::cref(in.values), shape,
                                std::cref(in.p), opt.qHeads, true));
    }
    std::map<TensorKind, Timing> fp16;
    for (size_t j = 0; j < jobs.size(); ++j) {
      Prepared prep = jobs[j].get();
      const bool isKey = prep.kind == TensorKind::Key;
      const DeviceBuffer& input = isKey ? q : p;
      const std::string label = prep.spec.codec->name + (prep.spec.canonical.empty() ? "" : ":" + prep.spec.canonical);
      for (const char* variant : variantsOf(prep.spec.codec->name)) {
        setVariant(variant);
        CheckResult ck = check(prep, isKey ? in.keys : in.values, input, opt.qHeads, stream);
        Timing tm = timeProduct(prep, input, opt.qHeads, opt.repeats, dev.l2Bytes, stream);
        if (prep.spec.codec->name == "fp16") fp16[prep.kind] = tm;
        const Timing base = fp16.count(prep.kind) ? fp16[prep.kind] : Timing{};
        // Graph replays on both sides when both captured, else direct launches on both.
        const bool graphs = std::isfinite(tm.graphUs) && std::isfinite(base.graphUs);
        Row r = makeRow(label + (*variant ? std::string(" [") + variant + "]" : ""), prep.kind, shape, opt.qHeads,
                        prep.hostView.bodyBytes, graphs ? tm.graphUs : tm.directUs, tm.copies,
                        graphs ? base.graphUs : base.directUs, copyGBps, ck.productRelL2, ck.productFinite,
                        ck.decodeExact, ck.encodeExact);
        r.hostBytes = prep.hostView.header.breakdown.host;
        r.directUs = tm.directUs, r.graphUs = tm.graphUs, r.timedWith = graphs ? "graph" : "direct";
        if (!*variant) std::tie(r.encodeUs, r.decodeUs) =
            timeEncodeDecode(prep, isKey ? in.keys : in.values, std::min(opt.repeats, 10), stream);
        r.tolerance = toleranceOf(prep.spec.codec->name);
        allOk = allOk && r.ok();
        rows.push_back(r);
        jsonl << rowJson(r, dev, opt.commit, copyGBps) << "\n";
        jsonl.flush();
        std::printf("  %-44s %s T=%-6u graph %9.2f us direct %9.2f us  x%-5.2f  relL2 %.1e  dec %s enc %s  (%d copies)"
                    "  encode %.1f us, decode %.1f us\n",
                    r.codec.c_str(), kindName(r.kind), T, tm.graphUs, tm.directUs, r.speedup, ck.productRelL2,
                    ck.decodeExact ? "=" : "X", ck.encodeExact ? "=" : "X", tm.copies, r.encodeUs, r.decodeUs);
      }
      setVariant("");
    }
  }
  printTable(rows, dev, copyGBps);
  PACKKV_CUDA_CHECK(cudaStreamDestroy(stream));
  std::printf("\n%s\n", allOk ? "all checks passed" : "SOME CHECKS FAILED");
  return allOk ? 0 : 2;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "packkv_gpubench: %s\n", e.what());
    return 1;
  }
}
