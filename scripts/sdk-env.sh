#!/usr/bin/env bash
# The real Python clients the compatibility tests drive (tests/sdk_tests.rs), pinned, installed
# with pip into a folder of their own (no venv module needed): prints the PYTHONPATH to use.
#   scripts/sdk-env.sh            installs if missing, prints the folder
# DRLLM_SDK_DIR overrides the folder (default: $CARGO_TARGET_DIR/python-sdk, else
# target/python-sdk). Idempotent: a folder holding these versions is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=(openai==3.60.0)
dir=${DRLLM_SDK_DIR:-${CARGO_TARGET_DIR:-target}/python-sdk}
stamp="$dir/.drllm-sdk"
want="${PACKAGES[*]}"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  rm -rf "$dir"
  mkdir -p "$dir"
  echo "[sdk] installing ${PACKAGES[*]} into $dir" >&2
  PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check \
    --no-warn-script-location \
    --target "$dir" "${PACKAGES[@]}" >&2
  printf '%s' "$want" > "$stamp"
fi
printf '%s\n' "$(cd "$dir" && pwd)"
