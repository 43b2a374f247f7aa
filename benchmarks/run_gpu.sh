#!/usr/bin/env bash
# One call on a GPU machine: the GPU tests, then every benchmark, JSON into $OUT (or
# benchmarks/results). Usage: OUT=/some/dir bash benchmarks/run_gpu.sh [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
status=0
python -m pytest -q -m gpu tests 2>&1 | tee "$OUT/gpu_tests.log" || status=1
for script in bench_attention bench_decode bench_ssc bench_scalable_scoring bench_integration bench_spectral; do
  if [ -f "benchmarks/$script.py" ]; then
    echo "== $script"
    python "benchmarks/$script.py" --out-dir "$OUT" "$@" 2>&1 | tee "$OUT/$script.log" || status=1
  fi
done
exit $status
