// cuBLAS through dlopen: our own declarations of the four entry points and the enum values we use,
// checked against cublas_api.h wherever that header exists (kernels/tools/check_cublas_abi.cpp).
#include <dlfcn.h>
#include <library_types.h>

#include <cstdlib>
#include <mutex>
#include <vector>

#include "codec.h"
#include "common/cublas_dl.h"

namespace packkv::cublas {
namespace {

using Handle = void*;  // cublasHandle_t is an opaque pointer
using Status = int;    // cublasStatus_t; 0 is CUBLAS_STATUS_SUCCESS
constexpr int kCompute32F = 68;   // CUBLAS_COMPUTE_32F
constexpr int kGemmDefault = -1;  // CUBLAS_GEMM_DEFAULT

using CreateFn = Status (*)(Handle*);
using DestroyFn = Status (*)(Handle);
using SetStreamFn = Status (*)(Handle, cudaStream_t);
using GetVersionFn = Status (*)(Handle, int*);
using GemmStridedBatchedExFn = Status (*)(Handle, int opA, int opB, int m, int n, int k, const void* alpha,
                                          const void* A, cudaDataType Atype, int lda, long long strideA,
                                          const void* B, cudaDataType Btype, int ldb, long long strideB,
                                          const void* beta, void* C, cudaDataType Ctype, int ldc, long long strideC,
                                          int batchCount, int computeType, int algo);

const char* statusName(Status s) {
  switch (s) {
    case 0: return "CUBLAS_STATUS_SUCCESS";
    case 1: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case 3: return "CUBLAS_STATUS_ALLOC_FAILED";
    case 7: return "CUBLAS_STATUS_INVALID_VALUE";
    case 8: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case 11: return "CUBLAS_STATUS_MAPPING_ERROR";
    case 13: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case 14: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case 15: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case 16: return "CUBLAS_STATUS_LICENSE_ERROR";
    default: return "unknown cuBLAS status";
  }
}

struct Library {
  void* so = nullptr;
  Handle handle = nullptr;
  CreateFn create = nullptr;
  DestroyFn destroy = nullptr;
  SetStreamFn setStream = nullptr;
  GemmStridedBatchedExFn gemm = nullptr;
  std::string why, name;
  std::mutex callMutex;  // one handle: its stream is set per call

  Library() {
    std::vector<std::string> paths;
    if (const char* env = std::getenv("PACKKV_CUBLAS")) paths.push_back(env);
    for (const char* soname : {"libcublas.so.13", "libcublas.so.12", "libcublas.so"}) paths.push_back(soname);
    for (const char* dir : {"/usr/local/cuda/lib64/", "/usr/local/cuda/targets/x86_64-linux/lib/"})
      for (const char* soname : {"libcublas.so.13", "libcublas.so.12"}) paths.push_back(std::string(dir) + soname);
    std::string tried;
    for (auto& p : paths) {
      so = dlopen(p.c_str(), RTLD_NOW | RTLD_LOCAL);
      if (so) {
        name = p;
        break;
      }
      const char* err = dlerror();
      tried += "\n  " + p + ": " + (err ? err : "not found");
    }
    if (!so) {
      why = "cuBLAS is not installed or not on the loader path (set PACKKV_CUBLAS=/path/to/libcublas.so.N); tried:" +
            tried;
      return;
    }
    auto sym = [&](const char* s) {
      void* f = dlsym(so, s);
      if (!f && why.empty()) why = name + " has no symbol " + s;
      return f;
    };
    create = reinterpret_cast<CreateFn>(sym("cublasCreate_v2"));
    destroy = reinterpret_cast<DestroyFn>(sym("cublasDestroy_v2"));
    setStream = reinterpret_cast<SetStreamFn>(sym("cublasSetStream_v2"));
    gemm = reinterpret_cast<GemmStridedBatchedExFn>(sym("cublasGemmStridedBatchedEx"));
    auto getVersion = reinterpret_cast<GetVersionFn>(dlsym(so, "cublasGetVersion_v2"));
    if (!why.empty()) return;
    Status st = create(&handle);
    if (st != 0) {
      why = name + ": cublasCreate failed: " + statusName(st);
      handle = nullptr;
      return;
    }
    int version = 0;
    if (getVersion && getVersion(handle, &version) == 0) name += " (version " + std::to_string(version) + ")";
  }
  // The handle is never destroyed: static destructors may run after the CUDA runtime shut down.
};

Library& lib() {
  static Library instance;
  return instance;
}

}  // namespace

bool available() { return lib().handle != nullptr; }
const std::string& whyUnavailable() { return lib().why; }
const std::string& loadedLibrary() { return lib().name; }

void gemmF16F32(cudaStream_t stream, Op opA, Op opB, int m, int n, int k, const void* A, int lda, long long strideA,
                const void* B, int ldb, long long strideB, float* C, int ldc, long long strideC, int batch) {
  Library& l = lib();
  if (!l.handle) throw CodecError("cuBLAS unavailable: " + l.why);
  const float alpha = 1.0f, beta = 0.0f;
  std::lock_guard<std::mutex> lock(l.callMutex);
  Status st = l.setStream(l.handle, stream);
  if (st == 0)
    st = l.gemm(l.handle, int(opA), int(opB), m, n, k, &alpha, A, CUDA_R_16F, lda, strideA, B, CUDA_R_16F, ldb, strideB,
                &beta, C, CUDA_R_32F, ldc, strideC, batch, kCompute32F, kGemmDefault);
  if (st != 0)
    throw CodecError(std::string("cublasGemmStridedBatchedEx failed: ") + statusName(st) + " (m=" + std::to_string(m) +
                     " n=" + std::to_string(n) + " k=" + std::to_string(k) + " batch=" + std::to_string(batch) + ")");
}

}  // namespace packkv::cublas
