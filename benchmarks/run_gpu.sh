#!/usr/bin/env bash
# One call on a GPU machine: the GPU tests, then every benchmark, JSON into $OUT (or
# benchmarks/results). Usage: OUT=/some/dir bash benchmarks/run_gpu.sh [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
# Pure-Python dependencies the lent GPU machine lacks (no network there): carry their wheels
# (`pip download --no-deps array-api-compat accelerate -d wheels/`) and install them first.
for mod in array_api_compat accelerate; do
  python -c "import $mod" 2>/dev/null || {
    echo "missing Python package '$mod': pip install --no-deps wheels/<its wheel> first" >&2
    exit 2
  }
done
status=0
python -m pytest -q -m gpu tests 2>&1 | tee "$OUT/gpu_tests.log" || status=1
for script in bench_attention bench_decode bench_paged bench_backward bench_ssc bench_blocked bench_integration bench_spectral bench_request_cost; do
  if [ -f "benchmarks/$script.py" ]; then
    echo "== $script"
    python "benchmarks/$script.py" --out-dir "$OUT" "$@" 2>&1 | tee "$OUT/$script.log" || status=1
  fi
done
# vLLM serving, anchored (the plugin's CUDA backend) vs plain vLLM on the same settings.
# Needs a CUDA build of vllm 0.32 and a local Qwen2.5-VL-7B-Instruct checkpoint (no network
# on the GPU machine): VIDEOANCHOR_QWEN25VL_7B=/path/to/checkpoint. (The tests of the
# plugin on CUDA, tests/test_vllm_gpu.py, ran above with -m gpu, skipped without vllm.)
if ! python -c "import sys, vllm; from vllm.platforms import current_platform as p; sys.exit(not p.is_cuda())" 2>/dev/null; then
  echo "== bench_vllm skipped: needs a CUDA build of vllm 0.32 (pip install 'videoanchor[vllm]', or carry its wheels)"
elif [ -z "${VIDEOANCHOR_QWEN25VL_7B:-}" ]; then
  echo "== bench_vllm skipped: set VIDEOANCHOR_QWEN25VL_7B to a local Qwen2.5-VL-7B-Instruct checkpoint"
else
  echo "== bench_vllm (Qwen2.5-VL-7B, 16 frames, bf16)"
  python benchmarks/bench_vllm.py --model "$VIDEOANCHOR_QWEN25VL_7B" --frames 16 --size 336 \
    --requests 16 --max-tokens 64 --dtype bfloat16 --n-clusters 24 --out-dir "$OUT" \
    2>&1 | tee "$OUT/bench_vllm.log" || status=1
fi
# tune's sweep vs the naive loop (the tiny model unless --model names a local checkpoint)
echo "== bench_tune"
python benchmarks/bench_tune.py --device cuda --out-dir "$OUT" "$@" 2>&1 | tee "$OUT/bench_tune.log" || status=1
# Tensor parallelism: one torchrun per world size, on as many GPUs as there are (at least 2).
ngpu=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$ngpu" -lt 2 ]; then
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
    # The blocked solver spread over the ranks (what long videos take), at the same sizes.
    python -m torch.distributed.run --standalone --nproc_per_node "$n" benchmarks/bench_tp.py \
      --force-blocked --out-dir "$OUT" "$@" 2>&1 | tee "$OUT/bench_tp_blocked_$n.log" || status=1
  done
fi
exit $status
