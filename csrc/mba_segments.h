// Deterministic grouping of duplicate ids on the CPU (torch-free, unit-tested alone).
//
// The positions 0..K-1 of a batch's ids are put in (id, position) order by a stable
// LSD radix sort on the id (O(K) per pass; digits of at most 12 bits, as few passes as
// the table's row count needs), then cut into one segment per distinct id. Summing each
// segment's gradient rows in that order gives the same result on every run and thread
// count. Visiting the segments in ascending id order also walks the table's rows in
// address order, which costs fewer page-table walks than the batch's random order.
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace interest_kernels {
namespace mba {

struct Segments {
  std::vector<int64_t> order;       // (K,) positions sorted by (id, position)
  std::vector<int64_t> starts;      // (U + 1,) segment u covers order[starts[u] .. starts[u+1])
  std::vector<int64_t> unique_ids;  // (U,) ascending
  std::vector<int64_t> scratch;     // the sort's other buffer of positions
  std::vector<int64_t> counts;      // the sort's bucket counts
};

// Index of the first id outside [0, num_rows), or -1 when all are in range.
inline int64_t first_out_of_range(const int64_t* ids, int64_t k, int64_t num_rows) {
  for (int64_t i = 0; i < k; ++i) {
    if (ids[i] < 0 || ids[i] >= num_rows) return i;
  }
  return -1;
}

// Groups ids[0..k) into `seg`, reusing the memory of its vectors. Requires every id in
// [0, num_rows) (check with first_out_of_range first).
inline void build_segments(const int64_t* ids, int64_t k, int64_t num_rows, Segments& seg) {
  constexpr int kMaxBits = 12;
  seg.order.resize(static_cast<size_t>(k));
  for (int64_t i = 0; i < k; ++i) seg.order[i] = i;
  int key_bits = 0;
  while (key_bits < 63 && (int64_t(1) << key_bits) < num_rows) ++key_bits;
  const int passes = (key_bits + kMaxBits - 1) / kMaxBits;
  const int bits = passes > 0 ? (key_bits + passes - 1) / passes : 0;
  const int64_t kBuckets = int64_t(1) << bits;
  seg.scratch.resize(static_cast<size_t>(k));
  seg.counts.resize(static_cast<size_t>(kBuckets));
  int64_t* count = seg.counts.data();
  for (int shift = 0; shift < key_bits; shift += bits) {
    std::fill(count, count + kBuckets, 0);
    for (int64_t i = 0; i < k; ++i) ++count[(ids[seg.order[i]] >> shift) & (kBuckets - 1)];
    int64_t total = 0;
    for (int64_t b = 0; b < kBuckets; ++b) {
      const int64_t c = count[b];
      count[b] = total;
      total += c;
    }
    for (int64_t i = 0; i < k; ++i) {
      const int64_t p = seg.order[i];
      seg.scratch[count[(ids[p] >> shift) & (kBuckets - 1)]++] = p;
    }
    seg.order.swap(seg.scratch);
  }
  seg.starts.clear();
  seg.unique_ids.clear();
  for (int64_t i = 0; i < k; ++i) {
    const int64_t id = ids[seg.order[i]];
    if (i == 0 || id != seg.unique_ids.back()) {
      seg.starts.push_back(i);
      seg.unique_ids.push_back(id);
    }
  }
  seg.starts.push_back(k);
}

inline Segments build_segments(const int64_t* ids, int64_t k, int64_t num_rows) {
  Segments seg;
  build_segments(ids, k, num_rows, seg);
  return seg;
}

}  // namespace mba
}  // namespace interest_kernels
