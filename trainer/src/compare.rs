//! The decisive comparison (`drllm-train compare`): on question sets no choice was made on,
//! the plain model, the best static prunes at 1, 2 and 3 passes saved, routers at the depth
//! biases that match those budgets (biases chosen on calibration questions), and the oracle at
//! one pass saved, with paired differences and their standard errors.
//!
//! Every arm is judged on the same questions; a question's path that several arms share is
//! judged once ([`crate::eval::answer`]).

use crate::args::{CompareArgs, Loaded, SetSpec};
use crate::defaults::MAX_ANSWER_TOKENS;
use crate::error::Error;
use crate::eval::{self, answer, Calibration};
use crate::ledger::Ledger;
use crate::oracle::{oracle_question, OracleRun};
use crate::plots;
use crate::progress::Progress;
use crate::prune::{self, PruneReport};
use crate::scoring::Scoring;
use crate::search::{PrefixCache, SearchError};
use crate::tasks::{Example, McScorer};
use drllm_engine::{LayerPath, Route, RouteOptions, Routers, Session, Tokenizer};
use std::collections::HashSet;
use std::time::Instant;

/// One variant compared.
pub enum ArmSpec<'a> {
    /// A fixed path (the plain model, a static prune).
    Fixed { label: String, path: LayerPath },
    /// Routers at a depth bias.
    Routed {
        label: String,
        routers: &'a Routers,
        depth_bias: f32,
    },
}

impl ArmSpec<'_> {
    fn label(&self) -> &str {
        match self {
            ArmSpec::Fixed { label, .. } | ArmSpec::Routed { label, .. } => label,
        }
    }
}

/// One arm's results on a question set.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ArmResult {
    pub label: String,
    /// Depth bias (routed arms).
    pub depth_bias: Option<f32>,
    /// Per question: correct, and block passes.
    pub outcomes: Vec<(bool, usize)>,
}

impl ArmResult {
    /// Accuracy in percent and its standard error.
    pub fn accuracy(&self) -> (f64, f64) {
        let n = self.outcomes.len().max(1) as f64;
        let p = self.outcomes.iter().filter(|o| o.0).count() as f64 / n;
        (100.0 * p, 100.0 * (p * (1.0 - p) / n).sqrt())
    }

    /// Mean block passes per question.
    pub fn mean_passes(&self) -> f64 {
        self.outcomes.iter().map(|o| o.1 as f64).sum::<f64>() / self.outcomes.len().max(1) as f64
    }
}

/// `a - b` accuracy in points over paired questions, with its standard error.
pub fn paired_diff(a: &ArmResult, b: &ArmResult) -> (f64, f64) {
    let d: Vec<f64> = a
        .outcomes
        .iter()
        .zip(&b.outcomes)
        .map(|(x, y)| f64::from(u8::from(x.0)) - f64::from(u8::from(y.0)))
        .collect();
    let n = d.len() as f64;
    let mean = d.iter().sum::<f64>() / n.max(1.0);
    let var = d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (100.0 * mean, 100.0 * (var / n.max(1.0)).sqrt())
}

/// The comparison on one question set.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SetReport {
    /// "arc_easy test (800 fresh)" ...
    pub name: String,
    pub n_layer: usize,
    pub ids: Vec<String>,
    pub arms: Vec<ArmResult>,
    pub secs: f64,
}

impl SetReport {
    /// The arm with this label.
    pub fn arm(&self, label: &str) -> Option<&ArmResult> {
        self.arms.iter().find(|a| a.label == label)
    }
}

/// How a question set is judged.
#[derive(Clone, Copy, Debug)]
pub struct SetRun {
    /// Multiple-choice scoring.
    pub scoring: Scoring,
    /// Prefix cache budget of the oracle arm, bytes.
    pub cache_bytes: usize,
    /// Also the oracle at one pass saved.
    pub oracle: bool,
}

/// Judges every arm on every question; with `run.oracle`, also every single skip of each
/// question (the arm "oracle, 1 pass saved": right when at least one single skip answers
/// right).
#[allow(clippy::too_many_arguments)]
pub fn compare_set(
    session: &mut Session,
    tokenizer: &Tokenizer,
    scorer: &McScorer,
    run: &SetRun,
    name: &str,
    examples: &[Example],
    arms: &[ArmSpec<'_>],
    progress: &mut dyn FnMut(usize, usize),
) -> Result<SetReport, SearchError> {
    let (scoring, oracle) = (run.scoring, run.oracle);
    let t0 = Instant::now();
    let n_layer = session.model().n_layer();
    let mut results: Vec<ArmResult> = arms
        .iter()
        .map(|a| ArmResult {
            label: a.label().to_string(),
            depth_bias: match a {
                ArmSpec::Routed { depth_bias, .. } => Some(*depth_bias),
                ArmSpec::Fixed { .. } => None,
            },
            outcomes: Vec::with_capacity(examples.len()),
        })
        .collect();
    let mut oracle_arm = ArmResult {
        label: ORACLE_LABEL.into(),
        depth_bias: None,
        outcomes: Vec::new(),
    };
    let mut cache = PrefixCache::new(run.cache_bytes);
    let oracle_run = OracleRun {
        scoring,
        cache_bytes: run.cache_bytes,
        shard: (0, 1),
        repeats: false,
    };
    for (i, ex) in examples.iter().enumerate() {
        let mut known = Vec::new();
        for (a, res) in arms.iter().zip(results.iter_mut()) {
            let (correct, path) = match a {
                ArmSpec::Fixed { path, .. } => answer(
                    session,
                    tokenizer,
                    scorer,
                    scoring,
                    ex,
                    Route::Fixed(path),
                    MAX_ANSWER_TOKENS,
                    &mut known,
                )?,
                ArmSpec::Routed {
                    routers,
                    depth_bias,
                    ..
                } => {
                    let ro = RouteOptions {
                        depth_bias: *depth_bias,
                        max_passes: None,
                        observe_only: false,
                    };
                    let mut hook = routers.hook(&ro);
                    answer(
                        session,
                        tokenizer,
                        scorer,
                        scoring,
                        ex,
                        Route::Hook(&mut hook),
                        MAX_ANSWER_TOKENS,
                        &mut known,
                    )?
                }
            };
            res.outcomes.push((correct, path.len()));
        }
        if oracle {
            let rec = oracle_question(session, tokenizer, scorer, ex, "", &oracle_run, &mut cache)?;
            oracle_arm
                .outcomes
                .push((rec.skip.iter().any(|p| p.correct), n_layer - 1));
        }
        progress(i + 1, examples.len());
    }
    if oracle {
        results.push(oracle_arm);
    }
    Ok(SetReport {
        name: name.to_string(),
        n_layer,
        ids: examples.iter().map(|e| e.id.clone()).collect(),
        arms: results,
        secs: t0.elapsed().as_secs_f64(),
    })
}

/// The label of the oracle arm.
pub const ORACLE_LABEL: &str = "oracle, 1 pass saved";

/// The depth bias, among those tried on calibration questions (bias, mean passes), whose mean
/// passes come closest to `target` (ties: the one with more passes).
pub fn bias_for_passes(tried: &[(f32, f64)], target: f64) -> Option<f32> {
    tried
        .iter()
        .min_by(|a, b| {
            (a.1 - target)
                .abs()
                .total_cmp(&(b.1 - target).abs())
                .then(b.1.total_cmp(&a.1))
        })
        .map(|t| t.0)
}

/// A variant's accuracy on the questions its choice was made on (static prunes: the prune's
/// selection questions; routers: the calibration questions), for choosing what to ship.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct CalibrationRow {
    pub label: String,
    /// Accuracy in percent.
    pub accuracy: f64,
    /// Questions.
    pub n: usize,
    pub mean_passes: f64,
}

/// The calibration rows: plain and each static prune of `budgets` from the prune report, and
/// every depth bias tried for each routers.
pub fn calibration_rows(
    prune: &crate::prune::PruneReport,
    budgets: &[usize],
    routers: &[(String, crate::eval::Calibration)],
) -> Vec<CalibrationRow> {
    let n = prune.ids.len();
    let pct = |c: usize| 100.0 * c as f64 / n.max(1) as f64;
    let mut rows = vec![CalibrationRow {
        label: "plain".into(),
        accuracy: pct(prune.plain_correct),
        n,
        mean_passes: prune.n_layer as f64,
    }];
    for &k in budgets {
        if let Some(step) = k.checked_sub(1).and_then(|i| prune.steps.get(i)) {
            rows.push(CalibrationRow {
                label: format!("static, skip {:?}", step.skipped),
                accuracy: pct(step.correct),
                n,
                mean_passes: (prune.n_layer - step.skipped.len()) as f64,
            });
        }
    }
    for (name, c) in routers {
        for t in &c.tried {
            rows.push(CalibrationRow {
                label: format!("routed {name}, bias {:+.2}", t.depth_bias.unwrap_or(0.0)),
                accuracy: 100.0 * t.correct as f64 / t.n.max(1) as f64,
                n: t.n,
                mean_passes: t.mean_passes,
            });
        }
    }
    rows
}

/// What to ship: the row with the highest calibration accuracy among those saving at least
/// one pass per question. Ties go to more passes: equal accuracies on a few hundred questions
/// are noise, and the smaller change to the model also changes less of what the table does
/// not measure (free generation: SmolLM2 with blocks 13, 20 and 25 skipped repeats itself in
/// chat where skipping block 13 alone does not).
pub fn ship_choice(rows: &[CalibrationRow], n_layer: usize) -> Option<&CalibrationRow> {
    rows.iter()
        .filter(|r| r.mean_passes <= n_layer as f64 - 1.0)
        .min_by(|a, b| {
            b.accuracy
                .total_cmp(&a.accuracy)
                .then(b.mean_passes.total_cmp(&a.mean_passes))
        })
}

/// The calibration rows as markdown, with the choice for shipping.
pub fn calibration_markdown(rows: &[CalibrationRow], n_layer: usize) -> String {
    let mut s = String::from(
        "## On the questions the choices were made on\n\n| variant | questions | accuracy | mean passes |\n|---|---:|---:|---:|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {:.1}% | {:.2} |\n",
            r.label, r.n, r.accuracy, r.mean_passes
        ));
    }
    if let Some(c) = ship_choice(rows, n_layer) {
        s.push_str(&format!(
            "\nHighest accuracy with at least one pass saved (what to ship): {} ({:.1}% at {:.2} passes).\n",
            c.label, c.accuracy, c.mean_passes
        ));
    }
    s.push('\n');
    s
}

/// A row of the table: label, accuracy, s.e., passes, vs plain, vs a matched static arm.
pub fn markdown(r: &SetReport, matched: &[(String, String)]) -> String {
    let mut s = format!(
        "### {} ({} questions)\n\n| variant | accuracy | mean passes | vs plain (paired) | vs static at the same budget (paired) |\n|---|---:|---:|---:|---:|\n",
        r.name,
        r.ids.len()
    );
    let plain = r.arms.first();
    for a in &r.arms {
        let (acc, se) = a.accuracy();
        let vs_plain = match plain {
            Some(p) if p.label != a.label => {
                let (d, e) = paired_diff(a, p);
                format!("{d:+.1} ± {e:.1}")
            }
            _ => "-".into(),
        };
        let vs_static = matched
            .iter()
            .find(|(arm, _)| *arm == a.label)
            .and_then(|(_, st)| r.arm(st))
            .map_or("-".into(), |st| {
                let (d, e) = paired_diff(a, st);
                format!("{d:+.1} ± {e:.1} ({})", st.label)
            });
        s.push_str(&format!(
            "| {} | {acc:.1}% ± {se:.1} | {:.2} | {vs_plain} | {vs_static} |\n",
            a.label,
            a.mean_passes()
        ));
    }
    s
}

/// A fixed arm of the comparison: the plain model (`budget` 0) or the static prune saving
/// `budget` passes.
pub struct FixedArm {
    pub budget: usize,
    pub label: String,
    pub path: LayerPath,
}

/// Routers at the depth bias whose mean passes on the calibration questions came closest to
/// L - `budget`.
pub struct RoutedArm {
    pub name: String,
    pub budget: usize,
    pub bias: f32,
    /// Their mean passes on the calibration questions.
    pub passes: f64,
}

impl RoutedArm {
    /// "routed NAME, K saved (bias B)".
    pub fn label(&self) -> String {
        format!(
            "routed {}, {} saved (bias {:+.2})",
            self.name, self.budget, self.bias
        )
    }
}

/// The plain model and the report's static prune of each budget.
pub fn fixed_arms(
    report: &PruneReport,
    n_layer: usize,
    budgets: &[usize],
) -> Result<Vec<FixedArm>, SearchError> {
    let mut arms = vec![FixedArm {
        budget: 0,
        label: "plain".into(),
        path: LayerPath::full(n_layer),
    }];
    for &k in budgets {
        for (_, path) in prune::static_paths(report, n_layer, &[k])? {
            let blocks: Vec<String> = path.skipped().iter().map(|b| b.to_string()).collect();
            arms.push(FixedArm {
                budget: k,
                label: format!("static, {k} saved ({})", blocks.join(",")),
                path,
            });
        }
    }
    Ok(arms)
}

/// Each routed arm, and the oracle, against the static prune of its budget (the oracle saves
/// one pass): (arm, static arm) label pairs for [`markdown`].
pub fn matched_pairs(fixed: &[FixedArm], routed: &[RoutedArm]) -> Vec<(String, String)> {
    let static_of = |k: usize| fixed.iter().find(|f| f.budget == k && k > 0);
    routed
        .iter()
        .filter_map(|r| Some((r.label(), static_of(r.budget)?.label.clone())))
        .chain(std::iter::once((
            ORACLE_LABEL.to_string(),
            static_of(1).map(|s| s.label.clone()).unwrap_or_default(),
        )))
        .collect()
}

/// `drllm-train compare`: the decisive comparison on fresh question sets (see the module
/// docs), written as `compare.md`, `compare.json` and a plot per set in the output folder
/// (default RUN_DIR/compare) after each set, the markdown printed at the end.
pub fn run_compare(a: &CompareArgs) -> Result<Vec<SetReport>, Error> {
    let l = a.common.load()?;
    let n_layer = l.model.n_layer();
    let report = prune::read_report(&a.prune)?;
    let fixed = fixed_arms(&report, n_layer, &a.budgets)?;
    let routers: Vec<(String, Routers)> = a
        .routers
        .iter()
        .map(|(n, p)| Ok((n.clone(), Routers::load(p, &l.model).map_err(Error::at(p))?)))
        .collect::<Result<_, Error>>()?;
    // what must stay out of the evaluation: the run's ledger, the routers', the prune's, and
    // the calibration questions used here
    let mut used = Ledger::load(&a.common.run_dir())?;
    for (_, r) in &routers {
        used.merge(&Ledger::from_notes(&r.sidecar().provenance.notes));
    }
    used.add("prune", report.ids.iter().map(String::as_str));
    let cal = a.calibration.load(&a.common.data_dir)?;
    used.add("calibration", cal.iter().map(|e| e.id.as_str()));
    let mut session = a.common.session(&l.model)?;
    let (routed, calibrations) = match_budgets(a, &l, &mut session, &routers, &cal, n_layer)?;
    let cal_rows = calibration_rows(&report, &a.budgets, &calibrations);
    let out_dir = a
        .out_dir
        .clone()
        .unwrap_or_else(|| a.common.run_dir().join("compare"));
    std::fs::create_dir_all(&out_dir)?;
    let mut md = format!(
        "# Decisive comparison: {}\n\nStatic prunes from {} (chosen on {} questions); routers' depth biases matched to the budgets on {}. Paired differences in accuracy points with standard errors.\n\n",
        a.common.model.display(),
        a.prune.display(),
        report.ids.len(),
        a.calibration.describe(cal.len())
    );
    md.push_str(&calibration_markdown(&cal_rows, n_layer));
    let run = |task: &str| SetRun {
        scoring: a.common.scoring,
        cache_bytes: a.cache.bytes(),
        oracle: a.oracle.iter().any(|t| t == task),
    };
    let mut sets_out = Vec::new();
    for spec in &a.sets {
        let examples = fresh_sample(a, spec, &used)?;
        let name = format!("{} {}", spec.task, spec.split);
        let specs = arm_specs(&fixed, &routed, &routers)?;
        let mut p = Progress::new("compare");
        let r = compare_set(
            &mut session,
            &l.tokenizer,
            &l.scorer,
            &run(&spec.task),
            &name,
            &examples,
            &specs,
            &mut |d, t| p.tick(d, t, &name),
        )?;
        md.push_str(&markdown(&r, &matched_pairs(&fixed, &routed)));
        md.push('\n');
        let png = out_dir.join(format!("compare-{}-{}.png", spec.task, spec.split));
        plot_set(&r, &png, &name)?;
        eprintln!(
            "[compare] {name} done in {:.0} s; {}",
            r.secs,
            png.display()
        );
        sets_out.push(r);
        std::fs::write(out_dir.join("compare.md"), &md)?;
        let routed_biases: Vec<(&str, usize, f32, f64)> = routed
            .iter()
            .map(|r| (r.name.as_str(), r.budget, r.bias, r.passes))
            .collect();
        std::fs::write(
            out_dir.join("compare.json"),
            serde_json::to_string(&serde_json::json!({
                "routed_biases": routed_biases, "calibration": cal_rows, "sets": sets_out,
            }))?,
        )?;
    }
    println!("{md}");
    Ok(sets_out)
}

/// Each routers' calibration on the calibration questions, by name.
type Calibrations = Vec<(String, Calibration)>;

/// The arms of a set: the fixed ones, then each routers at each matched bias.
fn arm_specs<'a>(
    fixed: &[FixedArm],
    routed: &[RoutedArm],
    routers: &'a [(String, Routers)],
) -> Result<Vec<ArmSpec<'a>>, Error> {
    let mut specs: Vec<ArmSpec> = fixed
        .iter()
        .map(|f| ArmSpec::Fixed {
            label: f.label.clone(),
            path: f.path.clone(),
        })
        .collect();
    for r in routed {
        let (_, routers) = routers
            .iter()
            .find(|(n, _)| *n == r.name)
            .ok_or_else(|| Error::refused(format!("no routers named {}", r.name)))?;
        specs.push(ArmSpec::Routed {
            label: r.label(),
            routers,
            depth_bias: r.bias,
        });
    }
    Ok(specs)
}

/// For each routers, the depth biases matched to the budgets on the calibration questions, and
/// their calibrations.
fn match_budgets(
    a: &CompareArgs,
    l: &Loaded,
    session: &mut Session,
    routers: &[(String, Routers)],
    cal: &[Example],
    n_layer: usize,
) -> Result<(Vec<RoutedArm>, Calibrations), Error> {
    let mut routed = Vec::new();
    let mut calibrations = Vec::new();
    for (name, r) in routers {
        let mut p = Progress::new("calibrate");
        let c = eval::calibrate(
            session,
            &l.tokenizer,
            &l.scorer,
            r,
            cal,
            a.common.scoring,
            &a.biases,
            0.0,
            &mut |d, t| p.tick(d, t, name),
        )?;
        let tried: Vec<(f32, f64)> = c
            .tried
            .iter()
            .filter_map(|t| Some((t.depth_bias?, t.mean_passes)))
            .collect();
        for &k in &a.budgets {
            let target = n_layer as f64 - k as f64;
            if let Some(b) = bias_for_passes(&tried, target) {
                let got = tried.iter().find(|t| t.0 == b).map_or(0.0, |t| t.1);
                eprintln!(
                    "[compare] {name}: {k} saved -> bias {b:+.2} ({got:.2} passes on the calibration questions)"
                );
                routed.push(RoutedArm {
                    name: name.clone(),
                    budget: k,
                    bias: b,
                    passes: got,
                });
            }
        }
        calibrations.push((name.clone(), c));
    }
    Ok((routed, calibrations))
}

/// A fresh seeded sample of `spec`'s questions that no choice was made on; a set of the
/// calibration questions' task and split also leaves out the old evaluation sample.
fn fresh_sample(a: &CompareArgs, spec: &SetSpec, used: &Ledger) -> Result<Vec<Example>, Error> {
    let all = crate::data::load(&a.common.data_dir, &spec.task, &spec.split)?;
    let c = &a.calibration;
    let pool: Vec<Example> = if spec.task == c.task && spec.split == c.split {
        let old: HashSet<String> = crate::data::sample(&all, c.exclude_limit, c.exclude_seed)
            .into_iter()
            .map(|e| e.id)
            .collect();
        all.into_iter().filter(|e| !old.contains(&e.id)).collect()
    } else {
        all
    };
    let pool: Vec<Example> = pool
        .into_iter()
        .filter(|e| used.check_disjoint([e.id.as_str()]).is_ok())
        .collect();
    let examples = crate::data::sample(&pool, spec.n, a.seed);
    used.check_disjoint(examples.iter().map(|e| e.id.as_str()))?;
    Ok(examples)
}

/// Accuracy against passes of every arm of a set.
fn plot_set(r: &SetReport, png: &std::path::Path, name: &str) -> Result<(), Error> {
    let points: Vec<plots::Point> = r
        .arms
        .iter()
        .map(|arm| {
            let (acc, se) = arm.accuracy();
            plots::Point {
                label: arm.label.clone(),
                passes: arm.mean_passes(),
                accuracy: acc,
                stderr: se,
            }
        })
        .collect();
    plots::accuracy_vs_passes(
        png,
        &format!("{name}: static prunes and routers, accuracy against passes"),
        &points,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arm(label: &str, outcomes: &[(bool, usize)]) -> ArmResult {
        ArmResult {
            label: label.into(),
            depth_bias: None,
            outcomes: outcomes.to_vec(),
        }
    }

    #[test]
    fn accuracy_paired_differences_and_bias_matching_by_hand() {
        let plain = arm("plain", &[(true, 4), (false, 4), (true, 4), (true, 4)]);
        let other = arm("x", &[(true, 3), (true, 3), (false, 2), (true, 3)]);
        assert_eq!(plain.accuracy().0, 75.0);
        assert!((plain.accuracy().1 - 100.0 * (0.75f64 * 0.25 / 4.0).sqrt()).abs() < 1e-12);
        assert_eq!(other.mean_passes(), 2.75);
        // differences 0, +1, -1, 0: mean 0, variance 2/3, s.e. sqrt(2/3 / 4)
        let (d, e) = paired_diff(&other, &plain);
        assert_eq!(d, 0.0);
        assert!((e - 100.0 * (2.0f64 / 3.0 / 4.0).sqrt()).abs() < 1e-12);
        let tried = [(-1.0f32, 27.2), (0.0, 28.9), (0.5, 29.4), (1.0, 29.9)];
        assert_eq!(bias_for_passes(&tried, 29.0), Some(0.0));
        assert_eq!(bias_for_passes(&tried, 27.0), Some(-1.0));
        assert_eq!(bias_for_passes(&tried, 29.65), Some(1.0)); // tie: more passes
        assert_eq!(bias_for_passes(&[], 29.0), None);
        let r = SetReport {
            name: "t".into(),
            n_layer: 4,
            ids: vec!["a".into(); 4],
            arms: vec![plain, other],
            secs: 0.0,
        };
        let md = markdown(&r, &[("x".into(), "plain".into())]);
        assert!(
            md.contains("| x | 75.0% ± 21.7 | 2.75 | +0.0 ± 40.8 | +0.0 ± 40.8 (plain) |"),
            "{md}"
        );
    }

    #[test]
    fn calibration_rows_and_the_ship_choice_by_hand() {
        use crate::eval::{Arm, Calibration};
        use crate::prune::{PruneReport, Step};
        let step = |skipped: Vec<usize>, correct| Step {
            candidates: vec![],
            chosen: skipped[skipped.len() - 1],
            skipped,
            correct,
        };
        let prune = PruneReport {
            n_layer: 4,
            ids: vec!["q".into(); 10],
            plain_correct: 6,
            plain_mean_margin: 0.0,
            steps: vec![step(vec![2], 5), step(vec![1, 2], 4)],
            secs: 0.0,
        };
        let arm = |bias: f32, correct: usize, passes: f64| Arm {
            label: String::new(),
            depth_bias: Some(bias),
            correct,
            n: 20,
            accuracy: correct as f64 / 20.0,
            stderr: 0.0,
            mean_passes: passes,
        };
        let cal = Calibration {
            n: 20,
            plain: arm(0.0, 12, 4.0),
            tried: vec![arm(-1.0, 11, 2.5), arm(0.0, 13, 3.0), arm(1.0, 14, 3.9)],
            chosen: None,
            min_saved: 0.0,
        };
        let rows = calibration_rows(&prune, &[1, 2, 3], &[("r".into(), cal)]);
        let got: Vec<(&str, f64, usize, f64)> = rows
            .iter()
            .map(|r| (r.label.as_str(), r.accuracy, r.n, r.mean_passes))
            .collect();
        assert_eq!(
            got,
            vec![
                ("plain", 60.0, 10, 4.0),
                ("static, skip [2]", 50.0, 10, 3.0),
                ("static, skip [1, 2]", 40.0, 10, 2.0),
                ("routed r, bias -1.00", 55.0, 20, 2.5),
                ("routed r, bias +0.00", 65.0, 20, 3.0),
                ("routed r, bias +1.00", 70.0, 20, 3.9),
            ]
        );
        // bias +1 saves only 0.1 pass: the best with a whole pass saved is bias 0
        assert_eq!(ship_choice(&rows, 4).map(|r| r.accuracy), Some(65.0));
        // equal accuracies: the one with more passes
        let mut tied = rows.clone();
        tied[2].accuracy = 50.0;
        assert_eq!(
            ship_choice(&tied[..3], 4).map(|r| r.label.as_str()),
            Some("static, skip [2]")
        );
        tied.swap(1, 2);
        assert_eq!(
            ship_choice(&tied[..3], 4).map(|r| r.label.as_str()),
            Some("static, skip [2]")
        );
        let md = calibration_markdown(&rows, 4);
        assert!(
            md.contains("what to ship): routed r, bias +0.00 (65.0% at 3.00 passes)"),
            "{md}"
        );
        assert_eq!(ship_choice(&rows[..1], 4), None);
    }
}
