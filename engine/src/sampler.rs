//! Token sampling with llama.cpp's samplers (through `llama-cpp-2`), over drllm's logits.

use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;
use llama_cpp_2::token::LlamaToken;

/// Sampling settings (llama.cpp's defaults, except that temperature 0 means greedy).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Temperature; 0 = greedy (argmax).
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = off).
    pub top_k: i32,
    /// Nucleus sampling (1 = off).
    pub top_p: f32,
    /// Drop tokens below min_p times the top probability (0 = off).
    pub min_p: f32,
    /// RNG seed.
    pub seed: u32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            seed: 0xFFFF_FFFF,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..Default::default()
        }
    }

    /// Checks ranges; returns a message naming the bad field.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err("temperature must be >= 0".into());
        }
        if self.top_k < 0 {
            return Err("top_k must be >= 0".into());
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err("top_p must be in (0, 1]".into());
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err("min_p must be in [0, 1]".into());
        }
        Ok(())
    }
}

/// A sampler chain.
pub struct Sampler {
    chain: Option<LlamaSampler>,
    data: Vec<LlamaTokenData>,
}

impl Sampler {
    /// Builds the chain: top-k, top-p, min-p, temperature, then a seeded draw.
    pub fn new(p: &SamplingParams) -> Sampler {
        if p.temperature <= 0.0 {
            return Sampler {
                chain: None,
                data: Vec::new(),
            };
        }
        let mut s = Vec::new();
        if p.top_k > 0 {
            s.push(LlamaSampler::top_k(p.top_k));
        }
        if p.top_p < 1.0 {
            s.push(LlamaSampler::top_p(p.top_p, 1));
        }
        if p.min_p > 0.0 {
            s.push(LlamaSampler::min_p(p.min_p, 1));
        }
        s.push(LlamaSampler::temp(p.temperature));
        s.push(LlamaSampler::dist(p.seed));
        Sampler {
            chain: Some(LlamaSampler::chain_simple(s)),
            data: Vec::new(),
        }
    }

    /// Picks the next token from one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> i32 {
        let Some(chain) = self.chain.as_mut() else {
            return argmax(logits);
        };
        self.data.clear();
        self.data.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| LlamaTokenData::new(LlamaToken(i as i32), l, 0.0)),
        );
        let mut arr = LlamaTokenDataArray::new(std::mem::take(&mut self.data), false);
        arr.apply_sampler(chain);
        let t = arr
            .selected_token()
            .map(|t| t.0)
            .unwrap_or_else(|| argmax(logits));
        chain.accept(LlamaToken(t));
        self.data = arr.data;
        t
    }
}

/// Index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> i32 {
    let mut best = 0usize;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as i32
}
