//! Writes a few small valid sidecars (and one tiny model file) to seed the fuzzer.
//!
//! `cargo run --release -p drllm-router-format --example fuzz_seeds -- DIR`
//! (default DIR: `router-format/fuzz/corpus/parse_sidecar`). The committed seeds in
//! `router-format/fuzz/seeds/` were made with it.

use std::path::PathBuf;

use drllm_gguf::{GgmlType, GgufWriter, TensorSource, Value};
use drllm_router_format::{
    base_model_info_from_bytes, FormatError, Provenance, RouterShape, Sidecar, StorageType,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args_os().nth(1).map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/parse_sidecar"),
        PathBuf::from,
    );
    std::fs::create_dir_all(&dir)?;

    // a tiny "model": the base the sidecars point at
    let mut m = GgufWriter::new();
    m.set("general.architecture", Value::string("llama"));
    m.set("llama.block_count", Value::U32(2));
    m.set("llama.embedding_length", Value::U32(4));
    let w: Vec<u8> = (0..8).flat_map(|i| (i as f32).to_le_bytes()).collect();
    m.add_tensor("blk.0.w", GgmlType::F32, &[8], TensorSource::Bytes(w))?;
    let mut model = Vec::new();
    m.write_to(&mut model)?;
    let base = base_model_info_from_bytes(&model)?;

    let sidecar =
        |blocks: u32, d: u32, hidden: usize, windows: usize| -> Result<Sidecar, FormatError> {
            let mut b = base.clone();
            b.block_count = blocks;
            b.hidden_size = d;
            let mut s = Sidecar::initial(
                b,
                RouterShape { hidden, windows },
                Provenance {
                    dataset: "seed".into(),
                    created: "2026-01-01T00:00:00Z".into(),
                    ..Default::default()
                },
                u64::from(blocks),
            )?;
            s.routers[0].b2 = [0.5, 1.0, -0.5];
            Ok(s)
        };
    let files: Vec<(&str, Result<Vec<u8>, FormatError>)> = vec![
        (
            "f32_2x4x2.gguf",
            sidecar(2, 4, 2, 8)?.to_bytes(StorageType::F32),
        ),
        (
            "f16_1x3x1.gguf",
            sidecar(1, 3, 1, 1)?.to_bytes(StorageType::F16),
        ),
        (
            "f32_3x2x3.gguf",
            sidecar(3, 2, 3, 64)?.to_bytes(StorageType::F32),
        ),
    ];
    for (name, bytes) in files {
        let bytes = bytes?;
        Sidecar::parse(&bytes)?;
        std::fs::write(dir.join(name), &bytes)?;
    }
    std::fs::write(dir.join("model.gguf"), &model)?;
    println!("wrote seeds to {}", dir.display());
    Ok(())
}
