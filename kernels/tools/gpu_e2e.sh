#!/usr/bin/env bash
# End-to-end GPU run on a machine with CUDA but no Node or network (the H100 of BENCHMARKS.md).
# Prepare here, in the repo root (both folders are git-ignored via .git/info/exclude):
#   mkdir -p .gpucarry && cp "$(readlink -f "$(which node)")" /tmp/node && strip /tmp/node &&
#   xz -T2 -c /tmp/node > .gpucarry/node.xz &&
#   tar -cf - --exclude=node_modules/typescript --exclude=node_modules/@types node_modules | xz -T2 > .gpucarry/nm.tar.xz &&
#   npx tsc -p tsconfig.json     # dist/
# then run there, carrying .gpucarry and dist:  bash kernels/tools/gpu_e2e.sh OUTDIR [packkv_gpubench args]
set -uo pipefail
out=${1:?OUTDIR}; shift
xz -dc .gpucarry/node.xz > /tmp/node && chmod +x /tmp/node && export PATH=/tmp:$PATH
tar -xJf .gpucarry/nm.tar.xz
mkdir -p "$out/gb"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw --format=csv | tee "$out/gb/nvidia-smi.csv"
t0=$(date +%s)
cmake -S . -B /tmp/b -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 -DPACKKV_BUILD_ADDON=ON \
  -DCMAKE_JS_INC="$PWD/node_modules/node-api-headers/include" > "$out/cmake.log" 2>&1 || { tail -30 "$out/cmake.log"; exit 1; }
cmake --build /tmp/b --target packkv_native packkv_gpubench -j 16 >> "$out/cmake.log" 2>&1 || { grep -E "error" "$out/cmake.log" | head -30; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
export PACKKV_ADDON=/tmp/b/packkv_native.node
node -e "const n=require(process.env.PACKKV_ADDON); console.log(JSON.stringify(n.backends()), n.gpuCodecs())"
node node_modules/vitest/vitest.mjs run test/gpu.test.ts > "$out/gpu-tests.log" 2>&1; echo "gpu tests rc=$?"; grep -E "✓|×|Tests|FAIL|Error" "$out/gpu-tests.log" | head -30
# the opt-in TailorKV one-launch q·Kᵀ (thread-block clusters) against the CPU as well
PACKKV_TAILORKV_CLUSTER=8 node node_modules/vitest/vitest.mjs run test/gpu.test.ts -t "mode=s" > "$out/gpu-tests-cluster.log" 2>&1
echo "gpu tests, PACKKV_TAILORKV_CLUSTER=8: rc=$?"; grep -E "×|Tests|FAIL" "$out/gpu-tests-cluster.log" | head -10
node bin/packkv.js bench --device auto --results "$out/res" --no-progress > "$out/bench-gpu.txt" 2>&1; echo "bench rc=$?"; tail -14 "$out/bench-gpu.txt"
# the commit for the records: PACKKV_COMMIT, or .gpucarry/commit (git rev-parse --short HEAD > .gpucarry/commit here)
commit=${PACKKV_COMMIT:-$(cat .gpucarry/commit 2>/dev/null || echo unknown)}
/tmp/b/packkv_gpubench "$out/gb/gpu-all-h100.jsonl" --commit "$commit" "$@" > "$out/gb/gpubench.log" 2>&1; echo "gpubench rc=$?"
grep -E "^\||FAIL|copy|error|checks" "$out/gb/gpubench.log" | head -80
