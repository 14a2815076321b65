//! The engine and its activation cache on the in-memory reference backend: fast, no model
//! file, numbers that do not depend on one.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lens_conformance::ReferenceBackend;
use lens_core::{Backend, CaptureOptions, HiddenStates, LensKind, ModelInfo, Stop, Token};
use lens_server::{AnalyzeParams, Engine};

/// The reference backend, counting its forward passes and tokenizations, and with a gate
/// holding every forward pass where the test sets one.
struct Instrumented {
    inner: ReferenceBackend,
    gate: Option<Gate>,
    forwards: std::sync::atomic::AtomicUsize,
    tokenized: std::sync::atomic::AtomicUsize,
}

/// A forward pass says when it has started, then waits until the test lets it go.
struct Gate {
    started: mpsc::SyncSender<()>,
    go: std::sync::Mutex<mpsc::Receiver<()>>,
}

impl Instrumented {
    fn new(gate: Option<Gate>) -> Self {
        Instrumented {
            inner: ReferenceBackend::new(),
            gate,
            forwards: 0.into(),
            tokenized: 0.into(),
        }
    }
}

impl Backend for Instrumented {
    fn info(&self) -> &ModelInfo {
        self.inner.info()
    }
    fn tokenize(&self, text: &str) -> Result<Vec<Token>, lens_core::Error> {
        self.tokenized
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.tokenize(text)
    }
    fn decode(&self, id: u32) -> String {
        self.inner.decode(id)
    }
    fn forward(
        &self,
        tokens: &[u32],
        options: CaptureOptions,
    ) -> Result<HiddenStates, lens_core::Error> {
        self.forward_until(None, tokens, options, &Stop::never())
    }
    fn forward_until(
        &self,
        prefix: Option<&HiddenStates>,
        tokens: &[u32],
        options: CaptureOptions,
        stop: &Stop,
    ) -> Result<HiddenStates, lens_core::Error> {
        self.forwards
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if let Some(gate) = &self.gate {
            gate.started.send(()).expect("the test listens");
            gate.go
                .lock()
                .expect("gate")
                .recv()
                .expect("the test opens the gate");
        }
        self.inner.forward_until(prefix, tokens, options, stop)
    }
    fn readout(&self, rows: &[f32], lens: LensKind) -> Result<Vec<f32>, lens_core::Error> {
        self.inner.readout(rows, lens)
    }
    fn state_bytes(&self, states: &HiddenStates) -> usize {
        self.inner.state_bytes(states)
    }
}

/// Two requests for the same tokens at once: the second waits for the first one's forward
/// pass (single flight) and shares its result; one forward pass in all.
#[test]
fn a_second_request_waits_for_the_first_ones_computation() {
    let (started_tx, started) = mpsc::sync_channel(4);
    let (go, go_rx) = mpsc::channel();
    let backend = Arc::new(Instrumented::new(Some(Gate {
        started: started_tx,
        go: std::sync::Mutex::new(go_rx),
    })));
    let engine = Arc::new(Engine::new(backend.clone(), 64 << 20));
    let ids: Vec<u32> = ["the", "cat", "sat"]
        .iter()
        .map(|w| ReferenceBackend::id_of(w))
        .collect();
    assert!(ids.iter().all(|&id| id != 0), "words of the vocabulary");

    let first = {
        let (engine, ids) = (engine.clone(), ids.clone());
        std::thread::spawn(move || engine.states(&ids, &Stop::never()))
    };
    started
        .recv_timeout(Duration::from_secs(30))
        .expect("the first forward pass starts");
    let second = {
        let (engine, ids) = (engine.clone(), ids.clone());
        std::thread::spawn(move || engine.states(&ids, &Stop::never()))
    };
    // The second request is waiting on the first one's computation before the gate opens.
    let deadline = Instant::now() + Duration::from_secs(30);
    while engine.stats().waits == 0 {
        assert!(Instant::now() < deadline, "the second request never waited");
        std::thread::yield_now();
    }
    go.send(()).expect("open the gate");
    let a = first.join().expect("first").expect("states");
    let b = second.join().expect("second").expect("states");
    assert!(Arc::ptr_eq(&a, &b), "both requests share one result");
    assert_eq!(
        backend.forwards.load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    let stats = engine.stats();
    assert_eq!(
        (stats.misses, stats.waits, stats.hits),
        (1, 1, 1),
        "{stats:?}"
    );
    assert!(started.try_recv().is_err(), "no second forward pass");
}

/// `lens/analyze` on the reference backend: positions and layers resolve through the one
/// query path, and bad selections are the protocol's errors.
#[test]
fn analyze_selects_and_refuses_like_the_protocol_says() {
    let engine = Engine::new(Arc::new(ReferenceBackend::new()), 64 << 20);
    let params =
        |v: serde_json::Value| -> AnalyzeParams { serde_json::from_value(v).expect("params") };
    let r = engine
        .analyze(
            &params(serde_json::json!({
                "text": "the cat sat on the mat",
                "positions": [-1, 0],
                "layers": "1..",
                "topK": 2
            })),
            &Stop::never(),
        )
        .expect("analyze");
    let positions: Vec<usize> = r.positions.iter().map(|p| p.position).collect();
    assert_eq!(positions, [0, 5]);
    assert_eq!(
        r.layers,
        (1..=lens_conformance::N_BLOCKS).collect::<Vec<_>>()
    );
    assert!(r
        .positions
        .iter()
        .all(|p| p.cells.len() == r.layers.len() && p.cells.iter().all(|c| c.top.len() == 2)));
    let code = |v: serde_json::Value| {
        engine
            .analyze(&params(v), &Stop::never())
            .expect_err("refused")
            .code
    };
    let text = "the cat sat";
    assert_eq!(
        code(serde_json::json!({ "text": text, "layers": [] })),
        -32602
    );
    assert_eq!(
        code(serde_json::json!({ "text": text, "layers": "" })),
        -32602
    );
    assert_eq!(
        code(serde_json::json!({ "text": text, "layers": ",," })),
        -32602
    );
    assert_eq!(
        code(serde_json::json!({ "text": text, "layers": [99] })),
        -32602
    );
    assert_eq!(
        code(serde_json::json!({ "text": text, "positions": [] })),
        -32602
    );
    assert_eq!(
        code(serde_json::json!({ "text": text, "positions": [3] })),
        -32013
    );
    assert_eq!(code(serde_json::json!({ "text": text, "topK": 0 })), -32602);
    assert_eq!(code(serde_json::json!({ "text": "" })), -32010);
    assert!(serde_json::from_value::<AnalyzeParams>(
        serde_json::json!({ "text": text, "lens": "tuned:/a/path" })
    )
    .is_err());
}

/// `"lens": "tuned"` reads through the translators the daemon was started with, and is refused
/// without them.
#[test]
fn the_tuned_lens_is_the_one_the_daemon_was_given() {
    let params = |lens: &str| -> AnalyzeParams {
        serde_json::from_value(serde_json::json!({ "text": "the cat sat", "lens": lens }))
            .expect("params")
    };
    let bare = Engine::new(Arc::new(ReferenceBackend::new()), 64 << 20);
    let err = bare
        .analyze(&params("tuned"), &Stop::never())
        .expect_err("no tuned lens");
    assert!(
        err.message.contains("this daemon has no tuned lens") && err.code == -32602,
        "{err:?}"
    );
    // Identity translators: the norm lens's cells, labelled tuned.
    let identity = lens_core::Translators::identity("id", 4, lens_conformance::N_BLOCKS);
    let engine = Engine::new(Arc::new(ReferenceBackend::new()), 64 << 20)
        .with_tuned(Some(Arc::new(identity)));
    let tuned = engine
        .analyze(&params("tuned"), &Stop::never())
        .expect("tuned");
    let norm = engine
        .analyze(&params("norm"), &Stop::never())
        .expect("norm");
    assert_eq!(tuned.lens, "tuned");
    assert_eq!(
        serde_json::to_value(&tuned.positions).expect("json"),
        serde_json::to_value(&norm.positions).expect("json")
    );
}

/// Hovers read the daemon's tuned lens when it has one: identity translators give the norm
/// lens's hover, shifted ones another.
#[test]
fn hovers_read_the_daemons_tuned_lens() {
    let hover = |tuned: Option<lens_core::Translators>| {
        Engine::new(Arc::new(ReferenceBackend::new()), 64 << 20)
            .with_tuned(tuned.map(Arc::new))
            .hover(
                "the cat sat on the mat",
                9,
                &lens_server::HoverOptions::default(),
                None,
                &Stop::never(),
            )
            .expect("hover")
            .expect("a token")
            .markdown
    };
    let n = lens_conformance::N_BLOCKS;
    let norm = hover(None);
    assert_eq!(
        hover(Some(lens_core::Translators::identity("id", 4, n))),
        norm
    );
    let shift = lens_core::Affine {
        weight: vec![0.0; 16],
        bias: vec![5.0, -5.0, 0.0, 0.0],
    };
    let shifted = lens_core::Translators::new("shift", 4, vec![shift; n]).expect("translators");
    assert_ne!(hover(Some(shifted)), norm);
}

/// The same hover asked again is answered without tokenizing the document (the most of a
/// cached hover's time), with the same markdown; any difference in the request (the byte, the
/// text before the last edit) is looked up anew.
#[test]
fn a_repeated_hover_is_answered_without_tokenizing() {
    let backend = Arc::new(Instrumented::new(None));
    let engine = Engine::new(backend.clone(), 64 << 20);
    let tokenized = || backend.tokenized.load(std::sync::atomic::Ordering::SeqCst);
    let options = lens_server::HoverOptions::default();
    let hover = |text: &str, byte: usize, previous: Option<&str>| {
        engine
            .hover(text, byte, &options, previous, &Stop::never())
            .expect("hover")
            .expect("a token")
    };
    let text = "the cat sat on the mat";
    let first = hover(text, 9, None);
    let after_first = tokenized();
    assert!(after_first > 0);
    assert_eq!(hover(text, 9, None), first);
    assert_eq!(
        tokenized(),
        after_first,
        "the repeat tokenized the document"
    );
    // Another byte of the same token: looked up by its tokens, the same hover.
    let other_byte = hover(text, 10, None);
    assert!(tokenized() > after_first);
    assert_eq!(other_byte.markdown, first.markdown);
    // The same request with a text before an edit: the comparison, not the plain hover.
    let compared = hover(text, 9, Some("the dog sat on the mat"));
    assert_ne!(compared.markdown, first.markdown);
    assert_eq!(hover(text, 9, None), first);
}
