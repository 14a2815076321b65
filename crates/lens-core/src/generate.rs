//! Generation with the lens: a backend that can write offers a [`Generator`]
//! ([`crate::Backend::generator`]); each step hands over the states that chose the new token,
//! so a caller reads every layer's prediction for that step with the ordinary lens.
//!
//! [`host_generate`] is the loop on any backend's forward and readout: one forward of the
//! prompt, then one token's forward per step, extending the previous states
//! ([`crate::Backend::forward_until`] with them as the prefix), and the token drawn from the
//! final layer's logits by [`sample`].

use crate::math;
use crate::{Backend, CaptureOptions, Error, HiddenStates, LensKind, Site, Stop};

/// How the next token is drawn from the model's output.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0 (or less): always the most likely token (ties to the lower id).
    pub temperature: f32,
    /// Nucleus sampling: draw from the smallest set of most likely tokens whose probability
    /// reaches `top_p` (1 = the whole vocabulary).
    pub top_p: f32,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

impl Sampling {
    /// The parameters as given, or why they make no sense.
    pub fn validate(&self) -> Result<(), Error> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(Error::Unsupported(format!(
                "temperature {} is not a number ≥ 0",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Unsupported(format!(
                "top-p {} is not in (0, 1]",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// What to generate.
#[derive(Debug, Clone, Copy)]
pub struct GenerateRequest<'a> {
    pub prompt: &'a [u32],
    pub max_tokens: usize,
    pub sampling: Sampling,
}

/// One generated token and what chose it.
#[derive(Debug, Clone, Copy)]
pub struct Step<'a> {
    /// 0-based index of the token among the generated ones.
    pub index: usize,
    pub token: u32,
    /// The states of every token before this one (the prompt and the tokens generated so
    /// far): the last position is the one whose output chose `token`.
    pub states: &'a HiddenStates,
    /// That output: the final layer's logits (norm lens) at the last position.
    pub logits: &'a [f32],
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// `max_tokens` were generated.
    Length,
    /// The model wrote one of its stop tokens (it is the last step's token).
    StopToken(u32),
    /// The model's context is full.
    Context,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Length => "length",
            Finish::StopToken(_) => "stop",
            Finish::Context => "context",
        }
    }
}

/// Generation, offered by backends that can write ([`crate::Backend::generator`]).
pub trait Generator: Send + Sync {
    /// `text` as one user turn in the model's chat template, tokenized, ready for the reply.
    fn chat_prompt(&self, text: &str) -> Result<Vec<u32>, Error>;

    /// Token ids that end generation.
    fn stop_tokens(&self) -> Vec<u32>;

    /// Generate up to `request.max_tokens` tokens after the prompt, calling `on_step` with each
    /// one as soon as it is chosen (an error from `on_step` ends generation with that error).
    /// Returns [`Error::Stopped`] soon after `stop` is raised.
    fn generate(
        &self,
        request: &GenerateRequest<'_>,
        stop: &Stop,
        on_step: &mut dyn FnMut(Step<'_>) -> Result<(), Error>,
    ) -> Result<Finish, Error>;
}

/// The generation loop on `backend`'s own forward and readout (see the module's doc).
pub fn host_generate<B: Backend + ?Sized>(
    backend: &B,
    request: &GenerateRequest<'_>,
    stop_tokens: &[u32],
    stop: &Stop,
    on_step: &mut dyn FnMut(Step<'_>) -> Result<(), Error>,
) -> Result<Finish, Error> {
    request.sampling.validate()?;
    let info = backend.info();
    let mut rng = Rng::new(request.sampling.seed);
    let mut tokens = request.prompt.to_vec();
    let mut states = backend.forward_until(None, &tokens, CaptureOptions::default(), stop)?;
    for index in 0..request.max_tokens {
        let last = tokens.len() - 1;
        let row =
            states
                .row(Site::Layer(info.n_layers), last)
                .ok_or(Error::PositionOutOfRange {
                    position: last,
                    len: tokens.len(),
                })?;
        let logits = backend.readout_until(row, LensKind::Norm, stop)?;
        let token = sample(&logits, &request.sampling, &mut rng);
        on_step(Step {
            index,
            token,
            states: &states,
            logits: &logits,
        })?;
        if stop_tokens.contains(&token) {
            return Ok(Finish::StopToken(token));
        }
        if index + 1 == request.max_tokens {
            break;
        }
        if tokens.len() >= info.context_length {
            return Ok(Finish::Context);
        }
        tokens.push(token);
        stop.check()?;
        states = backend.forward_until(Some(&states), &tokens, CaptureOptions::default(), stop)?;
    }
    Ok(Finish::Length)
}

/// A small seeded generator (SplitMix64): the same seed draws the same tokens everywhere.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Draw the next token from `logits`: the most likely one at temperature 0 (ties to the lower
/// id, as everywhere in the lens), otherwise from `softmax(logits / temperature)` restricted
/// to the top-p nucleus. NaN logits are never drawn.
pub fn sample(logits: &[f32], sampling: &Sampling, rng: &mut Rng) -> u32 {
    let greedy = || math::top_k(logits, 1).first().map_or(0, |t| t.id);
    if sampling.temperature <= 0.0 {
        return greedy();
    }
    let t = f64::from(sampling.temperature);
    let max = f64::from(math::max(logits));
    let mut probs: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .filter(|(_, l)| !l.is_nan())
        .map(|(i, &l)| (i as u32, ((f64::from(l) - max) / t).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    if !(total > 0.0 && total.is_finite()) {
        return greedy();
    }
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let want = f64::from(sampling.top_p) * total;
    let mut mass = 0.0;
    let mut keep = probs.len();
    for (i, p) in probs.iter().enumerate() {
        mass += p.1;
        if mass >= want {
            keep = i + 1;
            break;
        }
    }
    let kept = &probs[..keep];
    let kept_mass: f64 = kept.iter().map(|p| p.1).sum();
    let mut u = rng.next_f64() * kept_mass;
    for &(id, p) in kept {
        if u < p {
            return id;
        }
        u -= p;
    }
    kept.last().map_or_else(greedy, |p| p.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(logits: &[f32], sampling: Sampling, draws: usize, expect: &[u32]) {
        let mut rng = Rng::new(sampling.seed);
        let mut got: Vec<u32> = (0..draws)
            .map(|_| sample(logits, &sampling, &mut rng))
            .collect();
        got.sort_unstable();
        got.dedup();
        assert_eq!(got, expect, "{logits:?} {sampling:?}");
    }

    #[test]
    fn sampling_draws_from_the_nucleus() {
        let greedy = Sampling::default();
        let warm = |top_p| Sampling {
            temperature: 1.0,
            top_p,
            seed: 7,
        };
        // Greedy: the largest logit, ties to the lower id, NaN never.
        check(&[0.0, 3.0, 1.0], greedy, 5, &[1]);
        check(&[2.0, 2.0, 1.0], greedy, 5, &[0]);
        check(&[f32::NAN, 1.0, 0.0], greedy, 5, &[1]);
        // A nucleus of one token is greedy whatever the temperature.
        check(&[0.0, 3.0, 1.0], warm(0.5), 50, &[1]);
        // p = (0.665, 0.245, 0.090): top-p 0.8 keeps two tokens, 1.0 all three.
        check(&[2.0, 1.0, 0.0], warm(0.8), 200, &[0, 1]);
        check(&[2.0, 1.0, 0.0], warm(1.0), 200, &[0, 1, 2]);
        check(&[f32::NAN, 1.0, 1.0], warm(1.0), 200, &[1, 2]);
    }

    #[test]
    fn a_seed_draws_the_same_tokens() {
        let s = Sampling {
            temperature: 1.5,
            top_p: 1.0,
            seed: 42,
        };
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let draw = |seed| {
            let mut rng = Rng::new(seed);
            (0..20)
                .map(|_| sample(&logits, &Sampling { seed, ..s }, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
    }

    #[test]
    fn bad_sampling_parameters_are_refused() {
        let check = |temperature, top_p, expect: Option<&str>| {
            let r = Sampling {
                temperature,
                top_p,
                seed: 0,
            }
            .validate();
            assert_eq!(r.err().map(|e| e.to_string()).as_deref(), expect);
        };
        check(0.0, 1.0, None);
        check(0.7, 0.9, None);
        check(-1.0, 1.0, Some("temperature -1 is not a number ≥ 0"));
        check(f32::NAN, 1.0, Some("temperature NaN is not a number ≥ 0"));
        check(1.0, 0.0, Some("top-p 0 is not in (0, 1]"));
        check(1.0, 1.5, Some("top-p 1.5 is not in (0, 1]"));
    }
}
