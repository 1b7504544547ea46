#!/usr/bin/env bash
# Reproduces the built-in tiny models from nothing but this repository:
#   1. data: the shapes benchmark (seed 0, objects at their cell's centre), a training mix (seed 1:
#      the seven question families plus dense "describe" captions) and a shape-only set (seed 3);
#   2. a byte-level BPE tokenizer trained on the mix;
#   3. a vision tower: a small model trained on the shape-only set. Shape is the one attribute
#      a randomly initialised tower does not pick up from the mix (colour, size and position it
#      learns; shape stays at chance for thousands of steps: docs/BENCHMARKS.md), and it does
#      from shape questions alone. LLaVA's recipe follows: a trained vision encoder under a new
#      decoder;
#   4. two teachers with different answer styles: terse (the vision tower from 3 under a new
#      4-layer decoder, SFT on the mix in two stages) and reasoned (the terse one taught a
#      one-sentence lead-in then "Answer: X");
#   5. a student, smaller and weaker: the same vision tower under a 2-layer decoder, shortly trained;
#   6. f16 copies of each, and held-out accuracy of each on the benchmark's test split.
# The datasets are written without rationales (--no-rationale): these models were trained on
# bare answers and the fixed "I checked the image carefully." lead-in, before rows carried
# rationales (a reasoning-first teacher recipe is being measured: docs/BENCHMARKS.md).
# Every step is seeded; candle's CPU kernels are deterministic for a fixed thread count, so run
# with the same CANDLE_NUM_THREADS to get identical weights.
#
# Usage: tools/make-builtin-models.sh [OUT_DIR]     (default: models/builtin)
# Env:   RIL (the binary, default target/release/ril), VISION_STEPS, TEACHER_STEPS (stage 1),
#        TEACHER_STEPS2 (stage 2), REASONED_STEPS, STUDENT_STEPS,
#        KEEP_WORK=1 keeps OUT_DIR/work (datasets, full-precision checkpoints, logs),
#        ONLY="teacher-reasoned student" builds only the models named (the datasets, the
#        tokenizer and the vision tower are regenerated identically either way).
set -euo pipefail
cd "$(dirname "$0")/.."

out="${1:-models/builtin}"
ril="${RIL:-target/release/ril}"
vision_steps="${VISION_STEPS:-3000}"
teacher_steps="${TEACHER_STEPS:-2000}"
teacher_steps2="${TEACHER_STEPS2:-3000}"
reasoned_steps="${REASONED_STEPS:-1000}"
student_steps="${STUDENT_STEPS:-600}"
work="${out}/work"
export CANDLE_NUM_THREADS="${CANDLE_NUM_THREADS:-2}"
# The benchmark's image size and the vision tower's patch: one 24x24 patch per grid cell.
image_size=72
patch_size=24

[ -x "$ril" ] || cargo build --release -p ril-cli
mkdir -p "$out" "$work"
started=$(date +%s)
log() { echo "[$(( $(date +%s) - started ))s] $*"; }

log "datasets"
"$ril" data synth --out "$work/shapes" --seed 0 --image-size "$image_size" --jitter 0 --no-rationale \
    --n-train 2000 --n-val 200 --n-test 500
# Half the training rows are captions: "describe" listed as often as the seven families.
describe=describe,describe,describe,describe,describe,describe,describe
"$ril" data synth --out "$work/mix" --seed 1 --image-size "$image_size" --jitter 0 --no-rationale \
    --n-train 40000 --n-val 200 --n-test 1 \
    --families "$describe,colour,shape,count,relation,exists,compare,arithmetic"
"$ril" data synth --out "$work/shape-only" --seed 3 --image-size "$image_size" --jitter 0 --no-rationale \
    --n-train 8000 --n-val 100 --n-test 200 --families shape
log "tokenizer"
"$ril" tokenizer train --data "$work/mix" --out "$work/tokenizer" --vocab-size 512

sft() { # name data steps init-dir extra-args (--lr, --seed, --warmup-steps, ...)
  local name=$1 data=$2 steps=$3 init=$4
  shift 4
  "$ril" --log-format json sft --model "$init" --data "$data" --out "$work/$name-sft" \
      --steps "$steps" --batch-size 16 --eval-every 500 --eval-rows 200 \
      --save-every 500 --log-every 50 "$@" 2> "$work/$name-sft.log"
}

log "vision tower ($vision_steps steps on shape questions)"
"$ril" model init --tokenizer "$work/tokenizer" --size test --image-size "$image_size" \
    --patch-size "$patch_size" --seed 1 --out "$work/vision-init"
sft vision "$work/shape-only" "$vision_steps" "$work/vision-init" \
    --lr 1e-3 --min-lr 1e-3 --schedule constant --warmup-steps 20 --seed 0
"$ril" eval --model "$work/vision-sft/final" --data "$work/shape-only" --split test \
    | tee "$work/vision.eval.md"

wanted() { case " ${ONLY:-$1} " in *" $1 "*) return 0 ;; *) log "skip $1"; return 1 ;; esac; }
ship() { # name: f16 copy of the last stage, and its held-out accuracy
  rm -rf "$out/$1"
  "$ril" model export --model "$work/$1-sft/final" --out "$out/$1" --dtype f16
  log "eval $1"
  "$ril" eval --model "$out/$1" --data "$work/shapes" --split test \
      --out "$out/$1.eval.json" | tee "$out/$1.eval.md"
}

# Teacher (terse): the vision tower under a new 4-layer, 128-wide decoder; every tensor trains.
# Two stages over the same mix: 2000 steps at 1e-3 (cosine to 1e-4), then 3000 more at 5e-4
# (cosine to 5e-5) with another row order (seed 1).
if wanted teacher-terse; then
  log "teacher-terse: stage 1 ($teacher_steps steps)"
  "$ril" model init --tokenizer "$work/tokenizer" --size test --hidden 128 --layers 4 \
      --image-size "$image_size" --patch-size "$patch_size" --seed 1 \
      --vision-from "$work/vision-sft/final" --out "$work/teacher-terse-init"
  sft teacher-terse-1 "$work/mix" "$teacher_steps" "$work/teacher-terse-init" \
      --lr 1e-3 --min-lr 1e-4 --warmup-steps 50 --seed 0
  log "teacher-terse: stage 2 ($teacher_steps2 steps)"
  sft teacher-terse "$work/mix" "$teacher_steps2" "$work/teacher-terse-1-sft/final" \
      --lr 5e-4 --min-lr 5e-5 --warmup-steps 20 --seed 1
  ship teacher-terse
fi

# Teacher (reasoned): the terse teacher taught another answer style (a one-sentence lead-in,
# then "Answer: X").
if wanted teacher-reasoned; then
  log "teacher-reasoned ($reasoned_steps steps from teacher-terse)"
  sft teacher-reasoned "$work/mix" "$reasoned_steps" "$work/teacher-terse-sft/final" \
      --lr 3e-4 --min-lr 3e-5 --warmup-steps 20 --target style:reasoned --seed 2
  ship teacher-reasoned
fi

# Student: the same vision tower under a 2-layer, 64-wide decoder (a quarter of the teachers'
# parameters), trained briefly.
if wanted student; then
  log "student ($student_steps steps)"
  "$ril" model init --tokenizer "$work/tokenizer" --size test --hidden 64 --layers 2 \
      --image-size "$image_size" --patch-size "$patch_size" --seed 3 \
      --vision-from "$work/vision-sft/final" --out "$work/student-init"
  sft student "$work/mix" "$student_steps" "$work/student-init" \
      --lr 1e-3 --min-lr 1e-4 --warmup-steps 50 --seed 0
  ship student
fi

[ "${KEEP_WORK:-0}" = 1 ] || rm -rf "$work"
log "done: $(du -sh "$out" | cut -f1) in $out"
