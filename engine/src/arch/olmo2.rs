//! `olmo2`: OLMo 2 (llama.cpp `src/models/olmo2.cpp`): no norms on the attention and FFN
//! inputs, RMS norms on their outputs instead, and Q/K norms over the whole projections.
//! Files with sliding-window blocks (the OLMo 3 layout) are refused.

use super::{Arch, Base, Extras, Family, Ffn, Keys, QkNorm, ROPE_TYPE_NEOX};
use crate::error::{EngineError, Result};

pub const ARCH: Arch = Arch {
    name: "olmo2",
    family: Family::Olmo2,
    rope_mode: ROPE_TYPE_NEOX,
    qkv_bias: false,
    qk_norm: QkNorm::Full,
    pre_norms: false,
    post_norms: true,
    rope_freqs: false,
    ffn: Ffn::SwiGlu,
    ffn_bias: false,
    moe: false,
    extras,
};

fn extras(keys: &Keys<'_>, _: &Base, _: &mut Extras) -> Result<()> {
    if keys.opt_u("attention.sliding_window")?.unwrap_or(0) > 0 {
        return Err(EngineError::BadMetadata {
            key: keys.key("attention.sliding_window"),
            reason: "olmo2 files with sliding-window blocks are not supported yet".into(),
        });
    }
    // llama.cpp scales KQ by 1/sqrt(head size) and ignores attention.scale here
    Ok(())
}
