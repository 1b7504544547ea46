#!/usr/bin/env bash
# The chaos experiment of docs/RESULTS.md: tiny models made with ril's own commands (the same
# as the tests' `make_tiny_run`), a 2-actor run of ITERATIONS iterations (B = 2), and
# `ril experiment chaos` injecting a fault every ~1.5 s from every kind.
#
#   tools/chaos-run.sh [RIL] [DIR] [ITERATIONS] [SEED]
#
# RIL defaults to target/debug/ril (build it with `cargo build -p ril-cli`), DIR to
# runs/chaos (made afresh), ITERATIONS to 250, SEED to 7. Prints the table; the JSON report is
# DIR/run/chaos.json.
set -euo pipefail
ril="$(realpath "${1:-target/debug/ril}")"
dir="${2:-runs/chaos}"
iterations="${3:-250}"
seed="${4:-7}"
rm -rf "$dir"
mkdir -p "$dir"
cd "$dir"
"$ril" data synth --out data --seed 5 --n-train 24 --n-val 4 --n-test 4 --image-size 32 \
  --max-objects 2 >/dev/null
"$ril" tokenizer train --data data --out tok --vocab-size 300 >/dev/null
"$ril" model init --tokenizer tok --size test --layers 1 --seed 1 --out student >/dev/null
"$ril" model init --tokenizer tok --size test --layers 1 --seed 2 --out teacher >/dev/null
cat > run.toml <<TOML
[run]
id = "chaos"
dir = "run"
seed = 1
iterations = ${iterations}
questions_per_iteration = 2

[data]
path = "data"

[student]
checkpoint = "student"

[rollout]
group_size = 2
max_new_tokens = 6

[coordinator]
lease_timeout_s = 5
heartbeat_interval_ms = 200
actor_timeout_s = 2
stall_limit_s = 120

[actors]
count = 2
teacher_timeout_ms = 1000

[learner]
save_every = 1

[learner.grpo]
lr = 1e-3
loss_normalizer = 6

[discriminator]
lr = 1e-3

[[teachers]]
name = "t1"
backend = "candle"
checkpoint = "teacher"

[teachers.sampling]
max_new_tokens = 6
TOML
"$ril" experiment chaos --config run.toml --fault-every-s 1.5 --seed "$seed" 2>chaos.log
