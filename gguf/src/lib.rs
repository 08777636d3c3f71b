//! Hardened reader and writer for GGUF files (versions 2 and 3, little-endian).
//!
//! Pure Rust with no dependency on llama.cpp/ggml. The reader validates every count,
//! length, shape and offset against [`Limits`] and the real file size before allocating,
//! mirroring (and in places tightening) the checks of ggml's own `gguf.cpp`. The writer
//! produces the canonical layout ggml requires (tensors contiguous in table order, each
//! padded to the alignment).
//!
//! ```no_run
//! use drllm_gguf::{GgufFile, GgufWriter, Value};
//! # fn main() -> Result<(), drllm_gguf::GgufError> {
//! let f = GgufFile::open(std::path::Path::new("model.gguf"))?;
//! println!("{:?} with {} tensors", f.architecture(), f.tensors.len());
//! let mut w = GgufWriter::from_file(&f, std::path::Path::new("model.gguf"));
//! w.set("general.name", Value::string("edited"));
//! w.write_to_path(std::path::Path::new("edited.gguf"))?;
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod error;
mod reader;
mod types;
mod writer;

pub use error::GgufError;
pub use reader::{GgufFile, Limits, TensorInfo};
pub use types::{Array, GgmlType, Value, ValueType};
pub use writer::{GgufWriter, TensorSource};

/// The four magic bytes at the start of every GGUF file.
pub const GGUF_MAGIC: &[u8; 4] = b"GGUF";
/// Alignment used when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// The metadata key holding the alignment (must be a `u32`).
pub const KEY_ALIGNMENT: &str = "general.alignment";
/// Maximum number of tensor dimensions (ggml's `GGML_MAX_DIMS`).
pub const GGML_MAX_DIMS: usize = 4;
/// Tensor names must be shorter than this many bytes (ggml's `GGML_MAX_NAME`).
pub const GGML_MAX_NAME: usize = 64;
