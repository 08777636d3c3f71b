//! Router math against hand-computed values: GELU, one router's logits, window pooling.

use drllm_router_format::{gelu_tanh, n_windows, window_means, BlockRouter, Decision, FormatError};

/// gelu_tanh(1) = 0.5 (1 + tanh(sqrt(2/pi) 1.044715)) = 0.8411919906082768 (f64).
const G1: f64 = 0.841_191_990_608_276_8;
/// gelu_tanh(-1) = -0.15880800939172324; note G1 - GM1 = 1 exactly (gelu(x) - gelu(-x) = x).
const GM1: f64 = -0.158_808_009_391_723_2;

fn close(a: f32, b: f32, tol: f32) -> bool {
    (a - b).abs() <= tol
}

fn assert_close3(got: [f32; 3], want: [f64; 3], tol: f64) {
    for c in 0..3 {
        assert!(
            (f64::from(got[c]) - want[c]).abs() <= tol,
            "class {c}: got {got:?}, want {want:?}"
        );
    }
}

#[test]
fn gelu_tanh_values() {
    assert_eq!(gelu_tanh(0.0), 0.0);
    assert!(close(gelu_tanh(1.0), G1 as f32, 1e-6), "{}", gelu_tanh(1.0));
    assert!(
        close(gelu_tanh(-1.0), GM1 as f32, 1e-6),
        "{}",
        gelu_tanh(-1.0)
    );
    // 0.5 * 2 * (1 + tanh(sqrt(2/pi) * 2.35772)) = 1.954597694087775
    assert!(close(gelu_tanh(2.0), 1.954_597_7, 1e-6));
    // far tails: identity and zero
    assert!(close(gelu_tanh(10.0), 10.0, 1e-5));
    assert!(close(gelu_tanh(-10.0), 0.0, 1e-5));
    for x in [-3.0f32, -0.5, 0.25, 1.5, 4.0] {
        assert!(close(gelu_tanh(x) - gelu_tanh(-x), x, 1e-6), "{x}");
    }
}

/// d = 4, hidden = 2, two windows; every number below is computed by hand.
///
/// fc1: W1 = [[1, 0, 2, 0],      b1 = [0.5, 0]
///            [0, 1, 0, -1]]
/// fc2: W2 = [[1, 0],            b2 = [0.1, 0.2, -0.3]
///            [0, 1],
///            [2, -1]]
///
/// window a: x = [0.5, -1, 0, 0]
///   fc1: [0.5 + 0 + 0 + 0.5, -1 - 0] = [1, -1]        -> GELU: [G1, GM1]
///   fc2: skip    = G1 + 0.1                    = 0.94119199
///        execute = GM1 + 0.2                   = 0.04119199
///        repeat  = 2 G1 - GM1 - 0.3 = G1 + 0.7 = 1.54119199   (uses G1 - GM1 = 1)
/// window b: x = [-1.5, 1.5, 0.5, 0.5]
///   fc1: [-1.5 + 1 + 0.5, 1.5 - 0.5] = [0, 1]           -> GELU: [0, G1]
///   fc2: skip    = 0 + 0.1                     = 0.1
///        execute = G1 + 0.2                    = 1.04119199
///        repeat  = -G1 - 0.3                   = -1.14119199
/// average (route):
///        skip    = (G1 + 0.2) / 2              = 0.520595995
///        execute = (G1 + GM1 + 0.4) / 2 = G1 - 0.3 = 0.54119199
///        repeat  = ((G1 + 0.7) + (-G1 - 0.3)) / 2 = 0.2
/// decision: execute (0.5412 > 0.5206 > 0.2); window a alone says repeat, window b execute.
fn hand_router() -> BlockRouter {
    BlockRouter {
        w1: vec![1.0, 0.0, 2.0, 0.0, 0.0, 1.0, 0.0, -1.0],
        b1: vec![0.5, 0.0],
        w2: vec![1.0, 0.0, 0.0, 1.0, 2.0, -1.0],
        b2: [0.1, 0.2, -0.3],
    }
}

const XA: [f32; 4] = [0.5, -1.0, 0.0, 0.0];
const XB: [f32; 4] = [-1.5, 1.5, 0.5, 0.5];

#[test]
fn hand_computed_router_logits() {
    // the decimal constants below follow from G1 and GM1
    assert!((G1 + 0.1 - 0.941_191_991).abs() < 1e-9 && (G1 - GM1 - 1.0).abs() < 1e-15);
    assert!(((G1 + 0.2) / 2.0 - 0.520_595_995).abs() < 1e-9);
    let r = hand_router();
    assert_eq!((r.d(), r.hidden(), r.n_params()), (4, 2, 8 + 2 + 6 + 3));

    let la = r.forward(&XA);
    assert_close3(la, [0.941_191_991, 0.041_191_991, 1.541_191_991], 1e-6);
    assert_eq!(Decision::from_logits(&la), Decision::Repeat);

    let lb = r.forward(&XB);
    assert_close3(lb, [0.1, 1.041_191_991, -1.141_191_991], 1e-6);
    assert_eq!(Decision::from_logits(&lb), Decision::Execute);

    let pooled: Vec<f32> = XA.iter().chain(XB.iter()).copied().collect();
    let avg = r.route(&pooled, 4);
    assert_close3(avg, [0.520_595_995, 0.541_191_991, 0.2], 1e-6);
    assert_eq!(Decision::from_logits(&avg), Decision::Execute);
    assert_eq!(r.decide(&pooled, 4), Decision::Execute);
    assert_eq!(r.decide(&pooled, 4).passes(), 1);

    // a single window is just forward
    assert_eq!(r.route(&XA, 4), la);
}

#[test]
fn hand_router_through_window_pooling() {
    // T = 5 tokens, 2 windows of floor(5/2) = 2 tokens; token 4 (a huge value) is dropped.
    // tokens 0,1 average to XA, tokens 2,3 to XB.
    let hidden: Vec<f32> = [
        [1.0, -2.0, 0.5, -0.5],
        [0.0, 0.0, -0.5, 0.5],
        [-1.0, 1.0, 1.0, 0.0],
        [-2.0, 2.0, 0.0, 1.0],
        [1e6, 1e6, 1e6, 1e6],
    ]
    .concat();
    let pooled = window_means(&hidden, 5, 4, 2);
    assert_eq!(pooled, [XA, XB].concat());
    let avg = hand_router().route(&pooled, 4);
    assert_close3(avg, [0.520_595_995, 0.541_191_991, 0.2], 1e-6);
}

#[test]
fn route_rejects_bad_dimensions() {
    let r = hand_router();
    for (pooled, d) in [
        (vec![0.0; 8], 3),
        (vec![0.0; 7], 4),
        (vec![], 4),
        (vec![0.0; 8], 0),
    ] {
        assert!(
            r.route(&pooled, d).iter().all(|v| v.is_nan()),
            "{pooled:?} {d}"
        );
        assert!(matches!(
            r.try_route(&pooled, d),
            Err(FormatError::DimensionMismatch { .. })
        ));
    }
    assert!(matches!(
        r.try_forward(&[0.0; 3]),
        Err(FormatError::DimensionMismatch {
            expected: 4,
            found: 3,
            ..
        })
    ));
    // NaN logits mean "run the block as the plain model would"
    assert_eq!(Decision::from_logits(&r.route(&[], 4)), Decision::Execute);
    let broken = BlockRouter {
        w2: vec![0.0; 5],
        ..hand_router()
    };
    assert!(matches!(
        broken.try_forward(&XA),
        Err(FormatError::Inconsistent(_))
    ));
}

#[test]
fn decisions() {
    assert_eq!(Decision::from_logits(&[1.0, 1.0, 1.0]), Decision::Skip); // ties: lowest
    assert_eq!(Decision::from_logits(&[0.0, 1.0, 1.0]), Decision::Execute);
    assert_eq!(Decision::from_logits(&[0.0, 1.0, 2.0]), Decision::Repeat);
    assert_eq!(
        Decision::from_logits(&[f32::NAN, 0.0, 9.0]),
        Decision::Execute
    );
    assert_eq!(
        Decision::from_logits(&[f32::NEG_INFINITY, f32::INFINITY, 0.0]),
        Decision::Execute
    );
    for c in 0..3 {
        let d = Decision::from_class(c).unwrap();
        assert_eq!((d.class(), d.passes()), (c, c));
        assert_eq!(d.name(), drllm_router_format::CLASSES[c]);
    }
    assert_eq!(Decision::from_class(3), None);
}

#[test]
fn zeros_and_xavier() {
    let z = BlockRouter::zeros(6, 3);
    assert_eq!((z.d(), z.hidden()), (6, 3));
    assert_eq!(z.forward(&[1.0; 6]), [0.0; 3]);

    let a = BlockRouter::xavier(64, 16, 7);
    let b = BlockRouter::xavier(64, 16, 7);
    let c = BlockRouter::xavier(64, 16, 8);
    assert_eq!(a, b);
    assert_ne!(a.w1, c.w1);
    assert_eq!((a.d(), a.hidden()), (64, 16));
    assert_eq!(a.b1, vec![0.0; 16]);
    assert_eq!(a.b2, [0.0; 3]);
    let bound1 = (6.0f32 / (64.0 + 16.0)).sqrt();
    let bound2 = (6.0f32 / (16.0 + 3.0)).sqrt();
    assert!(a.w1.iter().all(|w| w.abs() <= bound1));
    assert!(a.w2.iter().all(|w| w.abs() <= bound2));
    // roughly uniform: mean near 0, variance near bound^2 / 3
    let n = a.w1.len() as f32;
    let mean = a.w1.iter().sum::<f32>() / n;
    let var = a.w1.iter().map(|w| (w - mean) * (w - mean)).sum::<f32>() / n;
    assert!(mean.abs() < 0.05 * bound1, "{mean}");
    assert!((var / (bound1 * bound1 / 3.0) - 1.0).abs() < 0.1, "{var}");
    // first values pinned: the generator must not change silently
    let want = [a.w1[0], a.w1[1], a.w2[0]];
    let again = BlockRouter::xavier(64, 16, 7);
    assert_eq!([again.w1[0], again.w1[1], again.w2[0]], want);
}

#[test]
fn forward_matches_naive_reference() {
    let r = BlockRouter::xavier(37, 11, 3);
    let x: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
    let mut want = [0f64; 3];
    let h: Vec<f64> = (0..11)
        .map(|o| {
            let pre: f64 = (0..37)
                .map(|i| f64::from(r.w1[o * 37 + i]) * f64::from(x[i]))
                .sum::<f64>()
                + f64::from(r.b1[o]);
            let p = pre;
            0.5 * p
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (p + 0.044715 * p * p * p)).tanh())
        })
        .collect();
    for (c, w) in want.iter_mut().enumerate() {
        *w = f64::from(r.b2[c])
            + (0..11)
                .map(|j| f64::from(r.w2[c * 11 + j]) * h[j])
                .sum::<f64>();
    }
    let got = r.forward(&x);
    for c in 0..3 {
        assert!(
            (f64::from(got[c]) - want[c]).abs() < 1e-5,
            "{got:?} {want:?}"
        );
    }
}

/// Naive f64 reference of the pooling.
fn reference_means(hidden: &[f32], t: usize, d: usize, windows: usize) -> Vec<f32> {
    let w = windows.min(t);
    let s = t / w;
    let mut out = vec![0f32; w * d];
    for win in 0..w {
        for j in 0..d {
            let sum: f64 = (win * s..(win + 1) * s)
                .map(|tok| f64::from(hidden[tok * d + j]))
                .sum();
            out[win * d + j] = (sum / s as f64) as f32;
        }
    }
    out
}

fn hidden_tokens(t: usize, d: usize) -> Vec<f32> {
    // token index * 10 + feature, exact in f32 for these sizes
    (0..t)
        .flat_map(|tok| (0..d).map(move |j| (tok * 10 + j) as f32))
        .collect()
}

#[test]
fn window_means_edge_cases() {
    let d = 3;
    // T = 1: one window holding the one token
    assert_eq!(n_windows(1, 8), 1);
    assert_eq!(
        window_means(&[1.5, -2.0, 3.0], 1, 3, 8),
        vec![1.5, -2.0, 3.0]
    );

    // T < 8: W = T, each window is one token (the means are the tokens themselves)
    assert_eq!(n_windows(5, 8), 5);
    let h = hidden_tokens(5, d);
    assert_eq!(window_means(&h, 5, d, 8), h);

    // T = 19, W = 8: windows of floor(19/8) = 2 tokens over the first 16; tokens 16..18 dropped
    assert_eq!(n_windows(19, 8), 8);
    let h = hidden_tokens(19, d);
    let m = window_means(&h, 19, d, 8);
    assert_eq!(m.len(), 8 * d);
    for w in 0..8 {
        for j in 0..d {
            // mean of tokens 2w, 2w+1: ((2w)*10 + j + (2w+1)*10 + j) / 2 = 20w + 5 + j
            assert_eq!(
                m[w * d + j],
                (20 * w + 5 + j) as f32,
                "window {w} feature {j}"
            );
        }
    }

    // T = 8: one token per window
    let h = hidden_tokens(8, d);
    assert_eq!(window_means(&h, 8, d, 8), h);

    // T = 1000: 8 windows of 125 tokens, means 10 * (125 w + 62) + j
    let h = hidden_tokens(1000, d);
    let m = window_means(&h, 1000, d, 8);
    for w in 0..8 {
        for j in 0..d {
            // the sum is exact; the scale by the f32 1/125 (ggml's order) rounds once
            let want = (10 * (125 * w + 62) + j) as f32;
            assert!(
                close(m[w * d + j], want, 1e-6 * want),
                "{} {want}",
                m[w * d + j]
            );
        }
    }

    // arbitrary values agree with an f64 reference
    for (t, windows) in [
        (1, 8),
        (3, 8),
        (19, 8),
        (1000, 8),
        (77, 5),
        (64, 64),
        (10, 1),
    ] {
        let h: Vec<f32> = (0..t * 7)
            .map(|i| ((i * 31 % 97) as f32 - 48.0) / 7.0)
            .collect();
        let got = window_means(&h, t, 7, windows);
        let want = reference_means(&h, t, 7, windows);
        assert_eq!(got.len(), n_windows(t, windows) * 7);
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g - w).abs() <= 1e-6 * w.abs().max(1.0),
                "T {t}: {g} vs {w}"
            );
        }
    }
}

#[test]
fn window_means_degenerate_inputs() {
    assert_eq!(n_windows(0, 8), 0);
    assert_eq!(n_windows(5, 0), 0);
    assert!(window_means(&[], 0, 4, 8).is_empty());
    assert!(window_means(&[1.0; 4], 1, 4, 0).is_empty());
    assert!(window_means(&[1.0; 4], 1, 0, 8).is_empty());
    // hidden.len() != t * d
    assert!(window_means(&[1.0; 7], 2, 4, 8).is_empty());
    assert!(window_means(&[1.0; 9], 2, 4, 8).is_empty());
    assert!(window_means(&[1.0; 8], usize::MAX, 4, 8).is_empty());
}
