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

/// The workspace's `models/` folder.
pub fn models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."))
        .join("models")
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
