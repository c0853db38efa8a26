#!/usr/bin/env bash
# Builds a CUDA toolchain folder from PyPI wheels, so that candle's `cuda` (and `nccl`) features compile
# and link for sm_90 (H100/H200) on a machine with no GPU and no CUDA install.
# Verified: nvcc 13.0.88; a candle 0.11 crate with features cuda+nccl built in release in about 8 minutes;
# the binary (about 41 MB) needs at run time libcuda.so.1 (from the driver), libcudart.so.13,
# libcublas(Lt).so.13, libcurand.so.10, libnccl.so.2 — all present on the lent GPU machines (their
# python3 site-packages/nvidia/{cu13,nccl}/lib; the driver is 580, CUDA 13).
# Run after `cargo fetch` (the driver stub is generated from cudarc's bindings).
# Usage: ROOT=$HOME/.cache/afnext-cuda bash tools/gpu/cuda-from-pypi.sh && source $ROOT/env.sh && cargo build --release --features cuda
set -euo pipefail
ROOT=${ROOT:-$HOME/.cache/afnext-cuda}
mkdir -p "$ROOT"
[[ -x $ROOT/venv/bin/python ]] || python3 -m venv "$ROOT/venv"
"$ROOT/venv/bin/pip" install -q "cuda-toolkit[nvcc,crt,nvvm,cudart,cublas,curand,nvrtc,cccl]==13.0.2" "nvidia-nccl-cu13==2.27.7"
SP=$("$ROOT/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
N=$SP/nvidia/cu13
H=$ROOT/cudahome
mkdir -p "$H/lib64/stubs"
ln -sfn "$N/bin" "$H/bin"; ln -sfn "$N/include" "$H/include"; ln -sfn "$N/nvvm" "$H/nvvm"
for l in cudart cublas cublasLt nvrtc; do ln -sf "$N/lib/lib$l.so.13" "$H/lib64/lib$l.so"; done
ln -sf "$N/lib/libcurand.so.10" "$H/lib64/libcurand.so"
ln -sf "$SP/nvidia/nccl/lib/libnccl.so.2" "$H/lib64/libnccl.so"
# Link-time stub for the driver library; the real libcuda.so.1 comes with the NVIDIA driver at run time.
CUDARC_SRC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/index.crates.io-*/cudarc-0.19.* | tail -1)
grep -ohE 'pub unsafe fn (cu[A-Za-z0-9_]+)' "$CUDARC_SRC/src/driver/sys/mod.rs" | awk '{print $4}' | sort -u \
  | awk '{printf "int %s(void){return 999;}\n", $1}' > "$H/lib64/stubs/libcuda_stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$H/lib64/stubs/libcuda.so" "$H/lib64/stubs/libcuda_stub.c"
cat > "$ROOT/env.sh" <<EOT
export CUDA_HOME=$H PATH=$H/bin:\$PATH CUDA_COMPUTE_CAP=90 LIBRARY_PATH=$H/lib64:$H/lib64/stubs:\${LIBRARY_PATH:-}
EOT
echo "ready: source $ROOT/env.sh && cargo build --release --features cuda"
