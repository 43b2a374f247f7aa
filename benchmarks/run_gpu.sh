#!/usr/bin/env bash
# One call on a GPU machine: the GPU tests, then every benchmark, JSON into $OUT (or
# benchmarks/results). Usage: OUT=/some/dir bash benchmarks/run_gpu.sh [--quick]
#
# The whole run takes well over ten minutes on an H100 (the first lease, 2026-11-23: the gpu
# tests 130 s, bench_request_cost's fidelity and sensitivity parts over 300 s, attention,
# decode and paged about 200 s together; the second, 2026-11-24: the tests 168 s with
# Triton's cache warm and over 190 s cold, fidelity 94 s, sensitivity --trials 5 39 s, the
# cost rows at 32 and 64 frames 396 s, most of it the faithful solver at 64 frames, which
# runs to its 10000-iteration cap; bench_request_cost.py --faithful-seconds caps it, its row
# then marked as lower bounds). Where one command is limited, split it:
#   STEPS="tests request_cost" ...   then   STEPS="attention decode paged" ...
# (names: tests, the bench_* names without "bench_", vllm, tune, tp); STEP_TIMEOUT=seconds
# bounds each step (a stopped bench_request_cost keeps the rows it finished). Also set
#   VIDEOANCHOR_GIT_SHA=<the commit you sent>  (a copied tree's .git can be stale)
#   VIDEOANCHOR_YALEB=<path to YaleB_48_42.mat>  (bench_request_cost's face data)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
STEPS="${STEPS:-tests attention decode paged backward ssc blocked integration spectral request_cost vllm tune tp}"
want() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
bounded() { if [ -n "${STEP_TIMEOUT:-}" ]; then timeout "$STEP_TIMEOUT" "$@"; else "$@"; fi; }
# Pure-Python dependencies the lent GPU machine lacks (no network there): carry their wheels
# (`pip download --no-deps array-api-compat accelerate -d wheels/`) and install them first.
for mod in array_api_compat accelerate; do
  python -c "import $mod" 2>/dev/null || {
    echo "missing Python package '$mod': pip install --no-deps wheels/<its wheel> first" >&2
    exit 2
  }
done
status=0
if want tests; then
  bounded python -m pytest -q -m gpu tests 2>&1 | tee "$OUT/gpu_tests.log" || status=1
fi
for script in bench_attention bench_decode bench_paged bench_backward bench_ssc bench_blocked bench_integration bench_spectral bench_request_cost; do
  if [ -f "benchmarks/$script.py" ] && want "${script#bench_}"; then
    echo "== $script"
    bounded python "benchmarks/$script.py" --out-dir "$OUT" "$@" 2>&1 | tee "$OUT/$script.log" || status=1
  fi
done
if want request_cost; then  # where the scores' time goes, by stage and operator
  bounded python benchmarks/profile_ssc.py --n 2048 2>&1 | tee "$OUT/profile_ssc.log" || status=1
  # 64 frames: the default (fp16x3) against FP32, where fp16x3 saved only 14% (2026-11-24)
  for p in auto full; do
    bounded python benchmarks/profile_ssc.py --n 8192 --solvers fast --precision $p 2>&1 \
      | tee "$OUT/profile_ssc_n8192_$p.log" || status=1
  done
fi
# vLLM serving, anchored (the plugin's CUDA backend) vs plain vLLM on the same settings.
# Needs a CUDA build of vllm 0.32 and a local Qwen2.5-VL-7B-Instruct checkpoint (no network
# on the GPU machine): VIDEOANCHOR_QWEN25VL_7B=/path/to/checkpoint. (The tests of the
# plugin on CUDA, tests/test_vllm_gpu.py, ran above with -m gpu, skipped without vllm.)
if ! want vllm; then
  :
elif ! python -c "import sys, vllm; from vllm.platforms import current_platform as p; sys.exit(not p.is_cuda())" 2>/dev/null; then
  echo "== bench_vllm skipped: needs a CUDA build of vllm 0.32 (pip install 'videoanchor[vllm]', or carry its wheels)"
elif [ -z "${VIDEOANCHOR_QWEN25VL_7B:-}" ]; then
  echo "== bench_vllm skipped: set VIDEOANCHOR_QWEN25VL_7B to a local Qwen2.5-VL-7B-Instruct checkpoint"
else
  echo "== bench_vllm (Qwen2.5-VL-7B, 16 frames, bf16)"
  python benchmarks/bench_vllm.py --model "$VIDEOANCHOR_QWEN25VL_7B" --frames 16 --size 336 \
    --requests 16 --max-tokens 64 --dtype bfloat16 --n-clusters 24 --out-dir "$OUT" \
    2>&1 | tee "$OUT/bench_vllm.log" || status=1
  # Tensor parallel 2: one rank per request (the default) against scores_ahead_split.
  if [ "$(python -c "import torch; print(torch.cuda.device_count())")" -ge 2 ]; then
    echo "== bench_vllm --tp 2 (one rank per request against the split)"
    python benchmarks/bench_vllm.py --model "$VIDEOANCHOR_QWEN25VL_7B" --frames 16 --size 336 \
      --requests 16 --max-tokens 64 --dtype bfloat16 --n-clusters 24 --tp 2 \
      --engines anchored,split --out-dir "$OUT" 2>&1 | tee "$OUT/bench_vllm_tp2.log" || status=1
  fi
fi
# tune's sweep vs the naive loop (the tiny model unless --model names a local checkpoint)
if want tune; then
  echo "== bench_tune"
  bounded python benchmarks/bench_tune.py --device cuda --out-dir "$OUT" "$@" 2>&1 | tee "$OUT/bench_tune.log" || status=1
fi
# Tensor parallelism: one torchrun per world size, on as many GPUs as there are (at least 2).
ngpu=$(python -c "import torch; print(torch.cuda.device_count())")
if ! want tp; then
  :
elif [ "$ngpu" -lt 2 ]; then
  echo "== bench_tp skipped: needs at least 2 GPUs, found $ngpu"
elif ! python -c "import accelerate" 2>/dev/null; then
  echo "== bench_tp skipped: transformers needs accelerate for tp_plan; install or carry its wheel"
  status=1
else
  for n in 1 2 4; do
    [ "$n" -le "$ngpu" ] || continue
    echo "== bench_tp (nproc_per_node $n)"
    python -m torch.distributed.run --standalone --nproc_per_node "$n" benchmarks/bench_tp.py \
      --out-dir "$OUT" "$@" 2>&1 | tee "$OUT/bench_tp_$n.log" || status=1
    # One request's fast SSC split over the ranks against one GPU (8 to 64 frames).
    if [ "$n" -gt 1 ]; then
      python -m torch.distributed.run --standalone --nproc_per_node "$n" benchmarks/bench_split.py \
        --out-dir "$OUT" "$@" 2>&1 | tee "$OUT/bench_split_$n.log" || status=1
    fi
    # The blocked solver spread over the ranks (what long videos take), at the same sizes.
    python -m torch.distributed.run --standalone --nproc_per_node "$n" benchmarks/bench_tp.py \
      --force-blocked --out-dir "$OUT" "$@" 2>&1 | tee "$OUT/bench_tp_blocked_$n.log" || status=1
  done
fi
exit $status
