//! drllm's daemon: one model per process behind an OpenAI-compatible HTTP API, with router
//! hot reload, Prometheus metrics and a SQLite routing log.
//!
//! - [`access`]: who may talk to the daemon (Host and Origin checks, CORS).
//! - [`config`]: settings, layered flags > environment > TOML file > defaults.
//! - [`api`]: the wire format; every request field is parsed and range-checked there.
//! - [`http`]: the route table and handlers (hyper), SSE streaming.
//! - [`pool`]: worker threads, each with its own engine session, behind one bounded queue.
//! - [`reload`]: router generations and the sidecar watch (notify).
//! - [`db`]: the routing log and the summaries `drllm stats` prints.
//! - [`clock`]: Unix time and the clock-drawn seeds of requests that give none.
//! - [`metrics`]: counters rendered for `/metrics`.
//! - [`client`]: a minimal blocking HTTP client (`drllm loadtest`, the tests).

pub mod access;
pub mod api;
pub mod cache;
pub mod client;
pub mod clock;
pub mod config;
pub mod db;
pub mod embeddings;
pub mod error;
pub mod http;
pub mod logprobs;
pub mod metrics;
pub mod notify;
pub mod pool;
pub mod reload;
pub mod tools;

use crate::config::ServeConfig;
use crate::metrics::Metrics;
use crate::pool::{Pool, Shared};
use crate::reload::{RouterSlot, SidecarWatcher};
use drllm_engine::{Model, Tokenizer};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A server failure.
#[derive(Debug)]
#[non_exhaustive]
pub enum ServeError {
    /// The address could not be bound.
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The model could not be loaded or the workers started.
    Load(String),
    /// The routing log could not be opened.
    Db(db::DbError),
}

impl std::fmt::Display for ServeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServeError::Bind { addr, source } => write!(f, "cannot listen on {addr}: {source}"),
            ServeError::Load(m) => write!(f, "{m}"),
            ServeError::Db(e) => write!(f, "routing log: {e}"),
        }
    }
}

impl std::error::Error for ServeError {}

/// What a loaded server holds.
pub struct Ready {
    pub model: Arc<Model>,
    pub tokenizer: Arc<Tokenizer>,
    pub routers: Arc<RouterSlot>,
    pub metrics: Arc<Metrics>,
    pub pool: Pool,
    /// The routing log, if any.
    pub log: Option<Arc<db::Writer>>,
    /// Unix time the model was loaded (`created` in /v1/models).
    pub created: u64,
    _watcher: Option<SidecarWatcher>,
}

/// Server state: the settings, and the loaded model once it is ready.
pub struct State {
    pub config: ServeConfig,
    /// The Host and Origin policy.
    pub access: access::Access,
    pub ready: OnceLock<Arc<Ready>>,
}

/// How long a shutdown waits for requests in flight.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// A running server.
pub struct ServerHandle {
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    accept: tokio::task::JoinHandle<()>,
    load: tokio::task::JoinHandle<Result<(), ServeError>>,
    state: Arc<State>,
}

impl ServerHandle {
    /// The bound address (the real port when port 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server's state.
    pub fn state(&self) -> &Arc<State> {
        &self.state
    }

    /// Waits until the model is loaded (Err: loading failed).
    pub async fn ready(&mut self) -> Result<(), ServeError> {
        if self.state.ready.get().is_some() {
            return Ok(());
        }
        let r = match (&mut self.load).await {
            Ok(r) => r,
            Err(e) => Err(ServeError::Load(format!("loader task: {e}"))),
        };
        // a finished JoinHandle must not be polled again: later calls get the same answer
        let again = match &r {
            Ok(()) => Ok(()),
            Err(e) => Err(ServeError::Load(e.to_string())),
        };
        self.load = tokio::spawn(async move { again });
        r
    }

    /// Stops accepting connections, lets requests in flight finish (at most
    /// [`SHUTDOWN_GRACE`]), then returns.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.accept.await;
        // the rows of the requests just finished reach the disk before the process ends
        if let Some(log) = self.state.ready.get().and_then(|r| r.log.clone()) {
            let _ =
                tokio::task::spawn_blocking(move || log.flush(std::time::Duration::from_secs(10)))
                    .await;
        }
    }
}

fn load(config: &ServeConfig) -> Result<Ready, ServeError> {
    let t0 = std::time::Instant::now();
    if !config.model.exists() {
        return Err(ServeError::Load(format!(
            "model file {} not found",
            config.model.display()
        )));
    }
    let model = Arc::new(
        Model::load(&config.model, config.device)
            .map_err(|e| ServeError::Load(format!("loading {}: {e}", config.model.display())))?,
    );
    let mut tokenizer = Tokenizer::load(&config.model)
        .map_err(|e| ServeError::Load(format!("tokenizer of {}: {e}", config.model.display())))?;
    if let Some((path, text)) = &config.chat_template {
        tokenizer = tokenizer
            .with_chat_template(text.clone())
            .map_err(|e| ServeError::Load(format!("chat template {}: {e}", path.display())))?;
    }
    let tokenizer = Arc::new(tokenizer);
    let metrics = Arc::new(Metrics::new(model.n_layer()));
    let routers = Arc::new(RouterSlot::new(
        config.routers.clone(),
        model.clone(),
        metrics.clone(),
    ));
    let watcher = match config.routers.as_ref() {
        Some(p) => {
            if p.exists() {
                routers.reload();
            } else {
                eprintln!(
                    "[drllm] no router sidecar at {} yet: serving the plain model until one appears",
                    p.display()
                );
            }
            match reload::watch(routers.clone(), config.reload_debounce) {
                Ok(w) => Some(w),
                Err(e) => {
                    eprintln!("[drllm] warning: {e}; reload with POST /v1/routers/reload");
                    None
                }
            }
        }
        None => None,
    };
    let log = match &config.db {
        Some(p) => Some(Arc::new(
            db::Writer::start(p, config.log_keep, metrics.clone()).map_err(ServeError::Db)?,
        )),
        None => None,
    };
    // embeddings: the pooling asked for, else the file's; llama-server refuses OpenAI
    // embeddings of a file that declares none (causal LMs), drllm pools those by the mean
    let pooling = match config.pooling {
        Some(p) => p,
        None => drllm_engine::Pooling::of_file(model.gguf())
            .map_err(|e| ServeError::Load(e.to_string()))?
            .unwrap_or(drllm_engine::Pooling::Mean),
    };
    let shared = Arc::new(Shared {
        pooling,
        model: model.clone(),
        tokenizer: tokenizer.clone(),
        routers: routers.clone(),
        metrics: metrics.clone(),
        log: log.clone(),
        cache: Arc::new(cache::PromptCache::new(
            config.cache_bytes,
            config.cache_exact,
            metrics.clone(),
        )),
        fault: config.fault.clone(),
    });
    let session = drllm_engine::SessionOptions {
        n_ctx: config.ctx_size,
        n_threads: config.threads,
        n_ubatch: config.ubatch_size,
    };
    let pool = Pool::start(shared, config.parallel, session, config.queue, config.batch)
        .map_err(|e| ServeError::Load(format!("starting the workers: {e}")))?;
    eprintln!(
        "[drllm] {} loaded in {:.1}s: {} blocks, {} worker(s) x {} thread(s), context {}, queue {}",
        config.model.display(),
        t0.elapsed().as_secs_f64(),
        model.n_layer(),
        config.parallel,
        config.threads,
        config.ctx_size,
        config.queue
    );
    Ok(Ready {
        model,
        tokenizer,
        routers,
        metrics,
        pool,
        log,
        created: clock::unix_now() as u64,
        _watcher: watcher,
    })
}

/// Binds, starts loading the model in the background (`/health` answers 503 until it is
/// ready) and serves until [`ServerHandle::shutdown`].
pub async fn start(config: ServeConfig) -> Result<ServerHandle, ServeError> {
    let addr = SocketAddr::new(config.host, config.port);
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| ServeError::Bind { addr, source })?;
    warn_if_exposed(&config, addr);
    let state = Arc::new(State {
        access: access::Access::new(config.host, &config.allowed_hosts, &config.allowed_origins),
        config,
        ready: OnceLock::new(),
    });
    let st = state.clone();
    let load = tokio::task::spawn_blocking(move || {
        let r = load(&st.config)?;
        let _ = st.ready.set(Arc::new(r));
        Ok(())
    });
    let (shutdown, stop) = watch::channel(false);
    let accept = tokio::spawn(accept_loop(listener, state.clone(), stop));
    eprintln!("[drllm] listening on http://{addr}");
    Ok(ServerHandle {
        addr,
        shutdown,
        accept,
        load,
        state,
    })
}

/// The warnings of a server that listens beyond loopback.
fn warn_if_exposed(config: &ServeConfig, addr: SocketAddr) {
    if !config.host.is_loopback() && config.api_key.is_none() {
        eprintln!(
            "[drllm] warning: listening on {addr} without an API key: anyone who can reach this \
             address can use the model (set --api-key or bind 127.0.0.1)"
        );
    }
    if !config.host.is_loopback() && config.allowed_hosts.is_empty() {
        eprintln!(
            "[drllm] note: requests must name this server by {} or a loopback name in their Host \
             header; add the names clients use with --allowed-hosts",
            config.host
        );
    }
}

/// Accepts connections until `stop`, at most `max_connections` at once; then refuses new
/// ones and gives those in flight [`SHUTDOWN_GRACE`] to finish.
async fn accept_loop(listener: TcpListener, st: Arc<State>, mut stop: watch::Receiver<bool>) {
    let mut conns = tokio::task::JoinSet::new();
    let max_conns = st.config.max_connections;
    loop {
        if conns.len() >= max_conns {
            // at the cap: accept nothing until a connection ends (new ones wait in the
            // kernel's backlog)
            tokio::select! {
                _ = conns.join_next() => continue,
                _ = stop.changed() => break,
            }
        }
        let conn = tokio::select! {
            c = listener.accept() => c,
            _ = stop.changed() => break,
            // reap finished connections as they end
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let (stream, _) = match conn {
            Ok(c) => c,
            Err(e) => {
                // e.g. out of file descriptors: back off instead of spinning
                eprintln!("[drllm] accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        conns.spawn(serve_connection(stream, st.clone(), stop.clone()));
    }
    // new clients are refused at once instead of waiting in the backlog
    drop(listener);
    // requests in flight get a grace period to finish
    let drain = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
        eprintln!(
            "[drllm] {} connection(s) still busy after {}s: closing them",
            conns.len(),
            SHUTDOWN_GRACE.as_secs()
        );
        conns.abort_all();
    }
}

/// Serves one connection's requests until it closes, or until `stop`: then the request in
/// progress finishes and the connection closes.
async fn serve_connection(stream: TcpStream, st: Arc<State>, mut stop: watch::Receiver<bool>) {
    let svc = service_fn(move |req| http::handle(st.clone(), req));
    // the timer enables hyper's header read timeout (30 s): a client that never
    // finishes its request headers does not hold the connection forever
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = stop.changed() => {}
    }
    // shutting down: finish the request in progress, then close
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

/// Runs a server until SIGINT or SIGTERM (the daemon's main loop). Loading failures end it
/// with an error, so that a service manager sees the failure and restarts.
pub fn run(config: ServeConfig) -> Result<(), ServeError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("drllm-http")
        .enable_all()
        .build()
        .map_err(|e| ServeError::Load(format!("cannot start the async runtime: {e}")))?;
    let model = config.model.clone();
    rt.block_on(async move {
        let mut handle = start(config).await?;
        tokio::select! {
            r = handle.ready() => r?,
            _ = shutdown_signal() => {
                let _ = notify::notify("STOPPING=1");
                handle.shutdown().await;
                return Ok(());
            }
        }
        // systemd (Type=notify): started means loaded and serving
        let status = format!(
            "READY=1\nSTATUS=serving {} on http://{}",
            model.display(),
            handle.addr()
        );
        if let Err(e) = notify::notify(&status) {
            eprintln!("[drllm] could not notify the service manager: {e}");
        }
        shutdown_signal().await;
        eprintln!("[drllm] shutting down");
        let _ = notify::notify("STOPPING=1\nSTATUS=shutting down");
        handle.shutdown().await;
        Ok(())
    })
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
