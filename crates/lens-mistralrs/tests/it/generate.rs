//! Generation through the mistralrs backend: mistral.rs's engine draws the tokens; greedy steps
//! are the argmax of its own logits and the capture's final layer agrees, each step a
//! one-token forward equal to a fresh forward (the suite's check); the chat template and the
//! stop tokens are mistral.rs's.

use std::time::Instant;

use lens_conformance as suite;
use lens_core::{GenerateRequest, Sampling, Stop};

use crate::{backend, smollm2, F32, FAST};

#[test]
fn greedy_generation_is_the_engines_argmax_and_the_captures() {
    for options in [F32, FAST] {
        let b = backend(&smollm2(), options);
        let prompt = suite::ids(&*b, "The capital of France is");
        let out = suite::generation(&*b, &prompt, 8);
        let text: String = out.tokens.iter().map(|&t| b.decode(t)).collect();
        eprintln!(
            "{}: {text:?} ({:?}, reuse {:.1e})",
            options.precision, out.finish, out.reuse
        );
        assert!(text.contains("Paris"), "{text:?}");
    }
}

#[test]
fn a_chat_reply_ends_at_the_end_of_turn_token() {
    let b = backend(&smollm2(), F32);
    let prompt = b
        .generator()
        .unwrap()
        .chat_prompt("What is the capital of France? Answer in one word.")
        .unwrap();
    let out = suite::generation(&*b, &prompt, 24);
    let text: String = out.tokens.iter().map(|&t| b.decode(t)).collect();
    eprintln!("{text:?} ({:?})", out.finish);
    // The engine stopped on a stop token: its id is read back from the answer's text.
    let lens_core::Finish::StopToken(end) = out.finish else {
        panic!("{:?}: {text:?}", out.finish)
    };
    assert_eq!(b.decode(end), "<|im_end|>");
    assert!(text.contains("Paris"), "{text:?}");
}

#[test]
fn a_generation_step_is_one_tokens_forward() {
    let b = backend(&smollm2(), F32);
    let generator = b.generator().unwrap();
    let prompt = suite::ids(
        &*b,
        &"The sun rises in the east and sets in the west. ".repeat(8),
    );
    let mut times = Vec::new();
    let mut last = Instant::now();
    let request = GenerateRequest {
        prompt: &prompt,
        max_tokens: 6,
        sampling: Sampling {
            temperature: 0.8,
            top_p: 0.95,
            seed: 3,
        },
    };
    generator
        .generate(&request, &Stop::never(), &mut |_| {
            times.push(last.elapsed());
            last = Instant::now();
            Ok(())
        })
        .unwrap();
    let t = Instant::now();
    b.forward(&prompt, Default::default()).unwrap();
    let full = t.elapsed();
    let step = times[1..].iter().min().unwrap();
    eprintln!(
        "{} prompt tokens: forward {full:?}, steps {times:?}",
        prompt.len()
    );
    assert!(
        *step * 3 < full,
        "a step {step:?} against the prompt's forward {full:?}"
    );
}

#[test]
fn the_chat_prompt_is_the_models_template() {
    let b = backend(&smollm2(), F32);
    let ids = b
        .generator()
        .unwrap()
        .chat_prompt("What is the capital of France?")
        .unwrap();
    let text: String = ids.iter().map(|&t| b.decode(t)).collect();
    eprintln!("{text:?}");
    assert!(text.starts_with("<|im_start|>"), "{text:?}");
    assert!(
        text.contains("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"),
        "{text:?}"
    );
    assert!(text.ends_with("<|im_start|>assistant\n"), "{text:?}");
    // The end of a turn ends generation.
    let end = ids.iter().find(|&&t| b.decode(t) == "<|im_end|>").unwrap();
    let stops = b.generator().unwrap().stop_tokens();
    assert!(stops.contains(end), "{stops:?} lacks {end}");
}
