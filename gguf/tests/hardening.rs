//! Every malformed-input check of the reader, each with a hand-built file.

mod common;

use common::{sample_bytes, Raw};
use drllm_gguf::{GgmlType, GgufError, GgufFile, Limits, ValueType};

fn parse(r: &Raw) -> Result<GgufFile, GgufError> {
    GgufFile::parse(&r.0)
}

/// A one-tensor F32 file with the tensor at `offset` and `extra` bytes of data.
fn one_tensor(dims: &[u64], ty: u32, offset: u64, data: usize) -> Raw {
    Raw::header(3, 1, 0)
        .tensor("t", dims, ty, offset)
        .pad(32)
        .zeros(data)
}

#[test]
fn accepts_minimal_files() {
    let f = parse(&Raw::header(3, 0, 0)).unwrap();
    assert_eq!(f.version, 3);
    assert_eq!(f.data_offset, 24);
    let f = parse(&Raw::header(2, 0, 0)).unwrap();
    assert_eq!(f.version, 2);
    let f = parse(&one_tensor(&[4], 0, 0, 16)).unwrap();
    assert_eq!(f.tensors[0].size, 16);
    assert_eq!(f.data_offset % 32, 0);
}

#[test]
fn rejects_bad_magic() {
    let r = Raw::new().bytes(b"GGUG").u32(3).u64(0).u64(0);
    assert!(matches!(parse(&r), Err(GgufError::BadMagic(m)) if &m == b"GGUG"));
    let r = Raw::new().bytes(b"FUGG").u32(3).u64(0).u64(0);
    assert!(matches!(parse(&r), Err(GgufError::BadMagic(_))));
}

#[test]
fn rejects_bad_version() {
    for v in [0u32, 1, 4, 0x0300_0000, u32::MAX] {
        let r = Raw::header(v, 0, 0);
        assert!(
            matches!(parse(&r), Err(GgufError::UnsupportedVersion(x)) if x == v),
            "version {v}"
        );
    }
}

#[test]
fn rejects_truncated_header() {
    let full = Raw::header(3, 0, 0);
    for n in 0..full.len() {
        let r = Raw(full.0[..n].to_vec());
        assert!(
            matches!(parse(&r), Err(GgufError::UnexpectedEof { .. })),
            "truncated at {n}"
        );
    }
}

#[test]
fn rejects_truncated_in_kv() {
    let full = Raw::header(3, 0, 2)
        .kv_u32("general.alignment", 32)
        .kv_str("general.name", "hello world");
    // cut inside the second kv (inside its string value)
    let r = Raw(full.0[..full.len() - 3].to_vec());
    assert!(matches!(parse(&r), Err(GgufError::UnexpectedEof { .. })));
    // and inside the first key
    let r = Raw(full.0[..24 + 8 + 4].to_vec());
    assert!(matches!(parse(&r), Err(GgufError::UnexpectedEof { .. })));
}

#[test]
fn rejects_truncated_in_tensor_table() {
    let full = Raw::header(3, 2, 0)
        .tensor("a", &[8], 0, 0)
        .tensor("b", &[8], 0, 32);
    let cut = full.len() - 5; // inside b's offset field
    let r = Raw(full.0[..cut].to_vec());
    assert!(matches!(parse(&r), Err(GgufError::UnexpectedEof { .. })));
    // complete table but no data section at all
    assert!(matches!(
        parse(&full),
        Err(GgufError::UnexpectedEof { .. }) | Err(GgufError::TensorOutOfBounds { .. })
    ));
}

#[test]
fn rejects_truncated_data() {
    // tensor needs 32 bytes, only 31 present
    let r = one_tensor(&[8], 0, 0, 31);
    assert!(matches!(
        parse(&r),
        Err(GgufError::TensorOutOfBounds { .. })
    ));
}

#[test]
fn rejects_huge_kv_count() {
    let r = Raw::header(3, 0, 1 << 40);
    assert!(matches!(
        parse(&r),
        Err(GgufError::TooManyKv { count, .. }) if count == 1 << 40
    ));
    let r = Raw::header(3, 0, u64::MAX);
    assert!(matches!(parse(&r), Err(GgufError::TooManyKv { .. })));
}

#[test]
fn rejects_kv_count_exceeding_remaining_bytes() {
    // within the limit, but the file cannot possibly hold 1000 pairs
    let r = Raw::header(3, 0, 1000).kv_u32("a", 1);
    assert!(matches!(parse(&r), Err(GgufError::UnexpectedEof { .. })));
}

#[test]
fn rejects_huge_tensor_count() {
    let r = Raw::header(3, 1 << 40, 0);
    assert!(matches!(
        parse(&r),
        Err(GgufError::TooManyTensors { count, .. }) if count == 1 << 40
    ));
    // within the limit but not enough bytes
    let r = Raw::header(3, 5000, 0).zeros(100);
    assert!(matches!(parse(&r), Err(GgufError::UnexpectedEof { .. })));
}

#[test]
fn rejects_huge_string_length() {
    let r = Raw::header(3, 0, 1).u64(1 << 40).zeros(64);
    assert!(matches!(
        parse(&r),
        Err(GgufError::StringTooLong { len, .. }) if len == 1 << 40
    ));
    let r = Raw::header(3, 0, 1).u64(u64::MAX).zeros(64);
    assert!(matches!(parse(&r), Err(GgufError::StringTooLong { .. })));
    // within the limit but longer than the rest of the file
    let r = Raw::header(3, 0, 1)
        .str("k")
        .u32(ValueType::String.id())
        .u64(1000)
        .bytes(b"abc");
    assert!(matches!(parse(&r), Err(GgufError::UnexpectedEof { .. })));
}

#[test]
fn rejects_huge_array_length() {
    let r = Raw::header(3, 0, 1)
        .str("k")
        .u32(ValueType::Array.id())
        .u32(ValueType::U8.id())
        .u64(1 << 40)
        .zeros(64);
    assert!(matches!(
        parse(&r),
        Err(GgufError::ArrayTooLong { len, .. }) if len == 1 << 40
    ));
    // within the limit, but the remaining bytes cannot hold the elements: no allocation
    let r = Raw::header(3, 0, 1)
        .str("k")
        .u32(ValueType::Array.id())
        .u32(ValueType::String.id())
        .u64(1 << 20)
        .zeros(64);
    assert!(matches!(parse(&r), Err(GgufError::UnexpectedEof { .. })));
}

#[test]
fn rejects_unknown_value_type() {
    let r = Raw::header(3, 0, 1).str("k").u32(13).u32(0);
    assert!(matches!(
        parse(&r),
        Err(GgufError::InvalidValueType { type_id: 13, .. })
    ));
    // unknown array element type
    let r = Raw::header(3, 0, 1)
        .str("k")
        .u32(ValueType::Array.id())
        .u32(77)
        .u64(0);
    assert!(matches!(
        parse(&r),
        Err(GgufError::InvalidValueType { type_id: 77, .. })
    ));
}

#[test]
fn rejects_deep_array_nesting() {
    // array<array<array<u8>>> is depth 3 > default 2
    let r = Raw::header(3, 0, 1)
        .str("k")
        .u32(ValueType::Array.id())
        .u32(ValueType::Array.id())
        .u64(1)
        .u32(ValueType::Array.id())
        .u64(1)
        .u32(ValueType::U8.id())
        .u64(1)
        .u8(7);
    assert!(matches!(
        parse(&r),
        Err(GgufError::ArrayNestingTooDeep { depth: 3, .. })
    ));
    // depth 2 is fine
    let r = Raw::header(3, 0, 1)
        .str("k")
        .u32(ValueType::Array.id())
        .u32(ValueType::Array.id())
        .u64(1)
        .u32(ValueType::U8.id())
        .u64(1)
        .u8(7);
    assert!(parse(&r).is_ok());
}

#[test]
fn rejects_non_utf8_string() {
    let r = Raw::header(3, 0, 1)
        .str("k")
        .u32(ValueType::String.id())
        .u64(2)
        .bytes(&[0xc3, 0x28]);
    assert!(matches!(parse(&r), Err(GgufError::InvalidUtf8 { .. })));
    // non-UTF-8 key
    let r = Raw::header(3, 0, 1).u64(1).u8(0xff).u32(4).u32(0);
    assert!(matches!(parse(&r), Err(GgufError::InvalidUtf8 { .. })));
}

#[test]
fn rejects_empty_key() {
    let r = Raw::header(3, 0, 1).kv_u32("", 1);
    assert!(matches!(parse(&r), Err(GgufError::EmptyKey)));
}

#[test]
fn rejects_duplicate_key() {
    let r = Raw::header(3, 0, 2).kv_u32("a.b", 1).kv_u32("a.b", 2);
    assert!(matches!(parse(&r), Err(GgufError::DuplicateKey(k)) if k == "a.b"));
}

#[test]
fn rejects_unknown_dtype() {
    for ty in [4u32, 5, 31, 32, 33, 36, 37, 38, 43, 1000, u32::MAX] {
        let r = one_tensor(&[32], ty, 0, 4096);
        assert!(
            matches!(parse(&r), Err(GgufError::UnknownGgmlType { type_id, .. }) if type_id == ty),
            "type {ty}"
        );
    }
}

#[test]
fn rejects_too_many_dims() {
    let r = one_tensor(&[1, 1, 1, 1, 1], 0, 0, 32);
    assert!(matches!(
        parse(&r),
        Err(GgufError::TooManyDims { n_dims: 5, .. })
    ));
    let r = Raw::header(3, 1, 0).str("t").u32(u32::MAX).zeros(64);
    assert!(matches!(parse(&r), Err(GgufError::TooManyDims { .. })));
}

#[test]
fn rejects_negative_dim() {
    let r = one_tensor(&[4, u64::MAX], 0, 0, 64);
    assert!(matches!(
        parse(&r),
        Err(GgufError::InvalidDim { index: 1, .. })
    ));
    let r = one_tensor(&[1 << 63], 0, 0, 64);
    assert!(matches!(
        parse(&r),
        Err(GgufError::InvalidDim { index: 0, .. })
    ));
}

#[test]
fn rejects_overflowing_dims() {
    // element count overflows int64
    let r = one_tensor(&[1 << 32, 1 << 32], 0, 0, 64);
    assert!(matches!(parse(&r), Err(GgufError::ShapeOverflow(_))));
    let r = one_tensor(&[i64::MAX as u64, 2], 0, 0, 64);
    assert!(matches!(parse(&r), Err(GgufError::ShapeOverflow(_))));
    // element count fits, byte size overflows int64 (f64 = 8 bytes/element)
    let r = one_tensor(&[1 << 31, 1 << 31], GgmlType::F64.0, 0, 64);
    assert!(matches!(parse(&r), Err(GgufError::ShapeOverflow(_))));
    // fits everything but is far larger than the file
    let r = one_tensor(&[1 << 20, 1 << 20], 0, 0, 64);
    assert!(matches!(
        parse(&r),
        Err(GgufError::TensorOutOfBounds { .. })
    ));
}

#[test]
fn zero_dims_mirror_ggml() {
    // ggml accepts zero-sized dimensions (an empty tensor) and n_dims == 0 (one element)
    let f = parse(&one_tensor(&[4, 0], 0, 0, 0)).unwrap();
    assert_eq!(f.tensors[0].size, 0);
    assert_eq!(f.tensors[0].n_elements(), 0);
    let f = parse(&one_tensor(&[], 0, 0, 4)).unwrap();
    assert_eq!(f.tensors[0].n_elements(), 1);
    assert_eq!(f.tensors[0].ne(), [1, 1, 1, 1]);
    assert_eq!(f.tensors[0].size, 4);
}

#[test]
fn rejects_block_size_mismatch() {
    let r = one_tensor(&[16, 2], GgmlType::Q4_0.0, 0, 1024);
    assert!(matches!(
        parse(&r),
        Err(GgufError::BlockSizeMismatch {
            ne0: 16,
            block_size: 32,
            ..
        })
    ));
    let r = one_tensor(&[300], GgmlType::Q4_K.0, 0, 1024);
    assert!(matches!(
        parse(&r),
        Err(GgufError::BlockSizeMismatch { .. })
    ));
}

#[test]
fn rejects_offset_past_end() {
    let r = one_tensor(&[8], 0, 64, 32);
    assert!(matches!(
        parse(&r),
        Err(GgufError::TensorOutOfBounds { .. })
    ));
    // offset so large that data_offset + offset overflows
    let r = one_tensor(&[8], 0, u64::MAX - 31, 32);
    assert!(matches!(
        parse(&r),
        Err(GgufError::TensorOutOfBounds { end: u64::MAX, .. })
    ));
}

#[test]
fn rejects_misaligned_offset() {
    let r = Raw::header(3, 2, 0)
        .tensor("a", &[4], 0, 0)
        .tensor("b", &[4], 0, 16)
        .pad(32)
        .zeros(64);
    assert!(matches!(
        parse(&r),
        Err(GgufError::MisalignedOffset {
            offset: 16,
            alignment: 32,
            ..
        })
    ));
}

#[test]
fn rejects_bad_alignment() {
    for a in [0u32, 3, 6, 1 << 30] {
        let r = Raw::header(3, 0, 1).kv_u32("general.alignment", a);
        assert!(
            matches!(parse(&r), Err(GgufError::BadAlignment(_))),
            "alignment {a}"
        );
    }
    // wrong type (u64) is rejected like ggml does
    let r = Raw::header(3, 0, 1)
        .str("general.alignment")
        .u32(ValueType::U64.id())
        .u64(32);
    assert!(matches!(parse(&r), Err(GgufError::BadAlignment(_))));
    // a valid non-default alignment is honoured
    let r = Raw::header(3, 1, 1)
        .kv_u32("general.alignment", 64)
        .tensor("t", &[4], 0, 0)
        .pad(64)
        .zeros(16);
    let f = parse(&r).unwrap();
    assert_eq!(f.alignment, 64);
    assert_eq!(f.data_offset % 64, 0);
}

#[test]
fn rejects_duplicate_tensor() {
    let r = Raw::header(3, 2, 0)
        .tensor("w", &[8], 0, 0)
        .tensor("w", &[8], 0, 32)
        .pad(32)
        .zeros(64);
    assert!(matches!(parse(&r), Err(GgufError::DuplicateTensor(n)) if n == "w"));
}

#[test]
fn rejects_overlapping_tensors() {
    let r = Raw::header(3, 2, 0)
        .tensor("a", &[16], 0, 0) // 64 bytes: [0, 64)
        .tensor("b", &[8], 0, 32) // [32, 64)
        .pad(32)
        .zeros(64);
    assert!(matches!(
        parse(&r),
        Err(GgufError::OverlappingTensors { .. })
    ));
    // identical ranges
    let r = Raw::header(3, 2, 0)
        .tensor("a", &[8], 0, 0)
        .tensor("b", &[8], 0, 0)
        .pad(32)
        .zeros(64);
    assert!(matches!(
        parse(&r),
        Err(GgufError::OverlappingTensors { .. })
    ));
}

#[test]
fn rejects_tensor_name_too_long() {
    let name = "x".repeat(64);
    let r = Raw::header(3, 1, 0)
        .tensor(&name, &[8], 0, 0)
        .pad(32)
        .zeros(32);
    assert!(matches!(parse(&r), Err(GgufError::TensorNameTooLong(_))));
    let name = "x".repeat(63);
    let r = Raw::header(3, 1, 0)
        .tensor(&name, &[8], 0, 0)
        .pad(32)
        .zeros(32);
    assert!(parse(&r).is_ok());
}

#[test]
fn rejects_header_larger_than_limit() {
    let bytes = sample_bytes();
    let limits = Limits {
        max_header_bytes: 100,
        ..Limits::default()
    };
    assert!(matches!(
        GgufFile::parse_with_limits(&bytes, &limits),
        Err(GgufError::HeaderTooLarge { max: 100 })
    ));
}

#[test]
fn rejects_counts_over_custom_limits() {
    let bytes = sample_bytes();
    let limits = Limits {
        max_kv: 3,
        ..Limits::default()
    };
    assert!(matches!(
        GgufFile::parse_with_limits(&bytes, &limits),
        Err(GgufError::TooManyKv { max: 3, .. })
    ));
    let limits = Limits {
        max_tensors: 2,
        ..Limits::default()
    };
    assert!(matches!(
        GgufFile::parse_with_limits(&bytes, &limits),
        Err(GgufError::TooManyTensors { max: 2, .. })
    ));
    let limits = Limits {
        max_string_len: 4,
        ..Limits::default()
    };
    assert!(matches!(
        GgufFile::parse_with_limits(&bytes, &limits),
        Err(GgufError::StringTooLong { max: 4, .. })
    ));
    let limits = Limits {
        max_array_len: 1,
        ..Limits::default()
    };
    assert!(matches!(
        GgufFile::parse_with_limits(&bytes, &limits),
        Err(GgufError::ArrayTooLong { max: 1, .. })
    ));
    let limits = Limits {
        max_total_array_elems: 8,
        ..Limits::default()
    };
    assert!(matches!(
        GgufFile::parse_with_limits(&bytes, &limits),
        Err(GgufError::TooManyArrayElements { max: 8, .. })
    ));
    let limits = Limits {
        max_array_depth: 1,
        ..Limits::default()
    };
    assert!(matches!(
        GgufFile::parse_with_limits(&bytes, &limits),
        Err(GgufError::ArrayNestingTooDeep { depth: 2, max: 1 })
    ));
}

#[test]
fn open_validates_against_real_file_size() {
    let dir = std::env::temp_dir().join(format!("drllm-gguf-open-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("trunc.gguf");
    let bytes = sample_bytes();
    std::fs::write(&p, &bytes[..bytes.len() - 40]).unwrap();
    assert!(matches!(
        GgufFile::open(&p),
        Err(GgufError::TensorOutOfBounds { .. })
    ));
    std::fs::write(&p, &bytes).unwrap();
    let f = GgufFile::open(&p).unwrap();
    assert_eq!(f, GgufFile::parse(&bytes).unwrap());
    assert!(matches!(
        GgufFile::open(&dir.join("missing.gguf")),
        Err(GgufError::Io(_))
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Deterministic xorshift for the mutation test.
struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

#[test]
fn never_panics_on_truncation_or_bit_flips() {
    let bytes = sample_bytes();
    let f = GgufFile::parse(&bytes).unwrap();
    let needed = f
        .tensors
        .iter()
        .map(|t| f.tensor_data_range(t).end)
        .max()
        .unwrap() as usize;
    // every truncation point: an error until the last tensor's data is complete
    // (only the trailing padding may be cut)
    for n in 0..bytes.len() {
        let r = GgufFile::parse(&bytes[..n]);
        assert_eq!(r.is_ok(), n >= needed, "truncated at {n}");
    }
    // every byte, several flip patterns
    for i in 0..bytes.len() {
        for mask in [0x01u8, 0x80, 0xff] {
            let mut m = bytes.clone();
            m[i] ^= mask;
            let _ = GgufFile::parse(&m);
        }
        // set to extreme values too
        for v in [0u8, 0x7f, 0xff] {
            let mut m = bytes.clone();
            m[i] = v;
            let _ = GgufFile::parse(&m);
        }
    }
    // random multi-byte mutations
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    for _ in 0..20_000 {
        let mut m = bytes.clone();
        let k = 1 + (rng.next() % 8) as usize;
        for _ in 0..k {
            let i = (rng.next() as usize) % m.len();
            m[i] = rng.next() as u8;
        }
        if rng.next().is_multiple_of(4) {
            let cut = (rng.next() as usize) % m.len();
            m.truncate(cut);
        }
        let _ = GgufFile::parse(&m);
    }
}
