#!/usr/bin/env bash
# Validate what deploy/ ships against the tools' own schemas, offline:
#   - every Kubernetes manifest with kubernetes-validate --strict (PyPI; it ships the OpenAPI
#     schemas of the Kubernetes releases, so no cluster and no network are needed);
#   - the Prometheus alert rules with `promtool check rules` (Debian's prometheus package),
#     skipped with one line when promtool cannot be had. The scrape job is not checked with
#     `promtool check config`: Debian builds Prometheus without the Kubernetes service
#     discovery ("field kubernetes_sd_configs not found"), so it would reject a valid file.
# Each validator is first shown a broken file and must reject it, so a validator that
# silently passes everything cannot turn this green.
#
#   bash deploy/check-manifests.sh      (.ci/run calls it inside the project's venv)
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf 'check-manifests: %s\n' "$*"; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

PY=${PYTHON:-python}
if ! "$PY" -c 'import kubernetes_validate' 2>/dev/null; then
  "$PY" -m pip install -q kubernetes-validate
fi
kv() { "$PY" -m kubernetes_validate "$@"; }

cat >"$tmp/broken.yaml" <<'YAML'
apiVersion: apps/v1
kind: Deployment
metadata: {name: broken}
spec:
  selector: {matchLabels: {app: x}}
  template:
    metadata: {labels: {app: x}}
    spec:
      containers:
        - name: x
          image: x
          livenessProbe: {httpGet: {path: /healthz, port: 8053}, periodSecond: 5}
YAML
if kv --strict "$tmp/broken.yaml" >/dev/null 2>&1; then
  say "FAIL: kubernetes-validate accepted a manifest with an unknown field"; exit 1
fi
mapfile -t manifests < <(find deploy/kubernetes -name '*.yaml' -o -name '*.yml' | sort)
kv --strict "${manifests[@]}"
say "${#manifests[@]} Kubernetes manifests valid (kubernetes-validate --strict)"

if ! command -v promtool >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus) \
    >/dev/null 2>&1 || true
fi
if ! command -v promtool >/dev/null 2>&1; then
  say "promtool skipped: Debian's prometheus package could not be installed"
  exit 0
fi
printf 'groups:\n  - name: x\n    rules:\n      - alert: X\n        expr: rate(x[5m] > 1\n' >"$tmp/broken-rules.yaml"
if promtool check rules "$tmp/broken-rules.yaml" >/dev/null 2>&1; then
  say "FAIL: promtool accepted a broken rule"; exit 1
fi
promtool check rules deploy/prometheus/alerts.yaml
say "Prometheus alert rules valid (promtool check rules)"
