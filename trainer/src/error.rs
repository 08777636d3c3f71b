//! The trainer's errors. [`Error`] is what a command (`run_*`) returns: each variant wraps the
//! typed error of the step that failed. The errors of the search and the shard files are
//! defined here too, beside it, because the modules that raise them also run commands (so
//! they depend on this module, and it must not depend on them).

use crate::data::DataError;
use crate::ledger::LedgerError;
use crate::tasks::TaskError;
use crate::train::TrainError;
use drllm_engine::router_format::FormatError;
use drllm_engine::EngineError;
use drllm_plots::PlotError;
use std::fmt;
use std::path::{Path, PathBuf};

/// What a command can fail with.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The evaluation data.
    Data(DataError),
    /// A question or the tokenizer's scoring tokens.
    Task(TaskError),
    /// Router training or the feature cache.
    Train(TrainError),
    /// The question ledger.
    Ledger(LedgerError),
    /// The search, the oracle table, the prune or an evaluation run.
    Search(SearchError),
    /// Results files of shards.
    Shard(ShardError),
    /// The engine.
    Engine(EngineError),
    /// A sidecar or checkpoint file.
    Sidecar(FormatError),
    /// A plot.
    Plot(PlotError),
    /// Reading or writing a file.
    Io(std::io::Error),
    /// JSON of a report or settings file.
    Json(serde_json::Error),
    /// A failure while reading or writing `path`.
    File { path: PathBuf, source: Box<Error> },
    /// The command cannot run as asked; the message says why and what to do.
    Refused(String),
}

impl Error {
    /// A refusal with its reason.
    pub fn refused(message: impl Into<String>) -> Self {
        Error::Refused(message.into())
    }

    /// For `map_err`: the failure, with the file it concerns.
    pub fn at<E: Into<Error>>(path: &Path) -> impl FnOnce(E) -> Error + '_ {
        move |e| Error::File {
            path: path.to_path_buf(),
            source: Box::new(e.into()),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Data(e) => write!(f, "{e}"),
            Error::Task(e) => write!(f, "{e}"),
            Error::Train(e) => write!(f, "{e}"),
            Error::Ledger(e) => write!(f, "{e}"),
            Error::Search(e) => write!(f, "{e}"),
            Error::Shard(e) => write!(f, "{e}"),
            Error::Engine(e) => write!(f, "{e}"),
            Error::Sidecar(e) => write!(f, "{e}"),
            Error::Plot(e) => write!(f, "{e}"),
            Error::Io(e) => write!(f, "{e}"),
            Error::Json(e) => write!(f, "{e}"),
            Error::File { path, source } => write!(f, "{}: {source}", path.display()),
            Error::Refused(m) => f.write_str(m),
        }
    }
}

// The message of each variant already holds its cause's text, so no source is chained (a
// reporter that prints the chain would repeat it).
impl std::error::Error for Error {}

macro_rules! from {
    ($($t:ty => $v:ident),* $(,)?) => {
        $(impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Error::$v(e)
            }
        })*
    };
}

from!(
    DataError => Data,
    TaskError => Task,
    TrainError => Train,
    LedgerError => Ledger,
    SearchError => Search,
    ShardError => Shard,
    EngineError => Engine,
    FormatError => Sidecar,
    PlotError => Plot,
    std::io::Error => Io,
    serde_json::Error => Json,
);

/// Errors of the search.
#[derive(Debug)]
#[non_exhaustive]
pub enum SearchError {
    /// The engine failed.
    Engine(EngineError),
    /// Reading or writing results failed.
    Io(std::io::Error),
    /// A results line could not be parsed.
    BadResult { line: usize, reason: String },
    /// Anything else.
    Other(String),
}

impl std::fmt::Display for SearchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SearchError::Engine(e) => write!(f, "{e}"),
            SearchError::Io(e) => write!(f, "{e}"),
            SearchError::BadResult { line, reason } => {
                write!(f, "results line {line}: {reason}")
            }
            SearchError::Other(s) => write!(f, "{s}"),
        }
    }
}

impl std::error::Error for SearchError {}

impl From<ShardError> for SearchError {
    fn from(e: ShardError) -> Self {
        match e {
            ShardError::Io { source, .. } => SearchError::Io(source),
            other => SearchError::Other(other.to_string()),
        }
    }
}

impl From<EngineError> for SearchError {
    fn from(e: EngineError) -> Self {
        SearchError::Engine(e)
    }
}
impl From<std::io::Error> for SearchError {
    fn from(e: std::io::Error) -> Self {
        SearchError::Io(e)
    }
}

/// Errors of reading, appending and merging shard files.
#[derive(Debug)]
pub enum ShardError {
    /// Reading or writing a file failed.
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A complete line is not a JSON object with string fields `id` and `model`.
    BadLine {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    /// A shard's file is missing.
    MissingShard { shard: usize, path: PathBuf },
    /// A shard has not finished: questions of it have no line.
    Unfinished {
        shard: usize,
        of: usize,
        missing: usize,
        first: String,
        path: PathBuf,
    },
    /// A question appears twice (in one shard or in two).
    Duplicate { id: String, paths: Vec<PathBuf> },
    /// A line for a question that belongs to another shard, or to no question of the data.
    Misplaced {
        id: String,
        path: PathBuf,
        reason: String,
    },
    /// The shards were run with other settings or on other models.
    Mismatch { what: String },
    /// The merged file exists already.
    Exists { path: PathBuf },
}

impl fmt::Display for ShardError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ShardError::Io { path, source } => write!(f, "{}: {source}", path.display()),
            ShardError::BadLine { path, line, reason } => {
                write!(f, "{} line {line}: {reason}", path.display())
            }
            ShardError::MissingShard { shard, path } => {
                write!(f, "shard {shard} has no results file ({})", path.display())
            }
            ShardError::Unfinished {
                shard,
                of,
                missing,
                first,
                path,
            } => write!(
                f,
                "shard {shard} has not finished: {missing} of its {of} questions have no result \
                 in {} (first: {first}); resubmit it (it resumes) and merge again",
                path.display()
            ),
            ShardError::Duplicate { id, paths } => {
                let p: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
                write!(
                    f,
                    "question {id} has more than one result ({})",
                    p.join(", ")
                )
            }
            ShardError::Misplaced { id, path, reason } => {
                write!(f, "{}: question {id} {reason}", path.display())
            }
            ShardError::Mismatch { what } => write!(f, "the shards differ: {what}"),
            ShardError::Exists { path } => write!(
                f,
                "{} exists already (merge writes a new file; move it away or pass --force)",
                path.display()
            ),
        }
    }
}

impl std::error::Error for ShardError {}
