//! End to end on a tiny model: search with engine rewards (prefix reuse on and off give the
//! same results), features along the kept paths, candle training, export, routed evaluation.

use drllm_engine::router_format::{Sidecar, StorageType};
use drllm_engine::{DeviceChoice, Model, Routers, Session, SessionOptions, Tokenizer};
use drllm_testkit::{write_tiny_model, Family, TinySpec};
use drllm_train::mcts::MctsConfig;
use drllm_train::scoring::Scoring;
use drllm_train::search::{read_results, search_questions, RewardKind, SearchRun};
use drllm_train::tasks::{Example, McScorer, TaskKind};
use drllm_train::train::{train_split, TrainConfig};
use drllm_train::{eval, features};
use std::sync::Arc;

fn questions(n: usize) -> Vec<Example> {
    let words = ["cat", "dog", "the", "is", "a", "of", "and"];
    (0..n)
        .map(|i| {
            let w = |k: usize| words[(i * 7 + k * 3) % words.len()];
            Example {
                id: format!("tiny/validation/q{i}"),
                task: "tiny".into(),
                split: "validation".into(),
                kind: TaskKind::MultipleChoice,
                prompt: format!(
                    "the {} is {} of the {} and {} {}\n A. {}\n B. {}\n C. {}\n D. {}\nAnswer:",
                    w(0),
                    w(1),
                    w(2),
                    w(3),
                    w(4),
                    w(5),
                    w(6),
                    w(0),
                    w(1)
                ),
                choices: vec!["A".into(), "B".into(), "C".into(), "D".into()],
                gold: i % 4,
                answer: ["A", "B", "C", "D"][i % 4].into(),
                texts: vec![
                    format!("{} {} {}", w(5), w(1), w(2)),
                    format!("{} {}", w(6), w(3)),
                    format!("{} {} {}", w(0), w(4), w(6)),
                    format!("{} {}", w(1), w(5)),
                ],
                cont_prompt: format!(
                    "the {} is {} of the {} and {} {}\nAnswer:",
                    w(0),
                    w(1),
                    w(2),
                    w(3),
                    w(4)
                ),
            }
        })
        .collect()
}

fn setup(dir: &std::path::Path) -> (std::path::PathBuf, Arc<Model>, Tokenizer, McScorer, String) {
    let p = dir.join("tiny.gguf");
    let mut spec = TinySpec::default_for(Family::Llama);
    spec.n_layer = 6;
    write_tiny_model(&spec, &p).unwrap();
    let model = Arc::new(Model::load(&p, DeviceChoice::Cpu).unwrap());
    let tok = Tokenizer::load(&p).unwrap();
    // the tiny vocabulary has no " A" pieces: score the option letters by their byte tokens
    let ids: Vec<i32> = ["A", "B", "C", "D", "E"]
        .iter()
        .map(|l| *tok.tokenize(l, false, false).last().unwrap())
        .collect();
    let scorer = McScorer::from_tokens(&["A", "B", "C", "D", "E"], &ids).unwrap();
    let fp = drllm_engine::router_format::base_model_info(&p)
        .unwrap()
        .fingerprint;
    (p, model, tok, scorer, fp)
}

fn session(m: &Arc<Model>) -> Session {
    Session::new(
        m.clone(),
        SessionOptions {
            n_ctx: 512,
            n_threads: 2,
            n_ubatch: 512,
        },
    )
    .unwrap()
}

#[allow(clippy::too_many_arguments)]
fn run(
    reuse: bool,
    scoring: Scoring,
    m: &Arc<Model>,
    tok: &Tokenizer,
    sc: &McScorer,
    fp: &str,
    qs: &[Example],
    out: &std::path::Path,
) {
    let cfg = SearchRun {
        scoring,
        mcts: MctsConfig {
            simulations: 30,
            ..MctsConfig::default()
        },
        reward: RewardKind::Binary,
        prefix_reuse: reuse,
        cache_bytes: 64 << 20,
        shard: (0, 1),
        max_answer_tokens: 8,
    };
    let mut s = session(m);
    search_questions(&mut s, tok, sc, qs, fp, &cfg, out, &mut |_, _, _| {}).unwrap();
}

#[test]
fn prefix_reuse_gives_the_same_results_as_recomputing() {
    for scoring in [Scoring::Continuation, Scoring::Letters] {
        prefix_reuse_case(scoring);
    }
}

fn prefix_reuse_case(scoring: Scoring) {
    let dir = tempfile::tempdir().unwrap();
    let (_p, m, tok, sc, fp) = setup(dir.path());
    let qs = questions(6);
    let a = dir.path().join("reuse.jsonl");
    let b = dir.path().join("scratch.jsonl");
    run(true, scoring, &m, &tok, &sc, &fp, &qs, &a);
    run(false, scoring, &m, &tok, &sc, &fp, &qs, &b);
    let ra = read_results(&a).unwrap();
    let rb = read_results(&b).unwrap();
    assert_eq!(ra.len(), 6);
    for (x, y) in ra.iter().zip(&rb) {
        assert_eq!(x.id, y.id);
        assert_eq!(x.originally_correct, y.originally_correct);
        assert_eq!(x.default_margin, y.default_margin);
        assert_eq!(x.kept, y.kept);
        assert_eq!(x.kept_margin, y.kept_margin);
        assert_eq!(x.simulations, y.simulations);
        assert_eq!(x.work.rollouts, y.work.rollouts);
        // the same rollouts, fewer passes computed
        assert_eq!(
            x.work.passes_run + x.work.passes_reused,
            y.work.passes_run + y.work.passes_reused
        );
    }
    let reused: u64 = ra.iter().map(|r| r.work.passes_reused).sum();
    assert!(reused > 0, "prefix reuse saved nothing");
    // resuming: a second run adds nothing
    run(true, scoring, &m, &tok, &sc, &fp, &qs, &a);
    assert_eq!(read_results(&a).unwrap().len(), 6);
    // sharding: two shards cover the questions once
    let c = dir.path().join("sharded.jsonl");
    for i in 0..2 {
        let cfg = SearchRun {
            mcts: MctsConfig {
                simulations: 5,
                ..MctsConfig::default()
            },
            reward: RewardKind::Binary,
            prefix_reuse: true,
            cache_bytes: 64 << 20,
            shard: (i, 2),
            max_answer_tokens: 8,
            scoring,
        };
        let mut s = session(&m);
        search_questions(&mut s, &tok, &sc, &qs, &fp, &cfg, &c, &mut |_, _, _| {}).unwrap();
    }
    let mut ids: Vec<String> = read_results(&c)
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 6);
}

#[test]
fn search_train_export_eval_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let (p, m, tok, sc, fp) = setup(dir.path());
    let qs = questions(24);
    let out = dir.path().join("search.jsonl");
    run(true, Scoring::Continuation, &m, &tok, &sc, &fp, &qs, &out);
    let records = read_results(&out).unwrap();
    let (chosen, stats) = features::select(&records, m.n_layer(), features::Labels::All, 0.3);
    assert_eq!(stats.records, 24);
    assert!(stats.kept > 0, "{stats:?}");
    let mut s = session(&m);
    let fs = features::build(
        &mut s,
        &tok,
        Scoring::Continuation,
        &qs,
        &chosen,
        8,
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(fs.examples.len(), chosen.len());
    assert_eq!(fs.n_layer, m.n_layer());
    let cfg = TrainConfig {
        epochs: 3,
        hidden: 128,
        ..TrainConfig::default()
    };
    let trained = train_split(&fs, &cfg, &mut |_| {}).unwrap();
    assert_eq!(trained.routers.len(), m.n_layer());
    let base = drllm_engine::router_format::base_model_info(&p).unwrap();
    let sidecar = Sidecar {
        version: drllm_engine::router_format::FORMAT_VERSION,
        base,
        shape: drllm_engine::router_format::RouterShape {
            hidden: 128,
            windows: 8,
        },
        provenance: Default::default(),
        routers: trained.routers,
    };
    let side = dir.path().join("tiny.routers.gguf");
    sidecar.write(&side, StorageType::F32).unwrap();
    let routers = Routers::load(&side, &m).unwrap();
    let mut s = session(&m);
    let report = eval::evaluate(
        &mut s,
        &tok,
        &sc,
        Some(&routers),
        &qs,
        &eval::EvalOptions {
            sweep: vec![-1.0, 1.0],
            max_answer_tokens: 8,
            ..Default::default()
        },
        ("tiny", "tiny", "validation"),
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(report.plain.n, 24);
    assert_eq!(report.plain.mean_passes, m.n_layer() as f64);
    let routed = report.routed.as_ref().unwrap();
    assert_eq!(routed.n, 24);
    assert_eq!(report.sweep.len(), 2);
    // Skipping the judging of paths a question was already judged along changes nothing:
    // judge every arm afresh and compare.
    let mut fresh = session(&m);
    let mut same_as_plain = 0;
    for (ex, q) in qs.iter().zip(&report.questions) {
        let full = drllm_engine::LayerPath::full(m.n_layer());
        let (pc, _) = answer_afresh(&mut fresh, &tok, &sc, ex, drllm_engine::Route::Fixed(&full));
        assert_eq!(pc, q.plain_correct, "{}", ex.id);
        let ro = drllm_engine::RouteOptions::default();
        let mut hook = routers.hook(&ro);
        let (rc, path) = answer_afresh(
            &mut fresh,
            &tok,
            &sc,
            ex,
            drllm_engine::Route::Hook(&mut hook),
        );
        assert_eq!(Some(rc), q.routed_correct, "{}", ex.id);
        let counts: Vec<u8> = path.counts().iter().map(|&c| c as u8).collect();
        assert_eq!(Some(&counts), q.routed_counts.as_ref(), "{}", ex.id);
        same_as_plain += usize::from(path == full);
    }
    eprintln!(
        "{same_as_plain} of {} routed paths are the full path",
        qs.len()
    );
    // Two biases that never skip give the same paths: the second arm is never judged, only
    // looked up. Its count must equal judging every question afresh.
    let mut s = session(&m);
    let again = eval::evaluate(
        &mut s,
        &tok,
        &sc,
        Some(&routers),
        &qs,
        &eval::EvalOptions {
            depth_bias: 50.0,
            sweep: vec![60.0],
            max_answer_tokens: 8,
            ..Default::default()
        },
        ("tiny", "tiny", "validation"),
        &mut |_, _| {},
    )
    .unwrap();
    let mut fresh_correct = 0;
    for ex in &qs {
        let ro = drllm_engine::RouteOptions {
            depth_bias: 60.0,
            ..Default::default()
        };
        let mut hook = routers.hook(&ro);
        let (rc, _) = answer_afresh(
            &mut fresh,
            &tok,
            &sc,
            ex,
            drllm_engine::Route::Hook(&mut hook),
        );
        fresh_correct += usize::from(rc);
    }
    assert_eq!(again.sweep[0].correct, fresh_correct);
    assert_eq!(again.routed.as_ref().unwrap().correct, fresh_correct);
    let files = eval::write_outputs(&report, &dir.path().join("eval")).unwrap();
    assert_eq!(files.len(), 4);
    assert!(eval::markdown(&report).contains("| plain |"));
    let _ = fp;
}

#[test]
fn every_rollout_with_prefix_reuse_equals_recomputing() {
    use drllm_train::mcts::Rewarder;
    use drllm_train::search::{EngineRewarder, PrefixCache};
    let dir = tempfile::tempdir().unwrap();
    let (_p, m, tok, sc, _fp) = setup(dir.path());
    let qs = questions(3);
    let paths: Vec<Vec<u8>> = vec![
        vec![1, 1, 1, 1, 1, 1],
        vec![1, 1, 0, 1, 1, 1],
        vec![1, 1, 1, 1, 0, 1],
        vec![1, 2, 1, 1, 1, 1],
        vec![1, 1, 1, 1, 0, 0],
        vec![1, 1, 0, 2, 1, 1],
        vec![1, 1, 1, 1, 2, 1],
    ];
    for scoring in [Scoring::Continuation, Scoring::Letters] {
        for q in &qs {
            let tokens = tok.tokenize(scoring.prompt(q), true, false);
            let mut outcomes = Vec::new();
            for reuse in [true, false] {
                let mut s = session(&m);
                let mut cache = PrefixCache::new(64 << 20);
                let mut rw = EngineRewarder {
                    session: &mut s,
                    tokens: tokens.clone(),
                    scoring,
                    example: q,
                    scorer: &sc,
                    tokenizer: &tok,
                    reward: RewardKind::Margin,
                    cache: reuse.then_some(&mut cache),
                    save_states: true,
                    max_answer_tokens: 8,
                    work: Default::default(),
                };
                let o: Vec<_> = paths.iter().map(|p| rw.evaluate(p).unwrap()).collect();
                if reuse {
                    assert!(rw.work.passes_reused > 0);
                }
                outcomes.push(o);
            }
            assert_eq!(outcomes[0], outcomes[1], "{scoring:?} {}", q.id);
        }
    }
}

/// A results file remembers its search settings; resuming with other settings is refused,
/// another simulation budget is not.
#[test]
fn search_settings_are_recorded_and_checked() {
    use drllm_train::shards::{check_params, params_path};
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("runs").join("search-x-y.jsonl");
    let p = |mcts: MctsConfig| {
        serde_json::json!({ "task": "x", "split": "y", "mcts": mcts,
                            "reward": RewardKind::Binary, "scoring": Scoring::Continuation })
    };
    let base = MctsConfig::default();
    check_params(&out, &p(base.clone())).unwrap();
    assert!(params_path(&out).exists());
    assert_eq!(
        params_path(&out).file_name().unwrap(),
        "search-x-y.jsonl.params.json"
    );
    check_params(&out, &p(base.clone())).unwrap();
    check_params(
        &out,
        &p(MctsConfig {
            simulations: 200,
            ..base.clone()
        }),
    )
    .unwrap();
    let e = check_params(
        &out,
        &p(MctsConfig {
            margin_floor: true,
            ..base.clone()
        }),
    )
    .unwrap_err();
    assert!(e.to_string().contains("other settings"), "{e}");
    let mut other = p(base);
    other["reward"] = serde_json::json!(RewardKind::Margin);
    assert!(check_params(&out, &other).is_err());
    std::fs::write(params_path(&out), "{not json").unwrap();
    assert!(check_params(&out, &other).is_err());
}

/// One question judged along one route with nothing remembered from earlier arms.
fn answer_afresh(
    s: &mut Session,
    tok: &Tokenizer,
    sc: &McScorer,
    ex: &Example,
    route: drllm_engine::Route<'_>,
) -> (bool, drllm_engine::LayerPath) {
    eval::answer(
        s,
        tok,
        sc,
        Scoring::Continuation,
        ex,
        route,
        8,
        &mut Vec::new(),
    )
    .unwrap()
}

/// The greedy static prune: every candidate's count equals judging its path afresh (no prefix
/// reuse), the chosen block is a best one, and later steps keep the earlier choices. `eval`'s
/// static arms judge the prune's paths like any fixed path.
#[test]
fn static_prune_counts_match_judging_each_path_afresh() {
    use drllm_engine::{LayerPath, Route};
    use drllm_train::prune;
    let dir = tempfile::tempdir().unwrap();
    let (_p, m, tok, sc, _fp) = setup(dir.path());
    let qs = questions(8);
    let n_layer = m.n_layer();
    let mut s = session(&m);
    let mut ticks = 0;
    let r = prune::greedy_prune(
        &mut s,
        &tok,
        &sc,
        Scoring::Continuation,
        &qs,
        2,
        64 << 20,
        &mut |d, t| {
            ticks += 1;
            assert!(d <= t);
        },
    )
    .unwrap();
    assert!(ticks > 0);
    assert_eq!(r.steps.len(), 2);
    assert_eq!(r.ids.len(), qs.len());
    let path_without = |skipped: &[usize]| {
        let counts: Vec<usize> = (0..n_layer)
            .map(|b| usize::from(!skipped.contains(&b)))
            .collect();
        LayerPath::from_counts(&counts).unwrap()
    };
    let afresh = |skipped: &[usize]| {
        let path = path_without(skipped);
        let mut fresh = session(&m);
        qs.iter()
            .filter(|ex| answer_afresh(&mut fresh, &tok, &sc, ex, Route::Fixed(&path)).0)
            .count()
    };
    assert_eq!(r.plain_correct, afresh(&[]));
    let mut before: Vec<usize> = Vec::new();
    for st in &r.steps {
        assert_eq!(st.candidates.len(), n_layer - before.len());
        for c in &st.candidates {
            let mut set = before.clone();
            set.push(c.block);
            assert_eq!(c.correct, afresh(&set), "skip {set:?}");
            assert!(c.mean_margin.is_finite());
        }
        let best = st.candidates.iter().map(|c| c.correct).max().unwrap();
        assert_eq!(st.correct, best);
        assert!(before.iter().all(|b| st.skipped.contains(b)));
        assert!(st.skipped.contains(&st.chosen));
        assert_eq!(st.skipped.len(), before.len() + 1);
        before = st.skipped.clone();
    }
    assert_eq!(r.skip_set(1), Some(&r.steps[0].skipped[..]));
    assert_eq!(r.skip_set(0), None);
    assert_eq!(r.skip_set(3), None);
    assert!(prune::markdown(&r).contains("| 2 |"));
    // the report round-trips through JSON (eval reads it back)
    let back: prune::PruneReport =
        serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
    assert_eq!(back, r);

    // eval's static arms
    let statics: Vec<(String, LayerPath)> = r
        .steps
        .iter()
        .map(|st| (format!("skip {:?}", st.skipped), path_without(&st.skipped)))
        .collect();
    let mut s = session(&m);
    let report = eval::evaluate(
        &mut s,
        &tok,
        &sc,
        None,
        &qs,
        &eval::EvalOptions {
            max_answer_tokens: 8,
            statics: statics.clone(),
            ..Default::default()
        },
        ("tiny", "tiny", "validation"),
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(report.statics.len(), 2);
    assert_eq!(report.static_diffs.len(), 2);
    assert!(report.routed_vs_static.is_empty());
    for (i, (arm, st)) in report.statics.iter().zip(&r.steps).enumerate() {
        assert_eq!(arm.correct, afresh(&st.skipped));
        assert_eq!(arm.mean_passes, (n_layer - st.skipped.len()) as f64);
        let d = report.static_diffs[i].0;
        let expect = (arm.correct as f64 - report.plain.correct as f64) / qs.len() as f64;
        assert!((d - expect).abs() < 1e-12);
        for (q, ex) in report.questions.iter().zip(&qs) {
            let mut fresh = session(&m);
            let (c, _) = answer_afresh(&mut fresh, &tok, &sc, ex, Route::Fixed(&statics[i].1));
            assert_eq!(q.static_correct[i], c);
        }
    }
    assert!(eval::markdown(&report).contains("skip ["));
}

/// The oracle table on a tiny model: every row equals judging each one-edit path afresh
/// (without prefix reuse), the full path's KL is 0, a resumed run adds only new questions, and
/// shards split the questions.
#[test]
fn oracle_rows_equal_judging_each_path_afresh_and_resume() {
    use drllm_train::oracle::{oracle_questions, read_oracle, report, OracleRun};
    use drllm_train::scoring::kl_divergence;
    use drllm_train::search::EngineRewarder;
    let dir = tempfile::tempdir().unwrap();
    let (_p, m, tok, sc, fp) = setup(dir.path());
    let n_layer = m.n_layer();
    let qs = questions(5);
    for scoring in [Scoring::Continuation, Scoring::Letters] {
        let out = dir.path().join(format!("oracle-{scoring:?}.jsonl"));
        let run = OracleRun {
            scoring,
            cache_bytes: 64 << 20,
            shard: (0, 1),
            repeats: true,
        };
        let mut s = session(&m);
        let first = oracle_questions(
            &mut s,
            &tok,
            &sc,
            &qs[..3],
            &fp,
            &run,
            &out,
            &mut |_, _, _| {},
        )
        .unwrap();
        assert_eq!((first.done, first.resumed), (3, 0));
        // the full path runs once; each skip of block k resumes after k passes, each repeat
        // after k + 1, except for the last block's (a resume leaves at least one pass to run,
        // and the full path keeps no state after its last pass): one pass less each
        let reused: u64 = (0..n_layer as u64).map(|k| 2 * k + 1).sum::<u64>() - 2;
        assert_eq!(first.work.passes_reused, 3 * reused);
        let again =
            oracle_questions(&mut s, &tok, &sc, &qs, &fp, &run, &out, &mut |_, _, _| {}).unwrap();
        assert_eq!((again.done, again.resumed), (2, 3));
        let rows = read_oracle(&out).unwrap();
        assert_eq!(rows.len(), 5);
        for (r, q) in rows.iter().zip(&qs) {
            assert_eq!(r.id, q.id);
            assert_eq!((r.skip.len(), r.repeat.len()), (n_layer, n_layer));
            assert_eq!(r.full.kl, 0.0);
            // afresh: no cache, a new session
            let tokens = tok.tokenize(scoring.prompt(q), true, false);
            let mut fresh = session(&m);
            let mut rw = EngineRewarder {
                session: &mut fresh,
                tokens,
                scoring,
                example: q,
                scorer: &sc,
                tokenizer: &tok,
                reward: RewardKind::Binary,
                cache: None,
                save_states: false,
                max_answer_tokens: 1,
                work: Default::default(),
            };
            // a fresh session's graphs may round the last digit differently
            let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * (1.0 + a.abs());
            let full = rw.judge_path(&vec![1; n_layer]).unwrap();
            assert!(
                full.scores
                    .iter()
                    .zip(&r.full_scores)
                    .all(|(a, b)| close(*a, *b)),
                "{scoring:?} {}",
                q.id
            );
            for k in 0..n_layer {
                for (c, probe) in [(0u8, &r.skip[k]), (2u8, &r.repeat[k])] {
                    let mut counts = vec![1u8; n_layer];
                    counts[k] = c;
                    let j = rw.judge_path(&counts).unwrap();
                    assert_eq!(
                        (j.correct, j.choice),
                        (probe.correct, Some(probe.choice)),
                        "{scoring:?} {} block {k} x{c}",
                        q.id
                    );
                    assert!(
                        close(j.margin, probe.margin),
                        "{} vs {}",
                        j.margin,
                        probe.margin
                    );
                    let kl = kl_divergence(&full.scores, &j.scores);
                    assert!(close(probe.kl, kl), "{} vs {kl}", probe.kl);
                }
            }
        }
        let rep = report(&rows, 0.05).unwrap();
        assert_eq!(rep.questions, 5);
        assert!(rep.oracle_one_saved_accuracy >= rep.best_static_skip.1);
        // another shard of the same file: nothing left to do for shard 1/2's questions
        let run2 = OracleRun {
            shard: (1, 2),
            ..run.clone()
        };
        let s2 =
            oracle_questions(&mut s, &tok, &sc, &qs, &fp, &run2, &out, &mut |_, _, _| {}).unwrap();
        assert_eq!((s2.done, s2.resumed), (0, 2));
        // without repeats: the same skips, no repeat columns
        let out3 = dir.path().join(format!("oracle-{scoring:?}-skips.jsonl"));
        let run3 = OracleRun {
            repeats: false,
            ..run.clone()
        };
        oracle_questions(
            &mut s,
            &tok,
            &sc,
            &qs[..2],
            &fp,
            &run3,
            &out3,
            &mut |_, _, _| {},
        )
        .unwrap();
        let skips = read_oracle(&out3).unwrap();
        for (a, b) in skips.iter().zip(&rows) {
            assert!(a.repeat.is_empty());
            assert_eq!(
                a.skip
                    .iter()
                    .map(|p| (p.correct, p.choice))
                    .collect::<Vec<_>>(),
                b.skip
                    .iter()
                    .map(|p| (p.correct, p.choice))
                    .collect::<Vec<_>>()
            );
        }
        let r3 = report(&skips, 0.05).unwrap();
        assert_eq!(r3.oracle_one_repeat_accuracy, None);
        assert!(rep.oracle_one_repeat_accuracy.is_some());
    }
}

/// The predictability test end to end on a tiny model: features along the full path, labels
/// from the oracle table, cross-fitted routers, one AUC row per block; with labels that follow
/// the inputs (a planted signal) the AUC is high.
#[test]
fn predictability_finds_a_planted_signal_and_not_noise() {
    use drllm_train::features::{build_paths, PathItem};
    use drllm_train::predict::{block_aucs, cross_fitted_logits};
    let dir = tempfile::tempdir().unwrap();
    let (_p, m, tok, _sc, _fp) = setup(dir.path());
    let n_layer = m.n_layer();
    // questions(n) repeats its texts every 7: make each prompt different
    let words = ["cat", "dog", "the", "is", "a", "of", "and"];
    let mut qs = questions(60);
    for (i, q) in qs.iter_mut().enumerate() {
        q.cont_prompt = format!(
            "{} {} {} {}",
            words[i % 7],
            words[(i / 7) % 7],
            words[(i * 3 + 1) % 7],
            q.cont_prompt
        );
    }
    let items: Vec<PathItem> = qs
        .iter()
        .map(|q| PathItem {
            id: q.id.clone(),
            counts: vec![1; n_layer],
            labels: vec![1; n_layer],
        })
        .collect();
    let mut s = session(&m);
    let mut fs = build_paths(
        &mut s,
        &tok,
        Scoring::Continuation,
        &qs,
        &items,
        8,
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(fs.examples.len(), 60);
    // planted: block 2's skip is safe exactly when the first input dimension entering it is
    // above its median; every other block's label is a coin flip
    // (the mean over windows: the prompts all begin alike, so the first window is the same)
    let d = fs.d;
    let x: Vec<f32> = fs
        .examples
        .iter()
        .map(|e| (0..e.n_windows).map(|w| e.pooled[2][w * d]).sum::<f32>() / e.n_windows as f32)
        .collect();
    let mut sorted = x.clone();
    sorted.sort_by(f32::total_cmp);
    let median = sorted[sorted.len() / 2];
    let mut rng = drllm_router_format::rng::SplitMix64(5);
    for (e, &v) in fs.examples.iter_mut().zip(&x) {
        e.labels = (0..n_layer)
            .map(|b| {
                if b == 2 {
                    u8::from(v < median)
                } else {
                    u8::from(rng.unit() < 0.5)
                }
            })
            .collect();
    }
    let labels: Vec<Vec<u8>> = fs.examples.iter().map(|e| e.labels.clone()).collect();
    let cfg = TrainConfig {
        epochs: 30,
        standardize: true,
        ..TrainConfig::default()
    };
    let mut folds_done = 0;
    let logits = cross_fitted_logits(&fs, &cfg, 5, &mut |d, _| folds_done = d).unwrap();
    assert_eq!(folds_done, 5);
    let p = block_aucs(&logits, &labels, 5, 0.05, 500, 0);
    assert_eq!(p.blocks.len(), n_layer);
    assert_eq!(p.testable, n_layer, "{p:?}");
    let planted = &p.blocks[2];
    assert!(planted.auc.unwrap() > 0.8, "{planted:?}");
    assert!(planted.signal());
    let noise_signal = p
        .blocks
        .iter()
        .filter(|b| b.block != 2 && b.signal())
        .count();
    assert!(noise_signal <= 1, "{p:?}");
}
