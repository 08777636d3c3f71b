//! The supported families, in the order of [`super::ARCHES`]: each variant's index is its
//! description's place in the table, and every name the engine gives a family comes from there.

use super::ARCHES;

/// A supported model family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// Llama 2/3.x, SmolLM2 and other `llama`-architecture models.
    Llama,
    /// Qwen2 / Qwen2.5 (q/k/v biases).
    Qwen2,
    /// Qwen3 dense (q/k norms).
    Qwen3,
    /// Gemma 2 (alternating sliding-window layers, attention and final logit soft-capping,
    /// pre and post norms, embedding scale).
    Gemma2,
    /// Gemma 3 (sliding-window layers, q/k norms, pre and post norms, embedding scale).
    Gemma3,
    /// OLMo 2 (post norms only, q/k norms over the whole projections).
    Olmo2,
    /// Phi-3 (fused QKV and gate/up matrices).
    Phi3,
    /// IBM Granite 3.x dense (embedding, residual, attention and logit multipliers).
    Granite,
    /// Qwen3 mixture of experts (q/k norms, expert FFN).
    Qwen3Moe,
}

/// Number of families: the length of the architecture table.
const N: usize = ARCHES.len();

impl Family {
    /// Every family, in the order of the architecture table (built from it).
    pub const ALL: [Family; N] = {
        let mut all = [Family::Llama; N];
        let mut i = 0;
        while i < N {
            // the table lists the families in declaration order, each once
            assert!(
                ARCHES[i].family as usize == i,
                "arch::ARCHES must list the families in the order Family declares them"
            );
            all[i] = ARCHES[i].family;
            i += 1;
        }
        all
    };

    /// The GGUF architecture name (`general.architecture`), from the family's description.
    pub fn arch_name(self) -> &'static str {
        ARCHES[self as usize].name
    }
}

// checks the table's order when the crate compiles, not only when ALL is first used
const _: [Family; N] = Family::ALL;
