//! Workers: each owns a [`Session`] (its own KV cache) on its own thread and takes jobs from
//! one bounded queue. A job reports through a channel; when the client goes away the channel
//! closes and the worker stops the job at the next token (or skips it if it was still queued).

use crate::api::{ApiError, RoutingSettings};
use crate::db;
use crate::metrics::Metrics;
use crate::reload::RouterSlot;
use drllm_engine::{
    generate, BlockDecision, EngineError, FinishReason, GenerateOptions, LayerPath, Logits, Model,
    Route, RouteOptions, Routers, Session, SessionOptions, Tokenizer,
};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc as tmpsc;

/// What a job does.
#[derive(Debug, Clone)]
pub enum Task {
    /// Prefill along the routed (or plain) path, then generate.
    Generate {
        prompt: Vec<i32>,
        opts: GenerateOptions,
    },
    /// Only choose the path (a prefill with the routers), no generation.
    Route { prompt: Vec<i32> },
}

/// A request for a worker.
pub struct Job {
    /// Response id, logged with the row.
    pub id: String,
    /// Route name for the log (chat, completion, route).
    pub endpoint: &'static str,
    pub task: Task,
    pub routing: RoutingSettings,
    /// Where the job reports; closed = the client is gone.
    pub events: tmpsc::Sender<Event>,
    /// Send text as it is generated (streaming). Otherwise only the end is reported: no
    /// wake-up of the HTTP side per token, which would compete with the engine's threads.
    pub stream_text: bool,
    /// When the request arrived.
    pub arrived: Instant,
    /// The same, as Unix seconds (for the log).
    pub arrived_unix: f64,
}

/// What a job reports.
#[derive(Debug)]
pub enum Event {
    /// Generated text that is final (stop strings already cut).
    Text(String),
    /// The job ended.
    Done(Box<Outcome>),
    /// The job failed.
    Failed(ApiError),
}

/// A finished job.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub path: LayerPath,
    /// Each block's router decision (routed requests).
    pub decisions: Vec<BlockDecision>,
    pub routed: bool,
    /// The router generation used.
    pub generation: Option<String>,
    pub n_prompt: usize,
    pub n_completion: usize,
    pub text: String,
    pub finish: FinishReason,
    pub queue_secs: f64,
    pub prefill_secs: f64,
    pub decode_secs: f64,
}

/// Why a job was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// The queue is full.
    Busy,
    /// No worker is left to take it.
    NoWorkers,
}

/// The worker pool.
pub struct Pool {
    tx: mpsc::SyncSender<Job>,
    metrics: Arc<Metrics>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// What every worker shares.
pub struct Shared {
    pub model: Arc<Model>,
    pub tokenizer: Arc<Tokenizer>,
    pub routers: Arc<RouterSlot>,
    pub metrics: Arc<Metrics>,
    pub log: Option<Arc<db::Writer>>,
}

impl Pool {
    /// Starts `workers` threads with `threads` CPU threads and a context of `n_ctx` each; at
    /// most `queue` jobs wait (a queue of 0 admits a job only when a worker is free to take it).
    pub fn start(
        shared: Arc<Shared>,
        workers: usize,
        threads: usize,
        n_ctx: usize,
        queue: usize,
    ) -> Result<Pool, EngineError> {
        // the channel holds waiting jobs; a worker blocked in recv() takes one at once, so
        // with capacity 0 (a rendezvous) a job is admitted only when a worker is idle
        let (tx, rx) = mpsc::sync_channel::<Job>(queue);
        let rx = Arc::new(Mutex::new(rx));
        let mut handles = Vec::new();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), EngineError>>();
        for i in 0..workers {
            let rx = rx.clone();
            let shared = shared.clone();
            let ready = ready_tx.clone();
            let h = std::thread::Builder::new()
                .name(format!("drllm-worker-{i}"))
                .spawn(move || {
                    let session = Session::new(
                        shared.model.clone(),
                        SessionOptions {
                            n_ctx,
                            n_threads: threads,
                            ..Default::default()
                        },
                    );
                    let mut session = match session {
                        Ok(s) => {
                            let _ = ready.send(Ok(()));
                            s
                        }
                        Err(e) => {
                            let _ = ready.send(Err(e));
                            return;
                        }
                    };
                    drop(ready);
                    loop {
                        let job = match rx.lock() {
                            Ok(r) => r.recv(),
                            Err(_) => return,
                        };
                        let Ok(job) = job else { return };
                        shared.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
                        // a bug in one request must not take the worker with it: the job's
                        // channel closes (its client gets a 500) and the session starts over
                        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            run_job(&shared, &mut session, job)
                        }));
                        if run.is_err() {
                            eprintln!("[drllm] a request failed inside the engine (panic); the worker goes on");
                            session.reset();
                        }
                    }
                })
                .map_err(|e| EngineError::State(format!("cannot start a worker: {e}")))?;
            handles.push(h);
        }
        drop(ready_tx);
        for _ in 0..workers {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(EngineError::State("a worker died while starting".into())),
            }
        }
        Ok(Pool {
            tx,
            metrics: shared.metrics.clone(),
            threads: handles,
        })
    }

    /// Queues a job, or refuses it when the queue is full.
    pub fn submit(&self, job: Job) -> Result<(), Refused> {
        self.metrics.queue_depth.fetch_add(1, Ordering::Relaxed);
        match self.tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
                match e {
                    mpsc::TrySendError::Full(_) => {
                        self.metrics.rejected();
                        Err(Refused::Busy)
                    }
                    mpsc::TrySendError::Disconnected(_) => Err(Refused::NoWorkers),
                }
            }
        }
    }

    /// Worker threads.
    pub fn workers(&self) -> usize {
        self.threads.len()
    }
}

fn engine_error(e: EngineError) -> ApiError {
    match e {
        EngineError::ContextFull { needed, n_ctx } => ApiError::invalid(
            format!(
                "the request needs {needed} tokens of context, more than the {n_ctx} available"
            ),
            None,
        )
        .with_code("context_length_exceeded"),
        EngineError::InvalidToken { token, n_vocab } => ApiError::invalid(
            format!("token {token} is outside the vocabulary of {n_vocab}"),
            Some("prompt"),
        ),
        other => ApiError::internal(other.to_string()),
    }
}

fn run_job(shared: &Shared, session: &mut Session, job: Job) {
    let metrics = &shared.metrics;
    if job.events.is_closed() {
        metrics.cancelled();
        return;
    }
    metrics.running.fetch_add(1, Ordering::Relaxed);
    // decrements `running` however the job ends (an early return or a panic)
    struct Running<'a>(&'a Metrics);
    impl Drop for Running<'_> {
        fn drop(&mut self) {
            self.0.running.fetch_sub(1, Ordering::Relaxed);
        }
    }
    let _running = Running(metrics);
    let queue_secs = job.arrived.elapsed().as_secs_f64();
    let routers: Option<Arc<Routers>> = match job.routing.routing {
        Some(false) => None,
        _ => shared.routers.current(),
    };
    if job.routing.routing == Some(true) && routers.is_none() {
        let _ = job.events.blocking_send(Event::Failed(
            ApiError::invalid(
                "routing was requested but no router sidecar is loaded",
                Some("routing"),
            )
            .with_code("no_routers"),
        ));
        return;
    }
    let opts = RouteOptions {
        depth_bias: job.routing.depth_bias,
        max_passes: job.routing.max_passes,
        observe_only: false,
    };
    let mut hook = routers.as_ref().map(|r| r.hook(&opts));
    let full = LayerPath::full(shared.model.n_layer());
    let route = match hook.as_mut() {
        Some(h) => Route::Hook(h),
        None => Route::Fixed(&full),
    };
    let events = &job.events;
    let result = match &job.task {
        Task::Generate { prompt, opts } => {
            let mut cancelled = false;
            let stream_text = job.stream_text;
            generate(session, &shared.tokenizer, prompt, route, opts, |s| {
                let gone = if stream_text {
                    events.blocking_send(Event::Text(s.to_string())).is_err()
                } else {
                    events.is_closed()
                };
                cancelled |= gone;
                !cancelled
            })
            .map(|g| {
                // a generation that ran to its end is complete even if the client left just
                // after it
                let finish = if cancelled {
                    FinishReason::Cancelled
                } else {
                    g.finish
                };
                (
                    g.path,
                    g.n_prompt,
                    g.tokens.len(),
                    g.text,
                    finish,
                    g.prefill_secs,
                    g.decode_secs,
                )
            })
        }
        Task::Route { prompt } => {
            let t0 = Instant::now();
            session.prefill(prompt, route, Logits::Last).map(|p| {
                (
                    p.path,
                    prompt.len(),
                    0,
                    String::new(),
                    FinishReason::Stop,
                    t0.elapsed().as_secs_f64(),
                    0.0,
                )
            })
        }
    };
    session.reset();
    let decisions = hook.map(|h| h.decisions().to_vec()).unwrap_or_default();
    match result {
        Err(e) => {
            let _ = events.blocking_send(Event::Failed(engine_error(e)));
        }
        Ok((path, n_prompt, n_completion, text, finish, prefill_secs, decode_secs)) => {
            let routed = routers.is_some();
            let generation = routers.as_ref().map(|r| r.generation().to_string());
            let counts = path.counts();
            metrics.generation_done(
                routed,
                &counts,
                n_prompt,
                n_completion,
                prefill_secs,
                decode_secs,
            );
            if finish == FinishReason::Cancelled {
                metrics.cancelled();
            }
            if let Some(log) = &shared.log {
                log.log(db::Row {
                    time: job.arrived_unix,
                    request_id: job.id.clone(),
                    endpoint: job.endpoint.to_string(),
                    prompt_tokens: n_prompt,
                    completion_tokens: n_completion,
                    path: path.to_string(),
                    counts: counts
                        .iter()
                        .map(|&c| char::from(b'0' + c.min(9) as u8))
                        .collect(),
                    passes: path.len(),
                    n_layer: path.n_layer(),
                    routed,
                    generation: generation.clone(),
                    queue_ms: queue_secs * 1e3,
                    prefill_ms: prefill_secs * 1e3,
                    decode_ms: decode_secs * 1e3,
                    finish: finish.as_str().to_string(),
                });
            }
            let _ = events.blocking_send(Event::Done(Box::new(Outcome {
                path,
                decisions,
                routed,
                generation,
                n_prompt,
                n_completion,
                text,
                finish,
                queue_secs,
                prefill_secs,
                decode_secs,
            })));
        }
    }
}

/// Unix time now, in seconds.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}
