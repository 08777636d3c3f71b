//! Fixture structure tests (pure Rust, no llama.cpp).

use std::path::{Path, PathBuf};

use drllm_gguf::{GgmlType, GgufFile, GgufWriter, TensorSource, Value, ValueType};
use drllm_testkit::{
    prompt_text, rewrite_blocks, swa_pattern, tiny_vocab, write_tiny_model, Family, TestkitError,
    TinySpec, BOS_ID, WORDS,
};

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("drllm-testkit-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn expected_block_tensors(spec: &TinySpec) -> Vec<(&'static str, Vec<u64>)> {
    let e = u64::from(spec.n_embd);
    let q = u64::from(spec.n_head * spec.head_dim);
    let kv = u64::from(spec.n_head_kv * spec.head_dim);
    let ff = u64::from(spec.n_ff);
    let hd = u64::from(spec.head_dim);
    let mut v = vec![
        ("attn_norm.weight", vec![e]),
        ("attn_q.weight", vec![e, q]),
        ("attn_k.weight", vec![e, kv]),
        ("attn_v.weight", vec![e, kv]),
        ("attn_output.weight", vec![q, e]),
        ("ffn_norm.weight", vec![e]),
        ("ffn_gate.weight", vec![e, ff]),
        ("ffn_up.weight", vec![e, ff]),
        ("ffn_down.weight", vec![ff, e]),
    ];
    match spec.family {
        Family::Llama => {}
        Family::Qwen2 => {
            v.push(("attn_q.bias", vec![q]));
            v.push(("attn_k.bias", vec![kv]));
            v.push(("attn_v.bias", vec![kv]));
        }
        Family::Qwen3 => {
            v.push(("attn_q_norm.weight", vec![hd]));
            v.push(("attn_k_norm.weight", vec![hd]));
        }
        Family::Phi3 => {
            v.retain(|(n, _)| {
                !matches!(
                    *n,
                    "attn_q.weight"
                        | "attn_k.weight"
                        | "attn_v.weight"
                        | "ffn_gate.weight"
                        | "ffn_up.weight"
                )
            });
            v.push(("attn_qkv.weight", vec![e, q + 2 * kv]));
            v.push(("ffn_up.weight", vec![e, 2 * ff]));
        }
        Family::Olmo2 => {
            v.retain(|(n, _)| !matches!(*n, "attn_norm.weight" | "ffn_norm.weight"));
            v.push(("attn_q_norm.weight", vec![q]));
            v.push(("attn_k_norm.weight", vec![kv]));
            v.push(("post_attention_norm.weight", vec![e]));
            v.push(("post_ffw_norm.weight", vec![e]));
        }
        Family::Gemma2 => {
            v.push(("post_attention_norm.weight", vec![e]));
            v.push(("post_ffw_norm.weight", vec![e]));
        }
        Family::Granite => {
            v.push(("attn_output.bias", vec![e]));
            v.push(("ffn_gate.bias", vec![ff]));
            v.push(("ffn_up.bias", vec![ff]));
            v.push(("ffn_down.bias", vec![e]));
        }
        Family::Qwen3Moe => {
            let x = spec.experts.expect("qwen3moe has experts");
            let (n, xf) = (u64::from(x.n_expert), u64::from(x.n_ff));
            v.retain(|(n, _)| !n.starts_with("ffn_") || *n == "ffn_norm.weight");
            v.push(("attn_q_norm.weight", vec![hd]));
            v.push(("attn_k_norm.weight", vec![hd]));
            v.push(("ffn_gate_inp.weight", vec![e, n]));
            v.push(("ffn_gate_exps.weight", vec![e, xf, n]));
            v.push(("ffn_up_exps.weight", vec![e, xf, n]));
            v.push(("ffn_down_exps.weight", vec![xf, e, n]));
        }
        Family::Gemma3 => {
            v.push(("attn_q_norm.weight", vec![hd]));
            v.push(("attn_k_norm.weight", vec![hd]));
            v.push(("post_attention_norm.weight", vec![e]));
            v.push(("post_ffw_norm.weight", vec![e]));
        }
    }
    v
}

#[test]
fn tiny_models_parse_with_expected_tensors_and_keys() {
    let d = tmpdir("parse");
    for family in Family::ALL {
        for wt in [GgmlType::F32, GgmlType::F16, GgmlType::Q8_0, GgmlType::Q4_0] {
            let mut spec = TinySpec::default_for(family);
            spec.weight_type = wt;
            spec.with_chat_template = wt == GgmlType::Q8_0;
            let p = d.join(format!("{}-{}.gguf", family.arch_name(), wt.name()));
            write_tiny_model(&spec, &p).unwrap();
            let f = GgufFile::open(&p).unwrap();
            f.check_ggml_layout().unwrap();
            let arch = family.arch_name();
            assert_eq!(f.architecture(), Some(arch));
            let u32_key = |k: &str| match f.get(&format!("{arch}.{k}")) {
                Some(Value::U32(v)) => *v,
                other => panic!("{arch}.{k} should be u32, is {other:?}"),
            };
            assert_eq!(u32_key("block_count"), spec.n_layer);
            assert_eq!(u32_key("context_length"), 512);
            assert_eq!(u32_key("embedding_length"), spec.n_embd);
            assert_eq!(u32_key("feed_forward_length"), spec.n_ff);
            assert_eq!(u32_key("attention.head_count"), spec.n_head);
            assert_eq!(u32_key("attention.head_count_kv"), spec.n_head_kv);
            assert_eq!(u32_key("attention.key_length"), spec.head_dim);
            assert!(matches!(
                f.get(&format!("{arch}.attention.layer_norm_rms_epsilon")),
                Some(Value::F32(_))
            ));
            assert!(matches!(
                f.get(&format!("{arch}.rope.freq_base")),
                Some(Value::F32(_))
            ));
            if family == Family::Llama {
                assert_eq!(u32_key("rope.dimension_count"), spec.head_dim);
                assert_eq!(u32_key("vocab_size"), spec.n_vocab());
            }
            if family == Family::Gemma3 {
                assert_eq!(u32_key("attention.sliding_window"), 8);
            }

            // tokenizer
            let n_vocab = spec.n_vocab() as usize;
            assert_eq!(f.get_str("tokenizer.ggml.model"), Some("llama"));
            let toks = f.get_array("tokenizer.ggml.tokens").unwrap();
            assert_eq!(toks.len(), n_vocab);
            assert_eq!(toks.values[0].as_str(), Some("<unk>"));
            assert_eq!(toks.values[1].as_str(), Some("<s>"));
            assert_eq!(toks.values[3].as_str(), Some("<0x00>"));
            assert_eq!(toks.values[3 + 255].as_str(), Some("<0xFF>"));
            let types = f.get_array("tokenizer.ggml.token_type").unwrap();
            assert_eq!(types.elem_type, ValueType::I32);
            assert_eq!(types.len(), n_vocab);
            assert_eq!(
                f.get_array("tokenizer.ggml.scores").unwrap().elem_type,
                ValueType::F32
            );
            assert_eq!(f.get_bool("tokenizer.ggml.add_bos_token"), Some(true));
            assert_eq!(f.get_u32("tokenizer.ggml.bos_token_id"), Some(BOS_ID));
            let unique: std::collections::HashSet<_> =
                toks.values.iter().map(|v| v.as_str().unwrap()).collect();
            assert_eq!(unique.len(), n_vocab, "token texts must be unique");
            assert_eq!(
                f.get_str("tokenizer.chat_template").is_some(),
                spec.with_chat_template
            );
            assert_eq!(unique.contains("<|im_start|>"), spec.with_chat_template);

            // tensors
            let e = u64::from(spec.n_embd);
            let emb = f.tensor("token_embd.weight").unwrap();
            assert_eq!(emb.dims, vec![e, n_vocab as u64]);
            assert_eq!(emb.dtype, wt);
            assert_eq!(f.tensor("output_norm.weight").unwrap().dtype, GgmlType::F32);
            assert_eq!(f.tensor("output.weight").is_some(), !spec.tied_embeddings);
            let per_block = expected_block_tensors(&spec);
            let n_out = usize::from(!spec.tied_embeddings);
            assert_eq!(
                f.tensors.len(),
                2 + n_out + per_block.len() * spec.n_layer as usize
            );
            for il in 0..spec.n_layer {
                for (suffix, dims) in &per_block {
                    let name = format!("blk.{il}.{suffix}");
                    let t = f.tensor(&name).unwrap_or_else(|| panic!("missing {name}"));
                    assert_eq!(&t.dims, dims, "{name}");
                    // norms, biases and the expert router stay F32
                    let want = if dims.len() >= 2 && !suffix.starts_with("ffn_gate_inp") {
                        wt
                    } else {
                        GgmlType::F32
                    };
                    assert_eq!(t.dtype, want, "{name}");
                }
            }
        }
    }
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn tiny_models_are_deterministic() {
    let d = tmpdir("det");
    let spec = TinySpec::default_for(Family::Qwen3);
    write_tiny_model(&spec, &d.join("a.gguf")).unwrap();
    write_tiny_model(&spec, &d.join("b.gguf")).unwrap();
    assert_eq!(
        std::fs::read(d.join("a.gguf")).unwrap(),
        std::fs::read(d.join("b.gguf")).unwrap()
    );
    let mut other = spec.clone();
    other.seed += 1;
    write_tiny_model(&other, &d.join("c.gguf")).unwrap();
    assert_ne!(
        std::fs::read(d.join("a.gguf")).unwrap(),
        std::fs::read(d.join("c.gguf")).unwrap()
    );
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn invalid_specs_are_rejected() {
    let d = tmpdir("spec");
    let p = d.join("x.gguf");
    let mut s = TinySpec::default_for(Family::Llama);
    s.n_head_kv = 3;
    assert!(matches!(
        write_tiny_model(&s, &p),
        Err(TestkitError::InvalidSpec(_))
    ));
    let mut s = TinySpec::default_for(Family::Qwen2);
    s.head_dim = 32;
    assert!(matches!(
        write_tiny_model(&s, &p),
        Err(TestkitError::InvalidSpec(_))
    ));
    let mut s = TinySpec::default_for(Family::Llama);
    s.weight_type = GgmlType::Q4_K;
    assert!(matches!(
        write_tiny_model(&s, &p),
        Err(TestkitError::InvalidSpec(_))
    ));
    let mut s = TinySpec::default_for(Family::Llama);
    s.weight_type = GgmlType::Q8_0;
    s.n_ff = 100;
    assert!(matches!(
        write_tiny_model(&s, &p),
        Err(TestkitError::InvalidSpec(_))
    ));
    assert!(!p.exists());
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn prompt_text_is_deterministic_words() {
    let a = prompt_text(40, 1);
    assert_eq!(a, prompt_text(40, 1));
    assert_ne!(a, prompt_text(40, 2));
    let words: Vec<&str> = a.split(' ').collect();
    assert_eq!(words.len(), 40);
    assert!(words.iter().all(|w| WORDS.contains(w)));
    assert_eq!(prompt_text(0, 1), "");
    // every word is a vocabulary piece
    let vocab: Vec<String> = tiny_vocab(false).into_iter().map(|e| e.text).collect();
    for w in WORDS {
        assert!(vocab.contains(&format!("\u{2581}{w}")));
    }
}

fn tensor_bytes(f: &GgufFile, path: &Path, name: &str) -> Vec<u8> {
    f.read_tensor_data_from_path(path, f.tensor(name).unwrap())
        .unwrap()
}

#[test]
fn rewrite_deletes_duplicates_and_reindexes() {
    let d = tmpdir("rw");
    let spec = TinySpec::default_for(Family::Gemma3);
    let src = d.join("g.gguf");
    write_tiny_model(&spec, &src).unwrap();
    let f = GgufFile::open(&src).unwrap();
    let flags = swa_pattern(&f).unwrap().unwrap();
    assert_eq!(flags, vec![true, true, true, true, true, false, true]);

    // delete block 5 (the global one)
    let dst = d.join("del5.gguf");
    let blocks = [0, 1, 2, 3, 4, 6];
    rewrite_blocks(&src, &dst, &blocks).unwrap();
    let g = GgufFile::open(&dst).unwrap();
    g.check_ggml_layout().unwrap();
    assert_eq!(g.get("gemma3.block_count"), Some(&Value::U32(6)));
    let pat = g
        .get_array("gemma3.attention.sliding_window_pattern")
        .unwrap();
    assert_eq!(pat.elem_type, ValueType::Bool);
    assert_eq!(pat.values, vec![Value::Bool(true); 6]);
    assert_eq!(swa_pattern(&g).unwrap().unwrap(), vec![true; 6]);
    assert_eq!(g.tensors.len(), f.tensors.len() - 13);
    assert!(g.tensor("blk.6.attn_q.weight").is_none());
    for (j, &b) in blocks.iter().enumerate() {
        for suffix in ["attn_q.weight", "post_ffw_norm.weight", "ffn_down.weight"] {
            assert_eq!(
                tensor_bytes(&g, &dst, &format!("blk.{j}.{suffix}")),
                tensor_bytes(&f, &src, &format!("blk.{b}.{suffix}"))
            );
        }
    }
    // non-block tensors and other metadata unchanged
    assert_eq!(
        tensor_bytes(&g, &dst, "token_embd.weight"),
        tensor_bytes(&f, &src, "token_embd.weight")
    );
    assert_eq!(
        g.get("tokenizer.ggml.tokens"),
        f.get("tokenizer.ggml.tokens")
    );

    // duplicate block 5 and reorder
    let dst2 = d.join("dup.gguf");
    rewrite_blocks(&dst, &dst2, &[0, 0, 5, 5, 1]).unwrap();
    let h = GgufFile::open(&dst2).unwrap();
    assert_eq!(h.block_count(), Some(5));
    assert_eq!(swa_pattern(&h).unwrap().unwrap(), vec![true; 5]);
    let dst3 = d.join("dup_src.gguf");
    rewrite_blocks(&src, &dst3, &[5, 5, 6, 0]).unwrap();
    let k = GgufFile::open(&dst3).unwrap();
    assert_eq!(
        swa_pattern(&k).unwrap().unwrap(),
        vec![false, false, true, true]
    );
    assert_eq!(
        tensor_bytes(&k, &dst3, "blk.1.attn_k.weight"),
        tensor_bytes(&f, &src, "blk.5.attn_k.weight")
    );

    // only dense blocks selected: SWA is switched off via a zero window
    let dense = d.join("dense.gguf");
    rewrite_blocks(&src, &dense, &[5, 5]).unwrap();
    let g = GgufFile::open(&dense).unwrap();
    assert_eq!(
        g.get("gemma3.attention.sliding_window"),
        Some(&Value::U32(0))
    );
    assert_eq!(swa_pattern(&g).unwrap(), None);

    // in-place rewrite works (sources are read before the rename)
    rewrite_blocks(&dst3, &dst3, &[3]).unwrap();
    let k = GgufFile::open(&dst3).unwrap();
    assert_eq!(k.block_count(), Some(1));
    assert_eq!(
        tensor_bytes(&k, &dst3, "blk.0.attn_k.weight"),
        tensor_bytes(&f, &src, "blk.0.attn_k.weight")
    );

    // errors
    assert!(matches!(
        rewrite_blocks(&src, &d.join("x.gguf"), &[]),
        Err(TestkitError::InvalidBlocks(_))
    ));
    assert!(matches!(
        rewrite_blocks(&src, &d.join("x.gguf"), &[0, 7]),
        Err(TestkitError::InvalidBlocks(_))
    ));
    assert!(!d.join("x.gguf").exists());

    // non-SWA family: no pattern key is added
    let lsrc = d.join("l.gguf");
    write_tiny_model(&TinySpec::default_for(Family::Llama), &lsrc).unwrap();
    let ldst = d.join("l2.gguf");
    rewrite_blocks(&lsrc, &ldst, &[5, 4, 3, 2, 1, 0]).unwrap();
    let l = GgufFile::open(&ldst).unwrap();
    assert!(l.get("llama.attention.sliding_window_pattern").is_none());
    assert_eq!(swa_pattern(&l).unwrap(), None);
    assert_eq!(
        tensor_bytes(&l, &ldst, "blk.0.ffn_up.weight"),
        tensor_bytes(
            &GgufFile::open(&lsrc).unwrap(),
            &lsrc,
            "blk.5.ffn_up.weight"
        )
    );
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn rewrite_reindexes_per_layer_arrays_and_explicit_patterns() {
    let d = tmpdir("arr");
    let spec = TinySpec::default_for(Family::Gemma3);
    let base = d.join("base.gguf");
    write_tiny_model(&spec, &base).unwrap();
    // give the file per-layer arrays (as some converters write them) and an explicit
    // u32 pattern array
    let f = GgufFile::open(&base).unwrap();
    let mut w = GgufWriter::from_file(&f, &base);
    let per_layer: Vec<Value> = (0..7).map(|i| Value::U32(4 + (i % 2))).collect();
    w.set(
        "gemma3.attention.head_count",
        Value::array(ValueType::U32, per_layer),
    );
    w.set(
        "gemma3.attention.sliding_window_pattern",
        Value::array(
            ValueType::I32,
            vec![1, 0, 1, 0, 1, 0, 0]
                .into_iter()
                .map(Value::I32)
                .collect(),
        ),
    );
    w.set(
        "gemma3.rope.dimension_sections",
        Value::array(ValueType::I32, vec![Value::I32(9); 7]),
    );
    let src = d.join("arr.gguf");
    w.write_to_path(&src).unwrap();
    let f = GgufFile::open(&src).unwrap();
    assert_eq!(
        swa_pattern(&f).unwrap().unwrap(),
        vec![true, false, true, false, true, false, false]
    );
    let dst = d.join("out.gguf");
    rewrite_blocks(&src, &dst, &[1, 2, 2]).unwrap();
    let g = GgufFile::open(&dst).unwrap();
    let hc = g.get_array("gemma3.attention.head_count").unwrap();
    assert_eq!(hc.values, vec![Value::U32(5), Value::U32(4), Value::U32(4)]);
    let pat = g
        .get_array("gemma3.attention.sliding_window_pattern")
        .unwrap();
    assert_eq!(pat.elem_type, ValueType::Bool);
    assert_eq!(
        pat.values,
        vec![Value::Bool(false), Value::Bool(true), Value::Bool(true)]
    );
    // non per-layer array of coincidentally equal length is left alone
    assert_eq!(
        g.get_array("gemma3.rope.dimension_sections").unwrap().len(),
        7
    );

    // scalar u32 pattern key: period semantics
    let mut w = GgufWriter::from_file(&GgufFile::open(&base).unwrap(), &base);
    w.set("gemma3.attention.sliding_window_pattern", Value::U32(3));
    let src2 = d.join("scalar.gguf");
    w.write_to_path(&src2).unwrap();
    assert_eq!(
        swa_pattern(&GgufFile::open(&src2).unwrap())
            .unwrap()
            .unwrap(),
        vec![true, true, false, true, true, false, true]
    );
    // unknown tensor-level data untouched: a non-block tensor after the blocks survives
    let mut w = GgufWriter::from_file(&GgufFile::open(&base).unwrap(), &base);
    w.add_tensor(
        "zz_extra.weight",
        GgmlType::F32,
        &[2],
        TensorSource::Bytes(vec![7; 8]),
    )
    .unwrap();
    let src3 = d.join("extra.gguf");
    w.write_to_path(&src3).unwrap();
    let dst3 = d.join("extra_out.gguf");
    rewrite_blocks(&src3, &dst3, &[0]).unwrap();
    let g = GgufFile::open(&dst3).unwrap();
    assert_eq!(g.tensors.last().unwrap().name, "zz_extra.weight");
    assert_eq!(tensor_bytes(&g, &dst3, "zz_extra.weight"), vec![7; 8]);
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn rewrite_real_models_structure() {
    let d = tmpdir("real");
    if let Some(gemma) = drllm_testkit::real_model(drllm_testkit::GEMMA3) {
        let f = GgufFile::open(&gemma).unwrap();
        let flags = swa_pattern(&f).unwrap().unwrap();
        let expect: Vec<bool> = (0..18).map(|il| il % 6 < 5).collect();
        assert_eq!(flags, expect);
        let dst = d.join("gemma-del.gguf");
        let blocks: Vec<u32> = (0..18).filter(|&b| b != 5).collect();
        rewrite_blocks(&gemma, &dst, &blocks).unwrap();
        let g = GgufFile::open(&dst).unwrap();
        g.check_ggml_layout().unwrap();
        assert_eq!(g.block_count(), Some(17));
        assert_eq!(g.tensors.len(), f.tensors.len() - 13);
        let want: Vec<bool> = blocks.iter().map(|&b| expect[b as usize]).collect();
        assert_eq!(swa_pattern(&g).unwrap().unwrap(), want);
        std::fs::remove_file(&dst).unwrap();
    }
    if let Some(smol) = drllm_testkit::real_model(drllm_testkit::SMOLLM2) {
        let f = GgufFile::open(&smol).unwrap();
        let dst = d.join("smol-dup.gguf");
        let mut blocks: Vec<u32> = (0..30).collect();
        blocks.insert(10, 10);
        rewrite_blocks(&smol, &dst, &blocks).unwrap();
        let g = GgufFile::open(&dst).unwrap();
        assert_eq!(g.block_count(), Some(31));
        assert_eq!(g.tensors.len(), f.tensors.len() + 9);
        assert!(g.get("llama.attention.sliding_window_pattern").is_none());
        assert_eq!(
            tensor_bytes(&g, &dst, "blk.11.attn_q.weight"),
            tensor_bytes(&f, &smol, "blk.10.attn_q.weight")
        );
        std::fs::remove_file(&dst).unwrap();
    }
    std::fs::remove_dir_all(&d).unwrap();
}
