#!/usr/bin/env bash
# Runs the end-to-end suite against the cluster KUBECONFIG names (skips,
# saying why, when there is none). Installs helm and kubectl first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/k8s-tools.sh >/dev/null
exec cargo test --locked --test e2e -- --ignored --test-threads=1 --nocapture
