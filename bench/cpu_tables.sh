#!/usr/bin/env bash
# Every CPU benchmark behind the README's per-CPU tables, at the documented commands, one after
# another on this machine (run it alone: the ratios are same-process timings, and a second job on
# a 2-core machine distorts both sides). JSON rows and logs go to $OUT (default
# bench/results/cpu-<date>); a stage that fails does not stop the others, and the exit status
# is the number of stages that failed. About an hour on 2 cores.
#
#   bench/cpu_tables.sh                 # all stages
#   bench/cpu_tables.sh bsr lowrank     # some: bsr bsr_bf16 bsr_warmup semi semi_bf16 lowrank
#                                       #       lowrank_bf16 conv conv_bf16 gpt cnn cnn_bf16
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results/cpu-$(date +%Y%m%d-%H%M)}
mkdir -p "$out"
failed=0
python3 -m sparsekern info > "$out/info.txt" 2>&1 || python3 -m sparsekern info

stage() {  # stage NAME COMMAND...: run it unless stages were named and NAME is not one of them
  local name=$1
  shift
  if [ ${#selected[@]} -gt 0 ] && [[ ! " ${selected[*]} " == *" $name "* ]]; then
    return
  fi
  echo "+ [$name] $*"
  "$@" 2>&1 | tee "$out/$name.log"
  local status=${PIPESTATUS[0]}
  [ "$status" -eq 0 ] || { echo "! $name: exit status $status"; failed=$((failed + 1)); }
}

selected=("$@")
bsr=(python3 bench/bench_bsr_linear.py --in-features 4096 --out-features 4096 --densities 1.0 0.5 0.25 0.1 0.05
     --no-torch-bsr --reps 3 --threads 2)
stage bsr "${bsr[@]}" --blocks 32 16 --json "$out/bsr_linear.jsonl"
stage bsr_bf16 "${bsr[@]}" --dtype bf16 --blocks 32 16 --json "$out/bsr_linear.jsonl"
stage bsr_warmup python3 bench/bench_bsr_warmup.py --threads 2 --json "$out/bsr_warmup.jsonl"
stage semi python3 bench/bench_semi_linear.py --threads 2 --repeats 5 --json "$out/semi_linear.jsonl"
stage semi_bf16 python3 bench/bench_semi_linear.py --threads 2 --repeats 5 --dtype bfloat16 \
  --json "$out/semi_linear.jsonl"
stage lowrank python3 bench/bench_lowrank_linear.py --threads 2 --repeats 5 --json "$out/lowrank_linear.jsonl"
stage lowrank_bf16 python3 bench/bench_lowrank_linear.py --threads 2 --repeats 5 --dtype bfloat16 \
  --json "$out/lowrank_linear.jsonl"
stage conv python3 bench/bench_conv2d.py --reps 5 --json "$out/conv2d.jsonl"
stage conv_bf16 python3 bench/bench_conv2d.py --reps 5 --dtype bf16 --json "$out/conv2d.jsonl"
stage gpt python3 bench/bench_gpt_bf16.py --rounds 5 --threads 2 --json "$out/gpt_bf16.jsonl"
cnn=(python3 bench/exp_cnn.py --speed --speed-method rigl --densities 0.1 --batch 64 --delta 20 --threads 2)
stage cnn "${cnn[@]}" --json "$out/cnn_speed.jsonl"
stage cnn_bf16 "${cnn[@]}" --speed-precision bf16 --json "$out/cnn_speed.jsonl"
echo "stages failed: $failed; rows and logs in $out"
exit "$failed"
