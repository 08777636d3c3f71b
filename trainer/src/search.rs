//! `drllm-train search`: MCTS over layer paths for every example of a data set, with rewards
//! from the engine along each candidate path.
//!
//! Work is shared across the simulations of one question: the residual stream after every
//! pass is kept (keyed by the path prefix that produced it, bounded by a byte budget), so a
//! rollout recomputes only from the first pass where its path differs from one already run.
//! Results are appended to a JSONL file, one line per example, so a run can be resumed and
//! split across processes (`--shard i/n`) and the files concatenated.

use crate::args::SearchArgs;
use crate::defaults::MAX_ANSWER_TOKENS;
use crate::error::Error;
pub use crate::error::SearchError;
use crate::ledger::Ledger;
pub use crate::mcts::RewardKind;
use crate::mcts::{self, passes, MctsConfig, Outcome, Rewarder};
use crate::progress::Progress;
use crate::scoring::{judge_all, Judgement, Scoring};
use crate::shards::check_params;
use crate::shards::{append_line, complete_lines, open_append};
use crate::tasks::{Example, McScorer, TaskKind};
use drllm_engine::{EngineError, LayerPath, Logits, PassState, Route, Session, Tokenizer};
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

/// States after path prefixes (one question): the entry for a prefix of length i + 1 holds
/// what pass i left (residual stream and the KV rows it wrote). Least recently used entries go
/// first when the byte budget is exceeded.
pub struct PrefixCache {
    map: HashMap<Vec<u16>, (PassState, u64)>,
    bytes: usize,
    budget: usize,
    clock: u64,
}

impl PrefixCache {
    /// A cache holding at most `budget` bytes of states.
    pub fn new(budget: usize) -> Self {
        PrefixCache {
            map: HashMap::new(),
            bytes: 0,
            budget,
            clock: 0,
        }
    }

    /// Forgets everything (a new question).
    pub fn clear(&mut self) {
        self.map.clear();
        self.bytes = 0;
    }

    /// The longest k < `blocks.len()` such that the states of all prefixes of length 1..=k are
    /// cached (a resume needs every pass's KV rows); marks them used.
    pub fn longest_chain(&mut self, blocks: &[u16]) -> usize {
        self.clock += 1;
        let mut k = 0;
        while k + 1 < blocks.len() {
            match self.map.get_mut(&blocks[..k + 1]) {
                Some(e) => {
                    e.1 = self.clock;
                    k += 1;
                }
                None => break,
            }
        }
        k
    }

    /// The states of the prefixes of length 1..=k (after [`PrefixCache::longest_chain`]).
    pub fn chain(&self, blocks: &[u16], k: usize) -> Vec<&PassState> {
        (1..=k)
            .filter_map(|j| self.map.get(&blocks[..j]).map(|e| &e.0))
            .collect()
    }

    /// Whether a prefix is cached.
    pub fn contains(&self, prefix: &[u16]) -> bool {
        self.map.contains_key(prefix)
    }

    /// Stores the state after `prefix`.
    pub fn insert(&mut self, prefix: Vec<u16>, state: PassState) {
        let size = state.bytes();
        if size > self.budget {
            return;
        }
        while self.bytes + size > self.budget {
            let Some(oldest) = self
                .map
                .iter()
                .min_by_key(|(_, v)| v.1)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some((v, _)) = self.map.remove(&oldest) {
                self.bytes -= v.bytes();
            }
        }
        self.clock += 1;
        if let Some((old, _)) = self.map.insert(prefix, (state, self.clock)) {
            self.bytes -= old.bytes();
        }
        self.bytes += size;
    }
}

/// Counters of work done.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Work {
    /// Rollouts (distinct paths evaluated).
    pub rollouts: u64,
    /// Block passes computed.
    pub passes_run: u64,
    /// Block passes skipped thanks to cached prefixes.
    pub passes_reused: u64,
}

/// Rewards from the engine for one example.
pub struct EngineRewarder<'a> {
    /// The session (one sequence at a time).
    pub session: &'a mut Session,
    /// Prompt tokens (of `scoring.prompt(example)`).
    pub tokens: Vec<i32>,
    /// Multiple-choice scoring.
    pub scoring: Scoring,
    /// The example.
    pub example: &'a Example,
    /// MC scorer.
    pub scorer: &'a McScorer,
    /// Tokenizer (numeric tasks decode text).
    pub tokenizer: &'a Tokenizer,
    /// Reward kind.
    pub reward: RewardKind,
    /// Prefix cache (None: recompute every rollout from scratch).
    pub cache: Option<&'a mut PrefixCache>,
    /// Store the states of passes not yet cached (false: only read the cache, e.g. when the
    /// paths still to come share no prefix with this one).
    pub save_states: bool,
    /// Generated tokens allowed for numeric answers.
    pub max_answer_tokens: usize,
    /// Work counters.
    pub work: Work,
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

impl EngineRewarder<'_> {
    /// Judges the example along a path (per-block pass counts), reusing cached prefixes.
    pub fn judge_path(&mut self, counts: &[u8]) -> Result<Judgement, SearchError> {
        let cs: Vec<usize> = counts.iter().map(|&c| c as usize).collect();
        let path = LayerPath::from_counts(&cs).map_err(EngineError::from)?;
        let blocks: Vec<u16> = path.blocks().map(|b| b as u16).collect();
        self.work.rollouts += 1;
        let logits = match self.cache.as_deref_mut() {
            Some(cache) => {
                let k0 = cache.longest_chain(&blocks);
                let (logits, saved) = {
                    let cache_ro: &PrefixCache = cache;
                    let states = cache_ro.chain(&blocks, k0);
                    let save = self.save_states;
                    self.session.forward_from(
                        &self.tokens,
                        &path,
                        (k0 > 0).then_some(states.as_slice()),
                        |i| save && !cache_ro.contains(&blocks[..i + 1]),
                    )?
                };
                for (k, state) in saved {
                    cache.insert(blocks[..k].to_vec(), state);
                }
                self.work.passes_reused += k0 as u64;
                self.work.passes_run += (blocks.len() - k0) as u64;
                logits
            }
            None => {
                self.work.passes_run += blocks.len() as u64;
                self.session
                    .prefill(&self.tokens, Route::Fixed(&path), Logits::Last)?
                    .logits
            }
        };
        Ok(judge_all(
            self.session,
            self.tokenizer,
            self.scorer,
            self.scoring,
            self.example,
            &self.tokens,
            &logits,
            self.max_answer_tokens,
        )?)
    }
}

impl Rewarder for EngineRewarder<'_> {
    type Error = SearchError;

    fn evaluate(&mut self, counts: &[u8]) -> Result<Outcome, SearchError> {
        let Judgement {
            correct, margin, ..
        } = self.judge_path(counts)?;
        let reward = match (self.reward, self.example.kind) {
            (RewardKind::Margin, TaskKind::MultipleChoice) => sigmoid(margin),
            _ => f64::from(u8::from(correct)),
        };
        Ok(Outcome {
            correct,
            reward,
            margin,
        })
    }
}

/// One line of the results file.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SearchRecord {
    /// Example id.
    pub id: String,
    /// Base model fingerprint (results of another model are ignored on resume).
    pub model: String,
    /// The default path answered correctly.
    pub originally_correct: bool,
    /// The default path's gold margin.
    pub default_margin: f64,
    /// The kept path (per-block pass counts), or None (dropped: no correct path found).
    pub kept: Option<Vec<u8>>,
    /// The kept path as text.
    pub kept_path: Option<String>,
    /// Its passes.
    pub kept_passes: Option<usize>,
    /// Its reward.
    pub kept_reward: Option<f64>,
    /// Its margin.
    pub kept_margin: Option<f64>,
    /// Simulations used.
    pub simulations: usize,
    /// Distinct paths evaluated.
    pub evaluated: usize,
    /// The early-stop rule ended the search.
    pub stopped_early: bool,
    /// Work counters.
    pub work: Work,
    /// Seconds spent.
    pub secs: f64,
}

impl SearchRecord {
    /// An originally wrong answer fixed by the kept path.
    pub fn fixed(&self) -> bool {
        !self.originally_correct && self.kept.is_some()
    }
}

/// Reads a results file (missing file = no results).
/// A torn last line (a run killed while writing it) is not a result.
pub fn read_results(path: &Path) -> Result<Vec<SearchRecord>, SearchError> {
    let mut out = Vec::new();
    for (line_no, line) in complete_lines(path)? {
        let r: SearchRecord = serde_json::from_str(&line).map_err(|e| SearchError::BadResult {
            line: line_no,
            reason: e.to_string(),
        })?;
        out.push(r);
    }
    Ok(out)
}

/// Settings of a search run.
#[derive(Clone, Debug)]
pub struct SearchRun {
    /// MCTS settings.
    pub mcts: MctsConfig,
    /// Reward kind.
    pub reward: RewardKind,
    /// Share work between rollouts through the prefix cache.
    pub prefix_reuse: bool,
    /// Prefix cache budget in bytes.
    pub cache_bytes: usize,
    /// This process handles examples with index % n == i.
    pub shard: (usize, usize),
    /// Tokens a numeric answer may take.
    pub max_answer_tokens: usize,
    /// Multiple-choice scoring.
    pub scoring: Scoring,
}

/// Summary of a run.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct RunSummary {
    /// Examples searched now.
    pub searched: usize,
    /// Examples skipped because their result was already in the file.
    pub resumed: usize,
    /// Originally correct.
    pub originally_correct: usize,
    /// Originally wrong and fixed.
    pub fixed: usize,
    /// Originally correct and a shorter correct path kept.
    pub shortened: usize,
    /// No correct path.
    pub dropped: usize,
    /// Work counters.
    pub work: Work,
    /// Seconds.
    pub secs: f64,
    /// Rollouts per second.
    pub rollouts_per_sec: f64,
}

/// Searches every example of this shard not yet in `out`, appending one line each.
#[allow(clippy::too_many_arguments)]
pub fn search_questions(
    session: &mut Session,
    tokenizer: &Tokenizer,
    scorer: &McScorer,
    examples: &[Example],
    model_fingerprint: &str,
    run: &SearchRun,
    out: &Path,
    progress: &mut dyn FnMut(&RunSummary, usize, usize),
) -> Result<RunSummary, SearchError> {
    let n_layer = session.model().n_layer();
    let done: std::collections::HashSet<String> = read_results(out)?
        .into_iter()
        .filter(|r| r.model == model_fingerprint)
        .map(|r| r.id)
        .collect();
    let (si, sn) = run.shard;
    if sn == 0 || si >= sn {
        return Err(SearchError::Other(format!("bad shard {si}/{sn}")));
    }
    let mine: Vec<&Example> = examples
        .iter()
        .enumerate()
        .filter(|(i, _)| i % sn == si)
        .map(|(_, e)| e)
        .collect();
    let mut summary = RunSummary::default();
    let todo: Vec<&Example> = mine
        .iter()
        .copied()
        .filter(|e| !done.contains(&e.id))
        .collect();
    summary.resumed = mine.len() - todo.len();
    let mut file = open_append(out)?;
    let mut cache = PrefixCache::new(run.cache_bytes);
    let t0 = Instant::now();
    let total = todo.len();
    for (i, ex) in todo.iter().enumerate() {
        let t = Instant::now();
        let tokens = tokenizer.tokenize(run.scoring.prompt(ex), true, false);
        cache.clear();
        let mut rw = EngineRewarder {
            session,
            tokens,
            scoring: run.scoring,
            example: ex,
            scorer,
            tokenizer,
            reward: run.reward,
            cache: run.prefix_reuse.then_some(&mut cache),
            save_states: true,
            max_answer_tokens: run.max_answer_tokens,
            work: Work::default(),
        };
        let mut cfg = run.mcts.clone();
        // a different but reproducible action order per example
        cfg.seed = run.mcts.seed ^ hash(&ex.id);
        let res = mcts::search(n_layer, &cfg, &mut rw)?;
        let work = rw.work;
        let rec = SearchRecord {
            id: ex.id.clone(),
            model: model_fingerprint.to_string(),
            originally_correct: res.default.correct,
            default_margin: res.default.margin,
            kept_path: res.kept.as_deref().map(mcts::counts_to_string),
            kept_passes: res.kept.as_deref().map(passes),
            kept_reward: res.kept_outcome.map(|o| o.reward),
            kept_margin: res.kept_outcome.map(|o| o.margin),
            kept: res.kept,
            simulations: res.simulations,
            evaluated: res.evaluated,
            stopped_early: res.stopped_early,
            work,
            secs: t.elapsed().as_secs_f64(),
        };
        let line = serde_json::to_string(&rec).map_err(|e| SearchError::Other(e.to_string()))?;
        append_line(&mut file, out, &line)?;
        summary.searched += 1;
        if rec.originally_correct {
            summary.originally_correct += 1;
            if rec.kept_passes.is_some_and(|p| p < n_layer) {
                summary.shortened += 1;
            }
        } else if rec.kept.is_some() {
            summary.fixed += 1;
        } else {
            summary.dropped += 1;
        }
        summary.work.rollouts += work.rollouts;
        summary.work.passes_run += work.passes_run;
        summary.work.passes_reused += work.passes_reused;
        summary.secs = t0.elapsed().as_secs_f64();
        summary.rollouts_per_sec = summary.work.rollouts as f64 / summary.secs.max(1e-9);
        progress(&summary, i + 1, total);
    }
    Ok(summary)
}

/// `drllm-train search`: the search of this shard's questions, resumed where its results
/// file stops; the questions go into the run's ledger.
pub fn run_search(a: &SearchArgs) -> Result<RunSummary, Error> {
    let l = a.common.load()?;
    let examples = a.questions.load(&a.common.data_dir)?;
    let run = SearchRun {
        mcts: a.mcts(),
        reward: a.reward,
        prefix_reuse: !a.no_prefix_reuse,
        cache_bytes: a.cache.bytes(),
        shard: a.results.shard,
        max_answer_tokens: MAX_ANSWER_TOKENS,
        scoring: a.common.scoring,
    };
    let out = a.results.path(&a.common, &a.questions.set, "search");
    check_params(
        &out,
        &serde_json::json!({
            "task": a.questions.set.task, "split": a.questions.set.split, "mcts": run.mcts,
            "reward": run.reward, "scoring": run.scoring,
            "max_answer_tokens": run.max_answer_tokens,
        }),
    )?;
    let mut session = a.common.session(&l.model)?;
    let (si, sn) = run.shard;
    let mine = || {
        examples
            .iter()
            .enumerate()
            .filter(|(i, _)| a.results.takes(*i))
            .map(|(_, e)| e.id.as_str())
    };
    eprintln!(
        "[search] {} {} on {} ({} questions in shard {si}/{sn}), {} simulations, prefix reuse {}, results -> {}",
        a.questions.set.task,
        a.questions.set.split,
        a.common.model.display(),
        mine().count(),
        run.mcts.simulations,
        if run.prefix_reuse { "on" } else { "off" },
        out.display()
    );
    let mut p = Progress::new("search");
    let s = search_questions(
        &mut session,
        &l.tokenizer,
        &l.scorer,
        &examples,
        &l.fingerprint,
        &run,
        &out,
        &mut |s, done, total| {
            p.tick(
                done,
                total,
                &format!(
                    "fixed {} shortened {} dropped {} | {:.1} rollouts/s",
                    s.fixed, s.shortened, s.dropped, s.rollouts_per_sec
                ),
            )
        },
    )?;
    eprintln!("[search] {}", serde_json::to_string(&s)?);
    let recs: Vec<_> = read_results(&out)?
        .into_iter()
        .filter(|r| r.model == l.fingerprint)
        .collect();
    eprintln!(
        "[search] kept paths by number of edits (0, 1, 2, ...): {:?}",
        edit_histogram(&recs)
    );
    Ledger::record(&a.common.run_dir(), "search", mine())?;
    Ok(s)
}

/// How many kept paths carry 0, 1, 2, ... edits (blocks run 0 or 2 times), in order; dropped
/// questions are not counted.
pub fn edit_histogram(records: &[SearchRecord]) -> Vec<usize> {
    let mut h = Vec::new();
    for k in records.iter().filter_map(|r| r.kept.as_deref()) {
        let e = mcts::edits(k);
        if h.len() <= e {
            h.resize(e + 1, 0);
        }
        h[e] += 1;
    }
    h
}

/// A one-line JSON summary of search results (the sidecar's search provenance).
pub fn summary(records: &[SearchRecord], params: &[serde_json::Value]) -> String {
    let n = records.len();
    let fixed = records.iter().filter(|r| r.fixed()).count();
    let correct = records.iter().filter(|r| r.originally_correct).count();
    let sims: usize = records.iter().map(|r| r.simulations).sum();
    serde_json::json!({
        "questions": n, "originally_correct": correct, "fixed": fixed,
        "mean_simulations": sims as f64 / n.max(1) as f64,
        "edits_per_kept_path": edit_histogram(records),
        "settings": params,
    })
    .to_string()
}

fn hash(s: &str) -> u64 {
    // FNV-1a
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(kept: Option<Vec<u8>>, originally_correct: bool) -> SearchRecord {
        SearchRecord {
            id: "q".into(),
            model: "m".into(),
            originally_correct,
            default_margin: 0.0,
            kept_path: None,
            kept_passes: None,
            kept_reward: None,
            kept_margin: None,
            kept,
            simulations: 10,
            evaluated: 5,
            stopped_early: false,
            work: Work::default(),
            secs: 0.0,
        }
    }

    #[test]
    fn shards_histograms_and_summaries() {
        use crate::args::parse_shard;
        assert_eq!(parse_shard("0/1").unwrap(), (0, 1));
        assert_eq!(parse_shard(" 3 / 4 ").unwrap(), (3, 4));
        for bad in ["4/4", "1/0", "x/2", "1", ""] {
            assert!(parse_shard(bad).is_err(), "{bad}");
        }
        let recs = vec![
            rec(Some(vec![1, 1, 1]), true),
            rec(Some(vec![0, 1, 2]), false),
            rec(Some(vec![0, 0, 0]), true),
            rec(None, false),
            rec(Some(vec![1, 0, 1]), true),
        ];
        assert_eq!(edit_histogram(&recs), vec![1, 1, 1, 1]);
        let v: serde_json::Value = serde_json::from_str(&summary(&recs, &[])).unwrap();
        assert_eq!(v["questions"], 5);
        assert_eq!(v["fixed"], 1);
        assert_eq!(v["originally_correct"], 3);
        assert_eq!(v["edits_per_kept_path"], serde_json::json!([1, 1, 1, 1]));
    }
}
