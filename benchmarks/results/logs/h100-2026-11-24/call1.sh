#!/usr/bin/env bash
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 VIDEOANCHOR_GIT_SHA=4efd9fada85828426533be6dcb7802da280176c0 VIDEOANCHOR_YALEB=$PWD/.gpudata/YaleB_48_42.mat
R=/tmp/r; mkdir -p $R
T0=$(date +%s)
el() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
pack() { tar czf $OUT/call.tar.gz -C /tmp r; }
(nvidia-smi; python3 -c "import torch,triton,transformers,cupy,numpy;print(torch.__version__,triton.__version__,transformers.__version__,cupy.__version__,numpy.__version__)"; nproc) > $R/env.log 2>&1
el tests; timeout 190 python3 -m pytest -q -m gpu tests -p no:cacheprovider > $R/gpu_tests.log 2>&1; el "tests rc=$?"; tail -5 $R/gpu_tests.log; pack
el request_cost; timeout 230 python3 benchmarks/bench_request_cost.py --device cuda --parts cost,factor --cost-budget 150 --measure "Qwen2.5-VL-7B:16,64" --out-dir $R > $R/bench_request_cost.log 2>&1; el "rc=$?"; tail -25 $R/bench_request_cost.log; pack
el profile; timeout 90 python3 benchmarks/profile_ssc.py --n 2048 --solvers fast --top 12 > $R/profile_ssc_n2048.log 2>&1; el "rc=$?"; grep "==" $R/profile_ssc_n2048.log; pack
el done
