//! Router generations: the sidecar in service, swapped atomically when the file changes.
//!
//! Every successful load is an immutable [`Routers`] (its generation id is the file's content
//! hash). A request takes an `Arc` of the current one when a worker starts it and keeps it to
//! the end, so a reload never changes a request in flight. A file that fails validation
//! leaves the previous generation serving (a log line and `drllm_router_reload_failures_total`);
//! a deleted file makes new requests run unrouted.

use crate::metrics::Metrics;
use drllm_engine::{Model, Routers};
use notify::{RecursiveMode, Watcher};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

/// What a reload did.
#[derive(Debug, Clone, PartialEq)]
pub enum Reload {
    /// A new generation serves new requests.
    Loaded { generation: String },
    /// The file holds the generation already serving.
    Unchanged { generation: String },
    /// The file is gone: new requests run the plain model.
    Removed,
    /// The file is invalid; the previous generation (if any) keeps serving.
    Failed { message: String },
    /// Routing is off for this server (`--no-routers`).
    Disabled,
}

/// The routers new requests get.
pub struct RouterSlot {
    path: Option<PathBuf>,
    model: Arc<Model>,
    metrics: Arc<Metrics>,
    current: RwLock<Option<Arc<Routers>>>,
    state: Mutex<SlotState>,
    /// Held for a whole reload: the watch thread and the reload endpoint never interleave.
    reloading: Mutex<()>,
}

#[derive(Default)]
struct SlotState {
    loaded_at: Option<SystemTime>,
    last_error: Option<String>,
}

impl RouterSlot {
    /// A slot for the sidecar at `path` (None: routing disabled); nothing is loaded yet.
    pub fn new(path: Option<PathBuf>, model: Arc<Model>, metrics: Arc<Metrics>) -> Self {
        RouterSlot {
            path,
            model,
            metrics,
            current: RwLock::new(None),
            state: Mutex::new(SlotState::default()),
            reloading: Mutex::new(()),
        }
    }

    /// The sidecar path watched.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The generation serving new requests.
    pub fn current(&self) -> Option<Arc<Routers>> {
        self.current.read().ok().and_then(|g| g.clone())
    }

    /// When the current generation was loaded, and the last failure's message.
    pub fn status(&self) -> (Option<SystemTime>, Option<String>) {
        match self.state.lock() {
            Ok(s) => (s.loaded_at, s.last_error.clone()),
            Err(_) => (None, None),
        }
    }

    fn set(&self, r: Option<Arc<Routers>>) {
        let generation = r.as_ref().map(|r| r.generation().to_string());
        if let Ok(mut c) = self.current.write() {
            *c = r;
        }
        if let Ok(mut s) = self.state.lock() {
            s.loaded_at = Some(SystemTime::now());
            s.last_error = None;
        }
        self.metrics.reloaded(generation);
    }

    /// Reads and validates the sidecar and swaps it in.
    pub fn reload(&self) -> Reload {
        let Some(path) = &self.path else {
            return Reload::Disabled;
        };
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|p| p.into_inner());
        let bytes = match drllm_engine::router_format::read_capped(path) {
            Ok(b) => b,
            Err(drllm_engine::router_format::FormatError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                if self.current().is_some() {
                    eprintln!(
                        "[drllm] router sidecar {} removed: new requests run the plain model",
                        path.display()
                    );
                    self.set(None);
                }
                return Reload::Removed;
            }
            Err(e) => return self.fail(path, e.to_string()),
        };
        match Routers::from_bytes(&bytes, path, &self.model) {
            Ok(r) => {
                let generation = r.generation().to_string();
                if self.current().is_some_and(|c| c.generation() == generation) {
                    if let Ok(mut s) = self.state.lock() {
                        s.last_error = None;
                    }
                    return Reload::Unchanged { generation };
                }
                eprintln!(
                    "[drllm] routers loaded from {} (generation {})",
                    path.display(),
                    short(&generation)
                );
                self.set(Some(Arc::new(r)));
                Reload::Loaded { generation }
            }
            Err(e) => self.fail(path, e.to_string()),
        }
    }

    fn fail(&self, path: &Path, message: String) -> Reload {
        let keeping = match self.current() {
            Some(c) => format!("generation {} keeps serving", short(c.generation())),
            None => "requests run the plain model".into(),
        };
        eprintln!(
            "[drllm] router sidecar {} rejected: {message}; {keeping}",
            path.display()
        );
        self.metrics.reload_failed();
        if let Ok(mut s) = self.state.lock() {
            s.last_error = Some(message.clone());
        }
        Reload::Failed { message }
    }
}

/// The first 19 characters of a generation id (`sha256:` + 12 hex digits).
pub fn short(generation: &str) -> &str {
    generation.get(..19).unwrap_or(generation)
}

/// Watches the sidecar's directory (so that rename-into-place, appearance and deletion are
/// all seen) and reloads after `debounce` of quiet. Dropping it stops the watch.
pub struct SidecarWatcher {
    _watcher: notify::RecommendedWatcher,
    _thread: std::thread::JoinHandle<()>,
}

/// Errors starting the watch.
#[derive(Debug)]
pub struct WatchError(pub String);

impl std::fmt::Display for WatchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for WatchError {}

/// Starts watching `slot`'s sidecar.
pub fn watch(slot: Arc<RouterSlot>, debounce: Duration) -> Result<SidecarWatcher, WatchError> {
    let path = slot
        .path()
        .ok_or_else(|| WatchError("routing is disabled".into()))?
        .to_path_buf();
    let name = path
        .file_name()
        .ok_or_else(|| WatchError(format!("{} has no file name", path.display())))?
        .to_os_string();
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let (tx, rx) = mpsc::channel::<()>();
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if let Ok(ev) = ev {
            // opening or reading the file is not a change (and reload() itself opens it: a
            // reload would otherwise trigger the next one)
            if matches!(ev.kind, notify::EventKind::Access(_)) {
                return;
            }
            if ev
                .paths
                .iter()
                .any(|p| p.file_name() == Some(name.as_os_str()))
            {
                let _ = tx.send(());
            }
        }
    })
    .map_err(|e| WatchError(format!("cannot watch {}: {e}", dir.display())))?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(|e| WatchError(format!("cannot watch {}: {e}", dir.display())))?;
    let thread = std::thread::Builder::new()
        .name("drllm-reload".into())
        .spawn(move || {
            while rx.recv().is_ok() {
                // debounce: wait until the file has been quiet for a while
                loop {
                    match rx.recv_timeout(debounce) {
                        Ok(()) => continue,
                        Err(mpsc::RecvTimeoutError::Timeout) => break,
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                }
                slot.reload();
            }
        })
        .map_err(|e| WatchError(format!("cannot start the reload thread: {e}")))?;
    Ok(SidecarWatcher {
        _watcher: watcher,
        _thread: thread,
    })
}
