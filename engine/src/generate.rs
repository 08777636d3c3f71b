//! The generation loop: prefill, then sample and decode along the fixed path, streaming text.

use crate::error::Result;
use crate::path::LayerPath;
use crate::sampler::{Sampler, SamplingParams};
use crate::session::{Logits, Route, Session};
use crate::tokenizer::{TextStream, Tokenizer};
use std::time::Instant;

/// Generation settings.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Sampling.
    pub sampling: SamplingParams,
    /// Stop when one of these strings appears (it is not included in the text).
    pub stop: Vec<String>,
    /// Keep going past end-of-generation tokens.
    pub ignore_eos: bool,
    /// Only text this grammar allows (JSON mode, schemas, GBNF).
    pub grammar: Option<crate::grammar::Grammar>,
    /// Each generated token's log-probability and the `n` most likely tokens at its place
    /// (None: none recorded). See [`TokenLogprob`] for the distribution.
    pub logprobs: Option<usize>,
    /// The same for every prompt token after the first (the prompt is then prefilled with
    /// every row's logits).
    pub prompt_logprobs: Option<usize>,
    /// Special tokens that come out as their text (a chat format's tool-call tags), as
    /// llama-server renders its preserved tokens.
    pub preserved_tokens: Vec<i32>,
    /// Stop once llama.cpp's chat parser reads more tool calls than this in the answer.
    pub tool_call_limit: Option<Box<ToolCallLimit>>,
}

/// The most tool calls an answer may make (`parallel_tool_calls: false`: one), read by
/// llama.cpp's parser for the chat's format as the answer grows: when a call beyond the limit
/// begins, the ones before it are complete and the generation stops (finish: stop).
#[derive(Debug, Clone)]
pub struct ToolCallLimit {
    pub chat: std::sync::Arc<crate::chat::ChatPrompt>,
    /// Text the answer started with (in the prompt; the parser reads it first).
    pub answer_prefix: String,
    pub max_calls: usize,
}

impl ToolCallLimit {
    /// Whether `answer` (the text generated so far) begins a call beyond the limit, as the
    /// generation checks it after each token (a fresh parser; the generation keeps one).
    pub fn exceeded_by(&self, answer: &str) -> std::result::Result<bool, crate::chat::ChatError> {
        let mut p = crate::chat::ChatParser::new(&self.chat, true)?;
        let (m, _) = p.feed(&format!("{}{answer}", self.answer_prefix), true)?;
        Ok(m.tool_calls.len() > self.max_calls)
    }
}

/// A [`ToolCallLimit`] with its parser.
struct CallLimit {
    parser: crate::chat::ChatParser,
    prefix: String,
    max_calls: usize,
}

impl CallLimit {
    fn new(l: &ToolCallLimit) -> Option<CallLimit> {
        match crate::chat::ChatParser::new(&l.chat, true) {
            Ok(parser) => Some(CallLimit {
                parser,
                prefix: l.answer_prefix.clone(),
                max_calls: l.max_calls,
            }),
            Err(e) => {
                eprintln!("[drllm] no tool-call limit for this answer (the parser: {e})");
                None
            }
        }
    }

    /// Whether `text` (the answer so far) begins a call beyond the limit.
    fn exceeded(&mut self, text: &str) -> bool {
        let whole = format!("{}{text}", self.prefix);
        self.parser
            .feed(&whole, true)
            .is_ok_and(|(m, _)| m.tool_calls.len() > self.max_calls)
    }
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: 256,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            ignore_eos: false,
            grammar: None,
            logprobs: None,
            prompt_logprobs: None,
            preserved_tokens: Vec::new(),
            tool_call_limit: None,
        }
    }
}

/// Most alternatives a [`TokenLogprob`] lists (OpenAI's `top_logprobs` limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// A token's log-probability and the most likely tokens at its place, under the model's own
/// distribution: the log-softmax of the raw logits, before the logit bias, penalties,
/// truncation, temperature and grammar (what llama-server reports by default).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: i32,
    pub logprob: f32,
    /// The most likely tokens, most likely first (ties: the lower id first).
    pub top: Vec<(i32, f32)>,
}

impl TokenLogprob {
    /// `token`'s entry in a row of logits, with the `n` most likely tokens (at most
    /// [`MAX_TOP_LOGPROBS`]).
    pub fn of(logits: &[f32], token: i32, n: usize) -> TokenLogprob {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
        let log_z = f64::from(max) + sum.ln();
        let lp = |l: f32| (f64::from(l) - log_z) as f32;
        let n = n.min(MAX_TOP_LOGPROBS).min(logits.len());
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        let by_logit = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
        if n > 0 && n < idx.len() {
            idx.select_nth_unstable_by(n - 1, by_logit);
            idx.truncate(n);
        }
        idx.truncate(n);
        idx.sort_by(by_logit);
        TokenLogprob {
            token,
            logprob: logits
                .get(token as usize)
                .map_or(f32::NEG_INFINITY, |&l| lp(l)),
            top: idx.into_iter().map(|i| (i as i32, lp(logits[i]))).collect(),
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` reached or the context is full.
    Length,
    /// The caller's callback asked to stop (e.g. the client went away).
    Cancelled,
}

impl FinishReason {
    /// OpenAI's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// What a generation produced.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Generated text (stop string excluded).
    pub text: String,
    /// Generated tokens.
    pub tokens: Vec<i32>,
    /// Prompt tokens.
    pub n_prompt: usize,
    /// The path the request followed.
    pub path: LayerPath,
    /// Why it ended.
    pub finish: FinishReason,
    /// Each generated token's log-probability (with `logprobs`).
    pub logprobs: Vec<TokenLogprob>,
    /// Each prompt token's after the first (with `prompt_logprobs`).
    pub prompt_logprobs: Vec<TokenLogprob>,
    /// Seconds spent in prefill (routing included).
    pub prefill_secs: f64,
    /// Seconds spent generating.
    pub decode_secs: f64,
}

/// Finds stop strings in streamed text, holding back what could be the start of one.
#[derive(Debug, Default)]
pub struct StopScanner {
    stops: Vec<String>,
    text: String,
    emitted: usize,
}

impl StopScanner {
    /// A scanner for these stop strings (empty ones are ignored).
    pub fn new(stops: &[String]) -> Self {
        StopScanner {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            text: String::new(),
            emitted: 0,
        }
    }

    /// Adds text; returns what can be shown now and whether a stop string was hit.
    pub fn push(&mut self, s: &str) -> (String, bool) {
        self.text.push_str(s);
        // earliest stop string occurrence; held-back text starts at `emitted`, and nothing
        // before it can begin a stop string (see below)
        let hit = self
            .stops
            .iter()
            .filter_map(|st| self.text[self.emitted..].find(st.as_str()))
            .min()
            .map(|i| i + self.emitted);
        if let Some(at) = hit {
            let out = self.text[self.emitted..at].to_string();
            self.text.truncate(at);
            self.emitted = at;
            return (out, true);
        }
        // hold back the longest suffix that is a prefix of a stop string
        let mut keep = 0;
        for st in &self.stops {
            for l in (1..st.len()).rev() {
                if l <= self.text.len() - self.emitted
                    && st.is_char_boundary(l)
                    && self.text.ends_with(&st[..l])
                {
                    keep = keep.max(l);
                    break;
                }
            }
        }
        let upto = self.text.len() - keep;
        let out = self.text[self.emitted..upto].to_string();
        self.emitted = upto;
        (out, false)
    }

    /// The held-back rest, at the end of generation.
    pub fn finish(&mut self) -> String {
        let out = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        out
    }

    /// All text accepted so far.
    pub fn text(&self) -> &str {
        &self.text
    }
}

/// What [`Stepper::step`] produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// A token was sampled: `show` is the text that became final (maybe empty), `decode` the
    /// token to run through the model next (None: the generation is over), `logprob` the
    /// sampled token's (with `logprobs`; not for an end-of-generation token).
    Token {
        show: String,
        decode: Option<i32>,
        logprob: Option<TokenLogprob>,
    },
    /// The generation was already over.
    Done,
}

/// A generation advanced one token at a time, so that a caller can interleave several (e.g.
/// decode the next tokens of many requests in one graph). [`generate`] is this in a loop.
pub struct Stepper {
    opts: GenerateOptions,
    sampler: Sampler,
    stream: TextStream,
    stops: StopScanner,
    tokens: Vec<i32>,
    logits: Vec<f32>,
    logprobs: Vec<TokenLogprob>,
    prompt_logprobs: Vec<TokenLogprob>,
    n_prompt: usize,
    path: crate::path::LayerPath,
    finish: Option<FinishReason>,
    stopped_by_string: bool,
    call_limit: Option<CallLimit>,
    prefill_secs: f64,
    t_decode: Instant,
}

impl Stepper {
    /// Prefills `prompt` along `route` and gets ready to sample.
    pub fn start(
        session: &mut Session,
        tokenizer: &Tokenizer,
        prompt: &[i32],
        route: Route<'_>,
        opts: &GenerateOptions,
    ) -> Result<Stepper> {
        let t0 = Instant::now();
        let sampler = Self::sampler(tokenizer, opts, prompt)?;
        let rows = match opts.prompt_logprobs {
            Some(_) => Logits::All,
            None => Logits::Last,
        };
        let pre = session.prefill(prompt, route, rows)?;
        let n_vocab = session.model().n_vocab();
        let last = pre.logits[pre.logits.len() - n_vocab..].to_vec();
        let prompt_logprobs = match opts.prompt_logprobs {
            Some(n) => pre
                .logits
                .chunks(n_vocab)
                .zip(&prompt[1..])
                .map(|(row, &t)| TokenLogprob::of(row, t, n))
                .collect(),
            None => Vec::new(),
        };
        let mut st = Self::ready(prompt, pre.path, last, opts, sampler, t0);
        st.prompt_logprobs = prompt_logprobs;
        Ok(st)
    }

    /// The request's sampler, told the prompt (the penalties count it, as in llama-server).
    fn sampler(tokenizer: &Tokenizer, opts: &GenerateOptions, prompt: &[i32]) -> Result<Sampler> {
        let s = Sampler::new(&opts.sampling, tokenizer.n_vocab());
        let mut s = match &opts.grammar {
            Some(g) => s.with_grammar(tokenizer.grammar_sampler(g)?),
            None => s,
        };
        s.accept_prompt(prompt);
        Ok(s)
    }

    /// Like [`Stepper::start`] for a session that already holds the first `reused` tokens of
    /// `prompt` (restored from a cache, or left by an earlier request): only the rest is
    /// prefilled, along the session's path. `reused` must be below `prompt.len()`.
    pub fn resume(
        session: &mut Session,
        tokenizer: &Tokenizer,
        prompt: &[i32],
        reused: usize,
        opts: &GenerateOptions,
    ) -> Result<Stepper> {
        let t0 = Instant::now();
        let path = session
            .path()
            .cloned()
            .ok_or_else(|| crate::EngineError::State("resume without a sequence".into()))?;
        if opts.prompt_logprobs.is_some() {
            return Err(crate::EngineError::State(
                "resume: prompt logprobs need the whole prompt prefilled".into(),
            ));
        }
        if reused == 0 || reused >= prompt.len() || session.n_past() != reused {
            return Err(crate::EngineError::State(format!(
                "resume: the session holds {} tokens, {reused} of a prompt of {} asked",
                session.n_past(),
                prompt.len()
            )));
        }
        let sampler = Self::sampler(tokenizer, opts, prompt)?;
        let (logits, _) = session.append(&prompt[reused..], Logits::Last)?;
        let n_vocab = session.model().n_vocab();
        let last = logits[logits.len() - n_vocab..].to_vec();
        Ok(Self::ready(prompt, path, last, opts, sampler, t0))
    }

    fn ready(
        prompt: &[i32],
        path: crate::path::LayerPath,
        logits: Vec<f32>,
        opts: &GenerateOptions,
        sampler: Sampler,
        t0: Instant,
    ) -> Stepper {
        let prefill_secs = t0.elapsed().as_secs_f64();
        Stepper {
            opts: opts.clone(),
            sampler,
            stream: TextStream::default(),
            stops: StopScanner::new(&opts.stop),
            tokens: Vec::new(),
            logits,
            logprobs: Vec::new(),
            prompt_logprobs: Vec::new(),
            n_prompt: prompt.len(),
            path,
            finish: None,
            stopped_by_string: false,
            call_limit: opts.tool_call_limit.as_deref().and_then(CallLimit::new),
            prefill_secs,
            t_decode: Instant::now(),
        }
    }

    /// Another generation from the same prefilled prompt, with its own settings (e.g. another
    /// seed: `n` choices of one request). Only before this one's first step: it starts from
    /// the prompt's logits, so the session must hold the prompt alone when it decodes (restore
    /// a snapshot of it between choices).
    pub fn sibling(
        &self,
        tokenizer: &Tokenizer,
        opts: &GenerateOptions,
        prompt: &[i32],
    ) -> Result<Stepper> {
        if !self.tokens.is_empty() || self.finish.is_some() {
            return Err(crate::EngineError::State(
                "a sibling generation starts before the first token".into(),
            ));
        }
        let sampler = Self::sampler(tokenizer, opts, prompt)?;
        let mut st = Self::ready(
            prompt,
            self.path.clone(),
            self.logits.clone(),
            opts,
            sampler,
            Instant::now(),
        );
        st.prefill_secs = self.prefill_secs;
        st.prompt_logprobs = self.prompt_logprobs.clone();
        Ok(st)
    }

    /// The path the request follows.
    pub fn path(&self) -> &crate::path::LayerPath {
        &self.path
    }

    /// Whether the generation is over.
    pub fn is_done(&self) -> bool {
        self.finish.is_some()
    }

    /// Samples the next token. `n_past` and `n_ctx` are the session's (a full context ends
    /// the generation).
    pub fn step(&mut self, tokenizer: &Tokenizer, n_past: usize, n_ctx: usize) -> Step {
        if self.finish.is_some() {
            return Step::Done;
        }
        if self.tokens.len() >= self.opts.max_tokens {
            self.finish = Some(FinishReason::Length);
            return Step::Done;
        }
        let t = self.sampler.sample(&self.logits);
        if !self.opts.ignore_eos && tokenizer.is_eog(t) {
            self.finish = Some(FinishReason::Stop);
            return Step::Token {
                show: String::new(),
                decode: None,
                logprob: None,
            };
        }
        let logprob = self
            .opts
            .logprobs
            .map(|n| TokenLogprob::of(&self.logits, t, n));
        if let Some(lp) = &logprob {
            self.logprobs.push(lp.clone());
        }
        self.tokens.push(t);
        let special = self.opts.preserved_tokens.contains(&t);
        let piece = self.stream.push(&tokenizer.piece(t, special));
        let (show, hit) = self.stops.push(&piece);
        let too_many_calls = !hit
            && !piece.is_empty()
            && match self.call_limit.as_mut() {
                Some(l) => l.exceeded(self.stops.text()),
                None => false,
            };
        let decode = if too_many_calls {
            self.finish = Some(FinishReason::Stop);
            None
        } else if hit {
            self.finish = Some(FinishReason::Stop);
            self.stopped_by_string = true;
            None
        } else if self.tokens.len() >= self.opts.max_tokens || n_past >= n_ctx {
            self.finish = Some(FinishReason::Length);
            None
        } else {
            Some(t)
        };
        Step::Token {
            show,
            decode,
            logprob,
        }
    }

    /// The logits after decoding the token [`Stepper::step`] asked for.
    pub fn feed(&mut self, logits: &[f32]) {
        self.logits.clear();
        self.logits.extend_from_slice(logits);
    }

    /// Ends the generation early (e.g. the client went away).
    pub fn cancel(&mut self) {
        self.finish = Some(FinishReason::Cancelled);
    }

    /// Ends the generation: what it produced, and the held-back text still to show.
    pub fn end(mut self) -> (Generation, String) {
        let mut finish = self.finish.unwrap_or(FinishReason::Length);
        let mut rest = String::new();
        if !self.stopped_by_string && finish != FinishReason::Cancelled {
            let (r, hit) = self.stops.push(&self.stream.finish());
            rest = r;
            if hit {
                finish = FinishReason::Stop;
            } else {
                rest.push_str(&self.stops.finish());
            }
        }
        let g = Generation {
            text: self.stops.text().to_string(),
            tokens: self.tokens,
            n_prompt: self.n_prompt,
            path: self.path,
            finish,
            logprobs: self.logprobs,
            prompt_logprobs: self.prompt_logprobs,
            prefill_secs: self.prefill_secs,
            decode_secs: self.t_decode.elapsed().as_secs_f64(),
        };
        (g, rest)
    }
}

/// Prefills `prompt` along `route`, then generates. `on_text` receives text as it becomes
/// final and returns false to stop.
pub fn generate(
    session: &mut Session,
    tokenizer: &Tokenizer,
    prompt: &[i32],
    route: Route<'_>,
    opts: &GenerateOptions,
    mut on_text: impl FnMut(&str) -> bool,
) -> Result<Generation> {
    let st = Stepper::start(session, tokenizer, prompt, route, opts)?;
    run_to_end(st, session, tokenizer, |t, _| on_text(t))
}

/// Runs a started generation ([`Stepper::start`] or [`Stepper::resume`]) to its end, decoding
/// one token at a time. `on_text` receives text as it becomes final, with the log-probabilities
/// of the tokens sampled since its last call (with `logprobs`), and returns false to stop (the
/// generation then ends as cancelled); the held-back rest is given to it at the end.
pub fn run_to_end(
    mut st: Stepper,
    session: &mut Session,
    tokenizer: &Tokenizer,
    mut on_text: impl FnMut(&str, &[TokenLogprob]) -> bool,
) -> Result<Generation> {
    let n_ctx = session.options().n_ctx;
    let mut pending = Vec::new();
    while let Step::Token {
        show,
        decode,
        logprob,
    } = st.step(tokenizer, session.n_past(), n_ctx)
    {
        pending.extend(logprob);
        if !show.is_empty() {
            let go_on = on_text(&show, &pending);
            pending.clear();
            if !go_on {
                st.cancel();
                break;
            }
        }
        match decode {
            Some(t) => {
                let logits = session.decode(t)?;
                st.feed(logits);
            }
            None => break,
        }
    }
    let (g, rest) = st.end();
    if !rest.is_empty() || !pending.is_empty() {
        on_text(&rest, &pending);
    }
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::StopScanner;

    #[test]
    fn stop_scanner_holds_back_and_cuts() {
        let mut s = StopScanner::new(&["</end>".to_string()]);
        assert_eq!(s.push("hello <"), ("hello ".to_string(), false));
        assert_eq!(s.push("/en"), (String::new(), false));
        assert_eq!(s.push("d> more"), (String::new(), true));
        assert_eq!(s.text(), "hello ");
        let mut s = StopScanner::new(&["ab".to_string()]);
        assert_eq!(s.push("xa"), ("x".to_string(), false));
        assert_eq!(s.push("c"), ("ac".to_string(), false));
        assert_eq!(s.finish(), "");
        let mut s = StopScanner::new(&[]);
        assert_eq!(s.push("abc"), ("abc".to_string(), false));
    }
}
