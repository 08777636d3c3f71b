//! The predictability test: can a router tell, from the hidden state entering block k, the
//! questions for which skipping block k is safe from those for which it is not?
//!
//! Labels come from the oracle table ([`crate::oracle::skip_labels`]); the router inputs are
//! the window means entering every block along the full path (exactly what block k's router
//! sees when the blocks before it all run). Routers of the product's shape are trained with
//! K-fold cross-fitting, so every question gets a skip score from routers that never saw it;
//! per block, the ROC AUC of that score (skip logit minus execute logit) against "skip is
//! safe", with a bootstrap 95% interval over questions. An AUC of 0.5 means the router knows
//! nothing about block k that a static prune (the same decision for every question) does not.

use crate::args::{Loaded, PredictArgs};
use crate::defaults as d;
use crate::error::Error;
use crate::features::{self, PathItem};
use crate::ledger::Ledger;
use crate::oracle::{self, OracleRecord};
use crate::plots::{self, BlockEstimate};
use crate::progress::Progress;
use crate::routers::{checkpoint, Origin};
use crate::shards::with_suffix;
use crate::train::{candle_logits, split_ids, train, FeatureSet, TrainConfig, TrainError};
use drllm_engine::router_format::StorageType;
use drllm_router_format::rng::SplitMix64;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// ROC AUC: the probability that a random positive scores above a random negative (ties count
/// half), by the rank-sum formula. None without positives or without negatives.
pub fn auc(scores: &[f64], positive: &[bool]) -> Option<f64> {
    let n = scores.len().min(positive.len());
    let n_pos = positive[..n].iter().filter(|&&p| p).count();
    let n_neg = n - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return None;
    }
    let mut idx: Vec<usize> = (0..n).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // average ranks (1-based) over ties
    let mut rank_sum_pos = 0.0;
    let mut i = 0;
    while i < n {
        let mut j = i;
        while j + 1 < n && scores[idx[j + 1]] == scores[idx[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            if positive[k] {
                rank_sum_pos += avg;
            }
        }
        i = j + 1;
    }
    let (p, q) = (n_pos as f64, n_neg as f64);
    Some((rank_sum_pos - p * (p + 1.0) / 2.0) / (p * q))
}

/// A percentile bootstrap interval of the AUC over questions (resampled with replacement,
/// `rounds` times, seeded): the 2.5th and 97.5th percentiles. None when the AUC is undefined
/// on the data; resamples without both classes are skipped.
pub fn auc_interval(
    scores: &[f64],
    positive: &[bool],
    rounds: usize,
    seed: u64,
) -> Option<(f64, f64)> {
    auc(scores, positive)?;
    let n = scores.len().min(positive.len());
    let mut rng = SplitMix64(seed ^ 0xB007_57A9);
    let mut values = Vec::with_capacity(rounds);
    let mut s = vec![0.0; n];
    let mut p = vec![false; n];
    for _ in 0..rounds {
        for i in 0..n {
            let k = rng.below(n);
            s[i] = scores[k];
            p[i] = positive[k];
        }
        if let Some(a) = auc(&s, &p) {
            values.push(a);
        }
    }
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let at =
        |q: f64| values[((q * (values.len() - 1) as f64).round() as usize).min(values.len() - 1)];
    Some((at(0.025), at(0.975)))
}

/// Splits `0..n` into `k` folds of nearly equal size in a seeded random order.
pub fn folds(n: usize, k: usize, seed: u64) -> Vec<Vec<usize>> {
    let k = k.clamp(1, n.max(1));
    let mut perm: Vec<usize> = (0..n).collect();
    SplitMix64(seed ^ 0xF01D_5EED).shuffle(&mut perm);
    let mut out = vec![Vec::new(); k];
    for (i, x) in perm.into_iter().enumerate() {
        out[i % k].push(x);
    }
    for f in &mut out {
        f.sort_unstable();
    }
    out
}

/// Cross-fitted router logits: for each fold, routers trained on the other folds (with
/// `cfg.val_frac` of them for choosing the epoch) score the fold's examples. `[example][block]`.
pub fn cross_fitted_logits(
    fs: &FeatureSet,
    cfg: &TrainConfig,
    k: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<Vec<[f32; 3]>>, TrainError> {
    let n = fs.examples.len();
    if n < 2 * k.max(2) {
        return Err(TrainError::InvalidInput(format!(
            "{n} examples are too few for {k}-fold cross-fitting"
        )));
    }
    let parts = folds(n, k, cfg.seed);
    let mut out: Vec<Vec<[f32; 3]>> = vec![Vec::new(); n];
    for (f, held) in parts.iter().enumerate() {
        let rest: Vec<usize> = (0..n).filter(|i| held.binary_search(i).is_err()).collect();
        let (tr, va) = split_ids(rest.len(), cfg.val_frac, cfg.seed.wrapping_add(f as u64));
        let tr: Vec<usize> = tr.into_iter().map(|i| rest[i]).collect();
        let va: Vec<usize> = va.into_iter().map(|i| rest[i]).collect();
        let trained = train(fs, cfg, &tr, &va, &mut |_| {})?;
        let sub = FeatureSet {
            d: fs.d,
            n_layer: fs.n_layer,
            max_windows: fs.max_windows,
            examples: held.iter().map(|&i| fs.examples[i].clone()).collect(),
        };
        let logits = candle_logits(&trained.routers, &sub, &cfg.device)?;
        for (&i, l) in held.iter().zip(logits) {
            out[i] = l;
        }
        progress(f + 1, parts.len());
    }
    Ok(out)
}

/// One block of the test.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct BlockAuc {
    pub block: usize,
    /// Questions for which skipping the block is safe / not safe.
    pub safe: usize,
    pub unsafe_: usize,
    /// AUC of the cross-fitted skip score for "safe" (None: one class is empty).
    pub auc: Option<f64>,
    /// Bootstrap 95% interval.
    pub interval: Option<(f64, f64)>,
}

impl BlockAuc {
    /// The interval lies above 0.5: the router ranks safe skips above unsafe ones.
    pub fn signal(&self) -> bool {
        self.interval.is_some_and(|(lo, _)| lo > 0.5)
    }
}

/// The test's result.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Predictability {
    pub questions: usize,
    pub folds: usize,
    pub tau: f64,
    pub blocks: Vec<BlockAuc>,
    /// Blocks with both classes present, and those whose interval lies above 0.5.
    pub testable: usize,
    pub with_signal: usize,
}

/// The routers' skip scores (skip minus execute logit), `[example][block]`.
pub fn skip_scores(logits: &[Vec<[f32; 3]>]) -> Vec<Vec<f64>> {
    logits
        .iter()
        .map(|l| {
            l.iter()
                .map(|b| f64::from(b[0]) - f64::from(b[1]))
                .collect()
        })
        .collect()
}

/// Per-block AUCs of cross-fitted router logits against labels (0: skip safe, 1: not).
pub fn block_aucs(
    logits: &[Vec<[f32; 3]>],
    labels: &[Vec<u8>],
    folds: usize,
    tau: f64,
    rounds: usize,
    seed: u64,
) -> Predictability {
    block_aucs_of_scores(&skip_scores(logits), labels, folds, tau, rounds, seed)
}

/// Per-block AUCs of cross-fitted scores (`[example][block]`, higher: safer) against labels.
pub fn block_aucs_of_scores(
    scores: &[Vec<f64>],
    labels: &[Vec<u8>],
    folds: usize,
    tau: f64,
    rounds: usize,
    seed: u64,
) -> Predictability {
    let n_layer = labels.first().map_or(0, Vec::len);
    let blocks: Vec<BlockAuc> = (0..n_layer)
        .map(|b| {
            let score: Vec<f64> = scores.iter().map(|l| l[b]).collect();
            let safe: Vec<bool> = labels.iter().map(|l| l[b] == 0).collect();
            let n_safe = safe.iter().filter(|&&s| s).count();
            BlockAuc {
                block: b,
                safe: n_safe,
                unsafe_: safe.len() - n_safe,
                auc: auc(&score, &safe),
                interval: auc_interval(&score, &safe, rounds, seed.wrapping_add(b as u64)),
            }
        })
        .collect();
    let testable = blocks.iter().filter(|b| b.auc.is_some()).count();
    let with_signal = blocks.iter().filter(|b| b.signal()).count();
    Predictability {
        questions: labels.len(),
        folds,
        tau,
        blocks,
        testable,
        with_signal,
    }
}

/// The probability the full path gives its own choice (softmax of its option scores): how sure
/// the model is. Known only once every block has run, so no router can use it; it is the
/// reference for how much "safe to skip" follows the question's difficulty at all.
pub fn full_confidence(scores: &[f64], choice: usize) -> f64 {
    crate::scoring::softmax(scores)
        .get(choice)
        .copied()
        .unwrap_or(0.0)
}

/// How much "safe to skip" is a trait of the question rather than of each (question, block)
/// pair: the variance over questions of their number of safe blocks, beside what it would be
/// if each block were safe at its own rate independently of the question.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct QuestionTrait {
    /// Mean number of blocks safe to skip per question.
    pub mean_safe_blocks: f64,
    /// Variance of that number over questions.
    pub variance: f64,
    /// The variance if safety did not depend on the question (sum of p(1-p) over blocks).
    pub independent_variance: f64,
}

/// [`QuestionTrait`] of labels `[question][block]` (0: skip safe).
pub fn question_trait(labels: &[Vec<u8>]) -> QuestionTrait {
    let n = labels.len();
    let n_layer = labels.first().map_or(0, Vec::len);
    let counts: Vec<f64> = labels
        .iter()
        .map(|l| l.iter().filter(|&&x| x == 0).count() as f64)
        .collect();
    let mean = counts.iter().sum::<f64>() / n.max(1) as f64;
    let variance = counts.iter().map(|c| (c - mean).powi(2)).sum::<f64>() / n.max(1) as f64;
    let independent_variance = (0..n_layer)
        .map(|b| {
            let p = labels.iter().filter(|l| l[b] == 0).count() as f64 / n.max(1) as f64;
            p * (1.0 - p)
        })
        .sum();
    QuestionTrait {
        mean_safe_blocks: mean,
        variance,
        independent_variance,
    }
}

/// The reference section of the report: the full path's confidence as a score for "safe"
/// (per block) and the question-trait variances.
pub fn reference_markdown(confidence: &Predictability, t: &QuestionTrait) -> String {
    let aucs: Vec<f64> = confidence.blocks.iter().filter_map(|b| b.auc).collect();
    let mean = aucs.iter().sum::<f64>() / aucs.len().max(1) as f64;
    let lo = aucs.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = aucs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let ratio = t.variance / t.independent_variance.max(1e-12);
    let reading = if ratio > 1.2 {
        "some questions tolerate skips better than others"
    } else {
        "safety looks independent of the question"
    };
    format!(
        "## Reference: what the question itself says (not available to a router)\n\n\
         Safe blocks per question: mean {:.2}, variance {:.2} over questions against {:.2} if \
         each block were safe independently of the question ({ratio:.1}x): {reading}. The full \
         path's confidence in its own choice (known only after every block has run) scores \"safe\" with AUC {mean:.3} on average over blocks \
         (from {lo:.3} to {hi:.3}; {} of {} intervals above 0.5). Routers near 0.5 where this \
         score is above it: the question-level signal exists, but not in what a router sees \
         when it decides.\n",
        t.mean_safe_blocks,
        t.variance,
        t.independent_variance,
        confidence.with_signal,
        confidence.testable,
    )
}

/// The result as markdown; `learner` says what gave the scores ("routers", "linear probes").
pub fn markdown(p: &Predictability, title: &str, learner: &str) -> String {
    let mut s = format!(
        "## Predictability of safe skips, {learner}: {title}\n\n{} questions, {}-fold \
         cross-fitting; a skip is safe when the option chosen stays and the gold margin drops \
         by at most {}. AUC of the held-out score for \"safe\", with a bootstrap 95% interval \
         over questions. {} of {} testable blocks have an interval above 0.5.\n\n\
         | block | safe | not safe | AUC | 95% interval |\n|---:|---:|---:|---:|---|\n",
        p.questions, p.folds, p.tau, p.with_signal, p.testable
    );
    for b in &p.blocks {
        let (a, i) = match (b.auc, b.interval) {
            (Some(a), Some((lo, hi))) => (format!("{a:.3}"), format!("[{lo:.3}, {hi:.3}]")),
            (Some(a), None) => (format!("{a:.3}"), "-".into()),
            _ => ("-".into(), "-".into()),
        };
        s.push_str(&format!(
            "| {} | {} | {} | {a} | {i} |\n",
            b.block, b.safe, b.unsafe_
        ));
    }
    s
}

/// Solves `(A + lambda I) x = b` for a symmetric positive semi-definite `A` (`d x d`,
/// row-major) by Cholesky; None when the matrix is not positive definite.
pub fn ridge_solve(a: &[f64], d: usize, lambda: f64, b: &[f64]) -> Option<Vec<f64>> {
    let mut l = vec![0.0f64; d * d];
    for i in 0..d {
        for j in 0..=i {
            let mut sum = a[i * d + j] + if i == j { lambda } else { 0.0 };
            let (ri, rj) = (&l[i * d..i * d + j], &l[j * d..j * d + j]);
            sum -= ri.iter().zip(rj).map(|(x, y)| x * y).sum::<f64>();
            if i == j {
                if sum <= 0.0 || !sum.is_finite() {
                    return None;
                }
                l[i * d + i] = sum.sqrt();
            } else {
                l[i * d + j] = sum / l[j * d + j];
            }
        }
    }
    // L y = b, then L^T x = y
    let mut y = vec![0.0f64; d];
    for i in 0..d {
        let s: f64 = (0..i).map(|k| l[i * d + k] * y[k]).sum();
        y[i] = (b[i] - s) / l[i * d + i];
    }
    let mut x = vec![0.0f64; d];
    for i in (0..d).rev() {
        let s: f64 = (i + 1..d).map(|k| l[k * d + i] * x[k]).sum();
        x[i] = (y[i] - s) / l[i * d + i];
    }
    Some(x)
}

/// A linear probe for one block: ridge regression of +1 (safe) / -1 (not) on the
/// standardised mean of the router's windows, lambda chosen on a held-out fifth of the training
/// questions by AUC, then refit on all of them. Returns the scores of `test` rows.
fn ridge_probe(x: &[Vec<f64>], y: &[bool], train: &[usize], test: &[usize], seed: u64) -> Vec<f64> {
    let d = x.first().map_or(0, Vec::len);
    // standardise with the training rows' statistics
    let mut mean = vec![0.0; d];
    let mut sd = vec![0.0; d];
    for &i in train {
        for (m, v) in mean.iter_mut().zip(&x[i]) {
            *m += v;
        }
    }
    let n = train.len().max(1) as f64;
    mean.iter_mut().for_each(|m| *m /= n);
    for &i in train {
        for ((s, v), m) in sd.iter_mut().zip(&x[i]).zip(&mean) {
            *s += (v - m) * (v - m);
        }
    }
    sd.iter_mut().for_each(|s| *s = (*s / n).sqrt().max(1e-8));
    let z = |i: usize| -> Vec<f64> {
        x[i].iter()
            .zip(&mean)
            .zip(&sd)
            .map(|((v, m), s)| (v - m) / s)
            .collect()
    };
    let fit = |rows: &[usize], lambda: f64| -> Option<(Vec<f64>, f64)> {
        let mut a = vec![0.0; d * d];
        let mut b = vec![0.0; d];
        let ybar = rows
            .iter()
            .map(|&i| if y[i] { 1.0 } else { -1.0 })
            .sum::<f64>()
            / rows.len().max(1) as f64;
        for &i in rows {
            let zi = z(i);
            let t = if y[i] { 1.0 } else { -1.0 } - ybar;
            for r in 0..d {
                let zr = zi[r];
                b[r] += zr * t;
                let row = &mut a[r * d..r * d + r + 1];
                for (c, av) in row.iter_mut().enumerate() {
                    *av += zr * zi[c];
                }
            }
        }
        for r in 0..d {
            for c in r + 1..d {
                a[r * d + c] = a[c * d + r];
            }
        }
        ridge_solve(&a, d, lambda, &b).map(|w| (w, ybar))
    };
    let score = |w: &[f64], i: usize| -> f64 { z(i).iter().zip(w).map(|(a, b)| a * b).sum() };
    // lambda by AUC on a fifth of the training rows
    let mut order = train.to_vec();
    SplitMix64(seed ^ 0x21D6_E000).shuffle(&mut order);
    let cut = order.len() / 5;
    let (val, inner) = order.split_at(cut);
    let mut best = (f64::NEG_INFINITY, n);
    for mult in [0.1, 1.0, 10.0, 100.0] {
        let lambda = mult * inner.len().max(1) as f64;
        if let Some((w, _)) = fit(inner, lambda) {
            let s: Vec<f64> = val.iter().map(|&i| score(&w, i)).collect();
            let p: Vec<bool> = val.iter().map(|&i| y[i]).collect();
            if let Some(a) = auc(&s, &p) {
                if a > best.0 {
                    best = (a, mult);
                }
            }
        }
    }
    let lambda = best.1 * train.len().max(1) as f64;
    match fit(train, lambda) {
        Some((w, _)) => test.iter().map(|&i| score(&w, i)).collect(),
        None => vec![0.0; test.len()],
    }
}

/// Cross-fitted scores of linear probes (see `ridge_probe`), one per block, for "skip is
/// safe": the same folds as [`cross_fitted_logits`]. `[example][block]`.
pub fn cross_fitted_probe_scores(
    fs: &FeatureSet,
    labels: &[Vec<u8>],
    k: usize,
    seed: u64,
    progress: &mut dyn FnMut(usize, usize),
) -> Vec<Vec<f64>> {
    let n = fs.examples.len();
    let d = fs.d;
    let parts = folds(n, k, seed);
    let mut out = vec![vec![0.0; fs.n_layer]; n];
    let total = parts.len() * fs.n_layer;
    for b in 0..fs.n_layer {
        // the mean of the block's windows
        let x: Vec<Vec<f64>> = fs
            .examples
            .iter()
            .map(|e| {
                let w = e.n_windows.max(1);
                (0..d)
                    .map(|j| {
                        (0..w)
                            .map(|k| f64::from(e.pooled[b][k * d + j]))
                            .sum::<f64>()
                            / w as f64
                    })
                    .collect()
            })
            .collect();
        let y: Vec<bool> = labels.iter().map(|l| l[b] == 0).collect();
        for (f, held) in parts.iter().enumerate() {
            let train: Vec<usize> = (0..n).filter(|i| held.binary_search(i).is_err()).collect();
            let s = ridge_probe(&x, &y, &train, held, seed.wrapping_add(f as u64));
            for (&i, v) in held.iter().zip(s) {
                out[i][b] = v;
            }
            progress(b * parts.len() + f + 1, total);
        }
    }
    out
}

/// `drllm-train predictability`: the test on the oracle tables of this model (default
/// RUN_DIR/oracle-arc_easy-validation.jsonl): routers and linear probes cross-fitted per
/// block, the full path's confidence as the reference, the report as markdown, JSON and two
/// plots (`STEM.{md,json,png}`, `STEM-probe.png`); with `--export`, routers trained on every
/// question written as a checkpoint. Gives the routers' result.
pub fn run_predictability(a: &PredictArgs) -> Result<Predictability, Error> {
    let run_dir = a.common.run_dir();
    let files = if a.oracle.is_empty() {
        vec![run_dir.join(format!("oracle-{}-{}.jsonl", d::TASK, d::SEARCH_SPLIT))]
    } else {
        a.oracle.clone()
    };
    let l = a.common.load()?;
    let records = oracle_records(&files, &l.fingerprint)?;
    let n_layer = l.model.n_layer();
    let mut fs = full_path_features(a, &l, &run_dir, &records)?;
    // the labels, and the reference score: the full path's confidence in its own choice
    let by_id: HashMap<&str, &OracleRecord> = records.iter().map(|r| (r.id.as_str(), r)).collect();
    let mut confidence_scores: Vec<Vec<f64>> = Vec::with_capacity(fs.examples.len());
    for e in &mut fs.examples {
        let r = by_id
            .get(e.id.as_str())
            .ok_or_else(|| Error::refused(format!("{} has features but no oracle row", e.id)))?;
        e.labels = oracle::skip_labels(r, a.tau);
        confidence_scores.push(vec![
            full_confidence(&r.full_scores, r.full.choice);
            n_layer
        ]);
    }
    let labels: Vec<Vec<u8>> = fs.examples.iter().map(|e| e.labels.clone()).collect();
    let cfg = TrainConfig {
        epochs: a.epochs,
        seed: a.seed,
        device: a.train_device.clone(),
        standardize: !a.raw_inputs,
        ..TrainConfig::default()
    };
    eprintln!(
        "[predict] {} questions, {} blocks, {}-fold cross-fitting",
        fs.examples.len(),
        n_layer,
        a.folds
    );
    let mut p = Progress::new("folds");
    let logits = cross_fitted_logits(&fs, &cfg, a.folds, &mut |d, t| p.tick(d, t, ""))?;
    let result = block_aucs(&logits, &labels, a.folds, a.tau, a.bootstrap, a.seed);
    // a second, simpler learner on the same folds: a linear probe per block
    let mut p = Progress::new("probes");
    let probe_scores =
        cross_fitted_probe_scores(&fs, &labels, a.folds, a.seed, &mut |d, t| p.tick(d, t, ""));
    let report = Report {
        probe: block_aucs_of_scores(&probe_scores, &labels, a.folds, a.tau, a.bootstrap, a.seed),
        // the reference: how much the question itself (the full path's confidence) says
        confidence: block_aucs_of_scores(
            &confidence_scores,
            &labels,
            a.folds,
            a.tau,
            a.bootstrap,
            a.seed,
        ),
        question_trait: question_trait(&labels),
        title: format!("{} ({})", a.common.model_stem(), file_names(&files)),
        router: result,
    };
    let stem = a
        .out
        .clone()
        .unwrap_or_else(|| run_dir.join("predictability"));
    report.write(&stem)?;
    if let Some(out) = &a.export {
        export_routers(a, &l, &run_dir, &fs, &cfg, &report, out)?;
    }
    Ok(report.router)
}

/// The rows of this model in the oracle tables `files`.
fn oracle_records(files: &[PathBuf], fingerprint: &str) -> Result<Vec<OracleRecord>, Error> {
    let mut records = Vec::new();
    for f in files {
        let r = oracle::read_oracle(f).map_err(Error::at(f))?;
        if r.is_empty() {
            return Err(Error::refused(format!(
                "{} holds no questions (run drllm-train oracle first)",
                f.display()
            )));
        }
        records.extend(r.into_iter().filter(|r| r.model == fingerprint));
    }
    if records.is_empty() {
        return Err(Error::refused(format!(
            "the oracle tables hold no questions of this model ({fingerprint})"
        )));
    }
    Ok(records)
}

/// Router inputs along the full path for every question of the tables, cached in the run
/// folder by model, scoring and questions.
fn full_path_features(
    a: &PredictArgs,
    l: &Loaded,
    run_dir: &Path,
    records: &[OracleRecord],
) -> Result<FeatureSet, Error> {
    let n_layer = l.model.n_layer();
    let items: Vec<PathItem> = records
        .iter()
        .map(|r| PathItem {
            id: r.id.clone(),
            counts: vec![1; n_layer],
            labels: vec![1; n_layer],
        })
        .collect();
    features::cached_along(
        &a.common,
        l,
        &run_dir.join("predict-features.bin"),
        false,
        &items,
        || {
            let ids = records.iter().map(|r| r.id.as_str());
            Ok(crate::data::examples_for_ids(&a.common.data_dir, ids)?)
        },
        "predict",
    )
}

fn file_names(files: &[PathBuf]) -> String {
    files
        .iter()
        .map(|f| {
            f.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The three learners' results and the reference, as written to the report.
struct Report {
    title: String,
    router: Predictability,
    probe: Predictability,
    confidence: Predictability,
    question_trait: QuestionTrait,
}

impl Report {
    /// `STEM.md`, `STEM.json`, `STEM.png` (the routers' AUCs) and `STEM-probe.png`; the
    /// markdown is printed too.
    fn write(&self, stem: &Path) -> Result<(), Error> {
        let md = format!(
            "# Predictability test\n\n{}\n{}\nThe linear probes: ridge regression of safe (+1) / not (-1) on the standardised mean of the windows entering the block, the penalty chosen on a fifth of each training fold.\n\n{}",
            markdown(&self.router, &self.title, "routers (the product's MLP)"),
            markdown(&self.probe, &self.title, "linear probes"),
            reference_markdown(&self.confidence, &self.question_trait),
        );
        if let Some(dir) = stem.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(with_suffix(stem, ".md"), &md)?;
        std::fs::write(
            with_suffix(stem, ".json"),
            serde_json::to_string_pretty(&serde_json::json!({
                "router": self.router,
                "linear_probe": self.probe,
                "full_confidence": self.confidence,
                "question_trait": self.question_trait,
            }))?,
        )?;
        plots::block_intervals(
            &with_suffix(stem, ".png"),
            &format!(
                "Held-out AUC of the skip decision per block, {}",
                self.title
            ),
            "AUC (safe skip)",
            &interval_rows(&self.router),
            0.5,
            (0.0, 1.0),
        )?;
        plots::block_intervals(
            &with_suffix(stem, "-probe.png"),
            &format!("Held-out AUC of a linear probe per block, {}", self.title),
            "AUC (safe skip)",
            &interval_rows(&self.probe),
            0.5,
            (0.0, 1.0),
        )?;
        println!("{md}");
        eprintln!("[predict] wrote {}.{{md,json,png}}", stem.display());
        Ok(())
    }
}

/// Per block, the AUC with its interval (widened to contain the estimate), for the plot.
fn interval_rows(p: &Predictability) -> Vec<BlockEstimate> {
    p.blocks
        .iter()
        .map(|b| BlockEstimate {
            block: b.block,
            value: b
                .auc
                .zip(b.interval)
                .map(|(e, (lo, hi))| (e, lo.min(e), hi.max(e))),
        })
        .collect()
}

/// Routers for the product: trained on every question (a validation share picks the epoch),
/// skip where the oracle says it is safe; written as a checkpoint to `out`.
fn export_routers(
    a: &PredictArgs,
    l: &Loaded,
    run_dir: &Path,
    fs: &FeatureSet,
    cfg: &TrainConfig,
    report: &Report,
    out: &Path,
) -> Result<(), Error> {
    let trained = crate::train::train_split(fs, cfg, &mut |_| {})?;
    let ledger = Ledger::record(
        run_dir,
        "training",
        fs.examples.iter().map(|e| e.id.as_str()),
    )?;
    let origin = Origin {
        dataset: format!(
            "oracle-table labels (skip where safe, tau {}) of {} questions: {}",
            a.tau,
            fs.examples.len(),
            report.title
        ),
        search: "oracle table: every single-block skip (drllm-train oracle)".into(),
        metrics: serde_json::to_string(&serde_json::json!({
            "predictability_blocks_with_signal": report.router.with_signal,
            "testable_blocks": report.router.testable,
            "best_epoch": trained.best_epoch,
        }))?,
    };
    let sc = checkpoint(&l.model, cfg, fs, trained, origin, &ledger)?;
    sc.write(out, StorageType::F32)?;
    eprintln!(
        "[predict] wrote routers trained on every question: {}",
        out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ridge_solve_by_hand_and_probe_finds_a_linear_signal() {
        // [[2, 1], [1, 3]] + 1 I = [[3, 1], [1, 4]]; x for b = (5, 6): (14/11, 13/11)
        let x = ridge_solve(&[2.0, 1.0, 1.0, 3.0], 2, 1.0, &[5.0, 6.0]).unwrap();
        assert!((x[0] - 14.0 / 11.0).abs() < 1e-12 && (x[1] - 13.0 / 11.0).abs() < 1e-12);
        assert!(ridge_solve(&[-1.0], 1, 0.0, &[1.0]).is_none());
        // 5-dimensional inputs; "safe" when x1 + noise > 0
        let mut rng = SplitMix64(9);
        let x: Vec<Vec<f64>> = (0..300)
            .map(|_| (0..5).map(|_| rng.unit() - 0.5).collect())
            .collect();
        let y: Vec<bool> = x
            .iter()
            .map(|r| r[1] + 0.2 * (rng.unit() - 0.5) > 0.0)
            .collect();
        let train: Vec<usize> = (0..200).collect();
        let test: Vec<usize> = (200..300).collect();
        let s = ridge_probe(&x, &y, &train, &test, 1);
        let p: Vec<bool> = test.iter().map(|&i| y[i]).collect();
        assert!(auc(&s, &p).unwrap() > 0.9);
    }

    #[test]
    fn auc_by_hand() {
        // perfect, reversed, random-ish
        assert_eq!(
            auc(&[0.1, 0.2, 0.8, 0.9], &[false, false, true, true]),
            Some(1.0)
        );
        assert_eq!(
            auc(&[0.1, 0.2, 0.8, 0.9], &[true, true, false, false]),
            Some(0.0)
        );
        // pairs (pos, neg): (0.4 vs 0.1) win, (0.4 vs 0.5) loss, (0.9 vs 0.1) win, (0.9 vs 0.5)
        // win: 3 of 4
        assert_eq!(
            auc(&[0.1, 0.4, 0.5, 0.9], &[false, true, false, true]),
            Some(0.75)
        );
        // a tie counts half: (0.5 vs 0.5) = 0.5, (0.5 vs 0.2) = 1 -> 0.75
        assert_eq!(auc(&[0.5, 0.5, 0.2], &[true, false, false]), Some(0.75));
        assert_eq!(auc(&[1.0, 2.0], &[true, true]), None);
        assert_eq!(auc(&[], &[]), None);
    }

    #[test]
    fn bootstrap_interval_brackets_the_auc_and_shrinks_with_data() {
        let mut rng = SplitMix64(3);
        let make = |n: usize, rng: &mut SplitMix64| {
            let mut s = Vec::new();
            let mut p = Vec::new();
            for _ in 0..n {
                let pos = rng.unit() < 0.5;
                s.push(rng.unit() + if pos { 0.3 } else { 0.0 });
                p.push(pos);
            }
            (s, p)
        };
        let (s, p) = make(100, &mut rng);
        let a = auc(&s, &p).unwrap();
        let (lo, hi) = auc_interval(&s, &p, 500, 1).unwrap();
        assert!(lo < a && a < hi, "{lo} {a} {hi}");
        let (s2, p2) = make(2000, &mut rng);
        let (lo2, hi2) = auc_interval(&s2, &p2, 500, 1).unwrap();
        assert!(hi2 - lo2 < (hi - lo) * 0.5, "{lo2}..{hi2} vs {lo}..{hi}");
        // a signal of +0.3 on uniform noise: AUC about 0.76, well above 0.5
        assert!(lo2 > 0.7, "{lo2}");
        let f = folds(10, 3, 0);
        assert_eq!(f.iter().map(Vec::len).collect::<Vec<_>>(), vec![4, 3, 3]);
        let mut all: Vec<usize> = f.concat();
        all.sort_unstable();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn confidence_and_question_trait_by_hand() {
        // softmax(0, ln 3) = (1/4, 3/4)
        assert!((full_confidence(&[0.0, 3f64.ln()], 1) - 0.75).abs() < 1e-12);
        assert!((full_confidence(&[0.0, 3f64.ln()], 0) - 0.25).abs() < 1e-12);
        assert_eq!(full_confidence(&[f64::NEG_INFINITY; 4], 2), 0.25);
        // two questions, two blocks: one question safe everywhere, one nowhere. Counts 2 and
        // 0: mean 1, variance 1; each block safe at rate 1/2: independent variance 2 * 1/4
        let t = question_trait(&[vec![0, 0], vec![1, 1]]);
        assert_eq!(
            t,
            QuestionTrait {
                mean_safe_blocks: 1.0,
                variance: 1.0,
                independent_variance: 0.5
            }
        );
        // the same rates with safety alternating: counts 1 and 1, variance 0
        let t = question_trait(&[vec![0, 1], vec![1, 0]]);
        assert_eq!(t.variance, 0.0);
        assert_eq!(t.independent_variance, 0.5);
    }
}
