//! `granite`: IBM Granite 3.x dense (llama.cpp `src/models/granite.cpp`): the llama block with
//! four multipliers — token embeddings times `embedding_scale`, attention and FFN outputs times
//! `residual_scale` before their residual adds, KQ scaled by `attention.scale`, final logits
//! divided by `logit_scale` — optional biases of the attention output and the FFN, and RoPE
//! switched by `rope.scaling.finetuned` (on unless the file says false). Files with experts
//! (Granite MoE) or vision deepstack inputs are refused.

use super::{attention_scale, Arch, Base, Extras, Family, Ffn, Keys, QkNorm, ROPE_TYPE_NORM};
use crate::error::{EngineError, Result};

pub const ARCH: Arch = Arch {
    name: "granite",
    family: Family::Granite,
    rope_mode: ROPE_TYPE_NORM,
    qkv_bias: false,
    qk_norm: QkNorm::None,
    pre_norms: true,
    post_norms: false,
    rope_freqs: true,
    ffn: Ffn::SwiGlu,
    ffn_bias: true,
    moe: false,
    extras,
};

fn extras(keys: &Keys<'_>, b: &Base, x: &mut Extras) -> Result<()> {
    let bad = |name: &str, reason: &str| EngineError::BadMetadata {
        key: keys.key(name),
        reason: reason.into(),
    };
    // required by llama.cpp
    let logit = keys
        .opt_f("logit_scale")?
        .ok_or_else(|| EngineError::MissingMetadata {
            key: keys.key("logit_scale"),
        })?;
    if !(logit.is_finite() && logit != 0.0) {
        return Err(bad("logit_scale", "must be finite and non-zero"));
    }
    x.logit_scale = Some(1.0 / logit);
    // 0 (llama.cpp's default) leaves the residuals and embeddings unscaled
    x.residual_scale = keys.opt_f("residual_scale")?.filter(|&s| s != 0.0);
    x.embd_scale = keys.opt_f("embedding_scale")?.filter(|&s| s != 0.0);
    attention_scale(keys, b, x)?;
    x.rope = match keys.file().get(&keys.key("rope.scaling.finetuned")) {
        None => true,
        Some(v) => v
            .as_bool()
            .ok_or_else(|| bad("rope.scaling.finetuned", "expected a boolean"))?,
    };
    if let Some(v) = keys.file().get(&keys.key("deepstack_mapping")) {
        let targets = v
            .as_array()
            .is_some_and(|a| a.values.iter().any(|e| e.as_i64().is_none_or(|i| i >= 0)));
        if targets {
            return Err(bad(
                "deepstack_mapping",
                "vision deepstack inputs are not supported (text-only files have none)",
            ));
        }
    }
    Ok(())
}
