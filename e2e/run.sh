#!/usr/bin/env bash
# Runs the end-to-end suite against the cluster KUBECONFIG names (skips,
# saying why, when there is none). Installs helm and kubectl first. Whatever
# happens to the test binary, namespaces the suite created are deleted on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="$(bash .ci/k8s-tools.sh)"
cleanup() {
  if "$bin/kubectl" version --request-timeout=5s >/dev/null 2>&1; then
    "$bin/kubectl" delete namespace -l app.kubernetes.io/created-by=mcp-warden-e2e \
      --wait=false --ignore-not-found >/dev/null 2>&1 || true
    "$bin/kubectl" delete validatingadmissionpolicybindings,validatingadmissionpolicies \
      -l app.kubernetes.io/created-by=mcp-warden-e2e --ignore-not-found >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT
cargo test --locked --test e2e -- --ignored --test-threads=1 --nocapture
