//! Embeddings against stock llama.cpp's on the same file: every family, every pooling, at full
//! depth and along a path that skips a block (against llama.cpp on the file with that block
//! deleted), over prefill graphs of several chunks.

mod common;

use common::*;
use drllm_engine::stock::StockModel;
use drllm_engine::{DeviceChoice, LayerPath, Pooling, Route, Tokenizer};
use drllm_testkit::{prompt_text, rewrite_blocks, Family};

/// Largest difference relative to the vector's largest |value|.
fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
        / scale
}

#[test]
fn embeddings_equal_stock_llama_cpp_for_every_family_and_pooling() {
    let dir = tempfile::tempdir().unwrap();
    for family in Family::ALL {
        let p = tiny(dir.path(), family, |_| {});
        let m = load(&p);
        let tok = Tokenizer::load(&p).unwrap();
        let prompt = tok.tokenize(&prompt_text(30, 11), true, false);
        let stock = StockModel::load(&p, DeviceChoice::Cpu).unwrap();
        // drllm in prefill graphs of 16 tokens; llama.cpp in one batch (pooling needs it)
        let mut s = session_ub(&m, 16);
        for pooling in [Pooling::Mean, Pooling::Cls, Pooling::Last] {
            let full = LayerPath::full(m.n_layer());
            let (ours, path) = s.embed(&prompt, Route::Fixed(&full), pooling).unwrap();
            assert_eq!(path, full);
            let theirs = stock.embeddings(&prompt, pooling, 2).unwrap();
            let d = rel_diff(&ours, &theirs);
            assert!(d < 1e-3, "{} {}: {d}", family.arch_name(), pooling.name());
        }
        assert_eq!(s.n_past(), 0, "an embedding leaves no sequence");
    }
}

#[test]
fn embeddings_along_a_path_equal_llama_cpp_on_the_file_without_the_block() {
    let dir = tempfile::tempdir().unwrap();
    for family in [Family::Llama, Family::Qwen3, Family::Gemma3] {
        let p = tiny(dir.path(), family, |_| {});
        let m = load(&p);
        let tok = Tokenizer::load(&p).unwrap();
        let prompt = tok.tokenize(&prompt_text(20, 4), true, false);
        let n = m.n_layer();
        let mut counts = vec![1usize; n];
        counts[1] = 0;
        let path = LayerPath::from_counts(&counts).unwrap();
        let mut s = session(&m);
        let (ours, _) = s
            .embed(&prompt, Route::Fixed(&path), Pooling::Mean)
            .unwrap();
        let kept: Vec<u32> = (0..n as u32).filter(|&b| b != 1).collect();
        let cut = dir
            .path()
            .join(format!("{}-without-1.gguf", family.arch_name()));
        rewrite_blocks(&p, &cut, &kept).unwrap();
        let theirs = StockModel::load(&cut, DeviceChoice::Cpu)
            .unwrap()
            .embeddings(&prompt, Pooling::Mean, 2)
            .unwrap();
        let d = rel_diff(&ours, &theirs);
        assert!(d < 1e-3, "{}: {d}", family.arch_name());
        // and it is not the full path's
        let (full, _) = s
            .embed(&prompt, Route::Fixed(&LayerPath::full(n)), Pooling::Mean)
            .unwrap();
        assert!(rel_diff(&full, &theirs) > 1e-3);
    }
}

#[test]
fn a_normalised_embedding_has_unit_length() {
    let v = drllm_engine::normalized(&[3.0, 4.0]);
    assert!((v[0] - 0.6).abs() < 1e-7 && (v[1] - 0.8).abs() < 1e-7);
    assert_eq!(drllm_engine::normalized(&[0.0, 0.0]), vec![0.0, 0.0]);
}
