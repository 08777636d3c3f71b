//! `gemma3`: Gemma 3 (llama.cpp `src/models/gemma3.cpp`): sliding-window blocks with their
//! own RoPE base, Q/K norms, norms after attention and FFN, GELU gate, scaled embeddings, Q
//! scaled before attention, optional final soft-capping.

use super::{
    scale_q_first, swa_pattern, Arch, Base, Extras, Family, Ffn, Keys, QkNorm, ROPE_TYPE_NEOX,
};
use crate::error::Result;

pub const ARCH: Arch = Arch {
    name: "gemma3",
    family: Family::Gemma3,
    rope_mode: ROPE_TYPE_NEOX,
    qkv_bias: false,
    qk_norm: QkNorm::PerHead,
    pre_norms: true,
    post_norms: true,
    rope_freqs: false,
    ffn: Ffn::GeGlu,
    ffn_bias: false,
    moe: false,
    extras,
};

/// llama.cpp's default sliding-window period for gemma3 (every 6th block is global).
const SWA_PERIOD: usize = 6;

fn extras(keys: &Keys<'_>, b: &Base, x: &mut Extras) -> Result<()> {
    x.n_swa = keys.opt_u("attention.sliding_window")?.unwrap_or(0);
    if x.n_swa > 0 {
        x.is_swa = swa_pattern(
            keys.file(),
            &keys.key("attention.sliding_window_pattern"),
            b.n_layer,
            SWA_PERIOD,
        )?;
        x.freq_base_swa = keys.opt_f("rope.freq_base_swa")?.unwrap_or(10000.0);
    }
    x.final_logit_softcap = keys.opt_f("final_logit_softcapping")?.unwrap_or(0.0);
    // llama.cpp: the 27B model (62 blocks) scales Q by n_embd / n_head
    scale_q_first(b, Some(62), x);
    x.embd_scale = Some((b.n_embd as f32).sqrt());
    Ok(())
}
