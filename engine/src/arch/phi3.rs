//! `phi3`: Phi-3 / Phi-3.5 / Phi-4-mini (llama.cpp `src/models/phi3.cpp`): Q, K and V in one
//! matrix, gate and up in one matrix, Q scaled before attention. llama.cpp runs these files
//! without sliding windows (it disables Phi's window), and so does drllm. Files with
//! long/short RoPE factors (the 128k-context variants) are refused (their tensors are not used).

use super::{scale_q_first, Arch, Base, Extras, Family, Ffn, Keys, QkNorm, ROPE_TYPE_NEOX};
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
    ffn_bias: false,
    moe: false,
    extras,
};

fn extras(_: &Keys<'_>, b: &Base, x: &mut Extras) -> Result<()> {
    scale_q_first(b, None, x);
    Ok(())
}
