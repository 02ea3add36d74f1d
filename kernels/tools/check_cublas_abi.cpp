// Compile-only check, built where cublas_api.h exists: the values cublas_dl.cu declares by hand.
#include <cublas_api.h>

static_assert(CUBLAS_STATUS_SUCCESS == 0, "cublas_dl.cu: status");
static_assert(CUBLAS_OP_N == 0 && CUBLAS_OP_T == 1, "cublas_dl.h: Op");
static_assert(CUBLAS_COMPUTE_32F == 68, "cublas_dl.cu: kCompute32F");
static_assert(CUBLAS_GEMM_DEFAULT == -1, "cublas_dl.cu: kGemmDefault");
static_assert(CUDA_R_16F == 2 && CUDA_R_32F == 0, "library_types.h");
static_assert(sizeof(cublasHandle_t) == sizeof(void*), "cublasHandle_t is a pointer");

// The prototypes, as cublas_dl.cu declares them (a mismatch fails to compile here).
using GemmFn = cublasStatus_t (*)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int, const void*,
                                  const void*, cudaDataType, int, long long, const void*, cudaDataType, int, long long,
                                  const void*, void*, cudaDataType, int, long long, int, cublasComputeType_t,
                                  cublasGemmAlgo_t);
static GemmFn gemm = &cublasGemmStridedBatchedEx;
using CreateFn = cublasStatus_t (*)(cublasHandle_t*);
static CreateFn create = &cublasCreate_v2;
using SetStreamFn = cublasStatus_t (*)(cublasHandle_t, cudaStream_t);
static SetStreamFn setStream = &cublasSetStream_v2;
using DestroyFn = cublasStatus_t (*)(cublasHandle_t);
static DestroyFn destroy = &cublasDestroy_v2;

int main() { return (gemm && create && setStream && destroy) ? 0 : 1; }
