#!/usr/bin/env bash
# One call on a lent GPU (H100/H200), about 8 minutes (give the call a timeout_s of 540): prints nvidia-smi,
# runs the golden comparisons on the GPU, then benchmarks afnext and transformers on the same card at full
# AF-Next size (bf16, random weights), profiles a small workload with ncu, and prints one comparison table
# with the roofline.
#
# Prepare here: `bash scripts/gpu-build.sh` (CUDA executables in target/gpu-bundle) and the transformers
# 5.23 wheel in .whl/ (see docs/GPU.md). Then one device call: carry target/gpu-bundle and .whl, and run
# `bash scripts/gpu-check.sh`. Results land in $OUT (or /tmp/gpu-check) as JSON and logs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
status=0
step() { echo; echo "=== $*"; }

step nvidia-smi
nvidia-smi || { echo "no GPU"; exit 1; }

# The CUDA runtime libraries (cudart, cuBLAS, cuRAND, NCCL) of the machine's own python3 wheels; the driver
# provides libcuda.
SP=$(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))')
export LD_LIBRARY_PATH=$SP/nvidia/cu13/lib:$SP/nvidia/nccl/lib:${LD_LIBRARY_PATH:-}
BIN=/tmp/afnext-gpu/bin
rm -rf /tmp/afnext-gpu && mkdir -p /tmp/afnext-gpu
python3 -c 'import tarfile; tarfile.open("target/gpu-bundle/bin.txz").extractall("/tmp/afnext-gpu")' || exit 1
ldd "$BIN/device" | grep -E "not found|cuda|cublas|nccl|curand"

step "golden comparisons on cuda:0 (f32 and bf16 against transformers 5.23 fixtures)"
export AFNEXT_TEST_DEVICE=cuda:0 AFNEXT_EXPECT_GPU=1 AFNEXT_FIXTURES=$PWD/tests/fixtures
for t in kernels model_golden generation engine afnext_collectives; do
  log=/tmp/afnext-gpu/test-$t.log
  if timeout 150 "$BIN/$t" --test-threads 2 --nocapture >"$log" 2>&1; then
    echo "PASS $t: $(grep -E '^test result' "$log" | tail -1)"
  else
    status=1
    echo "FAIL $t"
    grep -E "panicked|FAILED|failed|error" "$log" | head -20
  fi
  cat "$log" >>"$OUT/tests.log"
done
# The worst differences measured on the GPU (every line is in tests.log).
grep -hE "max abs|differs by|bf16:" "$OUT/tests.log" | sort -t: -k2 | uniq | grep -E "prefill_logits|bf16|differs|encoder_output" | head -16

step "afnext benchmark (full AF-Next size, bf16, random weights)"
timeout 240 "$BIN/device" --config tools/bench/configs/af-next --device cuda:0 --dtype bf16 \
  >"$OUT/afnext.json" 2>"$OUT/afnext.log" || { status=1; tail -20 "$OUT/afnext.log"; }
tail -12 "$OUT/afnext.log"

step "transformers benchmark (same config, same card)"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
PYTHONUNBUFFERED=1 timeout 240 python3 tools/bench/gpu_ref.py tools/bench/configs/af-next --device cuda \
  >"$OUT/transformers.json" 2>"$OUT/transformers.log" || { status=1; tail -20 "$OUT/transformers.log"; }
tail -5 "$OUT/transformers.log"

step "kernel profile of a small workload (ncu: 2 windows, a 3 000-token prompt, 2 decode steps of 8)"
if command -v ncu >/dev/null; then
  timeout 180 ncu --clock-control none --profile-from-start off --csv --page raw \
    --metrics gpu__time_duration.sum "$BIN/device" --config tools/bench/configs/af-next --device cuda:0 \
    --profile >"$OUT/ncu.csv" 2>/tmp/afnext-gpu/ncu.log || tail -5 /tmp/afnext-gpu/ncu.log
  python3 tools/bench/ncu_summary.py "$OUT/ncu.csv" 25 | tee "$OUT/ncu-top.md"
fi

step "comparison"
python3 tools/bench/gpu_table.py "$OUT/afnext.json" "$OUT/transformers.json" | tee "$OUT/table.md"
exit $status
