//! Results files written one JSON line per question (search results, oracle tables) when the
//! work is split into shards (`--shard i/n`, e.g. one Slurm array task each): each shard writes
//! its own file, a killed shard resumes where it stopped, and [`merge`] joins the shards into
//! the file one unsharded run would have written, after checking that every shard finished.
//!
//! A line counts once its newline is written: a process killed in the middle of a line leaves
//! a torn tail, which readers ignore and the next append cuts off (so the question is simply
//! searched again).

use crate::args::MergeArgs;
pub use crate::error::ShardError;
use crate::error::{Error, SearchError};
use crate::ledger::Ledger;
use crate::tasks::Example;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ShardError + '_ {
    move |source| ShardError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The file shard `i` of `n` writes instead of `path` (`search-x-y.jsonl` ->
/// `search-x-y.shard-2-of-4.jsonl`); `path` itself when there is one shard.
pub fn shard_path(path: &Path, (i, n): (usize, usize)) -> PathBuf {
    if n <= 1 {
        return path.to_path_buf();
    }
    let stem = path.file_stem().unwrap_or_default().to_string_lossy();
    let ext = path
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    path.with_file_name(format!("{stem}.shard-{i}-of-{n}{ext}"))
}

/// The complete lines of a file (1-based line numbers), without a torn last line; a missing
/// file has none.
pub fn complete_lines(path: &Path) -> Result<Vec<(usize, String)>, ShardError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(path)(e)),
    };
    let end = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let text = String::from_utf8_lossy(&bytes[..end]);
    Ok(text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| (i + 1, l.to_string()))
        .collect())
}

/// Opens `path` for appending lines, first cutting off a torn last line (one without its
/// newline) that a killed run left.
pub fn open_append(path: &Path) -> Result<std::fs::File, ShardError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let f = std::fs::OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)
        .map_err(io(path))?;
    let bytes = std::fs::read(path).map_err(io(path))?;
    let end = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if end < bytes.len() {
        f.set_len(end as u64).map_err(io(path))?;
    }
    Ok(f)
}

/// Appends one line with a single write, so a line is either whole or a torn tail.
pub fn append_line(f: &mut std::fs::File, path: &Path, line: &str) -> Result<(), ShardError> {
    let mut buf = String::with_capacity(line.len() + 1);
    buf.push_str(line);
    buf.push('\n');
    f.write_all(buf.as_bytes()).map_err(io(path))?;
    f.flush().map_err(io(path))
}

/// What [`merge`] did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MergeReport {
    /// Questions per shard.
    pub per_shard: Vec<usize>,
    /// Lines written.
    pub lines: usize,
    /// The merged file.
    pub out: PathBuf,
}

/// Joins the files of shards `0..n` of `base` (see [`shard_path`]) into `out`, in the order of
/// `examples` (the order one unsharded run writes), after checking that every shard holds a line
/// for each of its questions (`index % n == shard`) and for nothing else, that no question has
/// two lines, that all lines come from one model, and that every shard was run with the same
/// settings (their `.params.json` files). The lines are copied as they are; the settings file
/// goes next to `out`. Nothing is written unless every check passes.
pub fn merge(
    base: &Path,
    n: usize,
    examples: &[Example],
    out: &Path,
    force: bool,
) -> Result<MergeReport, ShardError> {
    if n == 0 {
        return Err(ShardError::Mismatch {
            what: "no shards".into(),
        });
    }
    if !force && out.exists() && std::fs::metadata(out).map_err(io(out))?.len() > 0 {
        return Err(ShardError::Exists {
            path: out.to_path_buf(),
        });
    }
    let mut m = Merging {
        index: examples
            .iter()
            .enumerate()
            .map(|(i, e)| (e.id.as_str(), i))
            .collect(),
        n,
        lines: BTreeMap::new(),
        model: None,
        params: None,
    };
    let mut per_shard = Vec::with_capacity(n);
    for shard in 0..n {
        let path = shard_path(base, (shard, n));
        if !path.is_file() {
            return Err(ShardError::MissingShard { shard, path });
        }
        m.settings_of(&path)?;
        per_shard.push(m.lines_of(&path, shard)?);
        m.complete(&path, shard, examples)?;
    }
    write_merged(out, &m.lines, m.params.as_ref().map(|(p, _)| p))?;
    Ok(MergeReport {
        per_shard,
        lines: m.lines.len(),
        out: out.to_path_buf(),
    })
}

/// The state of a merge: the lines read so far by question index, and the model and
/// settings of the first shard (every other must have the same).
struct Merging<'a> {
    index: HashMap<&'a str, usize>,
    n: usize,
    lines: BTreeMap<usize, (String, PathBuf)>,
    model: Option<(String, PathBuf)>,
    params: Option<(serde_json::Value, PathBuf)>,
}

impl Merging<'_> {
    /// The shard's settings file, which must equal the first shard's.
    fn settings_of(&mut self, path: &Path) -> Result<(), ShardError> {
        let pp = params_path(path);
        let p: serde_json::Value = match std::fs::read_to_string(&pp) {
            Ok(t) => serde_json::from_str(&t).map_err(|e| ShardError::BadLine {
                path: pp.clone(),
                line: 1,
                reason: e.to_string(),
            })?,
            Err(e) => return Err(io(&pp)(e)),
        };
        match &self.params {
            None => self.params = Some((p, pp)),
            Some((first, fp)) if *first != p => {
                return Err(ShardError::Mismatch {
                    what: format!(
                        "{} holds other settings than {} ({p} vs {first})",
                        pp.display(),
                        fp.display()
                    ),
                })
            }
            Some(_) => {}
        }
        Ok(())
    }

    /// The complete lines of shard `shard`'s file, each checked (its model, a question of
    /// this shard, not seen before); gives how many.
    fn lines_of(&mut self, path: &Path, shard: usize) -> Result<usize, ShardError> {
        let n = self.n;
        let mut count = 0;
        for (line_no, line) in complete_lines(path)? {
            let bad = |reason: String| ShardError::BadLine {
                path: path.to_path_buf(),
                line: line_no,
                reason,
            };
            let v: serde_json::Value =
                serde_json::from_str(&line).map_err(|e| bad(e.to_string()))?;
            let field = |k: &str| {
                v.get(k)
                    .and_then(|x| x.as_str())
                    .map(str::to_string)
                    .ok_or_else(|| bad(format!("no string field '{k}'")))
            };
            let (id, m) = (field("id")?, field("model")?);
            match &self.model {
                None => self.model = Some((m, path.to_path_buf())),
                Some((first, fp)) if *first != m => {
                    return Err(ShardError::Mismatch {
                        what: format!(
                            "{} holds results of model {m}, {} of model {first}",
                            path.display(),
                            fp.display()
                        ),
                    })
                }
                Some(_) => {}
            }
            let Some(&i) = self.index.get(id.as_str()) else {
                return Err(ShardError::Misplaced {
                    id,
                    path: path.to_path_buf(),
                    reason: "is not a question of this data set".into(),
                });
            };
            if i % n != shard {
                return Err(ShardError::Misplaced {
                    id,
                    path: path.to_path_buf(),
                    reason: format!("belongs to shard {} of {n}, not {shard}", i % n),
                });
            }
            if let Some((_, other)) = self.lines.get(&i) {
                return Err(ShardError::Duplicate {
                    id,
                    paths: vec![other.clone(), path.to_path_buf()],
                });
            }
            self.lines.insert(i, (line, path.to_path_buf()));
            count += 1;
        }
        Ok(count)
    }

    /// Every question of shard `shard` has its line.
    fn complete(&self, path: &Path, shard: usize, examples: &[Example]) -> Result<(), ShardError> {
        let expected: Vec<usize> = (shard..examples.len()).step_by(self.n).collect();
        let missing: Vec<usize> = expected
            .iter()
            .copied()
            .filter(|i| !self.lines.contains_key(i))
            .collect();
        if let Some(&first) = missing.first() {
            return Err(ShardError::Unfinished {
                shard,
                of: expected.len(),
                missing: missing.len(),
                first: examples[first].id.clone(),
                path: path.to_path_buf(),
            });
        }
        Ok(())
    }
}

/// The merged lines in data order, through a temporary file renamed into place (a reader never
/// sees half a merge), with the shards' settings beside it.
fn write_merged(
    out: &Path,
    lines: &BTreeMap<usize, (String, PathBuf)>,
    params: Option<&serde_json::Value>,
) -> Result<(), ShardError> {
    let tmp = out.with_extension("jsonl.merging");
    {
        if let Some(dir) = out.parent() {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
        }
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        let mut text = String::new();
        for (line, _) in lines.values() {
            text.push_str(line);
            text.push('\n');
        }
        f.write_all(text.as_bytes()).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
    }
    if let Some(p) = params {
        let pp = params_path(out);
        let text = serde_json::to_string_pretty(p).unwrap_or_default();
        std::fs::write(&pp, text).map_err(io(&pp))?;
    }
    std::fs::rename(&tmp, out).map_err(io(out))
}

/// `drllm-train merge`: [`merge`] of the shards of a search or oracle run into the file one
/// unsharded run writes; every merged question goes into the run's ledger.
pub fn run_merge(a: &MergeArgs) -> Result<MergeReport, Error> {
    let kind = a.kind.as_str();
    let examples = a.questions.load(&a.common.data_dir)?;
    let base = a
        .out
        .clone()
        .unwrap_or_else(|| a.questions.set.results_in(&a.common.run_dir(), kind));
    let r = merge(&base, a.shards, &examples, &base, a.force)?;
    // the shards recorded their questions already; the merge records them all again (the
    // ledger keeps a set), so a ledger copied without the shards' updates is complete too
    Ledger::record(
        &a.common.run_dir(),
        kind,
        examples.iter().map(|e| e.id.as_str()),
    )?;
    eprintln!(
        "[merge] {kind}: {} shards complete ({:?} questions) -> {} ({} lines)",
        a.shards,
        r.per_shard,
        r.out.display(),
        r.lines
    );
    Ok(r)
}

impl crate::args::Sharded {
    /// This shard's results file: `--out`, else RUN_DIR/KIND-TASK-SPLIT.jsonl, with
    /// `.shard-i-of-n` before `.jsonl` when there is more than one shard ([`shard_path`]).
    pub fn path(
        &self,
        common: &crate::args::Common,
        set: &crate::args::TaskSplit,
        kind: &str,
    ) -> PathBuf {
        let base = self
            .out
            .clone()
            .unwrap_or_else(|| set.results_in(&common.run_dir(), kind));
        shard_path(&base, self.shard)
    }
}

/// `path` with `suffix` appended to its file name (`a.b` + `.md` -> `a.b.md`), unlike
/// `with_extension`, which would replace `.b`.
pub fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

/// The summary files of a results file: `X.jsonl` -> `X.report.md`, `X.report.json` (a
/// shard's `X.shard-i-of-n.jsonl` -> `X.shard-i-of-n.report.md`, so shards never overwrite
/// each other's).
pub fn report_paths(results: &Path) -> (PathBuf, PathBuf) {
    let name = results.to_string_lossy();
    let stem = Path::new(name.strip_suffix(".jsonl").unwrap_or(&name));
    (
        with_suffix(stem, ".report.md"),
        with_suffix(stem, ".report.json"),
    )
}

/// Where the search settings of a results file are kept (`RESULTS.params.json`).
pub fn params_path(results: &Path) -> PathBuf {
    let mut name = results.file_name().unwrap_or_default().to_os_string();
    name.push(".params.json");
    results.with_file_name(name)
}

/// Records the search settings (any JSON object; `mcts.simulations` may differ between runs)
/// next to the results file, or refuses a search whose settings differ from those the file's
/// results were found with: resuming must not mix two searches in one file.
pub fn check_params(results: &Path, params: &serde_json::Value) -> Result<(), SearchError> {
    let path = params_path(results);
    if path.exists() {
        let text = std::fs::read_to_string(&path).map_err(SearchError::Io)?;
        let old: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| SearchError::Other(format!("{}: {e}", path.display())))?;
        // a search may be resumed with another simulation budget, nothing else
        let key = |v: &serde_json::Value| {
            let mut v = v.clone();
            if let Some(m) = v.get_mut("mcts").and_then(|m| m.as_object_mut()) {
                m.remove("simulations");
            }
            v
        };
        if key(&old) != key(params) {
            return Err(SearchError::Other(format!(
                "{} holds results searched with other settings ({}); this search: {params}. \
                 Use another --out or --run-dir",
                results.display(),
                text.trim()
            )));
        }
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(SearchError::Io)?;
    }
    let text = serde_json::to_string_pretty(params)
        .map_err(|e| SearchError::Other(format!("settings: {e}")))?;
    std::fs::write(&path, text).map_err(SearchError::Io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::TaskKind;

    fn ex(i: usize) -> Example {
        Example {
            id: format!("t/v/{i}"),
            task: "t".into(),
            split: "v".into(),
            kind: TaskKind::MultipleChoice,
            prompt: String::new(),
            choices: vec!["A".into(), "B".into()],
            gold: 0,
            answer: "A".into(),
            texts: vec![],
            cont_prompt: String::new(),
        }
    }

    fn line(i: usize, model: &str) -> String {
        format!("{{\"id\":\"t/v/{i}\",\"model\":\"{model}\",\"x\":{i}}}")
    }

    fn write_shards(base: &Path, n: usize, examples: usize, skip: Option<usize>) {
        for s in 0..n {
            let p = shard_path(base, (s, n));
            let mut text = String::new();
            for i in (s..examples).step_by(n) {
                if Some(i) != skip {
                    text.push_str(&line(i, "m"));
                    text.push('\n');
                }
            }
            std::fs::write(&p, text).unwrap();
            std::fs::write(params_path(&p), "{\"a\":1}").unwrap();
        }
    }

    #[test]
    fn report_names_keep_the_shard() {
        let (md, js) = report_paths(Path::new("r/oracle-a-b.jsonl"));
        assert_eq!(md, PathBuf::from("r/oracle-a-b.report.md"));
        assert_eq!(js, PathBuf::from("r/oracle-a-b.report.json"));
        let (md, _) = report_paths(&shard_path(Path::new("r/oracle-a-b.jsonl"), (1, 4)));
        assert_eq!(md, PathBuf::from("r/oracle-a-b.shard-1-of-4.report.md"));
        assert_eq!(
            with_suffix(Path::new("x/pred.v2"), ".md"),
            PathBuf::from("x/pred.v2.md")
        );
    }

    #[test]
    fn shard_files_are_named_after_the_unsharded_one() {
        let p = Path::new("/r/search-arc_easy-validation.jsonl");
        assert_eq!(shard_path(p, (0, 1)), p);
        assert_eq!(
            shard_path(p, (2, 4)),
            Path::new("/r/search-arc_easy-validation.shard-2-of-4.jsonl")
        );
    }

    #[test]
    fn a_torn_last_line_is_ignored_and_cut_before_appending() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("r.jsonl");
        std::fs::write(
            &p,
            format!("{}\n{}\n{{\"id\":\"t/v/", line(0, "m"), line(1, "m")),
        )
        .unwrap();
        let l = complete_lines(&p).unwrap();
        assert_eq!(l.len(), 2);
        assert_eq!(l[1], (2, line(1, "m")));
        let mut f = open_append(&p).unwrap();
        append_line(&mut f, &p, &line(2, "m")).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(
            text,
            format!("{}\n{}\n{}\n", line(0, "m"), line(1, "m"), line(2, "m"))
        );
        assert!(complete_lines(&d.path().join("none.jsonl"))
            .unwrap()
            .is_empty());
    }

    #[test]
    fn merge_orders_lines_and_refuses_gaps_duplicates_and_strays() {
        let d = tempfile::tempdir().unwrap();
        let examples: Vec<Example> = (0..10).map(ex).collect();
        let base = d.path().join("search-t-v.jsonl");
        let out = d.path().join("merged.jsonl");
        // complete: lines in data order, settings copied
        write_shards(&base, 3, 10, None);
        let r = merge(&base, 3, &examples, &out, false).unwrap();
        assert_eq!((r.per_shard.clone(), r.lines), (vec![4, 3, 3], 10));
        let want: String = (0..10).map(|i| line(i, "m") + "\n").collect();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), want);
        assert_eq!(
            std::fs::read_to_string(params_path(&out)).unwrap(),
            "{\n  \"a\": 1\n}"
        );
        // an existing merge is not overwritten without --force
        assert!(matches!(
            merge(&base, 3, &examples, &out, false),
            Err(ShardError::Exists { .. })
        ));
        assert!(merge(&base, 3, &examples, &out, true).is_ok());
        let out2 = d.path().join("merged2.jsonl");
        // a gap: shard 1 lacks question 4
        write_shards(&base, 3, 10, Some(4));
        let e = merge(&base, 3, &examples, &out2, false).unwrap_err();
        assert!(
            matches!(&e, ShardError::Unfinished { shard: 1, of: 3, missing: 1, first, .. } if first == "t/v/4"),
            "{e}"
        );
        assert!(!out2.exists(), "a failed merge wrote its output");
        // a duplicate within a shard
        write_shards(&base, 3, 10, None);
        let p0 = shard_path(&base, (0, 3));
        let mut f = open_append(&p0).unwrap();
        append_line(&mut f, &p0, &line(3, "m")).unwrap();
        let e = merge(&base, 3, &examples, &out2, false).unwrap_err();
        assert!(
            matches!(&e, ShardError::Duplicate { id, .. } if id == "t/v/3"),
            "{e}"
        );
        // a question of another shard, or of no shard
        write_shards(&base, 3, 10, None);
        let p1 = shard_path(&base, (1, 3));
        let mut f = open_append(&p1).unwrap();
        append_line(&mut f, &p1, &line(2, "m")).unwrap();
        let e = merge(&base, 3, &examples, &out2, false).unwrap_err();
        assert!(matches!(&e, ShardError::Misplaced { .. }), "{e}");
        assert!(e.to_string().contains("belongs to shard 2"), "{e}");
        write_shards(&base, 3, 10, None);
        let mut f = open_append(&p1).unwrap();
        append_line(&mut f, &p1, &line(77, "m")).unwrap();
        assert!(matches!(
            merge(&base, 3, &examples, &out2, false),
            Err(ShardError::Misplaced { .. })
        ));
        // another model, other settings, a missing shard
        write_shards(&base, 3, 10, None);
        std::fs::write(&p1, line(1, "other") + "\n").unwrap();
        assert!(matches!(
            merge(&base, 3, &examples, &out2, false),
            Err(ShardError::Mismatch { .. })
        ));
        write_shards(&base, 3, 10, None);
        std::fs::write(params_path(&p1), "{\"a\":2}").unwrap();
        assert!(matches!(
            merge(&base, 3, &examples, &out2, false),
            Err(ShardError::Mismatch { .. })
        ));
        write_shards(&base, 3, 10, None);
        std::fs::remove_file(shard_path(&base, (2, 3))).unwrap();
        assert!(matches!(
            merge(&base, 3, &examples, &out2, false),
            Err(ShardError::MissingShard { shard: 2, .. })
        ));
        assert!(!out2.exists());
    }
}
