//! Tokenizer and chat template from llama.cpp (a vocab-only load of the same GGUF file).

use crate::chat::{ChatError, ChatInput, ChatPrompt, ChatTemplates};
use crate::error::{EngineError, Result};
use crate::grammar::Triggers;
use crate::grammar::{self, Grammar, GrammarError};
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

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

/// llama.cpp's tokenizer for one model file, with its chat templates (loaded on first use).
pub struct Tokenizer {
    model: LlamaModel,
    path: PathBuf,
    /// Jinja source used instead of the file's chat template.
    template: Option<String>,
    chat: OnceLock<std::result::Result<ChatTemplates, ChatError>>,
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
        Ok(Tokenizer {
            model,
            path: path.to_path_buf(),
            template: None,
            chat: OnceLock::new(),
        })
    }

    /// Uses this Jinja chat template instead of the file's (llama-server's
    /// `--chat-template-file`). It is checked by loading it now.
    pub fn with_chat_template(mut self, template: String) -> Result<Self> {
        self.template = Some(template);
        self.chat = OnceLock::new();
        self.chat()?;
        Ok(self)
    }

    /// The chat templates, as llama.cpp loads them (see [`ChatTemplates`]).
    pub fn chat(&self) -> Result<&ChatTemplates> {
        self.chat
            .get_or_init(|| ChatTemplates::open(&self.path, self.template.as_deref()))
            .as_ref()
            .map_err(|e| EngineError::Tokenizer(format!("chat template: {e}")))
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
        self.piece(token, false)
    }

    /// The bytes a token stands for; with `special`, control tokens render as their text.
    pub fn piece(&self, token: i32, special: bool) -> Vec<u8> {
        self.model
            .vocab()
            .token_to_piece(LlamaToken(token), special, None)
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

    /// The grammar of a chat's tool calls (None: the chat has none), lazy or strict as
    /// llama.cpp's chat layer made it; the error says why llama.cpp refused it.
    pub fn chat_grammar(
        &self,
        chat: &ChatPrompt,
    ) -> std::result::Result<Option<Grammar>, GrammarError> {
        if chat.grammar.is_empty() {
            return Ok(None);
        }
        let mut g = self.grammar(&chat.grammar)?;
        if chat.grammar_lazy {
            g.lazy = Some(Triggers {
                patterns: chat.trigger_patterns.clone(),
                tokens: chat.trigger_tokens.clone(),
            });
        } else {
            g.prefill = chat.grammar_prefill_tokens.clone();
        }
        // built once here so that a trigger llama.cpp refuses is reported now
        self.grammar_sampler(&g)
            .map_err(|e| GrammarError(format!("the tool-call grammar: {e}")))?;
        Ok(Some(g))
    }

    /// A fresh grammar sampler (one per generation: it tracks the text so far), lazy when
    /// the grammar is, and past its prefill tokens.
    pub(crate) fn grammar_sampler(&self, g: &Grammar) -> Result<LlamaSampler> {
        let mut s = match &g.lazy {
            None => LlamaSampler::grammar(&self.model, g.gbnf(), "root"),
            Some(t) => {
                let tokens: Vec<LlamaToken> = t.tokens.iter().map(|&t| LlamaToken(t)).collect();
                LlamaSampler::grammar_lazy_patterns(
                    &self.model,
                    g.gbnf(),
                    "root",
                    &t.patterns,
                    &tokens,
                )
            }
        }
        .map_err(|e| EngineError::State(format!("grammar: {e}")))?;
        for &t in &g.prefill {
            s.try_accept(LlamaToken(t)).map_err(|e| {
                EngineError::State(format!(
                    "grammar: it refuses the generation prompt's token {t}: {e}"
                ))
            })?;
        }
        Ok(s)
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

    /// True when the model file carries a chat template, or one was given.
    pub fn has_chat_template(&self) -> bool {
        self.template.is_some() || self.model.chat_template(None).is_ok()
    }

    /// Formats a conversation with the chat template as llama.cpp does by default (its Jinja
    /// engine, [`ChatTemplates::apply`]), ending with the assistant's turn opened when
    /// `add_assistant` is set.
    pub fn apply_chat(&self, messages: &[ChatMessage], add_assistant: bool) -> Result<String> {
        if !self.has_chat_template() {
            return Err(EngineError::Tokenizer(
                "the model has no chat template".into(),
            ));
        }
        let msgs: Vec<serde_json::Value> = messages
            .iter()
            .map(|m| serde_json::json!({"role": m.role, "content": m.content}))
            .collect();
        let msgs = serde_json::Value::Array(msgs);
        let mut input = ChatInput::messages(&msgs);
        input.add_generation_prompt = add_assistant;
        self.chat()?
            .apply(&input)
            .map(|p| p.prompt)
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
