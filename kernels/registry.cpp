// The codec registry, parameter parsing and the stream frame shared by every codec.
#include "registry.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <sstream>

namespace packkv {

static std::vector<const CodecDef*>& registered() {
  static std::vector<const CodecDef*> codecs;  // filled by static initializers of each codec's cpu.cpp
  return codecs;
}

CodecRegistrar::CodecRegistrar(const CodecDef& codec) { registered().push_back(&codec); }

const std::vector<const CodecDef*>& allCodecs() {
  // Registration order depends on link order; list codecs by their declared order instead.
  static const std::vector<const CodecDef*> sorted = [] {
    auto v = registered();
    std::stable_sort(v.begin(), v.end(), [](auto* a, auto* b) { return a->order < b->order; });
    return v;
  }();
  return sorted;
}

static std::string codecNames() {
  std::string out;
  for (auto* c : allCodecs()) out += (out.empty() ? "" : ", ") + c->name;
  return out;
}

const CodecDef& findCodec(const std::string& name) {
  for (auto* c : allCodecs())
    if (c->name == name) return *c;
  throw CodecError("unknown codec '" + name + "' (valid codecs: " + codecNames() + ")");
}

int Params::integer(const std::string& name) const { return std::stoi(values.at(name)); }
double Params::real(const std::string& name) const { return std::stod(values.at(name)); }
const std::string& Params::text(const std::string& name) const { return values.at(name); }

static std::string paramNames(const CodecDef& c) {
  std::string out;
  for (auto& p : c.params) out += (out.empty() ? "" : ", ") + p.name;
  return out.empty() ? "none" : out;
}

static std::string describeAllowed(const ParamSpec& p) {
  std::ostringstream os;
  if (!p.choices.empty()) {
    os << "one of ";
    for (size_t i = 0; i < p.choices.size(); ++i) os << (i ? ", " : "") << p.choices[i];
  } else {
    os << (p.type == ParamType::Int ? "an integer" : "a number") << " in [" << p.min << ", " << p.max << "]";
  }
  return os.str();
}

/** Validates one value against its spec and returns its canonical spelling. */
static std::string canonicalValue(const CodecDef& c, const ParamSpec& p, const std::string& raw) {
  auto bad = [&]() {
    return CodecError("codec '" + c.name + "': parameter " + p.name + "=" + raw + " is invalid: expected " +
                      describeAllowed(p));
  };
  if (p.type == ParamType::Enum) {
    for (auto& ch : p.choices)
      if (ch == raw) return raw;
    throw bad();
  }
  char* end = nullptr;
  double v = std::strtod(raw.c_str(), &end);
  if (raw.empty() || *end != '\0' || !std::isfinite(v)) throw bad();
  if (p.type == ParamType::Int) {
    if (v != std::floor(v)) throw bad();
    std::string canon = std::to_string(static_cast<long long>(v));
    if (!p.choices.empty()) {
      for (auto& ch : p.choices)
        if (ch == canon) return canon;
      throw bad();
    }
    if (v < p.min || v > p.max) throw bad();
    return canon;
  }
  if (v < p.min || v > p.max) throw bad();
  std::ostringstream os;
  os.precision(9);
  os << v;
  return os.str();
}

ParsedSpec parseSpec(const std::string& spec) {
  auto colon = spec.find(':');
  std::string name = spec.substr(0, colon);
  const CodecDef& c = findCodec(name);
  std::map<std::string, std::string> given;
  if (colon != std::string::npos) {
    std::stringstream ss(spec.substr(colon + 1));
    std::string item;
    while (std::getline(ss, item, ',')) {
      if (item.empty()) continue;
      auto eq = item.find('=');
      if (eq == std::string::npos)
        throw CodecError("codec '" + name + "': '" + item + "' is not key=value (parameters: " + paramNames(c) + ")");
      std::string key = item.substr(0, eq);
      bool known = false;
      for (auto& p : c.params) known = known || p.name == key;
      if (!known)
        throw CodecError("codec '" + name + "': unknown parameter '" + key + "' (valid parameters: " + paramNames(c) + ")");
      if (given.count(key)) throw CodecError("codec '" + name + "': parameter '" + key + "' given twice");
      given[key] = item.substr(eq + 1);
    }
  }
  ParsedSpec out{&c, {}, ""};
  for (auto& p : c.params) {
    auto it = given.find(p.name);
    std::string value = canonicalValue(c, p, it == given.end() ? p.defaultValue : it->second);
    out.params.values[p.name] = value;
    out.canonical += (out.canonical.empty() ? "" : ",") + p.name + "=" + value;
  }
  return out;
}

void checkGqa(uint32_t qHeads, uint32_t kvHeads) {
  if (kvHeads == 0 || qHeads == 0 || qHeads % kvHeads != 0)
    throw CodecError(std::to_string(qHeads) + " query heads is not a multiple of " + std::to_string(kvHeads) +
                     " KV heads");
}

// ---- stream frame -------------------------------------------------------------------------
// offset  0  "PKVS"            magic
//         4  u16 version (1)   6 u8 kind (0 K, 1 V)   7 u8 reserved
//         8  u32 heads         12 u32 tokens          16 u32 dim
//        20  u16 codec length  22 u16 params length
//        24  u64 x 6 breakdown (payload, scales, zeros, residual, metadata, host)
//        72  u64 body bytes
//        80  codec name, params string, zero padding to a multiple of 16; then the body.
static constexpr char kMagic[4] = {'P', 'K', 'V', 'S'};
static constexpr uint16_t kVersion = 1;
static constexpr size_t kFixedHeader = 80;

template <typename T>
static void put(std::vector<uint8_t>& out, size_t at, T v) {
  std::memcpy(out.data() + at, &v, sizeof(T));
}
template <typename T>
static T get(const uint8_t* in, size_t at) {
  T v;
  std::memcpy(&v, in + at, sizeof(T));
  return v;
}

static size_t headerBytes(size_t codecLen, size_t paramsLen) {
  return (kFixedHeader + codecLen + paramsLen + 15) / 16 * 16;
}

std::vector<uint8_t> encodeStream(const ParsedSpec& spec, TensorKind kind, const float* x, const Shape& shape,
                                  StreamHeader* headerOut) {
  const CodecDef& c = *spec.codec;
  if (shape.heads == 0 || shape.tokens == 0 || shape.dim == 0)
    throw CodecError("codec '" + c.name + "': empty tensor (heads, tokens and head_dim must be positive)");
  size_t n = shape.elements();
  size_t nonFinite = 0;
  for (size_t i = 0; i < n; ++i) nonFinite += !std::isfinite(x[i]);
  if (nonFinite)
    throw CodecError("codec '" + c.name + "': " + std::to_string(nonFinite) +
                     " non-finite values (NaN/Inf) cannot be compressed");
  c.check(spec.params, kind, shape);
  EncodedBody body = c.encode(x, shape, kind, spec.params);
  size_t hdr = headerBytes(c.name.size(), spec.canonical.size());
  std::vector<uint8_t> out(hdr + body.bytes.size(), 0);
  std::memcpy(out.data(), kMagic, 4);
  put<uint16_t>(out, 4, kVersion);
  put<uint8_t>(out, 6, uint8_t(kind));
  put<uint32_t>(out, 8, shape.heads);
  put<uint32_t>(out, 12, shape.tokens);
  put<uint32_t>(out, 16, shape.dim);
  put<uint16_t>(out, 20, uint16_t(c.name.size()));
  put<uint16_t>(out, 22, uint16_t(spec.canonical.size()));
  const Breakdown& b = body.breakdown;
  uint64_t parts[6] = {b.payload, b.scales, b.zeros, b.residual, b.metadata, b.host};
  for (int i = 0; i < 6; ++i) put<uint64_t>(out, 24 + 8 * i, parts[i]);
  put<uint64_t>(out, 72, body.bytes.size());
  std::memcpy(out.data() + kFixedHeader, c.name.data(), c.name.size());
  std::memcpy(out.data() + kFixedHeader + c.name.size(), spec.canonical.data(), spec.canonical.size());
  if (!body.bytes.empty()) std::memcpy(out.data() + hdr, body.bytes.data(), body.bytes.size());
  if (headerOut) *headerOut = StreamHeader{c.name, spec.canonical, kind, shape, b};
  return out;
}

StreamView openStream(const uint8_t* data, size_t size) {
  if (size < kFixedHeader || std::memcmp(data, kMagic, 4) != 0)
    throw CodecError("not a packkv stream (bad magic or shorter than its header)");
  uint16_t version = get<uint16_t>(data, 4);
  if (version != kVersion)
    throw CodecError("packkv stream version " + std::to_string(version) + " is not supported (this build reads " +
                     std::to_string(kVersion) + ")");
  StreamView s;
  uint8_t kind = get<uint8_t>(data, 6);
  if (kind > 1) throw CodecError("packkv stream: bad tensor kind " + std::to_string(kind));
  s.header.kind = TensorKind(kind);
  s.header.shape = {get<uint32_t>(data, 8), get<uint32_t>(data, 12), get<uint32_t>(data, 16)};
  size_t codecLen = get<uint16_t>(data, 20), paramsLen = get<uint16_t>(data, 22);
  uint64_t* parts[6] = {&s.header.breakdown.payload, &s.header.breakdown.scales,  &s.header.breakdown.zeros,
                        &s.header.breakdown.residual, &s.header.breakdown.metadata, &s.header.breakdown.host};
  for (int i = 0; i < 6; ++i) *parts[i] = get<uint64_t>(data, 24 + 8 * i);
  uint64_t bodyBytes = get<uint64_t>(data, 72);
  size_t hdr = headerBytes(codecLen, paramsLen);
  if (hdr > size || bodyBytes != size - hdr)
    throw CodecError("packkv stream is truncated or has trailing bytes (header says " + std::to_string(bodyBytes) +
                     " body bytes, " + std::to_string(size > hdr ? size - hdr : 0) + " present)");
  std::string codec(reinterpret_cast<const char*>(data + kFixedHeader), codecLen);
  std::string params(reinterpret_cast<const char*>(data + kFixedHeader + codecLen), paramsLen);
  ParsedSpec spec = parseSpec(codec + ":" + params);
  s.header.codec = codec;
  s.header.params = spec.canonical;
  s.params = spec.params;
  s.body = data + hdr;
  s.bodyBytes = bodyBytes;
  spec.codec->check(s.params, s.header.kind, s.header.shape);
  return s;
}

static void requireKind(const StreamView& s, TensorKind want, const char* op) {
  if (s.header.kind != want)
    throw CodecError(std::string(op) + " needs a " + kindName(want) + " stream, got a " + kindName(s.header.kind) +
                     " stream");
}

void decodeStream(const StreamView& s, float* out) { findCodec(s.header.codec).decode(s, out); }

void qkStream(const StreamView& s, const float* q, uint32_t qHeads, uint32_t nq, float* scores) {
  requireKind(s, TensorKind::Key, "q·Kᵀ");
  checkGqa(qHeads, s.header.shape.heads);
  findCodec(s.header.codec).qk(s, q, qHeads, nq, scores);
}

void pvStream(const StreamView& s, const float* p, uint32_t qHeads, uint32_t nq, float* out) {
  requireKind(s, TensorKind::Value, "p·V");
  checkGqa(qHeads, s.header.shape.heads);
  findCodec(s.header.codec).pv(s, p, qHeads, nq, out);
}

}  // namespace packkv
