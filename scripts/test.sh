#!/usr/bin/env bash
# Runs every test. Installs what the tests need: from apt if missing, curl, openssl (test
# certificates), OpenSSH server and client and tmux (the gateway's tests), Node.js/npm and
# Chromium; from tests/tools' npm lockfile, Azurite and playwright-core; from ui's lockfile,
# asciinema-player (to check the vendored copy the binary embeds); from PyPI (in a venv under
# target/), the asciinema CLI, moto (a real S3-compatible server) and the checkers of deploy/
# (scripts/check-deploy.sh). Each test starts and stops
# its own components (castvault nodes, Azurite, Chromium) on 127.0.0.1 and stops only the
# processes it started. Last, every cargo-fuzz target runs briefly (cargo-fuzz is installed
# from crates.io if missing).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v curl >/dev/null || missing+=(curl)
command -v openssl >/dev/null || missing+=(openssl)
[[ -x /usr/sbin/sshd ]] || missing+=(openssh-server)
command -v ssh >/dev/null || missing+=(openssh-client)
command -v tmux >/dev/null || missing+=(tmux)
command -v npm >/dev/null || missing+=(nodejs npm)
[[ -x /usr/bin/chromium ]] || missing+=(chromium)
command -v systemd-analyze >/dev/null || missing+=(systemd)
if ((${#missing[@]})); then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
(cd tests/tools && npm ci --no-audit --no-fund --loglevel=error)
# Python tools, pinned, in a venv: the asciinema CLI (exports must play in it) and the checkers
# of deploy/.
venv=target/test-venv
if [[ ! -x $venv/bin/asciinema || ! -x $venv/bin/kubernetes-validate || ! -x $venv/bin/moto_server ]]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r scripts/test-requirements.txt
fi
export PATH="$PWD/$venv/bin:$PATH"
(cd ui && npm ci --no-audit --no-fund --loglevel=error)

cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
scripts/check-deploy.sh
# A short pass of every fuzz target (the closing notes report the 10-minute runs).
FUZZ_QUICK=1 scripts/fuzz.sh 20
