#!/usr/bin/env bash
# The GPU path end to end, on a machine with an NVIDIA GPU (about 5 minutes on one H200, at most 8):
#
#   scripts/gpu_check.sh         from anywhere; the studies go to a temporary folder, removed at the end
#
# 1. `make install` (torch is pinned in requirements.txt; PyPI's Linux wheel of it is the CUDA build),
#    then the CUDA tests of tests/test_gpu_path.py, which skip on a machine without a GPU.
# 2. The check's study (scripts/gpu_compare.py spec: residual 1D conv nets on MNIST-1D, every registered
#    metric) on CUDA through the command line, float32 with --deterministic, in-process: train, every
#    metric, table, figures (an operation with no deterministic CUDA kernel fails it, naming the operation).
# 3. The same study on CUDA in float64 (a local pool of 2 workers per GPU) and on the CPU in float64
#    (a local pool of one-thread workers), and their value rows compared (scripts/gpu_compare.py compare:
#    |cuda - cpu| <= 1e-9 + 1e-6 |cpu| for every metric).
# 4. A training step of ResNet18 (width 64, CIFAR-10-shaped batches of 128) through our training loop
#    against a plain torch loop, float32 and bf16 autocast (scripts/gpu_step_timing.py): plain/ours >= 0.95.
#
# Exit status: 0 when every step passed; 1 when one failed (each failure is named at the end), and at
# once when there is no usable CUDA GPU (no driver, no GPU, or a torch built for the CPU only).
# VENV names the virtual environment (default .venv); GPU_CHECK_KEEP=1 keeps the study folders.
# On a machine that cannot reach PyPI but whose Python already holds a CUDA build of torch (and numpy,
# scipy, pandas, matplotlib, tqdm, pyyaml, pytest, hypothesis), GPU_CHECK_PYTHON names that Python: step 1
# then installs only this package (--no-deps) and the wheels in GPU_CHECK_WHEELS, a folder, for what that
# Python lacks (submitit and mnist1d are pure Python: `pip download --no-deps submitit mnist1d -d DIR`).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${GPU_CHECK_PYTHON:-$VENV/bin/python}
FAILED=()

die() { echo "gpu_check: FAIL: $*" >&2; exit 1; }
step() { echo; echo "== $*"; }
check() {  # name, command...: run it, record a failure without stopping
    local name=$1; shift
    if ! "$@"; then FAILED+=("$name"); echo "gpu_check: FAILED: $name" >&2; fi
}

step "0. a GPU"
command -v nvidia-smi >/dev/null || die "no nvidia-smi: this machine has no NVIDIA driver, and this check needs a GPU"
nvidia-smi -L || die "nvidia-smi lists no GPU"

step "1. install, and the CUDA tests"
if [ -n "${GPU_CHECK_PYTHON:-}" ]; then
    if [ -n "${GPU_CHECK_WHEELS:-}" ]; then
        "$PY" -m pip install -q --no-index --no-deps "$GPU_CHECK_WHEELS"/*.whl || die "cannot install the wheels in $GPU_CHECK_WHEELS"
    fi
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . || die "cannot install this package into $PY"
else
    make install VENV="$VENV"
fi
"$PY" - <<'EOF' || die "this torch cannot use the GPU (a build for the CPU only, or no GPU visible)"
import sys, torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s):",
      ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))
sys.exit(0 if torch.cuda.is_available() else 1)
EOF
check "CUDA tests" timeout 300 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu_path.py

WORK=$(mktemp -d)
if [ "${GPU_CHECK_KEEP:-0}" = 1 ]; then echo "study folders: $WORK"; else trap 'rm -rf "$WORK"' EXIT; fi
"$PY" scripts/gpu_compare.py spec "$WORK/spec.json"
study() {  # folder, extra flags...: the check's study there; its log's tail on failure
    local root=$WORK/$1; shift
    mkdir -p "$root"
    [ -d "$WORK/cuda32/data" ] && [ "$root" != "$WORK/cuda32" ] && cp -r "$WORK/cuda32/data" "$root/"
    if timeout 240 "$PY" example_experiment.py --spec "$WORK/spec.json" --root "$root" --run "$@" >"$root.log" 2>&1; then
        grep -E "^(train|ran|table|figure)" "$root.log"
    else
        tail -40 "$root.log"; return 1
    fi
}

step "2. the study on CUDA, float32, deterministic (train, every metric, table, figures)"
check "study on CUDA (float32, deterministic)" study cuda32 --device cuda --executor inprocess --deterministic

step "3. the study on CUDA and on the CPU in float64, compared"
check "study on CUDA (float64)" study cuda64 --device cuda --workers-per-gpu 2 --dtype float64
check "study on the CPU (float64)" study cpu64 --device cpu --dtype float64
TABLE=checkpoint/gpucheck/results.csv
if [ -f "$WORK/cuda64/$TABLE" ] && [ -f "$WORK/cpu64/$TABLE" ]; then
    check "CUDA against CPU tables" "$PY" scripts/gpu_compare.py compare "$WORK/cuda64/$TABLE" "$WORK/cpu64/$TABLE"
fi

step "4. a ResNet18 training step: ours against a plain torch loop"
check "step time (float32)" timeout 180 "$PY" scripts/gpu_step_timing.py --min-ratio 0.95
check "step time (bf16 autocast)" timeout 180 "$PY" scripts/gpu_step_timing.py --autocast bf16 --min-ratio 0.95

echo
if [ ${#FAILED[@]} -gt 0 ]; then
    printf 'gpu_check: FAIL: %s\n' "${FAILED[@]}" >&2
    exit 1
fi
echo "gpu_check: every step passed"
