//! Every check of the sidecar reader, each with a malformed file built in memory, and
//! robustness against truncation and random corruption (never a panic).

mod common;

use common::{data_range, entry, put_u32, put_u64, small, write};
use drllm_gguf::{GgmlType, GgufError, GgufWriter, TensorSource, Value, ValueType};
use drllm_router_format::*;

fn f32s() -> Vec<u8> {
    small().to_bytes(StorageType::F32).unwrap()
}

fn writer() -> GgufWriter {
    small().to_writer(StorageType::F32).unwrap()
}

fn parse_w(w: &GgufWriter) -> Result<Sidecar, FormatError> {
    Sidecar::parse(&write(w))
}

/// Replaces a tensor (keeping its place at the end of the table is not needed).
fn replace(w: &mut GgufWriter, name: &str, dtype: GgmlType, dims: &[u64], data: Vec<u8>) {
    assert!(w.remove_tensor(name), "{name}");
    w.add_tensor(name, dtype, dims, TensorSource::Bytes(data))
        .unwrap();
}

macro_rules! assert_err {
    ($res:expr, $pat:pat) => {
        match $res {
            Err($pat) => {}
            other => panic!(
                "expected {}, got {:?}",
                stringify!($pat),
                other.map(|_| "Ok(..)")
            ),
        }
    };
    ($res:expr, $pat:pat if $cond:expr) => {
        match $res {
            Err($pat) if $cond => {}
            other => panic!(
                "expected {} if {}, got {:?}",
                stringify!($pat),
                stringify!($cond),
                other.map(|_| "Ok(..)")
            ),
        }
    };
}

#[test]
fn accepts_the_baseline() {
    assert_eq!(Sidecar::parse(&f32s()).unwrap(), small());
}

#[test]
fn rejects_truncated() {
    let bytes = f32s();
    let g = drllm_gguf::GgufFile::parse(&bytes).unwrap();
    let table = entry(&bytes, "router.0.fc1.weight").n_dims_at;
    for cut in [
        0,
        3,
        4,
        10,
        23,
        24 + 5,    // inside the first key
        table - 3, // inside the metadata / first tensor name
        table + 2, // inside the tensor table
        g.data_offset as usize - 1,
    ] {
        assert_err!(
            Sidecar::parse(&bytes[..cut]),
            FormatError::Gguf(GgufError::UnexpectedEof { .. })
        );
    }
    // cut inside the data section: the last tensors run past the end
    let data_end = data_range(&bytes, "router.1.fc2.bias").end;
    for cut in [g.data_offset as usize + 1, data_end - 1] {
        assert_err!(
            Sidecar::parse(&bytes[..cut]),
            FormatError::Gguf(GgufError::TensorOutOfBounds { .. })
        );
    }
}

#[test]
fn rejects_bad_magic() {
    let mut b = f32s();
    b[..4].copy_from_slice(b"GGUG");
    assert_err!(
        Sidecar::parse(&b),
        FormatError::Gguf(GgufError::BadMagic(m)) if &m == b"GGUG"
    );
    assert_err!(
        Sidecar::parse(b"PK\x03\x04 not gguf at all"),
        FormatError::Gguf(GgufError::BadMagic(_))
    );
    let mut b = f32s();
    put_u32(&mut b, 4, 4);
    assert_err!(
        Sidecar::parse(&b),
        FormatError::Gguf(GgufError::UnsupportedVersion(4))
    );
}

#[test]
fn rejects_huge_kv_and_tensor_counts() {
    for n in [u64::MAX, 1 << 40, 257] {
        let mut b = f32s();
        put_u64(&mut b, 16, n);
        assert_err!(
            Sidecar::parse(&b),
            FormatError::Gguf(GgufError::TooManyKv { max: 256, .. })
        );
    }
    for n in [u64::MAX, 1 << 40, 4 * 1024 + 17] {
        let mut b = f32s();
        put_u64(&mut b, 8, n);
        assert_err!(
            Sidecar::parse(&b),
            FormatError::Gguf(GgufError::TooManyTensors { max: 4112, .. })
        );
    }
    // within the caps, more than the bytes could hold
    let mut b = f32s();
    put_u64(&mut b, 16, 250);
    assert_err!(
        Sidecar::parse(&b),
        FormatError::Gguf(GgufError::UnexpectedEof { .. })
    );
    let mut b = f32s();
    put_u64(&mut b, 8, 4000);
    assert_err!(Sidecar::parse(&b), FormatError::Gguf(_));
}

#[test]
fn rejects_huge_strings_and_arrays() {
    // a provenance string claiming 2^40 bytes: refused before allocating
    let mut b = f32s();
    let key = keys::PROV_NOTES;
    let mut pat = (key.len() as u64).to_le_bytes().to_vec();
    pat.extend_from_slice(key.as_bytes());
    let at = b.windows(pat.len()).position(|w| w == pat).unwrap() + pat.len() + 4;
    put_u64(&mut b, at, 1 << 40);
    assert_err!(
        Sidecar::parse(&b),
        FormatError::Gguf(GgufError::StringTooLong { max, .. }) if max == MAX_STRING_BYTES
    );
    // the classes array claiming 2^30 elements
    let mut b = f32s();
    let key = keys::ROUTER_CLASSES;
    let mut pat = (key.len() as u64).to_le_bytes().to_vec();
    pat.extend_from_slice(key.as_bytes());
    let at = b.windows(pat.len()).position(|w| w == pat).unwrap() + pat.len() + 4 + 4;
    put_u64(&mut b, at, 1 << 30);
    assert_err!(
        Sidecar::parse(&b),
        FormatError::Gguf(GgufError::ArrayTooLong { max: 4096, .. })
    );
    // nested arrays are not allowed in a sidecar at all
    let mut w = writer();
    w.set(
        "drllm.nested",
        Value::array(ValueType::Array, vec![Value::string_array(["a"])]),
    );
    assert_err!(
        parse_w(&w),
        FormatError::Gguf(GgufError::ArrayNestingTooDeep { .. })
    );
}

#[test]
fn rejects_bad_alignment() {
    let mut w = writer();
    w.set_alignment(64);
    let b = write(&w);
    assert_eq!(Sidecar::parse(&b).unwrap(), small()); // any valid alignment is read
    let key = "general.alignment";
    let mut pat = (key.len() as u64).to_le_bytes().to_vec();
    pat.extend_from_slice(key.as_bytes());
    let at = b.windows(pat.len()).position(|w| w == pat).unwrap() + pat.len() + 4;
    for a in [0u32, 48, 1 << 20] {
        let mut b = b.clone();
        put_u32(&mut b, at, a);
        assert_err!(
            Sidecar::parse(&b),
            FormatError::Gguf(GgufError::BadAlignment(_))
        );
    }
}

#[test]
fn rejects_offsets_past_the_end() {
    let bytes = f32s();
    let e = entry(&bytes, "router.1.fc2.bias");
    for off in [1u64 << 40, u64::MAX - 31, 4096] {
        let mut b = bytes.clone();
        put_u64(&mut b, e.offset_at, off);
        assert_err!(
            Sidecar::parse(&b),
            FormatError::Gguf(GgufError::TensorOutOfBounds { .. })
        );
    }
    // misaligned
    let mut b = bytes.clone();
    put_u64(&mut b, e.offset_at, 1);
    assert_err!(
        Sidecar::parse(&b),
        FormatError::Gguf(GgufError::MisalignedOffset { .. })
    );
    // overlapping another tensor
    let mut b = bytes.clone();
    put_u64(&mut b, e.offset_at, 0);
    assert_err!(
        Sidecar::parse(&b),
        FormatError::Gguf(GgufError::OverlappingTensors { .. })
    );
    // a shape that claims a huge tensor (d 65536 x hidden 4096 f32 = 1 GiB) in a small
    // file: refused by the bounds check before anything is allocated
    let mut b = bytes.clone();
    let e = entry(&b, "router.0.fc1.weight");
    put_u64(&mut b, e.dims_at, 65536);
    put_u64(&mut b, e.dims_at + 8, 4096);
    assert_err!(
        Sidecar::parse(&b),
        FormatError::Gguf(GgufError::TensorOutOfBounds { .. })
    );
    // negative (as int64) and overflowing dimensions
    let mut b = bytes.clone();
    put_u64(&mut b, e.dims_at, u64::MAX);
    assert_err!(
        Sidecar::parse(&b),
        FormatError::Gguf(GgufError::InvalidDim { .. })
    );
    let mut b = bytes;
    put_u64(&mut b, e.dims_at, 1 << 40);
    put_u64(&mut b, e.dims_at + 8, 1 << 40);
    assert_err!(
        Sidecar::parse(&b),
        FormatError::Gguf(GgufError::ShapeOverflow(_))
    );
}

#[test]
fn rejects_duplicate_tensors() {
    let mut b = f32s();
    // rename router.0.fc2.bias to router.0.fc1.bias (same length)
    let e = entry(&b, "router.0.fc2.bias");
    let name_at = e.n_dims_at - "router.0.fc2.bias".len();
    b[name_at..e.n_dims_at].copy_from_slice(b"router.0.fc1.bias");
    assert_err!(
        Sidecar::parse(&b),
        FormatError::Gguf(GgufError::DuplicateTensor(n)) if n == "router.0.fc1.bias"
    );
    // duplicate keys too: rename drllm.provenance.dataset to ...metrics (same length)
    let mut b = f32s();
    let dataset = keys::PROV_DATASET.as_bytes();
    let metrics = keys::PROV_METRICS.as_bytes();
    assert_eq!(dataset.len(), metrics.len());
    let at = b.windows(dataset.len()).position(|w| w == dataset).unwrap();
    b[at..at + metrics.len()].copy_from_slice(metrics);
    assert_err!(
        Sidecar::parse(&b),
        FormatError::Gguf(GgufError::DuplicateKey(k)) if k == keys::PROV_METRICS
    );
}

#[test]
fn rejects_wrong_shapes() {
    let sc = small(); // d 4, hidden 2
    let data = |v: &[f32]| common::f32_bytes(v);
    type Case = (&'static str, Vec<u64>, Vec<u8>, Vec<u64>);
    let cases: Vec<Case> = vec![
        // transposed fc1 (PyTorch's [out, in] written as ne = [hidden, d])
        (
            "router.0.fc1.weight",
            vec![2, 4],
            data(&sc.routers[0].w1),
            vec![4, 2],
        ),
        (
            "router.1.fc1.weight",
            vec![8],
            data(&sc.routers[1].w1),
            vec![4, 2],
        ),
        (
            "router.1.fc1.weight",
            vec![4, 2, 1],
            data(&sc.routers[1].w1),
            vec![4, 2],
        ),
        ("router.0.fc1.bias", vec![3], data(&[0.0; 3]), vec![2]),
        ("router.0.fc1.bias", vec![2, 1], data(&[0.0; 2]), vec![2]),
        (
            "router.1.fc2.weight",
            vec![3, 2],
            data(&sc.routers[1].w2),
            vec![2, 3],
        ),
        ("router.1.fc2.bias", vec![4], data(&[0.0; 4]), vec![3]),
        ("router.1.fc2.bias", vec![], data(&[0.0]), vec![3]),
    ];
    for (name, dims, bytes, want) in cases {
        let mut w = writer();
        replace(&mut w, name, GgmlType::F32, &dims, bytes);
        assert_err!(
            parse_w(&w),
            FormatError::WrongShape { name: n, expected, found }
                if n == name && expected == want && found == dims
        );
    }
}

#[test]
fn rejects_unknown_dtype() {
    let mut b = f32s();
    let e = entry(&b, "router.1.fc1.weight");
    for id in [4u32, 99, u32::MAX] {
        put_u32(&mut b, e.dtype_at, id);
        assert_err!(
            Sidecar::parse(&b),
            FormatError::Gguf(GgufError::UnknownGgmlType { type_id, .. }) if type_id == id
        );
    }
}

#[test]
fn rejects_quantized_and_other_dtypes() {
    // d = 32 so that a Q8_0 / Q4_0 row is one block
    let sc = common::sidecar(1, 32, 2);
    let base = sc.to_writer(StorageType::F32).unwrap();
    for (dtype, bytes) in [
        (GgmlType::Q8_0, 2 * 34),
        (GgmlType::Q4_0, 2 * 18),
        (GgmlType::BF16, 64 * 2),
        (GgmlType::F64, 64 * 8),
        (GgmlType::I32, 64 * 4),
    ] {
        let mut w = base.clone();
        replace(
            &mut w,
            "router.0.fc1.weight",
            dtype,
            &[32, 2],
            vec![0; bytes],
        );
        assert_err!(
            parse_w(&w),
            FormatError::UnsupportedDtype { name, dtype: t }
                if name == "router.0.fc1.weight" && t == dtype
        );
    }
}

#[test]
fn rejects_wrong_block_count() {
    // vs the tensors: the header promises 3 blocks, the file has 2
    let mut w = writer();
    w.set(keys::BASE_BLOCK_COUNT, Value::U32(3));
    assert_err!(
        parse_w(&w),
        FormatError::MissingTensor { name } if name == "router.2.fc1.weight"
    );
    // the header promises 1 block, the file has 2
    let mut w = writer();
    w.set(keys::BASE_BLOCK_COUNT, Value::U32(1));
    assert_err!(
        parse_w(&w),
        FormatError::UnexpectedTensor { name } if name.starts_with("router.1.")
    );
    // vs the model
    let sc = small();
    let mut model = sc.base.clone();
    model.block_count = 30;
    let e = sc.check_base(&model).unwrap_err();
    assert!(matches!(
        e,
        FormatError::BlockCountMismatch {
            sidecar: 2,
            model: 30
        }
    ));
    assert!(
        e.to_string().contains("2 blocks") && e.to_string().contains("30 blocks"),
        "{e}"
    );
    let mut model = sc.base.clone();
    model.hidden_size = 576;
    assert!(matches!(
        sc.check_base(&model),
        Err(FormatError::HiddenSizeMismatch {
            sidecar: 4,
            model: 576
        })
    ));
    let mut model = sc.base.clone();
    model.architecture = "gemma3".into();
    let e = sc.check_base(&model).unwrap_err();
    assert!(matches!(e, FormatError::ArchitectureMismatch { .. }));
    assert!(e.to_string().contains("gemma3") && e.to_string().contains("llama"));
}

#[test]
fn rejects_wrong_model_fingerprint() {
    let sc = small();
    let mut model = sc.base.clone();
    model.fingerprint = common::fp(0xcd);
    let e = sc.check_base(&model).unwrap_err();
    match &e {
        FormatError::WrongModel { expected, found } => {
            assert_eq!(expected, &sc.base.fingerprint);
            assert_eq!(found, &model.fingerprint);
        }
        other => panic!("{other:?}"),
    }
    let msg = e.to_string();
    assert!(msg.contains(&sc.base.fingerprint), "{msg}");
    assert!(msg.contains(&model.fingerprint), "{msg}");
    // with a real model file whose weights changed (a "fine-tune" with identical metadata)
    let m1 = write(&common::model_writer(2, 4, 3, 8, 0.0));
    let m2 = write(&common::model_writer(2, 4, 3, 8, 0.5));
    let (b1, b2) = (
        base_model_info_from_bytes(&m1).unwrap(),
        base_model_info_from_bytes(&m2).unwrap(),
    );
    let mut sc = small();
    sc.base = b1.clone();
    let sc = Sidecar::parse(&sc.to_bytes(StorageType::F16).unwrap()).unwrap();
    sc.check_base(&b1).unwrap();
    assert_err!(sc.check_base(&b2), FormatError::WrongModel { .. });
}

#[test]
fn rejects_bad_fingerprint_string() {
    for bad in [
        "",
        "sha256:",
        "sha256:abc",
        "md5:0123",
        &common::fp(0xab).to_uppercase(),
    ] {
        let mut w = writer();
        w.set(keys::BASE_FINGERPRINT, Value::string(bad));
        assert_err!(
            parse_w(&w),
            FormatError::InvalidValue { key, .. } if key == keys::BASE_FINGERPRINT
        );
    }
}

#[test]
fn rejects_missing_tensor() {
    for name in [
        "router.0.fc1.weight",
        "router.1.fc2.bias",
        "router.1.fc1.bias",
    ] {
        let mut w = writer();
        assert!(w.remove_tensor(name));
        assert_err!(parse_w(&w), FormatError::MissingTensor { name: n } if n == name);
    }
}

#[test]
fn rejects_extra_tensor() {
    for name in [
        "router.2.fc1.weight",
        "router.0.fc3.weight",
        "router.01.fc1.weight",
        "router.0.fc1.weight ",
        "output.weight",
        "",
    ] {
        let mut w = writer();
        w.add_tensor(name, GgmlType::F32, &[1], TensorSource::Bytes(vec![0; 4]))
            .unwrap();
        assert_err!(parse_w(&w), FormatError::UnexpectedTensor { name: n } if n == name);
    }
}

#[test]
fn rejects_nan_weight() {
    let bytes = f32s();
    for (name, index, bits) in [
        ("router.0.fc1.weight", 5usize, f32::NAN.to_bits()),
        ("router.1.fc2.weight", 0, f32::INFINITY.to_bits()),
        ("router.1.fc2.bias", 2, f32::NEG_INFINITY.to_bits()),
        ("router.0.fc1.bias", 1, 0x7fc0_1234),
    ] {
        let mut b = bytes.clone();
        let at = data_range(&b, name).start + 4 * index;
        put_u32(&mut b, at, bits);
        assert_err!(
            Sidecar::parse(&b),
            FormatError::NonFinite { name: n, index: i } if n == name && i == index
        );
    }
    // F16 NaN and infinity
    let bytes = small().to_bytes(StorageType::F16).unwrap();
    for (index, bits) in [(3usize, 0x7e00u16), (0, 0x7c00), (7, 0xfc00)] {
        let mut b = bytes.clone();
        let at = data_range(&b, "router.1.fc1.weight").start + 2 * index;
        b[at..at + 2].copy_from_slice(&bits.to_le_bytes());
        assert_err!(
            Sidecar::parse(&b),
            FormatError::NonFinite { name, index: i } if name == "router.1.fc1.weight" && i == index
        );
    }
}

#[test]
fn rejects_wrong_architecture() {
    let mut w = writer();
    w.set(keys::ARCHITECTURE, Value::string("llama"));
    assert_err!(parse_w(&w), FormatError::WrongArchitecture { found } if found == "llama");
    let mut w = writer();
    w.remove(keys::ARCHITECTURE);
    assert_err!(
        parse_w(&w),
        FormatError::MissingKey { key } if key == keys::ARCHITECTURE
    );
    // a model file where a sidecar was expected
    let model = write(&common::model_writer(2, 4, 3, 8, 0.0));
    let e = Sidecar::parse(&model).unwrap_err();
    assert!(matches!(e, FormatError::WrongArchitecture { .. }));
    assert!(e.to_string().contains("not a router sidecar"), "{e}");
}

#[test]
fn rejects_newer_version() {
    for v in [2u32, 99, u32::MAX] {
        let mut w = writer();
        w.set(keys::FORMAT_VERSION, Value::U32(v));
        let e = parse_w(&w).unwrap_err();
        assert!(matches!(e, FormatError::UnsupportedVersion { found, supported: 1 } if found == v));
        assert!(e.to_string().contains("newer"), "{e}");
    }
    let mut w = writer();
    w.set(keys::FORMAT_VERSION, Value::U32(0));
    assert_err!(
        parse_w(&w),
        FormatError::UnsupportedVersion { found: 0, .. }
    );
    // a newer version is reported even if the rest of the file is unintelligible
    let mut w = GgufWriter::new();
    w.set(keys::ARCHITECTURE, Value::string(ARCHITECTURE));
    w.set(keys::FORMAT_VERSION, Value::U32(2));
    w.set("drllm.v2.something", Value::U8(1));
    assert_err!(
        parse_w(&w),
        FormatError::UnsupportedVersion { found: 2, .. }
    );
}

#[test]
fn rejects_bad_classes() {
    for classes in [
        vec!["skip", "execute"],
        vec!["execute", "skip", "repeat"],
        vec!["skip", "execute", "repeat", "loop"],
        vec!["Skip", "execute", "repeat"],
        vec![],
    ] {
        let mut w = writer();
        w.set(keys::ROUTER_CLASSES, Value::string_array(classes.clone()));
        assert_err!(parse_w(&w), FormatError::BadClasses { found } if found == classes);
    }
    let mut w = writer();
    w.set(
        keys::ROUTER_CLASSES,
        Value::array(
            ValueType::U32,
            vec![Value::U32(0), Value::U32(1), Value::U32(2)],
        ),
    );
    assert_err!(
        parse_w(&w),
        FormatError::WrongType { key, found, .. } if key == keys::ROUTER_CLASSES && found == "arr[u32]"
    );
    let mut w = writer();
    w.set(keys::ROUTER_CLASSES, Value::string("skip,execute,repeat"));
    assert_err!(parse_w(&w), FormatError::WrongType { .. });
}

#[test]
fn rejects_bad_activation() {
    for act in ["gelu", "relu", "GELU_TANH", ""] {
        let mut w = writer();
        w.set(keys::ROUTER_ACTIVATION, Value::string(act));
        assert_err!(parse_w(&w), FormatError::UnsupportedActivation { found } if found == act);
    }
}

const REQUIRED: [&str; 10] = [
    keys::ARCHITECTURE,
    keys::FORMAT_VERSION,
    keys::BASE_ARCHITECTURE,
    keys::BASE_BLOCK_COUNT,
    keys::BASE_EMBEDDING_LENGTH,
    keys::BASE_FINGERPRINT,
    keys::ROUTER_HIDDEN,
    keys::ROUTER_WINDOWS,
    keys::ROUTER_ACTIVATION,
    keys::ROUTER_CLASSES,
];

#[test]
fn rejects_missing_keys() {
    for key in REQUIRED {
        let mut w = writer();
        w.remove(key);
        assert_err!(parse_w(&w), FormatError::MissingKey { key: k } if k == key);
    }
}

#[test]
fn rejects_wrong_key_types() {
    for key in REQUIRED {
        let wrong = if key == keys::FORMAT_VERSION
            || key.ends_with("count")
            || key.ends_with("length")
            || key.ends_with("hidden")
            || key.ends_with("windows")
        {
            // integers must be u32 exactly, not a wider or signed type
            Value::U64(2)
        } else {
            Value::U32(1)
        };
        let mut w = writer();
        w.set(key, wrong);
        assert_err!(parse_w(&w), FormatError::WrongType { key: k, .. } if k == key);
    }
    // optional provenance keys, when present, must be strings
    let mut w = writer();
    w.set(keys::PROV_METRICS, Value::F32(0.5));
    assert_err!(
        parse_w(&w),
        FormatError::WrongType { key, expected: "str", .. } if key == keys::PROV_METRICS
    );
}

#[test]
fn rejects_out_of_range() {
    for (key, v, min, max) in [
        (keys::BASE_BLOCK_COUNT, 0u32, 1u64, 1024u64),
        (keys::BASE_BLOCK_COUNT, 1025, 1, 1024),
        (keys::BASE_EMBEDDING_LENGTH, 0, 1, 65536),
        (keys::BASE_EMBEDDING_LENGTH, 65537, 1, 65536),
        (keys::ROUTER_HIDDEN, 0, 1, 4096),
        (keys::ROUTER_HIDDEN, 4097, 1, 4096),
        (keys::ROUTER_WINDOWS, 0, 1, 64),
        (keys::ROUTER_WINDOWS, 65, 1, 64),
        (keys::ROUTER_WINDOWS, u32::MAX, 1, 64),
    ] {
        let mut w = writer();
        w.set(key, Value::U32(v));
        assert_err!(
            parse_w(&w),
            FormatError::OutOfRange { key: k, value, min: lo, max: hi }
                if k == key && value == u64::from(v) && lo == min && hi == max
        );
    }
    // in range but disagreeing with the tensors: a shape error
    let mut w = writer();
    w.set(keys::ROUTER_HIDDEN, Value::U32(3));
    assert_err!(parse_w(&w), FormatError::WrongShape { .. });
    let mut w = writer();
    w.set(keys::BASE_EMBEDDING_LENGTH, Value::U32(5));
    assert_err!(parse_w(&w), FormatError::WrongShape { .. });
}

#[test]
fn rejects_oversize_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.routers.gguf");
    // a sparse file one byte over the cap, starting with a valid sidecar: never read
    std::fs::write(&path, f32s()).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(MAX_FILE_BYTES + 1).unwrap();
    drop(f);
    assert_err!(
        Sidecar::read(&path),
        FormatError::FileTooLarge { size, max } if size == MAX_FILE_BYTES + 1 && max == MAX_FILE_BYTES
    );
    assert_err!(read_capped(&path), FormatError::FileTooLarge { .. });
    // under the cap, trailing bytes after the last tensor are allowed (padding)
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(f32s().len() as u64 + 100).unwrap();
    drop(f);
    assert_eq!(Sidecar::read(&path).unwrap(), small());
    let e = Sidecar::parse(&[]).unwrap_err();
    assert!(matches!(
        e,
        FormatError::Gguf(GgufError::UnexpectedEof { .. })
    ));
}

// ---------------------------------------------------------------------------------------
// robustness: truncation, byte flips and random mutations never panic

use drllm_router_format::rng::SplitMix64 as Rng;

fn seeds() -> Vec<Vec<u8>> {
    vec![
        small().to_bytes(StorageType::F32).unwrap(),
        common::sidecar(1, 3, 1).to_bytes(StorageType::F16).unwrap(),
    ]
}

#[test]
fn truncation_at_every_position_is_an_error() {
    for bytes in seeds() {
        // the file ends with the last tensor's data padded to 32 bytes: a cut anywhere
        // before the end of the data is an error, a cut inside the padding is harmless
        let g = drllm_gguf::GgufFile::parse(&bytes).unwrap();
        let data_end = g
            .tensors
            .iter()
            .map(|t| g.tensor_data_range(t).end)
            .max()
            .unwrap();
        for n in 0..bytes.len() {
            let r = Sidecar::parse(&bytes[..n]);
            assert_eq!(r.is_ok(), n as u64 >= data_end, "cut at {n}");
        }
        assert!(Sidecar::parse(&bytes).is_ok());
    }
}

#[test]
fn byte_flips_never_panic() {
    for bytes in seeds() {
        let header_end = drllm_gguf::GgufFile::parse(&bytes).unwrap().data_offset as usize;
        let mut ok = 0;
        for i in 0..bytes.len() {
            for x in [0xffu8, 0x01, 0x80] {
                let mut b = bytes.clone();
                b[i] ^= x;
                if let Ok(sc) = Sidecar::parse(&b) {
                    ok += 1;
                    // what parses is valid and writes back
                    sc.validate().unwrap();
                    sc.to_bytes(StorageType::F32).unwrap();
                }
            }
        }
        assert!(ok > 0 && ok < 3 * bytes.len(), "{ok}");
        assert!(header_end > 0);
    }
}

#[test]
fn random_mutations_never_panic() {
    let mut rng = Rng(0x5eed);
    let seeds = seeds();
    let mut outcomes = [0usize; 2];
    for round in 0..5000 {
        let mut b = seeds[round % seeds.len()].clone();
        for _ in 0..1 + rng.below(4) {
            let len = b.len().max(1);
            match rng.below(6) {
                0 => {
                    let i = rng.below(len);
                    if let Some(x) = b.get_mut(i) {
                        *x = rng.next_u64() as u8;
                    }
                }
                1 => {
                    // overwrite an aligned u64 with an interesting value
                    let i = rng.below(len) & !7;
                    let v =
                        [0u64, 1, u64::MAX, 1 << 31, 1 << 40, 0x7fff_ffff_ffff_ffff][rng.below(6)];
                    if i + 8 <= b.len() {
                        b[i..i + 8].copy_from_slice(&v.to_le_bytes());
                    }
                }
                2 => b.truncate(rng.below(len)),
                3 => {
                    let i = rng.below(len);
                    b.insert(i.min(b.len()), rng.next_u64() as u8);
                }
                4 => {
                    let i = rng.below(len);
                    if i < b.len() {
                        b.remove(i);
                    }
                }
                _ => {
                    // copy a chunk from elsewhere (duplicates names, counts, ...)
                    let (from, to, n) = (rng.below(len), rng.below(len), 1 + rng.below(24));
                    if from + n <= b.len() && to + n <= b.len() {
                        let chunk = b[from..from + n].to_vec();
                        b[to..to + n].copy_from_slice(&chunk);
                    }
                }
            }
        }
        let r = Sidecar::parse(&b);
        outcomes[usize::from(r.is_ok())] += 1;
        let _ = drllm_gguf::GgufFile::parse(&b);
        let _ = base_model_info_from_bytes(&b);
    }
    assert!(outcomes[0] > 0 && outcomes[1] > 0, "{outcomes:?}");
}
