#!/usr/bin/env bash
# Reproduces the built-in tiny models from nothing but this repository:
#   the shapes benchmark (seed 0) and a training mix (seed 1: the same seven question families
#   plus dense "describe" captions, which pre-train the vision path the way LLaVA's first stage
#   does) -> a byte-level BPE tokenizer -> two teachers with different answer styles (terse; a
#   one-sentence lead-in then "Answer: X") -> a smaller, weaker student -> f16 copies of each ->
#   held-out accuracy of each on the benchmark's test split.
# Every step is seeded; candle's CPU kernels are deterministic for a fixed thread count, so run
# with the same CANDLE_NUM_THREADS to get identical weights.
#
# Usage: tools/make-builtin-models.sh [OUT_DIR]     (default: models/builtin)
# Env:   RIL (the binary, default target/release/ril), TEACHER_STEPS, STUDENT_STEPS, N_TRAIN,
#        KEEP_WORK=1 keeps OUT_DIR/work (datasets, full-precision checkpoints, logs),
#        ONLY="teacher-reasoned student" builds only the models named (the datasets and the
#        tokenizer are regenerated identically either way).
set -euo pipefail
cd "$(dirname "$0")/.."

out="${1:-models/builtin}"
ril="${RIL:-target/release/ril}"
teacher_steps="${TEACHER_STEPS:-2500}"
student_steps="${STUDENT_STEPS:-600}"
n_train="${N_TRAIN:-40000}"
work="${out}/work"
export CANDLE_NUM_THREADS="${CANDLE_NUM_THREADS:-2}"
# The benchmark's image size; the vision tower sees 12x12 patches (6x6 per image).
image_size=72
patch_size=12

[ -x "$ril" ] || cargo build --release -p ril-cli
mkdir -p "$out" "$work"
started=$(date +%s)
log() { echo "[$(( $(date +%s) - started ))s] $*"; }

log "datasets"
"$ril" data synth --out "$work/shapes" --seed 0 --image-size "$image_size" \
    --n-train 20000 --n-val 200 --n-test 500
# Half the training rows are captions: "describe" listed as often as the seven families.
describe=describe,describe,describe,describe,describe,describe,describe
"$ril" data synth --out "$work/mix" --seed 1 --image-size "$image_size" \
    --n-train "$n_train" --n-val 200 --n-test 1 \
    --families "$describe,colour,shape,count,relation,exists,compare,arithmetic"
log "tokenizer"
"$ril" tokenizer train --data "$work/mix" --out "$work/tokenizer" --vocab-size 512

# The models differ by initialisation seed, answer style and size; all see the rows in the
# same order (sft --seed 0).
train() { # name seed target steps init-args...
  local name=$1 seed=$2 target=$3 steps=$4
  shift 4
  case " ${ONLY:-$name} " in *" $name "*) ;; *) log "skip $name"; return ;; esac
  log "init $name"
  "$ril" model init --tokenizer "$work/tokenizer" --image-size "$image_size" \
      --patch-size "$patch_size" --seed "$seed" --out "$work/$name-init" "$@"
  log "sft $name ($steps steps, target $target)"
  "$ril" --log-format json sft --model "$work/$name-init" --data "$work/mix" \
      --out "$work/$name-sft" --steps "$steps" --batch-size 16 --lr 1e-3 --min-lr 1e-4 \
      --warmup-steps 50 --eval-every 250 --eval-rows 200 --save-every 500 --log-every 50 \
      --seed 0 --target "$target" 2> "$work/$name-sft.log"
  rm -rf "$out/$name"
  "$ril" model export --model "$work/$name-sft/final" --out "$out/$name" --dtype f16
  log "eval $name"
  "$ril" eval --model "$out/$name" --data "$work/shapes" --split test \
      --out "$out/$name.eval.json" | tee "$out/$name.eval.md"
}

train teacher-terse 1 reference "$teacher_steps" --size tiny
train teacher-reasoned 2 style:reasoned "$teacher_steps" --size tiny
train student 3 reference "$student_steps" --size tiny --layers 2 --hidden 128

[ "${KEEP_WORK:-0}" = 1 ] || rm -rf "$work"
log "done: $(du -sh "$out" | cut -f1) in $out"
