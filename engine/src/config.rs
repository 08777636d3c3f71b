//! Model hyperparameters read from GGUF metadata, mirroring llama.cpp's loaders
//! (`src/llama-model.cpp` generic keys and `src/models/<arch>.cpp` per family).

use crate::error::{EngineError, Result};
use drllm_gguf::{GgufFile, Value};

/// Architectures the engine implements (GGUF `general.architecture`).
pub const SUPPORTED_ARCHITECTURES: &[&str] = &[
    "llama", "qwen2", "qwen3", "gemma2", "gemma3", "olmo2", "phi3", "granite", "qwen3moe",
];

/// A supported model family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Llama 2/3.x, SmolLM2 and other `llama`-architecture models.
    Llama,
    /// Qwen2 / Qwen2.5 (q/k/v biases).
    Qwen2,
    /// Qwen3 dense (q/k norms).
    Qwen3,
    /// Gemma 2 (alternating sliding-window layers, attention and final logit soft-capping,
    /// pre and post norms, embedding scale).
    Gemma2,
    /// Gemma 3 (sliding-window layers, q/k norms, pre and post norms, embedding scale).
    Gemma3,
    /// OLMo 2 (post norms only, q/k norms over the whole projections).
    Olmo2,
    /// Phi-3 (fused QKV and gate/up matrices).
    Phi3,
    /// IBM Granite 3.x dense (embedding, residual, attention and logit multipliers).
    Granite,
    /// Qwen3 mixture of experts (q/k norms, expert FFN).
    Qwen3Moe,
}

impl Family {
    /// The GGUF architecture name.
    pub fn arch_name(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Gemma2 => "gemma2",
            Family::Gemma3 => "gemma3",
            Family::Olmo2 => "olmo2",
            Family::Phi3 => "phi3",
            Family::Granite => "granite",
            Family::Qwen3Moe => "qwen3moe",
        }
    }
}

/// ggml rope modes.
pub const ROPE_TYPE_NORM: i32 = 0;
/// NeoX-style rope (rotates the two halves of a head).
pub const ROPE_TYPE_NEOX: i32 = 2;

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
    pub arch: &'static crate::arch::Arch,
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
        let arch = g
            .architecture()
            .ok_or_else(|| EngineError::MissingMetadata {
                key: "general.architecture".into(),
            })?
            .to_string();
        let desc =
            crate::arch::by_name(&arch).ok_or_else(|| EngineError::UnsupportedArchitecture {
                found: arch.clone(),
            })?;
        let family = desc.family;
        let keys = Keys { g, arch: &arch };
        let k = |s: &str| keys.key(s);
        let req_u = |key: String| -> Result<usize> { keys.req_u_full(&key) };
        let opt_u = |key: String| -> Result<Option<usize>> { keys.opt_u_full(&key) };
        let opt_f = |key: String| -> Result<Option<f32>> { keys.opt_f_full(&key) };

        let n_layer = req_u(k("block_count"))?;
        let n_embd = req_u(k("embedding_length"))?;
        let n_ff = req_u(k("feed_forward_length"))?;
        let n_head = req_u(k("attention.head_count"))?;
        let n_head_kv = opt_u(k("attention.head_count_kv"))?.unwrap_or(n_head);
        let n_ctx_train = req_u(k("context_length"))?;
        let rms_eps = opt_f(k("attention.layer_norm_rms_epsilon"))?.ok_or_else(|| {
            EngineError::MissingMetadata {
                key: k("attention.layer_norm_rms_epsilon"),
            }
        })?;
        let bad = |key: String, reason: &str| EngineError::BadMetadata {
            key,
            reason: reason.into(),
        };
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
        if n_embd % n_head != 0 && g.get(&k("attention.key_length")).is_none() {
            return Err(bad(
                k("embedding_length"),
                "not a multiple of the head count",
            ));
        }
        let head_dim_k = opt_u(k("attention.key_length"))?.unwrap_or(n_embd / n_head);
        let head_dim_v = opt_u(k("attention.value_length"))?.unwrap_or(n_embd / n_head);
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
        let n_rot = opt_u(k("rope.dimension_count"))?.unwrap_or(head_dim_k);
        if n_rot != head_dim_k {
            return Err(bad(
                k("rope.dimension_count"),
                "partial rotary embeddings are not supported by these families",
            ));
        }

        // vocabulary size: <arch>.vocab_size or the tokenizer's token list
        let n_vocab = match opt_u(k("vocab_size"))? {
            Some(v) => v,
            None => match g.get("tokenizer.ggml.tokens") {
                Some(Value::Array(a)) => a.values.len(),
                _ => 0, // checked against the embedding tensor later
            },
        };

        // rope (llama.cpp: load_hparams + llama_context constructor)
        let freq_base = opt_f(k("rope.freq_base"))?.unwrap_or(10000.0);
        let scaling_type = match g.get(&k("rope.scaling.type")) {
            None => "linear".to_string(),
            Some(v) => v
                .as_str()
                .ok_or_else(|| bad(k("rope.scaling.type"), "expected a string"))?
                .to_string(),
        };
        let factor = match opt_f(k("rope.scaling.factor"))? {
            Some(f) => f,
            None => opt_f(k("rope.scale_linear"))?.unwrap_or(0.0),
        };
        let mut freq_scale = if factor == 0.0 { 1.0 } else { 1.0 / factor };
        let rope_attn_factor = opt_f(k("rope.scaling.attn_factor"))?.unwrap_or(1.0);
        let n_ctx_orig = opt_u(k("rope.scaling.original_context_length"))?.unwrap_or(n_ctx_train);
        let (ext_factor, mut attn_factor) = match scaling_type.as_str() {
            "none" => {
                freq_scale = 1.0;
                (0.0, 1.0)
            }
            "linear" => (0.0, 1.0),
            "yarn" => {
                let log_mul = opt_f(k("rope.scaling.yarn_log_multiplier"))?.unwrap_or(0.0);
                let factor = 1.0 / freq_scale;
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
                (1.0, a)
            }
            other => {
                return Err(bad(
                    k("rope.scaling.type"),
                    &format!("rope scaling '{other}' is not supported (none, linear, yarn)"),
                ))
            }
        };
        attn_factor *= rope_attn_factor;
        if !(freq_base.is_finite() && freq_base > 0.0 && freq_scale.is_finite() && freq_scale > 0.0)
        {
            return Err(bad(
                k("rope.freq_base"),
                "rope base and scale must be positive",
            ));
        }

        let mode = desc.rope_mode;
        let mut extras = crate::arch::Extras {
            n_swa: 0,
            is_swa: vec![false; n_layer],
            freq_base_swa: freq_base,
            kq_scale: 1.0 / (head_dim_k as f32).sqrt(),
            q_scale: None,
            embd_scale: None,
            final_logit_softcap: 0.0,
            attn_softcap: 0.0,
            logit_scale: None,
            residual_scale: None,
            rope: true,
        };
        let base = crate::arch::Base {
            n_layer,
            n_embd,
            n_head,
            head_dim: head_dim_k,
        };
        (desc.extras)(&keys, &base, &mut extras)?;
        let crate::arch::Extras {
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
        } = extras;

        // experts (llama.cpp reads these keys for every architecture and asserts their bounds)
        let n_expert = opt_u(k("expert_count"))?.unwrap_or(0);
        let n_expert_used = opt_u(k("expert_used_count"))?.unwrap_or(0);
        let moe = if desc.moe {
            if n_expert == 0 || n_expert > MAX_EXPERTS {
                return Err(bad(
                    k("expert_count"),
                    &format!("must be in 1..={MAX_EXPERTS} for {arch}"),
                ));
            }
            if n_expert_used == 0 || n_expert_used > n_expert {
                return Err(bad(k("expert_used_count"), "must be in 1..=expert_count"));
            }
            if opt_u(k("expert_group_count"))?.unwrap_or(0) > 1 {
                return Err(bad(
                    k("expert_group_count"),
                    "grouped expert selection is not supported",
                ));
            }
            let n_ff_exp = match opt_u(k("expert_feed_forward_length"))? {
                Some(0) | None => n_ff / n_expert_used,
                Some(n) => n,
            };
            if n_ff_exp == 0 || n_ff_exp > 1 << 20 {
                return Err(bad(
                    k("expert_feed_forward_length"),
                    "must be in 1..=1048576",
                ));
            }
            Some(MoeConfig {
                n_expert,
                n_expert_used,
                n_ff_exp,
            })
        } else {
            if n_expert > 0 || n_expert_used > 0 {
                return Err(bad(
                    k("expert_count"),
                    &format!("mixture-of-experts {arch} files are not supported"),
                ));
            }
            None
        };

        Ok(ModelConfig {
            family,
            arch: desc,
            n_layer,
            n_embd,
            n_head,
            n_head_kv,
            head_dim_k,
            head_dim_v,
            n_ff,
            n_vocab,
            n_ctx_train,
            rms_eps,
            rope: RopeConfig {
                mode,
                n_rot,
                freq_base,
                freq_scale,
                freq_base_swa,
                freq_scale_swa: 1.0,
                n_ctx_orig,
                ext_factor,
                attn_factor,
                beta_fast: 32.0,
                beta_slow: 1.0,
            },
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

/// Metadata keys of one architecture (`<arch>.<name>`), read as llama.cpp reads them.
pub struct Keys<'a> {
    g: &'a GgufFile,
    arch: &'a str,
}

impl Keys<'_> {
    /// The file.
    pub fn file(&self) -> &GgufFile {
        self.g
    }

    /// `<arch>.<name>`.
    pub fn key(&self, name: &str) -> String {
        format!("{}.{name}", self.arch)
    }

    /// A required unsigned value (a scalar, or a per-block array of equal values).
    pub fn req_u(&self, name: &str) -> Result<usize> {
        self.req_u_full(&self.key(name))
    }

    /// An optional unsigned value.
    pub fn opt_u(&self, name: &str) -> Result<Option<usize>> {
        self.opt_u_full(&self.key(name))
    }

    /// An optional float.
    pub fn opt_f(&self, name: &str) -> Result<Option<f32>> {
        self.opt_f_full(&self.key(name))
    }

    fn req_u_full(&self, key: &str) -> Result<usize> {
        let v = self
            .g
            .get(key)
            .ok_or_else(|| EngineError::MissingMetadata {
                key: key.to_string(),
            })?;
        scalar_or_uniform_array(key, v)
    }

    fn opt_u_full(&self, key: &str) -> Result<Option<usize>> {
        match self.g.get(key) {
            None => Ok(None),
            Some(v) => scalar_or_uniform_array(key, v).map(Some),
        }
    }

    fn opt_f_full(&self, key: &str) -> Result<Option<f32>> {
        match self.g.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f32()
                .map(Some)
                .ok_or_else(|| EngineError::BadMetadata {
                    key: key.to_string(),
                    reason: "expected a float".into(),
                }),
        }
    }
}

/// A u32-like scalar, or a per-layer array whose entries are all equal (llama.cpp's get_key_or_arr).
fn scalar_or_uniform_array(key: &str, v: &Value) -> Result<usize> {
    let bad = |reason: &str| EngineError::BadMetadata {
        key: key.to_string(),
        reason: reason.into(),
    };
    match v {
        Value::Array(a) => {
            let mut first = None;
            for e in &a.values {
                let x = e
                    .as_u64()
                    .ok_or_else(|| bad("expected unsigned integers"))?;
                match first {
                    None => first = Some(x),
                    Some(f) if f != x => {
                        return Err(bad("per-block values that differ are not supported"))
                    }
                    _ => {}
                }
            }
            let x = first.ok_or_else(|| bad("empty array"))?;
            usize::try_from(x).map_err(|_| bad("value too large"))
        }
        other => {
            let x = other
                .as_u64()
                .ok_or_else(|| bad("expected an unsigned integer"))?;
            if x > u32::MAX as u64 {
                return Err(bad("value too large"));
            }
            Ok(x as usize)
        }
    }
}

/// Sliding-window pattern as llama.cpp resolves it: a per-block bool array, else a period n
/// (layer il is sliding iff il % n < n - 1), default `default_period`.
pub fn swa_pattern(
    g: &GgufFile,
    key: &str,
    n_layer: usize,
    default_period: usize,
) -> Result<Vec<bool>> {
    let bad = |reason: &str| EngineError::BadMetadata {
        key: key.to_string(),
        reason: reason.into(),
    };
    match g.get(key) {
        Some(Value::Array(a)) => {
            if a.values.len() < n_layer {
                return Err(bad("array shorter than the block count"));
            }
            a.values
                .iter()
                .take(n_layer)
                .map(|v| match v {
                    Value::Bool(b) => Ok(*b),
                    other => other
                        .as_u64()
                        .map(|x| x != 0)
                        .ok_or_else(|| bad("expected booleans")),
                })
                .collect()
        }
        Some(v) => {
            let n = v
                .as_u64()
                .ok_or_else(|| bad("expected an integer or an array"))?
                as usize;
            Ok(period_pattern(n, n_layer))
        }
        None => Ok(period_pattern(default_period, n_layer)),
    }
}

fn period_pattern(n: usize, n_layer: usize) -> Vec<bool> {
    (0..n_layer).map(|il| n == 0 || il % n < n - 1).collect()
}
