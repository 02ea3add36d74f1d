// PackKV token repacking inside one block (spec §3): the order that makes packs narrow.
// Input: the block's integer codes, token-major [B][L] with L = heads·head_dim. Output:
// perm[j] = the block token stored in slot j. Deterministic: ties go to the lowest token index,
// and the greedy seed's cosine is compared exactly in integers (no float order dependence).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "packkv/format.h"

namespace packkv::packkv_codec {

/** Sort by the (lower) median code of each token, descending; stable, so ties keep token order. */
inline std::vector<uint32_t> medianOrder(const uint16_t* codes, uint32_t B, uint32_t L) {
  std::vector<uint32_t> median(B), perm(B);
  std::vector<uint16_t> row(L);
  for (uint32_t t = 0; t < B; ++t) {
    std::copy(codes + size_t(t) * L, codes + size_t(t + 1) * L, row.begin());
    std::nth_element(row.begin(), row.begin() + (L - 1) / 2, row.end());
    median[t] = row[(L - 1) / 2];
  }
  std::iota(perm.begin(), perm.end(), 0u);
  std::stable_sort(perm.begin(), perm.end(), [&](uint32_t a, uint32_t b) { return median[a] > median[b]; });
  return perm;
}

/** Remaining token most cosine-similar to the rounded mean of the remaining tokens. */
inline uint32_t greedySeed(const uint16_t* codes, uint32_t L, const std::vector<uint32_t>& remaining) {
  std::vector<uint64_t> sum(L, 0);
  for (uint32_t t : remaining)
    for (uint32_t i = 0; i < L; ++i) sum[i] += codes[size_t(t) * L + i];
  std::vector<uint64_t> mean(L);
  for (uint32_t i = 0; i < L; ++i) mean[i] = uint64_t(std::nearbyint(double(sum[i]) / double(remaining.size())));
  // Codes are non-negative, so cos ≥ 0 and cos² = dot²/|t|² orders tokens like cos (|mean| is common).
  unsigned __int128 bestNum = 0, bestDen = 1;
  size_t best = 0;
  for (size_t k = 0; k < remaining.size(); ++k) {
    const uint16_t* v = codes + size_t(remaining[k]) * L;
    uint64_t dot = 0, norm = 0;
    for (uint32_t i = 0; i < L; ++i) dot += v[i] * mean[i], norm += uint64_t(v[i]) * v[i];
    unsigned __int128 num = norm ? (unsigned __int128)dot * dot : 0, den = norm ? norm : 1;
    if (k == 0 || num * bestDen > bestNum * den) best = k, bestNum = num, bestDen = den;
  }
  return uint32_t(best);
}

/** Packs built one at a time: a seed, then each time the token that widens the pack least. */
inline std::vector<uint32_t> greedyOrder(const uint16_t* codes, uint32_t B, uint32_t L, uint32_t P) {
  std::vector<uint32_t> remaining(B), perm;
  std::iota(remaining.begin(), remaining.end(), 0u);
  std::vector<uint16_t> lo(L), hi(L);
  perm.reserve(B);
  while (!remaining.empty()) {
    uint32_t seedAt = greedySeed(codes, L, remaining);
    uint32_t seed = remaining[seedAt];
    remaining.erase(remaining.begin() + seedAt);
    perm.push_back(seed);
    std::copy(codes + size_t(seed) * L, codes + size_t(seed + 1) * L, lo.begin());
    std::copy(lo.begin(), lo.end(), hi.begin());
    for (uint32_t added = 1; added < P; ++added) {
      // Σ_c width(pack ∪ {t}); the current sum is common to all candidates, so the least sum is
      // the least increase. A candidate is abandoned once its partial sum passes the best.
      uint64_t bestSum = UINT64_MAX;
      size_t best = 0;
      for (size_t k = 0; k < remaining.size(); ++k) {
        const uint16_t* v = codes + size_t(remaining[k]) * L;
        uint64_t widthSum = 0;
        for (uint32_t i = 0; i < L && widthSum < bestSum; ++i)
          widthSum += bitLength(uint32_t(std::max(hi[i], v[i]) - std::min(lo[i], v[i])));
        if (widthSum < bestSum) bestSum = widthSum, best = k;
      }
      uint32_t t = remaining[best];
      remaining.erase(remaining.begin() + best);
      perm.push_back(t);
      for (uint32_t i = 0; i < L; ++i) {
        uint16_t c = codes[size_t(t) * L + i];
        lo[i] = std::min(lo[i], c);
        hi[i] = std::max(hi[i], c);
      }
    }
  }
  return perm;
}

inline std::vector<uint32_t> repackOrder(Repack method, const uint16_t* codes, uint32_t B, uint32_t L, uint32_t P) {
  if (method == Repack::Median) return medianOrder(codes, B, L);
  if (method == Repack::Greedy) return greedyOrder(codes, B, L, P);
  std::vector<uint32_t> identity(B);
  std::iota(identity.begin(), identity.end(), 0u);
  return identity;
}

}  // namespace packkv::packkv_codec
