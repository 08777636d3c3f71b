//! `drllm bench`: stock llama.cpp and drllm's engine on the same file, measured side by side in
//! one run (interleaved repetitions; the median of each is reported).

use crate::routing_cli::RoutingArgs;
use crate::ModelArgs;
use anyhow::{Context, Result};
use clap::Args;
use drllm_engine::stock::{StockContext, StockModel};
use drllm_engine::{
    argmax, LayerPath, Logits, Model, Route, RouteOptions, Routers, Session, SessionOptions,
    Tokenizer,
};
use serde::Serialize;
use std::time::Instant;

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    routing: RoutingArgs,
    /// Prompt tokens (prompt processing test).
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Generated tokens (generation test).
    #[arg(long, default_value_t = 128)]
    gen_tokens: usize,
    /// Repetitions of each measurement (median reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Also measure N sequences decoded in one graph against the same N decoded one at a time
    /// (aggregate tokens/s; what the daemon's batching of requests on one path gains).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize, Clone, Copy, Default)]
struct Speed {
    pp_tok_s: f64,
    tg_tok_s: f64,
}

#[derive(Serialize)]
struct Report {
    model: String,
    arch: String,
    n_layer: usize,
    device: String,
    threads: usize,
    prompt_tokens: usize,
    gen_tokens: usize,
    reps: usize,
    stock: Speed,
    engine_full: Speed,
    full_over_stock_pp: f64,
    full_over_stock_tg: f64,
    path: Option<PathReport>,
    routed: Option<RoutedReport>,
    batch: Option<BatchReport>,
}

#[derive(Serialize)]
struct BatchReport {
    sequences: usize,
    path: String,
    batched_tok_s: f64,
    one_at_a_time_tok_s: f64,
    batched_over_one_at_a_time: f64,
}

#[derive(Serialize)]
struct RoutedReport {
    routers: String,
    generation: String,
    path: String,
    passes: usize,
    skipped: Vec<usize>,
    repeated: Vec<usize>,
    /// prefill includes routing (pooling, router MLPs, one graph per pass)
    speed: Speed,
    routed_over_full_pp: f64,
    routed_over_full_tg: f64,
    /// observe-only routing (every block once) against the plain prefill: the routing cost
    routing_overhead_pct: f64,
}

#[derive(Serialize)]
struct PathReport {
    path: String,
    passes: usize,
    skipped: Vec<usize>,
    repeated: Vec<usize>,
    speed: Speed,
    path_over_full_pp: f64,
    path_over_full_tg: f64,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

/// Deterministic prompt tokens: real text repeated to the length asked for.
fn prompt_tokens(tok: &Tokenizer, n: usize) -> Vec<i32> {
    const TEXT: &str = "The quick brown fox jumps over the lazy dog while the farmer counts his \
        sheep in the green valley near the old river. Scientists measure the temperature of the \
        water every morning and write the numbers in a small notebook. ";
    let mut out = tok.tokenize("", true, false);
    let body = tok.tokenize(TEXT, false, false);
    while out.len() < n {
        out.extend_from_slice(&body);
    }
    out.truncate(n);
    out
}

/// What every measurement repeats: the prompt, the tokens generated, the paths and the
/// routing options.
struct Plan {
    prompt: Vec<i32>,
    /// The one-token prompt generation starts from.
    first: i32,
    gen_tokens: usize,
    full: LayerPath,
    /// The path given with --path.
    path: Option<LayerPath>,
    /// Sequences decoded together (1: no batch measurement).
    n_batch: usize,
    /// The path of the batch measurement (--path, else full depth).
    batch_path: LayerPath,
    ropts: RouteOptions,
    /// `ropts` observing only (every block once): the cost of routing.
    observe: RouteOptions,
}

/// What the measurements run on: stock llama.cpp's context and drllm's sessions.
struct Rig<'m> {
    sctx: StockContext<'m>,
    session: Session,
    /// The batch measurement's sessions (none when `n_batch` is 1).
    batch: Vec<Session>,
}

impl Plan {
    /// Stock llama.cpp: (pp tok/s, tg tok/s).
    fn stock(&self, sctx: &mut StockContext) -> Result<(f64, f64)> {
        sctx.reset();
        let t = Instant::now();
        sctx.eval(&self.prompt, false)?;
        let pp = self.prompt.len() as f64 / t.elapsed().as_secs_f64();
        sctx.reset();
        let mut logits = sctx.eval(&[self.first], false)?;
        let t = Instant::now();
        for _ in 0..self.gen_tokens {
            logits = sctx.decode(argmax(&logits))?.to_vec();
        }
        let tg = self.gen_tokens as f64 / t.elapsed().as_secs_f64();
        Ok((pp, tg))
    }

    /// Generation speed along a path: greedy tokens after a one-token prompt.
    fn gen_speed(&self, s: &mut Session, path: &LayerPath) -> Result<f64> {
        let mut logits = s
            .prefill(&[self.first], Route::Fixed(path), Logits::Last)?
            .logits;
        let t = Instant::now();
        for _ in 0..self.gen_tokens {
            logits = s.decode(argmax(&logits))?.to_vec();
        }
        Ok(self.gen_tokens as f64 / t.elapsed().as_secs_f64())
    }

    /// drllm along a fixed path: (pp tok/s, tg tok/s).
    fn engine(&self, s: &mut Session, path: &LayerPath) -> Result<(f64, f64)> {
        let t = Instant::now();
        s.prefill(&self.prompt, Route::Fixed(path), Logits::Last)?;
        let pp = self.prompt.len() as f64 / t.elapsed().as_secs_f64();
        Ok((pp, self.gen_speed(s, path)?))
    }

    /// N sequences along one path: aggregate generation speed decoded in one graph per step,
    /// then decoded one at a time (round robin), from the same one-token prompts.
    fn batch(&self, ss: &mut [Session]) -> Result<(f64, f64)> {
        let start = |ss: &mut [Session]| -> Result<Vec<i32>> {
            ss.iter_mut()
                .map(|s| {
                    let l =
                        s.prefill(&[self.first], Route::Fixed(&self.batch_path), Logits::Last)?;
                    Ok(argmax(&l.logits))
                })
                .collect()
        };
        let total = (ss.len() * self.gen_tokens) as f64;
        let mut next = start(ss)?;
        let t = Instant::now();
        for _ in 0..self.gen_tokens {
            let mut refs: Vec<&mut Session> = ss.iter_mut().collect();
            let out = Session::decode_batch(&mut refs, &next)?;
            next = out.iter().map(|l| argmax(l)).collect();
        }
        let batched = total / t.elapsed().as_secs_f64();
        let mut next = start(ss)?;
        let t = Instant::now();
        for _ in 0..self.gen_tokens {
            for (s, n) in ss.iter_mut().zip(next.iter_mut()) {
                *n = argmax(s.decode(*n)?);
            }
        }
        Ok((batched, total / t.elapsed().as_secs_f64()))
    }

    /// Routed prefill (routing included), then generation along the chosen path.
    fn routed(&self, s: &mut Session, r: &Routers) -> Result<(f64, f64, LayerPath)> {
        let mut hook = r.hook(&self.ropts);
        let t = Instant::now();
        s.prefill(&self.prompt, Route::Hook(&mut hook), Logits::Last)?;
        let pp = self.prompt.len() as f64 / t.elapsed().as_secs_f64();
        let path = hook.path()?;
        Ok((pp, self.gen_speed(s, &path)?, path))
    }

    /// Prefill seconds: plain full depth vs observe-only routing (same work plus routing).
    fn overhead(&self, s: &mut Session, r: &Routers) -> Result<(f64, f64)> {
        let t = Instant::now();
        s.prefill(&self.prompt, Route::Fixed(&self.full), Logits::Last)?;
        let plain = t.elapsed().as_secs_f64();
        let mut hook = r.hook(&self.observe);
        let t = Instant::now();
        s.prefill(&self.prompt, Route::Hook(&mut hook), Logits::Last)?;
        Ok((plain, t.elapsed().as_secs_f64()))
    }

    /// One run of every measurement, before the repetitions that count.
    fn warm_up(&self, rig: &mut Rig, routers: Option<&Routers>) -> Result<()> {
        self.stock(&mut rig.sctx)?;
        if let Some(r) = routers {
            self.routed(&mut rig.session, r)?;
            self.overhead(&mut rig.session, r)?;
        }
        self.engine(&mut rig.session, &self.full)?;
        if let Some(p) = &self.path {
            self.engine(&mut rig.session, p)?;
        }
        if self.n_batch > 1 {
            self.batch(&mut rig.batch)?;
        }
        Ok(())
    }

    /// Repetition `i` of every measurement, recorded in `m`.
    fn repetition(
        &self,
        i: usize,
        rig: &mut Rig,
        routers: Option<&Routers>,
        m: &mut Samples,
    ) -> Result<()> {
        // alternate who goes first, so order effects (caches, clock ramps) cancel out
        let ((sp, sg), (fp, fg)) = if i.is_multiple_of(2) {
            let s = self.stock(&mut rig.sctx)?;
            (s, self.engine(&mut rig.session, &self.full)?)
        } else {
            let e = self.engine(&mut rig.session, &self.full)?;
            (self.stock(&mut rig.sctx)?, e)
        };
        m.spp.push(sp);
        m.stg.push(sg);
        m.fpp.push(fp);
        m.ftg.push(fg);
        m.r_pp.push(fp / sp);
        m.r_tg.push(fg / sg);
        if let Some(path) = &self.path {
            let (p, g) = self.engine(&mut rig.session, path)?;
            m.rpp.push(p);
            m.rtg.push(g);
            m.q_pp.push(p / fp);
            m.q_tg.push(g / fg);
        }
        if let Some(r) = routers {
            let (p, g, path) = self.routed(&mut rig.session, r)?;
            m.xpp.push(p);
            m.xtg.push(g);
            m.x_pp.push(p / fp);
            m.x_tg.push(g / fg);
            m.routed_path = Some(path);
            let (plain, observed) = self.overhead(&mut rig.session, r)?;
            m.overhead.push(100.0 * (observed - plain) / plain);
        }
        if self.n_batch > 1 {
            let (batched, single) = self.batch(&mut rig.batch)?;
            m.bb.push(batched);
            m.bs.push(single);
            m.b_ratio.push(batched / single);
        }
        Ok(())
    }
}

/// Every repetition's numbers. Ratios are taken per repetition (runs back to back) and then
/// the median: this machine's speed drifts, and pairing cancels most of the drift.
#[derive(Default)]
struct Samples {
    /// Stock and full-depth speeds, and full depth over stock.
    spp: Vec<f64>,
    stg: Vec<f64>,
    fpp: Vec<f64>,
    ftg: Vec<f64>,
    r_pp: Vec<f64>,
    r_tg: Vec<f64>,
    /// --path speeds, and over full depth.
    rpp: Vec<f64>,
    rtg: Vec<f64>,
    q_pp: Vec<f64>,
    q_tg: Vec<f64>,
    /// Routed speeds, over full depth, and the routing overhead (% of prefill time).
    xpp: Vec<f64>,
    xtg: Vec<f64>,
    x_pp: Vec<f64>,
    x_tg: Vec<f64>,
    overhead: Vec<f64>,
    /// The path the routers chose (last repetition).
    routed_path: Option<LayerPath>,
    /// Batched, one at a time, and their ratio.
    bb: Vec<f64>,
    bs: Vec<f64>,
    b_ratio: Vec<f64>,
}

pub fn run(a: BenchArgs) -> Result<()> {
    let threads = a.model.threads();
    let reps = a.reps.max(1);
    let model = a.model.load()?;
    let tok = Tokenizer::load(&a.model.model)?;
    let stock = StockModel::load(&a.model.model, a.model.device)?;
    let n_ctx = (a.prompt_tokens + a.gen_tokens + 16)
        .next_power_of_two()
        .max(512);
    let n_ubatch = 512;
    let prompt = prompt_tokens(&tok, a.prompt_tokens.max(1));
    let full = LayerPath::full(model.n_layer());
    let path = match &a.model.path {
        Some(_) => Some(a.model.layer_path(model.n_layer())?),
        None => None,
    };
    let sctx = stock
        .context(n_ctx, threads, n_ubatch)
        .context("stock llama.cpp context")?;
    let session_options = SessionOptions {
        n_ctx,
        n_threads: threads,
        n_ubatch,
    };
    let session = Session::new(model.clone(), session_options.clone())?;
    let n_batch = a.batch.clamp(1, 64);
    let mut batch = Vec::new();
    if n_batch > 1 {
        for _ in 0..n_batch {
            batch.push(Session::new(model.clone(), session_options.clone())?);
        }
    }
    let mut rig = Rig {
        sctx,
        session,
        batch,
    };
    let routers = a.routing.resolve(&a.model, &model)?;
    let ropts = a.routing.options()?;
    let plan = Plan {
        first: prompt[0],
        prompt,
        gen_tokens: a.gen_tokens,
        batch_path: path.clone().unwrap_or_else(|| full.clone()),
        full,
        path,
        n_batch,
        observe: RouteOptions {
            observe_only: true,
            ..ropts.clone()
        },
        ropts,
    };
    plan.warm_up(&mut rig, routers.as_ref())?;
    let mut m = Samples::default();
    for i in 0..reps {
        if !a.json {
            eprint!("\r[bench] repetition {}/{reps}", i + 1);
        }
        plan.repetition(i, &mut rig, routers.as_ref(), &mut m)?;
    }
    if !a.json {
        eprintln!();
    }
    let report = report(&a, &model, threads, reps, &plan, routers.as_ref(), m);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    print_table(&report);
    Ok(())
}

/// The medians of the measurements.
fn report(
    a: &BenchArgs,
    model: &Model,
    threads: usize,
    reps: usize,
    plan: &Plan,
    routers: Option<&Routers>,
    mut m: Samples,
) -> Report {
    Report {
        model: a.model.model.display().to_string(),
        arch: model.config().family.arch_name().to_string(),
        n_layer: model.n_layer(),
        device: model.device_name(),
        threads,
        prompt_tokens: plan.prompt.len(),
        gen_tokens: a.gen_tokens,
        reps,
        stock: Speed {
            pp_tok_s: median(&mut m.spp),
            tg_tok_s: median(&mut m.stg),
        },
        engine_full: Speed {
            pp_tok_s: median(&mut m.fpp),
            tg_tok_s: median(&mut m.ftg),
        },
        full_over_stock_pp: median(&mut m.r_pp),
        full_over_stock_tg: median(&mut m.r_tg),
        path: path_report(plan.path.as_ref(), &mut m),
        routed: routed_report(routers, &mut m),
        batch: (plan.n_batch > 1).then(|| BatchReport {
            sequences: plan.n_batch,
            path: plan.batch_path.to_string(),
            batched_tok_s: median(&mut m.bb),
            one_at_a_time_tok_s: median(&mut m.bs),
            batched_over_one_at_a_time: median(&mut m.b_ratio),
        }),
    }
}

fn path_report(path: Option<&LayerPath>, m: &mut Samples) -> Option<PathReport> {
    path.map(|p| PathReport {
        path: p.to_string(),
        passes: p.len(),
        skipped: p.skipped(),
        repeated: p.repeated(),
        speed: Speed {
            pp_tok_s: median(&mut m.rpp),
            tg_tok_s: median(&mut m.rtg),
        },
        path_over_full_pp: median(&mut m.q_pp),
        path_over_full_tg: median(&mut m.q_tg),
    })
}

fn routed_report(routers: Option<&Routers>, m: &mut Samples) -> Option<RoutedReport> {
    let (r, p) = (routers?, m.routed_path.clone()?);
    Some(RoutedReport {
        routers: r.path().display().to_string(),
        generation: r.generation().to_string(),
        path: p.to_string(),
        passes: p.len(),
        skipped: p.skipped(),
        repeated: p.repeated(),
        speed: Speed {
            pp_tok_s: median(&mut m.xpp),
            tg_tok_s: median(&mut m.xtg),
        },
        routed_over_full_pp: median(&mut m.x_pp),
        routed_over_full_tg: median(&mut m.x_tg),
        routing_overhead_pct: median(&mut m.overhead),
    })
}

/// The report as a table.
fn print_table(report: &Report) {
    let (stock_s, full_s) = (report.stock, report.engine_full);
    println!(
        "model {} ({}, {} blocks) on {}, {} threads, medians of {} runs (ratios: median of per-run ratios)",
        report.model, report.arch, report.n_layer, report.device, report.threads, report.reps
    );
    println!(
        "{:<34} {:>12} {:>12}",
        "",
        format!("pp{} tok/s", report.prompt_tokens),
        format!("tg{} tok/s", report.gen_tokens)
    );
    println!(
        "{:<34} {:>12.1} {:>12.1}",
        "stock llama.cpp", stock_s.pp_tok_s, stock_s.tg_tok_s
    );
    println!(
        "{:<34} {:>12.1} {:>12.1}   ratio to stock: pp {:.3}, tg {:.3}",
        format!("drllm full depth ({} passes)", report.n_layer),
        full_s.pp_tok_s,
        full_s.tg_tok_s,
        report.full_over_stock_pp,
        report.full_over_stock_tg
    );
    if let Some(p) = &report.path {
        println!(
            "{:<34} {:>12.1} {:>12.1}   speed-up over full depth: pp {:.3}x, tg {:.3}x",
            format!("drllm path ({} passes)", p.passes),
            p.speed.pp_tok_s,
            p.speed.tg_tok_s,
            p.path_over_full_pp,
            p.path_over_full_tg
        );
        println!(
            "  path {}: skipped {:?}, repeated {:?}",
            p.path, p.skipped, p.repeated
        );
    }
    if let Some(r) = &report.routed {
        println!(
            "{:<34} {:>12.1} {:>12.1}   speed-up over full depth: pp {:.3}x, tg {:.3}x",
            format!("drllm routed ({} passes)", r.passes),
            r.speed.pp_tok_s,
            r.speed.tg_tok_s,
            r.routed_over_full_pp,
            r.routed_over_full_tg
        );
        println!(
            "  routers {} chose {}: skipped {:?}, repeated {:?}",
            r.routers, r.path, r.skipped, r.repeated
        );
        println!(
            "  routing overhead at full depth (pooling, router MLPs, one graph per pass): \
             {:+.2}% of prefill time",
            r.routing_overhead_pct
        );
    }
    if let Some(b) = &report.batch {
        println!(
            "{:<34} {:>12} {:>12.1}   one at a time {:.1} tok/s: {:.3}x",
            format!("drllm {} sequences batched", b.sequences),
            "",
            b.batched_tok_s,
            b.one_at_a_time_tok_s,
            b.batched_over_one_at_a_time
        );
    }
}
