//! Token sampling with llama.cpp's samplers (through `llama-cpp-2`), over drllm's logits.

use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;
use llama_cpp_2::token::logit_bias::LlamaLogitBias;
use llama_cpp_2::token::LlamaToken;

/// Sampling settings (llama.cpp's defaults, except that temperature 0 means greedy).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Temperature; 0 = greedy (argmax, after the logit bias and the penalties).
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = off).
    pub top_k: i32,
    /// Nucleus sampling (1 = off).
    pub top_p: f32,
    /// Drop tokens below min_p times the top probability (0 = off).
    pub min_p: f32,
    /// RNG seed.
    pub seed: u32,
    /// Divides the logit of a token seen in the last `repeat_last_n` tokens (multiplies a
    /// negative one) by this (1 = off; llama.cpp's `repeat_penalty`).
    pub repeat_penalty: f32,
    /// How many of the last tokens (prompt included) the penalties look at (0 = off).
    pub repeat_last_n: i32,
    /// Subtracted from a token's logit per time it was seen (OpenAI's `frequency_penalty`).
    pub frequency_penalty: f32,
    /// Subtracted once from the logit of a token seen at all (`presence_penalty`).
    pub presence_penalty: f32,
    /// Added to these tokens' logits before anything else (`-inf` bans a token).
    pub logit_bias: Vec<(i32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            seed: 0xFFFF_FFFF,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            logit_bias: Vec::new(),
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

    /// Whether the penalty sampler changes anything.
    pub fn penalized(&self) -> bool {
        self.repeat_last_n != 0
            && (self.repeat_penalty != 1.0
                || self.frequency_penalty != 0.0
                || self.presence_penalty != 0.0)
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
        if !(self.repeat_penalty.is_finite() && self.repeat_penalty > 0.0) {
            return Err("repeat_penalty must be > 0".into());
        }
        if self.repeat_last_n < 0 {
            return Err("repeat_last_n must be >= 0".into());
        }
        if !(self.frequency_penalty.is_finite() && self.presence_penalty.is_finite()) {
            return Err("frequency_penalty and presence_penalty must be finite".into());
        }
        if self
            .logit_bias
            .iter()
            .any(|&(_, b)| b.is_nan() || b == f32::INFINITY)
        {
            return Err("a logit bias must be a number or -inf".into());
        }
        Ok(())
    }
}

/// A sampler chain, optionally constrained by a grammar, in llama.cpp's order
/// (`common_sampler_init`): logit bias, penalties, top-k, top-p, min-p, temperature, a seeded
/// draw (greedy at temperature 0).
pub struct Sampler {
    chain: Option<LlamaSampler>,
    grammar: Option<LlamaSampler>,
    data: Vec<LlamaTokenData>,
}

impl Sampler {
    /// Builds the chain for a vocabulary of `n_vocab` tokens. Greedy decoding without a logit
    /// bias or penalties needs no chain (argmax).
    pub fn new(p: &SamplingParams, n_vocab: usize) -> Sampler {
        let n_vocab = i32::try_from(n_vocab).unwrap_or(i32::MAX);
        let mut s = Vec::new();
        if !p.logit_bias.is_empty() {
            let biases: Vec<LlamaLogitBias> = p
                .logit_bias
                .iter()
                .filter(|&&(t, _)| (0..n_vocab).contains(&t))
                .map(|&(t, b)| LlamaLogitBias::new(LlamaToken(t), b))
                .collect();
            s.push(LlamaSampler::logit_bias(n_vocab, &biases));
        }
        if p.penalized() {
            s.push(LlamaSampler::penalties(
                n_vocab,
                p.repeat_last_n,
                p.repeat_penalty,
                p.frequency_penalty,
                p.presence_penalty,
            ));
        }
        if p.temperature <= 0.0 {
            let chain = (!s.is_empty()).then(|| {
                s.push(LlamaSampler::greedy());
                LlamaSampler::chain_simple(s)
            });
            return Sampler {
                chain,
                grammar: None,
                data: Vec::new(),
            };
        }
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
            grammar: None,
            data: Vec::new(),
        }
    }

    /// Only tokens `grammar` allows are drawn (llama.cpp's grammar sampler, fresh for this
    /// generation).
    pub fn with_grammar(mut self, grammar: LlamaSampler) -> Sampler {
        self.grammar = Some(grammar);
        self
    }

    /// Tells the chain the prompt's tokens, as llama-server does before sampling, so that the
    /// penalties count them (the grammar only sees generated tokens).
    pub fn accept_prompt(&mut self, tokens: &[i32]) {
        if let Some(chain) = self.chain.as_mut() {
            chain.accept_many(tokens.iter().map(|&t| LlamaToken(t)));
        }
    }

    /// Picks the next token from one row of logits. With a grammar, as llama.cpp does: the
    /// token drawn freely is kept if the grammar allows it, else the draw is repeated over the
    /// tokens the grammar allows. The chain and the grammar then accept the token chosen.
    pub fn sample(&mut self, logits: &[f32]) -> i32 {
        let mut t = self.draw(logits, false);
        if let Some(g) = self.grammar.as_mut() {
            let lone = vec![LlamaTokenData::new(LlamaToken(t), logits[t as usize], 0.0)];
            let mut one = LlamaTokenDataArray::new(lone, false);
            one.apply_sampler(g);
            if !one.data[0].logit().is_finite() {
                t = self.draw(logits, true);
            }
        }
        if let Some(g) = self.grammar.as_mut() {
            g.accept(LlamaToken(t));
        }
        if let Some(chain) = self.chain.as_mut() {
            chain.accept(LlamaToken(t));
        }
        t
    }

    /// One draw: greedy, or through the chain; over the grammar's tokens when `constrained`.
    fn draw(&mut self, logits: &[f32], constrained: bool) -> i32 {
        if self.chain.is_none() && !constrained {
            return argmax(logits);
        }
        self.data.clear();
        self.data.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| LlamaTokenData::new(LlamaToken(i as i32), l, 0.0)),
        );
        let mut arr = LlamaTokenDataArray::new(std::mem::take(&mut self.data), false);
        if constrained {
            if let Some(g) = self.grammar.as_mut() {
                arr.apply_sampler(g);
            }
        }
        let t = match self.chain.as_mut() {
            Some(chain) => {
                arr.apply_sampler(chain);
                arr.selected_token()
                    .map(|t| t.0)
                    .unwrap_or_else(|| best(&arr.data))
            }
            None => best(&arr.data),
        };
        self.data = arr.data;
        t
    }
}

/// The candidate with the largest logit (the first on ties); token 0 if there is none.
fn best(data: &[LlamaTokenData]) -> i32 {
    let mut out: Option<&LlamaTokenData> = None;
    for d in data {
        if out.is_none_or(|o| d.logit() > o.logit()) {
            out = Some(d);
        }
    }
    out.map_or(0, |d| d.id().0)
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
