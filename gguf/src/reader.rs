//! Hardened GGUF reader.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::Path;

use crate::error::GgufError;
use crate::types::{Array, GgmlType, Value, ValueType};
use crate::{DEFAULT_ALIGNMENT, GGML_MAX_DIMS, GGML_MAX_NAME, GGUF_MAGIC, KEY_ALIGNMENT};

/// Smallest possible encoded key/value pair: key length (8) + 1 key byte + type (4) + 1 value byte.
const MIN_KV_BYTES: u64 = 8 + 1 + 4 + 1;
/// Smallest possible encoded tensor info: name length (8) + n_dims (4) + type (4) + offset (8).
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 4 + 8;
/// Never pre-reserve more than this many array elements; grow as data is actually read.
const MAX_PREALLOC: usize = 1 << 12;

/// Resource limits applied while parsing. Every count and length read from a file is
/// checked against these *before* anything is allocated for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Maximum number of metadata key/value pairs.
    pub max_kv: u64,
    /// Maximum number of tensors.
    pub max_tensors: u64,
    /// Maximum length in bytes of any single string (keys, values, tensor names).
    pub max_string_len: u64,
    /// Maximum number of elements in any single array.
    pub max_array_len: u64,
    /// Maximum size of the header (magic through the end of the tensor table).
    pub max_header_bytes: u64,
    /// Maximum value of `general.alignment`.
    pub max_alignment: u64,
    /// Maximum array nesting depth (1 = arrays of scalars/strings only).
    pub max_array_depth: u32,
    /// Maximum number of array elements in the whole header (all arrays together). Each
    /// parsed element costs ~32 bytes of memory, so this bounds memory use independently
    /// of the file size.
    pub max_total_array_elems: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_kv: 1 << 16,
            max_tensors: 1 << 16,
            max_string_len: 1 << 20,
            max_array_len: 1 << 24,
            max_header_bytes: 1 << 28,
            max_alignment: 1 << 20,
            max_array_depth: 2,
            max_total_array_elems: 1 << 25,
        }
    }
}

/// Description of one tensor from the tensor-info table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// Tensor name (fewer than 64 bytes, as ggml requires).
    pub name: String,
    /// Shape as ggml `ne`, innermost dimension first. Between 0 and 4 entries
    /// (ggml accepts 0 dims, meaning a single element; see [`TensorInfo::ne`]).
    /// Individual dimensions may be 0 (an empty tensor), as in ggml.
    pub dims: Vec<u64>,
    /// Element type.
    pub dtype: GgmlType,
    /// Offset of the data relative to the start of the data section.
    pub offset: u64,
    /// Size of the data in bytes, computed from `dims` and `dtype`.
    pub size: u64,
}

impl TensorInfo {
    /// Total number of elements (product of `dims`; saturates instead of overflowing).
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().fold(1u64, |acc, &d| acc.saturating_mul(d))
    }

    /// The shape padded to ggml's four dimensions with 1s.
    pub fn ne(&self) -> [u64; 4] {
        let mut ne = [1u64; 4];
        for (slot, &d) in ne.iter_mut().zip(self.dims.iter()) {
            *slot = d;
        }
        ne
    }
}

/// A parsed GGUF header: metadata and tensor table (never the tensor data itself).
#[derive(Clone, Debug, PartialEq)]
pub struct GgufFile {
    /// Format version (2 or 3).
    pub version: u32,
    /// Data alignment (`general.alignment`, default 32).
    pub alignment: u64,
    /// Metadata in file order.
    pub kv: Vec<(String, Value)>,
    /// Tensor table in file order.
    pub tensors: Vec<TensorInfo>,
    /// Absolute offset of the data section.
    pub data_offset: u64,
    /// Total size of the file in bytes.
    pub file_size: u64,
}

struct Parser<'l, R> {
    r: R,
    pos: u64,
    file_size: u64,
    limits: &'l Limits,
    total_array_elems: u64,
}

impl<R: Read> Parser<'_, R> {
    fn remaining(&self) -> u64 {
        self.file_size.saturating_sub(self.pos)
    }

    fn need(&self, n: u64) -> Result<(), GgufError> {
        let eof = GgufError::UnexpectedEof {
            offset: self.pos,
            needed: n,
        };
        let end = self.pos.checked_add(n).ok_or(eof)?;
        if end > self.file_size {
            return Err(GgufError::UnexpectedEof {
                offset: self.pos,
                needed: n,
            });
        }
        if end > self.limits.max_header_bytes {
            return Err(GgufError::HeaderTooLarge {
                max: self.limits.max_header_bytes,
            });
        }
        Ok(())
    }

    fn fill(&mut self, buf: &mut [u8]) -> Result<(), GgufError> {
        let n = buf.len() as u64;
        self.need(n)?;
        self.r.read_exact(buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                GgufError::UnexpectedEof {
                    offset: self.pos,
                    needed: n,
                }
            } else {
                GgufError::Io(e)
            }
        })?;
        self.pos += n;
        Ok(())
    }

    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], GgufError> {
        let mut b = [0u8; N];
        self.fill(&mut b)?;
        Ok(b)
    }

    fn u32(&mut self) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }

    fn u64(&mut self) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }

    fn string(&mut self) -> Result<String, GgufError> {
        let len = self.u64()?;
        if len > self.limits.max_string_len {
            return Err(GgufError::StringTooLong {
                len,
                max: self.limits.max_string_len,
            });
        }
        // checked against the bytes really left before allocating
        self.need(len)?;
        let offset = self.pos;
        let n = usize::try_from(len).map_err(|_| GgufError::StringTooLong {
            len,
            max: self.limits.max_string_len,
        })?;
        let mut buf = vec![0u8; n];
        self.fill(&mut buf)?;
        String::from_utf8(buf).map_err(|_| GgufError::InvalidUtf8 { offset })
    }

    fn value_type(&mut self) -> Result<ValueType, GgufError> {
        let offset = self.pos;
        let id = self.u32()?;
        ValueType::from_id(id).ok_or(GgufError::InvalidValueType {
            offset,
            type_id: id,
        })
    }

    fn value(&mut self, t: ValueType, depth: u32) -> Result<Value, GgufError> {
        Ok(match t {
            ValueType::U8 => Value::U8(u8::from_le_bytes(self.bytes()?)),
            ValueType::I8 => Value::I8(i8::from_le_bytes(self.bytes()?)),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.bytes()?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.bytes()?)),
            ValueType::U32 => Value::U32(u32::from_le_bytes(self.bytes()?)),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.bytes()?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.bytes()?)),
            // ggml reads an int8 and treats any nonzero value as true
            ValueType::Bool => Value::Bool(self.bytes::<1>()?[0] != 0),
            ValueType::String => Value::String(self.string()?),
            ValueType::U64 => Value::U64(u64::from_le_bytes(self.bytes()?)),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.bytes()?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.bytes()?)),
            ValueType::Array => Value::Array(self.array(depth + 1)?),
        })
    }

    fn array(&mut self, depth: u32) -> Result<Array, GgufError> {
        if depth > self.limits.max_array_depth {
            return Err(GgufError::ArrayNestingTooDeep {
                depth,
                max: self.limits.max_array_depth,
            });
        }
        let elem_type = self.value_type()?;
        let len = self.u64()?;
        if len > self.limits.max_array_len {
            return Err(GgufError::ArrayTooLong {
                len,
                max: self.limits.max_array_len,
            });
        }
        self.total_array_elems = self.total_array_elems.saturating_add(len);
        if self.total_array_elems > self.limits.max_total_array_elems {
            return Err(GgufError::TooManyArrayElements {
                total: self.total_array_elems,
                max: self.limits.max_total_array_elems,
            });
        }
        let min = elem_type.min_encoded_size();
        if len > self.remaining() / min {
            return Err(GgufError::UnexpectedEof {
                offset: self.pos,
                needed: len.saturating_mul(min),
            });
        }
        let n = usize::try_from(len).map_err(|_| GgufError::ArrayTooLong {
            len,
            max: self.limits.max_array_len,
        })?;
        let mut values = Vec::with_capacity(n.min(MAX_PREALLOC));
        for _ in 0..n {
            values.push(self.value(elem_type, depth)?);
        }
        Ok(Array { elem_type, values })
    }

    fn tensor_info(&mut self, seen: &mut HashSet<String>) -> Result<TensorInfo, GgufError> {
        let name = self.string()?;
        if name.len() >= GGML_MAX_NAME {
            return Err(GgufError::TensorNameTooLong(name));
        }
        if !seen.insert(name.clone()) {
            return Err(GgufError::DuplicateTensor(name));
        }
        let n_dims = self.u32()?;
        if n_dims as usize > GGML_MAX_DIMS {
            return Err(GgufError::TooManyDims { name, n_dims });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for index in 0..n_dims as usize {
            let value = self.u64()?;
            // ggml stores ne as int64_t and rejects negative values
            if value > i64::MAX as u64 {
                return Err(GgufError::InvalidDim { name, index, value });
            }
            dims.push(value);
        }
        // the element count must be representable as int64_t
        let mut n_el: u64 = 1;
        for &d in &dims {
            n_el = match n_el.checked_mul(d) {
                Some(v) if v <= i64::MAX as u64 => v,
                _ => return Err(GgufError::ShapeOverflow(name)),
            };
        }
        let type_id = self.u32()?;
        let dtype = GgmlType(type_id);
        let (Some(bs), Some(ts)) = (dtype.block_size(), dtype.type_size()) else {
            return Err(GgufError::UnknownGgmlType { name, type_id });
        };
        let ne0 = dims.first().copied().unwrap_or(1);
        if ne0 % bs != 0 {
            return Err(GgufError::BlockSizeMismatch {
                name,
                ne0,
                block_size: bs,
            });
        }
        let size = match (n_el / bs).checked_mul(ts) {
            Some(s) if s <= i64::MAX as u64 => s,
            _ => return Err(GgufError::ShapeOverflow(name)),
        };
        let offset = self.u64()?;
        Ok(TensorInfo {
            name,
            dims,
            dtype,
            offset,
            size,
        })
    }

    fn parse(mut self) -> Result<GgufFile, GgufError> {
        let (version, n_tensors, n_kv) = self.header()?;
        let kv = self.metadata(n_kv)?;
        // alignment
        let alignment = match kv.iter().find(|(k, _)| k == KEY_ALIGNMENT) {
            None => DEFAULT_ALIGNMENT,
            Some((_, Value::U32(a))) => u64::from(*a),
            Some((_, other)) => {
                return Err(GgufError::BadAlignment(format!(
                    "{KEY_ALIGNMENT} must be u32, is {}",
                    other.value_type()
                )))
            }
        };
        check_alignment(alignment, self.limits.max_alignment)?;

        // tensor table
        let n_tensors_usize =
            usize::try_from(n_tensors).map_err(|_| GgufError::TooManyTensors {
                count: n_tensors,
                max: self.limits.max_tensors,
            })?;
        let mut tensors = Vec::with_capacity(n_tensors_usize.min(MAX_PREALLOC));
        let mut seen_names: HashSet<String> = HashSet::new();
        for _ in 0..n_tensors_usize {
            tensors.push(self.tensor_info(&mut seen_names)?);
        }

        // data section starts at the aligned end of the tensor table (only if there are tensors,
        // exactly as ggml does)
        let data_offset = if tensors.is_empty() {
            self.pos
        } else {
            align_up(self.pos, alignment).ok_or(GgufError::UnexpectedEof {
                offset: self.pos,
                needed: alignment,
            })?
        };
        if data_offset > self.file_size {
            return Err(GgufError::UnexpectedEof {
                offset: self.pos,
                needed: data_offset - self.pos,
            });
        }

        let file = GgufFile {
            version,
            alignment,
            kv,
            tensors,
            data_offset,
            file_size: self.file_size,
        };
        file.validate_tensor_placement()?;
        Ok(file)
    }

    /// Magic, version and the two counts, checked against the limits and the bytes left.
    fn header(&mut self) -> Result<(u32, u64, u64), GgufError> {
        let magic: [u8; 4] = self.bytes()?;
        if &magic != GGUF_MAGIC {
            return Err(GgufError::BadMagic(magic));
        }
        let version = self.u32()?;
        if version != 2 && version != 3 {
            return Err(GgufError::UnsupportedVersion(version));
        }
        let n_tensors = self.u64()?;
        let n_kv = self.u64()?;
        if n_tensors > self.limits.max_tensors {
            return Err(GgufError::TooManyTensors {
                count: n_tensors,
                max: self.limits.max_tensors,
            });
        }
        if n_kv > self.limits.max_kv {
            return Err(GgufError::TooManyKv {
                count: n_kv,
                max: self.limits.max_kv,
            });
        }
        // both counts are small now (<= limits), so this cannot overflow for sane limits;
        // use saturating arithmetic anyway
        let min_needed = n_kv
            .saturating_mul(MIN_KV_BYTES)
            .saturating_add(n_tensors.saturating_mul(MIN_TENSOR_INFO_BYTES));
        if min_needed > self.remaining() {
            return Err(GgufError::UnexpectedEof {
                offset: self.pos,
                needed: min_needed,
            });
        }
        Ok((version, n_tensors, n_kv))
    }

    /// The metadata key-value pairs: non-empty keys, none twice.
    fn metadata(&mut self, n_kv: u64) -> Result<Vec<(String, Value)>, GgufError> {
        let n_kv_usize = usize::try_from(n_kv).map_err(|_| GgufError::TooManyKv {
            count: n_kv,
            max: self.limits.max_kv,
        })?;
        let mut kv: Vec<(String, Value)> = Vec::with_capacity(n_kv_usize.min(MAX_PREALLOC));
        let mut seen_keys: HashSet<String> = HashSet::new();
        for _ in 0..n_kv_usize {
            let key = self.string()?;
            if key.is_empty() {
                return Err(GgufError::EmptyKey);
            }
            if !seen_keys.insert(key.clone()) {
                return Err(GgufError::DuplicateKey(key));
            }
            let t = self.value_type()?;
            let v = self.value(t, 0)?;
            kv.push((key, v));
        }
        Ok(kv)
    }
}

/// Rounds `x` up to a multiple of `align` (a power of two); `None` on overflow.
pub(crate) fn align_up(x: u64, align: u64) -> Option<u64> {
    let mask = align.checked_sub(1)?;
    x.checked_add(mask).map(|v| v & !mask)
}

/// Checks that an alignment is a nonzero power of two no larger than `max`.
pub(crate) fn check_alignment(alignment: u64, max: u64) -> Result<(), GgufError> {
    if alignment == 0 || !alignment.is_power_of_two() {
        return Err(GgufError::BadAlignment(format!(
            "alignment {alignment} is not a power of two"
        )));
    }
    if alignment > max {
        return Err(GgufError::BadAlignment(format!(
            "alignment {alignment} exceeds maximum {max}"
        )));
    }
    Ok(())
}

impl GgufFile {
    /// Reads and validates the header and tensor table of a GGUF file with default [`Limits`].
    ///
    /// Only the header is read (through a buffered reader); tensor data is not touched,
    /// but every tensor's data range is checked against the real file size.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        Self::open_with_limits(path, &Limits::default())
    }

    /// Like [`GgufFile::open`] with explicit limits.
    pub fn open_with_limits(path: &Path, limits: &Limits) -> Result<Self, GgufError> {
        let file = File::open(path)?;
        let file_size = file.metadata()?.len();
        Self::parse_reader(BufReader::with_capacity(1 << 16, file), file_size, limits)
    }

    /// Parses a GGUF file held entirely in memory, with default [`Limits`].
    pub fn parse(bytes: &[u8]) -> Result<Self, GgufError> {
        Self::parse_with_limits(bytes, &Limits::default())
    }

    /// Like [`GgufFile::parse`] with explicit limits.
    pub fn parse_with_limits(bytes: &[u8], limits: &Limits) -> Result<Self, GgufError> {
        Self::parse_reader(bytes, bytes.len() as u64, limits)
    }

    /// Parses from any reader positioned at the start of a GGUF stream whose total
    /// length is `file_size` bytes. Reads only the header and tensor table.
    pub fn parse_reader<R: Read>(
        reader: R,
        file_size: u64,
        limits: &Limits,
    ) -> Result<Self, GgufError> {
        Parser {
            r: reader,
            pos: 0,
            file_size,
            limits,
            total_array_elems: 0,
        }
        .parse()
    }

    fn validate_tensor_placement(&self) -> Result<(), GgufError> {
        let mut spans: Vec<(u64, u64, usize)> = Vec::with_capacity(self.tensors.len());
        for (i, t) in self.tensors.iter().enumerate() {
            if t.offset % self.alignment != 0 {
                return Err(GgufError::MisalignedOffset {
                    name: t.name.clone(),
                    offset: t.offset,
                    alignment: self.alignment,
                });
            }
            let end = self
                .data_offset
                .checked_add(t.offset)
                .and_then(|s| s.checked_add(t.size));
            match end {
                Some(e) if e <= self.file_size => {}
                other => {
                    return Err(GgufError::TensorOutOfBounds {
                        name: t.name.clone(),
                        end: other.unwrap_or(u64::MAX),
                        file_size: self.file_size,
                    })
                }
            }
            if t.size > 0 {
                spans.push((t.offset, t.offset + t.size, i));
            }
        }
        spans.sort_unstable();
        for w in spans.windows(2) {
            if let [a, b] = w {
                if b.0 < a.1 {
                    return Err(GgufError::OverlappingTensors {
                        first: self.tensors[a.2].name.clone(),
                        second: self.tensors[b.2].name.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Checks the stricter layout that ggml's own reader (`gguf_init_from_file`) demands:
    /// tensor `i` must start exactly where tensor `i-1` ends, padded to the alignment.
    /// Files written by [`crate::GgufWriter`] always satisfy this.
    pub fn check_ggml_layout(&self) -> Result<(), GgufError> {
        let mut expected: u64 = 0;
        for t in &self.tensors {
            if t.offset != expected {
                return Err(GgufError::NonCanonicalLayout(format!(
                    "tensor '{}' has offset {}, ggml expects {}",
                    t.name, t.offset, expected
                )));
            }
            let padded = align_up(t.size, self.alignment)
                .ok_or_else(|| GgufError::ShapeOverflow(t.name.clone()))?;
            expected = expected
                .checked_add(padded)
                .ok_or_else(|| GgufError::ShapeOverflow(t.name.clone()))?;
        }
        Ok(())
    }

    /// Looks up a metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.kv.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Integer value as `u64` (any unsigned type, or a non-negative signed one).
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(Value::as_u64)
    }

    /// Integer value as `u32` (any integer type whose value fits).
    pub fn get_u32(&self, key: &str) -> Option<u32> {
        self.get(key).and_then(Value::as_u32)
    }

    /// Integer value as `i64` (any integer type whose value fits).
    pub fn get_i64(&self, key: &str) -> Option<i64> {
        self.get(key).and_then(Value::as_i64)
    }

    /// Float value (`f32`, or `f64` rounded).
    pub fn get_f32(&self, key: &str) -> Option<f32> {
        self.get(key).and_then(Value::as_f32)
    }

    /// String value.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }

    /// Boolean value.
    pub fn get_bool(&self, key: &str) -> Option<bool> {
        self.get(key).and_then(Value::as_bool)
    }

    /// Array value.
    pub fn get_array(&self, key: &str) -> Option<&Array> {
        self.get(key).and_then(Value::as_array)
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Option<&str> {
        self.get_str("general.architecture")
    }

    /// `"<architecture>.<suffix>"`, e.g. `arch_key("block_count")` → `"llama.block_count"`.
    /// `None` if the file has no architecture.
    pub fn arch_key(&self, suffix: &str) -> Option<String> {
        self.architecture().map(|a| format!("{a}.{suffix}"))
    }

    /// `<arch>.block_count` as `u32`.
    pub fn block_count(&self) -> Option<u32> {
        self.arch_key("block_count").and_then(|k| self.get_u32(&k))
    }

    /// Looks up a tensor by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Absolute file range of a tensor's data (saturating; for tensors from this file it is
    /// always within the file).
    pub fn tensor_data_range(&self, t: &TensorInfo) -> Range<u64> {
        let start = self.data_offset.saturating_add(t.offset);
        start..start.saturating_add(t.size)
    }

    fn checked_range(&self, t: &TensorInfo) -> Result<Range<u64>, GgufError> {
        let start = self.data_offset.checked_add(t.offset);
        let end = start.and_then(|s| s.checked_add(t.size));
        match (start, end) {
            (Some(s), Some(e)) if e <= self.file_size => Ok(s..e),
            (_, e) => Err(GgufError::TensorOutOfBounds {
                name: t.name.clone(),
                end: e.unwrap_or(u64::MAX),
                file_size: self.file_size,
            }),
        }
    }

    /// Reads a tensor's bytes from a reader over the same file.
    pub fn read_tensor_data<R: Read + Seek>(
        &self,
        reader: &mut R,
        t: &TensorInfo,
    ) -> Result<Vec<u8>, GgufError> {
        let range = self.checked_range(t)?;
        let len = usize::try_from(t.size).map_err(|_| GgufError::ShapeOverflow(t.name.clone()))?;
        reader.seek(SeekFrom::Start(range.start))?;
        let mut buf = vec![0u8; len];
        reader.read_exact(&mut buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                GgufError::UnexpectedEof {
                    offset: range.start,
                    needed: t.size,
                }
            } else {
                GgufError::Io(e)
            }
        })?;
        Ok(buf)
    }

    /// Reads a tensor's bytes by opening `path` (which must be the file this header came from).
    pub fn read_tensor_data_from_path(
        &self,
        path: &Path,
        t: &TensorInfo,
    ) -> Result<Vec<u8>, GgufError> {
        let mut f = File::open(path)?;
        self.read_tensor_data(&mut f, t)
    }

    /// Borrows a tensor's bytes from the in-memory file that was given to [`GgufFile::parse`].
    pub fn tensor_bytes<'a>(&self, bytes: &'a [u8], t: &TensorInfo) -> Result<&'a [u8], GgufError> {
        let range = self.checked_range(t)?;
        let start =
            usize::try_from(range.start).map_err(|_| GgufError::ShapeOverflow(t.name.clone()))?;
        let end =
            usize::try_from(range.end).map_err(|_| GgufError::ShapeOverflow(t.name.clone()))?;
        bytes.get(start..end).ok_or(GgufError::UnexpectedEof {
            offset: range.start,
            needed: t.size,
        })
    }
}
