//! Routers on the prefill hook: route once per request, block by block.
//!
//! For block i the router sees the residual stream entering block i along the path routed so
//! far, pooled on the device into W = min(windows, T) window means (only W x d floats leave the
//! device); the MLP runs on the host, its logits are averaged over the windows, optionally
//! biased, and the argmax is the number of passes (0 skip, 1 execute, 2 repeat), subject to an
//! optional cap on the total number of passes.

use crate::error::{EngineError, Result};
use crate::model::Model;
use crate::path::LayerPath;
use crate::session::{Hidden, PrefillHook};
use drllm_router_format::{base_model_info_from, content_hash, n_windows, Sidecar, CLASSES};
use std::path::{Path, PathBuf};

/// Per-request routing controls (the budget knobs the reference method lacks). Routing off
/// (the plain model) is simply a prefill without the router hook.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteOptions {
    /// Shifts each block's decision between skip and execute, in logit units: the skip logit is
    /// lowered by this much. Positive keeps more blocks, negative skips more. 0: the routers'
    /// own decisions.
    pub depth_bias: f32,
    /// Most block passes in total. Repeats are granted only while the cap still leaves one pass
    /// for every later block; once the cap is used up, the remaining blocks are skipped.
    pub max_passes: Option<usize>,
    /// Compute and record the decisions but run every block once (shadow routing: the output
    /// is the plain model's; used to measure routing overhead and to watch routers safely).
    pub observe_only: bool,
}

impl Default for RouteOptions {
    fn default() -> Self {
        RouteOptions {
            depth_bias: 0.0,
            max_passes: None,
            observe_only: false,
        }
    }
}

impl RouteOptions {
    /// Checks ranges; returns a message naming the bad field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !self.depth_bias.is_finite() || self.depth_bias.abs() > 1e4 {
            return Err("depth_bias must be a finite number in [-10000, 10000]".into());
        }
        Ok(())
    }
}

/// One block's routing decision.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockDecision {
    /// Block index.
    pub block: usize,
    /// The router's logits averaged over the windows (skip, execute, repeat).
    pub logits: [f32; 3],
    /// Passes the router chose (argmax after the depth bias).
    pub chosen: usize,
    /// Passes granted (after the pass cap).
    pub passes: usize,
}

impl BlockDecision {
    /// Name of the granted decision.
    pub fn name(&self) -> &'static str {
        CLASSES.get(self.passes).copied().unwrap_or("repeat")
    }
}

/// A loaded, validated sidecar that matches its model.
#[derive(Debug, Clone)]
pub struct Routers {
    sidecar: Sidecar,
    path: PathBuf,
    generation: String,
}

impl Routers {
    /// Reads a sidecar and checks it belongs to `model` (architecture, block count, hidden
    /// size and fingerprint).
    pub fn load(path: impl AsRef<Path>, model: &Model) -> Result<Routers> {
        let path = path.as_ref().to_path_buf();
        // refuses oversized files before reading them
        let bytes =
            drllm_router_format::read_capped(&path).map_err(|source| EngineError::Sidecar {
                path: path.clone(),
                source,
            })?;
        Routers::from_bytes(&bytes, &path, model)
    }

    /// Parses sidecar bytes (already read from `path`) and checks them against `model`.
    pub fn from_bytes(bytes: &[u8], path: &Path, model: &Model) -> Result<Routers> {
        let sidecar = Sidecar::parse(bytes).map_err(|source| EngineError::Sidecar {
            path: path.to_path_buf(),
            source,
        })?;
        let base = base_model_info_from(model.gguf(), model.path()).map_err(|source| {
            EngineError::Sidecar {
                path: model.path().to_path_buf(),
                source,
            }
        })?;
        sidecar
            .check_base(&base)
            .map_err(|source| EngineError::Sidecar {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Routers {
            sidecar,
            path: path.to_path_buf(),
            generation: content_hash(bytes),
        })
    }

    /// The parsed sidecar.
    pub fn sidecar(&self) -> &Sidecar {
        &self.sidecar
    }

    /// Where it was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Content hash of the file: the routers' generation id.
    pub fn generation(&self) -> &str {
        &self.generation
    }

    /// A prefill hook that routes with these routers.
    pub fn hook<'a>(&'a self, opts: &'a RouteOptions) -> RouterHook<'a> {
        RouterHook {
            routers: self,
            opts,
            decisions: Vec::new(),
            used: 0,
        }
    }
}

/// A sidecar for `model` whose routers always choose `counts[b]` passes for block b (0, 1 or
/// 2): zero weights and a bias of 1000 on the chosen class, or, with `random_seed`,
/// Xavier-random weights (so every router does its full amount of arithmetic) and the same
/// decisive bias. For testing the routing machinery and measuring its cost.
pub fn constant_sidecar(
    model: &Model,
    counts: &[usize],
    random_seed: Option<u64>,
) -> Result<Sidecar> {
    use drllm_router_format::{
        BlockRouter, Provenance, RouterShape, DEFAULT_HIDDEN, DEFAULT_WINDOWS,
    };
    let n = model.n_layer();
    if counts.len() != n || counts.iter().any(|&c| c > 2) {
        return Err(EngineError::State(format!(
            "constant routers need {n} decisions of 0, 1 or 2"
        )));
    }
    let base = base_model_info_from(model.gguf(), model.path()).map_err(|source| {
        EngineError::Sidecar {
            path: model.path().to_path_buf(),
            source,
        }
    })?;
    let d = model.config().n_embd;
    let routers = counts
        .iter()
        .enumerate()
        .map(|(b, &c)| {
            let mut r = match random_seed {
                Some(seed) => BlockRouter::xavier(d, DEFAULT_HIDDEN, seed.wrapping_add(b as u64)),
                None => BlockRouter::zeros(d, DEFAULT_HIDDEN),
            };
            r.b2 = [0.0; 3];
            r.b2[c] = 1000.0;
            r
        })
        .collect();
    Ok(Sidecar {
        version: drllm_router_format::FORMAT_VERSION,
        base,
        shape: RouterShape {
            hidden: DEFAULT_HIDDEN,
            windows: DEFAULT_WINDOWS,
        },
        provenance: Provenance {
            dataset: "none (constant routers)".into(),
            tool: format!("drllm {}", env!("CARGO_PKG_VERSION")),
            notes: format!(
                "constant decisions {}{}",
                LayerPath::from_counts(counts)?,
                if random_seed.is_some() {
                    ", random weights"
                } else {
                    ""
                }
            ),
            ..Default::default()
        },
        routers,
    })
}

/// The prefill hook. After the prefill, [`RouterHook::decisions`] tells what each block got.
pub struct RouterHook<'a> {
    routers: &'a Routers,
    opts: &'a RouteOptions,
    decisions: Vec<BlockDecision>,
    used: usize,
}

impl RouterHook<'_> {
    /// Decisions so far, one per block.
    pub fn decisions(&self) -> &[BlockDecision] {
        &self.decisions
    }

    /// The decisions as a path (what the routers chose, also in observe-only mode).
    pub fn path(&self) -> Result<LayerPath> {
        let counts: Vec<usize> = self.decisions.iter().map(|d| d.passes).collect();
        Ok(LayerPath::from_counts(&counts)?)
    }
}

/// Applies the depth bias and the pass cap to averaged router logits.
pub fn decide(
    logits: [f32; 3],
    opts: &RouteOptions,
    used: usize,
    blocks_after: usize,
) -> (usize, usize) {
    let mut biased = logits;
    biased[0] -= opts.depth_bias;
    // a router that produces NaN/inf (e.g. from overflowing hidden states) must not silently
    // skip blocks: fall back to executing
    let mut chosen = 1;
    if biased.iter().all(|x| x.is_finite()) {
        chosen = 0;
        for c in 1..3 {
            if biased[c] > biased[chosen] {
                chosen = c;
            }
        }
    }
    let mut passes = chosen;
    if let Some(cap) = opts.max_passes {
        let budget = cap.saturating_sub(used);
        if passes == 2 && budget < 2 + blocks_after {
            passes = 1;
        }
        passes = passes.min(budget);
    }
    (chosen, passes)
}

impl PrefillHook for RouterHook<'_> {
    fn passes(
        &mut self,
        block: usize,
        hidden: &mut Hidden<'_>,
    ) -> std::result::Result<usize, String> {
        let sc = &self.routers.sidecar;
        let router = sc
            .routers
            .get(block)
            .ok_or_else(|| format!("the sidecar has no router for block {block}"))?;
        let d = hidden.n_embd();
        let w = n_windows(hidden.n_tokens(), sc.shape.windows);
        let pooled = hidden.window_means(w).map_err(|e| e.to_string())?;
        let logits = router.route(&pooled, d);
        let blocks_after = sc.routers.len().saturating_sub(block + 1);
        let (chosen, passes) = decide(logits, self.opts, self.used, blocks_after);
        self.used += passes;
        self.decisions.push(BlockDecision {
            block,
            logits,
            chosen,
            passes,
        });
        Ok(if self.opts.observe_only { 1 } else { passes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bias_and_cap() {
        let o = RouteOptions::default();
        assert_eq!(decide([1.0, 0.5, 0.0], &o, 0, 3), (0, 0));
        let deeper = RouteOptions {
            depth_bias: 1.0,
            ..o.clone()
        };
        assert_eq!(decide([1.0, 0.5, 0.0], &deeper, 0, 3), (1, 1));
        let shallower = RouteOptions {
            depth_bias: -1.0,
            ..o.clone()
        };
        assert_eq!(decide([0.0, 0.5, 0.0], &shallower, 0, 3), (0, 0));
        let capped = RouteOptions {
            max_passes: Some(5),
            ..o
        };
        // repeat wanted, but only 3 passes left for this and 2 later blocks
        assert_eq!(decide([0.0, 0.0, 1.0], &capped, 2, 2), (2, 1));
        // repeat fits: 4 left, 2 later blocks
        assert_eq!(decide([0.0, 0.0, 1.0], &capped, 1, 2), (2, 2));
        // budget exhausted
        assert_eq!(decide([0.0, 1.0, 0.0], &capped, 5, 0), (1, 0));
        // non-finite logits execute
        let o = RouteOptions::default();
        assert_eq!(decide([f32::NAN, 0.0, 0.0], &o, 0, 3), (1, 1));
        assert_eq!(decide([f32::INFINITY, 0.0, 0.0], &o, 0, 3), (1, 1));
    }
}
