//! Typed errors of the engine.

use std::fmt;
use std::path::PathBuf;

/// Everything that can go wrong while loading a model or running it.
#[derive(Debug)]
#[non_exhaustive]
pub enum EngineError {
    /// The file could not be read.
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The GGUF container is malformed (checked by drllm's own hardened reader before ggml sees it).
    Gguf {
        path: PathBuf,
        source: drllm_gguf::GgufError,
    },
    /// The model's architecture is not one the engine implements (`supported`: the names of
    /// those it does, filled in where the error is raised).
    UnsupportedArchitecture {
        found: String,
        supported: &'static [&'static str],
    },
    /// A metadata key the architecture needs is absent.
    MissingMetadata { key: String },
    /// A metadata key has a value the engine cannot use.
    BadMetadata { key: String, reason: String },
    /// A tensor the architecture needs is absent.
    MissingTensor { name: String },
    /// A tensor has another shape or type than the architecture needs.
    BadTensor { name: String, reason: String },
    /// The file has tensors the architecture's graph does not use.
    UnusedTensors { arch: String, names: Vec<String> },
    /// ggml or one of its backends failed.
    Ggml(String),
    /// A layer path is invalid for this model.
    Path(crate::path::PathError),
    /// The sequence would not fit in the context.
    ContextFull { needed: usize, n_ctx: usize },
    /// A token id outside the vocabulary.
    InvalidToken { token: i32, n_vocab: usize },
    /// Tokenizer, chat template or sampler failure (llama.cpp side).
    Tokenizer(String),
    /// A prefill hook (router) failed.
    Hook(String),
    /// The engine was used in a way its state does not allow.
    State(String),
    /// Stock llama.cpp (the reference runner) failed.
    Stock(String),
    /// A router sidecar is malformed or belongs to another model.
    Sidecar {
        path: PathBuf,
        source: drllm_router_format::FormatError,
    },
}

impl fmt::Display for EngineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EngineError::Io { path, source } => write!(f, "{}: {source}", path.display()),
            EngineError::Gguf { path, source } => {
                write!(f, "{}: malformed GGUF file: {source}", path.display())
            }
            EngineError::UnsupportedArchitecture { found, supported } => write!(
                f,
                "unsupported model architecture '{found}' (supported: {})",
                supported.join(", ")
            ),
            EngineError::MissingMetadata { key } => write!(f, "missing metadata key '{key}'"),
            EngineError::BadMetadata { key, reason } => {
                write!(f, "bad metadata value for '{key}': {reason}")
            }
            EngineError::MissingTensor { name } => write!(f, "missing tensor '{name}'"),
            EngineError::BadTensor { name, reason } => write!(f, "tensor '{name}': {reason}"),
            EngineError::UnusedTensors { arch, names } => {
                let shown: Vec<&str> = names.iter().take(8).map(String::as_str).collect();
                write!(
                    f,
                    "the file has {} tensor(s) a {arch} model does not use ({}{}): it would \
                     not run as llama.cpp runs it",
                    names.len(),
                    shown.join(", "),
                    if names.len() > shown.len() {
                        ", ..."
                    } else {
                        ""
                    }
                )
            }
            EngineError::Ggml(msg) => write!(f, "ggml: {msg}"),
            EngineError::Path(e) => write!(f, "layer path: {e}"),
            EngineError::ContextFull { needed, n_ctx } => write!(
                f,
                "sequence of {needed} tokens does not fit in the context of {n_ctx} tokens"
            ),
            EngineError::InvalidToken { token, n_vocab } => {
                write!(
                    f,
                    "token id {token} is outside the vocabulary (size {n_vocab})"
                )
            }
            EngineError::Tokenizer(msg) => write!(f, "tokenizer: {msg}"),
            EngineError::Hook(msg) => write!(f, "prefill hook: {msg}"),
            EngineError::State(msg) => write!(f, "{msg}"),
            EngineError::Stock(msg) => write!(f, "stock llama.cpp: {msg}"),
            EngineError::Sidecar { path, source } => write!(f, "{}: {source}", path.display()),
        }
    }
}

impl std::error::Error for EngineError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            EngineError::Io { source, .. } => Some(source),
            EngineError::Gguf { source, .. } => Some(source),
            EngineError::Path(e) => Some(e),
            EngineError::Sidecar { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<crate::path::PathError> for EngineError {
    fn from(e: crate::path::PathError) -> Self {
        EngineError::Path(e)
    }
}

/// Result alias of the engine.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
