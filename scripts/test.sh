#!/usr/bin/env bash
# drllm test suite: fetches the models the tests use (if missing), then runs every test
# (DRLLM_REQUIRE_MODELS=1: none of them may pass without its model; the Python SDKs the
# compatibility tests drive are installed by scripts/sdk-env.sh).
# Release mode: the tests compare against llama.cpp, which is built once, optimised.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --deps
scripts/setup.sh --models
# a test that needs a model file fails when it is missing, instead of passing with a note
export DRLLM_REQUIRE_MODELS=1
# the real clients apps use (the openai Python SDK, pinned), for tests/sdk_tests.rs
DRLLM_SDK_PYTHONPATH=$(scripts/sdk-env.sh)
export DRLLM_SDK_PYTHONPATH DRLLM_REQUIRE_SDK=1
cargo test --release --locked --workspace "$@"
