#!/usr/bin/env bash
# The lease's second call: the gpu tests of test_ssc.py after b7016ca's fix, the sparse
# spectral step on the device (its benchmark broke on CUDA in call 1), and the request
# cost's fidelity and sensitivity parts on CUDA (fp16x3 against the faithful solver).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 VIDEOANCHOR_GIT_SHA=${SHA:?}
R=$OUT
T0=$(date +%s)
el() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
el tests
timeout 90 python3 -m pytest -q -m gpu tests/test_ssc.py -p no:cacheprovider -n 4 > $R/gpu_tests_ssc.log 2>&1
el "tests rc=$?"; grep -E "passed|failed|FAILED|Error" $R/gpu_tests_ssc.log | tail -8
el sparse_spectral
timeout 70 python3 benchmarks/bench_sparse_spectral.py --device cuda --frames "" --sizes 1024,2048,4096,8192 \
  --reps 3,3,2,1 --out-dir $R > $R/bench_sparse_spectral.log 2>&1
el "sparse_spectral rc=$?"; tail -16 $R/bench_sparse_spectral.log
el fidelity
timeout 160 python3 benchmarks/bench_request_cost.py --device cuda --parts fidelity,sensitivity --trials 5 \
  --out-dir $R > $R/bench_request_cost_fidelity.log 2>&1
el "fidelity rc=$?"; tail -40 $R/bench_request_cost_fidelity.log
el done
