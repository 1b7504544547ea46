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
#   4. two teachers that reason before answering, in different styles: "reasoned" (the vision
#      tower from 3 under a new 4-layer decoder, SFT on the mix in two stages; each answer is
#      the row's rationale, the objects cell by cell, then "Answer: X") and "narrated" (the
#      reasoned one taught to write "I see <rationale>. So the answer is X."). Answering in
#      one step from the image tokens tops out near 73 % (binding colour to shape and position
#      fails: docs/BENCHMARKS.md); listing the scene first and answering from the list does not;
#   5. a student, smaller and weaker: the same vision tower under a 2-layer decoder, shortly
#      trained on mostly bare answers with some reasoned and narrated ones (a student that can
#      reason but rarely does: the room RIL has to work in);
#   6. f16 copies of each, and held-out accuracy of each on the benchmark's test split.
# Every step is seeded; candle's CPU kernels are deterministic for a fixed thread count, so run
# with the same CANDLE_NUM_THREADS to get identical weights.
#
# Usage: tools/make-builtin-models.sh [OUT_DIR]     (default: models/builtin)
# Env:   RIL (the binary, default target/release/ril), VISION_STEPS, TEACHER_STEPS (stage 1),
#        TEACHER_STEPS2 (stage 2), STYLE_STEPS (the narrated stage), STUDENT_STEPS,
#        STUDENT_TARGET (the student's mix of answer styles),
#        KEEP_WORK=1 keeps OUT_DIR/work (datasets, full-precision checkpoints, logs),
#        ONLY="teacher-reasoned student" builds only the models named (the datasets, the
#        tokenizer and the vision tower are regenerated identically either way;
#        teacher-narrated starts from teacher-reasoned, which is rebuilt with it).
set -euo pipefail
cd "$(dirname "$0")/.."

out="${1:-models/builtin}"
ril="${RIL:-target/release/ril}"
vision_steps="${VISION_STEPS:-3000}"
teacher_steps="${TEACHER_STEPS:-2000}"
teacher_steps2="${TEACHER_STEPS2:-2000}"
style_steps="${STYLE_STEPS:-600}"
student_steps="${STUDENT_STEPS:-1500}"
student_target="${STUDENT_TARGET:-reference=0.7,style:reasoned=0.15,style:narrated=0.15}"
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
"$ril" data synth --out "$work/shapes" --seed 0 --image-size "$image_size" --jitter 0 \
    --n-train 2000 --n-val 200 --n-test 500
# Half the training rows are captions: "describe" listed as often as the seven families.
describe=describe,describe,describe,describe,describe,describe,describe
"$ril" data synth --out "$work/mix" --seed 1 --image-size "$image_size" --jitter 0 \
    --n-train 40000 --n-val 200 --n-test 1 \
    --families "$describe,colour,shape,count,relation,exists,compare,arithmetic"
"$ril" data synth --out "$work/shape-only" --seed 3 --image-size "$image_size" --jitter 0 \
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
  "$ril" eval --model "$out/$1" --data "$work/shapes" --split test --max-new-tokens 96 \
      --out "$out/$1.eval.json" | tee "$out/$1.eval.md"
}

# Teacher (reasoned): the vision tower under a new 4-layer, 128-wide decoder; every tensor
# trains, on the mix in the reasoned style (captions stay captions). Two stages: 1e-3 (cosine
# to 1e-4), then 5e-4 (cosine to 5e-5) with another row order (seed 1).
if wanted teacher-reasoned || wanted teacher-narrated; then
  log "teacher-reasoned: stage 1 ($teacher_steps steps)"
  "$ril" model init --tokenizer "$work/tokenizer" --size test --hidden 128 --layers 4 \
      --image-size "$image_size" --patch-size "$patch_size" --seed 1 \
      --vision-from "$work/vision-sft/final" --out "$work/teacher-reasoned-init"
  sft teacher-reasoned-1 "$work/mix" "$teacher_steps" "$work/teacher-reasoned-init" \
      --lr 1e-3 --min-lr 1e-4 --warmup-steps 50 --seed 0 --target style:reasoned
  log "teacher-reasoned: stage 2 ($teacher_steps2 steps)"
  sft teacher-reasoned "$work/mix" "$teacher_steps2" "$work/teacher-reasoned-1-sft/final" \
      --lr 5e-4 --min-lr 5e-5 --warmup-steps 20 --seed 1 --target style:reasoned
  ship teacher-reasoned
fi

# Teacher (narrated): the reasoned teacher taught another way of writing the same reasoning.
if wanted teacher-narrated; then
  log "teacher-narrated ($style_steps steps from teacher-reasoned)"
  sft teacher-narrated "$work/mix" "$style_steps" "$work/teacher-reasoned-sft/final" \
      --lr 3e-4 --min-lr 3e-5 --warmup-steps 20 --target style:narrated --seed 2
  ship teacher-narrated
fi

# Student: the same vision tower under a 2-layer, 64-wide decoder (a quarter of the teachers'
# parameters), trained briefly on mostly bare answers.
if wanted student; then
  log "student ($student_steps steps, targets $student_target)"
  "$ril" model init --tokenizer "$work/tokenizer" --size test --hidden 64 --layers 2 \
      --image-size "$image_size" --patch-size "$patch_size" --seed 3 \
      --vision-from "$work/vision-sft/final" --out "$work/student-init"
  sft student "$work/mix" "$student_steps" "$work/student-init" \
      --lr 1e-3 --min-lr 1e-4 --warmup-steps 50 --seed 0 --target "$student_target"
  ship student
fi

[ "${KEEP_WORK:-0}" = 1 ] || rm -rf "$work"
log "done: $(du -sh "$out" | cut -f1) in $out"
