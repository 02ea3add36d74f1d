// The "last block finishes" handshake of the split reductions (kivi, packkv and tailorkv p·V, the
// tailorkv selection): every block writes its partial, and the last block to arrive adds them.
#pragma once

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

}  // namespace packkv::gpu
