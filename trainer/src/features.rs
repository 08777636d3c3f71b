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

pub use crate::train::Labels;

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

/// Each chosen example's kept path, labelled by itself (examples without one left out).
pub fn kept_items(chosen: &[&SearchRecord]) -> Vec<PathItem> {
    chosen
        .iter()
        .filter_map(|r| {
            let k = r.kept.as_ref()?;
            Some(PathItem {
                id: r.id.clone(),
                counts: k.clone(),
                labels: k.clone(),
            })
        })
        .collect()
}

/// Router inputs along `items` (the default windows), from `cache` when it holds exactly
/// these model, scoring and paths (unless `rebuild`), else built on a session of `common`'s
/// over the questions `examples` gives and cached; says which on stderr as `[what]`.
pub fn cached_along(
    common: &crate::args::Common,
    loaded: &crate::args::Loaded,
    cache: &std::path::Path,
    rebuild: bool,
    items: &[PathItem],
    examples: impl FnOnce() -> Result<Vec<Example>, crate::error::Error>,
    what: &str,
) -> Result<FeatureSet, crate::error::Error> {
    use drllm_engine::router_format::DEFAULT_WINDOWS;
    let key = cache_key(&loaded.fingerprint, common.scoring, DEFAULT_WINDOWS, items);
    let (fs, from_cache) = cached(cache, &key, rebuild, || {
        let examples = examples()?;
        let mut session = common.session(&loaded.model)?;
        let mut p = crate::progress::Progress::new("features");
        Ok::<_, crate::error::Error>(build_paths(
            &mut session,
            &loaded.tokenizer,
            common.scoring,
            &examples,
            items,
            DEFAULT_WINDOWS,
            &mut |d, t| p.tick(d, t, ""),
        )?)
    })?;
    if from_cache {
        eprintln!("[{what}] router inputs from {}", cache.display());
    }
    Ok(fs)
}

/// Builds the features of the selected examples: along each kept path, labelled by it.
pub fn build(
    session: &mut Session,
    tokenizer: &Tokenizer,
    scoring: Scoring,
    examples: &[Example],
    chosen: &[&SearchRecord],
    windows: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<FeatureSet, EngineError> {
    let items = kept_items(chosen);
    build_paths(
        session, tokenizer, scoring, examples, &items, windows, progress,
    )
}

/// An example to build features for: the path to replay and the labels to attach.
#[derive(Clone, Debug, PartialEq)]
pub struct PathItem {
    pub id: String,
    /// Per-block pass counts of the path the router inputs are recorded along.
    pub counts: Vec<u8>,
    /// Per-block labels (0 skip, 1 execute, 2 repeat).
    pub labels: Vec<u8>,
}

/// Builds features along given paths (e.g. the full path, with labels from the oracle table).
/// Items whose example is missing are left out.
pub fn build_paths(
    session: &mut Session,
    tokenizer: &Tokenizer,
    scoring: Scoring,
    examples: &[Example],
    items: &[PathItem],
    windows: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<FeatureSet, EngineError> {
    let by_id: HashMap<&str, &Example> = examples.iter().map(|e| (e.id.as_str(), e)).collect();
    let model = session.model().clone();
    let d = model.config().n_embd;
    let n_layer = model.n_layer();
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let Some(ex) = by_id.get(item.id.as_str()) else {
            continue;
        };
        let tokens = tokenizer.tokenize(scoring.prompt(ex), true, false);
        let mut hook = Record {
            counts: item.counts.clone(),
            windows,
            pooled: Vec::with_capacity(n_layer),
            n_windows: 0,
        };
        session.prefill(&tokens, Route::Hook(&mut hook), Logits::Last)?;
        out.push(ExampleFeatures {
            id: item.id.clone(),
            n_windows: hook.n_windows,
            pooled: hook.pooled,
            labels: item.labels.clone(),
        });
        progress(i + 1, items.len());
    }
    Ok(FeatureSet {
        d,
        n_layer,
        max_windows: windows,
        examples: out,
    })
}

/// A feature cache file with the key of what it was built from beside it (`CACHE.key`: the
/// SHA-256 of the key's JSON). [`cached`] reuses the file only when the key matches: other
/// questions, other paths (new search results), another model, scoring or window count all
/// rebuild it. Labels are not part of the key: callers set them after loading.
pub fn cache_key(
    model_fingerprint: &str,
    scoring: Scoring,
    windows: usize,
    items: &[PathItem],
) -> String {
    use sha2::{Digest, Sha256};
    let paths: Vec<(&str, &[u8])> = items
        .iter()
        .map(|i| (i.id.as_str(), i.counts.as_slice()))
        .collect();
    let v = serde_json::json!({"model": model_fingerprint, "scoring": scoring,
                               "windows": windows, "paths": paths});
    let h = Sha256::digest(v.to_string().as_bytes());
    h.iter().map(|b| format!("{b:02x}")).collect()
}

fn key_path(cache: &std::path::Path) -> std::path::PathBuf {
    let mut name = cache.file_name().unwrap_or_default().to_os_string();
    name.push(".key");
    cache.with_file_name(name)
}

/// The cached feature set if its key matches `key`, else `build()`, saved with its key.
/// Returns the set and whether it came from the cache.
pub fn cached<E: From<crate::train::TrainError> + From<std::io::Error>>(
    cache: &std::path::Path,
    key: &str,
    rebuild: bool,
    build: impl FnOnce() -> Result<FeatureSet, E>,
) -> Result<(FeatureSet, bool), E> {
    let kp = key_path(cache);
    let fresh =
        !rebuild && cache.is_file() && std::fs::read_to_string(&kp).is_ok_and(|k| k.trim() == key);
    if fresh {
        if let Ok(fs) = FeatureSet::load(cache) {
            return Ok((fs, true));
        }
    }
    let fs = build()?;
    if let Some(dir) = cache.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // the key is written after the features: a crash in between leaves a stale key only for
    // a file that will not match it
    let _ = std::fs::remove_file(&kp);
    fs.save(cache)?;
    std::fs::write(&kp, key)?;
    Ok((fs, false))
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
    fn the_feature_cache_is_rebuilt_when_its_key_changes() {
        use crate::train::ExampleFeatures;
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("f.bin");
        let item = |id: &str, counts: Vec<u8>| PathItem {
            id: id.into(),
            labels: counts.clone(),
            counts,
        };
        let fs = |v: f32| FeatureSet {
            d: 1,
            n_layer: 2,
            max_windows: 1,
            examples: vec![ExampleFeatures {
                id: "q".into(),
                n_windows: 1,
                pooled: vec![vec![v], vec![v]],
                labels: vec![1, 1],
            }],
        };
        let k1 = cache_key("m", Scoring::Continuation, 8, &[item("q", vec![1, 1])]);
        let builds = std::cell::Cell::new(0);
        let get = |key: &str, v: f32| {
            cached::<Box<dyn std::error::Error>>(&cache, key, false, || {
                builds.set(builds.get() + 1);
                Ok(fs(v))
            })
            .unwrap()
        };
        assert_eq!(get(&k1, 1.0), (fs(1.0), false));
        assert_eq!(get(&k1, 2.0), (fs(1.0), true));
        // same question, another kept path: new key, rebuilt
        let k2 = cache_key("m", Scoring::Continuation, 8, &[item("q", vec![1, 0])]);
        assert_ne!(k1, k2);
        assert_eq!(get(&k2, 3.0), (fs(3.0), false));
        for other in [
            cache_key("m2", Scoring::Continuation, 8, &[item("q", vec![1, 0])]),
            cache_key("m", Scoring::Letters, 8, &[item("q", vec![1, 0])]),
            cache_key("m", Scoring::Continuation, 4, &[item("q", vec![1, 0])]),
            cache_key("m", Scoring::Continuation, 8, &[item("r", vec![1, 0])]),
        ] {
            assert_ne!(other, k2);
        }
        assert_eq!(builds.get(), 2);
        // a corrupt cache file is rebuilt, not an error
        std::fs::write(&cache, b"junk").unwrap();
        assert_eq!(get(&k2, 4.0), (fs(4.0), false));
        assert_eq!(builds.get(), 3);
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
