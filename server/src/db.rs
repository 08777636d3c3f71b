//! The routing log: one SQLite row per finished request (WAL mode, written by one thread so
//! requests never wait on the disk), and the summaries `drllm stats` reads back.

use crate::metrics::Metrics;
use rusqlite::{params, Connection, OpenFlags};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// A log failure.
#[derive(Debug)]
#[non_exhaustive]
pub enum DbError {
    /// SQLite refused.
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    /// The database file has no routing log (or another schema).
    NotALog { path: PathBuf, reason: String },
}

impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DbError::Sqlite { path, source } => write!(f, "{}: {source}", path.display()),
            DbError::NotALog { path, reason } => {
                write!(f, "{} is not a drllm routing log: {reason}", path.display())
            }
        }
    }
}

impl std::error::Error for DbError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DbError::Sqlite { source, .. } => Some(source),
            DbError::NotALog { .. } => None,
        }
    }
}

/// One finished request.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Unix time in seconds when the request arrived.
    pub time: f64,
    /// The response id (`chatcmpl-...`).
    pub request_id: String,
    /// Route name (chat, completion, route).
    pub endpoint: String,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// The path as text (`0-12,14-29`).
    pub path: String,
    /// Per-block pass counts as digits, one per block (`1110112...`).
    pub counts: String,
    pub passes: usize,
    pub n_layer: usize,
    pub routed: bool,
    /// Router generation (content hash), if routed.
    pub generation: Option<String>,
    pub queue_ms: f64,
    pub prefill_ms: f64,
    pub decode_ms: f64,
    /// stop, length, cancelled.
    pub finish: String,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    request_id TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    path TEXT NOT NULL,
    counts TEXT NOT NULL,
    passes INTEGER NOT NULL,
    n_layer INTEGER NOT NULL,
    routed INTEGER NOT NULL,
    generation TEXT,
    queue_ms REAL NOT NULL,
    prefill_ms REAL NOT NULL,
    decode_ms REAL NOT NULL,
    finish TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS requests_time ON requests(time);
";

fn sql(path: &Path) -> impl Fn(rusqlite::Error) -> DbError + '_ {
    move |source| DbError::Sqlite {
        path: path.to_path_buf(),
        source,
    }
}

/// Opens (creating if needed) a log for writing.
pub fn open_for_writing(path: &Path) -> Result<Connection, DbError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| DbError::Sqlite {
            path: path.to_path_buf(),
            source: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
        })?;
    }
    let c = Connection::open(path).map_err(sql(path))?;
    c.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(sql(path))?;
    c.pragma_update(None, "journal_mode", "WAL")
        .map_err(sql(path))?;
    c.pragma_update(None, "synchronous", "NORMAL")
        .map_err(sql(path))?;
    c.execute_batch(SCHEMA).map_err(sql(path))?;
    Ok(c)
}

/// Inserts rows in one transaction.
pub fn insert(c: &mut Connection, path: &Path, rows: &[Row]) -> Result<(), DbError> {
    let tx = c.transaction().map_err(sql(path))?;
    {
        let mut st = tx
            .prepare_cached(
                "INSERT INTO requests (time, request_id, endpoint, prompt_tokens,
                 completion_tokens, path, counts, passes, n_layer, routed, generation, queue_ms,
                 prefill_ms, decode_ms, finish)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
            )
            .map_err(sql(path))?;
        for r in rows {
            st.execute(params![
                r.time,
                r.request_id,
                r.endpoint,
                r.prompt_tokens as i64,
                r.completion_tokens as i64,
                r.path,
                r.counts,
                r.passes as i64,
                r.n_layer as i64,
                r.routed,
                r.generation,
                r.queue_ms,
                r.prefill_ms,
                r.decode_ms,
                r.finish,
            ])
            .map_err(sql(path))?;
        }
    }
    tx.commit().map_err(sql(path))
}

/// Rows that may wait for the writer thread; more are dropped (and counted), so a slow or
/// full disk never holds requests or memory.
pub const LOG_QUEUE: usize = 4096;

/// The writer thread's handle: rows sent here are written in batches; dropping it flushes
/// and ends the thread.
#[derive(Debug)]
pub struct Writer {
    tx: Option<mpsc::SyncSender<Msg>>,
    thread: Option<std::thread::JoinHandle<()>>,
    metrics: Arc<Metrics>,
}

#[derive(Debug)]
enum Msg {
    Row(Box<Row>),
    /// Answered once every row sent before it is written.
    Flush(mpsc::Sender<()>),
}

/// Deletes the rows older than `keep` before now; gives how many.
pub fn prune(c: &Connection, path: &Path, keep: Duration) -> Result<usize, DbError> {
    let cutoff = crate::clock::unix_now() - keep.as_secs_f64();
    c.execute("DELETE FROM requests WHERE time < ?1", params![cutoff])
        .map_err(sql(path))
}

/// How often the writer prunes old rows (and once at start).
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

impl Writer {
    /// Opens the log and starts the writer thread. Rows older than `keep` are deleted at
    /// start and every hour (None: kept forever). Write failures are logged to stderr and
    /// counted in the metrics; the server keeps serving.
    pub fn start(
        path: &Path,
        keep: Option<Duration>,
        metrics: Arc<Metrics>,
    ) -> Result<Writer, DbError> {
        let mut conn = open_for_writing(path)?;
        let path = path.to_path_buf();
        let (tx, rx) = mpsc::sync_channel::<Msg>(LOG_QUEUE);
        let m = metrics.clone();
        let thread = std::thread::Builder::new()
            .name("drllm-db".into())
            .spawn(move || {
                let mut pruned_at: Option<Instant> = None;
                loop {
                    if let Some(keep) = keep {
                        if pruned_at.is_none_or(|t| t.elapsed() >= PRUNE_EVERY) {
                            match prune(&conn, &path, keep) {
                                Ok(n) => {
                                    m.log_pruned.fetch_add(n as u64, Ordering::Relaxed);
                                }
                                Err(e) => eprintln!("[drllm] routing log: pruning: {e}"),
                            }
                            pruned_at = Some(Instant::now());
                        }
                    }
                    let first = match rx.recv_timeout(PRUNE_EVERY) {
                        Ok(m) => m,
                        Err(mpsc::RecvTimeoutError::Timeout) => continue,
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    };
                    let mut batch = Vec::new();
                    let mut flushes = Vec::new();
                    let mut take = |m: Msg| match m {
                        Msg::Row(r) => batch.push(*r),
                        Msg::Flush(done) => flushes.push(done),
                    };
                    take(first);
                    while let Ok(m) = rx.try_recv() {
                        take(m);
                    }
                    if !batch.is_empty() {
                        if let Err(e) = insert(&mut conn, &path, &batch) {
                            m.log_write_failures
                                .fetch_add(batch.len() as u64, Ordering::Relaxed);
                            eprintln!("[drllm] routing log: {e} ({} rows lost)", batch.len());
                        }
                    }
                    for f in flushes {
                        let _ = f.send(());
                    }
                }
            })
            .map_err(|e| DbError::NotALog {
                path: PathBuf::new(),
                reason: format!("cannot start the writer thread: {e}"),
            })?;
        Ok(Writer {
            tx: Some(tx),
            thread: Some(thread),
            metrics,
        })
    }

    /// Queues a row; drops it (counted) when the writer is that far behind.
    pub fn log(&self, row: Row) {
        if let Some(tx) = &self.tx {
            if let Err(mpsc::TrySendError::Full(_)) = tx.try_send(Msg::Row(Box::new(row))) {
                self.metrics.log_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Waits until every row queued so far is written (at most `timeout`).
    pub fn flush(&self, timeout: std::time::Duration) {
        if let Some(tx) = &self.tx {
            let (done, wait) = mpsc::channel();
            let t0 = Instant::now();
            let mut msg = Msg::Flush(done);
            // a full queue: wait for room, within the timeout
            loop {
                match tx.try_send(msg) {
                    Ok(()) => break,
                    Err(mpsc::TrySendError::Full(m)) if t0.elapsed() < timeout => {
                        msg = m;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => return,
                }
            }
            let _ = wait.recv_timeout(timeout.saturating_sub(t0.elapsed()));
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Decisions per block over a time window.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Summary {
    /// Requests in the window.
    pub requests: usize,
    /// Of which routed.
    pub routed: usize,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Mean block passes per request (routed and plain).
    pub mean_passes: f64,
    /// Blocks of the model (the most recent row's).
    pub n_layer: usize,
    /// Per block, over routed requests: skipped, executed once, repeated.
    pub blocks: Vec<[u64; 3]>,
    /// Routed requests' per-block pass counts, oldest first (for the heatmap), at most
    /// `max_rows` of the newest.
    pub decisions: Vec<Vec<u8>>,
    /// Router generations seen, with their request counts.
    pub generations: Vec<(String, usize)>,
    /// Mean generation speed, tokens per second (requests with tokens).
    pub tokens_per_second: f64,
}

/// Reads the log between `since` and `until` (Unix seconds).
pub fn summarise(path: &Path, since: f64, until: f64, max_rows: usize) -> Result<Summary, DbError> {
    if !path.exists() {
        return Err(DbError::NotALog {
            path: path.to_path_buf(),
            reason: "no such file".into(),
        });
    }
    let c = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sql(path))?;
    c.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(sql(path))?;
    let mut st = c
        .prepare(
            "SELECT counts, passes, n_layer, routed, generation, prompt_tokens,
             completion_tokens, decode_ms FROM requests WHERE time >= ?1 AND time < ?2
             ORDER BY time",
        )
        .map_err(|e| DbError::NotALog {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    let rows = st
        .query_map(params![since, until], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, bool>(3)?,
                r.get::<_, Option<String>>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, i64>(6)?,
                r.get::<_, f64>(7)?,
            ))
        })
        .map_err(sql(path))?;
    let mut s = Summary::default();
    let mut passes = 0u64;
    let mut gens: Vec<(String, usize)> = Vec::new();
    let mut tps = (0.0, 0usize);
    for row in rows {
        let (counts, p, n_layer, routed, generation, pt, ct, decode_ms) = row.map_err(sql(path))?;
        s.requests += 1;
        passes += p.max(0) as u64;
        s.prompt_tokens += pt.max(0) as u64;
        s.completion_tokens += ct.max(0) as u64;
        if ct > 0 && decode_ms > 0.0 {
            tps.0 += ct as f64 / (decode_ms / 1e3);
            tps.1 += 1;
        }
        let n_layer = n_layer.max(0) as usize;
        if n_layer != s.n_layer {
            // a log may span models: per-block figures follow the newest model
            s.n_layer = n_layer;
            s.blocks = vec![[0; 3]; n_layer];
            s.decisions.clear();
        }
        if !routed {
            continue;
        }
        s.routed += 1;
        let digits: Vec<u8> = counts
            .bytes()
            .map(|b| b.wrapping_sub(b'0').min(2))
            .collect();
        if digits.len() == n_layer {
            for (b, &d) in digits.iter().enumerate() {
                s.blocks[b][d as usize] += 1;
            }
            s.decisions.push(digits);
        }
        let g = generation.unwrap_or_else(|| "?".into());
        match gens.iter_mut().find(|(x, _)| *x == g) {
            Some(e) => e.1 += 1,
            None => gens.push((g, 1)),
        }
    }
    if s.decisions.len() > max_rows {
        s.decisions.drain(..s.decisions.len() - max_rows);
    }
    s.mean_passes = if s.requests > 0 {
        passes as f64 / s.requests as f64
    } else {
        0.0
    };
    s.tokens_per_second = if tps.1 > 0 { tps.0 / tps.1 as f64 } else { 0.0 };
    s.generations = gens;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(time: f64, counts: &str, routed: bool) -> Row {
        let passes = counts.bytes().map(|b| (b - b'0') as usize).sum();
        Row {
            time,
            request_id: format!("r{time}"),
            endpoint: "chat".into(),
            prompt_tokens: 10,
            completion_tokens: 5,
            path: String::new(),
            counts: counts.into(),
            passes,
            n_layer: counts.len(),
            routed,
            generation: routed.then(|| "g1".to_string()),
            queue_ms: 0.0,
            prefill_ms: 1.0,
            decode_ms: 500.0,
            finish: "stop".into(),
        }
    }

    #[test]
    fn writes_and_summarises_a_window() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/log.sqlite");
        {
            let w = Writer::start(&p, None, Arc::new(Metrics::new(4))).unwrap();
            w.log(row(100.0, "1111", false));
            w.log(row(200.0, "0112", true));
            w.log(row(300.0, "1012", true));
            w.log(row(400.0, "1111", true));
        }
        let s = summarise(&p, 150.0, 350.0, 100).unwrap();
        assert_eq!((s.requests, s.routed, s.n_layer), (2, 2, 4));
        assert_eq!(s.blocks, vec![[1, 1, 0], [1, 1, 0], [0, 2, 0], [0, 0, 2]]);
        assert_eq!(s.decisions, vec![vec![0, 1, 1, 2], vec![1, 0, 1, 2]]);
        assert_eq!(s.mean_passes, 4.0);
        assert_eq!(s.generations, vec![("g1".to_string(), 2)]);
        assert!((s.tokens_per_second - 10.0).abs() < 1e-9);
        let all = summarise(&p, 0.0, 1e12, 1).unwrap();
        assert_eq!((all.requests, all.routed), (4, 3));
        assert_eq!(all.decisions, vec![vec![1, 1, 1, 1]]);
    }

    #[test]
    fn old_rows_are_pruned_and_a_full_queue_drops_rows_counted() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log.sqlite");
        let now = crate::clock::unix_now();
        let m = Arc::new(Metrics::new(4));
        {
            let w = Writer::start(&p, None, m.clone()).unwrap();
            for (i, age_days) in [40.0, 31.0, 29.0, 1.0].iter().enumerate() {
                w.log(row(now - age_days * 86_400.0 - i as f64, "1111", true));
            }
        }
        assert_eq!(summarise(&p, 0.0, 1e12, 10).unwrap().requests, 4);
        // a writer keeping 30 days deletes the two older rows when it starts
        {
            let w = Writer::start(&p, Some(Duration::from_secs(30 * 86_400)), m.clone()).unwrap();
            w.flush(Duration::from_secs(10));
        }
        assert_eq!(summarise(&p, 0.0, 1e12, 10).unwrap().requests, 2);
        assert_eq!(m.log_pruned.load(Ordering::Relaxed), 2);
        // a writer that cannot keep up drops rows past its queue, and counts them
        let c = open_for_writing(&p).unwrap();
        c.execute_batch("BEGIN EXCLUSIVE").unwrap(); // the writer's inserts now wait
        let w = Writer::start(&p, None, m.clone()).unwrap();
        // the writer takes this row and waits on the lock (up to its 5 s busy timeout) ...
        w.log(row(now, "1111", true));
        std::thread::sleep(Duration::from_millis(1000));
        // ... while these fill its queue
        for _ in 0..LOG_QUEUE + 10 {
            w.log(row(now, "1111", true));
        }
        assert_eq!(m.log_dropped.load(Ordering::Relaxed), 10);
        c.execute_batch("COMMIT").unwrap();
        drop(w);
        let kept = summarise(&p, 0.0, 1e12, 10).unwrap().requests - 2;
        assert_eq!(
            kept as u64
                + m.log_dropped.load(Ordering::Relaxed)
                + m.log_write_failures.load(Ordering::Relaxed),
            (LOG_QUEUE + 11) as u64
        );
    }

    #[test]
    fn rejects_a_missing_or_foreign_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("none.sqlite");
        assert!(matches!(
            summarise(&p, 0.0, 1.0, 1),
            Err(DbError::NotALog { .. })
        ));
        let q = dir.path().join("other.sqlite");
        Connection::open(&q)
            .unwrap()
            .execute_batch("CREATE TABLE t(x)")
            .unwrap();
        assert!(matches!(
            summarise(&q, 0.0, 1.0, 1),
            Err(DbError::NotALog { .. })
        ));
        let r = dir.path().join("text.sqlite");
        std::fs::write(&r, b"not a database at all, just some text").unwrap();
        assert!(summarise(&r, 0.0, 1.0, 1).is_err());
    }
}
