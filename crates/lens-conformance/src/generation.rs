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
///   logits are the readout of the last layer at the last position of the step's states (a
///   backend that generates on an engine of its own, [`Backend::engine_logits`]: the most
///   likely token of the engine's logits for the same tokens, and within twice the engine
///   check's bound of the capture's most likely one);
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
            greedy_token(backend, &tokens, step.token, step.logits, step.index);
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

/// The greedy choice at a step: the argmax of the capture's final layer, or for a backend that
/// generates on its own engine, of the engine's own logits for the same tokens (a fresh
/// forward of them, where the engine drew from its incremental step: the two differ by its
/// attention's rounding, as the capture does, so the drawn token must be the engine's argmax
/// where that leads by more than twice the engine check's bound, and within that of it
/// elsewhere), and the capture's logit for it within twice the bound of its own argmax.
fn greedy_token(backend: &dyn Backend, tokens: &[u32], token: u32, logits: &[f32], step: usize) {
    let argmax = math::top_k(logits, 1)[0];
    let Some(engine) = backend.engine_logits(tokens) else {
        assert_eq!(token, argmax.id, "step {step}: greedy token");
        return;
    };
    let engine = engine.unwrap_or_else(|e| panic!("step {step}: the engine's logits: {e}"));
    let vocab = backend.info().vocab_size;
    let row = &engine.logits[engine.logits.len() - vocab..];
    let top = math::top_k(row, 2);
    let margin = 2.0 * engine.bound;
    let chosen = row[token as usize];
    if top[0].logit - top[1].logit > margin {
        assert_eq!(token, top[0].id, "step {step}: the engine's clear argmax");
    }
    assert!(
        chosen >= top[0].logit - margin,
        "step {step}: the engine drew {token} ({chosen}), its argmax is {} ({})",
        top[0].id,
        top[0].logit
    );
    let ours = logits[token as usize];
    assert!(
        ours >= argmax.logit - margin,
        "step {step}: the capture gives the drawn token {token} {ours}, its argmax {} {}",
        argmax.id,
        argmax.logit
    );
}
