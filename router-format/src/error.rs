//! The crate's typed error.

use std::fmt;
use std::path::PathBuf;

use drllm_gguf::{GgmlType, GgufError};

/// Everything that can go wrong reading, validating, writing or matching a router sidecar,
/// and computing a base model's identity.
///
/// Each check of the reader has its own variant, so callers and tests can tell exactly which
/// rule rejected a file.
#[derive(Debug)]
#[non_exhaustive]
pub enum FormatError {
    /// An I/O operation on `path` failed.
    Io {
        /// The file being read or written.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is not a well-formed GGUF file (the container-level checks of `drllm-gguf`:
    /// truncation, magic, counts, lengths, offsets, duplicates, unknown dtypes, ...).
    Gguf(GgufError),
    /// The file is larger than the sidecar size cap; it was not read.
    FileTooLarge {
        /// Size of the file in bytes.
        size: u64,
        /// The cap ([`crate::MAX_FILE_BYTES`]).
        max: u64,
    },
    /// `general.architecture` is not `drllm-router`: this is not a router sidecar
    /// (for example a model file was given where a sidecar was expected).
    WrongArchitecture {
        /// The architecture the file declares.
        found: String,
    },
    /// The sidecar's `drllm.format_version` is not one this build reads.
    UnsupportedVersion {
        /// Version in the file.
        found: u32,
        /// The version this build reads and writes ([`crate::FORMAT_VERSION`]).
        supported: u32,
    },
    /// A required metadata key is absent.
    MissingKey {
        /// The key.
        key: String,
    },
    /// A metadata key has the wrong value type.
    WrongType {
        /// The key.
        key: String,
        /// The type the format requires (`u32`, `str`, `arr[str]`, ...).
        expected: &'static str,
        /// The type found.
        found: String,
    },
    /// A numeric value is outside its allowed range.
    OutOfRange {
        /// The key (or field) holding the value.
        key: String,
        /// The value.
        value: u64,
        /// Smallest allowed value.
        min: u64,
        /// Largest allowed value.
        max: u64,
    },
    /// A metadata value has the right type but an invalid content (a malformed fingerprint,
    /// an over-long string, ...).
    InvalidValue {
        /// The key (or field).
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// `drllm.router.activation` names an activation this build does not implement.
    UnsupportedActivation {
        /// The activation in the file.
        found: String,
    },
    /// `drllm.router.classes` is not exactly `["skip", "execute", "repeat"]`.
    BadClasses {
        /// The classes in the file.
        found: Vec<String>,
    },
    /// A router tensor the header promises (by its block count) is absent.
    MissingTensor {
        /// The tensor's name.
        name: String,
    },
    /// A tensor that is not one of the expected router tensors (unknown name, or a block index
    /// at or past the block count).
    UnexpectedTensor {
        /// The tensor's name.
        name: String,
    },
    /// A router tensor has the wrong shape (ggml `ne` order, innermost first).
    WrongShape {
        /// The tensor's name.
        name: String,
        /// The shape the header implies.
        expected: Vec<u64>,
        /// The shape in the file.
        found: Vec<u64>,
    },
    /// A router tensor is stored in a type other than F32 or F16.
    UnsupportedDtype {
        /// The tensor's name.
        name: String,
        /// Its type.
        dtype: GgmlType,
    },
    /// A router weight or bias is NaN or infinite.
    NonFinite {
        /// The tensor (or field, e.g. `router.3.fc1.weight`).
        name: String,
        /// Index of the first bad element (flat, row-major).
        index: usize,
    },
    /// A finite f32 weight does not fit in F16 (|x| > 65504) and cannot be stored as F16.
    NotRepresentable {
        /// The tensor.
        name: String,
        /// Flat index of the element.
        index: usize,
        /// The value.
        value: f32,
    },
    /// The in-memory [`crate::Sidecar`] is inconsistent (router count or vector lengths do
    /// not match the declared shape).
    Inconsistent(String),
    /// An input vector's length does not match the router (see [`crate::BlockRouter::try_route`]).
    DimensionMismatch {
        /// What was being checked.
        what: &'static str,
        /// The required length.
        expected: usize,
        /// The length given.
        found: usize,
    },
    /// The sidecar was made for a model of another architecture.
    ArchitectureMismatch {
        /// The base architecture the sidecar records.
        sidecar: String,
        /// The model's architecture.
        model: String,
    },
    /// The sidecar has a different number of routers than the model has blocks.
    BlockCountMismatch {
        /// Block count the sidecar records.
        sidecar: u32,
        /// The model's `<arch>.block_count`.
        model: u32,
    },
    /// The sidecar's routers take a different hidden size than the model's.
    HiddenSizeMismatch {
        /// Hidden size the sidecar records.
        sidecar: u32,
        /// The model's `<arch>.embedding_length`.
        model: u32,
    },
    /// Same architecture and shape, but a different model file: the fingerprints differ
    /// (another model, or the same one re-quantized, fine-tuned or with edited metadata).
    WrongModel {
        /// The fingerprint recorded in the sidecar (the model the routers were trained on).
        expected: String,
        /// The fingerprint of the model file given.
        found: String,
    },
    /// The model file changed size between parsing its header and fingerprinting it.
    ModelChanged {
        /// The model file.
        path: PathBuf,
        /// Size when the header was parsed.
        header_size: u64,
        /// Size now.
        file_size: u64,
    },
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FormatError::Io { path, source } => write!(f, "{}: {source}", path.display()),
            FormatError::Gguf(e) => write!(f, "malformed GGUF: {e}"),
            FormatError::FileTooLarge { size, max } => write!(
                f,
                "file is {size} bytes, larger than the {max}-byte limit for router sidecars"
            ),
            FormatError::WrongArchitecture { found } => write!(
                f,
                "not a router sidecar: general.architecture is '{found}', expected '{}'",
                crate::ARCHITECTURE
            ),
            FormatError::UnsupportedVersion { found, supported } => {
                if found > supported {
                    write!(
                        f,
                        "router sidecar format version {found} is newer than this build \
                         supports (version {supported}); upgrade drllm"
                    )
                } else {
                    write!(
                        f,
                        "router sidecar format version {found} is not supported (this build \
                         reads version {supported})"
                    )
                }
            }
            FormatError::MissingKey { key } => write!(f, "required key '{key}' is missing"),
            FormatError::WrongType {
                key,
                expected,
                found,
            } => write!(f, "key '{key}' must be of type {expected}, found {found}"),
            FormatError::OutOfRange {
                key,
                value,
                min,
                max,
            } => write!(
                f,
                "'{key}' = {value} is outside the allowed range {min}..={max}"
            ),
            FormatError::InvalidValue { key, reason } => write!(f, "'{key}': {reason}"),
            FormatError::UnsupportedActivation { found } => write!(
                f,
                "router activation '{found}' is not supported (only '{}')",
                crate::ACTIVATION
            ),
            FormatError::BadClasses { found } => write!(
                f,
                "router classes must be {:?}, found {found:?}",
                crate::CLASSES
            ),
            FormatError::MissingTensor { name } => write!(f, "tensor '{name}' is missing"),
            FormatError::UnexpectedTensor { name } => {
                write!(
                    f,
                    "unexpected tensor '{name}' (not a router tensor of this sidecar)"
                )
            }
            FormatError::WrongShape {
                name,
                expected,
                found,
            } => write!(
                f,
                "tensor '{name}' has shape {found:?}, expected {expected:?} (ggml ne order)"
            ),
            FormatError::UnsupportedDtype { name, dtype } => write!(
                f,
                "tensor '{name}' has type {dtype}; router tensors must be f32 or f16"
            ),
            FormatError::NonFinite { name, index } => {
                write!(
                    f,
                    "'{name}' element {index} is not finite (NaN or infinity)"
                )
            }
            FormatError::NotRepresentable { name, index, value } => write!(
                f,
                "'{name}' element {index} = {value} does not fit in f16; store as f32"
            ),
            FormatError::Inconsistent(s) => write!(f, "inconsistent sidecar: {s}"),
            FormatError::DimensionMismatch {
                what,
                expected,
                found,
            } => write!(f, "{what}: expected length {expected}, found {found}"),
            FormatError::ArchitectureMismatch { sidecar, model } => write!(
                f,
                "the routers were trained for a '{sidecar}' model, but the model is '{model}'"
            ),
            FormatError::BlockCountMismatch { sidecar, model } => write!(
                f,
                "the sidecar has routers for {sidecar} blocks, but the model has {model} blocks"
            ),
            FormatError::HiddenSizeMismatch { sidecar, model } => write!(
                f,
                "the routers take hidden size {sidecar}, but the model's hidden size is {model}"
            ),
            FormatError::WrongModel { expected, found } => write!(
                f,
                "the routers were trained for model {expected}, but this model file is \
                 {found} (a different, re-quantized, fine-tuned or edited model); use the \
                 model the sidecar was made for or retrain the routers"
            ),
            FormatError::ModelChanged {
                path,
                header_size,
                file_size,
            } => write!(
                f,
                "{}: file changed while being read ({header_size} bytes when its header was \
                 parsed, {file_size} now)",
                path.display()
            ),
        }
    }
}

impl std::error::Error for FormatError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            FormatError::Io { source, .. } => Some(source),
            FormatError::Gguf(e) => Some(e),
            _ => None,
        }
    }
}

impl From<GgufError> for FormatError {
    fn from(e: GgufError) -> Self {
        FormatError::Gguf(e)
    }
}
