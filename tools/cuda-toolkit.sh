#!/usr/bin/env bash
# The CUDA toolkit pieces that `cargo build --features cuda` needs, from PyPI wheels, into
# target/cuda-toolkit/ (no system CUDA, no GPU, no root needed).
#
#   tools/cuda-toolkit.sh            # download (once), unpack (once), write target/cuda-toolkit/env.sh
#   . target/cuda-toolkit/env.sh     # then, in the shell that builds:
#   cargo build --release -p ril-cli --features cuda,nccl
#
# `--compile-only`: only nvcc and the headers (~105 MB of wheels instead of ~890 MB): enough for
# `cargo check` / `cargo clippy --features cuda,nccl` (build scripts run, nothing is linked),
# not for `cargo build`. `--print-env` also prints the exports (for eval "$(...)").
#
# Why these pieces: candle-kernels' build script (through cudaforge) runs nvcc to make PTX and a
# static library of its quantized-matmul kernels (nvcc needs cicc from nvidia-nvvm, the CRT
# headers, the runtime headers and the CCCL headers it puts on its include path); cudarc, which
# candle's `cuda` switches to `dynamic-linking`, then links libcuda, libcublas, libcublasLt,
# libcurand, libnvrtc and (with ril's `nccl`) libnccl, and candle-kernels links libcudart.
# The wheels ship versioned sonames only (libcublas.so.13, ...), so the linker's `libX.so`
# names are made here as symlinks. libcuda is the driver, which no wheel ships: a stub
# `libcuda.so` (soname libcuda.so.1, every `cu*` function of the toolkit's cuda.h as an empty
# symbol) is compiled for the link, as the full toolkit's lib64/stubs/libcuda.so is; at run
# time the machine's driver provides the real one.
#
# CUDA 13.0: the lent H200s run driver 580 (CUDA 13.0). nvcc must not be newer than the driver
# (the PTX it writes is JIT-compiled by the driver), and cudarc's bindings are pinned to the same
# version in the workspace's Cargo.toml (`cuda-13000`); this script checks that they agree.
#
# Idempotent: wheels already in target/cuda-toolkit/wheels/ are not downloaded again, and an
# unpacked wheel is not unpacked again. RIL_CUDA_TOOLKIT_DIR overrides the location.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/.." && pwd)"
dir="${RIL_CUDA_TOOLKIT_DIR:-$repo/target/cuda-toolkit}"

# The CUDA version these wheels make up, as cudarc spells it (`cuda-13000`, CUDARC_CUDA_VERSION).
cuda_version="13.0"
cudarc_version="13000"
# The compute capability candle's kernels are compiled for: 9.0 is H100/H200 (cudaforge makes it
# sm_90a). Override with CUDA_COMPUTE_CAP when building for another GPU.
compute_cap="${CUDA_COMPUTE_CAP:-90}"

# Pinned wheels: CUDA 13.0 Update 2's component versions. First what the build scripts need
# (nvcc compiling candle's kernels), then the libraries the final link needs.
compile_wheels=(
  nvidia-cuda-nvcc==13.0.88     # bin/nvcc, ptxas, fatbinary, nvlink, cudafe++
  nvidia-nvvm==13.0.88          # nvvm/bin/cicc, libdevice (nvcc's front end)
  nvidia-cuda-crt==13.0.88      # include/crt/ (host_config.h, ...)
  nvidia-cuda-runtime==13.0.96  # cuda.h, cuda_runtime.h, cuda_fp16.h, ...; libcudart.so.13
  nvidia-cuda-cccl==13.0.85     # include/cccl/ (nv/target, cuda/std, thrust) that those use
)
link_wheels=(
  nvidia-cuda-nvrtc==13.0.88    # libnvrtc.so.13 (candle compiles some kernels at run time)
  nvidia-cublas==13.1.0.3       # libcublas.so.13, libcublasLt.so.13
  nvidia-curand==10.4.0.35      # libcurand.so.10
  nvidia-nccl-cu13==2.30.7      # libnccl.so.2 (cudarc links it with `nccl`; its bindings are NCCL 2.30)
)

print_env=0
compile_only=0
for arg in "$@"; do
  case "$arg" in
    --print-env) print_env=1 ;;
    --compile-only) compile_only=1 ;;
    -h | --help)
      sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "usage: $0 [--compile-only] [--print-env]" >&2
      exit 2
      ;;
  esac
done
wheels=("${compile_wheels[@]}")
[ "$compile_only" = 1 ] || wheels+=("${link_wheels[@]}")

log() { echo "cuda-toolkit: $*" >&2; }
die() {
  echo "cuda-toolkit: error: $*" >&2
  exit 1
}

# The workspace's cudarc version feature must be the toolkit's: candle's `cuda` adds
# `cuda-version-from-build-system`, but a version feature, when one is set, wins over it.
pinned=$(grep -o '"cuda-[0-9]\{5\}"' "$repo/Cargo.toml" | tr -d '"' | sort -u)
[ "$pinned" = "cuda-$cudarc_version" ] ||
  die "the workspace pins cudarc to '${pinned:-no version}' but these wheels are CUDA $cuda_version (cuda-$cudarc_version): change one of them"

command -v python3 > /dev/null || die "python3 is needed (pip downloads the wheels, zipfile unpacks them)"
command -v cc > /dev/null || die "a C compiler (cc) is needed for the libcuda stub and as nvcc's host compiler"

mkdir -p "$dir/wheels" "$dir/root" "$dir/root/.unpacked"

# 1. Download what is missing. `pip download --no-deps` fetches exactly the pinned file.
for spec in "${wheels[@]}"; do
  name="${spec%%==*}"
  version="${spec##*==}"
  file_prefix="$(echo "$name" | tr '-' '_')-${version}-"
  if compgen -G "$dir/wheels/${file_prefix}*.whl" > /dev/null; then
    continue
  fi
  log "downloading $spec"
  if ! python3 -m pip download --disable-pip-version-check --no-deps --quiet \
    --dest "$dir/wheels" "$spec" >&2; then
    die "could not download $spec from the package index (network? the pinned version still published?)"
  fi
  compgen -G "$dir/wheels/${file_prefix}*.whl" > /dev/null ||
    die "pip reported success for $spec but no ${file_prefix}*.whl is in $dir/wheels"
done

# 2. Unpack each wheel once into root/ (all the CUDA 13 wheels share the nvidia/cu13/ prefix,
# so their bin/, include/ and lib/ merge into one toolkit tree). zipfile does not keep the
# executable bits, so they are restored from the archive's Unix modes.
for spec in "${wheels[@]}"; do
  name="${spec%%==*}"
  version="${spec##*==}"
  file_prefix="$(echo "$name" | tr '-' '_')-${version}-"
  whl=$(compgen -G "$dir/wheels/${file_prefix}*.whl" | head -n 1)
  marker="$dir/root/.unpacked/$(basename "$whl")"
  [ -e "$marker" ] && continue
  log "unpacking $(basename "$whl")"
  python3 - "$whl" "$dir/root" << 'PY' || die "could not unpack $whl (corrupt download? delete it and rerun)"
import os, sys, zipfile
whl, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as z:
    for info in z.infolist():
        if ".dist-info/" in info.filename:
            continue
        path = z.extract(info, dest)
        mode = (info.external_attr >> 16) & 0o777
        if mode:
            os.chmod(path, mode)
PY
  touch "$marker"
done

cuda_home="$dir/root/nvidia/cu13"
[ -x "$cuda_home/bin/nvcc" ] || die "no bin/nvcc in $cuda_home after unpacking"

# 3. The CUDA_HOME layout that build scripts and the linker look for: lib64/, the unversioned
# `libX.so` names, libnccl beside them, and the libcuda stub (see the top of this file).
link_layout() {
  local so base nccl_so stub_dir="$cuda_home/lib/stubs"
  for so in "$cuda_home"/lib/lib*.so.[0-9]*; do
    base="$(basename "$so")"
    ln -sfn "$base" "$cuda_home/lib/${base%%.so.*}.so"
  done
  # NCCL's wheel lives beside the toolkit (nvidia/nccl/), not in nvidia/cu13/.
  nccl_so=$(compgen -G "$dir/root/nvidia/nccl/lib/libnccl.so.[0-9]*" | head -n 1) ||
    die "no libnccl.so.N in $dir/root/nvidia/nccl/lib"
  ln -sfn "../../nccl/lib/$(basename "$nccl_so")" "$cuda_home/lib/libnccl.so"
  ln -sfn "../../nccl/include/nccl.h" "$cuda_home/include/nccl.h"

  if [ ! -e "$stub_dir/libcuda.so" ] || [ "$cuda_home/include/cuda.h" -nt "$stub_dir/libcuda.so" ]; then
    log "compiling the libcuda.so stub"
    mkdir -p "$stub_dir"
    # Every function name cuda.h declares, before (cuCtxCreate) and after its versioning macros
    # (cuCtxCreate_v4, ..._ptsz): cudarc's bindings use the expanded names.
    {
      grep -o '\bcu[A-Z][A-Za-z0-9_]*\s*(' "$cuda_home/include/cuda.h"
      cc -E -P -I"$cuda_home/include" "$cuda_home/include/cuda.h" |
        grep -o '\bcu[A-Z][A-Za-z0-9_]*\s*('
      cc -E -P -DCUDA_API_PER_THREAD_DEFAULT_STREAM -I"$cuda_home/include" "$cuda_home/include/cuda.h" |
        grep -o '\bcu[A-Z][A-Za-z0-9_]*\s*('
    } | sed 's/\s*($//' | sort -u | awk '{ print "void " $1 "(void) {}" }' > "$stub_dir/libcuda-stub.c"
    [ -s "$stub_dir/libcuda-stub.c" ] || die "found no cu* functions in $cuda_home/include/cuda.h"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub_dir/libcuda.so" "$stub_dir/libcuda-stub.c"
  fi

  local lib
  for lib in libcudart libcublas libcublasLt libcurand libnvrtc libnccl stubs/libcuda; do
    [ -e "$cuda_home/lib/$lib.so" ] || die "$cuda_home/lib/$lib.so is missing"
  done
}
ln -sfn lib "$cuda_home/lib64"
[ "$compile_only" = 1 ] || link_layout

# 4. Check that nvcc runs and is the version cudarc is pinned to.
nvcc_release=$("$cuda_home/bin/nvcc" --version | sed -n 's/.*release \([0-9]*\.[0-9]*\).*/\1/p')
[ "$nvcc_release" = "$cuda_version" ] ||
  die "$cuda_home/bin/nvcc reports release '${nvcc_release:-?}', expected $cuda_version"

# 5. The environment the build needs.
env_file="$dir/env.sh"
cat > "$env_file" << EOF
# Written by tools/cuda-toolkit.sh: source it before \`cargo build --features cuda\`.
# nvcc (PATH, NVCC) and the toolkit root (CUDA_HOME/CUDA_PATH: cudaforge and cudarc's link
# search read them) from the PyPI wheels; the compute capability candle's kernels are compiled
# for. cudarc's CUDA version is the workspace's \`cuda-$cudarc_version\` feature (Cargo.toml),
# so CUDARC_CUDA_VERSION is left unset (set to another version, it would contradict it).
export CUDA_HOME="$cuda_home"
export CUDA_PATH="$cuda_home"
export NVCC="$cuda_home/bin/nvcc"
export PATH="$cuda_home/bin:\${PATH}"
export CUDA_COMPUTE_CAP="$compute_cap"
# cudaforge compiles candle's kernels on half the cores by default (one on a 2-core machine), and
# nearly every crate waits for them: use them all.
export CUDAFORGE_THREADS="\${CUDAFORGE_THREADS:-\$(nproc)}"
EOF
log "CUDA $cuda_version toolkit ready in $cuda_home"
log "environment written to $env_file"
if [ "$print_env" = 1 ]; then
  grep '^export' "$env_file"
else
  if [ "$compile_only" = 1 ]; then
    log "compile-only (no libraries to link): . $env_file && cargo check -p ril-cli --features cuda,nccl"
  else
    log "build with: . $env_file && cargo build --release -p ril-cli --features cuda,nccl"
  fi
fi
