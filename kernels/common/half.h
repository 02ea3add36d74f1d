// IEEE binary16 conversions on the host, with the directed roundings the quantizers need.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace packkv {

inline uint32_t floatBits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float bitsFloat(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

/** binary16 -> binary32, exact. */
inline float halfToFloat(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t man = h & 0x3FFu;
  if (exp == 0) {
    if (man == 0) return bitsFloat(sign);
    float f = std::ldexp(float(man), -24);  // subnormal
    return sign ? -f : f;
  }
  if (exp == 31) return bitsFloat(sign | 0x7F800000u | (man << 13));
  return bitsFloat(sign | ((exp + 112) << 23) | (man << 13));
}

/** binary32 -> binary16, round to nearest even (overflow -> inf, NaN kept). */
inline uint16_t floatToHalf(float f) {
  uint32_t u = floatBits(f);
  uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  uint32_t absu = u & 0x7FFFFFFFu;
  if (absu >= 0x7F800000u) return uint16_t(sign | 0x7C00u | (absu > 0x7F800000u ? 0x200u : 0u));
  if (absu >= 0x477FF000u) return uint16_t(sign | 0x7C00u);  // rounds past 65504
  if (absu < 0x38800000u) {  // below the smallest normal half: subnormal or zero
    float a = bitsFloat(absu);
    float scaled = a * 16777216.0f;  // units of 2^-24, exact
    uint32_t m = uint32_t(std::nearbyint(scaled));
    return uint16_t(sign | m);
  }
  uint32_t exp = (absu >> 23) - 112;
  uint32_t man = absu & 0x7FFFFFu;
  uint32_t half = (exp << 10) | (man >> 13);
  uint32_t rest = man & 0x1FFFu;
  if (rest > 0x1000u || (rest == 0x1000u && (half & 1u))) half += 1;
  return uint16_t(sign | half);
}

/** The next binary16 value toward +inf (finite inputs). */
inline uint16_t halfNextUp(uint16_t h) {
  if (h == 0x8000u) return 0x0001u;
  if (h & 0x8000u) return uint16_t(h - 1);
  return uint16_t(h + 1);
}
/** The next binary16 value toward -inf (finite inputs). */
inline uint16_t halfNextDown(uint16_t h) {
  if (h == 0x0000u) return 0x8001u;
  if (h & 0x8000u) return uint16_t(h + 1);
  return uint16_t(h - 1);
}

/** Largest binary16 <= f (f finite and within range). */
inline uint16_t floatToHalfDown(float f) {
  uint16_t h = floatToHalf(f);
  return halfToFloat(h) > f ? halfNextDown(h) : h;
}
/** Smallest binary16 >= f (f finite and within range). */
inline uint16_t floatToHalfUp(float f) {
  uint16_t h = floatToHalf(f);
  return halfToFloat(h) < f ? halfNextUp(h) : h;
}

}  // namespace packkv
