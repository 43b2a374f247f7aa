#!/usr/bin/env bash
# The 2026-11-26 lease's one call (15 minutes of device time in all): the gpu tests (the
# kernels' issue-51 changes had not run on a GPU), the scores' cost against the prefill at
# 16, 32 and 64 frames (issue 52), the sparse spectral step on the device, the attention
# benchmark, and where the fast solver's time goes at N = 2048. Each step under its own cap.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 VIDEOANCHOR_GIT_SHA=${SHA:?}
R=$OUT
T0=$(date +%s)
el() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
(nvidia-smi; python3 -c "import torch,triton,transformers,numpy,sklearn,numba;print(torch.__version__,triton.__version__,transformers.__version__,numpy.__version__,sklearn.__version__,numba.__version__)"; nproc) 2>&1 | head -40
el tests
timeout 170 python3 -m pytest -q -m gpu tests -p no:cacheprovider -n 8 --durations=15 > $R/gpu_tests.log 2>&1
el "tests rc=$?"; grep -E "passed|failed|FAILED|Error" $R/gpu_tests.log | tail -20
el request_cost
timeout 150 python3 benchmarks/bench_request_cost.py --device cuda --parts cost --cost-budget 120 \
  --faithful-seconds 20 --measure "Qwen2.5-VL-7B:16,32,64" --out-dir $R > $R/bench_request_cost.log 2>&1
el "request_cost rc=$?"; tail -12 $R/bench_request_cost.log
el sparse_spectral
timeout 40 python3 benchmarks/bench_sparse_spectral.py --device cuda --frames "" --sizes 1024,2048,4096 \
  --reps 3,3,2 --out-dir $R > $R/bench_sparse_spectral.log 2>&1
el "sparse_spectral rc=$?"; tail -8 $R/bench_sparse_spectral.log
el attention
timeout 110 python3 benchmarks/bench_attention.py --out-dir $R > $R/bench_attention.log 2>&1
el "attention rc=$?"; tail -14 $R/bench_attention.log
el profile_ssc
timeout 40 python3 benchmarks/profile_ssc.py --n 2048 --solvers fast --top 12 > $R/profile_ssc_n2048.log 2>&1
el "profile_ssc rc=$?"; grep "==" $R/profile_ssc_n2048.log
el done
