//! `logit-lens bench-server --lsp`: the editor's cases, timed from outside, as an editor sees
//! them: a real `serve --stdio` process (this binary), driven over its stdin/stdout with
//! `didChange` and `hover` like an editor sends them (the hover right after the edit, without
//! waiting), on a one-line document of `--tokens` tokens.

use std::io::{BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::bench_load::{frame, read_frame, serve_command};
use crate::bench_server::percentile;
use crate::cli::ModelArgs;

const PROSE: &str = "The logit lens reads the residual stream of a transformer at every layer \
through the model's own unembedding, and shows which next token each layer would predict. \
Early layers tend to echo the current token; middle layers sketch plausible continuations; the \
last layers settle on the answer. ";
const URI: &str = "file:///bench/document.txt";

struct Lsp {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    next_id: i64,
    version: i64,
}

impl Drop for Lsp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Lsp {
    fn start(model: &ModelArgs) -> Result<Lsp> {
        let mut cmd = serve_command(model, &["--stdio"])?;
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("start serve --stdio")?;
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("stdout")?);
        Ok(Lsp {
            child,
            stdin,
            stdout,
            next_id: 1,
            version: 1,
        })
    }

    fn send(&mut self, v: &Value) -> Result<()> {
        self.stdin.write_all(&frame(v))?;
        self.stdin.flush()?;
        Ok(())
    }

    fn request(&mut self, method: &str, params: Value) -> Result<i64> {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params }))?;
        Ok(id)
    }

    fn response(&mut self, id: i64) -> Result<Value> {
        loop {
            let v = read_frame(&mut self.stdout).context("the server closed its output")?;
            if v["id"] == json!(id) && v.get("method").is_none() {
                if let Some(e) = v.get("error") {
                    bail!("request {id} failed: {e}");
                }
                return Ok(v["result"].clone());
            }
        }
    }

    fn call(&mut self, method: &str, params: Value) -> Result<Value> {
        let id = self.request(method, params)?;
        self.response(id)
    }

    fn notify(&mut self, method: &str, params: Value) -> Result<()> {
        self.send(&json!({ "jsonrpc": "2.0", "method": method, "params": params }))
    }

    /// Replace bytes `a..b` of the one-line document with `text`.
    fn edit(&mut self, a: usize, b: usize, text: &str) -> Result<()> {
        self.version += 1;
        let v = self.version;
        self.notify(
            "textDocument/didChange",
            json!({ "textDocument": { "uri": URI, "version": v },
                    "contentChanges": [{ "range": { "start": { "line": 0, "character": a }, "end": { "line": 0, "character": b } }, "text": text }] }),
        )
    }

    /// Hover at byte `at` of the one-line document; the time until its answer.
    fn hover(&mut self, at: usize) -> Result<Duration> {
        let t = Instant::now();
        let r = self.call(
            "textDocument/hover",
            json!({ "textDocument": { "uri": URI }, "position": { "line": 0, "character": at } }),
        )?;
        let took = t.elapsed();
        anyhow::ensure!(
            r["contents"]["value"]
                .as_str()
                .is_some_and(|m| m.contains("| layer |")),
            "no hover at {at}: {r}"
        );
        Ok(took)
    }
}

fn typed(i: usize) -> char {
    if i % 6 == 5 {
        ' '
    } else {
        char::from(b'a' + (i % 26) as u8)
    }
}

fn line(out: &mut impl Write, name: &str, times: &mut [Duration]) -> Result<()> {
    let (p50, p90, max) = (
        percentile(times, 0.5),
        percentile(times, 0.9),
        percentile(times, 1.0),
    );
    writeln!(
        out,
        "  {name:40} p50 {p50:6.1} ms, p90 {p90:6.1} ms, max {max:6.1} ms ({} runs)",
        times.len()
    )?;
    Ok(())
}

/// The f32 GEMM rate candle reaches here, measured now, and the one-position lens's product
/// (every layer's row times the unembedding) over it: the floor the line above is read against.
fn floor(info: &Value, out: &mut impl Write) -> Result<()> {
    let dim = |k: &str| info[k].as_u64().map(|v| v as usize);
    let (Some(layers), Some(hidden), Some(vocab)) =
        (dim("n_layers"), dim("hidden_size"), dim("vocab_size"))
    else {
        bail!("lens/modelInfo did not give the model's sizes: {info}");
    };
    if let Some(rate) = crate::bench::gemm_rate(hidden, vocab, 3, out)? {
        let flop = 2.0 * ((layers + 1) * hidden * vocab) as f64;
        writeln!(
            out,
            "f32 GEMM rate here ([512, {hidden}] · [{hidden}, {vocab}], candle, measured now): {:.1} GFLOP/s; \
             the one-position product ({} rows × {hidden} × {vocab}) at that rate: {:.2} ms",
            rate / 1e9,
            layers + 1,
            flop / rate * 1e3
        )?;
    }
    Ok(())
}

pub fn run(model: &ModelArgs, tokens: usize, edits: usize) -> Result<()> {
    let mut out = anstream::stdout();
    let mut lsp = Lsp::start(model)?;
    lsp.call(
        "initialize",
        json!({ "processId": null, "rootUri": null, "capabilities": {} }),
    )?;
    lsp.notify("initialized", json!({}))?;
    // A one-line document of exactly `tokens` tokens.
    let mut doc = String::new();
    let cut = loop {
        doc.push_str(PROSE);
        let t = lsp.call("lens/tokenize", json!({ "text": doc }))?;
        let t = t["tokens"].as_array().cloned().unwrap_or_default();
        if t.len() > tokens {
            break t[tokens - 1]["end"].as_u64().context("token end")? as usize;
        }
    };
    doc.truncate(cut);
    lsp.notify(
        "textDocument/didOpen",
        json!({ "textDocument": { "uri": URI, "languageId": "plaintext", "version": 1, "text": doc } }),
    )?;
    writeln!(
        out,
        "LSP over stdio, a {tokens}-token one-line document, {edits} edits per case (the hover sent right after the edit):"
    )?;
    let mut text = doc.clone();
    lsp.hover(text.len() - 1)?;

    // One character typed at the end, then a hover at `at(the typed byte)`.
    let mut end_edits = |lsp: &mut Lsp, at: &dyn Fn(usize) -> usize| -> Result<Vec<Duration>> {
        (0..edits)
            .map(|i| {
                let n = text.len();
                let c = typed(i);
                text.push(c);
                lsp.edit(n, n, &c.to_string())?;
                lsp.hover(at(n))
            })
            .collect()
    };
    let mut times = end_edits(&mut lsp, &|typed| typed)?;
    line(&mut out, "end edit + hover at the typed token", &mut times)?;
    // A third into the text as it is now (each typed character is one byte).
    let elsewhere = (doc.len() + edits) / 3;
    let mut times = end_edits(&mut lsp, &|_| elsewhere)?;
    line(&mut out, "end edit + hover elsewhere", &mut times)?;

    let mut times = Vec::new();
    let mut later = Vec::new();
    let mid = text.len() / 2;
    let toks = lsp.call("lens/tokenize", json!({ "text": text }))?;
    let toks = toks["tokens"].as_array().cloned().unwrap_or_default();
    let mid_token = toks
        .iter()
        .position(|t| t["start"].as_u64().is_some_and(|s| s as usize >= mid))
        .unwrap_or(0);
    let sixteen_later = toks
        .get(mid_token + 16)
        .and_then(|t| t["start"].as_u64())
        .context("a token 16 after the middle")? as usize;
    for i in 0..edits {
        let c = typed(i);
        text.insert(mid + i, c);
        lsp.edit(mid + i, mid + i, &c.to_string())?;
        if i % 2 == 0 {
            times.push(lsp.hover(mid + i)?);
        } else {
            later.push(lsp.hover(sixteen_later + i + 1)?);
        }
    }
    line(&mut out, "middle edit + hover at the edit", &mut times)?;
    line(&mut out, "middle edit + hover 16 tokens later", &mut later)?;

    let mut times = Vec::new();
    for _ in 0..edits {
        times.push(lsp.hover(text.len() - 1)?);
    }
    line(&mut out, "warm hover (no edit)", &mut times)?;

    // The one-position lens on its own: every layer at the document's last position, whose
    // states the daemon has cached (readout, reductions and the answer; no forward pass).
    let info = lsp.call("lens/modelInfo", json!({}))?;
    let mut times = Vec::new();
    for _ in 0..edits {
        let t = Instant::now();
        lsp.call(
            "lens/position",
            json!({ "text": text, "position": -1, "topK": 5 }),
        )?;
        times.push(t.elapsed());
    }
    line(&mut out, "one-position lens, every layer", &mut times)?;

    let mut times = Vec::new();
    for i in 0..edits.min(5) {
        let fresh = format!("Document {i}. {doc}");
        let t = Instant::now();
        lsp.call(
            "lens/analyze",
            // Every 15th layer and the last (0, 15, 30 on SmolLM2; 0, 15, 18 on Gemma 3 270M).
            json!({ "text": fresh, "layers": ":15", "topK": 1 }),
        )?;
        times.push(t.elapsed());
    }
    line(&mut out, "cold analyze (a new document)", &mut times)?;
    floor(&info, &mut out)?;
    let id = lsp.next_id;
    lsp.next_id += 1;
    lsp.send(&json!({ "jsonrpc": "2.0", "id": id, "method": "shutdown" }))?;
    lsp.response(id)?;
    lsp.send(&json!({ "jsonrpc": "2.0", "method": "exit" }))?;
    out.flush()?;
    Ok(())
}
