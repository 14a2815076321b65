//! Pipeline stages (`Stage`): the blocks of a model split over stages, each run on the rows
//! the previous one produced, give the whole model's residual stream, for a fresh prompt and
//! for a prompt extended from each stage's own cached keys and values.

use std::path::Path;
use std::sync::Arc;

use lens_candle::{CandleBackend, Precision, Stage, StageInput};
use lens_core::{Backend, CaptureOptions, LensKind, Site, Stop};

/// Per stage, the keys and values of each position.
type StageKv = Vec<Vec<Arc<[f32]>>>;

/// Run `tokens[past_len..]` through `stages` in order (each extending its own `past`), and
/// return each new position's rows for layers `0..=N` and each stage's new keys and values.
fn pipeline(
    stages: &[Stage],
    tokens: &[u32],
    past: &[Vec<Arc<[f32]>>],
) -> (Vec<Vec<f32>>, StageKv) {
    let hidden = stages[0].info().hidden_size;
    let start = past.first().map_or(0, Vec::len);
    let new = &tokens[start..];
    let mut rows: Vec<Vec<f32>> = vec![Vec::new(); new.len()];
    let mut carry: Vec<f32> = Vec::new();
    let mut kvs = Vec::new();
    for (s, stage) in stages.iter().enumerate() {
        let input = match s {
            0 => StageInput::Tokens(new),
            _ => StageInput::Rows(&carry),
        };
        let no_past = Vec::new();
        let run = stage
            .run(input, past.get(s).unwrap_or(&no_past), &Stop::never())
            .expect("stage runs");
        carry.clear();
        for (p, r) in run.rows.iter().enumerate() {
            // The stage's input row is the previous stage's last one: keep it once.
            let skip = if s == 0 { 0 } else { hidden };
            rows[p].extend_from_slice(&r[skip..]);
            carry.extend_from_slice(&r[r.len() - hidden..]);
        }
        kvs.push(run.kv);
    }
    (rows, kvs)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn check(path: &Path, n_stages: usize, prompt: &[u32], edited: &[u32], keep: usize) {
    let whole = CandleBackend::load(path, Precision::F32).expect("load");
    let stages: Vec<Stage> = (0..n_stages)
        .map(|i| Stage::load(path, Precision::F32, n_stages, i).expect("load a stage"))
        .collect();
    let n = whole.info().n_layers;
    // The stages cover the blocks once, in order.
    let ranges: Vec<_> = stages.iter().map(Stage::blocks).collect();
    assert_eq!(ranges.first().map(|r| r.start), Some(0));
    assert_eq!(ranges.last().map(|r| r.end), Some(n));
    assert!(
        ranges.windows(2).all(|w| w[0].end == w[1].start),
        "{ranges:?}"
    );

    let fresh = whole
        .forward(prompt, CaptureOptions::default())
        .expect("forward");
    let (rows, kvs) = pipeline(&stages, prompt, &[]);
    for (p, r) in rows.iter().enumerate() {
        let want = &fresh.position_rows()[p];
        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(max_diff(r, want) <= 1e-5 * scale, "position {p}");
    }
    // An edit: each stage keeps the keys and values of its first `keep` positions.
    let past: StageKv = kvs.iter().map(|kv| kv[..keep].to_vec()).collect();
    let (rows, _) = pipeline(&stages, edited, &past);
    let want = whole
        .forward(edited, CaptureOptions::default())
        .expect("forward");
    assert_eq!(rows.len(), edited.len() - keep);
    for (i, r) in rows.iter().enumerate() {
        let w = &want.position_rows()[keep + i];
        let scale = w.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(
            max_diff(r, w) <= 1e-5 * scale,
            "edited position {}",
            keep + i
        );
    }
    // Every stage reads the same lens as the whole model.
    let last = want.row(Site::Layer(n), edited.len() - 1).expect("row");
    let a = whole.readout(last, LensKind::Norm).expect("readout");
    for stage in &stages {
        assert_eq!(stage.readout(last, LensKind::Norm).expect("readout"), a);
    }
}

#[test]
fn two_stages_of_the_tiny_llama_equal_the_whole_model() {
    let path = crate::data_dir().join("oracle/tiny-llama/tiny-llama.f32.gguf");
    // 12 tokens: the tensor path; the 3-token edit after 10: the small path.
    let prompt: Vec<u32> = (1..13).collect();
    let mut edited = prompt[..10].to_vec();
    edited.extend([40, 41, 42]);
    check(&path, 2, &prompt, &edited, 10);
}

#[test]
fn three_stages_of_smollm2_equal_the_whole_model() {
    let path = crate::default_model_path();
    let prompt: Vec<u32> = (100..120).collect();
    let mut edited = prompt[..6].to_vec();
    edited.extend(200..220);
    check(&path, 3, &prompt, &edited, 6);
}

#[test]
fn a_stage_refuses_what_it_does_not_hold() {
    let path = crate::data_dir().join("oracle/tiny-llama/tiny-llama.f32.gguf");
    let second = Stage::load(&path, Precision::F32, 2, 1).expect("load");
    let err = second
        .run(StageInput::Tokens(&[1, 2]), &[], &Stop::never())
        .expect_err("no embeddings");
    assert!(err.to_string().contains("embeddings"), "{err}");
    let n = second.info().n_layers;
    let err = Stage::load(&path, Precision::F32, n + 1, 0)
        .err()
        .expect("more stages than blocks");
    assert!(
        err.to_string().contains("each stage needs a block"),
        "{err}"
    );
}
