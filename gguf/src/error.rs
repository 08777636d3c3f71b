//! Typed errors for GGUF reading and writing.

use std::fmt;

/// Everything that can go wrong while reading, validating or writing a GGUF file.
///
/// Every malformed-input condition has its own variant so that callers (and tests)
/// can tell exactly which check rejected a file.
#[derive(Debug)]
#[non_exhaustive]
pub enum GgufError {
    /// An underlying I/O operation failed (other than a short read, see [`GgufError::UnexpectedEof`]).
    Io(std::io::Error),
    /// The input ended before a structure that was being read was complete.
    UnexpectedEof {
        /// Absolute byte offset at which the read started.
        offset: u64,
        /// Number of bytes that were needed.
        needed: u64,
    },
    /// The first four bytes are not `GGUF`.
    BadMagic([u8; 4]),
    /// The version field is not 2 or 3.
    UnsupportedVersion(u32),
    /// The header / tensor table would extend past [`crate::Limits::max_header_bytes`].
    HeaderTooLarge {
        /// The configured cap in bytes.
        max: u64,
    },
    /// The key/value count exceeds the configured limit or what the remaining bytes could hold.
    TooManyKv {
        /// Count stored in the file.
        count: u64,
        /// Largest count that was acceptable here.
        max: u64,
    },
    /// The tensor count exceeds the configured limit or what the remaining bytes could hold.
    TooManyTensors {
        /// Count stored in the file.
        count: u64,
        /// Largest count that was acceptable here.
        max: u64,
    },
    /// A string length exceeds [`crate::Limits::max_string_len`].
    StringTooLong {
        /// Length stored in the file.
        len: u64,
        /// Configured cap.
        max: u64,
    },
    /// An array length exceeds [`crate::Limits::max_array_len`] or what the remaining bytes could hold.
    ArrayTooLong {
        /// Length stored in the file.
        len: u64,
        /// Largest length that was acceptable here.
        max: u64,
    },
    /// All arrays together hold more elements than [`crate::Limits::max_total_array_elems`].
    TooManyArrayElements {
        /// Running total when the limit was exceeded.
        total: u64,
        /// Configured cap.
        max: u64,
    },
    /// A metadata value type id is not one of the 13 GGUF value types.
    InvalidValueType {
        /// Absolute offset of the type field.
        offset: u64,
        /// The offending id.
        type_id: u32,
    },
    /// Arrays are nested deeper than [`crate::Limits::max_array_depth`].
    ArrayNestingTooDeep {
        /// Depth that was reached (1 = top level array).
        depth: u32,
        /// Configured cap.
        max: u32,
    },
    /// A string is not valid UTF-8.
    InvalidUtf8 {
        /// Absolute offset of the string bytes.
        offset: u64,
    },
    /// A metadata key is the empty string.
    EmptyKey,
    /// The same metadata key occurs twice.
    DuplicateKey(String),
    /// `general.alignment` has the wrong type, is zero, not a power of two, or too large.
    BadAlignment(String),
    /// A tensor name is 64 bytes or longer (ggml's `GGML_MAX_NAME`).
    TensorNameTooLong(String),
    /// The same tensor name occurs twice.
    DuplicateTensor(String),
    /// A tensor has more than 4 dimensions.
    TooManyDims {
        /// Tensor name.
        name: String,
        /// Number of dimensions stored in the file.
        n_dims: u32,
    },
    /// A dimension is negative when read as ggml's `int64_t`.
    InvalidDim {
        /// Tensor name.
        name: String,
        /// Index of the dimension.
        index: usize,
        /// The raw value.
        value: u64,
    },
    /// The element count or byte size of a tensor overflows.
    ShapeOverflow(String),
    /// A tensor uses a ggml type id that this crate does not know.
    UnknownGgmlType {
        /// Tensor name.
        name: String,
        /// The raw type id.
        type_id: u32,
    },
    /// `ne[0]` is not a multiple of the type's block size.
    BlockSizeMismatch {
        /// Tensor name.
        name: String,
        /// Number of elements in dimension 0.
        ne0: u64,
        /// Block size of the tensor type.
        block_size: u64,
    },
    /// A tensor offset is not a multiple of the file's alignment.
    MisalignedOffset {
        /// Tensor name.
        name: String,
        /// Offset relative to the data section.
        offset: u64,
        /// The file's alignment.
        alignment: u64,
    },
    /// A tensor's data would extend past the end of the file.
    TensorOutOfBounds {
        /// Tensor name.
        name: String,
        /// Absolute end offset of the tensor data (saturated).
        end: u64,
        /// Size of the file.
        file_size: u64,
    },
    /// Two tensors' data ranges overlap.
    OverlappingTensors {
        /// First tensor (lower offset).
        first: String,
        /// Second tensor.
        second: String,
    },
    /// The tensors are valid but not laid out the way ggml's reader requires
    /// (contiguous, in table order, each padded to the alignment).
    NonCanonicalLayout(String),
    /// A value given to the writer is inconsistent (e.g. array element of the wrong type).
    InvalidValue(String),
    /// Tensor data handed to the writer does not have the size implied by type and shape.
    DataSizeMismatch {
        /// Tensor name.
        name: String,
        /// Size implied by type and shape.
        expected: u64,
        /// Size actually provided.
        actual: u64,
    },
    /// A writer argument is invalid (bad name, bad shape, ...).
    InvalidArgument(String),
}

impl fmt::Display for GgufError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GgufError::Io(e) => write!(f, "I/O error: {e}"),
            GgufError::UnexpectedEof { offset, needed } => {
                write!(
                    f,
                    "unexpected end of file: needed {needed} bytes at offset {offset}"
                )
            }
            GgufError::BadMagic(m) => write!(f, "bad magic {m:02x?}, expected \"GGUF\""),
            GgufError::UnsupportedVersion(v) => {
                write!(f, "unsupported GGUF version {v} (expected 2 or 3)")
            }
            GgufError::HeaderTooLarge { max } => write!(f, "GGUF header exceeds {max} bytes"),
            GgufError::TooManyKv { count, max } => {
                write!(f, "key/value count {count} exceeds maximum {max}")
            }
            GgufError::TooManyTensors { count, max } => {
                write!(f, "tensor count {count} exceeds maximum {max}")
            }
            GgufError::StringTooLong { len, max } => {
                write!(f, "string length {len} exceeds maximum {max}")
            }
            GgufError::ArrayTooLong { len, max } => {
                write!(f, "array length {len} exceeds maximum {max}")
            }
            GgufError::TooManyArrayElements { total, max } => {
                write!(f, "arrays hold {total} elements in total, maximum {max}")
            }
            GgufError::InvalidValueType { offset, type_id } => {
                write!(f, "invalid GGUF value type {type_id} at offset {offset}")
            }
            GgufError::ArrayNestingTooDeep { depth, max } => {
                write!(f, "array nesting depth {depth} exceeds maximum {max}")
            }
            GgufError::InvalidUtf8 { offset } => {
                write!(f, "string at offset {offset} is not valid UTF-8")
            }
            GgufError::EmptyKey => write!(f, "empty metadata key"),
            GgufError::DuplicateKey(k) => write!(f, "duplicate metadata key '{k}'"),
            GgufError::BadAlignment(s) => write!(f, "bad alignment: {s}"),
            GgufError::TensorNameTooLong(n) => {
                write!(f, "tensor name too long ({} bytes): '{n}'", n.len())
            }
            GgufError::DuplicateTensor(n) => write!(f, "duplicate tensor name '{n}'"),
            GgufError::TooManyDims { name, n_dims } => {
                write!(f, "tensor '{name}' has {n_dims} dimensions (max 4)")
            }
            GgufError::InvalidDim { name, index, value } => {
                write!(
                    f,
                    "tensor '{name}' dimension {index} has invalid size {value}"
                )
            }
            GgufError::ShapeOverflow(n) => write!(f, "tensor '{n}' shape overflows"),
            GgufError::UnknownGgmlType { name, type_id } => {
                write!(f, "tensor '{name}' has unknown ggml type {type_id}")
            }
            GgufError::BlockSizeMismatch {
                name,
                ne0,
                block_size,
            } => write!(
                f,
                "tensor '{name}' row size {ne0} is not a multiple of the block size {block_size}"
            ),
            GgufError::MisalignedOffset {
                name,
                offset,
                alignment,
            } => write!(
                f,
                "tensor '{name}' offset {offset} is not a multiple of the alignment {alignment}"
            ),
            GgufError::TensorOutOfBounds {
                name,
                end,
                file_size,
            } => write!(
                f,
                "tensor '{name}' data ends at {end}, past the end of the file ({file_size} bytes)"
            ),
            GgufError::OverlappingTensors { first, second } => {
                write!(f, "tensors '{first}' and '{second}' overlap")
            }
            GgufError::NonCanonicalLayout(s) => {
                write!(f, "tensor layout not accepted by ggml: {s}")
            }
            GgufError::InvalidValue(s) => write!(f, "invalid metadata value: {s}"),
            GgufError::DataSizeMismatch {
                name,
                expected,
                actual,
            } => write!(
                f,
                "tensor '{name}' data has {actual} bytes, expected {expected}"
            ),
            GgufError::InvalidArgument(s) => write!(f, "invalid argument: {s}"),
        }
    }
}

impl std::error::Error for GgufError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            GgufError::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<std::io::Error> for GgufError {
    fn from(e: std::io::Error) -> Self {
        GgufError::Io(e)
    }
}
