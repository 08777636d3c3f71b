//! `drllm-train prune`: the best static prune, the baseline METHOD.md asks routed models to be
//! compared with. Greedy on a selection set: step k skips, on top of the blocks already chosen,
//! the one block whose removal keeps the most questions correct (ties: the larger mean gold
//! margin). Every question is judged along every candidate path with the search's prefix reuse
//! (a path that skips block j shares blocks 0..j-1 with the path before it).

use crate::args::PruneArgs;
use crate::defaults::MAX_ANSWER_TOKENS;
use crate::error::Error;
use crate::ledger::Ledger;
use crate::mcts::Rewarder;
use crate::progress::Progress;
use crate::scoring::Scoring;
use crate::search::{EngineRewarder, PrefixCache, RewardKind, SearchError};
use crate::tasks::{Example, McScorer};
use drllm_engine::{LayerPath, Session, Tokenizer};
use std::time::Instant;

/// One candidate block of one greedy step.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Candidate {
    /// The block skipped on top of the earlier steps' blocks.
    pub block: usize,
    /// Questions answered correctly with it skipped.
    pub correct: usize,
    /// Mean gold margin with it skipped.
    pub mean_margin: f64,
}

/// One greedy step.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Step {
    /// Every block tried, in block order.
    pub candidates: Vec<Candidate>,
    /// The block chosen.
    pub chosen: usize,
    /// All blocks skipped after this step, ascending.
    pub skipped: Vec<usize>,
    /// Questions correct with `skipped` skipped.
    pub correct: usize,
}

/// The greedy static prune on a selection set.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PruneReport {
    /// Blocks of the model.
    pub n_layer: usize,
    /// Selection questions (ids).
    pub ids: Vec<String>,
    /// Questions the full model answers correctly.
    pub plain_correct: usize,
    /// Mean gold margin of the full model.
    pub plain_mean_margin: f64,
    /// Greedy steps (step k skips k + 1 blocks).
    pub steps: Vec<Step>,
    /// Seconds.
    pub secs: f64,
}

impl PruneReport {
    /// The skipped blocks of the step with `k` blocks skipped (k >= 1).
    pub fn skip_set(&self, k: usize) -> Option<&[usize]> {
        k.checked_sub(1)
            .and_then(|i| self.steps.get(i))
            .map(|s| s.skipped.as_slice())
    }
}

/// Reads a prune report written by `drllm-train prune`.
pub fn read_report(path: &std::path::Path) -> Result<PruneReport, SearchError> {
    let text = std::fs::read_to_string(path)?;
    serde_json::from_str(&text)
        .map_err(|e| SearchError::Other(format!("{}: not a prune report ({e})", path.display())))
}

/// The static paths of a report's greedy steps: those skipping `k` blocks for each `k` of
/// `skips` (all steps when empty), named for the tables.
pub fn static_paths(
    r: &PruneReport,
    n_layer: usize,
    skips: &[usize],
) -> Result<Vec<(String, LayerPath)>, SearchError> {
    if r.n_layer != n_layer {
        return Err(SearchError::Other(format!(
            "prune report for a {}-block model, this model has {n_layer}",
            r.n_layer
        )));
    }
    let ks: Vec<usize> = if skips.is_empty() {
        (1..=r.steps.len()).collect()
    } else {
        skips.to_vec()
    };
    ks.iter()
        .map(|&k| {
            let set = r.skip_set(k).ok_or_else(|| {
                SearchError::Other(format!(
                    "no prune with {k} blocks skipped (has 1..={})",
                    r.steps.len()
                ))
            })?;
            let counts: Vec<usize> = (0..n_layer)
                .map(|b| usize::from(!set.contains(&b)))
                .collect();
            let path = LayerPath::from_counts(&counts).map_err(drllm_engine::EngineError::from)?;
            Ok((format!("static prune, skip {set:?}"), path))
        })
        .collect()
}

/// Runs `max_skips` greedy steps over `examples`. `progress(done, total)` counts judged paths.
#[allow(clippy::too_many_arguments)]
pub fn greedy_prune(
    session: &mut Session,
    tokenizer: &Tokenizer,
    scorer: &McScorer,
    scoring: Scoring,
    examples: &[Example],
    max_skips: usize,
    cache_bytes: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<PruneReport, SearchError> {
    let t0 = Instant::now();
    let n_layer = session.model().n_layer();
    let max_skips = max_skips.min(n_layer.saturating_sub(1));
    let mut cache = PrefixCache::new(cache_bytes);
    let mut skipped: Vec<usize> = Vec::new();
    let mut steps = Vec::new();
    let mut plain = (0usize, 0.0f64);
    // judged paths: step 0 also judges the full path
    let total: usize =
        (0..max_skips).map(|s| n_layer - s).sum::<usize>() * examples.len() + examples.len();
    let mut done = 0usize;
    for step in 0..max_skips {
        let blocks: Vec<usize> = (0..n_layer).filter(|b| !skipped.contains(b)).collect();
        let mut correct = vec![0usize; blocks.len()];
        let mut margin = vec![0.0f64; blocks.len()];
        for ex in examples {
            cache.clear();
            let tokens = tokenizer.tokenize(scoring.prompt(ex), true, false);
            let mut rw = EngineRewarder {
                session: &mut *session,
                tokens,
                scoring,
                example: ex,
                scorer,
                tokenizer,
                reward: RewardKind::Binary,
                cache: Some(&mut cache),
                save_states: true,
                max_answer_tokens: MAX_ANSWER_TOKENS,
                work: Default::default(),
            };
            let mut counts = vec![1u8; n_layer];
            for &b in &skipped {
                counts[b] = 0;
            }
            // the current path first: it fills the cache every candidate starts from
            let base = rw.evaluate(&counts)?;
            // candidates share only the current path's prefixes: their own states are never
            // read again
            rw.save_states = false;
            if step == 0 {
                plain.0 += usize::from(base.correct);
                plain.1 += base.margin;
                done += 1;
            }
            for (ci, &b) in blocks.iter().enumerate() {
                counts[b] = 0;
                let o = rw.evaluate(&counts)?;
                counts[b] = 1;
                correct[ci] += usize::from(o.correct);
                margin[ci] += o.margin;
                done += 1;
                progress(done, total);
            }
        }
        let n = examples.len().max(1) as f64;
        let candidates: Vec<Candidate> = blocks
            .iter()
            .enumerate()
            .map(|(ci, &b)| Candidate {
                block: b,
                correct: correct[ci],
                mean_margin: margin[ci] / n,
            })
            .collect();
        let Some(best) = best_candidate(&candidates) else {
            break;
        };
        skipped.push(best.block);
        skipped.sort_unstable();
        steps.push(Step {
            candidates,
            chosen: best.block,
            skipped: skipped.clone(),
            correct: best.correct,
        });
    }
    let n = examples.len().max(1) as f64;
    Ok(PruneReport {
        n_layer,
        ids: examples.iter().map(|e| e.id.clone()).collect(),
        plain_correct: plain.0,
        plain_mean_margin: plain.1 / n,
        steps,
        secs: t0.elapsed().as_secs_f64(),
    })
}

/// The report as a markdown table: accuracy after each step and the best blocks of step 1.
pub fn markdown(r: &PruneReport) -> String {
    let n = r.ids.len().max(1) as f64;
    let mut s = format!(
        "## Greedy static prune on {} selection questions\n\n\
         | blocks skipped | skipped | accuracy | mean gold margin |\n|---:|---|---:|---:|\n\
         | 0 | - | {:.2}% | {:.3} |\n",
        r.ids.len(),
        100.0 * r.plain_correct as f64 / n,
        r.plain_mean_margin
    );
    for (k, st) in r.steps.iter().enumerate() {
        let m = st
            .candidates
            .iter()
            .find(|c| c.block == st.chosen)
            .map(|c| c.mean_margin)
            .unwrap_or(f64::NAN);
        s.push_str(&format!(
            "| {} | {:?} | {:.2}% | {:.3} |\n",
            k + 1,
            st.skipped,
            100.0 * st.correct as f64 / n,
            m
        ));
    }
    if let Some(st) = r.steps.first() {
        let mut c = st.candidates.clone();
        c.sort_by_key(|x| std::cmp::Reverse(x.correct));
        s.push_str("\nSingle-block skips, best first (block: accuracy):");
        for x in &c {
            s.push_str(&format!(
                " {}: {:.1}%;",
                x.block,
                100.0 * x.correct as f64 / n
            ));
        }
        s.push('\n');
    }
    s
}

/// The block to remove: most questions kept, then the larger mean margin, then the earlier
/// block.
fn best_candidate(candidates: &[Candidate]) -> Option<Candidate> {
    candidates
        .iter()
        .max_by(|a, b| {
            a.correct
                .cmp(&b.correct)
                .then(a.mean_margin.total_cmp(&b.mean_margin))
                // on a full tie the earlier block wins (max_by keeps the last maximum)
                .then(b.block.cmp(&a.block))
        })
        .cloned()
}

/// `drllm-train prune`: the greedy prune on the calibration questions (recorded in the
/// ledger), its report as JSON (default RUN_DIR/prune.json) and markdown (printed).
pub fn run_prune(a: &PruneArgs) -> Result<std::path::PathBuf, Error> {
    let l = a.common.load()?;
    let set = a.set.load(&a.common.data_dir)?;
    eprintln!(
        "[prune] {}, {} greedy steps",
        a.set.describe(set.len()),
        a.max_skips
    );
    let mut session = a.common.session(&l.model)?;
    let mut p = Progress::new("prune");
    let r = greedy_prune(
        &mut session,
        &l.tokenizer,
        &l.scorer,
        a.common.scoring,
        &set,
        a.max_skips,
        a.cache.bytes(),
        &mut |d, t| p.tick(d, t, "paths"),
    )?;
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| a.common.run_dir().join("prune.json"));
    if let Some(d) = out.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(&out, serde_json::to_string_pretty(&r)?)?;
    Ledger::record(
        &a.common.run_dir(),
        "prune",
        r.ids.iter().map(String::as_str),
    )?;
    println!("{}", markdown(&r));
    eprintln!("[prune] wrote {} ({:.0} s)", out.display(), r.secs);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_paths_of_a_report() {
        let step = |chosen: usize, skipped: Vec<usize>| Step {
            candidates: vec![],
            chosen,
            skipped,
            correct: 0,
        };
        let r = PruneReport {
            n_layer: 5,
            ids: vec!["q".into()],
            plain_correct: 1,
            plain_mean_margin: 0.0,
            steps: vec![step(3, vec![3]), step(1, vec![1, 3])],
            secs: 0.0,
        };
        let all = static_paths(&r, 5, &[]).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(
            all[0].1.to_string(),
            LayerPath::from_counts(&[1, 1, 1, 0, 1])
                .unwrap()
                .to_string()
        );
        assert_eq!(all[1].1.len(), 3);
        assert!(all[1].0.contains("[1, 3]"));
        assert_eq!(static_paths(&r, 5, &[2]).unwrap().len(), 1);
        assert!(static_paths(&r, 5, &[3]).is_err());
        assert!(static_paths(&r, 6, &[]).is_err());
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("prune.json");
        std::fs::write(&f, serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(read_report(&f).unwrap(), r);
        std::fs::write(&f, "{}").unwrap();
        assert!(read_report(&f).is_err());
    }
}
