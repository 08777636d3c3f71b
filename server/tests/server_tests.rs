//! The daemon on a loopback port, driven over raw HTTP/1.1: completions (streaming and not)
//! checked against the engine run directly along the same path, routing information, health,
//! metrics, /v1/route, hot reload (replace, corrupt, delete), bad input, a full queue and
//! client disconnects.

use drllm_engine::router_format::{sidecar_path_for, StorageType};
use drllm_engine::{
    constant_sidecar, generate, ChatMessage, DeviceChoice, GenerateOptions, LayerPath, Model,
    Route, SamplingParams, Session, SessionOptions, Tokenizer,
};
use drllm_server::client::{self, Response as Resp};
use drllm_server::config::{ServeConfig, Settings};
use drllm_server::pool::{FaultHook, FaultPoint, Task};
use drllm_server::{start, ServerHandle};
use drllm_testkit::{prompt_text, write_tiny_model, Family, TinySpec};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Server {
    rt: tokio::runtime::Runtime,
    handle: Option<ServerHandle>,
    addr: SocketAddr,
    model: PathBuf,
    sidecar: PathBuf,
    db: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            self.rt.block_on(h.shutdown());
        }
    }
}

fn tiny_spec() -> TinySpec {
    let mut spec = TinySpec::default_for(Family::Llama);
    spec.with_chat_template = true;
    spec
}

fn tiny_model(dir: &Path, spec: &TinySpec) -> PathBuf {
    let p = dir.join("tiny.gguf");
    write_tiny_model(spec, &p).unwrap();
    p
}

/// Pass counts of the routers the tests install first: skip block 1, repeat block 3.
const COUNTS_A: [usize; 6] = [1, 0, 1, 2, 1, 1];
/// Their replacement: skip blocks 2 and 4.
const COUNTS_B: [usize; 6] = [1, 1, 0, 1, 0, 1];

fn write_routers(model: &Path, counts: &[usize], to: &Path) {
    let m = Model::load(model, DeviceChoice::Cpu).unwrap();
    let sc = constant_sidecar(&m, counts, Some(7)).unwrap();
    // written elsewhere, then renamed into place, as a trainer's export does
    let tmp = to.with_extension("new");
    sc.write(&tmp, StorageType::F32).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

fn server(f: impl FnOnce(&mut Settings)) -> Server {
    server_with(f, |_| {})
}

/// A server with settings `f` and, after they are resolved, changes `g` to the config (e.g.
/// a fault hook).
fn server_with(f: impl FnOnce(&mut Settings), g: impl FnOnce(&mut ServeConfig)) -> Server {
    server_on(&tiny_spec(), f, g)
}

/// A server on a tiny model of this spec.
fn server_on(
    spec: &TinySpec,
    f: impl FnOnce(&mut Settings),
    g: impl FnOnce(&mut ServeConfig),
) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), spec);
    let sidecar = sidecar_path_for(&model);
    write_routers(&model, &COUNTS_A, &sidecar);
    let db = dir.path().join("log/routing.sqlite");
    let mut s = Settings {
        model: Some(model.clone()),
        port: Some(0),
        threads: Some(1),
        ctx_size: Some(256),
        queue: Some(4),
        db: Some(db.clone()),
        reload_debounce_ms: Some(100),
        device: Some("cpu".into()),
        ..Default::default()
    };
    f(&mut s);
    let mut config = s.resolve().unwrap();
    g(&mut config);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut handle = rt.block_on(start(config)).unwrap();
    rt.block_on(handle.ready()).unwrap();
    let addr = handle.addr();
    Server {
        rt,
        handle: Some(handle),
        addr,
        model,
        sidecar,
        db,
        _dir: dir,
    }
}

/// Test helpers on the client's responses.
trait Checked {
    /// The body as JSON (panics with the body if it is not).
    fn v(&self) -> Value;
    /// An OpenAI-style error body; gives (type, param, code).
    fn error(&self) -> (String, Option<String>, Option<String>);
}

impl Checked for Resp {
    fn v(&self) -> Value {
        self.json()
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    fn error(&self) -> (String, Option<String>, Option<String>) {
        let v = self.v();
        let e = &v["error"];
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        (
            e["type"].as_str().unwrap_or_default().to_string(),
            e["param"].as_str().map(str::to_string),
            e["code"].as_str().map(str::to_string),
        )
    }
}

fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    token: Option<&str>,
) -> Resp {
    client::request(addr, method, path, body, token, Duration::from_secs(120)).unwrap()
}

fn post(addr: SocketAddr, path: &str, body: &Value) -> Resp {
    request(addr, "POST", path, Some(&body.to_string()), None)
}

fn get(addr: SocketAddr, path: &str) -> Resp {
    request(addr, "GET", path, None, None)
}

fn chat_body(words: usize, max_tokens: usize) -> Value {
    json!({
        "model": "tiny",
        "messages": [{"role": "system", "content": "be brief"},
                     {"role": "user", "content": prompt_text(words, 5)}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": true,
    })
}

/// The engine run directly: greedy generation along `path` (None: routed by the sidecar).
fn direct(
    model: &Path,
    messages: &[(&str, String)],
    path: &LayerPath,
    max_tokens: usize,
) -> (String, usize) {
    let m = Arc::new(Model::load(model, DeviceChoice::Cpu).unwrap());
    let tok = Tokenizer::load(model).unwrap();
    let msgs: Vec<ChatMessage> = messages
        .iter()
        .map(|(r, c)| ChatMessage::new(*r, c.clone()))
        .collect();
    let text = tok.apply_chat(&msgs, true).unwrap();
    let prompt = tok.tokenize(&text, true, true);
    let mut s = Session::new(
        m,
        SessionOptions {
            n_ctx: 256,
            n_threads: 1,
            ..Default::default()
        },
    )
    .unwrap();
    let g = generate(
        &mut s,
        &tok,
        &prompt,
        Route::Fixed(path),
        &GenerateOptions {
            max_tokens,
            sampling: SamplingParams::greedy(),
            stop: vec![],
            ignore_eos: true,
            ..Default::default()
        },
        |_| true,
    )
    .unwrap();
    (g.text, prompt.len())
}

fn path_of(counts: &[usize]) -> LayerPath {
    LayerPath::from_counts(counts).unwrap()
}

#[test]
fn chat_completion_follows_the_routed_path_and_matches_the_engine() {
    let s = server(|_| {});
    let r = post(s.addr, "/v1/chat/completions", &chat_body(6, 12));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("content-type"), Some("application/json"));
    // a whole body has its length (clients that cannot read chunked bodies still work)
    assert_eq!(
        r.header("content-length").map(str::parse::<usize>),
        Some(Ok(r.body.len()))
    );
    let v = r.v();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "tiny");
    let d = &v["drllm"];
    assert_eq!(d["routed"], true, "{v}");
    assert_eq!(d["path"], path_of(&COUNTS_A).to_string());
    assert_eq!(d["passes"], 6);
    assert_eq!(d["skipped"], json!([1]));
    assert_eq!(d["repeated"], json!([3]));
    assert!(d["router_generation"]
        .as_str()
        .unwrap()
        .starts_with("sha256:"));
    let (text, n_prompt) = direct(
        &s.model,
        &[("system", "be brief".into()), ("user", prompt_text(6, 5))],
        &path_of(&COUNTS_A),
        12,
    );
    assert_eq!(v["choices"][0]["message"]["content"], text);
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["prompt_tokens"], n_prompt);
    assert_eq!(v["usage"]["completion_tokens"], 12);
    assert_eq!(v["usage"]["total_tokens"], n_prompt + 12);

    // routing off for this request: the plain model, full depth
    let mut b = chat_body(6, 12);
    b["routing"] = json!(false);
    let v = post(s.addr, "/v1/chat/completions", &b).v();
    assert_eq!(v["drllm"]["routed"], false);
    assert_eq!(v["drllm"]["passes"], 6);
    let (plain, _) = direct(
        &s.model,
        &[("system", "be brief".into()), ("user", prompt_text(6, 5))],
        &LayerPath::full(6),
        12,
    );
    assert_eq!(v["choices"][0]["message"]["content"], plain);

    // a pass cap of 4: the repeat is not granted and the last blocks are cut
    let mut b = chat_body(6, 4);
    b["max_passes"] = json!(4);
    let v = post(s.addr, "/v1/chat/completions", &b).v();
    assert!(v["drllm"]["passes"].as_u64().unwrap() <= 4, "{v}");

    // text completion along the same path
    let r = post(
        s.addr,
        "/v1/completions",
        &json!({"prompt": prompt_text(5, 2), "max_tokens": 3, "temperature": 0, "ignore_eos": true}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.v();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["usage"]["completion_tokens"], 3);
    assert_eq!(v["drllm"]["skipped"], json!([1]));

    // the routing log has one row per request
    let since = 0.0;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let sum = drllm_server::db::summarise(&s.db, since, 1e12, 100).unwrap();
        if sum.requests == 4 {
            assert_eq!(sum.routed, 3);
            assert_eq!(sum.blocks[1], [3, 0, 0]);
            assert_eq!(sum.blocks[3][2], 2);
            break;
        }
        assert!(Instant::now() < deadline, "log has {} rows", sum.requests);
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn streaming_gives_the_same_text_with_routing_and_usage() {
    // every shared token restored (below: the same prompt again reuses all but its last)
    let s = server(|c| c.cache_exact = Some(false));
    let whole = post(s.addr, "/v1/chat/completions", &chat_body(4, 10)).v();
    let mut b = chat_body(4, 10);
    b["stream"] = json!(true);
    b["stream_options"] = json!({"include_usage": true});
    let r = post(s.addr, "/v1/chat/completions", &b);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    let ev = r.sse_data();
    assert_eq!(ev.last().copied(), Some("[DONE]"), "{}", r.body);
    let chunks: Vec<Value> = ev[..ev.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        text,
        whole["choices"][0]["message"]["content"].as_str().unwrap()
    );
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    let fin = chunks
        .iter()
        .find(|c| !c["choices"][0]["finish_reason"].is_null())
        .expect("a chunk with finish_reason");
    assert_eq!(fin["choices"][0]["finish_reason"], "length");
    assert_eq!(fin["drllm"]["path"], whole["drllm"]["path"]);
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    // the same prompt again: all but its last token come from the conversation cache
    let n_prompt = whole["usage"]["prompt_tokens"].as_u64().unwrap();
    let mut expected = whole["usage"].clone();
    expected["prompt_tokens_details"]["cached_tokens"] = json!(n_prompt - 1);
    assert_eq!(usage["usage"], expected);

    // text completions stream too
    let r = post(
        s.addr,
        "/v1/completions",
        &json!({"prompt": "a b c", "max_tokens": 3, "stream": true, "temperature": 0, "ignore_eos": true}),
    );
    let ev = r.sse_data();
    assert_eq!(ev.last().copied(), Some("[DONE]"));
    let first: Value = serde_json::from_str(ev[0]).unwrap();
    assert_eq!(first["object"], "text_completion");
}

#[test]
fn health_models_metrics_and_route() {
    let s = server(|_| {});
    let h = get(s.addr, "/health");
    assert_eq!((h.status, h.v()["status"].clone()), (200, json!("ok")));
    let m = get(s.addr, "/v1/models").v();
    assert_eq!(m["data"][0]["id"], "tiny");
    assert_eq!(m["data"][0]["drllm"]["n_layer"], 6);

    let r = post(
        s.addr,
        "/v1/route",
        &json!({"messages": [{"role": "user", "content": "a b c d"}]}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.v();
    assert_eq!(v["drllm"]["path"], path_of(&COUNTS_A).to_string());
    let dec = v["decisions"].as_array().unwrap();
    assert_eq!(dec.len(), 6);
    assert_eq!(dec[1]["decision"], "skip");
    assert_eq!(dec[3]["decision"], "repeat");
    assert_eq!(dec[3]["passes"], 2);
    // a huge positive depth bias lowers the skip logit below the others: no block is skipped
    let v = post(
        s.addr,
        "/v1/route",
        &json!({"prompt": "a b c d", "depth_bias": 5000}),
    )
    .v();
    assert_eq!(v["drllm"]["skipped"], json!([]), "{v}");
    assert_ne!(v["decisions"][1]["decision"], "skip", "{v}");

    post(s.addr, "/v1/chat/completions", &chat_body(3, 2));
    let t = get(s.addr, "/metrics");
    assert_eq!(t.status, 200);
    assert!(t.header("content-type").unwrap().starts_with("text/plain"));
    for line in [
        "drllm_requests_total{route=\"chat\",status=\"200\"} 1",
        "drllm_requests_total{route=\"route\",status=\"200\"} 2",
        "drllm_block_passes_total{block=\"1\",decision=\"skip\"} 2",
        "drllm_block_passes_total{block=\"1\",decision=\"repeat\"} 1",
        "drllm_block_passes_total{block=\"3\",decision=\"repeat\"} 3",
        "drllm_completion_tokens_total 2",
        "drllm_queue_depth 0",
        "drllm_router_reload_failures_total 0",
    ] {
        assert!(
            t.body.lines().any(|l| l == line),
            "missing {line}:\n{}",
            t.body
        );
    }
    let generation = get(s.addr, "/v1/routers").v()["generation"].clone();
    assert!(t.body.contains(&format!(
        "drllm_router_generation_info{{generation=\"{}\"}} 1",
        generation.as_str().unwrap()
    )));
}

#[test]
fn any_model_name_is_served_and_every_alias_is_listed() {
    let s = server(|c| c.model_alias = Some(vec!["tiny-a".into(), "gpt-4o-mini".into()]));
    let m = get(s.addr, "/v1/models").v();
    let ids: Vec<&str> = m["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["tiny-a", "gpt-4o-mini"]);
    assert_eq!(m["data"][1]["drllm"]["model_id"], "tiny-a");
    // an alias, a name never configured, none: all answered by the one model, named by its id
    for name in [json!("gpt-4o-mini"), json!("some-other-model"), Value::Null] {
        let mut body = chat_body(3, 2);
        body["model"] = name.clone();
        let r = post(s.addr, "/v1/chat/completions", &body);
        assert_eq!(r.status, 200, "{name}: {}", r.body);
        assert_eq!(r.v()["model"], "tiny-a");
        let mut body = json!({"prompt": "a b c", "max_tokens": 2});
        body["model"] = name.clone();
        assert_eq!(
            post(s.addr, "/v1/completions", &body).v()["model"],
            "tiny-a"
        );
    }
    // aliases are checked when the settings are read
    let dir = tempfile::tempdir().unwrap();
    for (bad, why) in [
        (vec![], "names no model"),
        (vec!["a".into(), "a".into()], "twice"),
        (vec![" ".into()], "empty"),
    ] {
        let e = Settings {
            model: Some(dir.path().join("m.gguf")),
            no_routers: Some(true),
            model_alias: Some(bad),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(e.to_string().contains(why), "{e}");
    }
}

#[test]
fn penalties_and_logit_bias_are_llama_cpp_samplers_checked_by_range() {
    let s = server(|c| c.no_routers = Some(true));
    let tok = Tokenizer::load(&s.model).unwrap();
    let cat = *tok.tokenize(" cat", false, false).last().unwrap();
    let completion = |extra: Value| {
        let mut b = json!({"prompt": "the dog sat on", "max_tokens": 4, "temperature": 0});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        post(s.addr, "/v1/completions", &b)
    };
    // a +100 bias makes the token every greedy choice; a ban keeps it out
    let r = completion(json!({"logit_bias": {cat.to_string(): 100}}));
    assert_eq!(r.status, 200, "{}", r.body);
    let piece = String::from_utf8(tok.token_bytes(cat)).unwrap();
    assert_eq!(r.v()["choices"][0]["text"], piece.repeat(4));
    let r = completion(json!({"logit_bias": [[cat, 100]], "frequency_penalty": 2.0,
                              "presence_penalty": 2.0, "repeat_penalty": 1.5}));
    assert_eq!(r.status, 200, "{}", r.body);
    // banning the plain model's first token changes the first token
    let first = |extra: Value| {
        let mut e = extra;
        e["max_tokens"] = json!(1);
        let r = completion(e);
        assert_eq!(r.status, 200, "{}", r.body);
        r.v()["choices"][0]["text"].as_str().unwrap().to_string()
    };
    let plain = first(json!({}));
    let id = *tok.tokenize(&plain, false, false).last().unwrap();
    assert_eq!(String::from_utf8(tok.token_bytes(id)).unwrap(), plain);
    let banned = first(json!({"logit_bias": {id.to_string(): false}}));
    assert_ne!(banned, plain);
    // the same through the engine directly: the server passes the settings on unchanged
    let m = Arc::new(Model::load(&s.model, DeviceChoice::Cpu).unwrap());
    let opts = GenerateOptions {
        max_tokens: 4,
        sampling: SamplingParams {
            frequency_penalty: 1.0,
            presence_penalty: 0.5,
            repeat_penalty: 1.2,
            repeat_last_n: 8,
            ..SamplingParams::greedy()
        },
        ..Default::default()
    };
    let mut sess = Session::new(
        m.clone(),
        SessionOptions {
            n_ctx: 256,
            n_threads: 1,
            n_ubatch: 512,
        },
    )
    .unwrap();
    let prompt = tok.tokenize("the dog sat on", true, false);
    let g = generate(
        &mut sess,
        &tok,
        &prompt,
        Route::Fixed(&LayerPath::full(m.n_layer())),
        &opts,
        |_| true,
    )
    .unwrap();
    let r = completion(json!({"frequency_penalty": 1.0, "presence_penalty": 0.5,
                              "repeat_penalty": 1.2, "repeat_last_n": 8}));
    assert_eq!(r.v()["choices"][0]["text"], g.text);
    // out of range, or not a token of the model: 400 naming the field
    for (extra, param) in [
        (json!({"frequency_penalty": 2.5}), "frequency_penalty"),
        (json!({"presence_penalty": -3}), "presence_penalty"),
        (json!({"repeat_penalty": 0}), "repeat_penalty"),
        (json!({"repeat_last_n": -2}), "repeat_last_n"),
        (json!({"repeat_last_n": 100000}), "repeat_last_n"),
        (json!({"logit_bias": {"cat": 1}}), "logit_bias"),
        (json!({"logit_bias": {"999999": 1}}), "logit_bias"),
        (json!({"logit_bias": {"5": 101}}), "logit_bias"),
        (json!({"logit_bias": [[5]]}), "logit_bias"),
        (json!({"logit_bias": "5"}), "logit_bias"),
    ] {
        let r = completion(extra.clone());
        assert_eq!(r.status, 400, "{extra}: {}", r.body);
        assert_eq!(r.error().1.as_deref(), Some(param), "{extra}");
    }
}

/// log-softmax of a row of logits.
fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let z: f64 = row.iter().map(|&l| f64::from(l - max).exp()).sum();
    row.iter()
        .map(|&l| f64::from(l) - f64::from(max) - z.ln())
        .collect()
}

/// The `n` most likely tokens of a row, most likely first.
fn top_of(lp: &[f64], n: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..lp.len()).collect();
    idx.sort_by(|&a, &b| lp[b].total_cmp(&lp[a]).then(a.cmp(&b)));
    idx.truncate(n);
    idx
}

#[test]
fn logprobs_are_stock_llama_cpp_log_softmax_for_prompt_and_answer() {
    let s = server(|c| c.no_routers = Some(true));
    let tok = Tokenizer::load(&s.model).unwrap();
    let text = "the red dog sat on the big mat by the cat";
    let prompt = tok.tokenize(text, true, false);
    // stock llama.cpp: every prompt row, then three greedy steps
    let sm = drllm_engine::stock::StockModel::load(&s.model, DeviceChoice::Cpu).unwrap();
    let mut c = sm.context(256, 1, 512).unwrap();
    let n_vocab = c.n_vocab();
    let rows: Vec<Vec<f32>> = c
        .eval(&prompt, true)
        .unwrap()
        .chunks(n_vocab)
        .map(<[f32]>::to_vec)
        .collect();
    // generation as llama.cpp runs it: the prompt's last row only, then one token at a time
    // (a last-row-only prefill rounds differently from an all-rows one)
    c.reset();
    let mut gen_rows = vec![c.eval(&prompt, false).unwrap()];
    let mut answer = Vec::new();
    for _ in 0..3 {
        let t = drllm_engine::argmax(gen_rows.last().unwrap());
        answer.push(t);
        gen_rows.push(c.decode(t).unwrap().to_vec());
    }
    // echo + logprobs + max_tokens 0: the prompt's tokens scored, the first without a value
    let r = post(
        s.addr,
        "/v1/completions",
        &json!({"prompt": text, "echo": true, "logprobs": 3, "max_tokens": 0}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.v();
    let ch = &v["choices"][0];
    assert_eq!(ch["text"], text);
    let lp = &ch["logprobs"];
    let tokens = lp["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), prompt.len());
    assert!(lp["token_logprobs"][0].is_null() && lp["top_logprobs"][0].is_null());
    for i in 1..prompt.len() {
        let want = log_softmax(&rows[i - 1]);
        let got = lp["token_logprobs"][i].as_f64().unwrap();
        assert!(
            (got - want[prompt[i] as usize]).abs() < 1e-3,
            "token {i}: {got} vs {}",
            want[prompt[i] as usize]
        );
        let top = lp["top_logprobs"][i].as_object().unwrap();
        let mut seen = std::collections::HashSet::new();
        for t in top_of(&want, 3) {
            let key = String::from_utf8_lossy(&tok.token_bytes(t as i32)).into_owned();
            // tokens of the same text share a key: the more likely one's value is kept
            if !seen.insert(key.clone()) {
                continue;
            }
            let x = top[&key]
                .as_f64()
                .unwrap_or_else(|| panic!("token {i}: {key:?} missing in {top:?}"));
            assert!((x - want[t]).abs() < 1e-3);
        }
        assert_eq!(
            tokens[i],
            String::from_utf8_lossy(&tok.token_bytes(prompt[i])).as_ref()
        );
    }
    assert_eq!(v["usage"]["completion_tokens"], 0);
    // the answer's tokens: greedy, each with its log-probability under the raw logits
    let r = post(
        s.addr,
        "/v1/completions",
        &json!({"prompt": text, "logprobs": 2, "max_tokens": 3, "temperature": 0,
                "cache_prompt": false}),
    );
    let lp = r.v()["choices"][0]["logprobs"].clone();
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 3, "{lp}");
    let mut offset = 0;
    for (k, &t) in answer.iter().enumerate() {
        let want = log_softmax(&gen_rows[k])[t as usize];
        let got = lp["token_logprobs"][k].as_f64().unwrap();
        assert!((got - want).abs() < 1e-3, "step {k}: {got} vs {want}");
        assert_eq!(lp["text_offset"][k], offset);
        offset += String::from_utf8_lossy(&tok.token_bytes(t)).chars().count();
    }
    // chat: logprobs true with top_logprobs; streamed, the chunks carry the same values
    let body = json!({"messages": [{"role": "user", "content": "a b c"}], "max_tokens": 4,
                      "temperature": 0, "logprobs": true, "top_logprobs": 2});
    let whole = post(s.addr, "/v1/chat/completions", &body).v();
    let content = whole["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(content.len(), 4, "{whole}");
    for e in &content {
        assert_eq!(e["top_logprobs"].as_array().unwrap().len(), 2);
        assert!(e["logprob"].as_f64().unwrap() <= 0.0);
        assert!(e["top_logprobs"][0]["logprob"].as_f64() >= e["logprob"].as_f64());
        let bytes: Vec<u8> = e["bytes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap() as u8)
            .collect();
        assert_eq!(
            String::from_utf8_lossy(&bytes),
            e["token"].as_str().unwrap()
        );
    }
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let streamed = post(s.addr, "/v1/chat/completions", &sbody);
    let mut chunked = Vec::new();
    for d in streamed.sse_data() {
        if d == "[DONE]" {
            continue;
        }
        let c: Value = serde_json::from_str(d).unwrap();
        if let Some(a) = c["choices"][0]["logprobs"]["content"].as_array() {
            chunked.extend(a.iter().cloned());
        }
    }
    assert_eq!(chunked, content);
    // without logprobs: null, as OpenAI answers
    let plain = post(s.addr, "/v1/chat/completions", &chat_body(3, 2)).v();
    assert!(plain["choices"][0]["logprobs"].is_null());
    // bad combinations: 400 naming the field
    for (path, extra, param) in [
        ("/v1/chat/completions", json!({"logprobs": 3}), "logprobs"),
        (
            "/v1/chat/completions",
            json!({"top_logprobs": 2}),
            "top_logprobs",
        ),
        (
            "/v1/chat/completions",
            json!({"logprobs": true, "top_logprobs": 21}),
            "top_logprobs",
        ),
        ("/v1/chat/completions", json!({"echo": true}), "echo"),
        ("/v1/completions", json!({"logprobs": true}), "logprobs"),
        ("/v1/completions", json!({"logprobs": 21}), "logprobs"),
        (
            "/v1/completions",
            json!({"echo": true, "stream": true}),
            "echo",
        ),
        ("/v1/completions", json!({"max_tokens": 0}), "max_tokens"),
    ] {
        let mut b = if path.contains("chat") {
            chat_body(3, 2)
        } else {
            json!({"prompt": "a b", "max_tokens": 2})
        };
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        let r = post(s.addr, path, &b);
        assert_eq!(r.status, 400, "{path} {extra}: {}", r.body);
        assert_eq!(r.error().1.as_deref(), Some(param), "{path} {extra}");
    }
}

#[test]
fn a_batched_worker_gives_the_same_logprobs_whole_and_streamed() {
    let s = server(|c| {
        c.no_routers = Some(true);
        c.batch = Some(2);
    });
    let body = json!({"prompt": "the cat sat", "max_tokens": 5, "temperature": 0,
                      "logprobs": 1, "cache_prompt": false, "ignore_eos": true});
    let whole = post(s.addr, "/v1/completions", &body).v();
    let lp = &whole["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 5, "{whole}");
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let (mut tokens, mut values, mut offsets) = (Vec::new(), Vec::new(), Vec::new());
    for d in post(s.addr, "/v1/completions", &sbody).sse_data() {
        let Ok(c) = serde_json::from_str::<Value>(d) else {
            continue;
        };
        let l = &c["choices"][0]["logprobs"];
        if l.is_object() {
            tokens.extend(l["tokens"].as_array().unwrap().iter().cloned());
            values.extend(l["token_logprobs"].as_array().unwrap().iter().cloned());
            offsets.extend(l["text_offset"].as_array().unwrap().iter().cloned());
        }
    }
    assert_eq!(&Value::from(tokens), &lp["tokens"]);
    assert_eq!(&Value::from(values), &lp["token_logprobs"]);
    assert_eq!(&Value::from(offsets), &lp["text_offset"]);
}

#[test]
fn n_choices_come_from_one_prefill_each_with_its_own_seed() {
    for batch in [1, 2] {
        let s = server(|c| {
            c.no_routers = Some(true);
            c.batch = Some(batch);
        });
        let tok = Tokenizer::load(&s.model).unwrap();
        let m = Arc::new(Model::load(&s.model, DeviceChoice::Cpu).unwrap());
        let text = "the dog sat on the";
        let body = json!({"prompt": text, "max_tokens": 6, "temperature": 1.0, "seed": 40,
                          "n": 3, "ignore_eos": true, "cache_prompt": false});
        let v = post(s.addr, "/v1/completions", &body).v();
        let choices = v["choices"].as_array().unwrap();
        assert_eq!(choices.len(), 3, "{v}");
        assert_eq!(v["usage"]["completion_tokens"], 18);
        // each choice is the generation the engine gives alone with seed 40 + i
        let prompt = tok.tokenize(text, true, false);
        let mut texts = Vec::new();
        for (i, c) in choices.iter().enumerate() {
            assert_eq!(c["index"], i);
            let mut sess = Session::new(
                m.clone(),
                SessionOptions {
                    n_ctx: 256,
                    n_threads: 1,
                    n_ubatch: 512,
                },
            )
            .unwrap();
            let opts = GenerateOptions {
                max_tokens: 6,
                ignore_eos: true,
                sampling: SamplingParams {
                    temperature: 1.0,
                    seed: 40 + i as u32,
                    ..Default::default()
                },
                ..Default::default()
            };
            let full = LayerPath::full(m.n_layer());
            let g = generate(&mut sess, &tok, &prompt, Route::Fixed(&full), &opts, |_| {
                true
            })
            .unwrap();
            assert_eq!(c["text"], g.text, "batch {batch}, choice {i}");
            texts.push(g.text);
        }
        assert!(
            texts[0] != texts[1] || texts[1] != texts[2],
            "three equal samples: {texts:?}"
        );
        // streamed: each choice's chunks make its text; every choice ends
        let mut sbody = body.clone();
        sbody["stream"] = json!(true);
        let r = post(s.addr, "/v1/completions", &sbody);
        let mut got = vec![String::new(); 3];
        let mut finished = 0;
        for d in r.sse_data() {
            let Ok(c) = serde_json::from_str::<Value>(d) else {
                continue;
            };
            let ch = &c["choices"][0];
            let i = ch["index"].as_u64().unwrap() as usize;
            got[i].push_str(ch["text"].as_str().unwrap_or(""));
            finished += usize::from(!ch["finish_reason"].is_null());
        }
        assert_eq!(got, texts, "batch {batch}");
        assert_eq!(finished, 3);
        // chat too
        let chat = json!({"messages": [{"role": "user", "content": "a b"}], "max_tokens": 3,
                          "n": 2, "temperature": 0});
        let v = post(s.addr, "/v1/chat/completions", &chat).v();
        assert_eq!(v["choices"].as_array().unwrap().len(), 2);
        assert_eq!(
            v["choices"][0]["message"], v["choices"][1]["message"],
            "greedy twice"
        );
        for bad in [0, 17] {
            let mut b = body.clone();
            b["n"] = json!(bad);
            let r = post(s.addr, "/v1/completions", &b);
            assert_eq!((r.status, r.error().1.as_deref()), (400, Some("n")));
        }
    }
}

fn b64_floats(s: &str) -> Vec<f32> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            _ => 63,
        }
    };
    let mut bytes = Vec::new();
    for q in s.as_bytes().chunks(4) {
        let n = q.iter().filter(|&&c| c != b'=').count();
        let mut x = 0u32;
        for (i, &c) in q.iter().enumerate() {
            x |= if c == b'=' { 0 } else { val(c) } << (18 - 6 * i);
        }
        bytes.extend_from_slice(&x.to_be_bytes()[1..n]);
    }
    bytes
        .chunks(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

#[test]
fn embeddings_are_llama_cpp_pooled_unit_vectors_along_each_inputs_path() {
    let s = server(|_| {});
    let tok = Tokenizer::load(&s.model).unwrap();
    let m = Arc::new(Model::load(&s.model, DeviceChoice::Cpu).unwrap());
    let texts = ["the cat sat on the mat", "a big red dog"];
    // plain: llama.cpp's mean pooling (the tiny file declares none), normalised
    let v = post(
        s.addr,
        "/v1/embeddings",
        &json!({"input": texts, "model": "anything", "routing": false}),
    )
    .v();
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], "tiny");
    let stock = drllm_engine::stock::StockModel::load(&s.model, DeviceChoice::Cpu).unwrap();
    let mut n_tokens = 0;
    for (i, t) in texts.iter().enumerate() {
        let ids = tok.tokenize(t, true, false);
        n_tokens += ids.len();
        let want = drllm_engine::normalized(
            &stock
                .embeddings(&ids, drllm_engine::Pooling::Mean, 1)
                .unwrap(),
        );
        let got: Vec<f32> = v["data"][i]["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(v["data"][i]["index"], i);
        assert_eq!(got.len(), 64);
        let d = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(d < 1e-4, "input {i}: {d}");
        let norm: f32 = got.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
    }
    assert_eq!(v["usage"]["prompt_tokens"], n_tokens);
    // routed: each input along the routers' path, as the engine gives it directly
    let v = post(s.addr, "/v1/embeddings", &json!({"input": texts[0]})).v();
    assert_eq!(v["drllm"]["paths"][0], path_of(&COUNTS_A).to_string());
    let mut sess = Session::new(
        m.clone(),
        SessionOptions {
            n_ctx: 256,
            n_threads: 1,
            n_ubatch: 512,
        },
    )
    .unwrap();
    let ids = tok.tokenize(texts[0], true, false);
    let (e, _) = sess
        .embed(
            &ids,
            Route::Fixed(&path_of(&COUNTS_A)),
            drllm_engine::Pooling::Mean,
        )
        .unwrap();
    let want = drllm_engine::normalized(&e);
    let got: Vec<f32> = v["data"][0]["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(got, want);
    // base64: the same floats, little-endian; token ids as input
    let b = post(
        s.addr,
        "/v1/embeddings",
        &json!({"input": [ids.clone()], "encoding_format": "base64"}),
    )
    .v();
    assert_eq!(
        b64_floats(b["data"][0]["embedding"].as_str().unwrap()),
        want
    );
    // bad input: 400 naming the field
    for (body, param) in [
        (json!({"input": ""}), "input"),
        (json!({"input": []}), "input"),
        (json!({}), "input"),
        (json!({"input": 5}), "input"),
        (json!({"input": [[1, 999999]]}), "input"),
        (json!({"input": prompt_text(400, 1)}), "input"),
        (
            json!({"input": "a", "encoding_format": "int8"}),
            "encoding_format",
        ),
        (json!({"input": "a", "dimensions": 32}), "dimensions"),
        (json!({"input": "a", "max_passes": 0}), "max_passes"),
    ] {
        let r = post(s.addr, "/v1/embeddings", &body);
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        assert_eq!(r.error().1.as_deref(), Some(param), "{body}");
    }
    let t = get(s.addr, "/metrics");
    assert!(
        t.body
            .contains("drllm_requests_total{route=\"embeddings\",status=\"200\"} 3"),
        "{}",
        t.body
    );
}

fn generation(s: &Server) -> Value {
    get(s.addr, "/v1/routers").v()["generation"].clone()
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A counter or gauge of `/metrics`.
fn metric(addr: SocketAddr, name: &str) -> u64 {
    let body = get(addr, "/metrics").body;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in\n{body}"))
}

fn failures(s: &Server) -> u64 {
    metric(s.addr, "drllm_router_reload_failures_total")
}

#[test]
fn hot_reload_replaces_keeps_on_corruption_and_runs_plain_on_deletion() {
    let s = server(|_| {});
    let g0 = generation(&s);
    assert!(g0.is_string());
    let info = get(s.addr, "/v1/routers").v();
    assert_eq!(info["sidecar"]["base"]["block_count"], 6);
    assert!(info["sidecar"]["provenance"]["tool"].is_string());

    // replaced by rename into place: a new generation, and requests follow it
    write_routers(&s.model, &COUNTS_B, &s.sidecar);
    wait_for("the new generation", || generation(&s) != g0);
    let g1 = generation(&s);
    let v = post(s.addr, "/v1/chat/completions", &chat_body(3, 2)).v();
    assert_eq!(v["drllm"]["skipped"], json!([2, 4]), "{v}");
    assert_eq!(v["drllm"]["router_generation"], g1);

    // corrupt: truncated copy renamed in; the previous generation keeps serving
    let bytes = std::fs::read(&s.sidecar).unwrap();
    let tmp = s.sidecar.with_extension("bad");
    std::fs::write(&tmp, &bytes[..bytes.len() / 2]).unwrap();
    std::fs::rename(&tmp, &s.sidecar).unwrap();
    wait_for("the reload failure", || failures(&s) >= 1);
    assert_eq!(generation(&s), g1);
    // one failure per change: reading the file does not count as a change (it once did, and
    // every reload triggered the next one)
    let settled = failures(&s);
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        failures(&s),
        settled,
        "reloads keep firing without a change"
    );
    let info = get(s.addr, "/v1/routers").v();
    assert!(info["last_error"].is_string(), "{info}");
    let v = post(s.addr, "/v1/chat/completions", &chat_body(3, 2)).v();
    assert_eq!(v["drllm"]["skipped"], json!([2, 4]));
    // the reload endpoint says so too, with 422
    let r = post(s.addr, "/v1/routers/reload", &json!({}));
    assert_eq!(r.status, 422, "{}", r.body);
    assert_eq!(r.error().2.as_deref(), Some("invalid_sidecar"));

    // a sidecar for another model (other width) is refused the same way
    let other_dir = tempfile::tempdir().unwrap();
    let mut spec = TinySpec::default_for(Family::Llama);
    spec.n_embd = 32;
    spec.with_chat_template = true;
    let other = other_dir.path().join("other.gguf");
    write_tiny_model(&spec, &other).unwrap();
    let before = failures(&s);
    write_routers(&other, &COUNTS_A, &s.sidecar);
    wait_for("the wrong-model failure", || failures(&s) > before);
    assert_eq!(generation(&s), g1);

    // deleted: new requests run the plain model
    std::fs::remove_file(&s.sidecar).unwrap();
    wait_for("unrouted serving", || generation(&s).is_null());
    let v = post(s.addr, "/v1/chat/completions", &chat_body(3, 2)).v();
    assert_eq!(v["drllm"]["routed"], false);
    assert_eq!(v["drllm"]["passes"], 6);
    // asking for routing now is a client error
    let mut b = chat_body(3, 2);
    b["routing"] = json!(true);
    let r = post(s.addr, "/v1/chat/completions", &b);
    assert_eq!(r.status, 400);
    assert_eq!(r.error().2.as_deref(), Some("no_routers"));

    // it appears again: routed again
    write_routers(&s.model, &COUNTS_A, &s.sidecar);
    wait_for("routing again", || generation(&s) == g0);
    let v = post(s.addr, "/v1/chat/completions", &chat_body(3, 2)).v();
    assert_eq!(v["drllm"]["skipped"], json!([1]));
}

#[test]
fn bad_input_gets_openai_errors_and_the_server_keeps_serving() {
    let s = server(|c| c.ctx_size = Some(64));
    let chat = "/v1/chat/completions";
    // (what, body, status, param, code)
    type Case = (
        &'static str,
        String,
        u16,
        Option<&'static str>,
        Option<&'static str>,
    );
    let cases: Vec<Case> = vec![
        ("invalid JSON", "{\"messages\": [".into(), 400, None, None),
        ("empty body", String::new(), 400, None, None),
        (
            "wrong type",
            json!({"messages": [{"role": "user", "content": "a"}], "max_tokens": "ten"})
                .to_string(),
            400,
            Some("max_tokens"),
            None,
        ),
        (
            "negative max_tokens",
            json!({"messages": [{"role": "user", "content": "a"}], "max_tokens": -5}).to_string(),
            400,
            Some("max_tokens"),
            None,
        ),
        (
            "huge max_tokens",
            json!({"messages": [{"role": "user", "content": "a"}], "max_tokens": 1u64 << 40})
                .to_string(),
            400,
            Some("max_tokens"),
            None,
        ),
        (
            "prompt longer than the context",
            json!({"messages": [{"role": "user", "content": prompt_text(200, 1)}]}).to_string(),
            400,
            Some("messages"),
            Some("context_length_exceeded"),
        ),
        (
            "bad role",
            json!({"messages": [{"role": "robot", "content": "a"}]}).to_string(),
            400,
            Some("messages[0].role"),
            None,
        ),
        (
            "temperature out of range",
            json!({"messages": [{"role": "user", "content": "a"}], "temperature": 9}).to_string(),
            400,
            Some("temperature"),
            None,
        ),
        (
            "depth_bias not a number",
            json!({"messages": [{"role": "user", "content": "a"}], "depth_bias": "deep"})
                .to_string(),
            400,
            Some("depth_bias"),
            None,
        ),
    ];
    for (what, body, status, param, code) in cases {
        let r = request(s.addr, "POST", chat, Some(&body), None);
        assert_eq!(r.status, status, "{what}: {}", r.body);
        let (kind, p, c) = r.error();
        assert_eq!(kind, "invalid_request_error", "{what}");
        assert_eq!(p.as_deref(), param, "{what}: {}", r.body);
        if code.is_some() {
            assert_eq!(c.as_deref(), code, "{what}: {}", r.body);
        }
    }
    let r = post(
        s.addr,
        "/v1/completions",
        &json!({"prompt": [1, 2, 99999], "max_tokens": 1}),
    );
    assert_eq!((r.status, r.error().1.as_deref()), (400, Some("prompt")));
    let r = get(s.addr, "/v1/nothing");
    assert_eq!(
        (r.status, r.error().2.as_deref()),
        (404, Some("unknown_route"))
    );
    let r = get(s.addr, chat);
    assert_eq!((r.status, r.header("allow")), (405, Some("POST, OPTIONS")));
    let big = format!("{{\"prompt\": \"{}\"}}", "a".repeat(9 << 20));
    // the server answers 413 from the headers and closes; a client still writing the body
    // may see the connection reset before it reads the answer (a loaded machine writes slowly)
    match client::request(
        s.addr,
        "POST",
        "/v1/completions",
        Some(&big),
        None,
        Duration::from_secs(120),
    ) {
        Ok(r) => assert_eq!(r.status, 413),
        Err(e) => assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ),
            "{e}"
        ),
    }
    // still serving
    let r = post(s.addr, chat, &chat_body(2, 2));
    assert_eq!(r.status, 200, "{}", r.body);
    let t = get(s.addr, "/metrics").body;
    assert!(t.contains("drllm_requests_total{route=\"chat\",status=\"400\"}"));
}

#[test]
fn bearer_token_is_required_when_set() {
    let s = server(|c| c.api_key = Some("s3cret".into()));
    let body = chat_body(2, 2).to_string();
    for token in [None, Some("wrong"), Some("s3cre"), Some("s3cret2")] {
        let r = request(s.addr, "POST", "/v1/chat/completions", Some(&body), token);
        assert_eq!(r.status, 401, "{token:?}");
        assert_eq!(r.error().0, "authentication_error");
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    }
    assert_eq!(request(s.addr, "GET", "/metrics", None, None).status, 401);
    // health stays open for probes
    assert_eq!(get(s.addr, "/health").status, 200);
    let r = request(
        s.addr,
        "POST",
        "/v1/chat/completions",
        Some(&body),
        Some("s3cret"),
    );
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn many_clients_are_answered_or_refused_and_disconnects_free_the_slot() {
    // one worker, one waiting place: while one long request (1500 tokens) runs, 9 more at
    // once: exactly one can wait, the other 8 are refused, and nothing breaks
    let s = server(|c| {
        c.parallel = Some(1);
        c.queue = Some(1);
        c.ctx_size = Some(2048);
    });
    let addr = s.addr;
    let metric = |name: &str| metric(addr, name);
    let long =
        || std::thread::spawn(move || post(addr, "/v1/chat/completions", &chat_body(8, 1500)));
    let mut clients = vec![long()];
    wait_for("the first request to run", || {
        metric("drllm_requests_running") == 1
    });
    clients.extend((0..9).map(|_| long()));
    let mut ok = 0;
    let mut busy = 0;
    for c in clients {
        let r = c.join().unwrap();
        match r.status {
            200 => ok += 1,
            503 => {
                assert_eq!(r.error().2.as_deref(), Some("server_busy"));
                assert_eq!(r.header("retry-after"), Some("1"));
                busy += 1
            }
            other => panic!("status {other}: {}", r.body),
        }
    }
    assert_eq!((ok, busy), (2, 8));
    assert_eq!(metric("drllm_requests_rejected_total"), 8);

    // clients that go away: each request asks for 1500 tokens, and is cut off early
    let idle = || metric("drllm_requests_running") == 0 && metric("drllm_queue_depth") == 0;
    let send = |body: &Value| {
        let body = body.to_string();
        let mut st = TcpStream::connect(addr).unwrap();
        write!(
            st,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        st
    };
    for _ in 0..3 {
        wait_for("an idle worker", idle);
        let mut b = chat_body(8, 1500);
        b["stream"] = json!(true);
        let mut st = send(&b);
        // read until the first generated text (after the role chunk), then hang up
        let mut seen = String::new();
        let mut buf = [0u8; 512];
        while seen.matches("\"content\":\"").count() < 2 {
            let n = st.read(&mut buf).unwrap();
            assert!(n > 0, "connection closed: {seen}");
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
        }
        drop(st);
    }
    wait_for("the streaming cancellations", || {
        metric("drllm_requests_cancelled_total") >= 3
    });
    // a non-streaming client that goes away while its request runs
    wait_for("an idle worker", idle);
    let st = send(&chat_body(8, 1500));
    wait_for("the request to run", || {
        metric("drllm_requests_running") == 1
    });
    drop(st);
    wait_for("the non-streaming cancellation", || {
        metric("drllm_requests_cancelled_total") >= 4
    });
    wait_for("an idle worker", idle);
    let r = post(addr, "/v1/chat/completions", &chat_body(2, 2));
    assert_eq!(r.status, 200, "{}", r.body);
    // the cancelled requests are logged with what they generated before the hang-up
    wait_for("the log rows", || {
        drllm_server::db::summarise(&s.db, 0.0, 1e12, 10)
            .unwrap()
            .requests
            >= ok + 5
    });
    let c = rusqlite::Connection::open(&s.db).unwrap();
    let (n, most): (i64, i64) = c
        .query_row(
            "SELECT COUNT(*), MAX(completion_tokens) FROM requests WHERE finish = 'cancelled'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(n, 4);
    assert!(most < 1500, "a cancelled request ran to {most} tokens");
}

#[test]
fn shutdown_lets_requests_in_flight_finish() {
    let mut s = server(|c| c.ctx_size = Some(2048));
    let addr = s.addr;
    let running = || metric(addr, "drllm_requests_running");
    let client =
        std::thread::spawn(move || post(addr, "/v1/chat/completions", &chat_body(8, 1500)));
    wait_for("the request to run", || running() == 1);
    let handle = s.handle.take().unwrap();
    s.rt.block_on(handle.shutdown());
    let r = client.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.v()["usage"]["completion_tokens"], 1500);
    // and nothing listens any more
    assert!(TcpStream::connect(addr).is_err());
}

#[test]
fn health_is_503_while_loading_and_a_failed_load_is_reported() {
    // the model "file" is a FIFO: loading blocks on it until the test writes, so the server
    // is observably still loading
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("slow.gguf");
    let st = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(st.success());
    let config = Settings {
        model: Some(fifo.clone()),
        port: Some(0),
        no_db: Some(true),
        no_routers: Some(true),
        device: Some("cpu".into()),
        ..Default::default()
    }
    .resolve()
    .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut handle = rt.block_on(start(config)).unwrap();
    let addr = handle.addr();
    let h = get(addr, "/health");
    assert_eq!((h.status, h.v()["status"].clone()), (503, json!("loading")));
    assert_eq!(h.header("retry-after"), None);
    let r = post(addr, "/v1/chat/completions", &chat_body(2, 2));
    assert_eq!((r.status, r.error().2.as_deref()), (503, Some("loading")));
    assert_eq!(r.header("retry-after"), Some("1"));
    // now feed it something that is not a model: the load fails and says why (the loader may
    // give up on the FIFO before reading it, so the write may meet a closed pipe)
    let _ = std::fs::write(&fifo, b"not a model at all");
    let Err(e) = rt.block_on(handle.ready()) else {
        panic!("the load must fail");
    };
    assert!(e.to_string().contains("slow.gguf"), "{e}");
    rt.block_on(handle.shutdown());
}

#[test]
fn batched_requests_on_one_path_get_the_answers_they_get_alone() {
    // one worker running up to 3 requests at once: requests routed alike decode in one graph
    let s = server(|c| {
        c.parallel = Some(1);
        c.batch = Some(3);
        c.ctx_size = Some(1024);
    });
    let addr = s.addr;
    let running = || metric(addr, "drllm_requests_running");
    // a long request keeps the worker busy, so the next ones join it in the same graphs
    let long = std::thread::spawn(move || post(addr, "/v1/chat/completions", &chat_body(7, 600)));
    wait_for("the long request to run", || running() == 1);
    // batched and single decoding round differently (like llama.cpp's), so long greedy texts
    // of a random tiny model may part at a near-tie: the short answers are compared
    let words = [4usize, 9];
    let clients: Vec<_> = words
        .iter()
        .map(|&w| std::thread::spawn(move || post(addr, "/v1/chat/completions", &chat_body(w, 12))))
        .collect();
    let answers: Vec<Value> = clients.into_iter().map(|c| c.join().unwrap().v()).collect();
    for (a, &w) in answers.iter().zip(&words) {
        assert_eq!(a["drllm"]["path"], path_of(&COUNTS_A).to_string(), "{a}");
        let (text, n_prompt) = direct(
            &s.model,
            &[("system", "be brief".into()), ("user", prompt_text(w, 5))],
            &path_of(&COUNTS_A),
            12,
        );
        assert_eq!(a["usage"]["prompt_tokens"], n_prompt);
        assert_eq!(a["usage"]["completion_tokens"], 12);
        assert_eq!(
            a["choices"][0]["message"]["content"], text,
            "prompt of {w} words"
        );
    }
    assert_eq!(long.join().unwrap().v()["usage"]["completion_tokens"], 600);
    let batched = metric(addr, "drllm_batched_decode_steps_total");
    assert!(batched > 0, "no decode step ran several requests");
    // a streamed request and routing off (another path) in the same worker
    let mut b = chat_body(3, 20);
    b["stream"] = json!(true);
    let mut plain = chat_body(5, 20);
    plain["routing"] = json!(false);
    let t1 = std::thread::spawn(move || post(addr, "/v1/chat/completions", &b));
    let t2 = std::thread::spawn(move || post(addr, "/v1/chat/completions", &plain));
    let (r1, r2) = (t1.join().unwrap(), t2.join().unwrap());
    assert_eq!(r1.sse_data().last().copied(), Some("[DONE]"));
    assert_eq!(r2.v()["drllm"]["passes"], 6);
    assert_eq!(r2.v()["usage"]["completion_tokens"], 20);
}

#[test]
fn connections_beyond_the_cap_wait_until_one_ends() {
    let s = server(|c| c.max_connections = Some(1));
    let addr = s.addr;
    // an idle client holds the only place
    let idle = TcpStream::connect(addr).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(get(addr, "/health").status);
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(500)).is_err(),
        "a second connection was served while the first held the only place"
    );
    drop(idle);
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(200));
}

#[test]
fn a_lone_request_on_two_batched_workers_finishes() {
    // two workers of two sessions each: an idle worker waiting for work must not keep the
    // busy one from its next token
    let s = server(|c| {
        c.parallel = Some(2);
        c.batch = Some(2);
        c.ctx_size = Some(512);
    });
    let addr = s.addr;
    let t0 = Instant::now();
    let r = client::request(
        addr,
        "POST",
        "/v1/chat/completions",
        Some(&chat_body(4, 24).to_string()),
        None,
        Duration::from_secs(60),
    )
    .expect("no answer within 60 s");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.v()["usage"]["completion_tokens"], 24);
    eprintln!(
        "lone request answered in {:.2} s",
        t0.elapsed().as_secs_f64()
    );
    // and several at once, more than the lanes, all answered
    let clients: Vec<_> = (0..6)
        .map(|i| {
            std::thread::spawn(move || post(addr, "/v1/chat/completions", &chat_body(3 + i, 30)))
        })
        .collect();
    for c in clients {
        let r = c.join().unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.v()["usage"]["completion_tokens"], 30);
    }
    assert_eq!(metric(addr, "drllm_workers"), 2);
}

/// A fault hook that panics where a request's max_tokens says: 7 at its prefill, 8 at its
/// first decode step, 9 right after a worker took it (outside the panic guard: the worker
/// ends).
fn panicking_hook() -> FaultHook {
    FaultHook(Arc::new(|at, job| {
        if let Task::Generate { opts, .. } = &job.task {
            match (at, opts.max_tokens) {
                (FaultPoint::Prefill, 7) => panic!("injected panic at prefill"),
                (FaultPoint::Decode, 8) => panic!("injected panic at decode"),
                (FaultPoint::Taken, 9) => panic!("injected panic outside the guard"),
                _ => {}
            }
        }
    }))
}

fn assert_internal_error(r: &Resp) {
    assert_eq!(r.status, 500, "{}", r.body);
    assert_eq!(r.error().2.as_deref(), Some("internal_error"));
}

#[test]
fn a_panicking_job_costs_its_client_a_500_and_the_worker_goes_on() {
    for batch in [1, 2] {
        let s = server_with(
            |c| {
                c.parallel = Some(1);
                c.batch = Some(batch);
                c.ctx_size = Some(1024);
            },
            |c| c.fault = Some(panicking_hook()),
        );
        let addr = s.addr;
        let running = || metric(addr, "drllm_requests_running");
        // a long request runs; one that panics in its prefill joins (batched) or waits
        let long =
            std::thread::spawn(move || post(addr, "/v1/chat/completions", &chat_body(6, 400)));
        wait_for("the long request to run", || running() == 1);
        assert_internal_error(&post(addr, "/v1/chat/completions", &chat_body(3, 7)));
        let r = long.join().unwrap();
        assert_eq!(r.status, 200, "batch {batch}: {}", r.body);
        assert_eq!(r.v()["usage"]["completion_tokens"], 400);
        // a panic while decoding, streamed: an error event, then [DONE]
        let mut b = chat_body(3, 8);
        b["stream"] = json!(true);
        let r = post(addr, "/v1/chat/completions", &b);
        let data = r.sse_data();
        assert_eq!(data.last().copied(), Some("[DONE]"), "{}", r.body);
        assert!(
            data.iter().any(|d| d.contains("internal_error")),
            "{}",
            r.body
        );
        assert_internal_error(&post(addr, "/v1/chat/completions", &chat_body(3, 8)));
        // the worker lives on and answers as before
        let r = post(addr, "/v1/chat/completions", &chat_body(5, 12));
        assert_eq!(r.status, 200, "batch {batch}: {}", r.body);
        let (text, _) = direct(
            &s.model,
            &[("system", "be brief".into()), ("user", prompt_text(5, 5))],
            &path_of(&COUNTS_A),
            12,
        );
        assert_eq!(r.v()["choices"][0]["message"]["content"], text);
        assert_eq!(metric(addr, "drllm_request_panics_total"), 3);
        assert_eq!(metric(addr, "drllm_workers"), 1);
        assert_eq!(get(addr, "/health").v()["status"], "ok");
    }
}

#[test]
fn a_worker_that_dies_shows_in_health_and_metrics() {
    let s = server_with(
        |c| {
            c.parallel = Some(2);
            c.batch = Some(2);
        },
        |c| c.fault = Some(panicking_hook()),
    );
    let addr = s.addr;
    let h = get(addr, "/health").v();
    assert_eq!(
        (h["status"].clone(), h["workers"].clone()),
        (json!("ok"), json!(2))
    );
    // the client of the job that killed its worker gets an error, not a hang
    let r = post(addr, "/v1/chat/completions", &chat_body(3, 9));
    assert_eq!(r.status, 500, "{}", r.body);
    wait_for("one worker fewer", || metric(addr, "drllm_workers") == 1);
    let h = get(addr, "/health");
    assert_eq!(h.status, 200);
    assert_eq!(
        (h.v()["status"].clone(), h.v()["workers"].clone()),
        (json!("degraded"), json!(1))
    );
    assert_eq!(metric(addr, "drllm_workers_started"), 2);
    // the other worker still serves
    let r = post(addr, "/v1/chat/completions", &chat_body(3, 5));
    assert_eq!(r.status, 200, "{}", r.body);
    // the last one goes too: 503 everywhere, and the reason
    assert_eq!(
        post(addr, "/v1/chat/completions", &chat_body(3, 9)).status,
        500
    );
    wait_for("no worker", || metric(addr, "drllm_workers") == 0);
    let h = get(addr, "/health");
    assert_eq!(
        (h.status, h.v()["status"].clone()),
        (503, json!("no_workers"))
    );
    let r = post(addr, "/v1/chat/completions", &chat_body(3, 5));
    assert_eq!(
        (r.status, r.error().2.as_deref()),
        (503, Some("no_workers"))
    );
}

fn with_headers(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Resp {
    client::request_with(
        addr,
        method,
        path,
        headers,
        body,
        None,
        Duration::from_secs(60),
    )
    .unwrap()
}

#[test]
fn web_pages_cannot_use_the_daemon_unless_their_origin_is_allowed() {
    let s = server(|c| {
        c.allowed_origins = Some(vec!["http://localhost:3000".into()]);
        c.allowed_hosts = Some(vec!["my-box.lan".into()]);
    });
    let addr = s.addr;
    let chat = "/v1/chat/completions";
    let body = chat_body(3, 4).to_string();
    let tokens = || metric(addr, "drllm_prompt_tokens_total");
    let before = tokens();
    // DNS rebinding: the page's own name as Host
    for path in ["/health", "/v1/models", chat] {
        let method = if path == chat { "POST" } else { "GET" };
        let r = with_headers(
            addr,
            method,
            path,
            &[("Host", "attacker.example:8088")],
            Some(body.as_str()).filter(|_| path == chat),
        );
        assert_eq!(r.status, 403, "{path}: {}", r.body);
        assert_eq!(r.error().2.as_deref(), Some("host_not_allowed"));
    }
    // a simple cross-origin POST (no preflight: text/plain) from a page the user visits
    let r = with_headers(
        addr,
        "POST",
        chat,
        &[
            ("Origin", "https://attacker.example"),
            ("Content-Type", "text/plain"),
        ],
        Some(&body),
    );
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(r.error().2.as_deref(), Some("origin_not_allowed"));
    assert_eq!(r.header("access-control-allow-origin"), None);
    // its preflight is refused too
    let r = with_headers(
        addr,
        "OPTIONS",
        chat,
        &[
            ("Origin", "https://attacker.example"),
            ("Access-Control-Request-Method", "POST"),
        ],
        None,
    );
    assert_eq!(r.status, 403);
    // a no-cors GET from another site carries no Origin, only Sec-Fetch-Site
    let r = with_headers(
        addr,
        "GET",
        "/v1/models",
        &[("Sec-Fetch-Site", "cross-site")],
        None,
    );
    assert_eq!(r.status, 403);
    assert_eq!(tokens(), before, "a refused request ran");

    // the allowed origin: preflight, then the request, with CORS headers
    let origin = "http://localhost:3000";
    let r = with_headers(
        addr,
        "OPTIONS",
        chat,
        &[
            ("Origin", origin),
            ("Access-Control-Request-Method", "POST"),
            (
                "Access-Control-Request-Headers",
                "authorization, content-type, x-stainless-os",
            ),
        ],
        None,
    );
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(r.header("access-control-allow-origin"), Some(origin));
    assert_eq!(
        r.header("access-control-allow-methods"),
        Some("POST, OPTIONS")
    );
    assert_eq!(
        r.header("access-control-allow-headers"),
        Some("authorization, content-type, x-stainless-os")
    );
    let r = with_headers(addr, "POST", chat, &[("Origin", origin)], Some(&body));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("access-control-allow-origin"), Some(origin));
    assert!(r.header("vary").is_some_and(|v| v.contains("Origin")));
    // errors are readable by the page too
    let r = with_headers(addr, "POST", chat, &[("Origin", origin)], Some("{"));
    assert_eq!(r.status, 400);
    assert_eq!(r.header("access-control-allow-origin"), Some(origin));
    // programs, loopback names and allowed hosts are served as before
    for host in ["localhost:8088", "127.0.0.1", "[::1]:1", "my-box.lan:8088"] {
        let r = with_headers(addr, "GET", "/health", &[("Host", host)], None);
        assert_eq!(r.status, 200, "{host}");
        assert_eq!(r.header("access-control-allow-origin"), None);
    }
    assert_eq!(post(addr, chat, &chat_body(3, 4)).status, 200);
}

#[test]
fn fields_drllm_does_not_implement_are_refused_by_name() {
    let s = server(|_| {});
    let addr = s.addr;
    let chat = "/v1/chat/completions";
    let with = |extra: Value| {
        let mut b = chat_body(3, 4);
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        post(addr, chat, &b)
    };
    for (extra, param) in [
        (json!({"store": true}), "store"),
        (
            json!({"stream_options": {"include_usage": true, "chunk_size": 4}}),
            "stream_options.chunk_size",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi", "audio": {"id": "x"}}]}),
            "messages[0].audio",
        ),
    ] {
        let r = with(extra.clone());
        assert_eq!(r.status, 400, "{extra}: {}", r.body);
        let (kind, p, code) = r.error();
        assert_eq!(kind, "invalid_request_error");
        assert_eq!(p.as_deref(), Some(param), "{extra}");
        assert_eq!(code.as_deref(), Some("unsupported_parameter"), "{extra}");
    }
    // echo is a completions field: chat refuses it by name
    let r = with(json!({"echo": true}));
    assert_eq!((r.status, r.error().1.as_deref()), (400, Some("echo")));
    let r = post(addr, "/v1/route", &json!({"prompt": "a", "max_tokens": 2}));
    assert_eq!(
        (r.status, r.error().1.as_deref()),
        (400, Some("max_tokens"))
    );
    // the values that ask for nothing pass
    let r = with(json!({
        "n": 1, "logprobs": false, "top_logprobs": 0, "tools": [], "tool_choice": "none",
        "parallel_tool_calls": true, "user": "u-1", "response_format": {"type": "text"},
        "store": false, "seed": null, "logit_bias": {}, "presence_penalty": 0,
        "frequency_penalty": 0, "metadata": {"app": "x"}, "service_tier": "auto",
        "stream_options": null, "functions": null,
    }));
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn the_bodies_real_clients_send_are_served() {
    let s = server(|_| {});
    let fixture: Value = serde_json::from_str(include_str!("fixtures/client_bodies.json")).unwrap();
    let requests = fixture["requests"].as_array().unwrap();
    assert!(requests.len() >= 9);
    for q in requests {
        let mut body = q["body"].clone();
        body["model"] = json!("tiny");
        let path = q["path"].as_str().unwrap();
        let r = post(s.addr, path, &body);
        assert_eq!(r.status, 200, "{}: {}", q["client"], r.body);
        if body["stream"] == json!(true) {
            assert_eq!(
                r.sse_data().last().copied(),
                Some("[DONE]"),
                "{}",
                q["client"]
            );
        } else {
            assert!(r.v()["choices"][0].is_object(), "{}", q["client"]);
        }
    }
}

/// Sends a request's headers and only the start of its body; gives the open stream.
fn partial_request(addr: SocketAddr, body: &str, sent: usize) -> TcpStream {
    let mut st = TcpStream::connect(addr).unwrap();
    write!(
        st,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{}",
        body.len(),
        &body[..sent]
    )
    .unwrap();
    st.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    st
}

fn read_all(st: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = st.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn a_stalled_body_is_dropped_and_a_full_queue_answers_before_the_body() {
    let s = server(|c| {
        c.body_timeout_secs = Some(1);
        c.parallel = Some(1);
        c.queue = Some(0);
        c.ctx_size = Some(2048);
    });
    let addr = s.addr;
    let body = chat_body(3, 4).to_string();
    // a client that stops half-way through its body
    let t0 = Instant::now();
    let mut st = partial_request(addr, &body, 10);
    let answer = read_all(&mut st);
    let waited = t0.elapsed();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    assert!(answer.contains("body_timeout"), "{answer}");
    assert!(waited < Duration::from_secs(10), "dropped after {waited:?}");
    // the worker is busy and nothing may wait: refused before the body arrives
    let long = std::thread::spawn(move || post(addr, "/v1/chat/completions", &chat_body(8, 1500)));
    wait_for("the long request to run", || {
        metric(addr, "drllm_requests_running") == 1
    });
    let t0 = Instant::now();
    let mut st = partial_request(addr, &body, 0);
    let answer = read_all(&mut st);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("server_busy"), "{answer}");
    assert!(
        t0.elapsed() < Duration::from_millis(900),
        "waited for the body: {:?}",
        t0.elapsed()
    );
    assert_eq!(long.join().unwrap().status, 200);
    // and the server goes on. Its client can have the whole answer a moment before the worker
    // frees its lane, and with --queue 0 nothing may wait, so the first try may be refused
    wait_for("the server to answer again", || {
        post(addr, "/v1/chat/completions", &chat_body(2, 2)).status == 200
    });
}

fn turn_body(messages: &[(&str, String)], routing: bool, cache: bool, max_tokens: usize) -> Value {
    let msgs: Vec<Value> = messages
        .iter()
        .map(|(r, c)| json!({"role": r, "content": c}))
        .collect();
    json!({"model": "tiny", "messages": msgs, "max_tokens": max_tokens, "temperature": 0,
           "ignore_eos": true, "routing": routing, "cache_prompt": cache})
}

#[test]
fn exact_cached_turns_give_the_uncached_logits_bit_for_bit() {
    for (routing, batch) in [(false, 1), (true, 1), (false, 2)] {
        // prefill graphs of 16 tokens, so that a short conversation has whole chunks to keep
        let s = server(|c| {
            c.ubatch_size = Some(16);
            c.batch = Some(batch);
        });
        let mut msgs = vec![
            ("system", "be brief".to_string()),
            ("user", prompt_text(30, 5)),
        ];
        let mut last_prompt = 0;
        for turn in 0..4 {
            let mut body = turn_body(&msgs, routing, true, 6);
            body["logprobs"] = json!(true);
            body["top_logprobs"] = json!(20);
            let cached = post(s.addr, "/v1/chat/completions", &body).v();
            body["cache_prompt"] = json!(false);
            let fresh = post(s.addr, "/v1/chat/completions", &body).v();
            let what = format!("routing {routing}, batch {batch}, turn {turn}");
            // the same tokens, and every one of the 20 most likely tokens' log-probability at
            // every step equal to the last bit: the logits are the uncached request's
            assert_eq!(
                cached["choices"][0]["logprobs"], fresh["choices"][0]["logprobs"],
                "{what}"
            );
            assert_eq!(
                cached["choices"][0]["message"],
                fresh["choices"][0]["message"]
            );
            assert_eq!(cached["drllm"]["path"], fresh["drllm"]["path"], "{what}");
            let n = cached_tokens(&cached);
            let n_prompt = cached["usage"]["prompt_tokens"].as_u64().unwrap();
            assert_eq!(
                n % 16,
                0,
                "{what}: restored {n}, not a whole number of chunks"
            );
            assert!(
                n <= last_prompt,
                "{what}: restored {n}, beyond the previous prompt"
            );
            if turn > 0 {
                assert!(n > 0, "{what}: nothing reused");
            }
            last_prompt = n_prompt;
            msgs.push((
                "assistant",
                cached["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            ));
            msgs.push(("user", prompt_text(9, turn + 20)));
        }
        assert!(metric(s.addr, "drllm_cache_hits_total") >= 3);
    }
}

fn cached_tokens(v: &Value) -> u64 {
    v["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or_else(|| panic!("no cached_tokens in {v}"))
}

#[test]
fn a_conversation_turn_reuses_its_cache_keeps_its_path_and_answers_as_uncached() {
    conversation_turns(1);
}

#[test]
fn a_batched_worker_continues_conversations_the_same_way() {
    conversation_turns(2);
}

fn conversation_turns(batch: usize) {
    // every shared token restored (cache_exact false; exact restores: the test below)
    let s = server(|c| {
        c.batch = Some(batch);
        c.cache_exact = Some(false);
    });
    let addr = s.addr;
    // two conversations, one routed and one plain, interleaved so that each next turn is
    // restored from the shared cache (the worker's session holds the other one)
    let mut convs: Vec<(bool, Vec<(&str, String)>)> = [(true, 3u64), (false, 4)]
        .iter()
        .map(|&(routing, seed)| {
            (
                routing,
                vec![
                    ("system", "be brief".to_string()),
                    ("user", prompt_text(12, seed)),
                ],
            )
        })
        .collect();
    let mut first = Vec::new();
    for (routing, msgs) in &convs {
        let v = post(
            addr,
            "/v1/chat/completions",
            &turn_body(msgs, *routing, true, 16),
        )
        .v();
        assert_eq!(cached_tokens(&v), 0, "a first turn has nothing cached");
        assert_eq!(v["drllm"]["routed"], *routing);
        first.push(v);
    }
    // new routers decide another path; the routed conversation keeps the one it started on
    write_routers(&s.model, &COUNTS_B, &s.sidecar);
    let new_gen = {
        let old = first[0]["drllm"]["router_generation"].clone();
        wait_for("the reload", || generation(&s) != old);
        generation(&s)
    };
    for ((routing, msgs), v1) in convs.iter_mut().zip(&first) {
        msgs.push((
            "assistant",
            v1["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string(),
        ));
        msgs.push(("user", prompt_text(8, 9)));
        let v2 = post(
            addr,
            "/v1/chat/completions",
            &turn_body(msgs, *routing, true, 16),
        )
        .v();
        let n1 = v1["usage"]["prompt_tokens"].as_u64().unwrap();
        let n2 = v2["usage"]["prompt_tokens"].as_u64().unwrap();
        let cached = cached_tokens(&v2);
        assert!(
            cached >= n1 && cached < n2,
            "turn 2 reused {cached} of {n2} tokens (turn 1 had {n1}): {v2}"
        );
        assert_eq!(v2["drllm"]["cached_tokens"], cached);
        assert_eq!(v2["drllm"]["path"], v1["drllm"]["path"], "the path stays");
        assert_eq!(
            v2["drllm"]["router_generation"],
            v1["drllm"]["router_generation"]
        );
        let path = if *routing {
            path_of(&COUNTS_A)
        } else {
            LayerPath::full(6)
        };
        // the engine run directly on the whole conversation, uncached, along the same path
        let (text, n_prompt) = direct(&s.model, msgs, &path, 16);
        assert_eq!(n2 as usize, n_prompt);
        assert_eq!(
            v2["choices"][0]["message"]["content"], text,
            "routing {routing}: cached turn differs from the uncached run"
        );
        // the same turn without the cache: nothing reused; a routed one is routed afresh
        let u2 = post(
            addr,
            "/v1/chat/completions",
            &turn_body(msgs, *routing, false, 16),
        )
        .v();
        assert_eq!(cached_tokens(&u2), 0);
        if *routing {
            assert_eq!(u2["drllm"]["path"], path_of(&COUNTS_B).to_string());
            assert_eq!(u2["drllm"]["router_generation"], new_gen);
        } else {
            assert_eq!(u2["choices"][0]["message"]["content"], text);
        }
    }
    assert_eq!(metric(addr, "drllm_cache_hits_total"), 2);
    assert_eq!(metric(addr, "drllm_cache_misses_total"), 2);
    assert!(metric(addr, "drllm_cache_tokens_reused_total") > 0);
    // turn 2 superseded turn 1 in each conversation; uncached requests are not kept
    assert_eq!(metric(addr, "drllm_cache_entries"), 2);
    assert!(metric(addr, "drllm_cache_bytes") > 0);
    // a new conversation that only shares the system prompt is routed on its own
    let other = vec![
        ("system", "be brief".to_string()),
        ("user", prompt_text(12, 77)),
    ];
    let v = post(
        addr,
        "/v1/chat/completions",
        &turn_body(&other, true, true, 4),
    )
    .v();
    assert_eq!(cached_tokens(&v), 0);
    assert_eq!(v["drllm"]["path"], path_of(&COUNTS_B).to_string());
}

#[test]
fn the_conversation_cache_stays_within_its_bytes() {
    // room for about one conversation of the tiny model (768 bytes of KV per token)
    let cap = 150_000;
    let s = server_with(
        |c| {
            c.no_routers = Some(true);
            c.cache_exact = Some(false);
        },
        |c| c.cache_bytes = cap,
    );
    let addr = s.addr;
    let conv = |seed: u64| {
        vec![
            ("system", "be brief".to_string()),
            ("user", prompt_text(40, seed)),
        ]
    };
    let (mut a, mut b) = (conv(1), conv(2));
    let a1 = post(
        addr,
        "/v1/chat/completions",
        &turn_body(&a, false, true, 32),
    )
    .v();
    let one = metric(addr, "drllm_cache_bytes");
    assert!(
        one > 0 && one as usize <= cap && 2 * one as usize > cap,
        "{one}"
    );
    let b1 = post(
        addr,
        "/v1/chat/completions",
        &turn_body(&b, false, true, 32),
    )
    .v();
    assert_eq!(metric(addr, "drllm_cache_evictions_total"), 1);
    assert_eq!(metric(addr, "drllm_cache_entries"), 1);
    assert!(metric(addr, "drllm_cache_bytes") as usize <= cap);
    // b's next turn continues it (the worker's own session: cut back, no copy)
    for (m, v1) in [(&mut a, &a1), (&mut b, &b1)] {
        m.push((
            "assistant",
            v1["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string(),
        ));
        m.push(("user", prompt_text(5, 3)));
    }
    let b2 = post(addr, "/v1/chat/completions", &turn_body(&b, false, true, 8)).v();
    assert!(cached_tokens(&b2) > 0, "{b2}");
    let (text, _) = direct(&s.model, &b, &LayerPath::full(6), 8);
    assert_eq!(b2["choices"][0]["message"]["content"], text);
    // a was evicted: its next turn is prefilled again (all but the system prompt it shares
    // with b), and still answers the same
    let a2 = post(addr, "/v1/chat/completions", &turn_body(&a, false, true, 8)).v();
    let shared = cached_tokens(&a2);
    assert!(shared > 0 && shared < 40, "{a2}");
    let (text, _) = direct(&s.model, &a, &LayerPath::full(6), 8);
    assert_eq!(a2["choices"][0]["message"]["content"], text);
    assert!(metric(addr, "drllm_cache_bytes") as usize <= cap);
    assert_eq!(metric(addr, "drllm_cache_evictions_total"), 2);
}

#[test]
fn bad_grammars_and_schemas_get_400s_with_the_reason() {
    let s = server(|_| {});
    let with = |extra: Value| {
        let mut b = chat_body(3, 4);
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        post(s.addr, "/v1/chat/completions", &b)
    };
    for (extra, param, code, reason) in [
        (
            json!({"grammar": "root ::= (\"yes\" | \"no\""}),
            "grammar",
            "invalid_grammar",
            "line 1, column 23: expected ')' (at the end)",
        ),
        (
            json!({"grammar": "root ::= answer\nanswr ::= \"x\""}),
            "grammar",
            "invalid_grammar",
            "rule 'answer' is used but not defined",
        ),
        (
            json!({"grammar": "start ::= \"x\""}),
            "grammar",
            "invalid_grammar",
            "no 'root' rule",
        ),
        (
            json!({"grammar": " "}),
            "grammar",
            "invalid_grammar",
            "empty",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"schema":
                {"type": "object", "properties": {"a": {"$ref": "#/$defs/nope"}}}}}}),
            "response_format",
            "invalid_schema",
            "'#/$defs/nope', which the schema does not define",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"schema":
                {"type": "object", "properties": {"a": {"type": "fancy"}}}}}}),
            "response_format",
            "invalid_schema",
            "unknown type 'fancy' at /properties/a/type",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
            "response_format.json_schema.schema",
            "invalid_schema",
            "needs json_schema.schema",
        ),
        (
            json!({"response_format": {"type": "xml"}}),
            "response_format.type",
            "invalid_value",
            "text, json_object or json_schema",
        ),
        (
            json!({"response_format": {"type": "json_object"}, "grammar": "root ::= \"x\""}),
            "grammar",
            "invalid_value",
            "not both",
        ),
    ] {
        let r = with(extra.clone());
        assert_eq!(r.status, 400, "{extra}: {}", r.body);
        let (_, p, c) = r.error();
        assert_eq!(
            (p.as_deref(), c.as_deref()),
            (Some(param), Some(code)),
            "{extra}"
        );
        let msg = r.v()["error"]["message"].as_str().unwrap().to_string();
        assert!(msg.contains(reason), "{extra}: {msg}");
    }
    // the server goes on; plain text is still the default
    let r = with(json!({"response_format": {"type": "text"}}));
    assert_eq!(r.status, 200, "{}", r.body);
}

/// A server on SmolLM2-135M-Instruct, if the model is present (setup fetches it; CI has it).
fn smollm2_server() -> Option<Server> {
    let model = drllm_testkit::real_model(drllm_testkit::SMOLLM2)?;
    let dir = tempfile::tempdir().unwrap();
    let s = Settings {
        model: Some(model.clone()),
        no_routers: Some(true),
        port: Some(0),
        threads: Some(2),
        ctx_size: Some(1024),
        no_db: Some(true),
        device: Some("cpu".into()),
        ..Default::default()
    };
    let config = s.resolve().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut handle = rt.block_on(start(config)).unwrap();
    rt.block_on(handle.ready()).unwrap();
    let addr = handle.addr();
    Some(Server {
        rt,
        handle: Some(handle),
        addr,
        model,
        sidecar: dir.path().join("none"),
        db: dir.path().join("none.sqlite"),
        _dir: dir,
    })
}

#[test]
fn json_mode_schemas_and_grammars_shape_smollm2_answers() {
    let Some(s) = smollm2_server() else { return };
    let ask = |content: &str, extra: Value| {
        let mut b = json!({"messages": [{"role": "user", "content": content}],
                           "max_tokens": 120, "temperature": 0});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        let r = post(s.addr, "/v1/chat/completions", &b);
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.v();
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    // a schema: the answer parses and has the required fields with their types
    let schema = json!({"type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                       "hobbies": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
        "required": ["name", "age", "hobbies"], "additionalProperties": false});
    let text = ask(
        "Describe a person named Anna who is 31 years old and likes chess, as JSON.",
        json!({"response_format": {"type": "json_schema",
                                   "json_schema": {"name": "person", "schema": schema}}}),
    );
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let o = v.as_object().unwrap();
    assert_eq!(o.len(), 3, "{text}");
    assert!(o["name"].is_string() && o["age"].is_i64(), "{text}");
    let hobbies = o["hobbies"].as_array().unwrap();
    assert!(
        hobbies.len() <= 3 && hobbies.iter().all(Value::is_string),
        "{text}"
    );
    // JSON mode: an object
    let text = ask(
        "List three colours as JSON.",
        json!({"response_format": {"type": "json_object"}}),
    );
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert!(v.is_object(), "{text}");
    // a GBNF grammar
    let text = ask(
        "Is water wet? Answer yes or no.",
        json!({"grammar": "root ::= (\"yes\" | \"no\") \".\""}),
    );
    assert!(text == "yes." || text == "no.", "{text}");
    // without one the same question gets prose
    let mut b = json!({"messages": [{"role": "user", "content": "Is water wet? Answer yes or no."}],
                       "max_tokens": 40, "temperature": 0});
    b["stream"] = json!(false);
    let free = post(s.addr, "/v1/chat/completions", &b).v();
    assert_ne!(free["choices"][0]["message"]["content"], "yes.");
}

#[test]
fn echo_logprobs_score_a_continuation_on_smollm2() {
    let Some(s) = smollm2_server() else { return };
    // loglikelihood scoring as lm-evaluation-harness does it: the prompt with each candidate,
    // echoed with logprobs, nothing generated; the candidate's tokens summed
    let score = |cand: &str| {
        let text = format!("The capital of France is{cand}");
        let r = post(
            s.addr,
            "/v1/completions",
            &json!({"prompt": text, "echo": true, "logprobs": 1, "max_tokens": 0}),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.v();
        let lp = &v["choices"][0]["logprobs"];
        assert_eq!(v["choices"][0]["text"], text);
        let offsets = lp["text_offset"].as_array().unwrap();
        let start = "The capital of France is".chars().count() as u64;
        lp["token_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .zip(offsets)
            .filter(|(_, o)| o.as_u64().unwrap() >= start)
            .map(|(x, _)| x.as_f64().unwrap())
            .sum::<f64>()
    };
    let (paris, london) = (score(" Paris"), score(" London"));
    assert!(paris > london, "Paris {paris} vs London {london}");
}

/// The tool template drllm ships (ChatML with tool calls).
fn tool_template() -> PathBuf {
    // cargo's run-time CARGO_MANIFEST_DIR first (a binary reused from a clone elsewhere)
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .join("../templates/chatml-tools.jinja")
}

fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "The weather now",
         "parameters": {"type": "object", "required": ["unit"],
                        "properties": {"unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}},
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
    ])
}

/// A tool call as the API gives it: (name, arguments parsed).
fn call_of(c: &Value) -> (String, Value) {
    assert_eq!(c["type"], "function", "{c}");
    assert!(
        c["id"].as_str().is_some_and(|i| i.starts_with("call_")),
        "{c}"
    );
    let args = c["function"]["arguments"]
        .as_str()
        .expect("arguments are JSON text");
    let args: Value = serde_json::from_str(args).unwrap_or_else(|e| panic!("{args}: {e}"));
    (c["function"]["name"].as_str().unwrap().to_string(), args)
}

/// The weather call's arguments follow its schema (the grammar's doing, on a random model).
fn assert_weather_args(args: &Value) {
    let unit = args["unit"].as_str().unwrap_or_default();
    assert!(["celsius", "fahrenheit"].contains(&unit), "{args}");
    assert_eq!(args.as_object().map(|o| o.len()), Some(1), "{args}");
}

#[test]
fn tool_calls_are_llama_cpps_chat_format_and_grammar_even_on_a_random_model() {
    // llama.cpp's SentencePiece tokenizer puts a space after a special token when the file
    // asks for a space prefix, and then the tool-call grammar (which starts with the
    // generation prompt, "<|im_start|>assistant\n") refuses the prompt's own tokens: the tiny
    // model says it wants none, as byte-level BPE models (SmolLM2) effectively do
    let mut spec = tiny_spec();
    spec.add_space_prefix = Some(false);
    let s = server_on(
        &spec,
        |c| {
            c.chat_template_file = Some(tool_template());
            c.ctx_size = Some(2048);
        },
        |_| {},
    );
    let chat = "/v1/chat/completions";
    let user = json!([{"role": "user", "content": prompt_text(4, 5)}]);
    let body = |choice: Value, stream: bool| {
        json!({"model": "tiny", "messages": user, "tools": weather_tools(), "tool_choice": choice,
               "max_tokens": 300, "temperature": 0, "stream": stream})
    };
    // required: the random tiny model answers with one call that parses and fits its schema
    let v = post(s.addr, chat, &body(json!("required"), false)).v();
    let choice = &v["choices"][0];
    let m = &choice["message"];
    let calls = m["tool_calls"].as_array().unwrap_or_else(|| panic!("{v}"));
    assert_eq!(calls.len(), 1, "parallel_tool_calls is false: {v}");
    let (name, args) = call_of(&calls[0]);
    match name.as_str() {
        "get_weather" => assert_weather_args(&args),
        "get_time" => assert_eq!(args, json!({})),
        other => panic!("called {other}"),
    }
    assert_eq!(m["content"], Value::Null, "{v}");
    // without parallel_tool_calls the generation stops when a second call begins
    assert_eq!(choice["finish_reason"], "tool_calls", "{v}");
    // a named function: that one
    let named = json!({"type": "function", "function": {"name": "get_weather"}});
    let v = post(s.addr, chat, &body(named.clone(), false)).v();
    let calls = v["choices"][0]["message"]["tool_calls"]
        .as_array()
        .unwrap()
        .clone();
    let (name, args) = call_of(&calls[0]);
    assert_eq!(name, "get_weather");
    assert_weather_args(&args);
    let finish = v["choices"][0]["finish_reason"].clone();
    assert_eq!(finish, "tool_calls", "{v}");
    // streamed: the deltas add up to the same call (id, type and name on the first)
    let r = post(s.addr, chat, &body(named, true));
    let mut streamed_args = String::new();
    let mut firsts = Vec::new();
    let mut last_finish = Value::Null;
    for d in r.sse_data() {
        if d == "[DONE]" {
            break;
        }
        let c: Value = serde_json::from_str(d).unwrap();
        let ch = &c["choices"][0];
        if !ch["finish_reason"].is_null() {
            last_finish = ch["finish_reason"].clone();
        }
        assert!(ch["delta"].get("content").is_none_or(|t| t == ""), "{c}");
        for tc in ch["delta"]["tool_calls"].as_array().into_iter().flatten() {
            assert_eq!(tc["index"], 0, "{c}");
            if tc.get("id").is_some() {
                firsts.push(tc.clone());
            }
            streamed_args.push_str(tc["function"]["arguments"].as_str().unwrap());
        }
    }
    assert_eq!(firsts.len(), 1, "{}", r.body);
    assert_eq!(firsts[0]["function"]["name"], "get_weather");
    assert_eq!(firsts[0]["type"], "function");
    assert_eq!(
        serde_json::from_str::<Value>(&streamed_args).unwrap(),
        args,
        "{}",
        r.body
    );
    assert_eq!(last_finish, finish);
    // a tool's result in the history is rendered by the template and answered
    let history = json!([
        {"role": "user", "content": prompt_text(4, 5)},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"unit\": \"celsius\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 and sunny"},
    ]);
    let r = post(
        s.addr,
        chat,
        &json!({"messages": history, "tools": weather_tools(), "max_tokens": 8, "temperature": 0}),
    );
    let v = r.v();
    assert_eq!(r.status, 200, "{v}");
    // the prompt is the template's rendering, made here by llama.cpp's chat layer directly
    let tok = Tokenizer::load(&s.model)
        .unwrap()
        .with_chat_template(std::fs::read_to_string(tool_template()).unwrap())
        .unwrap();
    let tools = weather_tools();
    let mut input = drllm_engine::ChatInput::messages(&history);
    input.tools = Some(&tools);
    let rendered = tok.chat().unwrap().apply(&input).unwrap().prompt;
    assert!(rendered.contains("<|im_start|>tool\n<tool_response>\n18 and sunny\n</tool_response>"));
    assert!(
        rendered.contains("{\"name\": \"get_weather\", \"arguments\": {\"unit\": \"celsius\"}}")
    );
    assert_eq!(
        v["usage"]["prompt_tokens"],
        json!(tok.tokenize(&rendered, true, true).len())
    );
    // what cannot be served is refused by name
    for (extra, param) in [
        (json!({"response_format": {"type": "json_object"}}), "tools"),
        (
            json!({"tool_choice": {"type": "function", "function": {"name": "nope"}}}),
            "tool_choice",
        ),
        (
            json!({"tools": [{"type": "function"}]}),
            "tools[0].function.name",
        ),
    ] {
        let mut b = body(json!("auto"), false);
        for (k, x) in extra.as_object().unwrap() {
            b[k] = x.clone();
        }
        let r = post(s.addr, chat, &b);
        assert_eq!(
            (r.status, r.error().1.as_deref()),
            (400, Some(param)),
            "{extra}: {}",
            r.body
        );
    }
    let r = post(
        s.addr,
        chat,
        &json!({"messages": user, "tool_choice": "required"}),
    );
    assert_eq!(
        (r.status, r.error().1.as_deref()),
        (400, Some("tool_choice"))
    );
    let r = post(
        s.addr,
        chat,
        &json!({"messages": [{"role": "user", "content": "x", "tool_calls": [{"id": "c"}]}]}),
    );
    assert_eq!(
        (r.status, r.error().1.as_deref()),
        (400, Some("messages[0].tool_calls"))
    );
}

#[test]
fn a_template_without_tool_calls_refuses_tools_instead_of_dropping_them() {
    let s = server(|_| {});
    let chat = "/v1/chat/completions";
    let mut b = chat_body(3, 4);
    b["tools"] = weather_tools();
    let r = post(s.addr, chat, &b);
    assert_eq!(r.status, 400, "{}", r.body);
    let (_, param, code) = r.error();
    assert_eq!(
        (param.as_deref(), code.as_deref()),
        (Some("tools"), Some("tools_unsupported"))
    );
    assert!(r.body.contains("--chat-template-file"), "{}", r.body);
    // tool_choice none asks for no call: served
    b["tool_choice"] = json!("none");
    let r = post(s.addr, chat, &b);
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.v()["choices"][0]["message"].get("tool_calls").is_none());
}
