//! `drllm bench`: stock llama.cpp and drllm's engine on the same file, measured side by side in
//! one run (interleaved repetitions; the median of each is reported).

use crate::routing_cli::RoutingArgs;
use crate::ModelArgs;
use anyhow::{Context, Result};
use clap::Args;
use drllm_engine::stock::StockModel;
use drllm_engine::{
    argmax, LayerPath, Logits, Route, RouteOptions, Session, SessionOptions, Tokenizer,
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
    let routed = match &a.model.path {
        Some(_) => Some(a.model.layer_path(model.n_layer())?),
        None => None,
    };
    let mut sctx = stock
        .context(n_ctx, threads, n_ubatch)
        .context("stock llama.cpp context")?;
    let mut session = Session::new(
        model.clone(),
        SessionOptions {
            n_ctx,
            n_threads: threads,
            n_ubatch,
        },
    )?;
    let first = prompt[0];

    // one measurement of each kind; returns (pp tok/s, tg tok/s)
    let mut stock_run = || -> Result<(f64, f64)> {
        sctx.reset();
        let t = Instant::now();
        sctx.eval(&prompt, false)?;
        let pp = prompt.len() as f64 / t.elapsed().as_secs_f64();
        sctx.reset();
        let mut logits = sctx.eval(&[first], false)?;
        let t = Instant::now();
        for _ in 0..a.gen_tokens {
            logits = sctx.decode(argmax(&logits))?.to_vec();
        }
        let tg = a.gen_tokens as f64 / t.elapsed().as_secs_f64();
        Ok((pp, tg))
    };
    // generation speed along a path: greedy tokens after a one-token prompt
    let gen_speed = |s: &mut Session, path: &LayerPath| -> Result<f64> {
        let mut logits = s
            .prefill(&[first], Route::Fixed(path), Logits::Last)?
            .logits;
        let t = Instant::now();
        for _ in 0..a.gen_tokens {
            logits = s.decode(argmax(&logits))?.to_vec();
        }
        Ok(a.gen_tokens as f64 / t.elapsed().as_secs_f64())
    };
    let engine_run = |s: &mut Session, path: &LayerPath| -> Result<(f64, f64)> {
        let t = Instant::now();
        s.prefill(&prompt, Route::Fixed(path), Logits::Last)?;
        let pp = prompt.len() as f64 / t.elapsed().as_secs_f64();
        Ok((pp, gen_speed(s, path)?))
    };

    // N sequences along one path: aggregate generation speed decoded in one graph per step,
    // then decoded one at a time (round robin), from the same one-token prompts
    let n_batch = a.batch.clamp(1, 64);
    let mut batch_sessions = Vec::new();
    if n_batch > 1 {
        for _ in 0..n_batch {
            batch_sessions.push(Session::new(
                model.clone(),
                SessionOptions {
                    n_ctx,
                    n_threads: threads,
                    n_ubatch,
                },
            )?);
        }
    }
    let batch_path = routed.clone().unwrap_or_else(|| full.clone());
    let batch_run = |ss: &mut Vec<Session>| -> Result<(f64, f64)> {
        let start = |ss: &mut Vec<Session>| -> Result<Vec<i32>> {
            ss.iter_mut()
                .map(|s| {
                    let l = s.prefill(&[first], Route::Fixed(&batch_path), Logits::Last)?;
                    Ok(argmax(&l.logits))
                })
                .collect()
        };
        let total = (ss.len() * a.gen_tokens) as f64;
        let mut next = start(ss)?;
        let t = Instant::now();
        for _ in 0..a.gen_tokens {
            let mut refs: Vec<&mut Session> = ss.iter_mut().collect();
            let out = Session::decode_batch(&mut refs, &next)?;
            next = out.iter().map(|l| argmax(l)).collect();
        }
        let batched = total / t.elapsed().as_secs_f64();
        let mut next = start(ss)?;
        let t = Instant::now();
        for _ in 0..a.gen_tokens {
            for (s, n) in ss.iter_mut().zip(next.iter_mut()) {
                *n = argmax(s.decode(*n)?);
            }
        }
        Ok((batched, total / t.elapsed().as_secs_f64()))
    };

    let routers = a.routing.resolve(&a.model, &model)?;
    let ropts = a.routing.options()?;
    let observe = RouteOptions {
        observe_only: true,
        ..ropts.clone()
    };
    // routed prefill (routing included), then generation along the chosen path
    let routed_run =
        |s: &mut Session, r: &drllm_engine::Routers| -> Result<(f64, f64, LayerPath)> {
            let mut hook = r.hook(&ropts);
            let t = Instant::now();
            s.prefill(&prompt, Route::Hook(&mut hook), Logits::Last)?;
            let pp = prompt.len() as f64 / t.elapsed().as_secs_f64();
            let path = hook.path()?;
            Ok((pp, gen_speed(s, &path)?, path))
        };
    // prefill seconds: plain full depth vs observe-only routing (same work plus routing)
    let overhead_run = |s: &mut Session, r: &drllm_engine::Routers| -> Result<(f64, f64)> {
        let t = Instant::now();
        s.prefill(&prompt, Route::Fixed(&full), Logits::Last)?;
        let plain = t.elapsed().as_secs_f64();
        let mut hook = r.hook(&observe);
        let t = Instant::now();
        s.prefill(&prompt, Route::Hook(&mut hook), Logits::Last)?;
        Ok((plain, t.elapsed().as_secs_f64()))
    };

    // warm-up
    stock_run()?;
    if let Some(r) = &routers {
        routed_run(&mut session, r)?;
        overhead_run(&mut session, r)?;
    }
    engine_run(&mut session, &full)?;
    if let Some(p) = &routed {
        engine_run(&mut session, p)?;
    }
    let (mut spp, mut stg, mut fpp, mut ftg, mut rpp, mut rtg) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    // ratios are taken per repetition (runs back to back) and then the median: this machine's
    // speed drifts, and pairing cancels most of the drift
    let (mut r_pp, mut r_tg, mut q_pp, mut q_tg) = (vec![], vec![], vec![], vec![]);
    let (mut xpp, mut xtg, mut x_pp, mut x_tg, mut overhead) =
        (vec![], vec![], vec![], vec![], vec![]);
    let mut routed_path: Option<LayerPath> = None;
    let (mut bb, mut bs, mut b_ratio) = (vec![], vec![], vec![]);
    if n_batch > 1 {
        batch_run(&mut batch_sessions)?; // warm-up
    }
    for i in 0..reps {
        if !a.json {
            eprint!("\r[bench] repetition {}/{reps}", i + 1);
        }
        // alternate who goes first, so order effects (caches, clock ramps) cancel out
        let ((sp, sg), (fp, fg)) = if i % 2 == 0 {
            let s = stock_run()?;
            (s, engine_run(&mut session, &full)?)
        } else {
            let e = engine_run(&mut session, &full)?;
            (stock_run()?, e)
        };
        spp.push(sp);
        stg.push(sg);
        fpp.push(fp);
        ftg.push(fg);
        r_pp.push(fp / sp);
        r_tg.push(fg / sg);
        if let Some(path) = &routed {
            let (p, g) = engine_run(&mut session, path)?;
            rpp.push(p);
            rtg.push(g);
            q_pp.push(p / fp);
            q_tg.push(g / fg);
        }
        if let Some(r) = &routers {
            let (p, g, path) = routed_run(&mut session, r)?;
            xpp.push(p);
            xtg.push(g);
            x_pp.push(p / fp);
            x_tg.push(g / fg);
            routed_path = Some(path);
            let (plain, observed) = overhead_run(&mut session, r)?;
            overhead.push(100.0 * (observed - plain) / plain);
        }
        if n_batch > 1 {
            let (batched, single) = batch_run(&mut batch_sessions)?;
            bb.push(batched);
            bs.push(single);
            b_ratio.push(batched / single);
        }
    }
    if !a.json {
        eprintln!();
    }
    let stock_s = Speed {
        pp_tok_s: median(&mut spp),
        tg_tok_s: median(&mut stg),
    };
    let full_s = Speed {
        pp_tok_s: median(&mut fpp),
        tg_tok_s: median(&mut ftg),
    };
    let path_report = routed.as_ref().map(|p| {
        let s = Speed {
            pp_tok_s: median(&mut rpp),
            tg_tok_s: median(&mut rtg),
        };
        PathReport {
            path: p.to_string(),
            passes: p.len(),
            skipped: p.skipped(),
            repeated: p.repeated(),
            speed: s,
            path_over_full_pp: median(&mut q_pp),
            path_over_full_tg: median(&mut q_tg),
        }
    });
    let routed_report = match (&routers, &routed_path) {
        (Some(r), Some(p)) => Some(RoutedReport {
            routers: r.path().display().to_string(),
            generation: r.generation().to_string(),
            path: p.to_string(),
            passes: p.len(),
            skipped: p.skipped(),
            repeated: p.repeated(),
            speed: Speed {
                pp_tok_s: median(&mut xpp),
                tg_tok_s: median(&mut xtg),
            },
            routed_over_full_pp: median(&mut x_pp),
            routed_over_full_tg: median(&mut x_tg),
            routing_overhead_pct: median(&mut overhead),
        }),
        _ => None,
    };
    let report = Report {
        model: a.model.model.display().to_string(),
        arch: model.config().family.arch_name().to_string(),
        n_layer: model.n_layer(),
        device: model.device_name(),
        threads,
        prompt_tokens: prompt.len(),
        gen_tokens: a.gen_tokens,
        reps,
        stock: stock_s,
        engine_full: full_s,
        full_over_stock_pp: median(&mut r_pp),
        full_over_stock_tg: median(&mut r_tg),
        path: path_report,
        routed: routed_report,
        batch: (n_batch > 1).then(|| BatchReport {
            sequences: n_batch,
            path: batch_path.to_string(),
            batched_tok_s: median(&mut bb),
            one_at_a_time_tok_s: median(&mut bs),
            batched_over_one_at_a_time: median(&mut b_ratio),
        }),
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "model {} ({}, {} blocks) on {}, {} threads, medians of {} runs (ratios: median of per-run ratios)",
        report.model, report.arch, report.n_layer, report.device, threads, reps
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
        format!("drllm full depth ({} passes)", model.n_layer()),
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
    Ok(())
}
