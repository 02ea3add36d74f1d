// fp16: the uncompressed baseline every ratio is computed against.
//
// Stream body: binary16 values, row-major [heads][tokens][dim], little endian.
// Bytes per element: 2 (16 bits per element, ratio 1.00×).
#pragma once
#include <cstdint>

namespace packkv::fp16 {
inline uint64_t bodyBytes(uint32_t heads, uint32_t tokens, uint32_t dim) { return uint64_t(heads) * tokens * dim * 2; }
}  // namespace packkv::fp16
