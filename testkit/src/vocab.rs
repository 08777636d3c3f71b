//! The tiny SentencePiece-style vocabulary and deterministic prompts over it.

use crate::rng::Rng;

/// SentencePiece token type ids as stored in `tokenizer.ggml.token_type`
/// (llama.cpp's `llama_token_type`).
pub mod token_type {
    /// A normal piece.
    pub const NORMAL: i32 = 1;
    /// The unknown token.
    pub const UNKNOWN: i32 = 2;
    /// A control token (`<s>`, `</s>`, chat markers).
    pub const CONTROL: i32 = 3;
    /// A byte-fallback token `<0xNN>`.
    pub const BYTE: i32 = 6;
}

/// Whole words of the tiny vocabulary. Every word (with its leading `▁`) is a single
/// token, so a prompt of `n` words is `n` tokens (plus BOS).
pub const WORDS: &[&str] = &[
    "the", "a", "is", "of", "and", "cat", "dog", "sat", "on", "mat", "in", "it", "to", "was",
    "red", "big", "run", "sun", "can", "see", "we", "he", "she", "you", "fox", "box", "hat", "up",
];

/// Id of `<unk>`.
pub const UNK_ID: u32 = 0;
/// Id of `<s>` (BOS).
pub const BOS_ID: u32 = 1;
/// Id of `</s>` (EOS).
pub const EOS_ID: u32 = 2;
/// Id of the first byte token `<0x00>`.
pub const FIRST_BYTE_ID: u32 = 3;

/// The ChatML template written when `with_chat_template` is set.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// One vocabulary entry.
#[derive(Clone, Debug, PartialEq)]
pub struct VocabEntry {
    /// Token text (`▁` marks a leading space).
    pub text: String,
    /// SentencePiece score (higher merges first).
    pub score: f32,
    /// Token type, see [`token_type`].
    pub kind: i32,
}

/// Builds the vocabulary: `<unk>`, `<s>`, `</s>`, the 256 byte tokens, then normal pieces
/// (every `▁`-prefix of every word in [`WORDS`], `▁`, and the letters `a`..`z`) with
/// descending scores, then (optionally) `<|im_start|>` and `<|im_end|>`.
pub fn tiny_vocab(with_chat_tokens: bool) -> Vec<VocabEntry> {
    let mut v = vec![
        VocabEntry {
            text: "<unk>".into(),
            score: 0.0,
            kind: token_type::UNKNOWN,
        },
        VocabEntry {
            text: "<s>".into(),
            score: 0.0,
            kind: token_type::CONTROL,
        },
        VocabEntry {
            text: "</s>".into(),
            score: 0.0,
            kind: token_type::CONTROL,
        },
    ];
    for b in 0..=255u32 {
        v.push(VocabEntry {
            text: format!("<0x{b:02X}>"),
            score: 0.0,
            kind: token_type::BYTE,
        });
    }
    let mut pieces: Vec<String> = Vec::new();
    let push = |s: String, pieces: &mut Vec<String>| {
        if !pieces.contains(&s) {
            pieces.push(s);
        }
    };
    // whole words first (highest scores), then their shorter prefixes, then single chars
    for w in WORDS {
        push(format!("\u{2581}{w}"), &mut pieces);
    }
    for w in WORDS {
        let chars: Vec<char> = w.chars().collect();
        for n in (1..chars.len()).rev() {
            let prefix: String = chars[..n].iter().collect();
            push(format!("\u{2581}{prefix}"), &mut pieces);
        }
    }
    push("\u{2581}".into(), &mut pieces);
    for c in 'a'..='z' {
        push(c.to_string(), &mut pieces);
    }
    for (i, p) in pieces.into_iter().enumerate() {
        v.push(VocabEntry {
            text: p,
            score: -1.0 - i as f32 * 0.1,
            kind: token_type::NORMAL,
        });
    }
    if with_chat_tokens {
        v.push(VocabEntry {
            text: "<|im_start|>".into(),
            score: 0.0,
            kind: token_type::CONTROL,
        });
        v.push(VocabEntry {
            text: "<|im_end|>".into(),
            score: 0.0,
            kind: token_type::CONTROL,
        });
    }
    v
}

/// A deterministic pseudo-sentence of `n_words` words from [`WORDS`], separated by single
/// spaces (no punctuation). With the tiny vocabulary each word is exactly one token.
pub fn prompt_text(n_words: usize, seed: u64) -> String {
    let mut rng = Rng::new(seed ^ 0x005e_ed0f_7e57);
    let mut out = String::new();
    for i in 0..n_words {
        if i > 0 {
            out.push(' ');
        }
        let w = WORDS[rng.below(WORDS.len())];
        out.push_str(w);
    }
    out
}
