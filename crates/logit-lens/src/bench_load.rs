//! `logit-lens bench-server --clients N --requests M`: many clients at once against a real
//! daemon (this binary's `serve --listen`, started as a child process), over real TCP.
//!
//! Each client sends its requests one after another, a mix of model work (`lens/analyze` of
//! its own prompts, `lens/position` on one of them again) and cheap methods (`lens/tokenize`,
//! `lens/modelInfo`, `lens/cacheStats`). Printed: per method p50/p99/max, replies lost (none
//! or not a correct answer), the model's requests per second beside the same model requests
//! sent by one client alone in the same run, and the daemon's peak RSS.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::bench_server::percentile;
use crate::cli::ModelArgs;

/// The daemon, killed on drop.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `logit-lens serve DOOR…` (this executable) on the model `model` names: the daemon the
/// benches measure from outside.
pub(crate) fn serve_command(model: &ModelArgs, door: &[&str]) -> Result<Command> {
    let exe = std::env::current_exe().context("this executable")?;
    let mut cmd = Command::new(exe);
    cmd.arg("serve")
        .args(door)
        .args(["--backend", &model.backend])
        .args(["--precision", &model.precision.to_string()])
        .args(["--device", &model.device.to_string()]);
    if let Some(m) = &model.model {
        cmd.arg("--model").arg(m);
    }
    if let Some(t) = model.threads {
        cmd.args(["--threads", &t.to_string()]);
    }
    Ok(cmd)
}

fn start(model: &ModelArgs, clients: usize) -> Result<(Daemon, String)> {
    let connections = (clients + 8).to_string();
    let mut child = serve_command(
        model,
        &["--listen", "127.0.0.1:0", "--max-connections", &connections],
    )?
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .context("start the daemon")?;
    let stderr = child.stderr.take().context("stderr")?;
    let daemon = Daemon(child);
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        match lines.next() {
            Some(Ok(l)) => {
                if let Some(a) = l.strip_prefix("listening on ") {
                    break a.to_string();
                }
            }
            _ => bail!("the daemon did not start"),
        }
    };
    // Keep draining its stderr so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Ok((daemon, addr))
}

pub(crate) fn frame(v: &Value) -> Vec<u8> {
    let body = v.to_string();
    let mut out = format!("Content-Length: {}\r\n\r\n", body.len()).into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

pub(crate) fn read_frame(r: &mut impl BufRead) -> Option<Value> {
    let mut len = None;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some(v) = line.strip_prefix("Content-Length:") {
            len = v.trim().parse::<usize>().ok();
        }
    }
    let mut body = vec![0; len?];
    r.read_exact(&mut body).ok()?;
    serde_json::from_slice(&body).ok()
}

/// The `j`th request of client `c`: (method, params).
fn request(c: usize, j: usize) -> (&'static str, Value) {
    let prompt =
        |k: usize| format!("Client {c} asks question {k}: what does layer {k} predict after this");
    match j % 5 {
        0 => ("lens/analyze", json!({ "text": prompt(j), "topK": 5 })),
        1 => ("lens/tokenize", json!({ "text": prompt(j) })),
        2 => (
            "lens/position",
            json!({ "text": prompt(j - 2), "position": -1 }),
        ),
        3 => ("lens/modelInfo", json!({})),
        _ => ("lens/cacheStats", json!({})),
    }
}

fn is_model(method: &str) -> bool {
    matches!(method, "lens/analyze" | "lens/position")
}

struct Sample {
    method: &'static str,
    took: Duration,
    ok: bool,
}

fn client(addr: &str, c: usize, requests: usize, only_model: bool) -> Result<Vec<Sample>> {
    let s = TcpStream::connect(addr).context("connect")?;
    s.set_read_timeout(Some(Duration::from_secs(600)))?;
    s.set_nodelay(true)?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    let mut out = Vec::with_capacity(requests);
    for j in 0..requests {
        let (method, params) = request(c, j);
        if only_model && !is_model(method) {
            continue;
        }
        let id = j as i64 + 1;
        let t = Instant::now();
        w.write_all(&frame(
            &json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params }),
        ))?;
        let reply = read_frame(&mut r);
        let took = t.elapsed();
        let ok = reply.is_some_and(|v| v["id"] == json!(id) && v.get("result").is_some());
        out.push(Sample { method, took, ok });
    }
    Ok(out)
}

/// Peak resident memory of process `pid` (VmHWM), in MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

pub fn run(model: &ModelArgs, clients: usize, requests: usize) -> Result<()> {
    let mut out = anstream::stdout();
    // Alone: one client sends the model requests of the mix, one after another (a fresh
    // daemon, so the cache starts as cold as the loaded run's).
    let (alone, addr) = start(model, 1)?;
    let t = Instant::now();
    let serial = client(&addr, clients + 1, requests, true)?;
    let serial_rate = serial.len() as f64 / t.elapsed().as_secs_f64();
    drop(alone);

    let (daemon, addr) = start(model, clients)?;
    let t = Instant::now();
    let results: Vec<Result<Vec<Sample>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                let addr = &addr;
                s.spawn(move || client(addr, c, requests, false))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a client thread panicked")))
            })
            .collect()
    });
    let wall = t.elapsed();
    let peak = peak_rss_mib(daemon.0.id());
    drop(daemon);
    let mut by_method: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
    let (mut lost, mut model_done, mut sent) = (0, 0, 0);
    for r in results {
        let samples = r?;
        for s in samples {
            sent += 1;
            if !s.ok {
                lost += 1;
            }
            if is_model(s.method) && s.ok {
                model_done += 1;
            }
            by_method.entry(s.method).or_default().push(s.took);
        }
    }
    writeln!(
        out,
        "{clients} clients x {requests} requests over TCP ({sent} in all), {:.1} s",
        wall.as_secs_f64()
    )?;
    let mut cheap_p99: f64 = 0.0;
    for (method, times) in &mut by_method {
        let (p50, p99) = (percentile(times, 0.5), percentile(times, 0.99));
        let max = percentile(times, 1.0);
        if !is_model(method) {
            cheap_p99 = cheap_p99.max(p99);
        }
        writeln!(
            out,
            "  {method:16} {:5} requests: p50 {p50:8.1} ms, p99 {p99:8.1} ms, max {max:8.1} ms",
            times.len()
        )?;
    }
    let rate = model_done as f64 / wall.as_secs_f64();
    writeln!(out, "cheap methods p99 {cheap_p99:.1} ms (target <= 50 ms)")?;
    writeln!(out, "lost or wrong replies: {lost} (target 0)")?;
    writeln!(
        out,
        "model requests: {rate:.1}/s under load, {serial_rate:.1}/s from one client alone (ratio {:.2})",
        rate / serial_rate
    )?;
    writeln!(out, "daemon peak RSS {peak:.0} MiB")?;
    out.flush()?;
    Ok(())
}
