#!/usr/bin/env bash
# The serving path's GPU figures in few calls of a lent GPU machine (each part stays inside a 10-minute call).
#
#   source bench/device-env.sh
#   bash bench/gpu_suite.sh OUT_DIR [PART ...]
#
# Parts (default: tests correctness generate, ~7 min on one H200):
#   tests        pytest -m gpu tests/test_fastgen_gpu.py   (captured decode steps and replayed prefills == eager)
#   correctness  bench/check_fast_correctness.py           (fp32 teacher-forced gaps vs HF bf16 generate)
#   generate     bench/bench_generate.py --skip-naive      (p50, first request, 64 clients, READY cold/warm; py-spy)
#   serving      bench/bench_serving.py --clients 64       (static vs continuous, fixed and realistic, ~5 min;
#                py-spy of each load in spy-serving.tgz: python3 bench/spy_summary.py FILE htrd-inference)
#   serving256   bench/bench_serving.py --clients 256 --modes fixed
#   mixed        bench/bench_serving.py --engines static,continuous,mixed --settle 8 (64 clients, both modes; ~6 min):
#                the shipped prefills between the decode steps against generation.mixed_steps, same call
#   mixedcheck   bench/check_fast_correctness.py --mixed    (fp32 teacher-forced, mixed steps)
#   prepool      bench/bench_serving.py --engines threads,continuous --settle 8 (64 clients, both modes; ~4 min):
#                the preprocessing in threads (limits.preprocess_workers: 0) against worker processes, same call
#   slots        bench/bench_serving.py --engines continuous,slots128,slots64 --clients 256 (fixed and realistic,
#                ~6 min): 256 (the shipped config, where they fit), 128 and 64 slots under a deep queue -- what a
#                collection job gets
#   replicas     bench/bench_replicas.py                   (one htrd per GPU; needs 2+ GPUs)
#   profile      bench/profile_decode.py --attention all   (decode step vs matmul floor per decode attention,
#                prefill launch vs GPU)
#   tune         bench/tune_decode_attention.py            (the Triton decode kernel's tilings against flash alone)
#
# Everything lands in OUT_DIR: suite.txt (every part's output, its limit and exit code) and one JSON per
# part -- at most 8 files, what the device tool brings back. The 8.77 B random model is written once to
# $HTR_BENCH_MODEL (default /srv/m8b); compile caches persist in $HTR_BENCH_STATE between parts.
set -u
out=${1:?usage: gpu_suite.sh OUT_DIR [PART ...]}
shift
parts=${*:-tests correctness generate}
model=${HTR_BENCH_MODEL:-/srv/m8b}
state=${HTR_BENCH_STATE:-/tmp/htr-bench-state}
log=$out/suite.txt
mkdir -p "$out" "$state"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

run() {  # run LIMIT_S CMD...: CMD's output into suite.txt, killed (and its daemons stopped) after LIMIT_S
  local limit=$1
  shift
  echo "== $(date -u +%H:%M:%S) $* (limit ${limit} s)" >>"$log"
  timeout "$limit" "$@" >>"$log" 2>&1
  echo "== exit $?" >>"$log"
}

for part in $parts; do
  case $part in
    tests | correctness | generate | serving | serving256 | mixed | mixedcheck | prepool | slots | replicas | profile | tune) ;;
    *) echo "gpu_suite.sh: unknown part '$part' (see the header of this file)" >&2; exit 2 ;;
  esac
done
nvidia-smi -L >>"$log" 2>&1
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' >>"$log" 2>&1
[ -f "$model/config.json" ] || run 120 python3 bench/make_model_8b.py "$model"
for part in $parts; do
  case $part in
    tests) run 150 python3 -m pytest -q -m gpu tests/test_fastgen_gpu.py -p no:cacheprovider ;;
    correctness) run 240 python3 bench/check_fast_correctness.py "$model" --json "$out/correctness.json" ;;
    generate) run 300 python3 bench/bench_generate.py --model-dir "$model" --skip-naive --state-dir "$state" \
                --profile-load "$out/spy64.txt" --json "$out/generate.json" ;;
    serving) run 540 python3 bench/bench_serving.py --model-dir "$model" --clients 64 --per-client 15 \
               --state-dir "$state" --json "$out/serving.json" --profile "$state/spy-serving"
             tar czf "$out/spy-serving.tgz" -C "$state" spy-serving 2>>"$log" ;;
    serving256) run 540 python3 bench/bench_serving.py --model-dir "$model" --clients 256 --per-client 7 \
                  --modes fixed --state-dir "$state" --json "$out/serving256.json" ;;
    mixed) run 560 python3 bench/bench_serving.py --model-dir "$model" --clients 64 --per-client 5 --settle 8 \
             --engines static,continuous,mixed --state-dir "$state" --json "$out/mixed.json" ;;
    prepool) run 400 python3 bench/bench_serving.py --model-dir "$model" --clients 64 --per-client 5 --settle 8 \
               --engines threads,continuous --state-dir "$state" --json "$out/prepool.json" ;;
    slots) run 580 python3 bench/bench_serving.py --model-dir "$model" --clients 256 --per-client 5 --settle 8 \
             --engines continuous,slots128,slots64 --state-dir "$state" --json "$out/slots.json" ;;
    mixedcheck) run 240 python3 bench/check_fast_correctness.py "$model" --mixed --json "$out/mixedcheck.json" ;;
    replicas) run 400 python3 bench/bench_replicas.py --model-dir "$model" --per-client 6 --state-dir "$state" \
                --json "$out/replicas.json" ;;
    profile) run 240 python3 bench/profile_decode.py "$model" --attention all --kernels 12 ;;
    tune) run 200 python3 bench/tune_decode_attention.py ;;
  esac
done
grep -E "^== exit|PASS|FAIL|passed|failed|lines/s|READY|p50|scaling" "$log" | tail -60
