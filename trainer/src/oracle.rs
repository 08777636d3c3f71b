//! `drllm-train oracle`: the oracle table. For every question, the full path and every path one
//! edit away from it (each single-block skip, each single-block repeat: 2L paths), with the
//! answer's correctness, the gold answer's margin, the option chosen and the KL divergence of
//! the answer-choice distribution from the full path's.
//!
//! The table answers what a search cannot: how often skipping block k is safe, whether that
//! differs between questions (the only thing a per-request router can add to a static prune),
//! and the best a router could do at one pass saved. Work is shared through the search's
//! prefix cache: the full path runs first and keeps its pass states, each skip of block k then
//! resumes after block k - 1, each repeat after block k (about L^2 / 2 + L passes per question
//! instead of 2 L^2). One JSONL line per question; resumable; `--shard i/n`.

use crate::args::OracleArgs;
use crate::error::Error;
use crate::ledger::Ledger;
use crate::progress::Progress;
use crate::scoring::{kl_divergence, Judgement, Scoring};
use crate::search::{EngineRewarder, PrefixCache, RewardKind, SearchError, Work};
use crate::shards::check_params;
use crate::tasks::{Example, McScorer, TaskKind};
use drllm_engine::{Session, Tokenizer};
use std::collections::HashSet;
use std::path::Path;
use std::time::Instant;

/// One path of the table.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Probe {
    /// The answer along this path is right.
    pub correct: bool,
    /// The gold answer's margin (its score minus the best other option's).
    pub margin: f64,
    /// The option chosen.
    pub choice: usize,
    /// KL(full || this) of the softmax over the options' scores, nats (0 for the full path).
    pub kl: f64,
}

/// One question of the table.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OracleRecord {
    /// Example id.
    pub id: String,
    /// Base model fingerprint (results of another model are ignored on resume).
    pub model: String,
    /// Blocks of the model.
    pub n_layer: usize,
    /// The full path.
    pub full: Probe,
    /// The full path's option scores.
    pub full_scores: Vec<f64>,
    /// `skip[k]`: the full path without block k.
    pub skip: Vec<Probe>,
    /// `repeat[k]`: the full path with block k run twice (empty when the table was made
    /// without repeats).
    pub repeat: Vec<Probe>,
    /// Work counters.
    pub work: Work,
    /// Seconds spent.
    pub secs: f64,
}

/// Settings of an oracle run.
#[derive(Clone, Debug)]
pub struct OracleRun {
    /// Multiple-choice scoring.
    pub scoring: Scoring,
    /// Prefix cache budget in bytes.
    pub cache_bytes: usize,
    /// This process handles questions with index % n == i.
    pub shard: (usize, usize),
    /// Also every single repeat (L more paths, each longer than the full path: about half
    /// the work).
    pub repeats: bool,
}

/// Progress of a run.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct OracleSummary {
    /// Questions done now.
    pub done: usize,
    /// Questions already in the file.
    pub resumed: usize,
    /// Work counters.
    pub work: Work,
    /// Seconds.
    pub secs: f64,
    /// Questions per hour.
    pub questions_per_hour: f64,
}

fn probe(j: &Judgement, full_scores: &[f64]) -> Result<Probe, SearchError> {
    let choice = j.choice.ok_or_else(|| {
        SearchError::Other("the oracle table needs multiple-choice questions".into())
    })?;
    Ok(Probe {
        correct: j.correct,
        margin: j.margin,
        choice,
        kl: kl_divergence(full_scores, &j.scores),
    })
}

/// Reads a table (missing file = empty).
/// A torn last line (a run killed while writing it) is not a row.
pub fn read_oracle(path: &Path) -> Result<Vec<OracleRecord>, SearchError> {
    let mut out = Vec::new();
    for (i, line) in crate::shards::complete_lines(path)? {
        let r: OracleRecord = serde_json::from_str(&line).map_err(|e| SearchError::BadResult {
            line: i,
            reason: e.to_string(),
        })?;
        if r.skip.len() != r.n_layer || !(r.repeat.is_empty() || r.repeat.len() == r.n_layer) {
            return Err(SearchError::BadResult {
                line: i,
                reason: format!(
                    "{} skips and {} repeats for {} blocks",
                    r.skip.len(),
                    r.repeat.len(),
                    r.n_layer
                ),
            });
        }
        out.push(r);
    }
    Ok(out)
}

/// The table row of one question.
pub fn oracle_question(
    session: &mut Session,
    tokenizer: &Tokenizer,
    scorer: &McScorer,
    ex: &Example,
    fingerprint: &str,
    run: &OracleRun,
    cache: &mut PrefixCache,
) -> Result<OracleRecord, SearchError> {
    if ex.kind != TaskKind::MultipleChoice {
        return Err(SearchError::Other(format!(
            "{}: the oracle table needs multiple-choice questions",
            ex.id
        )));
    }
    let t = Instant::now();
    let n_layer = session.model().n_layer();
    let tokens = tokenizer.tokenize(run.scoring.prompt(ex), true, false);
    cache.clear();
    let mut rw = EngineRewarder {
        session,
        tokens,
        scoring: run.scoring,
        example: ex,
        scorer,
        tokenizer,
        reward: RewardKind::Binary,
        cache: Some(cache),
        save_states: true,
        max_answer_tokens: 1,
        work: Work::default(),
    };
    let mut counts = vec![1u8; n_layer];
    let full = rw.judge_path(&counts)?;
    let full_scores = full.scores.clone();
    let full_probe = probe(&full, &full_scores)?;
    // every other path shares only a prefix of the full path
    rw.save_states = false;
    let mut skip = Vec::with_capacity(n_layer);
    let mut repeat = Vec::with_capacity(n_layer);
    for k in 0..n_layer {
        counts[k] = 0;
        skip.push(probe(&rw.judge_path(&counts)?, &full_scores)?);
        if run.repeats {
            counts[k] = 2;
            repeat.push(probe(&rw.judge_path(&counts)?, &full_scores)?);
        }
        counts[k] = 1;
    }
    Ok(OracleRecord {
        id: ex.id.clone(),
        model: fingerprint.to_string(),
        n_layer,
        full: full_probe,
        full_scores,
        skip,
        repeat,
        work: rw.work,
        secs: t.elapsed().as_secs_f64(),
    })
}

/// Tabulates every question of this shard not yet in `out`, appending one line each.
#[allow(clippy::too_many_arguments)]
pub fn oracle_questions(
    session: &mut Session,
    tokenizer: &Tokenizer,
    scorer: &McScorer,
    examples: &[Example],
    fingerprint: &str,
    run: &OracleRun,
    out: &Path,
    progress: &mut dyn FnMut(&OracleSummary, usize, usize),
) -> Result<OracleSummary, SearchError> {
    let (si, sn) = run.shard;
    if sn == 0 || si >= sn {
        return Err(SearchError::Other(format!("bad shard {si}/{sn}")));
    }
    let done: HashSet<String> = read_oracle(out)?
        .into_iter()
        .filter(|r| r.model == fingerprint)
        .map(|r| r.id)
        .collect();
    let mine: Vec<&Example> = examples
        .iter()
        .enumerate()
        .filter(|(i, _)| i % sn == si)
        .map(|(_, e)| e)
        .collect();
    let todo: Vec<&Example> = mine
        .iter()
        .copied()
        .filter(|e| !done.contains(&e.id))
        .collect();
    let mut summary = OracleSummary {
        resumed: mine.len() - todo.len(),
        ..Default::default()
    };
    let mut file = crate::shards::open_append(out)?;
    let mut cache = PrefixCache::new(run.cache_bytes);
    let t0 = Instant::now();
    for (i, ex) in todo.iter().enumerate() {
        let rec = oracle_question(session, tokenizer, scorer, ex, fingerprint, run, &mut cache)?;
        let line = serde_json::to_string(&rec).map_err(|e| SearchError::Other(e.to_string()))?;
        crate::shards::append_line(&mut file, out, &line)?;
        summary.done += 1;
        summary.work.rollouts += rec.work.rollouts;
        summary.work.passes_run += rec.work.passes_run;
        summary.work.passes_reused += rec.work.passes_reused;
        summary.secs = t0.elapsed().as_secs_f64();
        summary.questions_per_hour = summary.done as f64 * 3600.0 / summary.secs.max(1e-9);
        progress(&summary, i + 1, todo.len());
    }
    Ok(summary)
}

/// `drllm-train oracle`: this shard's questions tabulated (resumed where the table stops,
/// unless `--report-only`), the questions recorded in the ledger, and the table's summary
/// written beside it (`.report.md`, `.report.json`) and printed.
pub fn run_oracle(a: &OracleArgs) -> Result<OracleReport, Error> {
    let out = a.results.path(&a.common, &a.questions.set, "oracle");
    if !a.report_only {
        tabulate(a, &out)?;
    }
    let records = read_oracle(&out)?;
    if records.is_empty() {
        return Err(Error::refused(format!(
            "{} holds no questions",
            out.display()
        )));
    }
    Ledger::record(
        &a.common.run_dir(),
        "oracle",
        records.iter().map(|r| r.id.as_str()),
    )?;
    let report = report(&records, a.tau)?;
    let md = markdown(&report);
    let (md_path, json_path) = crate::shards::report_paths(&out);
    std::fs::write(md_path, &md)?;
    std::fs::write(json_path, serde_json::to_string_pretty(&report)?)?;
    println!("{md}");
    Ok(report)
}

/// The questions of `a`'s shard not yet in `out`, appended to it.
fn tabulate(a: &OracleArgs, out: &Path) -> Result<OracleSummary, Error> {
    let l = a.common.load()?;
    let examples = a.questions.load(&a.common.data_dir)?;
    let run = OracleRun {
        scoring: a.common.scoring,
        cache_bytes: a.cache.bytes(),
        shard: a.results.shard,
        repeats: !a.no_repeats,
    };
    check_params(
        out,
        &serde_json::json!({"task": a.questions.set.task, "split": a.questions.set.split,
                            "scoring": run.scoring, "table": "oracle single skips",
                            "repeats": run.repeats}),
    )?;
    let mut session = a.common.session(&l.model)?;
    let (si, sn) = run.shard;
    eprintln!(
        "[oracle] {} {} on {} (shard {si}/{sn}), {} paths per question, table -> {}",
        a.questions.set.task,
        a.questions.set.split,
        a.common.model.display(),
        1 + l.model.n_layer() * if run.repeats { 2 } else { 1 },
        out.display()
    );
    let mut p = Progress::new("oracle");
    let s = oracle_questions(
        &mut session,
        &l.tokenizer,
        &l.scorer,
        &examples,
        &l.fingerprint,
        &run,
        out,
        &mut |s, done, total| {
            p.tick(
                done,
                total,
                &format!(
                    "{:.0} questions/h, {} passes run, {} reused",
                    s.questions_per_hour, s.work.passes_run, s.work.passes_reused
                ),
            )
        },
    )?;
    eprintln!("[oracle] {}", serde_json::to_string(&s)?);
    Ok(s)
}

/// Whether skipping a block is safe for a question: the same option is chosen and the gold
/// answer's margin drops by at most `tau`.
pub fn skip_safe(full: &Probe, skipped: &Probe, tau: f64) -> bool {
    skipped.choice == full.choice && full.margin - skipped.margin <= tau
}

/// What the table says about one block.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct BlockSummary {
    pub block: usize,
    /// Accuracy with the block skipped (a static prune of this one block), percent.
    pub skip_accuracy: f64,
    /// Questions whose skip keeps the chosen option, percent.
    pub skip_keeps_choice: f64,
    /// Questions for which the skip is safe ([`skip_safe`]), percent.
    pub skip_safe: f64,
    /// Mean KL of the answer distribution with the block skipped.
    pub skip_mean_kl: f64,
    /// Mean change of the gold margin with the block skipped.
    pub skip_mean_margin_change: f64,
    /// Accuracy with the block repeated, percent (None: the table has no repeats).
    pub repeat_accuracy: Option<f64>,
}

/// What the table says over all its questions.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct OracleReport {
    pub questions: usize,
    pub n_layer: usize,
    /// The `tau` of the safety labels.
    pub tau: f64,
    /// Accuracy of the full path, percent.
    pub plain_accuracy: f64,
    /// The oracle at exactly one pass saved: a question counts when at least one single skip
    /// answers it right, percent.
    pub oracle_one_saved_accuracy: f64,
    /// The best single static skip on these questions (block, accuracy in percent).
    pub best_static_skip: (usize, f64),
    /// The oracle over single repeats (one pass more), percent (None: no repeats in the
    /// table).
    pub oracle_one_repeat_accuracy: Option<f64>,
    pub blocks: Vec<BlockSummary>,
}

/// Summarises a table. All records must have the same number of blocks.
pub fn report(records: &[OracleRecord], tau: f64) -> Result<OracleReport, SearchError> {
    let n_layer = records.first().map_or(0, |r| r.n_layer);
    if records.iter().any(|r| r.n_layer != n_layer) {
        return Err(SearchError::Other(
            "the table mixes models of different depths".into(),
        ));
    }
    let repeats = records.iter().all(|r| r.repeat.len() == n_layer);
    let n = records.len().max(1) as f64;
    let pct = |c: usize| 100.0 * c as f64 / n;
    let count = |f: &dyn Fn(&OracleRecord) -> bool| records.iter().filter(|r| f(r)).count();
    let blocks: Vec<BlockSummary> = (0..n_layer)
        .map(|k| BlockSummary {
            block: k,
            skip_accuracy: pct(count(&|r| r.skip[k].correct)),
            skip_keeps_choice: pct(count(&|r| r.skip[k].choice == r.full.choice)),
            skip_safe: pct(count(&|r| skip_safe(&r.full, &r.skip[k], tau))),
            skip_mean_kl: records.iter().map(|r| r.skip[k].kl).sum::<f64>() / n,
            skip_mean_margin_change: records
                .iter()
                .map(|r| r.skip[k].margin - r.full.margin)
                .sum::<f64>()
                / n,
            repeat_accuracy: repeats.then(|| pct(count(&|r| r.repeat[k].correct))),
        })
        .collect();
    let best = blocks
        .iter()
        .max_by(|a, b| {
            a.skip_accuracy
                .total_cmp(&b.skip_accuracy)
                .then(b.block.cmp(&a.block))
        })
        .map_or((0, 0.0), |b| (b.block, b.skip_accuracy));
    Ok(OracleReport {
        questions: records.len(),
        n_layer,
        tau,
        plain_accuracy: pct(count(&|r| r.full.correct)),
        oracle_one_saved_accuracy: pct(count(&|r| r.skip.iter().any(|p| p.correct))),
        best_static_skip: best,
        oracle_one_repeat_accuracy: repeats
            .then(|| pct(count(&|r| r.repeat.iter().any(|p| p.correct)))),
        blocks,
    })
}

/// Per-(question, block) labels for router training: 0 where skipping the block is safe, 1
/// where it is not ([`skip_safe`]).
pub fn skip_labels(record: &OracleRecord, tau: f64) -> Vec<u8> {
    record
        .skip
        .iter()
        .map(|p| u8::from(!skip_safe(&record.full, p, tau)))
        .collect()
}

fn opt_pct(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |x| format!("{x:.1}%"))
}

/// The report as markdown.
pub fn markdown(r: &OracleReport) -> String {
    let mut s = format!(
        "# Oracle table: {} questions, {} blocks\n\n\
         | | accuracy |\n|---|---:|\n\
         | plain (full path) | {:.1}% |\n\
         | oracle, exactly one pass saved (best single skip per question) | {:.1}% |\n\
         | best static single skip (block {}) | {:.1}% |\n\
         | oracle, one pass more (best single repeat per question) | {} |\n\n\
         Safe skip: same option chosen and the gold margin lower by at most {}.\n\n\
         | block | skip: accuracy | keeps choice | safe | mean KL | mean margin change | repeat: accuracy |\n\
         |---:|---:|---:|---:|---:|---:|---:|\n",
        r.questions,
        r.n_layer,
        r.plain_accuracy,
        r.oracle_one_saved_accuracy,
        r.best_static_skip.0,
        r.best_static_skip.1,
        opt_pct(r.oracle_one_repeat_accuracy),
        r.tau
    );
    for b in &r.blocks {
        s.push_str(&format!(
            "| {} | {:.1}% | {:.1}% | {:.1}% | {:.4} | {:+.4} | {} |\n",
            b.block,
            b.skip_accuracy,
            b.skip_keeps_choice,
            b.skip_safe,
            b.skip_mean_kl,
            b.skip_mean_margin_change,
            opt_pct(b.repeat_accuracy)
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(correct: bool, margin: f64, choice: usize) -> Probe {
        Probe {
            correct,
            margin,
            choice,
            kl: 0.0,
        }
    }

    fn rec(id: &str, full: Probe, skip: Vec<Probe>) -> OracleRecord {
        OracleRecord {
            id: id.into(),
            model: "m".into(),
            n_layer: skip.len(),
            full,
            full_scores: vec![],
            repeat: skip.iter().map(|_| full).collect(),
            skip,
            work: Work::default(),
            secs: 0.0,
        }
    }

    #[test]
    fn report_and_labels_by_hand() {
        // q1 right (margin 1): skip 0 keeps it (margin 0.95), skip 1 flips to option 2
        // q2 wrong (choice 1, margin -0.5): skip 0 makes it right, skip 1 keeps it wrong
        let recs = vec![
            rec(
                "q1",
                p(true, 1.0, 0),
                vec![p(true, 0.95, 0), p(false, -0.2, 2)],
            ),
            rec(
                "q2",
                p(false, -0.5, 1),
                vec![p(true, 0.3, 0), p(false, -0.7, 1)],
            ),
        ];
        let r = report(&recs, 0.1).unwrap();
        assert_eq!(r.plain_accuracy, 50.0);
        assert_eq!(r.oracle_one_saved_accuracy, 100.0);
        assert_eq!(r.best_static_skip, (0, 100.0));
        assert_eq!(r.blocks[1].skip_accuracy, 0.0);
        assert_eq!(r.blocks[0].skip_keeps_choice, 50.0);
        // q2 skip 1: same choice, margin -0.7 vs -0.5: a drop of 0.2 > 0.1, not safe
        assert_eq!(r.blocks[1].skip_safe, 0.0);
        assert_eq!(r.blocks[0].skip_safe, 50.0);
        assert!((r.blocks[0].skip_mean_margin_change - (-0.05 + 0.8) / 2.0).abs() < 1e-12);
        assert_eq!(skip_labels(&recs[0], 0.1), vec![0, 1]);
        assert_eq!(skip_labels(&recs[1], 0.1), vec![1, 1]);
        assert_eq!(skip_labels(&recs[1], 0.25), vec![1, 0]);
        let md = markdown(&r);
        assert!(md.contains("| 0 | 100.0% | 50.0% | 50.0% |"), "{md}");
    }
}
