//! The reference backend, checked by hand, then put through the whole suite; variants with a
//! deliberate mistake show that the checks catch it.

#![allow(clippy::unwrap_used, clippy::print_stderr)]

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use lens_conformance::{
    self as suite, Fixtures, Flaw, Golden, Reduce, ReferenceBackend, Subject, REFERENCE,
};
use lens_core::{
    Backend, CaptureOptions, Device, Error, HiddenStates, Lens, LensKind, LoadOptions, Loader,
    ModelInfo, Precision, Site, Source, Stop, Token,
};

const SUBJECT: Subject = Subject {
    loader: &REFERENCE,
    options: LoadOptions {
        precision: Precision::F32,
        device: Device::Cpu,
        threads: None,
        isq: None,
    },
};

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn reference() -> Source {
    Source::Named("reference".into())
}

fn forward(backend: &dyn Backend, text: &str, mid_block: bool) -> HiddenStates {
    let ids = suite::ids(backend, text);
    backend.forward(&ids, CaptureOptions { mid_block }).unwrap()
}

#[track_caller]
fn assert_close(got: &[f32], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (f64::from(g) - w).abs() < 1e-6,
            "{what}[{i}]: {g} vs {w} (all: {got:?} vs {want:?})"
        );
    }
}

fn rms(x: &[f64]) -> f64 {
    (x.iter().map(|v| v * v).sum::<f64>() / 4.0 + 1e-5).sqrt()
}

// --- The model, by hand. ---

#[track_caller]
fn check_tokens(input: &str, expect: &str) {
    let tokens = ReferenceBackend::new().tokenize(input).unwrap();
    let got: Vec<String> = tokens
        .iter()
        .map(|t: &Token| format!("{}@{}..{}={}", t.text, t.start, t.end, t.id))
        .collect();
    assert_eq!(got.join(" "), expect, "{input:?}");
    for t in &tokens {
        let word = &input[t.start..t.end];
        assert!(word == t.text || t.id == 0, "{t:?} covers {word:?}");
    }
}

#[test]
fn words_are_tokens_with_exact_byte_offsets() {
    check_tokens("", "");
    check_tokens(" \t\n ", "");
    check_tokens("the", "the@0..3=1");
    check_tokens(
        "the cat sat on the mat",
        "the@0..3=1 cat@4..7=2 sat@8..11=3 on@12..14=4 the@15..18=1 mat@19..22=5",
    );
    // Unknown words (case matters) are <unk>; "é" takes two bytes, "→" three.
    check_tokens(
        "  The cat\tHéllo → mat\n",
        "<unk>@2..5=0 cat@6..9=2 <unk>@10..16=0 <unk>@17..20=0 mat@21..24=5",
    );
    check_tokens("big large", "big@0..3=10 large@4..9=11");
    check_tokens("a,dog", "<unk>@0..5=0");
}

#[test]
fn layer_zero_is_the_embedding() {
    let b = ReferenceBackend::new();
    let s = forward(&b, "cat sat", false);
    assert_close(
        s.row(Site::Layer(0), 0).unwrap(),
        &[0.5, -0.7, 0.9, 0.4],
        "cat",
    );
    assert_close(
        s.row(Site::Layer(0), 1).unwrap(),
        &[0.1, 0.9, 0.2, -0.8],
        "sat",
    );
    // Layer 0 does not depend on the context.
    let t = forward(&b, "dog sat", false);
    assert_eq!(t.row(Site::Layer(0), 1), s.row(Site::Layer(0), 1));
}

#[test]
fn block_one_at_position_zero_by_hand() {
    let s = forward(&ReferenceBackend::new(), "cat", true);
    // At position 0 the causal mean is the row itself: mid = h + 0.5·h.
    let h = [0.5, -0.7, 0.9, 0.4];
    let mid: Vec<f64> = h.iter().map(|v| 1.5 * v).collect();
    assert_close(
        s.row(Site::MidBlock(1), 0).unwrap(),
        &[0.75, -1.05, 1.35, 0.6],
        "mid-block 1",
    );
    // out = mid + W₁·rmsnorm(mid); mean(mid²) = 3.8475 / 4.
    let r = (3.8475f64 / 4.0 + 1e-5).sqrt();
    assert!((rms(&mid) - r).abs() < 1e-12);
    let n: Vec<f64> = mid.iter().map(|v| v / r).collect();
    let out = [
        mid[0] + 0.4 * n[0] + 0.3 * n[1] + 0.3 * n[2] + 0.6 * n[3],
        mid[1] - 0.3 * n[0] - 0.3 * n[1] - 0.4 * n[2] - 0.5 * n[3],
        mid[2] - 0.3 * n[0] + 0.2 * n[1] + 0.5 * n[2] + 0.5 * n[3],
        mid[3] + 0.6 * n[0] + 0.2 * n[1] + 0.2 * n[2] - 0.3 * n[3],
    ];
    assert_close(s.row(Site::Layer(1), 0).unwrap(), &out, "layer 1");
}

#[test]
fn attention_is_a_causal_mean() {
    let b = ReferenceBackend::new();
    let s = forward(&b, "cat sat", true);
    // mid = sat + 0.5 · (cat + sat) / 2
    assert_close(
        s.row(Site::MidBlock(1), 1).unwrap(),
        &[0.25, 0.95, 0.475, -0.9],
        "mid-block 1 at position 1",
    );
    // Context changes later positions, never earlier ones.
    let t = forward(&b, "dog sat", true);
    assert_ne!(t.row(Site::Layer(1), 1), s.row(Site::Layer(1), 1));
    let u = forward(&b, "cat dog", true);
    for l in 0..=3 {
        assert_eq!(u.row(Site::Layer(l), 0), s.row(Site::Layer(l), 0));
    }
}

/// The unembedding, written out again.
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

/// Probabilities of `x · Uᵀ` by a plain f64 softmax.
fn softmax_of(x: [f64; 4]) -> Vec<f64> {
    let logits: Vec<f64> = U
        .iter()
        .map(|u| u[0] * x[0] + u[1] * x[1] + u[2] * x[2] + u[3] * x[3])
        .collect();
    let z: f64 = logits.iter().map(|l| l.exp()).sum();
    logits.iter().map(|l| l.exp() / z).collect()
}

#[test]
fn the_lens_at_one_cell_by_hand() {
    let b = ReferenceBackend::new();
    let s = forward(&b, "the cat sat on the mat", false);
    let lens = Lens::new(&b, &s, LensKind::Norm, 3);
    let view = lens.position(1, &[Site::Layer(0)]).unwrap();
    let cell = &view.cells[0];

    // Norm lens of "cat"'s embedding: NORM_W ⊙ h / rms(h), mean(h²) = 1.71 / 4.
    let r = (1.71f64 / 4.0 + 1e-5).sqrt();
    let x = [1.2 * 0.5 / r, 0.8 * -0.7 / r, 1.5 * 0.9 / r, 0.4 / r];
    let p = softmax_of(x);
    let top = (0..12).max_by(|&a, &b| p[a].total_cmp(&p[b])).unwrap();
    assert_eq!(top, 2, "{p:?}");
    // The golden file (Python) says 0.79183 too.
    assert!((p[2] - 0.79183).abs() < 5e-6, "{}", p[2]);
    assert_eq!(cell.top[0].id, 2);
    assert!((f64::from(cell.top[0].prob) - p[2]).abs() < 1e-6);
    assert_eq!(cell.top[1].id, 6);
    assert!((f64::from(cell.top[1].prob) - p[6]).abs() < 1e-6);
    let entropy: f64 = -p.iter().map(|q| q * q.ln()).sum::<f64>();
    assert!(
        (cell.entropy - entropy).abs() < 1e-6,
        "{} vs {entropy}",
        cell.entropy
    );
    // The next token is "sat" (3): its rank counts the larger probabilities.
    let next = cell.next.unwrap();
    assert_eq!(next.id, 3);
    assert_eq!(next.rank, p.iter().filter(|&&q| q > p[3]).count());
    assert!((f64::from(next.prob) - p[3]).abs() < 1e-6);

    // The raw lens: x = h.
    let raw = Lens::new(&b, &s, LensKind::Raw, 1)
        .position(1, &[Site::Layer(0)])
        .unwrap();
    let p = softmax_of([0.5, -0.7, 0.9, 0.4]);
    assert_eq!(raw.cells[0].top[0].id, 2);
    assert!((f64::from(raw.cells[0].top[0].prob) - p[2]).abs() < 1e-6);
    assert!((p[2] - 0.51695).abs() < 5e-6, "{}", p[2]);
}

#[test]
fn big_and_large_tie_and_big_comes_first() {
    let b = ReferenceBackend::new();
    let s = forward(&b, "a big dog ran to the large mat", false);
    let lens = Lens::new(&b, &s, LensKind::Norm, 12);
    for view in lens.grid(&lens.all_layers()).unwrap() {
        for cell in &view.cells {
            let at = |id| cell.top.iter().position(|p| p.id == id).unwrap();
            let (big, large) = (at(10), at(11));
            assert_eq!(large, big + 1, "{cell:?}");
            assert_eq!(cell.top[big].logit, cell.top[large].logit);
        }
    }
}

#[test]
fn reuse_computes_only_what_changed() {
    let b = ReferenceBackend::new();
    let ids = suite::ids(&b, "the cat sat on the mat");
    let opts = CaptureOptions::default();
    let cached = b.forward(&ids, opts).unwrap();
    assert_eq!(b.blocks_computed(), 6 * 3);
    let count = |f: &dyn Fn() -> HiddenStates| {
        let before = b.blocks_computed();
        let s = f();
        (s, b.blocks_computed() - before)
    };
    // One token appended: one position, three blocks; its first 6 positions are the cached
    // rows themselves.
    let longer: Vec<u32> = ids.iter().copied().chain([2]).collect();
    let (s, n) = count(&|| b.forward_reusing(&cached, &longer, opts).unwrap());
    assert_eq!(n, 3);
    for p in 0..6 {
        assert!(Arc::ptr_eq(
            &s.position_rows()[p],
            &cached.position_rows()[p]
        ));
    }
    // An edit at position 4 recomputes positions 4 and 5.
    let mut edited = ids.clone();
    edited[4] = 6;
    let (_, n) = count(&|| b.forward_reusing(&cached, &edited, opts).unwrap());
    assert_eq!(n, 2 * 3);
    // A prefix: nothing.
    let (s, n) = count(&|| b.forward_reusing(&cached, &ids[..3], opts).unwrap());
    assert_eq!(n, 0);
    assert_eq!(s.n_positions(), 3);
    // Mid-block rows asked for but not cached: everything.
    let (_, n) = count(&|| {
        b.forward_reusing(&cached, &longer, CaptureOptions { mid_block: true })
            .unwrap()
    });
    assert_eq!(n, 7 * 3);
    // The state: 4 bytes per token and 3 blocks × 4 sums of f32 per position.
    assert_eq!(b.state_bytes(&cached), 6 * (4 + 3 * 16));
    assert_eq!(b.state_bytes(&s), 3 * (4 + 3 * 16));
}

#[test]
fn the_loader_offers_one_named_model() {
    let b = REFERENCE.load(&reference(), &SUBJECT.options).unwrap();
    let info: &ModelInfo = b.info();
    assert_eq!(
        (info.n_layers, info.hidden_size, info.vocab_size),
        (3, 4, 12)
    );
    assert_eq!(b.decode(11), "large");
    assert_eq!(b.decode(12), "<unk>");
    let refused = |source: Source, options: LoadOptions| match REFERENCE.load(&source, &options) {
        Err(Error::Unsupported(m)) => m,
        Err(e) => panic!("{e:?}"),
        Ok(_) => panic!("{source} loaded"),
    };
    assert_eq!(
        refused(Source::Named("gpt2".into()), SUBJECT.options),
        "the reference backend has no model `gpt2`: it knows only `reference`"
    );
    let threads = LoadOptions {
        threads: Some(2),
        ..SUBJECT.options
    };
    assert_eq!(
        refused(reference(), threads),
        "the reference backend runs on one thread, not 2"
    );
}

// --- The suite on the reference backend. ---

fn fixtures() -> Fixtures {
    Fixtures {
        source: reference(),
        goldens: vec![
            Golden {
                path: data("golden_reference.json"),
                kind: LensKind::Norm,
                tolerance: suite::F32,
            },
            Golden {
                path: data("golden_reference_raw.json"),
                kind: LensKind::Raw,
                tolerance: suite::F32,
            },
        ],
        prompt: "a big dog ran to the large mat".into(),
        long_prompt: "the cat sat on the mat ".repeat(1 << 15),
        refused: vec![(Source::Named("gpt2".into()), SUBJECT.options, "gpt2".into())],
    }
}

#[test]
fn the_whole_suite_passes() {
    let t = Instant::now();
    let report = suite::all(&SUBJECT, &fixtures());
    eprintln!("{report:#?}\nthe whole suite: {:?}", t.elapsed());
    // The independent Python goldens agree to their 6 significant digits.
    for dev in &report.goldens {
        assert!(dev.prob < 2e-6 && dev.entropy < 1e-5, "{dev:?}");
        assert_eq!((dev.rank_off, dev.top5_mismatches), (0, 0), "{dev:?}");
        assert_eq!(dev.clear_agree, dev.clear_cells);
    }
    assert_eq!(report.tokens, 2 * (6 + 8 + 6 + 7));
    // Reuse continues the same running sums: exact.
    assert_eq!(report.reuse, 0.0);
    assert!(
        report.stop.latency * 3 < report.stop.full,
        "{:?}",
        report.stop
    );
    assert_eq!(report.reduce_cells, 8 * 4 * 3 + 3 * 5 * 2);
}

#[test]
fn a_device_side_reduce_matches_the_host_math() {
    let b = ReferenceBackend::with_reduce(Reduce::Device);
    let ids = suite::ids(&b, "a big dog ran to the large mat");
    assert_eq!(suite::reduce_matches_host(&b, &ids), 8 * 4 * 3 + 3 * 5 * 2);
}

/// `f` panics, with a message containing `expect`.
#[track_caller]
fn assert_fails(what: &str, expect: &str, f: impl FnOnce()) {
    let msg = match catch_unwind(AssertUnwindSafe(f)) {
        Ok(()) => panic!("{what}: the check passed"),
        Err(e) => e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default(),
    };
    assert!(
        msg.contains(expect),
        "{what}: failed with {msg:?}, expected it to mention {expect:?}"
    );
}

#[test]
fn a_wrong_device_side_reduce_fails() {
    for (flaw, expect) in [
        (Flaw::TiesToHigherId, "top ids"),
        (Flaw::EntropyOff, "entropy"),
        (Flaw::FinalTop1ProbOfCellTop1, "final top-1 rank/prob"),
    ] {
        let b = ReferenceBackend::with_reduce(Reduce::Flawed(flaw));
        let ids = suite::ids(&b, "a big dog ran to the large mat");
        assert_fails(&format!("{flaw:?}"), expect, || {
            suite::reduce_matches_host(&b, &ids);
        });
    }
}

/// The reference backend with one thing broken.
struct Broken {
    inner: ReferenceBackend,
    how: Breakage,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Breakage {
    /// `forward_until` looks at the stop only before it starts (the trait's default).
    IgnoresStop,
    /// `forward_reusing` keeps the cached rows of a position whose token changed.
    StaleReuse,
    /// No mid-block rows, whatever was asked.
    NoMidBlock,
    /// A ragged readout panics.
    PanicsOnRaggedRows,
    /// Offsets one byte short.
    ShortOffsets,
}

impl Backend for Broken {
    fn info(&self) -> &ModelInfo {
        self.inner.info()
    }
    fn tokenize(&self, text: &str) -> Result<Vec<Token>, Error> {
        let mut tokens = self.inner.tokenize(text)?;
        if self.how == Breakage::ShortOffsets {
            for t in &mut tokens {
                t.end -= 1;
            }
        }
        Ok(tokens)
    }
    fn decode(&self, id: u32) -> String {
        self.inner.decode(id)
    }
    fn forward(&self, tokens: &[u32], options: CaptureOptions) -> Result<HiddenStates, Error> {
        let options = match self.how {
            Breakage::NoMidBlock => CaptureOptions::default(),
            _ => options,
        };
        self.inner.forward(tokens, options)
    }
    fn forward_reusing(
        &self,
        prefix: &HiddenStates,
        tokens: &[u32],
        options: CaptureOptions,
    ) -> Result<HiddenStates, Error> {
        let fresh = self.forward(tokens, options)?;
        if self.how != Breakage::StaleReuse || prefix.n_positions() > tokens.len() {
            return Ok(fresh);
        }
        let mut rows = prefix.position_rows().to_vec();
        rows.extend_from_slice(&fresh.position_rows()[rows.len()..]);
        let mid = fresh.mid_position_rows().map(<[_]>::to_vec);
        HiddenStates::from_positions(self.info(), tokens.to_vec(), rows, mid)
    }
    fn readout(&self, rows: &[f32], lens: LensKind) -> Result<Vec<f32>, Error> {
        assert!(
            self.how != Breakage::PanicsOnRaggedRows || rows.len().is_multiple_of(4),
            "ragged rows"
        );
        self.inner.readout(rows, lens)
    }
    fn forward_until(
        &self,
        prefix: Option<&HiddenStates>,
        tokens: &[u32],
        options: CaptureOptions,
        stop: &Stop,
    ) -> Result<HiddenStates, Error> {
        stop.check()?;
        match (self.how, prefix) {
            (Breakage::IgnoresStop, _) => self.inner.forward(tokens, options),
            (_, Some(p)) => self.forward_reusing(p, tokens, options),
            (_, None) => self.forward(tokens, options),
        }
    }
}

#[test]
fn each_check_fails_on_a_backend_that_breaks_it() {
    let broken = |how| Broken {
        inner: ReferenceBackend::new(),
        how,
    };
    let prompt = "a big dog ran to the large mat";
    let b = broken(Breakage::IgnoresStop);
    let long = suite::ids(&b, &fixtures().long_prompt);
    assert_fails("ignores the stop", "did not stop it", || {
        suite::stop_between_layers(&b, &long);
    });
    let b = broken(Breakage::StaleReuse);
    let ids = suite::ids(&b, prompt);
    assert_fails("stale reuse", "a token edited in the middle", || {
        suite::prefix_reuse(&b, &ids);
    });
    let b = broken(Breakage::NoMidBlock);
    assert_fails("no mid-block rows", "mid-block capture asked for", || {
        suite::mid_block(&b, &ids);
    });
    let b = broken(Breakage::PanicsOnRaggedRows);
    assert_fails("panics on ragged rows", "panicked", || {
        suite::bad_inputs(&b, &ids);
    });
    let b = broken(Breakage::ShortOffsets);
    assert_fails("short offsets", "is in no token", || {
        suite::tokenization(&b, &data("golden_reference.json"));
    });
    // The golden comparison fails on a golden that is off by 2e-4 in one probability.
    let mut golden = lens_conformance::oracle::load_json(&data("golden_reference.json"));
    let prompt = &mut golden["prompts"][0];
    let p = prompt["layers"][2]["top5_probs"][1][0].as_f64().unwrap();
    prompt["layers"][2]["top5_probs"][1][0] = (p + 2e-4).into();
    let mut dev = suite::Deviations::default();
    let b = ReferenceBackend::new();
    lens_conformance::oracle::compare_prompt(
        &b,
        prompt,
        LensKind::Norm,
        Some(suite::F32),
        &mut dev,
    );
    assert_eq!(dev.failures.len(), 1, "{:?}", dev.failures);
    assert!(dev.failures[0].contains("layer 2 position 1: top-0 prob"));
}

/// Greedy generation on the reference model: each token is the final layer's argmax, the
/// states of each step those of a fresh forward (the suite's check), and the text the one the
/// model's own lens predicts step by step.
#[test]
fn greedy_generation_follows_the_model_output() {
    let backend = SUBJECT.backend(&reference());
    let prompt = suite::ids(&*backend, "the cat sat on");
    let out = suite::generation(&*backend, &prompt, 5);
    eprintln!("generated {:?} ({:?})", out.tokens, out.finish);
    assert!(out.reuse <= suite::REUSE_BOUND);
    assert!(!out.tokens.is_empty());
    // The first token is the top-1 of the prompt's last position, read by the lens.
    let states = backend.forward(&prompt, CaptureOptions::default()).unwrap();
    let lens = Lens::new(&*backend, &states, LensKind::Norm, 1);
    let view = lens
        .position(prompt.len() - 1, &[Site::Layer(backend.info().n_layers)])
        .unwrap();
    assert_eq!(out.tokens[0], view.final_top1.id);
    // A backend without a chat template says so.
    let chat = backend.generator().unwrap().chat_prompt("hello");
    assert!(matches!(chat, Err(Error::Unsupported(_))), "{chat:?}");
}
