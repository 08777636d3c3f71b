#!/usr/bin/env bash
# Fuzzing the sidecar reader (cargo-fuzz / libFuzzer).
#
#   router-format/fuzz/run.sh build          # what CI runs: install cargo-fuzz if missing, build
#   router-format/fuzz/run.sh run SECONDS    # build, then fuzz for SECONDS (seeded corpus)
#
# Works on the stable toolchain: cargo-fuzz needs nightly-only flags (-Z sanitizer,
# -Z extra-const-ub-checks, ...), which RUSTC_BOOTSTRAP=1 unlocks. The fuzz crate is its own
# workspace (router-format/fuzz/Cargo.toml has a [workspace] table) with its own target dir,
# so it never disturbs the main build in /var/tmp/drllm-target.
# Env: DRLLM_FUZZ_TARGET_DIR (default /var/tmp/drllm-fuzz-target), FUZZ_SANITIZER
# (default address; "none" for a faster, uninstrumented-allocator build), FUZZ_JOBS (default 1).
set -euo pipefail
cd "$(dirname "$0")"
here=$(pwd)
crate=$(cd .. && pwd)

export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="${DRLLM_FUZZ_TARGET_DIR:-/var/tmp/drllm-fuzz-target}"
sanitizer="${FUZZ_SANITIZER:-address}"
target=parse_sidecar

ensure_cargo_fuzz() {
    if ! cargo fuzz --version >/dev/null 2>&1; then
        echo "installing cargo-fuzz" >&2
        cargo install cargo-fuzz --locked
    fi
}

build() {
    ensure_cargo_fuzz
    # --fuzz-dir: this directory; the manifest is found from the crate root
    (cd "$crate" && cargo fuzz build --fuzz-dir "$here" -s "$sanitizer" -O "$target")
}

case "${1:-}" in
build)
    build
    ;;
run)
    secs="${2:?usage: run.sh run SECONDS}"
    build
    corpus="$here/corpus/$target"
    mkdir -p "$corpus" "$here/artifacts/$target"
    cp -n "$here"/seeds/* "$corpus"/ 2>/dev/null || true
    jobs="${FUZZ_JOBS:-1}"
    # more than one job: libFuzzer runs workers that log to fuzz-N.log in the fuzz dir
    parallel=()
    if [ "$jobs" -gt 1 ]; then parallel=(-jobs="$jobs" -workers="$jobs"); fi
    (cd "$here" && cargo fuzz run --fuzz-dir "$here" -s "$sanitizer" -O "$target" \
        "$corpus" -- -max_total_time="$secs" -max_len=65536 -rss_limit_mb=2048 \
        -timeout=10 -print_final_stats=1 ${parallel[@]+"${parallel[@]}"})
    ;;
*)
    echo "usage: $0 build | run SECONDS" >&2
    exit 2
    ;;
esac
