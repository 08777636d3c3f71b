//! Tiny random models that stock llama.cpp loads and runs.

use std::path::Path;

use drllm_engine::Family;
use drllm_gguf::{GgmlType, GgufWriter, TensorSource, Value, ValueType};

use crate::quant::{quantize_q4_0, quantize_q8_0, to_f16_bytes, to_f32_bytes};
use crate::rng::Rng;
use crate::vocab::{tiny_vocab, BOS_ID, CHATML_TEMPLATE, EOS_ID, UNK_ID};
use crate::TestkitError;

/// Shape and options of a tiny model.
#[derive(Clone, Debug, PartialEq)]
pub struct TinySpec {
    /// Architecture.
    pub family: Family,
    /// Number of transformer blocks.
    pub n_layer: u32,
    /// Hidden size.
    pub n_embd: u32,
    /// Number of query heads.
    pub n_head: u32,
    /// Number of key/value heads (GQA); must divide `n_head`.
    pub n_head_kv: u32,
    /// Per-head dimension (written as `key_length`/`value_length`).
    pub head_dim: u32,
    /// FFN hidden size.
    pub n_ff: u32,
    /// Type of the 2-D matrices: F32, F16, Q8_0 or Q4_0 (norms and biases are always F32).
    pub weight_type: GgmlType,
    /// No `output.weight`: the output projection reuses `token_embd.weight`.
    pub tied_embeddings: bool,
    /// Seed for all weights.
    pub seed: u64,
    /// Sliding window (gemma3 only; 0 disables SWA).
    pub sliding_window: u32,
    /// Add `<|im_start|>`/`<|im_end|>` and a ChatML `tokenizer.chat_template`.
    pub with_chat_template: bool,
    /// Experts per block, experts used per token and one expert's FFN size (qwen3moe only).
    pub experts: Option<TinyExperts>,
    /// Granite: `rope.scaling.finetuned` (false turns RoPE off).
    pub rope: bool,
    /// `tokenizer.ggml.add_space_prefix` when set (llama.cpp's SentencePiece tokenizer then
    /// puts no space before a prompt's first word, nor after a special token); unset: not
    /// written (llama.cpp's default, true).
    pub add_space_prefix: Option<bool>,
}

/// The mixture-of-experts FFN of a tiny model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TinyExperts {
    /// `expert_count`.
    pub n_expert: u32,
    /// `expert_used_count`.
    pub n_used: u32,
    /// `expert_feed_forward_length`.
    pub n_ff: u32,
}

/// Context length written to every tiny model.
pub const TINY_CONTEXT_LENGTH: u32 = 512;
/// Gemma2's sliding-window period in llama.cpp (every other layer is global).
pub const GEMMA2_SWA_PERIOD: u32 = 2;
/// Soft-capping of the tiny gemma2's attention and final logits (small, so that tanh bends the
/// tiny model's logits; the real models use 50 and 30).
pub const GEMMA2_TINY_SOFTCAPS: (f32, f32) = (5.0, 10.0);
/// Granite's multipliers in the tiny model: (embedding, residual, attention, logit). Not 1, so
/// each one changes the logits.
pub const GRANITE_TINY_SCALES: (f32, f32, f32, f32) = (4.0, 0.5, 0.2, 3.0);
/// Gemma3's default sliding-window period in llama.cpp (every 6th layer is global).
pub const GEMMA3_SWA_PERIOD: u32 = 6;

impl TinySpec {
    /// Defaults: 6 layers (gemma3: 7, so block 5 is global and block 6 sliding), n_embd 64,
    /// 4 heads, 2 KV heads, head_dim 16 (qwen3: 32, so the q dimension differs from n_embd),
    /// n_ff 128, F16 weights, sliding window 8 (gemma3), tied embeddings except for llama.
    pub fn default_for(family: Family) -> Self {
        TinySpec {
            family,
            n_layer: if family == Family::Gemma3 { 7 } else { 6 },
            n_embd: 64,
            n_head: 4,
            n_head_kv: 2,
            head_dim: if family == Family::Qwen3 { 32 } else { 16 },
            n_ff: 128,
            weight_type: GgmlType::F16,
            tied_embeddings: !matches!(
                family,
                Family::Llama | Family::Olmo2 | Family::Phi3 | Family::Qwen3Moe
            ),
            seed: 0x00d1_11a0 + family as u64,
            sliding_window: if matches!(family, Family::Gemma2 | Family::Gemma3) {
                8
            } else {
                0
            },
            with_chat_template: false,
            experts: (family == Family::Qwen3Moe).then_some(TinyExperts {
                n_expert: 4,
                n_used: 2,
                n_ff: 64,
            }),
            rope: true,
            add_space_prefix: None,
        }
    }

    /// Number of tokens in the vocabulary.
    pub fn n_vocab(&self) -> u32 {
        tiny_vocab(self.with_chat_template).len() as u32
    }

    /// Whether block `il` uses sliding-window attention in llama.cpp.
    pub fn is_swa_layer(&self, il: u32) -> bool {
        match self.family {
            Family::Gemma3 => {
                self.sliding_window > 0 && il % GEMMA3_SWA_PERIOD < GEMMA3_SWA_PERIOD - 1
            }
            // llama.cpp: period 2, and a window of 4096 when the file gives none
            Family::Gemma2 => il % GEMMA2_SWA_PERIOD < GEMMA2_SWA_PERIOD - 1,
            _ => false,
        }
    }

    /// Norms after attention and after the FFN (gemma2, gemma3, olmo2).
    fn has_post_norms(&self) -> bool {
        matches!(self.family, Family::Gemma2 | Family::Gemma3 | Family::Olmo2)
    }

    fn q_dim(&self) -> u32 {
        self.n_head * self.head_dim
    }

    fn kv_dim(&self) -> u32 {
        self.n_head_kv * self.head_dim
    }

    fn validate(&self) -> Result<(), TestkitError> {
        let bad = |m: &str| Err(TestkitError::InvalidSpec(m.to_owned()));
        if self.n_layer == 0 || self.n_layer > 512 {
            return bad("n_layer must be in 1..=512");
        }
        if self.n_embd == 0 || self.n_ff == 0 || self.n_head == 0 || self.n_head_kv == 0 {
            return bad("sizes must be nonzero");
        }
        if !self.n_head.is_multiple_of(self.n_head_kv) {
            return bad("n_head must be a multiple of n_head_kv");
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad("head_dim must be even and nonzero (RoPE)");
        }
        if self.family == Family::Qwen2 && self.q_dim() != self.n_embd {
            return bad("qwen2 requires n_head * head_dim == n_embd");
        }
        if self.family == Family::Olmo2 && (self.tied_embeddings || self.q_dim() != self.n_embd) {
            return bad("olmo2 needs output.weight and n_head * head_dim == n_embd");
        }
        if self.family == Family::Gemma2 && !self.tied_embeddings {
            return bad("gemma2 files have no output.weight (llama.cpp uses the embeddings)");
        }
        if self.experts.is_some() != (self.family == Family::Qwen3Moe) {
            return bad("qwen3moe, and only qwen3moe, has experts");
        }
        if let Some(x) = self.experts {
            if x.n_used == 0 || x.n_used > x.n_expert || x.n_ff == 0 {
                return bad("experts: need 1 <= n_used <= n_expert and n_ff > 0");
            }
            let q = matches!(self.weight_type, GgmlType::Q8_0 | GgmlType::Q4_0);
            if q && !x.n_ff.is_multiple_of(32) {
                return bad("quantised experts need their n_ff divisible by 32");
            }
        }
        if !self.rope && self.family != Family::Granite {
            return bad("only granite files can turn RoPE off");
        }
        let wt = self.weight_type;
        if ![GgmlType::F32, GgmlType::F16, GgmlType::Q8_0, GgmlType::Q4_0].contains(&wt) {
            return bad("weight_type must be F32, F16, Q8_0 or Q4_0");
        }
        if (wt == GgmlType::Q8_0 || wt == GgmlType::Q4_0)
            && (!self.n_embd.is_multiple_of(32)
                || !self.n_ff.is_multiple_of(32)
                || !self.q_dim().is_multiple_of(32))
        {
            return bad("quantised weights need n_embd, n_ff and n_head*head_dim divisible by 32");
        }
        Ok(())
    }
}

struct Builder<'a> {
    spec: &'a TinySpec,
    w: GgufWriter,
}

impl Builder<'_> {
    fn encode(&self, dtype: GgmlType, xs: &[f32]) -> Vec<u8> {
        match dtype {
            GgmlType::F16 => to_f16_bytes(xs),
            GgmlType::Q8_0 => quantize_q8_0(xs),
            GgmlType::Q4_0 => quantize_q4_0(xs),
            _ => to_f32_bytes(xs),
        }
    }

    /// A weight of shape `dims` ~ N(0, std²) stored as `dtype`.
    fn weights(
        &mut self,
        name: &str,
        dims: &[u32],
        std: f32,
        dtype: GgmlType,
    ) -> Result<(), TestkitError> {
        let n = dims.iter().map(|&d| d as usize).product();
        let xs = Rng::for_label(self.spec.seed, name).normals(n, std);
        let bytes = self.encode(dtype, &xs);
        let ne: Vec<u64> = dims.iter().map(|&d| u64::from(d)).collect();
        self.w
            .add_tensor(name, dtype, &ne, TensorSource::Bytes(bytes))?;
        Ok(())
    }

    /// A 2-D weight `{ne0, ne1}` ~ N(0, std²) in the spec's weight type.
    fn matrix(&mut self, name: &str, ne0: u32, ne1: u32, std: f32) -> Result<(), TestkitError> {
        self.weights(name, &[ne0, ne1], std, self.spec.weight_type)
    }

    /// A 1-D F32 vector `mean + std * noise`.
    fn vector(&mut self, name: &str, n: u32, mean: f32, std: f32) -> Result<(), TestkitError> {
        let xs: Vec<f32> = Rng::for_label(self.spec.seed, name)
            .normals(n as usize, std)
            .into_iter()
            .map(|x| x + mean)
            .collect();
        self.w.add_tensor(
            name,
            GgmlType::F32,
            &[u64::from(n)],
            TensorSource::Bytes(to_f32_bytes(&xs)),
        )?;
        Ok(())
    }

    fn norm(&mut self, name: &str, n: u32) -> Result<(), TestkitError> {
        // gemma3 GGUF norms already include the +1, so all families use 1 + noise
        self.vector(name, n, 1.0, 0.1)
    }
}

fn file_type(t: GgmlType) -> u32 {
    // llama_ftype: ALL_F32 = 0, MOSTLY_F16 = 1, MOSTLY_Q4_0 = 2, MOSTLY_Q8_0 = 7
    match t {
        GgmlType::F16 => 1,
        GgmlType::Q4_0 => 2,
        GgmlType::Q8_0 => 7,
        _ => 0,
    }
}

/// Builds the writer for a tiny model (metadata + tensors held in memory): general keys, the
/// architecture's hyperparameters, the family's own keys, the tokenizer, then the tensors
/// (embeddings and head, then block by block).
pub fn tiny_model_writer(spec: &TinySpec) -> Result<GgufWriter, TestkitError> {
    spec.validate()?;
    let mut w = GgufWriter::new();
    general_keys(&mut w, spec);
    hyperparameters(&mut w, spec);
    family_keys(&mut w, spec);
    tokenizer_keys(&mut w, spec);
    let mut b = Builder { spec, w };
    b.global_tensors()?;
    for il in 0..spec.n_layer {
        b.attention_tensors(il)?;
        b.ffn_tensors(il)?;
    }
    Ok(b.w)
}

/// `<arch>.<name>` of the spec's family.
fn arch_key(spec: &TinySpec, name: &str) -> String {
    format!("{}.{name}", spec.family.arch_name())
}

fn general_keys(w: &mut GgufWriter, spec: &TinySpec) {
    let arch = spec.family.arch_name();
    w.set("general.architecture", Value::string(arch));
    // llama.cpp's vocabulary loader looks up "<|endoftext|>" when the name says phi3 (real
    // Phi-3 vocabularies have it; the tiny one does not)
    let name = if spec.family == Family::Phi3 {
        "drllm tiny model".to_string()
    } else {
        format!("drllm tiny {arch}")
    };
    w.set("general.name", Value::string(name));
    w.set("general.file_type", Value::U32(file_type(spec.weight_type)));
    w.set("general.quantization_version", Value::U32(2));
}

/// The generic hyperparameters. llama.cpp reads these with strict types: u32 for integers,
/// f32 for floats.
fn hyperparameters(w: &mut GgufWriter, spec: &TinySpec) {
    let k = |s: &str| arch_key(spec, s);
    w.set(k("context_length"), Value::U32(TINY_CONTEXT_LENGTH));
    w.set(k("embedding_length"), Value::U32(spec.n_embd));
    w.set(k("block_count"), Value::U32(spec.n_layer));
    w.set(k("feed_forward_length"), Value::U32(spec.n_ff));
    w.set(k("attention.head_count"), Value::U32(spec.n_head));
    w.set(k("attention.head_count_kv"), Value::U32(spec.n_head_kv));
    w.set(k("attention.key_length"), Value::U32(spec.head_dim));
    w.set(k("attention.value_length"), Value::U32(spec.head_dim));
    let eps = if spec.family == Family::Llama {
        1e-5
    } else {
        1e-6
    };
    w.set(k("attention.layer_norm_rms_epsilon"), Value::F32(eps));
    let freq_base = match spec.family {
        Family::Llama => 10_000.0,
        _ => 1_000_000.0,
    };
    w.set(k("rope.freq_base"), Value::F32(freq_base));
    if spec.family == Family::Llama {
        w.set(k("rope.dimension_count"), Value::U32(spec.head_dim));
        w.set(k("vocab_size"), Value::U32(spec.n_vocab()));
    }
}

/// What gemma2, gemma3 and granite add (sliding windows, soft-caps, multipliers), and the
/// experts' sizes.
fn family_keys(w: &mut GgufWriter, spec: &TinySpec) {
    let k = |s: &str| arch_key(spec, s);
    if spec.family == Family::Gemma3 && spec.sliding_window > 0 {
        w.set(
            k("attention.sliding_window"),
            Value::U32(spec.sliding_window),
        );
        w.set(k("rope.freq_base_swa"), Value::F32(10_000.0));
    }
    if spec.family == Family::Gemma2 {
        if spec.sliding_window > 0 {
            w.set(
                k("attention.sliding_window"),
                Value::U32(spec.sliding_window),
            );
        }
        let (attn, last) = GEMMA2_TINY_SOFTCAPS;
        w.set(k("attn_logit_softcapping"), Value::F32(attn));
        w.set(k("final_logit_softcapping"), Value::F32(last));
    }
    if spec.family == Family::Granite {
        let (embd, residual, attn, logit) = GRANITE_TINY_SCALES;
        w.set(k("embedding_scale"), Value::F32(embd));
        w.set(k("residual_scale"), Value::F32(residual));
        w.set(k("attention.scale"), Value::F32(attn));
        w.set(k("logit_scale"), Value::F32(logit));
        if !spec.rope {
            w.set(k("rope.scaling.finetuned"), Value::Bool(false));
        }
    }
    if let Some(x) = spec.experts {
        w.set(k("expert_count"), Value::U32(x.n_expert));
        w.set(k("expert_used_count"), Value::U32(x.n_used));
        w.set(k("expert_feed_forward_length"), Value::U32(x.n_ff));
    }
}

/// The tokenizer (SentencePiece / "llama").
fn tokenizer_keys(w: &mut GgufWriter, spec: &TinySpec) {
    let vocab = tiny_vocab(spec.with_chat_template);
    w.set("tokenizer.ggml.model", Value::string("llama"));
    w.set(
        "tokenizer.ggml.tokens",
        Value::string_array(vocab.iter().map(|e| e.text.clone())),
    );
    w.set(
        "tokenizer.ggml.scores",
        Value::array(
            ValueType::F32,
            vocab.iter().map(|e| Value::F32(e.score)).collect(),
        ),
    );
    w.set(
        "tokenizer.ggml.token_type",
        Value::array(
            ValueType::I32,
            vocab.iter().map(|e| Value::I32(e.kind)).collect(),
        ),
    );
    w.set("tokenizer.ggml.bos_token_id", Value::U32(BOS_ID));
    w.set("tokenizer.ggml.eos_token_id", Value::U32(EOS_ID));
    w.set("tokenizer.ggml.unknown_token_id", Value::U32(UNK_ID));
    w.set("tokenizer.ggml.add_bos_token", Value::Bool(true));
    w.set("tokenizer.ggml.add_eos_token", Value::Bool(false));
    if spec.with_chat_template {
        w.set("tokenizer.chat_template", Value::string(CHATML_TEMPLATE));
    }
    if let Some(b) = spec.add_space_prefix {
        w.set("tokenizer.ggml.add_space_prefix", Value::Bool(b));
    }
}

/// 1 / sqrt(fan_in): the std of a matrix that keeps activations' scale.
fn inv(fan_in: u32) -> f32 {
    1.0 / (fan_in as f32).sqrt()
}

impl Builder<'_> {
    /// Token embeddings, output norm and (untied) output matrix.
    fn global_tensors(&mut self) -> Result<(), TestkitError> {
        let spec = self.spec;
        let (e, n_vocab) = (spec.n_embd, spec.n_vocab());
        let emb_std = if spec.tied_embeddings { 0.5 } else { 1.0 };
        self.matrix("token_embd.weight", e, n_vocab, emb_std)?;
        self.norm("output_norm.weight", e)?;
        if !spec.tied_embeddings {
            self.matrix("output.weight", e, n_vocab, 2.0 / (e as f32).sqrt())?;
        }
        Ok(())
    }

    /// Block `il`'s attention input norm, Q/K/V (fused for phi3, biased for qwen2), Q/K norms,
    /// output (biased for granite) and post-attention norm.
    fn attention_tensors(&mut self, il: u32) -> Result<(), TestkitError> {
        let spec = self.spec;
        let (e, q, kv) = (spec.n_embd, spec.q_dim(), spec.kv_dim());
        let t = |s: &str| format!("blk.{il}.{s}");
        let olmo = spec.family == Family::Olmo2;
        if !olmo {
            self.norm(&t("attn_norm.weight"), e)?;
        }
        if spec.family == Family::Phi3 {
            self.matrix(&t("attn_qkv.weight"), e, q + 2 * kv, inv(e))?;
        } else {
            self.matrix(&t("attn_q.weight"), e, q, inv(e))?;
            self.matrix(&t("attn_k.weight"), e, kv, inv(e))?;
            self.matrix(&t("attn_v.weight"), e, kv, inv(e))?;
        }
        if spec.family == Family::Qwen2 {
            self.vector(&t("attn_q.bias"), q, 0.0, 0.1)?;
            self.vector(&t("attn_k.bias"), kv, 0.0, 0.1)?;
            self.vector(&t("attn_v.bias"), kv, 0.0, 0.1)?;
        }
        if matches!(
            spec.family,
            Family::Qwen3 | Family::Gemma3 | Family::Qwen3Moe
        ) {
            self.norm(&t("attn_q_norm.weight"), spec.head_dim)?;
            self.norm(&t("attn_k_norm.weight"), spec.head_dim)?;
        }
        if olmo {
            self.norm(&t("attn_q_norm.weight"), q)?;
            self.norm(&t("attn_k_norm.weight"), kv)?;
        }
        self.matrix(&t("attn_output.weight"), q, e, inv(q))?;
        if spec.family == Family::Granite {
            self.vector(&t("attn_output.bias"), e, 0.0, 0.1)?;
        }
        if spec.has_post_norms() {
            self.norm(&t("post_attention_norm.weight"), e)?;
        }
        Ok(())
    }

    /// Block `il`'s FFN input norm, FFN (experts, fused gate/up for phi3, or gate/up/down),
    /// granite's biases and the post-FFN norm.
    fn ffn_tensors(&mut self, il: u32) -> Result<(), TestkitError> {
        let spec = self.spec;
        let (e, ff) = (spec.n_embd, spec.n_ff);
        let t = |s: &str| format!("blk.{il}.{s}");
        if spec.family != Family::Olmo2 {
            self.norm(&t("ffn_norm.weight"), e)?;
        }
        if let Some(x) = spec.experts {
            self.expert_tensors(il, x)?;
        } else if spec.family == Family::Phi3 {
            self.matrix(&t("ffn_up.weight"), e, 2 * ff, inv(e))?;
        } else {
            self.matrix(&t("ffn_gate.weight"), e, ff, inv(e))?;
            self.matrix(&t("ffn_up.weight"), e, ff, inv(e))?;
        }
        if spec.experts.is_none() {
            self.matrix(&t("ffn_down.weight"), ff, e, inv(ff))?;
        }
        if spec.family == Family::Granite {
            self.vector(&t("ffn_gate.bias"), ff, 0.0, 0.1)?;
            self.vector(&t("ffn_up.bias"), ff, 0.0, 0.1)?;
            self.vector(&t("ffn_down.bias"), e, 0.0, 0.1)?;
        }
        if spec.has_post_norms() {
            self.norm(&t("post_ffw_norm.weight"), e)?;
        }
        Ok(())
    }

    /// Block `il`'s expert router and stacked expert matrices.
    fn expert_tensors(&mut self, il: u32, x: TinyExperts) -> Result<(), TestkitError> {
        let e = self.spec.n_embd;
        let t = |s: &str| format!("blk.{il}.{s}");
        // the router's scale spreads the experts' probabilities, so the top-k is no tie
        // llama.cpp's quantizer keeps the expert router in F32
        let router = [e, x.n_expert];
        self.weights(
            &t("ffn_gate_inp.weight"),
            &router,
            4.0 * inv(e),
            GgmlType::F32,
        )?;
        let wt = self.spec.weight_type;
        let (up, down) = ([e, x.n_ff, x.n_expert], [x.n_ff, e, x.n_expert]);
        self.weights(&t("ffn_gate_exps.weight"), &up, inv(e), wt)?;
        self.weights(&t("ffn_up_exps.weight"), &up, inv(e), wt)?;
        self.weights(&t("ffn_down_exps.weight"), &down, inv(x.n_ff), wt)?;
        Ok(())
    }
}

/// Writes a tiny random model that stock llama.cpp loads and runs.
///
/// Tensor names, shapes and metadata follow llama.cpp's loaders for the family
/// (`src/models/{llama,qwen2,qwen3,gemma2,gemma3,olmo2,phi3,granite,qwen3moe}.cpp`); the tokenizer is a small
/// SentencePiece vocabulary (see [`crate::tiny_vocab`]).
pub fn write_tiny_model(spec: &TinySpec, path: &Path) -> Result<(), TestkitError> {
    tiny_model_writer(spec)?.write_to_path(path)?;
    Ok(())
}
