//! The tuned lens on the oracle's tiny Llama: a lens of the `tuned-lens` Python package gives
//! that package's numbers (goldens by `tests/data/make_tuned_lens_golden.py`), our file
//! round-trips and refuses another model, and training lowers the KL.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::Arc;

use lens_candle::{CandleBackend, Precision};
use lens_core::{Backend, CaptureOptions, Query, Stop};
use lens_tuned::{Batch, LensStats, Meta, TrainOptions, Trainer};
use serde_json::Value;

fn data(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/data")
        .join(path)
}

fn tiny_llama() -> CandleBackend {
    CandleBackend::load(&data("oracle/tiny-llama"), Precision::F32).unwrap()
}

fn ids(backend: &dyn Backend, text: &str) -> Vec<u32> {
    backend
        .tokenize(text)
        .unwrap()
        .iter()
        .map(|t| t.id)
        .collect()
}

#[test]
fn a_lens_of_the_python_package_gives_its_probabilities() {
    let backend = tiny_llama();
    let lens = lens_tuned::load(&data("tuned-lens"), &backend).unwrap();
    assert!(lens.meta.is_none());
    let query = Query {
        top_k: 5,
        ..Query::tuned(Arc::new(lens.translators))
    };
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(data("tuned-lens/golden.json")).unwrap())
            .unwrap();
    let mut checked = 0;
    for prompt in golden["prompts"].as_array().unwrap() {
        let text = prompt["text"].as_str().unwrap();
        let tokens = ids(&backend, text);
        let want: Vec<u32> = serde_json::from_value(prompt["token_ids"].clone()).unwrap();
        assert_eq!(tokens, want, "{text}");
        let states = backend.forward(&tokens, CaptureOptions::default()).unwrap();
        let answer = query.run(&backend, &states, &Stop::never()).unwrap();
        for layer in prompt["layers"].as_array().unwrap() {
            let l = layer["layer"].as_u64().unwrap() as usize;
            for (p, view) in answer.views.iter().enumerate() {
                let cell = &view.cells[l];
                let ids: Vec<u32> = serde_json::from_value(layer["top5_ids"][p].clone()).unwrap();
                let probs: Vec<f64> =
                    serde_json::from_value(layer["top5_probs"][p].clone()).unwrap();
                let kl = layer["kl_to_final"][p].as_f64().unwrap();
                let got: Vec<u32> = cell.top.iter().map(|t| t.id).collect();
                assert_eq!(got, ids, "{text:?} layer {l} position {p}");
                for (t, want) in cell.top.iter().zip(&probs) {
                    let d = (f64::from(t.prob) - want).abs();
                    assert!(
                        d < 1e-4,
                        "{text:?} layer {l} position {p}: {} vs {want}",
                        t.prob
                    );
                }
                assert!(
                    (cell.kl_to_final - kl).abs() < 1e-4,
                    "{text:?} layer {l} position {p}: KL {} vs {kl}",
                    cell.kl_to_final
                );
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 4 * (8 + 10), "every golden cell was compared");
}

#[test]
fn our_file_round_trips_and_refuses_another_model() {
    let backend = tiny_llama();
    let weights = lens_tuned::readout_weights(&backend).unwrap();
    let python = lens_tuned::load(&data("tuned-lens"), &backend).unwrap();
    let mut meta = Meta::of(backend.info(), &weights);
    meta.steps = 7;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lens.safetensors");
    lens_tuned::save(&path, &python.translators, &meta).unwrap();
    let ours = lens_tuned::load(&path, &backend).unwrap();
    assert_eq!(ours.meta.as_ref(), Some(&meta));
    assert_eq!(ours.translators.layers(), python.translators.layers());

    // Another model: the tiny GPT-2 (another architecture and shape) …
    let gpt2 = CandleBackend::load(&data("oracle/tiny-gpt2"), Precision::F32).unwrap();
    let err = lens_tuned::load(&path, &gpt2).unwrap_err().to_string();
    assert!(err.contains("tuned lens for another model"), "{err}");
    assert!(err.contains("architecture is llama"), "{err}");
    // … and the same shape with another unembedding.
    let mut other = meta.clone();
    other.unembedding_sha256 = "0".repeat(64);
    lens_tuned::save(&path, &python.translators, &other).unwrap();
    let err = lens_tuned::load(&path, &backend).unwrap_err().to_string();
    assert!(err.contains("unembedding's SHA-256"), "{err}");
    // The Python lens on GPT-2: its shapes do not fit.
    let err = lens_tuned::load(&data("tuned-lens"), &gpt2)
        .unwrap_err()
        .to_string();
    assert!(err.contains("4 translators of width 64"), "{err}");
}

#[test]
fn training_lowers_the_kl_of_every_layer() {
    let backend = tiny_llama();
    let weights = lens_tuned::readout_weights(&backend).unwrap();
    let n = backend.info().n_layers;
    let start = lens_core::Translators::identity("t", backend.info().hidden_size, n);
    let options = TrainOptions {
        steps: 30,
        lr: 1e-2,
        weight_decay: 0.0,
    };
    let mut trainer = Trainer::new(&start, &weights, options, 0).unwrap();
    let text = "The capital of France is Paris. The capital of Germany is Berlin.";
    let states = backend
        .forward(&ids(&backend, text), CaptureOptions::default())
        .unwrap();
    let batch = Batch::of(&[&states]);
    let eval = |t: lens_core::Translators| {
        let answer = Query::tuned(Arc::new(t))
            .run(&backend, &states, &Stop::never())
            .unwrap();
        let mut s = LensStats::new("t");
        s.add(&answer);
        s.layers()
    };
    let before = eval(start.clone());
    let first = trainer.step(&batch).unwrap();
    // The trainer's loss at identity translators is the pipeline's KL of the norm lens.
    for (l, kl) in first.iter().enumerate() {
        assert!(
            (f64::from(*kl) - before[l].kl).abs() < 1e-4 * (1.0 + before[l].kl),
            "layer {l}: {kl} vs {}",
            before[l].kl
        );
    }
    for _ in 1..options.steps {
        trainer.step(&batch).unwrap();
    }
    let after = eval(trainer.translators("t").unwrap());
    for l in 0..n {
        assert!(
            after[l].kl < 0.8 * before[l].kl,
            "layer {l}: KL {} after training, {} before",
            after[l].kl,
            before[l].kl
        );
    }
    assert_eq!(after[n].kl, 0.0, "the last layer is the model output");
}

#[test]
fn a_resumed_run_goes_on_with_its_saved_moments() {
    let backend = tiny_llama();
    let weights = lens_tuned::readout_weights(&backend).unwrap();
    let info = backend.info().clone();
    let start = lens_core::Translators::identity("t", info.hidden_size, info.n_layers);
    let options = TrainOptions {
        steps: 6,
        lr: 1e-2,
        weight_decay: 1e-3,
    };
    let states = backend
        .forward(
            &ids(&backend, "Once upon a time, there was a little cat."),
            CaptureOptions::default(),
        )
        .unwrap();
    let batch = Batch::of(&[&states]);
    let train = |trainer: &mut Trainer, steps: usize| {
        for _ in 0..steps {
            trainer.step(&batch).unwrap();
        }
    };
    let mut straight = Trainer::new(&start, &weights, options, 0).unwrap();
    train(&mut straight, 6);

    // Three steps, saved as `tune` saves them, read back and three more.
    let dir = tempfile::tempdir().unwrap();
    let lens = dir.path().join("lens.safetensors");
    let adam = lens_tuned::adam_path(&lens);
    assert_eq!(adam, dir.path().join("lens.adam.safetensors"));
    let mut first = Trainer::new(&start, &weights, options, 0).unwrap();
    train(&mut first, 3);
    let mut meta = Meta::of(&info, &weights);
    meta.steps = 3;
    lens_tuned::save(&lens, &first.translators("t").unwrap(), &meta).unwrap();
    lens_tuned::save_adam(&adam, &first.adam_state().unwrap(), 3).unwrap();
    let file = lens_tuned::load(&lens, &backend).unwrap();
    let (state, saved_at) = lens_tuned::read_adam(&adam, info.hidden_size, info.n_layers).unwrap();
    assert_eq!(saved_at, 3);
    assert_eq!(state, first.adam_state().unwrap());
    let resume = |restore: bool| {
        let mut t = Trainer::new(&file.translators, &weights, options, 3).unwrap();
        if restore {
            t.restore(&state).unwrap();
        }
        train(&mut t, 3);
        t.translators("t").unwrap()
    };
    let gap = |a: &lens_core::Translators| {
        a.layers()
            .iter()
            .zip(straight.translators("t").unwrap().layers())
            .flat_map(|(x, y)| {
                x.weight
                    .iter()
                    .zip(&y.weight)
                    .chain(x.bias.iter().zip(&y.bias))
                    .map(|(p, q)| (p - q).abs())
            })
            .fold(0f32, f32::max)
    };
    let resumed = gap(&resume(true));
    assert!(
        resumed <= 1e-6,
        "resumed with the moments: {resumed} from the straight run"
    );
    // Without them the run takes other steps: the check above can fail.
    let restarted = gap(&resume(false));
    assert!(restarted > 1e-3, "restarted moments: {restarted}");

    // A state of another lens's shape is refused with the file named.
    let err = lens_tuned::read_adam(&adam, info.hidden_size, info.n_layers + 1)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("lens.adam.safetensors") && err.contains("layers"),
        "{err}"
    );
}
