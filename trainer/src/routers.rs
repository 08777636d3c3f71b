//! The trainer's product: routers trained on search results (`drllm-train train`), written as
//! checkpoint sidecars with their provenance, and exported next to the model
//! (`drllm-train export`). [`checkpoint`] builds the sidecar every trainer command writes, so
//! training from search labels and from oracle labels (`predictability --export`) record the
//! same fields.

use crate::args::{ExportArgs, TrainArgs};
use crate::defaults as d;
use crate::error::Error;
use crate::features::{self, FeatureStats};
use crate::ledger::Ledger;
use crate::search::{self, read_results, SearchRecord};
use crate::shards::params_path;
use crate::train::{self, ClassStats, EpochReport, FeatureSet, TrainConfig, Trained};
use drllm_engine::router_format::{
    base_model_info_from, rfc3339_utc_now, sidecar_path_for, Provenance, RouterShape, Sidecar,
    StorageType, FORMAT_VERSION,
};
use drllm_engine::Model;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The checkpoint `train` writes and `calibrate`, `eval` and `export` read by default.
pub fn checkpoint_path(run_dir: &Path) -> PathBuf {
    run_dir.join("routers.ckpt.gguf")
}

/// What a checkpoint's provenance says of the data and search its labels came from, and of
/// the result.
pub struct Origin {
    /// The questions and labels.
    pub dataset: String,
    /// The search (or table) the labels came from.
    pub search: String,
    /// Metrics of the training (JSON).
    pub metrics: String,
}

/// The sidecar of routers trained with `cfg` on `features` for `model`: base-model
/// fingerprint, shape, provenance (with the question ledger in its notes) and the routers.
pub fn checkpoint(
    model: &Model,
    cfg: &TrainConfig,
    features: &FeatureSet,
    trained: Trained,
    origin: Origin,
    ledger: &Ledger,
) -> Result<Sidecar, Error> {
    Ok(Sidecar {
        version: FORMAT_VERSION,
        base: base_model_info_from(model.gguf(), model.path())?,
        shape: RouterShape {
            hidden: cfg.hidden,
            windows: features.max_windows,
        },
        provenance: Provenance {
            dataset: origin.dataset,
            search: origin.search,
            training: serde_json::to_string(cfg)?,
            metrics: origin.metrics,
            created: rfc3339_utc_now(),
            tool: format!("drllm-train {}", env!("CARGO_PKG_VERSION")),
            notes: ledger.to_notes(""),
        },
        routers: trained.routers,
    })
}

/// `drllm-train train`: router inputs along the kept paths of the search results (cached in
/// the run folder), training, and the checkpoint `RUN_DIR/routers.ckpt.gguf` with the history
/// beside it; the training questions go into the ledger.
pub fn run_train(a: &TrainArgs) -> Result<PathBuf, Error> {
    let l = a.common.load()?;
    let run_dir = a.common.run_dir();
    std::fs::create_dir_all(&run_dir)?;
    let files = if a.search.is_empty() {
        vec![a.set.results_in(&run_dir, "search")]
    } else {
        a.search.clone()
    };
    let (records, params) = search_results(&files, &l.fingerprint)?;
    let (chosen, stats) = features::select(
        &records,
        l.model.n_layer(),
        a.training.labels,
        a.min_fixed_frac,
    );
    eprintln!("[train] examples: {}", serde_json::to_string(&stats)?);
    let fs = kept_path_features(a, &l, &run_dir, &chosen)?;
    let ledger = Ledger::record(
        &run_dir,
        "training",
        fs.examples.iter().map(|e| e.id.as_str()),
    )?;
    let cfg = a.config();
    if let Some(&b) = cfg.blocks.iter().find(|&&b| b >= l.model.n_layer()) {
        return Err(Error::refused(format!(
            "--blocks: block {b} does not exist ({} blocks)",
            l.model.n_layer()
        )));
    }
    let t0 = Instant::now();
    let trained = train::train_split(&fs, &cfg, &mut print_epoch)?;
    eprintln!(
        "[train] {:.1}s, best epoch {}",
        t0.elapsed().as_secs_f64(),
        trained.best_epoch
    );
    std::fs::write(
        run_dir.join("train-history.json"),
        serde_json::to_string_pretty(&trained.history)?,
    )?;
    let origin = Origin {
        dataset: dataset_note(a, &stats),
        search: search::summary(&records, &params),
        metrics: serde_json::to_string(&trained.history.get(trained.best_epoch.saturating_sub(1)))?,
    };
    let sc = checkpoint(&l.model, &cfg, &fs, trained, origin, &ledger)?;
    let ckpt = checkpoint_path(&run_dir);
    sc.write(&ckpt, StorageType::F32)?;
    eprintln!("[train] wrote {}", ckpt.display());
    Ok(ckpt)
}

/// The search results of this model in `files`, and the settings files beside them.
fn search_results(
    files: &[PathBuf],
    fingerprint: &str,
) -> Result<(Vec<SearchRecord>, Vec<serde_json::Value>), Error> {
    let mut records = Vec::new();
    let mut params = Vec::new();
    for f in files {
        let r = read_results(f).map_err(Error::at(f))?;
        records.extend(r.into_iter().filter(|r| r.model == fingerprint));
        if let Ok(text) = std::fs::read_to_string(params_path(f)) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                params.push(v);
            }
        }
    }
    if records.is_empty() {
        return Err(Error::refused(format!(
            "no search results for this model in {files:?} (run drllm-train search first)"
        )));
    }
    Ok((records, params))
}

/// Router inputs entering every block along each chosen example's kept path, from the run
/// folder's cache when it holds these examples and paths.
fn kept_path_features(
    a: &TrainArgs,
    l: &crate::args::Loaded,
    run_dir: &Path,
    chosen: &[&SearchRecord],
) -> Result<FeatureSet, Error> {
    let cache = run_dir.join(format!("features-{}-{}.bin", a.set.task, a.set.split));
    let items = features::kept_items(chosen);
    features::cached_along(
        &a.common,
        l,
        &cache,
        a.rebuild_features,
        &items,
        || {
            Ok(crate::data::load(
                &a.common.data_dir,
                &a.set.task,
                &a.set.split,
            )?)
        },
        "train",
    )
}

fn dataset_note(a: &TrainArgs, stats: &FeatureStats) -> String {
    format!(
        "{} {} ({} examples with a kept path, {} fixed)",
        a.set.task, a.set.split, stats.kept, stats.fixed
    )
}

/// One line per epoch on stderr.
fn print_epoch(e: &EpochReport) {
    let pc = |c: &ClassStats| format!("{:.2}/{:.2}", c.precision, c.recall);
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
}

/// `drllm-train export`: a checkpoint (checked against the model's fingerprint) written as the
/// model's sidecar, with the evaluation's figures and the run's whole ledger in its provenance.
pub fn run_export(a: &ExportArgs) -> Result<PathBuf, Error> {
    let l = a.common.load()?;
    let run_dir = a.common.run_dir();
    let ckpt = a.ckpt.clone().unwrap_or_else(|| checkpoint_path(&run_dir));
    let mut sc = Sidecar::read(&ckpt).map_err(Error::at(&ckpt))?;
    if sc.base.fingerprint != l.fingerprint {
        return Err(Error::refused(format!(
            "{} was trained for another model (fingerprint {}, this model {})",
            ckpt.display(),
            sc.base.fingerprint,
            l.fingerprint
        )));
    }
    let metrics = a.metrics.clone().or_else(|| {
        let p = run_dir
            .join(format!("eval-{}-{}", d::TASK, d::EVAL_SPLIT))
            .join("eval.json");
        p.exists().then_some(p)
    });
    if let Some(m) = metrics {
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&m).map_err(Error::at(&m))?)
                .map_err(Error::at(&m))?;
        let summary = serde_json::json!({ "plain": v["plain"], "routed": v["routed"], "diff": v["diff"], "task": v["task"], "split": v["split"] });
        sc.provenance.metrics = summary.to_string();
    }
    sc.provenance.created = rfc3339_utc_now();
    let mut ledger = Ledger::from_notes(&sc.provenance.notes);
    ledger.merge(&Ledger::load(&run_dir)?);
    let note = serde_json::from_str::<serde_json::Value>(&sc.provenance.notes)
        .ok()
        .and_then(|v| v.get("note").and_then(|n| n.as_str()).map(str::to_string))
        .unwrap_or_default();
    sc.provenance.notes = ledger.to_notes(&note);
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| sidecar_path_for(&a.common.model));
    let storage = if a.f16 {
        StorageType::F16
    } else {
        StorageType::F32
    };
    sc.write(&out, storage)?;
    eprintln!("[export] wrote {}", out.display());
    Ok(out)
}
