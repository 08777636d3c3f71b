//! `qwen2`: Qwen2 / Qwen2.5 (llama.cpp `src/models/qwen2.cpp`): biases on Q, K and V.

use super::{attention_scale, Arch, Family, Ffn, QkNorm, ROPE_TYPE_NEOX};

pub const ARCH: Arch = Arch {
    name: "qwen2",
    family: Family::Qwen2,
    rope_mode: ROPE_TYPE_NEOX,
    qkv_bias: true,
    qk_norm: QkNorm::None,
    pre_norms: true,
    post_norms: false,
    rope_freqs: false,
    ffn: Ffn::SwiGlu,
    ffn_bias: false,
    moe: false,
    extras: attention_scale,
};
