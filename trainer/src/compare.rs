//! The decisive comparison (`drllm-train compare`): on question sets no choice was made on,
//! the plain model, the best static prunes at 1, 2 and 3 passes saved, routers at the depth
//! biases that match those budgets (biases chosen on calibration questions), and the oracle at
//! one pass saved, with paired differences and their standard errors.
//!
//! Every arm is judged on the same questions; a question's path that several arms share is
//! judged once ([`crate::eval::answer`]).

use crate::eval::answer;
use crate::oracle::{oracle_question, OracleRun};
use crate::scoring::Scoring;
use crate::search::{PrefixCache, SearchError};
use crate::tasks::{Example, McScorer};
use drllm_engine::{LayerPath, Route, RouteOptions, Routers, Session, Tokenizer};
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

/// Judges every arm on every question; with `oracle`, also every single skip of each question
/// (the arm "oracle, 1 pass saved": right when at least one single skip answers right).
#[allow(clippy::too_many_arguments)]
pub fn compare_set(
    session: &mut Session,
    tokenizer: &Tokenizer,
    scorer: &McScorer,
    scoring: Scoring,
    name: &str,
    examples: &[Example],
    arms: &[ArmSpec<'_>],
    oracle: bool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<SetReport, SearchError> {
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
    let mut cache = PrefixCache::new(256 << 20);
    let run = OracleRun {
        scoring,
        cache_bytes: 256 << 20,
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
                    256,
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
                        256,
                        &mut known,
                    )?
                }
            };
            res.outcomes.push((correct, path.len()));
        }
        if oracle {
            let rec = oracle_question(session, tokenizer, scorer, ex, "", &run, &mut cache)?;
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
