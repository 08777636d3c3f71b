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
    let cfg = MctsConfig {
        simulations: 400,
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
    let cfg = MctsConfig {
        simulations: 300,
        early_stop: false,
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
    assert_eq!(passes(res.kept.as_deref().unwrap()), l - 2);
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
