//! The fixtures must load and run in STOCK llama.cpp (via llama-cpp-2).
//!
//! `LlamaBackend::init()` may only be called once per process, so it is shared through a
//! `OnceLock`. Set `DRLLM_LLAMA_LOGS=1` to see llama.cpp's own log output.

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use drllm_gguf::{GgmlType, GgufFile, GgufWriter, Value, ValueType};
use drllm_testkit::{prompt_text, rewrite_blocks, write_tiny_model, Family, TinySpec, BOS_ID};
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;

fn backend() -> &'static LlamaBackend {
    static BACKEND: OnceLock<LlamaBackend> = OnceLock::new();
    BACKEND.get_or_init(|| {
        let mut b = LlamaBackend::init().expect("llama backend init");
        if std::env::var_os("DRLLM_LLAMA_LOGS").is_none() {
            b.void_logs();
        }
        b
    })
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("drllm-llama-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

struct Run {
    n_layer: u32,
    n_tokens: usize,
    logits: Vec<f32>,
}

/// Loads `path` in llama.cpp, decodes `prompt` (with BOS) in one batch and returns the
/// last token's logits.
fn run(path: &Path, prompt: &str) -> Run {
    let b = backend();
    let model = LlamaModel::load_from_file(b, path, &LlamaModelParams::default())
        .unwrap_or_else(|e| panic!("llama.cpp failed to load {}: {e}", path.display()));
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(512))
        .with_n_batch(512)
        .with_n_threads(2)
        .with_n_threads_batch(2);
    let mut ctx = model.new_context(b, params).expect("context");
    let tokens = model.vocab().tokenize(prompt.as_bytes(), true, false);
    let mut batch = LlamaBatch::new(512, 1);
    batch.add_sequence(&tokens, 0, false).expect("batch");
    ctx.decode(&mut batch).expect("decode");
    let logits = ctx.get_logits_ith(batch.n_tokens() - 1).to_vec();
    assert_eq!(logits.len(), model.n_vocab() as usize);
    Run {
        n_layer: model.n_layer(),
        n_tokens: tokens.len(),
        logits,
    }
}

fn std_dev(xs: &[f32]) -> f64 {
    let n = xs.len() as f64;
    let mean = xs.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
    (xs.iter()
        .map(|&x| (f64::from(x) - mean).powi(2))
        .sum::<f64>()
        / n)
        .sqrt()
}

fn assert_healthy(r: &Run, what: &str) {
    assert!(
        r.logits.iter().all(|x| x.is_finite()),
        "{what}: non-finite logits"
    );
    let sd = std_dev(&r.logits);
    assert!(sd > 0.1, "{what}: logits are flat (std {sd})");
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn tiny_models_load_and_run_in_llama_cpp() {
    let d = tmpdir("tiny");
    let prompt = prompt_text(40, 1);
    for family in Family::ALL {
        for wt in [GgmlType::F16, GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::F32] {
            let mut spec = TinySpec::default_for(family);
            spec.weight_type = wt;
            spec.with_chat_template = wt == GgmlType::Q8_0;
            let p = d.join(format!("{}-{}.gguf", family.arch_name(), wt.name()));
            write_tiny_model(&spec, &p).unwrap();
            let r = run(&p, &prompt);
            let what = format!("{} {}", family.arch_name(), wt.name());
            assert_eq!(r.n_layer, spec.n_layer, "{what}");
            // 40 single-token words + BOS
            assert_eq!(r.n_tokens, 41, "{what}");
            assert_healthy(&r, &what);
            let sd = std_dev(&r.logits);
            eprintln!("{what}: {} tokens, logit std {sd:.3}", r.n_tokens);
        }
    }
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn tiny_model_tokenizes_as_expected() {
    let d = tmpdir("tok");
    let mut spec = TinySpec::default_for(Family::Llama);
    spec.with_chat_template = true;
    let p = d.join("llama.gguf");
    write_tiny_model(&spec, &p).unwrap();
    let model = LlamaModel::load_from_file(backend(), &p, &LlamaModelParams::default()).unwrap();
    let toks = model.vocab().tokenize(b"the cat sat", true, false);
    assert_eq!(toks.len(), 4);
    assert_eq!(toks[0].0 as u32, BOS_ID);
    let f = GgufFile::open(&p).unwrap();
    let vocab = f.get_array("tokenizer.ggml.tokens").unwrap();
    let text: Vec<&str> = toks[1..]
        .iter()
        .map(|t| vocab.values[t.0 as usize].as_str().unwrap())
        .collect();
    assert_eq!(text, ["\u{2581}the", "\u{2581}cat", "\u{2581}sat"]);
    // out-of-vocabulary characters fall back to byte tokens
    let toks = model.vocab().tokenize("Zq!".as_bytes(), false, false);
    assert!(!toks.is_empty());
    // chat template is visible to llama.cpp and special tokens parse
    assert!(model.chat_template(None).is_ok());
    let toks = model.vocab().tokenize(b"<|im_start|>user", false, true);
    assert_eq!(
        vocab.values[toks[0].0 as usize].as_str(),
        Some("<|im_start|>")
    );
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn identity_rewrite_of_tiny_gemma3_keeps_logits() {
    let d = tmpdir("gemma-id");
    let spec = TinySpec::default_for(Family::Gemma3);
    let src = d.join("g.gguf");
    write_tiny_model(&spec, &src).unwrap();
    let dst = d.join("g-id.gguf");
    let all: Vec<u32> = (0..spec.n_layer).collect();
    rewrite_blocks(&src, &dst, &all).unwrap();
    let prompt = prompt_text(40, 1);
    let a = run(&src, &prompt);
    let b = run(&dst, &prompt);
    assert_healthy(&a, "gemma3 original");
    let diff = max_abs_diff(&a.logits, &b.logits);
    assert!(diff <= 1e-4, "identity rewrite changed logits by {diff}");

    // sensitivity: the prompt (41 tokens) is longer than the window (8), so a wrong
    // SWA pattern (block 5 made sliding too) must change the logits; this proves the check
    // above is meaningful. (An all-false pattern cannot be used: llama.cpp aborts with
    // GGML_ASSERT(hparams.is_swa_any()) when SWA is on but no layer is SWA.)
    let f = GgufFile::open(&dst).unwrap();
    let mut w = GgufWriter::from_file(&f, &dst);
    w.set(
        "gemma3.attention.sliding_window_pattern",
        Value::array(
            ValueType::Bool,
            vec![Value::Bool(true); spec.n_layer as usize],
        ),
    );
    let wrong = d.join("g-wrong.gguf");
    w.write_to_path(&wrong).unwrap();
    let c = run(&wrong, &prompt);
    let diff = max_abs_diff(&a.logits, &c.logits);
    assert!(
        diff > 1e-3,
        "a wrong SWA pattern should change logits (diff {diff})"
    );
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn identity_rewrite_of_real_gemma3_keeps_logits() {
    let Some(src) = drllm_testkit::real_model(drllm_testkit::GEMMA3) else {
        return;
    };
    let d = tmpdir("gemma-real");
    let dst = d.join("gemma-id.gguf");
    let all: Vec<u32> = (0..18).collect();
    rewrite_blocks(&src, &dst, &all).unwrap();
    // the real window is 512 tokens, so for a short prompt this checks that the explicit
    // bool pattern array is accepted and reproduces the model exactly
    let prompt = "The quick brown fox jumps over the lazy dog. Once upon a time";
    let a = run(&src, prompt);
    let b = run(&dst, prompt);
    assert_healthy(&a, "gemma-3-270m");
    let diff = max_abs_diff(&a.logits, &b.logits);
    assert!(diff <= 1e-4, "identity rewrite changed logits by {diff}");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn deleting_a_block_loads_and_runs() {
    let d = tmpdir("del");
    let prompt = prompt_text(40, 3);
    for family in Family::ALL {
        let spec = TinySpec::default_for(family);
        let src = d.join(format!("{}.gguf", family.arch_name()));
        write_tiny_model(&spec, &src).unwrap();
        let k = if family == Family::Gemma3 { 5 } else { 2 };
        let blocks: Vec<u32> = (0..spec.n_layer).filter(|&b| b != k).collect();
        let dst = d.join(format!("{}-del{k}.gguf", family.arch_name()));
        rewrite_blocks(&src, &dst, &blocks).unwrap();
        let a = run(&src, &prompt);
        let r = run(&dst, &prompt);
        assert_eq!(r.n_layer, spec.n_layer - 1);
        assert_healthy(&r, &format!("{} without block {k}", family.arch_name()));
        assert!(
            max_abs_diff(&a.logits, &r.logits) > 1e-4,
            "deleting a block should matter"
        );

        // duplicating a block also loads
        let mut dup: Vec<u32> = (0..spec.n_layer).collect();
        dup.insert(1, 1);
        let dst2 = d.join(format!("{}-dup1.gguf", family.arch_name()));
        rewrite_blocks(&src, &dst2, &dup).unwrap();
        let r = run(&dst2, &prompt);
        assert_eq!(r.n_layer, spec.n_layer + 1);
        assert_healthy(&r, &format!("{} with block 1 twice", family.arch_name()));
    }
    // gemma3 reduced to its global (dense) block only: the rewriter sets the window to 0
    // (otherwise llama.cpp would abort on an SWA model without SWA layers)
    let spec = TinySpec::default_for(Family::Gemma3);
    let src = d.join("gemma3.gguf");
    let dst = d.join("gemma3-global-only.gguf");
    rewrite_blocks(&src, &dst, &[5, 5]).unwrap();
    let r = run(&dst, &prompt);
    assert_eq!(r.n_layer, 2);
    assert_healthy(&r, "gemma3 global blocks only");
    assert!(spec.n_layer > 2);

    if let Some(smol) = drllm_testkit::real_model(drllm_testkit::SMOLLM2) {
        let dst = d.join("smol-del.gguf");
        let blocks: Vec<u32> = (0..30).filter(|&b| b != 7).collect();
        rewrite_blocks(&smol, &dst, &blocks).unwrap();
        let r = run(&dst, "The capital of France is");
        assert_eq!(r.n_layer, 29);
        assert_healthy(&r, "SmolLM2 without block 7");
    }
    std::fs::remove_dir_all(&d).unwrap();
}
