//! `gemma2`: Gemma 2 (llama.cpp `src/models/gemma2.cpp`): every other block slides (window
//! 4096 unless the file says), soft-capped attention logits (50) and final logits (30), norms
//! after attention and FFN, GELU gate, scaled embeddings, Q scaled before attention.

use super::{
    scale_q_first, swa_pattern, Arch, Base, Extras, Family, Ffn, Keys, QkNorm, ROPE_TYPE_NEOX,
};
use crate::error::Result;

pub const ARCH: Arch = Arch {
    name: "gemma2",
    family: Family::Gemma2,
    rope_mode: ROPE_TYPE_NEOX,
    qkv_bias: false,
    qk_norm: QkNorm::None,
    pre_norms: true,
    post_norms: true,
    rope_freqs: false,
    ffn: Ffn::GeGlu,
    ffn_bias: false,
    moe: false,
    extras,
};

/// llama.cpp's sliding-window period for gemma2 (blocks 0, 2, 4, ... slide).
const SWA_PERIOD: usize = 2;

fn extras(keys: &Keys<'_>, b: &Base, x: &mut Extras) -> Result<()> {
    x.n_swa = keys.opt_u("attention.sliding_window")?.unwrap_or(4096);
    x.is_swa = swa_pattern(
        keys.file(),
        &keys.key("attention.sliding_window_pattern"),
        b.n_layer,
        SWA_PERIOD,
    )?;
    if let Some(b) = keys.opt_f("rope.freq_base_swa")? {
        x.freq_base_swa = b;
    }
    x.attn_softcap = keys.opt_f("attn_logit_softcapping")?.unwrap_or(50.0);
    x.final_logit_softcap = keys.opt_f("final_logit_softcapping")?.unwrap_or(30.0);
    // llama.cpp: the 27B model (46 blocks) scales Q by n_embd / n_head
    scale_q_first(b, Some(46), x);
    x.embd_scale = Some((b.n_embd as f32).sqrt());
    Ok(())
}
