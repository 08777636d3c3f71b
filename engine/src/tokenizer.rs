//! Tokenizer and chat template from llama.cpp (a vocab-only load of the same GGUF file).

use crate::error::{EngineError, Result};
use crate::grammar::{self, Grammar, GrammarError};
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use std::path::Path;

/// A chat message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// Text.
    pub content: String,
}

impl ChatMessage {
    /// A message.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// llama.cpp's tokenizer for one model file.
pub struct Tokenizer {
    model: LlamaModel,
}

impl Tokenizer {
    /// Loads the vocabulary of a GGUF model (the file is checked by drllm's reader first).
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        drllm_gguf::GgufFile::open(path).map_err(|e| match e {
            drllm_gguf::GgufError::Io(source) => EngineError::Io {
                path: path.to_path_buf(),
                source,
            },
            source => EngineError::Gguf {
                path: path.to_path_buf(),
                source,
            },
        })?;
        let backend = crate::backend()?;
        let params = LlamaModelParams::default().with_vocab_only(true);
        let model = LlamaModel::load_from_file(backend, path, &params)
            .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Tokenizer { model })
    }

    /// Token ids of `text`. `add_special` adds BOS/EOS as the model wants; `parse_special`
    /// turns texts like `<|im_start|>` into their control tokens.
    pub fn tokenize(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<i32> {
        self.model
            .vocab()
            .tokenize(text.as_bytes(), add_special, parse_special)
            .into_iter()
            .map(|t| t.0)
            .collect()
    }

    /// The bytes a token stands for (control tokens render as nothing).
    pub fn token_bytes(&self, token: i32) -> Vec<u8> {
        self.model
            .vocab()
            .token_to_piece(LlamaToken(token), false, None)
    }

    /// Compiles a GBNF grammar (root rule `root`) for this vocabulary; the error says why
    /// llama.cpp refused it.
    pub fn grammar(&self, gbnf: &str) -> std::result::Result<Grammar, GrammarError> {
        if gbnf.contains('\0') {
            return Err(GrammarError("the grammar contains a NUL character".into()));
        }
        let (compiled, logged) =
            grammar::capturing(|| LlamaSampler::grammar(&self.model, gbnf, "root"));
        match compiled {
            Ok(_) => Ok(Grammar::new(gbnf.to_string())),
            Err(_) => Err(grammar::explain(gbnf, &logged)),
        }
    }

    /// A fresh grammar sampler (one per generation: it tracks the text so far).
    pub(crate) fn grammar_sampler(&self, g: &Grammar) -> Result<LlamaSampler> {
        LlamaSampler::grammar(&self.model, g.gbnf(), "root")
            .map_err(|e| EngineError::State(format!("grammar: {e}")))
    }

    /// Text of a token sequence (lossy for invalid UTF-8).
    pub fn detokenize(&self, tokens: &[i32]) -> String {
        let mut bytes = Vec::new();
        for &t in tokens {
            bytes.extend(self.token_bytes(t));
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// End of generation (EOS, EOT, ...).
    pub fn is_eog(&self, token: i32) -> bool {
        self.model.vocab().is_eog(LlamaToken(token))
    }

    /// Vocabulary size.
    pub fn n_vocab(&self) -> usize {
        self.model.vocab().n_tokens().max(0) as usize
    }

    /// True when the model file carries a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.model.chat_template(None).is_ok()
    }

    /// Formats a conversation with the model's chat template, ending with the assistant's turn
    /// opened when `add_assistant` is set.
    pub fn apply_chat(&self, messages: &[ChatMessage], add_assistant: bool) -> Result<String> {
        let tmpl = self
            .model
            .chat_template(None)
            .map_err(|_| EngineError::Tokenizer("the model has no chat template".into()))?;
        let msgs = messages
            .iter()
            .map(|m| LlamaChatMessage::new(m.role.clone(), m.content.clone()))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| EngineError::Tokenizer(format!("bad chat message: {e}")))?;
        self.model
            .apply_chat_template(&tmpl, &msgs, add_assistant)
            .map_err(|e| EngineError::Tokenizer(format!("chat template: {e}")))
    }
}

/// Turns a stream of token bytes into UTF-8 text, holding back incomplete characters.
#[derive(Default, Debug)]
pub struct TextStream {
    pending: Vec<u8>,
}

impl TextStream {
    /// Adds bytes; returns the text that is complete so far.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        match std::str::from_utf8(&self.pending) {
            Ok(s) => {
                let out = s.to_string();
                self.pending.clear();
                out
            }
            Err(e) => {
                let valid = e.valid_up_to();
                // an invalid (not merely incomplete) sequence: emit it lossily
                if e.error_len().is_some() {
                    let out = String::from_utf8_lossy(&self.pending).into_owned();
                    self.pending.clear();
                    return out;
                }
                let out = String::from_utf8_lossy(&self.pending[..valid]).into_owned();
                self.pending.drain(..valid);
                out
            }
        }
    }

    /// Whatever is left at the end (lossy).
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::TextStream;

    #[test]
    fn text_stream_holds_back_partial_chars() {
        let mut s = TextStream::default();
        let e = "é".as_bytes();
        assert_eq!(s.push(b"a"), "a");
        assert_eq!(s.push(&e[..1]), "");
        assert_eq!(s.push(&e[1..]), "é");
        assert_eq!(s.push(&[0xff]), "\u{fffd}");
        assert_eq!(s.finish(), "");
    }
}
