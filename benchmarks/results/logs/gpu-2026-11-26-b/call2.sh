#!/usr/bin/env bash
# The lease's second call: the spectral step with the package's Chebyshev solver (what
# "auto" now runs on a GPU above 1024 tokens), its gpu test, the scores' cost against the
# prefill at 16, 32 and 64 frames with it, and where the fast solver's call goes at 2048.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 VIDEOANCHOR_GIT_SHA=${SHA:?}
R=$OUT
T0=$(date +%s)
el() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
el tests
timeout 60 python3 -m pytest -q -m gpu tests/test_spectral.py -p no:cacheprovider > $R/gpu_tests_spectral.log 2>&1
el "tests rc=$?"; grep -E "passed|failed|FAILED|Error" $R/gpu_tests_spectral.log | tail -6
el spectral
timeout 120 python3 benchmarks/bench_spectral.py --device cuda --no-ssc --sizes 1024,2048,4096,8192 \
  --reps 5,5,3,2 --sklearn-max 0 --out-dir $R > $R/bench_spectral.log 2>&1
el "spectral rc=$?"; grep -E "ours|cheb" $R/bench_spectral.log | tail -24
el request_cost
timeout 200 python3 benchmarks/bench_request_cost.py --device cuda --parts cost --cost-budget 150 \
  --faithful-seconds 10 --measure "Qwen2.5-VL-7B:16,32,64" --out-dir $R > $R/bench_request_cost.log 2>&1
el "request_cost rc=$?"; tail -14 $R/bench_request_cost.log
el profile_ssc
timeout 40 python3 benchmarks/profile_ssc.py --n 2048 --solvers fast --top 12 > $R/profile_ssc_n2048.log 2>&1
el "profile_ssc rc=$?"; grep "==" $R/profile_ssc_n2048.log
el done
