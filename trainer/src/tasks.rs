//! Evaluation examples and answer checking: the [`Example`] record the trainer works on (read
//! and written as JSONL), multiple-choice scoring by the logits of the option letters
//! ([`McScorer`]), and GSM8K-style final-number extraction and comparison.

use drllm_engine::Tokenizer;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

/// How an example is answered and checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TaskKind {
    /// Pick one of a few option labels (ARC): scored by the label logits after the prompt.
    MultipleChoice,
    /// Generate a worked answer ending in a number (GSM8K): scored by the final number.
    Numeric,
}

/// One question of an evaluation set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Example {
    /// Stable id, e.g. `arc_easy/validation/Mercury_417466`.
    pub id: String,
    /// Task name: `arc_easy`, `arc_challenge`, `gsm8k`.
    pub task: String,
    /// Split: `validation`, `test`.
    pub split: String,
    /// How the example is answered.
    pub kind: TaskKind,
    /// Multiple choice: the 0-shot query ending in `Answer:`; numeric: the few-shot context and
    /// the question, ending in `Answer:`.
    pub prompt: String,
    /// Multiple choice: the option labels as the prompt shows them (`["A","B","C","D"]`, 3 to 5
    /// of them); numeric: empty.
    pub choices: Vec<String>,
    /// Multiple choice: index of the right label in `choices`; numeric: 0.
    pub gold: usize,
    /// Multiple choice: the gold label; numeric: the gold final number as text (`"18"`).
    pub answer: String,
    /// Multiple choice: the answer texts, in the order of `choices` (scored as continuations
    /// of `cont_prompt`, the way llama.cpp's multiple-choice scoring does); may be empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub texts: Vec<String>,
    /// Multiple choice: the question without the listed options, ending in `Answer:`; the
    /// answer texts follow it after a space. Empty when `texts` is.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cont_prompt: String,
}

/// Errors of this module.
#[derive(Debug)]
#[non_exhaustive]
pub enum TaskError {
    /// A file could not be read or written.
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A JSONL line is not a valid [`Example`].
    Json {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The cause.
        source: serde_json::Error,
    },
    /// An example could not be serialised.
    Serialize {
        /// The example's id.
        id: String,
        /// The cause.
        source: serde_json::Error,
    },
    /// A multiple-choice label does not tokenize as one answer token.
    Label {
        /// The label.
        label: String,
        /// What is wrong.
        reason: String,
    },
    /// Two labels map to the same token, so their logits cannot be told apart.
    DuplicateLabel {
        /// The first label.
        first: String,
        /// The second label.
        second: String,
        /// The shared token id.
        token: i32,
    },
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TaskError::Io { path, source } => write!(f, "{}: {source}", path.display()),
            TaskError::Json { path, line, source } => {
                write!(
                    f,
                    "{}: line {line}: not a valid example: {source}",
                    path.display()
                )
            }
            TaskError::Serialize { id, source } => {
                write!(f, "example {id}: cannot serialise: {source}")
            }
            TaskError::Label { label, reason } => {
                write!(f, "answer label {label:?}: {reason}")
            }
            TaskError::DuplicateLabel {
                first,
                second,
                token,
            } => write!(
                f,
                "answer labels {first:?} and {second:?} map to the same token {token}"
            ),
        }
    }
}

impl std::error::Error for TaskError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TaskError::Io { source, .. } => Some(source),
            TaskError::Json { source, .. } | TaskError::Serialize { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Reads examples from a JSONL file (one [`Example`] per line; blank lines are ignored).
/// A bad line gives [`TaskError::Json`] with its 1-based line number.
pub fn read_jsonl(path: &Path) -> Result<Vec<Example>, TaskError> {
    let io_err = |source| TaskError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io_err)?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(io_err)?;
        if line.trim().is_empty() {
            continue;
        }
        let ex = serde_json::from_str::<Example>(&line).map_err(|source| TaskError::Json {
            path: path.to_path_buf(),
            line: i + 1,
            source,
        })?;
        out.push(ex);
    }
    Ok(out)
}

/// Writes examples as JSONL, one per line, atomically: to `PATH.tmp` in the same folder first,
/// then renamed over `path`.
pub fn write_jsonl(path: &Path, examples: &[Example]) -> Result<(), TaskError> {
    let tmp = tmp_path(path);
    let result = write_lines(&tmp, examples).and_then(|()| {
        std::fs::rename(&tmp, path).map_err(|source| TaskError::Io {
            path: path.to_path_buf(),
            source,
        })
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}

fn write_lines(tmp: &Path, examples: &[Example]) -> Result<(), TaskError> {
    let io_err = |source| TaskError::Io {
        path: tmp.to_path_buf(),
        source,
    };
    let mut w = BufWriter::new(File::create(tmp).map_err(io_err)?);
    for ex in examples {
        serde_json::to_writer(&mut w, ex).map_err(|source| TaskError::Serialize {
            id: ex.id.clone(),
            source,
        })?;
        w.write_all(b"\n").map_err(io_err)?;
    }
    let file = w.into_inner().map_err(|e| io_err(e.into_error()))?;
    file.sync_all().map_err(io_err)
}

/// The default multiple-choice labels, `A` to `E` (ARC has 3 to 5 options).
pub const DEFAULT_LABELS: [&str; 5] = ["A", "B", "C", "D", "E"];

/// Multiple-choice scoring by the logits of the option labels at the last prompt position (one
/// forward pass, no generation): the predicted option is the label whose answer token has the
/// highest logit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct McScorer {
    labels: Vec<String>,
    tokens: Vec<i32>,
    /// Why this tokenizer cannot score by labels (see [`McScorer::unavailable`]).
    unavailable: Option<String>,
}

impl McScorer {
    /// Finds each label's answer token: the first token the model's tokenizer produces for
    /// ` LABEL` after `Answer:` (the difference between the tokens of `Answer: LABEL` and of
    /// `Answer:`, no special tokens), which must decode to `LABEL` or ` LABEL`.
    /// [`DEFAULT_LABELS`] are the usual labels.
    ///
    /// Errors: a label that is empty, not a single answer token after `Answer:`, or two labels
    /// sharing a token. Digit labels fail with SmolLM2's and Gemma-3's tokenizers, which split
    /// ` 1` into ` ` and `1` (ARC's multiple-choice requests use letters only).
    pub fn new(tok: &Tokenizer, labels: &[&str]) -> Result<McScorer, TaskError> {
        let base = tok.tokenize("Answer:", false, false);
        let mut tokens = Vec::with_capacity(labels.len());
        for (i, &label) in labels.iter().enumerate() {
            let bad = |reason: String| TaskError::Label {
                label: label.to_string(),
                reason,
            };
            if label.trim().is_empty() || label.trim() != label {
                return Err(bad(
                    "labels must be non-empty without surrounding spaces".into()
                ));
            }
            let full = tok.tokenize(&format!("Answer: {label}"), false, false);
            if full.len() <= base.len() || full[..base.len()] != base[..] {
                return Err(bad(format!(
                    "the tokens of \"Answer: {label}\" do not extend those of \"Answer:\" \
                     ({full:?} vs {base:?})"
                )));
            }
            let id = full[base.len()];
            let text = String::from_utf8_lossy(&tok.token_bytes(id)).into_owned();
            if text != label && text != format!(" {label}") {
                let pieces: Vec<String> = full[base.len()..]
                    .iter()
                    .map(|&t| String::from_utf8_lossy(&tok.token_bytes(t)).into_owned())
                    .collect();
                return Err(bad(format!(
                    "after \"Answer:\" it tokenizes as {pieces:?} (tokens {:?}); the first \
                     token must be the whole label for scoring by one forward pass",
                    &full[base.len()..]
                )));
            }
            if let Some(j) = tokens.iter().position(|&t| t == id) {
                return Err(TaskError::DuplicateLabel {
                    first: labels[j].to_string(),
                    second: labels[i].to_string(),
                    token: id,
                });
            }
            tokens.push(id);
        }
        Ok(McScorer {
            labels: labels.iter().map(|l| l.to_string()).collect(),
            tokens,
            unavailable: None,
        })
    }

    /// A scorer with given answer tokens (tests, or a vocabulary already inspected): one token
    /// per label, all distinct.
    pub fn from_tokens(labels: &[&str], tokens: &[i32]) -> Result<McScorer, TaskError> {
        if labels.len() != tokens.len() {
            return Err(TaskError::Label {
                label: labels.join(","),
                reason: format!("{} labels but {} tokens", labels.len(), tokens.len()),
            });
        }
        for i in 0..tokens.len() {
            if let Some(j) = tokens[..i].iter().position(|&t| t == tokens[i]) {
                return Err(TaskError::DuplicateLabel {
                    first: labels[j].to_string(),
                    second: labels[i].to_string(),
                    token: tokens[i],
                });
            }
        }
        Ok(McScorer {
            labels: labels.iter().map(|l| l.to_string()).collect(),
            tokens: tokens.to_vec(),
            unavailable: None,
        })
    }

    /// The scorer of a tokenizer whose labels are not single answer tokens (`why`: the error
    /// [`McScorer::new`] gave). Continuation scoring of questions with answer texts never asks
    /// the scorer; judging a question by labels with it is an error naming `why`.
    pub fn unavailable(why: impl Into<String>) -> McScorer {
        McScorer {
            labels: Vec::new(),
            tokens: Vec::new(),
            unavailable: Some(why.into()),
        }
    }

    /// Why labels cannot be scored, for a scorer made by [`McScorer::unavailable`].
    pub fn unavailable_reason(&self) -> Option<&str> {
        self.unavailable.as_deref()
    }

    /// The labels, in order.
    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    /// The answer token of label `i` (panics if `i` is not a label index, a programming error).
    pub fn label_token(&self, i: usize) -> i32 {
        self.tokens[i]
    }

    /// The logits of the first `n_choices` labels (at most the number of labels); a token
    /// outside `logits` or a NaN logit reads as negative infinity.
    pub fn label_logits(&self, logits: &[f32], n_choices: usize) -> Vec<f32> {
        self.tokens
            .iter()
            .take(n_choices)
            .map(|&t| {
                usize::try_from(t)
                    .ok()
                    .and_then(|t| logits.get(t).copied())
                    .filter(|v| !v.is_nan())
                    .unwrap_or(f32::NEG_INFINITY)
            })
            .collect()
    }

    /// The predicted option: the index of the highest logit among the first `n_choices`
    /// labels (ties: the lowest index; 0 when there are none).
    pub fn predict(&self, logits: &[f32], n_choices: usize) -> usize {
        let values = self.label_logits(logits, n_choices);
        let mut best = 0;
        for (i, &v) in values.iter().enumerate() {
            if v > values[best] {
                best = i;
            }
        }
        best
    }

    /// The gold label's logit minus the best other label's logit among the first `n_choices`
    /// (> 0 iff [`McScorer::predict`] is `gold`, up to exact ties): the smooth reward.
    /// With a single option it is `+inf`; with `gold` out of range `-inf`.
    pub fn margin(&self, logits: &[f32], n_choices: usize, gold: usize) -> f32 {
        let values = self.label_logits(logits, n_choices);
        let Some(&g) = values.get(gold) else {
            return f32::NEG_INFINITY;
        };
        let other = values
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != gold)
            .map(|(_, &v)| v)
            .fold(f32::NEG_INFINITY, f32::max);
        g - other
    }
}

/// A number found in text: byte range and the normalised text (no `$`, no commas).
fn scan_number(s: &[u8], start: usize) -> Option<(usize, usize, String)> {
    // find the next digit at or after `start`, together with an optional sign / `$` before it
    let mut i = start;
    while i < s.len() {
        if s[i].is_ascii_digit() {
            break;
        }
        // ".5" style decimals
        if s[i] == b'.' && i + 1 < s.len() && s[i + 1].is_ascii_digit() {
            let before_ok = i == 0 || !s[i - 1].is_ascii_digit();
            if before_ok {
                break;
            }
        }
        i += 1;
    }
    if i >= s.len() {
        return None;
    }
    let digits_start = i;
    // sign: `-` or `-$` right before the digits, not after a word or number (`5-3` is a minus)
    let mut begin = digits_start;
    let mut negative = false;
    let mut j = digits_start;
    if j > 0 && s[j - 1] == b'$' {
        j -= 1;
        begin = j;
    }
    if j > 0 && s[j - 1] == b'-' {
        let prev = if j >= 2 { Some(s[j - 2]) } else { None };
        let is_operator = matches!(prev, Some(c) if c.is_ascii_alphanumeric() || c == b')');
        if !is_operator {
            negative = true;
            begin = j - 1;
        }
    }
    let mut text = String::new();
    if negative {
        text.push('-');
    }
    let mut k = digits_start;
    // integer part with thousands separators (a comma only counts when a digit follows)
    while k < s.len() {
        let c = s[k];
        if c.is_ascii_digit() {
            text.push(c as char);
            k += 1;
        } else if c == b',' && k + 1 < s.len() && s[k + 1].is_ascii_digit() && k > digits_start {
            k += 1;
        } else {
            break;
        }
    }
    // fraction: a point followed by a digit (a trailing period is punctuation)
    if k + 1 < s.len() && s[k] == b'.' && s[k + 1].is_ascii_digit() {
        if text.is_empty() || text == "-" {
            text.push('0');
        }
        text.push('.');
        k += 1;
        while k < s.len() && s[k].is_ascii_digit() {
            text.push(s[k] as char);
            k += 1;
        }
    }
    Some((begin, k, text))
}

fn all_numbers(text: &str) -> Vec<(usize, usize, String)> {
    let s = text.as_bytes();
    let mut out = Vec::new();
    let mut pos = 0;
    while let Some((b, e, t)) = scan_number(s, pos) {
        out.push((b, e, t));
        pos = e.max(pos + 1);
    }
    out
}

/// The final number of a generated answer, GSM8K style: the number right after the first
/// "answer is" (any case; `:`, `$`, `*` and spaces in between are skipped) that is followed by
/// one, else the last number in the text. Thousands commas, `$` and a trailing period are
/// dropped (`"$1,234.50."` gives `"1234.50"`); a `-` directly before a number is its sign
/// unless it follows a word or a number (`5-3` gives `3`). `None` if the text has no number.
pub fn extract_final_number(text: &str) -> Option<String> {
    let lower = text.to_ascii_lowercase();
    let s = text.as_bytes();
    let mut from = 0;
    while let Some(off) = lower[from..].find("answer is") {
        let mut k = from + off + "answer is".len();
        while k < s.len() && matches!(s[k], b' ' | b'\t' | b'\n' | b':' | b'*' | b'$') {
            k += 1;
        }
        // the number must start right here (allowing its `-` sign)
        let start = if k < s.len() && s[k] == b'-' {
            k + 1
        } else {
            k
        };
        if start < s.len() && (s[start].is_ascii_digit() || s[start] == b'.') {
            if let Some((_, _, t)) = scan_number(s, k) {
                if t.bytes().any(|c| c.is_ascii_digit()) {
                    return Some(t);
                }
            }
        }
        from = from + off + 1;
    }
    all_numbers(text).pop().map(|(_, _, t)| t)
}

/// A number string split into sign, integer digits and fraction digits, normalised (no
/// leading zeros in the integer part, no trailing zeros in the fraction).
fn parse_decimal(s: &str) -> Option<(bool, String, String)> {
    let mut t = s.trim().replace([',', '$'], "");
    if t.ends_with('.') {
        t.pop();
    }
    let (negative, body) = match t.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, t.strip_prefix('+').unwrap_or(&t)),
    };
    let (int, frac) = match body.split_once('.') {
        Some((i, f)) => (i, f),
        None => (body, ""),
    };
    if (int.is_empty() && frac.is_empty())
        || !int.bytes().all(|c| c.is_ascii_digit())
        || !frac.bytes().all(|c| c.is_ascii_digit())
    {
        return None;
    }
    let int = int.trim_start_matches('0').to_string();
    let frac = frac.trim_end_matches('0').to_string();
    let zero = int.is_empty() && frac.is_empty();
    Some((negative && !zero, int, frac))
}

/// True when `text` is a plain number as [`numbers_equal`] reads it (optional sign, digits
/// with optional thousands commas and decimals, optional `$`).
pub fn is_number(text: &str) -> bool {
    parse_decimal(text).is_some()
}

/// Numeric equality of two number strings: `"18" == "18.0" == "18.00"`, `"1,000" == "1000"`,
/// `"$5" == "5"`. Integers (after dropping zero decimals) compare exactly, other decimals to
/// a relative tolerance of 1e-6. Anything that is not a number is equal to nothing.
pub fn numbers_equal(a: &str, b: &str) -> bool {
    let (Some(x), Some(y)) = (parse_decimal(a), parse_decimal(b)) else {
        return false;
    };
    if x.2.is_empty() && y.2.is_empty() {
        return x == y;
    }
    let to_f64 = |(neg, int, frac): &(bool, String, String)| -> Option<f64> {
        let v: f64 = format!("{}.{}", if int.is_empty() { "0" } else { int }, frac)
            .trim_end_matches('.')
            .parse()
            .ok()?;
        Some(if *neg { -v } else { v })
    };
    match (to_f64(&x), to_f64(&y)) {
        (Some(p), Some(q)) => (p - q).abs() <= 1e-6 * p.abs().max(q.abs()),
        _ => false,
    }
}
