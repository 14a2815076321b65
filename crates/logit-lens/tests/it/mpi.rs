//! The `mpi` backend: a real daemon whose lens runs in a real `mpirun -np 2` job on loopback.
//! Its lens equals the single-process (candle) lens for a fresh prompt and for an edit that
//! reuses the cached prefix on every stage; a rank killed or stopped mid-request, or a job
//! that never starts, is a clear error within the timeout, and the daemon goes on serving.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::serve::{frame, Server};
use crate::{data_dir, logit_lens_env};

/// mpirun as CI runs it: as root, two ranks on a machine that may have fewer cores.
const MPI_ARGS: &str = "--allow-run-as-root --oversubscribe";

fn tiny_llama() -> String {
    data_dir()
        .join("oracle/tiny-llama/tiny-llama.f32.gguf")
        .display()
        .to_string()
}

fn mpi_server(model: &str, timeout_s: &str) -> Server {
    Server::tcp_with_env(
        &["--model", model, "--backend", "mpi"],
        &[
            ("LOGIT_LENS_MPI_ARGS", MPI_ARGS),
            ("LOGIT_LENS_MPI_RANKS", "2"),
            ("LOGIT_LENS_MPI_TIMEOUT", timeout_s),
        ],
    )
}

/// Two `lens/analyze` reports agree: the same tokens, layers and positions; in every cell the
/// same top-1, and the top predictions' and the next token's probabilities within 1e-4.
#[track_caller]
fn check_same_lens(got: &Value, want: &Value) {
    assert_eq!(got["tokens"], want["tokens"]);
    assert_eq!(got["layers"], want["layers"]);
    let (g, w) = (
        got["positions"].as_array().expect("positions"),
        want["positions"].as_array().expect("positions"),
    );
    assert_eq!(g.len(), w.len());
    // Probabilities within 1e-4; entropies and KLs (nats, up to ~100 at layer 0) within 1e-4
    // of their size: the ranks read out other batches of rows, so f32 sums reassociate.
    let close = |a: &Value, b: &Value, what: &str| {
        let (a, b) = (
            a.as_f64().unwrap_or(f64::NAN),
            b.as_f64().unwrap_or(f64::NAN),
        );
        assert!(
            (a - b).abs() <= 1e-4 * b.abs().max(1.0),
            "{what}: {a} vs {b}"
        );
    };
    let mut cells = 0;
    for (gp, wp) in g.iter().zip(w) {
        assert_eq!(gp["position"], wp["position"]);
        assert_eq!(gp["final_top1"]["id"], wp["final_top1"]["id"]);
        assert_eq!(gp["decided_at"], wp["decided_at"]);
        close(
            &gp["final_top1"]["prob"],
            &wp["final_top1"]["prob"],
            "final top-1",
        );
        let (gc, wc) = (
            gp["cells"].as_array().expect("cells"),
            wp["cells"].as_array().expect("cells"),
        );
        assert_eq!(gc.len(), wc.len());
        for (a, b) in gc.iter().zip(wc) {
            let at = format!("position {} layer {}", gp["position"], a["layer"]);
            assert_eq!(a["layer"], b["layer"]);
            assert_eq!(a["top"][0]["id"], b["top"][0]["id"], "top-1 at {at}");
            for (x, y) in a["top"]
                .as_array()
                .expect("top")
                .iter()
                .zip(b["top"].as_array().expect("top"))
            {
                close(&x["prob"], &y["prob"], &at);
            }
            close(&a["entropy"], &b["entropy"], &at);
            close(&a["kl_to_final"], &b["kl_to_final"], &at);
            if !b["next"].is_null() {
                assert_eq!(a["next"]["rank"], b["next"]["rank"], "{at}");
                close(&a["next"]["prob"], &b["next"]["prob"], &at);
            }
            cells += 1;
        }
    }
    assert!(cells > 0, "no cells compared");
}

fn check_pipeline_equals_one_process(model: &str, text: &str, edited: &str) {
    let one = Server::tcp(&["--model", model, "--backend", "candle"]);
    let two = mpi_server(model, "300");
    let (mut a, mut b) = (one.connect(), two.connect());
    for t in [text, edited] {
        let params = json!({ "text": t, "topK": 3 });
        check_same_lens(
            &b.ok("lens/analyze", params.clone()),
            &a.ok("lens/analyze", params),
        );
    }
    // The edit reused the prompt's cached positions (each rank its own keys and values).
    let stats = b.ok("lens/cacheStats", json!({}));
    assert!(stats["tokensReused"].as_u64().unwrap_or(0) > 0, "{stats}");
    // A selection of layers and positions, as the single process reads it.
    let params = json!({ "text": edited, "layers": "0,3,-1", "positions": [0, -1], "topK": 2 });
    check_same_lens(
        &b.ok("lens/analyze", params.clone()),
        &a.ok("lens/analyze", params),
    );
}

#[test]
fn the_two_rank_lens_of_the_tiny_llama_equals_the_single_process_lens() {
    check_pipeline_equals_one_process(
        &tiny_llama(),
        "Hello world, this is a tiny test",
        "Hello world, this is a small test of it",
    );
}

/// The pipeline backend in this process (the daemon's side), its ranks running this build's
/// `logit-lens mpi-worker`.
fn pipeline(model: &Path, ranks: usize) -> lens_mpi::MpiBackend {
    lens_mpi::MpiBackend::start(lens_mpi::Launch {
        mpirun: "mpirun".into(),
        args: MPI_ARGS.split_whitespace().map(String::from).collect(),
        ranks,
        timeout: Duration::from_secs(300),
        worker: PathBuf::from(env!("CARGO_BIN_EXE_logit-lens")),
        model: model.to_path_buf(),
        precision: lens_core::Precision::F32,
        threads: None,
    })
    .expect("start the pipeline")
}

/// Against the independent reference: HF transformers' lens of the tiny Llama (the golden the
/// candle backend is held to), read by two and by three ranks; and its tokenizer's offsets.
#[test]
fn the_pipeline_lens_of_the_tiny_llama_matches_hf_transformers() {
    let model = PathBuf::from(tiny_llama());
    let golden = data_dir().join("oracle/tiny-llama/golden.json");
    for ranks in [2, 3] {
        let backend = pipeline(&model, ranks);
        let stages = backend.stages().to_vec();
        assert_eq!(stages.len(), ranks);
        assert_eq!((stages[0].0, stages[ranks - 1].1), (0, 4), "{stages:?}");
        let dev = lens_conformance::check_golden(
            &backend,
            &golden,
            lens_core::LensKind::Norm,
            lens_conformance::F32,
        );
        assert_eq!(dev.cells, 5 * (8 + 26), "{ranks} ranks");
    }
}

#[test]
fn the_two_rank_lens_of_the_default_model_equals_the_single_process_lens() {
    let text = "The capital of France is Paris, and the capital of Germany is";
    let edited = "The capital of France is Paris, and the capital of Italy is";
    check_pipeline_equals_one_process("smollm2-135m", text, edited);
}

/// The ranks of the daemon's job (`mpi-worker` processes below it), by MPI rank.
fn ranks_of(daemon: u32) -> Vec<(u32, u32)> {
    let parent = |pid: u32| -> Option<u32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // pid (comm) state ppid ...: comm may hold spaces, so split after its `)`.
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    let below = |mut pid: u32| {
        while let Some(p) = parent(pid) {
            if p == daemon {
                return true;
            }
            if p <= 1 {
                return false;
            }
            pid = p;
        }
        false
    };
    let mut ranks = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if !String::from_utf8_lossy(&cmdline).contains("mpi-worker") || !below(pid) {
            continue;
        }
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let rank = environ
            .split(|&b| b == 0)
            .filter_map(|v| std::str::from_utf8(v).ok())
            .find_map(|v| v.strip_prefix("OMPI_COMM_WORLD_RANK="))
            .and_then(|r| r.parse().ok());
        if let Some(rank) = rank {
            ranks.push((rank, pid));
        }
    }
    ranks.sort();
    ranks
}

fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill {sig} {pid}");
}

/// Send `lens/analyze` of `text`, do `during` once it is sent, and return the response and how
/// long it took.
fn analyze_while(server: &Server, text: &str, during: impl FnOnce()) -> (Value, Duration) {
    let mut c = server.connect();
    let msg =
        json!({ "jsonrpc": "2.0", "id": 7, "method": "lens/analyze", "params": { "text": text } });
    let started = Instant::now();
    c.send_raw(&frame(msg.to_string().as_bytes()));
    during();
    let body = c.read().expect("a response");
    (
        serde_json::from_str(&body).expect("JSON"),
        started.elapsed(),
    )
}

#[track_caller]
fn assert_job_error(resp: &Value, words: &str) {
    let message = resp["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("the MPI job failed") && message.contains(words),
        "expected an MPI job error saying {words:?}: {resp}"
    );
}

#[test]
fn a_rank_killed_mid_request_is_a_clear_error_and_the_daemon_serves_on() {
    let mut server = mpi_server("smollm2-135m", "300");
    let ranks = ranks_of(server.pid());
    assert_eq!(
        ranks.iter().map(|r| r.0).collect::<Vec<_>>(),
        [0, 1],
        "{ranks:?}"
    );
    // A long prompt: its full lens takes seconds, and rank 1 dies while it runs.
    let long = "The quick brown fox jumps over the lazy dog. ".repeat(30);
    let (resp, took) = analyze_while(&server, &long, || signal(ranks[1].1, "-KILL"));
    assert_job_error(&resp, "a rank died");
    assert!(took < Duration::from_secs(120), "{took:?}");
    assert!(server.is_running(), "the daemon died with its rank");
    // The next request starts a new job.
    let mut c = server.connect();
    let r = c.ok(
        "lens/analyze",
        json!({ "text": "The capital of France is", "layers": [30], "topK": 1 }),
    );
    assert_eq!(
        r["positions"][4]["final_top1"]["text"],
        json!(" Paris"),
        "{r}"
    );
    let again = ranks_of(server.pid());
    assert_eq!(again.len(), 2, "{again:?}");
    assert!(
        again.iter().all(|r| r.1 != ranks[1].1),
        "a new job: {again:?}"
    );
}

#[test]
fn a_rank_that_hangs_is_an_error_after_the_timeout_and_the_daemon_serves_on() {
    let model = tiny_llama();
    let mut server = mpi_server(&model, "8");
    let ranks = ranks_of(server.pid());
    assert_eq!(ranks.len(), 2, "{ranks:?}");
    let (resp, took) = analyze_while(&server, "a few words of text", || {
        signal(ranks[1].1, "-STOP")
    });
    assert_job_error(&resp, "no answer within 8 s");
    assert!(
        took >= Duration::from_secs(8) && took < Duration::from_secs(60),
        "{took:?}"
    );
    assert!(server.is_running());
    // The stopped job is gone (killed), and a new one answers.
    let _ = std::process::Command::new("kill")
        .args(["-CONT", &ranks[1].1.to_string()])
        .status();
    let mut c = server.connect();
    let r = c.ok(
        "lens/analyze",
        json!({ "text": "a few words of text", "layers": [4] }),
    );
    assert!(
        !r["positions"].as_array().expect("positions").is_empty(),
        "{r}"
    );
    let gone = |pid: u32| {
        !Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.contains(") Z "))
    };
    assert!(
        ranks.iter().all(|r| gone(r.1)),
        "the hung job was killed: {ranks:?}"
    );
}

#[test]
fn a_job_that_never_starts_is_a_clear_error() {
    // mpirun missing.
    let missing = logit_lens_env(
        &["info", "--model", &tiny_llama(), "--backend", "mpi"],
        &[("LOGIT_LENS_MPIRUN", "/nonexistent/mpirun")],
    );
    assert_ne!(missing.code, 0);
    assert!(
        missing.stderr.contains("the MPI job did not start")
            && missing.stderr.contains("/nonexistent/mpirun"),
        "{}",
        missing.stderr
    );
    // An mpirun that hangs before rank 0 connects: an error after the timeout.
    let dir = tempfile::tempdir().expect("tempdir");
    let hang: PathBuf = dir.path().join("mpirun");
    std::fs::write(&hang, "#!/bin/sh\nexec sleep 600\n").expect("write");
    std::process::Command::new("chmod")
        .args(["+x"])
        .arg(&hang)
        .status()
        .expect("chmod");
    let started = Instant::now();
    let hung = logit_lens_env(
        &["info", "--model", &tiny_llama(), "--backend", "mpi"],
        &[
            ("LOGIT_LENS_MPIRUN", hang.to_str().expect("path")),
            ("LOGIT_LENS_MPI_TIMEOUT", "3"),
        ],
    );
    assert_ne!(hung.code, 0);
    assert!(
        hung.stderr.contains("rank 0 did not connect within 3 s"),
        "{}",
        hung.stderr
    );
    assert!(started.elapsed() < Duration::from_secs(60));
}

#[test]
fn backends_shows_the_pipeline_mode() {
    let r = crate::logit_lens(&["backends", "--format", "json"]);
    let v: Value = serde_json::from_str(&r.stdout).expect("JSON");
    let mpi = v["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .find(|b| b["name"] == json!("mpi"))
        .cloned()
        .expect("an mpi backend in an --features mpi build");
    assert!(
        mpi["mode"].as_str().is_some_and(|m| m.contains("pipeline")),
        "{mpi}"
    );
}
