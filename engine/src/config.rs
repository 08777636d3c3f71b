//! Model hyperparameters read from GGUF metadata, mirroring llama.cpp's loaders
//! (`src/llama-model.cpp` generic keys and `src/models/<arch>.cpp` per family).
//!
//! [`ModelConfig::from_gguf`] reads in llama.cpp's order: the architecture's description
//! (`crate::arch`), the generic hyperparameters and their checks, the vocabulary size, RoPE
//! and its scaling, the family's own keys (the description's `extras`), the experts. This file
//! reads the descriptions and never names a family.

use crate::arch::{Arch, Base, Extras, Family, Keys};
use crate::error::{EngineError, Result};
use drllm_gguf::{GgufFile, Value};

/// Rotary position embedding parameters (after llama.cpp's context-level resolution).
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    /// ggml rope mode.
    pub mode: i32,
    /// Rotated dimensions per head.
    pub n_rot: usize,
    /// Base of full-attention layers.
    pub freq_base: f32,
    /// Frequency scale of full-attention layers (1 / scaling factor).
    pub freq_scale: f32,
    /// Base of sliding-window layers.
    pub freq_base_swa: f32,
    /// Frequency scale of sliding-window layers.
    pub freq_scale_swa: f32,
    /// Original training context (YaRN).
    pub n_ctx_orig: usize,
    /// YaRN extrapolation mix (0 unless YaRN scaling).
    pub ext_factor: f32,
    /// Attention magnitude factor.
    pub attn_factor: f32,
    /// YaRN beta fast.
    pub beta_fast: f32,
    /// YaRN beta slow.
    pub beta_slow: f32,
}

/// Everything the graphs need to know about a model.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// Family.
    pub family: Family,
    /// What the family adds to the shared block (`crate::arch`).
    pub arch: &'static Arch,
    /// Number of transformer blocks.
    pub n_layer: usize,
    /// Hidden size.
    pub n_embd: usize,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads.
    pub n_head_kv: usize,
    /// Key head size.
    pub head_dim_k: usize,
    /// Value head size.
    pub head_dim_v: usize,
    /// Feed-forward size.
    pub n_ff: usize,
    /// Vocabulary size (rows of the embedding matrix).
    pub n_vocab: usize,
    /// Training context length.
    pub n_ctx_train: usize,
    /// RMS norm epsilon.
    pub rms_eps: f32,
    /// Rotary embedding.
    pub rope: RopeConfig,
    /// Attention scale applied to KQ inside attention.
    pub kq_scale: f32,
    /// Gemma 3 scales Q before attention instead (and uses kq_scale = 1).
    pub q_scale: Option<f32>,
    /// Gemma 3 multiplies the token embeddings by sqrt(n_embd).
    pub embd_scale: Option<f32>,
    /// Sliding window size (0: none).
    pub n_swa: usize,
    /// Per block: sliding-window attention or not.
    pub is_swa: Vec<bool>,
    /// Final logit soft-capping (Gemma; 0 = off).
    pub final_logit_softcap: f32,
    /// Soft-capping of the attention logits inside attention (Gemma 2; 0 = off).
    pub attn_softcap: f32,
    /// Multiplier of the final logits (Granite: 1 / logit_scale).
    pub logit_scale: Option<f32>,
    /// Multiplier of attention and FFN outputs before the residual adds (Granite).
    pub residual_scale: Option<f32>,
    /// Whether Q and K are rotated (Granite can turn RoPE off).
    pub use_rope: bool,
    /// The mixture-of-experts FFN's sizes, for families whose FFN is one.
    pub moe: Option<MoeConfig>,
}

/// Sizes of a mixture-of-experts FFN (llama.cpp's generic expert keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoeConfig {
    /// Experts per block (`expert_count`).
    pub n_expert: usize,
    /// Experts run per token (`expert_used_count`).
    pub n_expert_used: usize,
    /// Hidden size of one expert (`expert_feed_forward_length`, else the FFN size divided by
    /// the experts used).
    pub n_ff_exp: usize,
}

/// llama.cpp's `LLAMA_MAX_EXPERTS`.
const MAX_EXPERTS: usize = 1024;

impl ModelConfig {
    /// K/V row size of one token in one block.
    pub fn n_embd_k_gqa(&self) -> usize {
        self.head_dim_k * self.n_head_kv
    }
    /// V row size of one token in one block.
    pub fn n_embd_v_gqa(&self) -> usize {
        self.head_dim_v * self.n_head_kv
    }

    /// Reads the configuration from GGUF metadata.
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let desc = architecture(g)?;
        let keys = Keys::new(g, desc.name);
        let h = Hparams::read(&keys)?;
        let n_vocab = vocab_size(&keys)?;
        let mut rope = rope_config(&keys, desc.rope_mode, &h)?;
        let Extras {
            n_swa,
            is_swa,
            freq_base_swa,
            kq_scale,
            q_scale,
            embd_scale,
            final_logit_softcap,
            attn_softcap,
            logit_scale,
            residual_scale,
            rope: use_rope,
        } = family_extras(desc, &keys, &h, rope.freq_base)?;
        rope.freq_base_swa = freq_base_swa;
        let moe = experts(desc, &keys, h.n_ff)?;
        Ok(ModelConfig {
            family: desc.family,
            arch: desc,
            n_layer: h.n_layer,
            n_embd: h.n_embd,
            n_head: h.n_head,
            n_head_kv: h.n_head_kv,
            head_dim_k: h.head_dim_k,
            head_dim_v: h.head_dim_v,
            n_ff: h.n_ff,
            n_vocab,
            n_ctx_train: h.n_ctx_train,
            rms_eps: h.rms_eps,
            rope,
            kq_scale,
            q_scale,
            embd_scale,
            n_swa,
            is_swa,
            final_logit_softcap,
            attn_softcap,
            logit_scale,
            residual_scale,
            use_rope,
            moe,
        })
    }
}

fn bad(key: String, reason: &str) -> EngineError {
    EngineError::BadMetadata {
        key,
        reason: reason.into(),
    }
}

/// The description of the file's `general.architecture`.
fn architecture(g: &GgufFile) -> Result<&'static Arch> {
    let arch = g
        .architecture()
        .ok_or_else(|| EngineError::MissingMetadata {
            key: "general.architecture".into(),
        })?;
    crate::arch::by_name(arch).ok_or_else(|| EngineError::UnsupportedArchitecture {
        found: arch.to_string(),
        supported: crate::arch::SUPPORTED_ARCHITECTURES,
    })
}

/// The generic hyperparameters every family has (llama.cpp's `load_hparams`), checked.
struct Hparams {
    n_layer: usize,
    n_embd: usize,
    n_ff: usize,
    n_head: usize,
    n_head_kv: usize,
    n_ctx_train: usize,
    rms_eps: f32,
    head_dim_k: usize,
    head_dim_v: usize,
    n_rot: usize,
}

impl Hparams {
    fn read(keys: &Keys<'_>) -> Result<Self> {
        let k = |s: &str| keys.key(s);
        let n_layer = keys.req_u("block_count")?;
        let n_embd = keys.req_u("embedding_length")?;
        let n_ff = keys.req_u("feed_forward_length")?;
        let n_head = keys.req_u("attention.head_count")?;
        let n_head_kv = keys.opt_u("attention.head_count_kv")?.unwrap_or(n_head);
        let n_ctx_train = keys.req_u("context_length")?;
        let rms_eps = keys
            .opt_f("attention.layer_norm_rms_epsilon")?
            .ok_or_else(|| EngineError::MissingMetadata {
                key: k("attention.layer_norm_rms_epsilon"),
            })?;
        if n_layer == 0 || n_layer > 512 {
            return Err(bad(k("block_count"), "must be in 1..=512"));
        }
        if n_embd == 0 || n_embd > 1 << 16 {
            return Err(bad(k("embedding_length"), "must be in 1..=65536"));
        }
        if n_head == 0 || n_head_kv == 0 || n_head % n_head_kv != 0 || n_head > 1024 {
            return Err(bad(
                k("attention.head_count_kv"),
                "head counts must be positive and head_count a multiple of head_count_kv",
            ));
        }
        if n_ff == 0 || n_ff > 1 << 20 {
            return Err(bad(k("feed_forward_length"), "must be in 1..=1048576"));
        }
        let (head_dim_k, head_dim_v, n_rot) = head_dims(keys, n_embd, n_head)?;
        Ok(Hparams {
            n_layer,
            n_embd,
            n_ff,
            n_head,
            n_head_kv,
            n_ctx_train,
            rms_eps,
            head_dim_k,
            head_dim_v,
            n_rot,
        })
    }
}

/// Key and value head sizes and the rotated dimensions, checked: (key, value, rotated).
fn head_dims(keys: &Keys<'_>, n_embd: usize, n_head: usize) -> Result<(usize, usize, usize)> {
    let k = |s: &str| keys.key(s);
    if !n_embd.is_multiple_of(n_head) && keys.file().get(&k("attention.key_length")).is_none() {
        return Err(bad(
            k("embedding_length"),
            "not a multiple of the head count",
        ));
    }
    let head_dim_k = keys
        .opt_u("attention.key_length")?
        .unwrap_or(n_embd / n_head);
    let head_dim_v = keys
        .opt_u("attention.value_length")?
        .unwrap_or(n_embd / n_head);
    if head_dim_k == 0 || head_dim_v == 0 || head_dim_k > 1024 || head_dim_v > 1024 {
        return Err(bad(
            k("attention.key_length"),
            "head size must be in 1..=1024",
        ));
    }
    if head_dim_k != head_dim_v {
        return Err(bad(
            k("attention.value_length"),
            "key and value head sizes differ (not supported by these families)",
        ));
    }
    let n_rot = keys.opt_u("rope.dimension_count")?.unwrap_or(head_dim_k);
    if n_rot != head_dim_k {
        return Err(bad(
            k("rope.dimension_count"),
            "partial rotary embeddings are not supported by these families",
        ));
    }
    Ok((head_dim_k, head_dim_v, n_rot))
}

/// `<arch>.vocab_size` or the length of the tokenizer's token list (0 when neither is there:
/// the loader checks it against the embedding tensor).
fn vocab_size(keys: &Keys<'_>) -> Result<usize> {
    Ok(match keys.opt_u("vocab_size")? {
        Some(v) => v,
        None => match keys.file().get("tokenizer.ggml.tokens") {
            Some(Value::Array(a)) => a.values.len(),
            _ => 0, // checked against the embedding tensor later
        },
    })
}

/// RoPE as llama.cpp resolves it (`load_hparams` and the `llama_context` constructor): base,
/// scaling type and factor, YaRN's extrapolation mix and attention factor. The sliding-window
/// base is the full-attention one until the family's keys say otherwise.
fn rope_config(keys: &Keys<'_>, mode: i32, h: &Hparams) -> Result<RopeConfig> {
    let k = |s: &str| keys.key(s);
    let freq_base = keys.opt_f("rope.freq_base")?.unwrap_or(10000.0);
    let scaling_type = match keys.file().get(&k("rope.scaling.type")) {
        None => "linear".to_string(),
        Some(v) => v
            .as_str()
            .ok_or_else(|| bad(k("rope.scaling.type"), "expected a string"))?
            .to_string(),
    };
    let factor = match keys.opt_f("rope.scaling.factor")? {
        Some(f) => f,
        None => keys.opt_f("rope.scale_linear")?.unwrap_or(0.0),
    };
    let mut freq_scale = if factor == 0.0 { 1.0 } else { 1.0 / factor };
    let rope_attn_factor = keys.opt_f("rope.scaling.attn_factor")?.unwrap_or(1.0);
    let n_ctx_orig = keys
        .opt_u("rope.scaling.original_context_length")?
        .unwrap_or(h.n_ctx_train);
    let (ext_factor, mut attn_factor) = match scaling_type.as_str() {
        "none" => {
            freq_scale = 1.0;
            (0.0, 1.0)
        }
        "linear" => (0.0, 1.0),
        "yarn" => {
            let log_mul = keys
                .opt_f("rope.scaling.yarn_log_multiplier")?
                .unwrap_or(0.0);
            (1.0, yarn_attn_factor(1.0 / freq_scale, log_mul))
        }
        other => {
            return Err(bad(
                k("rope.scaling.type"),
                &format!("rope scaling '{other}' is not supported (none, linear, yarn)"),
            ))
        }
    };
    attn_factor *= rope_attn_factor;
    if !(freq_base.is_finite() && freq_base > 0.0 && freq_scale.is_finite() && freq_scale > 0.0) {
        return Err(bad(
            k("rope.freq_base"),
            "rope base and scale must be positive",
        ));
    }
    Ok(RopeConfig {
        mode,
        n_rot: h.n_rot,
        freq_base,
        freq_scale,
        freq_base_swa: freq_base,
        freq_scale_swa: 1.0,
        n_ctx_orig,
        ext_factor,
        attn_factor,
        beta_fast: 32.0,
        beta_slow: 1.0,
    })
}

/// YaRN's attention magnitude factor for a scaling `factor` (llama.cpp's mscale rule).
fn yarn_attn_factor(factor: f32, log_mul: f32) -> f32 {
    let mscale = |scale: f32, m: f32| {
        if scale <= 1.0 {
            1.0
        } else {
            0.1 * m * scale.ln() + 1.0
        }
    };
    let mut a = if log_mul != 0.0 {
        mscale(factor, 1.0) / mscale(factor, log_mul)
    } else {
        mscale(factor, 1.0)
    };
    a *= 1.0 / (1.0 + 0.1 * factor.ln());
    a
}

/// The family's own hyperparameters: llama.cpp's defaults, then the description's `extras`.
fn family_extras(desc: &Arch, keys: &Keys<'_>, h: &Hparams, freq_base: f32) -> Result<Extras> {
    let mut extras = Extras {
        n_swa: 0,
        is_swa: vec![false; h.n_layer],
        freq_base_swa: freq_base,
        kq_scale: 1.0 / (h.head_dim_k as f32).sqrt(),
        q_scale: None,
        embd_scale: None,
        final_logit_softcap: 0.0,
        attn_softcap: 0.0,
        logit_scale: None,
        residual_scale: None,
        rope: true,
    };
    let base = Base {
        n_layer: h.n_layer,
        n_embd: h.n_embd,
        n_head: h.n_head,
        head_dim: h.head_dim_k,
    };
    (desc.extras)(keys, &base, &mut extras)?;
    Ok(extras)
}

/// The mixture-of-experts sizes (llama.cpp reads these keys for every architecture and asserts
/// their bounds): required by families whose FFN is one, refused by the others.
fn experts(desc: &Arch, keys: &Keys<'_>, n_ff: usize) -> Result<Option<MoeConfig>> {
    let k = |s: &str| keys.key(s);
    let arch = desc.name;
    let n_expert = keys.opt_u("expert_count")?.unwrap_or(0);
    let n_expert_used = keys.opt_u("expert_used_count")?.unwrap_or(0);
    if !desc.moe {
        if n_expert > 0 || n_expert_used > 0 {
            return Err(bad(
                k("expert_count"),
                &format!("mixture-of-experts {arch} files are not supported"),
            ));
        }
        return Ok(None);
    }
    if n_expert == 0 || n_expert > MAX_EXPERTS {
        return Err(bad(
            k("expert_count"),
            &format!("must be in 1..={MAX_EXPERTS} for {arch}"),
        ));
    }
    if n_expert_used == 0 || n_expert_used > n_expert {
        return Err(bad(k("expert_used_count"), "must be in 1..=expert_count"));
    }
    if keys.opt_u("expert_group_count")?.unwrap_or(0) > 1 {
        return Err(bad(
            k("expert_group_count"),
            "grouped expert selection is not supported",
        ));
    }
    let n_ff_exp = match keys.opt_u("expert_feed_forward_length")? {
        Some(0) | None => n_ff / n_expert_used,
        Some(n) => n,
    };
    if n_ff_exp == 0 || n_ff_exp > 1 << 20 {
        return Err(bad(
            k("expert_feed_forward_length"),
            "must be in 1..=1048576",
        ));
    }
    Ok(Some(MoeConfig {
        n_expert,
        n_expert_used,
        n_ff_exp,
    }))
}
