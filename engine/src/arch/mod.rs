//! One description per architecture: what a family's GGUF file and block graph add to the
//! llama-style block every family shares (RMS norm, attention with RoPE and grouped KV heads,
//! a gated FFN). A new family is one file here, one entry in [`ARCHES`] and one [`Family`]
//! variant at the same place (checked when the crate compiles), plus its tiny-model builder
//! in testkit; `config.rs`, `model.rs` and `graph.rs` read these descriptions and never name
//! a family.
//!
//! Everything the descriptions are written with lives here too: [`Family`] (whose list and
//! names come from [`ARCHES`]), the metadata [`Keys`] and [`swa_pattern`] (`keys.rs`), and the
//! RoPE modes. The dependency is one-way: `config.rs` reads this module, never the reverse.

use crate::error::Result;

mod family;
mod keys;

pub use family::Family;
pub use keys::{swa_pattern, Keys};

mod gemma2;
mod gemma3;
mod granite;
mod llama;
mod olmo2;
mod phi3;
mod qwen2;
mod qwen3;
mod qwen3moe;

/// ggml RoPE mode that rotates adjacent pairs of a head (llama, granite).
pub const ROPE_TYPE_NORM: i32 = 0;
/// NeoX-style rope (rotates the two halves of a head).
pub const ROPE_TYPE_NEOX: i32 = 2;

/// The FFN's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ffn {
    /// SiLU(gate) * up (llama, qwen).
    SwiGlu,
    /// GELU-tanh(gate) * up (gemma).
    GeGlu,
    /// SiLU(gate) * up with gate and up in one matrix, `ffn_up.weight` of twice the FFN size
    /// (phi3).
    SwiGluFused,
}

/// RMS norms of Q and K before RoPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    None,
    /// Per head: `attn_{q,k}_norm.weight` of the head size (qwen3, gemma3).
    PerHead,
    /// Over the whole projection, before it is split into heads: `attn_q_norm.weight` of
    /// heads x head size, `attn_k_norm.weight` of KV heads x head size (olmo2).
    Full,
}

/// Hyperparameters some families set beyond the generic ones, with their llama.cpp defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct Extras {
    /// Sliding window (0: none) and, per block, whether it slides.
    pub n_swa: usize,
    pub is_swa: Vec<bool>,
    /// RoPE base of sliding-window blocks.
    pub freq_base_swa: f32,
    /// Scale of KQ inside attention.
    pub kq_scale: f32,
    /// Scale applied to Q before attention instead (then kq_scale is 1).
    pub q_scale: Option<f32>,
    /// Multiplier of the token embeddings.
    pub embd_scale: Option<f32>,
    /// Final logit soft-capping (0: off).
    pub final_logit_softcap: f32,
    /// Soft-capping of the attention logits (0: off).
    pub attn_softcap: f32,
    /// Multiplier of the final logits (granite divides them by its `logit_scale`).
    pub logit_scale: Option<f32>,
    /// Multiplier of the attention and FFN outputs before their residual adds (granite).
    pub residual_scale: Option<f32>,
    /// RoPE applied to Q and K (granite turns it off with `rope.scaling.finetuned` false).
    pub rope: bool,
}

/// The generic hyperparameters, already read and checked, that a family's rules build on.
#[derive(Debug, Clone, Copy)]
pub struct Base {
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    /// Key head size (`attention.key_length`, else n_embd / n_head).
    pub head_dim: usize,
}

/// What a family adds to the shared block.
#[derive(Debug)]
pub struct Arch {
    /// `general.architecture`.
    pub name: &'static str,
    pub family: Family,
    /// ggml RoPE mode.
    pub rope_mode: i32,
    /// `attn_{q,k,v}.bias` (required).
    pub qkv_bias: bool,
    /// RMS norms of Q and K before RoPE (`attn_{q,k}_norm.weight`).
    pub qk_norm: QkNorm,
    /// `attn_norm.weight` and `ffn_norm.weight`: RMS norms of the attention and FFN inputs
    /// (every family but olmo2, which only norms their outputs).
    pub pre_norms: bool,
    /// `post_attention_norm.weight` and `post_ffw_norm.weight`: RMS norms of the attention and
    /// FFN outputs before their residual adds.
    pub post_norms: bool,
    /// An optional `rope_freqs.weight` (llama 3's long-context frequency factors).
    pub rope_freqs: bool,
    pub ffn: Ffn,
    /// Optional `ffn_{gate,up,down}.bias` (llama, granite).
    pub ffn_bias: bool,
    /// The FFN is a mixture of experts (`ffn_gate_inp` router, `ffn_{gate,up,down}_exps`),
    /// and `expert_count` / `expert_used_count` are required. Families without it refuse files
    /// with experts.
    pub moe: bool,
    /// Reads the family's own hyperparameters (`keys` are prefixed with the architecture).
    pub extras: fn(keys: &Keys<'_>, base: &Base, extras: &mut Extras) -> Result<()>,
}

/// Every architecture the engine implements.
pub const ARCHES: &[&Arch] = &[
    &llama::ARCH,
    &qwen2::ARCH,
    &qwen3::ARCH,
    &gemma2::ARCH,
    &gemma3::ARCH,
    &olmo2::ARCH,
    &phi3::ARCH,
    &granite::ARCH,
    &qwen3moe::ARCH,
];

/// `general.architecture` of every architecture the engine implements, in table order.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &{
    let mut names = [""; ARCHES.len()];
    let mut i = 0;
    while i < ARCHES.len() {
        names[i] = ARCHES[i].name;
        i += 1;
    }
    names
};

/// The description of `general.architecture` = `name`.
pub fn by_name(name: &str) -> Option<&'static Arch> {
    ARCHES.iter().copied().find(|a| a.name == name)
}

/// The generic `attention.scale` override (llama, qwen).
fn attention_scale(keys: &Keys<'_>, _: &Base, x: &mut Extras) -> Result<()> {
    if let Some(s) = keys.opt_f("attention.scale")? {
        if s != 0.0 {
            x.kq_scale = s;
        }
    }
    Ok(())
}

/// Q scaled before attention instead of KQ inside it (gemma, phi3): by 1/sqrt(head size), or
/// by 1/sqrt(n_embd / n_head) for the model `n_embd_rule_at` blocks deep (llama.cpp's rule for
/// Gemma's 27B sizes).
fn scale_q_first(b: &Base, n_embd_rule_at: Option<usize>, x: &mut Extras) {
    let dim = if n_embd_rule_at == Some(b.n_layer) {
        b.n_embd / b.n_head
    } else {
        b.head_dim
    };
    x.q_scale = Some(1.0 / (dim as f32).sqrt());
    x.kq_scale = 1.0;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_has_one_description_named_as_its_files_are() {
        for a in ARCHES {
            assert_eq!(by_name(a.name).map(|b| b.family), Some(a.family));
            assert_eq!(a.family.arch_name(), a.name);
        }
        let names: Vec<&str> = ARCHES.iter().map(|a| a.name).collect();
        assert_eq!(names, crate::SUPPORTED_ARCHITECTURES);
        let families: Vec<Family> = ARCHES.iter().map(|a| a.family).collect();
        assert_eq!(families, Family::ALL);
        let mut unique = names.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(
            unique.len(),
            names.len(),
            "architecture names must be unique"
        );
    }
}
