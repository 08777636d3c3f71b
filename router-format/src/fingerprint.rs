//! Identity of a base model file: architecture, shape and fingerprint.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use drllm_gguf::{Array, GgufFile, Value};
use sha2::{Digest, Sha256};

use crate::error::FormatError;

/// Domain-separation prefix of the fingerprint pre-image (followed by one zero byte).
pub const FINGERPRINT_DOMAIN: &str = "drllm.fingerprint.v1";
/// At most this many tensors have bytes sampled.
pub const FINGERPRINT_SAMPLED_TENSORS: usize = 16;
/// At most this many bytes are sampled from the start of each sampled tensor.
pub const FINGERPRINT_SAMPLE_BYTES: u64 = 4096;

/// Identity of a base GGUF model, recorded in a sidecar and checked when it is loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaseModel {
    /// `general.architecture` (`llama`, `qwen2`, `gemma3`, ...).
    pub architecture: String,
    /// `<arch>.block_count`: number of transformer blocks (one router each).
    pub block_count: u32,
    /// `<arch>.embedding_length`: the residual stream width `d`, the routers' input size.
    pub hidden_size: u32,
    /// `"sha256:"` + 64 lowercase hex digits, see [`fingerprint`].
    pub fingerprint: String,
}

/// Identity of a base GGUF file: architecture, `<arch>.block_count`, `<arch>.embedding_length`,
/// and a fingerprint. Parses the header with `drllm-gguf`'s default limits and reads at most
/// 16 x 4 KiB of tensor data (with seeks); never the whole file.
pub fn base_model_info(path: &Path) -> Result<BaseModel, FormatError> {
    let g = GgufFile::open(path).map_err(|e| match e {
        drllm_gguf::GgufError::Io(source) => FormatError::Io {
            path: path.to_path_buf(),
            source,
        },
        other => FormatError::Gguf(other),
    })?;
    base_model_info_from(&g, path)
}

/// [`base_model_info`] when the caller already parsed the header of the file at `path`.
pub fn base_model_info_from(g: &GgufFile, path: &Path) -> Result<BaseModel, FormatError> {
    let io = |source| FormatError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = File::open(path).map_err(io)?;
    let size = f.metadata().map_err(io)?.len();
    if size != g.file_size {
        return Err(FormatError::ModelChanged {
            path: path.to_path_buf(),
            header_size: g.file_size,
            file_size: size,
        });
    }
    let (architecture, block_count, hidden_size) = model_shape(g)?;
    let fingerprint = fingerprint(g, &mut f).map_err(|e| match e {
        FormatError::Gguf(drllm_gguf::GgufError::Io(source)) => io(source),
        other => other,
    })?;
    Ok(BaseModel {
        architecture,
        block_count,
        hidden_size,
        fingerprint,
    })
}

/// [`base_model_info`] for a model file held in memory.
pub fn base_model_info_from_bytes(bytes: &[u8]) -> Result<BaseModel, FormatError> {
    let g = GgufFile::parse(bytes)?;
    let (architecture, block_count, hidden_size) = model_shape(&g)?;
    let fingerprint = fingerprint(&g, &mut std::io::Cursor::new(bytes))?;
    Ok(BaseModel {
        architecture,
        block_count,
        hidden_size,
        fingerprint,
    })
}

fn model_shape(g: &GgufFile) -> Result<(String, u32, u32), FormatError> {
    const ARCH: &str = "general.architecture";
    let architecture = match g.get(ARCH) {
        None => {
            return Err(FormatError::MissingKey { key: ARCH.into() });
        }
        Some(Value::String(s)) => s.clone(),
        Some(v) => {
            return Err(FormatError::WrongType {
                key: ARCH.into(),
                expected: "str",
                found: type_name(v),
            })
        }
    };
    let int = |suffix: &str| -> Result<u32, FormatError> {
        let key = format!("{architecture}.{suffix}");
        match g.get(&key) {
            None => Err(FormatError::MissingKey { key }),
            Some(v) => v.as_u32().ok_or_else(|| FormatError::WrongType {
                key,
                expected: "unsigned integer (u32 range)",
                found: type_name(v),
            }),
        }
    };
    let block_count = int("block_count")?;
    let hidden_size = int("embedding_length")?;
    Ok((architecture, block_count, hidden_size))
}

/// A value's type for messages: `u32`, `str`, `arr[str]`, ...
pub(crate) fn type_name(v: &Value) -> String {
    match v {
        Value::Array(a) => format!("arr[{}]", a.elem_type),
        other => other.value_type().to_string(),
    }
}

/// `"sha256:"` + lowercase hex of SHA-256 over `data`.
pub(crate) fn sha256_string(data: &[u8]) -> String {
    hex_digest(Sha256::digest(data).as_slice())
}

fn hex_digest(d: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(7 + 2 * d.len());
    s.push_str("sha256:");
    for b in d {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 15)]));
    }
    s
}

/// Whether `s` has the fingerprint / content-hash form `sha256:` + 64 lowercase hex digits.
pub fn is_sha256_string(s: &str) -> bool {
    s.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    })
}

fn put_u32(h: &mut Sha256, v: u32) {
    h.update(v.to_le_bytes());
}

fn put_u64(h: &mut Sha256, v: u64) {
    h.update(v.to_le_bytes());
}

fn put_str(h: &mut Sha256, s: &str) {
    put_u64(h, s.len() as u64);
    h.update(s.as_bytes());
}

fn put_value(h: &mut Sha256, v: &Value) {
    match v {
        Value::U8(x) => h.update(x.to_le_bytes()),
        Value::I8(x) => h.update(x.to_le_bytes()),
        Value::U16(x) => h.update(x.to_le_bytes()),
        Value::I16(x) => h.update(x.to_le_bytes()),
        Value::U32(x) => h.update(x.to_le_bytes()),
        Value::I32(x) => h.update(x.to_le_bytes()),
        Value::F32(x) => h.update(x.to_bits().to_le_bytes()),
        Value::Bool(x) => h.update([u8::from(*x)]),
        Value::String(s) => put_str(h, s),
        Value::U64(x) => h.update(x.to_le_bytes()),
        Value::I64(x) => h.update(x.to_le_bytes()),
        Value::F64(x) => h.update(x.to_bits().to_le_bytes()),
        Value::Array(a) => put_array(h, a),
    }
}

fn put_array(h: &mut Sha256, a: &Array) {
    put_u32(h, a.elem_type.id());
    put_u64(h, a.values.len() as u64);
    for v in &a.values {
        put_value(h, v);
    }
}

/// The indices of the tensors whose bytes are sampled: `floor(j * n / k)` for `j` in `0..k`,
/// `k = min(16, n)` (every tensor when there are at most 16).
pub fn sampled_tensor_indices(n: usize) -> Vec<usize> {
    let k = n.min(FINGERPRINT_SAMPLED_TENSORS);
    (0..k)
        .map(|j| ((j as u128 * n as u128) / k as u128) as usize)
        .collect()
}

/// The fingerprint of a GGUF model: SHA-256 over the metadata (sorted by key), the tensor
/// table, and up to 4096 bytes from the start of up to 16 tensors spread evenly over the
/// table, read from `reader` (a reader over the same file `g` was parsed from) with seeks.
/// The exact byte layout is in `SPEC.md` (section "Fingerprint"). Returns `"sha256:"` +
/// 64 lowercase hex digits.
pub fn fingerprint<R: Read + Seek>(g: &GgufFile, reader: &mut R) -> Result<String, FormatError> {
    let mut h = Sha256::new();
    h.update(FINGERPRINT_DOMAIN.as_bytes());
    h.update([0u8]);

    // (a) metadata, sorted by key bytes (keys are unique in a parsed file)
    let mut kv: Vec<&(String, Value)> = g.kv.iter().collect();
    kv.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    put_u64(&mut h, kv.len() as u64);
    for (k, v) in kv {
        put_str(&mut h, k);
        put_u32(&mut h, v.value_type().id());
        put_value(&mut h, v);
    }

    // (b) tensor table, in file order
    put_u64(&mut h, g.tensors.len() as u64);
    for t in &g.tensors {
        put_str(&mut h, &t.name);
        put_u32(&mut h, t.dims.len() as u32);
        for &d in &t.dims {
            put_u64(&mut h, d);
        }
        put_u32(&mut h, t.dtype.0);
        put_u64(&mut h, t.offset);
        put_u64(&mut h, t.size);
    }

    // (c) sampled tensor bytes
    let idx = sampled_tensor_indices(g.tensors.len());
    put_u64(&mut h, idx.len() as u64);
    let mut buf = vec![0u8; FINGERPRINT_SAMPLE_BYTES as usize];
    for i in idx {
        let Some(t) = g.tensors.get(i) else {
            continue;
        };
        let len = t.size.min(FINGERPRINT_SAMPLE_BYTES);
        let range = g.tensor_data_range(t);
        if range.end > g.file_size {
            return Err(FormatError::Gguf(
                drllm_gguf::GgufError::TensorOutOfBounds {
                    name: t.name.clone(),
                    end: range.end,
                    file_size: g.file_size,
                },
            ));
        }
        put_u64(&mut h, i as u64);
        put_u64(&mut h, len);
        let chunk = &mut buf[..len as usize];
        reader
            .seek(SeekFrom::Start(range.start))
            .and_then(|_| reader.read_exact(chunk))
            .map_err(|e| FormatError::Gguf(drllm_gguf::GgufError::Io(e)))?;
        h.update(&*chunk);
    }
    Ok(hex_digest(h.finalize().as_slice()))
}
