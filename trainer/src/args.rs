//! The command line of `drllm-train`: one argument struct per command, built from shared
//! groups (the model and run folder, a question set, shards, the prefix cache). Every default
//! is read from [`crate::defaults`] or a settings struct's `Default`, so the command line, the
//! help text and the commands that run other commands (`pipeline`) agree.
//!
//! The commands themselves are library functions in the module that owns their work
//! (`search::run_search`, `oracle::run_oracle`, `predict::run_predictability`,
//! `compare::run_compare`, `routers::run_train`, `routers::run_export`,
//! `eval::run_calibrate`, `prune::run_prune`, `eval::run_eval`, `pipeline::run_pipeline`,
//! `shards::run_merge`, `data::run_fetch`); the binary only parses and dispatches.

use crate::data::{self, DataError};
use crate::defaults as d;
use crate::error::Error;
use crate::mcts::{MctsConfig, RewardKind};
use crate::scoring::Scoring;
use crate::tasks::{Example, McScorer, DEFAULT_LABELS};
use crate::train::{ClassWeights, Labels, TrainConfig};
use clap::Args;
use drllm_engine::router_format::base_model_info_from;
use drllm_engine::{DeviceChoice, Model, Session, SessionOptions, Tokenizer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The model, where its data and runs live, and how it runs (every command takes these).
#[derive(Args, Clone, Debug)]
pub struct Common {
    /// GGUF model.
    #[arg(short = 'm', long = "model", default_value = d::MODEL)]
    pub model: PathBuf,
    /// Data directory (written by `drllm-train data fetch`; on a cluster, a folder every node
    /// sees).
    #[arg(long, default_value = d::DATA_DIR)]
    pub data_dir: PathBuf,
    /// Output directory of this model's runs (default runs/MODEL_STEM).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// CPU threads (default: the engine's, the number of cores).
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    /// Device for the engine (auto or cpu).
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// Multiple-choice scoring: continuation (mean log-probability of each answer text after
    /// the bare question, as llama.cpp scores) or letters (option letters' logits after a
    /// prompt listing the options). Search, training and evaluation must use the same.
    #[arg(long, value_enum, default_value_t = Scoring::default())]
    pub scoring: Scoring,
}

/// What a command that runs the model loads.
pub struct Loaded {
    pub model: Arc<Model>,
    pub tokenizer: Tokenizer,
    pub scorer: McScorer,
    /// The base model's fingerprint (results and sidecars record it).
    pub fingerprint: String,
}

impl Common {
    /// `--run-dir`, or runs/MODEL_STEM.
    pub fn run_dir(&self) -> PathBuf {
        self.run_dir.clone().unwrap_or_else(|| {
            let stem = self
                .model
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into());
            PathBuf::from(d::RUNS_DIR).join(stem)
        })
    }

    /// The model's file stem (titles of reports).
    pub fn model_stem(&self) -> String {
        self.model
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// `-t`, or the engine's default.
    pub fn threads(&self) -> usize {
        self.threads
            .unwrap_or_else(|| SessionOptions::default().n_threads)
    }

    /// Loads the model, its tokenizer, the multiple-choice scorer and the fingerprint.
    pub fn load(&self) -> Result<Loaded, Error> {
        if !self.model.exists() {
            return Err(Error::refused(format!(
                "model {} not found (scripts/setup.sh --models fetches the defaults)",
                self.model.display()
            )));
        }
        let model = Arc::new(Model::load(&self.model, self.device)?);
        let tokenizer = Tokenizer::load(&self.model)?;
        // continuation scoring (the default) needs the letter tokens only for questions
        // without answer texts, so a tokenizer without them is refused only when asked
        let scorer = match McScorer::new(&tokenizer, &DEFAULT_LABELS) {
            Ok(s) => s,
            Err(e) if self.scoring == Scoring::Continuation => {
                eprintln!(
                    "[note] this tokenizer cannot score by option letters ({e}); continuation \
                     scoring of questions with answer texts does not need it"
                );
                McScorer::unavailable(e.to_string())
            }
            Err(e) => return Err(e.into()),
        };
        let fingerprint = base_model_info_from(model.gguf(), model.path())?.fingerprint;
        Ok(Loaded {
            model,
            tokenizer,
            scorer,
            fingerprint,
        })
    }

    /// A session with the trainer's context and prefill sizes.
    pub fn session(&self, model: &Arc<Model>) -> Result<Session, Error> {
        Ok(Session::new(
            model.clone(),
            SessionOptions {
                n_ctx: d::N_CTX,
                n_threads: self.threads(),
                n_ubatch: d::N_UBATCH,
            },
        )?)
    }
}

/// A task's split.
#[derive(Args, Clone, Debug)]
pub struct TaskSplit {
    /// Task (read from DATA_DIR/TASK-SPLIT.jsonl): arc_easy, arc_challenge, openbookqa, piqa,
    /// gsm8k.
    #[arg(long, default_value = d::TASK)]
    pub task: String,
    /// Split.
    #[arg(long, default_value = d::SEARCH_SPLIT)]
    pub split: String,
}

impl TaskSplit {
    /// `RUN_DIR/KIND-TASK-SPLIT.jsonl`: the results file of a search or oracle run.
    pub fn results_in(&self, run_dir: &Path, kind: &str) -> PathBuf {
        run_dir.join(format!("{kind}-{}-{}.jsonl", self.task, self.split))
    }
}

/// The questions of a search, an oracle table or a merge: the first N of a split.
#[derive(Args, Clone, Debug)]
pub struct Questions {
    #[command(flatten)]
    pub set: TaskSplit,
    /// Only the first N questions.
    #[arg(long)]
    pub limit: Option<usize>,
}

impl Questions {
    /// The questions, in data order.
    pub fn load(&self, data_dir: &Path) -> Result<Vec<Example>, DataError> {
        let mut v = data::load(data_dir, &self.set.task, &self.set.split)?;
        if let Some(n) = self.limit {
            v.truncate(n);
        }
        Ok(v)
    }
}

/// Parses `--shard i/n` (i < n).
pub fn parse_shard(s: &str) -> Result<(usize, usize), String> {
    s.split_once('/')
        .and_then(|(i, n)| {
            Some((
                i.trim().parse::<usize>().ok()?,
                n.trim().parse::<usize>().ok()?,
            ))
        })
        .filter(|(i, n)| *n > 0 && i < n)
        .ok_or_else(|| format!("--shard {s}: expected i/n with i < n"))
}

/// Where a search or an oracle run writes, and which share of the questions it takes.
#[derive(Args, Clone, Debug)]
pub struct Sharded {
    /// Results file (JSONL, appended; default RUN_DIR/COMMAND-TASK-SPLIT.jsonl, e.g.
    /// search-arc_easy-validation.jsonl). With `--shard i/n` (n > 1) the shard writes that
    /// name with `.shard-i-of-n` before `.jsonl`, and `drllm-train merge` joins the shards.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Shard i/n: this process takes the questions with index % n == i.
    #[arg(long, default_value = "0/1", value_parser = parse_shard)]
    pub shard: (usize, usize),
}

impl Sharded {
    /// Whether question `index` belongs to this shard.
    pub fn takes(&self, index: usize) -> bool {
        index % self.shard.1 == self.shard.0
    }
}

/// Memory for cached prefix states.
#[derive(Args, Clone, Copy, Debug)]
pub struct Cache {
    /// Memory for cached states of path prefixes, MiB: a path resumes after the longest prefix
    /// it shares with one already run (search rollouts, oracle tables, prune candidates,
    /// compare's --oracle arm).
    #[arg(long, default_value_t = d::PREFIX_CACHE_MB)]
    pub cache_mb: usize,
}

impl Cache {
    /// The budget in bytes.
    pub fn bytes(&self) -> usize {
        self.cache_mb.saturating_mul(1 << 20)
    }
}

/// `drllm-train data fetch`.
#[derive(Args, Clone, Debug)]
pub struct FetchArgs {
    /// Where the JSONL files go.
    #[arg(long, default_value = d::DATA_DIR)]
    pub data_dir: PathBuf,
}

/// `drllm-train search`.
#[derive(Args, Clone, Debug)]
pub struct SearchArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub questions: Questions,
    #[command(flatten)]
    pub results: Sharded,
    #[command(flatten)]
    pub cache: Cache,
    /// Simulations per question.
    #[arg(long, default_value_t = MctsConfig::default().simulations)]
    pub simulations: usize,
    /// Exploration constant c.
    #[arg(long, default_value_t = MctsConfig::default().c)]
    pub c: f64,
    /// Length penalty lambda.
    #[arg(long, default_value_t = MctsConfig::default().lambda)]
    pub lambda: f64,
    /// Most consecutive blocks one skip action removes.
    #[arg(long, default_value_t = MctsConfig::default().max_skip_span)]
    pub max_skip_span: usize,
    /// Most consecutive skipped blocks in a path (0 = no limit).
    #[arg(long, default_value_t = MctsConfig::default().max_consecutive_skip)]
    pub max_consecutive_skip: usize,
    /// Extra passes a block may get.
    #[arg(long, default_value_t = MctsConfig::default().max_repeats_per_block)]
    pub max_repeats: usize,
    /// Repeats only while the path has at most this many times L passes.
    #[arg(long, default_value_t = MctsConfig::default().max_len_factor)]
    pub max_len_factor: f64,
    /// Share of random child choices.
    #[arg(long, default_value_t = MctsConfig::default().random_rate)]
    pub random_rate: f64,
    /// Progressive widening: a node visited n times has at most ceil(n^W) children (1: expand
    /// every action of a node before descending).
    #[arg(long, default_value_t = MctsConfig::default().widening)]
    pub widening: f64,
    /// Expand untried actions in a random order, not best-edits-first (see `mcts::Amaf`).
    #[arg(long)]
    pub no_amaf: bool,
    /// Run every simulation (no early stop).
    #[arg(long)]
    pub no_early_stop: bool,
    /// Early stop when a correct path this many passes shorter is found.
    #[arg(long, default_value_t = MctsConfig::default().early_stop_shorter_by)]
    pub early_stop_shorter_by: usize,
    /// On originally correct questions, keep only paths whose gold margin is at least the
    /// plain model's (not in the reference; see `MctsConfig::margin_floor`).
    #[arg(long)]
    pub margin_floor: bool,
    /// Seed.
    #[arg(long, default_value_t = MctsConfig::default().seed)]
    pub seed: u64,
    /// Reward: binary (the reference) or margin (sigmoid of the gold option's logit margin).
    #[arg(long, value_enum, default_value_t = RewardKind::Binary)]
    pub reward: RewardKind,
    /// Recompute every rollout from scratch (for measuring the prefix reuse).
    #[arg(long)]
    pub no_prefix_reuse: bool,
}

impl SearchArgs {
    /// The search settings the flags give.
    pub fn mcts(&self) -> MctsConfig {
        MctsConfig {
            simulations: self.simulations,
            c: self.c,
            lambda: self.lambda,
            max_skip_span: self.max_skip_span,
            max_consecutive_skip: self.max_consecutive_skip,
            max_repeats_per_block: self.max_repeats,
            max_len_factor: self.max_len_factor,
            random_rate: self.random_rate,
            widening: self.widening,
            amaf: !self.no_amaf,
            early_stop: !self.no_early_stop,
            early_stop_shorter_by: self.early_stop_shorter_by,
            margin_floor: self.margin_floor,
            seed: self.seed,
        }
    }
}

/// `drllm-train oracle`.
#[derive(Args, Clone, Debug)]
pub struct OracleArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub questions: Questions,
    #[command(flatten)]
    pub results: Sharded,
    #[command(flatten)]
    pub cache: Cache,
    /// A skip is safe when the chosen option stays and the gold margin drops by at most this.
    #[arg(long, default_value_t = d::TAU)]
    pub tau: f64,
    /// Only summarise the table (no new questions).
    #[arg(long)]
    pub report_only: bool,
    /// Leave out the single repeats (half the work; the skip columns and the predictability
    /// test need only the skips).
    #[arg(long)]
    pub no_repeats: bool,
}

/// How routers are trained (`train`, and `pipeline` passes them on).
#[derive(Args, Clone, Debug)]
pub struct Training {
    /// Which examples to learn from: all with a correct path (the reference), or only those
    /// the plain model answered correctly (no fixes of wrong answers).
    #[arg(long, value_enum, default_value_t = Labels::default())]
    pub labels: Labels,
    /// Passes over the training examples.
    #[arg(long, default_value_t = TrainConfig::default().epochs)]
    pub epochs: usize,
    /// A block's router never predicts skip or repeat if that block has fewer training labels
    /// of the class (0: off, the reference).
    #[arg(long, default_value_t = TrainConfig::default().min_class_count)]
    pub min_class_count: usize,
    /// Train on standardised router inputs (not the reference; folded into the first layer on
    /// export, so the exported routers read raw inputs either way).
    #[arg(long)]
    pub standardize: bool,
    /// Class weights of the focal loss: the reference's fixed label counts (nearly uniform), or
    /// the training set's own (balanced).
    #[arg(long, value_enum, default_value_t = TrainConfig::default().class_weights)]
    pub class_weights: ClassWeights,
    /// Training device: cpu, or cuda (built with --features cuda).
    #[arg(long = "train-device", default_value_t = TrainConfig::default().device)]
    pub train_device: String,
}

/// `drllm-train train`.
#[derive(Args, Clone, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    pub common: Common,
    /// Search results (JSONL; several allowed). Default RUN_DIR/search-TASK-SPLIT.jsonl.
    #[arg(long)]
    pub search: Vec<PathBuf>,
    /// The task and split the search ran on (the default results file, the feature cache).
    #[command(flatten)]
    pub set: TaskSplit,
    #[command(flatten)]
    pub training: Training,
    /// Keep at least this share of originally-wrong-and-fixed examples (with --labels all).
    #[arg(long, default_value_t = d::MIN_FIXED_FRAC)]
    pub min_fixed_frac: f64,
    #[arg(long, default_value_t = TrainConfig::default().lr)]
    pub lr: f64,
    #[arg(long, default_value_t = TrainConfig::default().weight_decay)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = TrainConfig::default().warmup_frac)]
    pub warmup: f64,
    #[arg(long, default_value_t = TrainConfig::default().batch_size)]
    pub batch: usize,
    #[arg(long, default_value_t = TrainConfig::default().gamma)]
    pub gamma: f32,
    #[arg(long, default_value_t = TrainConfig::default().beta)]
    pub beta: f32,
    #[arg(long, default_value_t = TrainConfig::default().val_frac)]
    pub val_frac: f64,
    #[arg(long, default_value_t = TrainConfig::default().seed)]
    pub seed: u64,
    /// Rebuild the feature cache even if present.
    #[arg(long)]
    pub rebuild_features: bool,
    /// Label smoothing epsilon (0: off).
    #[arg(long, default_value_t = TrainConfig::default().label_smoothing)]
    pub label_smoothing: f32,
    /// Only these blocks' routers decide (e.g. 8-20,25); the others always execute.
    #[arg(long, value_parser = crate::train::parse_blocks)]
    pub blocks: Option<Vec<usize>>,
}

impl TrainArgs {
    /// The training settings the flags give.
    pub fn config(&self) -> TrainConfig {
        TrainConfig {
            epochs: self.training.epochs,
            lr: self.lr,
            weight_decay: self.weight_decay,
            warmup_frac: self.warmup,
            batch_size: self.batch,
            gamma: self.gamma,
            beta: self.beta,
            val_frac: self.val_frac,
            seed: self.seed,
            device: self.training.train_device.clone(),
            min_class_count: self.training.min_class_count,
            standardize: self.training.standardize,
            class_weights: self.training.class_weights,
            label_smoothing: self.label_smoothing,
            blocks: self.blocks.clone().unwrap_or_default(),
            ..TrainConfig::default()
        }
    }
}

/// `drllm-train export`.
#[derive(Args, Clone, Debug)]
pub struct ExportArgs {
    #[command(flatten)]
    pub common: Common,
    /// Trained checkpoint (default RUN_DIR/routers.ckpt.gguf).
    #[arg(long)]
    pub ckpt: Option<PathBuf>,
    /// Output (default MODEL.routers.gguf next to the model).
    #[arg(short = 'o', long)]
    pub out: Option<PathBuf>,
    /// Store weights in F16.
    #[arg(long)]
    pub f16: bool,
    /// Evaluation JSON to record in the provenance (default RUN_DIR/eval-arc_easy-test/eval.json,
    /// what `eval` writes with its default task and split, if present).
    #[arg(long)]
    pub metrics: Option<PathBuf>,
}

/// The questions of an evaluation: a fixed seeded sample of a split.
#[derive(Args, Clone, Debug)]
pub struct EvalQuestions {
    #[arg(long, default_value = d::TASK)]
    pub task: String,
    #[arg(long, default_value = d::EVAL_SPLIT)]
    pub split: String,
    /// A fixed random sample of N questions (seeded; default: the whole split).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Seed of the sample.
    #[arg(long, default_value_t = d::EVAL_SEED)]
    pub seed: u64,
}

/// `drllm-train eval`.
#[derive(Args, Clone, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub common: Common,
    /// Router sidecar (default: next to the model; the checkpoint in RUN_DIR if there is none).
    #[arg(long)]
    pub routers: Option<PathBuf>,
    /// Only the plain model.
    #[arg(long)]
    pub no_routers: bool,
    #[command(flatten)]
    pub questions: EvalQuestions,
    /// Depth bias of the routed model.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub depth_bias: f32,
    /// More depth biases for the accuracy/passes curve, e.g. -2,-1,1,2.
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    pub sweep: Vec<f32>,
    /// Pass cap.
    #[arg(long)]
    pub max_passes: Option<usize>,
    /// A `prune` report: its static prunes are judged beside plain and routed.
    #[arg(long)]
    pub prune: Option<PathBuf>,
    /// Which of the report's prunes (blocks skipped), e.g. 1,2 (default: all).
    #[arg(long, value_delimiter = ',')]
    pub prune_skips: Vec<usize>,
    /// Output directory (default RUN_DIR/eval-TASK-SPLIT).
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
}

/// The calibration questions: a split minus the evaluation sample, then a seeded sample. The
/// depth bias is calibrated, and the static prune chosen, on them.
#[derive(Args, Clone, Debug)]
pub struct CalibrationQuestions {
    #[arg(long, default_value = d::TASK)]
    pub task: String,
    #[arg(long, default_value = d::EVAL_SPLIT)]
    pub split: String,
    /// The evaluation sample to stay clear of: `eval --limit N --seed S` of the same split.
    #[arg(long, default_value_t = d::EVAL_SAMPLE)]
    pub exclude_limit: usize,
    #[arg(long, default_value_t = d::EVAL_SEED)]
    pub exclude_seed: u64,
    /// Calibration questions (from the rest of the split).
    #[arg(long, default_value_t = d::CALIBRATION_N)]
    pub n: usize,
}

impl CalibrationQuestions {
    /// `n` questions of the default task and evaluation split outside the evaluation sample of
    /// `eval_limit` (seed [`d::EVAL_SEED`]).
    pub fn outside_eval_sample(eval_limit: usize, n: usize) -> Self {
        CalibrationQuestions {
            task: d::TASK.into(),
            split: d::EVAL_SPLIT.into(),
            exclude_limit: eval_limit,
            exclude_seed: d::EVAL_SEED,
            n,
        }
    }

    /// The questions.
    pub fn load(&self, data_dir: &Path) -> Result<Vec<Example>, DataError> {
        let all = data::load(data_dir, &self.task, &self.split)?;
        Ok(data::calibration_sample(
            &all,
            self.exclude_limit,
            self.exclude_seed,
            self.n,
        ))
    }

    /// "N questions of TASK SPLIT (disjoint from the evaluation sample of M)".
    pub fn describe(&self, n: usize) -> String {
        format!(
            "{n} questions of {} {} (disjoint from the evaluation sample of {})",
            self.task, self.split, self.exclude_limit
        )
    }
}

/// `drllm-train calibrate`.
#[derive(Args, Clone, Debug)]
pub struct CalibrateArgs {
    #[command(flatten)]
    pub common: Common,
    /// Trained checkpoint (default RUN_DIR/routers.ckpt.gguf); the calibrated one is written
    /// to RUN_DIR/routers.calibrated.gguf.
    #[arg(long)]
    pub ckpt: Option<PathBuf>,
    #[command(flatten)]
    pub set: CalibrationQuestions,
    /// Depth biases to try.
    #[arg(
        long,
        value_delimiter = ',',
        allow_negative_numbers = true,
        default_values_t = d::CALIBRATION_BIASES
    )]
    pub biases: Vec<f32>,
    /// Block passes per question the chosen bias must save.
    #[arg(long, default_value_t = d::MIN_SAVED)]
    pub min_saved: f64,
}

/// `drllm-train prune`.
#[derive(Args, Clone, Debug)]
pub struct PruneArgs {
    #[command(flatten)]
    pub common: Common,
    /// The selection questions (the calibration questions).
    #[command(flatten)]
    pub set: CalibrationQuestions,
    #[command(flatten)]
    pub cache: Cache,
    /// Greedy steps (blocks removed).
    #[arg(long, default_value_t = d::PRUNE_MAX_SKIPS)]
    pub max_skips: usize,
    /// Report (default RUN_DIR/prune.json).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// `drllm-train predictability`.
#[derive(Args, Clone, Debug)]
pub struct PredictArgs {
    #[command(flatten)]
    pub common: Common,
    /// Oracle tables (JSONL; several allowed). Default RUN_DIR/oracle-arc_easy-validation.jsonl.
    #[arg(long)]
    pub oracle: Vec<PathBuf>,
    /// See `oracle --tau`.
    #[arg(long, default_value_t = d::TAU)]
    pub tau: f64,
    /// Folds of the cross-fitting.
    #[arg(long, default_value_t = d::FOLDS)]
    pub folds: usize,
    /// Bootstrap rounds of the intervals.
    #[arg(long, default_value_t = d::BOOTSTRAP)]
    pub bootstrap: usize,
    #[arg(long, default_value_t = TrainConfig::default().epochs)]
    pub epochs: usize,
    #[arg(long, default_value_t = TrainConfig::default().seed)]
    pub seed: u64,
    /// Train on raw router inputs (the reference) instead of standardised ones.
    #[arg(long)]
    pub raw_inputs: bool,
    /// Training device: cpu, or cuda (built with --features cuda).
    #[arg(long = "train-device", default_value_t = TrainConfig::default().device)]
    pub train_device: String,
    /// Output files' stem (default RUN_DIR/predictability).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also train routers on every question with these labels and write them here (a
    /// checkpoint sidecar for calibrate/compare/export).
    #[arg(long)]
    pub export: Option<PathBuf>,
}

/// A question set of `compare`: a fresh seeded sample of `n` questions of a task's split.
#[derive(Clone, Debug, PartialEq)]
pub struct SetSpec {
    pub task: String,
    pub split: String,
    pub n: usize,
}

/// Parses `TASK:SPLIT:N`.
pub fn parse_set(s: &str) -> Result<SetSpec, String> {
    let parts: Vec<&str> = s.split(':').collect();
    let [task, split, n] = parts.as_slice() else {
        return Err(format!("'{s}' is not TASK:SPLIT:N"));
    };
    let n = n
        .parse()
        .map_err(|e| format!("'{s}': N is not a number ({e})"))?;
    if task.is_empty() || split.is_empty() {
        return Err(format!("'{s}' is not TASK:SPLIT:N"));
    }
    Ok(SetSpec {
        task: task.to_string(),
        split: split.to_string(),
        n,
    })
}

/// Parses `NAME=PATH`.
pub fn parse_named(s: &str) -> Result<(String, PathBuf), String> {
    let (n, p) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}': expected NAME=PATH"))?;
    if n.is_empty() || p.is_empty() {
        return Err(format!("'{s}': expected NAME=PATH"));
    }
    Ok((n.to_string(), PathBuf::from(p)))
}

/// `drllm-train compare`.
#[derive(Args, Clone, Debug)]
pub struct CompareArgs {
    #[command(flatten)]
    pub common: Common,
    /// Routers to compare, NAME=SIDECAR (repeatable), e.g. mcts=runs/m/routers.ckpt.gguf.
    #[arg(long = "routers", value_parser = parse_named)]
    pub routers: Vec<(String, PathBuf)>,
    /// A prune report (drllm-train prune) with at least as many steps as the largest budget.
    #[arg(long)]
    pub prune: PathBuf,
    /// Passes saved per question to compare at.
    #[arg(long, value_delimiter = ',', default_values_t = d::COMPARE_BUDGETS)]
    pub budgets: Vec<usize>,
    /// The calibration questions the routers' depth biases are matched to the budgets on.
    #[command(flatten)]
    pub calibration: CalibrationQuestions,
    #[command(flatten)]
    pub cache: Cache,
    /// Depth biases tried on the calibration questions.
    #[arg(
        long,
        value_delimiter = ',',
        allow_negative_numbers = true,
        default_values_t = d::COMPARE_BIASES
    )]
    pub biases: Vec<f32>,
    /// Question sets, TASK:SPLIT:N (a fresh seeded sample of N; a set of the calibration
    /// questions' task and split leaves out their evaluation sample and the calibration
    /// questions).
    #[arg(long, value_delimiter = ',', value_parser = parse_set, default_values = d::COMPARE_SETS)]
    pub sets: Vec<SetSpec>,
    /// Seed of the fresh samples.
    #[arg(long, default_value_t = d::COMPARE_SEED)]
    pub seed: u64,
    /// Tasks whose sets also get the oracle at one pass saved (every single skip of every
    /// question: L more paths per question), e.g. arc_easy.
    #[arg(long, value_delimiter = ',')]
    pub oracle: Vec<String>,
    /// Output directory (default RUN_DIR/compare).
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
}

/// `drllm-train pipeline`.
#[derive(Args, Clone, Debug)]
pub struct PipelineArgs {
    #[command(flatten)]
    pub common: Common,
    /// Simulations per question.
    #[arg(long, default_value_t = MctsConfig::default().simulations)]
    pub simulations: usize,
    /// Questions of ARC-Easy test evaluated (a seeded sample).
    #[arg(long, default_value_t = d::EVAL_SAMPLE)]
    pub eval_limit: usize,
    /// Only the first N validation questions are searched.
    #[arg(long)]
    pub search_limit: Option<usize>,
    /// Reward kind (see `search --reward`).
    #[arg(long, value_enum, default_value_t = RewardKind::Binary)]
    pub reward: RewardKind,
    /// Search keeps only paths that do not lower the gold margin (see `search --margin-floor`).
    #[arg(long)]
    pub margin_floor: bool,
    /// Router training (see `train`).
    #[command(flatten)]
    pub training: Training,
    /// Calibration questions for the depth bias (ARC-Easy test, outside the evaluation sample).
    #[arg(long, default_value_t = d::CALIBRATION_N)]
    pub calibration_n: usize,
    /// Skip the static-prune baseline (chosen on the calibration questions, judged in `eval`).
    #[arg(long)]
    pub no_prune: bool,
    /// Calibration questions the static prune is chosen on (default: all of them). Each greedy
    /// step judges every question along about L paths.
    #[arg(long)]
    pub prune_n: Option<usize>,
}

/// What the shards of a merge ran.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum MergeKind {
    Search,
    Oracle,
}

impl MergeKind {
    /// `search` or `oracle` (the results files' prefix).
    pub fn as_str(self) -> &'static str {
        match self {
            MergeKind::Search => "search",
            MergeKind::Oracle => "oracle",
        }
    }
}

/// `drllm-train merge`.
#[derive(Args, Clone, Debug)]
pub struct MergeArgs {
    /// What the shards ran.
    #[arg(value_enum)]
    pub kind: MergeKind,
    #[command(flatten)]
    pub common: Common,
    /// The questions the shards were given.
    #[command(flatten)]
    pub questions: Questions,
    /// Number of shards (the n of `--shard i/n`).
    #[arg(long)]
    pub shards: usize,
    /// The results file the shards were named after, and the merge is written to (default
    /// RUN_DIR/KIND-TASK-SPLIT.jsonl; shard i writes KIND-TASK-SPLIT.shard-i-of-n.jsonl).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace an existing merged file.
    #[arg(long)]
    pub force: bool,
}

/// A command's arguments with every default, as the command line gives them when no flag is
/// set: the one source of the defaults when one command runs another (`pipeline`).
pub fn defaults<T: clap::FromArgMatches + Args>() -> Result<T, Error> {
    let cmd = T::augment_args(clap::Command::new("defaults"));
    let m = cmd
        .try_get_matches_from(["defaults"])
        .map_err(|e| Error::refused(e.to_string()))?;
    T::from_arg_matches(&m).map_err(|e| Error::refused(e.to_string()))
}
