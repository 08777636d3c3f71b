//! `drllm loadtest`: a bounded load test of a running `drllm serve` over loopback (or any
//! address): N chat requests from C clients at once; latency percentiles, throughput, the
//! refusals (503) and any other error, and the server's resident memory sampled along the way.

use anyhow::{bail, Context, Result};
use clap::Args;
use drllm_server::client;
use drllm_server::config::defaults;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct LoadtestArgs {
    /// Server address.
    #[arg(long, default_value_t = format!("{}:{}", defaults::HOST, defaults::PORT))]
    addr: String,
    /// Requests in all.
    #[arg(short = 'n', long, default_value_t = 200)]
    requests: usize,
    /// Clients sending at once.
    #[arg(short = 'c', long, default_value_t = 8)]
    concurrency: usize,
    /// Tokens per answer (ignore_eos is set, so every answer has exactly this many).
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// Stream the answers (SSE) instead of one JSON body.
    #[arg(long)]
    stream: bool,
    /// Route the requests (false: plain model; default: the server's choice).
    #[arg(long)]
    routing: Option<bool>,
    /// Bearer token.
    #[arg(long, env = "DRLLM_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// On 503 (queue full), wait as the Retry-After header says and send again (latency then
    /// counts from the first try).
    #[arg(long)]
    retry: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    /// Conversation mode: one conversation of this many turns instead of the load; each turn's
    /// time to first token is measured with the conversation cache and, side by side, for
    /// the same messages without it (`cache_prompt: false`).
    #[arg(long, value_name = "TURNS")]
    turns: Option<usize>,
    /// Conversation mode: words of the document the first user message brings (the later
    /// turns are short questions about it, as in a chat about a document).
    #[arg(long, default_value_t = 1100)]
    document_words: usize,
}

/// A few different questions, so that paths and lengths vary.
const PROMPTS: &[&str] = &[
    "Name three primary colours.",
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "Why do leaves change colour in autumn?",
    "Give me a tip for learning to cook.",
    "What does a thermometer measure?",
    "Explain what a noun is.",
    "How many legs does a spider have?",
];

struct Sample {
    status: u16,
    secs: f64,
    tokens: u64,
    passes: u64,
    /// The server's own generation speed for this request (drllm.timings).
    decode_tps: f64,
    error: Option<String>,
}

fn metric(addr: &str, token: Option<&str>, name: &str) -> Option<f64> {
    let r = client::request(
        addr,
        "GET",
        "/metrics",
        None,
        token,
        Duration::from_secs(30),
    )
    .ok()?;
    r.body
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Sentences the conversation mode's user messages are made of.
const NOTES: &[&str] = &[
    "The river rises in the hills and runs east past three villages before it reaches the sea.",
    "Every spring the farmers repair the stone walls that the winter frost has pushed apart.",
    "The old mill was turned into a library, and its wheel still turns when the water is high.",
    "Children walk to the school on the ridge, where the teacher keeps a garden of herbs.",
    "A market is held on Saturdays, selling cheese, bread, apples and wool from the valley.",
    "In the evenings the fishermen mend their nets on the harbour wall and talk about the weather.",
    "The railway reached the town in 1872, and the station clock has not been wrong since.",
    "Visitors come in summer to climb the peak, which on clear days shows the islands offshore.",
];

/// The later questions of the conversation mode.
const QUESTIONS: &[&str] = &[
    "When did the railway arrive, and what is special about the station clock?",
    "What is sold at the market, and on which day?",
    "What happened to the old mill?",
    "Where do the children go to school, and what does the teacher keep there?",
    "Why do visitors come in summer?",
    "What do the fishermen do in the evenings?",
    "What do the farmers repair every spring, and why?",
];

/// One conversation of `turns` turns: per turn, time to first token along the cached
/// conversation and for the same messages uncached.
fn run_conversation(a: &LoadtestArgs, turns: usize) -> Result<()> {
    let mut messages =
        vec![json!({"role": "system", "content": "You are a helpful assistant. Answer briefly."})];
    let mut rows = Vec::new();
    let words = document(a.document_words);
    for turn in 1..=turns {
        let content = if turn == 1 {
            format!(
                "Here are my notes about a town: {} What is the town's river like?",
                words.join(" ")
            )
        } else {
            QUESTIONS[(turn - 2) % QUESTIONS.len()].to_string()
        };
        messages.push(json!({"role": "user", "content": content}));
        let body = |cache: bool, max_tokens: usize| {
            let mut b = json!({"messages": messages, "max_tokens": max_tokens, "temperature": 0,
                "stream": true, "stream_options": {"include_usage": true}, "cache_prompt": cache});
            if let Some(r) = a.routing {
                b["routing"] = json!(r);
            }
            b
        };
        // uncached first (it leaves nothing in the cache), then the turn itself
        let (_, uncached) = send_turn(a, &body(false, 1))?;
        let (answer, cached) = send_turn(a, &body(true, a.max_tokens))?;
        let u = &answer["usage"];
        let row = json!({
            "turn": turn,
            "prompt_tokens": u["prompt_tokens"],
            "cached_tokens": u["prompt_tokens_details"]["cached_tokens"],
            "ttft_cached_seconds": cached,
            "ttft_uncached_seconds": uncached,
            "speedup": uncached / cached,
        });
        eprintln!(
            "[loadtest] turn {turn}: {} prompt tokens ({} cached): first token {:.3}s cached, {:.3}s uncached ({:.1}x)",
            u["prompt_tokens"], u["prompt_tokens_details"]["cached_tokens"], cached, uncached, uncached / cached
        );
        rows.push(row);
        messages.push(json!({"role": "assistant", "content": answer["text"]}));
    }
    if a.json {
        let summary = json!({"turns": rows});
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_turns(&rows);
    }
    Ok(())
}

/// The document of the first turn: `n` words of the notes, repeated as needed.
fn document(n: usize) -> Vec<&'static str> {
    let mut words: Vec<&str> = Vec::new();
    let mut i = 0;
    while words.len() < n {
        words.extend(NOTES[i % NOTES.len()].split(' '));
        i += 1;
    }
    words.truncate(n);
    words
}

/// Sends one streamed turn; gives the answer (text and usage) and the time to its first token.
fn send_turn(a: &LoadtestArgs, body: &Value) -> Result<(Value, f64)> {
    let (r, first) = client::request_first_text(
        &a.addr,
        "/v1/chat/completions",
        &body.to_string(),
        a.api_key.as_deref(),
        Duration::from_secs(1200),
    )?;
    if r.status != 200 {
        bail!("{} {}", r.status, r.body);
    }
    let chunks: Vec<Value> = r
        .sse_data()
        .iter()
        .filter_map(|d| serde_json::from_str(d).ok())
        .collect();
    if let Some(e) = chunks.iter().find(|c| c.get("error").is_some()) {
        bail!("{}", e["error"]);
    }
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    let usage = chunks
        .iter()
        .rev()
        .find(|c| c.get("usage").is_some_and(|u| !u.is_null()))
        .map(|c| c["usage"].clone())
        .unwrap_or(Value::Null);
    let ttft = first.context("the answer had no text")?.as_secs_f64();
    Ok((json!({"text": text, "usage": usage}), ttft))
}

/// The conversation's turns as a table.
fn print_turns(rows: &[Value]) {
    println!(
        "| turn | prompt tokens | cached | first token, cached (s) | uncached (s) | speedup |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {} | {} | {:.3} | {:.3} | {:.1}x |",
            r["turn"],
            r["prompt_tokens"],
            r["cached_tokens"],
            r["ttft_cached_seconds"].as_f64().unwrap_or(0.0),
            r["ttft_uncached_seconds"].as_f64().unwrap_or(0.0),
            r["speedup"].as_f64().unwrap_or(0.0)
        );
    }
}

pub fn run_loadtest(a: LoadtestArgs) -> Result<()> {
    if let Some(turns) = a.turns {
        if turns == 0 {
            bail!("--turns must be at least 1");
        }
        return run_conversation(&a, turns);
    }
    if a.requests == 0 || a.concurrency == 0 {
        bail!("--requests and --concurrency must be at least 1");
    }
    let h = client::request(
        &a.addr,
        "GET",
        "/health",
        None,
        None,
        Duration::from_secs(10),
    )
    .with_context(|| format!("no drllm server at {}", a.addr))?;
    if h.status != 200 {
        bail!("{} is not ready: {} {}", a.addr, h.status, h.body);
    }
    let memory = Mutex::new(Vec::new());
    sample_memory(&a, &memory, "start");
    let load = Load {
        a: &a,
        next: AtomicUsize::new(0),
        retries: AtomicUsize::new(0),
        results: Mutex::new(Vec::with_capacity(a.requests)),
        memory,
        t0: Instant::now(),
        tenth: (a.requests / 10).max(1),
    };
    std::thread::scope(|scope| {
        for _ in 0..a.concurrency {
            scope.spawn(|| load.client());
        }
    });
    eprintln!();
    let wall = load.t0.elapsed().as_secs_f64();
    sample_memory(&a, &load.memory, "end");
    let results = load.results.lock().unwrap_or_else(|p| p.into_inner());
    let t = tally(&results, load.retries.load(Ordering::Relaxed));
    let memory = load
        .memory
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&summary(&a, &t, wall, &memory))?
        );
    } else {
        print_summary(&a, &t, wall, &memory);
    }
    if !t.errors.is_empty() {
        bail!(
            "{} requests failed with errors other than 503",
            t.errors.len()
        );
    }
    Ok(())
}

/// What the clients of a load share.
struct Load<'a> {
    a: &'a LoadtestArgs,
    /// The next request to send.
    next: AtomicUsize,
    /// 503s sent again (--retry).
    retries: AtomicUsize,
    results: Mutex<Vec<Sample>>,
    /// The server's resident memory along the way: (when, MiB).
    memory: Mutex<Vec<(String, f64)>>,
    t0: Instant,
    /// Progress is reported (and memory sampled) every this many requests.
    tenth: usize,
}

/// Samples the server's resident memory (from /metrics) under `label`.
fn sample_memory(a: &LoadtestArgs, memory: &Mutex<Vec<(String, f64)>>, label: &str) {
    let token = a.api_key.as_deref();
    if let Some(v) = metric(&a.addr, token, "process_resident_memory_bytes") {
        if let Ok(mut s) = memory.lock() {
            s.push((label.to_string(), v / (1 << 20) as f64));
        }
    }
}

impl Load<'_> {
    /// One client: sends the next request until all have been sent.
    fn client(&self) {
        let a = self.a;
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= a.requests {
                return;
            }
            let mut body = json!({
                "messages": [{"role": "user", "content": PROMPTS[i % PROMPTS.len()]}],
                "max_tokens": a.max_tokens,
                "temperature": 0.7,
                "seed": i,
                "ignore_eos": true,
                "stream": a.stream,
                "stream_options": {"include_usage": a.stream},
            });
            if let Some(r) = a.routing {
                body["routing"] = json!(r);
            }
            let t = Instant::now();
            let (r, retried) = send_request(a, &body.to_string());
            self.retries.fetch_add(retried, Ordering::Relaxed);
            let sample = sample_of(a, r, t.elapsed().as_secs_f64());
            let done = {
                let mut res = self.results.lock().unwrap_or_else(|p| p.into_inner());
                res.push(sample);
                res.len()
            };
            if done % self.tenth == 0 {
                eprint!(
                    "\r[loadtest] {done}/{} requests, {:.0}s   ",
                    a.requests,
                    self.t0.elapsed().as_secs_f64()
                );
                sample_memory(a, &self.memory, &format!("after {done}"));
            }
        }
    }
}

/// Sends one chat request; with --retry a 503 is sent again after the wait its Retry-After
/// asks for. Gives the last answer and the number of retries.
fn send_request(a: &LoadtestArgs, body: &str) -> (std::io::Result<client::Response>, usize) {
    let mut retried = 0;
    loop {
        let r = client::request(
            &a.addr,
            "POST",
            "/v1/chat/completions",
            Some(body),
            a.api_key.as_deref(),
            Duration::from_secs(600),
        );
        match &r {
            Ok(resp) if resp.status == 503 && a.retry => {
                // as a polite client: wait as long as Retry-After says
                retried += 1;
                let wait = resp
                    .header("retry-after")
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(1.0)
                    .clamp(0.0, 30.0);
                std::thread::sleep(Duration::from_secs_f64(wait));
            }
            _ => return (r, retried),
        }
    }
}

/// What one request's answer says: its status (an error inside a 200 stream counts as 500),
/// the tokens and block passes, the server's generation speed.
fn sample_of(a: &LoadtestArgs, r: std::io::Result<client::Response>, secs: f64) -> Sample {
    let r = match r {
        Err(e) => {
            return Sample {
                status: 0,
                secs,
                tokens: 0,
                passes: 0,
                decode_tps: 0.0,
                error: Some(e.to_string()),
            }
        }
        Ok(r) => r,
    };
    // streamed: the drllm object rides on the last content chunk and the usage on its own
    // chunk (stream_options.include_usage)
    let mut stream_error = None;
    let (v, usage) = if a.stream {
        let chunks: Vec<Value> = r
            .sse_data()
            .iter()
            .filter_map(|d| serde_json::from_str(d).ok())
            .collect();
        let find = |k: &str| chunks.iter().rev().find(|c| c.get(k).is_some()).cloned();
        if let Some(e) = find("error") {
            // an error inside a 200 stream is an error, not a success
            stream_error = Some(e["error"]["message"].to_string());
        }
        (find("drllm"), find("usage"))
    } else {
        let v = r.json().ok();
        (v.clone(), v)
    };
    let v = v.unwrap_or(Value::Null);
    let tokens = usage
        .and_then(|u| u["usage"]["completion_tokens"].as_u64())
        .unwrap_or(0);
    let status = if stream_error.is_some() {
        500
    } else {
        r.status
    };
    let error = stream_error.clone().or_else(|| {
        (r.status != 200).then(|| {
            format!(
                "{} {}",
                r.status,
                r.body.chars().take(200).collect::<String>()
            )
        })
    });
    Sample {
        status,
        secs,
        tokens,
        passes: v["drllm"]["passes"].as_u64().unwrap_or(0),
        decode_tps: v["drllm"]["timings"]["decode_tokens_per_second"]
            .as_f64()
            .unwrap_or(0.0),
        error,
    }
}

/// The numbers of a finished load.
struct Tally<'r> {
    ok: Vec<&'r Sample>,
    /// Refusals: final answers of 503, plus the 503s retried.
    busy: usize,
    /// Failures other than 503.
    errors: Vec<&'r Sample>,
    /// Latencies of the successes, sorted.
    lat: Vec<f64>,
    tokens: u64,
    /// Mean block passes and server-side generation speed of the successes.
    passes: f64,
    decode_tps: f64,
}

fn tally(results: &[Sample], retries: usize) -> Tally<'_> {
    let ok: Vec<&Sample> = results.iter().filter(|s| s.status == 200).collect();
    let busy = results.iter().filter(|s| s.status == 503).count() + retries;
    let errors: Vec<&Sample> = results
        .iter()
        .filter(|s| s.status != 200 && s.status != 503)
        .collect();
    let mut lat: Vec<f64> = ok.iter().map(|s| s.secs).collect();
    lat.sort_by(f64::total_cmp);
    let tokens: u64 = ok.iter().map(|s| s.tokens).sum();
    let passes = if ok.is_empty() {
        0.0
    } else {
        ok.iter().map(|s| s.passes as f64).sum::<f64>() / ok.len() as f64
    };
    let decode_tps = if ok.is_empty() {
        0.0
    } else {
        ok.iter().map(|s| s.decode_tps).sum::<f64>() / ok.len() as f64
    };
    Tally {
        ok,
        busy,
        errors,
        lat,
        tokens,
        passes,
        decode_tps,
    }
}

/// The summary `--json` prints.
fn summary(a: &LoadtestArgs, t: &Tally, wall: f64, memory: &[(String, f64)]) -> Value {
    json!({
        "requests": a.requests,
        "concurrency": a.concurrency,
        "max_tokens": a.max_tokens,
        "stream": a.stream,
        "ok": t.ok.len(),
        "refused_503": t.busy,
        "retried": a.retry,
        "errors": t.errors.len(),
        "wall_seconds": wall,
        "latency_p50_seconds": percentile(&t.lat, 50.0),
        "latency_p95_seconds": percentile(&t.lat, 95.0),
        "latency_max_seconds": t.lat.last().copied().unwrap_or(0.0),
        "generated_tokens": t.tokens,
        "tokens_per_second": t.tokens as f64 / wall,
        "requests_per_second": t.ok.len() as f64 / wall,
        "mean_block_passes": t.passes,
        "mean_decode_tokens_per_second": t.decode_tps,
        "server_rss_mib": memory.iter().map(|(l, v)| json!([l, v])).collect::<Vec<_>>(),
        "first_errors": t.errors.iter().take(5).map(|s| s.error.clone()).collect::<Vec<_>>(),
    })
}

/// The summary as text.
fn print_summary(a: &LoadtestArgs, t: &Tally, wall: f64, memory: &[(String, f64)]) {
    println!(
        "{} requests at concurrency {} ({} tokens each{}): {} ok, {} refusals (503{}), {} errors in {:.1}s",
        a.requests,
        a.concurrency,
        a.max_tokens,
        if a.stream { ", streamed" } else { "" },
        t.ok.len(),
        t.busy,
        if a.retry { ", retried" } else { "" },
        t.errors.len(),
        wall
    );
    println!(
        "latency p50 {:.2}s, p95 {:.2}s, max {:.2}s; {:.1} generated tokens/s, {:.2} requests/s; mean block passes {:.2}; per-request generation speed (server timings) {:.1} tokens/s",
        percentile(&t.lat, 50.0),
        percentile(&t.lat, 95.0),
        t.lat.last().copied().unwrap_or(0.0),
        t.tokens as f64 / wall,
        t.ok.len() as f64 / wall,
        t.passes,
        t.decode_tps
    );
    if !memory.is_empty() {
        let line: Vec<String> = memory.iter().map(|(l, v)| format!("{l}: {v:.1}")).collect();
        println!("server resident memory (MiB): {}", line.join(", "));
    }
    for e in t.errors.iter().take(5) {
        println!("error: {}", e.error.as_deref().unwrap_or("?"));
    }
}
