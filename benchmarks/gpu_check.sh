#!/usr/bin/env bash
# The GPU checks in one run (what a lent CUDA machine is used for): the CUDA tests, then
# bench_gpu.py with its launch-shape sweep, then bench_step.py's whole training step on the
# GPU models. Logs, gpu.json and step_gpu.json go to $OUT (default runs/gpu).
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
PY=${PY:-python3}
$PY -c "import torch, triton, sys; print(sys.version.split()[0], torch.__version__, triton.__version__, torch.cuda.get_device_name())"
$PY -m pip install -q pytest >/dev/null 2>&1 || true
timeout 200 $PY -m pytest -q -p no:cacheprovider -k cuda \
    tests/test_kernels.py tests/test_reliability.py tests/test_stabilize.py > "$OUT/cuda_tests.log" 2>&1
echo "cuda tests rc=$?"
grep -E "^(FAILED|ERROR)|passed|failed|error" "$OUT/cuda_tests.log" | tail -15
timeout 260 $PY benchmarks/bench_gpu.py --out "$OUT" --rounds 10 --sweep > "$OUT/bench_gpu.log" 2>&1
echo "bench rc=$?"
grep -E "^sweep|\|" "$OUT/bench_gpu.log" | cut -c1-160
tail -3 "$OUT/bench_gpu.log"
timeout 180 $PY benchmarks/bench_step.py --device cuda --out "$OUT" --rounds 7 > "$OUT/bench_step.log" 2>&1
echo "bench_step rc=$?"
grep -E "^####|\|" "$OUT/bench_step.log" | cut -c1-160
tail -2 "$OUT/bench_step.log"
