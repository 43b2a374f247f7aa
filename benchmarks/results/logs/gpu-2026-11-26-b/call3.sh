#!/usr/bin/env bash
# The lease's third call: the gpu tests at this commit (the sparse path's Chebyshev solver
# and its test new), the sparse spectral step on the device (Chebyshev against the block
# Krylov solver), and the 16-frame cost row again with each configuration's warnings
# recorded (call 2 saw the Chebyshev solver fall back to eigh in some of them).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 VIDEOANCHOR_GIT_SHA=${SHA:?}
R=$OUT
T0=$(date +%s)
el() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
el tests
timeout 100 python3 -m pytest -q -m gpu tests -p no:cacheprovider -n 8 > $R/gpu_tests.log 2>&1
el "tests rc=$?"; grep -E "passed|failed|FAILED|Error" $R/gpu_tests.log | tail -8
el sparse_spectral
timeout 100 python3 benchmarks/bench_sparse_spectral.py --device cuda --frames "" --sizes 1024,2048,4096,8192 \
  --reps 3,3,2,1 --out-dir $R > $R/bench_sparse_spectral.log 2>&1
el "sparse_spectral rc=$?"; tail -22 $R/bench_sparse_spectral.log
el request_cost_16
mkdir -p $R/rc16
timeout 90 python3 benchmarks/bench_request_cost.py --device cuda --parts cost --cost-budget 60 \
  --faithful-seconds 5 --measure "Qwen2.5-VL-7B:16" --out-dir $R/rc16 > $R/bench_request_cost_16.log 2>&1
el "request_cost_16 rc=$?"
python3 -c "
import json; d=json.load(open('$R/rc16/request_cost_cost_nvidia-h200.json'))
r=[r for r in d['rows'] if 'seconds_ssc_default' in r][0]
print(r['n'], r['seconds_ssc_default'], r['stages_default']); print(json.dumps(r['runtime_warnings'], indent=1))"
el done
