//! Workers: each owns a [`Session`] (its own KV cache) on its own thread and takes jobs from
//! one bounded queue. A job reports through a channel; when the client goes away the channel
//! closes and the worker stops the job at the next token (or skips it if it was still queued).

use crate::api::{ApiError, RoutingSettings};
use crate::cache::{CacheKey, Entry, PromptCache};
use crate::db;
use crate::metrics::Metrics;
use crate::reload::RouterSlot;
use drllm_engine::{
    run_to_end, BlockDecision, EngineError, FinishReason, GenerateOptions, Generation, LayerPath,
    Logits, Model, Route, RouteOptions, Routers, Session, SessionOptions, Step, Stepper,
    TokenLogprob, Tokenizer,
};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::Instant;
use tokio::sync::mpsc as tmpsc;

/// What a job does.
#[derive(Debug, Clone)]
pub enum Task {
    /// Prefill along the routed (or plain) path, then generate.
    Generate {
        prompt: Vec<i32>,
        opts: Box<GenerateOptions>,
        /// Reuse a cached prefix of the prompt and keep this conversation's KV cache for its
        /// next turn (llama-server's `cache_prompt`).
        cache_prompt: bool,
        /// Choices: generations from the one prefill, choice i seeded with seed + i.
        n: usize,
    },
    /// Only choose the path (a prefill with the routers), no generation.
    Route { prompt: Vec<i32> },
    /// The pooled, normalised embedding of each input, each along its own routed (or plain)
    /// path.
    Embed { inputs: Vec<Vec<i32>> },
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
    /// Generated text that is final (stop strings already cut), with the log-probabilities of
    /// the tokens sampled since the last event (when the request asked for them).
    Text {
        /// The choice (0 unless the request asked for several).
        index: usize,
        text: String,
        logprobs: Vec<TokenLogprob>,
    },
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
    /// Prompt tokens taken from the conversation cache (not prefilled).
    pub n_cached: usize,
    pub n_completion: usize,
    pub text: String,
    pub finish: FinishReason,
    /// Each generated token's log-probability (when asked for).
    pub logprobs: Vec<TokenLogprob>,
    /// Each prompt token's after the first (when asked for).
    pub prompt_logprobs: Vec<TokenLogprob>,
    /// The choices after the first (`n` > 1); the fields above are the first's, except
    /// `n_completion`, which counts every choice's tokens.
    pub more: Vec<Choice>,
    /// Embeddings: one unit vector per input, and each input's path (`path` is the first's).
    pub embeddings: Vec<Vec<f32>>,
    pub paths: Vec<LayerPath>,
    pub queue_secs: f64,
    pub prefill_secs: f64,
    pub decode_secs: f64,
}

/// One more choice of a request that asked for several.
#[derive(Debug, Clone)]
pub struct Choice {
    pub text: String,
    pub finish: FinishReason,
    pub logprobs: Vec<TokenLogprob>,
    pub n_completion: usize,
}

/// Why a job was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// The queue is full.
    Busy,
    /// No worker is left to take it.
    NoWorkers,
}

/// Where a worker calls [`FaultHook`]: right after taking a job (outside any panic guard: a
/// panic there ends the worker), at the start of a job's prefill, and before each decode step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPoint {
    Taken,
    Prefill,
    Decode,
}

/// A function the workers call at each [`FaultPoint`]; tests use it to make a job panic
/// where the engine could. None in a real server.
#[derive(Clone)]
pub struct FaultHook(pub Arc<FaultFn>);

/// The function inside a [`FaultHook`].
pub type FaultFn = dyn Fn(FaultPoint, &Job) + Send + Sync;

impl std::fmt::Debug for FaultHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FaultHook")
    }
}

/// The queue between the HTTP side and the workers: waiting jobs, and the sessions ("lanes")
/// of live workers that are free to take one. Workers wait on a condition variable, so no
/// worker holds the lock while it waits or runs: an idle worker never stands between a busy
/// worker and the jobs it could admit.
struct JobQueue {
    state: Mutex<QueueState>,
    wake: Condvar,
    /// Jobs that may wait beyond the free lanes.
    capacity: usize,
    metrics: Arc<Metrics>,
}

struct QueueState {
    jobs: VecDeque<Job>,
    /// Lanes of live workers not running a job.
    free_lanes: usize,
    /// Live workers.
    workers: usize,
    closed: bool,
}

impl JobQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        // nothing panics while holding it; a poisoned lock still holds consistent state
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a job would be admitted now: a lane is free for it, or the queue has room.
    fn admits(&self, q: &QueueState) -> Result<(), Refused> {
        if q.workers == 0 || q.closed {
            Err(Refused::NoWorkers)
        } else if q.jobs.len() >= self.capacity + q.free_lanes {
            Err(Refused::Busy)
        } else {
            Ok(())
        }
    }

    fn push(&self, job: Job) -> Result<(), Refused> {
        let mut q = self.lock();
        self.admits(&q)?;
        q.jobs.push_back(job);
        self.metrics
            .queue_depth
            .store(q.jobs.len(), Ordering::Relaxed);
        drop(q);
        self.wake.notify_all();
        Ok(())
    }

    /// Takes the oldest job into a free lane of the calling worker; waits for one when `wait`.
    /// None: nothing queued (or, waiting, the queue was closed).
    fn take(&self, wait: bool) -> Option<Job> {
        let mut q = self.lock();
        loop {
            if let Some(job) = q.jobs.pop_front() {
                q.free_lanes = q.free_lanes.saturating_sub(1);
                self.metrics
                    .queue_depth
                    .store(q.jobs.len(), Ordering::Relaxed);
                return Some(job);
            }
            if !wait || q.closed {
                return None;
            }
            q = self.wake.wait(q).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_all();
    }
}

/// A worker's membership of the queue: its lanes count as free while they run no job. Dropped
/// when the worker ends for any reason (a panic included): its lanes leave the queue, the
/// metrics show one worker fewer, and when none is left the waiting jobs are answered.
struct Lanes {
    queue: Arc<JobQueue>,
    free: usize,
}

impl Lanes {
    fn join(queue: Arc<JobQueue>, n: usize) -> Lanes {
        {
            let mut q = queue.lock();
            q.workers += 1;
            q.free_lanes += n;
        }
        queue
            .metrics
            .workers_started
            .fetch_add(1, Ordering::Relaxed);
        queue.metrics.workers_alive.fetch_add(1, Ordering::Relaxed);
        Lanes { queue, free: n }
    }

    /// A job for one of this worker's free lanes (see [`JobQueue::take`]).
    fn take(&mut self, wait: bool) -> Option<Job> {
        if self.free == 0 {
            return None;
        }
        let job = self.queue.take(wait)?;
        self.free -= 1;
        Some(job)
    }

    /// A lane finished its job.
    fn release(&mut self) {
        self.free += 1;
        self.queue.lock().free_lanes += 1;
        // a job refused a moment ago may fit now; nothing to wake (workers poll their lanes)
    }
}

impl Drop for Lanes {
    fn drop(&mut self) {
        let orphans = {
            let mut q = self.queue.lock();
            q.workers = q.workers.saturating_sub(1);
            q.free_lanes = q.free_lanes.saturating_sub(self.free);
            if q.workers == 0 {
                std::mem::take(&mut q.jobs)
            } else {
                VecDeque::new()
            }
        };
        let m = &self.queue.metrics;
        m.workers_alive.fetch_sub(1, Ordering::Relaxed);
        if !self.queue.lock().closed {
            eprintln!(
                "[drllm] error: a worker ended unexpectedly ({} of {} left)",
                m.workers_alive.load(Ordering::Relaxed),
                m.workers_started.load(Ordering::Relaxed)
            );
        }
        m.queue_depth
            .store(self.queue.lock().jobs.len(), Ordering::Relaxed);
        for job in orphans {
            let _ = job.events.try_send(Event::Failed(ApiError::unavailable(
                "no worker is left to run requests",
                "no_workers",
            )));
        }
    }
}

/// Runs `f`, turning a panic into an error message; the caller answers the job's client and
/// counts it.
fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        p.downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".into())
    })
}

/// The answer to the client of a job that panicked.
fn panicked(shared: &Shared, events: &tmpsc::Sender<Event>, message: &str) {
    shared.metrics.panicked();
    eprintln!("[drllm] a request failed inside the engine (panic: {message}); the worker goes on");
    let _ = events.try_send(Event::Failed(ApiError::internal(
        "the request failed inside the engine (an internal error); the server goes on",
    )));
}

/// The worker pool.
pub struct Pool {
    queue: Arc<JobQueue>,
    workers: usize,
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.queue.close();
    }
}

/// What every worker shares.
pub struct Shared {
    pub model: Arc<Model>,
    pub tokenizer: Arc<Tokenizer>,
    pub routers: Arc<RouterSlot>,
    pub metrics: Arc<Metrics>,
    pub log: Option<Arc<db::Writer>>,
    /// The conversation cache.
    pub cache: Arc<PromptCache>,
    /// How `/v1/embeddings` pools a prompt's token states.
    pub pooling: drllm_engine::Pooling,
    /// Called at each [`FaultPoint`] (tests only).
    pub fault: Option<FaultHook>,
}

impl Shared {
    fn fault(&self, at: FaultPoint, job: &Job) {
        if let Some(f) = &self.fault {
            (f.0)(at, job);
        }
    }
}

impl Pool {
    /// Starts `workers` threads, each with sessions of `session`'s threads, context and prefill
    /// chunk; at most `queue` jobs wait beyond the free sessions (a queue of 0 admits a job
    /// only when a session is free to take it). With `batch` > 1 each worker keeps up to
    /// `batch` requests going at once, in as many sessions, and decodes the next tokens of
    /// those on the same path in one graph.
    pub fn start(
        shared: Arc<Shared>,
        workers: usize,
        session: SessionOptions,
        queue: usize,
        batch: usize,
    ) -> Result<Pool, EngineError> {
        let queue = Arc::new(JobQueue {
            state: Mutex::new(QueueState {
                jobs: VecDeque::new(),
                free_lanes: 0,
                workers: 0,
                closed: false,
            }),
            wake: Condvar::new(),
            capacity: queue,
            metrics: shared.metrics.clone(),
        });
        let pool = Pool {
            queue: queue.clone(),
            workers,
        };
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), EngineError>>();
        for i in 0..workers {
            let queue = queue.clone();
            let shared = shared.clone();
            let ready = ready_tx.clone();
            let session = session.clone();
            std::thread::Builder::new()
                .name(format!("drllm-worker-{i}"))
                .spawn(move || {
                    let mut sessions = Vec::new();
                    for _ in 0..batch.max(1) {
                        let session = Session::new(shared.model.clone(), session.clone());
                        match session {
                            Ok(s) => sessions.push(s),
                            Err(e) => {
                                let _ = ready.send(Err(e));
                                return;
                            }
                        }
                    }
                    let mut lanes = Lanes::join(queue, sessions.len());
                    let _ = ready.send(Ok(()));
                    drop(ready);
                    if sessions.len() > 1 {
                        run_batched(&shared, &mut sessions, &mut lanes);
                    } else {
                        run_single(&shared, &mut sessions[0], &mut lanes);
                    }
                })
                .map_err(|e| EngineError::State(format!("cannot start a worker: {e}")))?;
        }
        drop(ready_tx);
        for _ in 0..workers {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(EngineError::State("a worker died while starting".into())),
            }
        }
        Ok(pool)
    }

    /// Queues a job, or refuses it when the queue is full.
    pub fn submit(&self, job: Job) -> Result<(), Refused> {
        let r = self.queue.push(job);
        if r == Err(Refused::Busy) {
            self.metrics().rejected();
        }
        r
    }

    /// Whether a job would be admitted now (checked before a body is read and parsed; the
    /// submit after it may still find the queue full).
    pub fn admits(&self) -> Result<(), Refused> {
        let r = self.queue.admits(&self.queue.lock());
        if r == Err(Refused::Busy) {
            self.metrics().rejected();
        }
        r
    }

    fn metrics(&self) -> &Metrics {
        &self.queue.metrics
    }

    /// Worker threads started.
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// Worker threads still alive.
    pub fn workers_alive(&self) -> usize {
        self.queue.lock().workers
    }
}

/// A worker with one session: one job at a time. A panicking job costs its client a 500 and
/// the session a reset; the worker goes on. Before the client hears the end, the lane is free
/// again and the conversation cached (so a client that sends its next turn at once finds
/// both).
fn run_single(shared: &Shared, session: &mut Session, lanes: &mut Lanes) {
    let mut resident: Option<Arc<Entry>> = None;
    while let Some(job) = lanes.take(true) {
        shared.fault(FaultPoint::Taken, &job);
        let events = job.events.clone();
        let done = guarded(|| run_job(shared, session, &mut resident, &job));
        lanes.release();
        match done {
            Err(message) => {
                panicked(shared, &events, &message);
                session.reset();
                resident = None;
            }
            Ok(None) => {}
            Ok(Some((outcome, keep))) => {
                // cached before the client hears the end, so its next turn finds it
                if let Some(keep) = keep {
                    keep_conversation(shared, session, &mut resident, keep);
                }
                report(shared, &job, outcome);
            }
        }
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

/// A generation under way: its stepper and how its path came about.
struct Begun {
    stepper: Stepper,
    origin: Origin,
}

/// How a generation's path came about.
struct Origin {
    decisions: Vec<BlockDecision>,
    routers: Option<Arc<Routers>>,
    /// Router generation that decided the path (for a cached conversation: the first turn's).
    generation: Option<String>,
    /// Prompt tokens taken from the cache.
    reused: usize,
    /// Tokens the path was decided on.
    decided_at: usize,
    key: CacheKey,
    cache_prompt: bool,
}

/// What to cache once a generation is over: the session holds `tokens` (prompt and decoded
/// tokens) along its path.
struct Keep {
    tokens: Vec<i32>,
    key: CacheKey,
    decided_at: usize,
    prompt_len: usize,
    decisions: Vec<BlockDecision>,
    generation: Option<String>,
}

/// Starts a generation: along a cached prefix when the conversation cache (or the lane's own
/// session) holds one this request may continue, else routed (or plain) from scratch.
fn begin(
    shared: &Shared,
    session: &mut Session,
    resident: &mut Option<Arc<Entry>>,
    job: &Job,
    routers: Option<Arc<Routers>>,
    ropts: &RouteOptions,
) -> Result<Begun, EngineError> {
    let Task::Generate {
        prompt,
        opts,
        cache_prompt,
        ..
    } = &job.task
    else {
        return Err(EngineError::State("not a generation".into()));
    };
    let key = CacheKey {
        routed: routers.is_some(),
        depth_bias: ropts.depth_bias,
        max_passes: ropts.max_passes,
    };
    // the lane's session holds its resident entry's tokens until anything else runs on it
    let own = resident
        .take()
        .filter(|r| session.n_past() == r.tokens.len() && session.path() == Some(r.snap.path()));
    let cache = &shared.cache;
    // prompt logprobs need every prompt token prefilled: no cached prefix
    if *cache_prompt && cache.enabled() && opts.prompt_logprobs.is_none() {
        let current = routers.as_ref().map(|r| r.generation());
        let from = restore_cached(shared, session, own, &key, prompt, current)?;
        if let Some((entry, n)) = from {
            let stepper = if n > 0 {
                Stepper::resume(session, &shared.tokenizer, prompt, n, opts)?
            } else {
                let path = entry.snap.path().clone();
                Stepper::start(
                    session,
                    &shared.tokenizer,
                    prompt,
                    Route::Fixed(&path),
                    opts,
                )?
            };
            let m = &shared.metrics;
            m.cache_hits.fetch_add(1, Ordering::Relaxed);
            m.cache_tokens_reused.fetch_add(n as u64, Ordering::Relaxed);
            return Ok(Begun {
                stepper,
                origin: Origin {
                    decisions: entry.decisions.clone(),
                    routers,
                    generation: entry.generation.clone(),
                    reused: n,
                    decided_at: entry.decided_at,
                    key,
                    cache_prompt: true,
                },
            });
        }
        shared.metrics.cache_misses.fetch_add(1, Ordering::Relaxed);
    }
    let mut hook = routers.as_ref().map(|r| r.hook(ropts));
    let full = LayerPath::full(shared.model.n_layer());
    let route = match hook.as_mut() {
        Some(h) => Route::Hook(h),
        None => Route::Fixed(&full),
    };
    let stepper = Stepper::start(session, &shared.tokenizer, prompt, route, opts)?;
    let decisions = hook.map(|h| h.decisions().to_vec()).unwrap_or_default();
    let generation = routers.as_ref().map(|r| r.generation().to_string());
    // a routed path holds for requests that extend the prompt it was decided on
    let decided_at = if routers.is_some() { prompt.len() } else { 1 };
    Ok(Begun {
        stepper,
        origin: Origin {
            decisions,
            routers,
            generation,
            reused: 0,
            decided_at,
            key,
            cache_prompt: *cache_prompt,
        },
    })
}

/// Puts the most of `prompt` a cached conversation may give into `session` (the lane's own
/// entry cut back, or a copy of the shared cache's best entry), as far as exact restores
/// allow; gives the entry and how many tokens it gave (0: nothing restorable, but a routed
/// conversation keeps its path). None: a miss.
fn restore_cached(
    shared: &Shared,
    session: &mut Session,
    own: Option<Arc<Entry>>,
    key: &CacheKey,
    prompt: &[i32],
    current: Option<&str>,
) -> Result<Option<(Arc<Entry>, usize)>, EngineError> {
    let cache = &shared.cache;
    let found = cache.lookup(key, prompt, current);
    let own_n = own.as_ref().map_or(0, |r| r.reusable(key, prompt, current));
    // with exact restores, only what keeps the ubatches of a fresh prefill
    let ub = session.options().n_ubatch;
    let cut = |e: &Entry, n: usize| {
        if cache.exact() {
            e.exact_reuse(n, ub)
        } else {
            n
        }
    };
    // the session's own entry only if this request may continue it at all
    let own = own.filter(|_| own_n > 0);
    let own_n = own.as_ref().map_or(0, |r| cut(r, own_n));
    let found = found.map(|(e, n)| {
        let n = cut(&e, n);
        (e, n)
    });
    // the session's own sequence when it gives as much (cut back, no copy), else a copy
    let found_n = found.as_ref().map_or(0, |(_, n)| *n);
    let from = if own_n > 0 && own_n >= found_n {
        session.truncate(own_n)?;
        own.map(|r| (r, own_n))
    } else {
        match found {
            Some((entry, n)) if n > 0 => {
                session.restore(&entry.snap, n)?;
                Some((entry, n))
            }
            // nothing to restore exactly, but a routed conversation keeps its path
            found => found
                .or(own.map(|r| (r, 0)))
                .filter(|(e, _)| e.key.routed && prompt.len() > e.decided_at),
        }
    };
    Ok(from)
}

/// The end of a generation: its outcome, and what to cache (a generation that ran to its end,
/// when the request allows caching).
fn conclude(
    shared: &Shared,
    session: &Session,
    job: &Job,
    origin: Origin,
    g: Generation,
    queue_secs: f64,
) -> (Outcome, Option<Keep>) {
    let Origin {
        decisions,
        routers,
        generation,
        reused,
        decided_at,
        key,
        cache_prompt,
    } = origin;
    let keep = match &job.task {
        // several choices: the session holds the last one's, not this outcome's first
        Task::Generate { prompt, n: 1, .. }
            if cache_prompt
                && shared.cache.enabled()
                && g.finish != FinishReason::Cancelled
                && session.n_past() >= prompt.len() =>
        {
            let mut tokens = prompt.clone();
            let decoded = (session.n_past() - prompt.len()).min(g.tokens.len());
            tokens.extend_from_slice(&g.tokens[..decoded]);
            Some(Keep {
                tokens,
                key,
                decided_at,
                prompt_len: prompt.len(),
                decisions: decisions.clone(),
                generation: generation.clone(),
            })
        }
        _ => None,
    };
    let outcome = Outcome {
        path: g.path,
        decisions,
        routed: routers.is_some(),
        generation,
        n_prompt: g.n_prompt,
        n_cached: reused,
        n_completion: g.tokens.len(),
        text: g.text,
        finish: g.finish,
        logprobs: g.logprobs,
        prompt_logprobs: g.prompt_logprobs,
        more: Vec::new(),
        embeddings: Vec::new(),
        paths: Vec::new(),
        queue_secs,
        prefill_secs: g.prefill_secs,
        decode_secs: g.decode_secs,
    };
    (outcome, keep)
}

/// Copies the session's sequence into the conversation cache; the lane then knows its session
/// holds that entry. A failure only costs the cache entry.
fn keep_conversation(
    shared: &Shared,
    session: &mut Session,
    resident: &mut Option<Arc<Entry>>,
    keep: Keep,
) {
    *resident = None;
    if session.n_past() != keep.tokens.len() {
        return;
    }
    match guarded(|| session.snapshot()) {
        Ok(Ok(snap)) => {
            *resident = shared.cache.insert(Entry {
                tokens: keep.tokens,
                key: keep.key,
                decided_at: keep.decided_at,
                prompt_len: keep.prompt_len,
                snap,
                decisions: keep.decisions,
                generation: keep.generation,
            });
        }
        Ok(Err(e)) => eprintln!("[drllm] could not cache a conversation: {e}"),
        Err(message) => {
            eprintln!("[drllm] could not cache a conversation (panic: {message})");
            session.reset();
        }
    }
}

/// Runs one job on a single-session worker; gives the outcome to report and what to cache
/// (None: the client was already answered, e.g. with an error).
fn run_job(
    shared: &Shared,
    session: &mut Session,
    resident: &mut Option<Arc<Entry>>,
    job: &Job,
) -> Option<(Outcome, Option<Keep>)> {
    let metrics = &shared.metrics;
    if job.events.is_closed() {
        metrics.cancelled();
        return None;
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
    shared.fault(FaultPoint::Prefill, job);
    let queue_secs = job.arrived.elapsed().as_secs_f64();
    let (routers, ropts) = job_routing(shared, job)?;
    let events = &job.events;
    let result = match &job.task {
        Task::Generate { .. } => begin(shared, session, resident, job, routers, &ropts)
            .and_then(|b| run_choices(shared, session, job, b, queue_secs)),
        Task::Embed { inputs } => {
            *resident = None;
            embed_all(
                shared,
                session,
                job,
                inputs,
                routers.as_ref(),
                &ropts,
                queue_secs,
            )
        }
        Task::Route { prompt } => {
            *resident = None;
            let t0 = Instant::now();
            let mut hook = routers.as_ref().map(|r| r.hook(&ropts));
            let full = LayerPath::full(shared.model.n_layer());
            let route = match hook.as_mut() {
                Some(h) => Route::Hook(h),
                None => Route::Fixed(&full),
            };
            session.prefill(prompt, route, Logits::Last).map(|p| {
                let outcome = Outcome {
                    path: p.path,
                    decisions: hook.map(|h| h.decisions().to_vec()).unwrap_or_default(),
                    routed: routers.is_some(),
                    generation: routers.as_ref().map(|r| r.generation().to_string()),
                    n_prompt: prompt.len(),
                    n_cached: 0,
                    n_completion: 0,
                    text: String::new(),
                    finish: FinishReason::Stop,
                    logprobs: Vec::new(),
                    prompt_logprobs: Vec::new(),
                    more: Vec::new(),
                    embeddings: Vec::new(),
                    paths: Vec::new(),
                    queue_secs,
                    prefill_secs: t0.elapsed().as_secs_f64(),
                    decode_secs: 0.0,
                };
                session.reset();
                (outcome, None)
            })
        }
    };
    match result {
        Err(e) => {
            session.reset();
            *resident = None;
            let _ = events.blocking_send(Event::Failed(engine_error(e)));
            None
        }
        Ok(done) => Some(done),
    }
}

/// The embedding of every input (normalised, as llama-server returns them), each routed on
/// its own; stops early when the client went away.
fn embed_all(
    shared: &Shared,
    session: &mut Session,
    job: &Job,
    inputs: &[Vec<i32>],
    routers: Option<&Arc<Routers>>,
    ropts: &RouteOptions,
    queue_secs: f64,
) -> Result<(Outcome, Option<Keep>), EngineError> {
    let t0 = Instant::now();
    let full = LayerPath::full(shared.model.n_layer());
    let (mut embeddings, mut paths, mut decisions) = (Vec::new(), Vec::new(), Vec::new());
    for tokens in inputs {
        if job.events.is_closed() {
            break;
        }
        let mut hook = routers.map(|r| r.hook(ropts));
        let route = match hook.as_mut() {
            Some(h) => Route::Hook(h),
            None => Route::Fixed(&full),
        };
        let (e, path) = session.embed(tokens, route, shared.pooling)?;
        if decisions.is_empty() {
            decisions = hook.map(|h| h.decisions().to_vec()).unwrap_or_default();
        }
        embeddings.push(drllm_engine::normalized(&e));
        paths.push(path);
    }
    let finish = if paths.len() == inputs.len() {
        FinishReason::Stop
    } else {
        FinishReason::Cancelled
    };
    let outcome = Outcome {
        path: paths.first().cloned().unwrap_or(full),
        decisions,
        routed: routers.is_some(),
        generation: routers.map(|r| r.generation().to_string()),
        n_prompt: inputs.iter().map(Vec::len).sum(),
        n_cached: 0,
        n_completion: 0,
        text: String::new(),
        finish,
        logprobs: Vec::new(),
        prompt_logprobs: Vec::new(),
        more: Vec::new(),
        embeddings,
        paths,
        queue_secs,
        prefill_secs: t0.elapsed().as_secs_f64(),
        decode_secs: 0.0,
    };
    Ok((outcome, None))
}

/// Runs the choices of a started generation: the first from the prefill, each further one
/// (`n` > 1) from a copy of the prompt's KV rows, with its own sampler seeded with seed + i.
fn run_choices(
    shared: &Shared,
    session: &mut Session,
    job: &Job,
    begun: Begun,
    queue_secs: f64,
) -> Result<(Outcome, Option<Keep>), EngineError> {
    let Begun { stepper, origin } = begun;
    let Task::Generate {
        prompt, opts, n, ..
    } = &job.task
    else {
        return Err(EngineError::State("not a generation".into()));
    };
    let mut siblings = Vec::new();
    let snap = if *n > 1 {
        for i in 1..*n {
            let mut o = opts.clone();
            o.sampling.seed = o.sampling.seed.wrapping_add(i as u32);
            siblings.push(stepper.sibling(&shared.tokenizer, &o, prompt)?);
        }
        Some(session.snapshot()?)
    } else {
        None
    };
    let g = run_choice(shared, session, job, 0, stepper)?;
    let mut more = Vec::new();
    for (i, st) in siblings.into_iter().enumerate() {
        if let Some(snap) = &snap {
            session.restore(snap, snap.n_tokens())?;
        }
        let c = run_choice(shared, session, job, i + 1, st)?;
        let gone = c.finish == FinishReason::Cancelled;
        more.push(Choice {
            text: c.text,
            finish: c.finish,
            n_completion: c.tokens.len(),
            logprobs: c.logprobs,
        });
        if gone {
            break;
        }
    }
    let (mut outcome, keep) = conclude(shared, session, job, origin, g, queue_secs);
    outcome.n_completion += more.iter().map(|c| c.n_completion).sum::<usize>();
    outcome.more = more;
    Ok((outcome, keep))
}

/// One choice to its end, its text streamed as choice `index` when the client streams; ends
/// as cancelled when the client went away before it had all the text.
fn run_choice(
    shared: &Shared,
    session: &mut Session,
    job: &Job,
    index: usize,
    stepper: Stepper,
) -> Result<Generation, EngineError> {
    let events = &job.events;
    let mut cancelled = false;
    let on_text = |s: &str, lps: &[TokenLogprob]| {
        shared.fault(FaultPoint::Decode, job);
        let gone = if job.stream_text {
            let ev = Event::Text {
                index,
                text: s.to_string(),
                logprobs: lps.to_vec(),
            };
            events.blocking_send(ev).is_err()
        } else {
            events.is_closed()
        };
        cancelled |= gone;
        !cancelled
    };
    let mut g = run_to_end(stepper, session, &shared.tokenizer, on_text)?;
    if cancelled {
        g.finish = FinishReason::Cancelled;
    }
    Ok(g)
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
    origin: Origin,
    queue_secs: f64,
    /// The token to decode this round.
    next: Option<i32>,
    /// Failed (its client told): ends at the next round without a report.
    failed: bool,
    /// Log-probabilities of tokens whose text is still held back (sent with the next text).
    pending: Vec<TokenLogprob>,
}

/// A worker with several sessions: admits jobs while a session is free, then in rounds
/// samples one token for every running generation and decodes the tokens of generations on
/// the same path in one graph ([`Session::decode_batch`]). Route jobs run alone. Every step
/// that runs engine code for a job is guarded: a panic fails the jobs it concerns (500 to
/// their clients, their sessions reset) and the worker goes on with the others.
fn run_batched(shared: &Shared, sessions: &mut [Session], lanes: &mut Lanes) {
    let n = sessions.len();
    let mut b = Batch {
        shared,
        sessions,
        lanes,
        free: (0..n).rev().collect(),
        active: Vec::new(),
        resident: vec![None; n],
    };
    while b.admit() {
        if b.active.is_empty() {
            continue;
        }
        b.sample();
        b.decode();
        b.finish();
    }
}

/// A batched worker's state: one session per lane, each free or running one generation.
struct Batch<'a> {
    shared: &'a Shared,
    sessions: &'a mut [Session],
    lanes: &'a mut Lanes,
    /// Lanes running no generation (the last one is taken next).
    free: Vec<usize>,
    active: Vec<Active>,
    /// The conversation-cache entry each lane's session still holds.
    resident: Vec<Option<Arc<Entry>>>,
}

impl Batch<'_> {
    /// Admits jobs while a lane is free: waits for work when idle, else takes only what is
    /// already queued. False: the queue is closed (the worker ends).
    fn admit(&mut self) -> bool {
        while let Some(&lane) = self.free.last() {
            let Some(job) = self.lanes.take(self.active.is_empty()) else {
                return !self.active.is_empty();
            };
            self.shared.fault(FaultPoint::Taken, &job);
            if job.events.is_closed() {
                self.shared.metrics.cancelled();
                self.lanes.release();
                continue;
            }
            // several choices of one request run one after the other, on one lane
            if matches!(job.task, Task::Generate { n: 1, .. }) {
                self.start(lane, job);
            } else {
                self.run_alone(lane, &job);
            }
        }
        true
    }

    /// A job that is not one generation (a route, several choices) runs on the lane from
    /// start to end.
    fn run_alone(&mut self, lane: usize, job: &Job) {
        let shared = self.shared;
        let events = job.events.clone();
        let done = guarded(|| {
            run_job(
                shared,
                &mut self.sessions[lane],
                &mut self.resident[lane],
                job,
            )
        });
        self.lanes.release();
        match done {
            Err(message) => {
                panicked(shared, &events, &message);
                self.sessions[lane].reset();
                self.resident[lane] = None;
            }
            Ok(None) => {}
            Ok(Some((outcome, _))) => report(shared, job, outcome),
        }
    }

    /// Starts a generation on a free lane (its prefill, or a cached prefix); it joins the
    /// active ones.
    fn start(&mut self, lane: usize, job: Job) {
        let shared = self.shared;
        let queue_secs = job.arrived.elapsed().as_secs_f64();
        let Some((routers, ropts)) = job_routing(shared, &job) else {
            self.lanes.release();
            return;
        };
        let session = &mut self.sessions[lane];
        let res = &mut self.resident[lane];
        let started = guarded(|| {
            shared.fault(FaultPoint::Prefill, &job);
            begin(shared, session, res, &job, routers, &ropts)
        });
        match started {
            Err(message) => {
                panicked(shared, &job.events, &message);
                session.reset();
                self.resident[lane] = None;
                self.lanes.release();
            }
            Ok(Err(e)) => {
                session.reset();
                self.resident[lane] = None;
                self.lanes.release();
                let _ = job.events.blocking_send(Event::Failed(engine_error(e)));
            }
            Ok(Ok(Begun { stepper, origin })) => {
                shared.metrics.running.fetch_add(1, Ordering::Relaxed);
                self.free.pop();
                self.active.push(Active {
                    job,
                    lane,
                    stepper,
                    origin,
                    queue_secs,
                    next: None,
                    failed: false,
                    pending: Vec::new(),
                });
            }
        }
    }

    /// Samples one token for each running generation (streaming its text); a generation
    /// whose client is gone is cancelled.
    fn sample(&mut self) {
        let shared = self.shared;
        for a in self.active.iter_mut() {
            let s = &self.sessions[a.lane];
            a.next = None;
            let (n_past, n_ctx) = (s.n_past(), s.options().n_ctx);
            let step = guarded(|| a.stepper.step(&shared.tokenizer, n_past, n_ctx));
            match step {
                Err(message) => {
                    panicked(shared, &a.job.events, &message);
                    a.failed = true;
                }
                Ok(Step::Token {
                    show,
                    decode,
                    logprob,
                }) => {
                    a.pending.extend(logprob);
                    let gone = if a.job.stream_text && !show.is_empty() {
                        let ev = Event::Text {
                            index: 0,
                            text: show,
                            logprobs: std::mem::take(&mut a.pending),
                        };
                        a.job.events.blocking_send(ev).is_err()
                    } else {
                        a.job.events.is_closed()
                    };
                    if gone {
                        a.stepper.cancel();
                    } else {
                        a.next = decode;
                    }
                }
                Ok(_) => {}
            }
        }
    }

    /// Decodes the sampled tokens: one graph per path, the sessions in lane order.
    fn decode(&mut self) {
        let shared = self.shared;
        let active = &mut self.active;
        let mut todo: Vec<usize> = (0..active.len())
            .filter(|&i| active[i].next.is_some() && !active[i].failed)
            .collect();
        while let Some(&first) = todo.first() {
            let path = active[first].stepper.path().clone();
            let (group, rest): (Vec<usize>, Vec<usize>) = todo
                .iter()
                .partition(|&&i| *active[i].stepper.path() == path);
            todo = rest;
            let mut lanes_of: Vec<(usize, usize)> =
                group.iter().map(|&i| (active[i].lane, i)).collect();
            lanes_of.sort_unstable();
            let tokens: Vec<i32> = lanes_of
                .iter()
                .map(|&(_, i)| active[i].next.unwrap_or(0))
                .collect();
            let mut refs: Vec<&mut Session> = self
                .sessions
                .iter_mut()
                .enumerate()
                .filter(|(l, _)| lanes_of.iter().any(|&(x, _)| x == *l))
                .map(|(_, s)| s)
                .collect();
            let decoded = guarded(|| {
                for &(_, i) in &lanes_of {
                    shared.fault(FaultPoint::Decode, &active[i].job);
                }
                Session::decode_batch(&mut refs, &tokens)
            });
            match decoded {
                Ok(Ok(out)) => {
                    shared.metrics.decoded_together(out.len());
                    for (&(_, i), logits) in lanes_of.iter().zip(&out) {
                        active[i].stepper.feed(logits);
                    }
                }
                Ok(Err(e)) => {
                    let err = engine_error(e);
                    for &(_, i) in &lanes_of {
                        let _ = active[i]
                            .job
                            .events
                            .blocking_send(Event::Failed(err.clone()));
                        active[i].failed = true;
                    }
                }
                Err(message) => {
                    for &(_, i) in &lanes_of {
                        panicked(shared, &active[i].job.events, &message);
                        active[i].failed = true;
                    }
                }
            }
        }
    }

    /// Ends the generations that are done or failed.
    fn finish(&mut self) {
        let mut i = 0;
        while i < self.active.len() {
            if !(self.active[i].failed || self.active[i].stepper.is_done()) {
                i += 1;
                continue;
            }
            let a = self.active.swap_remove(i);
            self.end(a);
        }
    }

    /// Frees the lane of a generation that ended; one that did not fail is reported (its
    /// conversation cached first, so that the client's next turn finds it).
    fn end(&mut self, a: Active) {
        let shared = self.shared;
        let lane = a.lane;
        shared.metrics.running.fetch_sub(1, Ordering::Relaxed);
        self.free.push(lane);
        if a.failed {
            self.sessions[lane].reset();
            self.resident[lane] = None;
            self.lanes.release();
            return;
        }
        let events = a.job.events.clone();
        let session = &self.sessions[lane];
        let ended = guarded(|| end_generation(shared, session, a));
        self.lanes.release();
        match ended {
            Err(message) => {
                panicked(shared, &events, &message);
                self.sessions[lane].reset();
                self.resident[lane] = None;
            }
            Ok((job, outcome, keep)) => {
                match keep {
                    Some(keep) => keep_conversation(
                        shared,
                        &mut self.sessions[lane],
                        &mut self.resident[lane],
                        keep,
                    ),
                    None => {
                        self.sessions[lane].reset();
                        self.resident[lane] = None;
                    }
                }
                report(shared, &job, outcome);
            }
        }
    }
}

/// Ends a generation of a batched worker: streams the held-back text; gives the job, its
/// outcome and what to cache.
fn end_generation(shared: &Shared, session: &Session, a: Active) -> (Job, Outcome, Option<Keep>) {
    let (g, rest) = a.stepper.end();
    if a.job.stream_text && (!rest.is_empty() || !a.pending.is_empty()) {
        let _ = a.job.events.blocking_send(Event::Text {
            index: 0,
            text: rest,
            logprobs: a.pending,
        });
    }
    let (outcome, keep) = conclude(shared, session, &a.job, a.origin, g, a.queue_secs);
    (a.job, outcome, keep)
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
