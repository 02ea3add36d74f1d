// cuBLAS loaded at run time with dlopen: build machines have nvcc and cudart but no cuBLAS, and a
// machine without it still runs every codec except the fp16 GPU baseline.
#pragma once
#include <cuda_runtime_api.h>

#include <string>

namespace packkv::cublas {

/** The cublasOperation_t values we pass (cublas_api.h: CUBLAS_OP_N 0, CUBLAS_OP_T 1). */
enum class Op : int { N = 0, T = 1 };

/** True once libcublas is loaded and a handle exists; tries once per process. */
bool available();
/** Why not available (every path tried and the loader's message), empty when available. */
const std::string& whyUnavailable();
/** The library that was loaded, e.g. "libcublas.so.13 (version 130100)". */
const std::string& loadedLibrary();

/**
 * Column-major C_b = op(A_b) op(B_b) for b < batch: A and B binary16, C binary32, fp32
 * accumulation (cublasGemmStridedBatchedEx, CUBLAS_COMPUTE_32F). Throws CodecError naming the
 * cuBLAS status on failure, or why cuBLAS is unavailable.
 */
void gemmF16F32(cudaStream_t stream, Op opA, Op opB, int m, int n, int k, const void* A, int lda, long long strideA,
                const void* B, int ldb, long long strideB, float* C, int ldc, long long strideC, int batch);

}  // namespace packkv::cublas
