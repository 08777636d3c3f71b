//! `phi3`: Phi-3 / Phi-3.5 / Phi-4-mini (llama.cpp `src/models/phi3.cpp`): Q, K and V in one
//! matrix, gate and up in one matrix, Q scaled before attention. llama.cpp runs these files
//! without sliding windows (it disables Phi's window), and so does drllm. Files with
//! long/short RoPE factors (the 128k-context variants) are refused (their tensors are not used).

use super::{Arch, Extras, Ffn, QkNorm};
use crate::config::{Family, Keys, ROPE_TYPE_NEOX};
use crate::error::Result;

pub const ARCH: Arch = Arch {
    name: "phi3",
    family: Family::Phi3,
    rope_mode: ROPE_TYPE_NEOX,
    qkv_bias: false,
    qk_norm: QkNorm::None,
    pre_norms: true,
    post_norms: false,
    rope_freqs: false,
    ffn: Ffn::SwiGluFused,
    extras,
};

fn extras(keys: &Keys<'_>, _: usize, x: &mut Extras) -> Result<()> {
    let n_embd = keys.req_u("embedding_length")?;
    let n_head = keys.req_u("attention.head_count")?.max(1);
    let head_dim = keys
        .opt_u("attention.key_length")?
        .unwrap_or(n_embd / n_head);
    x.q_scale = Some(1.0 / (head_dim as f32).sqrt());
    x.kq_scale = 1.0;
    Ok(())
}
