#!/usr/bin/env bash
# The lease's fourth call, after the Chebyshev solver's stall rule (afa90f5): the spectral
# tests on the device, the dense spectral step again (N = 2048-8192), and the 16-frame cost
# row with each configuration's warnings (call 3: TF32's spectral step ran 30 steps, then eigh).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 VIDEOANCHOR_GIT_SHA=${SHA:?}
R=$OUT
T0=$(date +%s)
el() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
el tests
timeout 60 python3 -m pytest -q -m gpu tests/test_spectral.py tests/test_sparse_spectral.py -p no:cacheprovider > $R/gpu_tests_spectral.log 2>&1
el "tests rc=$?"; grep -E "passed|failed|FAILED|Error" $R/gpu_tests_spectral.log | tail -6
el spectral
timeout 90 python3 benchmarks/bench_spectral.py --device cuda --no-ssc --sizes 1024,2048,4096,8192 \
  --reps 5,5,3,2 --sklearn-max 0 --out-dir $R > $R/bench_spectral.log 2>&1
el "spectral rc=$?"; grep -E "cheb|ours_eigh" $R/bench_spectral.log | tail -16
el request_cost_16
mkdir -p $R/rc16
timeout 70 python3 benchmarks/bench_request_cost.py --device cuda --parts cost --cost-budget 50 \
  --faithful-seconds 5 --measure "Qwen2.5-VL-7B:16" --out-dir $R/rc16 > $R/bench_request_cost_16.log 2>&1
el "request_cost_16 rc=$?"
python3 -c "
import json; d=json.load(open('$R/rc16/request_cost_cost_nvidia-h200.json'))
r=[r for r in d['rows'] if 'seconds_ssc_default' in r][0]
print(r['n'], r['seconds_ssc_default'], r['seconds_ssc_fast_tf32'], r['stages_default']); print(json.dumps(r['runtime_warnings'], indent=1))"
el done
