//! The generation check: a backend's [`lens_core::Generator`] at temperature 0 against its own
//! fresh forward passes.

use lens_core::{
    math, Backend, CaptureOptions, Error, Finish, GenerateRequest, LensKind, Sampling, Site, Stop,
};

use crate::checks::{assert_states_close, REUSE_BOUND};

/// What [`generation`] measured.
#[derive(Debug, Clone)]
pub struct Generated {
    pub tokens: Vec<u32>,
    pub finish: Finish,
    /// Largest deviation of a step's states from a fresh forward of the same tokens.
    pub reuse: f64,
}

/// `backend` generates (it offers a generator); at temperature 0, up to `n` tokens after
/// `prompt`:
/// - each step's token is the most likely token of the step's final-layer logits, and those
///   logits are the readout of the last layer at the last position of the step's states;
/// - each step's states cover the prompt and the tokens generated before it, and equal a
///   fresh forward of those tokens (within [`REUSE_BOUND`]): extending the cache one token at
///   a time is the same forward;
/// - it ends after `n` tokens or at a stop token, which is then the last token;
/// - the same request again generates the same tokens;
/// - a [`Stop`] raised during the first step ends generation with [`Error::Stopped`].
pub fn generation(backend: &dyn Backend, prompt: &[u32], n: usize) -> Generated {
    let generator = backend
        .generator()
        .unwrap_or_else(|| panic!("{} offers no generator", backend.info().name));
    let info = backend.info();
    let request = GenerateRequest {
        prompt,
        max_tokens: n,
        sampling: Sampling::default(),
    };
    let mut tokens = prompt.to_vec();
    let mut reuse = 0f64;
    let finish = generator
        .generate(&request, &Stop::new(), &mut |step| {
            assert_eq!(step.index, tokens.len() - prompt.len(), "step index");
            assert_eq!(
                step.states.tokens(),
                &tokens[..],
                "step {}: states",
                step.index
            );
            let last = step
                .states
                .row(Site::Layer(info.n_layers), tokens.len() - 1)
                .expect("the last position's last layer");
            let readout = backend.readout(last, LensKind::Norm).expect("readout");
            assert_eq!(readout, step.logits, "step {}: logits", step.index);
            let argmax = math::top_k(step.logits, 1)[0].id;
            assert_eq!(step.token, argmax, "step {}: greedy token", step.index);
            let fresh = backend
                .forward(&tokens, CaptureOptions::default())
                .expect("fresh forward");
            let what = format!("step {}: states against a fresh forward", step.index);
            reuse = reuse.max(assert_states_close(step.states, &fresh, REUSE_BOUND, &what));
            tokens.push(step.token);
            Ok(())
        })
        .unwrap_or_else(|e| panic!("generate: {e}"));
    let generated = tokens[prompt.len()..].to_vec();
    match finish {
        Finish::Length => assert_eq!(generated.len(), n, "finished by length"),
        Finish::StopToken(t) => {
            assert_eq!(generated.last(), Some(&t), "the stop token ends the text");
            assert!(generator.stop_tokens().contains(&t), "{t} is a stop token");
        }
        Finish::Context => assert_eq!(tokens.len(), info.context_length, "context full"),
    }
    let mut again = Vec::new();
    generator
        .generate(&request, &Stop::new(), &mut |step| {
            again.push(step.token);
            Ok(())
        })
        .unwrap_or_else(|e| panic!("generate again: {e}"));
    assert_eq!(
        again, generated,
        "the same request generates the same tokens"
    );

    let stop = Stop::new();
    let r = generator.generate(&request, &stop, &mut |_| {
        stop.stop();
        Ok(())
    });
    assert!(
        matches!(r, Err(Error::Stopped)) || (n == 1 && r.is_ok()),
        "a stop raised during the first step: {r:?}"
    );
    Generated {
        tokens: generated,
        finish,
        reuse,
    }
}
