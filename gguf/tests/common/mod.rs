//! Helpers to build (possibly malformed) GGUF byte streams by hand.
#![allow(dead_code)]

use drllm_gguf::{GgmlType, GgufWriter, TensorSource, Value, ValueType};

/// Little-endian byte builder.
#[derive(Default, Clone)]
pub struct Raw(pub Vec<u8>);

impl Raw {
    pub fn new() -> Self {
        Raw(Vec::new())
    }
    pub fn bytes(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
    pub fn u8(self, v: u8) -> Self {
        self.bytes(&[v])
    }
    pub fn u32(self, v: u32) -> Self {
        self.bytes(&v.to_le_bytes())
    }
    pub fn u64(self, v: u64) -> Self {
        self.bytes(&v.to_le_bytes())
    }
    pub fn str(self, s: &str) -> Self {
        self.u64(s.len() as u64).bytes(s.as_bytes())
    }
    /// magic + version + n_tensors + n_kv
    pub fn header(version: u32, n_tensors: u64, n_kv: u64) -> Self {
        Raw::new()
            .bytes(b"GGUF")
            .u32(version)
            .u64(n_tensors)
            .u64(n_kv)
    }
    /// key + u32 value
    pub fn kv_u32(self, key: &str, v: u32) -> Self {
        self.str(key).u32(ValueType::U32.id()).u32(v)
    }
    /// key + string value
    pub fn kv_str(self, key: &str, v: &str) -> Self {
        self.str(key).u32(ValueType::String.id()).str(v)
    }
    /// tensor info entry
    pub fn tensor(self, name: &str, dims: &[u64], ty: u32, offset: u64) -> Self {
        let mut r = self.str(name).u32(dims.len() as u32);
        for d in dims {
            r = r.u64(*d);
        }
        r.u32(ty).u64(offset)
    }
    /// pad with zeros to a multiple of `a`
    pub fn pad(mut self, a: usize) -> Self {
        while !self.0.len().is_multiple_of(a) {
            self.0.push(0);
        }
        self
    }
    /// append n zero bytes
    pub fn zeros(mut self, n: usize) -> Self {
        self.0.resize(self.0.len() + n, 0);
        self
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
}

/// A small valid file exercising every value type, a nested array and several tensor types.
pub fn sample_writer() -> GgufWriter {
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::string("llama"));
    w.set("general.name", Value::string("tiny ünïcode ▁test"));
    w.set("t.u8", Value::U8(200));
    w.set("t.i8", Value::I8(-100));
    w.set("t.u16", Value::U16(60000));
    w.set("t.i16", Value::I16(-30000));
    w.set("t.u32", Value::U32(4_000_000_000));
    w.set("t.i32", Value::I32(-2_000_000_000));
    w.set("t.f32", Value::F32(1.5));
    w.set("t.bool", Value::Bool(true));
    w.set("t.u64", Value::U64(u64::MAX));
    w.set("t.i64", Value::I64(i64::MIN));
    w.set("t.f64", Value::F64(-2.25));
    w.set("t.strs", Value::string_array(["a", "bb", "", "▁the"]));
    w.set(
        "t.f32s",
        Value::array(ValueType::F32, vec![Value::F32(0.5), Value::F32(-1.0)]),
    );
    w.set(
        "t.nested",
        Value::array(
            ValueType::Array,
            vec![
                Value::array(ValueType::I32, vec![Value::I32(1), Value::I32(2)]),
                Value::string_array(["x"]),
                Value::array(ValueType::Bool, vec![]),
            ],
        ),
    );
    w.set("t.empty", Value::array(ValueType::U8, vec![]));
    let f32_data: Vec<u8> = (0..8u32).flat_map(|i| (i as f32).to_le_bytes()).collect();
    w.add_tensor(
        "a.f32",
        GgmlType::F32,
        &[4, 2],
        TensorSource::Bytes(f32_data),
    )
    .unwrap();
    w.add_tensor(
        "b.q8_0",
        GgmlType::Q8_0,
        &[32, 2],
        TensorSource::Bytes((0..68u8).collect()),
    )
    .unwrap();
    w.add_tensor(
        "c.f16",
        GgmlType::F16,
        &[3],
        TensorSource::Bytes(vec![1, 2, 3, 4, 5, 6]),
    )
    .unwrap();
    w
}

pub fn sample_bytes() -> Vec<u8> {
    let mut out = Vec::new();
    sample_writer().write_to(&mut out).unwrap();
    out
}
