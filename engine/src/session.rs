//! A session: one sequence, its KV cache and its fixed layer path.
//!
//! Prefill either runs a fixed path token-major (one graph per chunk of tokens, like llama.cpp),
//! or lets a [`PrefillHook`] choose the passes block by block: then it runs layer-major, one
//! graph per pass, keeping the residual stream of the whole prompt in a device tensor the hook
//! can read between passes. Decoding builds one graph per token along the path, reused while
//! the path and the number of visible KV cells stay the same.

use crate::error::{EngineError, Result};
use crate::ffi::{self, Backend, Buffer, GgmlCtx, Sched, Tensor};
use crate::graph::{self, AttnInputs, GraphBuilder, Scratch};
use crate::kv::KvCache;
use crate::model::Model;
use crate::path::{LayerPath, Pass, MAX_PASSES_PER_BLOCK};
use llama_cpp_sys_2 as sys;
use std::sync::Arc;

/// What one pass of a layer-major prefill leaves behind for the prompt: the residual stream
/// after it (`T x n_embd` floats) and the K and V rows it wrote into its KV slot (raw bytes of
/// cells `0..T`). Resuming from the states of passes `0..k` gives exactly the sequence state
/// those passes produced, KV cache included.
#[derive(Clone, Debug, PartialEq)]
pub struct PassState {
    /// Residual stream after the pass.
    pub residual: Vec<f32>,
    /// K rows the pass wrote.
    pub k: Vec<u8>,
    /// V rows the pass wrote.
    pub v: Vec<u8>,
}

impl PassState {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.residual.len() * 4 + self.k.len() + self.v.len()
    }
}

/// A sequence copied to host memory: its path, and the K and V rows of its first `n_tokens`
/// cells in every pass slot of the path. [`Session::restore`] puts any prefix of it back into a
/// session (the same one or another of the same model), which then continues the sequence as
/// if it had computed those tokens itself: the conversation cache of the daemon.
#[derive(Clone, Debug, PartialEq)]
pub struct SeqSnapshot {
    path: LayerPath,
    n_tokens: usize,
    /// Per pass of `path`, in order: (K rows, V rows) of cells `0..n_tokens`.
    rows: Vec<(Vec<u8>, Vec<u8>)>,
}

impl SeqSnapshot {
    /// The path the sequence follows.
    pub fn path(&self) -> &LayerPath {
        &self.path
    }

    /// Tokens held.
    pub fn n_tokens(&self) -> usize {
        self.n_tokens
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.rows.iter().map(|(k, v)| k.len() + v.len()).sum()
    }
}

/// States saved by [`Session::forward_from`]: (passes they follow, state of the last of them).
pub type SavedStates = Vec<(usize, PassState)>;

/// Session settings.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// Context length in tokens (KV cells per slot).
    pub n_ctx: usize,
    /// CPU threads.
    pub n_threads: usize,
    /// Most tokens per graph at prefill (llama.cpp's n_ubatch).
    pub n_ubatch: usize,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            n_ctx: 4096,
            n_threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(4),
            n_ubatch: 512,
        }
    }
}

/// Which logits a prefill returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token's.
    Last,
    /// Every token's, in order.
    All,
    /// Instead of logits, every token's hidden state after the final norm (`n_embd` floats a
    /// row: llama.cpp's `t_embd`, what its embeddings pool); the session cannot decode after.
    Embeddings,
}

/// Chooses how many passes each block gets while the prompt is prefilled (the router plugs in
/// here). Called once per block, in order, with the residual stream entering that block.
pub trait PrefillHook {
    /// Passes for `block` (0 = skip, 1 = run, 2 = run twice, at most [`MAX_PASSES_PER_BLOCK`]).
    fn passes(
        &mut self,
        block: usize,
        hidden: &mut Hidden<'_>,
    ) -> std::result::Result<usize, String>;
}

/// How the path of a prefill is chosen.
pub enum Route<'a> {
    /// A fixed path.
    Fixed(&'a LayerPath),
    /// Block by block by a hook.
    Hook(&'a mut dyn PrefillHook),
}

/// What a prefill produced.
#[derive(Debug, Clone)]
pub struct Prefill {
    /// The path the sequence now follows.
    pub path: LayerPath,
    /// Logits, `rows x n_vocab`, row-major.
    pub logits: Vec<f32>,
    /// Number of logit rows.
    pub rows: usize,
}

/// The residual stream of the prompt entering a block, as a hook sees it. The data stays on
/// the device; read it with [`Hidden::to_host`] or reduce it there with [`Hidden::window_means`].
pub struct Hidden<'a> {
    s: &'a mut Session,
    n_tokens: usize,
}

impl Hidden<'_> {
    /// Prompt tokens.
    pub fn n_tokens(&self) -> usize {
        self.n_tokens
    }

    /// Hidden size.
    pub fn n_embd(&self) -> usize {
        self.s.model.cfg.n_embd
    }

    /// Copies the hidden states to the host: `n_tokens x n_embd`, row-major.
    pub fn to_host(&self) -> Vec<f32> {
        let n = self.n_tokens * self.n_embd();
        let mut out = vec![0f32; n];
        // SAFETY: the residual tensor holds at least n_ctx >= n_tokens columns.
        unsafe {
            sys::ggml_backend_tensor_get(self.s.resid, out.as_mut_ptr().cast(), 0, n * 4);
        }
        out
    }

    /// Means of `n_windows` equal windows of `floor(T / n_windows)` consecutive tokens over the
    /// first `n_windows * floor(T / n_windows)` tokens (the rest are dropped), computed on the
    /// device: `n_windows x n_embd`, row-major. `n_windows` must be in `1..=T`.
    pub fn window_means(&mut self, n_windows: usize) -> Result<Vec<f32>> {
        let t = self.n_tokens;
        if n_windows == 0 || n_windows > t {
            return Err(EngineError::State(format!(
                "cannot pool {t} tokens into {n_windows} windows"
            )));
        }
        let size = t / n_windows;
        let d = self.n_embd();
        let model = self.s.model.clone();
        let mut b = GraphBuilder::new(&model, 0, t)?;
        b.set_shape(("pool", t, n_windows));
        let resid = self.s.resid;
        // SAFETY: ops on the live residual tensor, within its first t columns.
        let out = unsafe {
            let c = b.ctx.ptr();
            let x = b.columns(resid, 0, n_windows * size);
            let x = sys::ggml_reshape_3d(c, x, d as i64, size as i64, n_windows as i64);
            let x = sys::ggml_cont(c, sys::ggml_permute(c, x, 1, 0, 2, 3)); // [size, d, W]
            let x = sys::ggml_sum_rows(c, x); // [1, d, W]
            let x = sys::ggml_scale(c, x, 1.0 / size as f32);
            sys::ggml_set_output(x);
            b.expand(x);
            x
        };
        self.s.compute(&b, |_| Ok(()))?;
        let mut v = Vec::new();
        ffi::tensor_get_f32(out, &mut v);
        Ok(v)
    }
}

struct CachedGraph {
    _ctx: GgmlCtx,
    gf: *mut sys::ggml_cgraph,
    tokens: Tensor,
    inp: AttnInputs,
    logits: Tensor,
    path: LayerPath,
    n_kv: usize,
    alloc_gen: u64,
    /// The KV cache's slot generation the graph was built on.
    kv_gen: u64,
}

/// One sequence on a model.
pub struct Session {
    model: Arc<Model>,
    opts: SessionOptions,
    sched: Sched,
    _backends: Vec<Backend>,
    kv: KvCache,
    resid: Tensor,
    _resid_store: (GgmlCtx, Buffer),
    path: Option<LayerPath>,
    n_past: usize,
    decode_graph: Option<CachedGraph>,
    /// bumped each time the scheduler allocates a graph
    alloc_gen: u64,
    /// structural key of the graph allocated last (0: none/unknown)
    last_shape: u64,
    scratch: Scratch,
    logits: Vec<f32>,
}

// SAFETY: all raw pointers are owned by the session (or the shared, immutable Model); the
// session is used from one thread at a time through &mut.
unsafe impl Send for Session {}

/// Most sequences [`Session::decode_batch`] puts in one graph (more are split into graphs of
/// this many).
pub const MAX_DECODE_BATCH: usize = 8;

impl Session {
    /// Creates a session with its own KV cache and compute buffers.
    pub fn new(model: Arc<Model>, opts: SessionOptions) -> Result<Session> {
        if opts.n_ctx == 0 || opts.n_ubatch == 0 || opts.n_threads == 0 {
            return Err(EngineError::State(
                "n_ctx, n_ubatch and n_threads must be positive".into(),
            ));
        }
        let cfg = &model.cfg;
        // backends: accelerator first, CPU last (the scheduler's priority order)
        let mut backends = Vec::new();
        let mut bufts = Vec::new();
        if let Some(g) = model.gpu {
            let be = Backend::init(g)?;
            ffi::set_n_threads(be.ptr(), g, opts.n_threads);
            // SAFETY: registry query.
            bufts.push(unsafe { sys::ggml_backend_dev_buffer_type(g) });
            backends.push(be);
        }
        let cpu = Backend::init(model.cpu)?;
        ffi::set_n_threads(cpu.ptr(), model.cpu, opts.n_threads);
        // SAFETY: registry queries.
        let cpu_buft = unsafe {
            match model.gpu {
                Some(g) => {
                    let hb = sys::ggml_backend_dev_host_buffer_type(g);
                    if hb.is_null() {
                        sys::ggml_backend_dev_buffer_type(model.cpu)
                    } else {
                        hb
                    }
                }
                None => sys::ggml_backend_dev_buffer_type(model.cpu),
            }
        };
        bufts.push(cpu_buft);
        backends.push(cpu);
        let ptrs: Vec<_> = backends.iter().map(|b| b.ptr()).collect();
        // room for a batched decode of MAX_DECODE_BATCH sequences (see `decode_batch`)
        let max_nodes =
            graph::graph_size(cfg, MAX_PASSES_PER_BLOCK * cfg.n_layer * MAX_DECODE_BATCH);
        let sched = Sched::new(&ptrs, &bufts, max_nodes)?;

        // KV cache and residual stream live on the device that runs the blocks
        // SAFETY: registry query.
        let dev_buft = unsafe { sys::ggml_backend_dev_buffer_type(model.gpu.unwrap_or(model.cpu)) };
        let kv = KvCache::new(cfg, opts.n_ctx, dev_buft)?;
        let rctx = GgmlCtx::new(1, 0)?;
        // SAFETY: new tensor in our context.
        let resid = unsafe {
            sys::ggml_new_tensor_2d(
                rctx.ptr(),
                sys::GGML_TYPE_F32,
                cfg.n_embd as i64,
                opts.n_ctx as i64,
            )
        };
        ffi::set_name(resid, "residual");
        let rbuf = Buffer::alloc_ctx_tensors(&rctx, dev_buft)?;

        let mut s = Session {
            model,
            opts,
            sched,
            _backends: backends,
            kv,
            resid,
            _resid_store: (rctx, rbuf),
            path: None,
            n_past: 0,
            decode_graph: None,
            alloc_gen: 0,
            last_shape: 0,
            scratch: Scratch::default(),
            logits: Vec::new(),
        };
        s.reserve()?;
        Ok(s)
    }

    /// Reserves compute buffers for the largest graph a full-depth prefill builds.
    fn reserve(&mut self) -> Result<()> {
        let model = self.model.clone();
        let n = self.opts.n_ubatch.min(self.opts.n_ctx);
        let path = LayerPath::full(model.cfg.n_layer);
        let b = GraphBuilder::new(&model, path.len(), n)?;
        let tok = b.tokens_input();
        let mut x = b.embed(tok);
        let inp = b.attn_inputs(self.opts.n_ctx, model.cfg.n_swa > 0);
        for p in path.passes() {
            x = b.block(x, p, self.kv.slot(p.block, p.pass)?, &inp, None);
        }
        b.head(x);
        // SAFETY: live scheduler and graph.
        let ok = unsafe { sys::ggml_backend_sched_reserve(self.sched.ptr(), b.gf) };
        if !ok {
            return Err(EngineError::Ggml(
                "could not reserve compute buffers (out of memory?)".into(),
            ));
        }
        Ok(())
    }

    /// The model.
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Settings.
    pub fn options(&self) -> &SessionOptions {
        &self.opts
    }

    /// Tokens in the sequence so far.
    pub fn n_past(&self) -> usize {
        self.n_past
    }

    /// The sequence's path (set by the first prefill).
    pub fn path(&self) -> Option<&LayerPath> {
        self.path.as_ref()
    }

    /// Logits of the last token processed.
    pub fn last_logits(&self) -> &[f32] {
        let v = self.model.cfg.n_vocab;
        if self.logits.len() >= v {
            &self.logits[self.logits.len() - v..]
        } else {
            &[]
        }
    }

    /// Bytes of KV cache allocated so far.
    pub fn kv_bytes(&self) -> usize {
        self.kv.bytes()
    }

    /// Forgets the sequence (the next prefill starts a new one, with a new path).
    pub fn reset(&mut self) {
        self.path = None;
        self.n_past = 0;
        self.logits.clear();
    }

    /// Changes the CPU thread count.
    pub fn set_threads(&mut self, n: usize) {
        let n = n.max(1);
        self.opts.n_threads = n;
        for be in &self._backends {
            // SAFETY: live backend.
            let dev = unsafe { sys::ggml_backend_get_device(be.ptr()) };
            ffi::set_n_threads(be.ptr(), dev, n);
        }
    }

    fn check_tokens(&self, tokens: &[i32]) -> Result<()> {
        let n_vocab = self.model.cfg.n_vocab;
        if let Some(&t) = tokens.iter().find(|&&t| t < 0 || t as usize >= n_vocab) {
            return Err(EngineError::InvalidToken { token: t, n_vocab });
        }
        let needed = self.n_past + tokens.len();
        if needed > self.opts.n_ctx {
            return Err(EngineError::ContextFull {
                needed,
                n_ctx: self.opts.n_ctx,
            });
        }
        Ok(())
    }

    /// Starts a new sequence with `tokens`, choosing its path, and returns the logits asked for.
    pub fn prefill(&mut self, tokens: &[i32], route: Route<'_>, logits: Logits) -> Result<Prefill> {
        self.reset();
        if tokens.is_empty() {
            return Err(EngineError::State("empty prompt".into()));
        }
        self.check_tokens(tokens)?;
        match route {
            Route::Fixed(path) => {
                if path.n_layer() != self.model.cfg.n_layer {
                    return Err(EngineError::State(format!(
                        "path is for {} blocks, the model has {}",
                        path.n_layer(),
                        self.model.cfg.n_layer
                    )));
                }
                self.kv.fit(path)?;
                self.path = Some(path.clone());
                let (logits, rows) = self.run_tokens(tokens, logits)?;
                Ok(Prefill {
                    path: path.clone(),
                    logits,
                    rows,
                })
            }
            Route::Hook(hook) => self.prefill_hooked(tokens, hook, logits),
        }
    }

    /// Appends tokens to the sequence along its path (e.g. the next user turn, or an answer
    /// option to score); returns the logits asked for and their number of rows.
    pub fn append(&mut self, tokens: &[i32], logits: Logits) -> Result<(Vec<f32>, usize)> {
        if self.path.is_none() {
            return Err(EngineError::State("append before prefill".into()));
        }
        if tokens.is_empty() {
            return Err(EngineError::State("nothing to append".into()));
        }
        self.check_tokens(tokens)?;
        self.run_tokens(tokens, logits)
    }

    /// Processes one generated token for each of several sequences in one graph (requests
    /// that follow the same path: their weight matmuls run once over all tokens, attention runs
    /// per sequence in its own KV cache). `sessions[i]` gets `tokens[i]`; all must share the
    /// model and the path. Returns each sequence's logits; each session then continues as if
    /// it had called [`Session::decode`].
    pub fn decode_batch(sessions: &mut [&mut Session], tokens: &[i32]) -> Result<Vec<Vec<f32>>> {
        if sessions.len() != tokens.len() || sessions.is_empty() {
            return Err(EngineError::State(format!(
                "decode_batch: {} sessions for {} tokens",
                sessions.len(),
                tokens.len()
            )));
        }
        let path = sessions[0]
            .path
            .clone()
            .ok_or_else(|| EngineError::State("decode before prefill".into()))?;
        for (s, &t) in sessions.iter().zip(tokens) {
            if !Arc::ptr_eq(&s.model, &sessions[0].model) {
                return Err(EngineError::State(
                    "decode_batch: the sessions run different models".into(),
                ));
            }
            if s.path.as_ref() != Some(&path) {
                return Err(EngineError::State(
                    "decode_batch: the sessions follow different paths".into(),
                ));
            }
            s.check_tokens(&[t])?;
        }
        if sessions.len() > MAX_DECODE_BATCH {
            // one graph per chunk: the scheduler has room for MAX_DECODE_BATCH sequences
            let mut out = Vec::with_capacity(sessions.len());
            for (ss, ts) in sessions
                .chunks_mut(MAX_DECODE_BATCH)
                .zip(tokens.chunks(MAX_DECODE_BATCH))
            {
                out.extend(Session::decode_batch(ss, ts)?);
            }
            return Ok(out);
        }
        if sessions.len() == 1 {
            return Ok(vec![sessions[0].decode(tokens[0])?.to_vec()]);
        }
        let model = sessions[0].model.clone();
        let n = sessions.len();
        let n_swa = model.cfg.n_swa;
        let b = GraphBuilder::new(&model, path.len() * n, n)?;
        let tok_in = b.tokens_input();
        // SAFETY: a new tensor in the builder's context.
        let pos = b.input(
            unsafe { sys::ggml_new_tensor_1d(b.ctx.ptr(), sys::GGML_TYPE_I32, n as i64) },
            "inp_pos",
        );
        let inps: Vec<AttnInputs> = sessions
            .iter()
            .map(|s| b.attn_inputs_n(graph::n_kv_for(s.n_past + 1, s.opts.n_ctx), n_swa > 0, 1))
            .collect();
        let mut x = b.embed(tok_in);
        for p in path.passes() {
            let mut groups = Vec::with_capacity(n);
            for (s, inp) in sessions.iter().zip(&inps) {
                groups.push((s.kv.slot(p.block, p.pass)?, inp));
            }
            x = b.block_grouped(x, p, pos, &groups);
        }
        let logits = b.head(x);
        let first = &mut sessions[0];
        first.decode_graph = None;
        first.alloc(&b)?;
        ffi::tensor_set(tok_in, tokens);
        let positions: Vec<i32> = sessions.iter().map(|s| s.n_past as i32).collect();
        graph::set_if_allocated(pos, &positions);
        for (s, inp) in sessions.iter_mut().zip(&inps) {
            let n_past = s.n_past;
            graph::set_attn_inputs(inp, n_past, 1, n_swa, &mut s.scratch);
        }
        let first = &mut sessions[0];
        // SAFETY: graph allocated by this scheduler just now.
        let st = unsafe { sys::ggml_backend_sched_graph_compute(first.sched.ptr(), b.gf) };
        if st != sys::GGML_STATUS_SUCCESS {
            return Err(EngineError::Ggml(format!(
                "graph compute failed (status {st})"
            )));
        }
        let mut all = Vec::new();
        ffi::tensor_get_f32(logits, &mut all);
        let n_vocab = model.n_vocab();
        let mut out = Vec::with_capacity(n);
        for (i, s) in sessions.iter_mut().enumerate() {
            let row = all[i * n_vocab..(i + 1) * n_vocab].to_vec();
            s.logits.clear();
            s.logits.extend_from_slice(&row);
            s.n_past += 1;
            out.push(row);
        }
        Ok(out)
    }

    /// Processes one generated token along the fixed path; returns its logits.
    pub fn decode(&mut self, token: i32) -> Result<&[f32]> {
        let path = self
            .path
            .clone()
            .ok_or_else(|| EngineError::State("decode before prefill".into()))?;
        self.check_tokens(&[token])?;
        let n_kv = graph::n_kv_for(self.n_past + 1, self.opts.n_ctx);
        let kv_gen = self.kv.generation();
        let reuse = matches!(&self.decode_graph, Some(g)
            if g.path == path && g.n_kv == n_kv && g.alloc_gen == self.alloc_gen
                && g.kv_gen == kv_gen);
        if !reuse {
            self.decode_graph = None;
            let model = self.model.clone();
            let mut b = GraphBuilder::new(&model, path.len(), 1)?;
            b.set_shape(("decode", &path, n_kv));
            let tokens = b.tokens_input();
            let mut x = b.embed(tokens);
            let inp = b.attn_inputs(n_kv, model.cfg.n_swa > 0);
            for p in path.passes() {
                x = b.block(x, p, self.kv.slot(p.block, p.pass)?, &inp, None);
            }
            let logits = b.head(x);
            self.alloc(&b)?;
            let gf = b.gf;
            self.decode_graph = Some(CachedGraph {
                _ctx: b.ctx,
                gf,
                tokens,
                inp,
                logits,
                path,
                n_kv,
                alloc_gen: self.alloc_gen,
                kv_gen,
            });
        }
        let g = self
            .decode_graph
            .as_ref()
            .ok_or_else(|| EngineError::State("decode graph missing".into()))?;
        ffi::tensor_set(g.tokens, &[token]);
        graph::set_attn_inputs(
            &g.inp,
            self.n_past,
            1,
            self.model.cfg.n_swa,
            &mut self.scratch,
        );
        // SAFETY: graph allocated by this scheduler (alloc_gen matches).
        let st = unsafe { sys::ggml_backend_sched_graph_compute(self.sched.ptr(), g.gf) };
        if st != sys::GGML_STATUS_SUCCESS {
            return Err(EngineError::Ggml(format!(
                "graph compute failed (status {st})"
            )));
        }
        ffi::tensor_get_f32(g.logits, &mut self.logits);
        self.n_past += 1;
        Ok(&self.logits)
    }

    /// Token-major run of `tokens` along the current path, chunk by chunk.
    fn run_tokens(&mut self, tokens: &[i32], mode: Logits) -> Result<(Vec<f32>, usize)> {
        let path = self
            .path
            .clone()
            .ok_or_else(|| EngineError::State("no path".into()))?;
        let model = self.model.clone();
        let cfg = &model.cfg;
        let passes = path.passes();
        let mut out = Vec::new();
        let mut rows = 0;
        let n_chunks = tokens.len().div_ceil(self.opts.n_ubatch);
        for (ci, chunk) in tokens.chunks(self.opts.n_ubatch).enumerate() {
            let n = chunk.len();
            let last_chunk = ci + 1 == n_chunks;
            let pos0 = self.n_past;
            let n_kv = graph::n_kv_for(pos0 + n, self.opts.n_ctx);
            let mut b = GraphBuilder::new(&model, passes.len(), n)?;
            let want_rows = match mode {
                Logits::All | Logits::Embeddings => n,
                Logits::Last if last_chunk => 1,
                Logits::Last => 0,
            };
            b.set_shape(("tokens", &path, n, n_kv, want_rows));
            let tok = b.tokens_input();
            let mut x = b.embed(tok);
            let inp = b.attn_inputs(n_kv, cfg.n_swa > 0);
            let out_ids = (want_rows > 0 && want_rows < n).then(|| b.out_ids_input(want_rows));
            for (i, p) in passes.iter().enumerate() {
                let prune = if i + 1 == passes.len() { out_ids } else { None };
                x = b.block(x, *p, self.kv.slot(p.block, p.pass)?, &inp, prune);
            }
            if passes.is_empty() {
                if let Some(ids) = out_ids {
                    // SAFETY: op on live tensors.
                    x = unsafe { sys::ggml_get_rows(b.ctx.ptr(), x, ids) };
                }
            }
            let logits = if want_rows > 0 {
                Some(b.output(x, mode == Logits::Embeddings))
            } else {
                b.expand(x);
                None
            };
            let n_swa = cfg.n_swa;
            self.compute(&b, |s| {
                ffi::tensor_set(tok, chunk);
                graph::set_attn_inputs(&inp, pos0, n, n_swa, s);
                if let Some(ids) = out_ids {
                    s.ids.clear();
                    s.ids.push((n - 1) as i32);
                    graph::set_if_allocated(ids, &s.ids);
                }
                Ok(())
            })?;
            if let Some(l) = logits {
                let mut v = Vec::new();
                ffi::tensor_get_f32(l, &mut v);
                out.extend_from_slice(&v);
                rows += want_rows;
            }
            self.n_past += n;
        }
        self.logits.clear();
        if mode != Logits::Embeddings {
            self.logits
                .extend_from_slice(&out[out.len().saturating_sub(cfg.n_vocab)..]);
        }
        Ok((out, rows))
    }

    fn chunks(&self, t_total: usize) -> Vec<(usize, usize)> {
        let ub = self.opts.n_ubatch;
        (0..t_total)
            .step_by(ub)
            .map(|s| (s, ub.min(t_total - s)))
            .collect()
    }

    /// Layer-major: the token embeddings into the residual stream.
    fn lm_embed(&mut self, tokens: &[i32]) -> Result<()> {
        let model = self.model.clone();
        for (s, n) in self.chunks(tokens.len()) {
            let mut b = GraphBuilder::new(&model, 0, n)?;
            b.set_shape(("embed", n));
            let tok = b.tokens_input();
            let x = b.embed(tok);
            b.store(x, b.columns(self.resid, s, n));
            self.compute(&b, |_| {
                ffi::tensor_set(tok, &tokens[s..s + n]);
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Layer-major: one pass over all `t_total` tokens of the residual stream, in chunks. Not
    /// final: the result replaces the residual stream. Final: the head runs on the result, for
    /// the last row (`Logits::Last`, pruned inside the pass) or every row, and the logits are
    /// returned (`rows x n_vocab`).
    fn lm_pass(
        &mut self,
        p: Pass,
        t_total: usize,
        final_pass: bool,
        mode: Logits,
    ) -> Result<Option<Vec<f32>>> {
        let model = self.model.clone();
        let cfg = &model.cfg;
        self.kv.ensure_block(p.block, p.pass + 1)?;
        let slot = self.kv.slot(p.block, p.pass)?;
        let chunks = self.chunks(t_total);
        let mut logits_out = Vec::new();
        for (ci, &(s, n)) in chunks.iter().enumerate() {
            let last_chunk = ci + 1 == chunks.len();
            let n_kv = graph::n_kv_for(s + n, self.opts.n_ctx);
            let mut b = GraphBuilder::new(&model, 1, n)?;
            let want_rows = match (final_pass, mode) {
                (false, _) => 0,
                (true, Logits::All | Logits::Embeddings) => n,
                (true, Logits::Last) => usize::from(last_chunk),
            };
            // every block's pass graph has the same structure (weights and KV slot aside)
            b.set_shape((
                "pass",
                n,
                s,
                n_kv,
                cfg.is_swa[p.block],
                final_pass,
                want_rows,
            ));
            let inp = b.attn_inputs(n_kv, cfg.is_swa[p.block]);
            let x = b.columns(self.resid, s, n);
            let prune = (want_rows == 1 && n > 1).then(|| b.out_ids_input(1));
            let out = b.block(x, p, slot, &inp, prune);
            let logits = if want_rows > 0 {
                Some(b.output(out, mode == Logits::Embeddings))
            } else {
                if !final_pass {
                    b.store(out, b.columns(self.resid, s, n));
                } else {
                    // the final pass of an earlier chunk: only its KV matters
                    b.expand(out);
                }
                None
            };
            let n_swa = cfg.n_swa;
            self.compute(&b, |sc| {
                graph::set_attn_inputs(&inp, s, n, n_swa, sc);
                if let Some(ids) = prune {
                    sc.ids.clear();
                    sc.ids.push((n - 1) as i32);
                    graph::set_if_allocated(ids, &sc.ids);
                }
                Ok(())
            })?;
            if let Some(l) = logits {
                let mut v = Vec::new();
                ffi::tensor_get_f32(l, &mut v);
                logits_out.extend_from_slice(&v);
            }
        }
        Ok(final_pass.then_some(logits_out))
    }

    /// Layer-major: the head on the residual stream (when the path ended without a final pass
    /// producing logits, e.g. the last block was skipped).
    fn lm_head(&mut self, t_total: usize, mode: Logits) -> Result<Vec<f32>> {
        let model = self.model.clone();
        let spans: Vec<(usize, usize)> = match mode {
            Logits::Last => vec![(t_total - 1, 1)],
            Logits::All | Logits::Embeddings => self.chunks(t_total),
        };
        let mut out = Vec::new();
        for (s, n) in spans {
            let mut b = GraphBuilder::new(&model, 0, n)?;
            b.set_shape(("head", n, s, mode == Logits::Embeddings));
            let l = b.output(b.columns(self.resid, s, n), mode == Logits::Embeddings);
            self.compute(&b, |_| Ok(()))?;
            let mut v = Vec::new();
            ffi::tensor_get_f32(l, &mut v);
            out.extend_from_slice(&v);
        }
        Ok(out)
    }

    fn finish_prefill(&mut self, path: &LayerPath, t_total: usize, logits: &[f32], mode: Logits) {
        let v = self.model.cfg.n_vocab;
        self.path = Some(path.clone());
        self.n_past = t_total;
        self.logits.clear();
        if mode != Logits::Embeddings {
            self.logits
                .extend_from_slice(&logits[logits.len().saturating_sub(v)..]);
        }
    }

    /// Layer-major prefill: embed the whole prompt into the residual stream, then for each block
    /// ask the hook for its passes and run them over all chunks.
    fn prefill_hooked(
        &mut self,
        tokens: &[i32],
        hook: &mut dyn PrefillHook,
        mode: Logits,
    ) -> Result<Prefill> {
        let t_total = tokens.len();
        let n_layer = self.model.cfg.n_layer;
        self.lm_embed(tokens)?;
        let mut blocks: Vec<usize> = Vec::new();
        let mut logits: Option<Vec<f32>> = None;
        for block in 0..n_layer {
            let passes = {
                let mut h = Hidden {
                    s: self,
                    n_tokens: t_total,
                };
                hook.passes(block, &mut h).map_err(EngineError::Hook)?
            };
            if passes > MAX_PASSES_PER_BLOCK {
                return Err(EngineError::Hook(format!(
                    "{passes} passes for block {block}; at most {MAX_PASSES_PER_BLOCK}"
                )));
            }
            for pass in 0..passes {
                let final_pass = block + 1 == n_layer && pass + 1 == passes;
                logits = self.lm_pass(Pass { block, pass }, t_total, final_pass, mode)?;
                blocks.push(block);
            }
        }
        // the last block was skipped: the head reads the residual stream
        let logits = match logits {
            Some(l) => l,
            None => self.lm_head(t_total, mode)?,
        };
        let path = LayerPath::new(&blocks, n_layer)?;
        // release the slots the hook's path does not use (skipped blocks, passes from before)
        self.kv.fit(&path)?;
        self.finish_prefill(&path, t_total, &logits, mode);
        let width = match mode {
            Logits::Embeddings => self.model.cfg.n_embd,
            _ => self.model.cfg.n_vocab,
        };
        let rows = logits.len() / width;
        Ok(Prefill { path, logits, rows })
    }

    /// Runs `tokens` as a new sequence along `path` layer by layer, resuming after the first k
    /// passes of `path` from their saved states: `start = Some(states)` with `states[i]` the
    /// state pass i left (k = `states.len()`), so only passes k.. run. After each pass i (0-based)
    /// for which `keep(i)` is true, except the last, its state is returned with i + 1. Returns
    /// the last token's logits; the session then holds the sequence along `path` (KV cache
    /// complete), ready for [`Session::append`] or [`Session::decode`]. This is what path search
    /// uses to share work between paths with a common prefix; results equal a plain prefill.
    pub fn forward_from(
        &mut self,
        tokens: &[i32],
        path: &LayerPath,
        start: Option<&[&PassState]>,
        mut keep: impl FnMut(usize) -> bool,
    ) -> Result<(Vec<f32>, SavedStates)> {
        self.reset();
        if tokens.is_empty() {
            return Err(EngineError::State("empty prompt".into()));
        }
        self.check_tokens(tokens)?;
        if path.n_layer() != self.model.cfg.n_layer {
            return Err(EngineError::State("path is for another block count".into()));
        }
        let t_total = tokens.len();
        let d = self.model.cfg.n_embd;
        let passes = path.passes();
        // grow only: a search tries many paths on one session, and releasing slots between
        // them would only allocate (and clear) them again
        self.kv.ensure(path)?;
        let kv_bytes = |t: Tensor| ffi::row_bytes(t) * t_total;
        let first = match start {
            None | Some([]) => {
                self.lm_embed(tokens)?;
                0
            }
            Some(states) => {
                let k = states.len();
                if k > passes.len() {
                    return Err(EngineError::State(format!(
                        "{k} saved passes for a path of {}",
                        passes.len()
                    )));
                }
                for (i, st) in states.iter().enumerate() {
                    let slot = self.kv.slot(passes[i].block, passes[i].pass)?;
                    if st.k.len() != kv_bytes(slot.k) || st.v.len() != kv_bytes(slot.v) {
                        return Err(EngineError::State(format!(
                            "saved state of pass {i} does not fit {t_total} tokens"
                        )));
                    }
                    ffi::tensor_set_bytes(slot.k, &st.k);
                    ffi::tensor_set_bytes(slot.v, &st.v);
                }
                let last = states[k - 1];
                if last.residual.len() != t_total * d {
                    return Err(EngineError::State(format!(
                        "saved residual has {} floats, expected {}",
                        last.residual.len(),
                        t_total * d
                    )));
                }
                // SAFETY: the residual tensor holds n_ctx >= t_total columns of d floats.
                unsafe {
                    sys::ggml_backend_tensor_set(
                        self.resid,
                        last.residual.as_ptr().cast(),
                        0,
                        last.residual.len() * 4,
                    );
                }
                k
            }
        };
        let mut saved = Vec::new();
        let mut logits = None;
        for (i, p) in passes.iter().enumerate().skip(first) {
            let final_pass = i + 1 == passes.len();
            logits = self.lm_pass(*p, t_total, final_pass, Logits::Last)?;
            if !final_pass && keep(i) {
                let mut residual = vec![0f32; t_total * d];
                // SAFETY: reading the first t_total columns of the residual tensor.
                unsafe {
                    sys::ggml_backend_tensor_get(
                        self.resid,
                        residual.as_mut_ptr().cast(),
                        0,
                        residual.len() * 4,
                    );
                }
                let slot = self.kv.slot(p.block, p.pass)?;
                let k = ffi::tensor_get_bytes(slot.k, kv_bytes(slot.k));
                let v = ffi::tensor_get_bytes(slot.v, kv_bytes(slot.v));
                saved.push((i + 1, PassState { residual, k, v }));
            }
        }
        let logits = match logits {
            Some(l) => l,
            None => self.lm_head(t_total, Logits::Last)?,
        };
        self.finish_prefill(path, t_total, &logits, Logits::Last);
        Ok((logits, saved))
    }

    /// Copies the sequence's KV cache (all `n_past` cells of every pass slot of its path) to
    /// host memory.
    pub fn snapshot(&self) -> Result<SeqSnapshot> {
        let path = self
            .path
            .clone()
            .ok_or_else(|| EngineError::State("snapshot before prefill".into()))?;
        let n = self.n_past;
        let mut rows = Vec::with_capacity(path.len());
        for p in path.passes() {
            let slot = self.kv.slot(p.block, p.pass)?;
            rows.push((
                ffi::tensor_get_bytes(slot.k, ffi::row_bytes(slot.k) * n),
                ffi::tensor_get_bytes(slot.v, ffi::row_bytes(slot.v) * n),
            ));
        }
        Ok(SeqSnapshot {
            path,
            n_tokens: n,
            rows,
        })
    }

    /// Starts a new sequence from the first `n` tokens of a snapshot (1 <= n <= its tokens):
    /// the session then holds those tokens along the snapshot's path, ready for
    /// [`Session::append`]. The snapshot must come from a session of the same model.
    pub fn restore(&mut self, snap: &SeqSnapshot, n: usize) -> Result<()> {
        self.reset();
        if n == 0 || n > snap.n_tokens {
            return Err(EngineError::State(format!(
                "cannot restore {n} of a snapshot's {} tokens",
                snap.n_tokens
            )));
        }
        if n > self.opts.n_ctx {
            return Err(EngineError::ContextFull {
                needed: n,
                n_ctx: self.opts.n_ctx,
            });
        }
        let path = &snap.path;
        if path.n_layer() != self.model.cfg.n_layer || snap.rows.len() != path.len() {
            return Err(EngineError::State(
                "the snapshot is of another model".into(),
            ));
        }
        self.kv.fit(path)?;
        for (p, (k, v)) in path.passes().iter().zip(&snap.rows) {
            let slot = self.kv.slot(p.block, p.pass)?;
            let (kr, vr) = (ffi::row_bytes(slot.k), ffi::row_bytes(slot.v));
            if k.len() != kr * snap.n_tokens || v.len() != vr * snap.n_tokens {
                return Err(EngineError::State(
                    "the snapshot is of another model".into(),
                ));
            }
            ffi::tensor_set_bytes(slot.k, &k[..kr * n]);
            ffi::tensor_set_bytes(slot.v, &v[..vr * n]);
        }
        self.path = Some(path.clone());
        self.n_past = n;
        Ok(())
    }

    /// Forgets the tokens after the first `n` (e.g. one answer option scored after a shared
    /// question); the path stays. Later tokens overwrite the dropped cells.
    pub fn truncate(&mut self, n: usize) -> Result<()> {
        if n > self.n_past || n == 0 {
            return Err(EngineError::State(format!(
                "cannot keep {n} of {} tokens",
                self.n_past
            )));
        }
        self.n_past = n;
        Ok(())
    }

    fn alloc(&mut self, b: &GraphBuilder<'_>) -> Result<()> {
        // ggml's allocator reuses its previous plan for any graph with the same node and leaf
        // counts, matching tensors by position; graphs of the same size but another structure
        // (e.g. a repeat at another place in the path) would then get a wrong plan. Plan afresh
        // whenever the structure changes.
        let replan = b.shape == 0 || self.last_shape != b.shape;
        // SAFETY: live scheduler and graph.
        unsafe {
            if replan && !sys::ggml_backend_sched_reserve(self.sched.ptr(), b.gf) {
                return Err(EngineError::Ggml(
                    "could not plan the compute graph (out of memory?)".into(),
                ));
            }
            sys::ggml_backend_sched_reset(self.sched.ptr());
            if !sys::ggml_backend_sched_alloc_graph(self.sched.ptr(), b.gf) {
                return Err(EngineError::Ggml(
                    "could not allocate the compute graph (out of memory?)".into(),
                ));
            }
        }
        self.last_shape = b.shape;
        self.alloc_gen += 1;
        Ok(())
    }

    /// Allocates a graph, sets its inputs and runs it.
    fn compute(
        &mut self,
        b: &GraphBuilder<'_>,
        set_inputs: impl FnOnce(&mut Scratch) -> Result<()>,
    ) -> Result<()> {
        self.alloc(b)?;
        set_inputs(&mut self.scratch)?;
        // SAFETY: graph allocated just above.
        let st = unsafe { sys::ggml_backend_sched_graph_compute(self.sched.ptr(), b.gf) };
        if st != sys::GGML_STATUS_SUCCESS {
            return Err(EngineError::Ggml(format!(
                "graph compute failed (status {st})"
            )));
        }
        Ok(())
    }
}
