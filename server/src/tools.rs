//! Tool calling on `/v1/chat/completions`: the request's `tools`, `tool_choice` and
//! `parallel_tool_calls` (checked here), and the answer read back by llama.cpp's chat parser
//! into OpenAI's `message` (content, reasoning_content, tool_calls) and stream deltas. What the
//! prompt, the grammar and the parser are comes from llama.cpp's chat layer
//! ([`drllm_engine::ChatTemplates`]); nothing here knows a model's tool-call format.

use crate::error::ApiError;
use drllm_engine::{ChatParser, ChatPrompt, MessageDiff, ParsedMessage, Tokenizer, ToolChoice};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The tools of a request, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Tools {
    /// `[{"type": "function", "function": {"name", "description", "parameters"}}]`: with a
    /// named `tool_choice`, only that function.
    pub tools: Value,
    /// A named function is `Required` with only that tool.
    pub choice: ToolChoice,
    pub parallel: bool,
}

fn bad(message: String, param: &str) -> ApiError {
    ApiError::invalid(message, Some(param))
}

impl Tools {
    /// The tools of a chat body (None: no tools, or an empty list).
    pub fn from_body(body: &Value) -> Result<Option<Tools>, ApiError> {
        let tools = match body.get("tools") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a.clone(),
            Some(_) => {
                return Err(bad(
                    "tools must be a list of {\"type\": \"function\", \"function\": {...}}".into(),
                    "tools",
                ))
            }
        };
        let mut names = Vec::with_capacity(tools.len());
        for (i, t) in tools.iter().enumerate() {
            names.push(check_tool(i, t)?);
        }
        let parallel = match body.get("parallel_tool_calls") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(bad(
                    "parallel_tool_calls must be a boolean".into(),
                    "parallel_tool_calls",
                ))
            }
        };
        let (choice, named) = match body.get("tool_choice") {
            None | Some(Value::Null) => (ToolChoice::Auto, None),
            Some(Value::String(s)) => match s.as_str() {
                "auto" => (ToolChoice::Auto, None),
                "none" => (ToolChoice::None, None),
                "required" => (ToolChoice::Required, None),
                other => {
                    return Err(bad(
                        format!("tool_choice must be none, auto, required or {{\"type\": \"function\", \"function\": {{\"name\": ...}}}} (got '{other}')"),
                        "tool_choice",
                    ))
                }
            },
            Some(v) => match v.pointer("/function/name").and_then(Value::as_str) {
                Some(n) if v.get("type").and_then(Value::as_str) == Some("function") => {
                    (ToolChoice::Required, Some(n.to_string()))
                }
                _ => {
                    return Err(bad(
                        "tool_choice: a named choice is {\"type\": \"function\", \"function\": {\"name\": ...}}".into(),
                        "tool_choice",
                    ))
                }
            },
        };
        if tools.is_empty() {
            return match (choice, named) {
                (ToolChoice::Required, _) => Err(bad(
                    "tool_choice asks for a tool call but no tools are given".into(),
                    "tool_choice",
                )),
                _ => Ok(None),
            };
        }
        let tools = match named {
            None => tools,
            Some(n) => match names.iter().position(|x| *x == n) {
                Some(i) => vec![tools[i].clone()],
                None => {
                    return Err(bad(
                        format!("tool_choice names '{n}', which is not among the tools"),
                        "tool_choice",
                    ))
                }
            },
        };
        Ok(Some(Tools {
            tools: Value::Array(tools),
            choice,
            parallel,
        }))
    }

    /// Whether the model may (or must) call a tool.
    pub fn active(&self) -> bool {
        self.choice != ToolChoice::None
    }
}

/// A function tool's name, after checking its shape.
fn check_tool(i: usize, t: &Value) -> Result<String, ApiError> {
    let at = format!("tools[{i}]");
    if t.get("type").and_then(Value::as_str) != Some("function") {
        return Err(bad(
            format!("{at}.type must be \"function\" (the only kind of tool)"),
            &format!("{at}.type"),
        ));
    }
    let name = t
        .pointer("/function/name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            bad(
                format!("{at}.function.name must be a non-empty string"),
                &format!("{at}.function.name"),
            )
        })?;
    if let Some(p) = t.pointer("/function/parameters") {
        if !(p.is_object() || p.is_null()) {
            return Err(bad(
                format!("{at}.function.parameters must be a JSON schema object"),
                &format!("{at}.function.parameters"),
            ));
        }
    }
    Ok(name.to_string())
}

/// How a chat answer is read back: the chat layer's prompt (its parser and format), whether
/// the request had tools, and the text the answer starts with (put in the prompt: a required
/// call's marker).
#[derive(Clone)]
pub struct ChatShape {
    pub prompt: Arc<ChatPrompt>,
    pub tools: bool,
    pub answer_prefix: String,
    /// Several tool calls in one answer (`parallel_tool_calls`); without, only the first is
    /// kept (llama.cpp's grammar for formats that wrap each call lets several through).
    pub parallel: bool,
}

static NEXT_CALL: AtomicU64 = AtomicU64::new(1);

/// An id for a tool call the model gave none (OpenAI's `call_...`).
fn call_id() -> String {
    let n = NEXT_CALL.fetch_add(1, Ordering::Relaxed);
    let a = crate::clock::random_seed(n);
    let b = crate::clock::random_seed(n.wrapping_mul(0x2545_F491) ^ 0x5bd1);
    format!("call_{a:08x}{b:08x}{n:04x}")
}

/// One choice's answer as it is parsed: the text so far, the parser, the tool-call ids given
/// out (stable across the stream and in the final message).
pub struct ChoiceParser {
    parser: Option<ChatParser>,
    /// The answer so far, after the answer prefix.
    text: String,
    prefix: String,
    ids: Vec<String>,
    /// Content sent in deltas so far (for the fallback when the final parse fails).
    sent_content: String,
    /// Most tool calls kept.
    max_calls: usize,
}

impl ChoiceParser {
    /// A parser for one choice (None inside when llama.cpp refuses to build it: the answer is
    /// then plain content).
    pub fn new(tokenizer: &Tokenizer, shape: &ChatShape) -> ChoiceParser {
        let parser = tokenizer
            .chat()
            .and_then(|c| {
                c.parser(&shape.prompt, shape.tools)
                    .map_err(|e| drllm_engine::EngineError::Tokenizer(e.to_string()))
            })
            .map_err(|e| eprintln!("[drllm] chat parser: {e}; answering plain content"))
            .ok();
        ChoiceParser {
            parser,
            text: shape.answer_prefix.clone(),
            prefix: shape.answer_prefix.clone(),
            ids: Vec::new(),
            sent_content: String::new(),
            max_calls: if shape.parallel { usize::MAX } else { 1 },
        }
    }

    /// More streamed text: the deltas to send (each a chat `delta` object).
    pub fn push(&mut self, text: &str) -> Vec<Value> {
        self.text.push_str(text);
        let Some(p) = self.parser.as_mut() else {
            self.sent_content.push_str(text);
            return vec![json!({ "content": text })];
        };
        match p.feed(&self.text, true) {
            Ok((_, diffs)) => self.deltas(&diffs),
            // an unparsable prefix: wait for more text
            Err(_) => Vec::new(),
        }
    }

    /// The whole answer (the stream's, or a non-streamed one): the last deltas, the message,
    /// and whether it calls tools.
    pub fn finish(&mut self, full: &str) -> (Vec<Value>, Value, bool) {
        self.text = format!("{}{full}", self.prefix);
        let parsed = match self.parser.as_mut().map(|p| p.feed(&self.text, false)) {
            Some(Ok((m, diffs))) => Some((m, diffs)),
            Some(Err(e)) => {
                eprintln!("[drllm] the answer does not parse ({e}): sent as plain content");
                None
            }
            None => None,
        };
        match parsed {
            Some((m, diffs)) => {
                let deltas = self.deltas(&diffs);
                let calls = !m.tool_calls.is_empty();
                (deltas, self.message(&m), calls)
            }
            None => {
                let rest = full
                    .strip_prefix(self.sent_content.as_str())
                    .unwrap_or(full)
                    .to_string();
                let deltas = if rest.is_empty() {
                    Vec::new()
                } else {
                    vec![json!({ "content": rest })]
                };
                let m = ParsedMessage {
                    content: full.to_string(),
                    ..Default::default()
                };
                (deltas, self.message(&m), false)
            }
        }
    }

    fn id(&mut self, index: usize, given: &str) -> String {
        while self.ids.len() <= index {
            let id = if given.is_empty() {
                call_id()
            } else {
                given.to_string()
            };
            self.ids.push(id);
        }
        self.ids[index].clone()
    }

    /// OpenAI's deltas for llama.cpp's diffs: content, reasoning, and tool calls (the first
    /// delta of a call carries its id, type and name; later ones its arguments' new text).
    fn deltas(&mut self, diffs: &[MessageDiff]) -> Vec<Value> {
        let mut out = Vec::new();
        for d in diffs {
            if !d.reasoning_content_delta.is_empty() {
                out.push(json!({ "reasoning_content": d.reasoning_content_delta }));
            }
            if !d.content_delta.is_empty() {
                self.sent_content.push_str(&d.content_delta);
                out.push(json!({ "content": d.content_delta }));
            }
            if let Some(index) = usize::try_from(d.tool_call_index)
                .ok()
                .filter(|&i| i < self.max_calls)
            {
                let mut call = json!({"index": index,
                                      "function": {"arguments": d.tool_call.arguments}});
                if index >= self.ids.len() {
                    call["id"] = json!(self.id(index, &d.tool_call.id));
                    call["type"] = json!("function");
                    call["function"]["name"] = json!(d.tool_call.name);
                }
                out.push(json!({ "tool_calls": [call] }));
            }
        }
        out
    }

    /// OpenAI's assistant message for a parsed answer.
    fn message(&mut self, m: &ParsedMessage) -> Value {
        let calls: Vec<Value> = m
            .tool_calls
            .iter()
            .take(self.max_calls)
            .enumerate()
            .map(|(i, c)| {
                json!({"id": self.id(i, &c.id), "type": "function",
                       "function": {"name": c.name, "arguments": c.arguments}})
            })
            .collect();
        let mut msg = json!({"role": "assistant"});
        // OpenAI: content is null in a message that only calls tools
        msg["content"] = if calls.is_empty() || !m.content.is_empty() {
            json!(m.content)
        } else {
            Value::Null
        };
        if !m.reasoning_content.is_empty() {
            msg["reasoning_content"] = json!(m.reasoning_content);
        }
        if !calls.is_empty() {
            msg["tool_calls"] = Value::Array(calls);
        }
        msg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools(body: Value) -> Result<Option<Tools>, ApiError> {
        Tools::from_body(&body)
    }

    fn weather() -> Value {
        json!({"type": "function", "function": {"name": "get_weather",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}})
    }

    #[test]
    fn tool_requests_are_checked_naming_the_field() {
        assert_eq!(tools(json!({})).unwrap(), None);
        assert_eq!(tools(json!({"tools": []})).unwrap(), None);
        let t = tools(json!({"tools": [weather()]})).unwrap().unwrap();
        assert_eq!(t.choice, ToolChoice::Auto);
        assert!(!t.parallel);
        let t = tools(json!({"tools": [weather()], "tool_choice": "none"}))
            .unwrap()
            .unwrap();
        assert!(!t.active());
        let other = json!({"type": "function", "function": {"name": "other"}});
        let t = tools(json!({"tools": [other, weather()], "parallel_tool_calls": true,
                             "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}))
        .unwrap()
        .unwrap();
        assert_eq!(t.choice, ToolChoice::Required);
        assert_eq!(t.tools, json!([weather()]));
        assert!(t.parallel);
        for (body, param) in [
            (json!({"tools": {}}), "tools"),
            (json!({"tools": [{"type": "code"}]}), "tools[0].type"),
            (
                json!({"tools": [{"type": "function", "function": {}}]}),
                "tools[0].function.name",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": 3}}]}),
                "tools[0].function.parameters",
            ),
            (
                json!({"tools": [weather()], "tool_choice": "sometimes"}),
                "tool_choice",
            ),
            (
                json!({"tools": [weather()], "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
                "tool_choice",
            ),
            (json!({"tool_choice": "required"}), "tool_choice"),
            (
                json!({"tools": [weather()], "parallel_tool_calls": "yes"}),
                "parallel_tool_calls",
            ),
        ] {
            let e = tools(body.clone()).unwrap_err();
            assert_eq!(e.status, 400, "{body}");
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
        }
    }
}
