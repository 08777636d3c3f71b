//! Tests of router training (`drllm_train::train`): loss, weights and schedule by hand,
//! training on a separable synthetic set, candle against the engine's router code, the
//! feature file format and determinism.

use std::time::Instant;

use candle_core::{Device, Tensor};
use drllm_router_format::{gelu_tanh, BlockRouter, Decision};
use drllm_train::train::{
    candle_decisions, candle_logits, class_weights, focal_loss, gelu_tanh_tensor, lr_at, macro_f1,
    macro_recall, parse_device, split_ids, train, train_split, ClassStats, EpochReport,
    ExampleFeatures, FeatureSet, TrainConfig, TrainError, Trained, FEATURE_MAGIC,
};

use drllm_router_format::rng::SplitMix64 as Rng;

/// `n` examples, `l` blocks, hidden size `d`: labels 15% skip, 70% execute, 15% repeat
/// (per block, independently), 1 to 8 windows per example, each window mean drawn from
/// `N(mu[block][label], noise^2 I)` with `mu` standard normal per dimension.
fn synth(n: usize, d: usize, l: usize, noise: f32, seed: u64) -> FeatureSet {
    let mut rng = Rng(seed);
    let mu: Vec<Vec<Vec<f32>>> = (0..l)
        .map(|_| {
            (0..3)
                .map(|_| (0..d).map(|_| rng.normal()).collect())
                .collect()
        })
        .collect();
    let examples = (0..n)
        .map(|i| {
            let n_windows = 1 + (rng.next_u64() % 8) as usize;
            let labels: Vec<u8> = (0..l)
                .map(|_| {
                    let u = rng.unit();
                    if u < 0.15 {
                        0
                    } else if u < 0.85 {
                        1
                    } else {
                        2
                    }
                })
                .collect();
            let pooled = labels
                .iter()
                .enumerate()
                .map(|(b, &y)| {
                    (0..n_windows * d)
                        .map(|k| mu[b][usize::from(y)][k % d] + noise * rng.normal())
                        .collect()
                })
                .collect();
            ExampleFeatures {
                id: format!("ex{i}"),
                n_windows,
                pooled,
                labels,
            }
        })
        .collect();
    FeatureSet {
        d,
        n_layer: l,
        max_windows: 8,
        examples,
    }
}

fn scalar(t: &Tensor) -> f32 {
    t.to_scalar::<f32>().expect("scalar")
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol
}

// ---------------------------------------------------------------------------------------
// 1. Focal loss and class weights by hand

/// Three rows, alpha = [2.0, 0.5, 1.0]:
/// - row 0: logits [0, 0, 0], target 1: p = [1/3, 1/3, 1/3], p_y = 1/3,
///   log p_y = -ln 3 = -1.0986123, (1 - p_y)^2 = (2/3)^2 = 4/9, alpha_y = 0.5;
/// - row 1: logits [ln 2, 0, 0], target 0: exp = [2, 1, 1], p = [1/2, 1/4, 1/4], p_y = 1/2,
///   log p_y = -ln 2 = -0.6931472, (1 - p_y)^2 = 1/4, alpha_y = 2;
/// - row 2: logits [ln 2, 0, 0], target 2: p_y = 1/4, log p_y = -ln 4 = -1.3862944,
///   (1 - p_y)^2 = 9/16, alpha_y = 1.
///
/// gamma = 0 (weighted cross-entropy, plain mean over rows):
///   (0.5 ln 3 + 2 ln 2 + ln 4) / 3 = (0.5493061 + 1.3862944 + 1.3862944) / 3 = 1.1072983.
/// gamma = 2:
///   (0.5 * 4/9 * ln 3 + 2 * 1/4 * ln 2 + 9/16 * ln 4) / 3
///   = (0.2441361 + 0.3465736 + 0.7797906) / 3 = 0.4568334.
#[test]
fn focal_loss_matches_hand_computed_values() {
    let dev = Device::Cpu;
    let ln2 = std::f32::consts::LN_2;
    let logits =
        Tensor::new(&[[0f32, 0., 0.], [ln2, 0., 0.], [ln2, 0., 0.]], &dev).expect("logits");
    let targets = Tensor::new(&[1u32, 0, 2], &dev).expect("targets");
    let alpha = [2.0f32, 0.5, 1.0];

    let g0 = scalar(&focal_loss(&logits, &targets, &alpha, 0.0).expect("gamma 0"));
    assert!(close(f64::from(g0), 1.107_298_3, 1e-5), "gamma 0: {g0}");
    let g2 = scalar(&focal_loss(&logits, &targets, &alpha, 2.0).expect("gamma 2"));
    assert!(close(f64::from(g2), 0.456_833_4, 1e-5), "gamma 2: {g2}");

    // gamma = 1 takes its own branch: (0.5 * 2/3 ln 3 + 2 * 1/2 ln 2 + 3/4 ln 4) / 3.
    let g1 = scalar(&focal_loss(&logits, &targets, &alpha, 1.0).expect("gamma 1"));
    let want1 = (0.5 * 2.0 / 3.0 * 3f64.ln() + 2.0 * 0.5 * 2f64.ln() + 0.75 * 4f64.ln()) / 3.0;
    assert!(
        close(f64::from(g1), want1, 1e-5),
        "gamma 1: {g1} vs {want1}"
    );
    // A non-integer gamma goes through powf: gamma 0.5.
    let gh = scalar(&focal_loss(&logits, &targets, &alpha, 0.5).expect("gamma 0.5"));
    let wanth = (0.5 * (2f64 / 3.0).sqrt() * 3f64.ln()
        + 2.0 * 0.5f64.sqrt() * 2f64.ln()
        + 0.75f64.sqrt() * 4f64.ln())
        / 3.0;
    assert!(
        close(f64::from(gh), wanth, 1e-5),
        "gamma 0.5: {gh} vs {wanth}"
    );

    // gamma 0 with unit weights is candle's cross-entropy.
    let ce = scalar(&candle_nn::loss::cross_entropy(&logits, &targets).expect("ce"));
    let g0u = scalar(&focal_loss(&logits, &targets, &[1.0; 3], 0.0).expect("unit"));
    assert!((ce - g0u).abs() < 1e-6, "{ce} vs {g0u}");
}

#[test]
fn focal_loss_rejects_bad_arguments() {
    let dev = Device::Cpu;
    let logits = Tensor::zeros((2, 3), candle_core::DType::F32, &dev).expect("zeros");
    let ok = Tensor::new(&[0u32, 2], &dev).expect("t");
    let too_big = Tensor::new(&[0u32, 3], &dev).expect("t");
    let short = Tensor::new(&[0u32], &dev).expect("t");
    let wide = Tensor::zeros((2, 4), candle_core::DType::F32, &dev).expect("zeros");
    assert!(focal_loss(&logits, &ok, &[1.0; 3], 2.0).is_ok());
    assert!(focal_loss(&logits, &too_big, &[1.0; 3], 2.0).is_err());
    assert!(focal_loss(&logits, &short, &[1.0; 3], 2.0).is_err());
    assert!(focal_loss(&wide, &ok, &[1.0; 3], 2.0).is_err());
    assert!(focal_loss(&logits, &ok, &[1.0; 3], -1.0).is_err());
    assert!(focal_loss(&logits, &ok, &[f32::NAN, 1.0, 1.0], 2.0).is_err());
}

#[test]
fn focal_loss_gradient_is_finite_for_confident_rows() {
    // p_y rounds to 1: (1 - p)^gamma has an infinite slope at 0 for gamma < 1.
    let dev = Device::Cpu;
    for gamma in [0.5f32, 1.0, 2.0] {
        let v = candle_core::Var::new(&[[100f32, 0., 0.], [0., 0., 0.]], &dev).expect("var");
        let targets = Tensor::new(&[0u32, 1], &dev).expect("t");
        let loss = focal_loss(v.as_tensor(), &targets, &[1.0; 3], gamma).expect("loss");
        let grads = loss.backward().expect("backward");
        let g = grads.get(v.as_tensor()).expect("grad");
        let g: Vec<f32> = g.flatten_all().and_then(|t| t.to_vec1()).expect("vec");
        assert!(g.iter().all(|x| x.is_finite()), "gamma {gamma}: {g:?}");
    }
}

/// counts [10, 1000, 5], beta 0.999: effective numbers E_n = (1 - 0.999^n) / 0.001:
/// E_10 = (1 - 0.9900449) / 0.001 = 9.955120, E_1000 = (1 - 0.3676954) / 0.001 = 632.3046,
/// E_5 = (1 - 0.9950100) / 0.001 = 4.990010; raw weights 1 / E = [0.1004508, 0.0015815,
/// 0.2004004], sum 0.3024327; times 3 / sum: [0.9964281, 0.0156879, 1.9878840].
#[test]
fn class_weights_match_hand_computed_values() {
    let w = class_weights([10, 1000, 5], 0.999);
    let want = [0.996_428_1, 0.015_687_9, 1.987_884];
    for c in 0..3 {
        assert!(close(f64::from(w[c]), want[c], 1e-4), "{w:?} vs {want:?}");
    }
    assert!(close(w.iter().map(|&x| f64::from(x)).sum(), 3.0, 1e-5));

    // A class without samples gets 0; the others still sum to 3:
    // E_40 = 39.22, E_10 = 9.955; raw [0, 0.025497, 0.100451] -> [0, 0.6072057, 2.3927943].
    let w = class_weights([0, 40, 10], 0.999);
    assert_eq!(w[0], 0.0);
    assert!(close(f64::from(w[1]), 0.607_205_7, 1e-4), "{w:?}");
    assert!(close(f64::from(w[2]), 2.392_794_3, 1e-4), "{w:?}");

    // No samples at all: nothing to weigh.
    assert_eq!(class_weights([0, 0, 0], 0.999), [0.0; 3]);
    // beta 0: every present class weighs the same.
    assert_eq!(class_weights([3, 300, 0], 0.0), [1.5, 1.5, 0.0]);
    // Equal counts: equal weights.
    let w = class_weights([7, 7, 7], 0.999);
    assert!(w.iter().all(|&x| (x - 1.0).abs() < 1e-6), "{w:?}");
}

#[test]
fn candle_gelu_is_the_tanh_approximation_of_the_engine() {
    let xs: Vec<f32> = (-400..=400).map(|i| i as f32 * 0.025).collect();
    let t = Tensor::new(xs.as_slice(), &Device::Cpu).expect("t");
    // candle's own op (the tanh approximation) and the composed ops the router graph uses.
    let builtin: Vec<f32> = t.gelu().and_then(|g| g.to_vec1()).expect("gelu");
    let composed: Vec<f32> = gelu_tanh_tensor(&t)
        .expect("gelu ops")
        .to_vec1()
        .expect("vec");
    for ((x, a), b) in xs.iter().zip(&builtin).zip(&composed) {
        let want = gelu_tanh(*x);
        for (name, y) in [("Tensor::gelu", a), ("gelu_tanh_tensor", b)] {
            assert!(
                (y - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "{name}({x}) = {y}, engine {want}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// 2. Schedule

#[test]
fn lr_warms_up_linearly_then_decays_by_cosine() {
    let base = 1e-3;
    let (total, warmup) = (100, 10);
    // Warmup: base * (t + 1) / warmup.
    assert!(close(lr_at(0, total, warmup, base), 1e-4, 1e-12));
    assert!(close(lr_at(4, total, warmup, base), 5e-4, 1e-12));
    assert!(close(lr_at(9, total, warmup, base), base, 1e-12));
    for t in 1..warmup {
        assert!(lr_at(t, total, warmup, base) > lr_at(t - 1, total, warmup, base));
    }
    // Cosine: base at the first step after warmup, base / 2 halfway, ~0 at the end.
    assert!(close(lr_at(10, total, warmup, base), base, 1e-12));
    assert!(close(lr_at(55, total, warmup, base), base / 2.0, 1e-12));
    let last = lr_at(99, total, warmup, base);
    assert!(last > 0.0 && last < base * 1e-3, "{last}");
    for t in warmup + 1..total {
        assert!(lr_at(t, total, warmup, base) <= lr_at(t - 1, total, warmup, base));
    }
    assert_eq!(lr_at(100, total, warmup, base), 0.0);
    // No warmup: starts at base.
    assert!(close(lr_at(0, total, 0, base), base, 1e-12));
    // All warmup.
    assert!(close(lr_at(99, total, total, base), base, 1e-12));
}

// ---------------------------------------------------------------------------------------
// 3. and 4. Training on a separable set, candle against the engine's router code

fn quick_cfg(seed: u64) -> TrainConfig {
    TrainConfig {
        hidden: 32,
        seed,
        ..TrainConfig::default()
    }
}

fn train_synth(seed: u64) -> (FeatureSet, Trained, Vec<usize>, Vec<usize>) {
    let fs = synth(200, 16, 4, 1.0, 42);
    let cfg = quick_cfg(seed);
    let (tr, va) = split_ids(fs.examples.len(), cfg.val_frac, cfg.seed);
    let mut seen = Vec::new();
    let trained = train(&fs, &cfg, &tr, &va, &mut |r: &EpochReport| {
        seen.push(r.epoch)
    })
    .expect("training");
    assert_eq!(seen, (1..=cfg.epochs).collect::<Vec<_>>());
    (fs, trained, tr, va)
}

#[test]
fn training_drives_the_loss_down_on_a_separable_set() {
    let (fs, trained, _, va) = train_synth(7);
    let counts = fs.class_counts();
    assert!(
        counts[1] > 3 * counts[0] && counts[1] > 3 * counts[2],
        "{counts:?}"
    );
    let h = &trained.history;
    for r in h {
        eprintln!(
            "epoch {:2} lr {:.2e} train {:.4} val {:.4} acc {:.3} recall {:.2}/{:.2}/{:.2}",
            r.epoch,
            r.lr,
            r.train_loss,
            r.val_loss,
            r.val_accuracy,
            r.val_per_class[0].recall,
            r.val_per_class[1].recall,
            r.val_per_class[2].recall
        );
    }
    let first = h[0].train_loss;
    let last = h[h.len() - 1].train_loss;
    assert!(last < 0.2 * first, "train loss {first} -> {last}");
    let best = &h[trained.best_epoch - 1];
    assert_eq!(best.epoch, trained.best_epoch);
    assert!(best.val_accuracy > 0.9, "{best:?}");
    for c in 0..3 {
        assert!(best.val_per_class[c].support > 0);
        assert!(best.val_per_class[c].recall > 0.8, "class {c}: {best:?}");
    }
    // The kept epoch has the best macro-F1 (ties: lower val loss).
    for r in h {
        let (m, mb) = (macro_f1(&r.val_per_class), macro_f1(&best.val_per_class));
        assert!(m < mb || (m == mb && r.val_loss >= best.val_loss), "{r:?}");
    }
    // The kept routers reproduce the kept epoch's validation accuracy.
    let dec = candle_decisions(&trained.routers, &fs, "cpu").expect("decisions");
    let (mut right, mut total) = (0usize, 0usize);
    for &i in &va {
        for (b, &y) in fs.examples[i].labels.iter().enumerate() {
            right += usize::from(dec[i][b] == y);
            total += 1;
        }
    }
    assert!(
        close(right as f64 / total as f64, best.val_accuracy, 1e-12),
        "{right}/{total} vs {}",
        best.val_accuracy
    );
}

#[test]
fn candle_and_engine_router_code_agree() {
    let (fs, trained, _, _) = train_synth(11);
    let dec = candle_decisions(&trained.routers, &fs, "cpu").expect("decisions");
    let logits = candle_logits(&trained.routers, &fs, "cpu").expect("logits");
    assert_eq!(dec.len(), fs.examples.len());
    let mut worst = 0f32;
    let mut n = 0;
    for (i, ex) in fs.examples.iter().enumerate() {
        assert_eq!(dec[i].len(), fs.n_layer);
        for (b, router) in trained.routers.iter().enumerate() {
            let engine = router.route(&ex.pooled[b], fs.d);
            for c in 0..3 {
                worst = worst.max((engine[c] - logits[i][b][c]).abs());
            }
            let want = Decision::from_logits(&engine).class() as u8;
            assert_eq!(dec[i][b], want, "example {i} block {b}: {engine:?}");
            n += 1;
        }
    }
    eprintln!("{n} decisions equal; largest logit difference {worst:e}");
    assert!(worst < 1e-4, "{worst}");
    // The routers are in the engine's layout.
    for r in &trained.routers {
        assert_eq!((r.d(), r.hidden()), (16, 32));
    }
}

// ---------------------------------------------------------------------------------------
// 5. Feature files

#[test]
fn feature_set_round_trips_and_bad_files_are_rejected() {
    let fs = synth(12, 8, 3, 1.0, 3);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("features.bin");
    fs.save(&path).expect("save");
    let back = FeatureSet::load(&path).expect("load");
    assert_eq!(back, fs);
    // Only the final file is left (the temporary was renamed).
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .expect("dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");

    let bytes = std::fs::read(&path).expect("read");
    let bad = dir.path().join("bad.bin");
    let expect_bad = |data: &[u8], what: &str| {
        std::fs::write(&bad, data).expect("write");
        match FeatureSet::load(&bad) {
            Err(TrainError::BadFile { reason, .. }) => eprintln!("{what}: {reason}"),
            other => panic!("{what}: {other:?}"),
        }
    };
    // Truncated anywhere: in the header, in an id, in the floats, one byte short.
    for cut in [0, 5, 12, 30, 44, 50, bytes.len() / 2, bytes.len() - 1] {
        expect_bad(&bytes[..cut], &format!("truncated at {cut}"));
    }
    // Extra bytes.
    let mut long = bytes.clone();
    long.extend_from_slice(&[0, 0, 0, 0]);
    expect_bad(&long, "trailing bytes");
    // Wrong magic, wrong version.
    let mut m = bytes.clone();
    m[0] = b'X';
    expect_bad(&m, "magic");
    assert_eq!(&bytes[..8], &FEATURE_MAGIC);
    let mut v = bytes.clone();
    v[8] = 9;
    expect_bad(&v, "version");
    // Sizes out of range or larger than the file: no huge allocation, an error.
    let put = |at: usize, val: u64| {
        let mut b = bytes.clone();
        b[at..at + 8].copy_from_slice(&val.to_le_bytes());
        b
    };
    expect_bad(&put(12, 0), "d = 0");
    expect_bad(&put(12, u64::MAX), "huge d");
    expect_bad(&put(20, 1 << 40), "huge n_layer");
    expect_bad(&put(28, 1000), "huge max_windows");
    expect_bad(&put(36, u64::MAX), "huge n_examples");
    expect_bad(&put(36, 13), "one example too many");
    // The first example's id length and window count.
    let mut b = bytes.clone();
    b[44..48].copy_from_slice(&u32::MAX.to_le_bytes());
    expect_bad(&b, "huge id");
    let id_len = u32::from_le_bytes([bytes[44], bytes[45], bytes[46], bytes[47]]) as usize;
    let nw_at = 48 + id_len;
    let mut b = bytes.clone();
    b[nw_at..nw_at + 4].copy_from_slice(&0u32.to_le_bytes());
    expect_bad(&b, "zero windows");
    let mut b = bytes.clone();
    b[nw_at..nw_at + 4].copy_from_slice(&9u32.to_le_bytes());
    expect_bad(&b, "too many windows");
    // A label of 3 and a NaN value fail validation.
    let mut b = bytes.clone();
    b[nw_at + 4] = 3;
    expect_bad(&b, "label 3");
    let mut b = bytes.clone();
    let f_at = nw_at + 4 + fs.n_layer;
    b[f_at..f_at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    expect_bad(&b, "NaN");
    // A missing file is an I/O error.
    assert!(matches!(
        FeatureSet::load(&dir.path().join("missing.bin")),
        Err(TrainError::Io { .. })
    ));
    // An empty set round-trips too.
    let empty = FeatureSet {
        examples: Vec::new(),
        ..fs.clone()
    };
    empty.save(&path).expect("save empty");
    assert_eq!(FeatureSet::load(&path).expect("load empty"), empty);
}

#[test]
fn validate_rejects_inconsistent_sets() {
    let fs = synth(4, 8, 3, 1.0, 5);
    assert!(fs.validate().is_ok());
    let mut b = fs.clone();
    b.examples[1].labels[2] = 3;
    assert!(matches!(b.validate(), Err(TrainError::InvalidFeatures(_))));
    let mut b = fs.clone();
    b.examples[0].pooled[1][0] = f32::INFINITY;
    assert!(b.validate().is_err());
    let mut b = fs.clone();
    b.examples[2].pooled[0].pop();
    assert!(b.validate().is_err());
    let mut b = fs.clone();
    b.examples[3].labels.pop();
    assert!(b.validate().is_err());
    let mut b = fs.clone();
    b.examples[0].n_windows = 9;
    assert!(b.validate().is_err());
    let mut b = fs.clone();
    b.d = 0;
    assert!(b.validate().is_err());
    // Saving validates first.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut b = fs.clone();
    b.examples[0].labels[0] = 7;
    assert!(b.save(&dir.path().join("x.bin")).is_err());
    assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 0);
    // Sets the file format cannot hold are refused by save.
    let mut b = fs.clone();
    b.max_windows = 100;
    assert!(matches!(
        b.save(&dir.path().join("x.bin")),
        Err(TrainError::InvalidFeatures(_))
    ));
    let mut b = fs.clone();
    b.examples[0].id = "x".repeat(70_000);
    assert!(b.save(&dir.path().join("x.bin")).is_err());
    assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 0);
}

// ---------------------------------------------------------------------------------------
// 6. Determinism, splits, argument errors

#[test]
fn same_seed_gives_the_same_weights() {
    let fs = synth(60, 8, 3, 0.5, 9);
    let cfg = TrainConfig {
        epochs: 3,
        hidden: 16,
        seed: 5,
        ..TrainConfig::default()
    };
    let a = train_split(&fs, &cfg, &mut |_| {}).expect("a");
    let b = train_split(&fs, &cfg, &mut |_| {}).expect("b");
    assert_eq!(a.routers, b.routers);
    assert_eq!(a.history, b.history);
    assert_eq!(a.best_epoch, b.best_epoch);
    let c = train_split(
        &fs,
        &TrainConfig {
            seed: 6,
            ..cfg.clone()
        },
        &mut |_| {},
    )
    .expect("c");
    assert_ne!(a.routers, c.routers);
}

#[test]
fn split_is_deterministic_and_disjoint() {
    let (tr, va) = split_ids(100, 0.15, 1);
    assert_eq!((tr.len(), va.len()), (85, 15));
    assert_eq!(split_ids(100, 0.15, 1), (tr.clone(), va.clone()));
    let mut all: Vec<usize> = tr.iter().chain(&va).copied().collect();
    all.sort_unstable();
    assert_eq!(all, (0..100).collect::<Vec<_>>());
    assert_ne!(split_ids(100, 0.15, 2).1, va);
    assert_eq!(split_ids(3, 0.01, 0).1.len(), 1);
    assert_eq!(split_ids(1, 0.5, 0), (vec![0], vec![]));
    assert_eq!(split_ids(10, 0.0, 0).1.len(), 0);
}

#[test]
fn training_without_validation_still_keeps_an_epoch() {
    let fs = synth(20, 8, 2, 0.5, 1);
    let cfg = TrainConfig {
        epochs: 2,
        hidden: 8,
        val_frac: 0.0,
        ..TrainConfig::default()
    };
    let t = train_split(&fs, &cfg, &mut |_| {}).expect("train");
    assert_eq!(t.history.len(), 2);
    assert!((1..=2).contains(&t.best_epoch));
    assert_eq!(t.routers.len(), 2);
    assert_eq!(t.history[0].val_loss, 0.0);
}

#[test]
fn bad_arguments_are_errors() {
    let fs = synth(10, 8, 2, 0.5, 1);
    let cfg = TrainConfig {
        epochs: 1,
        hidden: 8,
        ..TrainConfig::default()
    };
    let mut nop = |_: &EpochReport| {};
    assert!(matches!(
        train(&fs, &cfg, &[], &[1], &mut nop),
        Err(TrainError::InvalidInput(_))
    ));
    assert!(matches!(
        train(&fs, &cfg, &[0, 10], &[1], &mut nop),
        Err(TrainError::InvalidInput(_))
    ));
    for bad in [
        TrainConfig {
            epochs: 0,
            ..cfg.clone()
        },
        TrainConfig {
            lr: f64::NAN,
            ..cfg.clone()
        },
        TrainConfig {
            batch_size: 0,
            ..cfg.clone()
        },
        TrainConfig {
            beta: 1.0,
            ..cfg.clone()
        },
        TrainConfig {
            hidden: 0,
            ..cfg.clone()
        },
    ] {
        assert!(matches!(
            train_split(&fs, &bad, &mut nop),
            Err(TrainError::InvalidConfig(_))
        ));
    }
    let tpu = TrainConfig {
        device: "tpu".into(),
        ..cfg.clone()
    };
    assert!(matches!(
        train_split(&fs, &tpu, &mut nop),
        Err(TrainError::Device(_))
    ));
    if !cfg!(feature = "cuda") {
        let e = parse_device("cuda").expect_err("no cuda in this build");
        assert!(e.to_string().contains("--features cuda"), "{e}");
    }
    // Routers that do not fit the features.
    let routers = vec![BlockRouter::xavier(8, 4, 0)];
    assert!(candle_decisions(&routers, &fs, "cpu").is_err());
    let routers = vec![BlockRouter::xavier(7, 4, 0), BlockRouter::xavier(7, 4, 1)];
    assert!(candle_decisions(&routers, &fs, "cpu").is_err());
}

#[test]
fn config_round_trips_through_json() {
    let cfg = TrainConfig::default();
    assert_eq!(
        (cfg.epochs, cfg.batch_size, cfg.hidden),
        (20, 16, 128),
        "defaults"
    );
    let s = serde_json::to_string(&cfg).expect("json");
    let back: TrainConfig = serde_json::from_str(&s).expect("parse");
    assert_eq!(back, cfg);
    // Missing fields take the defaults.
    let partial: TrainConfig = serde_json::from_str(r#"{"epochs": 3}"#).expect("partial");
    assert_eq!(partial.epochs, 3);
    assert_eq!(partial.lr, 1e-3);
}

// ---------------------------------------------------------------------------------------
// Timing (ignored by default):
// cargo test --release -p drllm-train --test train_tests -- --ignored --nocapture

#[test]
#[ignore]
fn time_smollm2_sized_training() {
    let (d, l, n) = (576, 30, 500);
    let mut rng = Rng(1);
    let examples = (0..n)
        .map(|i| ExampleFeatures {
            id: format!("ex{i}"),
            n_windows: 8,
            pooled: (0..l)
                .map(|_| (0..8 * d).map(|_| rng.normal()).collect())
                .collect(),
            labels: (0..l)
                .map(|_| {
                    let u = rng.unit();
                    if u < 0.05 {
                        0
                    } else if u < 0.97 {
                        1
                    } else {
                        2
                    }
                })
                .collect(),
        })
        .collect();
    let fs = FeatureSet {
        d,
        n_layer: l,
        max_windows: 8,
        examples,
    };
    let device = std::env::var("DRLLM_TRAIN_DEVICE").unwrap_or_else(|_| "cpu".into());
    let cfg = TrainConfig {
        device,
        ..TrainConfig::default()
    };
    let t0 = Instant::now();
    let mut last = t0;
    let trained = train_split(&fs, &cfg, &mut |r| {
        let now = Instant::now();
        eprintln!(
            "epoch {:2}: {:.2}s train {:.4} val {:.4} acc {:.3}",
            r.epoch,
            (now - last).as_secs_f64(),
            r.train_loss,
            r.val_loss,
            r.val_accuracy
        );
        last = now;
    })
    .expect("train");
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "d {d}, {l} blocks, {n} examples, W 8, {} epochs on {}: {secs:.1}s (best epoch {})",
        cfg.epochs, cfg.device, trained.best_epoch
    );
    let t1 = Instant::now();
    let dec = candle_decisions(&trained.routers, &fs, &cfg.device).expect("decisions");
    eprintln!(
        "candle_decisions on {} examples: {:.2}s",
        dec.len(),
        t1.elapsed().as_secs_f64()
    );
}

/// Macro-F1 and macro-recall by hand; the selection rule must not reward predicting a rare
/// class everywhere.
#[test]
fn macro_f1_hand_values() {
    let cs = |precision: f64, recall: f64, support: usize| ClassStats {
        precision,
        recall,
        support,
        predicted: 0,
    };
    // skip P 0.5 R 0.25 -> F1 1/3; execute P R 0.9 -> 0.9; repeat absent -> not averaged
    let a = [cs(0.5, 0.25, 8), cs(0.9, 0.9, 100), cs(0.0, 0.0, 0)];
    assert!((macro_f1(&a) - (1.0 / 3.0 + 0.9) / 2.0).abs() < 1e-12);
    assert!((macro_recall(&a) - (0.25 + 0.9) / 2.0).abs() < 1e-12);
    // a class present but never predicted right counts as 0
    let b = [cs(0.0, 0.0, 8), cs(0.9, 0.9, 100), cs(0.0, 0.0, 0)];
    assert!((macro_f1(&b) - 0.45).abs() < 1e-12);
    // "repeat everywhere": high recall, tiny precision. Macro-recall prefers it to a model
    // that never repeats; macro-F1 does not.
    let everywhere = [cs(0.3, 0.3, 8), cs(0.95, 0.5, 100), cs(0.01, 1.0, 2)];
    let never = [cs(0.3, 0.3, 8), cs(0.95, 0.99, 100), cs(0.0, 0.0, 2)];
    assert!(macro_recall(&everywhere) > macro_recall(&never));
    assert!(macro_f1(&everywhere) < macro_f1(&never));
    assert_eq!(
        macro_f1(&[cs(0.0, 0.0, 0), cs(0.0, 0.0, 0), cs(0.0, 0.0, 0)]),
        0.0
    );
}

/// `min_class_count`: a block with too few labels of a class never predicts it (its output
/// bias is the disabled logit); the other blocks are trained as without the option.
#[test]
fn min_class_count_disables_rare_classes_per_block() {
    use drllm_train::train::{disabled_classes, DISABLED_LOGIT};
    let mut fs = synth(200, 16, 4, 1.0, 42);
    // block 3: keep only two repeat labels (the rest become execute)
    let mut kept = 0;
    for ex in &mut fs.examples {
        if ex.labels[3] == 2 {
            if kept < 2 {
                kept += 1;
            } else {
                ex.labels[3] = 1;
            }
        }
    }
    assert_eq!(kept, 2);
    let (tr, va) = split_ids(fs.examples.len(), 0.15, 7);
    let counts = fs.block_class_counts(&tr);
    assert_eq!(counts.len(), 4);
    let total: usize = counts.iter().map(|c| c.iter().sum::<usize>()).sum();
    assert_eq!(total, tr.len() * 4);
    let min = 5;
    let off = disabled_classes(&counts, min);
    assert!(off[3][2], "{counts:?}");
    for (b, c) in counts.iter().enumerate() {
        assert_eq!(off[b], [c[0] < min, false, c[2] < min]);
    }
    let cfg = TrainConfig {
        min_class_count: min,
        ..quick_cfg(7)
    };
    let t = train(&fs, &cfg, &tr, &va, &mut |_| {}).expect("training");
    let plain = train(&fs, &quick_cfg(7), &tr, &va, &mut |_| {}).expect("training");
    for (b, r) in t.routers.iter().enumerate() {
        for (c, &disabled) in off[b].iter().enumerate() {
            if disabled {
                assert_eq!(r.b2[c], DISABLED_LOGIT, "block {b} class {c}");
            } else if t.best_epoch == plain.best_epoch {
                assert_eq!(r.b2[c], plain.routers[b].b2[c], "block {b} class {c}");
            }
        }
    }
    let dec = candle_decisions(&t.routers, &fs, "cpu").expect("decisions");
    for (i, d) in dec.iter().enumerate() {
        for (b, &k) in d.iter().enumerate() {
            assert!(
                !off[b][usize::from(k)],
                "example {i} block {b} predicts {k}"
            );
        }
    }
    // 0 is the reference: nothing disabled
    assert!(disabled_classes(&counts, 0)
        .iter()
        .all(|o| o == &[false; 3]));
}

/// Standardisation: the folded routers on raw inputs give the logits the unfolded routers give
/// on standardised inputs; training on inputs scaled by 1000 and shifted learns the same as on
/// the originals (the affine map is undone), and the exported routers read raw inputs.
#[test]
fn standardisation_folds_into_the_first_layer() {
    use drllm_train::train::Standardizer;
    let fs = synth(60, 16, 3, 1.0, 5);
    let mut big = fs.clone();
    for ex in &mut big.examples {
        for p in &mut ex.pooled {
            for (j, v) in p.iter_mut().enumerate() {
                *v = *v * 1000.0 + 500.0 * (j % 16) as f32;
            }
        }
    }
    let ids: Vec<usize> = (0..big.examples.len()).collect();
    let st = Standardizer::fit(&big, &ids);
    let normed = st.apply(&big);
    // standardised windows have mean ~0 and variance ~1 per block and dimension
    for b in 0..3 {
        for j in 0..16 {
            let vals: Vec<f64> = normed
                .examples
                .iter()
                .flat_map(|e| e.pooled[b].chunks_exact(16).map(move |w| f64::from(w[j])))
                .collect();
            let m = vals.iter().sum::<f64>() / vals.len() as f64;
            let v = vals.iter().map(|x| (x - m).powi(2)).sum::<f64>() / vals.len() as f64;
            assert!(
                m.abs() < 1e-3 && (v - 1.0).abs() < 1e-3,
                "block {b} dim {j}: {m} {v}"
            );
        }
    }
    let mut routers: Vec<BlockRouter> = (0..3).map(|i| BlockRouter::xavier(16, 8, i)).collect();
    let on_normed = candle_logits(&routers, &normed, "cpu").expect("logits");
    st.fold(&mut routers);
    let on_raw = candle_logits(&routers, &big, "cpu").expect("logits");
    for (a, b) in on_normed.iter().flatten().zip(on_raw.iter().flatten()) {
        for c in 0..3 {
            assert!(
                (a[c] - b[c]).abs() < 1e-3 * (1.0 + a[c].abs()),
                "{a:?} {b:?}"
            );
        }
    }
    // a constant dimension does not blow up the folded weights
    let mut flat = fs.clone();
    for ex in &mut flat.examples {
        for p in &mut ex.pooled {
            for w in p.chunks_exact_mut(16) {
                w[0] = 3.0;
            }
        }
    }
    let st0 = Standardizer::fit(&flat, &ids);
    assert!(st0
        .inv_std
        .iter()
        .all(|s| s.iter().all(|v| v.is_finite() && *v < 1e3)));
    // training on the scaled set with standardisation matches training on the original one
    let (tr, va) = split_ids(fs.examples.len(), 0.15, 3);
    let cfg = TrainConfig {
        standardize: true,
        ..quick_cfg(3)
    };
    let a = train(&fs, &cfg, &tr, &va, &mut |_| {}).expect("training");
    let b = train(&big, &cfg, &tr, &va, &mut |_| {}).expect("training");
    assert_eq!(a.best_epoch, b.best_epoch);
    let (da, db) = (
        candle_decisions(&a.routers, &fs, "cpu").expect("decisions"),
        candle_decisions(&b.routers, &big, "cpu").expect("decisions"),
    );
    let same = da
        .iter()
        .flatten()
        .zip(db.iter().flatten())
        .filter(|(x, y)| x == y)
        .count();
    let total = da.iter().map(Vec::len).sum::<usize>();
    assert!(
        same * 100 >= total * 99,
        "{same} of {total} decisions agree"
    );
}

#[test]
fn label_smoothing_matches_hand_computed_values() {
    use drllm_train::train::focal_loss_smoothed;
    let dev = Device::Cpu;
    let ln2 = std::f32::consts::LN_2;
    // one row, p = (1/2, 1/4, 1/4), label 0, gamma 0, weights (1, 2, 3), eps 0.3:
    // -[0.7 * 1 * ln(1/2) + 0.1 * (1 ln 1/2 + 2 ln 1/4 + 3 ln 1/4)]
    let logits = Tensor::new(&[[ln2, 0., 0.]], &dev).expect("logits");
    let targets = Tensor::new(&[0u32], &dev).expect("targets");
    let alpha = [1.0f32, 2.0, 3.0];
    let got = scalar(&focal_loss_smoothed(&logits, &targets, &alpha, 0.0, 0.3).expect("loss"));
    let (h, q) = (0.5f64.ln(), 0.25f64.ln());
    let want = -(0.7 * h + 0.1 * (h + 2.0 * q + 3.0 * q));
    assert!(close(f64::from(got), want, 1e-5), "{got} vs {want}");
    // gamma 2: each term weighted by (1 - p_c)^2
    let got = scalar(&focal_loss_smoothed(&logits, &targets, &alpha, 2.0, 0.3).expect("loss"));
    let f = |a: f64, p: f64| a * (1.0 - p) * (1.0 - p) * p.ln();
    let want = -(0.7 * f(1.0, 0.5) + 0.1 * (f(1.0, 0.5) + f(2.0, 0.25) + f(3.0, 0.25)));
    assert!(close(f64::from(got), want, 1e-5), "{got} vs {want}");
    // eps 0 is the plain focal loss; eps outside [0, 1) is refused
    let a = scalar(&focal_loss_smoothed(&logits, &targets, &alpha, 2.0, 0.0).expect("loss"));
    let b = scalar(&focal_loss(&logits, &targets, &alpha, 2.0).expect("loss"));
    assert_eq!(a, b);
    assert!(focal_loss_smoothed(&logits, &targets, &alpha, 2.0, 1.0).is_err());
    assert!(TrainConfig {
        label_smoothing: -0.1,
        ..TrainConfig::default()
    }
    .validate()
    .is_err());
}

#[test]
fn reference_class_weights_are_nearly_uniform() {
    use drllm_train::train::{ClassWeights, REFERENCE_COUNTS};
    assert_eq!(
        TrainConfig::default().class_weights,
        ClassWeights::Reference
    );
    let w = class_weights(REFERENCE_COUNTS, 0.999);
    for (got, want) in w.iter().zip([0.92f32, 0.91, 1.18]) {
        assert!((got - want).abs() < 0.01, "{w:?}");
    }
    // the balanced weights of a skewed set are far from uniform
    let b = class_weights([30, 900, 3], 0.999);
    assert!(b[2] > 10.0 * b[1], "{b:?}");
}

#[test]
fn routers_of_blocks_outside_the_chosen_set_always_execute() {
    use drllm_train::train::DISABLED_LOGIT;
    let fs = synth(200, 16, 4, 1.0, 42);
    let (tr, va) = split_ids(fs.examples.len(), 0.15, 7);
    let cfg = TrainConfig {
        blocks: vec![1, 2],
        ..quick_cfg(7)
    };
    let t = train(&fs, &cfg, &tr, &va, &mut |_| {}).expect("training");
    for (b, r) in t.routers.iter().enumerate() {
        let free = cfg.blocks.contains(&b);
        assert_eq!(r.b2[0] == DISABLED_LOGIT, !free, "block {b}");
        assert_eq!(r.b2[2] == DISABLED_LOGIT, !free, "block {b}");
        assert_ne!(r.b2[1], DISABLED_LOGIT);
    }
    let dec = candle_decisions(&t.routers, &fs, "cpu").expect("decisions");
    assert!(dec.iter().all(|d| d[0] == 1 && d[3] == 1));
    // the chosen blocks still decide: some skip or repeat on this set
    assert!(dec.iter().any(|d| d[1] != 1 || d[2] != 1));
}

#[test]
fn block_lists_parse() {
    use drllm_train::train::parse_blocks;
    assert_eq!(parse_blocks("8-10,25, 3").unwrap(), vec![3, 8, 9, 10, 25]);
    assert_eq!(parse_blocks("4,4,4-5").unwrap(), vec![4, 5]);
    for bad in ["", "x", "5-3", "1-", ",,"] {
        assert!(parse_blocks(bad).is_err(), "{bad}");
    }
    let fs = synth(40, 8, 3, 1.0, 1);
    let (tr, va) = split_ids(fs.examples.len(), 0.15, 1);
    let cfg = TrainConfig {
        blocks: vec![3],
        ..quick_cfg(1)
    };
    assert!(train(&fs, &cfg, &tr, &va, &mut |_| {}).is_err());
}
