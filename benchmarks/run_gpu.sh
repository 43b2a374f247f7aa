#!/usr/bin/env bash
# A GPU lease's runs: the `gpu` tests, the profile of the gates (issue 51) and every
# benchmark, JSON into $OUT (or benchmarks/results). A lease's command is limited to ten
# minutes: the profile and the benchmarks take two calls, the tests one of their own.
#
#   OUT=/some/dir CALL=1 bash benchmarks/run_gpu.sh      # profile, attention, decode, paged,
#                                                        # the sparse spectral step,
#                                                        # the per-column working sets
#   OUT=/some/dir CALL=2 bash benchmarks/run_gpu.sh      # the scores' benchmarks, backward,
#                                                        # ssc, blocked, integration, tune
#   OUT=/some/dir CALL=tests bash benchmarks/run_gpu.sh  # pytest -m gpu tests
#   OUT=/some/dir CALL=hopper bash benchmarks/run_gpu.sh # issue 77's Hopper loop (< 8 min,
#                                                        # sm_90): bench_attention --hopper,
#                                                        # the Hopper loop against the pointer
#                                                        # loop, plain and SDPA flash at 8k-32k,
#                                                        # then the ncu of the prefill at 16k
#   OUT=/some/dir CALL=ssc bash benchmarks/run_gpu.sh    # issue 76 in one call (< 8 min): the
#                                                        # gpu tests, the default scores at
#                                                        # 16/32/64 frames beside the prefill
#                                                        # and on the dense set, the cost rows
#                                                        # at 16 frames, one ncu of the
#                                                        # working-set kernel
#   OUT=/some/dir CALL=workset bash benchmarks/run_gpu.sh  # issue 90 in one call (< 8 min):
#                                                        # the scores' gpu tests, the default
#                                                        # scores' stages at 16/32/64 frames
#                                                        # of both shapes beside the prefill,
#                                                        # the dense set and Yale B, the
#                                                        # throughput loss beside decode-like
#                                                        # work, one ncu of the column kernel
#   OUT=/some/dir CALL=request bash benchmarks/run_gpu.sh  # issue 92 (< 8 min): the whole
#                                                        # request (generate on the 7B model,
#                                                        # 16 and 64 frames, 16 and 256 new
#                                                        # tokens), decode's CUDA-graph rows
#                                                        # (batch 1-64, 8k-128k), paged
#   OUT=/some/dir CALL=first bash benchmarks/run_gpu.sh  # issue 98: a lease's first command
#                                                        # (< 8 min), in this order: the scores'
#                                                        # gpu tests (counts in gpu_tests_*.json),
#                                                        # the default at 16 and 64 frames of
#                                                        # Qwen2.5-VL-7B (k = 24) beside the
#                                                        # prefill with the certified gap, the
#                                                        # throughput loss at 16 frames, one
#                                                        # anchored generate against plain
#                                                        # (16 frames, 256 new tokens)
#   OUT=/some/dir CALL=rest bash benchmarks/run_gpu.sh   # issue 98's second (< 8 min): issue
#                                                        # 92's gates (bench_attention --hopper),
#                                                        # decode under CUDA graphs, paged, the
#                                                        # default at 16/32/64 frames of both
#                                                        # shapes (InternVL2-8B, the dense set,
#                                                        # Yale B, the shares' cost), the request
#                                                        # at 64 frames (all three providers),
#                                                        # the static compiles under this
#                                                        # machine's Triton
#   OUT=/some/dir CALL=long bash benchmarks/run_gpu.sh   # issue 99 item 4 (< 8 min): long videos
#                                                        # on the device, 64, 128 and 256 frames
#                                                        # (bench_long_video.py --device cuda)
#   DRY_RUN=1 CALL=first bash benchmarks/run_gpu.sh      # the plan alone, run nowhere: each
#                                                        # step's cap, its latest start (the caps
#                                                        # before it summed) and its command
#
# Each step runs under its own cap in seconds (the number after its name below), and never
# past the call's budget, CALL_BUDGET (default 560 s from the start): a call ends within
# ten minutes whatever a step does, and a step that would start with less than 15 s left
# is skipped and named. A stopped step keeps the JSON it already wrote (bench_request_cost
# writes its rows as they finish; the others at their end). The caps come from the two
# H100 leases (benchmarks/results/logs/h100-2026-11-2*; decode and paged from the second
# 2026-11-26 H200 lease: 42 s and 17 s, logs/gpu-2026-11-26-b): the gpu tests took 168 s with
# Triton's cache warm and over 190 s cold; attention, decode and paged about 200 s
# together; request_cost's fidelity 94 s, sensitivity (5 trials) 39 s, the 16-frame cost
# row within its budget. The profile, backward, blocked, integration, ssc and tune have not
# run to completion on a GPU yet (ESTIMATED caps): they run --quick (or small sizes).
# workset_cuda: the H100 of 2026-11-27 took 0.88 / 3.9 / 16.8 s for the default at 16 / 32
# / 64 frames (logs/h100-2026-11-27) and the gpu tests 55 s in 8 processes; CALL=ssc's caps
# are sized on those (its InternVL2-8B rows past the budget are written as not run).
#
# CALL=workset (issue 90; ESTIMATED caps, not run on a GPU yet): its tests step runs only the
# scores' gpu tests (SCORES_TESTS below; the Triton column kernel's cold compile in a
# subprocess); workset_cuda as CALL=ssc's; scores_beside (bench_scores_beside.py: 16 and 64
# frames, 3 pairs of windows of at least 1 s and 3.5 calls of the scores: at the targets'
# 16 ms / 0.42 s a call about 8 + 14 s, at the H100's 0.25 / 2.7 s of 2026-11-27 about 9 s
# and 27 s a pair at 64 frames (then 1 pair fits); a pair that would end past 4/5 of the cap
# is not run); workset_ncu as CALL=ssc's.
# CALL=first (issue 98; < 8 min on an H100 or H200, CALL_BUDGET 470 s by default, the caps
# summing to 460 s; no checkpoint needed: the models are random-weight, built in the step):
# tests:110, the scores' gpu tests only (SCORES_TESTS, 8 processes where pytest-xdist is),
#   their counts in $OUT/gpu_tests_<device>.json (benchmarks/pytest_counts.py, rewritten
#   after each test: a stopped run keeps its counts, "finished": false). ESTIMATED: every gpu
#   test of the suite (70) took 66.7 s in 8 processes on the H100 of 2026-11-28 (logs/
#   h100-2026-11-28/gpu_tests.log) and 65 s with a cold Triton cache on the H200 of
#   2026-11-26; the scores' files alone, with the route's cold compiles (warm_up's, in a
#   subprocess), have not run on a GPU.
# workset_cuda:140, 16 and 64 frames of Qwen2.5-VL-7B (n_clusters 24, the paper's), each
#   size's first call timed apart from a warm one, beside the prefill (random-weight decoder
#   layers, bench_request_cost.prefill_seconds, same process), the route's certificate gap
#   and at 16 frames the objective gap to the CPU's float64 minimiser; no dense or share-cost
#   rows (CALL=rest). Each row rewritten as its stages end. ESTIMATED from the H100 of
#   2026-11-28 (logs/h100-2026-11-28/run_gpu_a.log: 106 s for every row of both shapes with
#   the share cost; warm_up 4.3 s, the CPU minimiser 8.7 s, the default 0.25 / 2.7 s at 16 /
#   64 frames, the prefill 0.16 / 1.7 s): about 60 s at that route's pace; the cap leaves room
#   for the new route's cold compiles and a 64-frame call of up to about 15 s (2026-11-27's
#   kernel: 16.8 s, logs/h100-2026-11-27).
# scores_beside:60, the throughput loss at 16 frames only (3 pairs; a pair that would end past
#   4/5 of the cap is not run). ESTIMATED: at a 0.25 s call a pair is about 3 s (two windows
#   of 1 s and 3 calls alone), plus sizing the plain work and the imports.
# request:150, bench_request at 16 frames, plain and anchored (256 new tokens; the 16th token's
#   row is the same request), 3 rounds, the rows rewritten after each round. ESTIMATED (no
#   bench_request run on a GPU yet): the 7B model built (~20 s), a warm-up request each (the
#   anchored one compiles the attention kernels), 6 requests of ~7 s (HF generate at ~25 ms a
#   token).
# CALL=rest (issue 98's everything else; < 8 min, CALL_BUDGET 470 s, caps summing to 460 s):
# hopper:60 (the whole CALL=hopper, the bench and two ncu runs, took 74 s on the H100 of
# 2026-11-28: logs/h100-2026-11-28/run_gpu_hopper.log), decode:100 (--graph; ESTIMATED: the
# eager rows took 42 s on the H200, logs/gpu-2026-11-26-b), paged:25 (17 s there),
# workset_cuda:100 (both shapes at 16/32/64 frames, the dense set, Yale B, the shares' cost,
# no yardstick: 106 s with it at 5851f44; rows past 2/3 of the cap written as not run),
# request:130 (64 frames, the three providers; ESTIMATED) and static:45 (ESTIMATED: the
# column kernel's levels and the pass kernels compiled for sm_90 by this machine's Triton).
# Static checks: the `static` step compiles ahead of time with the Triton installed where it
# runs: the lent machines have Triton 3.6.0 (column_kernel_triton36_static.json,
# workset_cuda_pass_kernels_sm90_triton36_cpu.json). The Triton 3.9 half is a CPU-side job
# (no GPU needed): `TRITON_INTERPRET=0 python benchmarks/bench_column_kernel.py --static
# 90,80` and `... bench_workset_cuda.py --static 90` on the CPU machine (triton 3.9.0), and
# tests/test_column_kernel.py::test_levels_compile_within_the_register_target there.
# CALL=long (issue 99 item 4; ESTIMATED cap, not run on a GPU yet): video-like tokens
# (8 x 16 patches a frame, D = 512, as the CPU's long_video_curve) made on the device, each
# run in a process of its own stopped at 150 s: the default at 64 and 128 frames (the CUDA
# working sets; exact mode holds G at 16k on an H100 or H200), the working sets by blocks
# (mode="blocked", solver="workset": their solves on the host's cores) at 64, 128 and 256
# frames. The default past the limit on CUDA is the authors' iteration column-blocked (about a
# thousand iterations to reach eps: not run here). The rows are written as each run ends, so a stopped step
# keeps them (long_video_gpu_<device>.json).
# DRY_RUN=1: no step runs and no package is checked; each step prints its cap, its latest
# start (the caps before it, summed, as if each ran to its cap) and its command.
# CALL=hopper's knob: HOPPER_DTYPE (bfloat16; float16 times the fp16 fast form instead).
# workset_cuda's own knobs: WORKSET_CUDA_FRAMES (16,32,64), WORKSET_CUDA_MODELS (both shapes)
# and WORKSET_CUDA_SWEEP (GROW:TILE pairs, e.g. 16:512,64:512: the working sets alone at each;
# passed only when set, to a bench_workset_cuda.py that still has --sweep).
# workset_ncu's: WORKSET_NCU_KERNEL (the kernel's name, a regex: issue 90's _column_kernel;
# issue 76's _columns_kernel with WORKSET_NCU_SKIP=22 on a tree that still runs it),
# WORKSET_NCU_SKIP (launches skipped: warm_up's two a level of slots, then the solve's first
# pass) and WORKSET_NCU_COUNT (2).
# Other forms: STEPS="name ..." runs the named steps only (names: tests profile nsys ncu
# attention decode paged sparse_spectral request_cost profile_ssc workset_cuda workset_ncu hopper
# request scores_beside spectral backward
# ssc blocked integration
# scores tune vllm tp static; tp runs bench_tp and bench_split); no CALL runs every step in one
# call (more than ten minutes); STEP_TIMEOUT=seconds lowers every cap; an argument --quick
# passes --quick to the kernel benchmarks, request_cost and tp. Also set
#   VIDEOANCHOR_GIT_SHA=<the commit you sent>  (a copied tree's .git can be stale)
#   VIDEOANCHOR_YALEB=<path to YaleB_48_42.mat>  (the face data of bench_request_cost and of
#     bench_workset_cuda's Yale B dense rows; the device machine has no ../shared: copy the
#     file into a folder that .git/info/exclude ignores, name it in the call's carry, and
#     point this at it; without it those rows say "Yale B not found")
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
QUICK=()
[ "${1:-}" = "--quick" ] && QUICK=(--quick)
TESTS="tests:560"
SSC="tests:150 workset_cuda:210 request_cost:50 workset_ncu:60"
# ESTIMATED caps (not run on a GPU yet): 5 providers x 3 lengths with cold compiles; ncu as
# in CALL=1.
HOPPER="hopper:300 ncu:150"
# ESTIMATED caps (header): the scores' gpu tests, workset_cuda, the throughput loss, one ncu
WORKSET="tests:120 workset_cuda:200 scores_beside:75 workset_ncu:60"
#: CALL=workset's tests: the anchor scores' files (those with no gpu test select nothing)
SCORES_TESTS="workset_cuda column_kernel pass_counts filter_graphs certificate_gram fast_solver
  admm products ssc spectral sparse_spectral"
# ESTIMATED caps (not run on a GPU yet). request: the 7B model built (~20 s), per frame count
# a warm-up of each provider then 3 rounds of 3 requests of 256 tokens (HF generate at ~25
# ms a token: ~7 s a request), plus the default scores (H100: 0.9 s at 16 frames, 17 s at 64,
# logs/h100-2026-11-27): ~110 s at 16 frames, ~150 s at 64; 64 frames starts only within
# half the cap. decode --graph: 9 shapes x 5 providers, eager and graph (B 64 x 128k: a
# 16 GiB cache). paged: as in CALL1.
REQUEST="request:290 decode:120 paged:30"
# Issue 98's two calls (header: the caps' sizes and their sources), steps in this order
FIRST="tests:110 workset_cuda:140 scores_beside:60 request:150"
LONG="long_video:440"
REST="hopper:60 decode:100 paged:25 workset_cuda:100 request:130 static:45"
CALL1="profile:50 nsys:60 ncu:60 attention:150 decode:70 paged:30 sparse_spectral:40 workset_cuda:90"
CALL2="request_cost:240 profile_ssc:30 spectral:60 backward:40 ssc:40 blocked:40 integration:50 scores:30 tune:30 vllm:0 tp:0"
case "${CALL:-}" in
  1) PLAN="$CALL1" ;;
  2) PLAN="$CALL2" ;;
  tests) PLAN="$TESTS" ;;
  ssc) PLAN="$SSC" ;;
  workset) PLAN="$WORKSET" ;;
  hopper) PLAN="$HOPPER" ;;
  request) PLAN="$REQUEST" ;;
  first) PLAN="$FIRST" ;;
  rest) PLAN="$REST" ;;
  long) PLAN="$LONG" ;;
  *) PLAN="$TESTS $CALL1 $CALL2" ;;
esac
STEPS="${STEPS:-$(for s in $PLAN; do printf '%s ' "${s%%:*}"; done)}"
BUDGET="${CALL_BUDGET:-560}"
case "${CALL:-}" in first | rest | long) BUDGET="${CALL_BUDGET:-470}" ;; esac
START=$(date +%s)
DRY_T=0  # DRY_RUN: the latest start of the next step (the caps before it, summed)
want() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
cap_of() { for s in $PLAN; do [ "${s%%:*}" = "$1" ] && { echo "${s##*:}"; return; }; done; echo 60; }
# step NAME LOG CMD...: run CMD under the step's cap, the budget left and STEP_TIMEOUT.
step() {
  local name=$1 log=$2 cap left
  shift 2
  cap=$(cap_of "$name")
  [ "$cap" -gt 0 ] || cap=$BUDGET
  left=$((BUDGET - ($(date +%s) - START)))
  [ -n "${DRY_RUN:-}" ] && left=$((BUDGET - DRY_T))
  [ "$left" -lt "$cap" ] && cap=$left
  [ -n "${STEP_TIMEOUT:-}" ] && [ "$STEP_TIMEOUT" -lt "$cap" ] && cap=$STEP_TIMEOUT
  if [ "$cap" -lt 15 ] && [ -z "${STEP_TIMEOUT:-}" ]; then
    echo "== $name skipped: ${left}s left of the call's ${BUDGET}s"
    return 0
  fi
  if [ -n "${DRY_RUN:-}" ]; then
    echo "== $name (at most ${cap}s, from ${DRY_T}s at the latest): $*"
    DRY_T=$((DRY_T + cap))
    return 0
  fi
  echo "== $name (at most ${cap}s)"
  timeout "$cap" "$@" 2>&1 | tee "$OUT/$log" || { echo "== $name: exit $? (124: stopped at ${cap}s)"; status=1; }
}
# Pure-Python dependencies the lent GPU machine lacks (no network there): carry their wheels
# (`pip download --no-deps array-api-compat accelerate -d wheels/`) and install them first.
for mod in array_api_compat accelerate; do
  [ -n "${DRY_RUN:-}" ] && break
  python -c "import $mod" 2>/dev/null || {
    echo "missing Python package '$mod': pip install --no-deps wheels/<its wheel> first" >&2
    exit 2
  }
done
status=0
if want tests; then  # in 8 processes where pytest-xdist is there: Triton compiles in parallel
  # (the 2026-11-26 H200 lease: 65 s with a cold cache, against over 190 s in one process)
  XDIST=()
  python -c "import xdist" 2>/dev/null && XDIST=(-n 8)
  FILES=(tests)
  case "${CALL:-}" in workset | first)  # the scores' files alone (those in this tree)
    FILES=()
    for t in $SCORES_TESTS; do [ -f "tests/test_$t.py" ] && FILES+=("tests/test_$t.py"); done
  esac
  # the counts into $OUT/gpu_tests_<device>.json as each test ends (benchmarks/pytest_counts.py)
  step tests gpu_tests.log python -m pytest -q -m gpu "${FILES[@]}" --durations=20 "${XDIST[@]}" \
    -p benchmarks.pytest_counts --counts-json "$OUT"
fi
# Issue 51: where a gated call's time goes. The torch profiler's per-call summary always;
# nsys (launches, host gaps, synchronisations) and ncu (the prefill kernel at 16k, anchored
# against plain) where the machine has them. Text summaries under $OUT/logs.
if want profile; then
  mkdir -p "$OUT/logs"
  step profile logs/profile_gates.log python benchmarks/profile_gates.py \
    --out "$OUT/logs/profile_gates.txt"
fi
if want nsys && ! command -v nsys >/dev/null; then
  echo "== nsys not found: logs/profile_gates.txt (torch profiler) stands in for it"
elif want nsys; then
  mkdir -p "$OUT/logs"
  step nsys logs/nsys_gates.log nsys profile --capture-range=cudaProfilerApi \
    --trace=cuda,nvtx,osrt --sample=none --force-overwrite=true -o "$OUT/logs/gates" \
    python benchmarks/profile_gates.py --calls 10 --no-summary
  nsys stats --report cuda_api_sum --report cuda_gpu_kern_sum --report nvtx_sum \
    --format column --output - "$OUT/logs/gates.nsys-rep" > "$OUT/logs/nsys_gates.txt" 2>&1
fi
if want ncu && ! command -v ncu >/dev/null; then
  echo "== ncu not found: no kernel profile"
elif want ncu; then
  # Selected by kernel name and launch order (an --nvtx-include with "/" in it reads each "/"
  # as a nested range and profiled nothing): profile_gates.py runs each case WARMUP = 3 times
  # first. Prefill at 16k: 2 cases x 3 warm-ups, then anchored (prepared gates, fast form)
  # and plain. Decode split kernel at 8k cached tokens: 4 cases x 3 (SDPA's kernels do not
  # match), then prepared, given, plain. Text exports and their summary under $OUT/logs.
  mkdir -p "$OUT/logs"
  NCU_SECTIONS=(--section SpeedOfLight --section Occupancy --section LaunchStats
    --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis
    --section MemoryWorkloadAnalysis --section InstructionStats --force-overwrite)
  step ncu logs/ncu_prefill16k.log ncu --kernel-name regex:_anchored_prefill_kernel \
    --launch-skip 6 --launch-count 2 "${NCU_SECTIONS[@]}" -o "$OUT/logs/ncu_prefill16k" \
    python benchmarks/profile_gates.py --cases ncu --S 16384
  step ncu logs/ncu_decode8k.log ncu --kernel-name regex:_anchored_decode_split_kernel \
    --launch-skip 9 --launch-count 3 "${NCU_SECTIONS[@]}" -o "$OUT/logs/ncu_decode8k" \
    python benchmarks/profile_gates.py --cases decode --cache 8192 --calls 1 --no-summary
  for rep in ncu_prefill16k ncu_decode8k; do
    [ -f "$OUT/logs/$rep.ncu-rep" ] && ncu --import "$OUT/logs/$rep.ncu-rep" --page details \
      > "$OUT/logs/$rep.txt" 2>&1
  done
  python benchmarks/profile_gates.py \
    --ncu-summary "$OUT/logs/ncu_prefill16k.txt:anchored_prepared,plain" \
    --ncu-summary "$OUT/logs/ncu_decode8k.txt:prepared,given,plain" \
    > "$OUT/logs/ncu_summary.txt" 2>&1
  cat "$OUT/logs/ncu_summary.txt"
fi
if want hopper; then  # issue 77: the Hopper loop (TMA) beside the pointer loop, same process
  # HOPPER_DTYPE=float16: the same in fp16 (issue 92: the fast form's fp16 row sum on the
  # tensor cores; attention_hopper_fp16_<device>.json)
  step hopper bench_attention_hopper.log python benchmarks/bench_attention.py --hopper \
    --dtype "${HOPPER_DTYPE:-bfloat16}" --out-dir "$OUT"
fi
for script in bench_attention bench_decode bench_paged; do
  EXTRA=()
  # CALL=request and rest: decode's CUDA-graph rows alone (batch 1-64, 8k-128k;
  # decode_graph_*.json)
  [ "$script" = bench_decode ] && case "${CALL:-}" in request | rest) EXTRA=(--graph) ;; esac
  if want "${script#bench_}"; then
    step "${script#bench_}" "$script.log" python "benchmarks/$script.py" --out-dir "$OUT" \
      "${EXTRA[@]}" "${QUICK[@]}"
  fi
done
if want request_cost && [ "${CALL:-}" = ssc ]; then
  # the cost rows at 16 frames only (the dense set: the default against the fast solver)
  step request_cost bench_request_cost.log python benchmarks/bench_request_cost.py \
    --parts cost --measure "Qwen2.5-VL-7B:16" --faithful-seconds 5 --cost-budget 30 \
    --out-dir "$OUT"
elif want request_cost; then
  # fidelity and sensitivity (5 trials) on every set, then the cost rows of 16 and 32 frames
  # (the faithful solver stopped at 30 s: its row's faithful figures then lower bounds)
  step request_cost bench_request_cost.log python benchmarks/bench_request_cost.py \
    --parts fidelity,sensitivity,cost --trials 5 --measure "Qwen2.5-VL-7B:16,32" \
    --faithful-seconds 30 --cost-budget 100 --out-dir "$OUT" "${QUICK[@]}"
fi
if want profile_ssc; then  # where the scores' time goes, by stage and operator
  step profile_ssc profile_ssc.log python benchmarks/profile_ssc.py --n 2048 --solvers fast
fi
if want workset_cuda; then  # the default beside the prefill, the yardstick at 16 frames, the
  # dense sets (synthetic, Yale B's faces where VIDEOANCHOR_YALEB is); rows that would start
  # past 2/3 of the step's cap are written as not run
  SWEEP=()  # (--sweep only where asked for: issue 90's bench_workset_cuda has none)
  [ -n "${WORKSET_CUDA_SWEEP:-}" ] && SWEEP=(--sweep "$WORKSET_CUDA_SWEEP")
  WS_FRAMES=16,32,64 WS_MODELS=Qwen2.5-VL-7B,InternVL2-8B WS=()
  # CALL=first: 16 and 64 frames of Qwen2.5-VL-7B, the yardstick; CALL=rest: the others
  [ "${CALL:-}" = first ] && WS_FRAMES=16,64 WS_MODELS=Qwen2.5-VL-7B WS=(--no-dense --no-share-cost)
  [ "${CALL:-}" = rest ] && WS=(--no-yardstick)
  step workset_cuda bench_workset_cuda.log python benchmarks/bench_workset_cuda.py \
    --frames "${WORKSET_CUDA_FRAMES:-$WS_FRAMES}" --budget $(($(cap_of workset_cuda) * 2 / 3)) \
    --models "${WORKSET_CUDA_MODELS:-$WS_MODELS}" "${WS[@]}" "${SWEEP[@]}" --out-dir "$OUT"
fi
if want workset_ncu && ! command -v ncu >/dev/null; then
  echo "== ncu not found: no profile of the working-set kernel"
elif want workset_ncu; then
  # bench_workset_cuda.py --ncu: warm_up's launches (two passes over no column a level of
  # slots), then one 16-frame solve: its first pass (eager; the graph captured after it)
  # skipped, its 2nd and 3rd (graph replays: ncu profiles a graph's kernel nodes one by one),
  # by name and launch order
  mkdir -p "$OUT/logs"
  [ -n "${DRY_RUN:-}" ] && WORKSET_NCU_SKIP="${WORKSET_NCU_SKIP:-(2 x levels + 1)}"
  NCU_SKIP="${WORKSET_NCU_SKIP:-$(python -c "from videoanchor.anchor.solvers import workset_cuda as wc
print(2 * len(wc.SLOTS) + 1)")}"
  step workset_ncu logs/ncu_workset.log ncu --kernel-name "regex:${WORKSET_NCU_KERNEL:-_column_kernel}" \
    --launch-skip "$NCU_SKIP" --launch-count "${WORKSET_NCU_COUNT:-2}" \
    --section SpeedOfLight --section Occupancy \
    --section LaunchStats --section WarpStateStats --section SchedulerStats \
    --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --force-overwrite \
    -o "$OUT/logs/ncu_workset" python benchmarks/bench_workset_cuda.py --ncu
  [ -f "$OUT/logs/ncu_workset.ncu-rep" ] && ncu --import "$OUT/logs/ncu_workset.ncu-rep" \
    --page details > "$OUT/logs/ncu_workset.txt" 2>&1
fi
if want scores_beside; then  # issue 90: decode-like work's throughput beside the scores
  # (16 and 64 frames; CALL=first: 16); pairs that would end past 4/5 of the cap are not run
  BESIDE=()
  [ "${CALL:-}" = first ] && BESIDE=(--frames 16)
  step scores_beside bench_scores_beside.log python benchmarks/bench_scores_beside.py \
    "${BESIDE[@]}" --budget $(($(cap_of scores_beside) * 4 / 5)) --out-dir "$OUT"
fi
if want request; then  # issue 92: generate on the 7B model, plain / anchored / scores given
  # (CALL=first: 16 frames, plain and anchored; CALL=rest: 64 frames, the three)
  REQ=()
  [ "${CALL:-}" = first ] && REQ=(--frames 16 --providers plain,anchored)
  [ "${CALL:-}" = rest ] && REQ=(--frames 64)
  step request bench_request.log python benchmarks/bench_request.py "${REQ[@]}" \
    --budget $(($(cap_of request) / 2)) --out-dir "$OUT"
fi
if want static; then  # the kernels compiled ahead of time for sm_90 by this machine's Triton
  # (header: 3.6 on the lent machines; 3.9's are the CPU machine's job): registers, spills
  STATIC='python benchmarks/bench_column_kernel.py --static 90 --out-dir "$1"
    python benchmarks/bench_workset_cuda.py --static 90 --out-dir "$1"'
  step static static_compile.log env TRITON_INTERPRET=0 bash -c "$STATIC" _ "$OUT"
fi
if want spectral; then
  step spectral bench_spectral.log python benchmarks/bench_spectral.py --device cuda --no-ssc \
    --sizes 1024,2048,4096 --reps 3,2,1 --sklearn-max 2048 --out-dir "$OUT"
fi
if want long_video; then  # issue 99 item 4: long videos on the device (CALL=long, header)
  step long_video bench_long_video.log python benchmarks/bench_long_video.py --device cuda \
    --frames 64,128,256 --default-frames 64,128 --timeout 150 --name long_video_gpu \
    --out-dir "$OUT"
fi
if want sparse_spectral; then  # the block Krylov solver on the device (no minimiser: CPU float64)
  step sparse_spectral bench_sparse_spectral.log python benchmarks/bench_sparse_spectral.py \
    --device cuda --frames "" --sizes 1024,2048,4096,8192 --reps 3,3,2,1 --out-dir "$OUT"
fi
for script in bench_backward bench_ssc bench_blocked bench_integration bench_scores; do
  if [ -f "benchmarks/$script.py" ] && want "${script#bench_}"; then
    step "${script#bench_}" "$script.log" python "benchmarks/$script.py" --quick --out-dir "$OUT"
  fi
done
# tune's sweep vs the naive loop (the tiny model)
if want tune; then
  step tune bench_tune.log python benchmarks/bench_tune.py --device cuda --quick --out-dir "$OUT"
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
  step vllm bench_vllm.log python benchmarks/bench_vllm.py --model "$VIDEOANCHOR_QWEN25VL_7B" \
    --frames 16 --size 336 --requests 16 --max-tokens 64 --dtype bfloat16 --n-clusters 24 \
    --out-dir "$OUT"
fi
# Tensor parallelism: one torchrun per world size, on as many GPUs as there are (at least 2).
want tp && ngpu=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
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
    run=(python -m torch.distributed.run --standalone --nproc_per_node "$n")
    step tp "bench_tp_$n.log" "${run[@]}" benchmarks/bench_tp.py --out-dir "$OUT" "${QUICK[@]}"
    # One request's fast SSC split over the ranks against one GPU (8 to 64 frames).
    [ "$n" -gt 1 ] && step tp "bench_split_$n.log" "${run[@]}" benchmarks/bench_split.py --out-dir "$OUT" "${QUICK[@]}"
    # The blocked solver spread over the ranks (what long videos take), at the same sizes.
    step tp "bench_tp_blocked_$n.log" "${run[@]}" benchmarks/bench_tp.py --force-blocked --out-dir "$OUT" "${QUICK[@]}"
  done
fi
if [ -n "${DRY_RUN:-}" ]; then
  echo "run_gpu.sh: dry run: the caps sum to ${DRY_T}s of the call's ${BUDGET}s"
  exit 0
fi
echo "run_gpu.sh: finished in $(($(date +%s) - START))s"
exit $status
