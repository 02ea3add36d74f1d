#!/usr/bin/env bash
# Build packkv_gpubench with plain cmake (no Node needed) and run it: the command sent to a GPU
# machine. Usage: kernels/tools/gpu_bench.sh OUTDIR [packkv_gpubench args...]
set -euo pipefail
out=${1:?usage: gpu_bench.sh OUTDIR [args]}
shift
build=${PACKKV_GPU_BUILD:-/tmp/packkv-gpu-build}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw \
  --format=csv | tee "$out/nvidia-smi.csv"
# The hand-written cuBLAS declarations in common/cublas_dl.cu against the installed header.
if [ -f /usr/local/cuda/include/cublas_api.h ]; then
  g++ -std=c++17 -fsyntax-only -I/usr/local/cuda/include kernels/tools/check_cublas_abi.cpp && echo "cublas ABI check: ok"
fi
cmake -S . -B "$build" -G Ninja -DCMAKE_CUDA_ARCHITECTURES=90 > "$out/cmake.log"
cmake --build "$build" --target packkv_gpubench -j "$(nproc)" 2>&1 | grep -v '^\[' || true
test -x "$build/packkv_gpubench"
"$build/packkv_gpubench" "$@"
