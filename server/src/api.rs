//! The OpenAI-compatible wire format: request bodies (parsed and validated here, nowhere
//! else) and response bodies; the OpenAI-style errors are [`crate::error`]'s.

pub use crate::error::ApiError;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Parses a JSON body (syntax only).
pub fn parse_json(bytes: &[u8]) -> Result<Value, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::invalid(
            "the request body is empty (expected JSON)",
            None,
        ));
    }
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::invalid(format!("invalid JSON: {e}"), None))?;
    if !v.is_object() {
        return Err(ApiError::invalid(
            "the request body must be a JSON object",
            None,
        ));
    }
    Ok(v)
}

/// Reads `T` out of a parsed body, naming the offending field in the error.
pub fn from_value<'a, T: Deserialize<'a>>(v: &'a Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize::<_, T>(v).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let param = (path != ".").then_some(path);
        let msg = match &param {
            Some(p) => format!("invalid field '{p}': {inner}"),
            None => format!("invalid request: {inner}"),
        };
        ApiError::invalid(msg, param.as_deref())
    })
}

/// The endpoints whose bodies [`check_fields`] knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completion,
    Route,
}

/// Fields every generating endpoint implements (their ranges are checked in
/// [`CommonFields::validate`]).
const COMMON_FIELDS: &[&str] = &[
    "model",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "n",
    "stream",
    "stream_options",
    "presence_penalty",
    "frequency_penalty",
    "repeat_penalty",
    "repeat_last_n",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "ignore_eos",
    "routing",
    "depth_bias",
    "max_passes",
    "cache_prompt",
    "response_format",
    "grammar",
];

/// Fields drllm does not implement, with the value that asks for nothing (what clients send
/// by default) and which is therefore accepted. Any other value is refused by name, so that a
/// client never believes it got something it did not (JSON mode, tools, ...).
fn noop_value(endpoint: Endpoint, key: &str, v: &Value) -> Option<(bool, &'static str)> {
    let any_string = (v.is_string(), "a string");
    Some(match (endpoint, key) {
        // labels for the caller's own bookkeeping: no effect on the answer
        (_, "user" | "safety_identifier" | "prompt_cache_key") => any_string,
        (_, "metadata") => (v.is_object(), "an object of labels"),
        (_, "store") => (v == &json!(false), "false (nothing is stored)"),
        (_, "service_tier") => (
            v == &json!("auto") || v == &json!("default"),
            "\"auto\" or \"default\"",
        ),
        (_, "tools" | "functions") => (
            v.as_array().is_some_and(|a| a.is_empty()),
            "[] (tool calls are not supported)",
        ),
        (_, "tool_choice" | "function_call") => (
            v == &json!("none") || v == &json!("auto"),
            "\"none\" or \"auto\" without tools",
        ),
        (_, "parallel_tool_calls") => (v.is_boolean(), "a boolean, without tools"),
        (_, "modalities") => (v == &json!(["text"]), "[\"text\"]"),
        (Endpoint::Completion, "best_of") => (v == &json!(1), "1"),
        (Endpoint::Completion, "suffix") => (v == &json!(""), "\"\""),
        _ => return None,
    })
}

fn unsupported(param: &str, message: String) -> ApiError {
    ApiError::invalid(message, Some(param)).with_code("unsupported_parameter")
}

/// Refuses, by name, every field of a body that drllm does not implement, unless it carries
/// its no-op value (see [`noop_value`]); a null counts as not given. Also checks the keys of
/// `stream_options` and of each message.
pub fn check_fields(endpoint: Endpoint, body: &Value) -> Result<(), ApiError> {
    let Some(obj) = body.as_object() else {
        return Ok(()); // the type error is reported by the parser
    };
    for (key, v) in obj {
        if v.is_null() {
            continue;
        }
        let implemented = match endpoint {
            Endpoint::Chat => {
                matches!(
                    key.as_str(),
                    "messages" | "tools" | "tool_choice" | "parallel_tool_calls"
                ) || COMMON_FIELDS.contains(&key.as_str())
            }
            Endpoint::Completion => {
                key == "prompt" || key == "echo" || COMMON_FIELDS.contains(&key.as_str())
            }
            Endpoint::Route => matches!(
                key.as_str(),
                "model" | "messages" | "prompt" | "routing" | "depth_bias" | "max_passes"
            ),
        };
        if implemented {
            continue;
        }
        match noop_value(endpoint, key, v) {
            Some((true, _)) => {}
            Some((false, accepted)) => {
                return Err(unsupported(
                    key,
                    format!("'{key}' is not supported by drllm; it is accepted only as {accepted}"),
                ))
            }
            None => {
                return Err(unsupported(
                    key,
                    format!("unknown or unsupported field '{key}'"),
                ))
            }
        }
    }
    if let Some(o) = obj.get("stream_options").and_then(Value::as_object) {
        for (key, v) in o {
            // include_obfuscation pads chunks against side channels on a remote API: no effect
            // on the answer
            if !(v.is_null() || key == "include_usage" || key == "include_obfuscation") {
                let param = format!("stream_options.{key}");
                return Err(unsupported(
                    &param,
                    format!("unknown or unsupported field '{param}'"),
                ));
            }
        }
    }
    if let Some(msgs) = obj.get("messages").and_then(Value::as_array) {
        for (i, m) in msgs.iter().enumerate() {
            let Some(m) = m.as_object() else { continue };
            for (key, v) in m {
                let ok = v.is_null()
                    || match key.as_str() {
                        "role" | "content" | "tool_calls" => true,
                        // a participant's (or a tool's) name, the id a tool result answers,
                        // the reasoning of an earlier answer
                        "name" | "tool_call_id" | "reasoning_content" => v.is_string(),
                        "annotations" | "refusal" => {
                            v.as_array().is_some_and(|a| a.is_empty()) || v == &json!("")
                        }
                        _ => false,
                    };
                if !ok {
                    let param = format!("messages[{i}].{key}");
                    return Err(unsupported(
                        &param,
                        format!("unknown or unsupported field '{param}'"),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// A string or a list of strings (`stop`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// A chat message's content: a string, or a list of parts of which only text parts are
/// accepted.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// One part of a multi-part message.
#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

/// One chat message.
#[derive(Debug, Clone, Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
    /// An assistant turn's tool calls (`[{"id", "type": "function", "function": {"name",
    /// "arguments"}}]`), checked by llama.cpp's parser.
    #[serde(default)]
    pub tool_calls: Option<Vec<Value>>,
    /// A tool turn: the call it answers.
    #[serde(default)]
    pub tool_call_id: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub reasoning_content: Option<String>,
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The fields chat and text completions share: sampling, limits, streaming, and drllm's
/// routing controls. Fields drllm does not implement are refused by [`check_fields`] before
/// this is read; known ones are checked by type here and by range in
/// [`CommonFields::validate`].
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CommonFields {
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub seed: Option<i64>,
    pub stop: Option<OneOrMany>,
    pub n: Option<i64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    /// llama.cpp's repeat penalty (1: off).
    pub repeat_penalty: Option<f64>,
    /// Tokens the penalties look back at (llama-server's field; -1: the whole context, 0: off).
    pub repeat_last_n: Option<i64>,
    /// `{"TOKEN_ID": bias}` (OpenAI's, bias in [-100, 100]; `false` bans the token, as
    /// llama-server allows), or llama-server's `[[TOKEN_ID, bias], ...]`.
    pub logit_bias: Option<Value>,
    /// Chat: true for each token's log-probability; completions: the number of alternatives
    /// (0 to 20) listed with each token's.
    pub logprobs: Option<Value>,
    /// Chat: alternatives listed with each token's log-probability (0 to 20; needs
    /// `logprobs: true`).
    pub top_logprobs: Option<i64>,
    /// Completions: the prompt comes back before the answer (with its tokens' log-probabilities
    /// when `logprobs` is given; with `max_tokens: 0`, only the prompt: scoring).
    #[serde(default)]
    pub echo: bool,
    /// Keep generating past end-of-generation tokens (llama-server's extension).
    #[serde(default)]
    pub ignore_eos: bool,
    /// drllm: route this request (default: routed when a sidecar is loaded).
    pub routing: Option<bool>,
    /// drllm: depth bias in logit units (> 0 keeps more blocks, < 0 skips more).
    pub depth_bias: Option<f64>,
    /// drllm: cap on the total number of block passes.
    pub max_passes: Option<i64>,
    /// Reuse the cached KV of a conversation's earlier turns, and cache this one
    /// (llama-server's field; default true).
    pub cache_prompt: Option<bool>,
    /// `{"type": "text" | "json_object" | "json_schema", "json_schema": {"schema": ...}}`.
    pub response_format: Option<Value>,
    /// A GBNF grammar the answer must follow (llama-server's field; root rule `root`).
    pub grammar: Option<String>,
}

/// What the answer must follow: GBNF text, and the request field it came from (for errors).
#[derive(Debug, Clone, PartialEq)]
pub struct Constraint {
    pub gbnf: String,
    pub param: &'static str,
}

/// What llama.cpp's schema converter would refuse without saying why: a `type` that is not a
/// JSON type, a `$ref` that does not resolve inside the schema. None if nothing is found.
fn schema_problem(schema: &Value) -> Option<String> {
    const TYPES: &[&str] = &[
        "string", "number", "integer", "boolean", "object", "array", "null",
    ];
    fn walk(root: &Value, v: &Value, at: &str) -> Option<String> {
        match v {
            Value::Object(o) => {
                for (k, x) in o {
                    let here = format!("{at}/{k}");
                    match (k.as_str(), x) {
                        ("type", Value::String(t)) if !TYPES.contains(&t.as_str()) => {
                            return Some(format!("unknown type '{t}' at {here}"));
                        }
                        ("type", Value::Array(ts)) => {
                            if let Some(t) = ts
                                .iter()
                                .find(|t| !t.as_str().is_some_and(|t| TYPES.contains(&t)))
                            {
                                return Some(format!("unknown type {t} at {here}"));
                            }
                        }
                        ("$ref", Value::String(r)) => match r.strip_prefix('#') {
                            Some(ptr) if ptr.is_empty() || root.pointer(ptr).is_some() => {}
                            Some(_) => {
                                return Some(format!(
                                    "{here} refers to '{r}', which the schema does not define"
                                ))
                            }
                            None => {
                                return Some(format!(
                                    "{here} refers to '{r}': only references inside the schema (\"#/...\") are supported"
                                ))
                            }
                        },
                        // example values and constants are data, not schemas
                        ("const" | "enum" | "examples" | "default", _) => {}
                        _ => {
                            if let Some(p) = walk(root, x, &here) {
                                return Some(p);
                            }
                        }
                    }
                }
                None
            }
            Value::Array(a) => a
                .iter()
                .enumerate()
                .find_map(|(i, x)| walk(root, x, &format!("{at}/{i}"))),
            _ => None,
        }
    }
    walk(schema, schema, "")
}

/// The constraint asked for by `response_format` or `grammar`, as GBNF (schemas converted).
fn constraint(
    response_format: Option<&Value>,
    grammar: Option<&String>,
) -> Result<Option<Constraint>, ApiError> {
    let invalid =
        |m: String, p: &str, code: &'static str| ApiError::invalid(m, Some(p)).with_code(code);
    let from_format = match response_format {
        None => None,
        Some(f) => {
            let kind = f.get("type").and_then(Value::as_str);
            let schema = match kind {
                Some("text") => None,
                Some("json_object") => Some(json!({"type": "object"})),
                Some("json_schema") => match f.pointer("/json_schema/schema") {
                    Some(s) if s.is_object() || s.is_boolean() => Some(s.clone()),
                    _ => {
                        return Err(invalid(
                            "response_format of type json_schema needs json_schema.schema (a JSON schema object)".into(),
                            "response_format.json_schema.schema",
                            "invalid_schema",
                        ))
                    }
                },
                _ => {
                    return Err(invalid(
                        format!(
                            "response_format.type must be text, json_object or json_schema (got {})",
                            f.get("type").map_or("nothing".to_string(), Value::to_string)
                        ),
                        "response_format.type",
                        "invalid_value",
                    ))
                }
            };
            match schema {
                None => None,
                Some(schema) => {
                    if let Some(why) = schema_problem(&schema) {
                        return Err(invalid(
                            format!("the JSON schema cannot be used: {why}"),
                            "response_format",
                            "invalid_schema",
                        ));
                    }
                    let gbnf =
                        drllm_engine::json_schema_to_gbnf(&schema.to_string()).map_err(|e| {
                            invalid(
                                format!("the JSON schema cannot be used: {e}"),
                                "response_format",
                                "invalid_schema",
                            )
                        })?;
                    Some(Constraint {
                        gbnf,
                        param: "response_format",
                    })
                }
            }
        }
    };
    match (from_format, grammar) {
        (Some(_), Some(_)) => Err(invalid(
            "give either a JSON response_format or a grammar, not both".into(),
            "grammar",
            "invalid_value",
        )),
        (Some(c), None) => Ok(Some(c)),
        (None, Some(g)) if g.trim().is_empty() => Err(invalid(
            "the grammar is empty".into(),
            "grammar",
            "invalid_grammar",
        )),
        (None, Some(g)) => Ok(Some(Constraint {
            gbnf: g.clone(),
            param: "grammar",
        })),
        (None, None) => Ok(None),
    }
}

/// Most choices (`n`) a request may ask for: each is a generation of up to max_tokens.
pub const MAX_CHOICES: usize = 16;

/// Validated generation settings.
#[derive(Debug, Clone, PartialEq)]
pub struct GenSettings {
    pub max_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: i32,
    pub min_p: f32,
    pub seed: Option<u32>,
    pub stop: Vec<String>,
    pub penalties: Penalties,
    /// (token, bias) pairs; a ban is `-inf`.
    pub logit_bias: Vec<(i32, f32)>,
    pub stream: bool,
    pub include_usage: bool,
    /// Each generated token's log-probability with this many alternatives (None: none).
    pub logprobs: Option<usize>,
    /// Completions: the prompt comes back first (with its logprobs when `logprobs` is set).
    pub echo: bool,
    /// Choices generated from the one prompt.
    pub n: usize,
    pub ignore_eos: bool,
    pub cache_prompt: bool,
    /// The grammar the answer must follow (JSON mode, a schema, GBNF); compiled against the
    /// vocabulary by the caller.
    pub constraint: Option<Constraint>,
    pub routing: RoutingSettings,
}

/// Validated penalties (llama.cpp's penalty sampler).
#[derive(Debug, Clone, PartialEq)]
pub struct Penalties {
    pub repeat: f32,
    /// Tokens looked back at (the context length for a request's -1; 0: off).
    pub last_n: i32,
    pub frequency: f32,
    pub presence: f32,
}

/// Validated per-request routing controls.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingSettings {
    /// None: route when routers are loaded; Some(false): plain model; Some(true): routing
    /// required (400 if no routers are loaded).
    pub routing: Option<bool>,
    pub depth_bias: f32,
    pub max_passes: Option<usize>,
}

/// Limits the server applies while validating.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Context length: no request may ask for more tokens than this.
    pub n_ctx: usize,
    /// max_tokens when the request gives none.
    pub default_max_tokens: usize,
    /// Blocks of the model (bounds max_passes).
    pub n_layer: usize,
    /// Tokens of the vocabulary (bounds logit_bias).
    pub n_vocab: usize,
}

fn range_f(v: Option<f64>, name: &str, lo: f64, hi: f64, default: f64) -> Result<f32, ApiError> {
    match v {
        None => Ok(default as f32),
        Some(x) if x.is_finite() && x >= lo && x <= hi => Ok(x as f32),
        Some(x) => Err(ApiError::invalid(
            format!("{name} must be between {lo} and {hi} (got {x})"),
            Some(name),
        )),
    }
}

impl CommonFields {
    /// Checks every field's range; gives the settings. The checks run in the order written
    /// (the first bad field is the one reported).
    pub fn validate(&self, limits: &Limits, endpoint: Endpoint) -> Result<GenSettings, ApiError> {
        let max_tokens = self.checked_max_tokens(limits)?;
        let n = self.checked_n()?;
        let logprobs = self.checked_logprobs(endpoint)?;
        // the defaults are the engine's (llama.cpp's), as `drllm generate`'s
        let d = drllm_engine::SamplingParams::default();
        let temperature = range_f(
            self.temperature,
            "temperature",
            0.0,
            2.0,
            f64::from(d.temperature),
        )?;
        let top_p = match self.top_p {
            Some(x) if !(x.is_finite() && x > 0.0 && x <= 1.0) => {
                return Err(ApiError::invalid(
                    format!("top_p must be in (0, 1] (got {x})"),
                    Some("top_p"),
                ))
            }
            v => v.map_or(d.top_p, |x| x as f32),
        };
        let min_p = range_f(self.min_p, "min_p", 0.0, 1.0, f64::from(d.min_p))?;
        let top_k = match self.top_k {
            None => d.top_k,
            Some(k) if (0..=1_000_000).contains(&k) => k as i32,
            Some(k) => {
                return Err(ApiError::invalid(
                    format!("top_k must be between 0 and 1000000 (got {k})"),
                    Some("top_k"),
                ))
            }
        };
        let seed = match self.seed {
            None => None,
            Some(s) if s >= 0 && s <= u32::MAX as i64 => Some(s as u32),
            Some(s) => {
                return Err(ApiError::invalid(
                    format!("seed must be between 0 and {} (got {s})", u32::MAX),
                    Some("seed"),
                ))
            }
        };
        let stop = self.checked_stop()?;
        let penalties = self.penalties(limits)?;
        let logit_bias = self.checked_logit_bias(limits)?;
        let routing = self.routing_settings(limits)?;
        Ok(GenSettings {
            max_tokens,
            temperature,
            top_p,
            top_k,
            min_p,
            seed,
            stop,
            penalties,
            logit_bias,
            stream: self.stream,
            include_usage: self
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
            logprobs,
            echo: self.echo,
            n,
            ignore_eos: self.ignore_eos,
            cache_prompt: self.cache_prompt.unwrap_or(true),
            constraint: constraint(self.response_format.as_ref(), self.grammar.as_ref())?,
            routing,
        })
    }

    /// `max_tokens` or `max_completion_tokens` (not both), within the context; the server's
    /// default when neither is given.
    fn checked_max_tokens(&self, limits: &Limits) -> Result<usize, ApiError> {
        if self.max_tokens.is_some() && self.max_completion_tokens.is_some() {
            return Err(ApiError::invalid(
                "give max_tokens or max_completion_tokens, not both",
                Some("max_tokens"),
            ));
        }
        let (mt_name, mt) = match self.max_completion_tokens {
            Some(v) => ("max_completion_tokens", Some(v)),
            None => ("max_tokens", self.max_tokens),
        };
        match mt {
            None => Ok(limits.default_max_tokens.min(limits.n_ctx)),
            // nothing generated: the echoed prompt is the answer (scoring by logprobs)
            Some(0) if self.echo => Ok(0),
            Some(v) if v >= 1 && (v as u64) <= limits.n_ctx as u64 => Ok(v as usize),
            Some(v) => Err(ApiError::invalid(
                format!(
                    "{mt_name} must be between 1 and {} (the context length); got {v}",
                    limits.n_ctx
                ),
                Some(mt_name),
            )),
        }
    }

    /// `n`: choices, 1 to [`MAX_CHOICES`].
    fn checked_n(&self) -> Result<usize, ApiError> {
        match self.n {
            None => Ok(1),
            Some(n) if (1..=MAX_CHOICES as i64).contains(&n) => Ok(n as usize),
            Some(n) => Err(ApiError::invalid(
                format!("n must be between 1 and {MAX_CHOICES} (got {n})"),
                Some("n"),
            )),
        }
    }

    /// The alternatives listed with each token's log-probability (None: no logprobs). Chat:
    /// `logprobs: true` and `top_logprobs` (0 to 20, only with logprobs); completions:
    /// `logprobs: N` (0 to 20). `echo` is for completions and not with `stream`.
    fn checked_logprobs(&self, endpoint: Endpoint) -> Result<Option<usize>, ApiError> {
        let max = drllm_engine::MAX_TOP_LOGPROBS as i64;
        let bad = |m: String, p: &str| ApiError::invalid(m, Some(p));
        if self.echo && self.stream {
            return Err(bad(
                "echo with stream is not supported (ask without stream)".into(),
                "echo",
            )
            .with_code("unsupported_parameter"));
        }
        let lp = self.logprobs.as_ref().filter(|v| !v.is_null());
        match endpoint {
            Endpoint::Chat => {
                let on = match lp {
                    None | Some(Value::Bool(false)) => false,
                    Some(Value::Bool(true)) => true,
                    Some(v) => {
                        return Err(bad(
                            format!("logprobs must be true or false in chat completions (got {v})"),
                            "logprobs",
                        ))
                    }
                };
                match self.top_logprobs {
                    Some(n) if !(0..=max).contains(&n) => Err(bad(
                        format!("top_logprobs must be between 0 and {max} (got {n})"),
                        "top_logprobs",
                    )),
                    Some(n) if n > 0 && !on => Err(bad(
                        "top_logprobs needs logprobs: true".into(),
                        "top_logprobs",
                    )),
                    n => Ok(on.then(|| n.unwrap_or(0) as usize)),
                }
            }
            _ => {
                if self.top_logprobs.is_some_and(|n| n != 0) {
                    return Err(bad(
                        "top_logprobs is for chat completions; completions take logprobs: N".into(),
                        "top_logprobs",
                    ));
                }
                match lp {
                    None => Ok(None),
                    Some(v) => match v.as_i64() {
                        Some(n) if (0..=max).contains(&n) => Ok(Some(n as usize)),
                        _ => Err(bad(
                            format!(
                                "logprobs must be the number of alternatives, 0 to {max}, in completions (got {v})"
                            ),
                            "logprobs",
                        )),
                    },
                }
            }
        }
    }

    /// The penalties: frequency and presence in [-2, 2] (OpenAI's range), repeat in (0, 10],
    /// repeat_last_n from -1 (the context) to the context length (llama-server's defaults:
    /// 1, 64, 0, 0).
    fn penalties(&self, limits: &Limits) -> Result<Penalties, ApiError> {
        let d = drllm_engine::SamplingParams::default();
        let frequency = range_f(
            self.frequency_penalty,
            "frequency_penalty",
            -2.0,
            2.0,
            f64::from(d.frequency_penalty),
        )?;
        let presence = range_f(
            self.presence_penalty,
            "presence_penalty",
            -2.0,
            2.0,
            f64::from(d.presence_penalty),
        )?;
        let repeat = match self.repeat_penalty {
            Some(x) if !(x.is_finite() && x > 0.0 && x <= 10.0) => {
                return Err(ApiError::invalid(
                    format!("repeat_penalty must be in (0, 10] (got {x})"),
                    Some("repeat_penalty"),
                ))
            }
            v => v.map_or(d.repeat_penalty, |x| x as f32),
        };
        let n_ctx = limits.n_ctx as i64;
        let last_n = match self.repeat_last_n {
            None => i64::from(d.repeat_last_n),
            Some(-1) => n_ctx,
            Some(n) if (0..=n_ctx).contains(&n) => n,
            Some(n) => {
                return Err(ApiError::invalid(
                    format!(
                        "repeat_last_n must be -1 (the whole context) or between 0 and {n_ctx} (got {n})"
                    ),
                    Some("repeat_last_n"),
                ))
            }
        };
        Ok(Penalties {
            repeat,
            last_n: i32::try_from(last_n).unwrap_or(i32::MAX),
            frequency,
            presence,
        })
    }

    /// `logit_bias`: token ids of the vocabulary, biases in [-100, 100] (or `false`: banned),
    /// at most 1024 of them.
    fn checked_logit_bias(&self, limits: &Limits) -> Result<Vec<(i32, f32)>, ApiError> {
        let bad = |m: String| ApiError::invalid(m, Some("logit_bias"));
        let entries: Vec<(String, &Value)> = match &self.logit_bias {
            None => return Ok(Vec::new()),
            Some(Value::Object(o)) => o.iter().map(|(k, v)| (k.clone(), v)).collect(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|pair| match pair.as_array().map(Vec::as_slice) {
                    Some([t, b]) => Ok((t.to_string(), b)),
                    _ => Err(bad(format!(
                        "logit_bias as a list takes [TOKEN_ID, BIAS] pairs (got {pair})"
                    ))),
                })
                .collect::<Result<_, _>>()?,
            Some(v) => {
                return Err(bad(format!(
                    "logit_bias must be an object {{\"TOKEN_ID\": BIAS}} (got {v})"
                )))
            }
        };
        if entries.len() > 1024 {
            return Err(bad(format!(
                "logit_bias takes at most 1024 tokens (got {})",
                entries.len()
            )));
        }
        entries
            .into_iter()
            .map(|(k, v)| {
                let token = k
                    .parse::<i64>()
                    .ok()
                    .filter(|t| (0..limits.n_vocab as i64).contains(t))
                    .ok_or_else(|| {
                        bad(format!(
                            "logit_bias: '{k}' is not a token id of this model (0 to {})",
                            limits.n_vocab.saturating_sub(1)
                        ))
                    })?;
                let bias = match v {
                    Value::Bool(false) => f32::NEG_INFINITY,
                    v => match v.as_f64() {
                        Some(b) if (-100.0..=100.0).contains(&b) => b as f32,
                        _ => {
                            return Err(bad(format!(
                                "logit_bias of token {k} must be a number in [-100, 100] or false (got {v})"
                            )))
                        }
                    },
                };
                Ok((token as i32, bias))
            })
            .collect()
    }

    /// The stop strings: at most 16, of at most 256 bytes each.
    fn checked_stop(&self) -> Result<Vec<String>, ApiError> {
        let stop = self
            .stop
            .clone()
            .map(OneOrMany::into_vec)
            .unwrap_or_default();
        if stop.len() > 16 || stop.iter().any(|s| s.len() > 256) {
            return Err(ApiError::invalid(
                "stop takes at most 16 strings of at most 256 bytes",
                Some("stop"),
            ));
        }
        Ok(stop)
    }

    /// `routing`, `depth_bias` and `max_passes` (at most twice the blocks).
    fn routing_settings(&self, limits: &Limits) -> Result<RoutingSettings, ApiError> {
        let depth_bias = range_f(self.depth_bias, "depth_bias", -1e4, 1e4, 0.0)?;
        let max_passes = match self.max_passes {
            None => None,
            Some(p) if p >= 1 && (p as u64) <= 2 * limits.n_layer as u64 => Some(p as usize),
            Some(p) => {
                return Err(ApiError::invalid(
                    format!(
                        "max_passes must be between 1 and {} (twice the {} blocks); got {p}",
                        2 * limits.n_layer,
                        limits.n_layer
                    ),
                    Some("max_passes"),
                ))
            }
        };
        Ok(RoutingSettings {
            routing: self.routing,
            depth_bias,
            max_passes,
        })
    }
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    pub common: CommonFields,
    /// The tools the model may call (None: none given).
    pub tools: Option<crate::tools::Tools>,
}

#[derive(Deserialize)]
struct MessagesOnly {
    messages: Vec<Message>,
}

#[derive(Deserialize)]
struct PromptOnly {
    prompt: Prompt,
}

impl ChatRequest {
    /// Parses a request body.
    pub fn from_body(bytes: &[u8]) -> Result<Self, ApiError> {
        let v = parse_json(bytes)?;
        check_fields(Endpoint::Chat, &v)?;
        let m: MessagesOnly = from_value(&v)?;
        Ok(ChatRequest {
            messages: m.messages,
            common: from_value(&v)?,
            tools: crate::tools::Tools::from_body(&v)?,
        })
    }

    /// The messages as llama.cpp's chat layer takes them (OpenAI's shape), checked: known
    /// roles, text parts only, tool calls only in assistant turns.
    pub fn messages(&self) -> Result<Value, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::invalid(
                "messages must hold at least one message",
                Some("messages"),
            ));
        }
        let mut out = Vec::with_capacity(self.messages.len());
        for (i, m) in self.messages.iter().enumerate() {
            if !matches!(
                m.role.as_str(),
                "system" | "developer" | "user" | "assistant" | "tool"
            ) {
                return Err(ApiError::invalid(
                    format!("messages[{i}].role '{}' is not a chat role", m.role),
                    Some(&format!("messages[{i}].role")),
                ));
            }
            let text = match &m.content {
                None => String::new(),
                Some(Content::Text(t)) => t.clone(),
                Some(Content::Parts(parts)) => {
                    let mut t = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(s)) => t.push_str(s),
                            _ => {
                                return Err(ApiError::invalid(
                                    format!(
                                        "messages[{i}].content[{j}]: only text parts are supported"
                                    ),
                                    Some(&format!("messages[{i}].content[{j}]")),
                                ))
                            }
                        }
                    }
                    t
                }
            };
            let mut msg = json!({"role": m.role, "content": text});
            if let Some(calls) = m.tool_calls.as_ref().filter(|c| !c.is_empty()) {
                if m.role != "assistant" {
                    return Err(ApiError::invalid(
                        format!(
                            "messages[{i}].tool_calls: only assistant messages make tool calls"
                        ),
                        Some(&format!("messages[{i}].tool_calls")),
                    ));
                }
                msg["tool_calls"] = Value::Array(calls.clone());
                if m.content.is_none() {
                    msg["content"] = Value::Null;
                }
            }
            for (key, v) in [
                ("tool_call_id", &m.tool_call_id),
                ("name", &m.name),
                ("reasoning_content", &m.reasoning_content),
            ] {
                if let Some(v) = v {
                    msg[key] = json!(v);
                }
            }
            out.push(msg);
        }
        Ok(Value::Array(out))
    }
}

/// A completion prompt: text, or token ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<i64>),
}

/// `POST /v1/completions`.
#[derive(Debug, Clone)]
pub struct CompletionRequest {
    pub prompt: Prompt,
    pub common: CommonFields,
}

impl RouteRequest {
    /// Parses a request body.
    pub fn from_body(bytes: &[u8]) -> Result<Self, ApiError> {
        let v = parse_json(bytes)?;
        check_fields(Endpoint::Route, &v)?;
        from_value(&v)
    }
}

impl CompletionRequest {
    /// Parses a request body.
    pub fn from_body(bytes: &[u8]) -> Result<Self, ApiError> {
        let v = parse_json(bytes)?;
        check_fields(Endpoint::Completion, &v)?;
        let p: PromptOnly = from_value(&v)?;
        Ok(CompletionRequest {
            prompt: p.prompt,
            common: from_value(&v)?,
        })
    }
}

/// `POST /v1/route`: a chat conversation or a completion prompt, and the routing controls.
#[derive(Debug, Clone, Deserialize)]
pub struct RouteRequest {
    pub model: Option<String>,
    pub messages: Option<Vec<Message>>,
    pub prompt: Option<Prompt>,
    pub routing: Option<bool>,
    pub depth_bias: Option<f64>,
    pub max_passes: Option<i64>,
}

/// Token counts of a request.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

/// OpenAI's breakdown of the prompt tokens.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct PromptTokensDetails {
    /// Prompt tokens taken from the conversation cache.
    pub cached_tokens: usize,
}

impl Usage {
    pub fn new(prompt: usize, completion: usize, cached: usize) -> Self {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: cached,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        n_ctx: 2048,
        default_max_tokens: 256,
        n_layer: 30,
        n_vocab: 49152,
    };

    fn settings(body: &str) -> Result<GenSettings, ApiError> {
        let r = ChatRequest::from_body(body.as_bytes())?;
        r.common.validate(&LIMITS, Endpoint::Chat)
    }

    #[test]
    fn defaults_and_ranges() {
        let s = settings(r#"{"messages":[{"role":"user","content":"hi"}]}"#).unwrap();
        assert_eq!(s.max_tokens, 256);
        assert_eq!(s.routing.routing, None);
        assert!(!s.stream);
        let s = settings(
            r#"{"messages":[],"max_tokens":5,"stop":"x","stream":true,
                "stream_options":{"include_usage":true},"depth_bias":-1.5,"max_passes":20,
                "seed":7,"temperature":0}"#,
        )
        .unwrap();
        assert_eq!(
            (s.max_tokens, s.stop.clone(), s.include_usage, s.seed),
            (5, vec!["x".to_string()], true, Some(7))
        );
        assert_eq!(
            (s.routing.depth_bias, s.routing.max_passes),
            (-1.5, Some(20))
        );
    }

    #[test]
    fn rejects_out_of_range_fields_naming_them() {
        for (body, param) in [
            (r#"{"messages":[],"max_tokens":-1}"#, "max_tokens"),
            (r#"{"messages":[],"max_tokens":0}"#, "max_tokens"),
            (
                r#"{"messages":[],"max_tokens":99999999999999}"#,
                "max_tokens",
            ),
            (
                r#"{"messages":[],"max_completion_tokens":4096}"#,
                "max_completion_tokens",
            ),
            (r#"{"messages":[],"temperature":-0.1}"#, "temperature"),
            (r#"{"messages":[],"top_p":0}"#, "top_p"),
            (r#"{"messages":[],"top_k":-3}"#, "top_k"),
            (r#"{"messages":[],"n":0}"#, "n"),
            (r#"{"messages":[],"n":17}"#, "n"),
            (r#"{"messages":[],"seed":-1}"#, "seed"),
            (r#"{"messages":[],"max_passes":61}"#, "max_passes"),
            (r#"{"messages":[],"max_passes":0}"#, "max_passes"),
            (
                r#"{"messages":[],"presence_penalty":2.5}"#,
                "presence_penalty",
            ),
            (r#"{"messages":[],"logprobs":2}"#, "logprobs"),
            (r#"{"messages":[],"top_logprobs":1}"#, "top_logprobs"),
        ] {
            let e = settings(body).unwrap_err();
            assert_eq!(e.status, 400, "{body}");
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {e}");
        }
    }

    #[test]
    fn rejects_wrong_types_and_bad_json_with_the_field() {
        let e = settings(r#"{"messages":[],"max_tokens":"ten"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("max_tokens"), "{e}");
        assert!(e.message.contains("invalid type"), "{e}");
        let e = settings(r#"{"messages":"hi"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"), "{e}");
        let e = settings(r#"{"messages":[{"role":"user","content":"hi"}],"#).unwrap_err();
        assert!(e.message.starts_with("invalid JSON"), "{e}");
        assert_eq!(e.param, None);
        let e = settings("").unwrap_err();
        assert!(e.message.contains("empty"), "{e}");
        let e = settings(r#"{"model":"x"}"#).unwrap_err();
        assert!(e.message.contains("messages"), "{e}");
        let e = settings(r#"[1,2]"#).unwrap_err();
        assert_eq!(e.status, 400);
    }

    #[test]
    fn messages_are_checked() {
        let r = ChatRequest::from_body(
            br#"{"messages":[{"role":"developer","content":"be brief"},
                 {"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]}"#,
        )
        .unwrap();
        assert_eq!(
            r.messages().unwrap(),
            json!([{"role": "developer", "content": "be brief"},
                   {"role": "user", "content": "ab"}])
        );
        // tool calls and results pass through to llama.cpp's chat layer
        let r = ChatRequest::from_body(
            br#"{"messages":[{"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{}"}}]},
                 {"role":"tool","tool_call_id":"c1","name":"f","content":"42"}]}"#,
        )
        .unwrap();
        assert_eq!(
            r.messages().unwrap(),
            json!([{"role": "assistant", "content": null,
                    "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                   {"role": "tool", "content": "42", "tool_call_id": "c1", "name": "f"}])
        );
        let r = ChatRequest::from_body(
            br#"{"messages":[{"role":"user","content":"x","tool_calls":[{"id":"c1"}]}]}"#,
        )
        .unwrap();
        assert_eq!(
            r.messages().unwrap_err().param.as_deref(),
            Some("messages[0].tool_calls")
        );
        let r =
            ChatRequest::from_body(br#"{"messages":[{"role":"wizard","content":"x"}]}"#).unwrap();
        assert_eq!(
            r.messages().unwrap_err().param.as_deref(),
            Some("messages[0].role")
        );
        let r = ChatRequest::from_body(
            br#"{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{}}]}]}"#,
        )
        .unwrap();
        assert!(r.messages().is_err());
        let r = ChatRequest::from_body(br#"{"messages":[]}"#).unwrap();
        assert!(r.messages().is_err());
    }

    #[test]
    fn error_body_is_openai_shaped() {
        let b = ApiError::invalid("bad", Some("x")).with_code("c").body();
        assert_eq!(
            b,
            json!({"error":{"message":"bad","type":"invalid_request_error","param":"x","code":"c"}})
        );
    }
}
