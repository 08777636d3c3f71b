//! Every default of the trainer's commands that is not a field of a settings struct's
//! `Default` ([`crate::mcts::MctsConfig`], [`crate::train::TrainConfig`]): the command line's
//! attributes read these, and so does every command that runs another (`pipeline`), so a
//! default is written once.

/// The model (`-m`): the default model `scripts/setup.sh` fetches.
pub const MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
/// Where `data fetch` writes the data and every command reads it (`--data-dir`).
pub const DATA_DIR: &str = "data";
/// The folder of each model's run folder, `RUNS/MODEL_STEM` (`--run-dir` overrides).
pub const RUNS_DIR: &str = "runs";

/// The task searched, trained on, calibrated and evaluated on.
pub const TASK: &str = "arc_easy";
/// The split search, oracle tables and training use.
pub const SEARCH_SPLIT: &str = "validation";
/// The split calibration, static prunes and evaluation use.
pub const EVAL_SPLIT: &str = "test";

/// The fixed evaluation sample of ARC-Easy test (`eval --limit`, seed 0) that calibration
/// questions stay clear of.
pub const EVAL_SAMPLE: usize = 1000;
/// The seed of the evaluation sample.
pub const EVAL_SEED: u64 = 0;
/// Calibration questions (depth bias, static prune).
pub const CALIBRATION_N: usize = 300;
/// Depth biases `calibrate` (and so `pipeline`) tries.
pub const CALIBRATION_BIASES: [f32; 9] = [-3.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0];
/// Block passes per question the bias `calibrate` chooses must save.
pub const MIN_SAVED: f64 = 1.0;
/// Depth biases `compare` tries on the calibration questions to match the budgets (wider
/// than calibration's: trained routers may need a large bias to save 3 passes).
pub const COMPARE_BIASES: [f32; 11] = [-4.0, -3.0, -2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0];
/// Passes saved per question that `compare` compares at.
pub const COMPARE_BUDGETS: [usize; 3] = [1, 2, 3];
/// `compare`'s question sets, TASK:SPLIT:N.
pub const COMPARE_SETS: [&str; 3] = [
    "arc_easy:test:800",
    "arc_challenge:test:500",
    "piqa:validation:500",
];
/// Seed of `compare`'s fresh samples.
pub const COMPARE_SEED: u64 = 1;
/// Depth biases `pipeline`'s evaluation sweeps besides the calibrated routers.
pub const PIPELINE_SWEEP: [f32; 2] = [-1.0, 1.0];

/// Memory for cached prefix states of the search, oracle tables, prunes and comparisons, MiB.
pub const PREFIX_CACHE_MB: usize = 512;
/// Tokens a numeric (GSM8K) answer may take.
pub const MAX_ANSWER_TOKENS: usize = 256;
/// The margin drop a safe skip may cost (mean log-probability units of the answer texts).
pub const TAU: f64 = 0.05;
/// Folds of the predictability test's cross-fitting.
pub const FOLDS: usize = 5;
/// Bootstrap rounds of the predictability test's intervals.
pub const BOOTSTRAP: usize = 2000;
/// Greedy steps (blocks removed) of `prune`.
pub const PRUNE_MAX_SKIPS: usize = 2;
/// The least share of originally-wrong-and-fixed examples `train --labels all` keeps.
pub const MIN_FIXED_FRAC: f64 = 0.3;

/// Context of the trainer's sessions (a question with its answer texts fits easily).
pub const N_CTX: usize = 2048;
/// Tokens per prefill graph of the trainer's sessions.
pub const N_UBATCH: usize = 512;
