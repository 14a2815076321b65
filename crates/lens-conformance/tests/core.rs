//! lens-core's `Lens`, `Query` and `host_lens` on the reference backend: fast, no model file.

#![allow(clippy::unwrap_used)]

use lens_conformance::{self as suite, ReferenceBackend};
use lens_core::{
    host_lens, Backend, CaptureOptions, Error, HiddenStates, IndexSpec, Lens, LensKind,
    LensRequest, ModelInfo, PositionView, Query, Site, Stop, Token,
};
use lens_core::{Affine, Translators};
use std::sync::Arc;

fn states(backend: &dyn Backend, text: &str, mid_block: bool) -> HiddenStates {
    let ids = suite::ids(backend, text);
    backend.forward(&ids, CaptureOptions { mid_block }).unwrap()
}

fn query(layers: &str, positions: &str, kind: LensKind, top_k: usize) -> Query {
    Query {
        layers: layers.parse().unwrap(),
        positions: positions.parse().unwrap(),
        kind,
        tuned: None,
        top_k,
    }
}

/// The norm lens of a row by hand: `NORM_W ⊙ h / rms(h)`, then the unembedding, then a
/// plain f64 softmax; (top-1 id, its probability).
fn top1_by_hand(h: [f64; 4]) -> (u32, f64) {
    const U: [[f64; 4]; 12] = [
        [-0.1, 0.8, 0.6, 0.7],
        [0.7, 0.1, -1.5, 1.2],
        [1.5, -1.1, 0.8, 0.2],
        [-1.1, 1.4, -1.5, 0.8],
        [0.3, -0.6, -0.9, 1.2],
        [-0.8, 1.1, -1.5, -1.4],
        [0.3, 0.9, 0.8, 1.5],
        [-1.4, 0.4, 1.3, -1.4],
        [-0.8, -0.8, -1.2, -0.2],
        [-1.2, 1.3, 0.8, -0.6],
        [-1.3, -1.0, 0.5, -0.6],
        [-1.3, -1.0, 0.5, -0.6],
    ];
    let g = [1.2, 0.8, 1.5, 1.0];
    let r = (h.iter().map(|v| v * v).sum::<f64>() / 4.0 + 1e-5).sqrt();
    let logits: Vec<f64> = U
        .iter()
        .map(|u| (0..4).map(|j| u[j] * g[j] * h[j] / r).sum())
        .collect();
    let z: f64 = logits.iter().map(|l| l.exp()).sum();
    let top = (0..12)
        .max_by(|&a, &b| logits[a].total_cmp(&logits[b]).then(b.cmp(&a)))
        .unwrap();
    (top as u32, logits[top].exp() / z)
}

#[test]
fn query_run_reads_the_hand_computed_cell() {
    let b = ReferenceBackend::new();
    let s = states(&b, "the cat sat on the mat", false);
    let answer = query("0,3", "-1", LensKind::Norm, 3)
        .run(&b, &s, &Stop::never())
        .unwrap();
    assert_eq!(answer.layers, [0, 3]);
    assert_eq!((answer.kind, answer.top_k), (LensKind::Norm, 3));
    assert_eq!(answer.views.len(), 1);
    let view = &answer.views[0];
    assert_eq!((view.position, view.token), (5, 5));
    // Layer 0 at "mat" is mat's embedding.
    let (id, p) = top1_by_hand([0.8, -0.5, 0.8, 0.2]);
    let cell = &view.cells[0];
    assert_eq!(cell.site, Site::Layer(0));
    assert_eq!(cell.top.len(), 3);
    assert_eq!(cell.top[0].id, id);
    assert!(
        (f64::from(cell.top[0].prob) - p).abs() < 1e-6,
        "{cell:?} vs {p}"
    );
    // At the last layer the norm lens is the model output.
    assert_eq!(view.cells[1].top[0], view.final_top1);
    assert_eq!(view.cells[1].kl_to_final, 0.0);
    assert_eq!(view.cells[1].final_top1_rank, 0);
    assert_eq!(view.cells[1].final_top1_prob, view.final_top1.prob);
    assert!(
        view.cells[1].next.is_none(),
        "the last position has no next token"
    );
}

/// Translators for the reference model (3 blocks, width 4): layer 0 shifted by `bias`, the
/// others the identity.
fn shifted(bias: [f32; 4]) -> Arc<Translators> {
    let mut layers = Translators::identity("shift", 4, 3).layers().to_vec();
    layers[0] = Affine {
        weight: vec![0.0; 16],
        bias: bias.to_vec(),
    };
    Arc::new(Translators::new("shift", 4, layers).unwrap())
}

#[test]
fn the_tuned_lens_reads_the_translated_row_through_the_norm_readout() {
    let b = ReferenceBackend::new();
    let s = states(&b, "the cat sat on the mat", false);
    let tuned = |t: Arc<Translators>, layers: &str| Query {
        layers: layers.parse().unwrap(),
        positions: "-1".parse().unwrap(),
        top_k: 3,
        ..Query::tuned(t)
    };
    // Layer 0 at "mat" is [0.8, -0.5, 0.8, 0.2]; shifted by b it is [1.0, 0.0, 0.5, 0.3].
    let answer = tuned(shifted([0.2, 0.5, -0.3, 0.1]), "0,3")
        .run(&b, &s, &Stop::never())
        .unwrap();
    assert_eq!(answer.kind, LensKind::Tuned);
    let (id, p) = top1_by_hand([1.0, 0.0, 0.5, 0.3]);
    let cell = &answer.views[0].cells[0];
    assert_eq!(cell.top[0].id, id);
    assert!(
        (f64::from(cell.top[0].prob) - p).abs() < 1e-6,
        "{cell:?} vs {p}"
    );
    // The last layer is untranslated: the model output.
    assert_eq!(answer.views[0].cells[1].kl_to_final, 0.0);
    // Identity translators are the norm lens, cell for cell, also on a backend that reduces
    // on its own device (the tuned lens always runs on the host).
    let device = ReferenceBackend::with_reduce(lens_conformance::Reduce::Device);
    let identity = Arc::new(Translators::identity("id", 4, 3));
    let norm = query("all", "all", LensKind::Norm, 3)
        .run(&b, &s, &Stop::never())
        .unwrap();
    let same = Query {
        positions: IndexSpec::default(),
        ..tuned(identity.clone(), "all")
    }
    .run(&device, &s, &Stop::never())
    .unwrap();
    assert_eq!(same.views, norm.views);
    // The kind without translators, translators of another model, a mid-block site: refused.
    let bare = query("all", "all", LensKind::Tuned, 3).run(&b, &s, &Stop::never());
    assert!(matches!(bare, Err(Error::Unsupported(_))), "{bare:?}");
    let other =
        tuned(Arc::new(Translators::identity("x", 4, 2)), "all").run(&b, &s, &Stop::never());
    assert!(matches!(other, Err(Error::Shape(_))), "{other:?}");
    let mid = states(&b, "the cat", true);
    let r = Lens::new(&b as &dyn Backend, &mid, LensKind::Tuned, 1)
        .with_translators(Some(&identity))
        .position(0, &[Site::MidBlock(1)]);
    assert!(matches!(r, Err(Error::Unsupported(_))), "{r:?}");
}

#[test]
fn selections_resolve_against_the_model_and_the_prompt() {
    let b = ReferenceBackend::new();
    let s = states(&b, "a big dog ran to the large mat", false);
    #[track_caller]
    fn check(b: &ReferenceBackend, s: &HiddenStates, q: Query, expect: &str) {
        let got = match q.run(b, s, &Stop::never()) {
            Ok(a) => format!(
                "layers {:?} positions {:?}",
                a.layers,
                a.views.iter().map(|v| v.position).collect::<Vec<_>>()
            ),
            Err(e) => format!("error: {e}"),
        };
        assert_eq!(got, expect, "{q:?}");
    }
    let norm = |l: &str, p: &str| query(l, p, LensKind::Norm, 5);
    check(
        &b,
        &s,
        norm("all", "all"),
        "layers [0, 1, 2, 3] positions [0, 1, 2, 3, 4, 5, 6, 7]",
    );
    check(
        &b,
        &s,
        norm(":2", "1..3"),
        "layers [0, 2, 3] positions [1, 2, 3]",
    );
    check(&b, &s, norm("-1", "-2,0"), "layers [3] positions [0, 6]");
    check(
        &b,
        &s,
        norm("4", "0"),
        "error: layer 4 does not exist: the model has layers 0..=3",
    );
    check(
        &b,
        &s,
        norm("0", "8"),
        "error: token position 8 is outside the prompt of 8 tokens",
    );
    check(
        &b,
        &s,
        query("0", "0", LensKind::Raw, 0),
        "error: top-k must be 1..=100, not 0",
    );
    let q = norm("1..2", "all");
    assert_eq!(q.layers_of(3).unwrap(), [1, 2]);
    assert!(matches!(q.layers_of(0), Err(Error::Layers(_))));
    assert!(matches!(
        norm("0", "9").positions_of(8),
        Err(Error::Positions(_))
    ));
    assert_eq!(
        Query::default().positions,
        "all".parse::<IndexSpec>().unwrap()
    );
}

#[test]
fn host_lens_validates_its_request() {
    let b = ReferenceBackend::new();
    let s = states(&b, "the cat sat", false);
    let run = |positions: &[usize], sites: &[Site]| {
        let request = LensRequest {
            states: &s,
            positions,
            sites,
            kind: LensKind::Norm,
            translators: None,
            top_k: 2,
        };
        host_lens(&b, &request, &Stop::never()).map(|v| v.len())
    };
    assert_eq!(run(&[2, 0], &[Site::Layer(1)]).unwrap(), 2);
    let r = run(&[0, 3], &[Site::Layer(0)]);
    assert!(
        matches!(
            r,
            Err(Error::PositionOutOfRange {
                position: 3,
                len: 3
            })
        ),
        "{r:?}"
    );
    let r = run(&[0], &[Site::Layer(4)]);
    assert!(
        matches!(r, Err(Error::LayerOutOfRange { layer: 4, max: 3 })),
        "{r:?}"
    );
    let r = run(&[0], &[Site::MidBlock(2)]);
    assert!(
        matches!(r, Err(Error::LayerOutOfRange { layer: 2, max: 3 })),
        "no mid-block rows were captured: {r:?}"
    );
    let stopped = Stop::new();
    stopped.stop();
    let request = LensRequest {
        states: &s,
        positions: &[0],
        sites: &[Site::Layer(0)],
        kind: LensKind::Raw,
        translators: None,
        top_k: 1,
    };
    assert!(matches!(
        host_lens(&b, &request, &stopped),
        Err(Error::Stopped)
    ));
}

#[test]
fn cells_are_consistent_with_the_model_output() {
    let b = ReferenceBackend::new();
    let s = states(&b, "a big dog ran to the large mat", true);
    let lens = Lens::new(&b, &s, LensKind::Norm, 12);
    let mut sites = lens.all_layers();
    sites.extend([Site::MidBlock(1), Site::MidBlock(3)]);
    for view in lens.grid(&sites).unwrap() {
        let final_id = view.final_top1.id;
        for cell in &view.cells {
            // With all 12 predictions listed, the final top-1's own entry carries its
            // probability and rank.
            let at = cell.top.iter().position(|p| p.id == final_id).unwrap();
            assert_eq!(cell.final_top1_prob, cell.top[at].prob, "{cell:?}");
            assert_eq!(
                cell.final_top1_rank,
                cell.top
                    .iter()
                    .filter(|p| p.logit > cell.top[at].logit)
                    .count()
            );
            let total: f64 = cell.top.iter().map(|p| f64::from(p.prob)).sum();
            assert!((total - 1.0).abs() < 1e-5, "{total}");
        }
        // decided_at: the first layer from which on the final top-1 stays top-1.
        let layers = &view.cells[..4];
        let want = (0..4)
            .rev()
            .take_while(|&l| layers[l].top[0].id == final_id)
            .last();
        assert_eq!(view.decided_at, want, "position {}", view.position);
    }
}

#[test]
fn positions_with_logits_hand_back_the_rows_read() {
    let b = ReferenceBackend::new();
    let s = states(&b, "the cat sat on the mat", false);
    let lens = Lens::new(&b, &s, LensKind::Raw, 2);
    let sites = [Site::Layer(0), Site::Layer(2)];
    let both = lens.positions_with_logits(&[4, 1], &sites).unwrap();
    assert_eq!(both.len(), 2);
    for (view, logits) in &both {
        assert_eq!(view, &lens.position(view.position, &sites).unwrap());
        for (i, site) in sites.iter().enumerate() {
            let row = s.row(*site, view.position).unwrap();
            assert_eq!(
                logits.row(i).unwrap(),
                b.readout(row, LensKind::Raw).unwrap()
            );
            let top = &view.cells[i].top[0];
            assert_eq!(logits.prob_and_rank(i, top.id), Some((top.prob, 0)));
        }
    }
}

/// A backend whose lens answers one position short.
struct Short(ReferenceBackend);

impl Backend for Short {
    fn info(&self) -> &ModelInfo {
        self.0.info()
    }
    fn tokenize(&self, text: &str) -> Result<Vec<Token>, Error> {
        self.0.tokenize(text)
    }
    fn decode(&self, id: u32) -> String {
        self.0.decode(id)
    }
    fn forward(&self, tokens: &[u32], options: CaptureOptions) -> Result<HiddenStates, Error> {
        self.0.forward(tokens, options)
    }
    fn readout(&self, rows: &[f32], lens: LensKind) -> Result<Vec<f32>, Error> {
        self.0.readout(rows, lens)
    }
    fn lens(&self, request: &LensRequest<'_>, stop: &Stop) -> Result<Vec<PositionView>, Error> {
        let mut views = self.0.lens(request, stop)?;
        views.pop();
        Ok(views)
    }
}

#[test]
fn lens_refuses_a_backend_answer_of_the_wrong_shape() {
    let b = Short(ReferenceBackend::new());
    let s = states(&b, "the cat sat", false);
    let r = Lens::new(&b, &s, LensKind::Norm, 1).grid(&[Site::Layer(0)]);
    assert!(matches!(r, Err(Error::Shape(_))), "{r:?}");
}

/// `KL(p ‖ q)` of two logit rows in plain f64.
fn kl_by_hand(p: &[f32], q: &[f32]) -> f64 {
    let log_softmax = |row: &[f32]| -> Vec<f64> {
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let z: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum();
        row.iter().map(|&x| x as f64 - m - z.ln()).collect()
    };
    let (lp, lq) = (log_softmax(p), log_softmax(q));
    lp.iter().zip(&lq).map(|(a, b)| a.exp() * (a - b)).sum()
}

#[test]
fn the_diff_lens_compares_aligned_positions_layer_by_layer() {
    let b = ReferenceBackend::new();
    let before = states(&b, "the cat sat on the mat", false);
    let after = states(&b, "the dog sat on the mat", false);
    let diff = query("all", "all", LensKind::Norm, 2)
        .diff(&b, &before, &after, &Stop::never())
        .unwrap();
    assert_eq!(diff.layers, [0, 1, 2, 3]);
    let parts: Vec<_> = diff.pairs.iter().map(|p| p.pair.part.as_str()).collect();
    assert_eq!(
        parts,
        ["prefix", "changed", "suffix", "suffix", "suffix", "suffix"]
    );
    for pd in &diff.pairs {
        let (pb, pa) = (pd.pair.before, pd.pair.after);
        assert_eq!(pd.before_token, before.tokens()[pb]);
        assert_eq!(pd.after_token, after.tokens()[pa]);
        for cell in &pd.cells {
            let site = Site::Layer(cell.layer);
            let rb = b
                .readout(before.row(site, pb).unwrap(), LensKind::Norm)
                .unwrap();
            let ra = b
                .readout(after.row(site, pa).unwrap(), LensKind::Norm)
                .unwrap();
            let want = kl_by_hand(&rb, &ra);
            assert!(
                (cell.kl - want).abs() < 1e-6 * want.max(1.0),
                "position {pa} layer {}: kl {} vs {want}",
                cell.layer,
                cell.kl
            );
            let top = |row: &[f32]| {
                (0..row.len())
                    .max_by(|&x, &y| row[x].total_cmp(&row[y]).then(y.cmp(&x)))
                    .unwrap() as u32
            };
            assert_eq!(cell.before[0].id, top(&rb));
            assert_eq!(cell.after[0].id, top(&ra));
            assert_eq!(cell.top1_changed, top(&rb) != top(&ra));
            for c in &cell.changes {
                let prob = |row: &[f32]| {
                    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                    let z: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum();
                    (row[c.id as usize] as f64 - m).exp() / z
                };
                assert!((f64::from(c.before) - prob(&rb)).abs() < 1e-6);
                assert!((f64::from(c.after) - prob(&ra)).abs() < 1e-6);
            }
        }
        if pd.pair.part == lens_core::Part::Prefix {
            assert!(pd.cells.iter().all(|c| c.kl == 0.0 && !c.top1_changed));
        }
    }
    // The changed word moves the distribution at the edit and after it.
    assert!(diff.pairs[1].cells.iter().any(|c| c.kl > 1e-3));
    // Positions select pairs by their *after* position; layers as everywhere.
    let some = query("1..3", "-2..", LensKind::Raw, 1)
        .diff(&b, &before, &after, &Stop::never())
        .unwrap();
    assert_eq!(some.layers, [1, 2, 3]);
    let afters: Vec<usize> = some.pairs.iter().map(|p| p.pair.after).collect();
    assert_eq!(afters, [4, 5]);
    // A stopped diff is an error, not a partial answer.
    let stop = Stop::new();
    stop.stop();
    assert!(matches!(
        query("all", "all", LensKind::Norm, 1).diff(&b, &before, &after, &stop),
        Err(Error::Stopped)
    ));
}
