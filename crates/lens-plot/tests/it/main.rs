//! lens-plot on real lens results: the tiny random Llama fixture through lens-candle.

mod browser;
mod html;
mod png;
mod snapshot;
mod tracks;

use std::path::PathBuf;
use std::sync::OnceLock;

use lens_candle::{CandleBackend, Precision};
use lens_core::{Backend, CaptureOptions, HiddenStates, Lens, LensKind, PositionView, Site, Token};
use lens_plot::{Options, Plot, Track};

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
    pub views: Vec<PositionView>,
    pub layers: Vec<usize>,
    pub tracks: Vec<Track>,
}

pub fn run(prompt: &str, top_k: usize) -> Run {
    let b = backend();
    let tokens = b.tokenize(prompt).expect("tokenize");
    let ids: Vec<u32> = tokens.iter().map(|t| t.id).collect();
    let states = b.forward(&ids, CaptureOptions::default()).expect("forward");
    let layers: Vec<usize> = (0..=b.info().n_layers).collect();
    let sites: Vec<Site> = layers.iter().map(|&l| Site::Layer(l)).collect();
    let views = Lens::new(b, &states, LensKind::Norm, top_k)
        .grid(&sites)
        .expect("lens");
    let tracks = lens_plot::tracks(b, &states, LensKind::Norm, &views, &layers).expect("tracks");
    Run {
        tokens,
        states,
        views,
        layers,
        tracks,
    }
}

pub fn decode(id: u32) -> String {
    backend().decode(id)
}

impl Run {
    pub fn plot(&self) -> Plot<'_> {
        Plot {
            views: &self.views,
            tokens: &self.tokens,
            layers: &self.layers,
            decode: &decode,
            model: "tiny-llama",
            lens: LensKind::Norm,
            tracks: &self.tracks,
        }
    }
}

pub fn options() -> Options {
    Options::default()
}
