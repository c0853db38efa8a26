#!/usr/bin/env bash
# Builds, on a machine without a GPU, everything scripts/gpu-check.sh runs on a lent one: the CUDA (sm_90)
# test executables of the golden comparisons and the device benchmark, stripped and packed into
# target/gpu-bundle/bin.txz (the device call carries that folder; the carry limit is 64 MiB). Each executable
# holds the same ~20 MB of candle kernels: xz's 64 MiB window stores them once (250 MB -> 15 MB).
#
# Usage: bash scripts/gpu-build.sh      (makes the CUDA toolchain from PyPI on first use: tools/gpu/)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${AFNEXT_CUDA_ROOT:-$HOME/.cache/afnext-cuda}
[[ -f $ROOT/env.sh ]] || ROOT=$ROOT bash tools/gpu/cuda-from-pypi.sh
# shellcheck disable=SC1091
source "$ROOT/env.sh"

log=target/gpu-build.jsonl
mkdir -p target
: >"$log"
cargo test --release --features cuda -p afnext-e2e --test model_golden --test generation --test engine --test kernels \
  --no-run --message-format=json-render-diagnostics >>"$log"
cargo test --release --features cuda -p afnext-collectives --lib --no-run \
  --message-format=json-render-diagnostics >>"$log"
cargo bench --features cuda -p afnext-model --bench device --no-run \
  --message-format=json-render-diagnostics >>"$log"

out=target/gpu-bundle
rm -rf "$out"
mkdir -p "$out/bin"
python3 - "$log" "$out/bin" <<'EOF'
import json, shutil, sys
log, dest = sys.argv[1], sys.argv[2]
for line in open(log):
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        name = m["target"]["name"].replace("-", "_")
        shutil.copy(m["executable"], f"{dest}/{name}")
        print("bundled", name)
EOF
strip "$out"/bin/*
tar -C "$out" -cf - bin | xz -9 -T2 >"$out/bin.txz"
rm -rf "$out/bin"
ls -l "$out"
