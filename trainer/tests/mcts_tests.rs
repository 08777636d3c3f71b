//! The path search against synthetic rewards: known best paths, budget and early-stop rules.

use drllm_train::mcts::{passes, search, MctsConfig, Outcome, Rewarder};
use std::convert::Infallible;

/// Correct exactly on the listed paths (binary reward); counts calls.
struct Only {
    good: Vec<Vec<u8>>,
    calls: usize,
}

impl Rewarder for Only {
    type Error = Infallible;
    fn evaluate(&mut self, counts: &[u8]) -> Result<Outcome, Infallible> {
        self.calls += 1;
        let ok = self.good.iter().any(|g| g == counts);
        Ok(Outcome {
            correct: ok,
            reward: f64::from(u8::from(ok)),
            margin: if ok { 1.0 } else { -1.0 },
        })
    }
}

fn path(l: usize, edits: &[(usize, u8)]) -> Vec<u8> {
    let mut c = vec![1u8; l];
    for &(b, v) in edits {
        c[b] = v;
    }
    c
}

#[test]
fn finds_a_one_step_fix_and_stops_early() {
    let l = 10;
    let target = path(l, &[(3, 0), (4, 0)]);
    let mut r = Only {
        good: vec![target.clone()],
        calls: 0,
    };
    let cfg = MctsConfig::default();
    let res = search(l, &cfg, &mut r).unwrap();
    assert!(!res.default.correct);
    assert_eq!(res.kept.as_deref(), Some(&target[..]));
    assert!(res.stopped_early);
    assert!(res.simulations <= cfg.simulations);
    // each distinct path is evaluated once
    assert_eq!(r.calls, res.evaluated);
}

#[test]
fn finds_a_two_step_path() {
    let l = 8;
    // repeat block 2 and skip block 6: two actions deep
    let target = path(l, &[(2, 2), (6, 0)]);
    let mut r = Only {
        good: vec![target.clone()],
        calls: 0,
    };
    // a needle (only the target is correct, nothing guides towards it): at L = 8 a search that
    // expands every action of a node before descending (widening 1) covers depth two in 400
    let cfg = MctsConfig {
        simulations: 400,
        widening: 1.0,
        amaf: false,
        ..MctsConfig::default()
    };
    let res = search(l, &cfg, &mut r).unwrap();
    assert_eq!(
        res.kept.as_deref(),
        Some(&target[..]),
        "after {} simulations",
        res.simulations
    );
    assert!(res.stopped_early);
}

#[test]
fn keeps_the_shortest_correct_path_and_respects_the_budget() {
    let l = 8;
    let short = path(l, &[(1, 0), (2, 0), (5, 0)]);
    let longer = path(l, &[(5, 0)]);
    let mut r = Only {
        good: vec![longer.clone(), short.clone()],
        calls: 0,
    };
    // needles again (see above): exhaustive expansion
    let cfg = MctsConfig {
        simulations: 300,
        early_stop: false,
        widening: 1.0,
        amaf: false,
        ..MctsConfig::default()
    };
    let res = search(l, &cfg, &mut r).unwrap();
    assert_eq!(res.simulations, 300);
    assert!(!res.stopped_early);
    assert_eq!(res.kept.as_deref(), Some(&short[..]));
    assert_eq!(passes(&short), l - 3);
}

#[test]
fn never_correct_runs_the_whole_budget_and_keeps_nothing() {
    let mut r = Only {
        good: vec![],
        calls: 0,
    };
    let cfg = MctsConfig {
        simulations: 60,
        ..MctsConfig::default()
    };
    let res = search(6, &cfg, &mut r).unwrap();
    assert_eq!(res.simulations, 60);
    assert!(res.kept.is_none() && !res.stopped_early);
    assert!(res.evaluated <= 61);
}

/// Correct on every path up to `max` passes (the default included).
struct UpTo(usize);

impl Rewarder for UpTo {
    type Error = Infallible;
    fn evaluate(&mut self, counts: &[u8]) -> Result<Outcome, Infallible> {
        let ok = passes(counts) <= self.0;
        Ok(Outcome {
            correct: ok,
            reward: f64::from(u8::from(ok)),
            margin: 0.0,
        })
    }
}

#[test]
fn originally_correct_stops_at_two_passes_shorter() {
    let l = 12;
    let cfg = MctsConfig::default();
    let res = search(l, &cfg, &mut UpTo(l)).unwrap();
    assert!(res.default.correct);
    assert!(res.stopped_early);
    let kept = res.kept.unwrap();
    assert!(passes(&kept) <= l - 2, "{kept:?}");
    // without early stop the search goes on and finds shorter correct paths still
    let cfg = MctsConfig {
        early_stop: false,
        simulations: 200,
        ..MctsConfig::default()
    };
    let res = search(l, &cfg, &mut UpTo(l)).unwrap();
    assert!(passes(res.kept.as_ref().unwrap()) < l - 2);
    // and never produces invalid paths: counts <= 2, at least one pass, length <= 2L
}

/// Records every path it sees and checks the action rules hold for all of them.
struct Checker {
    l: usize,
}

impl Rewarder for Checker {
    type Error = Infallible;
    fn evaluate(&mut self, counts: &[u8]) -> Result<Outcome, Infallible> {
        assert_eq!(counts.len(), self.l);
        assert!(counts.iter().all(|&c| c <= 2), "{counts:?}");
        assert!(passes(counts) >= 1 && passes(counts) <= 2 * self.l);
        Ok(Outcome {
            correct: false,
            reward: (counts[0] as f64) / 3.0,
            margin: 0.0,
        })
    }
}

#[test]
fn paths_follow_the_rules_and_search_is_deterministic() {
    let cfg = MctsConfig {
        simulations: 300,
        ..MctsConfig::default()
    };
    let a = search(5, &cfg, &mut Checker { l: 5 }).unwrap();
    let b = search(5, &cfg, &mut Checker { l: 5 }).unwrap();
    assert_eq!(a, b);
    let c = search(
        5,
        &MctsConfig {
            seed: 99,
            ..cfg.clone()
        },
        &mut Checker { l: 5 },
    )
    .unwrap();
    assert_eq!(c.simulations, 300);
}

/// Correct everywhere; the margin is given per path (the default's otherwise).
struct Margins {
    default_margin: f64,
    by_path: Vec<(Vec<u8>, f64)>,
}

impl Rewarder for Margins {
    type Error = Infallible;
    fn evaluate(&mut self, counts: &[u8]) -> Result<Outcome, Infallible> {
        let m = self.by_path.iter().find(|(p, _)| p == counts).map_or(
            if counts.iter().all(|&c| c == 1) {
                self.default_margin
            } else {
                0.1
            },
            |(_, m)| *m,
        );
        Ok(Outcome {
            correct: true,
            reward: 1.0 / (1.0 + (-m).exp()),
            margin: m,
        })
    }
}

#[test]
fn margin_floor_keeps_only_paths_that_stay_as_sure() {
    let l = 6;
    // every path answers right, but only skipping blocks 2 and 3 keeps the margin
    let safe = path(l, &[(2, 0), (3, 0)]);
    let r = || Margins {
        default_margin: 2.0,
        by_path: vec![(safe.clone(), 2.5)],
    };
    // reference rule: the first 2-shorter correct path stops the search, whichever it is
    let res = search(l, &MctsConfig::default(), &mut r()).unwrap();
    assert!(res.stopped_early);
    assert!(passes(res.kept.as_deref().unwrap()) <= l - 2);
    // margin floor: only the safe path counts; found and kept, then the search stops
    let cfg = MctsConfig {
        margin_floor: true,
        simulations: 400,
        ..MctsConfig::default()
    };
    let res = search(l, &cfg, &mut r()).unwrap();
    assert_eq!(res.kept.as_deref(), Some(&safe[..]));
    assert!(res.stopped_early);
    // nothing as sure as the default: the default path itself is kept, all budget spent
    let mut none = Margins {
        default_margin: 2.0,
        by_path: vec![],
    };
    let cfg = MctsConfig {
        margin_floor: true,
        simulations: 40,
        ..MctsConfig::default()
    };
    let res = search(l, &cfg, &mut none).unwrap();
    assert_eq!(res.kept.as_deref(), Some(&vec![1u8; l][..]));
    assert!(!res.stopped_early);
    assert_eq!(res.simulations, 40);
}

/// A smooth landscape: the gold margin rises by `gain` for each block of `good` that is
/// skipped and falls by `cost` for any other skipped block or any repeat; correct when the
/// margin is positive. The reward is binary or sigmoid(margin).
struct Landscape {
    base: f64,
    good: Vec<usize>,
    gain: f64,
    cost: f64,
    margin_reward: bool,
}

impl Landscape {
    fn margin(&self, counts: &[u8]) -> f64 {
        let mut m = self.base;
        for (b, &c) in counts.iter().enumerate() {
            match c {
                0 if self.good.contains(&b) => m += self.gain,
                0 => m -= self.cost,
                2 => m -= self.cost,
                _ => {}
            }
        }
        m
    }
}

impl Rewarder for Landscape {
    type Error = Infallible;
    fn evaluate(&mut self, counts: &[u8]) -> Result<Outcome, Infallible> {
        let m = self.margin(counts);
        let correct = m > 0.0;
        Ok(Outcome {
            correct,
            reward: if self.margin_reward {
                1.0 / (1.0 + (-m).exp())
            } else {
                f64::from(u8::from(correct))
            },
            margin: m,
        })
    }
}

/// Three blocks whose skips help, spread over L = 30 (a different set per seed).
fn good_blocks(seed: u64) -> Vec<usize> {
    let s = seed as usize;
    let mut g = vec![(s * 7 + 3) % 30, (s * 13 + 11) % 30, (s * 5 + 19) % 30];
    g.sort_unstable();
    g.dedup();
    g
}

/// Wrong by default (margin -1.5); each skip of a good block adds 1, any other skip or repeat
/// costs 2: two good skips answer right, all three is the shortest correct path (a fourth
/// skip breaks it again).
fn three_edit_landscape(good: &[usize], margin_reward: bool) -> Landscape {
    Landscape {
        base: -1.5,
        good: good.to_vec(),
        gain: 1.0,
        cost: 2.0,
        margin_reward,
    }
}

#[test]
fn two_hundred_simulations_reach_paths_three_edits_deep_at_l30() {
    let l = 30;
    let cfg = MctsConfig {
        early_stop: false,
        ..MctsConfig::default()
    };
    assert_eq!(cfg.simulations, 200);
    let mut found = 0;
    let mut tried = 0;
    for seed in 0..12 {
        let good = good_blocks(seed);
        if good.len() < 3 {
            continue;
        }
        tried += 1;
        let target = path(l, &good.iter().map(|&b| (b, 0)).collect::<Vec<_>>());
        let land = three_edit_landscape(&good, true);
        assert!(land.margin(&target) > 0.0);
        assert!(land.margin(&path(l, &[(good[0], 0), (good[1], 0)])) > 0.0);
        assert!(land.margin(&path(l, &[(good[0], 0)])) < 0.0);
        let cfg = MctsConfig {
            seed,
            ..cfg.clone()
        };
        let res = search(l, &cfg, &mut three_edit_landscape(&good, true)).unwrap();
        assert_eq!(res.simulations, 200);
        if res.kept.as_deref() == Some(&target[..]) {
            found += 1;
        }
        // the search before this tree policy (every action of a node expanded, in random
        // order, before descending) spends 89 of its 200 simulations on the root's children
        // and never reaches three edits
        let flat = MctsConfig {
            widening: 1.0,
            amaf: false,
            ..cfg.clone()
        };
        let res = search(l, &flat, &mut three_edit_landscape(&good, true)).unwrap();
        assert_ne!(res.kept.as_deref(), Some(&target[..]), "seed {seed}");
    }
    // the search is stochastic: it must find the three-edit path on most landscapes
    assert!(
        found * 10 >= tried * 8,
        "found the three-edit path on {found} of {tried} landscapes"
    );
}

#[test]
fn binary_and_margin_rewards_keep_different_paths_where_they_should() {
    // on the three-edit landscapes a binary reward is 0 everywhere until two good skips meet
    // by chance: nothing guides the search, and it mostly keeps nothing; the margin reward
    // rises with every good skip and leads to the fix
    let l = 30;
    let cfg = MctsConfig {
        early_stop: false,
        ..MctsConfig::default()
    };
    let (mut differ, mut binary_found, mut tried) = (0, 0, 0);
    for seed in 0..12 {
        let good = good_blocks(seed);
        if good.len() < 3 {
            continue;
        }
        tried += 1;
        let cfg = MctsConfig {
            seed,
            ..cfg.clone()
        };
        let b = search(l, &cfg, &mut three_edit_landscape(&good, false)).unwrap();
        let m = search(l, &cfg, &mut three_edit_landscape(&good, true)).unwrap();
        binary_found += usize::from(b.kept.is_some());
        if b.kept != m.kept {
            differ += 1;
        }
        // a binary search that does find a fix keeps a correct path too
        if let Some(k) = &b.kept {
            assert!(three_edit_landscape(&good, false).margin(k) > 0.0);
        }
    }
    assert!(differ * 10 >= tried * 8, "differ on {differ} of {tried}");
    assert!(
        binary_found * 10 <= tried * 3,
        "binary found {binary_found} of {tried}"
    );
}
