//! drllm's inference engine: GGUF models on ggml with a per-request layer path.
//!
//! - [`Model`] loads a GGUF file into ggml backend buffers (llama.cpp's buffer-type choice).
//! - [`Session`] holds one sequence: a KV cache with one slot per (block, pass), the sequence's
//!   fixed [`LayerPath`], prefill (fixed path, or block by block through a [`PrefillHook`]) and
//!   cached decoding.
//! - [`Tokenizer`] and [`Sampler`] come from llama.cpp (through `llama-cpp-2`).
//! - [`stock`] runs stock llama.cpp on the same file, the reference for parity and speed.

pub mod arch;
mod chat;
mod config;
mod embed;
mod error;
mod ffi;
mod generate;
mod grammar;
mod graph;
mod kv;
mod model;
mod path;
mod routing;
mod sampler;
mod session;
pub mod stock;
mod tokenizer;

pub use arch::{Family, Keys, SUPPORTED_ARCHITECTURES};
pub use chat::{
    ChatError, ChatInput, ChatParser, ChatPrompt, ChatTemplates, GrammarTrigger, MessageDiff,
    ParsedMessage, ToolCall, ToolChoice,
};
pub use config::{ModelConfig, RopeConfig};
pub use drllm_router_format as router_format;
pub use embed::{normalized, Pooling};
pub use error::{EngineError, Result};
pub use generate::{
    generate, run_to_end, FinishReason, GenerateOptions, Generation, Step, Stepper, StopScanner,
    TokenLogprob, ToolCallLimit, MAX_TOP_LOGPROBS,
};
pub use grammar::{json_schema_to_gbnf, Grammar, GrammarError};
pub use model::{DeviceChoice, Model};
pub use path::{LayerPath, Pass, PathError, MAX_PASSES_PER_BLOCK};
pub use routing::{constant_sidecar, decide, BlockDecision, RouteOptions, RouterHook, Routers};
pub use sampler::{argmax, Sampler, SamplingParams};
pub use session::{
    Hidden, Logits, PassState, Prefill, PrefillHook, Route, SavedStates, SeqSnapshot, Session,
    SessionOptions, MAX_DECODE_BATCH,
};
pub use tokenizer::{ChatMessage, TextStream, Tokenizer};

use std::sync::OnceLock;

static BACKEND: OnceLock<Option<llama_cpp_2::llama_backend::LlamaBackend>> = OnceLock::new();

/// Initialises llama.cpp and ggml once per process and routes their logs (quiet unless
/// `DRLLM_VERBOSE` is set).
pub(crate) fn init_backend() -> Option<&'static llama_cpp_2::llama_backend::LlamaBackend> {
    BACKEND
        .get_or_init(|| {
            install_log_filter();
            llama_cpp_2::llama_backend::LlamaBackend::init().ok()
        })
        .as_ref()
}

/// Returns the process-wide llama.cpp backend handle.
pub(crate) fn backend() -> Result<&'static llama_cpp_2::llama_backend::LlamaBackend> {
    init_backend()
        .ok_or_else(|| EngineError::Stock("llama.cpp backend failed to initialise".into()))
}

extern "C" fn log_filter(
    level: llama_cpp_sys_2::ggml_log_level,
    text: *const std::os::raw::c_char,
    _data: *mut std::os::raw::c_void,
) {
    static VERBOSE: OnceLock<bool> = OnceLock::new();
    let verbose = *VERBOSE.get_or_init(|| std::env::var_os("DRLLM_VERBOSE").is_some());
    if text.is_null() {
        return;
    }
    if verbose || level == llama_cpp_sys_2::GGML_LOG_LEVEL_ERROR {
        // SAFETY: ggml passes a NUL-terminated string.
        let s = unsafe { std::ffi::CStr::from_ptr(text) };
        let line = s.to_string_lossy();
        // an error while this thread compiles a grammar goes to the caller, not the log
        if level == llama_cpp_sys_2::GGML_LOG_LEVEL_ERROR && grammar::captured(&line) {
            return;
        }
        eprint!("{line}");
    }
}

fn install_log_filter() {
    // SAFETY: registering a static callback.
    unsafe {
        llama_cpp_sys_2::llama_log_set(Some(log_filter), std::ptr::null_mut());
        llama_cpp_sys_2::ggml_log_set(Some(log_filter), std::ptr::null_mut());
    }
}

/// Names of the ggml devices this build can use, e.g. `["CPU"]` or `["CUDA0", "CPU"]`.
pub fn device_names() -> Vec<String> {
    init_backend();
    ffi::devices()
        .into_iter()
        .map(|(d, _)| ffi::dev_name(d))
        .collect()
}
