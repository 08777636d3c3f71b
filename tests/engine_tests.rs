//! The engine against independent references: stock llama.cpp on the same file, and model
//! files rewritten with a block deleted or duplicated.

mod common;

use common::*;
use drllm_engine::{
    EngineError, Hidden, LayerPath, Logits, PrefillHook, Route, Tokenizer, MAX_PASSES_PER_BLOCK,
};
use drllm_gguf::GgmlType;
use drllm_testkit::{prompt_text, rewrite_blocks, Family};
use std::path::Path;

const STEPS: usize = 8;

fn prompt_for(p: &Path, words: usize) -> Vec<i32> {
    let tok = Tokenizer::load(p).expect("tokenizer");
    let ids = tok.tokenize(&prompt_text(words, 7), true, false);
    assert!(ids.len() >= 32, "prompt has only {} tokens", ids.len());
    ids
}

fn real_prompt(p: &Path) -> Vec<i32> {
    let tok = Tokenizer::load(p).expect("tokenizer");
    let ids = tok.tokenize(
        "The history of the printing press begins in the fifteenth century, when Johannes \
         Gutenberg combined movable metal type, oil-based ink and a wooden screw press into a \
         system that could produce books quickly and cheaply. Within fifty years",
        true,
        false,
    );
    assert!(ids.len() >= 32);
    ids
}

// ---------------------------------------------------------------------------------------------
// 1. Full-depth parity with stock llama.cpp

/// drllm at full depth against stock llama.cpp on one file, a prompt of `words` words; the
/// traces are returned.
fn parity_file(p: &Path, words: usize, what: &str) -> Vec<Vec<f32>> {
    let m = load(p);
    let prompt = prompt_for(p, words);
    let e = engine_trace(&m, &LayerPath::full(m.n_layer()), &prompt, STEPS);
    let s = stock_trace(p, &prompt, STEPS);
    assert_traces(what, &e, &s, TOL);
    e
}

fn parity_tiny(family: Family) {
    let dir = tempfile::tempdir().unwrap();
    for wt in [GgmlType::F16, GgmlType::Q8_0, GgmlType::Q4_0] {
        let p = tiny(dir.path(), family, |s| s.weight_type = wt);
        parity_file(&p, 40, &format!("{} {}", family.arch_name(), wt.name()));
    }
}

#[test]
fn parity_tiny_llama() {
    parity_tiny(Family::Llama);
}

#[test]
fn parity_tiny_qwen2() {
    parity_tiny(Family::Qwen2);
}

#[test]
fn parity_tiny_qwen3() {
    parity_tiny(Family::Qwen3);
}

#[test]
fn parity_tiny_gemma2() {
    parity_tiny(Family::Gemma2);
}

#[test]
fn parity_tiny_gemma3() {
    parity_tiny(Family::Gemma3);
}

#[test]
fn parity_tiny_olmo2() {
    parity_tiny(Family::Olmo2);
}

#[test]
fn parity_tiny_phi3() {
    parity_tiny(Family::Phi3);
}

#[test]
fn parity_tiny_granite() {
    parity_tiny(Family::Granite);
    // and a file that turns RoPE off (rope.scaling.finetuned = false)
    let dir = tempfile::tempdir().unwrap();
    let p = tiny(dir.path(), Family::Granite, |s| s.rope = false);
    let e = parity_file(&p, 40, "granite without RoPE");
    let with_rope = tiny(dir.path(), Family::Granite, |_| {});
    let m = load(&with_rope);
    let prompt = prompt_for(&with_rope, 40);
    let r = engine_trace(&m, &LayerPath::full(m.n_layer()), &prompt, 0);
    assert!(
        max_abs_diff(&r[prompt.len() - 1], &e[prompt.len() - 1]) > 1e-3,
        "turning RoPE off changed nothing"
    );
}

#[test]
fn parity_tiny_qwen3moe() {
    parity_tiny(Family::Qwen3Moe);
    // one expert per token (llama.cpp makes the single expert's output contiguous) and every
    // expert per token
    let dir = tempfile::tempdir().unwrap();
    for used in [1, 4] {
        let p = tiny(dir.path(), Family::Qwen3Moe, |s| {
            s.experts = Some(drllm_testkit::TinyExperts {
                n_expert: 4,
                n_used: used,
                n_ff: 64,
            });
            s.seed += u64::from(used);
        });
        parity_file(&p, 40, &format!("qwen3moe, {used} of 4 experts"));
    }
}

#[test]
fn parity_tiny_llama_untied_and_long_prompt() {
    // prompts longer than one ubatch take several graphs (n_ubatch 512 -> use a small context
    // of tiny models: 512 cells, a 300-token prompt and 8 steps)
    let dir = tempfile::tempdir().unwrap();
    let p = tiny(dir.path(), Family::Gemma3, |s| s.sliding_window = 16);
    parity_file(&p, 300, "gemma3 window 16, 300 tokens");
}

fn parity_real(rel: &str) {
    let Some(p) = real_model(rel) else { return };
    let m = load(&p);
    let prompt = real_prompt(&p);
    let e = engine_trace(&m, &LayerPath::full(m.n_layer()), &prompt, STEPS);
    let s = stock_trace(&p, &prompt, STEPS);
    assert_traces(rel, &e, &s, TOL);
}

#[test]
fn parity_smollm2() {
    parity_real(SMOLLM2);
}

#[test]
fn parity_gemma3_270m() {
    parity_real(GEMMA3);
}

// ---------------------------------------------------------------------------------------------
// 2. Skip = model without the block; repeat = model with the block duplicated

fn skip_repeat(p: &Path, prompt: &[i32], skip: usize, repeat: usize, steps: usize) {
    let dir = tempfile::tempdir().unwrap();
    let m = load(p);
    let n = m.n_layer();
    for (what, blocks) in [
        ("skip", (0..n).filter(|&b| b != skip).collect::<Vec<_>>()),
        (
            "repeat",
            (0..n)
                .flat_map(|b| if b == repeat { vec![b, b] } else { vec![b] })
                .collect(),
        ),
    ] {
        let rewritten = dir.path().join(format!("{what}.gguf"));
        let blocks_u32: Vec<u32> = blocks.iter().map(|&b| b as u32).collect();
        rewrite_blocks(p, &rewritten, &blocks_u32).expect("rewrite");
        let path = LayerPath::new(&blocks, n).unwrap();
        let routed = engine_trace(&m, &path, prompt, steps);
        let m2 = load(&rewritten);
        let plain_rewritten = engine_trace(&m2, &LayerPath::full(m2.n_layer()), prompt, steps);
        let stock_rewritten = stock_trace(&rewritten, prompt, steps);
        let label = format!("{} {what} (path {path})", p.display());
        assert_traces(
            &format!("{label} vs drllm on rewritten file"),
            &routed,
            &plain_rewritten,
            TOL,
        );
        assert_traces(
            &format!("{label} vs llama.cpp on rewritten file"),
            &routed,
            &stock_rewritten,
            TOL,
        );
        // and the path really changes the model
        let full = engine_trace(&m, &LayerPath::full(n), prompt, 0);
        let last = full.len() - 1;
        assert!(
            max_abs_diff(&full[last], &routed[last]) > 1e-3,
            "{label}: the path did not change the logits"
        );
    }
}

#[test]
fn skip_and_repeat_tiny_families() {
    let dir = tempfile::tempdir().unwrap();
    for family in Family::ALL {
        let p = tiny(dir.path(), family, |_| {});
        let prompt = prompt_for(&p, 40);
        // gemma3: skipping a sliding block shifts the later ones; repeating the global block 5
        // (gemma2: skipping sliding block 2, repeating block 5)
        skip_repeat(&p, &prompt, 2, 5, STEPS);
    }
}

#[test]
fn skip_and_repeat_smollm2() {
    let Some(p) = real_model(SMOLLM2) else { return };
    let prompt = real_prompt(&p);
    skip_repeat(&p, &prompt, 7, 20, 4);
}

#[test]
fn skip_and_repeat_gemma3_270m() {
    let Some(p) = real_model(GEMMA3) else { return };
    let prompt = real_prompt(&p);
    skip_repeat(&p, &prompt, 8, 11, 4);
}

// ---------------------------------------------------------------------------------------------
// 3. Cached decoding = full recompute along the same path

/// Replays a fixed path through the prefill hook (layer-major, one graph per pass).
struct Replay(Vec<usize>);

impl PrefillHook for Replay {
    fn passes(&mut self, block: usize, hidden: &mut Hidden<'_>) -> Result<usize, String> {
        assert!(hidden.n_tokens() > 0);
        Ok(self.0[block])
    }
}

fn cached_equals_recompute(p: &Path, path: &LayerPath, prompt: &[i32]) {
    let m = load(p);
    let v = m.n_vocab();
    // cached: prefill + 8 decode steps
    let cached = engine_trace(&m, path, prompt, STEPS);
    let generated: Vec<i32> = cached[prompt.len() - 1..prompt.len() - 1 + STEPS]
        .iter()
        .map(|r| argmax(r) as i32)
        .collect();
    // recompute the whole sequence along the path in one prefill
    let mut all = prompt.to_vec();
    all.extend_from_slice(&generated);
    let mut s = session(&m);
    let full = s.prefill(&all, Route::Fixed(path), Logits::All).unwrap();
    assert_eq!(full.rows, all.len());
    let recomputed: Vec<Vec<f32>> = full.logits.chunks(v).map(|c| c.to_vec()).collect();
    assert_traces_rel(
        &format!("{} path {path}: cached vs recomputed", p.display()),
        &cached,
        &recomputed,
        CACHE_REL_TOL,
    );
    // the hook-driven (layer-major) prefill of the same path gives the same logits
    let mut s2 = session(&m);
    let mut hook = Replay(path.counts());
    let hooked = s2
        .prefill(&all, Route::Hook(&mut hook), Logits::All)
        .unwrap();
    assert_eq!(&hooked.path, path);
    let hooked_rows: Vec<Vec<f32>> = hooked.logits.chunks(v).map(|c| c.to_vec()).collect();
    assert_traces_rel(
        "hooked prefill vs fixed prefill",
        &hooked_rows,
        &recomputed,
        CACHE_REL_TOL,
    );
    // and decoding after a hooked prefill continues the same sequence
    let mut s3 = session(&m);
    let mut hook = Replay(path.counts());
    let pre = s3
        .prefill(prompt, Route::Hook(&mut hook), Logits::Last)
        .unwrap();
    assert_close(
        "hooked last row",
        &pre.logits,
        &cached[prompt.len() - 1],
        TOL,
    );
    for (i, &t) in generated.iter().enumerate() {
        let l = s3.decode(t).unwrap().to_vec();
        assert_close(
            &format!("decode after hooked prefill, step {i}"),
            &l,
            &cached[prompt.len() + i],
            TOL,
        );
    }
}

#[test]
fn cached_decoding_equals_recompute_tiny() {
    let dir = tempfile::tempdir().unwrap();
    for family in Family::ALL {
        let p = tiny(dir.path(), family, |_| {});
        let m = load(&p);
        let n = m.n_layer();
        // block 1 skipped, block 3 twice, and the last block skipped too
        let mut counts = vec![1usize; n];
        counts[1] = 0;
        counts[3] = 2;
        counts[n - 1] = 0;
        let path = LayerPath::from_counts(&counts).unwrap();
        let prompt = prompt_for(&p, 40);
        cached_equals_recompute(&p, &path, &prompt);
        // and with the last block repeated (the pruned final pass is its second pass)
        let mut counts = vec![1usize; n];
        counts[2] = 0;
        counts[n - 1] = 2;
        cached_equals_recompute(&p, &LayerPath::from_counts(&counts).unwrap(), &prompt);
    }
}

#[test]
fn cached_decoding_equals_recompute_smollm2() {
    let Some(p) = real_model(SMOLLM2) else { return };
    let n = 30;
    let path = LayerPath::parse("skip=5,6 repeat=12", n).unwrap();
    cached_equals_recompute(&p, &path, &real_prompt(&p));
}

/// A conversation continued from a snapshot: the next turn's logits equal the same session
/// continuing (bit for bit: the same K/V bytes), any other session restored from the snapshot,
/// and, within the cached-decoding tolerance, the whole conversation prefilled from scratch.
fn snapshot_continues_the_sequence(p: &Path, path: &LayerPath, prompt: &[i32]) {
    let m = load(p);
    let v = m.n_vocab();
    let mut a = session(&m);
    a.prefill(prompt, Route::Fixed(path), Logits::Last).unwrap();
    let mut seq = prompt.to_vec();
    for _ in 0..6 {
        let t = argmax(a.last_logits()) as i32;
        a.decode(t).unwrap();
        seq.push(t);
    }
    let snap = a.snapshot().unwrap();
    assert_eq!(snap.n_tokens(), seq.len());
    assert_eq!(snap.path(), path);
    assert_eq!(
        snap.bytes(),
        seq.len() * path.len() * (m.config().n_embd_k_gqa() + m.config().n_embd_v_gqa()) * 2,
        "F16 K and V rows of every pass"
    );
    // the next turn shares all but the last 3 tokens of the sequence, then says more
    let keep = seq.len() - 3;
    let mut turn = seq[..keep].to_vec();
    turn.extend_from_slice(&prompt[..12]);
    // the same session cut back
    a.truncate(keep).unwrap();
    let (same, _) = a.append(&turn[keep..], Logits::All).unwrap();
    // another session, restored
    let mut b = session(&m);
    b.restore(&snap, keep).unwrap();
    assert_eq!((b.n_past(), b.path()), (keep, Some(path)));
    let (restored, _) = b.append(&turn[keep..], Logits::All).unwrap();
    assert_eq!(same, restored, "restored session differs from the original");
    // decoding goes on identically
    let t = argmax(&restored[restored.len() - v..]) as i32;
    assert_eq!(a.decode(t).unwrap().to_vec(), b.decode(t).unwrap().to_vec());
    // the whole turn prefilled in one go
    let mut c = session(&m);
    let full = c.prefill(&turn, Route::Fixed(path), Logits::All).unwrap();
    let tail: Vec<Vec<f32>> = full.logits[keep * v..]
        .chunks(v)
        .map(<[f32]>::to_vec)
        .collect();
    let rows: Vec<Vec<f32>> = restored.chunks(v).map(<[f32]>::to_vec).collect();
    assert_traces_rel(
        &format!("{} path {path}: restored vs prefilled", p.display()),
        &rows,
        &tail,
        APPEND_REL_TOL,
    );
    // bad restores are refused
    let mut d = session(&m);
    assert!(d.restore(&snap, 0).is_err());
    assert!(d.restore(&snap, seq.len() + 1).is_err());
    let other = tiny(p.parent().unwrap(), Family::Qwen3, |s| {
        s.n_layer = m.n_layer() as u32 + 1
    });
    let mut e = session(&load(&other));
    assert!(
        e.restore(&snap, keep).is_err(),
        "a snapshot of another model"
    );
}

#[test]
fn snapshot_and_restore_continue_a_conversation() {
    let dir = tempfile::tempdir().unwrap();
    for family in Family::ALL {
        let p = tiny(dir.path(), family, |_| {});
        let m = load(&p);
        let n = m.n_layer();
        let prompt = prompt_for(&p, 40);
        snapshot_continues_the_sequence(&p, &LayerPath::full(n), &prompt);
        let mut counts = vec![1usize; n];
        counts[1] = 0;
        counts[3] = 2;
        snapshot_continues_the_sequence(&p, &LayerPath::from_counts(&counts).unwrap(), &prompt);
    }
}

/// `src` rewritten with another data alignment and/or one more tensor.
fn rewritten(src: &Path, dst: &Path, alignment: u64, extra: Option<&str>) {
    let f = drllm_gguf::GgufFile::open(src).unwrap();
    let mut w = drllm_gguf::GgufWriter::from_file(&f, src);
    w.set_alignment(alignment);
    if let Some(name) = extra {
        w.add_tensor(
            name,
            GgmlType::F32,
            &[64],
            drllm_gguf::TensorSource::Bytes(vec![0u8; 256]),
        )
        .unwrap();
    }
    w.write_to_path(dst).unwrap();
}

#[test]
fn every_tensor_is_used_and_any_alignment_loads() {
    let dir = tempfile::tempdir().unwrap();
    let p = tiny(dir.path(), Family::Llama, |s| {
        s.weight_type = GgmlType::Q8_0
    });
    let m = load(&p);
    let prompt = prompt_for(&p, 40);
    let full = LayerPath::full(m.n_layer());
    let reference = engine_trace(&m, &full, &prompt, 4);
    // a tensor the llama graph does not use: refused by name (llama.cpp refuses it too)
    let extra = dir.path().join("extra.gguf");
    rewritten(&p, &extra, 32, Some("blk.0.attn_q_scale.weight"));
    let e = drllm_engine::Model::load(&extra, drllm_engine::DeviceChoice::Cpu)
        .err()
        .expect("a file with an unused tensor loaded");
    assert!(
        matches!(&e, EngineError::UnusedTensors { names, .. } if names == &["blk.0.attn_q_scale.weight"]),
        "{e}"
    );
    assert!(e.to_string().contains("blk.0.attn_q_scale.weight"), "{e}");
    assert!(
        drllm_engine::stock::StockModel::load(&extra, drllm_engine::DeviceChoice::Cpu).is_err(),
        "llama.cpp loads it"
    );
    // data aligned to 8 or 16 bytes: copied out of the mapping, same logits as the file
    // aligned to 32, and as llama.cpp on the same file
    for a in [8u64, 16] {
        let q = dir.path().join(format!("align{a}.gguf"));
        rewritten(&p, &q, a, None);
        let g = drllm_gguf::GgufFile::open(&q).unwrap();
        assert_eq!(g.alignment, a);
        assert!(
            g.tensors
                .iter()
                .any(|t| !(g.data_offset + t.offset).is_multiple_of(32)),
            "alignment {a}: every tensor happens to be 32-aligned"
        );
        let mq = load(&q);
        let got = engine_trace(&mq, &full, &prompt, 4);
        assert_traces(&format!("alignment {a}"), &got, &reference, 0.0);
        let s = stock_trace(&q, &prompt, 4);
        assert_traces(&format!("alignment {a} vs llama.cpp"), &got, &s, TOL);
    }
}

#[test]
fn a_session_holds_the_kv_slots_of_its_path_only() {
    let dir = tempfile::tempdir().unwrap();
    let p = tiny(dir.path(), Family::Llama, |_| {});
    let m = load(&p);
    let n = m.n_layer();
    let prompt = prompt_for(&p, 40);
    let mut s = session(&m);
    let slot = s.kv_bytes() / n;
    assert_eq!(
        s.kv_bytes(),
        slot * n,
        "a new session holds the full-depth slots"
    );
    let mut counts = vec![1usize; n];
    counts[1] = 0;
    counts[2] = 0;
    counts[3] = 2;
    let routed = LayerPath::from_counts(&counts).unwrap();
    let full = LayerPath::full(n);
    let reference = |path: &LayerPath| engine_trace(&m, path, &prompt, 3);
    let run = |s: &mut drllm_engine::Session, path: &LayerPath| {
        let pre = s
            .prefill(&prompt, Route::Fixed(path), Logits::Last)
            .unwrap();
        let mut rows = vec![pre.logits];
        for _ in 0..3 {
            let t = argmax(rows.last().unwrap()) as i32;
            rows.push(s.decode(t).unwrap().to_vec());
        }
        rows
    };
    // skipped blocks have no slot, a repeated one two; results as on a fresh session
    let got = run(&mut s, &routed);
    assert_eq!(s.kv_bytes(), slot * routed.len());
    assert_traces(
        "routed after full",
        &got[1..],
        &reference(&routed)[prompt.len()..],
        0.0,
    );
    // back to full depth: the extra pass released, the skipped blocks' slots back
    let got = run(&mut s, &full);
    assert_eq!(s.kv_bytes(), slot * n);
    assert_traces(
        "full after routed",
        &got[1..],
        &reference(&full)[prompt.len()..],
        0.0,
    );
    // a hook-driven prefill ends with the slots of the path it chose
    struct Replay(Vec<usize>);
    impl PrefillHook for Replay {
        fn passes(&mut self, block: usize, _: &mut Hidden<'_>) -> Result<usize, String> {
            Ok(self.0[block])
        }
    }
    let pre = s
        .prefill(
            &prompt,
            Route::Hook(&mut Replay(counts.clone())),
            Logits::Last,
        )
        .unwrap();
    assert_eq!(pre.path, routed);
    assert_eq!(s.kv_bytes(), slot * routed.len());
    let t = argmax(&pre.logits) as i32;
    assert_close(
        "decode after hooked prefill",
        s.decode(t).unwrap(),
        &reference(&routed)[prompt.len()],
        TOL,
    );
}

/// Prompts longer than one prefill graph: chunks of 16 tokens. Full depth equals llama.cpp
/// run with the same batch size; a routed path (skip, repeat) prefilled token-major in
/// chunks, layer-major through the hook in chunks, and decoded, equals one big prefill of the
/// same sequence.
#[test]
fn long_prompts_run_in_chunks_for_every_family() {
    const UB: usize = 16;
    // stock llama.cpp's own cached-vs-recompute gap in chunks of 16 on these files reaches
    // 1.1e-3 of the largest logit (qwen3; 3.3e-4 to 5.2e-4 for the others)
    const CHUNK_REL_TOL: f32 = 2e-3;
    let dir = tempfile::tempdir().unwrap();
    for family in Family::ALL {
        let p = tiny(dir.path(), family, |_| {});
        let m = load(&p);
        let n = m.n_layer();
        let prompt = prompt_for(&p, 60);
        assert!(prompt.len() > 3 * UB, "{} tokens", prompt.len());
        let what = family.arch_name();
        // parity at full depth, chunk for chunk with llama.cpp
        let full = LayerPath::full(n);
        let e = engine_trace_ub(&m, &full, &prompt, STEPS, UB);
        let st = stock_trace_ub(&p, &prompt, STEPS, UB);
        assert_traces(&format!("{what} n_ubatch {UB} vs llama.cpp"), &e, &st, TOL);
        // a routed path: chunked token-major == one graph
        let mut counts = vec![1usize; n];
        counts[1] = 0;
        counts[3] = 2;
        let path = LayerPath::from_counts(&counts).unwrap();
        let chunked = engine_trace_ub(&m, &path, &prompt, STEPS, UB);
        let whole = engine_trace(&m, &path, &prompt, STEPS);
        assert_traces_rel(
            &format!("{what} path {path}: chunks of {UB} vs one graph"),
            &chunked,
            &whole,
            CHUNK_REL_TOL,
        );
        // layer-major through the hook, in chunks
        let mut s = session_ub(&m, UB);
        let hooked = s
            .prefill(
                &prompt,
                Route::Hook(&mut Replay(counts.clone())),
                Logits::All,
            )
            .unwrap();
        assert_eq!(hooked.path, path);
        let rows: Vec<Vec<f32>> = hooked
            .logits
            .chunks(m.n_vocab())
            .map(<[f32]>::to_vec)
            .collect();
        assert_traces_rel(
            &format!("{what} hooked prefill in chunks of {UB}"),
            &rows,
            &chunked[..prompt.len()],
            CHUNK_REL_TOL,
        );
        // cached decoding (after the chunked prefill) == recomputing everything in chunks
        let generated: Vec<i32> = chunked[prompt.len() - 1..prompt.len() - 1 + STEPS]
            .iter()
            .map(|r| argmax(r) as i32)
            .collect();
        let mut all = prompt.clone();
        all.extend_from_slice(&generated);
        let mut s = session_ub(&m, UB);
        let re = s.prefill(&all, Route::Fixed(&path), Logits::All).unwrap();
        let re: Vec<Vec<f32>> = re.logits.chunks(m.n_vocab()).map(<[f32]>::to_vec).collect();
        assert_traces_rel(
            &format!("{what} cached vs recomputed in chunks of {UB}"),
            &chunked,
            &re,
            CHUNK_REL_TOL,
        );
    }
}

#[test]
fn empty_path_and_hook_limits() {
    let dir = tempfile::tempdir().unwrap();
    let p = tiny(dir.path(), Family::Llama, |_| {});
    let m = load(&p);
    let prompt = prompt_for(&p, 40);
    // a path that skips every block: embedding straight into the head, no KV inputs used
    let empty = LayerPath::from_counts(&vec![0; m.n_layer()]).unwrap();
    let rows = engine_trace(&m, &empty, &prompt, 3);
    assert!(rows.iter().all(|r| r.iter().all(|x| x.is_finite())));
    // a hook asking for too many passes gets a clear error
    struct Greedy;
    impl PrefillHook for Greedy {
        fn passes(&mut self, _: usize, _: &mut Hidden<'_>) -> Result<usize, String> {
            Ok(MAX_PASSES_PER_BLOCK + 1)
        }
    }
    let mut s = session(&m);
    let e = s
        .prefill(&prompt, Route::Hook(&mut Greedy), Logits::Last)
        .unwrap_err();
    assert!(matches!(e, EngineError::Hook(_)), "{e}");
    // window means on the device equal the host computation
    struct Pool(Vec<Vec<f32>>);
    impl PrefillHook for Pool {
        fn passes(&mut self, _: usize, h: &mut Hidden<'_>) -> Result<usize, String> {
            let d = h.n_embd();
            let t = h.n_tokens();
            let host = h.to_host();
            for w in [1usize, 3, 8.min(t)] {
                let dev = h.window_means(w).map_err(|e| e.to_string())?;
                let size = t / w;
                for wi in 0..w {
                    for j in 0..d {
                        let mean: f32 = (0..size)
                            .map(|k| host[(wi * size + k) * d + j])
                            .sum::<f32>()
                            / size as f32;
                        let got = dev[wi * d + j];
                        if (mean - got).abs() > 1e-4 * (1.0 + mean.abs()) {
                            return Err(format!("window {wi}/{w} dim {j}: {got} vs {mean}"));
                        }
                    }
                }
                self.0.push(dev);
            }
            Ok(1)
        }
    }
    let mut pool = Pool(Vec::new());
    let mut s = session(&m);
    s.prefill(&prompt[..37], Route::Hook(&mut pool), Logits::Last)
        .unwrap();
    assert_eq!(pool.0.len(), 3 * m.n_layer());
}

// ---------------------------------------------------------------------------------------------
// 4. Malformed model files: an error, no panic, no huge allocation

fn expect_load_error(p: &Path, what: &str) {
    let e = match drllm_engine::Model::load(p, drllm_engine::DeviceChoice::Cpu) {
        Ok(_) => panic!("{what}: a malformed file loaded"),
        Err(e) => e,
    };
    let msg = e.to_string();
    assert!(!msg.is_empty(), "{what}");
    assert!(Tokenizer::load(p).is_err(), "{what}: tokenizer accepted it");
    assert!(
        drllm_engine::stock::StockModel::load(p, drllm_engine::DeviceChoice::Cpu).is_err(),
        "{what}: stock loader accepted it"
    );
}

#[test]
fn malformed_model_files_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let good = tiny(dir.path(), Family::Llama, |_| {});
    let bytes = std::fs::read(&good).unwrap();
    let write = |name: &str, b: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, b).unwrap();
        p
    };
    // truncated at several places: header, metadata, tensor table, data
    for cut in [
        0usize,
        3,
        10,
        24,
        200,
        5000,
        bytes.len() / 2,
        bytes.len() - 1,
    ] {
        let p = write("truncated.gguf", &bytes[..cut]);
        expect_load_error(&p, &format!("truncated at {cut}"));
    }
    // bad magic
    let mut b = bytes.clone();
    b[..4].copy_from_slice(b"GGUX");
    expect_load_error(&write("magic.gguf", &b), "bad magic");
    // absurd tensor count (u64 at offset 8) and kv count (offset 16)
    for off in [8usize, 16] {
        let mut b = bytes.clone();
        b[off..off + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        expect_load_error(&write("count.gguf", &b), &format!("absurd count at {off}"));
        let mut b = bytes.clone();
        b[off..off + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        expect_load_error(&write("count2.gguf", &b), &format!("huge count at {off}"));
    }
    // a tensor whose offset points past the end of the file
    let f = drllm_gguf::GgufFile::parse(&bytes).unwrap();
    let last = f.tensors.last().unwrap().clone();
    let needle = last.name.as_bytes();
    let pos = bytes
        .windows(needle.len())
        .rposition(|w| w == needle)
        .expect("name in table");
    // name, n_dims (u32), dims (u64 each), type (u32), offset (u64)
    let off_pos = pos + needle.len() + 4 + 8 * last.dims.len() + 4;
    let mut b = bytes.clone();
    b[off_pos..off_pos + 8].copy_from_slice(&(bytes.len() as u64 * 4).to_le_bytes());
    expect_load_error(&write("offset.gguf", &b), "offset past the end");
    // not a supported architecture: clear error naming the supported ones
    let mut w = drllm_gguf::GgufWriter::from_file(&f, &good);
    w.set("general.architecture", drllm_gguf::Value::string("mamba"));
    let p = dir.path().join("arch.gguf");
    w.write_to_path(&p).unwrap();
    let e = drllm_engine::Model::load(&p, drllm_engine::DeviceChoice::Cpu)
        .err()
        .expect("unsupported architecture");
    let msg = e.to_string();
    assert!(
        msg.contains("mamba") && msg.contains("qwen3") && msg.contains("gemma3"),
        "{msg}"
    );
    // a missing file
    let e = drllm_engine::Model::load(
        dir.path().join("nope.gguf"),
        drllm_engine::DeviceChoice::Cpu,
    )
    .err()
    .expect("missing file");
    assert!(matches!(e, EngineError::Io { .. }), "{e}");
}

/// Files of a supported architecture using something drllm does not implement are refused
/// with the key that says so; nothing loads silently different.
#[test]
fn unsupported_variants_of_a_family_are_refused_by_key() {
    use drllm_gguf::{GgufFile, GgufWriter, Value, ValueType};
    let dir = tempfile::tempdir().unwrap();
    let edit = |family: Family, name: &str, f: &dyn Fn(&mut GgufWriter)| {
        let src = tiny(dir.path(), family, |_| {});
        let g = GgufFile::open(&src).unwrap();
        let mut w = GgufWriter::from_file(&g, &src);
        f(&mut w);
        let p = dir.path().join(name);
        w.write_to_path(&p).unwrap();
        drllm_engine::Model::load(&p, drllm_engine::DeviceChoice::Cpu)
            .err()
            .unwrap_or_else(|| panic!("{name} loaded"))
    };
    // experts in a family whose FFN drllm runs dense (Mixtral-style llama)
    let e = edit(Family::Llama, "llama-moe.gguf", &|w| {
        w.set("llama.expert_count", Value::U32(8));
        w.set("llama.expert_used_count", Value::U32(2));
    });
    assert!(
        matches!(&e, EngineError::BadMetadata { key, .. } if key == "llama.expert_count"),
        "{e}"
    );
    assert!(e.to_string().contains("mixture-of-experts"), "{e}");
    // a qwen3moe file without experts, or using more than it has
    let e = edit(Family::Qwen3Moe, "moe-0.gguf", &|w| {
        w.set("qwen3moe.expert_count", Value::U32(0));
    });
    assert!(e.to_string().contains("qwen3moe.expert_count"), "{e}");
    let e = edit(Family::Qwen3Moe, "moe-used.gguf", &|w| {
        w.set("qwen3moe.expert_used_count", Value::U32(5));
    });
    assert!(e.to_string().contains("qwen3moe.expert_used_count"), "{e}");
    // granite: the logit scale is required, vision deepstack inputs are refused
    let e = edit(Family::Granite, "granite-nologit.gguf", &|w| {
        w.remove("granite.logit_scale");
    });
    assert!(
        matches!(&e, EngineError::MissingMetadata { key } if key == "granite.logit_scale"),
        "{e}"
    );
    let e = edit(Family::Granite, "granite-deepstack.gguf", &|w| {
        w.set(
            "granite.deepstack_mapping",
            Value::array(
                ValueType::I32,
                [-1, 0, -1, -1, -1, -1].map(Value::I32).to_vec(),
            ),
        );
    });
    assert!(e.to_string().contains("deepstack"), "{e}");
}

#[test]
fn bad_requests_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = tiny(dir.path(), Family::Qwen2, |_| {});
    let m = load(&p);
    let mut s = session(&m);
    let full = LayerPath::full(m.n_layer());
    // token outside the vocabulary
    let e = s
        .prefill(&[1, 99_999], Route::Fixed(&full), Logits::Last)
        .unwrap_err();
    assert!(
        matches!(e, EngineError::InvalidToken { token: 99_999, .. }),
        "{e}"
    );
    let e = s
        .prefill(&[-1], Route::Fixed(&full), Logits::Last)
        .unwrap_err();
    assert!(matches!(e, EngineError::InvalidToken { .. }), "{e}");
    // longer than the context
    let long = vec![5i32; 600];
    let e = s
        .prefill(&long, Route::Fixed(&full), Logits::Last)
        .unwrap_err();
    assert!(
        matches!(
            e,
            EngineError::ContextFull {
                needed: 600,
                n_ctx: 512
            }
        ),
        "{e}"
    );
    // empty prompt, decode before prefill, wrong path size
    assert!(s.prefill(&[], Route::Fixed(&full), Logits::Last).is_err());
    assert!(s.decode(3).is_err());
    let other = LayerPath::full(m.n_layer() + 1);
    assert!(s
        .prefill(&[1, 2], Route::Fixed(&other), Logits::Last)
        .is_err());
    // the session still works afterwards
    let ok = s
        .prefill(&[1, 5, 6], Route::Fixed(&full), Logits::Last)
        .unwrap();
    assert_eq!(ok.rows, 1);
    // and fills the context up to the last cell, then refuses
    let mut s = session(&m);
    s.prefill(&vec![5i32; 510], Route::Fixed(&full), Logits::Last)
        .unwrap();
    s.decode(5).unwrap();
    s.decode(5).unwrap();
    assert!(matches!(s.decode(5), Err(EngineError::ContextFull { .. })));
}

// ---------------------------------------------------------------------------------------------
// 5. Resuming from a saved residual stream (what path search shares between rollouts)

#[test]
fn forward_from_saved_prefix_equals_plain_prefill() {
    let dir = tempfile::tempdir().unwrap();
    for family in Family::ALL {
        let p = tiny(dir.path(), family, |_| {});
        let m = load(&p);
        let n = m.n_layer();
        let prompt = prompt_for(&p, 40);
        let full = LayerPath::full(n);
        let mut s = session(&m);
        // run the full path once, saving the state after every pass
        let (l_full, saved) = s.forward_from(&prompt, &full, None, |_| true).unwrap();
        assert_eq!(saved.len(), n - 1);
        let reference = engine_trace(&m, &full, &prompt, 0);
        assert_eq!(&l_full, reference.last().unwrap());
        // another path in between overwrites the KV slots the saved passes wrote
        let mut other_counts = vec![1; n];
        other_counts[0] = 0;
        let scrambler = LayerPath::from_counts(&other_counts).unwrap();
        s.forward_from(&prompt, &scrambler, None, |_| false)
            .unwrap();
        // a path sharing the first 3 passes (skip block 3, repeat block 4) resumed after 3
        let mut counts = vec![1; n];
        counts[3] = 0;
        counts[4] = 2;
        let other = LayerPath::from_counts(&counts).unwrap();
        let states: Vec<&drllm_engine::PassState> = saved[..3].iter().map(|(_, st)| st).collect();
        assert_eq!(saved[2].0, 3);
        let (resumed, _) = s
            .forward_from(&prompt, &other, Some(&states), |_| false)
            .unwrap();
        // the plain prefill's last row, computed as forward_from computes it (the last block
        // on the last token only): qwen3's logits of an unpruned last block differ in the
        // last bits (1e-6 at logits of 3)
        let mut plain = session(&m);
        let plain = plain
            .prefill(&prompt, Route::Fixed(&other), Logits::Last)
            .unwrap();
        assert_eq!(resumed, plain.logits, "{family:?}");
        // the sequence goes on exactly as a plain prefill's (the KV of the resumed passes was
        // restored, not left from the path in between)
        let t = argmax(&resumed) as i32;
        let mut s2 = session(&m);
        s2.prefill(&prompt, Route::Fixed(&other), Logits::Last)
            .unwrap();
        assert_eq!(
            s.decode(t).unwrap(),
            s2.decode(t).unwrap(),
            "{family:?} decode"
        );
        let extra = &prompt[1..6];
        s.truncate(prompt.len()).unwrap();
        s2.truncate(prompt.len()).unwrap();
        assert_eq!(
            s.append(extra, Logits::All).unwrap(),
            s2.append(extra, Logits::All).unwrap()
        );
        // states that do not fit are errors
        let mut bad = saved[0].1.clone();
        bad.residual.pop();
        assert!(s
            .forward_from(&prompt, &other, Some(&[&bad]), |_| false)
            .is_err());
        assert!(s
            .forward_from(&prompt[1..], &other, Some(&states), |_| false)
            .is_err());
    }
}

#[test]
fn one_session_many_paths_equals_fresh_sessions() {
    // paths of the same length but another structure (a repeat elsewhere) once made ggml's
    // allocator reuse a stale plan; each prefill must equal a fresh session's
    let dir = tempfile::tempdir().unwrap();
    for family in Family::ALL {
        let p = tiny(dir.path(), family, |_| {});
        let m = load(&p);
        let n = m.n_layer();
        let prompt = prompt_for(&p, 40);
        let last = n - 1;
        let specs = [
            "repeat=0".to_string(),
            format!("repeat={last}"),
            "full".into(),
            "skip=2".into(),
            "repeat=1".into(),
            format!("skip=0 repeat={last}"),
            "repeat=0,1".into(),
        ];
        // fixed paths back to back in one session, then hooked ones in another
        let mut shared = session(&m);
        let mut shared_hooked = session(&m);
        for spec in &specs {
            let path = LayerPath::parse(spec, n).unwrap();
            let a = shared
                .prefill(&prompt, Route::Fixed(&path), Logits::Last)
                .unwrap();
            let b = session(&m)
                .prefill(&prompt, Route::Fixed(&path), Logits::Last)
                .unwrap();
            assert_eq!(a.logits, b.logits, "{family:?} {spec}");
            let mut hook = Replay(path.counts());
            let c = shared_hooked
                .prefill(&prompt, Route::Hook(&mut hook), Logits::Last)
                .unwrap();
            assert_eq!(c.logits, b.logits, "{family:?} {spec} hooked");
        }
    }
}

/// Several sequences decoded in one graph (the daemon's batching of requests that share a
/// path) give each sequence the logits it gets decoded alone, for every family (gemma3: past
/// its sliding window), along a path with a skip and a repeat.
#[test]
fn batched_decode_matches_each_sequence_decoded_alone() {
    use drllm_engine::Session;
    // three columns take other matmul kernels than one (summation order): over 12 steps the
    // largest gap measured is 8.5e-4 of the largest logit (phi3; llama 8.3e-4) and 1.2e-3 for
    // olmo2, whose residual stream has no norm in front of its blocks; a wrong column or
    // K/V slot differs by the logits' own size
    const BATCH_REL_TOL: f32 = 2e-3;
    let dir = tempfile::tempdir().unwrap();
    for family in Family::ALL {
        let p = tiny(dir.path(), family, |_| {});
        let m = load(&p);
        let n_layer = m.n_layer();
        let path = LayerPath::parse("skip=1 repeat=2", n_layer).unwrap();
        let tok = Tokenizer::load(&p).unwrap();
        // prompts of different lengths: the sequences sit at different positions
        let prompts: Vec<Vec<i32>> = [3usize, 11, 6]
            .iter()
            .enumerate()
            .map(|(i, &w)| tok.tokenize(&prompt_text(w, i as u64), true, false))
            .collect();
        let mut batched: Vec<Session> = prompts.iter().map(|_| session(&m)).collect();
        let mut alone: Vec<Session> = prompts.iter().map(|_| session(&m)).collect();
        let mut next = Vec::new();
        for ((b, a), pr) in batched.iter_mut().zip(alone.iter_mut()).zip(&prompts) {
            let lb = b.prefill(pr, Route::Fixed(&path), Logits::Last).unwrap();
            a.prefill(pr, Route::Fixed(&path), Logits::Last).unwrap();
            next.push(argmax(&lb.logits) as i32);
        }
        for step in 0..12 {
            let mut refs: Vec<&mut Session> = batched.iter_mut().collect();
            let got = Session::decode_batch(&mut refs, &next).unwrap();
            for (i, a) in alone.iter_mut().enumerate() {
                let want = a.decode(next[i]).unwrap().to_vec();
                assert_traces_rel(
                    &format!("{family:?} sequence {i} step {step}"),
                    &got[i..=i],
                    &[want],
                    BATCH_REL_TOL,
                );
                assert_eq!(batched[i].n_past(), a.n_past());
            }
            next = got.iter().map(|l| argmax(l) as i32).collect();
        }
        // sessions on other paths cannot share a graph
        let mut other = session(&m);
        other
            .prefill(
                &prompts[0],
                Route::Fixed(&LayerPath::full(n_layer)),
                Logits::Last,
            )
            .unwrap();
        let mut refs: Vec<&mut Session> = vec![&mut batched[0], &mut other];
        assert!(matches!(
            Session::decode_batch(&mut refs, &[1, 1]),
            Err(EngineError::State(_))
        ));
    }
}
