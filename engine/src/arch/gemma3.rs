//! `gemma3`: Gemma 3 (llama.cpp `src/models/gemma3.cpp`): sliding-window blocks with their
//! own RoPE base, Q/K norms, norms after attention and FFN, GELU gate, scaled embeddings, Q
//! scaled before attention, optional final soft-capping.

use super::{Arch, Extras, Ffn, QkNorm};
use crate::config::{swa_pattern, Family, Keys, ROPE_TYPE_NEOX};
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
    extras,
};

/// llama.cpp's default sliding-window period for gemma3 (every 6th block is global).
const SWA_PERIOD: usize = 6;

fn extras(keys: &Keys<'_>, n_layer: usize, x: &mut Extras) -> Result<()> {
    x.n_swa = keys.opt_u("attention.sliding_window")?.unwrap_or(0);
    if x.n_swa > 0 {
        x.is_swa = swa_pattern(
            keys.file(),
            &keys.key("attention.sliding_window_pattern"),
            n_layer,
            SWA_PERIOD,
        )?;
        x.freq_base_swa = keys.opt_f("rope.freq_base_swa")?.unwrap_or(10000.0);
    }
    x.final_logit_softcap = keys.opt_f("final_logit_softcapping")?.unwrap_or(0.0);
    let n_embd = keys.req_u("embedding_length")?;
    let n_head = keys.req_u("attention.head_count")?.max(1);
    let head_dim = keys
        .opt_u("attention.key_length")?
        .unwrap_or(n_embd / n_head);
    // llama.cpp: the 27B model (62 blocks) scales by n_embd / n_head, the others by the key
    // head size
    x.q_scale = Some(if n_layer == 62 {
        1.0 / ((n_embd / n_head) as f32).sqrt()
    } else {
        1.0 / (head_dim as f32).sqrt()
    });
    x.kq_scale = 1.0;
    x.embd_scale = Some((n_embd as f32).sqrt());
    Ok(())
}
