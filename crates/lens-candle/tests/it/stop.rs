//! A raised [`Stop`] ends a forward pass or a readout with `Error::Stopped`; one never raised
//! changes nothing.

use std::time::Duration;

use lens_candle::Precision;
use lens_core::{Backend, CaptureOptions, Error, LensKind, Site, Stop};

fn ids(backend: &dyn Backend, text: &str) -> Vec<u32> {
    let tokens = backend.tokenize(text).expect("tokenize");
    tokens.iter().map(|t| t.id).collect()
}

#[test]
fn a_raised_stop_ends_the_work_and_an_unraised_one_changes_nothing() {
    let backend = crate::smollm2(Precision::F32);
    let opts = CaptureOptions::default();
    let text = "The sun rises in the east and sets in the west. ".repeat(12);
    let long = ids(&*backend, &text);
    let short = ids(&*backend, "The capital of France is Paris");

    // Raised before: nothing runs.
    let stopped = Stop::new();
    stopped.stop();
    for prefix in [
        None,
        Some(&backend.forward(&short[..3], opts).expect("prefix")),
    ] {
        let r = backend.forward_until(prefix, &short, opts, &stopped);
        assert!(matches!(r, Err(Error::Stopped)), "{:?}", r.err());
    }
    let rows = vec![0.5f32; 2 * backend.info().hidden_size];
    let r = backend.readout_until(&rows, LensKind::Norm, &stopped);
    assert!(matches!(r, Err(Error::Stopped)), "{:?}", r.err());

    // Raised while a long prompt (the tensor path) runs: it stops.
    let stop = Stop::new();
    let raiser = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            stop.stop();
        })
    };
    let r = backend.forward_until(None, &long, opts, &stop);
    raiser.join().expect("join");
    assert!(
        matches!(r, Err(Error::Stopped)),
        "{} tokens: {:?}",
        long.len(),
        r.err()
    );

    // Never raised: the same states and logits as without a stop (the same code paths).
    let never = Stop::new();
    let prefix = backend.forward(&short[..3], opts).expect("prefix");
    let a = backend
        .forward_reusing(&prefix, &short, opts)
        .expect("forward");
    let b = backend
        .forward_until(Some(&prefix), &short, opts, &never)
        .expect("forward_until");
    let last = Site::Layer(a.n_layers());
    for p in 0..a.n_positions() {
        assert_eq!(a.row(last, p), b.row(last, p), "position {p}");
    }
    let rows = a.row(last, short.len() - 1).expect("row").to_vec();
    assert_eq!(
        backend.readout(&rows, LensKind::Norm).expect("readout"),
        backend
            .readout_until(&rows, LensKind::Norm, &never)
            .expect("readout_until")
    );
}
