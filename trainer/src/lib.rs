//! drllm's trainer: find layer paths that answer real questions correctly with fewer block
//! passes (Monte Carlo Tree Search over paths, rewards from the engine), teach routers to predict
//! them (candle), export the routers as a sidecar, and evaluate routed against plain models.
//!
//! The binary is `drllm-train`; candle stays out of the `drllm` binary. Each of its commands
//! is a library function `run_*` in the module that owns the work, taking that command's
//! arguments ([`args`]) and returning [`error::Error`]; the binary parses and dispatches.

pub mod args;
pub mod compare;
pub mod data;
pub mod defaults;
pub mod error;
pub mod eval;
pub mod features;
pub mod ledger;
pub mod mcts;
pub mod oracle;
pub mod pipeline;
pub mod predict;
pub use drllm_plots as plots;
pub mod progress;
pub mod prune;
pub mod routers;
pub mod scoring;
pub mod search;
pub mod shards;
pub mod tasks;
pub mod train;
