//! Router training (candle): one MLP router per block, trained jointly on cached router inputs.
//!
//! The LLM is frozen and every training example has a fixed kept path, so the router inputs
//! (the `W` window means of the residual stream entering each block along that path) are
//! computed once and cached in a [`FeatureSet`]; this module trains the routers on that cache.
//!
//! Method (see `METHOD.md`, "Router" and "Router training"):
//! - router of block `i`: `Linear(d -> hidden) -> GELU(tanh) -> Linear(hidden -> 3)`, run on
//!   each window mean, the `W` logit vectors **averaged** (exactly the inference rule of
//!   [`drllm_router_format::BlockRouter::route`]);
//! - focal loss (`gamma`), class-balanced weights from the effective number of samples
//!   (`beta`), summed over blocks;
//! - AdamW with a cosine schedule after a linear warmup, applied per optimiser step;
//! - Xavier-uniform init with zero biases ([`drllm_router_format::BlockRouter::xavier`],
//!   deterministic from the seed);
//! - optionally (`standardize`, off by default, not in the reference) router inputs are
//!   standardised per block and dimension (mean and standard deviation over the training
//!   windows) while training, the affine map folded into the first layer on export
//!   ([`Standardizer`]), so the exported routers still run on the raw residual stream.
//!   Gemma-3's residual stream entering a block is in the hundreds (embeddings scaled by
//!   sqrt(d), a few huge dimensions): routers trained on it raw give saturated logits that a
//!   depth bias of +-3 hardly moves (16.5 to 16.6 passes of 18); standardised, the bias spans
//!   0 to 19 passes;
//! - the weights of the epoch with the best validation macro-F1 are kept (ties: the lower
//!   validation loss): collapse to "always execute" is the known failure mode, and the
//!   opposite one, predicting a rare class everywhere (which macro-recall would reward), costs
//!   accuracy at every wrongly skipped or repeated block.
//!
//! Batching: all blocks are computed at once with batched matmuls over `[L, S, d]` inputs
//! (`L` blocks, `S` windows of the batch packed without padding: examples with fewer windows
//! simply contribute fewer rows); a `[B, S]` averaging matrix with `1 / W_b` entries turns the
//! per-window logits into each example's averaged logits.
//!
//! # Feature file format (version 1, all integers and floats little-endian)
//!
//! ```text
//! magic        8 bytes  "DRLLMFTS"
//! version      u32      1
//! d            u64      hidden size (1 ..= 65536)
//! n_layer      u64      number of blocks (1 ..= 1024)
//! max_windows  u64      (1 ..= 64)
//! n_examples   u64
//! n_examples times:
//!   id_len     u32      (<= 65536), then id_len bytes of UTF-8
//!   n_windows  u32      (1 ..= max_windows)
//!   labels     n_layer bytes (0, 1 or 2)
//!   pooled     n_layer * n_windows * d f32 (block-major, then window, then dimension)
//! ```
//!
//! Nothing may follow the last example.

use std::fmt;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use drllm_router_format::{BlockRouter, Decision};

/// Errors of router training and of feature files.
#[non_exhaustive]
#[derive(Debug)]
pub enum TrainError {
    /// An error from candle (tensor shapes, device, kernels).
    Candle(Box<candle_core::Error>),
    /// Reading or writing a file failed.
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A feature file is malformed (wrong magic or version, truncated, out-of-range sizes).
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A [`FeatureSet`] is inconsistent (shapes, labels, non-finite values).
    InvalidFeatures(String),
    /// A [`TrainConfig`] value is out of range.
    InvalidConfig(String),
    /// Another argument is invalid (example ids, routers, tensors).
    InvalidInput(String),
    /// The requested device is unknown or unavailable in this build.
    Device(String),
    /// Training produced a non-finite loss.
    Diverged {
        /// The epoch (1-based) in which the loss became non-finite.
        epoch: usize,
    },
}

impl fmt::Display for TrainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrainError::Candle(e) => write!(f, "candle: {e}"),
            TrainError::Io { path, source } => write!(f, "{}: {source}", path.display()),
            TrainError::BadFile { path, reason } => {
                write!(f, "{}: not a valid feature file: {reason}", path.display())
            }
            TrainError::InvalidFeatures(m) => write!(f, "invalid features: {m}"),
            TrainError::InvalidConfig(m) => write!(f, "invalid training config: {m}"),
            TrainError::InvalidInput(m) => write!(f, "invalid input: {m}"),
            TrainError::Device(m) => write!(f, "device: {m}"),
            TrainError::Diverged { epoch } => {
                write!(f, "training diverged: non-finite loss in epoch {epoch}")
            }
        }
    }
}

impl std::error::Error for TrainError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TrainError::Candle(e) => Some(e.as_ref()),
            TrainError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<candle_core::Error> for TrainError {
    fn from(e: candle_core::Error) -> Self {
        TrainError::Candle(Box::new(e))
    }
}

/// Magic bytes at the start of a feature file.
pub const FEATURE_MAGIC: [u8; 8] = *b"DRLLMFTS";
/// Version of the feature file layout written by [`FeatureSet::save`].
pub const FEATURE_VERSION: u32 = 1;
/// Largest hidden size a feature file may declare.
pub const MAX_FEATURE_D: u64 = drllm_router_format::MAX_D;
/// Largest number of blocks a feature file may declare.
pub const MAX_FEATURE_LAYERS: u64 = drllm_router_format::MAX_BLOCKS;
/// Largest number of windows a feature file may declare.
pub const MAX_FEATURE_WINDOWS: u64 = drllm_router_format::MAX_WINDOWS;
/// Longest example id (bytes) a feature file may hold.
pub const MAX_ID_BYTES: u32 = 65536;

/// Router inputs for one training example along its kept path: for every block, the W window
/// means of the residual stream entering that block (W = min(8, T), the same for all blocks of
/// the example), and the block's label = number of passes in the kept path (0 skip, 1 execute, 2 repeat).
#[derive(Clone, Debug, PartialEq)]
pub struct ExampleFeatures {
    /// The example's id (from the data set).
    pub id: String,
    /// Number of windows `W` (1 ..= the set's `max_windows`).
    pub n_windows: usize,
    /// Per block: `n_windows x d` window means, row-major.
    pub pooled: Vec<Vec<f32>>,
    /// Per block: the label (0 skip, 1 execute, 2 repeat).
    pub labels: Vec<u8>,
}

/// Cached router inputs and labels of a training set.
#[derive(Clone, Debug, PartialEq)]
pub struct FeatureSet {
    /// Hidden size of the model (router input size).
    pub d: usize,
    /// Number of blocks (one router each).
    pub n_layer: usize,
    /// Largest number of windows per example (8 for the method).
    pub max_windows: usize,
    /// The examples.
    pub examples: Vec<ExampleFeatures>,
}

impl FeatureSet {
    /// Checks that shapes are consistent (`d`, `n_layer`, `max_windows` nonzero; every example
    /// has `n_layer` labels and pooled blocks of `n_windows * d` values with
    /// `1 <= n_windows <= max_windows`), labels are at most 2 and all values are finite.
    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |m: String| Err(TrainError::InvalidFeatures(m));
        if self.d == 0 || self.n_layer == 0 || self.max_windows == 0 {
            return bad(format!(
                "d {}, n_layer {} and max_windows {} must be nonzero",
                self.d, self.n_layer, self.max_windows
            ));
        }
        for (i, ex) in self.examples.iter().enumerate() {
            if ex.n_windows == 0 || ex.n_windows > self.max_windows {
                return bad(format!(
                    "example {i} ({}): n_windows {} not in 1..={}",
                    ex.id, ex.n_windows, self.max_windows
                ));
            }
            if ex.labels.len() != self.n_layer || ex.pooled.len() != self.n_layer {
                return bad(format!(
                    "example {i} ({}): {} labels and {} pooled blocks for {} blocks",
                    ex.id,
                    ex.labels.len(),
                    ex.pooled.len(),
                    self.n_layer
                ));
            }
            if let Some(b) = ex.labels.iter().position(|&l| l > 2) {
                return bad(format!(
                    "example {i} ({}): block {b} has label {} (> 2)",
                    ex.id, ex.labels[b]
                ));
            }
            let want = ex.n_windows.checked_mul(self.d);
            for (b, p) in ex.pooled.iter().enumerate() {
                if Some(p.len()) != want {
                    return bad(format!(
                        "example {i} ({}): block {b} has {} values, expected {} x {}",
                        ex.id,
                        p.len(),
                        ex.n_windows,
                        self.d
                    ));
                }
                if let Some(k) = p.iter().position(|v| !v.is_finite()) {
                    return bad(format!(
                        "example {i} ({}): block {b} value {k} is {}",
                        ex.id, p[k]
                    ));
                }
            }
        }
        Ok(())
    }

    /// Number of block labels of each class (skip, execute, repeat) over all examples.
    pub fn class_counts(&self) -> [usize; 3] {
        self.class_counts_of(0..self.examples.len())
    }

    /// Per block, the number of labels of each class among the examples `ids`.
    pub fn block_class_counts(&self, ids: &[usize]) -> Vec<[usize; 3]> {
        let mut c = vec![[0usize; 3]; self.n_layer];
        for &i in ids {
            if let Some(ex) = self.examples.get(i) {
                for (b, &l) in ex.labels.iter().enumerate() {
                    if let Some(slot) = c.get_mut(b).and_then(|s| s.get_mut(usize::from(l))) {
                        *slot += 1;
                    }
                }
            }
        }
        c
    }

    fn class_counts_of(&self, ids: impl IntoIterator<Item = usize>) -> [usize; 3] {
        let mut c = [0usize; 3];
        for i in ids {
            if let Some(ex) = self.examples.get(i) {
                for &l in &ex.labels {
                    if let Some(slot) = c.get_mut(usize::from(l)) {
                        *slot += 1;
                    }
                }
            }
        }
        c
    }

    /// Writes the set in the feature file format (see the module docs) to a temporary file
    /// next to `path`, then renames it over `path`. The set is validated first.
    pub fn save(&self, path: &Path) -> Result<(), TrainError> {
        self.validate()?;
        if self.d as u64 > MAX_FEATURE_D
            || self.n_layer as u64 > MAX_FEATURE_LAYERS
            || self.max_windows as u64 > MAX_FEATURE_WINDOWS
        {
            return Err(TrainError::InvalidFeatures(format!(
                "d {}, n_layer {} or max_windows {} above the file format's limits \
                 ({MAX_FEATURE_D}, {MAX_FEATURE_LAYERS}, {MAX_FEATURE_WINDOWS})",
                self.d, self.n_layer, self.max_windows
            )));
        }
        if let Some(ex) = self
            .examples
            .iter()
            .find(|e| e.id.len() > MAX_ID_BYTES as usize)
        {
            return Err(TrainError::InvalidFeatures(format!(
                "an id of {} bytes (at most {MAX_ID_BYTES})",
                ex.id.len()
            )));
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "features".to_string());
        let tmp = path.with_file_name(format!(".{name}.tmp{}", std::process::id()));
        let io = |source| TrainError::Io {
            path: tmp.clone(),
            source,
        };
        let result = (|| {
            let file = File::create(&tmp).map_err(io)?;
            let mut w = BufWriter::new(file);
            self.write_to(&mut w).map_err(io)?;
            let file = w.into_inner().map_err(|e| io(e.into_error()))?;
            file.sync_all().map_err(io)?;
            std::fs::rename(&tmp, path).map_err(|source| TrainError::Io {
                path: path.to_path_buf(),
                source,
            })
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    fn write_to(&self, w: &mut impl Write) -> std::io::Result<()> {
        w.write_all(&FEATURE_MAGIC)?;
        w.write_all(&FEATURE_VERSION.to_le_bytes())?;
        for v in [self.d, self.n_layer, self.max_windows, self.examples.len()] {
            w.write_all(&(v as u64).to_le_bytes())?;
        }
        let mut buf = Vec::new();
        for ex in &self.examples {
            let id = ex.id.as_bytes();
            let id_len = u32::try_from(id.len())
                .ok()
                .filter(|&n| n <= MAX_ID_BYTES)
                .ok_or_else(|| std::io::Error::other(format!("id of {} bytes", id.len())))?;
            w.write_all(&id_len.to_le_bytes())?;
            w.write_all(id)?;
            w.write_all(&(ex.n_windows as u32).to_le_bytes())?;
            w.write_all(&ex.labels)?;
            for p in &ex.pooled {
                buf.clear();
                buf.extend(p.iter().flat_map(|v| v.to_le_bytes()));
                w.write_all(&buf)?;
            }
        }
        Ok(())
    }

    /// Reads a feature file written by [`FeatureSet::save`]. Every size is checked against
    /// the limits and the bytes left in the file before anything is allocated; the result is
    /// validated ([`FeatureSet::validate`]).
    pub fn load(path: &Path) -> Result<FeatureSet, TrainError> {
        let io = |source| TrainError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let mut r = Reader {
            inner: BufReader::new(file),
            left: len,
            path,
        };
        let fs = r.read_set()?;
        fs.validate().map_err(|e| TrainError::BadFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Ok(fs)
    }
}

/// Bounded little-endian reader for feature files.
struct Reader<'a, R> {
    inner: R,
    left: u64,
    path: &'a Path,
}

impl<R: Read> Reader<'_, R> {
    fn bad<T>(&self, reason: impl Into<String>) -> Result<T, TrainError> {
        Err(TrainError::BadFile {
            path: self.path.to_path_buf(),
            reason: reason.into(),
        })
    }

    fn need(&self, n: u64, what: &str) -> Result<(), TrainError> {
        if n > self.left {
            return self.bad(format!(
                "truncated: {what} needs {n} bytes, {} left",
                self.left
            ));
        }
        Ok(())
    }

    fn bytes(&mut self, n: usize, what: &str) -> Result<Vec<u8>, TrainError> {
        self.need(n as u64, what)?;
        let mut buf = vec![0u8; n];
        self.inner
            .read_exact(&mut buf)
            .map_err(|source| TrainError::Io {
                path: self.path.to_path_buf(),
                source,
            })?;
        self.left -= n as u64;
        Ok(buf)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], TrainError> {
        let v = self.bytes(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(&v);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32, TrainError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64_in(&mut self, what: &str, lo: u64, hi: u64) -> Result<usize, TrainError> {
        let v = u64::from_le_bytes(self.array(what)?);
        if v < lo || v > hi {
            return self.bad(format!("{what} {v} not in {lo}..={hi}"));
        }
        usize::try_from(v).or_else(|_| self.bad(format!("{what} {v} too large")))
    }

    fn read_set(&mut self) -> Result<FeatureSet, TrainError> {
        let magic: [u8; 8] = self.array("magic")?;
        if magic != FEATURE_MAGIC {
            return self.bad(format!("wrong magic {magic:02x?}"));
        }
        let version = self.u32("version")?;
        if version != FEATURE_VERSION {
            return self.bad(format!(
                "version {version} (this build reads {FEATURE_VERSION})"
            ));
        }
        let d = self.u64_in("d", 1, MAX_FEATURE_D)?;
        let n_layer = self.u64_in("n_layer", 1, MAX_FEATURE_LAYERS)?;
        let max_windows = self.u64_in("max_windows", 1, MAX_FEATURE_WINDOWS)?;
        // Smallest possible example: empty id, one window.
        let min_example = 8 + n_layer as u64 + (n_layer as u64) * (d as u64) * 4;
        let n_examples = u64::from_le_bytes(self.array("n_examples")?);
        if n_examples > self.left / min_example {
            return self.bad(format!(
                "{n_examples} examples declared, the {} bytes left hold at most {}",
                self.left,
                self.left / min_example
            ));
        }
        let n_examples = usize::try_from(n_examples)
            .or_else(|_| self.bad(format!("n_examples {n_examples} too large")))?;
        let mut examples = Vec::with_capacity(n_examples);
        for i in 0..n_examples {
            let id_len = self.u32("id length")?;
            if id_len > MAX_ID_BYTES {
                return self.bad(format!("example {i}: id of {id_len} bytes"));
            }
            let id_bytes = self.bytes(id_len as usize, "id")?;
            let Ok(id) = String::from_utf8(id_bytes) else {
                return self.bad(format!("example {i}: id is not UTF-8"));
            };
            let n_windows = self.u32("n_windows")? as usize;
            if n_windows == 0 || n_windows > max_windows {
                return self.bad(format!(
                    "example {i}: n_windows {n_windows} not in 1..={max_windows}"
                ));
            }
            let labels = self.bytes(n_layer, "labels")?;
            let block_bytes = n_windows * d * 4;
            self.need((block_bytes as u64) * (n_layer as u64), "pooled windows")?;
            let mut pooled = Vec::with_capacity(n_layer);
            for _ in 0..n_layer {
                let raw = self.bytes(block_bytes, "pooled windows")?;
                pooled.push(
                    raw.chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                );
            }
            examples.push(ExampleFeatures {
                id,
                n_windows,
                pooled,
                labels,
            });
        }
        if self.left != 0 {
            return self.bad(format!("{} bytes after the last example", self.left));
        }
        Ok(FeatureSet {
            d,
            n_layer,
            max_windows,
            examples,
        })
    }
}

/// Hyperparameters of router training (defaults from the method).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    /// Passes over the training examples (20).
    pub epochs: usize,
    /// Peak learning rate (1e-3).
    pub lr: f64,
    /// AdamW decoupled weight decay (0.01).
    pub weight_decay: f64,
    /// Fraction of all optimiser steps spent in linear warmup (0.1).
    pub warmup_frac: f64,
    /// Examples per optimiser step (16).
    pub batch_size: usize,
    /// Focal loss focusing parameter (2.0).
    pub gamma: f32,
    /// Class-balancing parameter of the effective number of samples (0.999).
    pub beta: f32,
    /// Fraction of examples held out for validation by [`train_split`] (0.15).
    pub val_frac: f64,
    /// Router hidden width (128).
    pub hidden: usize,
    /// Seed of the initialisation, the split and the batch order.
    pub seed: u64,
    /// `"cpu"` or `"cuda"` (`"cuda:N"` for device N; needs the `cuda` feature).
    pub device: String,
    /// A block's router never predicts skip or repeat when the training labels of that block
    /// hold fewer than this many of the class (0: off). Not in the reference: class-balanced
    /// weights turn a handful of labels into a large weight, and a class seen a few times per
    /// block cannot be learned; the class's output bias is set to [`DISABLED_LOGIT`].
    pub min_class_count: usize,
    /// Standardise router inputs while training, folded into the first layer on export
    /// (false, the reference; see the module docs).
    pub standardize: bool,
    /// Where the focal loss's class weights come from (the reference's fixed label counts by
    /// default).
    pub class_weights: ClassWeights,
    /// Label smoothing epsilon: the target puts 1 - eps on the label and eps / 3 on every
    /// class (0: off, the reference).
    pub label_smoothing: f32,
    /// Blocks whose routers decide; every other block's router always executes (its skip and
    /// repeat classes are disabled). Empty: every block decides.
    pub blocks: Vec<usize>,
}

/// Where the class weights of the focal loss come from.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
pub enum ClassWeights {
    /// The reference's fixed counts 4399 / 120956 / 1457 (skip / execute / repeat), which
    /// give nearly uniform weights (about 0.92 / 0.91 / 1.18).
    #[default]
    Reference,
    /// The training set's own label counts (a few dozen repeats can weigh 30x an execute).
    Balanced,
}

/// Which searched examples the routers learn from.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
pub enum Labels {
    /// Every example with a correct path, fixed ones included, at least `min_fixed_frac` of
    /// them fixed (the reference).
    #[default]
    All,
    /// Only examples the plain model answered correctly: their kept paths keep the answer with
    /// fewer passes. Fixes of wrong answers are dropped: at 135M-270M most of them come from
    /// paths that damage the model (skipping block 1 fixes some questions and breaks most).
    OriginallyCorrect,
}

/// Parses a block list such as `8-20,25` (sorted, without repeats).
pub fn parse_blocks(s: &str) -> Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let num = |x: &str| {
            x.trim()
                .parse::<usize>()
                .map_err(|_| format!("'{x}' in '{s}' is not a block number"))
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    return Err(format!("range {part} runs backwards"));
                }
                out.extend(a..=b);
            }
            None => out.push(num(part)?),
        }
    }
    out.sort_unstable();
    out.dedup();
    if out.is_empty() {
        return Err("no blocks given".into());
    }
    Ok(out)
}

/// The label counts the reference computes its class weights from.
pub const REFERENCE_COUNTS: [usize; 3] = [4399, 120956, 1457];

/// The output bias of a class a block's router may not predict (see
/// [`TrainConfig::min_class_count`]); far below any logit a trained router produces, and
/// still finite in F16 storage.
pub const DISABLED_LOGIT: f32 = -1000.0;

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 20,
            lr: 1e-3,
            weight_decay: 0.01,
            warmup_frac: 0.1,
            batch_size: 16,
            gamma: 2.0,
            beta: 0.999,
            val_frac: 0.15,
            hidden: drllm_router_format::DEFAULT_HIDDEN,
            seed: 0,
            device: "cpu".to_string(),
            min_class_count: 0,
            standardize: false,
            class_weights: ClassWeights::Reference,
            label_smoothing: 0.0,
            blocks: Vec::new(),
        }
    }
}

impl TrainConfig {
    /// Checks every value's range.
    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |m: String| Err(TrainError::InvalidConfig(m));
        if self.epochs == 0 {
            return bad("epochs must be at least 1".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("lr {} must be finite and > 0", self.lr));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!(
                "weight_decay {} must be finite and >= 0",
                self.weight_decay
            ));
        }
        if !(0.0..=1.0).contains(&self.warmup_frac) {
            return bad(format!("warmup_frac {} not in [0, 1]", self.warmup_frac));
        }
        if self.batch_size == 0 {
            return bad("batch_size must be at least 1".into());
        }
        if !(self.gamma.is_finite() && self.gamma >= 0.0) {
            return bad(format!("gamma {} must be finite and >= 0", self.gamma));
        }
        if !(0.0..1.0).contains(&self.beta) {
            return bad(format!("beta {} not in [0, 1)", self.beta));
        }
        if !(0.0..1.0).contains(&self.val_frac) {
            return bad(format!("val_frac {} not in [0, 1)", self.val_frac));
        }
        if self.hidden == 0 || self.hidden as u64 > drllm_router_format::MAX_ROUTER_HIDDEN {
            return bad(format!(
                "hidden {} not in 1..={}",
                self.hidden,
                drllm_router_format::MAX_ROUTER_HIDDEN
            ));
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return bad(format!(
                "label_smoothing {} not in [0, 1)",
                self.label_smoothing
            ));
        }
        Ok(())
    }
}

/// Precision and recall of one class.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClassStats {
    /// Correct predictions of the class / predictions of the class (0 when never predicted).
    pub precision: f64,
    /// Correct predictions of the class / labels of the class (0 when the class is absent).
    pub recall: f64,
    /// Number of labels of the class.
    pub support: usize,
    /// Number of predictions of the class.
    pub predicted: usize,
}

/// Metrics of one epoch. Losses are per block decision (the mean focal loss over all
/// examples and blocks, i.e. the optimised sum over blocks divided by the number of blocks).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EpochReport {
    /// Epoch number, 1-based.
    pub epoch: usize,
    /// Learning rate of the epoch's last optimiser step.
    pub lr: f64,
    /// Mean training loss over the epoch's batches (weighted by batch size).
    pub train_loss: f64,
    /// Validation loss at the end of the epoch (0 with no validation examples).
    pub val_loss: f64,
    /// Fraction of validation block decisions equal to the label.
    pub val_accuracy: f64,
    /// Per class (skip, execute, repeat) on the validation set at the end of the epoch.
    pub val_per_class: [ClassStats; 3],
    /// Per class on the training set, from the predictions made during the epoch's
    /// training steps (the weights change within the epoch).
    pub train_per_class: [ClassStats; 3],
}

/// Trained routers and the training history.
#[derive(Clone, Debug)]
pub struct Trained {
    /// One router per block, f32, in the engine's layout.
    pub routers: Vec<BlockRouter>,
    /// One report per epoch.
    pub history: Vec<EpochReport>,
    /// The epoch (1-based) whose weights were kept.
    pub best_epoch: usize,
}

/// Class-balanced weights from the effective number of samples (Cui et al. 2019): w_c = (1 - beta) / (1 - beta^n_c), normalised so the weights sum to the number of classes; a class with 0 samples gets weight 0.
///
/// The weights of the present classes sum to 3 (all weights are 0 when every count is 0).
/// `beta` outside `[0, 1)` is clamped into it; `beta = 0` gives equal weights.
pub fn class_weights(counts: [usize; 3], beta: f32) -> [f32; 3] {
    let beta = if beta.is_nan() {
        0.0
    } else {
        f64::from(beta).clamp(0.0, 1.0 - 1e-12)
    };
    let raw = counts.map(|n| {
        if n == 0 {
            0.0
        } else {
            // Effective number (1 - beta^n) / (1 - beta); beta^n via exp(n ln beta).
            let bn = if beta == 0.0 {
                0.0
            } else {
                (n as f64 * beta.ln()).exp()
            };
            (1.0 - beta) / (1.0 - bn)
        }
    });
    let sum: f64 = raw.iter().sum();
    if sum <= 0.0 || !sum.is_finite() {
        return [0.0; 3];
    }
    raw.map(|w| (w * 3.0 / sum) as f32)
}

/// Focal loss (Lin et al. 2017) with per-class weights alpha: mean over rows of -alpha[y] (1 - p_y)^gamma log p_y, p = softmax(logits). logits: [N, 3], targets: [N] u32.
///
/// `gamma = 0` is the weighted cross-entropy (a plain mean over rows, not normalised by
/// the weights). Errors on wrong shapes, targets above 2, a negative or non-finite `gamma`
/// or non-finite weights.
pub fn focal_loss(
    logits: &Tensor,
    targets: &Tensor,
    alpha: &[f32; 3],
    gamma: f32,
) -> Result<Tensor, TrainError> {
    focal_loss_smoothed(logits, targets, alpha, gamma, 0.0)
}

/// [`focal_loss`] against label-smoothed targets: the mean over rows of
/// `-[(1 - eps) f_y + eps / 3 sum_c f_c]` with `f_c = alpha[c] (1 - p_c)^gamma log p_c`
/// (eps = 0 is [`focal_loss`]). `eps` must lie in `[0, 1)`.
pub fn focal_loss_smoothed(
    logits: &Tensor,
    targets: &Tensor,
    alpha: &[f32; 3],
    gamma: f32,
    eps: f32,
) -> Result<Tensor, TrainError> {
    let bad = |m: String| Err(TrainError::InvalidInput(m));
    if !(0.0..1.0).contains(&eps) {
        return bad(format!(
            "focal loss: label smoothing {eps} must be in [0, 1)"
        ));
    }
    let (n, c) = match logits.dims() {
        [n, c] => (*n, *c),
        d => {
            return bad(format!(
                "focal loss: logits of shape {d:?}, expected [N, 3]"
            ))
        }
    };
    if c != 3 || n == 0 {
        return bad(format!(
            "focal loss: logits of shape [{n}, {c}], expected [N>0, 3]"
        ));
    }
    if targets.dims() != [n] {
        return bad(format!(
            "focal loss: targets of shape {:?}, expected [{n}]",
            targets.dims()
        ));
    }
    if !(gamma.is_finite() && gamma >= 0.0) {
        return bad(format!("focal loss: gamma {gamma} must be finite and >= 0"));
    }
    if alpha.iter().any(|a| !a.is_finite()) {
        return bad(format!("focal loss: weights {alpha:?} must be finite"));
    }
    let targets = targets.to_dtype(DType::U32)?;
    if targets.to_vec1::<u32>()?.iter().any(|&t| t > 2) {
        return bad("focal loss: a target is above 2".into());
    }
    focal_loss_unchecked(logits, &targets, alpha, gamma, eps)
}

/// [`focal_loss`] without the argument checks (targets already u32 and < 3).
fn focal_loss_unchecked(
    logits: &Tensor,
    targets: &Tensor,
    alpha: &[f32; 3],
    gamma: f32,
    smoothing: f32,
) -> Result<Tensor, TrainError> {
    let logits = logits.to_dtype(DType::F32)?;
    let logp = candle_nn::ops::log_softmax(&logits, 1)?;
    let alpha_t = Tensor::new(alpha, logits.device())?;
    // the focal term alpha_c (1 - p_c)^gamma log p_c of one class per row, or of every class
    let focal = |logp_c: &Tensor, alpha_c: &Tensor| -> Result<Tensor, TrainError> {
        let weighted = logp_c.broadcast_mul(alpha_c)?;
        if gamma == 0.0 {
            return Ok(weighted);
        }
        let one_minus = logp_c.exp()?.affine(-1.0, 1.0)?.maximum(0f32)?;
        let modulator = if gamma == 1.0 {
            one_minus
        } else if gamma == 2.0 {
            one_minus.sqr()?
        } else {
            // Keep the base away from 0 so the gradient of x^gamma (gamma < 1) stays finite.
            one_minus.maximum(1e-30f32)?.powf(f64::from(gamma))?
        };
        Ok((weighted * modulator)?)
    };
    let logp_y = logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
    let alpha_y = alpha_t.index_select(targets, 0)?;
    let on_label = focal(&logp_y, &alpha_y)?;
    let per_row = if smoothing == 0.0 {
        on_label
    } else {
        // target 1 - eps on the label, eps / 3 on every class
        let all = focal(&logp, &alpha_t.unsqueeze(0)?)?.sum(1)?;
        (on_label.affine(f64::from(1.0 - smoothing), 0.0)?
            + all.affine(f64::from(smoothing) / 3.0, 0.0)?)?
    };
    Ok(per_row.mean_all()?.neg()?)
}

/// Cosine schedule with linear warmup: lr at step t of total.
///
/// Steps `0 .. warmup` ramp linearly: `base * (t + 1) / warmup` (the first step gets
/// `base / warmup`, the last warmup step `base`); then `base * (1 + cos(pi * s / (total -
/// warmup))) / 2` with `s = t - warmup`, from `base` down towards 0. Steps at or beyond
/// `total` get 0.
pub fn lr_at(step: usize, total: usize, warmup: usize, base: f64) -> f64 {
    if step >= total {
        return 0.0;
    }
    let warmup = warmup.min(total);
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    let span = (total - warmup).max(1) as f64;
    let progress = (step - warmup) as f64 / span;
    base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// Parses a device name: `"cpu"`, `"cuda"` or `"cuda:N"` (the latter two need the `cuda`
/// feature).
pub fn parse_device(name: &str) -> Result<Device, TrainError> {
    let name = name.trim();
    if name.eq_ignore_ascii_case("cpu") {
        return Ok(Device::Cpu);
    }
    let ordinal = if name.eq_ignore_ascii_case("cuda") {
        Some(0)
    } else {
        name.strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
    };
    let Some(ordinal) = ordinal else {
        return Err(TrainError::Device(format!(
            "unknown device {name:?} (expected \"cpu\", \"cuda\" or \"cuda:N\")"
        )));
    };
    if !cfg!(feature = "cuda") {
        return Err(TrainError::Device(format!(
            "device {name:?} needs a build with `--features cuda`"
        )));
    }
    Device::new_cuda(ordinal).map_err(|e| TrainError::Device(format!("cannot open {name:?}: {e}")))
}

use drllm_router_format::rng::SplitMix64;

const SALT_INIT: u64 = 0x1A2B_3C4D_5E6F_7081;
const SALT_SPLIT: u64 = 0x5EED_5B17_0000_0001;
const SALT_ORDER: u64 = 0x0DE5_0DE5_0DE5_0DE5;

/// Seed of block `block`'s Xavier initialisation for a training seed.
pub fn block_init_seed(seed: u64, block: usize) -> u64 {
    SplitMix64(seed ^ SALT_INIT ^ (block as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93)).next_u64()
}

/// Deterministic split of `0 .. n` into (train, validation) ids, both sorted:
/// `round(val_frac * n)` examples for validation (at least 1 when `val_frac > 0` and
/// `n >= 2`, and never all of them).
pub fn split_ids(n: usize, val_frac: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut perm: Vec<usize> = (0..n).collect();
    SplitMix64(seed ^ SALT_SPLIT).shuffle(&mut perm);
    let frac = if val_frac.is_finite() {
        val_frac.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let mut n_val = (frac * n as f64).round() as usize;
    if frac > 0.0 && n >= 2 {
        n_val = n_val.max(1);
    }
    n_val = n_val.min(n.saturating_sub(1));
    let mut val = perm[..n_val].to_vec();
    let mut train = perm[n_val..].to_vec();
    val.sort_unstable();
    train.sort_unstable();
    (train, val)
}

/// Router parameters of all blocks, in the engine's layout per block.
struct Params {
    /// `[L, hidden, d]`.
    w1: Tensor,
    /// `[L, 1, hidden]`.
    b1: Tensor,
    /// `[L, 3, hidden]`.
    w2: Tensor,
    /// `[L, 1, 3]`.
    b2: Tensor,
}

impl Params {
    fn from_routers(
        routers: &[BlockRouter],
        d: usize,
        hidden: usize,
        dev: &Device,
    ) -> Result<Params, TrainError> {
        let l = routers.len();
        let mut w1 = Vec::with_capacity(l * hidden * d);
        let mut b1 = Vec::with_capacity(l * hidden);
        let mut w2 = Vec::with_capacity(l * 3 * hidden);
        let mut b2 = Vec::with_capacity(l * 3);
        for r in routers {
            w1.extend_from_slice(&r.w1);
            b1.extend_from_slice(&r.b1);
            w2.extend_from_slice(&r.w2);
            b2.extend_from_slice(&r.b2);
        }
        Ok(Params {
            w1: Tensor::from_vec(w1, (l, hidden, d), dev)?,
            b1: Tensor::from_vec(b1, (l, 1, hidden), dev)?,
            w2: Tensor::from_vec(w2, (l, 3, hidden), dev)?,
            b2: Tensor::from_vec(b2, (l, 1, 3), dev)?,
        })
    }

    fn to_routers(&self) -> Result<Vec<BlockRouter>, TrainError> {
        let (l, hidden, d) = self.w1.dims3()?;
        let w1 = self.w1.flatten_all()?.to_vec1::<f32>()?;
        let b1 = self.b1.flatten_all()?.to_vec1::<f32>()?;
        let w2 = self.w2.flatten_all()?.to_vec1::<f32>()?;
        let b2 = self.b2.flatten_all()?.to_vec1::<f32>()?;
        Ok((0..l)
            .map(|i| BlockRouter {
                w1: w1[i * hidden * d..(i + 1) * hidden * d].to_vec(),
                b1: b1[i * hidden..(i + 1) * hidden].to_vec(),
                w2: w2[i * 3 * hidden..(i + 1) * 3 * hidden].to_vec(),
                b2: [b2[i * 3], b2[i * 3 + 1], b2[i * 3 + 2]],
            })
            .collect())
    }

    /// Averaged logits `[L, B, 3]` for inputs `x: [L, S, d]` and the averaging matrix
    /// `avg: [L, B, S]`.
    fn forward(&self, x: &Tensor, avg: &Tensor) -> Result<Tensor, TrainError> {
        Ok(self.forward_full(x, avg)?.logits)
    }

    /// [`Params::forward`], keeping the first layer's pre-activations and the tanh of the
    /// GELU for [`Params::backward`].
    fn forward_full(&self, x: &Tensor, avg: &Tensor) -> Result<Activations, TrainError> {
        let pre = x.matmul(&self.w1.t()?)?.broadcast_add(&self.b1)?;
        let (act, tanh) = gelu_parts(&pre)?;
        let z = act.matmul(&self.w2.t()?)?;
        let logits = avg.matmul(&z)?.broadcast_add(&self.b2)?;
        Ok(Activations {
            pre,
            tanh,
            act,
            logits,
        })
    }

    /// Gradients `[w1, b1, w2, b2]` from the gradient of the loss with respect to the
    /// averaged logits `g_logits: [L, B, 3]`, written out by hand: candle's autograd would
    /// also compute the (unused, large) gradient with respect to the inputs `x`.
    fn backward(
        &self,
        x: &Tensor,
        avg: &Tensor,
        fwd: &Activations,
        g_logits: &Tensor,
    ) -> Result<[Tensor; 4], TrainError> {
        let g_b2 = g_logits.sum_keepdim(1)?;
        let g_z = avg.t()?.matmul(g_logits)?; // [L, S, 3]
        let g_w2 = g_z.t()?.matmul(&fwd.act)?; // [L, 3, H]
        let g_act = g_z.matmul(&self.w2)?; // [L, S, H]
        let g_pre = (g_act * gelu_tanh_grad(&fwd.pre, &fwd.tanh)?)?;
        let g_b1 = g_pre.sum_keepdim(1)?;
        let g_w1 = g_pre.t()?.matmul(x)?; // [L, H, d]
        Ok([g_w1, g_b1, g_w2, g_b2])
    }
}

/// Intermediate values of one forward pass.
struct Activations {
    /// `[L, S, H]` first layer output before GELU.
    pre: Tensor,
    /// `[L, S, H]` `tanh(c (pre + k pre^3))` inside the GELU.
    tanh: Tensor,
    /// `[L, S, H]` after GELU.
    act: Tensor,
    /// `[L, B, 3]` averaged logits.
    logits: Tensor,
}

/// `sqrt(2 / pi)` of the tanh-approximated GELU.
const GELU_C: f64 = 0.797_884_560_802_865_4;
/// Cubic coefficient of the tanh-approximated GELU.
const GELU_K: f64 = 0.044_715;

/// GELU, tanh approximation, as candle tensor ops:
/// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))` (the formula of
/// [`drllm_router_format::gelu_tanh`] and of candle's `Tensor::gelu`); the router graph of
/// training and of [`candle_logits`] uses it.
pub fn gelu_tanh_tensor(x: &Tensor) -> Result<Tensor, TrainError> {
    Ok(gelu_parts(x)?.0)
}

/// GELU and the inner `tanh` (reused by the backward pass).
fn gelu_parts(x: &Tensor) -> Result<(Tensor, Tensor), TrainError> {
    let inner = (x * x.sqr()?.affine(GELU_C * GELU_K, GELU_C)?)?;
    let t = inner.tanh()?;
    let act = (x * t.affine(0.5, 0.5)?)?;
    Ok((act, t))
}

/// Derivative of the tanh-approximated GELU from `x` and `t = tanh(c (x + k x^3))`:
/// `0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 k x^2)`.
fn gelu_tanh_grad(x: &Tensor, t: &Tensor) -> Result<Tensor, TrainError> {
    let left = t.affine(0.5, 0.5)?;
    let one_minus_t2 = t.sqr()?.affine(-1.0, 1.0)?;
    let slope = x.sqr()?.affine(0.5 * GELU_C * 3.0 * GELU_K, 0.5 * GELU_C)?;
    let right = ((x * one_minus_t2)? * slope)?;
    Ok((left + right)?)
}

/// One batch of examples on the device.
struct Batch {
    /// `[L, S, d]` window means, examples packed.
    x: Tensor,
    /// `[L, B, S]`: row `b` holds `1 / W_b` on example `b`'s windows.
    avg: Tensor,
    /// `[L * B]` labels, block-major.
    targets: Tensor,
    /// Host copy of `targets`.
    labels: Vec<u8>,
}

fn make_batch(fs: &FeatureSet, ids: &[usize], dev: &Device) -> Result<Batch, TrainError> {
    let (l, d, b) = (fs.n_layer, fs.d, ids.len());
    let exs: Vec<&ExampleFeatures> = ids.iter().filter_map(|&i| fs.examples.get(i)).collect();
    if exs.len() != b || b == 0 {
        return Err(TrainError::InvalidInput(format!(
            "batch of ids {ids:?} out of range for {} examples",
            fs.examples.len()
        )));
    }
    let s: usize = exs.iter().map(|e| e.n_windows).sum();
    let mut x = Vec::with_capacity(l * s * d);
    for blk in 0..l {
        for e in &exs {
            x.extend_from_slice(&e.pooled[blk]);
        }
    }
    let mut avg_row = vec![0f32; b * s];
    let mut off = 0;
    for (i, e) in exs.iter().enumerate() {
        let inv = 1.0 / e.n_windows as f32;
        avg_row[i * s + off..i * s + off + e.n_windows].fill(inv);
        off += e.n_windows;
    }
    let mut labels = Vec::with_capacity(l * b);
    for blk in 0..l {
        labels.extend(exs.iter().map(|e| e.labels[blk]));
    }
    let targets: Vec<u32> = labels.iter().map(|&v| u32::from(v)).collect();
    Ok(Batch {
        x: Tensor::from_vec(x, (l, s, d), dev)?,
        avg: Tensor::from_vec(avg_row, (1, b, s), dev)?
            .broadcast_as((l, b, s))?
            .contiguous()?,
        targets: Tensor::from_vec(targets, l * b, dev)?,
        labels,
    })
}

/// Confusion counts `[label][prediction]`.
#[derive(Clone, Copy, Default)]
struct Confusion([[usize; 3]; 3]);

impl Confusion {
    fn add(&mut self, logits: &[f32], labels: &[u8]) {
        for (row, &y) in logits.chunks_exact(3).zip(labels) {
            let pred = Decision::from_logits(&[row[0], row[1], row[2]]).class();
            self.0[usize::from(y).min(2)][pred] += 1;
        }
    }

    fn stats(&self) -> [ClassStats; 3] {
        std::array::from_fn(|c| {
            let tp = self.0[c][c];
            let support: usize = self.0[c].iter().sum();
            let predicted: usize = (0..3).map(|y| self.0[y][c]).sum();
            let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
            ClassStats {
                precision: ratio(tp, predicted),
                recall: ratio(tp, support),
                support,
                predicted,
            }
        })
    }

    fn accuracy(&self) -> f64 {
        let total: usize = self.0.iter().flatten().sum();
        let right: usize = (0..3).map(|c| self.0[c][c]).sum();
        if total == 0 {
            0.0
        } else {
            right as f64 / total as f64
        }
    }
}

/// Mean F1 (harmonic mean of precision and recall; 0 when both are 0) over the classes present
/// in the labels (support > 0); 0 when none is.
pub fn macro_f1(stats: &[ClassStats; 3]) -> f64 {
    let present: Vec<f64> = stats
        .iter()
        .filter(|s| s.support > 0)
        .map(|s| {
            if s.precision + s.recall > 0.0 {
                2.0 * s.precision * s.recall / (s.precision + s.recall)
            } else {
                0.0
            }
        })
        .collect();
    if present.is_empty() {
        0.0
    } else {
        present.iter().sum::<f64>() / present.len() as f64
    }
}

/// Mean recall over the classes present (support > 0); 0 when none is.
pub fn macro_recall(stats: &[ClassStats; 3]) -> f64 {
    let present: Vec<f64> = stats
        .iter()
        .filter(|s| s.support > 0)
        .map(|s| s.recall)
        .collect();
    if present.is_empty() {
        0.0
    } else {
        present.iter().sum::<f64>() / present.len() as f64
    }
}

/// Examples per forward pass when evaluating without gradients.
const EVAL_CHUNK: usize = 64;

/// Forward over `ids` in chunks without gradients: (mean loss per decision, confusion).
/// The loss is of the unmasked logits; the confusion counts the decisions of the exported
/// routers (`mask`: `[L, 1, 3]`, [`DISABLED_LOGIT`] for a class a block may not predict).
fn evaluate(
    p: &Params,
    fs: &FeatureSet,
    ids: &[usize],
    alpha: &[f32; 3],
    gamma: f32,
    mask: &Tensor,
    dev: &Device,
) -> Result<(f64, Confusion), TrainError> {
    let mut conf = Confusion::default();
    let mut loss_sum = 0f64;
    let mut n = 0usize;
    for chunk in ids.chunks(EVAL_CHUNK) {
        let batch = make_batch(fs, chunk, dev)?;
        let logits = p.forward(&batch.x, &batch.avg)?;
        let flat = logits.reshape((batch.labels.len(), 3))?;
        let loss = focal_loss_unchecked(&flat, &batch.targets, alpha, gamma, 0.0)?;
        loss_sum += f64::from(loss.to_scalar::<f32>()?) * batch.labels.len() as f64;
        n += batch.labels.len();
        let masked = logits
            .broadcast_add(mask)?
            .reshape((batch.labels.len(), 3))?;
        conf.add(&masked.flatten_all()?.to_vec1::<f32>()?, &batch.labels);
    }
    Ok((if n == 0 { 0.0 } else { loss_sum / n as f64 }, conf))
}

fn check_ids(fs: &FeatureSet, ids: &[usize], what: &str) -> Result<(), TrainError> {
    if let Some(&i) = ids.iter().find(|&&i| i >= fs.examples.len()) {
        return Err(TrainError::InvalidInput(format!(
            "{what} id {i} out of range for {} examples",
            fs.examples.len()
        )));
    }
    Ok(())
}

/// Trains one router per block jointly (sum of the blocks' losses), on the examples in `train_ids`, validating on `val_ids` each epoch.
/// Per example and block: run the MLP on each of the W window means, AVERAGE the W logit vectors (exactly the inference rule), focal loss on the averaged logits.
/// AdamW (candle_nn::AdamW; lr, weight decay) with the cosine-warmup schedule applied per step; Xavier-uniform init with zero biases (deterministic from seed); keep the weights of the epoch with the best validation macro-F1 (ties: lower val loss) — collapse to "always execute" is the known failure mode, so report per-class precision and recall every epoch.
///
/// Details: class weights come from the label counts of `train_ids` ([`class_weights`]);
/// block `i` starts from `BlockRouter::xavier(d, hidden, block_init_seed(seed, i))`; the
/// batch order is reshuffled every epoch from the seed; the last batch of an epoch may be
/// smaller. Macro-F1 averages the F1 of the classes present in the validation set.
/// With no validation ids, the epoch is chosen by the same rule on the training metrics.
/// `progress` is called after every epoch.
pub fn train(
    fs: &FeatureSet,
    cfg: &TrainConfig,
    train_ids: &[usize],
    val_ids: &[usize],
    progress: &mut dyn FnMut(&EpochReport),
) -> Result<Trained, TrainError> {
    cfg.validate()?;
    fs.validate()?;
    if train_ids.is_empty() {
        return Err(TrainError::InvalidInput("no training examples".into()));
    }
    check_ids(fs, train_ids, "training")?;
    check_ids(fs, val_ids, "validation")?;
    let dev = parse_device(&cfg.device)?;
    let (l, d, hidden) = (fs.n_layer, fs.d, cfg.hidden);
    let norm = cfg.standardize.then(|| Standardizer::fit(fs, train_ids));
    let standardized = norm.as_ref().map(|n| n.apply(fs));
    let fs = standardized.as_ref().unwrap_or(fs);

    let alpha = match cfg.class_weights {
        ClassWeights::Reference => class_weights(REFERENCE_COUNTS, cfg.beta),
        ClassWeights::Balanced => {
            class_weights(fs.class_counts_of(train_ids.iter().copied()), cfg.beta)
        }
    };
    let disabled = disabled_by_config(cfg, fs, train_ids)?;
    let mask_host: Vec<f32> = disabled
        .iter()
        .flat_map(|d| d.map(|off| if off { DISABLED_LOGIT } else { 0.0 }))
        .collect();
    let mask = Tensor::from_vec(mask_host, (l, 1, 3), &dev)?;
    let mut run = Optimisation::new(fs, cfg, train_ids.len(), d, hidden, &dev, alpha)?;
    let mut rng = SplitMix64(cfg.seed ^ SALT_ORDER);
    let mut order = train_ids.to_vec();
    let mut history = Vec::with_capacity(cfg.epochs);
    let mut best: Option<(f64, f64, usize, Vec<BlockRouter>)> = None;

    for epoch in 1..=cfg.epochs {
        rng.shuffle(&mut order);
        let (loss_sum, lr, train_conf) = run.epoch(&order)?;
        let train_loss = loss_sum / train_ids.len() as f64;
        if !train_loss.is_finite() {
            return Err(TrainError::Diverged { epoch });
        }
        let (val_loss, val_conf) =
            evaluate(&run.params, fs, val_ids, &alpha, cfg.gamma, &mask, &dev)?;
        if !val_loss.is_finite() {
            return Err(TrainError::Diverged { epoch });
        }
        let report = EpochReport {
            epoch,
            lr,
            train_loss,
            val_loss,
            val_accuracy: val_conf.accuracy(),
            val_per_class: val_conf.stats(),
            train_per_class: train_conf.stats(),
        };
        let (score, tie_loss) = if val_ids.is_empty() {
            (macro_f1(&report.train_per_class), train_loss)
        } else {
            (macro_f1(&report.val_per_class), val_loss)
        };
        let better = match &best {
            None => true,
            Some((s, bl, _, _)) => score > *s || (score == *s && tie_loss < *bl),
        };
        if better {
            let routers = exported_routers(&run.params, norm.as_ref(), &disabled)?;
            best = Some((score, tie_loss, epoch, routers));
        }
        progress(&report);
        history.push(report);
    }
    let (_, _, best_epoch, routers) = best.ok_or_else(|| {
        TrainError::InvalidConfig("no epoch was run (epochs must be at least 1)".into())
    })?;
    Ok(Trained {
        routers,
        history,
        best_epoch,
    })
}

/// Per block, the classes its router may never predict: those with fewer than
/// `min_class_count` training labels, and skip and repeat of every block outside `blocks`
/// (when given).
fn disabled_by_config(
    cfg: &TrainConfig,
    fs: &FeatureSet,
    train_ids: &[usize],
) -> Result<Vec<[bool; 3]>, TrainError> {
    let l = fs.n_layer;
    if let Some(b) = cfg.blocks.iter().find(|&&b| b >= l) {
        return Err(TrainError::InvalidConfig(format!(
            "blocks: block {b} does not exist ({l} blocks)"
        )));
    }
    let mut disabled = disabled_classes(&fs.block_class_counts(train_ids), cfg.min_class_count);
    if !cfg.blocks.is_empty() {
        for (b, off) in disabled.iter_mut().enumerate() {
            if !cfg.blocks.contains(&b) {
                *off = [true, false, true];
            }
        }
    }
    Ok(disabled)
}

/// The routers of the current weights as they are exported: the standardisation folded into
/// the first layer, disabled classes' output biases at [`DISABLED_LOGIT`].
fn exported_routers(
    params: &Params,
    norm: Option<&Standardizer>,
    disabled: &[[bool; 3]],
) -> Result<Vec<BlockRouter>, TrainError> {
    let mut routers = params.to_routers()?;
    if let Some(n) = norm {
        n.fold(&mut routers);
    }
    for (r, off) in routers.iter_mut().zip(disabled) {
        for (b, &o) in r.b2.iter_mut().zip(off) {
            if o {
                *b = DISABLED_LOGIT;
            }
        }
    }
    Ok(routers)
}

/// The weights being trained, their optimiser and its schedule.
struct Optimisation<'a> {
    fs: &'a FeatureSet,
    cfg: &'a TrainConfig,
    dev: &'a Device,
    alpha: [f32; 3],
    vars: [Var; 4],
    /// Tensors sharing the variables' storage (they see every optimiser update).
    params: Params,
    opt: AdamW,
    total: usize,
    warmup: usize,
    step: usize,
}

impl<'a> Optimisation<'a> {
    /// Xavier-initialised routers (block `i` from [`block_init_seed`]) and AdamW.
    fn new(
        fs: &'a FeatureSet,
        cfg: &'a TrainConfig,
        n_train: usize,
        d: usize,
        hidden: usize,
        dev: &'a Device,
        alpha: [f32; 3],
    ) -> Result<Self, TrainError> {
        let init: Vec<BlockRouter> = (0..fs.n_layer)
            .map(|i| BlockRouter::xavier(d, hidden, block_init_seed(cfg.seed, i)))
            .collect();
        let p0 = Params::from_routers(&init, d, hidden, dev)?;
        let vars = [
            Var::from_tensor(&p0.w1)?,
            Var::from_tensor(&p0.b1)?,
            Var::from_tensor(&p0.w2)?,
            Var::from_tensor(&p0.b2)?,
        ];
        // The forward pass needs no graph (gradients are written out by hand); the tensors
        // share the variables' storage, so they see every optimiser update.
        let params = Params {
            w1: vars[0].as_detached_tensor(),
            b1: vars[1].as_detached_tensor(),
            w2: vars[2].as_detached_tensor(),
            b2: vars[3].as_detached_tensor(),
        };
        let opt = AdamW::new(
            vars.to_vec(),
            ParamsAdamW {
                lr: cfg.lr,
                weight_decay: cfg.weight_decay,
                ..ParamsAdamW::default()
            },
        )?;
        let steps_per_epoch = n_train.div_ceil(cfg.batch_size);
        let total = steps_per_epoch * cfg.epochs;
        let warmup = ((cfg.warmup_frac * total as f64).round() as usize).min(total);
        Ok(Optimisation {
            fs,
            cfg,
            dev,
            alpha,
            vars,
            params,
            opt,
            total,
            warmup,
            step: 0,
        })
    }

    /// One pass over `order` in batches: the summed loss (times batch sizes), the last
    /// learning rate and the training confusion.
    fn epoch(&mut self, order: &[usize]) -> Result<(f64, f64, Confusion), TrainError> {
        let (cfg, l) = (self.cfg, self.fs.n_layer);
        let mut loss_sum = 0f64;
        let mut lr = cfg.lr;
        let mut train_conf = Confusion::default();
        for chunk in order.chunks(cfg.batch_size) {
            let batch = make_batch(self.fs, chunk, self.dev)?;
            let fwd = self.params.forward_full(&batch.x, &batch.avg)?;
            let (b, n) = (chunk.len(), batch.labels.len());
            let flat = fwd.logits.reshape((n, 3))?;
            // Autograd for the loss only (from the averaged logits); the MLP's gradients are
            // written out in `Params::backward`.
            let leaf = Var::from_tensor(&flat)?;
            let mean = focal_loss_unchecked(
                leaf.as_tensor(),
                &batch.targets,
                &self.alpha,
                cfg.gamma,
                cfg.label_smoothing,
            )?;
            // Sum over blocks of each block's mean over the batch.
            let loss = (&mean * l as f64)?;
            let mut grads = loss.backward()?;
            let g_logits = grads
                .remove(leaf.as_tensor())
                .ok_or_else(|| TrainError::InvalidInput("no gradient for the logits".into()))?
                .reshape((l, b, 3))?;
            let g = self
                .params
                .backward(&batch.x, &batch.avg, &fwd, &g_logits)?;
            for (var, g) in self.vars.iter().zip(g) {
                grads.insert(var.as_tensor(), g);
            }
            lr = lr_at(self.step, self.total, self.warmup, cfg.lr);
            self.opt.set_learning_rate(lr);
            self.opt.step(&grads)?;
            self.step += 1;
            loss_sum += f64::from(mean.to_scalar::<f32>()?) * chunk.len() as f64;
            train_conf.add(&flat.flatten_all()?.to_vec1::<f32>()?, &batch.labels);
        }
        Ok((loss_sum, lr, train_conf))
    }
}

/// Per block and input dimension, the mean and inverse standard deviation of the router inputs
/// (window means) of a training set: the affine map `(x - mean) * inv_std` applied to the inputs
/// while training, folded into each router's first layer afterwards.
#[derive(Clone, Debug, PartialEq)]
pub struct Standardizer {
    /// `[block][dimension]`.
    pub mean: Vec<Vec<f32>>,
    /// `[block][dimension]`.
    pub inv_std: Vec<Vec<f32>>,
}

impl Standardizer {
    /// Fits on the windows of the examples `ids`. A dimension's standard deviation is floored at
    /// 1% of the block's mean standard deviation (and 1e-6), so a constant input cannot blow up
    /// the folded weights.
    pub fn fit(fs: &FeatureSet, ids: &[usize]) -> Standardizer {
        let d = fs.d;
        let mut mean = Vec::with_capacity(fs.n_layer);
        let mut inv_std = Vec::with_capacity(fs.n_layer);
        for b in 0..fs.n_layer {
            let mut sum = vec![0f64; d];
            let mut sq = vec![0f64; d];
            let mut n = 0usize;
            for ex in ids.iter().filter_map(|&i| fs.examples.get(i)) {
                let Some(p) = ex.pooled.get(b) else { continue };
                for w in p.chunks_exact(d) {
                    for ((s, q), &v) in sum.iter_mut().zip(sq.iter_mut()).zip(w) {
                        *s += f64::from(v);
                        *q += f64::from(v) * f64::from(v);
                    }
                    n += 1;
                }
            }
            let n = n.max(1) as f64;
            let m: Vec<f64> = sum.iter().map(|s| s / n).collect();
            let sd: Vec<f64> = sq
                .iter()
                .zip(&m)
                .map(|(q, m)| (q / n - m * m).max(0.0).sqrt())
                .collect();
            let floor = (0.01 * sd.iter().sum::<f64>() / d.max(1) as f64).max(1e-6);
            mean.push(m.iter().map(|&v| v as f32).collect());
            inv_std.push(sd.iter().map(|&v| (1.0 / v.max(floor)) as f32).collect());
        }
        Standardizer { mean, inv_std }
    }

    /// A copy of `fs` with every window standardised.
    pub fn apply(&self, fs: &FeatureSet) -> FeatureSet {
        let mut out = fs.clone();
        for ex in &mut out.examples {
            for (b, p) in ex.pooled.iter_mut().enumerate() {
                let (m, s) = (&self.mean[b], &self.inv_std[b]);
                for w in p.chunks_exact_mut(fs.d) {
                    for ((v, m), s) in w.iter_mut().zip(m).zip(s) {
                        *v = (*v - m) * s;
                    }
                }
            }
        }
        out
    }

    /// Folds the standardisation into routers trained on standardised inputs: afterwards they
    /// give the same logits on raw inputs (up to rounding). `W1' = W1 diag(inv_std)`,
    /// `b1' = b1 - W1' mean`.
    pub fn fold(&self, routers: &mut [BlockRouter]) {
        for (b, r) in routers.iter_mut().enumerate() {
            let (m, s) = (&self.mean[b], &self.inv_std[b]);
            let d = m.len();
            for (h, row) in r.w1.chunks_exact_mut(d).enumerate() {
                let mut shift = 0f64;
                for ((w, m), s) in row.iter_mut().zip(m).zip(s) {
                    *w *= s;
                    shift += f64::from(*w) * f64::from(*m);
                }
                if let Some(bias) = r.b1.get_mut(h) {
                    *bias = (f64::from(*bias) - shift) as f32;
                }
            }
        }
    }
}

/// Per block, which classes its router may not predict: skip or repeat with fewer than
/// `min_count` labels (execute never).
pub fn disabled_classes(counts: &[[usize; 3]], min_count: usize) -> Vec<[bool; 3]> {
    counts
        .iter()
        .map(|c| [c[0] < min_count, false, c[2] < min_count])
        .collect()
}

/// Convenience: deterministic split by cfg.val_frac and cfg.seed, then train.
///
/// The split is [`split_ids`]`(fs.examples.len(), cfg.val_frac, cfg.seed)`.
pub fn train_split(
    fs: &FeatureSet,
    cfg: &TrainConfig,
    progress: &mut dyn FnMut(&EpochReport),
) -> Result<Trained, TrainError> {
    let (tr, va) = split_ids(fs.examples.len(), cfg.val_frac, cfg.seed);
    train(fs, cfg, &tr, &va, progress)
}

/// Averaged logits of trained routers on every example and block, computed with candle (the
/// same graph as in training): `[example][block]`.
pub fn candle_logits(
    routers: &[BlockRouter],
    fs: &FeatureSet,
    device: &str,
) -> Result<Vec<Vec<[f32; 3]>>, TrainError> {
    fs.validate()?;
    if routers.len() != fs.n_layer {
        return Err(TrainError::InvalidInput(format!(
            "{} routers for {} blocks",
            routers.len(),
            fs.n_layer
        )));
    }
    let hidden = routers.first().map_or(0, BlockRouter::hidden);
    for (i, r) in routers.iter().enumerate() {
        if hidden == 0
            || r.hidden() != hidden
            || r.d() != fs.d
            || r.w1.len() != hidden * fs.d
            || r.w2.len() != 3 * hidden
        {
            return Err(TrainError::InvalidInput(format!(
                "router {i}: d {} hidden {} (w1 {}, w2 {}) does not match d {} hidden {hidden}",
                r.d(),
                r.hidden(),
                r.w1.len(),
                r.w2.len(),
                fs.d
            )));
        }
    }
    let dev = parse_device(device)?;
    let p = Params::from_routers(routers, fs.d, hidden, &dev)?;
    let l = fs.n_layer;
    let ids: Vec<usize> = (0..fs.examples.len()).collect();
    let mut out = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(EVAL_CHUNK) {
        let batch = make_batch(fs, chunk, &dev)?;
        let flat = p
            .forward(&batch.x, &batch.avg)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let b = chunk.len();
        for e in 0..b {
            out.push(
                (0..l)
                    .map(|blk| {
                        let k = (blk * b + e) * 3;
                        [flat[k], flat[k + 1], flat[k + 2]]
                    })
                    .collect(),
            );
        }
    }
    Ok(out)
}

/// Decisions of trained routers on features, computed with candle (the same graph used in training), for comparison with the engine's router code.
///
/// `[example][block]` classes (0 skip, 1 execute, 2 repeat), argmax as
/// [`Decision::from_logits`] (ties to the lower class, NaN to execute).
pub fn candle_decisions(
    routers: &[BlockRouter],
    fs: &FeatureSet,
    device: &str,
) -> Result<Vec<Vec<u8>>, TrainError> {
    Ok(candle_logits(routers, fs, device)?
        .into_iter()
        .map(|ex| {
            ex.iter()
                .map(|l| Decision::from_logits(l).class() as u8)
                .collect()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hand-written backward pass equals candle's autograd through the same graph.
    #[test]
    fn backward_matches_autograd() -> Result<(), TrainError> {
        let dev = Device::Cpu;
        let (d, l, hidden) = (5, 3, 7);
        let mut rng = SplitMix64(3);
        let mut val = move || (rng.next_u64() >> 40) as f32 / (1u32 << 24) as f32 * 4.0 - 2.0;
        let examples = (0..4)
            .map(|i| {
                let n_windows = 1 + i % 3;
                ExampleFeatures {
                    id: format!("e{i}"),
                    n_windows,
                    pooled: (0..l)
                        .map(|_| (0..n_windows * d).map(|_| val()).collect())
                        .collect(),
                    labels: (0..l).map(|b| ((i + b) % 3) as u8).collect(),
                }
            })
            .collect();
        let fs = FeatureSet {
            d,
            n_layer: l,
            max_windows: 8,
            examples,
        };
        let mut routers: Vec<BlockRouter> = (0..l)
            .map(|i| BlockRouter::xavier(d, hidden, i as u64))
            .collect();
        for r in &mut routers {
            r.b1.iter_mut().for_each(|b| *b = val() * 0.3);
            r.b2 = [val(), val(), val()];
        }
        let p = Params::from_routers(&routers, d, hidden, &dev)?;
        let batch = make_batch(&fs, &[0, 1, 2, 3], &dev)?;
        let alpha = [0.7, 0.3, 2.0];
        for gamma in [0.0f32, 2.0] {
            // Autograd through everything.
            let vars = [
                Var::from_tensor(&p.w1)?,
                Var::from_tensor(&p.b1)?,
                Var::from_tensor(&p.w2)?,
                Var::from_tensor(&p.b2)?,
            ];
            let pv = Params {
                w1: vars[0].as_tensor().clone(),
                b1: vars[1].as_tensor().clone(),
                w2: vars[2].as_tensor().clone(),
                b2: vars[3].as_tensor().clone(),
            };
            let logits = pv.forward(&batch.x, &batch.avg)?.reshape((l * 4, 3))?;
            let loss = (focal_loss_unchecked(&logits, &batch.targets, &alpha, gamma, 0.0)? * 3.0)?;
            let auto = loss.backward()?;
            // By hand.
            let fwd = p.forward_full(&batch.x, &batch.avg)?;
            let leaf = Var::from_tensor(&fwd.logits.reshape((l * 4, 3))?)?;
            let loss =
                (focal_loss_unchecked(leaf.as_tensor(), &batch.targets, &alpha, gamma, 0.0)?
                    * 3.0)?;
            let g = loss.backward()?;
            let g_logits = g.get(leaf.as_tensor()).expect("grad").reshape((l, 4, 3))?;
            let hand = p.backward(&batch.x, &batch.avg, &fwd, &g_logits)?;
            for (k, (var, h)) in vars.iter().zip(&hand).enumerate() {
                let a = auto.get(var.as_tensor()).expect("auto grad");
                assert_eq!(a.dims(), h.dims(), "param {k}");
                let a = a.flatten_all()?.to_vec1::<f32>()?;
                let h = h.flatten_all()?.to_vec1::<f32>()?;
                let scale = a.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-3);
                for (x, y) in a.iter().zip(&h) {
                    assert!(
                        (x - y).abs() <= 1e-5 * scale,
                        "param {k} gamma {gamma}: {x} vs {y}"
                    );
                }
            }
        }
        Ok(())
    }
}
