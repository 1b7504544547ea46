#!/usr/bin/env bash
# Reproduces the built-in tiny models from nothing but this repository:
#   the shapes benchmark (seed 0) -> a byte-level BPE tokenizer -> two teachers with different
#   answer styles (terse; a one-sentence lead-in then "Answer: X") -> a smaller, weaker SFT
#   student -> held-out accuracy of each on the test split.
# Every step is seeded; candle's CPU kernels are deterministic for a fixed thread count, so run
# with the same CANDLE_NUM_THREADS to get identical weights.
#
# Usage: tools/make-builtin-models.sh [OUT_DIR]     (default: models/builtin)
# Env:   RIL (the binary, default target/release/ril), TEACHER_STEPS, STUDENT_STEPS, N_TRAIN.
set -euo pipefail
cd "$(dirname "$0")/.."

out="${1:-models/builtin}"
ril="${RIL:-target/release/ril}"
teacher_steps="${TEACHER_STEPS:-1500}"
student_steps="${STUDENT_STEPS:-150}"
n_train="${N_TRAIN:-20000}"
work="${out}/work"
export CANDLE_NUM_THREADS="${CANDLE_NUM_THREADS:-2}"

[ -x "$ril" ] || cargo build --release -p ril-cli
mkdir -p "$out" "$work"
started=$(date +%s)
log() { echo "[$(( $(date +%s) - started ))s] $*"; }

log "dataset"
"$ril" data synth --out "$work/shapes" --seed 0 --n-train "$n_train" --n-val 200 --n-test 500
log "tokenizer"
"$ril" tokenizer train --data "$work/shapes" --out "$work/tokenizer" --vocab-size 512

train() { # name seed size target steps extra-init-args...
  local name=$1 seed=$2 size=$3 target=$4 steps=$5
  shift 5
  log "init $name"
  "$ril" model init --tokenizer "$work/tokenizer" --size "$size" --image-size 64 --patch-size 8 \
      --seed "$seed" --out "$work/$name-init" "$@"
  log "sft $name ($steps steps, target $target)"
  "$ril" --log-format json sft --model "$work/$name-init" --data "$work/shapes" --out "$work/$name-sft" \
      --steps "$steps" --batch-size 16 --lr 2e-3 --min-lr 1e-4 --warmup-steps 50 \
      --eval-every 250 --eval-rows 200 --save-every 500 --log-every 50 --seed "$seed" \
      --target "$target" 2> "$work/$name-sft.log"
  rm -rf "$out/$name"
  cp -r "$work/$name-sft/final" "$out/$name"
  rm -f "$out/$name/optimizer.safetensors"
  log "eval $name"
  "$ril" eval --model "$out/$name" --data "$work/shapes" --split test --out "$out/$name.eval.json" \
      | tee "$out/$name.eval.md"
}

train teacher-terse 1 tiny reference "$teacher_steps"
train teacher-reasoned 2 tiny style:reasoned "$teacher_steps"
train student 3 test reference "$student_steps" --layers 2 --hidden 128

log "done: $(du -sh "$out" --exclude=work | cut -f1) in $out"
