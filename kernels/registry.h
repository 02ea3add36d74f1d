// The codec registry: name -> CodecDef, spec parsing, stream framing. The CLI asks this, never a switch.
#pragma once
#include <string>
#include <vector>

#include "codec.h"

namespace packkv {

/** Every registered codec, in CodecDef::order (fp16 first). */
const std::vector<const CodecDef*>& allCodecs();

/** A codec's cpu.cpp registers it with `static const CodecRegistrar reg(kMyCodec);`. */
struct CodecRegistrar {
  explicit CodecRegistrar(const CodecDef& codec);
};
const CodecDef& findCodec(const std::string& name);

/** "kivi:bits=2,group=32" -> codec + validated params with defaults filled in. */
struct ParsedSpec {
  const CodecDef* codec;
  Params params;
  std::string canonical;  // "bits=2,group=32,residual=128"
};
ParsedSpec parseSpec(const std::string& spec);

/** Encode and frame: header + body. Checks shape, kind and finiteness first. */
std::vector<uint8_t> encodeStream(const ParsedSpec& spec, TensorKind kind, const float* x, const Shape& shape,
                                  StreamHeader* headerOut);
/** Parse a framed stream; throws CodecError on a bad magic, version or truncated body. */
StreamView openStream(const uint8_t* data, size_t size);

void decodeStream(const StreamView& s, float* out);
void qkStream(const StreamView& s, const float* q, uint32_t qHeads, uint32_t nq, float* scores);
void pvStream(const StreamView& s, const float* p, uint32_t qHeads, uint32_t nq, float* out);

/** Query head h reads KV head h / (qHeads / kvHeads); throws unless kvHeads divides qHeads. */
void checkGqa(uint32_t qHeads, uint32_t kvHeads);

}  // namespace packkv
