//! The real model files `scripts/setup.sh --models` places in the workspace's `models/`, for
//! tests that run them. A test that needs one and does not find it prints a note and returns,
//! so a plain `cargo test` on a checkout without models passes what it can run; with
//! `DRLLM_REQUIRE_MODELS=1` (set by `scripts/test.sh`, and so in CI) it fails instead, so a
//! green run never hides a test that ran nothing.

use std::path::{Path, PathBuf};

/// The default model's file.
pub const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// The second model's file.
pub const GEMMA3: &str = "gemma-3-270m-q4_k_m.gguf";
/// Set to `1`: a missing model file fails the test that needs it.
pub const REQUIRE_MODELS_ENV: &str = "DRLLM_REQUIRE_MODELS";

/// The workspace root, found at run time: the first folder holding `Cargo.lock` above cargo's
/// `CARGO_MANIFEST_DIR` of the running test (a build reused from a clone of the workspace at
/// another place, sharing the target folder, would otherwise look in that clone).
pub fn workspace_root() -> PathBuf {
    let start = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    start
        .ancestors()
        .find(|d| d.join("Cargo.lock").is_file())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| start.parent().unwrap_or(Path::new(".")).to_path_buf())
}

/// The workspace's `models/` folder.
pub fn models_dir() -> PathBuf {
    workspace_root().join("models")
}

/// Whether missing model files fail tests (`DRLLM_REQUIRE_MODELS=1`).
pub fn models_required() -> bool {
    std::env::var(REQUIRE_MODELS_ENV).as_deref() == Ok("1")
}

/// `models/FILE` if it exists. If not: a panic naming the file when
/// `DRLLM_REQUIRE_MODELS=1`, else a note on stderr and `None` (the caller returns).
pub fn real_model(file: &str) -> Option<PathBuf> {
    let p = models_dir().join(file);
    if p.exists() {
        return Some(p);
    }
    assert!(
        !models_required(),
        "{} is missing and {REQUIRE_MODELS_ENV}=1: run scripts/setup.sh --models",
        p.display()
    );
    eprintln!(
        "skipping: {} not present (run scripts/setup.sh --models; {REQUIRE_MODELS_ENV}=1 makes this a failure)",
        p.display()
    );
    None
}
