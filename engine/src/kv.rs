//! KV cache with one slot per (block, pass).
//!
//! Slot (b, 0) exists for every block from the start; slots for further passes of a block are
//! allocated the first time a path repeats that block. All slots of a session share the cell
//! layout: the token at position p lives in cell p of every slot, so every pass sees the same
//! mask.

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
    /// slots[block][pass]
    slots: Vec<Vec<KvSlot>>,
    storage: Vec<(GgmlCtx, Buffer)>,
}

// SAFETY: the cache owns its contexts and buffers; it is only used through &mut Session.
unsafe impl Send for KvCache {}

impl KvCache {
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
            slots: vec![Vec::new(); cfg.n_layer],
            storage: Vec::new(),
        };
        let first: Vec<usize> = (0..cfg.n_layer).collect();
        kv.alloc(&first)?;
        Ok(kv)
    }

    /// Allocates one more pass slot for each listed block.
    fn alloc(&mut self, blocks: &[usize]) -> Result<()> {
        if blocks.is_empty() {
            return Ok(());
        }
        let ctx = GgmlCtx::new(2 * blocks.len(), 0)?;
        let mut made = Vec::new();
        for &b in blocks {
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
            made.push((b, KvSlot { k, v }));
        }
        let buf = Buffer::alloc_ctx_tensors(&ctx, self.buft).map_err(|_| {
            EngineError::Ggml(format!(
                "out of memory for the KV cache ({} slots of {} tokens)",
                blocks.len(),
                self.n_ctx
            ))
        })?;
        // cells never written are masked, but keep them finite anyway (as llama.cpp does)
        buf.clear(0);
        for (b, s) in made {
            self.slots[b].push(s);
        }
        self.storage.push((ctx, buf));
        Ok(())
    }

    /// Makes sure every pass of `path` has a slot.
    pub(crate) fn ensure(&mut self, path: &LayerPath) -> Result<()> {
        let counts = path.counts();
        let mut need = Vec::new();
        for (b, &c) in counts.iter().enumerate() {
            for _ in self.slots[b].len()..c {
                need.push(b);
            }
        }
        // allocate in rounds so one block needing several extra passes gets them all
        while !need.is_empty() {
            let mut round = Vec::new();
            let mut rest = Vec::new();
            for b in need {
                if round.contains(&b) {
                    rest.push(b);
                } else {
                    round.push(b);
                }
            }
            self.alloc(&round)?;
            need = rest;
        }
        Ok(())
    }

    /// Makes sure block `b` has at least `passes` slots.
    pub(crate) fn ensure_block(&mut self, b: usize, passes: usize) -> Result<()> {
        while self.slots[b].len() < passes {
            self.alloc(&[b])?;
        }
        Ok(())
    }

    pub(crate) fn slot(&self, block: usize, pass: usize) -> Result<KvSlot> {
        self.slots
            .get(block)
            .and_then(|s| s.get(pass))
            .copied()
            .ok_or_else(|| EngineError::State(format!("no KV slot for block {block} pass {pass}")))
    }

    /// Bytes of KV storage allocated.
    pub(crate) fn bytes(&self) -> usize {
        self.storage.iter().map(|(_, b)| b.size()).sum()
    }
}
