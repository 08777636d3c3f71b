//! Monte Carlo Tree Search over layer paths (the method's supervision, METHOD.md).
//!
//! A path is given by its per-block pass counts (0 skip, 1 execute, 2 repeat), in block order.
//! The search starts from the default path (every block once). Actions from a node skip 1 or 2
//! consecutive executed blocks, or repeat one executed block (one extra pass at most, and only
//! while the path stays within `max_len_factor` x L passes). Selection follows
//! `mean reward + c sqrt(ln t / n) - lambda len / L`, with a random child `random_rate` of the
//! time. Each simulation evaluates one new path; the reward is 1 when the model answers
//! correctly along that path (or a smooth score, see [`Outcome`]).
//!
//! Tree policy: **progressive widening with best-edit-first expansion**. A node visited n
//! times may have at most `ceil(n^widening)` children; a simulation descends by UCT through
//! nodes that have as many children as they may, and expands a new child at the first node
//! that may have one more. The child is an untried action with an edit (block b run 0 or 2
//! times) never tried anywhere in the tree, else the action whose edits did best on average
//! wherever they were tried (see [`Amaf`]): edits of a path compose roughly additively, so
//! the single edits that helped get combined. With `widening` 0.75 the root of a 200
//! simulation search gets about 50 of its 89 children (L = 30) and its best children dozens of
//! their own, so kept paths carry several edits. Expanding every action of a node before
//! descending (`widening` 1) never gets past one edit when a node has more actions than the
//! budget has simulations (3L - 1 = 89 at L = 30); the reference's leaf expansion (descend to
//! a node without children, give it one) grows a single chain of random edits, a random walk.
//!
//! The search is generic over the [`Rewarder`], so it is tested against synthetic rewards.

use drllm_router_format::rng::SplitMix64;
use std::collections::HashMap;

/// How a path's answer becomes a reward.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
pub enum RewardKind {
    /// 1 when correct, else 0 (the reference).
    Binary,
    /// sigmoid(margin of the gold answer): smoother, for multiple choice.
    Margin,
}

/// Search settings; the defaults are the reference method's.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MctsConfig {
    /// Simulations per example (50 to 200 in the reference).
    pub simulations: usize,
    /// Exploration constant.
    pub c: f64,
    /// Length penalty: `lambda * len(path) / L` is subtracted in selection.
    pub lambda: f64,
    /// Most consecutive blocks one skip action removes.
    pub max_skip_span: usize,
    /// Most consecutive skipped blocks in any path (0 = no limit).
    pub max_consecutive_skip: usize,
    /// Extra passes a block may get (the reference: 1, i.e. at most 2 passes).
    pub max_repeats_per_block: usize,
    /// Repeats are allowed only while the path has at most this many times L passes.
    pub max_len_factor: f64,
    /// Share of selections that pick a random child.
    pub random_rate: f64,
    /// Progressive widening exponent: a node visited n times has at most ceil(n^widening)
    /// children (0.75; 1 expands every action of a node before descending).
    #[serde(default = "default_widening")]
    pub widening: f64,
    /// Expand the untried action whose edits did best elsewhere in the tree (see `Amaf`);
    /// off: in the seeded random order.
    #[serde(default = "default_amaf")]
    pub amaf: bool,
    /// Stop early when a path fixes an originally wrong answer, or a correct path at least
    /// `early_stop_shorter_by` passes shorter than the default is found.
    pub early_stop: bool,
    /// See `early_stop`.
    pub early_stop_shorter_by: usize,
    /// On an originally correct example, a path counts as correct (for keeping it and for the
    /// early stop) only if its gold margin is at least the default path's: a shorter path must
    /// not make the model less sure of the right answer. Off in the reference, where any path
    /// that still answers right counts; at 135M-270M parameters answer margins are tiny and
    /// such paths are mostly luck that does not carry over to other questions.
    pub margin_floor: bool,
    /// RNG seed (action order, random selections).
    pub seed: u64,
}

fn default_widening() -> f64 {
    0.75
}

fn default_amaf() -> bool {
    true
}

impl Default for MctsConfig {
    fn default() -> Self {
        MctsConfig {
            simulations: 200,
            c: 1.8,
            lambda: 3.0,
            max_skip_span: 2,
            max_consecutive_skip: 0,
            max_repeats_per_block: 1,
            max_len_factor: 2.0,
            random_rate: 0.1,
            widening: default_widening(),
            amaf: default_amaf(),
            early_stop: true,
            early_stop_shorter_by: 2,
            margin_floor: false,
            seed: 0,
        }
    }
}

/// What evaluating one path gave.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Outcome {
    /// The answer along this path is right.
    pub correct: bool,
    /// The value backed up the tree: 1/0 for binary rewards, or a smooth score in [0, 1].
    pub reward: f64,
    /// The gold answer's margin (e.g. its logit minus the best other option's).
    pub margin: f64,
}

/// Evaluates paths (per-block pass counts).
pub trait Rewarder {
    /// Error type.
    type Error;
    /// The outcome along a path.
    fn evaluate(&mut self, counts: &[u8]) -> Result<Outcome, Self::Error>;
}

/// The result of searching one example.
#[derive(Clone, Debug, PartialEq)]
pub struct SearchResult {
    /// The default path's outcome.
    pub default: Outcome,
    /// The kept path: the shortest correct one (ties: fewest distinct blocks, then the larger
    /// margin); None when no evaluated path is correct.
    pub kept: Option<Vec<u8>>,
    /// Its outcome.
    pub kept_outcome: Option<Outcome>,
    /// Simulations run (at most `simulations`).
    pub simulations: usize,
    /// Distinct paths evaluated (the default included).
    pub evaluated: usize,
    /// The early-stop rule ended the search.
    pub stopped_early: bool,
}

/// Number of block passes of a path.
pub fn passes(counts: &[u8]) -> usize {
    counts.iter().map(|&c| c as usize).sum()
}

/// Edits of a path from the default one: blocks run 0 or 2 times.
pub fn edits(counts: &[u8]) -> usize {
    counts.iter().filter(|&&c| c != 1).count()
}

fn distinct(counts: &[u8]) -> usize {
    counts.iter().filter(|&&c| c > 0).count()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Skip { block: usize, span: usize },
    Repeat { block: usize },
}

struct Node {
    counts: Vec<u8>,
    children: Vec<usize>,
    untried: Vec<Action>,
    visits: u64,
    total: f64,
}

fn apply(counts: &[u8], a: Action) -> Vec<u8> {
    let mut c = counts.to_vec();
    match a {
        Action::Skip { block, span } => c[block..block + span].iter_mut().for_each(|x| *x = 0),
        Action::Repeat { block } => c[block] += 1,
    }
    c
}

fn longest_zero_run(c: &[u8]) -> usize {
    let (mut best, mut run) = (0, 0);
    for &x in c {
        run = if x == 0 { run + 1 } else { 0 };
        best = best.max(run);
    }
    best
}

fn actions(counts: &[u8], cfg: &MctsConfig) -> Vec<Action> {
    let l = counts.len();
    let len = passes(counts);
    let mut out = Vec::new();
    for b in 0..l {
        for span in 1..=cfg.max_skip_span.max(1) {
            if b + span > l || !counts[b..b + span].iter().all(|&x| x == 1) {
                continue;
            }
            if len <= span {
                continue; // never skip everything
            }
            let a = Action::Skip { block: b, span };
            if cfg.max_consecutive_skip > 0
                && longest_zero_run(&apply(counts, a)) > cfg.max_consecutive_skip
            {
                continue;
            }
            out.push(a);
        }
        let max_len = (cfg.max_len_factor * l as f64).floor() as usize;
        if counts[b] >= 1 && (counts[b] as usize) < 1 + cfg.max_repeats_per_block && len < max_len {
            out.push(Action::Repeat { block: b });
        }
    }
    out
}

/// "All moves as first" statistics: the mean reward of every simulated path that carries an
/// edit (block b run 0 or 2 times), wherever in the tree it was reached. Expansion takes an
/// untried action with an edit never tried yet, else the one whose edits did best on average:
/// edits of a layer path compose roughly additively, so once every edit has been seen the
/// single edits that helped are tried together (progressive widening with RAVE-style action
/// ordering).
#[derive(Default)]
struct Amaf {
    stats: HashMap<(usize, u8), (u64, f64)>,
}

impl Amaf {
    fn record(&mut self, counts: &[u8], reward: f64) {
        for (b, &c) in counts.iter().enumerate() {
            if c != 1 {
                let e = self.stats.entry((b, c)).or_insert((0, 0.0));
                e.0 += 1;
                e.1 += reward;
            }
        }
    }

    fn edits(a: &Action) -> Vec<(usize, u8)> {
        match *a {
            Action::Skip { block, span } => (block..block + span).map(|b| (b, 0)).collect(),
            Action::Repeat { block } => vec![(block, 2)],
        }
    }

    /// The index in `untried` to expand next: an action with an edit never tried anywhere
    /// (the last such in the seeded random order), else the one whose edits have the best
    /// mean reward.
    fn pick(&self, untried: &[Action]) -> Option<usize> {
        let mut best: Option<(usize, f64)> = None;
        for (i, a) in untried.iter().enumerate().rev() {
            let edits = Self::edits(a);
            let mut sum = 0.0;
            for e in &edits {
                match self.stats.get(e) {
                    Some(&(n, t)) if n > 0 => sum += t / n as f64,
                    _ => return Some(i),
                }
            }
            let v = sum / edits.len().max(1) as f64;
            if best.is_none_or(|(_, bv)| v > bv) {
                best = Some((i, v));
            }
        }
        best.map(|(i, _)| i)
    }
}

/// Searches one example from the default path.
pub fn search<R: Rewarder>(
    n_layer: usize,
    cfg: &MctsConfig,
    rewarder: &mut R,
) -> Result<SearchResult, R::Error> {
    let mut tree = Tree {
        cfg,
        rewarder,
        rng: SplitMix64(cfg.seed ^ 0xD1B5_4A32_D192_ED03),
        seen: HashMap::new(),
        nodes: Vec::new(),
        amaf: Amaf::default(),
        best: None,
        floor: None,
    };
    let root_counts = vec![1u8; n_layer];
    let default = tree.eval(&root_counts)?;
    let mut root = tree.node(root_counts.clone());
    root.visits = 1;
    root.total = default.reward;
    tree.nodes.push(root);
    tree.best = default.correct.then_some((root_counts, default));
    tree.floor = (cfg.margin_floor && default.correct).then_some(default.margin);
    let mut sims = 0;
    let mut stopped_early = false;
    while sims < cfg.simulations {
        sims += 1;
        tree.simulate(sims)?;
        if cfg.early_stop {
            if let Some((bc, bo)) = &tree.best {
                let fixed = !default.correct && bo.correct;
                let shorter = default.correct && passes(bc) + cfg.early_stop_shorter_by <= n_layer;
                if fixed || shorter {
                    stopped_early = true;
                    break;
                }
            }
        }
    }
    let evaluated = tree.seen.len();
    Ok(SearchResult {
        default,
        kept_outcome: tree.best.as_ref().map(|(_, o)| *o),
        kept: tree.best.map(|(c, _)| c),
        simulations: sims,
        evaluated,
        stopped_early,
    })
}

/// The search tree of one question and what it has learnt so far.
struct Tree<'a, R: Rewarder> {
    cfg: &'a MctsConfig,
    rewarder: &'a mut R,
    rng: SplitMix64,
    /// Every path evaluated, with its outcome (a path is evaluated once).
    seen: HashMap<Vec<u8>, Outcome>,
    /// Node 0 is the root (the default path).
    nodes: Vec<Node>,
    amaf: Amaf,
    /// The path to keep so far.
    best: Option<(Vec<u8>, Outcome)>,
    /// With the margin floor: the gold margin a kept path must reach.
    floor: Option<f64>,
}

impl<R: Rewarder> Tree<'_, R> {
    /// The outcome of a path (evaluated once, then remembered).
    fn eval(&mut self, counts: &[u8]) -> Result<Outcome, R::Error> {
        if let Some(o) = self.seen.get(counts) {
            return Ok(*o);
        }
        let o = self.rewarder.evaluate(counts)?;
        self.seen.insert(counts.to_vec(), o);
        Ok(o)
    }

    /// A new node for `counts`, its actions in a seeded random order.
    fn node(&mut self, counts: Vec<u8>) -> Node {
        let mut untried = actions(&counts, self.cfg);
        self.rng.shuffle(&mut untried);
        Node {
            counts,
            children: Vec::new(),
            untried,
            visits: 0,
            total: 0.0,
        }
    }

    /// Whether a path with outcome `o` should replace the kept one: correct (and above the
    /// margin floor), then fewer passes, fewer distinct blocks, a larger margin.
    fn better(&self, c: &[u8], o: &Outcome) -> bool {
        if !o.correct || self.floor.is_some_and(|f| o.margin < f) {
            return false;
        }
        match &self.best {
            None => true,
            Some((bc, bo)) => {
                let key = (passes(c), distinct(c));
                let bkey = (passes(bc), distinct(bc));
                key < bkey || (key == bkey && o.margin > bo.margin)
            }
        }
    }

    /// One simulation (the `sims`-th): descend by UCT through nodes that have as many children
    /// as they may, expand a new child at the first that may have one more (or re-evaluate a
    /// node with nothing left to expand), back the outcome up the trail.
    fn simulate(&mut self, sims: usize) -> Result<(), R::Error> {
        let mut trail = vec![0usize];
        let mut node = 0usize;
        let leaf_outcome = loop {
            if let Some(o) = self.expand(node, &mut trail)? {
                break o;
            }
            if self.nodes[node].children.is_empty() {
                // nothing left to expand below: re-evaluate (cached) and back up
                let counts = self.nodes[node].counts.clone();
                break self.eval(&counts)?;
            }
            node = self.select(node, sims);
            trail.push(node);
        };
        for &i in &trail {
            self.nodes[i].visits += 1;
            self.nodes[i].total += leaf_outcome.reward;
        }
        if let Some(&leaf) = trail.last() {
            self.amaf
                .record(&self.nodes[leaf].counts, leaf_outcome.reward);
        }
        Ok(())
    }

    /// Expands a new child of `node` if progressive widening lets it have one more: the
    /// child's outcome, the child on the trail.
    fn expand(&mut self, node: usize, trail: &mut Vec<usize>) -> Result<Option<Outcome>, R::Error> {
        let n = &self.nodes[node];
        let may_have = (n.visits.max(1) as f64)
            .powf(self.cfg.widening)
            .ceil()
            .max(1.0) as usize;
        if n.children.len() >= may_have {
            return Ok(None);
        }
        let pick = if self.cfg.amaf {
            self.amaf.pick(&n.untried)
        } else {
            n.untried.len().checked_sub(1)
        };
        let Some(i) = pick else {
            return Ok(None);
        };
        let a = self.nodes[node].untried.swap_remove(i);
        let counts = apply(&self.nodes[node].counts, a);
        let o = self.eval(&counts)?;
        let child = self.node(counts.clone());
        self.nodes.push(child);
        let id = self.nodes.len() - 1;
        self.nodes[node].children.push(id);
        trail.push(id);
        if self.better(&counts, &o) {
            self.best = Some((counts, o));
        }
        Ok(Some(o))
    }

    /// The child of `node` to descend to: a random one `random_rate` of the time, else the
    /// best by mean reward + c sqrt(ln t / n) - lambda passes / L.
    fn select(&mut self, node: usize, sims: usize) -> usize {
        let cfg = self.cfg;
        let t = sims as f64;
        let ch = &self.nodes[node].children;
        if self.rng.unit() < cfg.random_rate {
            return ch[self.rng.below(ch.len())];
        }
        let l = self.nodes[node].counts.len() as f64;
        let mut bi = ch[0];
        let mut bs = f64::NEG_INFINITY;
        for &c in ch {
            let n = &self.nodes[c];
            let nv = n.visits.max(1) as f64;
            let score = n.total / nv + cfg.c * (t.ln().max(0.0) / nv).sqrt()
                - cfg.lambda * passes(&n.counts) as f64 / l;
            if score > bs {
                bs = score;
                bi = c;
            }
        }
        bi
    }
}

/// The path as text: `0-3,5-29` style block list.
pub fn counts_to_string(counts: &[u8]) -> String {
    let mut blocks = Vec::new();
    for (b, &c) in counts.iter().enumerate() {
        blocks.extend(std::iter::repeat_n(b, c as usize));
    }
    match drllm_engine::LayerPath::new(&blocks, counts.len()) {
        Ok(p) => p.to_string(),
        Err(_) => format!("{counts:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn action_rules() {
        let cfg = MctsConfig::default();
        let a = actions(&[1, 1, 1], &cfg);
        // skips of span 1 (3) and 2 (2), repeats (3)
        assert_eq!(a.len(), 8);
        // no repeat of a repeated block, no skip of it either
        let a = actions(&[1, 2, 1], &cfg);
        assert!(!a.contains(&Action::Repeat { block: 1 }));
        assert!(!a.iter().any(|x| matches!(x, Action::Skip { block: 1, .. })));
        // length cap: 2L passes
        let a = actions(&[2, 2, 2], &cfg);
        assert!(a.iter().all(|x| !matches!(x, Action::Repeat { .. })));
        // never skip the last executed block
        let a = actions(&[0, 1, 0], &cfg);
        assert!(a.iter().all(|x| !matches!(x, Action::Skip { .. })));
        let cfg = MctsConfig {
            max_consecutive_skip: 1,
            ..MctsConfig::default()
        };
        let a = actions(&[1, 0, 1, 1], &cfg);
        assert!(!a.contains(&Action::Skip { block: 2, span: 1 }));
        assert!(!a.contains(&Action::Skip { block: 0, span: 1 }));
        assert!(a.contains(&Action::Skip { block: 3, span: 1 }));
    }
}
