//! Stock llama.cpp on the same GGUF file (through `llama-cpp-2`): the reference the engine is
//! checked against (logits) and measured against (speed). It always runs every block.

use crate::error::{EngineError, Result};
use crate::model::DeviceChoice;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use std::num::NonZeroU32;
use std::path::Path;

/// A model loaded by llama.cpp itself.
pub struct StockModel {
    model: LlamaModel,
}

impl StockModel {
    /// Loads a model with llama.cpp's defaults (all layers on the accelerator, if any).
    pub fn load(path: impl AsRef<Path>, device: DeviceChoice) -> Result<Self> {
        let path = path.as_ref();
        // same up-front validation as the engine, so a malformed file never reaches llama.cpp
        drllm_gguf::GgufFile::open(path).map_err(|source| EngineError::Gguf {
            path: path.to_path_buf(),
            source,
        })?;
        let backend = crate::backend()?;
        let mut params = LlamaModelParams::default();
        if device == DeviceChoice::Cpu {
            params = params.with_n_gpu_layers(0);
        }
        let model = LlamaModel::load_from_file(backend, path, &params)
            .map_err(|e| EngineError::Stock(format!("{}: {e}", path.display())))?;
        Ok(StockModel { model })
    }

    /// A context for one sequence.
    pub fn context(
        &self,
        n_ctx: usize,
        n_threads: usize,
        n_ubatch: usize,
    ) -> Result<StockContext<'_>> {
        let backend = crate::backend()?;
        let n_ctx_nz = NonZeroU32::new(n_ctx as u32)
            .ok_or_else(|| EngineError::Stock("n_ctx must be positive".into()))?;
        let params = LlamaContextParams::default()
            .with_n_ctx(Some(n_ctx_nz))
            .with_n_batch(n_ubatch as u32)
            .with_n_ubatch(n_ubatch as u32)
            .with_n_threads(n_threads as i32)
            .with_n_threads_batch(n_threads as i32);
        let ctx = self
            .model
            .new_context(backend, params)
            .map_err(|e| EngineError::Stock(format!("context: {e}")))?;
        Ok(StockContext {
            ctx,
            n_past: 0,
            n_ubatch,
            n_vocab: self.model.n_vocab().max(0) as usize,
        })
    }
}

impl StockModel {
    /// llama.cpp's own pooled embedding of `tokens` (one sequence, in one batch; not
    /// normalised), from a context made for embeddings with `pooling`.
    pub fn embeddings(
        &self,
        tokens: &[i32],
        pooling: crate::embed::Pooling,
        n_threads: usize,
    ) -> Result<Vec<f32>> {
        use llama_cpp_2::context::params::LlamaPoolingType;
        let backend = crate::backend()?;
        let n = tokens.len().max(1) as u32;
        let kind = match pooling {
            crate::embed::Pooling::Mean => LlamaPoolingType::Mean,
            crate::embed::Pooling::Cls => LlamaPoolingType::Cls,
            crate::embed::Pooling::Last => LlamaPoolingType::Last,
        };
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(n.max(64)))
            .with_n_batch(n)
            .with_n_ubatch(n)
            .with_n_threads(n_threads as i32)
            .with_n_threads_batch(n_threads as i32)
            .with_embeddings(true)
            .with_pooling_type(kind);
        let mut ctx = self
            .model
            .new_context(backend, params)
            .map_err(|e| EngineError::Stock(format!("context: {e}")))?;
        let mut batch = LlamaBatch::new(tokens.len(), 1);
        for (i, &t) in tokens.iter().enumerate() {
            batch
                .add(LlamaToken(t), i as i32, &[0], true)
                .map_err(|e| EngineError::Stock(format!("batch: {e}")))?;
        }
        ctx.decode(&mut batch)
            .map_err(|e| EngineError::Stock(format!("decode: {e}")))?;
        ctx.embeddings_seq_ith(0)
            .map(<[f32]>::to_vec)
            .map_err(|e| EngineError::Stock(format!("embeddings: {e}")))
    }
}

/// One llama.cpp context (one sequence).
pub struct StockContext<'m> {
    ctx: LlamaContext<'m>,
    n_past: usize,
    n_ubatch: usize,
    n_vocab: usize,
}

impl StockContext<'_> {
    /// Feeds tokens; returns the logits of every token (`all`) or of the last one.
    pub fn eval(&mut self, tokens: &[i32], all: bool) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        let n_chunks = tokens.len().div_ceil(self.n_ubatch);
        for (ci, chunk) in tokens.chunks(self.n_ubatch).enumerate() {
            let last_chunk = ci + 1 == n_chunks;
            let mut batch = LlamaBatch::new(chunk.len(), 1);
            for (i, &t) in chunk.iter().enumerate() {
                let want = all || (last_chunk && i + 1 == chunk.len());
                batch
                    .add(LlamaToken(t), (self.n_past + i) as i32, &[0], want)
                    .map_err(|e| EngineError::Stock(format!("batch: {e}")))?;
            }
            self.ctx
                .decode(&mut batch)
                .map_err(|e| EngineError::Stock(format!("decode: {e}")))?;
            for i in 0..chunk.len() {
                if all || (last_chunk && i + 1 == chunk.len()) {
                    out.extend_from_slice(self.ctx.get_logits_ith(i as i32));
                }
            }
            self.n_past += chunk.len();
        }
        Ok(out)
    }

    /// Feeds one token and returns its logits.
    pub fn decode(&mut self, token: i32) -> Result<&[f32]> {
        let mut batch = LlamaBatch::new(1, 1);
        batch
            .add(LlamaToken(token), self.n_past as i32, &[0], true)
            .map_err(|e| EngineError::Stock(format!("batch: {e}")))?;
        self.ctx
            .decode(&mut batch)
            .map_err(|e| EngineError::Stock(format!("decode: {e}")))?;
        self.n_past += 1;
        Ok(self.ctx.get_logits_ith(0))
    }

    /// Clears the KV cache.
    pub fn reset(&mut self) {
        self.ctx.clear_kv_cache();
        self.n_past = 0;
    }

    /// Vocabulary size.
    pub fn n_vocab(&self) -> usize {
        self.n_vocab
    }
}
