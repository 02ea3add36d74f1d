// Helpers shared by codec layouts: section sizing and body-size checks.
#pragma once
#include <string>

#include "codec.h"

namespace packkv {

inline void requireBodyBytes(const StreamView& s, size_t expected) {
  if (s.bodyBytes != expected)
    throw CodecError("codec '" + s.header.codec + "' stream body has " + std::to_string(s.bodyBytes) +
                     " bytes, its shape and parameters need " + std::to_string(expected));
}

/** KV head read by query head h under GQA. */
inline uint32_t kvHeadOf(uint32_t h, uint32_t qHeads, uint32_t kvHeads) { return h / (qHeads / kvHeads); }

}  // namespace packkv
