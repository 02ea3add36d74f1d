// The end of the split reductions (kivi, packkv, kvcomp and tailorkv p·V, the tailorkv selection):
// every block writes a partial, and the last block to arrive adds them, in a fixed order.
#pragma once
#include <cstddef>
#include <cstdint>

namespace packkv::gpu {

/**
 * Called by every thread of a block once its partial results are stored (plain global stores):
 * true in every thread of the last of `blocks` blocks to arrive at *counter, which may then read
 * the other blocks' partials (the caller resets the counter for the next launch). Thread 0 adds to
 * the counter with one acq_rel atomic at GPU scope after a block barrier: the barrier orders the
 * block's stores before the release, and the acquire orders the last block's reads after every
 * other block's release (the pattern of CUTLASS's semaphores). It replaces __threadfence() in
 * every thread before and after a relaxed atomicAdd: a sequentially consistent fence
 * (MEMBAR.SC.GPU), where ncu found 7-10% of KIVI p·V's stall samples at 4k-32k tokens.
 */
__device__ __forceinline__ bool lastBlockDone(unsigned* counter, unsigned blocks, bool* sLast) {
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned prev;
    asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;\n" : "=r"(prev) : "l"(counter) : "memory");
    *sLast = prev == blocks - 1;
  }
  __syncthreads();
  return *sLast;
}

/**
 * dst[i] = Σ_k slots[first + k·step][i] over k < count, for i < n, added in k order (so the result
 * does not depend on timing), slot s at base + s·slotFloats; the block's threads split the columns
 * (16-byte loads where n, slotFloats and the pointers allow) and the k range into up to 8 parts,
 * each with all of its loads in flight (8 at a time), parts combined in order through `scratch`
 * (shared memory, scratchFloats of it, any alignment; it bounds the parts). ZERO stores 0 over
 * every slot element it read (workspaces go back zero-filled); dst may be one of the slots read.
 */
template <bool ZERO>
__device__ void addSlotsInOrder(float* base, size_t slotFloats, int first, int count, int step, float* dst, int n,
                                float* scratch, int scratchFloats) {
  constexpr int kBatch = 8;
  const bool vec4 = n % 4 == 0 && slotFloats % 4 == 0 &&
                    ((reinterpret_cast<uintptr_t>(base) | reinterpret_cast<uintptr_t>(dst)) & 15) == 0;
  const int cols = vec4 ? n / 4 : n, threads = int(blockDim.x);
  const int parts = cols >= threads ? 1 : min(min(8, threads / cols), 1 + scratchFloats / (4 * cols));
  const int per = (count + parts - 1) / parts, pi = int(threadIdx.x) / cols;
  for (int c = int(threadIdx.x) % cols; c < cols; c += parts == 1 ? threads : cols) {
    float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
    if (pi < parts) {
      const int k0 = pi * per, k1 = min(count, k0 + per);
      for (int k = k0; k < k1; k += kBatch) {
        float4 v[kBatch];
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
          v[u] = make_float4(0.f, 0.f, 0.f, 0.f);
          if (k + u < k1) {
            float* p = base + size_t(first + (k + u) * step) * slotFloats;
            if (vec4) v[u] = __ldcg(reinterpret_cast<const float4*>(p) + c);
            else v[u].x = __ldcg(p + c);
          }
        }
        if (ZERO)
#pragma unroll
          for (int u = 0; u < kBatch; ++u)
            if (k + u < k1) {
              float* p = base + size_t(first + (k + u) * step) * slotFloats;
              if (vec4) reinterpret_cast<float4*>(p)[c] = make_float4(0.f, 0.f, 0.f, 0.f);
              else p[c] = 0.f;
            }
#pragma unroll
        for (int u = 0; u < kBatch; ++u) sum.x += v[u].x, sum.y += v[u].y, sum.z += v[u].z, sum.w += v[u].w;
      }
    }
    if (parts > 1) {
      float* sc = scratch + 4 * ((pi - 1) * cols + c);
      if (pi > 0 && pi < parts) sc[0] = sum.x, sc[1] = sum.y, sc[2] = sum.z, sc[3] = sum.w;
      __syncthreads();
      if (pi == 0)
        for (int r = 1; r < parts; ++r) {
          const float* x = scratch + 4 * ((r - 1) * cols + c);
          sum.x += x[0], sum.y += x[1], sum.z += x[2], sum.w += x[3];
        }
    }
    if (pi == 0) {
      if (vec4) reinterpret_cast<float4*>(dst)[c] = sum;
      else dst[c] = sum.x;
    }
  }
}

constexpr int kFinishGroup = 8;        // blocks per first-level group of addPartials
constexpr int kFinishMaxGroups = 64;   // group counters per head (so at most 512 blocks per head)

/**
 * The end of a split reduction over `blocks` blocks of one head (blockIdx.x): block b wrote slot b
 * (the grid's last block slots b .. slots - 1). TWO_LEVEL: the last block of each group of
 * kFinishGroup blocks adds its group's slots in order into the group's first slot, and the last of
 * those adds the group sums in order into dst (n floats); counters [heads] final, then
 * [heads][kFinishMaxGroups] groups. Else the head's last block adds all slots (counters [heads]).
 * Counters are zero between launches (reset here). Every thread of the block calls it. Measured:
 * KVComp p·V's separate reduce kernel cost 4-7 µs, the two-level fold in its place 5-11 µs less
 * at 32k-128k; KIVI's one-level finish (56 slots of 2 KB per head, ~3.7 µs by leaving it out)
 * was not faster in two levels (docs/kernels.md).
 */
template <bool ZERO, bool TWO_LEVEL>
__device__ void addPartials(unsigned* counters, unsigned heads, unsigned h, float* base, size_t slotFloats, int blocks,
                            int slots, float* dst, int n, float* scratch, int scratchFloats) {
  __shared__ bool sLast;
  const int groups = TWO_LEVEL ? (blocks + kFinishGroup - 1) / kFinishGroup : 1;
  unsigned* finalCounter = counters + h;
  if (groups > 1) {
    const int grp = int(blockIdx.x) / kFinishGroup;
    unsigned* groupCounter = counters + heads + size_t(h) * kFinishMaxGroups + grp;
    if (!lastBlockDone(groupCounter, unsigned(min(kFinishGroup, blocks - grp * kFinishGroup)), &sLast)) return;
    const int s0 = grp * kFinishGroup, s1 = grp == groups - 1 ? slots : s0 + kFinishGroup;
    addSlotsInOrder<ZERO>(base, slotFloats, s0, s1 - s0, 1, base + size_t(s0) * slotFloats, n, scratch, scratchFloats);
    if (threadIdx.x == 0) *groupCounter = 0;
    if (!lastBlockDone(finalCounter, unsigned(groups), &sLast)) return;
    addSlotsInOrder<ZERO>(base, slotFloats, 0, groups, kFinishGroup, dst, n, scratch, scratchFloats);
  } else {
    if (!lastBlockDone(finalCounter, unsigned(blocks), &sLast)) return;
    addSlotsInOrder<ZERO>(base, slotFloats, 0, slots, 1, dst, n, scratch, scratchFloats);
  }
  if (threadIdx.x == 0) *finalCounter = 0;
}

}  // namespace packkv::gpu
