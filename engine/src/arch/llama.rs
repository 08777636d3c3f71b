//! `llama`: Llama 2/3.x, SmolLM2, and other files of that architecture
//! (llama.cpp `src/models/llama.cpp`).

use super::{attention_scale, Arch, Family, Ffn, QkNorm, ROPE_TYPE_NORM};

pub const ARCH: Arch = Arch {
    name: "llama",
    family: Family::Llama,
    rope_mode: ROPE_TYPE_NORM,
    qkv_bias: false,
    qk_norm: QkNorm::None,
    pre_norms: true,
    post_norms: false,
    rope_freqs: true,
    ffn: Ffn::SwiGlu,
    ffn_bias: true,
    moe: false,
    extras: attention_scale,
};
