//! The conversation cache: the KV cache of finished requests, kept in host memory (bounded in
//! bytes, least recently used first out), so that the next turn of a conversation prefills only
//! what is new.
//!
//! A request may reuse an entry when its tokens start with the entry's tokens up to at least
//! the point where the entry's path was decided (for routed requests, the whole first-turn
//! prompt the routers saw): the conversation then keeps its path, the same rule as within one
//! answer. A plain request (full depth) may reuse any common prefix of a plain entry. Entries
//! are shared by all workers: any worker restores any entry (a copy of a few megabytes instead
//! of a prefill of the whole history), and a worker whose session still holds the entry's
//! sequence only cuts it back ([`Session::truncate`]).

use crate::metrics::Metrics;
use drllm_engine::{BlockDecision, SeqSnapshot};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

/// Which requests may share an entry: the same routing mode and controls (a plain request
/// never continues a routed conversation, nor one with another depth bias or pass cap).
#[derive(Debug, Clone, PartialEq)]
pub struct CacheKey {
    pub routed: bool,
    pub depth_bias: f32,
    pub max_passes: Option<usize>,
}

/// One cached sequence.
#[derive(Debug)]
pub struct Entry {
    /// The tokens whose K and V the snapshot holds (prompt and generated tokens).
    pub tokens: Vec<i32>,
    pub key: CacheKey,
    /// How many leading tokens a request must share to continue this entry: for a routed
    /// conversation the first turn's prompt (the routers decided its path on it), for a plain
    /// one 1 (any common prefix).
    pub decided_at: usize,
    /// Prompt tokens of the request that left this entry: a later entry that extends them all
    /// is the conversation's next turn and supersedes this one.
    pub prompt_len: usize,
    pub snap: SeqSnapshot,
    /// The routers' decisions when the path was decided (reported again on reuse).
    pub decisions: Vec<BlockDecision>,
    /// The router generation that decided the path.
    pub generation: Option<String>,
}

impl Entry {
    /// How many of `n` reusable tokens to restore so that the rest, prefilled in chunks of
    /// `n_ubatch` from there, runs the very ubatches a fresh prefill of the whole prompt runs
    /// (then the logits are bit-identical to an uncached request's): `n` cut to the rows this
    /// entry's prefill computed (its prompt; an answer's rows were decoded one at a time, which
    /// rounds differently) and down to a multiple of `n_ubatch`. Those rows came from prefill
    /// chunks that started at multiples of `n_ubatch` too (every prefill, fresh or resumed
    /// this way, does), so they are the fresh prefill's own.
    pub fn exact_reuse(&self, n: usize, n_ubatch: usize) -> usize {
        let ub = n_ubatch.max(1);
        (n.min(self.prompt_len) / ub) * ub
    }

    /// Bytes the entry holds.
    pub fn bytes(&self) -> usize {
        self.snap.bytes() + self.tokens.len() * 4
    }

    /// How many leading tokens of `prompt` a request with `key` may take from this entry (0:
    /// none), when the routers now serving are of generation `current`. A routed entry is
    /// continued by a prompt that extends the one its path was decided on; the same prompt
    /// again is a new request, which reuses the entry only if the same routers would decide
    /// it. At least one prompt token is always left to prefill (it gives the logits).
    pub fn reusable(&self, key: &CacheKey, prompt: &[i32], current: Option<&str>) -> usize {
        if &self.key != key || prompt.is_empty() {
            return 0;
        }
        let common = common_prefix(&self.tokens, prompt);
        if common == 0 || common < self.decided_at {
            return 0;
        }
        if key.routed && prompt.len() <= self.decided_at && self.generation.as_deref() != current {
            return 0;
        }
        common.min(prompt.len() - 1)
    }
}

/// Length of the common prefix of two token sequences.
pub fn common_prefix(a: &[i32], b: &[i32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

struct Slot {
    entry: Arc<Entry>,
    used: u64,
}

struct Inner {
    slots: Vec<Slot>,
    clock: u64,
}

/// The cache shared by the workers.
pub struct PromptCache {
    inner: Mutex<Inner>,
    capacity: usize,
    /// Restore only what keeps answers bit-identical to uncached ones
    /// ([`Entry::exact_reuse`]).
    exact: bool,
    metrics: Arc<Metrics>,
}

impl PromptCache {
    /// A cache of at most `capacity` bytes (0: nothing is kept); `exact`: see
    /// [`Entry::exact_reuse`].
    pub fn new(capacity: usize, exact: bool, metrics: Arc<Metrics>) -> PromptCache {
        PromptCache {
            inner: Mutex::new(Inner {
                slots: Vec::new(),
                clock: 0,
            }),
            capacity,
            exact,
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // nothing panics while holding it
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether entries are kept at all.
    pub fn enabled(&self) -> bool {
        self.capacity > 0
    }

    /// Whether restores keep answers bit-identical ([`Entry::exact_reuse`]).
    pub fn exact(&self) -> bool {
        self.exact
    }

    /// The entry a request can reuse the most tokens of (see [`Entry::reusable`]), and how
    /// many; marks it used.
    pub fn lookup(
        &self,
        key: &CacheKey,
        prompt: &[i32],
        current: Option<&str>,
    ) -> Option<(Arc<Entry>, usize)> {
        let mut g = self.lock();
        g.clock += 1;
        let now = g.clock;
        let best = g
            .slots
            .iter_mut()
            .map(|s| {
                let n = s.entry.reusable(key, prompt, current);
                (n, s)
            })
            .filter(|(n, _)| *n > 0)
            .max_by_key(|(n, s)| (*n, s.used));
        match best {
            Some((n, s)) => {
                s.used = now;
                Some((s.entry.clone(), n))
            }
            None => None,
        }
    }

    /// Keeps an entry; drops the entries it supersedes (same key, their whole prompt a prefix
    /// of its tokens: earlier turns of its conversation)
    /// and then the least recently used ones until it fits. An entry larger than the whole
    /// cache is not kept. Returns the entry as stored.
    pub fn insert(&self, entry: Entry) -> Option<Arc<Entry>> {
        let size = entry.bytes();
        if size > self.capacity {
            return None;
        }
        let entry = Arc::new(entry);
        let mut g = self.lock();
        g.clock += 1;
        let now = g.clock;
        g.slots.retain(|s| {
            !(s.entry.key == entry.key
                && common_prefix(&s.entry.tokens, &entry.tokens) >= s.entry.prompt_len)
        });
        let mut held: usize = g.slots.iter().map(|s| s.entry.bytes()).sum();
        let mut evicted = 0u64;
        while held + size > self.capacity {
            let Some(oldest) = g
                .slots
                .iter()
                .enumerate()
                .min_by_key(|(_, s)| s.used)
                .map(|(i, _)| i)
            else {
                break;
            };
            held -= g.slots.swap_remove(oldest).entry.bytes();
            evicted += 1;
        }
        g.slots.push(Slot {
            entry: entry.clone(),
            used: now,
        });
        let m = &self.metrics;
        m.cache_evictions.fetch_add(evicted, Ordering::Relaxed);
        m.cache_bytes.store(held + size, Ordering::Relaxed);
        m.cache_entries.store(g.slots.len(), Ordering::Relaxed);
        Some(entry)
    }
}
