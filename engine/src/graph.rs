//! Per-pass compute graphs, op for op as llama.cpp builds them (`src/models/<arch>.cpp` and
//! `src/llama-graph.cpp`), but for one block pass at a time so a request can take any path
//! through the blocks. A block pass is built in llama.cpp's steps, each its own method: input
//! norm, Q/K/V, Q/K norms and RoPE, attention, its output and residual, FFN input norm, the
//! FFN (dense or experts), its residual. The CPU backend fuses ops by their order in the
//! graph, so the steps keep llama.cpp's order exactly.

use crate::arch::{Ffn, QkNorm};
use crate::error::{EngineError, Result};
use crate::ffi::{self, GgmlCtx, Tensor};
use crate::kv::KvSlot;
use crate::model::{BlockWeights, FfnWeights, Model};
use crate::path::Pass;
use llama_cpp_sys_2 as sys;

/// KV cells are padded to this many so graphs stay the same across steps (llama.cpp does the
/// same; it also selects the same kernels).
pub(crate) const KV_PAD: usize = 256;

/// Nodes one block pass adds to a graph (generous upper bound).
pub(crate) const NODES_PER_PASS: usize = 64;

/// The graph inputs shared by all passes of one graph.
pub(crate) struct AttnInputs {
    pub pos: Tensor,
    pub kv_idxs: Tensor,
    pub mask: Tensor,
    pub mask_swa: Option<Tensor>,
    pub n_kv: usize,
}

/// A graph under construction.
pub(crate) struct GraphBuilder<'m> {
    pub ctx: GgmlCtx,
    pub gf: *mut sys::ggml_cgraph,
    pub m: &'m Model,
    pub n_tokens: usize,
    /// Structural key: graphs with the same non-zero key have the same nodes and leafs in the
    /// same order (only weights and KV slots differ), so the scheduler may reuse the previous
    /// allocation plan. 0: unknown, always plan afresh.
    pub shape: u64,
}

impl<'m> GraphBuilder<'m> {
    pub(crate) fn new(m: &'m Model, n_passes: usize, n_tokens: usize) -> Result<Self> {
        let size = graph_size(&m.cfg, n_passes);
        let ctx = GgmlCtx::new(size, size)?;
        // SAFETY: the context has room for one graph of this size.
        let gf = unsafe { sys::ggml_new_graph_custom(ctx.ptr(), size, false) };
        if gf.is_null() {
            return Err(EngineError::Ggml("ggml_new_graph_custom failed".into()));
        }
        Ok(GraphBuilder {
            ctx,
            gf,
            m,
            n_tokens,
            shape: 0,
        })
    }

    /// Sets the structural key from anything hashable describing the graph's structure.
    pub(crate) fn set_shape(&mut self, key: impl std::hash::Hash) {
        use std::hash::Hasher;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        self.shape = h.finish() | 1;
    }

    fn c(&self) -> *mut sys::ggml_context {
        self.ctx.ptr()
    }

    pub(crate) fn expand(&self, t: Tensor) {
        // SAFETY: t belongs to this graph's context (or is a weight/view of a live tensor).
        unsafe { sys::ggml_build_forward_expand(self.gf, t) }
    }

    pub(crate) fn input(&self, t: Tensor, name: &str) -> Tensor {
        ffi::set_name(t, name);
        // SAFETY: live tensor.
        unsafe { sys::ggml_set_input(t) };
        t
    }

    /// Token ids input `[n_tokens]`.
    pub(crate) fn tokens_input(&self) -> Tensor {
        // SAFETY: new tensor in our context.
        let t =
            unsafe { sys::ggml_new_tensor_1d(self.c(), sys::GGML_TYPE_I32, self.n_tokens as i64) };
        self.input(t, "inp_tokens")
    }

    /// Row selection input `[n_out]`.
    pub(crate) fn out_ids_input(&self, n_out: usize) -> Tensor {
        // SAFETY: new tensor in our context.
        let t = unsafe { sys::ggml_new_tensor_1d(self.c(), sys::GGML_TYPE_I32, n_out as i64) };
        self.input(t, "inp_out_ids")
    }

    /// Positions, KV cell indices and masks for `n_kv` visible cells.
    pub(crate) fn attn_inputs(&self, n_kv: usize, with_swa: bool) -> AttnInputs {
        self.attn_inputs_n(n_kv, with_swa, self.n_tokens)
    }

    /// [`Self::attn_inputs`] for `n_tokens` of the graph's tokens (one sequence of a batch).
    pub(crate) fn attn_inputs_n(&self, n_kv: usize, with_swa: bool, n_tokens: usize) -> AttnInputs {
        let c = self.c();
        let n = n_tokens as i64;
        // SAFETY: new tensors in our context.
        unsafe {
            let pos = self.input(sys::ggml_new_tensor_1d(c, sys::GGML_TYPE_I32, n), "inp_pos");
            let kv_idxs = self.input(
                sys::ggml_new_tensor_1d(c, sys::GGML_TYPE_I64, n),
                "attn_inp_kv_idxs",
            );
            let mask = self.input(
                sys::ggml_new_tensor_4d(c, sys::GGML_TYPE_F16, n_kv as i64, n, 1, 1),
                "attn_inp_kq_mask",
            );
            let mask_swa = with_swa.then(|| {
                self.input(
                    sys::ggml_new_tensor_4d(c, sys::GGML_TYPE_F16, n_kv as i64, n, 1, 1),
                    "attn_inp_kq_mask_swa",
                )
            });
            AttnInputs {
                pos,
                kv_idxs,
                mask,
                mask_swa,
                n_kv,
            }
        }
    }

    fn rms_norm(&self, x: Tensor, w: Tensor) -> Tensor {
        // SAFETY: ops on live tensors.
        unsafe {
            let cur = sys::ggml_rms_norm(self.c(), x, self.m.cfg.rms_eps);
            sys::ggml_mul(self.c(), cur, w)
        }
    }

    /// Token embeddings as block 0 sees them (`[n_embd, n_tokens]`).
    pub(crate) fn embed(&self, tokens: Tensor) -> Tensor {
        // SAFETY: ops on live tensors.
        unsafe {
            let mut cur = sys::ggml_get_rows(self.c(), self.m.tok_embd, tokens);
            if let Some(s) = self.m.cfg.embd_scale {
                cur = sys::ggml_scale(self.c(), cur, s);
            }
            ffi::set_name(cur, "inp_embd");
            self.expand(cur);
            cur
        }
    }

    /// One pass of one block on `x` (`[n_embd, n_tokens]`). With `prune`, only the selected rows
    /// go through the feed-forward part and come out (llama.cpp does this in its last block).
    pub(crate) fn block(
        &self,
        x: Tensor,
        pass: Pass,
        slot: KvSlot,
        inp: &AttnInputs,
        prune: Option<Tensor>,
    ) -> Tensor {
        self.block_impl(x, pass, inp.pos, &[(slot, inp)], prune)
    }

    /// One pass of one block over the tokens of several sequences at once (one token each,
    /// column i belongs to `groups[i]`): every matmul runs over all columns, attention runs per
    /// sequence against its own KV slot and mask. `pos` holds each column's position.
    pub(crate) fn block_grouped(
        &self,
        x: Tensor,
        pass: Pass,
        pos: Tensor,
        groups: &[(KvSlot, &AttnInputs)],
    ) -> Tensor {
        self.block_impl(x, pass, pos, groups, None)
    }

    /// One block pass, llama.cpp's ops in llama.cpp's order: input norm, Q/K/V, attention, its
    /// output and residual, FFN input norm, FFN (dense or experts), its residual.
    fn block_impl(
        &self,
        x: Tensor,
        pass: Pass,
        pos: Tensor,
        groups: &[(KvSlot, &AttnInputs)],
        prune: Option<Tensor>,
    ) -> Tensor {
        let w = &self.m.blocks[pass.block];
        let il = pass.block;
        let swa = self.m.cfg.is_swa[il];
        let cur = match w.attn_norm {
            Some(nw) => self.rms_norm(x, nw),
            None => x,
        };
        let (q, k, v) = self.qkv(cur, w);
        let (q, k) = self.rope_qk(q, k, w, il, swa, pos);
        // same order as llama.cpp so the scheduler makes the same splits
        self.expand(q);
        self.expand(v);
        self.expand(k);
        let cur = self.attention(q, k, v, groups, swa, x);
        let ffn_inp = self.attn_output(cur, x, w, prune);
        let cur = match w.ffn_norm {
            Some(nw) => self.rms_norm(ffn_inp, nw),
            None => ffn_inp,
        };
        let cur = match &w.ffn {
            FfnWeights::Dense {
                gate,
                up,
                down,
                gate_b,
                up_b,
                down_b,
            } => self.dense_ffn(cur, *gate, *up, *down, [*gate_b, *up_b, *down_b]),
            FfnWeights::Experts {
                gate_inp,
                gate,
                up,
                down,
            } => self.experts(cur, *gate_inp, *gate, *up, *down),
        };
        let cur = self.post_norm_and_scale(cur, w.ffn_post_norm);
        // SAFETY: ops on live tensors of this graph.
        let out = unsafe { sys::ggml_add(self.c(), cur, ffn_inp) };
        ffi::set_name(out, &format!("l_out-{il}.{}", pass.pass));
        out
    }

    /// Q, K and V of the normed input `cur` as `[head_dim, heads, n]`: views of one fused
    /// product or three products (with their biases), Q/K norms over the whole projections
    /// (olmo2) before they are split into heads.
    fn qkv(&self, cur: Tensor, w: &BlockWeights) -> (Tensor, Tensor, Tensor) {
        let cfg = &self.m.cfg;
        let c = self.c();
        let n = self.n_tokens as i64;
        let hd = cfg.head_dim_k as i64;
        let full_norm = cfg.arch.qk_norm == QkNorm::Full;
        let (n_q, n_k) = (hd * cfg.n_head as i64, hd * cfg.n_head_kv as i64);
        let hdv = cfg.head_dim_v as i64;
        // SAFETY: ops on live tensors of this graph and the model, shapes checked at load.
        unsafe {
            let (mut q, mut k, mut v, reshaped) = match (w.wqkv, w.wq, w.wk, w.wv) {
                (Some(wqkv), _, _, _) => {
                    // llama.cpp's build_qkv on a fused matrix: views of one product
                    let mut qkv = sys::ggml_mul_mat(c, wqkv, cur);
                    if let Some(b) = w.bqkv {
                        qkv = sys::ggml_add(c, qkv, b);
                    }
                    let es = |n: i64| sys::ggml_row_size((*qkv).type_, n);
                    let nb1 = (*qkv).nb[1];
                    if full_norm {
                        let view = |rows: i64, off: i64| {
                            sys::ggml_cont(c, sys::ggml_view_2d(c, qkv, rows, n, nb1, es(off)))
                        };
                        (view(n_q, 0), view(n_k, n_q), view(n_k, n_q + n_k), false)
                    } else {
                        let view = |dim: i64, heads: i64, off: i64| {
                            sys::ggml_view_3d(c, qkv, dim, heads, n, es(dim), nb1, es(off))
                        };
                        (
                            view(hd, cfg.n_head as i64, 0),
                            view(hd, cfg.n_head_kv as i64, n_q),
                            view(hdv, cfg.n_head_kv as i64, n_q + n_k),
                            true,
                        )
                    }
                }
                (None, Some(wq), Some(wk), Some(wv)) => {
                    let proj = |wt: Tensor, b: Option<Tensor>| {
                        let t = sys::ggml_mul_mat(c, wt, cur);
                        b.map_or(t, |b| sys::ggml_add(c, t, b))
                    };
                    (proj(wq, w.bq), proj(wk, w.bk), proj(wv, w.bv), false)
                }
                _ => unreachable!("the loader requires attn_qkv or attn_q/k/v"),
            };
            if full_norm {
                if let (Some(qn), Some(kn)) = (w.q_norm, w.k_norm) {
                    q = self.rms_norm(q, qn);
                    k = self.rms_norm(k, kn);
                }
            }
            if !reshaped {
                q = sys::ggml_reshape_3d(c, q, hd, cfg.n_head as i64, n);
                k = sys::ggml_reshape_3d(c, k, hd, cfg.n_head_kv as i64, n);
                v = sys::ggml_reshape_3d(c, v, hdv, cfg.n_head_kv as i64, n);
            }
            (q, k, v)
        }
    }

    /// Per-head Q/K norms and RoPE (the sliding-window base in sliding blocks), then Q's scale
    /// for families that scale Q instead of KQ.
    fn rope_qk(
        &self,
        mut q: Tensor,
        mut k: Tensor,
        w: &BlockWeights,
        il: usize,
        swa: bool,
        pos: Tensor,
    ) -> (Tensor, Tensor) {
        let m = self.m;
        let cfg = &m.cfg;
        let c = self.c();
        let r = &cfg.rope;
        let (freq_base, freq_scale) = if swa {
            (r.freq_base_swa, r.freq_scale_swa)
        } else {
            (r.freq_base, r.freq_scale)
        };
        let rope_factors = if cfg.arch.rope_freqs {
            m.rope_freqs.unwrap_or(std::ptr::null_mut())
        } else {
            std::ptr::null_mut()
        };
        // SAFETY: ops on live tensors of this graph and the model, shapes checked at load.
        unsafe {
            let rope = |t: Tensor| {
                sys::ggml_rope_ext(
                    c,
                    t,
                    pos,
                    rope_factors,
                    r.n_rot as i32,
                    r.mode,
                    r.n_ctx_orig as i32,
                    freq_base,
                    freq_scale,
                    r.ext_factor,
                    r.attn_factor,
                    r.beta_fast,
                    r.beta_slow,
                )
            };
            let per_head = cfg.arch.qk_norm == QkNorm::PerHead;
            if let (Some(qn), true) = (w.q_norm, per_head) {
                q = self.rms_norm(q, qn);
            }
            if cfg.use_rope {
                q = rope(q);
            }
            if let (Some(kn), true) = (w.k_norm, per_head) {
                k = self.rms_norm(k, kn);
            }
            if cfg.use_rope {
                k = rope(k);
            }
            ffi::set_name(q, &format!("Qcur-{il}"));
            ffi::set_name(k, &format!("Kcur-{il}"));
            if let Some(s) = cfg.q_scale {
                q = sys::ggml_scale(c, q, s);
            }
            (q, k)
        }
    }

    /// Attention of one sequence (exactly llama.cpp's ops), or of each group's column against
    /// its own KV slot, the outputs concatenated.
    fn attention(
        &self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        groups: &[(KvSlot, &AttnInputs)],
        swa: bool,
        x: Tensor,
    ) -> Tensor {
        if let [(slot, inp)] = groups {
            // one sequence: exactly llama.cpp's ops
            return self.attend(q, k, v, *slot, inp, swa);
        }
        let c = self.c();
        let mut out: Option<Tensor> = None;
        // SAFETY: views of live tensors of this graph (column i exists for group i).
        unsafe {
            for (i, (slot, inp)) in groups.iter().enumerate() {
                let col = |t: Tensor| {
                    sys::ggml_view_3d(
                        c,
                        t,
                        (*t).ne[0],
                        (*t).ne[1],
                        1,
                        (*t).nb[1],
                        (*t).nb[2],
                        i * (*t).nb[2],
                    )
                };
                let o = self.attend(col(q), col(k), col(v), *slot, inp, swa);
                out = Some(match out {
                    None => o,
                    Some(prev) => sys::ggml_concat(c, prev, o, 1),
                });
            }
        }
        out.unwrap_or(x)
    }

    /// The attention output projection and the residual add (only the `prune`d rows of both
    /// when given): the FFN's input.
    fn attn_output(
        &self,
        cur: Tensor,
        x: Tensor,
        w: &BlockWeights,
        prune: Option<Tensor>,
    ) -> Tensor {
        let c = self.c();
        // SAFETY: ops on live tensors of this graph and the model.
        unsafe {
            let mut cur = sys::ggml_mul_mat(c, w.wo, cur);
            if let Some(b) = w.bo {
                cur = sys::ggml_add(c, cur, b);
            }
            let mut res = x;
            if let Some(ids) = prune {
                cur = sys::ggml_get_rows(c, cur, ids);
                res = sys::ggml_get_rows(c, res, ids);
            }
            let cur = self.post_norm_and_scale(cur, w.attn_post_norm);
            sys::ggml_add(c, cur, res)
        }
    }

    /// The norm after attention or FFN (gemma, olmo2) and the residual multiplier (granite),
    /// before the residual add.
    fn post_norm_and_scale(&self, mut cur: Tensor, post_norm: Option<Tensor>) -> Tensor {
        if let Some(pn) = post_norm {
            cur = self.rms_norm(cur, pn);
        }
        if let Some(s) = self.m.cfg.residual_scale {
            // SAFETY: an op on a live tensor of this graph.
            cur = unsafe { sys::ggml_scale(self.c(), cur, s) };
        }
        cur
    }

    /// A dense gated FFN: up, gate (or both from one fused matrix), activation, down; `biases`
    /// of gate, up and down where the file has them.
    fn dense_ffn(
        &self,
        cur: Tensor,
        gate: Option<Tensor>,
        up: Tensor,
        down: Tensor,
        biases: [Option<Tensor>; 3],
    ) -> Tensor {
        let c = self.c();
        let [gate_b, up_b, down_b] = biases;
        // SAFETY: ops on live tensors of this graph and the model, shapes checked at load.
        unsafe {
            let bias = |t: Tensor, b: Option<Tensor>| match b {
                Some(b) => sys::ggml_add(c, t, b),
                None => t,
            };
            let up = bias(sys::ggml_mul_mat(c, up, cur), up_b);
            let gated = match (self.m.cfg.arch.ffn, gate) {
                (Ffn::SwiGluFused, _) | (_, None) => sys::ggml_swiglu(c, up),
                (Ffn::GeGlu, Some(g)) => {
                    let g = bias(sys::ggml_mul_mat(c, g, cur), gate_b);
                    sys::ggml_geglu_split(c, g, up)
                }
                (Ffn::SwiGlu, Some(g)) => {
                    let g = bias(sys::ggml_mul_mat(c, g, cur), gate_b);
                    sys::ggml_swiglu_split(c, g, up)
                }
            };
            bias(sys::ggml_mul_mat(c, down, gated), down_b)
        }
    }

    /// llama.cpp's `build_moe_ffn` as qwen3moe calls it: softmax router, the top
    /// `n_expert_used` experts per token, their weights renormalised to sum to one, SwiGLU
    /// experts, outputs weighted and summed.
    fn experts(
        &self,
        x: Tensor,
        gate_inp: Tensor,
        gate: Tensor,
        up: Tensor,
        down: Tensor,
    ) -> Tensor {
        let c = self.c();
        let used = self.m.cfg.moe.map_or(1, |m| m.n_expert_used) as i64;
        // SAFETY: ops on live tensors of this graph and the model, shapes checked at load.
        unsafe {
            let (n_embd, n) = ((*x).ne[0], (*x).ne[1]);
            let n_expert = (*gate_inp).ne[1];
            let logits = sys::ggml_mul_mat(c, gate_inp, x);
            let probs = sys::ggml_soft_max(c, logits);
            let selected = sys::ggml_argsort_top_k(c, probs, used as i32);
            let probs = sys::ggml_reshape_3d(c, probs, 1, n_expert, n);
            let mut weights = sys::ggml_get_rows(c, probs, selected);
            weights = sys::ggml_reshape_2d(c, weights, used, n);
            let sum = sys::ggml_sum_rows(c, weights);
            // llama.cpp clamps the sum to the smallest normal F16
            let sum = sys::ggml_clamp(c, sum, 6.103_515_6e-5, f32::INFINITY);
            weights = sys::ggml_div(c, weights, sum);
            weights = sys::ggml_reshape_3d(c, weights, 1, used, n);
            self.expand(weights);

            let cur = sys::ggml_reshape_3d(c, x, n_embd, 1, n);
            let u = sys::ggml_mul_mat_id(c, up, cur, selected);
            let g = sys::ggml_mul_mat_id(c, gate, cur, selected);
            let act = sys::ggml_swiglu_split(c, g, u);
            let mut experts = sys::ggml_mul_mat_id(c, down, act, selected);
            experts = sys::ggml_mul(c, experts, weights);
            self.expand(experts);
            let view = |i: i64| {
                sys::ggml_view_2d(
                    c,
                    experts,
                    n_embd,
                    n,
                    (*experts).nb[2],
                    i as usize * (*experts).nb[1],
                )
            };
            let views: Vec<Tensor> = (0..used).map(view).collect();
            for &v in &views {
                self.expand(v);
            }
            let mut out = views[0];
            for &v in &views[1..] {
                out = sys::ggml_add(c, out, v);
                self.expand(out);
            }
            if used == 1 {
                out = sys::ggml_cont(c, out);
            }
            out
        }
    }

    /// Attention of the tokens `q`/`k`/`v` (`[head_dim, heads, n]`) of one sequence: their K/V
    /// rows go to `slot` at `inp.kv_idxs`, and they attend to the cells `inp`'s mask allows.
    fn attend(
        &self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        slot: KvSlot,
        inp: &AttnInputs,
        swa: bool,
    ) -> Tensor {
        let cfg = &self.m.cfg;
        let c = self.c();
        let hd = cfg.head_dim_k as i64;
        // SAFETY: ops on live tensors of this graph and the KV cache.
        unsafe {
            let n = (*k).ne[2];
            let mut cur;
            let n_embd_k = cfg.n_embd_k_gqa() as i64;
            let n_embd_v = cfg.n_embd_v_gqa() as i64;
            let k2 = sys::ggml_view_2d(c, k, n_embd_k, n, (*k).nb[2], 0);
            self.expand(sys::ggml_set_rows(c, slot.k, k2, inp.kv_idxs));
            let v2 = sys::ggml_view_2d(c, v, n_embd_v, n, (*v).nb[2], 0);
            self.expand(sys::ggml_set_rows(c, slot.v, v2, inp.kv_idxs));

            let kv_size = (*slot.k).ne[1];
            let row = |t: Tensor, ne: i64| sys::ggml_row_size((*t).type_, ne);
            let kview = sys::ggml_view_4d(
                c,
                slot.k,
                hd,
                cfg.n_head_kv as i64,
                inp.n_kv as i64,
                1,
                row(slot.k, hd),
                row(slot.k, n_embd_k),
                row(slot.k, n_embd_k * kv_size),
                0,
            );
            let hdv = cfg.head_dim_v as i64;
            let vview = sys::ggml_view_4d(
                c,
                slot.v,
                hdv,
                cfg.n_head_kv as i64,
                inp.n_kv as i64,
                1,
                row(slot.v, hdv),
                row(slot.v, n_embd_v),
                row(slot.v, n_embd_v * kv_size),
                0,
            );
            let qp = sys::ggml_permute(c, q, 0, 2, 1, 3);
            let kp = sys::ggml_permute(c, kview, 0, 2, 1, 3);
            let vp = sys::ggml_permute(c, vview, 0, 2, 1, 3);
            let mask = if swa {
                inp.mask_swa.unwrap_or(inp.mask)
            } else {
                inp.mask
            };
            cur =
                sys::ggml_flash_attn_ext(c, qp, kp, vp, mask, cfg.kq_scale, 0.0, cfg.attn_softcap);
            sys::ggml_flash_attn_ext_set_n_kv_max(cur, 0);
            sys::ggml_prec_set_acc(cur, sys::GGML_PREC_F32);
            cur = sys::ggml_reshape_2d(
                c,
                cur,
                (*cur).ne[0] * (*cur).ne[1],
                (*cur).ne[2] * (*cur).ne[3],
            );
            self.expand(cur);

            cur
        }
    }

    /// Final norm and LM head: logits `[n_vocab, rows]`.
    /// What a prefill returns for the rows `x`: the logits ([`GraphBuilder::head`]), or with
    /// `embeddings` the hidden states after the final norm (llama.cpp's `result_norm`, the
    /// `t_embd` its embeddings pool).
    pub(crate) fn output(&self, x: Tensor, embeddings: bool) -> Tensor {
        if !embeddings {
            return self.head(x);
        }
        let cur = self.rms_norm(x, self.m.output_norm);
        ffi::set_name(cur, "result_norm");
        // SAFETY: marking a live tensor.
        unsafe { sys::ggml_set_output(cur) };
        self.expand(cur);
        cur
    }

    pub(crate) fn head(&self, x: Tensor) -> Tensor {
        let m = self.m;
        let c = self.c();
        // SAFETY: ops on live tensors.
        unsafe {
            let cur = self.rms_norm(x, m.output_norm);
            let mut cur = sys::ggml_mul_mat(c, m.output, cur);
            if let Some(s) = m.cfg.logit_scale {
                cur = sys::ggml_scale(c, cur, s);
            }
            let cap = m.cfg.final_logit_softcap;
            if cap != 0.0 {
                cur = sys::ggml_scale(c, cur, 1.0 / cap);
                cur = sys::ggml_tanh(c, cur);
                cur = sys::ggml_scale(c, cur, cap);
            }
            ffi::set_name(cur, "result_output");
            sys::ggml_set_output(cur);
            self.expand(cur);
            cur
        }
    }

    /// A view of `n` columns of a persistent `[n_embd, N]` tensor starting at column `start`.
    pub(crate) fn columns(&self, t: Tensor, start: usize, n: usize) -> Tensor {
        // SAFETY: the caller keeps start + n within the tensor.
        unsafe {
            let nb1 = (*t).nb[1];
            sys::ggml_view_2d(self.c(), t, (*t).ne[0], n as i64, nb1, nb1 * start)
        }
    }

    /// Copies `src` into `dst` at the end of the graph.
    pub(crate) fn store(&self, src: Tensor, dst: Tensor) {
        // SAFETY: same shapes, dst is a view of a persistent tensor.
        unsafe {
            let t = sys::ggml_cpy(self.c(), src, dst);
            self.expand(t);
        }
    }
}

/// Graph size for a graph running `n_passes` block passes plus embedding and head.
pub(crate) fn graph_size(cfg: &crate::config::ModelConfig, n_passes: usize) -> usize {
    // a mixture-of-experts FFN adds its routing ops and one view and add per expert used
    let per_pass = NODES_PER_PASS + cfg.moe.map_or(0, |m| 24 + 2 * m.n_expert_used);
    per_pass * (n_passes + 2) + 256
}

/// Visible KV cells for a batch ending at position `end` (exclusive).
pub(crate) fn n_kv_for(end: usize, n_ctx: usize) -> usize {
    let padded = end.div_ceil(KV_PAD).max(1) * KV_PAD;
    padded.min(n_ctx)
}

/// Fills the attention inputs for tokens at positions `pos0 .. pos0 + n` of one sequence whose
/// token at position p is stored in cell p.
pub(crate) fn set_attn_inputs(
    inp: &AttnInputs,
    pos0: usize,
    n: usize,
    n_swa: usize,
    scratch: &mut Scratch,
) {
    scratch.pos.clear();
    scratch.pos.extend((pos0..pos0 + n).map(|p| p as i32));
    scratch.idx.clear();
    scratch.idx.extend((pos0..pos0 + n).map(|p| p as i64));
    set_if_allocated(inp.pos, &scratch.pos);
    set_if_allocated(inp.kv_idxs, &scratch.idx);
    const ZERO: u16 = 0x0000; // f16 0.0
    const NEG_INF: u16 = 0xFC00; // f16 -inf
    let n_kv = inp.n_kv;
    let fill = |buf: &mut Vec<u16>, window: Option<usize>| {
        buf.clear();
        buf.resize(n_kv * n, NEG_INF);
        for i in 0..n {
            let p = pos0 + i;
            let lo = match window {
                Some(w) if w > 0 => (p + 1).saturating_sub(w),
                _ => 0,
            };
            let row = &mut buf[i * n_kv..(i + 1) * n_kv];
            for cell in row.iter_mut().take((p + 1).min(n_kv)).skip(lo) {
                *cell = ZERO;
            }
        }
    };
    if is_allocated(inp.mask) {
        fill(&mut scratch.mask, None);
        ffi::tensor_set(inp.mask, &scratch.mask);
    }
    if let Some(ms) = inp.mask_swa {
        if is_allocated(ms) {
            fill(&mut scratch.mask, Some(n_swa));
            ffi::tensor_set(ms, &scratch.mask);
        }
    }
}

/// Reusable host buffers for graph inputs.
#[derive(Default)]
pub(crate) struct Scratch {
    pub pos: Vec<i32>,
    pub idx: Vec<i64>,
    pub mask: Vec<u16>,
    pub ids: Vec<i32>,
}

pub(crate) fn is_allocated(t: Tensor) -> bool {
    // SAFETY: reading a field of a live tensor. An input the graph never uses has no buffer.
    unsafe { !(*t).buffer.is_null() }
}

pub(crate) fn set_if_allocated<T: Copy>(t: Tensor, data: &[T]) {
    if is_allocated(t) {
        ffi::tensor_set(t, data);
    }
}
