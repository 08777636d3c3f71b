//! Writing and reading sidecars, the base-model fingerprint, paths and hashes.

mod common;

use common::{model_writer, write};
use drllm_gguf::{GgmlType, GgufFile, Value};
use drllm_router_format::*;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

#[test]
fn round_trip_f32_is_exact() {
    for (blocks, d, hidden) in [(1u32, 1usize, 1usize), (2, 4, 2), (5, 64, 16), (3, 33, 7)] {
        let sc = common::sidecar(blocks, d, hidden);
        let bytes = sc.to_bytes(StorageType::F32).unwrap();
        let back = Sidecar::parse(&bytes).unwrap();
        assert_eq!(back, sc, "blocks {blocks} d {d} hidden {hidden}");
        // deterministic output
        assert_eq!(sc.to_bytes(StorageType::F32).unwrap(), bytes);
        // the file is a GGUF v3 file with alignment 32 that ggml's layout rules accept
        let g = GgufFile::parse(&bytes).unwrap();
        assert_eq!((g.version, g.alignment), (3, 32));
        g.check_ggml_layout().unwrap();
        assert_eq!(g.tensors.len(), 4 * blocks as usize);
        assert!(g.tensors.iter().all(|t| t.dtype == GgmlType::F32));
        assert_eq!(
            g.tensor("router.0.fc1.weight").unwrap().dims,
            vec![d as u64, hidden as u64]
        );
    }
}

#[test]
fn round_trip_f16_within_half_precision() {
    let mut sc = common::sidecar(3, 48, 8);
    // include values that need rounding, tiny (subnormal in f16) values and the f16 maximum
    sc.routers[0].w1[0] = 1.0 / 3.0;
    sc.routers[0].w1[1] = 1e-6;
    sc.routers[0].w1[2] = -65504.0;
    sc.routers[1].w2[0] = 1234.567;
    let bytes = sc.to_bytes(StorageType::F16).unwrap();
    let f32_len = sc.to_bytes(StorageType::F32).unwrap().len();
    assert!(
        bytes.len() < f32_len * 2 / 3,
        "{} vs {f32_len}",
        bytes.len()
    );
    let g = GgufFile::parse(&bytes).unwrap();
    assert_eq!(
        g.tensor("router.1.fc1.weight").unwrap().dtype,
        GgmlType::F16
    );
    assert_eq!(
        g.tensor("router.1.fc2.weight").unwrap().dtype,
        GgmlType::F16
    );
    assert_eq!(g.tensor("router.1.fc1.bias").unwrap().dtype, GgmlType::F32);
    assert_eq!(g.tensor("router.1.fc2.bias").unwrap().dtype, GgmlType::F32);

    let back = Sidecar::parse(&bytes).unwrap();
    assert_eq!(back.base, sc.base);
    assert_eq!(back.shape, sc.shape);
    assert_eq!(back.provenance, sc.provenance);
    for (a, b) in sc.routers.iter().zip(&back.routers) {
        // biases are stored as f32: exact
        assert_eq!(a.b1, b.b1);
        assert_eq!(a.b2, b.b2);
        for (x, y) in a.w1.iter().chain(&a.w2).zip(b.w1.iter().chain(&b.w2)) {
            // round to nearest: relative error <= 2^-11 for normals, absolute <= 2^-25 below
            let tol = (x.abs() * (2f32).powi(-11)).max((2f32).powi(-25));
            assert!((x - y).abs() <= tol, "{x} -> {y}");
        }
    }
    assert_eq!(
        back.routers[0].w1[0],
        half::f16::from_f32(1.0 / 3.0).to_f32()
    );
    assert_eq!(back.routers[0].w1[2], -65504.0);
    // round to nearest even: 1 + 2^-11 lies halfway between 1 and 1 + 2^-10 -> 1
    let mut t = sc.clone();
    t.routers[0].w1[0] = 1.0 + (2f32).powi(-11);
    let back = Sidecar::parse(&t.to_bytes(StorageType::F16).unwrap()).unwrap();
    assert_eq!(back.routers[0].w1[0], 1.0);
    // an F16 file rewritten as F16 is unchanged
    let again = back.to_bytes(StorageType::F16).unwrap();
    assert_eq!(Sidecar::parse(&again).unwrap(), back);
}

#[test]
fn f16_overflow_is_refused() {
    let mut sc = common::small();
    sc.routers[1].w2[3] = 70000.0;
    assert!(matches!(
        sc.to_bytes(StorageType::F16),
        Err(FormatError::NotRepresentable { ref name, index: 3, .. }) if name == "router.1.fc2.weight"
    ));
    sc.to_bytes(StorageType::F32).unwrap();
}

#[test]
fn f16_biases_and_f16_everything_are_read() {
    // other writers may store every tensor as F16: the reader accepts it
    let sc = common::small();
    let mut w = sc.to_writer(StorageType::F16).unwrap();
    for i in 0..2 {
        for (name, v) in [
            (format!("router.{i}.fc1.bias"), sc.routers[i].b1.clone()),
            (format!("router.{i}.fc2.bias"), sc.routers[i].b2.to_vec()),
        ] {
            assert!(w.remove_tensor(&name));
            let h: Vec<u8> = v
                .iter()
                .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                .collect();
            w.add_tensor(
                name,
                GgmlType::F16,
                &[v.len() as u64],
                drllm_gguf::TensorSource::Bytes(h),
            )
            .unwrap();
        }
    }
    let back = Sidecar::parse(&write(&w)).unwrap();
    assert_eq!(back.routers[1].b2, [0.25, -0.5, 0.125]);
}

#[test]
fn write_and_read_files_atomically() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.routers.gguf");
    let sc = common::sidecar(4, 16, 4);
    sc.write(&path, StorageType::F32).unwrap();
    assert_eq!(Sidecar::read(&path).unwrap(), sc);
    // overwrite in place with another sidecar
    let mut sc2 = sc.clone();
    sc2.provenance.notes = "second".into();
    sc2.write(&path, StorageType::F16).unwrap();
    let (back, hash) = Sidecar::read_with_hash(&path).unwrap();
    assert_eq!(back.provenance.notes, "second");
    assert_eq!(hash, content_hash(&std::fs::read(&path).unwrap()));
    // no temporary file is left behind
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("m.routers.gguf")]);
    // an invalid sidecar is not written and the old file stays
    let mut bad = sc.clone();
    bad.routers.pop();
    assert!(matches!(
        bad.write(&path, StorageType::F32),
        Err(FormatError::Inconsistent(_))
    ));
    assert_eq!(Sidecar::read(&path).unwrap().provenance.notes, "second");
    // I/O errors name the path
    let missing = dir.path().join("nope").join("x.routers.gguf");
    let e = sc.write(&missing, StorageType::F32).unwrap_err();
    assert!(matches!(e, FormatError::Io { .. }));
    let e = Sidecar::read(&missing).unwrap_err();
    assert!(e.to_string().contains("nope"), "{e}");
}

#[test]
fn missing_provenance_reads_as_empty() {
    let sc = common::small();
    let mut w = sc.to_writer(StorageType::F32).unwrap();
    for k in [
        keys::PROV_DATASET,
        keys::PROV_SEARCH,
        keys::PROV_TRAINING,
        keys::PROV_METRICS,
        keys::PROV_CREATED,
        keys::PROV_TOOL,
        keys::PROV_NOTES,
    ] {
        w.remove(k);
    }
    // unknown extra keys are ignored (additive keys do not need a new version)
    w.set("drllm.future.key", Value::U32(7));
    let back = Sidecar::parse(&write(&w)).unwrap();
    assert_eq!(back.provenance, Provenance::default());
    assert_eq!(back.routers, sc.routers);
}

#[test]
fn content_hash_and_sidecar_paths() {
    assert_eq!(
        content_hash(b""),
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    assert_eq!(
        content_hash(b"abc"),
        "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    assert!(is_sha256_string(&content_hash(b"x")));
    assert!(!is_sha256_string("sha256:ABC"));
    assert!(!is_sha256_string(&"sha256:".repeat(2)));

    let p = |s: &str| sidecar_path_for(Path::new(s));
    assert_eq!(p("models/m.gguf"), PathBuf::from("models/m.routers.gguf"));
    assert_eq!(
        p("/x/SmolLM2-135M-Instruct.Q4_1.gguf"),
        PathBuf::from("/x/SmolLM2-135M-Instruct.Q4_1.routers.gguf")
    );
    assert_eq!(p("m.GGUF"), PathBuf::from("m.routers.gguf"));
    assert_eq!(p("dir/m.bin"), PathBuf::from("dir/m.bin.routers.gguf"));
    assert_eq!(p("dir/model"), PathBuf::from("dir/model.routers.gguf"));
    assert_eq!(p(".gguf"), PathBuf::from(".gguf.routers.gguf"));
}

#[test]
fn rfc3339() {
    assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00Z");
    assert_eq!(rfc3339_utc(951_782_400), "2000-02-29T00:00:00Z");
    assert_eq!(rfc3339_utc(1_709_210_096), "2024-02-29T12:34:56Z");
    assert_eq!(rfc3339_utc(4_102_444_799), "2099-12-31T23:59:59Z");
    assert_eq!(rfc3339_utc(253_402_300_799), "9999-12-31T23:59:59Z");
    let now = rfc3339_utc_now();
    assert_eq!(now.len(), 20);
    assert!(now.starts_with("20") && now.ends_with('Z'));
}

#[test]
fn initial_sidecar_and_validate() {
    let base = common::base(3, 12);
    let sc = Sidecar::initial(
        base.clone(),
        RouterShape::default(),
        Provenance::default(),
        9,
    )
    .unwrap();
    // absurd shapes are refused before anything is allocated
    let mut huge = base.clone();
    huge.hidden_size = 65536;
    huge.block_count = 1024;
    assert!(matches!(
        Sidecar::initial(
            huge.clone(),
            RouterShape::default(),
            Provenance::default(),
            0
        ),
        Err(FormatError::FileTooLarge { .. })
    ));
    huge.hidden_size = u32::MAX;
    assert!(matches!(
        Sidecar::initial(huge, RouterShape::default(), Provenance::default(), 0),
        Err(FormatError::OutOfRange { .. })
    ));
    assert_eq!(sc.routers.len(), 3);
    assert_eq!(sc.routers[2], BlockRouter::xavier(12, DEFAULT_HIDDEN, 11));
    assert_eq!((sc.d(), sc.shape.windows), (12, DEFAULT_WINDOWS));
    sc.validate().unwrap();
    sc.check_base(&base).unwrap();

    let mut bad = sc.clone();
    bad.routers[1].b1.push(0.0);
    assert!(matches!(bad.validate(), Err(FormatError::Inconsistent(_))));
    let mut bad = sc.clone();
    bad.routers[0].b2[2] = f32::INFINITY;
    assert!(matches!(
        bad.validate(),
        Err(FormatError::NonFinite { ref name, index: 2 }) if name == "router.0.fc2.bias"
    ));
    let mut bad = sc.clone();
    bad.base.fingerprint = "md5:1234".into();
    assert!(matches!(
        bad.validate(),
        Err(FormatError::InvalidValue { ref key, .. }) if key == keys::BASE_FINGERPRINT
    ));
    let mut bad = sc.clone();
    bad.shape.windows = 0;
    assert!(matches!(
        bad.validate(),
        Err(FormatError::OutOfRange { ref key, .. }) if key == keys::ROUTER_WINDOWS
    ));
    let mut bad = sc.clone();
    bad.version = 2;
    assert!(matches!(
        bad.to_bytes(StorageType::F32),
        Err(FormatError::UnsupportedVersion { found: 2, .. })
    ));
    let mut bad = sc;
    bad.provenance.notes = "x".repeat(MAX_STRING_BYTES as usize + 1);
    assert!(matches!(
        bad.validate(),
        Err(FormatError::InvalidValue { ref key, .. }) if key == keys::PROV_NOTES
    ));
}

// ---------------------------------------------------------------------------------------
// fingerprint

/// The fixed model the pinned fingerprint is computed from: 5 metadata keys, 3 F32 tensors of
/// 8 elements (32 bytes each, all sampled whole).
fn pinned_model() -> Vec<u8> {
    write(&model_writer(2, 8, 3, 8, 0.5))
}

/// The fingerprint pre-image of `pinned_model`, assembled by hand from SPEC.md.
fn pinned_preimage(bytes: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    let u32 = |p: &mut Vec<u8>, v: u32| p.extend_from_slice(&v.to_le_bytes());
    let u64 = |p: &mut Vec<u8>, v: u64| p.extend_from_slice(&v.to_le_bytes());
    let s = |p: &mut Vec<u8>, v: &str| {
        p.extend_from_slice(&(v.len() as u64).to_le_bytes());
        p.extend_from_slice(v.as_bytes());
    };
    p.extend_from_slice(b"drllm.fingerprint.v1\0");
    // (a) metadata sorted by key
    u64(&mut p, 5);
    s(&mut p, "general.architecture");
    u32(&mut p, 8);
    s(&mut p, "llama");
    s(&mut p, "general.name");
    u32(&mut p, 8);
    s(&mut p, "tiny");
    s(&mut p, "llama.block_count");
    u32(&mut p, 4);
    u32(&mut p, 2);
    s(&mut p, "llama.embedding_length");
    u32(&mut p, 4);
    u32(&mut p, 8);
    s(&mut p, "tokenizer.ggml.tokens");
    u32(&mut p, 9); // array
    u32(&mut p, 8); // of strings
    u64(&mut p, 4);
    for t in ["<s>", "</s>", "a", "b"] {
        s(&mut p, t);
    }
    // (b) tensor table
    u64(&mut p, 3);
    for i in 0..3u64 {
        s(&mut p, &format!("blk.{i}.w"));
        u32(&mut p, 1);
        u64(&mut p, 8);
        u32(&mut p, 0); // f32
        u64(&mut p, 32 * i); // offset (32 bytes each, already aligned)
        u64(&mut p, 32); // size
    }
    // (c) samples: k = 3, indices 0, 1, 2, whole tensors
    let g = GgufFile::parse(bytes).unwrap();
    u64(&mut p, 3);
    for i in 0..3u64 {
        u64(&mut p, i);
        u64(&mut p, 32);
        let start = (g.data_offset + 32 * i) as usize;
        p.extend_from_slice(&bytes[start..start + 32]);
    }
    p
}

/// The pinned value: if this changes, every published sidecar stops matching its model.
const PINNED_FINGERPRINT: &str =
    "sha256:1a239e2418e99369068042b6019db2c2a3a6a1974727e5f59d9695da28234252";

#[test]
fn fingerprint_pinned_value_and_spec_layout() {
    let bytes = pinned_model();
    let info = base_model_info_from_bytes(&bytes).unwrap();
    assert_eq!(info.architecture, "llama");
    assert_eq!((info.block_count, info.hidden_size), (2, 8));
    let by_hand = format!(
        "sha256:{}",
        Sha256::digest(pinned_preimage(&bytes))
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    assert_eq!(
        info.fingerprint, by_hand,
        "implementation differs from SPEC.md"
    );
    assert_eq!(
        info.fingerprint, PINNED_FINGERPRINT,
        "fingerprint algorithm changed"
    );

    // from a file: the same value, with the header parsed or not
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    std::fs::write(&path, &bytes).unwrap();
    assert_eq!(base_model_info(&path).unwrap(), info);
    let g = GgufFile::open(&path).unwrap();
    assert_eq!(base_model_info_from(&g, &path).unwrap(), info);
    // a file that changed since its header was parsed
    std::fs::write(&path, [&bytes[..], &[0u8; 32]].concat()).unwrap();
    assert!(matches!(
        base_model_info_from(&g, &path),
        Err(FormatError::ModelChanged { .. })
    ));
}

#[test]
fn sampled_indices_spread_evenly() {
    assert!(sampled_tensor_indices(0).is_empty());
    assert_eq!(sampled_tensor_indices(3), vec![0, 1, 2]);
    assert_eq!(sampled_tensor_indices(16), (0..16).collect::<Vec<_>>());
    assert_eq!(
        sampled_tensor_indices(32),
        (0..16).map(|j| 2 * j).collect::<Vec<_>>()
    );
    let idx = sampled_tensor_indices(291);
    assert_eq!(idx.len(), 16);
    assert_eq!(idx[0], 0);
    assert_eq!(idx[15], 15 * 291 / 16);
    assert!(idx.windows(2).all(|w| w[0] < w[1]));
}

#[test]
fn fingerprint_tells_models_apart() {
    let fpr =
        |w: &drllm_gguf::GgufWriter| base_model_info_from_bytes(&write(w)).unwrap().fingerprint;
    // 40 tensors of 2000 f32 (8000 bytes): 16 sampled, the first 4096 bytes of each
    let base_w = model_writer(4, 8, 40, 2000, 0.0);
    let base = fpr(&base_w);
    assert_eq!(
        fpr(&model_writer(4, 8, 40, 2000, 0.0)),
        base,
        "deterministic"
    );

    // any metadata edit
    let mut w = base_w.clone();
    w.set("general.name", Value::string("tinz"));
    assert_ne!(fpr(&w), base);
    // metadata order does not matter (sorted by key)
    let mut w = base_w.clone();
    w.remove("general.name");
    w.set("general.name", Value::string("tiny"));
    assert_eq!(fpr(&w), base);
    // same value, other integer type: a different file, a different fingerprint
    let mut w = base_w.clone();
    w.set("llama.block_count", Value::U64(4));
    assert_ne!(fpr(&w), base);

    let bytes = write(&base_w);
    let g = GgufFile::parse(&bytes).unwrap();
    let patched = |tensor: usize, at: u64| {
        let mut b = bytes.clone();
        let t = &g.tensors[tensor];
        let pos = (g.data_offset + t.offset + at) as usize;
        b[pos] ^= 1;
        base_model_info_from_bytes(&b).unwrap().fingerprint
    };
    // "fine-tune": weights of a sampled tensor change within the first 4096 bytes
    assert_ne!(patched(0, 0), base);
    assert_ne!(patched(2, 4095), base); // tensor 2 = floor(1 * 40 / 16)
    assert_ne!(patched(37, 100), base); // tensor 37 = floor(15 * 40 / 16)
                                        // the documented blind spots: bytes past 4096, tensors not sampled
    assert_eq!(patched(0, 4096), base);
    assert_eq!(patched(1, 0), base);

    // re-quantisation changes dtypes and sizes in the tensor table
    let mut w = model_writer(4, 8, 1, 32, 0.0);
    let f32_fp = fpr(&w);
    w.clear_tensors();
    w.add_tensor(
        "blk.0.w",
        GgmlType::Q8_0,
        &[32],
        drllm_gguf::TensorSource::Bytes(vec![0; 34]),
    )
    .unwrap();
    assert_ne!(fpr(&w), f32_fp);
}

#[test]
fn base_model_info_needs_model_keys() {
    let mut w = model_writer(4, 8, 1, 8, 0.0);
    w.remove("llama.embedding_length");
    assert!(matches!(
        base_model_info_from_bytes(&write(&w)),
        Err(FormatError::MissingKey { ref key }) if key == "llama.embedding_length"
    ));
    let mut w = model_writer(4, 8, 1, 8, 0.0);
    w.set("llama.block_count", Value::string("4"));
    assert!(matches!(
        base_model_info_from_bytes(&write(&w)),
        Err(FormatError::WrongType { ref key, .. }) if key == "llama.block_count"
    ));
    let mut w = model_writer(4, 8, 1, 8, 0.0);
    w.remove("general.architecture");
    assert!(matches!(
        base_model_info_from_bytes(&write(&w)),
        Err(FormatError::MissingKey { .. })
    ));
    // any integer type that fits is accepted for the model's own keys
    let mut w = model_writer(4, 8, 1, 8, 0.0);
    w.set("llama.block_count", Value::U64(4));
    assert_eq!(
        base_model_info_from_bytes(&write(&w)).unwrap().block_count,
        4
    );
    // not a GGUF file at all
    assert!(matches!(
        base_model_info_from_bytes(b"not a gguf file"),
        Err(FormatError::Gguf(_))
    ));
    assert!(matches!(
        base_model_info(Path::new("/nonexistent/m.gguf")),
        Err(FormatError::Io { .. })
    ));
}

#[test]
fn sidecar_matches_its_model() {
    let model = write(&model_writer(2, 4, 3, 8, 1.0));
    let base = base_model_info_from_bytes(&model).unwrap();
    let mut sc = common::small();
    sc.base = base.clone();
    let bytes = sc.to_bytes(StorageType::F32).unwrap();
    Sidecar::parse(&bytes).unwrap().check_base(&base).unwrap();
}

#[test]
fn committed_fuzz_seeds_are_valid() {
    // the seeds of fuzz/seeds/ (made by `examples/fuzz_seeds.rs`) must stay valid files
    let dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .join("fuzz/seeds");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        if path.file_name().unwrap() == "model.gguf" {
            let base = base_model_info(&path).unwrap();
            assert_eq!((base.block_count, base.hidden_size), (2, 4));
        } else {
            let sc = Sidecar::read(&path).unwrap();
            assert_eq!(sc.base.architecture, "llama");
            n += 1;
        }
    }
    assert_eq!(n, 3);
}
