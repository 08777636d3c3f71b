#!/usr/bin/env bash
# drllm test suite: fetches the models the tests use (if missing), then runs every test.
# Release mode: the tests compare against llama.cpp, which is built once, optimised.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --deps
scripts/setup.sh --models
cargo test --release --locked --workspace "$@"
