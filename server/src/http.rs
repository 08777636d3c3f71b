//! HTTP: the route table, authentication, body limits, the handlers, and SSE streaming.

use crate::access::{self, Allowed};
use crate::api::{
    self, ApiError, ChatRequest, CompletionRequest, Endpoint, GenSettings, Limits, Prompt,
    RouteRequest, Usage,
};
use crate::clock;
use crate::embeddings::EmbeddingRequest;
use crate::logprobs;
use crate::pool::{Event, Job, Outcome, Refused, Task};
use crate::reload::Reload;
use crate::tools::{ChatShape, ChoiceParser, Tools};
use crate::{Ready, State};
use bytes::Bytes;
use drllm_engine::{
    ChatInput, ChatPrompt, FinishReason, GenerateOptions, Grammar, SamplingParams, Tokenizer,
    ToolChoice,
};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Every route the server answers. [`dispatch`] matches on it, so the compiler checks that
/// each route has a handler; its path, method, metric label and token rule are below.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Health,
    Metrics,
    Models,
    /// The routes that run the model on a request body: chat, completion and route.
    Run(Endpoint),
    Embeddings,
    Routers,
    Reload,
}

impl Route {
    /// Every route, in the order the API documents them.
    pub const ALL: [Route; 9] = [
        Route::Health,
        Route::Metrics,
        Route::Models,
        Route::Run(Endpoint::Chat),
        Route::Run(Endpoint::Completion),
        Route::Run(Endpoint::Route),
        Route::Embeddings,
        Route::Routers,
        Route::Reload,
    ];

    /// The route at `path` (None: 404).
    pub fn find(path: &str) -> Option<Route> {
        Route::ALL.into_iter().find(|r| r.path() == path)
    }

    pub fn path(self) -> &'static str {
        match self {
            Route::Health => "/health",
            Route::Metrics => "/metrics",
            Route::Models => "/v1/models",
            Route::Run(Endpoint::Chat) => "/v1/chat/completions",
            Route::Run(Endpoint::Completion) => "/v1/completions",
            Route::Run(Endpoint::Route) => "/v1/route",
            Route::Embeddings => "/v1/embeddings",
            Route::Routers => "/v1/routers",
            Route::Reload => "/v1/routers/reload",
        }
    }

    /// The method the route answers (OPTIONS aside; any other gets 405).
    pub fn method(self) -> Method {
        match self {
            Route::Health | Route::Metrics | Route::Models | Route::Routers => Method::GET,
            Route::Run(_) | Route::Embeddings | Route::Reload => Method::POST,
        }
    }

    /// The `route` label of `drllm_requests_total` (and the routing log's endpoint name).
    pub fn label(self) -> &'static str {
        match self {
            Route::Health => "health",
            Route::Metrics => "metrics",
            Route::Models => "models",
            Route::Run(Endpoint::Chat) => "chat",
            Route::Run(Endpoint::Completion) => "completion",
            Route::Run(Endpoint::Route) => "route",
            Route::Embeddings => "embeddings",
            Route::Routers => "routers",
            Route::Reload => "reload",
        }
    }

    /// Whether the bearer token is required (when the server has one).
    pub fn needs_token(self) -> bool {
        !matches!(self, Route::Health)
    }
}

/// A response body: a whole buffer, or a stream of SSE chunks fed by a task.
pub enum ResBody {
    Full(Full<Bytes>),
    Stream(mpsc::Receiver<Bytes>),
}

impl Body for ResBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            ResBody::Full(f) => Pin::new(f).poll_frame(cx),
            ResBody::Stream(rx) => rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResBody::Full(f) => f.is_end_stream(),
            ResBody::Stream(_) => false,
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            // a known length: Content-Length instead of chunked encoding
            ResBody::Full(f) => f.size_hint(),
            ResBody::Stream(_) => hyper::body::SizeHint::default(),
        }
    }
}

fn json_response(status: u16, v: &Value) -> Response<ResBody> {
    let mut r = Response::new(ResBody::Full(Full::new(Bytes::from(v.to_string()))));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error_response(e: &ApiError) -> Response<ResBody> {
    let mut r = json_response(e.status, &e.body());
    if e.status == 401 {
        r.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            hyper::header::HeaderValue::from_static("Bearer"),
        );
    }
    if e.status == 408 {
        // the rest of a stalled body is not read: the connection cannot be reused
        r.headers_mut().insert(
            hyper::header::CONNECTION,
            hyper::header::HeaderValue::from_static("close"),
        );
    }
    if e.status == 503 {
        // busy or loading: well-behaved clients wait a moment before retrying
        r.headers_mut().insert(
            hyper::header::RETRY_AFTER,
            hyper::header::HeaderValue::from_static("1"),
        );
    }
    r
}

/// Constant-time comparison of the bearer token.
fn token_ok(req: &Request<Incoming>, key: &str) -> bool {
    let Some(h) = req.headers().get(hyper::header::AUTHORIZATION) else {
        return false;
    };
    let Some(given) = h.to_str().ok().and_then(|s| s.strip_prefix("Bearer ")) else {
        return false;
    };
    let (a, b) = (given.trim().as_bytes(), key.as_bytes());
    let mut diff = (a.len() != b.len()) as u8;
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

/// Entry point for every request.
pub async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<ResBody>, Infallible> {
    let path = req.uri().path().to_string();
    let route = Route::find(&path);
    let name = route.map_or("unknown", Route::label);
    // the Host and Origin checks come first: a page the user visits learns nothing, not even
    // which routes exist
    let resp = match state.access.check(req.headers()) {
        Err(e) => error_response(&e),
        Ok(allowed) => {
            let mut r = match route {
                None => error_response(&ApiError::not_found(
                    format!("no route {path}"),
                    "unknown_route",
                )),
                Some(route) => serve_route(&state, route, &allowed, req).await,
            };
            if let Allowed::Cors(origin) = &allowed {
                if !r.headers().contains_key("access-control-allow-origin") {
                    access::cors_headers(r.headers_mut(), origin);
                }
            }
            r
        }
    };
    if let Some(ready) = state.ready.get() {
        ready.metrics.request(name, resp.status().as_u16());
    }
    Ok(resp)
}

/// A request for a known route from an allowed client: method, preflight, token, handler.
async fn serve_route(
    state: &Arc<State>,
    route: Route,
    allowed: &Allowed,
    req: Request<Incoming>,
) -> Response<ResBody> {
    let method = route.method();
    let methods = format!("{method}, OPTIONS");
    if req.method() == Method::OPTIONS {
        // a CORS preflight from an allowed origin, or a plain OPTIONS: no token needed
        let mut r = Response::new(ResBody::Full(Full::new(Bytes::new())));
        *r.status_mut() = StatusCode::NO_CONTENT;
        if let Allowed::Cors(origin) = allowed {
            if req.headers().contains_key("access-control-request-method") {
                access::preflight_headers(r.headers_mut(), origin, req.headers(), &methods);
            }
        }
        if let Ok(v) = hyper::header::HeaderValue::from_str(&methods) {
            r.headers_mut().insert(hyper::header::ALLOW, v);
        }
        return r;
    }
    if req.method() != method {
        let mut r = error_response(&ApiError::method_not_allowed(method.as_str()));
        if let Ok(v) = hyper::header::HeaderValue::from_str(&methods) {
            r.headers_mut().insert(hyper::header::ALLOW, v);
        }
        return r;
    }
    if route.needs_token()
        && state
            .config
            .api_key
            .as_deref()
            .is_some_and(|k| !token_ok(&req, k))
    {
        return error_response(&ApiError::unauthorized());
    }
    match dispatch(state, route, req).await {
        Ok(r) => r,
        Err(e) => error_response(&e),
    }
}

fn ready(state: &State) -> Result<&Arc<Ready>, ApiError> {
    state
        .ready
        .get()
        .ok_or_else(|| ApiError::unavailable("the model is loading", "loading"))
}

/// Reads a body of at most `max_body_bytes`, within `body_timeout` (a client that stalls
/// is answered 408 and the connection closed).
async fn read_body(state: &State, req: Request<Incoming>) -> Result<Bytes, ApiError> {
    let limit = state.config.max_body_bytes;
    let read = Limited::new(req.into_body(), limit).collect();
    match tokio::time::timeout(state.config.body_timeout, read).await {
        Err(_) => Err(ApiError::timeout(state.config.body_timeout)),
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::too_large(limit)),
        Ok(Err(e)) => Err(ApiError::invalid(format!("reading the body: {e}"), None)),
    }
}

fn refused(r: Refused) -> ApiError {
    match r {
        Refused::Busy => ApiError::unavailable(
            "server busy: the request queue is full, retry later",
            "server_busy",
        ),
        Refused::NoWorkers => {
            ApiError::unavailable("no worker is left to run requests", "no_workers")
        }
    }
}

/// The handler of each route.
async fn dispatch(
    state: &Arc<State>,
    route: Route,
    req: Request<Incoming>,
) -> Result<Response<ResBody>, ApiError> {
    match route {
        Route::Health => Ok(health(state)),
        Route::Metrics => Ok(metrics(ready(state)?)),
        Route::Models => Ok(models(state, ready(state)?)),
        Route::Routers => {
            let r = ready(state)?;
            Ok(json_response(200, &routers_info(state, r)))
        }
        Route::Reload => reload(state).await,
        Route::Run(endpoint) => {
            let r = ready(state)?.clone();
            // a full queue answers before the body is read, parsed and tokenized
            r.pool.admits().map_err(refused)?;
            let body = read_body(state, req).await?;
            completion(state, &r, endpoint, body).await
        }
        Route::Embeddings => {
            let r = ready(state)?.clone();
            r.pool.admits().map_err(refused)?;
            let body = read_body(state, req).await?;
            embeddings(state, &r, body).await
        }
    }
}

/// `GET /health`: 200 while a worker is alive (degraded when some died), 503 loading or
/// with none left.
fn health(state: &State) -> Response<ResBody> {
    match state.ready.get() {
        Some(r) => {
            let (alive, started) = (r.pool.workers_alive(), r.pool.workers());
            let (code, status) = match alive {
                0 => (503, "no_workers"),
                n if n < started => (200, "degraded"),
                _ => (200, "ok"),
            };
            json_response(
                code,
                &json!({"status": status, "workers": alive, "workers_started": started}),
            )
        }
        None => json_response(503, &json!({"status": "loading"})),
    }
}

/// `GET /metrics`: the Prometheus text.
fn metrics(r: &Ready) -> Response<ResBody> {
    let mut resp = Response::new(ResBody::Full(Full::new(Bytes::from(r.metrics.render()))));
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    resp
}

/// `GET /v1/models`: the one model, with drllm's extras.
fn models(state: &State, r: &Ready) -> Response<ResBody> {
    json_response(
        200,
        &json!({"object": "list", "data": state.config.model_alias.iter().map(|name| json!({
            "id": name,
            "object": "model",
            "created": r.created,
            "owned_by": "drllm",
            "drllm": {
                "n_layer": r.model.n_layer(),
                "n_ctx": state.config.ctx_size,
                "router_generation": r.routers.current().map(|g| g.generation().to_string()),
                "model_id": state.config.model_id(),
            },
        })).collect::<Vec<_>>()}),
    )
}

/// `POST /v1/routers/reload`: reads the sidecar again (off the async threads).
async fn reload(state: &Arc<State>) -> Result<Response<ResBody>, ApiError> {
    let r = ready(state)?.clone();
    let slot = r.routers.clone();
    let outcome = tokio::task::spawn_blocking(move || slot.reload())
        .await
        .map_err(|e| ApiError::internal(format!("reload task: {e}")))?;
    let info = routers_info(state, &r);
    match outcome {
        Reload::Failed { message } => Err(ApiError {
            status: 422,
            message: format!(
                "the sidecar failed validation; the previous generation keeps serving: {message}"
            ),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_sidecar"),
        }),
        Reload::Disabled => Err(ApiError::invalid(
            "routing is disabled on this server (--no-routers)",
            None,
        )
        .with_code("routing_disabled")),
        other => {
            let (result, generation) = match other {
                Reload::Loaded { generation } => ("loaded", Some(generation)),
                Reload::Unchanged { generation } => ("unchanged", Some(generation)),
                _ => ("removed", None),
            };
            Ok(json_response(
                200,
                &json!({"result": result, "generation": generation, "routers": info}),
            ))
        }
    }
}

fn routers_info(state: &State, r: &Ready) -> Value {
    let (loaded_at, last_error) = r.routers.status();
    let loaded_at = loaded_at
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs());
    let current = r.routers.current();
    json!({
        "enabled": r.routers.path().is_some(),
        "path": r.routers.path().map(|p| p.display().to_string()),
        "generation": current.as_ref().map(|g| g.generation().to_string()),
        "loaded_at": loaded_at,
        "last_error": last_error,
        "reload_failures": r.metrics.reload_failures(),
        "model": state.config.model_id(),
        "sidecar": current.as_ref().map(|g| {
            let s = g.sidecar();
            json!({
                "format_version": s.version,
                "base": {
                    "architecture": s.base.architecture,
                    "block_count": s.base.block_count,
                    "hidden_size": s.base.hidden_size,
                    "fingerprint": s.base.fingerprint,
                },
                "provenance": {
                    "dataset": s.provenance.dataset,
                    "search": s.provenance.search,
                    "training": s.provenance.training,
                    "metrics": s.provenance.metrics,
                    "created": s.provenance.created,
                    "tool": s.provenance.tool,
                    "notes": s.provenance.notes,
                },
            })
        }),
    })
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn new_id(prefix: &str) -> String {
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{:x}{n:06x}", std::process::id())
}

/// A conversation as llama.cpp's chat layer rendered it, and the text the answer starts with.
struct Rendered {
    prompt: ChatPrompt,
    /// Put at the end of the prompt and read by the parser before the generated text: the
    /// format's tool-call marker when a call is required.
    answer_prefix: String,
}

/// A conversation rendered by llama.cpp's chat layer (with the request's tools), its
/// template checked to call tools when the request lets the model call them.
///
/// A required call (`tool_choice` required or a named function) starts the answer at the
/// tool-call marker: llama.cpp's grammar for `required` lets free text come first, and a small
/// model then talks until max_tokens instead of calling. The marker is llama.cpp's own (the
/// word that triggers the same format's lazy grammar under `auto`); it goes at the end of the
/// prompt, the grammar accepts it before the first sampled token, and the parser reads it
/// before the answer. A format without such a word keeps llama.cpp's grammar as it is.
fn render_chat(r: &Ready, messages: &Value, tools: Option<&Tools>) -> Result<Rendered, ApiError> {
    if !r.tokenizer.has_chat_template() {
        return Err(ApiError::invalid(
            "the model has no chat template: use /v1/completions with a prompt, or give one \
             with --chat-template-file",
            Some("messages"),
        ));
    }
    let chat = r
        .tokenizer
        .chat()
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let unsupported = || {
        ApiError::invalid(
            "this model's chat template cannot call tools (llama.cpp finds no tool-call format \
             in it, and would leave the tools out of the prompt); serve the model with a \
             template that can, e.g. --chat-template-file templates/chatml-tools.jinja for a \
             ChatML model",
            Some("tools"),
        )
        .with_code("tools_unsupported")
    };
    let active = tools.filter(|t| t.active());
    if active.is_some() && !chat.calls_tools().unwrap_or(false) {
        return Err(unsupported());
    }
    let mut input = ChatInput::messages(messages);
    if let Some(t) = tools {
        input.tools = Some(&t.tools);
        input.tool_choice = t.choice;
        input.parallel_tool_calls = t.parallel;
    }
    let apply = |input: &ChatInput<'_>| {
        chat.apply(input)
            .map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))
    };
    let mut answer_prefix = String::new();
    if active.is_some_and(|t| t.choice == ToolChoice::Required) {
        let auto = apply(&ChatInput {
            tool_choice: ToolChoice::Auto,
            ..input.clone()
        })?;
        // not inside a reasoning block the generation prompt opens: the tag would be reasoning
        if let Some(m) = auto
            .grammar_triggers
            .iter()
            .find(|t| t.kind == "word" && !t.value.is_empty())
            .filter(|_| !reasoning_open(&auto))
        {
            answer_prefix = m.value.clone();
        }
    }
    input.answer_prefix = &answer_prefix;
    let p = apply(&input)?;
    if active.is_some_and(|t| t.choice == ToolChoice::Required) && p.grammar.is_empty() {
        return Err(unsupported());
    }
    Ok(Rendered {
        prompt: p,
        answer_prefix: answer_prefix.clone(),
    })
}

/// Whether the answer starts inside a reasoning block: the generation prompt opens one (its
/// last thinking tag is the start tag).
fn reasoning_open(p: &ChatPrompt) -> bool {
    let start = p.thinking_start_tag.trim();
    if !p.supports_thinking || start.is_empty() {
        return false;
    }
    let Some(opened) = p.generation_prompt.rfind(start) else {
        return false;
    };
    !p.thinking_end_tags
        .iter()
        .map(|t| t.trim())
        .filter(|t| !t.is_empty())
        .any(|t| p.generation_prompt[opened..].contains(t))
}

/// Turns the request into prompt tokens, checked against the context (a chat: rendered by
/// llama.cpp's chat layer, returned too).
fn prompt_tokens(
    state: &State,
    r: &Ready,
    messages: Option<&Value>,
    tools: Option<&Tools>,
    prompt: Option<&Prompt>,
) -> Result<(Vec<i32>, Option<Rendered>), ApiError> {
    let mut chat = None;
    let tokens = match (messages, prompt) {
        (Some(msgs), _) => {
            let p = render_chat(r, msgs, tools)?;
            let tokens = r.tokenizer.tokenize(&p.prompt.prompt, true, true);
            chat = Some(p);
            tokens
        }
        (None, Some(Prompt::Text(t))) => r.tokenizer.tokenize(t, true, false),
        (None, Some(Prompt::Texts(v))) => match v.as_slice() {
            [t] => r.tokenizer.tokenize(t, true, false),
            _ => {
                return Err(ApiError::invalid(
                    "prompt: give one string (batches of prompts are not supported)",
                    Some("prompt"),
                ))
            }
        },
        (None, Some(Prompt::Tokens(ids))) => {
            let n_vocab = r.model.n_vocab() as i64;
            let mut out = Vec::with_capacity(ids.len());
            for (i, &t) in ids.iter().enumerate() {
                if !(0..n_vocab).contains(&t) {
                    return Err(ApiError::invalid(
                        format!("prompt[{i}] = {t} is not a token id (0..{n_vocab})"),
                        Some("prompt"),
                    ));
                }
                out.push(t as i32);
            }
            out
        }
        (None, None) => {
            return Err(ApiError::invalid(
                "give messages (a chat) or prompt (text)",
                None,
            ))
        }
    };
    if tokens.is_empty() {
        return Err(ApiError::invalid("the prompt is empty", Some("prompt")));
    }
    let n_ctx = state.config.ctx_size;
    if tokens.len() >= n_ctx {
        return Err(ApiError::invalid(
            format!(
                "this model's context is {n_ctx} tokens; the prompt has {} (nothing left to generate)",
                tokens.len()
            ),
            Some(if prompt.is_some() { "prompt" } else { "messages" }),
        )
        .with_code("context_length_exceeded"));
    }
    Ok((tokens, chat))
}

struct Parsed {
    messages: Option<Value>,
    tools: Option<Tools>,
    prompt: Option<Prompt>,
    settings: GenSettings,
}

fn parse(state: &State, r: &Ready, endpoint: Endpoint, body: &[u8]) -> Result<Parsed, ApiError> {
    let limits = Limits {
        n_ctx: state.config.ctx_size,
        default_max_tokens: state.config.default_max_tokens,
        n_layer: r.model.n_layer(),
        n_vocab: r.model.n_vocab(),
    };
    match endpoint {
        Endpoint::Chat => {
            let q = ChatRequest::from_body(body)?;
            let settings = q.common.validate(&limits, endpoint)?;
            Ok(Parsed {
                messages: Some(q.messages()?),
                tools: q.tools.clone(),
                prompt: None,
                settings,
            })
        }
        Endpoint::Completion => {
            let q = CompletionRequest::from_body(body)?;
            let settings = q.common.validate(&limits, endpoint)?;
            Ok(Parsed {
                messages: None,
                tools: None,
                prompt: Some(q.prompt),
                settings,
            })
        }
        Endpoint::Route => {
            let q = RouteRequest::from_body(body)?;
            let common = api::CommonFields {
                routing: q.routing,
                depth_bias: q.depth_bias,
                max_passes: q.max_passes,
                ..Default::default()
            };
            let settings = common.validate(&limits, endpoint)?;
            let messages = match &q.messages {
                Some(m) => Some(
                    ChatRequest {
                        messages: m.clone(),
                        common: Default::default(),
                        tools: None,
                    }
                    .messages()?,
                ),
                None => None,
            };
            if messages.is_some() && q.prompt.is_some() {
                return Err(ApiError::invalid("give messages or prompt, not both", None));
            }
            Ok(Parsed {
                messages,
                tools: None,
                prompt: q.prompt,
                settings,
            })
        }
    }
}

fn drllm_object(o: &Outcome) -> Value {
    json!({
        "path": o.path.to_string(),
        "passes": o.path.len(),
        "n_layer": o.path.n_layer(),
        "skipped": o.path.skipped(),
        "repeated": o.path.repeated(),
        "routed": o.routed,
        "router_generation": o.generation,
        "cached_tokens": o.n_cached,
        "timings": {
            "queue_ms": o.queue_secs * 1e3,
            "prefill_ms": o.prefill_secs * 1e3,
            "decode_ms": o.decode_secs * 1e3,
            "decode_tokens_per_second": if o.decode_secs > 0.0 { o.n_completion as f64 / o.decode_secs } else { 0.0 },
        },
    })
}

/// A request that runs the model (chat, completion, route), its body read: parsed and
/// tokenized, queued, then answered whole or streamed.
async fn completion(
    state: &Arc<State>,
    r: &Arc<Ready>,
    endpoint: Endpoint,
    body: Bytes,
) -> Result<Response<ResBody>, ApiError> {
    let Prepared {
        settings: s,
        prompt,
        grammar,
        echo,
        chat,
    } = prepare(state, r, endpoint, body).await?;
    if s.routing.routing == Some(true) && r.routers.current().is_none() {
        return Err(ApiError::no_routers());
    }
    let id = new_id(match endpoint {
        Endpoint::Chat => "chatcmpl",
        Endpoint::Completion => "cmpl",
        Endpoint::Route => "route",
    });
    let shape = Shape {
        tokenizer: r.tokenizer.clone(),
        logprobs: s.logprobs.is_some(),
        echo: echo.map(|text| (text, prompt.first().copied().unwrap_or(0))),
        n: s.n,
        chat: chat.clone(),
    };
    let task = task(endpoint, &s, prompt, grammar, chat.as_ref());
    let streamed = s.stream && endpoint != Endpoint::Route;
    // small buffers: a worker runs at most a few tokens ahead of a client, so a disconnect
    // stops it quickly
    let (tx, rx) = mpsc::channel::<Event>(8);
    let job = Job {
        id: id.clone(),
        endpoint: Route::Run(endpoint).label(),
        task,
        routing: s.routing.clone(),
        events: tx,
        stream_text: streamed,
        arrived: Instant::now(),
        arrived_unix: clock::unix_now(),
    };
    r.pool.submit(job).map_err(refused)?;
    let created = clock::unix_now() as u64;
    let model = state.config.model_id().to_string();
    if streamed {
        return Ok(stream_response(
            rx,
            id,
            created,
            model,
            endpoint == Endpoint::Chat,
            s.include_usage,
            shape,
        ));
    }
    let o = collect(rx).await?;
    Ok(json_response(
        200,
        &answer(endpoint, id, created, model, &o, &shape),
    ))
}

/// What a request runs with, once parsed.
struct Prepared {
    settings: GenSettings,
    prompt: Vec<i32>,
    grammar: Option<Grammar>,
    /// With `echo`: the prompt's text, returned before the answer.
    echo: Option<String>,
    /// A chat: how llama.cpp's chat layer rendered it (its parser reads the answer back).
    chat: Option<ChatShape>,
}

/// How an answer is written beyond its text: token texts for logprobs, the echoed prompt.
struct Shape {
    tokenizer: Arc<Tokenizer>,
    /// The request asked for logprobs.
    logprobs: bool,
    /// With `echo`: the prompt's text and its first token (which has no logprob).
    echo: Option<(String, i32)>,
    /// Choices.
    n: usize,
    /// A chat: its answers are read back by llama.cpp's chat parser.
    chat: Option<ChatShape>,
}

/// Most bytes of prompt logits an `echo` with `logprobs` may hold (every prompt row's).
const MAX_PROMPT_LOGITS_BYTES: usize = 1 << 30;

/// `POST /v1/embeddings`: parsed and tokenized off the async threads, then one job embeds
/// every input (each along its own routed, or plain, path).
async fn embeddings(
    state: &Arc<State>,
    r: &Arc<Ready>,
    body: Bytes,
) -> Result<Response<ResBody>, ApiError> {
    let (st, rd) = (state.clone(), r.clone());
    let req = tokio::task::spawn_blocking(move || {
        EmbeddingRequest::from_body(&body, &rd.tokenizer, st.config.ctx_size, rd.model.n_layer())
    })
    .await
    .map_err(|e| ApiError::internal(format!("request parsing task: {e}")))??;
    if req.routing == Some(true) && r.routers.current().is_none() {
        return Err(ApiError::no_routers());
    }
    let (tx, rx) = mpsc::channel::<Event>(8);
    let job = Job {
        id: new_id("embd"),
        endpoint: Route::Embeddings.label(),
        task: Task::Embed {
            inputs: req.inputs.clone(),
        },
        routing: api::RoutingSettings {
            routing: req.routing,
            depth_bias: req.depth_bias,
            max_passes: req.max_passes,
        },
        events: tx,
        stream_text: false,
        arrived: Instant::now(),
        arrived_unix: clock::unix_now(),
    };
    r.pool.submit(job).map_err(refused)?;
    let o = collect(rx).await?;
    let paths: Vec<String> = o.paths.iter().map(|p| p.to_string()).collect();
    Ok(json_response(
        200,
        &json!({
            "object": "list",
            "data": crate::embeddings::data(&o.embeddings, req.base64),
            "model": state.config.model_id(),
            "usage": {"prompt_tokens": o.n_prompt, "total_tokens": o.n_prompt},
            "drllm": {"paths": paths, "routed": o.routed, "router_generation": o.generation,
                      "n_layer": o.path.n_layer(),
                      "passes": o.paths.iter().map(|p| p.len()).collect::<Vec<_>>()},
        }),
    ))
}

/// Parses the body, compiles the grammar and tokenizes the prompt. CPU work on bodies of up
/// to max_body_bytes: off the async threads, so /health, /metrics and streams stay
/// responsive.
async fn prepare(
    state: &Arc<State>,
    r: &Arc<Ready>,
    endpoint: Endpoint,
    body: Bytes,
) -> Result<Prepared, ApiError> {
    let (st, rd) = (state.clone(), r.clone());
    tokio::task::spawn_blocking(move || {
        let p = parse(&st, &rd, endpoint, &body)?;
        // with one model served, whatever model a request names is answered by it (the
        // response's `model` says which), as llama-server does
        let tools_active = p.tools.as_ref().is_some_and(Tools::active);
        if tools_active && p.settings.constraint.is_some() {
            return Err(ApiError::invalid(
                "tools come with their own grammar: give response_format or grammar, or tools, \
                 not both (or tool_choice: none)",
                Some("tools"),
            ));
        }
        let (prompt, chat) =
            prompt_tokens(&st, &rd, p.messages.as_ref(), p.tools.as_ref(), p.prompt.as_ref())?;
        // a grammar (JSON mode, a schema, GBNF, tool calls) compiled against the vocabulary
        let grammar = match &p.settings.constraint {
            None if tools_active => match &chat {
                Some(c) => rd.tokenizer.chat_grammar(&c.prompt).map_err(|e| {
                    ApiError::invalid(format!("the tool-call grammar does not compile: {e}"), Some("tools"))
                })?,
                None => None,
            },
            None => None,
            Some(c) => Some(rd.tokenizer.grammar(&c.gbnf).map_err(|e| {
                let (what, code) = if c.param == "grammar" {
                    ("grammar", "invalid_grammar")
                } else {
                    ("grammar made from the JSON schema", "invalid_schema")
                };
                ApiError::invalid(format!("the {what} does not compile: {e}"), Some(c.param))
                    .with_code(code)
            })?),
        };
        let echo = p.settings.echo.then(|| match &p.prompt {
            Some(Prompt::Text(t)) => t.clone(),
            Some(Prompt::Texts(v)) => v.concat(),
            _ => rd.tokenizer.detokenize(&prompt),
        });
        let logits_bytes = prompt
            .len()
            .saturating_mul(rd.model.n_vocab())
            .saturating_mul(4);
        if echo.is_some() && p.settings.logprobs.is_some() && logits_bytes > MAX_PROMPT_LOGITS_BYTES {
            return Err(ApiError::invalid(
                format!(
                    "echo with logprobs keeps every prompt token's logits: {} tokens of a {}-token vocabulary are more than {} MiB",
                    prompt.len(),
                    rd.model.n_vocab(),
                    MAX_PROMPT_LOGITS_BYTES >> 20
                ),
                Some("echo"),
            ));
        }
        let chat = chat.map(|c| ChatShape {
            prompt: Arc::new(c.prompt),
            tools: tools_active,
            answer_prefix: c.answer_prefix,
            parallel: p.tools.as_ref().is_some_and(|t| t.parallel),
        });
        Ok::<_, ApiError>(Prepared {
            settings: p.settings,
            prompt,
            grammar,
            echo,
            chat,
        })
    })
    .await
    .map_err(|e| ApiError::internal(format!("request parsing task: {e}")))?
}

/// What a worker runs for the request: the path only (route), or a generation.
fn task(
    endpoint: Endpoint,
    s: &GenSettings,
    prompt: Vec<i32>,
    grammar: Option<Grammar>,
    chat: Option<&ChatShape>,
) -> Task {
    if endpoint == Endpoint::Route {
        return Task::Route { prompt };
    }
    // the chat format's own stop strings, and its tags that must come out as text
    let mut stop = s.stop.clone();
    let mut preserved_tokens = Vec::new();
    let mut tool_call_limit = None;
    if let Some(c) = chat {
        stop.extend(c.prompt.additional_stops.iter().cloned());
        preserved_tokens = c.prompt.preserved_token_ids.clone();
        // one call without parallel_tool_calls: stop when a second begins
        if c.tools && !c.parallel {
            tool_call_limit = Some(Box::new(drllm_engine::ToolCallLimit {
                chat: c.prompt.clone(),
                answer_prefix: c.answer_prefix.clone(),
                max_calls: 1,
            }));
        }
    }
    Task::Generate {
        prompt,
        opts: Box::new(GenerateOptions {
            max_tokens: s.max_tokens,
            sampling: SamplingParams {
                temperature: s.temperature,
                top_k: s.top_k,
                top_p: s.top_p,
                min_p: s.min_p,
                seed: s
                    .seed
                    .unwrap_or_else(|| clock::random_seed(NEXT_ID.load(Ordering::Relaxed))),
                repeat_penalty: s.penalties.repeat,
                repeat_last_n: s.penalties.last_n,
                frequency_penalty: s.penalties.frequency,
                presence_penalty: s.penalties.presence,
                logit_bias: s.logit_bias.clone(),
            },
            stop,
            ignore_eos: s.ignore_eos,
            grammar,
            logprobs: s.logprobs,
            prompt_logprobs: if s.echo { s.logprobs } else { None },
            preserved_tokens,
            tool_call_limit,
        }),
        cache_prompt: s.cache_prompt,
        n: s.n,
    }
}

/// The whole (non-streamed) answer to a finished job.
fn answer(
    endpoint: Endpoint,
    id: String,
    created: u64,
    model: String,
    o: &Outcome,
    shape: &Shape,
) -> Value {
    let usage = Usage::new(o.n_prompt, o.n_completion, o.n_cached);
    let tok = &shape.tokenizer;
    // every choice: the first is the outcome's own fields
    let first = (&o.text, o.finish, &o.logprobs);
    let all = std::iter::once(first).chain(o.more.iter().map(|c| (&c.text, c.finish, &c.logprobs)));
    match endpoint {
        Endpoint::Chat => {
            let choices: Vec<Value> = all
                .enumerate()
                .map(|(i, (text, finish, lps))| {
                    let (message, calls) = match &shape.chat {
                        Some(c) => {
                            let (_, m, calls) = ChoiceParser::new(tok, c).finish(text);
                            (m, calls)
                        }
                        None => (json!({"role": "assistant", "content": text}), false),
                    };
                    json!({"index": i,
                           "message": message,
                           "logprobs": shape.logprobs.then(|| logprobs::chat(tok, lps)),
                           "finish_reason": finish_reason(finish, calls)})
                })
                .collect();
            json!({
                "id": id, "object": "chat.completion", "created": created, "model": model,
                "choices": choices,
                "usage": usage,
                "drllm": drllm_object(o),
            })
        }
        Endpoint::Completion => {
            let choices: Vec<Value> = all
                .enumerate()
                .map(|(i, (generated, finish, lps))| {
                    let mut text = String::new();
                    let mut lp = logprobs::Completion::at(0);
                    if let Some((prompt, first)) = &shape.echo {
                        text.push_str(prompt);
                        lp.push_first(tok, *first);
                        for l in &o.prompt_logprobs {
                            lp.push(tok, l);
                        }
                    }
                    text.push_str(generated);
                    for l in lps {
                        lp.push(tok, l);
                    }
                    json!({"index": i, "text": text,
                           "logprobs": shape.logprobs.then(|| lp.take()),
                           "finish_reason": finish.as_str()})
                })
                .collect();
            json!({
                "id": id, "object": "text_completion", "created": created, "model": model,
                "choices": choices,
                "usage": usage,
                "drllm": drllm_object(o),
            })
        }
        Endpoint::Route => {
            let decisions: Vec<Value> = o
                .decisions
                .iter()
                .map(|d| {
                    json!({"block": d.block, "decision": d.name(), "passes": d.passes,
                           "chosen": d.chosen, "logits": d.logits})
                })
                .collect();
            json!({
                "id": id, "object": "route", "created": created, "model": model,
                "prompt_tokens": o.n_prompt,
                "drllm": drllm_object(o),
                "decisions": decisions,
            })
        }
    }
}

/// OpenAI's finish reason: `tool_calls` when an answer that ended by itself calls tools.
fn finish_reason(finish: FinishReason, calls: bool) -> &'static str {
    if calls && finish == FinishReason::Stop {
        "tool_calls"
    } else {
        finish.as_str()
    }
}

/// Waits for the job's end (non-streaming).
async fn collect(mut rx: mpsc::Receiver<Event>) -> Result<Outcome, ApiError> {
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Text { .. } => {}
            Event::Done(o) => return Ok(*o),
            Event::Failed(e) => return Err(e),
        }
    }
    Err(ApiError::internal(
        "the worker ended the request without an answer",
    ))
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// How often an idle stream (e.g. waiting in the queue) gets a keep-alive comment.
const KEEP_ALIVE: Duration = Duration::from_secs(10);

/// A streaming client that reads nothing for this long is dropped (its request cancelled), so
/// a stalled reader cannot hold a worker.
const CLIENT_STALL: Duration = Duration::from_secs(30);

/// Sends a chunk to the response body; false when the client is gone or stalled.
async fn send(tx: &mpsc::Sender<Bytes>, b: Bytes) -> bool {
    matches!(
        tokio::time::timeout(CLIENT_STALL, tx.send(b)).await,
        Ok(Ok(()))
    )
}

/// The chunks of one stream, each naming the response's id, object, time and model.
struct Chunks {
    id: String,
    object: &'static str,
    created: u64,
    model: String,
    chat: bool,
    shape: Shape,
    /// Each choice's completions logprobs so far (their text offsets run across chunks).
    completion_logprobs: Vec<logprobs::Completion>,
    /// A chat: each choice's answer as llama.cpp's parser reads it so far.
    parsers: Vec<ChoiceParser>,
}

impl Chunks {
    /// A chunk with `content` (chat: as the delta), the finish reason, and one more top-level
    /// field.
    fn chunk(
        &self,
        content: Option<&str>,
        finish: Option<&str>,
        extra: Option<(&str, Value)>,
    ) -> Value {
        self.chunk_with(0, content, Value::Null, finish, extra)
    }

    /// The chunks for more text of choice `index`, with the log-probabilities of its tokens
    /// (when the request asked; on the first chunk). A chat's text goes through its parser:
    /// the chunks carry the content, reasoning and tool-call deltas it finds (none while a
    /// tool call's tag is incomplete).
    fn text(&mut self, index: usize, text: &str, lps: &[drllm_engine::TokenLogprob]) -> Vec<Value> {
        let logprobs = if !self.shape.logprobs {
            Value::Null
        } else if self.chat {
            logprobs::chat(&self.shape.tokenizer, lps)
        } else {
            if self.completion_logprobs.len() <= index {
                self.completion_logprobs
                    .resize_with(index + 1, || logprobs::Completion::at(0));
            }
            let c = &mut self.completion_logprobs[index];
            for l in lps {
                c.push(&self.shape.tokenizer, l);
            }
            c.take()
        };
        if !self.chat {
            return vec![self.chunk_with(index, Some(text), logprobs, None, None)];
        }
        let mut deltas = match self.parser(index) {
            Some(p) => p.push(text),
            None => vec![json!({ "content": text })],
        };
        if deltas.is_empty() && !logprobs.is_null() {
            deltas.push(json!({}));
        }
        let mut logprobs = Some(logprobs);
        deltas
            .into_iter()
            .map(|d| self.delta(index, d, logprobs.take().unwrap_or(Value::Null), None))
            .collect()
    }

    /// Choice `index`'s parser (a chat's).
    fn parser(&mut self, index: usize) -> Option<&mut ChoiceParser> {
        let c = self.shape.chat.as_ref()?;
        while self.parsers.len() <= index {
            self.parsers
                .push(ChoiceParser::new(&self.shape.tokenizer, c));
        }
        self.parsers.get_mut(index)
    }

    /// A chat chunk with this delta.
    fn delta(&self, index: usize, delta: Value, logprobs: Value, finish: Option<&str>) -> Value {
        let mut v = self.chunk_with(index, None, logprobs, finish, None);
        v["choices"][0]["delta"] = delta;
        v
    }

    fn chunk_with(
        &self,
        index: usize,
        content: Option<&str>,
        logprobs: Value,
        finish: Option<&str>,
        extra: Option<(&str, Value)>,
    ) -> Value {
        let choice = if self.chat {
            let delta = match content {
                Some(c) => json!({"content": c}),
                None => json!({}),
            };
            json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
        } else {
            json!({"index": index, "text": content.unwrap_or(""), "logprobs": logprobs, "finish_reason": finish})
        };
        let mut v = json!({"id": self.id, "object": self.object, "created": self.created,
                           "model": self.model, "choices": [choice]});
        if let Some((k, x)) = extra {
            v[k] = x;
        }
        v
    }
}

/// An SSE response fed by a task from the job's events.
fn stream_response(
    events: mpsc::Receiver<Event>,
    id: String,
    created: u64,
    model: String,
    chat: bool,
    include_usage: bool,
    shape: Shape,
) -> Response<ResBody> {
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let chunks = Chunks {
        id,
        object,
        created,
        model,
        chat,
        shape,
        completion_logprobs: Vec::new(),
        parsers: Vec::new(),
    };
    tokio::spawn(pump(events, tx, chunks, include_usage));
    let mut r = Response::new(ResBody::Stream(rx));
    let h = r.headers_mut();
    h.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-cache"),
    );
    r
}

/// Feeds a stream: the role chunk (chat), the text as the worker sends it, keep-alive
/// comments while it is quiet, then the end (or the error) and `[DONE]`. Returning drops
/// `events`, which cancels the job if it is still running (the client is gone).
async fn pump(
    mut events: mpsc::Receiver<Event>,
    tx: mpsc::Sender<Bytes>,
    mut chunks: Chunks,
    include_usage: bool,
) {
    // the first chunk of each choice names the role, as OpenAI's streams do
    if chunks.chat {
        for index in 0..chunks.shape.n.max(1) {
            let mut first = chunks.chunk_with(index, None, Value::Null, None, None);
            first["choices"][0]["delta"] = json!({"role": "assistant", "content": ""});
            if !send(&tx, sse(&first)).await {
                return;
            }
        }
    }
    loop {
        let ev = match tokio::time::timeout(KEEP_ALIVE, events.recv()).await {
            Err(_) => {
                if tx
                    .send(Bytes::from_static(b": keep-alive\n\n"))
                    .await
                    .is_err()
                {
                    return; // client gone: dropping `events` cancels the job
                }
                continue;
            }
            Ok(None) => {
                let e = ApiError::internal("the worker ended the request without an answer");
                return send_error(&tx, &e).await;
            }
            Ok(Some(ev)) => ev,
        };
        match ev {
            Event::Text {
                index,
                text,
                logprobs,
            } => {
                for c in chunks.text(index, &text, &logprobs) {
                    if !send(&tx, sse(&c)).await {
                        return;
                    }
                }
            }
            Event::Failed(e) => return send_error(&tx, &e).await,
            Event::Done(o) => return send_end(&tx, &mut chunks, &o, include_usage).await,
        }
    }
}

/// The error as the stream's last chunk, then `[DONE]`.
async fn send_error(tx: &mpsc::Sender<Bytes>, e: &ApiError) {
    if send(tx, sse(&e.body())).await {
        let _ = send(tx, Bytes::from_static(b"data: [DONE]\n\n")).await;
    }
}

/// The finish chunk of each choice (the last with the drllm object; a chat's after the
/// deltas its parser finds in the whole answer), the usage chunk when asked for, `[DONE]`.
async fn send_end(tx: &mpsc::Sender<Bytes>, chunks: &mut Chunks, o: &Outcome, include_usage: bool) {
    let ends: Vec<(FinishReason, &str)> = std::iter::once((o.finish, o.text.as_str()))
        .chain(o.more.iter().map(|c| (c.finish, c.text.as_str())))
        .collect();
    for (index, &(f, text)) in ends.iter().enumerate() {
        let mut calls = false;
        if chunks.chat {
            if let Some(p) = chunks.parser(index) {
                let (deltas, _, c) = p.finish(text);
                calls = c;
                for d in deltas {
                    let _ = send(tx, sse(&chunks.delta(index, d, Value::Null, None))).await;
                }
            }
        }
        let extra = (index + 1 == ends.len()).then(|| ("drllm", drllm_object(o)));
        let last = chunks.chunk_with(
            index,
            None,
            Value::Null,
            Some(finish_reason(f, calls)),
            extra,
        );
        let _ = send(tx, sse(&last)).await;
    }
    if include_usage {
        let mut u = chunks.chunk(None, None, None);
        u["choices"] = json!([]);
        u["usage"] = json!(Usage::new(o.n_prompt, o.n_completion, o.n_cached));
        let _ = send(tx, sse(&u)).await;
    }
    let _ = send(tx, Bytes::from_static(b"data: [DONE]\n\n")).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generation_prompt_that_opens_reasoning_is_seen() {
        let prompt = |gp: &str, thinking: bool| -> ChatPrompt {
            serde_json::from_value(json!({
                "prompt": "", "grammar": "", "grammar_lazy": false, "grammar_triggers": [],
                "preserved_tokens": [], "additional_stops": [], "generation_prompt": gp,
                "format": 2, "format_name": "peg-native", "parser": "",
                "supports_thinking": thinking, "thinking_start_tag": "<think>",
                "thinking_end_tags": ["</think>"], "preserved_token_ids": [],
                "trigger_patterns": [], "trigger_tokens": [], "grammar_prefill_tokens": [],
            }))
            .unwrap()
        };
        assert!(reasoning_open(&prompt(
            "<|im_start|>assistant\n<think>\n",
            true
        )));
        assert!(!reasoning_open(&prompt(
            "<|im_start|>assistant\n<think>\n\n</think>\n\n",
            true
        )));
        assert!(!reasoning_open(&prompt("<|im_start|>assistant\n", true)));
        assert!(!reasoning_open(&prompt(
            "<|im_start|>assistant\n<think>\n",
            false
        )));
    }

    #[test]
    fn every_route_is_found_by_its_path_and_labelled_once() {
        let mut labels = std::collections::BTreeSet::new();
        for r in Route::ALL {
            assert_eq!(Route::find(r.path()), Some(r), "{r:?}");
            assert!(labels.insert(r.label()), "{r:?}: label {} twice", r.label());
        }
        assert_eq!(Route::find("/v1/nothing"), None);
        assert_eq!(Route::find("/health/"), None);
        // only /health answers without the token
        let open: Vec<Route> = Route::ALL
            .into_iter()
            .filter(|r| !r.needs_token())
            .collect();
        assert_eq!(open, [Route::Health]);
    }
}
