//! `drllm`: run GGUF models with a per-request layer path.

mod bench;
mod loadtest;
mod routing_cli;
mod serve_cli;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use drllm_engine::{
    generate, ChatMessage, DeviceChoice, GenerateOptions, LayerPath, Model, Route, SamplingParams,
    Session, SessionOptions, Tokenizer,
};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

/// The model the README's main job runs when no -m is given.
pub const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Parser)]
#[command(
    name = "drllm",
    version,
    about = "Dynamic layer routing for local GGUF models"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text, streamed to stdout.
    Generate(GenerateArgs),
    /// Prompt and generation speed of stock llama.cpp and of drllm, side by side.
    Bench(bench::BenchArgs),
    /// The path the routers choose for a prompt, with each block's decision and logits.
    Route(routing_cli::RouteArgs),
    /// Metadata and tensor table of a GGUF model or router sidecar.
    Inspect(routing_cli::InspectArgs),
    /// Write a sidecar with constant (untrained) routers, for testing and measuring.
    RoutersInit(routing_cli::RoutersInitArgs),
    /// Serve the model over an OpenAI-compatible HTTP API, with router hot reload.
    Serve(Box<serve_cli::ServeArgs>),
    /// Routing decisions per block over a time window of the daemon's log (table, JSON, PNG).
    Stats(serve_cli::StatsArgs),
    /// A bounded load test of a running `drllm serve`: latency, throughput, memory.
    Loadtest(loadtest::LoadtestArgs),
}

/// Options shared by the commands that load a model.
#[derive(Args, Clone)]
pub struct ModelArgs {
    /// GGUF model file.
    #[arg(short = 'm', long = "model", default_value = DEFAULT_MODEL)]
    pub model: PathBuf,
    /// CPU threads (default: all cores).
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    /// Device: auto (best available) or cpu.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// Layer path: `full`, a list like `0-3,3,5-29`, or edits like `skip=4,7 repeat=3`.
    #[arg(long)]
    pub path: Option<String>,
}

impl ModelArgs {
    pub fn threads(&self) -> usize {
        self.threads
            .unwrap_or_else(|| SessionOptions::default().n_threads)
    }

    pub fn load(&self) -> Result<Arc<Model>> {
        if !self.model.exists() {
            bail!(
                "model file {} not found (run scripts/setup.sh to fetch the default models)",
                self.model.display()
            );
        }
        let m = Model::load(&self.model, self.device)
            .with_context(|| format!("loading {}", self.model.display()))?;
        Ok(Arc::new(m))
    }

    pub fn layer_path(&self, n_layer: usize) -> Result<LayerPath> {
        match &self.path {
            None => Ok(LayerPath::full(n_layer)),
            Some(s) => LayerPath::parse(s, n_layer).with_context(|| format!("--path '{s}'")),
        }
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    routing: routing_cli::RoutingArgs,
    /// Prompt text.
    #[arg(short = 'p', long)]
    prompt: String,
    /// Wrap the prompt in the model's chat template (as a user message).
    #[arg(long)]
    chat: bool,
    /// System message (with --chat).
    #[arg(long)]
    system: Option<String>,
    /// Tokens to generate.
    #[arg(short = 'n', long = "n-predict", default_value_t = 256)]
    n_predict: usize,
    /// Context size.
    #[arg(short = 'c', long = "ctx-size", default_value_t = 4096)]
    ctx: usize,
    /// Temperature (0 = greedy).
    #[arg(long = "temp", default_value_t = SamplingParams::default().temperature)]
    temperature: f32,
    /// Top-k (0 = off).
    #[arg(long, default_value_t = SamplingParams::default().top_k)]
    top_k: i32,
    /// Top-p (1 = off).
    #[arg(long, default_value_t = SamplingParams::default().top_p)]
    top_p: f32,
    /// Min-p (0 = off).
    #[arg(long, default_value_t = SamplingParams::default().min_p)]
    min_p: f32,
    /// Repeat penalty: a token seen in the last --repeat-last-n tokens has its logit divided
    /// by this (1 = off), as llama.cpp's.
    #[arg(long, default_value_t = SamplingParams::default().repeat_penalty)]
    repeat_penalty: f32,
    /// Tokens (prompt included) the penalties look back at (0 = off).
    #[arg(long, default_value_t = SamplingParams::default().repeat_last_n)]
    repeat_last_n: i32,
    /// Subtracted from a token's logit per time it was seen (0 = off).
    #[arg(long, default_value_t = SamplingParams::default().frequency_penalty, allow_negative_numbers = true)]
    frequency_penalty: f32,
    /// Subtracted once from the logit of a token seen at all (0 = off).
    #[arg(long, default_value_t = SamplingParams::default().presence_penalty, allow_negative_numbers = true)]
    presence_penalty: f32,
    /// Sampling seed (default: random).
    #[arg(long)]
    seed: Option<u32>,
    /// Stop at this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Keep generating past end-of-generation tokens.
    #[arg(long)]
    ignore_eos: bool,
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Generate(a) => run_generate(a),
        Cmd::Bench(a) => bench::run(a),
        Cmd::Route(a) => routing_cli::run_route(a),
        Cmd::Inspect(a) => routing_cli::run_inspect(a),
        Cmd::RoutersInit(a) => routing_cli::run_routers_init(a),
        Cmd::Serve(a) => serve_cli::run_serve(*a),
        Cmd::Stats(a) => serve_cli::run_stats(a),
        Cmd::Loadtest(a) => loadtest::run_loadtest(a),
    };
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

impl GenerateArgs {
    /// The sampling settings, checked; without --seed a seed from the clock.
    fn sampling(&self) -> Result<SamplingParams> {
        let sampling = SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            seed: self
                .seed
                .unwrap_or_else(|| drllm_server::clock::random_seed(u64::from(std::process::id()))),
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            frequency_penalty: self.frequency_penalty,
            presence_penalty: self.presence_penalty,
            logit_bias: Vec::new(),
        };
        sampling.validate().map_err(anyhow::Error::msg)?;
        Ok(sampling)
    }

    /// The prompt, in the chat template with --chat.
    fn text(&self, tok: &Tokenizer) -> Result<String> {
        if !self.chat {
            return Ok(self.prompt.clone());
        }
        let mut msgs = Vec::new();
        if let Some(s) = &self.system {
            msgs.push(ChatMessage::new("system", s.clone()));
        }
        msgs.push(ChatMessage::new("user", self.prompt.clone()));
        Ok(tok.apply_chat(&msgs, true)?)
    }
}

fn run_generate(a: GenerateArgs) -> Result<()> {
    let model = a.model.load()?;
    if std::env::var_os("DRLLM_VERBOSE").is_some() {
        for (name, bytes) in model.buffer_summary() {
            eprintln!(
                "[drllm] weights in {name}: {:.2} MiB",
                bytes as f64 / (1 << 20) as f64
            );
        }
    }
    let tok = Tokenizer::load(&a.model.model)?;
    let sampling = a.sampling()?;
    let prompt = tok.tokenize(&a.text(&tok)?, true, a.chat);
    if prompt.is_empty() {
        bail!("the prompt is empty after tokenization");
    }
    let path = a.model.layer_path(model.n_layer())?;
    let routers = a.routing.resolve(&a.model, &model)?;
    let route_opts = a.routing.options()?;
    let mut hook = routers.as_ref().map(|r| r.hook(&route_opts));
    if let Some(r) = &routers {
        eprintln!(
            "[drllm] routing with {} (generation {})",
            r.path().display(),
            r.generation().chars().take(19).collect::<String>()
        );
    }
    let route = match hook.as_mut() {
        Some(h) => Route::Hook(h),
        None => Route::Fixed(&path),
    };
    let mut session = Session::new(
        model.clone(),
        SessionOptions {
            n_ctx: a.ctx,
            n_threads: a.model.threads(),
            ..Default::default()
        },
    )?;
    if prompt.len() >= a.ctx {
        bail!(
            "the prompt has {} tokens, more than the context of {} (raise --ctx-size)",
            prompt.len(),
            a.ctx
        );
    }
    let opts = GenerateOptions {
        max_tokens: a.n_predict,
        sampling,
        stop: a.stop.clone(),
        ignore_eos: a.ignore_eos,
        ..Default::default()
    };
    let mut out = std::io::stdout().lock();
    let g = generate(&mut session, &tok, &prompt, route, &opts, |s| {
        let _ = out.write_all(s.as_bytes());
        let _ = out.flush();
        true
    })?;
    let _ = writeln!(out);
    let _ = out.flush();
    let n_gen = g.tokens.len();
    eprintln!(
        "[drllm] path {} ({} of {} block passes; skipped {:?}, repeated {:?})",
        g.path,
        g.path.len(),
        model.n_layer(),
        g.path.skipped(),
        g.path.repeated()
    );
    eprintln!(
        "[drllm] prompt {} tokens in {:.2}s ({:.1} tok/s), generated {} tokens in {:.2}s ({:.1} tok/s), finish: {}",
        g.n_prompt,
        g.prefill_secs,
        g.n_prompt as f64 / g.prefill_secs.max(1e-9),
        n_gen,
        g.decode_secs,
        n_gen as f64 / g.decode_secs.max(1e-9),
        g.finish.as_str()
    );
    Ok(())
}
