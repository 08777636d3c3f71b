//! `drllm-train pipeline`: every step for one model, each with the defaults its own command
//! has: data (if missing), search on ARC-Easy validation, training, calibration of the depth
//! bias on ARC-Easy test questions outside the evaluation sample, the best static prune at
//! about the calibrated routers' passes on the same questions, evaluation on the sample, and
//! export of the sidecar next to the model.

use crate::args::{
    defaults, CalibrateArgs, CalibrationQuestions, EvalArgs, ExportArgs, PipelineArgs, PruneArgs,
    SearchArgs, TrainArgs,
};
use crate::defaults as d;
use crate::error::Error;
use crate::eval::{self, Calibration};
use std::path::PathBuf;
use std::time::Instant;

/// Runs the pipeline; gives the exported sidecar.
pub fn run_pipeline(a: &PipelineArgs) -> Result<PathBuf, Error> {
    let t0 = Instant::now();
    let done = |what: &str| {
        eprintln!(
            "[pipeline] {what} done after {:.0}s",
            t0.elapsed().as_secs_f64()
        )
    };
    if !crate::data::dataset_path(&a.common.data_dir, d::TASK, d::SEARCH_SPLIT).exists() {
        crate::data::run_fetch(&a.common.data_dir)?;
    }
    crate::search::run_search(&search_args(a)?)?;
    done("search");
    let mut t = defaults::<TrainArgs>()?;
    t.common = a.common.clone();
    t.training = a.training.clone();
    let raw = crate::routers::run_train(&t)?;
    done("training");
    let (calibrated, cal) = eval::calibrate_checkpoint(&CalibrateArgs {
        common: a.common.clone(),
        ckpt: Some(raw.clone()),
        set: CalibrationQuestions::outside_eval_sample(a.eval_limit, a.calibration_n),
        biases: d::CALIBRATION_BIASES.to_vec(),
        min_saved: d::MIN_SAVED,
    })?;
    let ckpt = calibrated.unwrap_or_else(|| {
        eprintln!(
            "[pipeline] warning: no depth bias saved a block pass per question on the \
             calibration questions; evaluating and exporting the uncalibrated routers"
        );
        raw
    });
    done("calibration");
    let prune = if a.no_prune {
        None
    } else {
        let f = crate::prune::run_prune(&prune_args(a, &cal)?)?;
        done("static prune");
        Some(f)
    };
    let mut e = defaults::<EvalArgs>()?;
    e.common = a.common.clone();
    e.routers = Some(ckpt.clone());
    e.questions.limit = Some(a.eval_limit);
    e.sweep = d::PIPELINE_SWEEP.to_vec();
    e.prune = prune;
    eval::run_eval(&e)?;
    let mut x = defaults::<ExportArgs>()?;
    x.common = a.common.clone();
    x.ckpt = Some(ckpt);
    let out = crate::routers::run_export(&x)?;
    eprintln!(
        "[pipeline] done after {:.0}s: {}",
        t0.elapsed().as_secs_f64(),
        out.display()
    );
    Ok(out)
}

/// `search` with its defaults and the pipeline's settings.
fn search_args(a: &PipelineArgs) -> Result<SearchArgs, Error> {
    let mut s = defaults::<SearchArgs>()?;
    s.common = a.common.clone();
    s.questions.limit = a.search_limit;
    s.simulations = a.simulations;
    s.margin_floor = a.margin_floor;
    s.reward = a.reward;
    Ok(s)
}

/// The best static prune at about the calibrated routers' passes, chosen on the same
/// calibration questions (the first `--prune-n` of them).
fn prune_args(a: &PipelineArgs, cal: &Calibration) -> Result<PruneArgs, Error> {
    let n_layer = cal.plain.mean_passes;
    let routed_passes = cal
        .tried
        .iter()
        .find(|t| t.depth_bias == cal.chosen)
        .map(|t| t.mean_passes)
        .unwrap_or(n_layer - 1.0);
    let mut p = defaults::<PruneArgs>()?;
    p.common = a.common.clone();
    p.set = CalibrationQuestions::outside_eval_sample(
        a.eval_limit,
        a.prune_n.unwrap_or(a.calibration_n).min(a.calibration_n),
    );
    p.max_skips = ((n_layer - routed_passes).round() as usize).max(1);
    Ok(p)
}
