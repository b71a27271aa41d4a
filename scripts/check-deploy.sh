#!/usr/bin/env bash
# Checks every file under deploy/ with something that parses it: Kubernetes manifests against
# the Kubernetes schemas (kubernetes-validate, strict), the Bicep with the tree-sitter Bicep
# grammar, the systemd unit with systemd-analyze, the Tailscale policy, the Dockerfile and the
# ConfigMap's castvault config with scripts/check_deploy.py. Needs the debug binary built.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/test-venv
if [[ ! -x $venv/bin/kubernetes-validate ]]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r scripts/test-requirements.txt
fi

"$venv/bin/kubernetes-validate" --strict deploy/kubernetes/*.yaml
node tests/tools/check-bicep.cjs deploy/azure/*.bicep

unit=$(mktemp --suffix=.service)
trap 'rm -f "$unit"' EXIT
sed "s|/usr/local/bin/castvault|$PWD/target/debug/castvault|" deploy/systemd/castvault.service >"$unit"
out=$(systemd-analyze verify "$unit" 2>&1) || { echo "$out"; exit 1; }
if [[ -n $out ]]; then echo "deploy/systemd/castvault.service: $out"; exit 1; fi
echo "deploy/systemd/castvault.service: systemd-analyze verify clean"

"$venv/bin/python" scripts/check_deploy.py target/debug/castvault
