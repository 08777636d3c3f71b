//! `drllm-train eval`: accuracy and block passes per question, plain model against routed model,
//! on held-out questions; a markdown table, JSON, a heatmap of decisions per block and a plot of
//! accuracy against passes.

use crate::args::{CalibrateArgs, EvalArgs};
use crate::defaults::MAX_ANSWER_TOKENS;
use crate::error::Error;
use crate::ledger::Ledger;
use crate::plots::{self, Point};
use crate::progress::Progress;
use crate::prune;
use crate::routers::checkpoint_path;
use crate::scoring::{judge, Scoring};
use crate::tasks::{Example, McScorer};
use drllm_engine::router_format::{sidecar_path_for, StorageType};
use drllm_engine::{
    EngineError, LayerPath, Logits, Route, RouteOptions, Routers, Session, Tokenizer,
};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// One model variant's results.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Arm {
    /// "plain", "routed", "routed, depth bias +1.0" ...
    pub label: String,
    /// Depth bias used (routed arms).
    pub depth_bias: Option<f32>,
    /// Questions answered correctly.
    pub correct: usize,
    /// Questions.
    pub n: usize,
    /// Accuracy in [0, 1].
    pub accuracy: f64,
    /// Standard error of the accuracy.
    pub stderr: f64,
    /// Mean block passes per question.
    pub mean_passes: f64,
}

/// One question's results.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct QuestionEval {
    /// Example id.
    pub id: String,
    /// Plain model correct.
    pub plain_correct: bool,
    /// Routed model correct (bias 0).
    pub routed_correct: Option<bool>,
    /// Routed path's per-block passes.
    pub routed_counts: Option<Vec<u8>>,
    /// Correct along each static path of the options, in order.
    pub static_correct: Vec<bool>,
}

/// The evaluation.
#[derive(Clone, Debug, serde::Serialize)]
pub struct EvalReport {
    /// Model file.
    pub model: String,
    /// Sidecar, if routed.
    pub routers: Option<String>,
    /// Task and split.
    pub task: String,
    /// Split.
    pub split: String,
    /// Blocks.
    pub n_layer: usize,
    /// Plain model.
    pub plain: Arm,
    /// Routed model (depth bias 0, or the bias asked for).
    pub routed: Option<Arm>,
    /// Other depth biases (the accuracy/passes curve).
    pub sweep: Vec<Arm>,
    /// Routed minus plain accuracy, and its paired standard error.
    pub diff: Option<(f64, f64)>,
    /// Static paths (e.g. the best static prune at about the routed model's passes).
    pub statics: Vec<Arm>,
    /// Each static path minus plain accuracy, and its paired standard error.
    pub static_diffs: Vec<(f64, f64)>,
    /// Routed minus each static path, and its paired standard error.
    pub routed_vs_static: Vec<(f64, f64)>,
    /// Per question.
    pub questions: Vec<QuestionEval>,
    /// Seconds.
    pub secs: f64,
}

fn arm(label: String, bias: Option<f32>, results: &[(bool, usize)]) -> Arm {
    let n = results.len();
    let correct = results.iter().filter(|r| r.0).count();
    let p = if n > 0 {
        correct as f64 / n as f64
    } else {
        0.0
    };
    Arm {
        label,
        depth_bias: bias,
        correct,
        n,
        accuracy: p,
        stderr: if n > 1 {
            (p * (1.0 - p) / n as f64).sqrt()
        } else {
            0.0
        },
        mean_passes: if n > 0 {
            results.iter().map(|r| r.1 as f64).sum::<f64>() / n as f64
        } else {
            0.0
        },
    }
}

/// Answers one question along a route; returns (correct, path). `known` holds the outcomes
/// of paths this question was already judged along: a route that lands on one of them is not
/// judged again (the outcome along a fixed path is deterministic; the prefill still runs, since
/// only it tells the routers' path).
#[allow(clippy::too_many_arguments)]
pub fn answer(
    session: &mut Session,
    tokenizer: &Tokenizer,
    scorer: &McScorer,
    scoring: Scoring,
    ex: &Example,
    route: Route<'_>,
    max_answer_tokens: usize,
    known: &mut Vec<(LayerPath, bool)>,
) -> Result<(bool, LayerPath), EngineError> {
    let tokens = tokenizer.tokenize(scoring.prompt(ex), true, false);
    let pre = session.prefill(&tokens, route, Logits::Last)?;
    if let Some((_, c)) = known.iter().find(|(p, _)| *p == pre.path) {
        return Ok((*c, pre.path));
    }
    let (correct, _) = judge(
        session,
        tokenizer,
        scorer,
        scoring,
        ex,
        &tokens,
        &pre.logits,
        max_answer_tokens,
    )?;
    known.push((pre.path.clone(), correct));
    Ok((correct, pre.path))
}

/// Settings of an evaluation.
#[derive(Clone, Debug, Default)]
pub struct EvalOptions {
    /// Depth bias of the main routed arm.
    pub depth_bias: f32,
    /// Pass cap of the routed arms.
    pub max_passes: Option<usize>,
    /// Extra depth biases to trace accuracy against passes.
    pub sweep: Vec<f32>,
    /// Tokens a numeric answer may take.
    pub max_answer_tokens: usize,
    /// Multiple-choice scoring.
    pub scoring: Scoring,
    /// Fixed paths judged beside plain and routed (label, path).
    pub statics: Vec<(String, LayerPath)>,
}

/// Mean of `a - b` over paired outcomes and its standard error.
fn paired_diff(a: &[bool], b: &[bool]) -> (f64, f64) {
    let d: Vec<f64> = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| f64::from(u8::from(x)) - f64::from(u8::from(y)))
        .collect();
    let n = d.len() as f64;
    let mean = d.iter().sum::<f64>() / n.max(1.0);
    let var = d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, (var / n.max(1.0)).sqrt())
}

/// Evaluates the plain model and, with routers, the routed model on `examples`.
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    session: &mut Session,
    tokenizer: &Tokenizer,
    scorer: &McScorer,
    routers: Option<&Routers>,
    examples: &[Example],
    opts: &EvalOptions,
    labels: (&str, &str, &str),
    progress: &mut dyn FnMut(usize, usize),
) -> Result<EvalReport, EngineError> {
    let t0 = Instant::now();
    let n_layer = session.model().n_layer();
    let biases: Vec<f32> = std::iter::once(opts.depth_bias)
        .chain(opts.sweep.iter().copied().filter(|&b| b != opts.depth_bias))
        .collect();
    let mut out = Outcomes {
        plain: Vec::new(),
        routed: vec![Vec::new(); biases.len()],
        statics: vec![Vec::new(); opts.statics.len()],
    };
    let mut questions = Vec::new();
    let total = examples.len();
    for (i, ex) in examples.iter().enumerate() {
        let j = Judge {
            tokenizer,
            scorer,
            opts,
        };
        questions.push(j.question(session, routers, &biases, ex, &mut out)?);
        progress(i + 1, total);
    }
    let routed = routers.is_some().then_some(&out.routed[..]);
    let (routed_arm, sweep, diff) = match routed {
        Some(r) => {
            let main = arm(
                format!("routed (bias {:+.1})", biases[0]),
                Some(biases[0]),
                &r[0],
            );
            let sweep = biases[1..]
                .iter()
                .zip(&r[1..])
                .map(|(&b, res)| arm(format!("routed (bias {b:+.1})"), Some(b), res))
                .collect();
            let diff = paired_diff(&correct_of(&r[0]), &correct_of(&out.plain));
            (Some(main), sweep, Some(diff))
        }
        None => (None, Vec::new(), None),
    };
    Ok(EvalReport {
        model: labels.0.to_string(),
        routers: routers.map(|r| r.path().display().to_string()),
        task: labels.1.to_string(),
        split: labels.2.to_string(),
        n_layer,
        plain: arm("plain".into(), None, &out.plain),
        routed: routed_arm,
        sweep,
        diff,
        statics: opts
            .statics
            .iter()
            .zip(&out.statics)
            .map(|((label, _), res)| arm(label.clone(), None, res))
            .collect(),
        static_diffs: out
            .statics
            .iter()
            .map(|s| paired_diff(&correct_of(s), &correct_of(&out.plain)))
            .collect(),
        routed_vs_static: routed.map_or_else(Vec::new, |r| {
            out.statics
                .iter()
                .map(|s| paired_diff(&correct_of(&r[0]), &correct_of(s)))
                .collect()
        }),
        questions,
        secs: t0.elapsed().as_secs_f64(),
    })
}

/// Per arm and question so far: correct, and block passes.
struct Outcomes {
    plain: Vec<(bool, usize)>,
    /// Per depth bias (the main one first).
    routed: Vec<Vec<(bool, usize)>>,
    /// Per static path.
    statics: Vec<Vec<(bool, usize)>>,
}

/// What judges the questions of an evaluation.
struct Judge<'a> {
    tokenizer: &'a Tokenizer,
    scorer: &'a McScorer,
    opts: &'a EvalOptions,
}

impl Judge<'_> {
    /// One question along the full path, the static paths and (with routers) the routed path
    /// of every depth bias, each distinct path judged once; the outcomes go to `out`.
    fn question(
        &self,
        session: &mut Session,
        routers: Option<&Routers>,
        biases: &[f32],
        ex: &Example,
        out: &mut Outcomes,
    ) -> Result<QuestionEval, EngineError> {
        let n_layer = session.model().n_layer();
        let full = LayerPath::full(n_layer);
        let mut known = Vec::new();
        let (pc, _) = self.answer(session, ex, Route::Fixed(&full), &mut known)?;
        out.plain.push((pc, n_layer));
        let mut q = QuestionEval {
            id: ex.id.clone(),
            plain_correct: pc,
            routed_correct: None,
            routed_counts: None,
            static_correct: Vec::new(),
        };
        for (si, (_, path)) in self.opts.statics.iter().enumerate() {
            let (c, _) = self.answer(session, ex, Route::Fixed(path), &mut known)?;
            out.statics[si].push((c, path.len()));
            q.static_correct.push(c);
        }
        let Some(r) = routers else {
            return Ok(q);
        };
        for (bi, &bias) in biases.iter().enumerate() {
            let ro = RouteOptions {
                depth_bias: bias,
                max_passes: self.opts.max_passes,
                observe_only: false,
            };
            let mut hook = r.hook(&ro);
            let (rc, path) = self.answer(session, ex, Route::Hook(&mut hook), &mut known)?;
            out.routed[bi].push((rc, path.len()));
            if bi == 0 {
                q.routed_correct = Some(rc);
                q.routed_counts = Some(path.counts().iter().map(|&c| c as u8).collect());
            }
        }
        Ok(q)
    }

    fn answer(
        &self,
        session: &mut Session,
        ex: &Example,
        route: Route<'_>,
        known: &mut Vec<(LayerPath, bool)>,
    ) -> Result<(bool, LayerPath), EngineError> {
        answer(
            session,
            self.tokenizer,
            self.scorer,
            self.opts.scoring,
            ex,
            route,
            self.opts.max_answer_tokens,
            known,
        )
    }
}

fn correct_of(res: &[(bool, usize)]) -> Vec<bool> {
    res.iter().map(|r| r.0).collect()
}

/// The report as a markdown table.
pub fn markdown(r: &EvalReport) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "## {} {} ({} questions), model `{}`{}\n\n",
        r.task,
        r.split,
        r.plain.n,
        r.model,
        r.routers
            .as_ref()
            .map(|p| format!(", routers `{p}`"))
            .unwrap_or_default()
    ));
    s.push_str("| variant | accuracy | ± s.e. | mean block passes | passes saved |\n");
    s.push_str("|---|---:|---:|---:|---:|\n");
    let row = |a: &Arm| {
        format!(
            "| {} | {:.2}% | {:.2} | {:.2} | {:.2} |\n",
            a.label,
            100.0 * a.accuracy,
            100.0 * a.stderr,
            a.mean_passes,
            r.n_layer as f64 - a.mean_passes
        )
    };
    s.push_str(&row(&r.plain));
    if let Some(a) = &r.routed {
        s.push_str(&row(a));
    }
    for a in &r.sweep {
        s.push_str(&row(a));
    }
    for a in &r.statics {
        s.push_str(&row(a));
    }
    s.push('\n');
    let diff = |what: &str, (d, se): (f64, f64)| {
        format!(
            "{what}: {:+.2} points (paired s.e. {:.2})\n",
            100.0 * d,
            100.0 * se
        )
    };
    if let Some(d) = r.diff {
        s.push_str(&diff("routed − plain", d));
    }
    for (i, a) in r.statics.iter().enumerate() {
        if let Some(&d) = r.static_diffs.get(i) {
            s.push_str(&diff(&format!("{} − plain", a.label), d));
        }
        if let Some(&d) = r.routed_vs_static.get(i) {
            s.push_str(&diff(&format!("routed − {}", a.label), d));
        }
    }
    s.push_str(&format!("\n{:.1} s\n", r.secs));
    s
}

/// Writes eval.md, eval.json and, with routers, decisions.png and accuracy_vs_passes.png.
pub fn write_outputs(r: &EvalReport, dir: &Path) -> Result<Vec<PathBuf>, Error> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    let md = dir.join("eval.md");
    std::fs::write(&md, markdown(r))?;
    written.push(md);
    let js = dir.join("eval.json");
    std::fs::write(&js, serde_json::to_string_pretty(r)?)?;
    written.push(js);
    if r.routed.is_some() {
        let decisions: Vec<Vec<u8>> = r
            .questions
            .iter()
            .filter_map(|q| q.routed_counts.clone())
            .collect();
        let heat = dir.join("decisions.png");
        plots::decision_heatmap(
            &heat,
            &format!("{} {}: routing decisions", r.task, r.split),
            &decisions,
        )?;
        written.push(heat);
        let mut points = vec![Point {
            label: r.plain.label.clone(),
            passes: r.plain.mean_passes,
            accuracy: 100.0 * r.plain.accuracy,
            stderr: 100.0 * r.plain.stderr,
        }];
        for a in r
            .routed
            .iter()
            .chain(r.sweep.iter())
            .chain(r.statics.iter())
        {
            points.push(Point {
                label: a.label.clone(),
                passes: a.mean_passes,
                accuracy: 100.0 * a.accuracy,
                stderr: 100.0 * a.stderr,
            });
        }
        let acc = dir.join("accuracy_vs_passes.png");
        plots::accuracy_vs_passes(
            &acc,
            &format!("{} {}: accuracy against block passes", r.task, r.split),
            &points,
        )?;
        written.push(acc);
    }
    Ok(written)
}

/// Result of choosing a depth bias on calibration questions.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Calibration {
    /// Questions used.
    pub n: usize,
    /// The plain model on them.
    pub plain: Arm,
    /// Every bias tried.
    pub tried: Vec<Arm>,
    /// The bias chosen (None: no bias met the pass budget).
    pub chosen: Option<f32>,
    /// Passes per question that had to be saved.
    pub min_saved: f64,
}

/// Chooses the depth bias with the best routed accuracy among those that save at least
/// `min_saved` block passes per question on `examples` (ties: fewer passes). The questions
/// must be disjoint from the ones the result is reported on.
#[allow(clippy::too_many_arguments)]
pub fn calibrate(
    session: &mut Session,
    tokenizer: &Tokenizer,
    scorer: &McScorer,
    routers: &Routers,
    examples: &[Example],
    scoring: Scoring,
    biases: &[f32],
    min_saved: f64,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Calibration, EngineError> {
    let opts = EvalOptions {
        depth_bias: biases.first().copied().unwrap_or(0.0),
        max_passes: None,
        sweep: biases.to_vec(),
        max_answer_tokens: MAX_ANSWER_TOKENS,
        scoring,
        statics: Vec::new(),
    };
    let r = evaluate(
        session,
        tokenizer,
        scorer,
        Some(routers),
        examples,
        &opts,
        ("", "", ""),
        progress,
    )?;
    let l = r.n_layer as f64;
    let tried: Vec<Arm> = r.routed.iter().chain(r.sweep.iter()).cloned().collect();
    let chosen = tried
        .iter()
        .filter(|a| l - a.mean_passes >= min_saved)
        .max_by(|a, b| {
            a.accuracy
                .total_cmp(&b.accuracy)
                .then(b.mean_passes.total_cmp(&a.mean_passes))
        })
        .and_then(|a| a.depth_bias);
    Ok(Calibration {
        n: r.plain.n,
        plain: r.plain,
        tried,
        chosen,
        min_saved,
    })
}

/// `drllm-train calibrate`: [`calibrate_checkpoint`], refusing when no bias saved enough.
pub fn run_calibrate(a: &CalibrateArgs) -> Result<PathBuf, Error> {
    match calibrate_checkpoint(a)?.0 {
        Some(p) => Ok(p),
        None => Err(Error::refused(format!(
            "no depth bias saved {} passes per question; try a wider --biases range",
            a.min_saved
        ))),
    }
}

/// Chooses a depth bias for the checkpoint on the calibration questions (recorded in the
/// ledger) and writes the checkpoint with it baked in (RUN_DIR/routers.calibrated.gguf) and
/// the calibration (RUN_DIR/calibration.json). Gives the calibrated file (None when no bias
/// saved `min_saved` passes) and the calibration.
pub fn calibrate_checkpoint(a: &CalibrateArgs) -> Result<(Option<PathBuf>, Calibration), Error> {
    let l = a.common.load()?;
    let run_dir = a.common.run_dir();
    let ckpt = a.ckpt.clone().unwrap_or_else(|| checkpoint_path(&run_dir));
    let routers = Routers::load(&ckpt, &l.model).map_err(Error::at(&ckpt))?;
    let set = a.set.load(&a.common.data_dir)?;
    eprintln!(
        "[calibrate] {}, biases {:?}",
        a.set.describe(set.len()),
        a.biases
    );
    let mut session = a.common.session(&l.model)?;
    let mut p = Progress::new("calibrate");
    let c = calibrate(
        &mut session,
        &l.tokenizer,
        &l.scorer,
        &routers,
        &set,
        a.common.scoring,
        &a.biases,
        a.min_saved,
        &mut |d, t| p.tick(d, t, ""),
    )?;
    eprintln!(
        "[calibrate] plain {:.2}% | {}",
        100.0 * c.plain.accuracy,
        tried_line(&c)
    );
    std::fs::create_dir_all(&run_dir)?;
    std::fs::write(
        run_dir.join("calibration.json"),
        serde_json::to_string_pretty(&c)?,
    )?;
    let Some(bias) = c.chosen else {
        return Ok((None, c));
    };
    let mut sc = routers.sidecar().clone();
    bake_depth_bias(&mut sc.routers, bias);
    let mut ledger = Ledger::from_notes(&sc.provenance.notes);
    ledger.merge(&Ledger::record(
        &run_dir,
        "calibration",
        set.iter().map(|e| e.id.as_str()),
    )?);
    sc.provenance.notes = ledger.to_notes(&format!(
        "depth bias {bias:+.2} baked in (chosen on {} {} {} calibration questions, disjoint from the evaluation sample)",
        c.n, a.set.task, a.set.split
    ));
    let out = run_dir.join("routers.calibrated.gguf");
    sc.write(&out, StorageType::F32)?;
    eprintln!("[calibrate] chose bias {bias:+.2}; wrote {}", out.display());
    Ok((Some(out), c))
}

/// "bias -1.0: 47.00% at 28.50 passes | ..." for every bias tried.
fn tried_line(c: &Calibration) -> String {
    c.tried
        .iter()
        .map(|t| {
            format!(
                "bias {:+.1}: {:.2}% at {:.2} passes",
                t.depth_bias.unwrap_or(0.0),
                100.0 * t.accuracy,
                t.mean_passes
            )
        })
        .collect::<Vec<_>>()
        .join(" | ")
}

/// `drllm-train eval`: plain, routed (with the sweep) and the static prunes on a fixed sample
/// of a split, refusing questions any of them was chosen on; `eval.md`, `eval.json` and the
/// plots in the output folder (default RUN_DIR/eval-TASK-SPLIT), the table printed.
pub fn run_eval(a: &EvalArgs) -> Result<EvalReport, Error> {
    let l = a.common.load()?;
    let routers = eval_routers(a, &l.model)?;
    let q = &a.questions;
    let mut examples = crate::data::load(&a.common.data_dir, &q.task, &q.split)?;
    if let Some(n) = q.limit {
        examples = crate::data::sample(&examples, n, q.seed);
    }
    let statics = static_paths(a, l.model.n_layer())?;
    // routers and prunes are judged only on questions none of their choices were made on
    if routers.is_some() || !statics.is_empty() {
        let mut used = Ledger::load(&a.common.run_dir())?;
        if let Some(r) = &routers {
            used.merge(&Ledger::from_notes(&r.sidecar().provenance.notes));
        }
        if let Some(file) = &a.prune {
            let r = prune::read_report(file)?;
            used.add("prune", r.ids.iter().map(String::as_str));
        }
        used.check_disjoint(examples.iter().map(|e| e.id.as_str()))?;
        eprintln!(
            "[eval] {} questions, disjoint from those used for choices ({:?})",
            examples.len(),
            used.counts()
        );
    }
    let mut session = a.common.session(&l.model)?;
    let mut p = Progress::new("eval");
    let opts = EvalOptions {
        depth_bias: a.depth_bias,
        max_passes: a.max_passes,
        sweep: a.sweep.clone(),
        max_answer_tokens: MAX_ANSWER_TOKENS,
        scoring: a.common.scoring,
        statics,
    };
    let model_name = a.common.model.display().to_string();
    let r = evaluate(
        &mut session,
        &l.tokenizer,
        &l.scorer,
        routers.as_ref(),
        &examples,
        &opts,
        (&model_name, &q.task, &q.split),
        &mut |d, t| p.tick(d, t, ""),
    )?;
    let dir = a.out_dir.clone().unwrap_or_else(|| {
        a.common
            .run_dir()
            .join(format!("eval-{}-{}", q.task, q.split))
    });
    let files = write_outputs(&r, &dir)?;
    println!("{}", markdown(&r));
    for f in files {
        eprintln!("[eval] wrote {}", f.display());
    }
    Ok(r)
}

/// The routers `eval` judges: `--routers`, else the sidecar next to the model, else the run's
/// checkpoint; none with `--no-routers`.
fn eval_routers(
    a: &EvalArgs,
    model: &std::sync::Arc<drllm_engine::Model>,
) -> Result<Option<Routers>, Error> {
    if a.no_routers {
        return Ok(None);
    }
    let p = a.routers.clone().or_else(|| {
        let side = sidecar_path_for(&a.common.model);
        if side.exists() {
            Some(side)
        } else {
            let ck = checkpoint_path(&a.common.run_dir());
            ck.exists().then_some(ck)
        }
    });
    match p {
        Some(p) => Ok(Some(Routers::load(&p, model).map_err(Error::at(&p))?)),
        None => Err(Error::refused(
            "no routers: pass --routers PATH, or --no-routers for the plain model",
        )),
    }
}

/// The static prunes `eval` judges: from `--prune FILE`, the steps `--prune-skips` names.
fn static_paths(a: &EvalArgs, n_layer: usize) -> Result<Vec<(String, LayerPath)>, Error> {
    let Some(file) = &a.prune else {
        return Ok(Vec::new());
    };
    let r = prune::read_report(file)?;
    prune::static_paths(&r, n_layer, &a.prune_skips).map_err(Error::at(file))
}

/// Bakes a depth bias into routers: lowering every skip logit by `bias` gives, with no bias at
/// run time, exactly the decisions the bias gave.
pub fn bake_depth_bias(routers: &mut [drllm_engine::router_format::BlockRouter], bias: f32) {
    for r in routers {
        r.b2[0] -= bias;
    }
}

#[cfg(test)]
mod tests {
    use super::bake_depth_bias;
    use drllm_engine::router_format::BlockRouter;
    use drllm_engine::{decide, RouteOptions};

    #[test]
    fn baked_bias_equals_run_time_bias() {
        let mut r = vec![BlockRouter::xavier(4, 3, 1)];
        r[0].b2 = [0.3, 0.1, -0.2];
        let x = [0.5f32, -1.0, 0.25, 2.0];
        for bias in [-2.0f32, -0.5, 0.0, 0.7, 3.0] {
            let with = RouteOptions {
                depth_bias: bias,
                ..Default::default()
            };
            let want = decide(r[0].route(&x, 4), &with, 0, 0);
            let mut baked = r.clone();
            bake_depth_bias(&mut baked, bias);
            let got = decide(baked[0].route(&x, 4), &RouteOptions::default(), 0, 0);
            assert_eq!(want, got, "bias {bias}");
        }
    }
}
