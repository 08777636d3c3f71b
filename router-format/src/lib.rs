//! The Dr.LLM router sidecar format and the router math, in pure Rust.
//!
//! A sidecar `MODEL.routers.gguf` sits next to an unchanged base model `MODEL.gguf` and holds
//! one tiny router per transformer block: `Linear(d -> hidden) -> GELU(tanh) ->
//! Linear(hidden -> 3)`, classes 0 skip, 1 execute, 2 repeat. The router of block `i` sees the
//! residual stream entering block `i`, mean-pooled over at most `windows` windows of the
//! prompt, and the average of its per-window logits decides how many times block `i` runs.
//!
//! The file is a GGUF v3 file (alignment 32) written and read with `drllm-gguf`; `SPEC.md`
//! beside this crate's `Cargo.toml` describes every key, tensor and validation rule, and the
//! base-model fingerprint that binds a sidecar to the exact model file it was trained on.
//!
//! ```no_run
//! use drllm_router_format::{base_model_info, sidecar_path_for, Sidecar};
//! # fn main() -> Result<(), drllm_router_format::FormatError> {
//! let model = std::path::Path::new("models/m.gguf");
//! let sidecar = Sidecar::read(&sidecar_path_for(model))?; // validated, size-capped
//! sidecar.check_base(&base_model_info(model)?)?;          // the right model?
//! let d = sidecar.d();
//! let pooled = vec![0.0f32; 2 * d];                       // 2 window means from the engine
//! let logits = sidecar.routers[0].route(&pooled, d);       // averaged over the windows
//! # let _ = logits; Ok(()) }
//! ```
//!
//! This crate does not depend on llama.cpp or ggml.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod error;
mod fingerprint;
mod math;
pub mod rng;
mod sidecar;

pub use error::FormatError;
pub use fingerprint::{
    base_model_info, base_model_info_from, base_model_info_from_bytes, fingerprint,
    is_sha256_string, sampled_tensor_indices, BaseModel, FINGERPRINT_DOMAIN,
    FINGERPRINT_SAMPLED_TENSORS, FINGERPRINT_SAMPLE_BYTES,
};
pub use math::{gelu_tanh, n_windows, window_means, BlockRouter, Decision};
pub use sidecar::{
    content_hash, read_capped, sidecar_limits, sidecar_path_for, tensor_names, Provenance,
    RouterShape, Sidecar, StorageType, MAX_STRING_BYTES,
};

/// The sidecar format version this build reads and writes (`drllm.format_version`).
pub const FORMAT_VERSION: u32 = 1;
/// `general.architecture` of every sidecar.
pub const ARCHITECTURE: &str = "drllm-router";
/// The router classes, in logit order: 0 skip, 1 execute, 2 repeat (`drllm.router.classes`).
pub const CLASSES: [&str; 3] = ["skip", "execute", "repeat"];
/// The only activation (`drllm.router.activation`): GELU, tanh approximation.
pub const ACTIVATION: &str = "gelu_tanh";
/// The reference method's router hidden width.
pub const DEFAULT_HIDDEN: usize = 128;
/// The reference method's number of pooling windows.
pub const DEFAULT_WINDOWS: usize = 8;

/// Largest sidecar file accepted (1 GiB), checked before reading.
pub const MAX_FILE_BYTES: u64 = 1 << 30;
/// Largest base model block count.
pub const MAX_BLOCKS: u64 = 1024;
/// Largest base model hidden size `d`.
pub const MAX_D: u64 = 65536;
/// Largest router hidden width.
pub const MAX_ROUTER_HIDDEN: u64 = 4096;
/// Largest number of pooling windows.
pub const MAX_WINDOWS: u64 = 64;

/// The metadata keys of a sidecar (see `SPEC.md`).
pub mod keys {
    /// `general.architecture` = `"drllm-router"`.
    pub const ARCHITECTURE: &str = "general.architecture";
    /// `u32`: the format version.
    pub const FORMAT_VERSION: &str = "drllm.format_version";
    /// `str`: the base model's `general.architecture`.
    pub const BASE_ARCHITECTURE: &str = "drllm.base.architecture";
    /// `u32`: the base model's block count.
    pub const BASE_BLOCK_COUNT: &str = "drllm.base.block_count";
    /// `u32`: the base model's hidden size `d`.
    pub const BASE_EMBEDDING_LENGTH: &str = "drllm.base.embedding_length";
    /// `str`: the base model's fingerprint.
    pub const BASE_FINGERPRINT: &str = "drllm.base.fingerprint";
    /// `u32`: router hidden width.
    pub const ROUTER_HIDDEN: &str = "drllm.router.hidden";
    /// `u32`: maximum number of pooling windows.
    pub const ROUTER_WINDOWS: &str = "drllm.router.windows";
    /// `str`: `"gelu_tanh"`.
    pub const ROUTER_ACTIVATION: &str = "drllm.router.activation";
    /// `arr[str]`: `["skip", "execute", "repeat"]`.
    pub const ROUTER_CLASSES: &str = "drllm.router.classes";
    /// `str`, optional: training data.
    pub const PROV_DATASET: &str = "drllm.provenance.dataset";
    /// `str`, optional: search settings (JSON).
    pub const PROV_SEARCH: &str = "drllm.provenance.search";
    /// `str`, optional: training settings (JSON).
    pub const PROV_TRAINING: &str = "drllm.provenance.training";
    /// `str`, optional: metrics (JSON).
    pub const PROV_METRICS: &str = "drllm.provenance.metrics";
    /// `str`, optional: creation time (RFC 3339, UTC).
    pub const PROV_CREATED: &str = "drllm.provenance.created";
    /// `str`, optional: writing tool.
    pub const PROV_TOOL: &str = "drllm.provenance.tool";
    /// `str`, optional: notes.
    pub const PROV_NOTES: &str = "drllm.provenance.notes";
}

/// The current time as an RFC 3339 UTC date-time with second precision,
/// e.g. `2026-05-01T12:34:56Z` (for [`Provenance::created`]).
pub fn rfc3339_utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    rfc3339_utc(secs)
}

/// Seconds since the Unix epoch as an RFC 3339 UTC date-time (`YYYY-MM-DDThh:mm:ssZ`).
pub fn rfc3339_utc(unix_secs: u64) -> String {
    let days = unix_secs / 86_400;
    let rem = unix_secs % 86_400;
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // civil-from-days (H. Hinnant), for days >= 0
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}Z")
}
