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
cd "$(dirname "$0")/.."
case "${1:-}" in
  build)
    cargo build --release -p ril-cli --features nccl
    mkdir -p target/gpu-check
    cp target/release/ril target/gpu-check/ril
    cp tools/gpu-check.sh target/gpu-check/
    echo "carry target/gpu-check/ to the GPU machine and run: ./gpu-check.sh run"
    ;;
  run)
    out="${2:-${OUT:-.}}"
    mkdir -p "$out"
    here="$(cd "$(dirname "$0")" && pwd)"
    ril="${RIL:-$here/ril}"
    [ -x "$ril" ] || ril=target/gpu-check/ril
    # NCCL from the Python wheel, when that is how it was installed.
    nccl_lib=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(os.path.dirname(nvidia.nccl.__file__), "lib"))' 2>/dev/null || true)
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
