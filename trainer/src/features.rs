//! The router training set: the pooled hidden states each router sees along the kept path.
//!
//! The LLM is frozen and each example's path is fixed, so the router inputs are deterministic:
//! replay the kept path with a prefill hook that records, for every block (skipped ones too),
//! the W = min(8, T) window means of the residual stream entering it.

use crate::scoring::Scoring;
use crate::search::SearchRecord;
use crate::tasks::Example;
use crate::train::{ExampleFeatures, FeatureSet};
use drllm_engine::router_format::n_windows;
use drllm_engine::{EngineError, Hidden, Logits, PrefillHook, Route, Session, Tokenizer};
use std::collections::HashMap;

/// Replays pass counts and records window means entering each block.
struct Record {
    counts: Vec<u8>,
    windows: usize,
    pooled: Vec<Vec<f32>>,
    n_windows: usize,
}

impl PrefillHook for Record {
    fn passes(&mut self, block: usize, h: &mut Hidden<'_>) -> Result<usize, String> {
        let w = n_windows(h.n_tokens(), self.windows);
        self.n_windows = w;
        self.pooled
            .push(h.window_means(w).map_err(|e| e.to_string())?);
        Ok(self.counts[block] as usize)
    }
}

/// What went into a feature set.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FeatureStats {
    /// Search results read.
    pub records: usize,
    /// Dropped: no correct path.
    pub no_correct_path: usize,
    /// Dropped to reach the share of fixed examples.
    pub dropped_for_balance: usize,
    /// Dropped because fixed (originally wrong) examples were not wanted.
    #[serde(default)]
    pub dropped_fixed: usize,
    /// Examples kept.
    pub kept: usize,
    /// Of which originally wrong and fixed.
    pub fixed: usize,
    /// Labels per class (skip, execute, repeat).
    pub labels: [usize; 3],
}

/// Which searched examples the routers learn from.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
pub enum Labels {
    /// Every example with a correct path, fixed ones included, at least `min_fixed_frac` of
    /// them fixed (the reference).
    #[default]
    All,
    /// Only examples the plain model answered correctly: their kept paths keep the answer with
    /// fewer passes. Fixes of wrong answers are dropped: at 135M-270M most of them come from
    /// paths that damage the model (skipping block 1 fixes some questions and breaks most).
    OriginallyCorrect,
}

/// Chooses the examples to train on: those with a correct path (with `Labels::OriginallyCorrect`,
/// only those the plain model answered correctly), and, when fixed examples make up less than
/// `min_fixed_frac`, without some originally-correct examples whose kept path is the default one
/// (they only teach "execute"), dropped from the end of the list.
pub fn select(
    records: &[SearchRecord],
    n_layer: usize,
    labels: Labels,
    min_fixed_frac: f64,
) -> (Vec<&SearchRecord>, FeatureStats) {
    let mut stats = FeatureStats {
        records: records.len(),
        ..Default::default()
    };
    let mut kept: Vec<&SearchRecord> = Vec::new();
    for r in records {
        match &r.kept {
            Some(_) if labels == Labels::OriginallyCorrect && !r.originally_correct => {
                stats.dropped_fixed += 1
            }
            Some(k) if k.len() == n_layer => kept.push(r),
            _ => stats.no_correct_path += 1,
        }
    }
    let min_fixed_frac = match labels {
        Labels::All => min_fixed_frac,
        Labels::OriginallyCorrect => 0.0,
    };
    let fixed = kept.iter().filter(|r| r.fixed()).count();
    let is_plain = |r: &SearchRecord| r.kept.as_ref().is_some_and(|k| k.iter().all(|&c| c == 1));
    let mut n = kept.len();
    let mut drop = std::collections::HashSet::new();
    for r in kept.iter().rev() {
        if n == 0 || fixed as f64 / n as f64 >= min_fixed_frac {
            break;
        }
        if r.originally_correct && is_plain(r) {
            drop.insert(r.id.clone());
            n -= 1;
        }
    }
    stats.dropped_for_balance = drop.len();
    let kept: Vec<&SearchRecord> = kept.into_iter().filter(|r| !drop.contains(&r.id)).collect();
    stats.kept = kept.len();
    stats.fixed = kept.iter().filter(|r| r.fixed()).count();
    for r in &kept {
        if let Some(k) = &r.kept {
            for &c in k {
                stats.labels[(c as usize).min(2)] += 1;
            }
        }
    }
    (kept, stats)
}

/// Builds the features of the selected examples.
pub fn build(
    session: &mut Session,
    tokenizer: &Tokenizer,
    scoring: Scoring,
    examples: &[Example],
    chosen: &[&SearchRecord],
    windows: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<FeatureSet, EngineError> {
    let by_id: HashMap<&str, &Example> = examples.iter().map(|e| (e.id.as_str(), e)).collect();
    let model = session.model().clone();
    let d = model.config().n_embd;
    let n_layer = model.n_layer();
    let mut out = Vec::new();
    for (i, r) in chosen.iter().enumerate() {
        let (Some(ex), Some(counts)) = (by_id.get(r.id.as_str()), r.kept.as_ref()) else {
            continue;
        };
        let tokens = tokenizer.tokenize(scoring.prompt(ex), true, false);
        let mut hook = Record {
            counts: counts.clone(),
            windows,
            pooled: Vec::with_capacity(n_layer),
            n_windows: 0,
        };
        session.prefill(&tokens, Route::Hook(&mut hook), Logits::Last)?;
        out.push(ExampleFeatures {
            id: r.id.clone(),
            n_windows: hook.n_windows,
            pooled: hook.pooled,
            labels: counts.clone(),
        });
        progress(i + 1, chosen.len());
    }
    Ok(FeatureSet {
        d,
        n_layer,
        max_windows: windows,
        examples: out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, originally_correct: bool, kept: Option<Vec<u8>>) -> SearchRecord {
        SearchRecord {
            id: id.into(),
            model: "m".into(),
            originally_correct,
            default_margin: 0.0,
            kept_passes: kept.as_ref().map(|k| k.iter().map(|&c| c as usize).sum()),
            kept_path: None,
            kept,
            kept_reward: None,
            kept_margin: None,
            simulations: 1,
            evaluated: 1,
            stopped_early: false,
            work: Default::default(),
            secs: 0.0,
        }
    }

    fn records() -> Vec<SearchRecord> {
        vec![
            rec("plain-a", true, Some(vec![1, 1, 1])),
            rec("short", true, Some(vec![1, 0, 1])),
            rec("fixed", false, Some(vec![0, 1, 2])),
            rec("lost", false, None),
            rec("plain-b", true, Some(vec![1, 1, 1])),
            rec("wrong-depth", true, Some(vec![1, 1])),
        ]
    }

    fn ids(v: &[&SearchRecord]) -> Vec<String> {
        v.iter().map(|r| r.id.clone()).collect()
    }

    #[test]
    fn all_labels_keep_fixes_and_balance_them() {
        let r = records();
        let (kept, stats) = select(&r, 3, Labels::All, 0.0);
        assert_eq!(ids(&kept), ["plain-a", "short", "fixed", "plain-b"]);
        assert_eq!((stats.no_correct_path, stats.dropped_fixed), (2, 0));
        assert_eq!((stats.kept, stats.fixed), (4, 1));
        assert_eq!(stats.labels, [2, 9, 1]);
        // 1 fixed of 4 is below 0.5: plain paths go, from the end, until 1 of 2 is reached.
        let (kept, stats) = select(&r, 3, Labels::All, 0.5);
        assert_eq!(ids(&kept), ["short", "fixed"]);
        assert_eq!(stats.dropped_for_balance, 2);
    }

    #[test]
    fn originally_correct_labels_drop_every_fix_and_ignore_the_balance() {
        let r = records();
        let (kept, stats) = select(&r, 3, Labels::OriginallyCorrect, 0.3);
        assert_eq!(ids(&kept), ["plain-a", "short", "plain-b"]);
        assert!(kept.iter().all(|r| r.originally_correct));
        assert_eq!(
            (
                stats.dropped_fixed,
                stats.no_correct_path,
                stats.dropped_for_balance
            ),
            (1, 2, 0)
        );
        assert_eq!((stats.kept, stats.fixed), (3, 0));
        assert_eq!(stats.labels, [1, 8, 0]);
    }
}
