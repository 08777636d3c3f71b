//! `qwen3`: Qwen3 dense (llama.cpp `src/models/qwen3.cpp`): per-head RMS norms of Q and K.

use super::{attention_scale, Arch, Family, Ffn, QkNorm, ROPE_TYPE_NEOX};

pub const ARCH: Arch = Arch {
    name: "qwen3",
    family: Family::Qwen3,
    rope_mode: ROPE_TYPE_NEOX,
    qkv_bias: false,
    qk_norm: QkNorm::PerHead,
    pre_norms: true,
    post_norms: false,
    rope_freqs: false,
    ffn: Ffn::SwiGlu,
    ffn_bias: false,
    moe: false,
    extras: attention_scale,
};
