#!/usr/bin/env bash
# The 2026-11-26 second lease's one call (15 minutes of device time in all, start included):
# the gpu tests at this commit, the decode and paged benchmarks (their kernels changed in
# issue 51 after the last measurement, H100 2026-11-23/24), the spectral step on the device
# (dense eigh against the Chebyshev-filtered prototype; never run on a GPU), the gates'
# profile (torch profiler; nsys where present). Each step under its own cap.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 VIDEOANCHOR_GIT_SHA=${SHA:?}
R=$OUT
T0=$(date +%s)
el() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import torch,triton,numpy,scipy;print(torch.__version__,triton.__version__,numpy.__version__,scipy.__version__)"; nproc; command -v nsys ncu) 2>&1 | head -12
el tests
timeout 100 python3 -m pytest -q -m gpu tests -p no:cacheprovider -n 8 > $R/gpu_tests.log 2>&1
el "tests rc=$?"; grep -E "passed|failed|FAILED|Error" $R/gpu_tests.log | tail -12
el decode
timeout 110 python3 benchmarks/bench_decode.py --out-dir $R > $R/bench_decode.log 2>&1
el "decode rc=$?"; tail -25 $R/bench_decode.log
el paged
timeout 60 python3 benchmarks/bench_paged.py --out-dir $R > $R/bench_paged.log 2>&1
el "paged rc=$?"; tail -12 $R/bench_paged.log
el spectral
timeout 75 python3 benchmarks/bench_spectral.py --device cuda --no-ssc --sizes 1024,2048,4096 \
  --reps 5,5,3 --sklearn-max 0 --out-dir $R > $R/bench_spectral.log 2>&1
el "spectral rc=$?"; tail -22 $R/bench_spectral.log
el profile
mkdir -p $R/logs
timeout 50 python3 benchmarks/profile_gates.py --out $R/logs/profile_gates.txt > $R/profile_gates.log 2>&1
el "profile rc=$?"; tail -5 $R/profile_gates.log
el done
