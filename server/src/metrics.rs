//! Counters and gauges, rendered as Prometheus text for `GET /metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Everything `/metrics` shows. Counters only go up; gauges are set.
#[derive(Debug)]
pub struct Metrics {
    n_layer: usize,
    /// Requests answered, by route name and status.
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    /// Decode time, microseconds.
    decode_us: AtomicU64,
    /// Prefill time, microseconds.
    prefill_us: AtomicU64,
    /// Tokens per second of the last finished generation, as f64 bits.
    last_tps: AtomicU64,
    /// Per block: skipped, executed once, repeated.
    blocks: Vec<[AtomicU64; 3]>,
    routed_requests: AtomicU64,
    plain_requests: AtomicU64,
    rejected_busy: AtomicU64,
    cancelled: AtomicU64,
    reloads: AtomicU64,
    reload_failures: AtomicU64,
    /// Decode graphs that ran several sequences, and the tokens they decoded.
    batched_steps: AtomicU64,
    batched_tokens: AtomicU64,
    /// Jobs waiting for a worker.
    pub queue_depth: AtomicUsize,
    /// Jobs a worker is running.
    pub running: AtomicUsize,
    /// Workers started, and those still alive.
    pub workers_started: AtomicUsize,
    pub workers_alive: AtomicUsize,
    /// Requests that failed with a panic inside a worker (the worker went on).
    panics: AtomicU64,
    /// Conversation cache: requests that reused a cached prefix, those that found none,
    /// prompt tokens not prefilled thanks to it, entries dropped to make room.
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    pub cache_tokens_reused: AtomicU64,
    pub cache_evictions: AtomicU64,
    /// Bytes and entries the cache holds.
    pub cache_bytes: AtomicUsize,
    pub cache_entries: AtomicUsize,
    /// Routing-log rows dropped (writer queue full) or lost to a failed write.
    pub log_dropped: AtomicU64,
    pub log_write_failures: AtomicU64,
    /// Routing-log rows deleted for being older than `--log-days`.
    pub log_pruned: AtomicU64,
    generation: Mutex<Option<String>>,
}

impl Metrics {
    /// Empty metrics for a model of `n_layer` blocks.
    pub fn new(n_layer: usize) -> Self {
        Metrics {
            n_layer,
            requests: Mutex::new(BTreeMap::new()),
            prompt_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
            decode_us: AtomicU64::new(0),
            prefill_us: AtomicU64::new(0),
            last_tps: AtomicU64::new(0f64.to_bits()),
            blocks: (0..n_layer).map(|_| Default::default()).collect(),
            routed_requests: AtomicU64::new(0),
            plain_requests: AtomicU64::new(0),
            rejected_busy: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            reloads: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
            batched_steps: AtomicU64::new(0),
            batched_tokens: AtomicU64::new(0),
            queue_depth: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            workers_started: AtomicUsize::new(0),
            workers_alive: AtomicUsize::new(0),
            panics: AtomicU64::new(0),
            cache_hits: AtomicU64::new(0),
            cache_misses: AtomicU64::new(0),
            cache_tokens_reused: AtomicU64::new(0),
            cache_evictions: AtomicU64::new(0),
            cache_bytes: AtomicUsize::new(0),
            cache_entries: AtomicUsize::new(0),
            log_dropped: AtomicU64::new(0),
            log_write_failures: AtomicU64::new(0),
            log_pruned: AtomicU64::new(0),
            generation: Mutex::new(None),
        }
    }

    /// One answered request.
    pub fn request(&self, route: &'static str, status: u16) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((route, status)).or_insert(0) += 1;
        }
    }

    /// A finished generation (or route) along a path with per-block pass counts `counts`.
    pub fn generation_done(
        &self,
        routed: bool,
        counts: &[usize],
        prompt_tokens: usize,
        completion_tokens: usize,
        prefill_secs: f64,
        decode_secs: f64,
    ) {
        self.prompt_tokens
            .fetch_add(prompt_tokens as u64, Ordering::Relaxed);
        self.completion_tokens
            .fetch_add(completion_tokens as u64, Ordering::Relaxed);
        self.prefill_us
            .fetch_add((prefill_secs * 1e6) as u64, Ordering::Relaxed);
        self.decode_us
            .fetch_add((decode_secs * 1e6) as u64, Ordering::Relaxed);
        if completion_tokens > 0 && decode_secs > 0.0 {
            let tps = completion_tokens as f64 / decode_secs;
            self.last_tps.store(tps.to_bits(), Ordering::Relaxed);
        }
        if routed {
            self.routed_requests.fetch_add(1, Ordering::Relaxed);
        } else {
            self.plain_requests.fetch_add(1, Ordering::Relaxed);
        }
        for (b, &c) in counts.iter().enumerate().take(self.blocks.len()) {
            self.blocks[b][c.min(2)].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// One decode step of `n` sequences (counted when n > 1: batched).
    pub fn decoded_together(&self, n: usize) {
        if n > 1 {
            self.batched_steps.fetch_add(1, Ordering::Relaxed);
            self.batched_tokens.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// A request refused because the queue was full.
    pub fn rejected(&self) {
        self.rejected_busy.fetch_add(1, Ordering::Relaxed);
    }

    /// A request whose client went away before it finished.
    pub fn cancelled(&self) {
        self.cancelled.fetch_add(1, Ordering::Relaxed);
    }

    /// A request that ended in a panic inside a worker (its client got a 500).
    pub fn panicked(&self) {
        self.panics.fetch_add(1, Ordering::Relaxed);
    }

    /// A successful sidecar load; `generation` None: running unrouted.
    pub fn reloaded(&self, generation: Option<String>) {
        self.reloads.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut g) = self.generation.lock() {
            *g = generation;
        }
    }

    /// A sidecar that failed validation.
    pub fn reload_failed(&self) {
        self.reload_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Reload failures so far.
    pub fn reload_failures(&self) -> u64 {
        self.reload_failures.load(Ordering::Relaxed)
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut s = String::new();
        self.render_requests(&mut s);
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
        for (name, help, v) in self.counters() {
            head(&mut s, name, "counter", help);
            let _ = writeln!(s, "{name} {v}");
        }
        for (name, help, v) in [
            (
                "drllm_prefill_seconds_total",
                "Seconds spent in prefill (routing included).",
                c(&self.prefill_us) as f64 / 1e6,
            ),
            (
                "drllm_decode_seconds_total",
                "Seconds spent generating tokens.",
                c(&self.decode_us) as f64 / 1e6,
            ),
        ] {
            head(&mut s, name, "counter", help);
            let _ = writeln!(s, "{name} {v:.6}");
        }
        head(
            &mut s,
            "drllm_tokens_per_second",
            "gauge",
            "Generation speed of the last finished request.",
        );
        let _ = writeln!(
            s,
            "drllm_tokens_per_second {:.3}",
            f64::from_bits(c(&self.last_tps))
        );
        for (name, help, v) in self.gauges() {
            head(&mut s, name, "gauge", help);
            let _ = writeln!(s, "{name} {v}");
        }
        self.render_blocks(&mut s);
        self.render_info(&mut s);
        s
    }

    /// `drllm_requests_total`, one line per route and status.
    fn render_requests(&self, s: &mut String) {
        head(
            s,
            "drllm_requests_total",
            "counter",
            "HTTP requests answered, by route and status.",
        );
        if let Ok(m) = self.requests.lock() {
            for ((route, status), n) in m.iter() {
                let _ = writeln!(
                    s,
                    "drllm_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
                );
            }
        }
    }

    /// The plain counters: name, help, value.
    fn counters(&self) -> [(&'static str, &'static str, u64); 18] {
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
        [
            (
                "drllm_prompt_tokens_total",
                "Prompt tokens processed.",
                c(&self.prompt_tokens),
            ),
            (
                "drllm_completion_tokens_total",
                "Tokens generated.",
                c(&self.completion_tokens),
            ),
            (
                "drllm_routed_requests_total",
                "Requests run along a routed path.",
                c(&self.routed_requests),
            ),
            (
                "drllm_plain_requests_total",
                "Requests run on the plain model (no routers, or routing off).",
                c(&self.plain_requests),
            ),
            (
                "drllm_requests_rejected_total",
                "Requests refused with 503 because the queue was full.",
                c(&self.rejected_busy),
            ),
            (
                "drllm_requests_cancelled_total",
                "Requests whose client disconnected before the end.",
                c(&self.cancelled),
            ),
            (
                "drllm_router_reloads_total",
                "Router sidecar loads (and switches to unrouted on deletion).",
                c(&self.reloads),
            ),
            (
                "drllm_batched_decode_steps_total",
                "Decode steps that ran several requests on the same path in one graph.",
                c(&self.batched_steps),
            ),
            (
                "drllm_batched_tokens_total",
                "Tokens decoded in those batched steps.",
                c(&self.batched_tokens),
            ),
            (
                "drllm_request_panics_total",
                "Requests that failed with a panic inside a worker (answered 500; the worker went on).",
                c(&self.panics),
            ),
            (
                "drllm_router_reload_failures_total",
                "Sidecar files that failed validation (the previous generation kept serving).",
                c(&self.reload_failures),
            ),
            (
                "drllm_cache_hits_total",
                "Requests that reused a cached conversation prefix.",
                c(&self.cache_hits),
            ),
            (
                "drllm_cache_misses_total",
                "Requests that looked for a cached prefix and found none.",
                c(&self.cache_misses),
            ),
            (
                "drllm_cache_tokens_reused_total",
                "Prompt tokens taken from the cache instead of prefilled.",
                c(&self.cache_tokens_reused),
            ),
            (
                "drllm_cache_evictions_total",
                "Cached conversations dropped to stay within --cache-mb.",
                c(&self.cache_evictions),
            ),
            (
                "drllm_log_rows_dropped_total",
                "Routing-log rows dropped because the writer's queue was full.",
                c(&self.log_dropped),
            ),
            (
                "drllm_log_write_failures_total",
                "Routing-log rows lost to failed writes.",
                c(&self.log_write_failures),
            ),
            (
                "drllm_log_rows_pruned_total",
                "Routing-log rows deleted for being older than --log-days.",
                c(&self.log_pruned),
            ),
        ]
    }

    /// The gauges that count things: name, help, value.
    fn gauges(&self) -> [(&'static str, &'static str, usize); 6] {
        let load = |a: &AtomicUsize| a.load(Ordering::Relaxed);
        [
            (
                "drllm_queue_depth",
                "Requests waiting for a worker.",
                load(&self.queue_depth),
            ),
            (
                "drllm_requests_running",
                "Requests a worker is running.",
                load(&self.running),
            ),
            (
                "drllm_workers",
                "Worker threads alive (each runs requests on its own sessions).",
                load(&self.workers_alive),
            ),
            (
                "drllm_workers_started",
                "Worker threads started; more than drllm_workers means some died.",
                load(&self.workers_started),
            ),
            (
                "drllm_cache_bytes",
                "Bytes of KV cache the conversation cache holds (host memory).",
                load(&self.cache_bytes),
            ),
            (
                "drllm_cache_entries",
                "Conversations the cache holds.",
                load(&self.cache_entries),
            ),
        ]
    }

    /// `drllm_block_passes_total`, one line per block and decision.
    fn render_blocks(&self, s: &mut String) {
        head(
            s,
            "drllm_block_passes_total",
            "counter",
            "Routing decisions per block over finished requests: skip (0 passes), execute (1), repeat (2).",
        );
        for (b, counts) in self.blocks.iter().enumerate() {
            for (d, name) in ["skip", "execute", "repeat"].iter().enumerate() {
                let _ = writeln!(
                    s,
                    "drllm_block_passes_total{{block=\"{b}\",decision=\"{name}\"}} {}",
                    counts[d].load(Ordering::Relaxed)
                );
            }
        }
    }

    /// The router generation, the model's blocks and the process's memory.
    fn render_info(&self, s: &mut String) {
        head(
            s,
            "drllm_router_generation_info",
            "gauge",
            "The router generation serving new requests (content hash; \"none\": unrouted).",
        );
        let g = self
            .generation
            .lock()
            .ok()
            .and_then(|g| g.clone())
            .unwrap_or_else(|| "none".into());
        let _ = writeln!(s, "drllm_router_generation_info{{generation=\"{g}\"}} 1");
        head(s, "drllm_model_blocks", "gauge", "Blocks of the model.");
        let _ = writeln!(s, "drllm_model_blocks {}", self.n_layer);
        if let Some(rss) = resident_bytes() {
            head(
                s,
                "process_resident_memory_bytes",
                "gauge",
                "Resident memory size in bytes.",
            );
            let _ = writeln!(s, "process_resident_memory_bytes {rss}");
        }
    }
}

/// The `# HELP` and `# TYPE` lines of a metric.
fn head(s: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Resident memory of this process (Linux: `VmRSS` of /proc/self/status; elsewhere None).
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counts_per_block() {
        let m = Metrics::new(3);
        m.request("chat", 200);
        m.request("chat", 200);
        m.request("chat", 400);
        m.generation_done(true, &[0, 1, 2], 10, 4, 0.5, 2.0);
        m.generation_done(false, &[1, 1, 1], 5, 0, 0.1, 0.0);
        m.reloaded(Some("abc".into()));
        m.reload_failed();
        let t = m.render();
        for line in [
            "drllm_requests_total{route=\"chat\",status=\"200\"} 2",
            "drllm_requests_total{route=\"chat\",status=\"400\"} 1",
            "drllm_prompt_tokens_total 15",
            "drllm_completion_tokens_total 4",
            "drllm_tokens_per_second 2.000",
            "drllm_block_passes_total{block=\"0\",decision=\"skip\"} 1",
            "drllm_block_passes_total{block=\"0\",decision=\"execute\"} 1",
            "drllm_block_passes_total{block=\"2\",decision=\"repeat\"} 1",
            "drllm_router_generation_info{generation=\"abc\"} 1",
            "drllm_router_reload_failures_total 1",
            "drllm_routed_requests_total 1",
            "drllm_plain_requests_total 1",
        ] {
            assert!(t.lines().any(|l| l == line), "missing {line} in\n{t}");
        }
    }
}
