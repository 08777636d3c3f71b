//! The fixtures' generator: drllm's one SplitMix64 ([`drllm_router_format::rng`]), so a tiny
//! model's weights and vocabulary follow from its seed.

pub use drllm_router_format::rng::SplitMix64 as Rng;
