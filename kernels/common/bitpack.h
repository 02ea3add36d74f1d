// Bit packing of small unsigned codes into 32-bit words, LSB first (KIVI order).
#pragma once
#include <cstdint>

namespace packkv {

/** Element i of a word sits at bit offset i*bits; a word holds 32/bits codes. */
inline uint32_t unpackCode(uint32_t word, int i, int bits) {
  uint32_t mask = bits == 32 ? 0xFFFFFFFFu : ((1u << bits) - 1u);
  return (word >> (i * bits)) & mask;
}

inline void packCode(uint32_t& word, int i, int bits, uint32_t code) {
  word |= code << (i * bits);
}

}  // namespace packkv
