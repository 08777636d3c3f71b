//! `qwen3moe`: Qwen3 mixture of experts (llama.cpp `src/models/qwen3moe.cpp`): the qwen3 block
//! (per-head RMS norms of Q and K) with a mixture-of-experts FFN: a softmax router over
//! `expert_count` experts per token, the top `expert_used_count` run, their weights
//! renormalised to sum to one. The layer router skips or repeats whole blocks; which experts
//! run inside a block is chosen per token as llama.cpp does.

use super::{Arch, Family, Ffn, QkNorm, ROPE_TYPE_NEOX};

pub const ARCH: Arch = Arch {
    name: "qwen3moe",
    family: Family::Qwen3Moe,
    rope_mode: ROPE_TYPE_NEOX,
    qkv_bias: false,
    qk_norm: QkNorm::PerHead,
    pre_norms: true,
    post_norms: false,
    rope_freqs: false,
    ffn: Ffn::SwiGlu,
    ffn_bias: false,
    moe: true,
    extras: |_, _, _| Ok(()),
};
