//! Chat through llama.cpp's own chat layer (`common/chat.h`, compiled in by `build.rs` from
//! `cpp/chat.cpp`): the GGUF's Jinja chat template renders OpenAI-shaped messages and tools
//! into a prompt, with the grammar (and its lazy triggers) that makes the model's tool calls
//! parseable, and llama.cpp's parser turns the generated text back into content, reasoning
//! and tool calls. drllm writes no per-model tool-call format of its own.

use serde::Deserialize;
use serde_json::Value;
use std::ffi::{c_char, CStr, CString};
use std::path::Path;
use std::ptr::NonNull;

#[repr(C)]
struct RawChat {
    _private: [u8; 0],
}

#[repr(C)]
struct RawParser {
    _private: [u8; 0],
}

extern "C" {
    fn drllm_chat_string_free(s: *mut c_char);
    fn drllm_chat_open(
        path: *const c_char,
        template_override: *const c_char,
        err: *mut *mut c_char,
    ) -> *mut RawChat;
    fn drllm_chat_caps(chat: *const RawChat, err: *mut *mut c_char) -> *mut c_char;
    fn drllm_chat_free(chat: *mut RawChat);
    fn drllm_chat_template_source(
        chat: *const RawChat,
        variant: *const c_char,
        err: *mut *mut c_char,
    ) -> *mut c_char;
    fn drllm_chat_apply(
        chat: *const RawChat,
        request: *const c_char,
        err: *mut *mut c_char,
    ) -> *mut c_char;
    fn drllm_chat_parser_new(
        format: i32,
        generation_prompt: *const c_char,
        parser: *const c_char,
        parse_tool_calls: bool,
        err: *mut *mut c_char,
    ) -> *mut RawParser;
    fn drllm_chat_parser_free(p: *mut RawParser);
    fn drllm_chat_parser_feed(
        p: *mut RawParser,
        text: *const c_char,
        partial: bool,
        err: *mut *mut c_char,
    ) -> *mut c_char;
}

/// Why llama.cpp's chat layer refused something (its own message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatError(pub String);

impl std::fmt::Display for ChatError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ChatError {}

fn cstring(s: &str, what: &str) -> Result<CString, ChatError> {
    CString::new(s).map_err(|_| ChatError(format!("{what} contains a NUL character")))
}

/// Takes a string the shim allocated (or its error), freeing it.
fn take(out: *mut c_char, err: *mut c_char) -> Result<String, ChatError> {
    // SAFETY: the shim returns NUL-terminated strings from malloc, or null.
    unsafe {
        let read = |p: *mut c_char| {
            let s = CStr::from_ptr(p).to_string_lossy().into_owned();
            drllm_chat_string_free(p);
            s
        };
        if !out.is_null() {
            if !err.is_null() {
                drllm_chat_string_free(err);
            }
            return Ok(read(out));
        }
        if err.is_null() {
            return Err(ChatError(
                "llama.cpp's chat layer failed (out of memory?)".into(),
            ));
        }
        Err(ChatError(read(err)))
    }
}

/// The error a shim call that returned null left.
fn error_of(err: *mut c_char) -> ChatError {
    match take(std::ptr::null_mut(), err) {
        Err(e) => e,
        Ok(_) => ChatError("llama.cpp's chat layer failed".into()),
    }
}

/// `tool_choice` (OpenAI's; a named function is `Required` with only that tool given).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolChoice {
    Auto,
    None,
    Required,
}

impl ToolChoice {
    fn as_str(self) -> &'static str {
        match self {
            ToolChoice::Auto => "auto",
            ToolChoice::None => "none",
            ToolChoice::Required => "required",
        }
    }
}

/// A conversation to render: OpenAI-shaped `messages` (roles system, user, assistant with
/// `tool_calls`, tool with `tool_call_id`) and `tools` (`[{"type": "function", "function":
/// {...}}]`), given to llama.cpp as they are.
#[derive(Debug, Clone)]
pub struct ChatInput<'a> {
    pub messages: &'a Value,
    pub tools: Option<&'a Value>,
    pub tool_choice: ToolChoice,
    pub parallel_tool_calls: bool,
    /// End with the assistant's turn opened.
    pub add_generation_prompt: bool,
    /// Text the answer is made to start with: put after the prompt, and accepted by a strict
    /// grammar before the first sampled token (with the generation prompt).
    pub answer_prefix: &'a str,
}

impl<'a> ChatInput<'a> {
    /// Messages without tools, the assistant's turn opened.
    pub fn messages(messages: &'a Value) -> Self {
        ChatInput {
            messages,
            tools: None,
            tool_choice: ToolChoice::Auto,
            parallel_tool_calls: false,
            add_generation_prompt: true,
            answer_prefix: "",
        }
    }
}

/// A lazy grammar's trigger (llama.cpp's `common_grammar_trigger`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct GrammarTrigger {
    /// `word`, `pattern`, `pattern_full` or `token`.
    #[serde(rename = "type")]
    pub kind: String,
    pub value: String,
    /// The token of a `token` trigger.
    pub token: i64,
}

/// What llama.cpp's chat layer made of a conversation (`common_chat_params`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ChatPrompt {
    /// The rendered prompt (BOS left to the tokenizer).
    pub prompt: String,
    /// GBNF for the answer (tool calls), empty for none.
    pub grammar: String,
    /// The grammar applies only from a trigger on (tool_choice auto).
    pub grammar_lazy: bool,
    pub grammar_triggers: Vec<GrammarTrigger>,
    /// Texts that must come out as text even when they are special tokens (tool-call tags).
    pub preserved_tokens: Vec<String>,
    /// Stop strings the format adds.
    pub additional_stops: Vec<String>,
    /// The text that opens the assistant's turn (the parser reads it before the answer).
    pub generation_prompt: String,
    /// llama.cpp's `common_chat_format`.
    pub format: i32,
    pub format_name: String,
    /// The output parser, serialised.
    pub parser: String,
    pub supports_thinking: bool,
    /// The format's reasoning tags (e.g. `<think>`, `</think>`).
    pub thinking_start_tag: String,
    pub thinking_end_tags: Vec<String>,
    /// The preserved texts that are one token each: generated, they come out as text.
    pub preserved_token_ids: Vec<i32>,
    /// The lazy grammar's triggers as the sampler takes them (regexes, and tokens).
    pub trigger_patterns: Vec<String>,
    pub trigger_tokens: Vec<i32>,
    /// Tokens of the generation prompt a strict grammar accepts before sampling.
    pub grammar_prefill_tokens: Vec<i32>,
}

/// A model file's chat templates, loaded by llama.cpp as llama-server loads them.
pub struct ChatTemplates {
    raw: NonNull<RawChat>,
}

impl std::fmt::Debug for ChatTemplates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplates").finish_non_exhaustive()
    }
}

// SAFETY: after loading, the templates are only read (`common_chat_templates_apply` takes
// them const, the autoparser and the specialised formats take the template const, and each
// render builds its own Jinja context; llama.cpp's runtime states that the AST is shared
// between threads). The vocabulary is read-only. One shared thing remains, as in
// llama-server: Jinja's `strftime_now` goes through `std::localtime`'s static buffer, so two
// renders at the same instant could read each other's broken-down time.
unsafe impl Send for ChatTemplates {}
unsafe impl Sync for ChatTemplates {}

impl Drop for ChatTemplates {
    fn drop(&mut self) {
        // SAFETY: created by drllm_chat_open, freed once.
        unsafe { drllm_chat_free(self.raw.as_ptr()) }
    }
}

impl ChatTemplates {
    /// Loads the file's vocabulary and chat templates (the default one and a `tool_use`
    /// variant if the file has one; ChatML if it has none, as llama.cpp does), or uses
    /// `template` (Jinja source) instead of the file's, as llama-server's
    /// `--chat-template-file` does.
    pub fn open(path: &Path, template: Option<&str>) -> Result<ChatTemplates, ChatError> {
        crate::backend().map_err(|e| ChatError(e.to_string()))?;
        let p = cstring(&path.to_string_lossy(), "the model path")?;
        let t = cstring(template.unwrap_or(""), "the chat template")?;
        let mut err = std::ptr::null_mut();
        // SAFETY: valid C strings; err is an out pointer.
        let raw = unsafe { drllm_chat_open(p.as_ptr(), t.as_ptr(), &mut err) };
        match NonNull::new(raw) {
            Some(raw) => Ok(ChatTemplates { raw }),
            None => Err(error_of(err)),
        }
    }

    /// The template's capabilities as llama.cpp's Jinja engine finds them by rendering probe
    /// conversations (`supports_tools`, `supports_tool_calls`, `supports_system_role`, ...).
    pub fn caps(&self) -> Result<std::collections::BTreeMap<String, bool>, ChatError> {
        let mut err = std::ptr::null_mut();
        // SAFETY: live handle.
        let out = unsafe { drllm_chat_caps(self.raw.as_ptr(), &mut err) };
        serde_json::from_str(&take(out, err)?)
            .map_err(|e| ChatError(format!("the chat shim answered unreadable JSON: {e}")))
    }

    /// Whether the template renders tools and the calls the model makes (llama.cpp's
    /// `supports_tool_calls`); without it llama.cpp leaves tools out of the prompt.
    pub fn calls_tools(&self) -> Result<bool, ChatError> {
        Ok(self
            .caps()?
            .get("supports_tool_calls")
            .copied()
            .unwrap_or(false))
    }

    /// The template's source (`variant` e.g. `tool_use`; None: the default one).
    pub fn source(&self, variant: Option<&str>) -> Result<String, ChatError> {
        let v = cstring(variant.unwrap_or(""), "the template variant")?;
        let mut err = std::ptr::null_mut();
        // SAFETY: live handle, valid C string.
        let out = unsafe { drllm_chat_template_source(self.raw.as_ptr(), v.as_ptr(), &mut err) };
        take(out, err)
    }

    /// Renders a conversation (llama.cpp's `common_chat_templates_apply`, Jinja, reasoning
    /// parsed as llama-server's default `deepseek` does). The error is llama.cpp's message
    /// (a malformed message or tool, a template that fails).
    ///
    /// A conversation without tools whose template llama.cpp renders but cannot derive an
    /// output parser for ("Unable to generate parser") is rendered by llama.cpp's built-in
    /// formatter instead (its non-Jinja path, `use_jinja` false), the answer read as plain
    /// content, so such a model still chats.
    pub fn apply(&self, input: &ChatInput<'_>) -> Result<ChatPrompt, ChatError> {
        match self.apply_with(input, true) {
            Err(e) if input.tools.is_none() && e.0.contains("Unable to generate parser") => {
                eprintln!("[drllm] chat template: {e}; using llama.cpp's built-in formatter");
                self.apply_with(input, false)
            }
            r => r,
        }
    }

    fn apply_with(&self, input: &ChatInput<'_>, jinja: bool) -> Result<ChatPrompt, ChatError> {
        let mut req = serde_json::json!({
            "use_jinja": jinja,
            "messages": input.messages,
            "tool_choice": input.tool_choice.as_str(),
            "parallel_tool_calls": input.parallel_tool_calls,
            "add_generation_prompt": input.add_generation_prompt,
            "answer_prefix": input.answer_prefix,
        });
        if let Some(t) = input.tools {
            req["tools"] = t.clone();
        }
        let r = cstring(&req.to_string(), "the conversation")?;
        let mut err = std::ptr::null_mut();
        // SAFETY: live handle, valid C string.
        let out = unsafe { drllm_chat_apply(self.raw.as_ptr(), r.as_ptr(), &mut err) };
        let text = take(out, err)?;
        serde_json::from_str(&text)
            .map_err(|e| ChatError(format!("the chat shim answered unreadable JSON: {e}")))
    }

    /// A parser for one answer to `prompt` (`tools`: the request had tools).
    pub fn parser(&self, prompt: &ChatPrompt, tools: bool) -> Result<ChatParser, ChatError> {
        ChatParser::new(prompt, tools)
    }
}

/// A tool call the model made.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
pub struct ToolCall {
    pub name: String,
    /// JSON text.
    pub arguments: String,
    /// The id the model gave (usually none: the server assigns one).
    pub id: String,
}

/// The answer as llama.cpp parses it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
pub struct ParsedMessage {
    pub content: String,
    pub reasoning_content: String,
    pub tool_calls: Vec<ToolCall>,
}

/// What changed since the previous parse (llama.cpp's `common_chat_msg_diff`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct MessageDiff {
    pub content_delta: String,
    pub reasoning_content_delta: String,
    /// The tool call this diff extends (-1: none).
    pub tool_call_index: i64,
    /// Its name and id when it starts, the arguments' new text.
    pub tool_call: ToolCall,
}

#[derive(Deserialize)]
struct Fed {
    message: ParsedMessage,
    diffs: Vec<MessageDiff>,
    /// Why llama.cpp could not diff this parse against the previous one (empty: it could).
    diff_error: String,
}

/// Parses one answer as it grows (llama.cpp's `common_chat_parse`), giving the message and
/// the diffs since the last call.
pub struct ChatParser {
    raw: NonNull<RawParser>,
}

// SAFETY: the parser is owned by one request and used from one thread at a time.
unsafe impl Send for ChatParser {}

impl Drop for ChatParser {
    fn drop(&mut self) {
        // SAFETY: created by drllm_chat_parser_new, freed once.
        unsafe { drllm_chat_parser_free(self.raw.as_ptr()) }
    }
}

impl ChatParser {
    pub(crate) fn new(prompt: &ChatPrompt, tools: bool) -> Result<ChatParser, ChatError> {
        let gp = cstring(&prompt.generation_prompt, "the generation prompt")?;
        let parser = cstring(&prompt.parser, "the parser")?;
        let mut err = std::ptr::null_mut();
        // SAFETY: valid C strings; err is an out pointer.
        let raw = unsafe {
            drllm_chat_parser_new(prompt.format, gp.as_ptr(), parser.as_ptr(), tools, &mut err)
        };
        match NonNull::new(raw) {
            Some(raw) => Ok(ChatParser { raw }),
            None => Err(error_of(err)),
        }
    }

    /// Parses the whole text generated so far (`partial` while generation goes on). When a
    /// parse does not extend the previous one (llama.cpp refuses to diff them), the message
    /// comes with no diffs, and the next call diffs against it.
    pub fn feed(
        &mut self,
        text: &str,
        partial: bool,
    ) -> Result<(ParsedMessage, Vec<MessageDiff>), ChatError> {
        let t = cstring(text, "the answer")?;
        let mut err = std::ptr::null_mut();
        // SAFETY: live handle, valid C string.
        let out =
            unsafe { drllm_chat_parser_feed(self.raw.as_ptr(), t.as_ptr(), partial, &mut err) };
        let fed: Fed = serde_json::from_str(&take(out, err)?)
            .map_err(|e| ChatError(format!("the chat shim answered unreadable JSON: {e}")))?;
        if !fed.diff_error.is_empty() && std::env::var_os("DRLLM_VERBOSE").is_some() {
            eprintln!("[drllm] chat parser: {}", fed.diff_error);
        }
        Ok((fed.message, fed.diffs))
    }
}
