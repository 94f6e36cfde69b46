#!/usr/bin/env bash
# The test command: installs (idempotently) the real peers the tests run against, then runs
# formatting, lints and the whole test suite. CI runs exactly this (via .ci/run, with CI=true,
# under which a missing prerequisite fails a test instead of skipping it).
set -euo pipefail
cd "$(dirname "$0")"
./scripts/install-peers.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
# The fuzz targets live outside the workspace: make sure they still build.
# Not --locked: the fuzz crate has its own lock file, which trails the workspace's.
cargo check --manifest-path fuzz/Cargo.toml
