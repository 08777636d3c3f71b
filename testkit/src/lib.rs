//! Test fixtures for drllm: tiny random GGUF models of each supported family that stock
//! llama.cpp loads and runs, block-rewritten copies of models, and deterministic prompts.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::fmt;

mod models;
pub mod quant;
mod rewrite;
pub mod rng;
mod tiny;
mod vocab;

/// The engine's model families: the fixtures build a tiny model of each ([`Family::ALL`]),
/// named as the engine names them ([`Family::arch_name`]).
pub use drllm_engine::Family;
pub use models::{models_dir, models_required, real_model, GEMMA3, REQUIRE_MODELS_ENV, SMOLLM2};
pub use rewrite::{
    default_swa_pattern, rewrite_blocks, swa_from_period, swa_pattern, LLAMA_MAX_LAYERS,
};
pub use tiny::{
    tiny_model_writer, write_tiny_model, TinyExperts, TinySpec, GEMMA3_SWA_PERIOD,
    GRANITE_TINY_SCALES, TINY_CONTEXT_LENGTH,
};
pub use vocab::{
    prompt_text, tiny_vocab, token_type, VocabEntry, BOS_ID, CHATML_TEMPLATE, EOS_ID,
    FIRST_BYTE_ID, UNK_ID, WORDS,
};

/// Errors from the fixture builders.
#[derive(Debug)]
#[non_exhaustive]
pub enum TestkitError {
    /// Reading or writing GGUF failed.
    Gguf(drllm_gguf::GgufError),
    /// The [`TinySpec`] is inconsistent.
    InvalidSpec(String),
    /// The block list given to [`rewrite_blocks`] is invalid.
    InvalidBlocks(String),
    /// A required metadata key is missing or has the wrong type.
    MissingKey(String),
    /// The model uses a feature the rewriter cannot handle safely.
    Unsupported(String),
}

impl fmt::Display for TestkitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TestkitError::Gguf(e) => write!(f, "{e}"),
            TestkitError::InvalidSpec(s) => write!(f, "invalid tiny model spec: {s}"),
            TestkitError::InvalidBlocks(s) => write!(f, "invalid block list: {s}"),
            TestkitError::MissingKey(k) => write!(f, "missing or mistyped metadata key '{k}'"),
            TestkitError::Unsupported(s) => write!(f, "unsupported: {s}"),
        }
    }
}

impl std::error::Error for TestkitError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TestkitError::Gguf(e) => Some(e),
            _ => None,
        }
    }
}

impl From<drllm_gguf::GgufError> for TestkitError {
    fn from(e: drllm_gguf::GgufError) -> Self {
        TestkitError::Gguf(e)
    }
}

impl From<std::io::Error> for TestkitError {
    fn from(e: std::io::Error) -> Self {
        TestkitError::Gguf(drllm_gguf::GgufError::Io(e))
    }
}
