//! Judging an answer along a path, once the question is prefilled.
//!
//! Multiple choice can be scored two ways: by the option letters' logits at the last position
//! of a prompt that lists the options (one forward pass; the method's suggestion), or by the
//! mean log-probability of each answer text continuing the bare question (how llama.cpp's
//! multiple-choice scoring works, and the only one of the two that is far from chance for
//! models of 135M-270M parameters). Numeric answers are generated greedily and their final
//! number compared.

use crate::tasks::{extract_final_number, numbers_equal, Example, McScorer, TaskKind};
use drllm_engine::{argmax, EngineError, Logits, Session, Tokenizer};

/// How multiple-choice answers are scored.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
pub enum Scoring {
    /// Mean log-probability of each answer text after the bare question (as llama.cpp and
    /// lm-eval score multiple choice).
    #[default]
    Continuation,
    /// Option letters' logits after a prompt listing the options.
    Letters,
}

impl Scoring {
    /// The prompt an example is asked with under this scoring.
    pub fn prompt(self, ex: &Example) -> &str {
        match (self, ex.kind) {
            (Scoring::Continuation, TaskKind::MultipleChoice) if !ex.texts.is_empty() => {
                &ex.cont_prompt
            }
            _ => &ex.prompt,
        }
    }
}

/// Greedy continuation of a prefilled prompt (whose last logits are `logits`) until an end of
/// generation, a blank line, the next "Question:", the context end or `max_tokens`.
pub fn greedy_answer(
    session: &mut Session,
    tokenizer: &Tokenizer,
    logits: &[f32],
    max_tokens: usize,
) -> Result<String, EngineError> {
    let mut out = Vec::new();
    let mut next = argmax(logits);
    let n_ctx = session.options().n_ctx;
    for _ in 0..max_tokens {
        if tokenizer.is_eog(next) || session.n_past() >= n_ctx {
            break;
        }
        out.push(next);
        let text = tokenizer.detokenize(&out);
        if text.contains("\n\n") || text.contains("Question:") {
            break;
        }
        next = argmax(session.decode(next)?);
    }
    Ok(tokenizer.detokenize(&out))
}

fn log_softmax_at(row: &[f32], token: i32) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    row.get(token as usize)
        .map_or(f64::NEG_INFINITY, |&x| x as f64 - max - sum.ln())
}

/// Tokens of `text` continuing `prompt` (whose tokens are `prompt_tokens`): the tail of the
/// joint tokenization when it extends the prompt's, else the text tokenized alone.
pub fn continuation_tokens(
    tokenizer: &Tokenizer,
    prompt: &str,
    prompt_tokens: &[i32],
    text: &str,
) -> Vec<i32> {
    let joint = tokenizer.tokenize(&format!("{prompt} {text}"), true, false);
    if joint.len() > prompt_tokens.len() && joint.starts_with(prompt_tokens) {
        joint[prompt_tokens.len()..].to_vec()
    } else {
        tokenizer.tokenize(&format!(" {text}"), false, false)
    }
}

/// After a prefill of `prompt_tokens` whose last logits are `last`, the mean log-probability of
/// each answer text continuing the prompt, along the session's path. The session is left at the
/// prompt.
pub fn option_scores(
    session: &mut Session,
    tokenizer: &Tokenizer,
    prompt: &str,
    prompt_tokens: &[i32],
    last: &[f32],
    texts: &[String],
) -> Result<Vec<f64>, EngineError> {
    let t = prompt_tokens.len();
    let v = last.len();
    let mut out = Vec::with_capacity(texts.len());
    for text in texts {
        let cont = continuation_tokens(tokenizer, prompt, prompt_tokens, text);
        if cont.is_empty() {
            out.push(f64::NEG_INFINITY);
            continue;
        }
        let mut lp = log_softmax_at(last, cont[0]);
        if cont.len() > 1 {
            let (rows, n) = session.append(&cont[..cont.len() - 1], Logits::All)?;
            for (i, &tok) in cont[1..].iter().enumerate().take(n) {
                lp += log_softmax_at(&rows[i * v..(i + 1) * v], tok);
            }
            session.truncate(t)?;
        }
        out.push(lp / cont.len() as f64);
    }
    Ok(out)
}

/// What judging one question along one path gave.
#[derive(Clone, Debug, PartialEq)]
pub struct Judgement {
    /// The answer is right.
    pub correct: bool,
    /// The gold answer's score minus the best other option's (numeric: 1 or -1).
    pub margin: f64,
    /// The option chosen (multiple choice), None for numeric answers.
    pub choice: Option<usize>,
    /// Each option's score (multiple choice: mean log-probability of its text, or its letter's
    /// logit); empty for numeric answers.
    pub scores: Vec<f64>,
}

/// Whether the answer along the session's path is right, and the gold answer's margin (its
/// score minus the best other option's; numeric: 1 or -1). The prompt (`Scoring::prompt`) must
/// just have been prefilled, with last logits `last`.
#[allow(clippy::too_many_arguments)]
pub fn judge(
    session: &mut Session,
    tokenizer: &Tokenizer,
    scorer: &McScorer,
    scoring: Scoring,
    ex: &Example,
    prompt_tokens: &[i32],
    last: &[f32],
    max_answer_tokens: usize,
) -> Result<(bool, f64), EngineError> {
    let j = judge_all(
        session,
        tokenizer,
        scorer,
        scoring,
        ex,
        prompt_tokens,
        last,
        max_answer_tokens,
    )?;
    Ok((j.correct, j.margin))
}

/// [`judge`], with the chosen option and every option's score.
#[allow(clippy::too_many_arguments)]
pub fn judge_all(
    session: &mut Session,
    tokenizer: &Tokenizer,
    scorer: &McScorer,
    scoring: Scoring,
    ex: &Example,
    prompt_tokens: &[i32],
    last: &[f32],
    max_answer_tokens: usize,
) -> Result<Judgement, EngineError> {
    let scores: Vec<f64> = match ex.kind {
        TaskKind::MultipleChoice if scoring == Scoring::Continuation && !ex.texts.is_empty() => {
            option_scores(
                session,
                tokenizer,
                scoring.prompt(ex),
                prompt_tokens,
                last,
                &ex.texts,
            )?
        }
        TaskKind::MultipleChoice => {
            if let Some(why) = scorer.unavailable_reason() {
                let need = if scoring == Scoring::Letters {
                    "--scoring letters"
                } else {
                    "it has no answer texts"
                };
                return Err(EngineError::State(format!(
                    "question {} needs scoring by option letters ({need}), which this \
                     tokenizer cannot do: {why}",
                    ex.id
                )));
            }
            scorer
                .label_logits(last, ex.choices.len())
                .into_iter()
                .map(f64::from)
                .collect()
        }
        TaskKind::Numeric => {
            let text = greedy_answer(session, tokenizer, last, max_answer_tokens)?;
            let ok = extract_final_number(&text).is_some_and(|n| numbers_equal(&n, &ex.answer));
            return Ok(Judgement {
                correct: ok,
                margin: if ok { 1.0 } else { -1.0 },
                choice: None,
                scores: Vec::new(),
            });
        }
    };
    let (choice, margin) = choice_and_margin(&scores, ex.gold);
    Ok(Judgement {
        correct: choice == ex.gold,
        margin,
        choice: Some(choice),
        scores,
    })
}

/// The best option (the first of equals) and the gold option's margin over the best other.
pub fn choice_and_margin(scores: &[f64], gold: usize) -> (usize, f64) {
    let mut best = 0;
    for (i, s) in scores.iter().enumerate() {
        if *s > scores[best] {
            best = i;
        }
    }
    let g = scores.get(gold).copied().unwrap_or(f64::NEG_INFINITY);
    let other = scores
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != gold)
        .map(|(_, s)| *s)
        .fold(f64::NEG_INFINITY, f64::max);
    (best, g - other)
}

/// The answer distribution of option scores: their softmax (uniform when no score is finite).
pub fn softmax(s: &[f64]) -> Vec<f64> {
    let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !m.is_finite() {
        return vec![1.0 / s.len().max(1) as f64; s.len()];
    }
    let e: Vec<f64> = s.iter().map(|&x| (x - m).exp()).collect();
    let z: f64 = e.iter().sum();
    e.into_iter().map(|x| x / z).collect()
}

/// KL(p || q) of the softmax distributions of two option-score vectors (nats): how far the
/// answer distribution along one path (`q`) is from another's (`p`, e.g. the full path's).
pub fn kl_divergence(p_scores: &[f64], q_scores: &[f64]) -> f64 {
    let (p, q) = (softmax(p_scores), softmax(q_scores));
    p.iter()
        .zip(&q)
        .filter(|(pi, _)| **pi > 0.0)
        .map(|(pi, qi)| pi * (pi / qi.max(1e-300)).ln())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choice_margin_and_kl_by_hand() {
        assert_eq!(choice_and_margin(&[-1.0, -0.5, -2.0], 1), (1, 0.5));
        assert_eq!(choice_and_margin(&[-1.0, -0.5, -2.0], 0), (1, -0.5));
        // equal scores: the first wins, the margin is 0
        assert_eq!(choice_and_margin(&[-1.0, -1.0], 1), (0, 0.0));
        assert_eq!(kl_divergence(&[0.1, 0.2], &[0.1, 0.2]), 0.0);
        // p = softmax(0, ln 3) = (1/4, 3/4), q = (1/2, 1/2):
        // KL = 1/4 ln(1/2) + 3/4 ln(3/2)
        let kl = kl_divergence(&[0.0, 3f64.ln()], &[5.0, 5.0]);
        let want = 0.25 * 0.5f64.ln() + 0.75 * 1.5f64.ln();
        assert!((kl - want).abs() < 1e-12, "{kl} vs {want}");
        assert!(kl_divergence(&[0.0, 9.0], &[9.0, 0.0]) > 8.0);
    }
}
