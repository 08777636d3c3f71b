//! Router-related command-line pieces: sidecar discovery, `route`, `inspect`, `routers-init`.

use crate::ModelArgs;
use anyhow::{bail, Context, Result};
use clap::Args;
use drllm_engine::router_format::{sidecar_path_for, Sidecar, StorageType, ARCHITECTURE};
use drllm_engine::{
    constant_sidecar, BlockDecision, ChatMessage, LayerPath, Logits, Model, Route, RouteOptions,
    Routers, Session, SessionOptions, Tokenizer,
};
use drllm_gguf::{GgufFile, Value};
use serde_json::json;
use std::path::PathBuf;

/// Which routers to use and how.
#[derive(Args, Clone, Default)]
pub struct RoutingArgs {
    /// Router sidecar (default: MODEL.routers.gguf next to the model, when present).
    #[arg(long, conflicts_with = "no_routers")]
    pub routers: Option<PathBuf>,
    /// Run the plain model even when a sidecar is present.
    #[arg(long)]
    pub no_routers: bool,
    /// Depth bias in logit units: > 0 keeps more blocks, < 0 skips more.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub depth_bias: f32,
    /// Cap on the total number of block passes.
    #[arg(long)]
    pub max_passes: Option<usize>,
}

impl RoutingArgs {
    pub fn options(&self) -> Result<RouteOptions> {
        let o = RouteOptions {
            depth_bias: self.depth_bias,
            max_passes: self.max_passes,
            observe_only: false,
        };
        o.validate().map_err(anyhow::Error::msg)?;
        Ok(o)
    }

    /// The routers to use: an explicit `--routers` file must match the model; a sidecar found
    /// next to the model that does not match is reported and the model runs unrouted.
    pub fn resolve(&self, m: &ModelArgs, model: &Model) -> Result<Option<Routers>> {
        if self.no_routers {
            return Ok(None);
        }
        if m.path.is_some() {
            if self.routers.is_some() {
                bail!(
                    "--path and --routers exclude each other (a path given by hand is not routed)"
                );
            }
            return Ok(None);
        }
        if let Some(p) = &self.routers {
            let r = Routers::load(p, model)
                .with_context(|| format!("router sidecar {}", p.display()))?;
            return Ok(Some(r));
        }
        let p = sidecar_path_for(&m.model);
        if !p.exists() {
            return Ok(None);
        }
        match Routers::load(&p, model) {
            Ok(r) => Ok(Some(r)),
            Err(e) => {
                eprintln!("[drllm] warning: {e:#}");
                eprintln!(
                    "[drllm] running the plain model without routers (--no-routers silences this)"
                );
                Ok(None)
            }
        }
    }
}

#[derive(Args)]
pub struct RouteArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    routing: RoutingArgs,
    /// Prompt text.
    #[arg(short = 'p', long)]
    prompt: String,
    /// Wrap the prompt in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `drllm route`: the path the routers choose for a prompt, block by block.
pub fn run_route(a: RouteArgs) -> Result<()> {
    if a.model.path.is_some() {
        bail!("drllm route shows what the routers choose; --path does not apply");
    }
    let model = a.model.load()?;
    let routers = a.routing.resolve(&a.model, &model)?.with_context(|| {
        format!(
            "no router sidecar: expected {} or --routers PATH",
            sidecar_path_for(&a.model.model).display()
        )
    })?;
    let tok = Tokenizer::load(&a.model.model)?;
    let text = if a.chat {
        tok.apply_chat(&[ChatMessage::new("user", a.prompt.clone())], true)?
    } else {
        a.prompt.clone()
    };
    let prompt = tok.tokenize(&text, true, a.chat);
    let opts = a.routing.options()?;
    let mut session = Session::new(
        model.clone(),
        SessionOptions {
            n_ctx: (prompt.len() + 1).max(256),
            n_threads: a.model.threads(),
            ..Default::default()
        },
    )?;
    let mut hook = routers.hook(&opts);
    let t = std::time::Instant::now();
    session.prefill(&prompt, Route::Hook(&mut hook), Logits::Last)?;
    let secs = t.elapsed().as_secs_f64();
    let chosen = Chosen {
        path: hook.path()?,
        decisions: hook.decisions(),
        prompt_tokens: prompt.len(),
        n_layer: model.n_layer(),
        secs,
    };
    if a.json {
        print_route_json(&a, &routers, &opts, &chosen)
    } else {
        print_route_table(&routers, &chosen);
        Ok(())
    }
}

/// What the routers chose for a prompt.
struct Chosen<'h> {
    path: LayerPath,
    decisions: &'h [BlockDecision],
    prompt_tokens: usize,
    n_layer: usize,
    /// The routed prefill's time.
    secs: f64,
}

fn print_route_json(
    a: &RouteArgs,
    routers: &Routers,
    opts: &RouteOptions,
    c: &Chosen,
) -> Result<()> {
    let decisions: Vec<_> = c
        .decisions
        .iter()
        .map(|d| {
            json!({
                "block": d.block,
                "logits": {"skip": d.logits[0], "execute": d.logits[1], "repeat": d.logits[2]},
                "chosen": d.chosen,
                "passes": d.passes,
                "decision": d.name(),
            })
        })
        .collect();
    let out = json!({
        "model": a.model.model.display().to_string(),
        "routers": routers.path().display().to_string(),
        "generation": routers.generation(),
        "prompt_tokens": c.prompt_tokens,
        "depth_bias": opts.depth_bias,
        "max_passes": opts.max_passes,
        "decisions": decisions,
        "path": c.path.to_string(),
        "passes": c.path.len(),
        "n_layer": c.n_layer,
        "skipped": c.path.skipped(),
        "repeated": c.path.repeated(),
        "prefill_secs": c.secs,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

fn print_route_table(routers: &Routers, c: &Chosen) {
    let sc = routers.sidecar();
    println!(
        "routers {} (generation {}, dataset: {})",
        routers.path().display(),
        short(routers.generation()),
        if sc.provenance.dataset.is_empty() {
            "-"
        } else {
            &sc.provenance.dataset
        }
    );
    println!(
        "prompt {} tokens, {} windows",
        c.prompt_tokens,
        drllm_engine::router_format::n_windows(c.prompt_tokens, sc.shape.windows)
    );
    println!(
        "{:>5}  {:>9} {:>9} {:>9}  decision",
        "block", "skip", "execute", "repeat"
    );
    for d in c.decisions {
        let capped = if d.passes != d.chosen {
            " (capped)"
        } else {
            ""
        };
        println!(
            "{:>5}  {:>9.3} {:>9.3} {:>9.3}  {}{}",
            d.block,
            d.logits[0],
            d.logits[1],
            d.logits[2],
            d.name(),
            capped
        );
    }
    println!(
        "path {}: {} of {} block passes, skipped {:?}, repeated {:?}",
        c.path,
        c.path.len(),
        c.n_layer,
        c.path.skipped(),
        c.path.repeated()
    );
}

fn short(h: &str) -> String {
    h.chars().take(19).collect()
}

#[derive(Args)]
pub struct InspectArgs {
    /// Any GGUF file: a model or a router sidecar.
    file: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Show every element of long arrays (default: the first 8).
    #[arg(long)]
    full: bool,
}

fn value_json(v: &Value, full: bool) -> serde_json::Value {
    match v {
        Value::Array(a) => {
            let n = a.values.len();
            let shown: Vec<_> = a
                .values
                .iter()
                .take(if full { n } else { 8 })
                .map(|x| value_json(x, full))
                .collect();
            if shown.len() < n {
                json!({"array_len": n, "first": shown})
            } else {
                serde_json::Value::Array(shown)
            }
        }
        Value::String(s) => json!(s),
        Value::Bool(b) => json!(b),
        Value::F32(x) => json!(x),
        Value::F64(x) => json!(x),
        other => other
            .as_i64()
            .map(|i| json!(i))
            .unwrap_or_else(|| json!(format!("{other:?}"))),
    }
}

/// `drllm inspect FILE`: metadata and tensor table of a GGUF model or sidecar.
pub fn run_inspect(a: InspectArgs) -> Result<()> {
    let g = GgufFile::open(&a.file).with_context(|| format!("{}", a.file.display()))?;
    let is_sidecar = g.architecture() == Some(ARCHITECTURE);
    let sidecar_check = if is_sidecar {
        Some(
            Sidecar::read(&a.file)
                .map(|_| ())
                .map_err(|e| e.to_string()),
        )
    } else {
        None
    };
    if a.json {
        let kv: serde_json::Map<String, serde_json::Value> =
            g.kv.iter()
                .map(|(k, v)| (k.clone(), value_json(v, a.full)))
                .collect();
        let tensors: Vec<_> = g
            .tensors
            .iter()
            .map(|t| {
                json!({"name": t.name, "type": t.dtype.name(), "dims": t.dims,
                       "offset": t.offset, "bytes": t.size})
            })
            .collect();
        let out = json!({
            "file": a.file.display().to_string(),
            "version": g.version,
            "alignment": g.alignment,
            "file_size": g.file_size,
            "kind": if is_sidecar { "drllm router sidecar" } else { "model" },
            "sidecar_valid": sidecar_check.as_ref().map(|r| r.is_ok()),
            "sidecar_error": sidecar_check.as_ref().and_then(|r| r.clone().err()),
            "metadata": kv,
            "tensors": tensors,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "{}: GGUF v{}, {} bytes, alignment {}, {} metadata keys, {} tensors{}",
        a.file.display(),
        g.version,
        g.file_size,
        g.alignment,
        g.kv.len(),
        g.tensors.len(),
        if is_sidecar {
            " (drllm router sidecar)"
        } else {
            ""
        }
    );
    if let Some(r) = &sidecar_check {
        match r {
            Ok(()) => println!("sidecar: valid"),
            Err(e) => println!("sidecar: INVALID: {e}"),
        }
    }
    println!("\nmetadata:");
    for (k, v) in &g.kv {
        let s = match value_json(v, a.full) {
            serde_json::Value::String(s) => {
                let one_line = s.replace('\n', "\\n");
                if !a.full && one_line.chars().count() > 120 {
                    format!(
                        "{:?}... ({} chars)",
                        one_line.chars().take(120).collect::<String>(),
                        s.chars().count()
                    )
                } else {
                    format!("{one_line:?}")
                }
            }
            other => other.to_string(),
        };
        println!("  {k:<48} {s}");
    }
    println!("\ntensors:");
    println!(
        "  {:<40} {:>6} {:>22} {:>12} {:>12}",
        "name", "type", "dims", "offset", "bytes"
    );
    for t in &g.tensors {
        println!(
            "  {:<40} {:>6} {:>22} {:>12} {:>12}",
            t.name,
            t.dtype.name(),
            format!("{:?}", t.dims),
            t.offset,
            t.size
        );
    }
    Ok(())
}

#[derive(Args)]
pub struct RoutersInitArgs {
    /// The base model.
    #[arg(short = 'm', long = "model", default_value = crate::DEFAULT_MODEL)]
    model: PathBuf,
    /// Where to write the sidecar (default: MODEL.routers.gguf next to the model).
    #[arg(short = 'o', long)]
    out: Option<PathBuf>,
    /// Decisions the routers make, as a path (`full`, `skip=4 repeat=9`, ...; each block 0-2
    /// times, in order).
    #[arg(long, default_value = "full")]
    decisions: String,
    /// Random (Xavier) router weights from this seed instead of zeros; the decisions stay the
    /// same, but every router does its full arithmetic (for measuring routing cost).
    #[arg(long)]
    random: Option<u64>,
    /// Store weights as F16.
    #[arg(long)]
    f16: bool,
    /// Replace an existing file.
    #[arg(long)]
    force: bool,
}

/// `drllm routers-init`: a sidecar with constant (untrained) routers.
pub fn run_routers_init(a: RoutersInitArgs) -> Result<()> {
    let model = Model::load(&a.model, drllm_engine::DeviceChoice::Cpu)
        .with_context(|| format!("loading {}", a.model.display()))?;
    let path = LayerPath::parse(&a.decisions, model.n_layer())?;
    let counts = path.counts();
    if path != LayerPath::from_counts(&counts)? || counts.iter().any(|&c| c > 2) {
        bail!("router decisions must be in-order paths with each block 0, 1 or 2 times");
    }
    let sc = constant_sidecar(&model, &counts, a.random)?;
    let out = a.out.unwrap_or_else(|| sidecar_path_for(&a.model));
    if out.exists() && !a.force {
        bail!("{} exists (use --force to replace it)", out.display());
    }
    sc.write(
        &out,
        if a.f16 {
            StorageType::F16
        } else {
            StorageType::F32
        },
    )
    .with_context(|| format!("writing {}", out.display()))?;
    eprintln!(
        "[drllm] wrote {} (constant routers: path {path}, {} passes of {})",
        out.display(),
        path.len(),
        model.n_layer()
    );
    Ok(())
}
