//! Embeddings: a prompt's hidden states after the final norm (along its path), pooled into
//! one vector as llama.cpp pools them (`build_pooling`: the mean over tokens, the first
//! token's, or the last token's).

use crate::error::{EngineError, Result};
use crate::path::LayerPath;
use crate::session::{Logits, Route, Session};
use drllm_gguf::GgufFile;

/// How token states become one vector (llama.cpp's `llama_pooling_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// The mean over the prompt's tokens.
    Mean,
    /// The first token's (BERT's CLS).
    Cls,
    /// The last token's (decoder embedding models).
    Last,
}

impl Pooling {
    /// The pooling a file declares (`<arch>.pooling_type`: 1 mean, 2 cls, 3 last); None when
    /// it declares none (0, or no key: llama.cpp then gives per-token states, which
    /// OpenAI-style embeddings cannot return). A rank (4) or unknown value is an error.
    pub fn of_file(g: &GgufFile) -> Result<Option<Pooling>> {
        let Some(arch) = g.architecture() else {
            return Ok(None);
        };
        let key = format!("{arch}.pooling_type");
        match g.get(&key).and_then(|v| v.as_u64()) {
            None | Some(0) => Ok(None),
            Some(1) => Ok(Some(Pooling::Mean)),
            Some(2) => Ok(Some(Pooling::Cls)),
            Some(3) => Ok(Some(Pooling::Last)),
            Some(n) => Err(EngineError::BadMetadata {
                key,
                reason: format!("pooling type {n} (rank or unknown) is not supported"),
            }),
        }
    }

    /// `mean`, `cls` or `last`.
    pub fn name(self) -> &'static str {
        match self {
            Pooling::Mean => "mean",
            Pooling::Cls => "cls",
            Pooling::Last => "last",
        }
    }

    /// Pools `rows` (`n` rows of `d` floats).
    pub fn pool(self, rows: &[f32], d: usize) -> Vec<f32> {
        let n = rows.len() / d.max(1);
        match self {
            Pooling::Cls => rows[..d.min(rows.len())].to_vec(),
            Pooling::Last => rows[n.saturating_sub(1) * d..n * d].to_vec(),
            Pooling::Mean => {
                let mut acc = vec![0f64; d];
                for r in rows.chunks(d) {
                    for (a, &x) in acc.iter_mut().zip(r) {
                        *a += f64::from(x);
                    }
                }
                acc.iter().map(|&a| (a / n.max(1) as f64) as f32).collect()
            }
        }
    }
}

/// `v` scaled to unit Euclidean length (llama-server's `embd_normalize` 2; a zero vector stays).
pub fn normalized(v: &[f32]) -> Vec<f32> {
    let norm = v
        .iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt();
    if norm == 0.0 {
        return v.to_vec();
    }
    v.iter().map(|&x| (f64::from(x) / norm) as f32).collect()
}

impl Session {
    /// The pooled embedding of `tokens` along `route` (not normalised), and the path; the
    /// session holds no sequence afterwards.
    pub fn embed(
        &mut self,
        tokens: &[i32],
        route: Route<'_>,
        pooling: Pooling,
    ) -> Result<(Vec<f32>, LayerPath)> {
        let pre = self.prefill(tokens, route, Logits::Embeddings);
        self.reset();
        let pre = pre?;
        let d = self.model().config().n_embd;
        Ok((pooling.pool(&pre.logits, d), pre.path))
    }
}
