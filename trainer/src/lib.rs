//! drllm's trainer: find layer paths that answer real questions correctly with fewer block
//! passes (Monte Carlo Tree Search over paths, rewards from the engine), teach routers to predict
//! them (candle), export the routers as a sidecar, and evaluate routed against plain models.
//!
//! The binary is `drllm-train`; candle stays out of the `drllm` binary.

pub mod compare;
pub mod data;
pub mod eval;
pub mod features;
pub mod ledger;
pub mod mcts;
pub mod oracle;
pub mod predict;
pub use drllm_plots as plots;
pub mod prune;
pub mod rng;
pub mod scoring;
pub mod search;
pub mod shards;
pub mod tasks;
pub mod train;
