//! lens-plot on real lens results: the tiny random Llama fixture through lens-candle.

mod browser;
mod html;
mod png;
mod snapshot;
mod tracks;

use std::path::PathBuf;
use std::sync::OnceLock;

use lens_candle::{CandleBackend, Precision};
use lens_core::{Answer, Backend, CaptureOptions, HiddenStates, PositionView, Query, Stop, Token};
use lens_plot::{Options, Plot};

pub fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data")
}

pub fn backend() -> &'static CandleBackend {
    static B: OnceLock<CandleBackend> = OnceLock::new();
    B.get_or_init(|| {
        CandleBackend::load(&data_dir().join("oracle/tiny-llama"), Precision::F32)
            .expect("load tiny-llama")
    })
}

/// A prompt run through the lens at every layer.
pub struct Run {
    pub tokens: Vec<Token>,
    pub states: HiddenStates,
    pub answer: Answer,
    pub views: Vec<PositionView>,
    pub layers: Vec<usize>,
}

pub fn run(prompt: &str, top_k: usize) -> Run {
    let b = backend();
    let tokens = b.tokenize(prompt).expect("tokenize");
    let ids: Vec<u32> = tokens.iter().map(|t| t.id).collect();
    let states = b.forward(&ids, CaptureOptions::default()).expect("forward");
    let query = Query {
        top_k,
        ..Query::default()
    };
    let answer = query.run(b, &states, &Stop::never()).expect("lens");
    Run {
        tokens,
        states,
        views: answer.views.clone(),
        layers: answer.layers.clone(),
        answer,
    }
}

pub fn decode(id: u32) -> String {
    backend().decode(id)
}

impl Run {
    pub fn plot(&self) -> Plot<'_> {
        Plot {
            answer: &self.answer,
            tokens: &self.tokens,
            decode: &decode,
            model: "tiny-llama",
        }
    }
}

pub fn options() -> Options {
    Options::default()
}
