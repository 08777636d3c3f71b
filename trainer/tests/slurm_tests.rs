//! The Slurm fan-out for real: a 4-task job array of `drllm-train search` shards
//! (examples/slurm/shard.sbatch) on a running cluster, merged, equals one unsharded run; a task
//! cancelled half-way leaves the merge refused, and resubmitting the array resumes it.
//!
//! Needs a cluster: `scripts/slurm-local.sh up` starts a one-node one on this machine, and
//! `.ci/run` runs this test with DRLLM_SLURM=1 and SLURM_CONF set. Without DRLLM_SLURM=1 the
//! test says so and passes (plain `cargo test` has no cluster); with it, anything missing fails.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_drllm-train");
const SHARDS: usize = 4;
const QUESTIONS: usize = 16;

fn root() -> PathBuf {
    // cargo's run-time CARGO_MANIFEST_DIR first (a binary reused from a clone elsewhere)
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .join("..")
}

/// Questions SmolLM2 can be searched on (the tiny test models' vocabulary has no letter
/// tokens, which the trainer's command line needs).
fn write_data(dir: &Path) {
    let animals = [
        "cat", "dog", "bird", "fish", "horse", "cow", "sheep", "goat",
    ];
    let mut text = String::new();
    for i in 0..QUESTIONS {
        let (a, b) = (i % 7 + 1, (i * 3) % 5 + 2);
        let mut texts = [a + b, a + b + 1, a * b + 3, a + b - 1].map(|x| x.to_string());
        let gold = i % 4;
        texts.swap(0, gold);
        let animal = animals[i % animals.len()];
        let letter = ["A", "B", "C", "D"][gold];
        let q = format!(
            "Question: A farmer has {a} {animal}s and buys {b} more. How many {animal}s does \
             the farmer have now?"
        );
        let opts: String = texts
            .iter()
            .zip(["A", "B", "C", "D"])
            .map(|(t, l)| format!("\n {l}. {t}"))
            .collect();
        let ex = serde_json::json!({
            "id": format!("slurm/validation/q{i}"), "task": "slurm", "split": "validation",
            "kind": "MultipleChoice", "prompt": format!("{q}{opts}\nAnswer:"),
            "choices": ["A", "B", "C", "D"], "gold": gold, "answer": letter,
            "texts": texts, "cont_prompt": format!("{q}\nAnswer:"),
        });
        text.push_str(&ex.to_string());
        text.push('\n');
    }
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("slurm-validation.jsonl"), text).unwrap();
}

fn search_args(model: &Path, data: &Path, run: &Path) -> Vec<String> {
    [
        "-m",
        model.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--task",
        "slurm",
        "--split",
        "validation",
        "--run-dir",
        run.to_str().unwrap(),
        "--simulations",
        "8",
    ]
    .map(String::from)
    .to_vec()
}

fn run(cmd: &mut Command) -> String {
    let o = cmd.output().expect("run");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{cmd:?} failed: {out}\n{err}");
    out
}

/// Submits the shard script as an array; `wait`: block until every task ended.
fn sbatch(run_dir: &Path, args: &[String], wait: bool) -> String {
    std::fs::create_dir_all(run_dir).unwrap();
    let mut c = Command::new("sbatch");
    c.arg("--parsable")
        .arg(format!("--array=0-{}", SHARDS - 1))
        .arg("--cpus-per-task=1")
        .arg(format!("--output={}/slurm-%A_%a.out", run_dir.display()))
        .env("DRLLM_TRAIN", BIN);
    if wait {
        c.arg("--wait");
    }
    c.arg(root().join("examples/slurm/shard.sbatch"))
        .arg("search")
        .args(args);
    let out = run(&mut c);
    out.trim()
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn merge(data: &Path, run_dir: &Path) -> std::process::Output {
    Command::new(BIN)
        .args(["merge", "search", "--shards", &SHARDS.to_string()])
        .args(["-m", "unused.gguf", "--data-dir", data.to_str().unwrap()])
        .args(["--task", "slurm", "--split", "validation"])
        .args(["--run-dir", run_dir.to_str().unwrap()])
        .output()
        .unwrap()
}

/// The results without their timings.
fn results(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("secs");
            v
        })
        .collect()
}

fn complete_lines(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|t| t.matches('\n').count())
        .unwrap_or(0)
}

#[test]
fn a_job_array_of_search_shards_merges_into_the_unsharded_result_and_resumes() {
    if std::env::var("DRLLM_SLURM").as_deref() != Ok("1") {
        eprintln!(
            "no Slurm cluster (DRLLM_SLURM=1 unset): skipped; `scripts/slurm-local.sh up` \
             starts one, .ci/run runs this test"
        );
        return;
    }
    let model = root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(model.is_file(), "{} missing", model.display());
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_data(&data);
    let t0 = Instant::now();

    // one unsharded run
    let plain = dir.path().join("plain");
    run(Command::new(BIN)
        .arg("search")
        .args(search_args(&model, &data, &plain))
        .args(["-t", "1"]));
    let want = results(&plain.join("search-slurm-validation.jsonl"));
    assert_eq!(want.len(), QUESTIONS);

    // the same as a 4-task array, merged
    let sharded = dir.path().join("sharded");
    sbatch(&sharded, &search_args(&model, &data, &sharded), true);
    let o = merge(&data, &sharded);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        results(&sharded.join("search-slurm-validation.jsonl")),
        want,
        "merged shards differ from the unsharded run"
    );
    let ledger = std::fs::read_to_string(sharded.join("questions-used.json")).unwrap();
    assert_eq!(
        ledger.matches("slurm/validation/q").count(),
        QUESTIONS,
        "every shard's questions are in the ledger once: {ledger}"
    );
    eprintln!(
        "[slurm test] sharded run and merge: {:.0} s",
        t0.elapsed().as_secs_f64()
    );

    // a task cancelled half-way: the merge is refused, resubmitting resumes it
    let resumed = dir.path().join("resumed");
    let args = search_args(&model, &data, &resumed);
    let job = sbatch(&resumed, &args, false);
    let shard0 = resumed.join("search-slurm-validation.shard-0-of-4.jsonl");
    let deadline = Instant::now() + Duration::from_secs(300);
    while complete_lines(&shard0) == 0 {
        assert!(Instant::now() < deadline, "shard 0 wrote nothing");
        std::thread::sleep(Duration::from_millis(20));
    }
    run(Command::new("scancel").arg(format!("{job}_0")));
    // wait for the whole array to end
    loop {
        let q = run(Command::new("squeue").args(["-h", "-j", &job]));
        if q.trim().is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "the array did not end: {q}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let done = complete_lines(&shard0);
    assert!(
        (1..QUESTIONS / SHARDS).contains(&done),
        "shard 0 was not cancelled half-way ({done} lines)"
    );
    // as if the cancel had hit a line being written
    let mut torn = std::fs::read(&shard0).unwrap();
    torn.extend_from_slice(b"{\"id\":\"slurm/validation/q");
    std::fs::write(&shard0, torn).unwrap();
    let o = merge(&data, &resumed);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("shard 0 has not finished"),
        "merge of an unfinished array: {err}"
    );
    sbatch(&resumed, &args, true);
    let o = merge(&data, &resumed);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        results(&resumed.join("search-slurm-validation.jsonl")),
        want,
        "resumed shards differ from the unsharded run"
    );
    // the finished shards had nothing left to do
    let logs: Vec<String> = std::fs::read_dir(&resumed)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with("_1.out"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect();
    assert!(
        logs.iter()
            .any(|l| l.contains("\"searched\":0,\"resumed\":4")),
        "task 1 searched again: {logs:?}"
    );
    eprintln!("[slurm test] total {:.0} s", t0.elapsed().as_secs_f64());
}
