//! Metadata value types and ggml tensor types.

use std::fmt;

/// The type tag of a GGUF metadata value, with its numeric id as stored in the file.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
#[repr(u32)]
pub enum ValueType {
    /// `uint8`
    U8 = 0,
    /// `int8`
    I8 = 1,
    /// `uint16`
    U16 = 2,
    /// `int16`
    I16 = 3,
    /// `uint32`
    U32 = 4,
    /// `int32`
    I32 = 5,
    /// `float32`
    F32 = 6,
    /// `bool` (one byte)
    Bool = 7,
    /// Length-prefixed UTF-8 string.
    String = 8,
    /// Typed array.
    Array = 9,
    /// `uint64`
    U64 = 10,
    /// `int64`
    I64 = 11,
    /// `float64`
    F64 = 12,
}

impl ValueType {
    /// Maps a numeric id from the file to a value type; `None` for unknown ids.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => ValueType::U8,
            1 => ValueType::I8,
            2 => ValueType::U16,
            3 => ValueType::I16,
            4 => ValueType::U32,
            5 => ValueType::I32,
            6 => ValueType::F32,
            7 => ValueType::Bool,
            8 => ValueType::String,
            9 => ValueType::Array,
            10 => ValueType::U64,
            11 => ValueType::I64,
            12 => ValueType::F64,
            _ => return None,
        })
    }

    /// The numeric id stored in the file.
    pub fn id(self) -> u32 {
        self as u32
    }

    /// Size in bytes of a fixed-size value, `None` for strings and arrays.
    pub fn fixed_size(self) -> Option<u64> {
        match self {
            ValueType::U8 | ValueType::I8 | ValueType::Bool => Some(1),
            ValueType::U16 | ValueType::I16 => Some(2),
            ValueType::U32 | ValueType::I32 | ValueType::F32 => Some(4),
            ValueType::U64 | ValueType::I64 | ValueType::F64 => Some(8),
            ValueType::String | ValueType::Array => None,
        }
    }

    /// The smallest number of bytes a value of this type can occupy in a file.
    pub fn min_encoded_size(self) -> u64 {
        match self {
            ValueType::String => 8,
            // element type (4) + length (8)
            ValueType::Array => 12,
            other => other.fixed_size().unwrap_or(1),
        }
    }

    /// Lower-case name as used by ggml (`u8`, `str`, `arr`, ...).
    pub fn name(self) -> &'static str {
        match self {
            ValueType::U8 => "u8",
            ValueType::I8 => "i8",
            ValueType::U16 => "u16",
            ValueType::I16 => "i16",
            ValueType::U32 => "u32",
            ValueType::I32 => "i32",
            ValueType::F32 => "f32",
            ValueType::Bool => "bool",
            ValueType::String => "str",
            ValueType::Array => "arr",
            ValueType::U64 => "u64",
            ValueType::I64 => "i64",
            ValueType::F64 => "f64",
        }
    }
}

impl fmt::Display for ValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A typed GGUF array. All `values` must have type `elem_type`.
#[derive(Clone, Debug, PartialEq)]
pub struct Array {
    /// Type of every element.
    pub elem_type: ValueType,
    /// The elements.
    pub values: Vec<Value>,
}

impl Array {
    /// Creates an array; does not check that the values match `elem_type`
    /// (the writer does).
    pub fn new(elem_type: ValueType, values: Vec<Value>) -> Self {
        Array { elem_type, values }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

/// A GGUF metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// `uint8`
    U8(u8),
    /// `int8`
    I8(i8),
    /// `uint16`
    U16(u16),
    /// `int16`
    I16(i16),
    /// `uint32`
    U32(u32),
    /// `int32`
    I32(i32),
    /// `float32`
    F32(f32),
    /// `bool`
    Bool(bool),
    /// UTF-8 string.
    String(String),
    /// `uint64`
    U64(u64),
    /// `int64`
    I64(i64),
    /// `float64`
    F64(f64),
    /// Typed array.
    Array(Array),
}

impl Value {
    /// The value's type tag.
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
            Value::Array(_) => ValueType::Array,
        }
    }

    /// Any unsigned integer, or a signed integer that is non-negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(u64::from(v)),
            Value::U16(v) => Some(u64::from(v)),
            Value::U32(v) => Some(u64::from(v)),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer that fits in an `i64`.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::U8(v) => Some(i64::from(v)),
            Value::U16(v) => Some(i64::from(v)),
            Value::U32(v) => Some(i64::from(v)),
            Value::U64(v) => i64::try_from(v).ok(),
            Value::I8(v) => Some(i64::from(v)),
            Value::I16(v) => Some(i64::from(v)),
            Value::I32(v) => Some(i64::from(v)),
            Value::I64(v) => Some(v),
            _ => None,
        }
    }

    /// Any integer that fits in a `u32`.
    pub fn as_u32(&self) -> Option<u32> {
        self.as_u64().and_then(|v| u32::try_from(v).ok())
    }

    /// `f32` or `f64` (the latter rounded to `f32`).
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            Value::F32(v) => Some(v),
            #[allow(clippy::cast_possible_truncation)]
            Value::F64(v) => Some(v as f32),
            _ => None,
        }
    }

    /// `f32` or `f64` as `f64`.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(f64::from(v)),
            Value::F64(v) => Some(v),
            _ => None,
        }
    }

    /// The string, if this is a string value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The boolean, if this is a bool value.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The array, if this is an array value.
    pub fn as_array(&self) -> Option<&Array> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// Convenience: a string value.
    pub fn string(s: impl Into<String>) -> Self {
        Value::String(s.into())
    }

    /// Convenience: an array value of the given element type.
    pub fn array(elem_type: ValueType, values: Vec<Value>) -> Self {
        Value::Array(Array::new(elem_type, values))
    }

    /// Convenience: an array of strings.
    pub fn string_array<I, S>(items: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Value::array(
            ValueType::String,
            items.into_iter().map(|s| Value::String(s.into())).collect(),
        )
    }
}

macro_rules! impl_from {
    ($t:ty, $v:ident) => {
        impl From<$t> for Value {
            fn from(x: $t) -> Self {
                Value::$v(x)
            }
        }
    };
}
impl_from!(u8, U8);
impl_from!(i8, I8);
impl_from!(u16, U16);
impl_from!(i16, I16);
impl_from!(u32, U32);
impl_from!(i32, I32);
impl_from!(f32, F32);
impl_from!(bool, Bool);
impl_from!(String, String);
impl_from!(u64, U64);
impl_from!(i64, I64);
impl_from!(f64, F64);
impl_from!(Array, Array);

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::String(s.to_owned())
    }
}

/// A ggml tensor element type (`enum ggml_type`), stored as its raw id so that
/// unknown ids can be represented and reported.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub struct GgmlType(pub u32);

/// (id, name, block size, bytes per block) for every type in ggml's `type_traits`
/// table with a nonzero size (vendored llama.cpp, ggml/src/ggml.c + ggml-common.h).
const TYPE_TABLE: &[(u32, &str, u64, u64)] = &[
    (0, "f32", 1, 4),
    (1, "f16", 1, 2),
    (2, "q4_0", 32, 18),
    (3, "q4_1", 32, 20),
    (6, "q5_0", 32, 22),
    (7, "q5_1", 32, 24),
    (8, "q8_0", 32, 34),
    (9, "q8_1", 32, 36),
    (10, "q2_K", 256, 84),
    (11, "q3_K", 256, 110),
    (12, "q4_K", 256, 144),
    (13, "q5_K", 256, 176),
    (14, "q6_K", 256, 210),
    (15, "q8_K", 256, 292),
    (16, "iq2_xxs", 256, 66),
    (17, "iq2_xs", 256, 74),
    (18, "iq3_xxs", 256, 98),
    (19, "iq1_s", 256, 50),
    (20, "iq4_nl", 32, 18),
    (21, "iq3_s", 256, 110),
    (22, "iq2_s", 256, 82),
    (23, "iq4_xs", 256, 136),
    (24, "i8", 1, 1),
    (25, "i16", 1, 2),
    (26, "i32", 1, 4),
    (27, "i64", 1, 8),
    (28, "f64", 1, 8),
    (29, "iq1_m", 256, 56),
    (30, "bf16", 1, 2),
    (34, "tq1_0", 256, 54),
    (35, "tq2_0", 256, 66),
    (39, "mxfp4", 32, 17),
    (40, "nvfp4", 64, 36),
    (41, "q1_0", 128, 18),
    (42, "q2_0", 64, 18),
];

#[allow(missing_docs)]
impl GgmlType {
    pub const F32: GgmlType = GgmlType(0);
    pub const F16: GgmlType = GgmlType(1);
    pub const Q4_0: GgmlType = GgmlType(2);
    pub const Q4_1: GgmlType = GgmlType(3);
    pub const Q5_0: GgmlType = GgmlType(6);
    pub const Q5_1: GgmlType = GgmlType(7);
    pub const Q8_0: GgmlType = GgmlType(8);
    pub const Q8_1: GgmlType = GgmlType(9);
    pub const Q2_K: GgmlType = GgmlType(10);
    pub const Q3_K: GgmlType = GgmlType(11);
    pub const Q4_K: GgmlType = GgmlType(12);
    pub const Q5_K: GgmlType = GgmlType(13);
    pub const Q6_K: GgmlType = GgmlType(14);
    pub const Q8_K: GgmlType = GgmlType(15);
    pub const IQ2_XXS: GgmlType = GgmlType(16);
    pub const IQ2_XS: GgmlType = GgmlType(17);
    pub const IQ3_XXS: GgmlType = GgmlType(18);
    pub const IQ1_S: GgmlType = GgmlType(19);
    pub const IQ4_NL: GgmlType = GgmlType(20);
    pub const IQ3_S: GgmlType = GgmlType(21);
    pub const IQ2_S: GgmlType = GgmlType(22);
    pub const IQ4_XS: GgmlType = GgmlType(23);
    pub const I8: GgmlType = GgmlType(24);
    pub const I16: GgmlType = GgmlType(25);
    pub const I32: GgmlType = GgmlType(26);
    pub const I64: GgmlType = GgmlType(27);
    pub const F64: GgmlType = GgmlType(28);
    pub const IQ1_M: GgmlType = GgmlType(29);
    pub const BF16: GgmlType = GgmlType(30);
    pub const TQ1_0: GgmlType = GgmlType(34);
    pub const TQ2_0: GgmlType = GgmlType(35);
    pub const MXFP4: GgmlType = GgmlType(39);
    pub const NVFP4: GgmlType = GgmlType(40);
    pub const Q1_0: GgmlType = GgmlType(41);
    pub const Q2_0: GgmlType = GgmlType(42);
}

impl GgmlType {
    fn entry(self) -> Option<&'static (u32, &'static str, u64, u64)> {
        TYPE_TABLE.iter().find(|e| e.0 == self.0)
    }

    /// All known types, in id order.
    pub fn all() -> impl Iterator<Item = GgmlType> {
        TYPE_TABLE.iter().map(|e| GgmlType(e.0))
    }

    /// ggml's name for the type (`"q4_K"`, `"f16"`, ...), or `"unknown"`.
    pub fn name(self) -> &'static str {
        self.entry().map_or("unknown", |e| e.1)
    }

    /// Number of elements per block (1 for plain types), `None` if unknown.
    pub fn block_size(self) -> Option<u64> {
        self.entry().map(|e| e.2)
    }

    /// Bytes per block, `None` if unknown.
    pub fn type_size(self) -> Option<u64> {
        self.entry().map(|e| e.3)
    }

    /// Whether this crate knows the type's block layout.
    pub fn is_known(self) -> bool {
        self.entry().is_some()
    }

    /// Byte size of a tensor of this type with the given `ne` (innermost first).
    ///
    /// Returns `None` for unknown types, on overflow, or when `ne[0]` is not a
    /// multiple of the block size. A zero dimension gives size 0.
    pub fn tensor_size(self, dims: &[u64]) -> Option<u64> {
        let bs = self.block_size()?;
        let ts = self.type_size()?;
        let ne0 = dims.first().copied().unwrap_or(1);
        if ne0 % bs != 0 {
            return None;
        }
        let mut n: u64 = 1;
        for &d in dims {
            n = n.checked_mul(d)?;
        }
        (n / bs).checked_mul(ts)
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_known() {
            f.write_str(self.name())
        } else {
            write!(f, "unknown({})", self.0)
        }
    }
}
