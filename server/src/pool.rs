//! Workers: each owns a [`Session`] (its own KV cache) on its own thread and takes jobs from
//! one bounded queue. A job reports through a channel; when the client goes away the channel
//! closes and the worker stops the job at the next token (or skips it if it was still queued).

use crate::api::{ApiError, RoutingSettings};
use crate::db;
use crate::metrics::Metrics;
use crate::reload::RouterSlot;
use drllm_engine::{
    generate, BlockDecision, EngineError, FinishReason, GenerateOptions, LayerPath, Logits, Model,
    Route, RouteOptions, Routers, Session, SessionOptions, Step, Stepper, Tokenizer,
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
    /// With `batch` > 1 each worker keeps up to `batch` requests going at once, in as many
    /// sessions, and decodes the next tokens of those on the same path in one graph.
    pub fn start(
        shared: Arc<Shared>,
        workers: usize,
        threads: usize,
        n_ctx: usize,
        queue: usize,
        batch: usize,
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
                    let mut sessions = Vec::new();
                    for _ in 0..batch.max(1) {
                        let session = Session::new(
                            shared.model.clone(),
                            SessionOptions {
                                n_ctx,
                                n_threads: threads,
                                ..Default::default()
                            },
                        );
                        match session {
                            Ok(s) => sessions.push(s),
                            Err(e) => {
                                let _ = ready.send(Err(e));
                                return;
                            }
                        }
                    }
                    let _ = ready.send(Ok(()));
                    drop(ready);
                    if sessions.len() > 1 {
                        run_batched(&shared, &mut sessions, &rx);
                        return;
                    }
                    let Some(mut session) = sessions.pop() else { return };
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
    let Some((routers, opts)) = job_routing(shared, &job) else {
        return;
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
            let outcome = Outcome {
                path,
                decisions,
                routed: routers.is_some(),
                generation: routers.as_ref().map(|r| r.generation().to_string()),
                n_prompt,
                n_completion,
                text,
                finish,
                queue_secs,
                prefill_secs,
                decode_secs,
            };
            report(shared, &job, outcome);
        }
    }
}

/// The generation of routers a job runs with (None: the plain model) and its routing options;
/// None after telling the client, when it asked for routing and no sidecar is loaded (the
/// handler checked too, but a reload may have removed the sidecar since).
fn job_routing(shared: &Shared, job: &Job) -> Option<(Option<Arc<Routers>>, RouteOptions)> {
    let routers = match job.routing.routing {
        Some(false) => None,
        _ => shared.routers.current(),
    };
    if job.routing.routing == Some(true) && routers.is_none() {
        let _ = job
            .events
            .blocking_send(Event::Failed(ApiError::no_routers()));
        return None;
    }
    let opts = RouteOptions {
        depth_bias: job.routing.depth_bias,
        max_passes: job.routing.max_passes,
        observe_only: false,
    };
    Some((routers, opts))
}

/// A generation in progress in a batched worker.
struct Active {
    job: Job,
    lane: usize,
    stepper: Stepper,
    routers: Option<Arc<Routers>>,
    decisions: Vec<BlockDecision>,
    queue_secs: f64,
    /// The token to decode this round.
    next: Option<i32>,
    failed: bool,
}

/// A worker with several sessions: admits jobs while a session is free, then in rounds
/// samples one token for every running generation and decodes the tokens of generations on
/// the same path in one graph ([`Session::decode_batch`]). Route jobs run alone.
fn run_batched(shared: &Shared, sessions: &mut [Session], rx: &Mutex<mpsc::Receiver<Job>>) {
    let metrics = &shared.metrics;
    let mut free: Vec<usize> = (0..sessions.len()).rev().collect();
    let mut active: Vec<Active> = Vec::new();
    loop {
        // admit: wait for work when idle, else take only what is already queued
        while let Some(&lane) = free.last() {
            let job = match rx.lock() {
                Ok(r) if active.is_empty() => r.recv().map_err(|_| true),
                Ok(r) => r
                    .try_recv()
                    .map_err(|e| e == mpsc::TryRecvError::Disconnected),
                Err(_) => return,
            };
            let job = match job {
                Ok(j) => j,
                Err(true) if active.is_empty() => return,
                Err(_) => break,
            };
            metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
            if job.events.is_closed() {
                metrics.cancelled();
                continue;
            }
            let Task::Generate { prompt, opts } = &job.task else {
                run_job(shared, &mut sessions[lane], job);
                continue;
            };
            let queue_secs = job.arrived.elapsed().as_secs_f64();
            let Some((routers, ropts)) = job_routing(shared, &job) else {
                continue;
            };
            let mut hook = routers.as_ref().map(|r| r.hook(&ropts));
            let full = LayerPath::full(shared.model.n_layer());
            let route = match hook.as_mut() {
                Some(h) => Route::Hook(h),
                None => Route::Fixed(&full),
            };
            match Stepper::start(&mut sessions[lane], prompt, route, opts) {
                Err(e) => {
                    sessions[lane].reset();
                    let _ = job.events.blocking_send(Event::Failed(engine_error(e)));
                }
                Ok(stepper) => {
                    let decisions = hook.map(|h| h.decisions().to_vec()).unwrap_or_default();
                    metrics.running.fetch_add(1, Ordering::Relaxed);
                    free.pop();
                    active.push(Active {
                        job,
                        lane,
                        stepper,
                        routers,
                        decisions,
                        queue_secs,
                        next: None,
                        failed: false,
                    });
                }
            }
        }
        if active.is_empty() {
            continue;
        }
        // sample one token for each
        for a in active.iter_mut() {
            let s = &sessions[a.lane];
            a.next = None;
            if let Step::Token { show, decode } =
                a.stepper
                    .step(&shared.tokenizer, s.n_past(), s.options().n_ctx)
            {
                let gone = if a.job.stream_text && !show.is_empty() {
                    a.job.events.blocking_send(Event::Text(show)).is_err()
                } else {
                    a.job.events.is_closed()
                };
                if gone {
                    a.stepper.cancel();
                } else {
                    a.next = decode;
                }
            }
        }
        // decode: one graph per path
        let mut todo: Vec<usize> = (0..active.len())
            .filter(|&i| active[i].next.is_some())
            .collect();
        while let Some(&first) = todo.first() {
            let path = active[first].stepper.path().clone();
            let (group, rest): (Vec<usize>, Vec<usize>) = todo
                .iter()
                .partition(|&&i| *active[i].stepper.path() == path);
            todo = rest;
            let mut lanes: Vec<(usize, usize)> =
                group.iter().map(|&i| (active[i].lane, i)).collect();
            lanes.sort_unstable();
            let tokens: Vec<i32> = lanes
                .iter()
                .map(|&(_, i)| active[i].next.unwrap_or(0))
                .collect();
            let mut refs: Vec<&mut Session> = sessions
                .iter_mut()
                .enumerate()
                .filter(|(l, _)| lanes.iter().any(|&(x, _)| x == *l))
                .map(|(_, s)| s)
                .collect();
            match Session::decode_batch(&mut refs, &tokens) {
                Ok(out) => {
                    metrics.decoded_together(out.len());
                    for (&(_, i), logits) in lanes.iter().zip(&out) {
                        active[i].stepper.feed(logits);
                    }
                }
                Err(e) => {
                    let err = engine_error(e);
                    for &(_, i) in &lanes {
                        let _ = active[i]
                            .job
                            .events
                            .blocking_send(Event::Failed(err.clone()));
                        active[i].failed = true;
                        active[i].stepper.cancel();
                    }
                }
            }
        }
        // finish
        let mut i = 0;
        while i < active.len() {
            if !active[i].stepper.is_done() {
                i += 1;
                continue;
            }
            let a = active.swap_remove(i);
            sessions[a.lane].reset();
            free.push(a.lane);
            metrics.running.fetch_sub(1, Ordering::Relaxed);
            if a.failed {
                continue;
            }
            let (g, rest) = a.stepper.end();
            if a.job.stream_text && !rest.is_empty() {
                let _ = a.job.events.blocking_send(Event::Text(rest));
            }
            let outcome = Outcome {
                path: g.path,
                decisions: a.decisions,
                routed: a.routers.is_some(),
                generation: a.routers.as_ref().map(|r| r.generation().to_string()),
                n_prompt: g.n_prompt,
                n_completion: g.tokens.len(),
                text: g.text,
                finish: g.finish,
                queue_secs: a.queue_secs,
                prefill_secs: g.prefill_secs,
                decode_secs: g.decode_secs,
            };
            report(shared, &a.job, outcome);
        }
    }
}

/// The end of a job: metrics, a row of the routing log, the Done event.
fn report(shared: &Shared, job: &Job, o: Outcome) {
    let metrics = &shared.metrics;
    let counts = o.path.counts();
    metrics.generation_done(
        o.routed,
        &counts,
        o.n_prompt,
        o.n_completion,
        o.prefill_secs,
        o.decode_secs,
    );
    if o.finish == FinishReason::Cancelled {
        metrics.cancelled();
    }
    if let Some(log) = &shared.log {
        log.log(db::Row {
            time: job.arrived_unix,
            request_id: job.id.clone(),
            endpoint: job.endpoint.to_string(),
            prompt_tokens: o.n_prompt,
            completion_tokens: o.n_completion,
            path: o.path.to_string(),
            counts: counts
                .iter()
                .map(|&c| char::from(b'0' + c.min(9) as u8))
                .collect(),
            passes: o.path.len(),
            n_layer: o.path.n_layer(),
            routed: o.routed,
            generation: o.generation.clone(),
            queue_ms: o.queue_secs * 1e3,
            prefill_ms: o.prefill_secs * 1e3,
            decode_ms: o.decode_secs * 1e3,
            finish: o.finish.as_str().to_string(),
        });
    }
    let _ = job.events.blocking_send(Event::Done(Box::new(o)));
}

/// Unix time now, in seconds.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}
