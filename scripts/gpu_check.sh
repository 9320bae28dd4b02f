#!/usr/bin/env bash
# The GPU checks in one call, for a machine with CUDA: the CUDA-only tests (`pytest -m gpu`: device augmentation
# on the GPU against the CPU path's statistics, bf16 autocast, fused AdamW, torch.compile, `pomona train --device
# cuda` on a few grocery photos), then the GPU benchmark (benchmarks/gpu.py; arguments go to it, e.g.
# `--models lite0 --skip-loader-path` for a shorter run). Both always run; the exit code is non-zero if either
# failed. Results (pytest log, results.md/json of the benchmark) go to $GPU_CHECK_OUT, else $OUT/gpu-check (a
# lent machine's output folder), else a temporary folder.
#
#   bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing to check" >&2
    exit 2
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'on', torch.cuda.get_device_name())"
RESULTS=${GPU_CHECK_OUT:-${OUT:+$OUT/gpu-check}}
RESULTS=${RESULTS:-$(mktemp -d -t pomona-gpu-check-XXXX)}
mkdir -p "$RESULTS"

echo "== pytest -m gpu"
"$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$RESULTS/pytest-gpu.log"
tests=${PIPESTATUS[0]}

echo "== benchmarks/gpu.py $*"
"$PY" benchmarks/gpu.py --out "$RESULTS/benchmark" "$@" 2>&1 | tee "$RESULTS/benchmark.log"
bench=${PIPESTATUS[0]}

echo "gpu_check: tests exit $tests, benchmark exit $bench; results in $RESULTS"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
