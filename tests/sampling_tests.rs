//! The sampler chain against a computation by hand: llama.cpp's logit bias and penalties
//! (repeat, frequency, presence) over the prompt and the generated tokens, then greedy; a
//! banned token is never drawn; sampling at a temperature stays within the allowed tokens.

mod common;

use common::*;
use drllm_engine::{argmax, Logits, Route, Sampler, SamplingParams, Tokenizer};
use drllm_testkit::{prompt_text, Family};

/// llama.cpp's `llama_sampler_penalties_apply` and `llama_sampler_logit_bias_apply`, written
/// out: the bias added, then for every token seen in the last `last_n` tokens the repeat
/// penalty (divide a positive logit, multiply a negative one) and `count * freq + present`
/// subtracted.
fn by_hand(logits: &[f32], seen: &[i32], p: &SamplingParams) -> Vec<f32> {
    let mut l = logits.to_vec();
    for &(t, b) in &p.logit_bias {
        l[t as usize] += b;
    }
    let window = &seen[seen.len().saturating_sub(p.repeat_last_n as usize)..];
    let mut count = vec![0usize; l.len()];
    for &t in window {
        count[t as usize] += 1;
    }
    for (x, &c) in l.iter_mut().zip(&count) {
        if c == 0 {
            continue;
        }
        if *x <= 0.0 {
            *x *= p.repeat_penalty;
        } else {
            *x /= p.repeat_penalty;
        }
        *x -= c as f32 * p.frequency_penalty + p.presence_penalty;
    }
    l
}

#[test]
fn penalties_and_logit_bias_follow_llama_cpp_over_prompt_and_answer() {
    let dir = tempfile::tempdir().unwrap();
    let p = tiny(dir.path(), Family::Llama, |_| {});
    let m = load(&p);
    let tok = Tokenizer::load(&p).unwrap();
    let prompt = tok.tokenize(&prompt_text(40, 3), true, false);
    let n_vocab = m.n_vocab();
    let mut s = session(&m);
    let full = drllm_engine::LayerPath::full(m.n_layer());
    let pre = s
        .prefill(&prompt, Route::Fixed(&full), Logits::Last)
        .unwrap();
    let first = pre.logits[pre.logits.len() - n_vocab..].to_vec();
    // bias the plain model's second choice up and ban its first
    let plain = argmax(&first);
    let second = argmax(
        &first
            .iter()
            .enumerate()
            .map(|(i, &x)| if i as i32 == plain { f32::MIN } else { x })
            .collect::<Vec<_>>(),
    );
    let params = SamplingParams {
        repeat_penalty: 1.3,
        repeat_last_n: 16,
        frequency_penalty: 0.4,
        presence_penalty: 0.25,
        logit_bias: vec![(second, 0.5), (plain, f32::NEG_INFINITY)],
        ..SamplingParams::greedy()
    };
    let mut sampler = Sampler::new(&params, n_vocab);
    sampler.accept_prompt(&prompt);
    let mut seen = prompt.clone();
    let mut logits = first;
    let mut changed = 0;
    for step in 0..12 {
        let t = sampler.sample(&logits);
        let want = argmax(&by_hand(&logits, &seen, &params));
        assert_eq!(t, want, "step {step}");
        assert_ne!(t, plain, "step {step}: the banned token was drawn");
        changed += usize::from(t != argmax(&logits));
        seen.push(t);
        logits = s.decode(t).unwrap().to_vec();
    }
    // the penalties and the bias did change answers (else the test would show nothing)
    assert!(changed > 0);
    // no penalties, no bias: greedy is plain argmax
    let mut plain_sampler = Sampler::new(&SamplingParams::greedy(), n_vocab);
    plain_sampler.accept_prompt(&prompt);
    assert_eq!(plain_sampler.sample(&logits), argmax(&logits));
}

#[test]
fn a_banned_token_is_never_drawn_at_a_temperature() {
    let dir = tempfile::tempdir().unwrap();
    let p = tiny(dir.path(), Family::Qwen2, |_| {});
    let m = load(&p);
    let n_vocab = m.n_vocab();
    // flat logits: every token equally likely but the banned ones
    let logits = vec![0.0f32; n_vocab];
    let banned: Vec<(i32, f32)> = (0..n_vocab as i32 - 1)
        .map(|t| (t, f32::NEG_INFINITY))
        .collect();
    for seed in 0..20 {
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed,
            logit_bias: banned.clone(),
            ..Default::default()
        };
        let mut s = Sampler::new(&params, n_vocab);
        assert_eq!(s.sample(&logits), n_vocab as i32 - 1, "seed {seed}");
    }
    // without the bias the same draws spread over the vocabulary
    let drawn: std::collections::HashSet<i32> = (0..20)
        .map(|seed| {
            let params = SamplingParams {
                temperature: 1.0,
                top_k: 0,
                top_p: 1.0,
                min_p: 0.0,
                seed,
                ..Default::default()
            };
            Sampler::new(&params, n_vocab).sample(&logits)
        })
        .collect();
    assert!(drawn.len() > 5, "{drawn:?}");
}

#[test]
fn the_prompt_counts_for_the_penalties() {
    let n_vocab = 32;
    let mut logits = vec![0.0f32; n_vocab];
    logits[5] = 2.0;
    logits[7] = 1.9;
    logits[9] = 1.8;
    let params = SamplingParams {
        presence_penalty: 0.15,
        repeat_last_n: 8,
        ..SamplingParams::greedy()
    };
    // token 5 is in the prompt: penalised below 7
    let mut s = Sampler::new(&params, n_vocab);
    s.accept_prompt(&[1, 5, 2]);
    assert_eq!(s.sample(&logits), 7);
    assert_eq!(by_hand(&logits, &[1, 5, 2], &params)[5], 1.85);
    // 7 was drawn (once), so now 5 and 7 are both penalised: 1.85, 1.75, and 9's 1.8
    assert_eq!(by_hand(&logits, &[1, 5, 2, 7], &params)[7], 1.75);
    assert_eq!(s.sample(&logits), 5);
    let mut again = Sampler::new(&params, n_vocab);
    assert_eq!(again.sample(&logits), 5, "no prompt: no penalty");
}
