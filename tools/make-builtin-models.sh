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
#   4. teacher-terse: the vision tower under a new 4-layer decoder, SFT on the mix in two stages,
#      answering with the bare answer (73 % held-out: answering in one step is as far as this
#      decoder gets);
#   5. two teachers that reason, >= 90 % held-out: teacher-terse taught to write a chain of
#      thought before its answer (the scene object by object, then what the question is about),
#      in six stages on fresh rows (`ril data synth --rationale-kind stepwise`, then `lookup`);
#      teacher-reasoned writes it then "Answer: X", teacher-narrated (one more stage) "I see ...
#      So the answer is X.";
#   6. a student, smaller and weaker: the same vision tower under a 2-layer decoder, shortly trained;
#      and student-reasoned, the demo's student: that student taught the teachers' chain of
#      thought for 160 steps (the format, not yet the skill: ~30 % held-out);
#   7. f16 copies of each, and held-out accuracy of each on the benchmark's test split.
# The benchmark, the mix and the shape-only set are written without rationales (--no-rationale):
# the terse teacher and the student answer bare; the reasoning stages make their own datasets.
# Every step is seeded; candle's CPU kernels are deterministic for a fixed thread count, so run
# with the same CANDLE_NUM_THREADS (2, the default here) to get identical weights.
#
# Usage: tools/make-builtin-models.sh [OUT_DIR]     (default: models/builtin)
# Env:   RIL (the binary, default target/release/ril), VISION_STEPS, TEACHER_STEPS (stage 1),
#        TEACHER_STEPS2 (stage 2), NARRATED_STEPS, STUDENT_STEPS, STUDENT_REASONED_STEPS,
#        KEEP_WORK=1 keeps OUT_DIR/work (datasets, full-precision checkpoints, logs),
#        ONLY="teacher-narrated student" builds only the models named (the datasets, the
#        tokenizer and the vision tower are regenerated identically either way; each teacher
#        starts from the one before it: terse -> reasoned -> narrated, and student ->
#        student-reasoned, so a model named without the one it starts from needs that one's
#        checkpoint in OUT_DIR/work).
set -euo pipefail
cd "$(dirname "$0")/.."

out="${1:-models/builtin}"
ril="${RIL:-target/release/ril}"
vision_steps="${VISION_STEPS:-3000}"
teacher_steps="${TEACHER_STEPS:-2000}"
teacher_steps2="${TEACHER_STEPS2:-3000}"
narrated_steps="${NARRATED_STEPS:-1000}"
student_steps="${STUDENT_STEPS:-600}"
student_reasoned_steps="${STUDENT_REASONED_STEPS:-160}"
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
  "$ril" eval --model "$out/$1" --data "$work/shapes" --split test --max-new-tokens 128 \
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

# Teachers that reason (docs/BENCHMARKS.md, "Chains of thought the teachers can follow"): the
# terse teacher fine-tuned to write a rationale, then the answer. Each stage trains on fresh rows
# of the seven families (lr cosine-decayed, 20 warm-up steps, batch 16). Stages 1-4 write the
# scene cell by cell, then what the question is about ("top left: red circle; ... the circle:
# top left, red"; --rationale-kind stepwise); this makes perception exact. Stages 5-6 switch to
# the object-first list ("red circle at top left; ..."; --rationale-kind lookup), whose look-ups
# copy the words next to a match, and weight colour and relation questions three times.
cot_data() { # name seed rationale-kind rows families
  [ -f "$work/$1/train.jsonl" ] ||
    "$ril" data synth --out "$work/$1" --seed "$2" --image-size "$image_size" --jitter 0 \
        --rationale-kind "$3" --n-train "$4" --n-val 200 --n-test 1 --families "$5" > /dev/null
}
cot() { # name init data steps lr min-lr seed style
  sft "$1" "$work/$3" "$4" "$2" --lr "$5" --min-lr "$6" --schedule cosine --warmup-steps 20 \
      --seed "$7" --target "style:$8"
}
seven=colour,shape,count,relation,exists,compare,arithmetic
weighted=colour,colour,colour,relation,relation,relation,shape,count,exists,compare,arithmetic
if wanted teacher-reasoned; then
  log "teacher-reasoned: 6 stages (16,500 steps) from teacher-terse"
  cot_data cot-1 11 stepwise 16000 "$seven"
  cot_data cot-2 12 stepwise 40000 "$seven"
  cot_data cot-3 13 stepwise 40000 "$seven"
  cot_data cot-4 15 lookup 40000 "$weighted"
  cot_data cot-5 16 lookup 40000 "$weighted"
  cot teacher-reasoned-1 "$work/teacher-terse-sft/final" cot-1 1500 3e-4 3e-5 0 reasoned
  cot teacher-reasoned-2 "$work/teacher-reasoned-1-sft/final" cot-1 2000 2e-4 1e-5 1 reasoned
  cot teacher-reasoned-3 "$work/teacher-reasoned-2-sft/final" cot-2 4000 2e-4 1e-5 2 reasoned
  cot teacher-reasoned-4 "$work/teacher-reasoned-3-sft/final" cot-3 4000 1.5e-4 1e-5 3 reasoned
  cot teacher-reasoned-5 "$work/teacher-reasoned-4-sft/final" cot-4 2000 2e-4 1e-5 5 reasoned
  cot teacher-reasoned "$work/teacher-reasoned-5-sft/final" cot-5 3000 2e-4 1e-5 6 reasoned
  ship teacher-reasoned
fi

# Teacher (narrated): teacher-reasoned taught another answer style over the same reasoning.
if wanted teacher-narrated; then
  log "teacher-narrated ($narrated_steps steps from teacher-reasoned)"
  cot_data cot-6 18 lookup 40000 "$weighted"
  cot teacher-narrated "$work/teacher-reasoned-sft/final" cot-6 "$narrated_steps" 1e-4 1e-5 8 narrated
  ship teacher-narrated
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

# Student (reasoned), the demo's: the student taught the lookup chain of thought (the
# teachers' last stage's data) for a short while. It writes the format but gets most look-ups
# wrong (~30 % held-out; trained on to 1,500 steps it plateaus near 50 %: docs/RESULTS.md), so
# RIL has a student to lift with teachers that answer in the same format.
if wanted student-reasoned; then
  log "student-reasoned ($student_reasoned_steps steps from student)"
  cot_data cot-6 18 lookup 40000 "$weighted"
  cot student-reasoned "$work/student-sft/final" cot-6 "$student_reasoned_steps" 1e-3 1e-4 9 reasoned
  ship student-reasoned
fi

[ "${KEEP_WORK:-0}" = 1 ] || rm -rf "$work"
log "done: $(du -sh "$out" | cut -f1) in $out"
