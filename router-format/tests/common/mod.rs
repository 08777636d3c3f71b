//! Fixtures shared by the test files: small sidecars, tiny "models", byte patching.
#![allow(dead_code)]

use drllm_gguf::{GgmlType, GgufFile, GgufWriter, TensorSource, Value};
use drllm_router_format::{BaseModel, BlockRouter, Provenance, RouterShape, Sidecar};

/// A syntactically valid fingerprint.
pub fn fp(byte: u8) -> String {
    format!("sha256:{}", format!("{byte:02x}").repeat(32))
}

pub fn base(blocks: u32, d: u32) -> BaseModel {
    BaseModel {
        architecture: "llama".into(),
        block_count: blocks,
        hidden_size: d,
        fingerprint: fp(0xab),
    }
}

/// A sidecar with Xavier weights and small nonzero biases, full provenance.
pub fn sidecar(blocks: u32, d: usize, hidden: usize) -> Sidecar {
    let routers = (0..blocks)
        .map(|i| {
            let mut r = BlockRouter::xavier(d, hidden, 1000 + u64::from(i));
            for (j, b) in r.b1.iter_mut().enumerate() {
                *b = 0.01 * (j as f32) - 0.05;
            }
            r.b2 = [0.25, -0.5, 0.125 * i as f32];
            r
        })
        .collect();
    Sidecar {
        version: 1,
        base: base(blocks, d as u32),
        shape: RouterShape { hidden, windows: 8 },
        provenance: Provenance {
            dataset: "arc-easy train (2251 questions)".into(),
            search: r#"{"simulations":50,"c":1.8}"#.into(),
            training: r#"{"epochs":20,"lr":0.001}"#.into(),
            metrics: r#"{"recall":[0.5,0.9,0.3]}"#.into(),
            created: "2026-05-01T12:00:00Z".into(),
            tool: "drllm-router-format tests".into(),
            notes: "ünïcode ▁ notes".into(),
        },
        routers,
    }
}

/// The small sidecar most hardening tests start from: 2 blocks, d 4, hidden 2.
pub fn small() -> Sidecar {
    sidecar(2, 4, 2)
}

pub fn write(w: &GgufWriter) -> Vec<u8> {
    let mut out = Vec::new();
    w.write_to(&mut out).unwrap();
    out
}

pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Positions of one tensor-table entry in a file.
pub struct Entry {
    /// Offset of the u32 n_dims field.
    pub n_dims_at: usize,
    /// Offset of the first u64 dimension.
    pub dims_at: usize,
    /// Offset of the u32 dtype field.
    pub dtype_at: usize,
    /// Offset of the u64 data offset field.
    pub offset_at: usize,
}

/// Finds the tensor-table entry of `name` (length prefix + name bytes, searched from the end
/// of the metadata so that string values cannot match).
pub fn entry(bytes: &[u8], name: &str) -> Entry {
    let mut pat = (name.len() as u64).to_le_bytes().to_vec();
    pat.extend_from_slice(name.as_bytes());
    let at = bytes
        .windows(pat.len())
        .position(|w| w == pat.as_slice())
        .unwrap_or_else(|| panic!("tensor {name} not found"));
    let n_dims_at = at + pat.len();
    let n_dims = u32::from_le_bytes(bytes[n_dims_at..n_dims_at + 4].try_into().unwrap()) as usize;
    let dims_at = n_dims_at + 4;
    let dtype_at = dims_at + 8 * n_dims;
    Entry {
        n_dims_at,
        dims_at,
        dtype_at,
        offset_at: dtype_at + 4,
    }
}

pub fn put_u32(bytes: &mut [u8], at: usize, v: u32) {
    bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

pub fn put_u64(bytes: &mut [u8], at: usize, v: u64) {
    bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Absolute data range of a tensor in a (valid) file.
pub fn data_range(bytes: &[u8], name: &str) -> std::ops::Range<usize> {
    let g = GgufFile::parse(bytes).unwrap();
    let t = g.tensor(name).unwrap();
    let r = g.tensor_data_range(t);
    r.start as usize..r.end as usize
}

/// A tiny "model" GGUF: llama metadata (block_count, embedding_length) and `n_tensors` F32
/// tensors `blk.{i}.w` of `elems` elements with values `seed + i + j / 1000`.
pub fn model_writer(blocks: u32, d: u32, n_tensors: usize, elems: u64, seed: f32) -> GgufWriter {
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::string("llama"));
    w.set("general.name", Value::string("tiny"));
    w.set("llama.block_count", Value::U32(blocks));
    w.set("llama.embedding_length", Value::U32(d));
    w.set(
        "tokenizer.ggml.tokens",
        Value::string_array(["<s>", "</s>", "a", "b"]),
    );
    for i in 0..n_tensors {
        let v: Vec<f32> = (0..elems)
            .map(|j| seed + i as f32 + j as f32 / 1000.0)
            .collect();
        w.add_tensor(
            format!("blk.{i}.w"),
            GgmlType::F32,
            &[elems],
            TensorSource::Bytes(f32_bytes(&v)),
        )
        .unwrap();
    }
    w
}
