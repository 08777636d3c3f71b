//! The router math: GELU, one block's MLP, windowed mean pooling, the decision.

use crate::error::FormatError;

/// `sqrt(2 / pi)`, as PyTorch's tanh-approximated GELU uses it.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;

/// GELU, tanh approximation (PyTorch `gelu(approximate="tanh")`):
/// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`, computed in f32.
pub fn gelu_tanh(x: f32) -> f32 {
    let inner = SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x);
    0.5 * x * (1.0 + inner.tanh())
}

/// Number of pooling windows for a prompt of `t` tokens: `min(windows, t)` (0 if either is 0).
pub fn n_windows(t: usize, windows: usize) -> usize {
    windows.min(t)
}

/// Host reference of the method's pooling (the engine pools on the device; tests compare).
///
/// `hidden` is `t x d` row-major (one row per token). With `W = n_windows(t, windows)` and
/// `s = floor(t / W)`, window `w` is the mean of tokens `w*s .. (w+1)*s`; the last `t mod W`
/// tokens are dropped. Returns `W x d` row-major.
///
/// Each mean is summed in f64, rounded to f32 and multiplied by the f32 `1 / s` (the order
/// of ggml's `sum_rows` + `scale` that the engine uses).
///
/// Returns an empty vector when there is nothing to pool (`t`, `d` or `windows` is 0) or when
/// `hidden.len() != t * d`.
pub fn window_means(hidden: &[f32], t: usize, d: usize, windows: usize) -> Vec<f32> {
    let w = n_windows(t, windows);
    if w == 0 || d == 0 || t.checked_mul(d) != Some(hidden.len()) {
        return Vec::new();
    }
    let size = t / w;
    let scale = 1.0f32 / size as f32;
    let mut out = Vec::with_capacity(w * d);
    let mut acc = vec![0f64; d];
    for win in hidden.chunks_exact(size * d).take(w) {
        acc.iter_mut().for_each(|a| *a = 0.0);
        for row in win.chunks_exact(d) {
            for (a, &v) in acc.iter_mut().zip(row) {
                *a += f64::from(v);
            }
        }
        out.extend(acc.iter().map(|&a| (a as f32) * scale));
    }
    out
}

/// Dot product with eight independent f32 accumulators (vectorises; the summation order is
/// fixed, so results are deterministic on every platform).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            lanes[k] += x[k] * y[k];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    let s = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
        + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
    s + tail
}

/// One block's router: `Linear(d -> hidden) -> GELU(tanh) -> Linear(hidden -> 3)`.
///
/// Classes: 0 skip, 1 execute, 2 repeat (see [`crate::CLASSES`]).
#[derive(Clone, Debug, PartialEq)]
pub struct BlockRouter {
    /// First layer weight, `hidden x d` row-major: `w1[o * d + i]` (PyTorch `Linear` layout).
    pub w1: Vec<f32>,
    /// First layer bias, `hidden`.
    pub b1: Vec<f32>,
    /// Second layer weight, `3 x hidden` row-major: `w2[c * hidden + j]`.
    pub w2: Vec<f32>,
    /// Second layer bias (skip, execute, repeat).
    pub b2: [f32; 3],
}

fn xavier_fill(
    rng: &mut crate::rng::SplitMix64,
    n: usize,
    fan_in: usize,
    fan_out: usize,
) -> Vec<f32> {
    let bound = (6.0f64 / (fan_in + fan_out) as f64).sqrt() as f32;
    (0..n)
        .map(|_| (2.0 * rng.unit_f32() - 1.0) * bound)
        .collect()
}

impl BlockRouter {
    /// A router with all weights and biases zero (its logits are always `[0, 0, 0]`).
    pub fn zeros(d: usize, hidden: usize) -> Self {
        BlockRouter {
            w1: vec![0.0; hidden.saturating_mul(d)],
            b1: vec![0.0; hidden],
            w2: vec![0.0; hidden.saturating_mul(3)],
            b2: [0.0; 3],
        }
    }

    /// Xavier-uniform weights (`U(-a, a)`, `a = sqrt(6 / (fan_in + fan_out))`) and zero
    /// biases, as the reference code initialises routers. Deterministic: SplitMix64 seeded
    /// with `seed`, each weight `(2u - 1) a` with `u` the top 24 bits of the next output
    /// divided by 2^24; `w1` in storage order first, then `w2`.
    pub fn xavier(d: usize, hidden: usize, seed: u64) -> Self {
        let mut rng = crate::rng::SplitMix64(seed);
        let w1 = xavier_fill(&mut rng, hidden.saturating_mul(d), d, hidden);
        let w2 = xavier_fill(&mut rng, hidden.saturating_mul(3), hidden, 3);
        BlockRouter {
            w1,
            b1: vec![0.0; hidden],
            w2,
            b2: [0.0; 3],
        }
    }

    /// Input size `d` (the model's hidden size), derived from the vector lengths
    /// (0 for an inconsistent router).
    pub fn d(&self) -> usize {
        let h = self.hidden();
        if h == 0 || !self.w1.len().is_multiple_of(h) {
            0
        } else {
            self.w1.len() / h
        }
    }

    /// The router's hidden width (length of `b1`).
    pub fn hidden(&self) -> usize {
        self.b1.len()
    }

    /// Number of parameters.
    pub fn n_params(&self) -> usize {
        self.w1.len() + self.b1.len() + self.w2.len() + 3
    }

    fn consistent(&self) -> bool {
        let h = self.hidden();
        h > 0 && self.w1.len().is_multiple_of(h) && self.w2.len() == 3 * h
    }

    /// Logits for one `d`-vector. Returns `[NaN; 3]` if `x.len() != self.d()` or the router's
    /// vectors are inconsistent (use [`BlockRouter::try_forward`] for an error instead).
    pub fn forward(&self, x: &[f32]) -> [f32; 3] {
        self.try_forward(x).unwrap_or([f32::NAN; 3])
    }

    /// [`BlockRouter::forward`] with a [`FormatError::DimensionMismatch`] on a wrong length.
    pub fn try_forward(&self, x: &[f32]) -> Result<[f32; 3], FormatError> {
        let d = self.d();
        if !self.consistent() || d == 0 {
            return Err(FormatError::Inconsistent(format!(
                "router vectors w1 {} b1 {} w2 {} do not form a router",
                self.w1.len(),
                self.b1.len(),
                self.w2.len()
            )));
        }
        if x.len() != d {
            return Err(FormatError::DimensionMismatch {
                what: "router input",
                expected: d,
                found: x.len(),
            });
        }
        let h = self.hidden();
        let act: Vec<f32> = self
            .w1
            .chunks_exact(d)
            .zip(&self.b1)
            .map(|(row, &b)| gelu_tanh(b + dot(row, x)))
            .collect();
        let mut out = self.b2;
        for (o, row) in out.iter_mut().zip(self.w2.chunks_exact(h)) {
            *o += dot(row, &act);
        }
        Ok(out)
    }

    /// The method's decision logits for one block: `pooled` holds `W` window means,
    /// `W x d` row-major (from [`window_means`] or the engine's device pooling); runs
    /// [`BlockRouter::forward`] on each window and returns the **average** of the `W` logit
    /// vectors. Returns `[NaN; 3]` when `d != self.d()`, `pooled` is empty or not a multiple
    /// of `d` (see [`BlockRouter::try_route`]); [`Decision::from_logits`] maps NaN to execute.
    pub fn route(&self, pooled: &[f32], d: usize) -> [f32; 3] {
        self.try_route(pooled, d).unwrap_or([f32::NAN; 3])
    }

    /// [`BlockRouter::route`] with an error instead of NaN logits on bad input.
    pub fn try_route(&self, pooled: &[f32], d: usize) -> Result<[f32; 3], FormatError> {
        if d == 0 || d != self.d() {
            return Err(FormatError::DimensionMismatch {
                what: "router input size d",
                expected: self.d(),
                found: d,
            });
        }
        if pooled.is_empty() || !pooled.len().is_multiple_of(d) {
            return Err(FormatError::DimensionMismatch {
                what: "pooled windows (a nonzero multiple of d)",
                expected: d,
                found: pooled.len(),
            });
        }
        let w = pooled.len() / d;
        let mut sum = [0f32; 3];
        for x in pooled.chunks_exact(d) {
            let l = self.try_forward(x)?;
            for (s, v) in sum.iter_mut().zip(l) {
                *s += v;
            }
        }
        let inv = w as f32;
        Ok(sum.map(|s| s / inv))
    }

    /// `route` followed by [`Decision::from_logits`].
    pub fn decide(&self, pooled: &[f32], d: usize) -> Decision {
        Decision::from_logits(&self.route(pooled, d))
    }
}

/// A router's decision for one block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Decision {
    /// Class 0: the block is not run.
    Skip,
    /// Class 1: the block runs once.
    Execute,
    /// Class 2: the block runs twice.
    Repeat,
}

impl Decision {
    /// Argmax of the three logits; ties go to the lower class (as `torch.argmax`). If any
    /// logit is NaN the decision is [`Decision::Execute`] (run the block as the plain model
    /// would).
    pub fn from_logits(logits: &[f32; 3]) -> Decision {
        if logits.iter().any(|v| v.is_nan()) {
            return Decision::Execute;
        }
        let mut best = 0;
        for c in 1..3 {
            if logits[c] > logits[best] {
                best = c;
            }
        }
        Decision::from_class(best).unwrap_or(Decision::Execute)
    }

    /// The decision of class index 0, 1 or 2.
    pub fn from_class(class: usize) -> Option<Decision> {
        match class {
            0 => Some(Decision::Skip),
            1 => Some(Decision::Execute),
            2 => Some(Decision::Repeat),
            _ => None,
        }
    }

    /// Class index (0 skip, 1 execute, 2 repeat), which is also the number of passes.
    pub fn class(self) -> usize {
        match self {
            Decision::Skip => 0,
            Decision::Execute => 1,
            Decision::Repeat => 2,
        }
    }

    /// Number of passes of the block: 0, 1 or 2.
    pub fn passes(self) -> usize {
        self.class()
    }

    /// The class name from [`crate::CLASSES`].
    pub fn name(self) -> &'static str {
        crate::CLASSES[self.class()]
    }
}
