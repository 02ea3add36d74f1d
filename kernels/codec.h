// The codec interface: every codec is encode / decode / q·Kᵀ / p·V over a self-describing stream.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace packkv {

enum class TensorKind : uint8_t { Key = 0, Value = 1 };
inline const char* kindName(TensorKind k) { return k == TensorKind::Key ? "K" : "V"; }

/** One layer's K or V: row-major [heads, tokens, dim] (batch folded into heads). */
struct Shape {
  uint32_t heads = 0;
  uint32_t tokens = 0;
  uint32_t dim = 0;
  size_t elements() const { return size_t(heads) * tokens * dim; }
};

/** Bytes a codec stores, by role (DESIGN.md "Accounting"). The stream header is not counted. */
struct Breakdown {
  uint64_t payload = 0, scales = 0, zeros = 0, residual = 0, metadata = 0, host = 0;
  uint64_t device() const { return payload + scales + zeros + residual + metadata; }
};

/** A user error (bad parameter, bad stream): the binding turns it into a JS Error. */
struct CodecError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum class ParamType { Int, Float, Enum };
struct ParamSpec {
  std::string name;
  ParamType type;
  std::string defaultValue;
  std::vector<std::string> choices;  // Enum values, or the allowed Int values when non-empty
  double min = 0, max = 0;           // Int/Float range when choices is empty
  std::string help;
  /**
   * The knob `packkv tune` turns: "" (not tuned), or which tensors it affects ("K", "V", "KV")
   * followed by '+' when a larger value compresses more (error bounds) or '-' when a smaller one
   * does (bit widths, token budgets).
   */
  std::string tune = "";
};

/** Parsed, validated parameter values (canonical strings keyed by name). */
struct Params {
  std::map<std::string, std::string> values;
  int integer(const std::string& name) const;
  double real(const std::string& name) const;
  const std::string& text(const std::string& name) const;
};

/** What the stream header records: enough to decode with nothing else. */
struct StreamHeader {
  std::string codec;
  std::string params;  // canonical "k=v,..." in spec order
  TensorKind kind = TensorKind::Key;
  Shape shape;
  Breakdown breakdown;
};

/** A parsed stream: the header plus the codec's body. */
struct StreamView {
  StreamHeader header;
  Params params;
  const uint8_t* body = nullptr;
  size_t bodyBytes = 0;
};

/** The encoder's output before framing. */
struct EncodedBody {
  std::vector<uint8_t> bytes;
  Breakdown breakdown;
};

/** One codec: the row of the registry (ggml's type-traits table, for KV streams). */
struct CodecDef {
  int order;  // position in listings: fp16 0, kivi 10, kvcomp 20, packkv 30, tailorkv 40
  std::string name;
  std::string summary;
  std::vector<ParamSpec> params;
  std::vector<std::string> defaultRuns;
  /** Shape-dependent checks (e.g. group divides head_dim); throws CodecError naming the problem. */
  void (*check)(const Params&, TensorKind, const Shape&);
  EncodedBody (*encode)(const float* x, const Shape&, TensorKind, const Params&);
  void (*decode)(const StreamView&, float* out);
  /** q [nq][qHeads][dim] -> scores [nq][qHeads][tokens] */
  void (*qk)(const StreamView&, const float* q, uint32_t qHeads, uint32_t nq, float* scores);
  /** p [nq][qHeads][tokens] -> out [nq][qHeads][dim] */
  void (*pv)(const StreamView&, const float* p, uint32_t qHeads, uint32_t nq, float* out);
};

}  // namespace packkv
