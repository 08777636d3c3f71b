//! KV cache with one slot per (block, pass).
//!
//! A session holds the slots of its sequence's path: one per pass (none for a skipped block,
//! two for a repeated one); starting a sequence on another path allocates the missing slots and
//! releases the others. All slots of a session share the cell layout: the token at position p
//! lives in cell p of every slot, so every pass sees the same mask.

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::ffi::{self, Buffer, GgmlCtx, Tensor};
use crate::path::LayerPath;
use llama_cpp_sys_2 as sys;

/// K and V storage of one (block, pass): `[n_embd_k_gqa, n_ctx]` in F16.
#[derive(Clone, Copy)]
pub(crate) struct KvSlot {
    pub k: Tensor,
    pub v: Tensor,
}

pub(crate) struct KvCache {
    pub n_ctx: usize,
    n_embd_k: usize,
    n_embd_v: usize,
    buft: sys::ggml_backend_buffer_type_t,
    /// slots[block][pass], each with its own storage so that it can be released alone
    slots: Vec<Vec<OwnedSlot>>,
    /// Bumped whenever a slot is allocated or released (graphs holding slot tensors are then
    /// stale).
    generation: u64,
}

struct OwnedSlot {
    slot: KvSlot,
    _store: (GgmlCtx, Buffer),
    bytes: usize,
}

// SAFETY: the cache owns its contexts and buffers; it is only used through &mut Session.
unsafe impl Send for KvCache {}

impl KvCache {
    /// A cache with one slot for every block (the full-depth path).
    pub(crate) fn new(
        cfg: &ModelConfig,
        n_ctx: usize,
        buft: sys::ggml_backend_buffer_type_t,
    ) -> Result<Self> {
        let mut kv = KvCache {
            n_ctx,
            n_embd_k: cfg.n_embd_k_gqa(),
            n_embd_v: cfg.n_embd_v_gqa(),
            buft,
            slots: (0..cfg.n_layer).map(|_| Vec::new()).collect(),
            generation: 0,
        };
        kv.fit(&LayerPath::full(cfg.n_layer))?;
        Ok(kv)
    }

    /// Allocates the next pass slot of block `b`.
    fn alloc(&mut self, b: usize) -> Result<()> {
        let ctx = GgmlCtx::new(2, 0)?;
        let pass = self.slots[b].len();
        // SAFETY: new tensors in our own no_alloc context.
        let (k, v) = unsafe {
            (
                sys::ggml_new_tensor_2d(
                    ctx.ptr(),
                    sys::GGML_TYPE_F16,
                    self.n_embd_k as i64,
                    self.n_ctx as i64,
                ),
                sys::ggml_new_tensor_2d(
                    ctx.ptr(),
                    sys::GGML_TYPE_F16,
                    self.n_embd_v as i64,
                    self.n_ctx as i64,
                ),
            )
        };
        ffi::set_name(k, &format!("cache_k_b{b}_p{pass}"));
        ffi::set_name(v, &format!("cache_v_b{b}_p{pass}"));
        let buf = Buffer::alloc_ctx_tensors(&ctx, self.buft).map_err(|_| {
            EngineError::Ggml(format!(
                "out of memory for the KV cache (block {b} pass {pass}, {} tokens)",
                self.n_ctx
            ))
        })?;
        // cells never written are masked, but keep them finite anyway (as llama.cpp does)
        buf.clear(0);
        let bytes = buf.size();
        self.slots[b].push(OwnedSlot {
            slot: KvSlot { k, v },
            _store: (ctx, buf),
            bytes,
        });
        self.generation += 1;
        Ok(())
    }

    /// Makes the slots exactly those of `path`: allocates the missing ones, releases the
    /// others (a skipped block has none; a block run once has one).
    pub(crate) fn fit(&mut self, path: &LayerPath) -> Result<()> {
        let counts = path.counts();
        for (b, &c) in counts.iter().enumerate() {
            if self.slots[b].len() > c {
                self.slots[b].truncate(c);
                self.generation += 1;
            }
            while self.slots[b].len() < c {
                self.alloc(b)?;
            }
        }
        Ok(())
    }

    /// Allocates the slots of `path` that are missing; releases nothing.
    pub(crate) fn ensure(&mut self, path: &LayerPath) -> Result<()> {
        for (b, c) in path.counts().into_iter().enumerate() {
            self.ensure_block(b, c)?;
        }
        Ok(())
    }

    /// Makes sure block `b` has at least `passes` slots.
    pub(crate) fn ensure_block(&mut self, b: usize, passes: usize) -> Result<()> {
        while self.slots[b].len() < passes {
            self.alloc(b)?;
        }
        Ok(())
    }

    pub(crate) fn slot(&self, block: usize, pass: usize) -> Result<KvSlot> {
        self.slots
            .get(block)
            .and_then(|s| s.get(pass))
            .map(|o| o.slot)
            .ok_or_else(|| EngineError::State(format!("no KV slot for block {block} pass {pass}")))
    }

    /// Bytes of KV storage allocated.
    pub(crate) fn bytes(&self) -> usize {
        self.slots.iter().flatten().map(|o| o.bytes).sum()
    }

    /// Changes whenever slots are allocated or released.
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }
}
