//! Extending a prompt from a cached prefix gives the same hidden states as a fresh forward.

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

fn max_diff(a: &HiddenStates, b: &HiddenStates) -> f32 {
    assert_eq!(a.n_positions(), b.n_positions());
    let mut worst = 0f32;
    for l in 0..=a.n_layers() {
        for p in 0..a.n_positions() {
            let (x, y) = (
                a.row(Site::Layer(l), p).expect("row"),
                b.row(Site::Layer(l), p).expect("row"),
            );
            // Relative to the row's scale: position 0 carries activations in the thousands, and
            // the few new tokens go through another kernel (another order of f32 sums), so
            // equal means equal up to f32 rounding at the row's largest value.
            let scale = 1.0 + x.iter().fold(0f32, |m, u| m.max(u.abs()));
            for (u, v) in x.iter().zip(y) {
                worst = worst.max((u - v).abs() / scale);
            }
        }
    }
    worst
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
    let fresh = backend.forward(&longer, opts).expect("forward");
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
    let fresh = backend.forward(&edited, opts).expect("forward");
    let d = max_diff(&reused, &fresh);
    assert!(d < 1e-5, "edit differs by {d}");

    // The same prompt again, and a prefix of it: the cached positions, equal to a fresh
    // forward pass of the prefix (up to the other order of sums of the path for few tokens).
    let same = backend.forward_reusing(&first, &base, opts).expect("same");
    assert_eq!(max_diff(&same, &first), 0.0);
    let head = &base[..base.len() - 3];
    let cut = backend.forward_reusing(&first, head, opts).expect("prefix");
    assert_eq!(cut.tokens(), head);
    let fresh = backend.forward(head, opts).expect("forward");
    let d = max_diff(&cut, &fresh);
    assert!(d < 1e-5, "prefix differs by {d}");
    // ... and it extends like any other state.
    let again = backend
        .forward_reusing(&cut, &longer, opts)
        .expect("extend the prefix");
    let d = max_diff(&again, &backend.forward(&longer, opts).expect("forward"));
    assert!(d < 1e-5, "re-extension differs by {d}");
}
