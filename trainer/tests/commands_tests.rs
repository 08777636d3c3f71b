//! Every `drllm-train` command as a process on a tiny model and a small synthetic data set,
//! chained as a user runs them (search, train, calibrate, prune, eval, export; oracle,
//! predictability, compare; the whole pipeline). Each step's output files are read back and
//! checked: what they hold, not only that the command exited 0.

use drllm_engine::router_format::{base_model_info, Sidecar};
use drllm_testkit::{write_tiny_model, Family, TinySpec};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_drllm-train");

/// `n` four-option questions of arc_easy SPLIT, with answer texts (continuation scoring).
fn questions(split: &str, n: usize) -> String {
    let words = [
        "cat", "dog", "sat", "mat", "red", "big", "sun", "hat", "pot",
    ];
    let mut text = String::new();
    for i in 0..n {
        let w = |k: usize| words[(i * 7 + k * 3) % words.len()];
        let texts: Vec<String> = (0..4).map(|k| format!("{} {}", w(k), w(k + 4))).collect();
        let q = format!("the {} is on the {} by the {}", w(0), w(1), w(2));
        let letter = ["A", "B", "C", "D"][i % 4];
        let ex = serde_json::json!({
            "id": format!("arc_easy/{split}/q{i}"), "task": "arc_easy", "split": split,
            "kind": "MultipleChoice",
            "prompt": format!("{q}\n A. {}\n B. {}\n C. {}\n D. {}\nAnswer:", texts[0], texts[1], texts[2], texts[3]),
            "choices": ["A", "B", "C", "D"], "gold": i % 4, "answer": letter,
            "texts": texts,
            "cont_prompt": format!("{q}\nAnswer:"),
        });
        text.push_str(&ex.to_string());
        text.push('\n');
    }
    text
}

/// A tiny llama model and the data: 24 validation and 40 test questions.
struct Setup {
    _dir: tempfile::TempDir,
    model: PathBuf,
    data: PathBuf,
    run: PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    write_tiny_model(&TinySpec::default_for(Family::Llama), &model).unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(
        data.join("arc_easy-validation.jsonl"),
        questions("validation", 24),
    )
    .unwrap();
    std::fs::write(data.join("arc_easy-test.jsonl"), questions("test", 40)).unwrap();
    let run = dir.path().join("run");
    Setup {
        _dir: dir,
        model,
        data,
        run,
    }
}

impl Setup {
    /// Runs `drllm-train CMD --model M --data-dir D --run-dir R -t 1 ARGS`; panics with its
    /// stderr unless it succeeds; gives stdout.
    fn run(&self, cmd: &[&str], args: &[&str]) -> String {
        let o = Command::new(BIN)
            .args(cmd)
            .arg("-m")
            .arg(&self.model)
            .arg("--data-dir")
            .arg(&self.data)
            .arg("--run-dir")
            .arg(&self.run)
            .args(["-t", "1"])
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            o.status.success(),
            "drllm-train {cmd:?} {args:?} failed:\n{err}"
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn file(&self, name: &str) -> PathBuf {
        let p = self.run.join(name);
        assert!(p.is_file(), "{} was not written", p.display());
        p
    }

    fn json(&self, name: &str) -> Value {
        serde_json::from_slice(&std::fs::read(self.file(name)).unwrap()).unwrap()
    }

    fn fingerprint(&self) -> String {
        base_model_info(&self.model).unwrap().fingerprint
    }

    /// The question ledger: ids recorded for `purpose`.
    fn ledger(&self, purpose: &str) -> Vec<String> {
        let v = self.json("questions-used.json");
        let ids = &v["used"][purpose];
        ids.as_array()
            .unwrap_or_else(|| panic!("no {purpose} in the ledger: {v}"))
            .iter()
            .map(|x| x.as_str().unwrap().to_string())
            .collect()
    }
}

fn lines(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn is_png(p: &Path) {
    let b = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert!(b.starts_with(b"\x89PNG"), "{} is not a PNG", p.display());
}

/// The calibration questions used below: 8 of the test split outside its sample of 6.
const CALIBRATION: [&str; 6] = ["--exclude-limit", "6", "--n", "8", "--task", "arc_easy"];

#[test]
fn search_train_calibrate_prune_eval_export() {
    let s = setup();
    let fp = s.fingerprint();
    // search: one line per question, the settings beside them, the questions in the ledger
    s.run(&["search"], &["--limit", "24", "--simulations", "8"]);
    let results = lines(&s.file("search-arc_easy-validation.jsonl"));
    assert_eq!(results.len(), 24);
    assert!(results.iter().all(|r| r["model"] == fp.as_str()));
    let params = s.json("search-arc_easy-validation.jsonl.params.json");
    assert_eq!(params["mcts"]["simulations"], 8);
    assert_eq!(s.ledger("search").len(), 24);
    let kept = results.iter().filter(|r| !r["kept"].is_null()).count();
    assert!(
        kept > 0,
        "no question has a correct path: nothing to train on"
    );

    // train: a checkpoint of this model's routers with the history and the training ledger
    s.run(&["train"], &["--epochs", "2"]);
    let ckpt = Sidecar::read(&s.file("routers.ckpt.gguf")).unwrap();
    assert_eq!(ckpt.base.fingerprint, fp);
    assert_eq!(ckpt.routers.len(), 6);
    assert!(ckpt.provenance.dataset.starts_with("arc_easy validation ("));
    assert!(ckpt.provenance.search.contains("\"questions\":24"));
    let history = s.json("train-history.json");
    assert_eq!(history.as_array().unwrap().len(), 2);
    s.file("features-arc_easy-validation.bin");
    assert_eq!(s.ledger("training").len(), kept);

    // calibrate: with no pass to save, some bias is always chosen and baked in
    s.run(
        &["calibrate"],
        &[&CALIBRATION[..], &["--biases=-2,0,2", "--min-saved", "0"]].concat(),
    );
    let cal = s.json("calibration.json");
    assert_eq!(cal["n"], 8);
    assert_eq!(cal["tried"].as_array().unwrap().len(), 3);
    let chosen = cal["chosen"].as_f64().expect("a bias is chosen");
    let calibrated = Sidecar::read(&s.file("routers.calibrated.gguf")).unwrap();
    assert!(
        calibrated
            .provenance
            .notes
            .contains(&format!("depth bias {chosen:+.2} baked in")),
        "{}",
        calibrated.provenance.notes
    );
    assert_eq!(s.ledger("calibration").len(), 8);
    // a budget nothing can meet is refused, naming the flag to change
    let o = Command::new(BIN)
        .args(["calibrate", "-m"])
        .arg(&s.model)
        .arg("--data-dir")
        .arg(&s.data)
        .arg("--run-dir")
        .arg(&s.run)
        .args(CALIBRATION)
        .args(["-t", "1", "--biases=0", "--min-saved", "100"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--biases"));

    // prune: one greedy step on the same calibration questions
    let md = s.run(
        &["prune"],
        &[&CALIBRATION[..], &["--max-skips", "1"]].concat(),
    );
    let prune = s.json("prune.json");
    assert_eq!(prune["steps"].as_array().unwrap().len(), 1);
    assert_eq!(prune["ids"].as_array().unwrap().len(), 8);
    assert!(md.contains("skip"), "{md}");
    assert_eq!(s.ledger("prune").len(), 8);

    // eval: plain, routed and the prune on the 6-question sample, disjoint from the choices
    let prune_file = s.file("prune.json");
    let routers_file = s.file("routers.calibrated.gguf");
    s.run(
        &["eval"],
        &[
            "--routers",
            routers_file.to_str().unwrap(),
            "--limit",
            "6",
            "--prune",
            prune_file.to_str().unwrap(),
        ],
    );
    let ev = s.json("eval-arc_easy-test/eval.json");
    assert_eq!(ev["plain"]["n"], 6);
    assert_eq!(ev["plain"]["mean_passes"], 6.0);
    assert_eq!(ev["statics"].as_array().unwrap().len(), 1);
    assert!(ev["routed"].is_object());
    s.file("eval-arc_easy-test/eval.md");
    is_png(&s.file("eval-arc_easy-test/decisions.png"));
    is_png(&s.file("eval-arc_easy-test/accuracy_vs_passes.png"));
    // questions a choice was made on are refused
    let o = Command::new(BIN)
        .args(["eval", "-m"])
        .arg(&s.model)
        .arg("--data-dir")
        .arg(&s.data)
        .arg("--run-dir")
        .arg(&s.run)
        .args(["-t", "1", "--routers"])
        .arg(&routers_file)
        .args(["--limit", "40"])
        .output()
        .unwrap();
    assert!(!o.status.success(), "eval on the calibration questions ran");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("of the evaluation questions were used for"),
        "{err}"
    );

    // export: the sidecar next to the model, with the evaluation and the whole ledger
    s.run(&["export"], &["--ckpt", routers_file.to_str().unwrap()]);
    let side = s.model.with_extension("routers.gguf");
    let exported = Sidecar::read(&side).unwrap();
    assert_eq!(exported.base.fingerprint, fp);
    assert_eq!(exported.routers, calibrated.routers);
    let metrics: Value = serde_json::from_str(&exported.provenance.metrics).unwrap();
    assert_eq!(metrics["task"], "arc_easy");
    assert_eq!(metrics["plain"]["n"], 6);
    let notes: Value = serde_json::from_str(&exported.provenance.notes).unwrap();
    for purpose in ["search", "training", "calibration", "prune"] {
        assert!(
            notes["questions_used"][purpose].is_array(),
            "{purpose} missing from the exported ledger: {notes}"
        );
    }
}

#[test]
fn oracle_predictability_compare() {
    let s = setup();
    // oracle: every single skip of 12 questions, the summary beside the table
    let md = s.run(&["oracle"], &["--limit", "12", "--no-repeats"]);
    let table = lines(&s.file("oracle-arc_easy-validation.jsonl"));
    assert_eq!(table.len(), 12);
    assert!(table
        .iter()
        .all(|r| r["skip"].as_array().unwrap().len() == 6));
    let report = s.json("oracle-arc_easy-validation.report.json");
    assert_eq!(report["questions"], 12);
    assert!(md.contains("oracle"), "{md}");
    s.file("oracle-arc_easy-validation.report.md");
    assert_eq!(s.ledger("oracle").len(), 12);

    // predictability on that table (its default), with routers exported
    let export = s.run.join("routers.oracle.ckpt.gguf");
    s.run(
        &["predictability"],
        &[
            "--folds",
            "2",
            "--bootstrap",
            "20",
            "--epochs",
            "2",
            "--export",
            export.to_str().unwrap(),
        ],
    );
    let p = s.json("predictability.json");
    assert_eq!(p["router"]["questions"], 12);
    assert_eq!(p["router"]["blocks"].as_array().unwrap().len(), 6);
    assert_eq!(p["linear_probe"]["folds"], 2);
    assert!(p["question_trait"].is_object());
    let md = std::fs::read_to_string(s.file("predictability.md")).unwrap();
    assert!(md.starts_with("# Predictability test"));
    is_png(&s.file("predictability.png"));
    is_png(&s.file("predictability-probe.png"));
    let oracle_routers = Sidecar::read(&export).unwrap();
    assert!(oracle_routers
        .provenance
        .dataset
        .starts_with("oracle-table labels"));
    assert_eq!(s.ledger("training").len(), 12);

    // compare: a prune, the oracle-label routers matched to one pass saved, on fresh questions
    s.run(
        &["prune"],
        &[&CALIBRATION[..], &["--max-skips", "1"]].concat(),
    );
    let prune_file = s.file("prune.json");
    s.run(
        &["compare"],
        &[
            &CALIBRATION[..],
            &[
                "--prune",
                prune_file.to_str().unwrap(),
                "--routers",
                &format!("oracle={}", export.display()),
                "--budgets",
                "1",
                "--biases=-1,0,1",
                "--sets",
                "arc_easy:test:6",
                "--oracle",
                "arc_easy",
            ],
        ]
        .concat(),
    );
    let c = s.json("compare/compare.json");
    let set = &c["sets"][0];
    assert_eq!(set["ids"].as_array().unwrap().len(), 6);
    let labels: Vec<&str> = set["arms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels[0], "plain");
    assert!(labels[1].starts_with("static, 1 saved ("), "{labels:?}");
    assert!(
        labels
            .iter()
            .any(|l| l.starts_with("routed oracle, 1 saved")),
        "{labels:?}"
    );
    assert_eq!(*labels.last().unwrap(), "oracle, 1 pass saved");
    // the fresh questions are none of the calibration (= prune) questions
    let used: std::collections::HashSet<String> = s.ledger("prune").into_iter().collect();
    for id in set["ids"].as_array().unwrap() {
        assert!(
            !used.contains(id.as_str().unwrap()),
            "{id} was a calibration question"
        );
    }
    let md = std::fs::read_to_string(s.file("compare/compare.md")).unwrap();
    assert!(md.contains("vs static at the same budget"), "{md}");
    is_png(&s.file("compare/compare-arc_easy-test.png"));
}

#[test]
fn pipeline_runs_every_step_and_exports_the_sidecar() {
    let s = setup();
    s.run(
        &["pipeline"],
        &[
            "--simulations",
            "4",
            "--search-limit",
            "24",
            "--eval-limit",
            "6",
            "--calibration-n",
            "8",
            "--prune-n",
            "8",
            "--epochs",
            "2",
        ],
    );
    assert_eq!(lines(&s.file("search-arc_easy-validation.jsonl")).len(), 24);
    s.file("routers.ckpt.gguf");
    assert_eq!(s.json("calibration.json")["n"], 8);
    assert_eq!(s.json("prune.json")["ids"].as_array().unwrap().len(), 8);
    let ev = s.json("eval-arc_easy-test/eval.json");
    assert_eq!(ev["plain"]["n"], 6);
    // the pipeline's sweep besides the routers' own bias
    assert_eq!(ev["sweep"].as_array().unwrap().len(), 2);
    let side = Sidecar::read(&s.model.with_extension("routers.gguf")).unwrap();
    assert_eq!(side.base.fingerprint, s.fingerprint());
    let metrics: Value = serde_json::from_str(&side.provenance.metrics).unwrap();
    assert_eq!(metrics["plain"]["n"], 6);
}
