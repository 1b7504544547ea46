#!/usr/bin/env bash
# CI's fuzz stage: every fuzz target (fuzz/src/lib.rs, TARGETS) runs for a bounded time over its
# committed corpus (fuzz/corpus/<target>/). Any crash or hang fails the stage; the input is left
# under fuzz/artifacts/<target>/ (libFuzzer: fuzz/libfuzzer/artifacts/<target>/).
#
#   RIL_FUZZ_SECONDS   seconds per target (default 20; 12 targets, so about 4 minutes)
#   RIL_FUZZ_ENGINE    stable | libfuzzer | auto (default stable, see below)
#
# Engines (both call the same harness functions):
# - stable: `ril-fuzz run` (fuzz/src/main.rs), built with the workspace's own toolchain, target
#   directory and dev profile: replays the corpus, then seeded random mutations of it (no coverage
#   feedback). Works on any machine that builds the workspace.
# - libfuzzer: `cargo +nightly fuzz run` over fuzz/libfuzzer/ (coverage-guided, AddressSanitizer
#   off: the code is safe Rust). Needs a nightly toolchain; cargo-fuzz is installed from
#   crates.io into target/fuzz-tools/ when missing. Its first build compiles every dependency
#   again with coverage instrumentation (the plain dev build alone took 25 minutes on the
#   2-core machine), so it is not the default. NOT YET RUN on this project: the path is written
#   but has not been exercised.
# - auto: libfuzzer when `cargo +nightly` works, stable otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${RIL_FUZZ_SECONDS:-20}"
engine="${RIL_FUZZ_ENGINE:-stable}"
target_dir="${CARGO_TARGET_DIR:-target}"

if [[ "${engine}" == auto ]]; then
  if cargo +nightly --version >/dev/null 2>&1; then engine=libfuzzer; else engine=stable; fi
fi
echo "fuzz engine: ${engine}, ${seconds} s per target"

case "${engine}" in
  stable)
    # The dev profile on purpose: it reuses `cargo test`'s artifacts (dependencies are built at
    # opt-level 3 there too) and keeps overflow checks and debug assertions on.
    cargo build --locked -p ril-fuzz
    "${target_dir}/debug/ril-fuzz" run --seconds "${seconds}" --seed "${RIL_FUZZ_SEED:-$(date +%s)}"
    ;;
  libfuzzer)
    tools="$(pwd)/${target_dir}/fuzz-tools"
    if ! command -v cargo-fuzz >/dev/null 2>&1 && [[ ! -x "${tools}/bin/cargo-fuzz" ]]; then
      cargo install --locked --root "${tools}" cargo-fuzz
    fi
    export PATH="${tools}/bin:${PATH}"
    for t in $(cargo run --quiet --locked -p ril-fuzz -- list); do
      # A scratch copy of the corpus: libFuzzer adds what it finds; the committed seeds stay.
      work="${target_dir}/fuzz-corpus/${t}"
      mkdir -p "${work}"
      cp -n fuzz/corpus/"${t}"/* "${work}/" 2>/dev/null || true
      cargo +nightly fuzz run --fuzz-dir fuzz/libfuzzer --sanitizer none "${t}" "${work}" -- \
        -max_total_time="${seconds}" -timeout=20 -rss_limit_mb=4096 -print_final_stats=1
    done
    ;;
  *)
    echo "RIL_FUZZ_ENGINE must be stable, libfuzzer or auto, not ${engine}" >&2
    exit 2
    ;;
esac
