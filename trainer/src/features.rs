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
    /// Examples kept.
    pub kept: usize,
    /// Of which originally wrong and fixed.
    pub fixed: usize,
    /// Labels per class (skip, execute, repeat).
    pub labels: [usize; 3],
}

/// Chooses the examples to train on: those with a correct path, and, when fixed examples make
/// up less than `min_fixed_frac`, without some originally-correct examples whose kept path is
/// the default one (they only teach "execute"), dropped from the end of the list.
pub fn select(
    records: &[SearchRecord],
    n_layer: usize,
    min_fixed_frac: f64,
) -> (Vec<&SearchRecord>, FeatureStats) {
    let mut stats = FeatureStats {
        records: records.len(),
        ..Default::default()
    };
    let mut kept: Vec<&SearchRecord> = Vec::new();
    for r in records {
        match &r.kept {
            Some(k) if k.len() == n_layer => kept.push(r),
            _ => stats.no_correct_path += 1,
        }
    }
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
