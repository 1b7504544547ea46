#!/usr/bin/env bash
# The GPU check, in two halves, for a lent H100/H200 (CUDA driver, NCCL from the nvidia-nccl
# Python package; no Rust toolchain and no network there).
#
#   Here (build machine):   tools/gpu-check.sh build [--cuda]  -> target/gpu-check/ril (+ this script)
#   There (GPU machine):    tools/gpu-check.sh run [OUT]        -> OUT/gpu-check.txt
#
# `build` makes `ril` with `--features nccl` (cudarc loads libcuda/libnccl at run time; no CUDA
# toolkit needed). `build --cuda` makes it with `--features cuda,nccl` (candle's CUDA backend):
# it first runs tools/cuda-toolkit.sh (the CUDA 13.0 toolkit from PyPI wheels into
# target/cuda-toolkit/) and builds in its environment. Such a binary is linked against the CUDA
# libraries (libcudart/libcublas/libcublasLt/libcurand/libnvrtc .so.13 and .so.10, libnccl.so.2,
# the driver's libcuda.so.1), so `run` puts the lib folders of the machine's NVIDIA Python
# wheels on LD_LIBRARY_PATH and says which library is still missing.
#
# `run` prints the environment (`ril env`: features, CUDA driver, NCCL library), then
# `ril bench nccl`: a world-size-1 NCCL communicator doing the learner's bucketed all-reduce on
# device buffers (values checked, bandwidth for 1/10/100 MB), the scalar all-reduce, and the
# error path (a 2-rank communicator with a made-up id and no peer must fail within its timeout).
# The model on the GPU (CPU == CUDA self-check, model benchmarks) is not part of it yet.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
[ -d "$here/../.git" ] && cd "$here/.."
case "${1:-}" in
  build)
    case "${2:-}" in
      "") features=nccl ;;
      --cuda)
        features=cuda,nccl
        tools/cuda-toolkit.sh
        # shellcheck source=/dev/null
        . target/cuda-toolkit/env.sh
        ;;
      *)
        echo "usage: $0 build [--cuda]" >&2
        exit 2
        ;;
    esac
    cargo build --release -p ril-cli --features "$features"
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
    # NCCL (and, for a `--cuda` build, the CUDA libraries) from the machine's Python wheels, when
    # that is how they were installed: every folder of the `nvidia` packages holding one of them
    # (nvidia/nccl/lib, nvidia/cu13/lib, ...).
    wheel_libs=$(python3 - <<'PY' 2>/dev/null || true
import glob, os
try:
    import nvidia
    roots = list(nvidia.__path__)
except Exception:
    roots = []
wanted = ("libnccl.so.2", "libcudart.so.13", "libcublas.so.13", "libcublasLt.so.13",
          "libcurand.so.10", "libnvrtc.so.13")
dirs = []
for root in roots:
    for name in wanted:
        for hit in sorted(glob.glob(os.path.join(root, "**", name), recursive=True)):
            d = os.path.dirname(hit)
            if d not in dirs:
                dirs.append(d)
print(":".join(dirs))
PY
)
    [ -n "$wheel_libs" ] && export LD_LIBRARY_PATH="$wheel_libs:${LD_LIBRARY_PATH:-}"
    # A `--cuda` build does not start without its libraries: name the missing ones first.
    missing=$(ldd "$ril" 2>/dev/null | grep 'not found' || true)
    if [ -n "$missing" ]; then
      echo "gpu-check: $ril cannot find these libraries (LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}):" >&2
      echo "$missing" >&2
    fi
    {
      echo "== nvidia-smi"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
      echo "== ril env"; "$ril" env
      echo "== ril bench nccl"; "$ril" bench nccl --sizes-mb 1,10,100,1000
    } 2>&1 | tee "$out/gpu-check.txt"
    ;;
  *)
    echo "usage: $0 build [--cuda] | run [OUT_DIR]" >&2
    exit 2
    ;;
esac
