//! A raised [`Stop`] ends a forward pass or a readout with `Error::Stopped`; one never raised
//! changes nothing.

use std::sync::mpsc;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use lens_candle::Precision;
use lens_core::{Backend, CaptureOptions, Error, HiddenStates, LensKind, Site, Stop};

fn ids(backend: &dyn Backend, text: &str) -> Vec<u32> {
    let tokens = backend.tokenize(text).expect("tokenize");
    tokens.iter().map(|t| t.id).collect()
}

/// Every captured row of `a` and `b` (block boundaries and mid-block), bit for bit.
#[track_caller]
fn assert_bit_identical(a: &HiddenStates, b: &HiddenStates) {
    assert_eq!(a.tokens(), b.tokens());
    assert_eq!(a.n_layers(), b.n_layers());
    assert_eq!(a.has_mid_block(), b.has_mid_block());
    let mut sites: Vec<Site> = (0..=a.n_layers()).map(Site::Layer).collect();
    if a.has_mid_block() {
        sites.extend((1..=a.n_layers()).map(Site::MidBlock));
    }
    for &site in &sites {
        for p in 0..a.n_positions() {
            let bits = |s: &HiddenStates| {
                s.row(site, p)
                    .unwrap_or_else(|| panic!("{site:?} at {p}"))
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<u32>>()
            };
            assert_eq!(bits(a), bits(b), "{site:?} at position {p}");
        }
    }
}

#[test]
fn a_stop_raised_before_the_work_ends_it_at_once() {
    let backend = crate::smollm2(Precision::F32);
    let opts = CaptureOptions::default();
    let short = ids(&*backend, "The capital of France is Paris");
    let prefix = backend.forward(&short[..3], opts).expect("prefix");
    let rows = vec![0.5f32; 2 * backend.info().hidden_size];

    // The same work unstopped, for scale.
    let t = Instant::now();
    backend.forward(&short, opts).expect("forward");
    backend.readout(&rows, LensKind::Norm).expect("readout");
    let full = t.elapsed();

    let stopped = Stop::new();
    stopped.stop();
    let t = Instant::now();
    for prefix in [None, Some(&prefix)] {
        let r = backend.forward_until(prefix, &short, opts, &stopped);
        assert!(matches!(r, Err(Error::Stopped)), "{:?}", r.err());
    }
    let r = backend.readout_until(&rows, LensKind::Norm, &stopped);
    assert!(matches!(r, Err(Error::Stopped)), "{:?}", r.err());
    let took = t.elapsed();
    eprintln!("raised before: {took:?} for three calls, vs {full:?} for two unstopped");
    assert!(took * 4 < full, "{took:?} vs {full:?} unstopped");
}

#[test]
fn a_stop_raised_during_a_forward_pass_ends_it_soon() {
    let backend = crate::smollm2(Precision::F32);
    let opts = CaptureOptions::default();
    // A long prompt: the tensor path, which looks at the stop between blocks.
    let text = "The sun rises in the east and sets in the west. ".repeat(12);
    let long = ids(&*backend, &text);
    assert!(long.len() > 100, "{} tokens", long.len());

    // The uninterrupted work, twice (the faster one counts: the first may warm caches), with a
    // stop that exists but is never raised: the same states as without one.
    let never = Stop::new();
    let mut full = Duration::MAX;
    let mut states = Vec::new();
    for _ in 0..2 {
        let t = Instant::now();
        states.push(
            backend
                .forward_until(None, &long, opts, &never)
                .expect("unstopped"),
        );
        full = full.min(t.elapsed());
    }
    assert_bit_identical(&states[0], &backend.forward(&long, opts).expect("forward"));

    // The same work on another thread. This thread raises the stop once the call has run for
    // a third of the uninterrupted time without returning (it waits for the call's end with
    // that deadline: had the call ended first, the test fails below), then measures how long
    // the call takes to give up from that moment.
    let stop = Stop::new();
    let started = Barrier::new(2);
    let (done_tx, done_rx) = mpsc::channel();
    let (r, ended, began, raised) = std::thread::scope(|s| {
        let worker = s.spawn(|| {
            started.wait();
            let r = backend.forward_until(None, &long, opts, &stop).map(|_| ());
            let ended = Instant::now();
            done_tx.send(()).expect("send");
            (r, ended)
        });
        started.wait();
        let began = Instant::now();
        let finished_first = done_rx.recv_timeout(full / 3).is_ok();
        stop.stop();
        let raised = Instant::now();
        assert!(
            !finished_first,
            "the call ended within {full:?}/3 of its start, before the stop was raised"
        );
        let (r, ended) = worker.join().expect("worker");
        (r, ended, began, raised)
    });
    assert!(
        matches!(r, Err(Error::Stopped)),
        "{} tokens: {r:?}",
        long.len()
    );
    let latency = ended.saturating_duration_since(raised);
    eprintln!(
        "{} tokens: unstopped {full:?}; stop raised {:?} into the call, honoured {latency:?} later",
        long.len(),
        raised - began
    );
    assert!(
        latency * 4 < full,
        "stopped {latency:?} after the stop, the whole pass takes {full:?}"
    );

    // The backend is left as it was: the next unstopped pass gives the same states.
    assert_bit_identical(
        &states[1],
        &backend
            .forward_until(None, &long, opts, &never)
            .expect("after a stop"),
    );
}

#[test]
fn a_stop_never_raised_changes_nothing() {
    let backend = crate::smollm2(Precision::F32);
    let opts = CaptureOptions { mid_block: true };
    let short = ids(&*backend, "The capital of France is Paris");
    let never = Stop::new();

    // From scratch and from a prefix (the small-batch path): the same code paths as without a
    // stop, so the same bits.
    let a = backend.forward(&short, opts).expect("forward");
    let b = backend
        .forward_until(None, &short, opts, &never)
        .expect("forward_until");
    assert_bit_identical(&a, &b);
    let prefix = backend.forward(&short[..3], opts).expect("prefix");
    let a = backend
        .forward_reusing(&prefix, &short, opts)
        .expect("forward");
    let b = backend
        .forward_until(Some(&prefix), &short, opts, &never)
        .expect("forward_until");
    assert_bit_identical(&a, &b);

    // The readout of one row (stopped between blocks of the vocabulary) and of many.
    let last = Site::Layer(a.n_layers());
    for rows in [
        a.row(last, short.len() - 1).expect("row").to_vec(),
        (0..short.len())
            .flat_map(|p| a.row(last, p).expect("row").to_vec())
            .collect(),
    ] {
        let plain = backend.readout(&rows, LensKind::Norm).expect("readout");
        let until = backend
            .readout_until(&rows, LensKind::Norm, &never)
            .expect("readout_until");
        let n = rows.len() / backend.info().hidden_size;
        assert_eq!(plain.len(), n * backend.info().vocab_size);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
        assert_eq!(bits(&plain), bits(&until), "{n} rows");
    }
}
