//! Extending a prompt from a cached prefix gives the same hidden states as a fresh forward.

use std::sync::Arc;

use lens_candle::Precision;
use lens_core::{Backend, CaptureOptions, HiddenStates, Site};

fn ids(backend: &dyn Backend, text: &str) -> Vec<u32> {
    backend
        .tokenize(text)
        .expect("tokenize")
        .iter()
        .map(|t| t.id)
        .collect()
}

/// The largest difference between the rows of `a` and `b` at every captured site (block
/// boundaries and, when captured, mid-block), relative to each row's scale. Every value must be
/// finite: a NaN would otherwise drop out of the maximum.
fn max_diff(a: &HiddenStates, b: &HiddenStates) -> f32 {
    assert_eq!(a.n_positions(), b.n_positions());
    assert_eq!(a.tokens(), b.tokens());
    assert_eq!(a.has_mid_block(), b.has_mid_block());
    let mut sites: Vec<Site> = (0..=a.n_layers()).map(Site::Layer).collect();
    if a.has_mid_block() {
        sites.extend((1..=a.n_layers()).map(Site::MidBlock));
    }
    let mut worst = 0f32;
    let mut cells = 0;
    for &site in &sites {
        for p in 0..a.n_positions() {
            let (x, y) = (a.row(site, p).expect("row"), b.row(site, p).expect("row"));
            assert_eq!(x.len(), y.len());
            assert!(
                x.iter().chain(y).all(|v| v.is_finite()),
                "{site:?} at {p}: not finite"
            );
            // Relative to the row's scale: position 0 carries activations in the thousands, and
            // the few new tokens go through another kernel (another order of f32 sums), so
            // equal means equal up to f32 rounding at the row's largest value.
            let scale = 1.0 + x.iter().fold(0f32, |m, u| m.max(u.abs()));
            for (u, v) in x.iter().zip(y) {
                worst = worst.max((u - v).abs() / scale);
            }
            cells += x.len();
        }
    }
    assert_eq!(cells, sites.len() * a.n_positions() * a.hidden_size());
    worst
}

/// How many leading positions `b` shares with `a` (the same rows in memory, not copies), at
/// the block boundaries and mid-block alike.
fn shared_positions(a: &HiddenStates, b: &HiddenStates) -> usize {
    let same = |x: &[Arc<[f32]>], y: &[Arc<[f32]>]| {
        x.iter()
            .zip(y)
            .take_while(|(u, v)| Arc::ptr_eq(u, v))
            .count()
    };
    let n = same(a.position_rows(), b.position_rows());
    if let (Some(x), Some(y)) = (a.mid_position_rows(), b.mid_position_rows()) {
        assert_eq!(same(x, y), n, "mid-block rows shared like the others");
    }
    n
}

#[test]
fn extending_and_editing_reuse_the_prefix_exactly() {
    let backend = crate::smollm2(Precision::F32);
    let opts = CaptureOptions { mid_block: true };
    let base = ids(
        &*backend,
        "The capital of France is Paris. The capital of Poland is",
    );
    let first = backend.forward(&base, opts).expect("forward");

    // Append tokens.
    let longer = ids(
        &*backend,
        "The capital of France is Paris. The capital of Poland is Warsaw, and",
    );
    assert!(longer.starts_with(&base));
    let reused = backend
        .forward_reusing(&first, &longer, opts)
        .expect("extend");
    // The whole cached prompt is reused, and only the new tokens are computed.
    assert_eq!(shared_positions(&first, &reused), base.len());
    let fresh = backend.forward(&longer, opts).expect("forward");
    assert_eq!(shared_positions(&fresh, &reused), 0);
    let d = max_diff(&reused, &fresh);
    assert!(d < 1e-5, "extension differs by {d}");
    assert!(reused.has_mid_block());
    assert_eq!(
        reused
            .row(Site::MidBlock(3), longer.len() - 1)
            .map(<[f32]>::len),
        Some(576)
    );

    // Edit in the middle: only the shared prefix is reused.
    let edited = ids(
        &*backend,
        "The capital of Germany is Paris. The capital of Poland is",
    );
    let reused = backend
        .forward_reusing(&first, &edited, opts)
        .expect("edit");
    let common = base.iter().zip(&edited).take_while(|(a, b)| a == b).count();
    assert!(common > 0 && common < base.len());
    assert_eq!(shared_positions(&first, &reused), common);
    let fresh = backend.forward(&edited, opts).expect("forward");
    let d = max_diff(&reused, &fresh);
    assert!(d < 1e-5, "edit differs by {d}");

    // The same prompt again, and a prefix of it: the cached positions, equal to a fresh
    // forward pass of the prefix (up to the other order of sums of the path for few tokens).
    let same = backend.forward_reusing(&first, &base, opts).expect("same");
    assert_eq!(shared_positions(&first, &same), base.len());
    assert_eq!(max_diff(&same, &first), 0.0);
    let head = &base[..base.len() - 3];
    let cut = backend.forward_reusing(&first, head, opts).expect("prefix");
    assert_eq!(cut.tokens(), head);
    assert_eq!(shared_positions(&first, &cut), head.len());
    let fresh = backend.forward(head, opts).expect("forward");
    let d = max_diff(&cut, &fresh);
    assert!(d < 1e-5, "prefix differs by {d}");
    // ... and it extends like any other state.
    let again = backend
        .forward_reusing(&cut, &longer, opts)
        .expect("extend the prefix");
    assert_eq!(shared_positions(&cut, &again), head.len());
    let d = max_diff(&again, &backend.forward(&longer, opts).expect("forward"));
    assert!(d < 1e-5, "re-extension differs by {d}");
}
