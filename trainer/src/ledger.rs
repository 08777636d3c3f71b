//! Which questions were used for what: the ledger that keeps evaluation honest.
//!
//! Every step that makes a choice from questions records their ids under its purpose
//! (`search`, `oracle`, `training`, `calibration`, `prune`) in `RUN_DIR/questions-used.json`,
//! and the exported sidecar carries the same ledger in its provenance notes. `eval` refuses a
//! question set that overlaps the ledger of the routers or prunes it judges: a figure chosen
//! on a question set is only a result on questions no choice was made on.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Question ids by purpose.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Ledger {
    pub used: BTreeMap<String, BTreeSet<String>>,
}

/// Errors of the ledger.
#[derive(Debug)]
#[non_exhaustive]
pub enum LedgerError {
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    Parse {
        path: PathBuf,
        message: String,
    },
    /// Evaluation questions that were used for a choice.
    Overlap {
        purpose: String,
        count: usize,
        examples: Vec<String>,
    },
}

impl std::fmt::Display for LedgerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LedgerError::Io { path, source } => write!(f, "{}: {source}", path.display()),
            LedgerError::Parse { path, message } => write!(f, "{}: {message}", path.display()),
            LedgerError::Overlap {
                purpose,
                count,
                examples,
            } => write!(
                f,
                "{count} of the evaluation questions were used for {purpose} (e.g. {}): \
                 evaluate on questions no choice was made on",
                examples.join(", ")
            ),
        }
    }
}

impl std::error::Error for LedgerError {}

/// The ledger file of a run directory.
pub fn path_in(run_dir: &Path) -> PathBuf {
    run_dir.join("questions-used.json")
}

impl Ledger {
    /// Reads a run directory's ledger (none yet: empty).
    pub fn load(run_dir: &Path) -> Result<Ledger, LedgerError> {
        let path = path_in(run_dir);
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| LedgerError::Parse {
                path,
                message: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Ledger::default()),
            Err(source) => Err(LedgerError::Io { path, source }),
        }
    }

    /// Adds ids under a purpose.
    pub fn add<'a>(&mut self, purpose: &str, ids: impl IntoIterator<Item = &'a str>) {
        let set = self.used.entry(purpose.to_string()).or_default();
        set.extend(ids.into_iter().map(str::to_string));
    }

    /// Merges another ledger in.
    pub fn merge(&mut self, other: &Ledger) {
        for (p, ids) in &other.used {
            self.add(p, ids.iter().map(String::as_str));
        }
    }

    /// Adds ids under a purpose in a run directory's ledger file (written atomically).
    pub fn record<'a>(
        run_dir: &Path,
        purpose: &str,
        ids: impl IntoIterator<Item = &'a str>,
    ) -> Result<Ledger, LedgerError> {
        let path = path_in(run_dir);
        let io = |source| LedgerError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(run_dir).map_err(io)?;
        // shards of one run (Slurm array tasks) record into the same ledger: read, add and
        // write under an exclusive lock, so no task's questions are lost
        let lock = std::fs::File::create(run_dir.join("ledger.lock")).map_err(io)?;
        lock.lock().map_err(io)?;
        let mut l = Ledger::load(run_dir)?;
        l.add(purpose, ids);
        let tmp = path.with_extension(format!("json.{}.tmp", std::process::id()));
        let text = serde_json::to_string_pretty(&l).map_err(|e| LedgerError::Parse {
            path: path.clone(),
            message: e.to_string(),
        })?;
        std::fs::write(&tmp, text).map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        Ok(l)
    }

    /// Refuses evaluation questions that the ledger used for any purpose.
    pub fn check_disjoint<'a>(
        &self,
        eval_ids: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), LedgerError> {
        let eval: BTreeSet<&str> = eval_ids.into_iter().collect();
        for (purpose, ids) in &self.used {
            let common: Vec<String> = ids
                .iter()
                .filter(|i| eval.contains(i.as_str()))
                .cloned()
                .collect();
            if !common.is_empty() {
                return Err(LedgerError::Overlap {
                    purpose: purpose.clone(),
                    count: common.len(),
                    examples: common.into_iter().take(3).collect(),
                });
            }
        }
        Ok(())
    }

    /// Ids per purpose, for a summary line.
    pub fn counts(&self) -> BTreeMap<String, usize> {
        self.used
            .iter()
            .map(|(p, s)| (p.clone(), s.len()))
            .collect()
    }

    /// The ledger as a sidecar's provenance notes, with a free-text note (JSON
    /// `{"questions_used": ..., "note": ...}`).
    pub fn to_notes(&self, note: &str) -> String {
        serde_json::json!({ "questions_used": self.used, "note": note }).to_string()
    }

    /// The ledger a sidecar's notes carry (none or other notes: empty).
    pub fn from_notes(notes: &str) -> Ledger {
        serde_json::from_str::<serde_json::Value>(notes)
            .ok()
            .and_then(|v| v.get("questions_used").cloned())
            .and_then(|u| serde_json::from_value(u).ok())
            .map(|used| Ledger { used })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_merges_and_refuses_overlap() {
        let dir = tempfile::tempdir().unwrap();
        Ledger::record(dir.path(), "search", ["a/v/1", "a/v/2"]).unwrap();
        let l = Ledger::record(dir.path(), "calibration", ["a/t/9"]).unwrap();
        assert_eq!(Ledger::load(dir.path()).unwrap(), l);
        assert_eq!(l.counts()["search"], 2);
        l.check_disjoint(["a/t/1", "a/v/3"]).unwrap();
        let e = l.check_disjoint(["a/t/1", "a/t/9"]).unwrap_err();
        assert!(
            matches!(&e, LedgerError::Overlap { purpose, count: 1, .. } if purpose == "calibration"),
            "{e}"
        );
        assert!(e.to_string().contains("a/t/9"), "{e}");
        // through a sidecar's notes and back
        let back = Ledger::from_notes(&l.to_notes("bias +1 baked in"));
        assert_eq!(back, l);
        assert_eq!(Ledger::from_notes("free text"), Ledger::default());
        let mut m = Ledger::default();
        m.add("prune", ["x"]);
        m.merge(&l);
        assert_eq!(m.counts().len(), 3);
        std::fs::write(path_in(dir.path()), "{broken").unwrap();
        assert!(matches!(
            Ledger::load(dir.path()),
            Err(LedgerError::Parse { .. })
        ));
    }
}
