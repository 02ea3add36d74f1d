// packkv_native: the Node-API surface over the codec registry (types in cli/native-types.ts).
#include <napi.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "binding/gpu_ops.h"
#include "registry.h"
#ifdef PACKKV_HAVE_CUDA
#include "common/cuda_probe.h"
#endif

namespace {

using namespace packkv;

/** Runs work off the main thread and settles a promise; inputs stay referenced until then. */
class TaskWorker : public Napi::AsyncWorker {
 public:
  TaskWorker(Napi::Env env, std::function<void()> work, std::function<Napi::Value(Napi::Env)> done,
             std::vector<Napi::Value> keepAlive, std::string context)
      : Napi::AsyncWorker(env), deferred_(Napi::Promise::Deferred::New(env)), work_(std::move(work)),
        done_(std::move(done)), context_(std::move(context)) {
    for (auto& v : keepAlive) keep_.push_back(Napi::Persistent(v.As<Napi::Object>()));
  }
  Napi::Promise promise() { return deferred_.Promise(); }

 protected:
  void Execute() override {
    try {
      work_();
    } catch (const std::exception& e) {
      SetError(context_ + e.what());
    }
  }
  void OnOK() override {
    try {
      deferred_.Resolve(done_(Env()));
    } catch (const Napi::Error& e) {
      deferred_.Reject(e.Value());
    }
  }
  void OnError(const Napi::Error& e) override { deferred_.Reject(e.Value()); }

 private:
  Napi::Promise::Deferred deferred_;
  std::function<void()> work_;
  std::function<Napi::Value(Napi::Env)> done_;
  std::vector<Napi::ObjectReference> keep_;
  std::string context_;
};

/** Hands a vector to JS as a Float32Array without copying it. */
Napi::Float32Array toFloat32Array(Napi::Env env, std::shared_ptr<std::vector<float>> v) {
  auto* owned = new std::vector<float>(std::move(*v));
  auto buf = Napi::ArrayBuffer::New(env, owned->data(), owned->size() * sizeof(float),
                                    [](Napi::Env, void*, std::vector<float>* p) { delete p; }, owned);
  return Napi::Float32Array::New(env, owned->size(), buf, 0);
}

Napi::Uint8Array toUint8Array(Napi::Env env, std::shared_ptr<std::vector<uint8_t>> v) {
  auto* owned = new std::vector<uint8_t>(std::move(*v));
  auto buf = Napi::ArrayBuffer::New(env, owned->data(), owned->size(),
                                    [](Napi::Env, void*, std::vector<uint8_t>* p) { delete p; }, owned);
  return Napi::Uint8Array::New(env, owned->size(), buf, 0);
}

std::string labelOf(const Napi::CallbackInfo& info, size_t i) {
  return info.Length() > i && info[i].IsString() ? "tensor '" + info[i].As<Napi::String>().Utf8Value() + "': " : "";
}

Napi::Object breakdownObject(Napi::Env env, const Breakdown& b) {
  auto o = Napi::Object::New(env);
  o.Set("payload", double(b.payload));
  o.Set("scales", double(b.scales));
  o.Set("zeros", double(b.zeros));
  o.Set("residual", double(b.residual));
  o.Set("metadata", double(b.metadata));
  o.Set("host", double(b.host));
  return o;
}

Napi::Object shapeObject(Napi::Env env, const Shape& s) {
  auto o = Napi::Object::New(env);
  o.Set("kvHeads", s.heads);
  o.Set("tokens", s.tokens);
  o.Set("headDim", s.dim);
  return o;
}

void headerInto(Napi::Env env, Napi::Object o, const StreamHeader& h) {
  o.Set("codec", h.codec);
  o.Set("params", h.params);
  o.Set("kind", kindName(h.kind));
  o.Set("shape", shapeObject(env, h.shape));
  o.Set("breakdown", breakdownObject(env, h.breakdown));
}

uint32_t positiveInt(Napi::Env env, Napi::Value v, const char* what) {
  if (!v.IsNumber()) throw Napi::TypeError::New(env, std::string(what) + " must be a number");
  double d = v.As<Napi::Number>().DoubleValue();
  if (d < 1 || d > 4294967295.0 || d != double(uint32_t(d)))
    throw Napi::RangeError::New(env, std::string(what) + " must be a positive integer, got " + std::to_string(d));
  return uint32_t(d);
}

TensorKind parseKind(Napi::Env env, Napi::Value v) {
  std::string k = v.IsString() ? v.As<Napi::String>().Utf8Value() : "";
  if (k == "K") return TensorKind::Key;
  if (k == "V") return TensorKind::Value;
  throw Napi::TypeError::New(env, "tensor kind must be 'K' or 'V'");
}

Napi::Value Version(const Napi::CallbackInfo& info) { return Napi::String::New(info.Env(), "0.1.0"); }

Napi::Value Backends(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto out = Napi::Object::New(env);
  auto cpu = Napi::Object::New(env);
  cpu.Set("usable", true);
  cpu.Set("device", "CPU reference (C++)");
  out.Set("cpu", cpu);
  auto cuda = Napi::Object::New(env);
#ifdef PACKKV_HAVE_CUDA
  CudaStatus st = probeCuda();
  cuda.Set("usable", st.usable);
  if (st.usable) cuda.Set("device", st.device);
  else cuda.Set("reason", st.reason);
#else
  cuda.Set("usable", false);
  cuda.Set("reason", "this addon was built without CUDA (no nvcc at build time)");
#endif
  out.Set("cuda", cuda);
  return out;
}

Napi::Value Codecs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto list = Napi::Array::New(env);
  uint32_t i = 0;
  for (const CodecDef* c : allCodecs()) {
    auto o = Napi::Object::New(env);
    o.Set("name", c->name);
    o.Set("summary", c->summary);
    auto params = Napi::Array::New(env);
    uint32_t j = 0;
    for (const ParamSpec& p : c->params) {
      auto po = Napi::Object::New(env);
      po.Set("name", p.name);
      po.Set("type", p.type == ParamType::Int ? "int" : p.type == ParamType::Float ? "float" : "enum");
      po.Set("default", p.defaultValue);
      if (!p.choices.empty()) {
        auto ch = Napi::Array::New(env);
        for (uint32_t k = 0; k < p.choices.size(); ++k) ch.Set(k, p.choices[k]);
        po.Set("choices", ch);
      } else {
        po.Set("min", p.min);
        po.Set("max", p.max);
      }
      po.Set("help", p.help);
      if (!p.tune.empty()) po.Set("tune", p.tune);
      params.Set(j++, po);
    }
    o.Set("params", params);
    auto runs = Napi::Array::New(env);
    for (uint32_t k = 0; k < c->defaultRuns.size(); ++k) runs.Set(k, c->defaultRuns[k]);
    o.Set("defaultRuns", runs);
    list.Set(i++, o);
  }
  return list;
}

Napi::Value ParseCodec(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsString()) throw Napi::TypeError::New(env, "codec spec must be a string");
  ParsedSpec p = parseSpec(info[0].As<Napi::String>().Utf8Value());
  auto o = Napi::Object::New(env);
  o.Set("codec", p.codec->name);
  o.Set("params", p.canonical);
  return o;
}

// encode(spec, kind, data: Float32Array, shape, label?)
Napi::Value Encode(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsString()) throw Napi::TypeError::New(env, "codec spec must be a string");
  std::string label = labelOf(info, 4);
  ParsedSpec spec;
  try {
    spec = parseSpec(info[0].As<Napi::String>().Utf8Value());
  } catch (const std::exception& e) {
    throw Napi::Error::New(env, label + e.what());
  }
  TensorKind kind = parseKind(env, info[1]);
  if (!info[2].IsTypedArray() || info[2].As<Napi::TypedArray>().TypedArrayType() != napi_float32_array)
    throw Napi::TypeError::New(env, label + "data must be a Float32Array");
  auto data = info[2].As<Napi::Float32Array>();
  auto so = info[3].As<Napi::Object>();
  Shape shape{positiveInt(env, so.Get("kvHeads"), "shape.kvHeads"), positiveInt(env, so.Get("tokens"), "shape.tokens"),
              positiveInt(env, so.Get("headDim"), "shape.headDim")};
  if (data.ElementLength() != shape.elements())
    throw Napi::RangeError::New(env, label + "data has " + std::to_string(data.ElementLength()) +
                                         " elements, shape [" + std::to_string(shape.heads) + ", " +
                                         std::to_string(shape.tokens) + ", " + std::to_string(shape.dim) + "] needs " +
                                         std::to_string(shape.elements()));
  const float* x = data.Data();
  auto stream = std::make_shared<std::vector<uint8_t>>();
  auto header = std::make_shared<StreamHeader>();
  auto* w = new TaskWorker(
      env, [=]() { *stream = encodeStream(spec, kind, x, shape, header.get()); },
      [=](Napi::Env e) -> Napi::Value {
        auto o = Napi::Object::New(e);
        headerInto(e, o, *header);
        o.Set("stream", toUint8Array(e, stream));
        o.Set("deviceBytes", double(header->breakdown.device()));
        o.Set("totalBytes", double(header->breakdown.device() + header->breakdown.host));
        return o;
      },
      {info[2]}, label);
  w->Queue();
  return w->promise();
}

StreamView viewArg(const Napi::CallbackInfo& info, const std::string& label) {
  Napi::Env env = info.Env();
  if (!info[0].IsTypedArray() || info[0].As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array)
    throw Napi::TypeError::New(env, label + "stream must be a Uint8Array");
  auto bytes = info[0].As<Napi::Uint8Array>();
  try {
    return openStream(bytes.Data(), bytes.ByteLength());
  } catch (const std::exception& e) {
    throw Napi::Error::New(env, label + e.what());
  }
}

Napi::Value StreamInfoFn(const Napi::CallbackInfo& info) {
  StreamView s = viewArg(info, labelOf(info, 1));
  auto o = Napi::Object::New(info.Env());
  headerInto(info.Env(), o, s.header);
  return o;
}

Napi::Value Decode(const Napi::CallbackInfo& info) {
  std::string label = labelOf(info, 1);
  StreamView s = viewArg(info, label);
  auto out = std::make_shared<std::vector<float>>(s.header.shape.elements());
  auto* w = new TaskWorker(
      info.Env(), [=]() { decodeStream(s, out->data()); },
      [=](Napi::Env e) -> Napi::Value { return toFloat32Array(e, out); }, {info[0]}, label);
  w->Queue();
  return w->promise();
}

/** qk/pv(stream, x: Float32Array, qHeads, nQueries, label?) */
Napi::Value Product(const Napi::CallbackInfo& info, bool keys) {
  Napi::Env env = info.Env();
  std::string label = labelOf(info, 4);
  StreamView s = viewArg(info, label);
  if (!info[1].IsTypedArray() || info[1].As<Napi::TypedArray>().TypedArrayType() != napi_float32_array)
    throw Napi::TypeError::New(env, label + (keys ? "q" : "p") + " must be a Float32Array");
  auto x = info[1].As<Napi::Float32Array>();
  uint32_t qHeads = positiveInt(env, info[2], "qHeads"), nq = positiveInt(env, info[3], "nQueries");
  const Shape& sh = s.header.shape;
  size_t inLen = size_t(nq) * qHeads * (keys ? sh.dim : sh.tokens);
  if (x.ElementLength() != inLen)
    throw Napi::RangeError::New(env, label + (keys ? "q" : "p") + " has " + std::to_string(x.ElementLength()) +
                                         " elements, needs " + std::to_string(inLen));
  try {
    checkGqa(qHeads, sh.heads);
  } catch (const std::exception& e) {
    throw Napi::Error::New(env, label + e.what());
  }
  auto out = std::make_shared<std::vector<float>>(size_t(nq) * qHeads * (keys ? sh.tokens : sh.dim));
  const float* in = x.Data();
  auto* w = new TaskWorker(
      env,
      [=]() {
        if (keys) qkStream(s, in, qHeads, nq, out->data());
        else pvStream(s, in, qHeads, nq, out->data());
      },
      [=](Napi::Env e) -> Napi::Value { return toFloat32Array(e, out); }, {info[0], info[1]}, label);
  w->Queue();
  return w->promise();
}

// gpuRun(op: 'decode'|'qk'|'pv'|'encode', stream, x: Float32Array|null, qHeads, nQueries, repeats, label?)
// 'encode': x is the tensor the stream was encoded from; the GPU body must equal the stream's.
Napi::Value GpuRunFn(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string label = labelOf(info, 6);
  std::string opName = info[0].IsString() ? info[0].As<Napi::String>().Utf8Value() : "";
  binding::GpuOp op = opName == "decode" ? binding::GpuOp::Decode
                      : opName == "qk"   ? binding::GpuOp::Qk
                      : opName == "pv"   ? binding::GpuOp::Pv
                      : opName == "encode" ? binding::GpuOp::Encode
                                         : throw Napi::TypeError::New(env, "gpuRun: op must be 'decode', 'qk', 'pv' or 'encode'");
  if (!info[1].IsTypedArray() || info[1].As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array)
    throw Napi::TypeError::New(env, label + "stream must be a Uint8Array");
  auto stream = info[1].As<Napi::Uint8Array>();
  const float* x = nullptr;
  size_t xLen = 0;
  if (op != binding::GpuOp::Decode) {
    if (!info[2].IsTypedArray() || info[2].As<Napi::TypedArray>().TypedArrayType() != napi_float32_array)
      throw Napi::TypeError::New(env, label + (op == binding::GpuOp::Qk   ? "q"
                                               : op == binding::GpuOp::Pv ? "p"
                                                                          : "x") + " must be a Float32Array");
    x = info[2].As<Napi::Float32Array>().Data();
    xLen = info[2].As<Napi::Float32Array>().ElementLength();
  }
  const bool product = op == binding::GpuOp::Qk || op == binding::GpuOp::Pv;
  uint32_t qHeads = product ? positiveInt(env, info[3], "qHeads") : 1;
  uint32_t nq = product ? positiveInt(env, info[4], "nQueries") : 1;
  int repeats = int(positiveInt(env, info[5], "repeats"));
  const uint8_t* bytes = stream.Data();
  size_t n = stream.ByteLength();
  try {
    openStream(bytes, n);  // a bad stream fails here, on the main thread, before any GPU work
  } catch (const std::exception& e) {
    throw Napi::Error::New(env, label + e.what());
  }
  auto run = std::make_shared<binding::GpuRun>();
  std::vector<Napi::Value> keep = {info[1]};
  if (x) keep.push_back(info[2]);
  auto* w = new TaskWorker(
      env, [=]() { *run = binding::runOnGpu(op, bytes, n, x, xLen, qHeads, nq, repeats); },
      [=](Napi::Env e) -> Napi::Value {
        auto o = Napi::Object::New(e);
        o.Set("result", toFloat32Array(e, std::make_shared<std::vector<float>>(std::move(run->result))));
        o.Set("medianMs", run->medianMs);
        o.Set("minMs", run->minMs);
        o.Set("repeats", run->repeats);
        o.Set("device", run->device);
        return o;
      },
      keep, label);
  w->Queue();
  return w->promise();
}

Napi::Value GpuCodecs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto list = Napi::Array::New(env);
  uint32_t i = 0;
  for (const std::string& name : binding::gpuCodecNames()) list.Set(i++, name);
  return list;
}

Napi::Value Qk(const Napi::CallbackInfo& info) { return Product(info, true); }
Napi::Value Pv(const Napi::CallbackInfo& info) { return Product(info, false); }

Napi::Value Guard(const Napi::CallbackInfo& info, Napi::Value (*fn)(const Napi::CallbackInfo&)) {
  try {
    return fn(info);
  } catch (const Napi::Error&) {
    throw;
  } catch (const std::exception& e) {
    throw Napi::Error::New(info.Env(), e.what());
  }
}

#define PACKKV_EXPORT(name, fn)                                                                            \
  exports.Set(name, Napi::Function::New(env, [](const Napi::CallbackInfo& info) { return Guard(info, fn); }))

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  PACKKV_EXPORT("version", Version);
  PACKKV_EXPORT("backends", Backends);
  PACKKV_EXPORT("codecs", Codecs);
  PACKKV_EXPORT("parseCodec", ParseCodec);
  PACKKV_EXPORT("encode", Encode);
  PACKKV_EXPORT("decode", Decode);
  PACKKV_EXPORT("streamInfo", StreamInfoFn);
  PACKKV_EXPORT("qk", Qk);
  PACKKV_EXPORT("pv", Pv);
  PACKKV_EXPORT("gpuRun", GpuRunFn);
  PACKKV_EXPORT("gpuCodecs", GpuCodecs);
  return exports;
}

}  // namespace

NODE_API_MODULE(packkv_native, Init)
