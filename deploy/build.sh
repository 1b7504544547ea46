#!/usr/bin/env bash
# Builds the `ril` binary that the container images ship and lays it out as the image's root
# filesystem. deploy/Dockerfile and deploy/Dockerfile.cuda run exactly this; CI runs it too
# (deploy/check.sh, with the dev profile), so the image's build steps are the ones CI exercises.
#
#   deploy/build.sh [--profile release|dev] [--features LIST] OUT_DIR
#
# Leaves OUT_DIR/usr/local/bin/ril (debug info stripped, symbols kept for backtraces), then
# checks that the binary runs and has every role the Kubernetes manifests start.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
features=""
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile="$2"; shift 2 ;;
    --features) features="$2"; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    -*) echo "deploy/build.sh: unknown flag $1" >&2; exit 2 ;;
    *) break ;;
  esac
done
[ $# -eq 1 ] || { echo "usage: deploy/build.sh [--profile release|dev] [--features LIST] OUT_DIR" >&2; exit 2; }
out="$1"

build=(cargo build --locked --profile "$profile" -p ril-cli --bin ril)
[ -n "$features" ] && build+=(--features "$features")
echo "+ ${build[*]}"
"${build[@]}"

case "$profile" in
  dev|test) profile_dir=debug ;;
  *) profile_dir="$profile" ;;
esac
bin="${CARGO_TARGET_DIR:-target}/$profile_dir/ril"
install -d "$out/usr/local/bin"
# The release profile keeps line tables (~230 MB); the image needs none of it.
strip --strip-debug -o "$out/usr/local/bin/ril" "$bin"
chmod 0755 "$out/usr/local/bin/ril"

# The binary runs, and every role and flag layout the manifests rely on is there.
ril="$out/usr/local/bin/ril"
"$ril" --version
"$ril" env
for role in coordinator learner teacher "discriminator serve" actor status "config check"; do
  # shellcheck disable=SC2086 # the role is one or two words
  "$ril" $role --help > /dev/null
done
echo "deploy/build.sh: $ril ($(du -h "$ril" | cut -f1))"
