// Canonical length-limited Huffman codes (package-merge) with a one-lookup decode table, and the
// MSB-first bit writer/reader the KVComp stream uses.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <vector>

namespace packkv::kvcomp {

/**
 * Optimal prefix-code lengths with no code longer than maxLength (package-merge, Larmore and
 * Hirschberg 1990). weights: all positive, 2 <= n <= 2^maxLength. Deterministic: equal weights
 * are ordered by symbol, and a leaf goes before a package of the same weight.
 */
inline std::vector<uint8_t> limitedCodeLengths(const std::vector<uint64_t>& weights, uint32_t maxLength) {
  struct Node {
    uint64_t weight;
    int32_t symbol;  // -1 for a package
    uint32_t left, right;
  };
  const size_t n = weights.size();
  std::vector<uint32_t> bySymbol(n);
  std::iota(bySymbol.begin(), bySymbol.end(), 0u);
  std::stable_sort(bySymbol.begin(), bySymbol.end(), [&](uint32_t a, uint32_t b) { return weights[a] < weights[b]; });
  std::vector<Node> nodes;
  nodes.reserve(n * (2 * size_t(maxLength) + 1));
  std::vector<uint32_t> leaves;
  for (uint32_t sym : bySymbol) {
    leaves.push_back(uint32_t(nodes.size()));
    nodes.push_back({weights[sym], int32_t(sym), 0, 0});
  }
  std::vector<uint32_t> list = leaves, packages, merged;
  for (uint32_t level = 1; level < maxLength; ++level) {
    packages.clear();
    for (size_t i = 0; i + 1 < list.size(); i += 2) {
      packages.push_back(uint32_t(nodes.size()));
      nodes.push_back({nodes[list[i]].weight + nodes[list[i + 1]].weight, -1, list[i], list[i + 1]});
    }
    merged.clear();
    std::merge(leaves.begin(), leaves.end(), packages.begin(), packages.end(), std::back_inserter(merged),
               [&](uint32_t a, uint32_t b) { return nodes[a].weight < nodes[b].weight; });
    list.swap(merged);
  }
  // Each appearance of a symbol among the cheapest 2n - 2 items adds one bit to its code.
  std::vector<uint8_t> length(n, 0);
  std::vector<uint32_t> stack(list.begin(), list.begin() + (2 * n - 2));
  while (!stack.empty()) {
    const Node& node = nodes[stack.back()];
    stack.pop_back();
    if (node.symbol >= 0) {
      ++length[size_t(node.symbol)];
    } else {
      stack.push_back(node.left);
      stack.push_back(node.right);
    }
  }
  return length;
}

/** Canonical codes (shorter first, then by symbol), MSB-first values; length 0 = absent symbol. */
inline std::vector<uint32_t> canonicalCodes(const std::vector<uint8_t>& length) {
  uint32_t maxLength = 0;
  for (uint8_t l : length) maxLength = std::max<uint32_t>(maxLength, l);
  std::vector<uint32_t> count(maxLength + 2, 0), next(maxLength + 2, 0);
  for (uint8_t l : length)
    if (l) ++count[l];
  for (uint32_t l = 1; l <= maxLength; ++l) next[l + 1] = (next[l] + count[l]) << 1;
  std::vector<uint32_t> code(length.size(), 0);
  for (size_t s = 0; s < length.size(); ++s)
    if (length[s]) code[s] = next[length[s]]++;
  return code;
}

/**
 * The one-step decode table: entry [the next maxLength bits] = symbol << 4 | code length.
 * Returns false unless the lengths form a complete prefix code (every entry defined), which is
 * what keeps a corrupt codebook from decoding garbage silently.
 */
inline bool buildDecodeTable(const std::vector<uint8_t>& length, uint32_t maxLength, std::vector<uint16_t>& table) {
  if (maxLength == 0 || maxLength > 15 || length.size() > 4096) return false;
  uint64_t kraft = 0;
  for (uint8_t l : length) {
    if (l > maxLength) return false;
    if (l) kraft += uint64_t(1) << (maxLength - l);
  }
  if (kraft != (uint64_t(1) << maxLength)) return false;
  std::vector<uint32_t> code = canonicalCodes(length);
  table.assign(size_t(1) << maxLength, 0);
  for (size_t s = 0; s < length.size(); ++s) {
    if (!length[s]) continue;
    uint32_t span = 1u << (maxLength - length[s]);
    uint16_t entry = uint16_t((s << 4) | length[s]);
    std::fill_n(table.begin() + size_t(code[s]) * span, span, entry);
  }
  return true;
}

/** Appends codes MSB first. */
class BitWriter {
 public:
  explicit BitWriter(std::vector<uint8_t>& out) : out_(out) {}
  void put(uint32_t code, uint32_t bits) {  // bits <= 24
    acc_ = (acc_ << bits) | code;
    pending_ += bits;
    while (pending_ >= 8) {
      pending_ -= 8;
      out_.push_back(uint8_t(acc_ >> pending_));
    }
    acc_ &= (uint64_t(1) << pending_) - 1;
  }
  /** Zero-pads to a byte boundary. */
  void flush() {
    if (pending_) out_.push_back(uint8_t(acc_ << (8 - pending_)));
    acc_ = 0;
    pending_ = 0;
  }

 private:
  std::vector<uint8_t>& out_;
  uint64_t acc_ = 0;
  uint32_t pending_ = 0;
};

/** Random-access MSB-first reads over a byte range; bits past its end read as zero. */
struct BitSource {
  const uint8_t* data;
  uint64_t bytes;

  /** The 64 bits starting at bitPos, left-aligned; at least 57 of them come from the stream. */
  uint64_t window(uint64_t bitPos) const {
    uint64_t byte = bitPos >> 3, w = 0;
    if (byte + 8 <= bytes) {
#if defined(__GNUC__)
      std::memcpy(&w, data + byte, 8);
      w = __builtin_bswap64(w);
#else
      for (int i = 0; i < 8; ++i) w = (w << 8) | data[byte + i];
#endif
    } else {
      for (uint64_t i = 0; i < 8; ++i) w = (w << 8) | (byte + i < bytes ? data[byte + i] : 0);
    }
    return w << (bitPos & 7);
  }
};

}  // namespace packkv::kvcomp
