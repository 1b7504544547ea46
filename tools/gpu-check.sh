#!/usr/bin/env bash
# The GPU check, in two halves, for a lent H100/H200 (CUDA driver, NCCL from the nvidia-nccl
# Python package; no Rust toolchain and no network there).
#
#   Here (build machine):   tools/gpu-check.sh build      -> target/gpu-check/ril (+ this script)
#   There (GPU machine):    tools/gpu-check.sh run [OUT]   -> OUT/gpu-check.txt
#
# `run` prints the environment (`ril env`: features, CUDA driver, NCCL library), then
# `ril bench nccl`: a world-size-1 NCCL communicator doing the learner's bucketed all-reduce on
# device buffers (values checked, bandwidth for 1/10/100 MB), the scalar all-reduce, and the
# error path (a 2-rank communicator with a made-up id and no peer must fail within its timeout).
# candle's CUDA backend (`--features cuda`) needs nvcc to build, which the build machine lacks;
# this check covers the NCCL collective only.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
[ -d "$here/../.git" ] && cd "$here/.."
case "${1:-}" in
  build)
    cargo build --release -p ril-cli --features nccl
    mkdir -p target/gpu-check
    # Stripped: the release profile keeps debug info (~230 MB), over what travels to the GPU machine.
    strip -o target/gpu-check/ril target/release/ril
    cp tools/gpu-check.sh target/gpu-check/
    echo "carry target/gpu-check/ to the GPU machine and run: ./gpu-check.sh run"
    ;;
  run)
    out="${2:-${OUT:-.}}"
    mkdir -p "$out"
    ril="${RIL:-$here/ril}"
    [ -x "$ril" ] || ril=target/gpu-check/ril
    # NCCL from the Python wheel, when that is how it was installed.
    # (nvidia-nccl-cu12 puts it in nvidia/nccl/lib, the cu13 wheels may use another folder: search.)
    nccl_lib=$(python3 - <<'PY' 2>/dev/null || true
import glob, os
try:
    import nvidia
    roots = list(nvidia.__path__)
except Exception:
    roots = []
for root in roots:
    hits = sorted(glob.glob(os.path.join(root, "**", "libnccl.so*"), recursive=True))
    if hits:
        print(os.path.dirname(hits[0]))
        break
PY
)
    [ -n "$nccl_lib" ] && export LD_LIBRARY_PATH="$nccl_lib:${LD_LIBRARY_PATH:-}"
    {
      echo "== nvidia-smi"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
      echo "== ril env"; "$ril" env
      echo "== ril bench nccl"; "$ril" bench nccl --sizes-mb 1,10,100,1000
    } 2>&1 | tee "$out/gpu-check.txt"
    ;;
  *)
    echo "usage: $0 build | run [OUT_DIR]" >&2
    exit 2
    ;;
esac
