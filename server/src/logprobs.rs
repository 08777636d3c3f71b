//! Log-probabilities in OpenAI's two shapes: chat's `{"content": [{token, logprob, bytes,
//! top_logprobs}]}` and completions' `{tokens, token_logprobs, top_logprobs, text_offset}`.
//! The values are the engine's [`TokenLogprob`]s: the model's own distribution (log-softmax of
//! the raw logits, before any sampler), as llama-server reports by default.

use drllm_engine::{TokenLogprob, Tokenizer};
use serde_json::{json, Map, Value};

/// OpenAI's floor for a log-probability (JSON has no infinity).
const FLOOR: f32 = -9999.0;

fn lp(x: f32) -> f32 {
    if x.is_nan() {
        FLOOR
    } else {
        x.max(FLOOR)
    }
}

/// A token's text (invalid UTF-8 replaced) and bytes.
fn piece(tok: &Tokenizer, t: i32) -> (String, Vec<u8>) {
    let b = tok.token_bytes(t);
    (String::from_utf8_lossy(&b).into_owned(), b)
}

/// Chat's `logprobs` object for these tokens.
pub fn chat(tok: &Tokenizer, lps: &[TokenLogprob]) -> Value {
    let content: Vec<Value> = lps
        .iter()
        .map(|l| {
            let (text, bytes) = piece(tok, l.token);
            let top: Vec<Value> = l
                .top
                .iter()
                .map(|&(t, x)| {
                    let (text, bytes) = piece(tok, t);
                    json!({"token": text, "logprob": lp(x), "bytes": bytes})
                })
                .collect();
            json!({"token": text, "logprob": lp(l.logprob), "bytes": bytes, "top_logprobs": top})
        })
        .collect();
    json!({ "content": content })
}

/// Completions' `logprobs` object, built token by token; `offset` is the text offset
/// (characters of the returned text) of the next token, carried across stream chunks.
#[derive(Debug, Default)]
pub struct Completion {
    tokens: Vec<Value>,
    token_logprobs: Vec<Value>,
    top_logprobs: Vec<Value>,
    text_offset: Vec<Value>,
    offset: usize,
}

impl Completion {
    /// Starts at text offset `offset`.
    pub fn at(offset: usize) -> Self {
        Completion {
            offset,
            ..Default::default()
        }
    }

    /// A token without a log-probability (the prompt's first).
    pub fn push_first(&mut self, tok: &Tokenizer, t: i32) {
        let (text, _) = piece(tok, t);
        self.push_entry(text, Value::Null, Value::Null);
    }

    /// A token with its log-probability and alternatives.
    pub fn push(&mut self, tok: &Tokenizer, l: &TokenLogprob) {
        let (text, _) = piece(tok, l.token);
        let mut top = Map::new();
        for &(t, x) in &l.top {
            // OpenAI's map: the first of tokens with the same text keeps its place
            top.entry(piece(tok, t).0).or_insert(json!(lp(x)));
        }
        self.push_entry(text, json!(lp(l.logprob)), Value::Object(top));
    }

    fn push_entry(&mut self, text: String, logprob: Value, top: Value) {
        self.text_offset.push(json!(self.offset));
        self.offset += text.chars().count();
        self.tokens.push(json!(text));
        self.token_logprobs.push(logprob);
        self.top_logprobs.push(top);
    }

    /// The text offset after the tokens so far.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// The object, and a fresh builder continuing at the same offset.
    pub fn take(&mut self) -> Value {
        let c = std::mem::replace(self, Completion::at(self.offset));
        json!({
            "tokens": c.tokens,
            "token_logprobs": c.token_logprobs,
            "top_logprobs": c.top_logprobs,
            "text_offset": c.text_offset,
        })
    }
}
