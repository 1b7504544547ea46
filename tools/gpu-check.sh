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
# `run` (under 8 minutes on an H200; each step has its own time limit, a failed step is
# reported and the others still run; the exit status says whether all passed) writes
# OUT/gpu-check.txt and one file per step:
#   1. `ril env` and nvidia-smi: features, CUDA driver, NCCL library;
#   2. the CPU == CUDA self-check (`ril model selfcheck --device cuda:0 --against cpu`): logits,
#      log-probs, greedy tokens, one Dr.GRPO step and one D step against the CPU;
#   3. `ril bench model --device cuda:0` for the tiny and medium presets and a ~0.5B config
#      (bench-configs/llava-0.5b.json): generation tokens/s at batch 1/8/32, training tokens/s;
#   4. the same shapes in PyTorch eager on the same GPU (torch-bench.py, when torch imports),
#      giving ril / PyTorch ratios;
#   5. `ril bench nccl`: the learner's all-reduce at 1 MB .. 1 GB, host-staged and
#      device-resident, values checked, and the error path;
#   6. `ril demo` with every role on cuda:0, timed, with its report.
# RIL_GPU_CHECK_STEPS=1,2,... runs a subset; RIL_GPU_CHECK_DEVICE (default cuda:0) is the device
# (`cpu` makes a dry run of the script on a machine without a GPU).
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
    rm -rf target/gpu-check
    mkdir -p target/gpu-check
    # Stripped: the release profile keeps debug info (~230 MB), over what travels to the GPU machine.
    strip -o target/gpu-check/ril target/release/ril
    # A `--cuda` binary is still ~87 MB stripped (candle's kernels: PTX and sm_90a code), over the
    # 64 MiB carry limit; xz brings it to ~14 MB, and `run` unpacks it (xz, or Python's lzma).
    if [ "$(stat -c %s target/gpu-check/ril)" -gt $((60 * 1024 * 1024)) ]; then
      xz -T0 -6 target/gpu-check/ril
    fi
    cp tools/gpu-check.sh tools/torch-bench.py target/gpu-check/
    cp -r tools/bench-configs target/gpu-check/
    echo "carry target/gpu-check/ to the GPU machine and run: ./gpu-check.sh run"
    ;;
  run)
    out="${2:-${OUT:-.}}"
    mkdir -p "$out"
    # The binary: $RIL, or beside this script, or in target/gpu-check/; a compressed one (see
    # `build`) is unpacked into a temporary folder (not OUT: what OUT holds travels back).
    ril="${RIL:-}"
    if [ -z "$ril" ]; then
      for candidate in "$here/ril" target/gpu-check/ril; do
        if [ -x "$candidate" ]; then ril="$candidate"; break; fi
      done
    fi
    if [ -z "$ril" ]; then
      for packed in "$here/ril.xz" target/gpu-check/ril.xz; do
        [ -f "$packed" ] || continue
        unpacked="$(mktemp -d)"
        if command -v xz > /dev/null; then
          xz -dc "$packed" > "$unpacked/ril"
        else
          python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$packed" "$unpacked/ril"
        fi
        chmod +x "$unpacked/ril"
        ril="$unpacked/ril"
        break
      done
    fi
    [ -n "$ril" ] && [ -x "$ril" ] || { echo "gpu-check: no ril binary (\$RIL, $here/ril[.xz]; run \`$0 build\` first)" >&2; exit 2; }
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
    # The PyTorch script and the 0.5B config: beside this script (a `build` copies them) or in
    # the checkout's tools/.
    assets="$here"
    [ -f "$assets/torch-bench.py" ] || assets=tools
    wanted="${RIL_GPU_CHECK_STEPS:-1,2,3,4,5,6}"
    dev="${RIL_GPU_CHECK_DEVICE:-cuda:0}"
    torch_dev=cpu
    case "$dev" in cuda*) torch_dev=cuda ;; esac
    failed=()
    # step N NAME LIMIT_S COMMAND...: runs it with its limit, its output to OUT/NAME.txt and the
    # summary; records a failure (or a timeout) and goes on.
    step() {
      local n="$1" name="$2" limit="$3"
      shift 3
      case ",$wanted," in *",$n,"*) ;; *) return 0 ;; esac
      echo "== $n. $name (limit ${limit} s): $*"
      local started rc=0
      started=$(date +%s)
      timeout --kill-after=10 "$limit" "$@" > "$out/$name.txt" 2>&1 || rc=$?
      tail -n 60 "$out/$name.txt"
      echo "-- $name: exit $rc after $(( $(date +%s) - started )) s"
      [ "$rc" = 0 ] || failed+=("$name (exit $rc)")
    }
    {
      echo "== nvidia-smi"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
      step 1 env 30 "$ril" env
      step 2 selfcheck-cuda 90 "$ril" model selfcheck --device "$dev" --against cpu --out "$out/selfcheck"
      step 3 bench-model 150 "$ril" bench model --device "$dev" --sizes tiny,medium \
        --configs "$assets/bench-configs/llava-0.5b.json" --json "$out/bench-model.json"
      # torch-bench.py exits 3, saying so, where torch does not import.
      step 4 torch-bench 120 python3 "$assets/torch-bench.py" "$out/bench-model.json" \
        --device "$torch_dev" --out "$out/torch-bench.json"
      step 5 bench-nccl 90 "$ril" bench nccl --paths host,device --sizes-mb 1,10,100,1000
      step 6 demo-cuda 240 "$ril" demo --device "$dev" --out "$out/demo"
      if [ "${#failed[@]}" -gt 0 ]; then
        echo "gpu-check: FAILED: ${failed[*]}"
      else
        echo "gpu-check: every step passed"
      fi
    } 2>&1 | tee "$out/gpu-check.txt"
    grep -q "^gpu-check: every step passed" "$out/gpu-check.txt"
    ;;
  *)
    echo "usage: $0 build [--cuda] | run [OUT_DIR]" >&2
    exit 2
    ;;
esac
