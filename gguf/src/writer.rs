//! GGUF writer producing the canonical layout that ggml's reader accepts.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::error::GgufError;
use crate::reader::{align_up, check_alignment, GgufFile, Limits, TensorInfo};
use crate::types::{Array, GgmlType, Value};
use crate::{DEFAULT_ALIGNMENT, GGML_MAX_DIMS, GGML_MAX_NAME, GGUF_MAGIC, KEY_ALIGNMENT};

/// Where the bytes of a tensor come from when writing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TensorSource {
    /// Bytes held in memory.
    Bytes(Vec<u8>),
    /// `len` bytes at absolute `offset` of another file, streamed at write time.
    File {
        /// File to copy from.
        path: PathBuf,
        /// Absolute byte offset in that file.
        offset: u64,
        /// Number of bytes.
        len: u64,
    },
}

impl TensorSource {
    fn len(&self) -> u64 {
        match self {
            TensorSource::Bytes(b) => b.len() as u64,
            TensorSource::File { len, .. } => *len,
        }
    }
}

#[derive(Clone, Debug)]
struct PendingTensor {
    name: String,
    dtype: GgmlType,
    dims: Vec<u64>,
    size: u64,
    src: TensorSource,
}

/// Builds a GGUF v3 file: metadata plus tensors, laid out contiguously in insertion
/// order with every tensor padded to the alignment (the layout ggml requires).
#[derive(Clone, Debug)]
pub struct GgufWriter {
    version: u32,
    alignment: u64,
    kv: Vec<(String, Value)>,
    tensors: Vec<PendingTensor>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl GgufWriter {
    /// An empty writer: version 3, alignment 32.
    pub fn new() -> Self {
        GgufWriter {
            version: 3,
            alignment: DEFAULT_ALIGNMENT,
            kv: Vec::new(),
            tensors: Vec::new(),
        }
    }

    /// A writer pre-filled with all metadata and tensors of `f`; tensors are referenced
    /// as [`TensorSource::File`] ranges of `path` (the file `f` was read from) and are
    /// streamed when writing. The output is always GGUF version 3 with `f`'s alignment.
    pub fn from_file(f: &GgufFile, path: &Path) -> Self {
        let tensors = f
            .tensors
            .iter()
            .map(|t| PendingTensor {
                name: t.name.clone(),
                dtype: t.dtype,
                dims: t.dims.clone(),
                size: t.size,
                src: TensorSource::File {
                    path: path.to_path_buf(),
                    offset: f.data_offset.saturating_add(t.offset),
                    len: t.size,
                },
            })
            .collect();
        GgufWriter {
            version: 3,
            alignment: f.alignment,
            kv: f.kv.clone(),
            tensors,
        }
    }

    /// Sets the GGUF version to write (2 or 3; validated when writing).
    pub fn set_version(&mut self, version: u32) {
        self.version = version;
    }

    /// Sets the data alignment (a power of two; validated when writing). A value other
    /// than 32 is also recorded as `general.alignment` (u32).
    pub fn set_alignment(&mut self, a: u64) {
        self.alignment = a;
        if a == DEFAULT_ALIGNMENT {
            self.kv.retain(|(k, _)| k != KEY_ALIGNMENT);
        } else if let Ok(a32) = u32::try_from(a) {
            self.set_kv_raw(KEY_ALIGNMENT.to_owned(), Value::U32(a32));
        } else {
            self.kv.retain(|(k, _)| k != KEY_ALIGNMENT);
        }
    }

    /// The alignment that will be used.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    fn set_kv_raw(&mut self, key: String, v: Value) {
        if let Some(slot) = self.kv.iter_mut().find(|(k, _)| *k == key) {
            slot.1 = v;
        } else {
            self.kv.push((key, v));
        }
    }

    /// Sets a metadata value: replaces an existing key in place (keeping its position),
    /// otherwise appends. Setting `general.alignment` to a `U32` also sets the alignment.
    pub fn set(&mut self, key: impl Into<String>, v: Value) {
        let key = key.into();
        if key == KEY_ALIGNMENT {
            if let Value::U32(a) = v {
                self.alignment = u64::from(a);
            }
        }
        self.set_kv_raw(key, v);
    }

    /// Removes a metadata key (no-op if absent).
    pub fn remove(&mut self, key: &str) {
        self.kv.retain(|(k, _)| k != key);
        if key == KEY_ALIGNMENT {
            self.alignment = DEFAULT_ALIGNMENT;
        }
    }

    /// Looks up a metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.kv.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// All metadata in write order.
    pub fn kv(&self) -> &[(String, Value)] {
        &self.kv
    }

    /// Names of the tensors in write order.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.iter().map(|t| t.name.as_str())
    }

    /// Number of tensors.
    pub fn tensor_count(&self) -> usize {
        self.tensors.len()
    }

    /// Removes a tensor; returns whether it existed.
    pub fn remove_tensor(&mut self, name: &str) -> bool {
        let before = self.tensors.len();
        self.tensors.retain(|t| t.name != name);
        before != self.tensors.len()
    }

    /// Removes all tensors.
    pub fn clear_tensors(&mut self) {
        self.tensors.clear();
    }

    /// Appends a tensor. Checks the name (non-duplicate, < 64 bytes), the shape (at most
    /// 4 dims, `ne[0]` a multiple of the block size, no overflow), that the type is known,
    /// and that the source holds exactly the number of bytes implied by type and shape.
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        dtype: GgmlType,
        dims: &[u64],
        src: TensorSource,
    ) -> Result<(), GgufError> {
        let name = name.into();
        if name.len() >= GGML_MAX_NAME {
            return Err(GgufError::TensorNameTooLong(name));
        }
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(GgufError::DuplicateTensor(name));
        }
        if dims.len() > GGML_MAX_DIMS {
            return Err(GgufError::TooManyDims {
                name,
                n_dims: u32::try_from(dims.len()).unwrap_or(u32::MAX),
            });
        }
        for (index, &value) in dims.iter().enumerate() {
            if value > i64::MAX as u64 {
                return Err(GgufError::InvalidDim { name, index, value });
            }
        }
        let (Some(bs), Some(_)) = (dtype.block_size(), dtype.type_size()) else {
            return Err(GgufError::UnknownGgmlType {
                name,
                type_id: dtype.0,
            });
        };
        let ne0 = dims.first().copied().unwrap_or(1);
        if ne0 % bs != 0 {
            return Err(GgufError::BlockSizeMismatch {
                name,
                ne0,
                block_size: bs,
            });
        }
        let n_el = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
        let size = match (n_el, dtype.tensor_size(dims)) {
            (Some(n), Some(s)) if n <= i64::MAX as u64 && s <= i64::MAX as u64 => s,
            _ => return Err(GgufError::ShapeOverflow(name)),
        };
        if src.len() != size {
            return Err(GgufError::DataSizeMismatch {
                name,
                expected: size,
                actual: src.len(),
            });
        }
        self.tensors.push(PendingTensor {
            name,
            dtype,
            dims: dims.to_vec(),
            size,
            src,
        });
        Ok(())
    }

    fn validate(&self) -> Result<(), GgufError> {
        if self.version != 2 && self.version != 3 {
            return Err(GgufError::UnsupportedVersion(self.version));
        }
        check_alignment(self.alignment, u64::from(u32::MAX))?;
        let limits = Limits::default();
        let mut seen = HashSet::new();
        for (k, v) in &self.kv {
            if k.is_empty() {
                return Err(GgufError::EmptyKey);
            }
            if !seen.insert(k.as_str()) {
                return Err(GgufError::DuplicateKey(k.clone()));
            }
            validate_value(k, v, 0, limits.max_array_depth)?;
        }
        match self.get(KEY_ALIGNMENT) {
            None if self.alignment != DEFAULT_ALIGNMENT => {
                return Err(GgufError::BadAlignment(format!(
                    "alignment {} requires a {KEY_ALIGNMENT} key",
                    self.alignment
                )))
            }
            Some(Value::U32(a)) if u64::from(*a) != self.alignment => {
                return Err(GgufError::BadAlignment(format!(
                    "{KEY_ALIGNMENT} = {a} disagrees with writer alignment {}",
                    self.alignment
                )))
            }
            Some(Value::U32(_)) | None => {}
            Some(other) => {
                return Err(GgufError::BadAlignment(format!(
                    "{KEY_ALIGNMENT} must be u32, is {}",
                    other.value_type()
                )))
            }
        }
        for t in &self.tensors {
            if let TensorSource::File { path, offset, len } = &t.src {
                let flen = std::fs::metadata(path)?.len();
                match offset.checked_add(*len) {
                    Some(end) if end <= flen => {}
                    _ => {
                        return Err(GgufError::UnexpectedEof {
                            offset: *offset,
                            needed: *len,
                        })
                    }
                }
            }
        }
        Ok(())
    }

    /// Computes the tensor table that will be written (offsets relative to the data section).
    pub fn tensor_infos(&self) -> Result<Vec<TensorInfo>, GgufError> {
        let mut offset = 0u64;
        let mut out = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            out.push(TensorInfo {
                name: t.name.clone(),
                dims: t.dims.clone(),
                dtype: t.dtype,
                offset,
                size: t.size,
            });
            let padded = align_up(t.size, self.alignment)
                .ok_or_else(|| GgufError::ShapeOverflow(t.name.clone()))?;
            offset = offset
                .checked_add(padded)
                .ok_or_else(|| GgufError::ShapeOverflow(t.name.clone()))?;
        }
        Ok(out)
    }

    fn header_bytes(&self, infos: &[TensorInfo]) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(GGUF_MAGIC);
        h.extend_from_slice(&self.version.to_le_bytes());
        h.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        h.extend_from_slice(&(self.kv.len() as u64).to_le_bytes());
        for (k, v) in &self.kv {
            put_str(&mut h, k);
            h.extend_from_slice(&v.value_type().id().to_le_bytes());
            put_value(&mut h, v);
        }
        for t in infos {
            put_str(&mut h, &t.name);
            h.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                h.extend_from_slice(&d.to_le_bytes());
            }
            h.extend_from_slice(&t.dtype.0.to_le_bytes());
            h.extend_from_slice(&t.offset.to_le_bytes());
        }
        h
    }

    /// Writes the complete file to `w`; returns the number of bytes written.
    pub fn write_to<W: Write>(&self, mut w: W) -> Result<u64, GgufError> {
        self.validate()?;
        let infos = self.tensor_infos()?;
        let header = self.header_bytes(&infos);
        let mut written = header.len() as u64;
        w.write_all(&header)?;
        if !self.tensors.is_empty() {
            written = pad_to(&mut w, written, self.alignment)?;
        }
        let mut cached: Option<(PathBuf, File)> = None;
        for t in &self.tensors {
            match &t.src {
                TensorSource::Bytes(b) => w.write_all(b)?,
                TensorSource::File { path, offset, len } => {
                    let reuse = matches!(&cached, Some((p, _)) if p == path);
                    if !reuse {
                        cached = Some((path.clone(), File::open(path)?));
                    }
                    if let Some((_, f)) = cached.as_mut() {
                        f.seek(SeekFrom::Start(*offset))?;
                        let mut limited = Read::take(&mut *f, *len);
                        let copied = std::io::copy(&mut limited, &mut w)?;
                        if copied != *len {
                            return Err(GgufError::UnexpectedEof {
                                offset: offset.saturating_add(copied),
                                needed: *len - copied,
                            });
                        }
                    }
                }
            }
            written += t.size;
            written = pad_to(&mut w, written, self.alignment)?;
        }
        w.flush()?;
        Ok(written)
    }

    /// Writes the file to `<path>.tmp` and renames it onto `path` once complete, so `path`
    /// never holds a partial file. Sources may include `path` itself.
    pub fn write_to_path(&self, path: &Path) -> Result<(), GgufError> {
        let mut tmp_name = path.file_name().map(|n| n.to_os_string()).ok_or_else(|| {
            GgufError::InvalidArgument(format!("'{}' has no file name", path.display()))
        })?;
        tmp_name.push(".tmp");
        let tmp = path.with_file_name(tmp_name);
        let result = (|| -> Result<(), GgufError> {
            let f = File::create(&tmp)?;
            let mut bw = BufWriter::with_capacity(1 << 20, f);
            self.write_to(&mut bw)?;
            let f = bw.into_inner().map_err(|e| GgufError::Io(e.into_error()))?;
            f.sync_all()?;
            drop(f);
            std::fs::rename(&tmp, path)?;
            Ok(())
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

fn pad_to<W: Write>(w: &mut W, written: u64, alignment: u64) -> Result<u64, GgufError> {
    let target = align_up(written, alignment).ok_or(GgufError::ShapeOverflow("padding".into()))?;
    let zeros = [0u8; 256];
    let mut left = target - written;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        w.write_all(&zeros[..n])?;
        left -= n as u64;
    }
    Ok(target)
}

fn validate_value(key: &str, v: &Value, depth: u32, max_depth: u32) -> Result<(), GgufError> {
    if let Value::Array(a) = v {
        validate_array(key, a, depth + 1, max_depth)?;
    }
    Ok(())
}

fn validate_array(key: &str, a: &Array, depth: u32, max_depth: u32) -> Result<(), GgufError> {
    if depth > max_depth {
        return Err(GgufError::ArrayNestingTooDeep {
            depth,
            max: max_depth,
        });
    }
    for (i, v) in a.values.iter().enumerate() {
        if v.value_type() != a.elem_type {
            return Err(GgufError::InvalidValue(format!(
                "key '{key}': array element {i} is {} but the array holds {}",
                v.value_type(),
                a.elem_type
            )));
        }
        if let Value::Array(inner) = v {
            validate_array(key, inner, depth + 1, max_depth)?;
        }
    }
    Ok(())
}

fn put_str(h: &mut Vec<u8>, s: &str) {
    h.extend_from_slice(&(s.len() as u64).to_le_bytes());
    h.extend_from_slice(s.as_bytes());
}

fn put_array(h: &mut Vec<u8>, a: &Array) {
    h.extend_from_slice(&a.elem_type.id().to_le_bytes());
    h.extend_from_slice(&(a.values.len() as u64).to_le_bytes());
    for v in &a.values {
        put_value(h, v);
    }
}

fn put_value(h: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::I8(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => h.push(u8::from(*x)),
        Value::String(s) => put_str(h, s),
        Value::U64(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::Array(a) => put_array(h, a),
    }
}
