//! The checks every backend must pass. Each panics with a message saying what went wrong and
//! returns what it measured.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::{mpsc, Barrier};
use std::time::{Duration, Instant};

use lens_core::{
    host_lens, Backend, CaptureOptions, Device, Error, HiddenStates, Lens, LensKind, LensRequest,
    LoadOptions, Loader, PositionView, Precision, Registry, Site, Source, Stop, Token,
};

use crate::oracle::{golden_tokens, load_json};

/// The token ids of `text`.
pub fn ids(backend: &dyn Backend, text: &str) -> Vec<u32> {
    let tokens = backend
        .tokenize(text)
        .unwrap_or_else(|e| panic!("tokenize {text:?}: {e}"));
    tokens.iter().map(|t| t.id).collect()
}

/// Every prompt of the golden file at `golden` tokenizes to the golden's `token_ids`, with
/// offsets that [`check_offsets`] accepts. Returns the number of tokens checked.
pub fn tokenization(backend: &dyn Backend, golden: &Path) -> usize {
    let json = load_json(golden);
    let prompts = json["prompts"]
        .as_array()
        .expect("golden without `prompts`");
    assert!(!prompts.is_empty(), "{} has no prompts", golden.display());
    let mut checked = 0;
    for prompt in prompts {
        let (text, tokens) = golden_tokens(backend, prompt, &golden.display().to_string());
        check_offsets(backend, text, &tokens);
        checked += tokens.len();
    }
    checked
}

/// Tokens' byte ranges lie in `text`, on character boundaries, in order (starts and ends
/// never decrease), and cover every byte of the text that is not whitespace; each token's text
/// is its id decoded.
pub fn check_offsets(backend: &dyn Backend, text: &str, tokens: &[Token]) {
    let mut covered = vec![false; text.len()];
    let (mut start, mut end) = (0, 0);
    for (i, t) in tokens.iter().enumerate() {
        assert!(
            t.start <= t.end && t.end <= text.len(),
            "{text:?}: token {i} {t:?} is not a range of the text"
        );
        assert!(
            text.is_char_boundary(t.start) && text.is_char_boundary(t.end),
            "{text:?}: token {i} {t:?} splits a character"
        );
        assert!(
            t.start >= start && t.end >= end,
            "{text:?}: token {i} {t:?} starts or ends before token {}",
            i.saturating_sub(1)
        );
        assert_eq!(
            t.text,
            backend.decode(t.id),
            "{text:?}: token {i}'s text is not its id decoded"
        );
        covered[t.start..t.end].fill(true);
        (start, end) = (t.start, t.end);
    }
    if let Some((b, c)) = text
        .char_indices()
        .find(|&(b, c)| !c.is_whitespace() && !covered[b])
    {
        panic!("{text:?}: byte {b} ({c:?}) is in no token: {tokens:?}");
    }
}

/// Every site of a set of states: layers `0..=N`, and mid-block rows `1..=N` when captured.
fn sites_of(states: &HiddenStates) -> Vec<Site> {
    let n = states.n_layers();
    let mut sites: Vec<Site> = (0..=n).map(Site::Layer).collect();
    if states.has_mid_block() {
        sites.extend((1..=n).map(Site::MidBlock));
    }
    sites
}

/// Largest `|a - b|` over the rows of `b`'s sites, relative to each row's largest `|b|`;
/// panics when the states differ in tokens, layers or what was captured, or a row exceeds
/// `bound`.
#[track_caller]
pub fn assert_states_close(a: &HiddenStates, b: &HiddenStates, bound: f64, what: &str) -> f64 {
    assert_eq!(a.tokens(), b.tokens(), "{what}: tokens");
    assert_eq!(a.n_layers(), b.n_layers(), "{what}: layers");
    assert_eq!(
        a.has_mid_block(),
        b.has_mid_block(),
        "{what}: mid-block capture"
    );
    let mut worst = 0f64;
    for site in sites_of(b) {
        for p in 0..b.n_positions() {
            let (Some(x), Some(y)) = (a.row(site, p), b.row(site, p)) else {
                panic!("{what}: no row at {site:?}, position {p}");
            };
            let scale = y.iter().fold(0f64, |m, &v| m.max(f64::from(v).abs()));
            let diff = x.iter().zip(y).fold(0f64, |m, (&u, &v)| {
                m.max((f64::from(u) - f64::from(v)).abs())
            });
            let rel = if scale > 0.0 { diff / scale } else { diff };
            assert!(
                rel <= bound,
                "{what}: {site:?} at position {p} deviates by {rel:.3e} of the row's largest \
                 value (bound {bound:.0e})"
            );
            worst = worst.max(rel);
        }
    }
    worst
}

/// Every captured row of `a` and `b`, bit for bit.
#[track_caller]
pub fn assert_bit_identical(a: &HiddenStates, b: &HiddenStates, what: &str) {
    assert_eq!(a.tokens(), b.tokens(), "{what}: tokens");
    assert_eq!(
        a.has_mid_block(),
        b.has_mid_block(),
        "{what}: mid-block capture"
    );
    for site in sites_of(b) {
        for p in 0..b.n_positions() {
            let bits = |s: &HiddenStates| {
                s.row(site, p)
                    .unwrap_or_else(|| panic!("{what}: no row at {site:?}, position {p}"))
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<u32>>()
            };
            assert_eq!(bits(a), bits(b), "{what}: {site:?} at position {p}");
        }
    }
}

/// Bound on [`prefix_reuse`]'s deviations, relative to a row's largest value.
pub const REUSE_BOUND: f64 = 1e-5;

/// [`Backend::forward_reusing`] (and [`Backend::forward_until`] with a prefix) from a cached
/// prompt equals a fresh forward of the new prompt at every site, within [`REUSE_BOUND`] of
/// each row's largest value: one token appended, three appended, a token edited in the middle,
/// the first token edited (nothing shared), the same prompt, a prefix of the cached prompt,
/// and an edit from states that were themselves reused; with and without mid-block capture.
/// `ids` needs at least 4 tokens. Returns the largest deviation.
pub fn prefix_reuse(backend: &dyn Backend, ids: &[u32]) -> f64 {
    let n = ids.len();
    assert!(
        n >= 4,
        "prefix_reuse needs a prompt of 4 tokens or more, not {n}"
    );
    let vocab = backend.info().vocab_size as u32;
    let edit = |at: usize| {
        let mut v = ids.to_vec();
        v[at] = (v[at] + 1) % vocab;
        v
    };
    let (middle, first) = (edit(n / 2), edit(0));
    let mut worst = 0f64;
    for options in [
        CaptureOptions::default(),
        CaptureOptions { mid_block: true },
    ] {
        let fresh = |tokens: &[u32]| {
            backend
                .forward(tokens, options)
                .unwrap_or_else(|e| panic!("forward of {} tokens: {e}", tokens.len()))
        };
        let reuse = |cached: &HiddenStates, tokens: &[u32]| {
            backend
                .forward_reusing(cached, tokens, options)
                .unwrap_or_else(|e| panic!("forward_reusing of {} tokens: {e}", tokens.len()))
        };
        let full = fresh(ids);
        let reused = reuse(&fresh(&ids[..n - 1]), ids);
        let cases: [(&str, HiddenStates, &[u32]); 7] = [
            ("one token appended", fresh(&ids[..n - 1]), ids),
            ("three tokens appended", fresh(&ids[..n - 3]), ids),
            ("a token edited in the middle", full.clone(), &middle),
            ("the first token edited", full.clone(), &first),
            ("the same prompt", full.clone(), ids),
            ("a prefix of the cached prompt", full.clone(), &ids[..n - 2]),
            ("an edit from reused states", reused, &middle),
        ];
        for (what, cached, tokens) in cases {
            let want = fresh(tokens);
            let what = format!("{what} ({options:?})");
            let got = reuse(&cached, tokens);
            worst = worst.max(assert_states_close(&got, &want, REUSE_BOUND, &what));
            let until = backend
                .forward_until(Some(&cached), tokens, options, &Stop::new())
                .unwrap_or_else(|e| panic!("{what}: forward_until: {e}"));
            let what = format!("{what} through forward_until");
            worst = worst.max(assert_states_close(&until, &want, REUSE_BOUND, &what));
        }
    }
    worst
}

/// With [`CaptureOptions::mid_block`], the states hold a mid-block row for each of the `N`
/// blocks at every position, each different from the layer rows before and after its block;
/// the layer rows are those of a forward without it (within [`REUSE_BOUND`]), which has no
/// mid-block rows; the lens reads mid-block sites only where they were captured.
pub fn mid_block(backend: &dyn Backend, ids: &[u32]) {
    let info = backend.info();
    let (n, hidden) = (info.n_layers, info.hidden_size);
    let with = backend
        .forward(ids, CaptureOptions { mid_block: true })
        .unwrap_or_else(|e| panic!("forward with mid-block capture: {e}"));
    let without = backend
        .forward(ids, CaptureOptions::default())
        .unwrap_or_else(|e| panic!("forward: {e}"));
    assert!(
        with.has_mid_block(),
        "mid-block capture asked for, none captured"
    );
    assert!(!without.has_mid_block(), "mid-block rows captured unasked");
    let rows = with.mid_position_rows().expect("mid-block rows");
    assert_eq!(rows.len(), ids.len(), "positions with mid-block rows");
    for (p, r) in rows.iter().enumerate() {
        assert_eq!(r.len(), n * hidden, "mid-block values at position {p}");
    }
    for p in 0..ids.len() {
        for b in 1..=n {
            let mid = with
                .row(Site::MidBlock(b), p)
                .unwrap_or_else(|| panic!("no mid-block row for block {b} at position {p}"));
            for l in [b - 1, b] {
                let layer = with.row(Site::Layer(l), p).expect("layer row");
                assert!(
                    mid != layer,
                    "the mid-block row of block {b} at position {p} equals layer {l}'s: {mid:?}"
                );
            }
        }
        for s in [Site::MidBlock(0), Site::MidBlock(n + 1), Site::Layer(n + 1)] {
            assert!(with.row(s, p).is_none(), "a row at {s:?}");
        }
        assert!(without.row(Site::MidBlock(1), p).is_none());
    }
    let layers_of = |s: &HiddenStates| {
        HiddenStates::from_positions(info, s.tokens().to_vec(), s.position_rows().to_vec(), None)
            .expect("layer rows")
    };
    assert_states_close(
        &layers_of(&with),
        &without,
        REUSE_BOUND,
        "layer rows with mid-block capture against without",
    );
    let sites = [Site::MidBlock(1), Site::MidBlock(n), Site::Layer(n)];
    let view = Lens::new(backend, &with, LensKind::Norm, 3)
        .position(0, &sites)
        .unwrap_or_else(|e| panic!("the lens at mid-block sites: {e}"));
    assert_eq!(view.cells.len(), sites.len());
    let r = Lens::new(backend, &without, LensKind::Norm, 3).position(0, &sites[..1]);
    assert!(
        matches!(r, Err(Error::LayerOutOfRange { layer: 1, max }) if max == n),
        "the lens at a mid-block site that was not captured: {r:?}"
    );
}

/// What [`stop_between_layers`] measured.
#[derive(Debug, Clone, Copy)]
pub struct StopTimings {
    /// The forward pass run to completion (the faster of two runs).
    pub full: Duration,
    /// Four calls with a stop raised before they started.
    pub before: Duration,
    /// How long into the call the stop was raised, and how long the call took to return after.
    pub raised_after: Duration,
    pub latency: Duration,
    /// Tries it took (a try is repeated when the call ended before the stop was raised or
    /// the machine was too busy to return within the bound).
    pub tries: usize,
}

const STOP_TRIES: usize = 5;

/// A [`Stop`] is honoured:
/// - one never raised changes nothing: `forward_until` gives the bits of `forward`,
///   `readout_until` those of `readout`;
/// - one raised before the call: `forward_until` (fresh and with a prefix), `readout_until`
///   and the lens return [`Error::Stopped`], four calls in under a quarter of a full pass;
/// - one raised from another thread a third of a full pass into `forward_until` on `long`
///   (the call is waited for with that deadline, so it is known to be running): the call
///   returns [`Error::Stopped`], less than a third of a full pass after the stop was raised
///   (up to 5 tries when the machine is too busy); the backend is unchanged afterwards.
///
/// `long` must take long enough (tens of milliseconds) that a third of it is measurable.
pub fn stop_between_layers(backend: &dyn Backend, long: &[u32]) -> StopTimings {
    let opts = CaptureOptions::default();
    let n = backend.info().n_layers;
    let never = Stop::new();
    let mut full = Duration::MAX;
    let mut runs = Vec::new();
    for _ in 0..2 {
        let t = Instant::now();
        runs.push(
            backend
                .forward_until(None, long, opts, &never)
                .unwrap_or_else(|e| panic!("forward_until with a stop never raised: {e}")),
        );
        full = full.min(t.elapsed());
    }
    let plain = backend
        .forward(long, opts)
        .unwrap_or_else(|e| panic!("forward: {e}"));
    assert_bit_identical(&runs[0], &plain, "forward_until with a stop never raised");
    let rows: Vec<f32> = (0..long.len().min(8))
        .flat_map(|p| runs[0].row(Site::Layer(n), p).unwrap_or(&[]).to_vec())
        .collect();
    for kind in LensKind::ALL {
        let bits = |v: Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
        let plain = backend.readout(&rows, kind).expect("readout");
        let until = backend.readout_until(&rows, kind, &never).expect("readout");
        assert_eq!(
            bits(plain),
            bits(until),
            "{kind} readout_until with a stop never raised"
        );
    }

    let raised = Stop::new();
    raised.stop();
    let prefix = backend.forward(&long[..2], opts).expect("prefix");
    let t = Instant::now();
    let results = [
        (
            "forward_until",
            backend.forward_until(None, long, opts, &raised).map(drop),
        ),
        (
            "forward_until from a prefix",
            backend
                .forward_until(Some(&prefix), long, opts, &raised)
                .map(drop),
        ),
        (
            "readout_until",
            backend
                .readout_until(&rows, LensKind::Norm, &raised)
                .map(drop),
        ),
        (
            "the lens",
            Lens::new(backend, &runs[0], LensKind::Norm, 5)
                .with_stop(raised.clone())
                .grid(&[Site::Layer(0), Site::Layer(n)])
                .map(drop),
        ),
    ];
    let before = t.elapsed();
    for (what, r) in results {
        assert!(
            matches!(r, Err(Error::Stopped)),
            "{what} with a stop raised before it started: {r:?}"
        );
    }
    assert!(
        before * 4 < full,
        "four calls with a stop raised before took {before:?}, a full pass {full:?}"
    );

    let mut tries = Vec::new();
    for attempt in 1..=STOP_TRIES {
        let stop = Stop::new();
        let started = Barrier::new(2);
        let (done_tx, done_rx) = mpsc::channel();
        let (r, ended, began, raised_at, finished_first) = std::thread::scope(|s| {
            let worker = s.spawn(|| {
                started.wait();
                let r = backend.forward_until(None, long, opts, &stop).map(drop);
                let ended = Instant::now();
                let _ = done_tx.send(());
                (r, ended)
            });
            started.wait();
            let began = Instant::now();
            let finished_first = done_rx.recv_timeout(full / 3).is_ok();
            stop.stop();
            let raised_at = Instant::now();
            let (r, ended) = worker.join().expect("the worker panicked");
            (r, ended, began, raised_at, finished_first)
        });
        let raised_after = raised_at.saturating_duration_since(began);
        let last_block = full / u32::try_from(n.max(1)).unwrap_or(u32::MAX);
        if finished_first || (r.is_ok() && ended.saturating_duration_since(raised_at) < last_block)
        {
            // The pass ended before the stop was raised, or it was raised during the last
            // block (a faster pass than the one measured, on a machine whose load changed):
            // nothing to see; time the next try against this pass.
            tries.push(format!(
                "try {attempt}: the call ended before the stop was raised"
            ));
            if r.is_ok() {
                full = full.min(ended.saturating_duration_since(began));
            }
            continue;
        }
        assert!(
            matches!(r, Err(Error::Stopped)),
            "a stop raised {raised_after:?} into a forward pass of {} tokens (a full pass: \
             {full:?}) did not stop it: {r:?}",
            long.len()
        );
        let latency = ended.saturating_duration_since(raised_at);
        if latency * 3 < full {
            let after = backend
                .forward_until(None, long, opts, &never)
                .unwrap_or_else(|e| panic!("forward_until after a stop: {e}"));
            assert_bit_identical(&after, &runs[1], "a forward pass after a stopped one");
            return StopTimings {
                full,
                before,
                raised_after,
                latency,
                tries: attempt,
            };
        }
        tries.push(format!(
            "try {attempt}: raised {raised_after:?} into the call, honoured {latency:?} later"
        ));
    }
    panic!(
        "a stop raised during a forward pass of {} tokens was not honoured within a third of \
         a full pass ({full:?}): {}",
        long.len(),
        tries.join("; ")
    );
}

/// `|a - b| ≤ bound · max(1, |b|)`: relative for values above 1, absolute below.
fn close(a: f64, b: f64, bound: f64) -> bool {
    (a - b).abs() <= bound * b.abs().max(1.0)
}

/// Bound on [`reduce_matches_host`]'s probabilities (absolute), entropies and KLs (relative
/// above 1, absolute below).
pub const REDUCE_BOUND: f64 = 1e-6;

/// Compare two lens results; `Err` says where they differ.
fn compare_views(got: &[PositionView], want: &[PositionView]) -> Result<(), String> {
    let check = |ok: bool, what: String| if ok { Ok(()) } else { Err(what) };
    check(
        got.len() == want.len(),
        format!("{} positions, expected {}", got.len(), want.len()),
    )?;
    for (g, w) in got.iter().zip(want) {
        let at = format!("position {}", w.position);
        check(
            (g.position, g.token) == (w.position, w.token),
            format!("{at}: position/token {}/{}", g.position, g.token),
        )?;
        check(
            g.final_top1.id == w.final_top1.id
                && close(
                    f64::from(g.final_top1.prob),
                    f64::from(w.final_top1.prob),
                    REDUCE_BOUND,
                )
                && close(
                    f64::from(g.final_top1.logit),
                    f64::from(w.final_top1.logit),
                    1e-5,
                ),
            format!("{at}: final top-1 {:?} vs {:?}", g.final_top1, w.final_top1),
        )?;
        check(
            g.decided_at == w.decided_at,
            format!("{at}: decided at {:?} vs {:?}", g.decided_at, w.decided_at),
        )?;
        check(
            g.cells.len() == w.cells.len(),
            format!("{at}: {} cells vs {}", g.cells.len(), w.cells.len()),
        )?;
        for (c, d) in g.cells.iter().zip(&w.cells) {
            let at = format!("{at}, {:?}", d.site);
            let ids = |cell: &lens_core::Cell| cell.top.iter().map(|p| p.id).collect::<Vec<_>>();
            check(c.site == d.site, format!("{at}: site {:?}", c.site))?;
            check(
                ids(c) == ids(d),
                format!("{at}: top ids {:?} vs {:?}", ids(c), ids(d)),
            )?;
            for (p, q) in c.top.iter().zip(&d.top) {
                check(
                    close(f64::from(p.prob), f64::from(q.prob), REDUCE_BOUND)
                        && close(f64::from(p.logit), f64::from(q.logit), 1e-5),
                    format!("{at}: top {p:?} vs {q:?}"),
                )?;
            }
            check(
                close(c.entropy, d.entropy, REDUCE_BOUND),
                format!("{at}: entropy {} vs {}", c.entropy, d.entropy),
            )?;
            check(
                close(c.kl_to_final, d.kl_to_final, REDUCE_BOUND),
                format!("{at}: KL {} vs {}", c.kl_to_final, d.kl_to_final),
            )?;
            let next_ok = match (c.next, d.next) {
                (None, None) => true,
                (Some(a), Some(b)) => {
                    a.id == b.id
                        && a.rank == b.rank
                        && close(f64::from(a.prob), f64::from(b.prob), REDUCE_BOUND)
                }
                _ => false,
            };
            check(next_ok, format!("{at}: next {:?} vs {:?}", c.next, d.next))?;
            check(
                c.final_top1_rank == d.final_top1_rank
                    && close(
                        f64::from(c.final_top1_prob),
                        f64::from(d.final_top1_prob),
                        REDUCE_BOUND,
                    ),
                format!(
                    "{at}: final top-1 rank/prob {}/{} vs {}/{}",
                    c.final_top1_rank, c.final_top1_prob, d.final_top1_rank, d.final_top1_prob
                ),
            )?;
        }
    }
    Ok(())
}

/// [`Backend::lens`] gives what [`lens_core::host_lens`] (the core's host math) gives, for all
/// layers at every position and for a few positions and sites (mid-block ones too) out of
/// order, with the norm and the raw lens, top-k 1 and 7: the same top ids, ranks,
/// `final_top1_rank`s and decisions; probabilities within [`REDUCE_BOUND`], entropies and KLs
/// within it relative (absolute below 1). Returns the number of cells compared.
pub fn reduce_matches_host(backend: &dyn Backend, ids: &[u32]) -> usize {
    let states = backend
        .forward(ids, CaptureOptions { mid_block: true })
        .unwrap_or_else(|e| panic!("forward: {e}"));
    let (n, len) = (states.n_layers(), ids.len());
    let layers: Vec<Site> = (0..=n).map(Site::Layer).collect();
    let every: Vec<usize> = (0..len).collect();
    let mut some = vec![len - 1, 0, len / 2];
    some.dedup();
    let mut sites = vec![
        Site::Layer(n),
        Site::MidBlock(1),
        Site::Layer(0),
        Site::MidBlock(n),
        Site::Layer(n / 2),
    ];
    sites.dedup();
    let requests = [
        (&every, &layers, LensKind::Norm, 1),
        (&every, &layers, LensKind::Norm, 7),
        (&every, &layers, LensKind::Raw, 7),
        (&some, &sites, LensKind::Norm, 7),
        (&some, &sites, LensKind::Raw, 1),
    ];
    let mut cells = 0;
    for (positions, sites, kind, top_k) in requests {
        let request = LensRequest {
            states: &states,
            positions,
            sites,
            kind,
            translators: None,
            top_k,
        };
        let what = format!("{kind} lens, top-{top_k}, positions {positions:?}, sites {sites:?}");
        let got = backend
            .lens(&request, &Stop::never())
            .unwrap_or_else(|e| panic!("{what}: the backend's lens: {e}"));
        let want = host_lens(backend, &request, &Stop::never())
            .unwrap_or_else(|e| panic!("{what}: the host lens: {e}"));
        if let Err(e) = compare_views(&got, &want) {
            panic!("{what}: the backend's reduce differs from the host math: {e}");
        }
        cells += want.iter().map(|v| v.cells.len()).sum::<usize>();
    }
    cells
}

/// Bad input is an error of the right kind, never a panic: an empty prompt, one longer than
/// the context, an id outside the vocabulary (through `forward`, `forward_until` and
/// `forward_reusing`); through [`Lens`], a position past the prompt, a layer past the last and
/// a mid-block site that was not captured; a readout of a ragged number of values.
pub fn bad_inputs(backend: &dyn Backend, ids: &[u32]) {
    let info = backend.info();
    let (n, vocab, context) = (info.n_layers, info.vocab_size, info.context_length);
    let opts = CaptureOptions::default();
    let good = ids.first().copied().unwrap_or(0);
    let long = vec![good; context + 1];
    let states = backend.forward(ids, opts).expect("forward");
    type Forward<'a> = &'a dyn Fn(&[u32]) -> Result<HiddenStates, Error>;
    let calls: [(&str, Forward<'_>); 3] = [
        ("forward", &|t| backend.forward(t, opts)),
        ("forward_until", &|t| {
            backend.forward_until(None, t, opts, &Stop::never())
        }),
        ("forward_reusing", &|t| {
            backend.forward_reusing(&states, t, opts)
        }),
    ];
    for (what, call) in calls {
        let run = |t: &[u32]| {
            catch_unwind(AssertUnwindSafe(|| call(t).map(drop)))
                .unwrap_or_else(|_| panic!("{what} of {} tokens panicked", t.len()))
        };
        let r = run(&[]);
        assert!(
            matches!(r, Err(Error::EmptyPrompt)),
            "{what} of no tokens: {r:?}"
        );
        let r = run(&long);
        assert!(
            matches!(r, Err(Error::PromptTooLong { tokens, context: c })
                if tokens == context + 1 && c == context),
            "{what} of {} tokens, context {context}: {r:?}",
            long.len()
        );
        for bad in [vocab as u32, u32::MAX] {
            let r = run(&[good, bad]);
            assert!(
                matches!(r, Err(Error::TokenOutOfRange { id, vocab: v }) if id == bad && v == vocab),
                "{what} with token id {bad}, vocabulary {vocab}: {r:?}"
            );
        }
    }

    let len = ids.len();
    let lens = Lens::new(backend, &states, LensKind::Norm, 3);
    let r = lens.position(len, &[Site::Layer(0)]).map(drop);
    assert!(
        matches!(r, Err(Error::PositionOutOfRange { position, len: l }) if position == len && l == len),
        "the lens at position {len} of {len}: {r:?}"
    );
    let r = lens.positions(&[0, len + 3], &[Site::Layer(0)]).map(drop);
    assert!(
        matches!(r, Err(Error::PositionOutOfRange { position, .. }) if position == len + 3),
        "the lens at positions 0 and {}: {r:?}",
        len + 3
    );
    for site in [Site::Layer(n + 1), Site::MidBlock(1)] {
        let r = lens.position(0, &[Site::Layer(0), site]).map(drop);
        let layer = match site {
            Site::Layer(l) | Site::MidBlock(l) => l,
        };
        assert!(
            matches!(r, Err(Error::LayerOutOfRange { layer: l, max }) if l == layer && max == n),
            "the lens at {site:?} of a model with {n} blocks (no mid-block rows): {r:?}"
        );
    }

    let hidden = info.hidden_size;
    for values in [hidden + 1, 2 * hidden - 1, hidden - 1] {
        let rows = vec![0.5f32; values];
        for kind in LensKind::ALL {
            let r = catch_unwind(AssertUnwindSafe(|| backend.readout(&rows, kind).map(drop)))
                .unwrap_or_else(|_| panic!("{kind} readout of {values} values panicked"));
            assert!(
                r.is_err(),
                "{kind} readout of {values} values, rows of {hidden}"
            );
            let r = catch_unwind(AssertUnwindSafe(|| {
                backend.readout_until(&rows, kind, &Stop::never()).map(drop)
            }))
            .unwrap_or_else(|_| panic!("{kind} readout_until of {values} values panicked"));
            assert!(r.is_err(), "{kind} readout_until of {values} values");
        }
    }
}

/// A source of each kind the loader does not read (none of them exists).
fn foreign_sources(loader: &dyn Loader) -> Vec<Source> {
    let sources = loader.capabilities().sources;
    [
        Source::Gguf("conformance-missing.gguf".into()),
        Source::HfFolder("conformance-missing-folder".into()),
        Source::Named("conformance-missing".into()),
    ]
    .into_iter()
    .filter(|s| !sources.contains(&s.kind()))
    .collect()
}

/// `Error::Unsupported` whose message contains `naming`, from `pick` (by name and auto) and
/// from `load`.
#[track_caller]
fn assert_refused(
    registry: &Registry,
    loader: &dyn Loader,
    source: &Source,
    options: &LoadOptions,
    naming: &str,
) {
    let what = format!("{source} with {options:?}");
    let results = [
        (
            "pick by name",
            registry
                .pick(Some(loader.name()), source, options)
                .map(drop),
        ),
        ("pick auto", registry.pick(None, source, options).map(drop)),
        ("load", loader.load(source, options).map(drop)),
    ];
    for (how, r) in results {
        match r {
            Err(Error::Unsupported(msg)) => assert!(
                msg.contains(naming),
                "{how} {what}: the refusal {msg:?} does not name {naming:?}"
            ),
            other => panic!("{how} {what}: expected Error::Unsupported, got {other:?}"),
        }
    }
}

/// A [`Registry`] of `loader` picks it, by name and automatically, for `source` with
/// `options` (which it supports); it refuses with [`Error::Unsupported`], naming the thing, an
/// unknown backend name, each device family and precision the loader does not list, each kind
/// of source it does not read, and each of `refused` (a source and options the backend cannot
/// honour, with a word the refusal must contain); `load` refuses the same.
pub fn registry(
    loader: &'static dyn Loader,
    source: &Source,
    options: &LoadOptions,
    refused: &[(Source, LoadOptions, &str)],
) {
    let caps = loader.capabilities();
    assert!(
        !caps.sources.is_empty() && !caps.devices.is_empty() && !caps.precisions.is_empty(),
        "{}: empty capabilities {caps:?}",
        loader.name()
    );
    assert!(
        caps.sources.contains(&source.kind())
            && caps.precisions.contains(&options.precision)
            && caps
                .devices
                .iter()
                .any(|d| d.family() == options.device.family()),
        "{}: {source} with {options:?} is outside its own capabilities {caps:?}",
        loader.name()
    );
    let registry = Registry::new(vec![loader]);
    for name in [Some(loader.name()), None, Some("auto")] {
        let picked = registry
            .pick(name, source, options)
            .unwrap_or_else(|e| panic!("pick {name:?} for {source}: {e}"));
        assert_eq!(picked.name(), loader.name(), "pick {name:?}");
    }
    loader
        .supports(source, options)
        .unwrap_or_else(|e| panic!("supports {source}: {e}"));
    let r = registry
        .pick(Some("no-such-backend"), source, options)
        .map(drop);
    assert!(
        matches!(&r, Err(Error::Unsupported(m)) if m.contains("no-such-backend")),
        "pick an unknown backend: {r:?}"
    );

    for device in [Device::Cuda(0), Device::Metal(0)] {
        if !caps.devices.iter().any(|d| d.family() == device.family()) {
            let o = LoadOptions { device, ..*options };
            assert_refused(&registry, loader, source, &o, &device.to_string());
        }
    }
    for precision in Precision::ALL {
        if !caps.precisions.contains(&precision) {
            let o = LoadOptions {
                precision,
                ..*options
            };
            assert_refused(&registry, loader, source, &o, precision.as_str());
        }
    }
    for foreign in foreign_sources(loader) {
        let naming = match &foreign {
            Source::Gguf(p) | Source::HfFolder(p) => p.display().to_string(),
            Source::Named(n) => n.clone(),
        };
        assert_refused(&registry, loader, &foreign, options, &naming);
    }
    for (source, options, naming) in refused {
        assert_refused(&registry, loader, source, options, naming);
    }
}
