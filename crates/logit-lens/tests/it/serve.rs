//! `logit-lens serve`: the real binary as a TCP JSON-RPC server and as a stdio LSP server.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::{ensure_model, logit_lens};

/// A `logit-lens serve` process, killed on drop.
pub struct Server {
    child: Child,
    pub addr: String,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let log = self.stderr.lock().map(|s| s.clone()).unwrap_or_default();
        assert!(!log.contains("panicked"), "the server panicked:\n{log}");
    }
}

impl Server {
    pub fn tcp(extra: &[&str]) -> Server {
        Server::tcp_with_env(extra, &[])
    }

    /// [`Server::tcp`] with extra environment variables.
    pub fn tcp_with_env(extra: &[&str], env: &[(&str, &str)]) -> Server {
        ensure_model();
        let mut child = Command::new(env!("CARGO_BIN_EXE_logit-lens"))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(extra)
            .env_remove("LOGIT_LENS_MODEL")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn logit-lens serve");
        let stderr = child.stderr.take().expect("stderr");
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("listening on ") {
                    let _ = tx.send(addr.to_string());
                }
                if let Ok(mut l) = log2.lock() {
                    l.push_str(&line);
                    l.push('\n');
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("the server announces its address");
        Server {
            child,
            addr,
            stderr: log,
        }
    }

    pub fn connect(&self) -> Conn {
        let s = TcpStream::connect(&self.addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(300)))
            .expect("timeout");
        Conn {
            reader: BufReader::new(s.try_clone().expect("clone")),
            stream: s,
            next_id: 1,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the server process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn port(&self) -> &str {
        self.addr.rsplit(':').next().expect("port")
    }
}

pub fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = format!("Content-Length: {}\r\n\r\n", body.len()).into_bytes();
    out.extend_from_slice(body);
    out
}

/// Read one framed message; `None` at end of stream.
pub fn read_frame(r: &mut impl BufRead) -> Option<String> {
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
    Some(String::from_utf8(body).expect("the server writes UTF-8"))
}

pub struct Conn {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    next_id: i64,
}

impl Conn {
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }

    pub fn read(&mut self) -> Option<String> {
        read_frame(&mut self.reader)
    }

    /// Send a request and return the raw response body.
    pub fn request_raw(&mut self, method: &str, params: Value) -> String {
        let id = self.next_id;
        self.next_id += 1;
        let msg = json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params });
        self.send_raw(&frame(msg.to_string().as_bytes()));
        loop {
            let body = self.read().expect("a response");
            let v: Value = serde_json::from_str(&body).expect("JSON");
            if v["id"] == json!(id) {
                return body;
            }
        }
    }

    pub fn request(&mut self, method: &str, params: Value) -> Value {
        serde_json::from_str(&self.request_raw(method, params)).expect("JSON")
    }

    pub fn ok(&mut self, method: &str, params: Value) -> Value {
        let r = self.request(method, params.clone());
        assert!(r.get("error").is_none(), "{method} {params} failed: {r}");
        r["result"].clone()
    }
}

#[track_caller]
pub fn assert_error(resp: &Value, code: i64, kind: Option<&str>) {
    assert_eq!(resp["error"]["code"], json!(code), "{resp}");
    if let Some(kind) = kind {
        assert_eq!(resp["error"]["data"]["kind"], json!(kind), "{resp}");
    }
}

const TEXT: &str = "The capital of France is Paris, and the capital of Germany is";

#[test]
fn analyze_over_tcp_equals_the_cli_json_byte_for_byte() {
    let server = Server::tcp(&[]);
    let mut c = server.connect();
    let cases: [(Value, &[&str]); 3] = [
        (
            json!({ "text": TEXT, "layers": "0..30:10", "topK": 3 }),
            &["--layers", "0..30:10", "-k", "3"],
        ),
        (
            json!({ "text": TEXT, "positions": [-1], "lens": "raw", "layers": [0, 15, 30] }),
            &["--position", "-1", "--lens", "raw", "--layers", "0,15,30"],
        ),
        (
            json!({ "text": "Zażółć gęślą jaźń 🦀 日本", "topK": 2, "layers": ":15" }),
            &["-k", "2", "--layers", ":15"],
        ),
    ];
    for (params, args) in cases {
        let text = params["text"].as_str().expect("text").to_string();
        let mut argv = vec!["run", text.as_str(), "--format", "json"];
        argv.extend_from_slice(args);
        let cli = logit_lens(&argv);
        assert_eq!(cli.code, 0, "{}", cli.stderr);
        let body = c.request_raw("lens/analyze", params.clone());
        let prefix = format!(r#"{{"jsonrpc":"2.0","id":{},"result":"#, c.next_id - 1);
        let result = body
            .strip_prefix(&prefix)
            .and_then(|b| b.strip_suffix('}'))
            .unwrap_or_else(|| panic!("unexpected response {body}"));
        assert_eq!(
            result,
            cli.stdout.trim_end(),
            "lens/analyze {params} differs from logit-lens {args:?}"
        );
    }
    // lens/position is the same report with one position.
    let pos = c.ok(
        "lens/position",
        json!({ "text": TEXT, "position": -2, "topK": 3 }),
    );
    let cli = logit_lens(&[
        "run",
        TEXT,
        "--format",
        "json",
        "--position",
        "-2",
        "-k",
        "3",
    ]);
    assert_eq!(
        pos,
        serde_json::from_str::<Value>(&cli.stdout).expect("json")
    );
}

#[test]
fn tcp_methods_cache_and_prefix_reuse() {
    let server = Server::tcp(&["--cache-mb", "256"]);
    let mut c = server.connect();
    let info = c.ok("lens/modelInfo", json!({}));
    assert_eq!(info["n_layers"], 30);
    assert_eq!(info["vocab_size"], 49152);
    let text = "Zażółć gęślą jaźń 🦀 日本";
    let toks = c.ok("lens/tokenize", json!({ "text": text }));
    let toks = toks["tokens"].as_array().expect("tokens");
    // Byte offsets cover the text in order and cut it at character boundaries.
    assert_eq!(toks.first().map(|t| t["start"].clone()), Some(json!(0)));
    assert_eq!(
        toks.last().map(|t| t["end"].clone()),
        Some(json!(text.len()))
    );
    for t in toks {
        let (s, e) = (
            t["start"].as_u64().expect("s") as usize,
            t["end"].as_u64().expect("e") as usize,
        );
        assert!(
            text.is_char_boundary(s) && text.is_char_boundary(e) && s < e,
            "{t}"
        );
    }
    let s0 = c.ok("lens/cacheStats", json!({}));
    assert_eq!(s0["budgetBytes"], json!(256u64 << 20));
    assert_eq!(s0["entries"], 0);

    // A prompt, the same again (a hit), then an append (prefix reuse).
    let base = "In the beginning was the word, and the word was";
    let a = c.ok("lens/analyze", json!({ "text": base, "layers": [30] }));
    c.ok("lens/analyze", json!({ "text": base, "layers": [30] }));
    let s1 = c.ok("lens/cacheStats", json!({}));
    assert_eq!(s1["misses"], 1, "{s1}");
    assert_eq!(s1["hits"], 1, "{s1}");
    let n = a["tokens"].as_array().expect("tokens").len() as u64;
    assert_eq!(s1["tokensComputed"], json!(n));
    let appended = format!("{base} with God, and the word was God.");
    let b = c.ok(
        "lens/analyze",
        json!({ "text": appended, "layers": [0, 30], "topK": 3 }),
    );
    let s2 = c.ok("lens/cacheStats", json!({}));
    assert!(
        s2["tokensReused"].as_u64().expect("reused") >= n - 1,
        "{s2}"
    );
    assert_eq!(s2["entries"], 2, "{s2}");
    assert!(
        s2["bytes"].as_u64().expect("bytes") > 0
            && s2["bytes"].as_u64() <= s2["budgetBytes"].as_u64(),
        "{s2}"
    );
    // Reusing the prefix gives the numbers of a fresh forward pass (the CLI, another process).
    let cli = logit_lens(&[
        "run", &appended, "--format", "json", "--layers", "0,30", "-k", "3",
    ]);
    let fresh: Value = serde_json::from_str(&cli.stdout).expect("json");
    let (bp, fp) = (
        b["positions"].as_array().expect("p"),
        fresh["positions"].as_array().expect("p"),
    );
    assert_eq!(bp.len(), fp.len());
    for (x, y) in bp.iter().zip(fp) {
        for (cx, cy) in x["cells"]
            .as_array()
            .expect("c")
            .iter()
            .zip(y["cells"].as_array().expect("c"))
        {
            assert_eq!(
                cx["top"][0]["id"], cy["top"][0]["id"],
                "position {}",
                x["position"]
            );
            let (px, py) = (
                cx["top"][0]["prob"].as_f64().expect("p"),
                cy["top"][0]["prob"].as_f64().expect("p"),
            );
            assert!((px - py).abs() < 1e-3, "{px} vs {py}");
        }
    }
}

#[test]
fn concurrent_clients_share_the_cache() {
    let server = Server::tcp(&[]);
    let texts = [
        "One fish, two fish,",
        "Red fish, blue fish.",
        "The same prompt for two clients at once",
        "The same prompt for two clients at once",
    ];
    let before = server.connect().ok("lens/cacheStats", json!({}));
    let answers: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = texts
            .iter()
            .map(|t| {
                let server = &server;
                s.spawn(move || {
                    let mut c = server.connect();
                    c.ok("lens/analyze", json!({ "text": t, "layers": [15, 30] }))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect()
    });
    for (t, a) in texts.iter().zip(&answers) {
        let ids = a["tokens"].as_array().expect("tokens");
        let text: String = ids
            .iter()
            .map(|t| t["text"].as_str().expect("text"))
            .collect();
        assert_eq!(&text, t);
    }
    assert_eq!(answers[2], answers[3]);
    let after = server.connect().ok("lens/cacheStats", json!({}));
    let d = |k: &str| after[k].as_u64().expect("n") - before[k].as_u64().expect("n");
    // Three distinct prompts: three forward passes; the duplicate was served from the cache.
    // (Model work takes turns, so the duplicate finds the first one's result; the cache's
    // single flight, where a second request waits on the first one's computation, is tested
    // in lens-server's cache tests.)
    assert_eq!(d("misses"), 3, "{before} -> {after}");
    assert_eq!(d("hits"), 1, "{before} -> {after}");
}

#[test]
fn bad_input_gets_errors_and_the_server_keeps_serving() {
    let server = Server::tcp(&[]);
    let mut c = server.connect();
    let mut other = server.connect();
    let good = |c: &mut Conn| {
        let t = c.ok("lens/tokenize", json!({ "text": "still here" }));
        assert_eq!(t["tokens"].as_array().map(Vec::len), Some(2));
    };
    let raw_cases: [(&[u8], i64); 6] = [
        (b"{not json", -32700),
        (b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"lens/tokenize\",\"params\":{\"text\":\"\xff\xfe\"}}", -32700),
        (b"[1, 2]", -32600),
        (b"{\"jsonrpc\":\"1.0\",\"id\":7,\"method\":\"lens/modelInfo\",\"params\":{}}", -32600),
        (b"{\"jsonrpc\":\"2.0\",\"id\":8,\"method\":42}", -32600),
        (b"{\"jsonrpc\":\"2.0\",\"id\":9,\"method\":\"lens/modelInfo\",\"params\":[1]}", -32602),
    ];
    for (bytes, code) in raw_cases {
        c.send_raw(&frame(bytes));
        let r: Value = serde_json::from_str(&c.read().expect("an answer")).expect("json");
        assert_error(&r, code, None);
        good(&mut c);
    }
    let long = "word ".repeat(9000);
    let cases: Vec<(&str, Value, i64, Option<&str>)> = vec![
        ("lens/nothing", json!({}), -32601, None),
        ("textDocument/hover", json!({}), -32601, None),
        ("lens/analyze", json!({ "text": 5 }), -32602, None),
        ("lens/analyze", json!({}), -32602, None),
        (
            "lens/analyze",
            json!({ "text": "a", "topK": 0 }),
            -32602,
            None,
        ),
        (
            "lens/analyze",
            json!({ "text": "a", "topK": 101 }),
            -32602,
            None,
        ),
        (
            "lens/analyze",
            json!({ "text": "a", "layers": "0..99" }),
            -32602,
            None,
        ),
        (
            "lens/analyze",
            json!({ "text": "a", "layers": "x..y" }),
            -32602,
            None,
        ),
        (
            "lens/analyze",
            json!({ "text": "a", "lens": "tuned" }),
            -32602,
            None,
        ),
        (
            "lens/analyze",
            json!({ "text": "" }),
            -32010,
            Some("empty_text"),
        ),
        (
            "lens/analyze",
            json!({ "text": long }),
            -32011,
            Some("prompt_too_long"),
        ),
        (
            "lens/analyze",
            json!({ "text": "a b c", "positions": [3] }),
            -32013,
            Some("out_of_range"),
        ),
        (
            "lens/position",
            json!({ "text": "a b c", "position": -4 }),
            -32013,
            Some("out_of_range"),
        ),
        (
            "lens/position",
            json!({ "text": "a b c", "position": 1.5 }),
            -32602,
            None,
        ),
        (
            "lens/tokenize",
            json!({ "path": "/etc/passwd" }),
            -32602,
            None,
        ),
    ];
    for (method, params, code, kind) in cases {
        let r = c.request(method, params);
        assert_error(&r, code, kind);
        good(&mut c);
        good(&mut other);
    }
    // Broken framing closes that connection only.
    c.send_raw(b"Content-Type: nothing\r\n\r\n{}");
    let r: Value =
        serde_json::from_str(&c.read().expect("an answer before closing")).expect("json");
    assert_error(&r, -32700, None);
    assert!(c.read().is_none(), "the broken connection is closed");
    good(&mut other);
    good(&mut server.connect());
}

#[test]
fn tokens_and_remote_addresses() {
    let refused = logit_lens(&["serve", "--listen", "0.0.0.0:0"]);
    assert_ne!(refused.code, 0);
    assert!(
        refused
            .stderr
            .contains("refusing to listen on the non-loopback address"),
        "{}",
        refused.stderr
    );
    let no_token = logit_lens(&["serve", "--listen", "0.0.0.0:0", "--allow-remote"]);
    assert_ne!(no_token.code, 0);
    assert!(no_token.stderr.contains("--token"), "{}", no_token.stderr);

    let server = Server::tcp(&["--token", "s3cret"]);
    let mut c = server.connect();
    assert_error(
        &c.request("lens/modelInfo", json!({})),
        -32015,
        Some("unauthorized"),
    );
    assert_error(
        &c.request("lens/modelInfo", json!({ "token": "wrong" })),
        -32015,
        Some("unauthorized"),
    );
    let ok = c.ok(
        "lens/tokenize",
        json!({ "text": "hello", "token": "s3cret" }),
    );
    assert_eq!(ok["tokens"][0]["text"], "hello");
}

#[test]
fn the_python_client_talks_to_the_server() {
    let server = Server::tcp(&[]);
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../editors/python/lens_client.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(format!("127.0.0.1:{}", server.port()))
        .args(["position", TEXT, "-1"])
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_slice(&out.stdout).expect("json");
    let cli = logit_lens(&["run", TEXT, "--format", "json", "--position", "-1"]);
    assert_eq!(
        got,
        serde_json::from_str::<Value>(&cli.stdout).expect("json")
    );
    let out = Command::new("python3")
        .arg(&script)
        .arg(format!("127.0.0.1:{}", server.port()))
        .args(["cacheStats"])
        .output()
        .expect("run python3");
    let stats: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(stats["misses"], 1, "{stats}");
}

/// An LSP client on the server's stdio.
pub struct Lsp {
    child: Child,
    stdin: ChildStdin,
    rx: mpsc::Receiver<Value>,
    next_id: i64,
    raw: mpsc::Receiver<String>,
}

impl Drop for Lsp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Lsp {
    pub fn start() -> Lsp {
        Lsp::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Lsp {
        ensure_model();
        let mut child = Command::new(env!("CARGO_BIN_EXE_logit-lens"))
            .args(["serve", "--stdio"])
            .args(extra)
            .env_remove("LOGIT_LENS_MODEL")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn logit-lens serve --stdio");
        let stdin = child.stdin.take().expect("stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let (tx, rx) = mpsc::channel();
        let (rtx, raw) = mpsc::channel();
        std::thread::spawn(move || {
            while let Some(body) = read_frame(&mut stdout) {
                let _ = rtx.send(body.clone());
                match serde_json::from_str::<Value>(&body) {
                    Ok(v) => {
                        let _ = tx.send(v);
                    }
                    Err(e) => {
                        panic!("the server wrote something that is not JSON on stdout: {e}: {body}")
                    }
                }
            }
        });
        Lsp {
            child,
            stdin,
            rx,
            next_id: 1,
            raw,
        }
    }

    pub fn send(&mut self, v: &Value) {
        self.send_raw(&frame(v.to_string().as_bytes()));
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the server process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The next message the server writes, whatever it is.
    pub fn next(&mut self) -> Value {
        self.rx
            .recv_timeout(Duration::from_secs(300))
            .expect("a message from the server")
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stdin.write_all(bytes).expect("write");
        self.stdin.flush().expect("flush");
    }

    pub fn notify(&mut self, method: &str, params: Value) {
        let mut msg = json!({ "jsonrpc": "2.0", "method": method });
        if !params.is_null() {
            msg["params"] = params;
        }
        self.send(&msg);
    }

    pub fn send_request(&mut self, method: &str, params: Value) -> i64 {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "jsonrpc": "2.0", "id": id, "method": method });
        if !params.is_null() {
            msg["params"] = params;
        }
        self.send(&msg);
        id
    }

    /// The response with `id` (server notifications and requests are skipped).
    pub fn response(&mut self, id: &Value) -> Value {
        loop {
            let v = self
                .rx
                .recv_timeout(Duration::from_secs(300))
                .expect("a response");
            if &v["id"] == id && v.get("method").is_none() {
                return v;
            }
        }
    }

    pub fn request(&mut self, method: &str, params: Value) -> Value {
        let id = self.send_request(method, params);
        self.response(&json!(id))
    }

    pub fn ok(&mut self, method: &str, params: Value) -> Value {
        let r = self.request(method, params.clone());
        assert!(r.get("error").is_none(), "{method} {params} failed: {r}");
        r["result"].clone()
    }
}

fn utf16_col(line: &str, byte: usize) -> u32 {
    line[..byte].encode_utf16().count() as u32
}

pub fn hover(lsp: &mut Lsp, uri: &str, line: u32, character: u32) -> Value {
    lsp.request(
        "textDocument/hover",
        json!({ "textDocument": { "uri": uri }, "position": { "line": line, "character": character } }),
    )
}

/// The table rows of a hover: (layer cell, top cell, p(written), rank(written)).
pub fn rows(md: &str) -> Vec<Vec<String>> {
    md.lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| layer"))
        .map(|l| {
            l.trim_matches('|')
                .split(" | ")
                .map(|c| c.trim().to_string())
                .collect()
        })
        .collect()
}

#[test]
fn lsp_session_over_stdio() {
    let mut lsp = Lsp::start();
    let init = lsp.ok(
        "initialize",
        json!({
            "processId": null, "rootUri": null,
            "capabilities": { "general": { "positionEncodings": ["utf-16"] } },
            "initializationOptions": { "topK": 3, "layerStride": 5 }
        }),
    );
    let caps = &init["capabilities"];
    assert_eq!(caps["positionEncoding"], "utf-16");
    assert_eq!(caps["textDocumentSync"], 2);
    assert_eq!(caps["hoverProvider"], true);
    assert!(
        caps.get("inlayHintProvider").is_none_or(Value::is_null),
        "inlay hints are opt-in: {caps}"
    );
    lsp.notify("initialized", json!({}));

    let uri = "file:///tmp/lens-test.txt";
    let line0 = "Zażółć gęślą jaźń 🦀 日本";
    let line1 = "The capital of France is Paris";
    let text = format!("{line0}\n{line1}");
    lsp.notify(
        "textDocument/didOpen",
        json!({ "textDocument": { "uri": uri, "languageId": "plaintext", "version": 1, "text": text } }),
    );
    let tokens = lsp.ok("lens/tokenize", json!({ "text": text }));
    let tokens = tokens["tokens"].as_array().expect("tokens").clone();
    let token_at = |byte: usize| -> usize {
        tokens
            .iter()
            .rposition(|t| t["start"].as_u64().expect("s") as usize <= byte)
            .expect("a token")
    };

    // Hover on the `ę` of `gęślą`, on the crab, on `本`: the token under the cursor.
    for needle in ["ęśl", "🦀", "本"] {
        let byte = line0.find(needle).expect("needle");
        let col = utf16_col(line0, byte);
        let r = hover(&mut lsp, uri, 0, col);
        let h = &r["result"];
        assert!(r.get("error").is_none(), "{r}");
        let md = h["contents"]["value"].as_str().expect("markdown");
        assert_eq!(h["contents"]["kind"], "markdown");
        let t = token_at(byte);
        let want = lens_server::hover::escape(tokens[t]["text"].as_str().expect("text"));
        assert!(
            md.starts_with(&format!("**{want}** · token {t} ·")),
            "hover on {needle}: {md}"
        );
        let range = &h["range"];
        assert_eq!(range["start"]["line"], 0);
        let (s, e) = (
            range["start"]["character"].as_u64().expect("s"),
            range["end"]["character"].as_u64().expect("e"),
        );
        assert!(
            s <= u64::from(col) && u64::from(col) < e,
            "range {range} covers column {col} ({needle})"
        );
        let rows = rows(md);
        // Layers 30, 25, ..., 0 with stride 5, the last layer first.
        let layers: Vec<String> = rows
            .iter()
            .map(|r| r[0].split(' ').next().unwrap_or("").to_string())
            .collect();
        assert_eq!(layers, ["30", "25", "20", "15", "10", "5", "0"]);
        assert_eq!(
            rows.iter().filter(|r| r[0].contains("◀ decided")).count(),
            1,
            "{md}"
        );
        assert!(rows.iter().all(|r| r[1].split(" · ").count() == 3), "{md}");
    }

    // ` Paris`: the written token's probability and rank match lens/position at the position before it.
    let byte = text.find(" Paris").expect("Paris") + 1;
    let r = hover(
        &mut lsp,
        uri,
        1,
        utf16_col(line1, line1.find(" Paris").expect("P") + 1),
    );
    let md = r["result"]["contents"]["value"]
        .as_str()
        .expect("markdown")
        .to_string();
    assert!(md.starts_with("**␣Paris**"), "{md}");
    let t = token_at(byte);
    let prefix_end = tokens[t]["end"].as_u64().expect("end") as usize;
    let report = lsp.ok(
        "lens/position",
        json!({ "text": &text[..prefix_end], "position": -2, "layers": ":5", "topK": 3 }),
    );
    let cells = report["positions"][0]["cells"].as_array().expect("cells");
    let rows_paris = rows(&md);
    for (row, cell) in rows_paris.iter().zip(cells.iter().rev()) {
        assert_eq!(
            row[0].split(' ').next(),
            Some(cell["layer"].to_string().as_str())
        );
        assert_eq!(
            row[3],
            (cell["next"]["rank"].as_u64().expect("rank") + 1).to_string(),
            "{md}"
        );
        let p = cell["next"]["prob"].as_f64().expect("prob");
        let shown: f64 = row[2].parse().expect("a number");
        assert!(
            (shown - p).abs() <= 0.005 + p * 0.5,
            "p(written) {shown} vs {p}\n{md}"
        );
    }
    // The first token has no previous position.
    let first = hover(&mut lsp, uri, 0, 0);
    assert!(
        rows(first["result"]["contents"]["value"].as_str().expect("md"))
            .iter()
            .all(|r| r[2] == "—")
    );

    // Incremental edit: append " and Berlin" to line 1, then hover on "Berlin".
    lsp.notify(
        "textDocument/didChange",
        json!({
            "textDocument": { "uri": uri, "version": 2 },
            "contentChanges": [{ "range": { "start": { "line": 1, "character": 30 }, "end": { "line": 1, "character": 30 } }, "text": " and Berlin" }]
        }),
    );
    let r = hover(&mut lsp, uri, 1, 36);
    let md = r["result"]["contents"]["value"].as_str().expect("markdown");
    assert!(md.starts_with("**␣Berlin**"), "{md}");
    // An edit inside line 0, after the emoji (UTF-16 columns): replace 日本 by 東京.
    let col = utf16_col(line0, line0.find("日本").expect("jp"));
    lsp.notify(
        "textDocument/didChange",
        json!({
            "textDocument": { "uri": uri, "version": 3 },
            "contentChanges": [{ "range": { "start": { "line": 0, "character": col }, "end": { "line": 0, "character": col + 2 } }, "text": "東京" }]
        }),
    );
    let r = hover(&mut lsp, uri, 1, 0);
    assert!(
        r["result"]["contents"]["value"]
            .as_str()
            .expect("md")
            .contains("| 30"),
        "{r}"
    );
    let stats = lsp.ok("lens/cacheStats", json!({}));
    assert!(
        stats["tokensReused"].as_u64().expect("reused") > 0,
        "{stats}"
    );

    // Bad input over LSP: each followed by a good request.
    assert_error(&hover(&mut lsp, uri, 7, 0), -32013, Some("out_of_range"));
    assert_error(&hover(&mut lsp, uri, 0, 400), -32013, Some("out_of_range"));
    assert_error(
        &hover(&mut lsp, "file:///never-opened.txt", 0, 0),
        -32012,
        Some("document_not_open"),
    );
    lsp.send_raw(&frame(b"{oops"));
    assert_error(
        &lsp.request("lens/analyze", json!({ "text": "" })),
        -32010,
        Some("empty_text"),
    );
    assert_error(&lsp.request("lens/unknown", json!({})), -32601, None);
    assert!(hover(&mut lsp, uri, 1, 2)["result"]["contents"]["value"]
        .as_str()
        .is_some());

    // Nothing but protocol messages on stdout; then a clean exit.
    lsp.ok("shutdown", json!(null));
    lsp.notify("exit", json!(null));
    let status = lsp.child.wait().expect("wait");
    assert!(status.success(), "{status}");
    while let Ok(body) = lsp.raw.try_recv() {
        assert!(body.starts_with('{'), "{body}");
    }
}

#[test]
fn a_newer_edit_supersedes_a_hover() {
    let mut lsp = Lsp::start();
    lsp.ok(
        "initialize",
        json!({ "processId": null, "rootUri": null, "capabilities": {} }),
    );
    lsp.notify("initialized", json!({}));
    let uri = "file:///tmp/edits.txt";
    lsp.notify("textDocument/didOpen", json!({ "textDocument": { "uri": uri, "languageId": "plaintext", "version": 1, "text": "Hello world" } }));
    // A hover, immediately followed by an edit: the hover waits for the document to settle and
    // is answered ContentModified.
    let id = lsp.send_request(
        "textDocument/hover",
        json!({ "textDocument": { "uri": uri }, "position": { "line": 0, "character": 2 } }),
    );
    lsp.notify(
        "textDocument/didChange",
        json!({ "textDocument": { "uri": uri, "version": 2 }, "contentChanges": [{ "text": "Hello there world" }] }),
    );
    assert_error(&lsp.response(&json!(id)), -32801, None);
    // A cancelled request is answered -32800.
    let id = lsp.send_request(
        "lens/analyze",
        json!({ "text": "A long enough text to take a moment. ".repeat(40) }),
    );
    lsp.notify("$/cancelRequest", json!({ "id": id }));
    assert_error(&lsp.response(&json!(id)), -32800, None);
    let r = hover(&mut lsp, uri, 0, 7);
    assert!(
        r["result"]["contents"]["value"]
            .as_str()
            .expect("md")
            .starts_with("**␣there**"),
        "{r}"
    );
}

#[test]
fn heatmap_over_tcp_equals_the_plot_command() {
    let server = Server::tcp(&[]);
    let mut c = server.connect();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("map.svg");
    let plot = logit_lens(&[
        "plot",
        TEXT,
        "--layers",
        ":10",
        "--metric",
        "entropy",
        "--out",
        out.to_str().expect("utf8"),
    ]);
    assert_eq!(plot.code, 0, "{}", plot.stderr);
    let want = std::fs::read_to_string(&out).expect("svg");
    let got = c.ok(
        "lens/heatmap",
        json!({ "text": TEXT, "format": "svg", "layers": ":10", "metric": "entropy" }),
    );
    assert_eq!(got["format"], "svg");
    assert_eq!(
        got["content"].as_str(),
        Some(want.as_str()),
        "lens/heatmap differs from logit-lens plot"
    );

    let page = c.ok(
        "lens/heatmap",
        json!({ "text": TEXT, "format": "html", "layers": [0, 30] }),
    );
    let html = page["content"].as_str().expect("html");
    assert!(
        html.starts_with("<!DOCTYPE html>") || html.starts_with("<!doctype html>"),
        "{}",
        &html[..80.min(html.len())]
    );
    assert!(
        !html.contains("<script src") && !html.contains("<link"),
        "the page must be self-contained"
    );
    assert!(html.contains("Paris"), "the page carries the tokens");

    assert_error(
        &c.request("lens/heatmap", json!({ "text": TEXT, "format": "gif" })),
        -32602,
        None,
    );
    assert_error(
        &c.request(
            "lens/heatmap",
            json!({ "text": TEXT, "format": "svg", "metric": "colour" }),
        ),
        -32602,
        None,
    );
    assert_error(
        &c.request("lens/heatmap", json!({ "text": "", "format": "svg" })),
        -32010,
        Some("empty_text"),
    );
    // Still serving.
    assert_eq!(c.ok("lens/modelInfo", json!({}))["n_layers"], 30);
}

#[test]
fn an_edit_before_a_hovered_word_prepares_its_hover() {
    let start = |lsp: &mut Lsp, text: &str| {
        lsp.ok(
            "initialize",
            json!({ "processId": null, "rootUri": null, "capabilities": {} }),
        );
        lsp.notify("initialized", json!({}));
        lsp.notify("textDocument/didOpen", json!({ "textDocument": { "uri": "file:///tmp/facts.txt", "languageId": "plaintext", "version": 1, "text": text } }));
    };
    let uri = "file:///tmp/facts.txt";
    let text = "The capital of France is Paris";
    let word = text.find("Paris").expect("Paris") as u32 + 2;
    let mut lsp = Lsp::start();
    start(&mut lsp, text);
    let before = hover(&mut lsp, uri, 0, word);
    assert!(
        before["result"]["contents"]["value"].is_string(),
        "{before}"
    );
    let computed = |lsp: &mut Lsp| lsp.ok("lens/cacheStats", json!({}))["tokensComputed"].clone();
    let c0 = computed(&mut lsp);

    // Typing before the word: the daemon computes the word's new hover on its own, before any
    // request for it.
    lsp.notify(
        "textDocument/didChange",
        json!({ "textDocument": { "uri": uri, "version": 2 },
                "contentChanges": [{ "range": { "start": { "line": 0, "character": 24 }, "end": { "line": 0, "character": 24 } }, "text": " still" }] }),
    );
    let until = std::time::Instant::now() + Duration::from_secs(60);
    while computed(&mut lsp) == c0 {
        // Each round trip of `lens/cacheStats` paces the poll; the deadline bounds it.
        assert!(std::time::Instant::now() < until, "no work after the edit");
    }
    let edited = "The capital of France is still Paris";
    let prepared = hover(&mut lsp, uri, 0, word + 6);

    // The same hover from a fresh daemon, with nothing prepared or reused.
    let mut fresh = Lsp::start();
    start(&mut fresh, edited);
    let want = hover(&mut fresh, uri, 0, word + 6);
    // The numbers of now are a fresh daemon's; beside them, what each layer said before the
    // edit, which is the hover taken before it.
    let md = |h: &Value| {
        h["result"]["contents"]["value"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let now =
        |md: &str| -> Vec<Vec<String>> { rows(md).into_iter().map(|r| r[..4].to_vec()).collect() };
    assert_eq!(prepared["result"]["range"], want["result"]["range"]);
    assert_eq!(now(&md(&prepared)), now(&md(&want)));
    assert_ne!(now(&md(&prepared)), now(&md(&before)));
    assert!(
        md(&prepared).contains("Before the last edit (the text before it changed; it was token 5)"),
        "{}",
        md(&prepared)
    );
    assert!(!md(&want).contains("Before the last edit"));
    for (r, b) in rows(&md(&prepared)).iter().zip(rows(&md(&before))) {
        let top1_before = b[1].split(" · ").next().unwrap_or_default();
        assert_eq!(
            r[4].trim_end_matches(" ✱"),
            top1_before,
            "{}",
            md(&prepared)
        );
        let kl: f64 = r[5].parse().expect("a KL");
        assert!(kl >= 0.0);
    }
    assert!(
        rows(
            want["result"]["contents"]["value"]
                .as_str()
                .unwrap_or_default()
        )
        .len()
            == 31,
        "{want}"
    );
}

/// One query path: the CLI's JSON, the daemon's `lens/analyze` and the plot's page data show
/// the same numbers for the same cell, written the same way (probabilities as the shortest
/// decimal of their `f32`, entropy and KL as their `f64`).
#[test]
fn the_same_cell_is_the_same_bytes_in_the_cli_the_daemon_and_the_plot() {
    let server = Server::tcp(&[]);
    let mut c = server.connect();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("map.html");
    let args = ["--layers", "0..30:10", "-k", "3"];
    let cli = logit_lens(&[&["run", TEXT, "--format", "json"][..], &args[..]].concat());
    assert_eq!(cli.code, 0, "{}", cli.stderr);
    let report: Value = serde_json::from_str(&cli.stdout).expect("json");
    let daemon = c.ok(
        "lens/analyze",
        json!({ "text": TEXT, "layers": "0..30:10", "topK": 3 }),
    );
    assert_eq!(
        daemon, report,
        "lens/analyze differs from run --format json"
    );
    let plot = logit_lens(
        &[
            &["plot", TEXT, "--out", out.to_str().expect("utf8")][..],
            &args[..],
        ]
        .concat(),
    );
    assert_eq!(plot.code, 0, "{}", plot.stderr);
    let html = std::fs::read_to_string(&out).expect("html");
    let open = r#"<script type="application/json" id="lens-data">"#;
    let start = html.find(open).expect("data element") + open.len();
    let end = start + html[start..].find("</script>").expect("end of data");
    let page: Value = serde_json::from_str(&html[start..end]).expect("page data");

    let layers = report["layers"].as_array().expect("layers");
    assert_eq!(&page["layers"], &report["layers"]);
    let positions = report["positions"].as_array().expect("positions");
    let columns = page["columns"].as_array().expect("columns");
    assert_eq!(columns.len(), positions.len());
    assert!(positions.len() > 5 && layers.len() == 4);
    let visible = lens_plot::visible;
    let mut cells = 0;
    for (pos, col) in positions.iter().zip(columns) {
        for (li, cell) in pos["cells"].as_array().expect("cells").iter().enumerate() {
            let shown = &col["cells"][li];
            let top = cell["top"].as_array().expect("top");
            let shown_top = shown["top"].as_array().expect("page top");
            assert_eq!(top.len(), 3);
            assert_eq!(shown_top.len(), 3);
            for (t, s) in top.iter().zip(shown_top) {
                assert_eq!(s[0], json!(visible(t["text"].as_str().expect("text"))));
                // The same f64, hence the same bytes when printed.
                assert_eq!(s[1], t["prob"], "position {} layer {}", pos["position"], li);
            }
            assert_eq!(shown["entropy"], cell["entropy"]);
            assert_eq!(shown["kl"], cell["kl_to_final"]);
            assert_eq!(shown["next_prob"], cell["next"]["prob"]);
            cells += 1;
        }
    }
    assert_eq!(cells, positions.len() * layers.len());
}

/// After an edit in the middle, the hover at the edit is answered from the tokens up to it;
/// then the daemon finishes the rest of the document in the background, so that a hover at
/// the end computes nothing, and its numbers are a fresh daemon's.
#[test]
fn after_a_middle_edit_the_rest_of_the_document_is_finished_in_the_background() {
    let uri = "file:///tmp/middle.txt";
    let lines: Vec<String> = (0..8)
        .map(|i| format!("Fact {i}: the capital of France is Paris, not Rome."))
        .collect();
    let text = lines.join("\n");
    let start = |lsp: &mut Lsp, text: &str| {
        // Without the "before the edit" columns, which read the previous version's states:
        // the counts below are the edited document's alone.
        lsp.ok(
            "initialize",
            json!({ "processId": null, "rootUri": null, "capabilities": {},
                    "initializationOptions": { "compare": false } }),
        );
        lsp.notify("initialized", json!({}));
        lsp.notify("textDocument/didOpen", json!({ "textDocument": { "uri": uri, "languageId": "plaintext", "version": 1, "text": text } }));
    };
    let computed = |lsp: &mut Lsp| {
        lsp.ok("lens/cacheStats", json!({}))["tokensComputed"]
            .as_u64()
            .expect("tokensComputed")
    };
    let mut lsp = Lsp::start();
    start(&mut lsp, &text);
    // A hover on the first line: the daemon computes the tokens up to it, no more.
    let first = hover(&mut lsp, uri, 0, 7);
    assert!(first["result"]["contents"]["value"].is_string(), "{first}");
    let k = computed(&mut lsp);

    // An edit in the middle (line 4), and the hover the editor asks for at once: at the edit.
    lsp.notify(
        "textDocument/didChange",
        json!({ "textDocument": { "uri": uri, "version": 2 },
                "contentChanges": [{ "range": { "start": { "line": 4, "character": 35 }, "end": { "line": 4, "character": 35 } }, "text": " still" }] }),
    );
    let mut edited_lines = lines.clone();
    edited_lines[4].insert_str(35, " still");
    let edited = edited_lines.join("\n");
    let at_edit = hover(&mut lsp, uri, 4, 38);
    assert!(
        at_edit["result"]["contents"]["value"].is_string(),
        "{at_edit}"
    );
    // The whole edited document is computed once in all: the tokens after the first hover's.
    let n = lsp.ok("lens/tokenize", json!({ "text": edited }))["tokens"]
        .as_array()
        .expect("tokens")
        .len() as u64;
    let until = std::time::Instant::now() + Duration::from_secs(120);
    while computed(&mut lsp) < n {
        // Each round trip of `lens/cacheStats` paces the poll; the deadline bounds it.
        assert!(
            std::time::Instant::now() < until,
            "the rest of the document was not finished: {} of {n} tokens (first hover {k})",
            computed(&mut lsp)
        );
    }
    assert_eq!(computed(&mut lsp), n, "no token computed twice");

    // A hover at the end reads the finished states: nothing more is computed.
    let last = edited_lines[7].find("Rome").expect("Rome") as u32 + 1;
    let at_end = hover(&mut lsp, uri, 7, last);
    assert_eq!(
        computed(&mut lsp),
        n,
        "the hover at the end computed tokens"
    );
    let mut fresh = Lsp::start();
    start(&mut fresh, &edited);
    let want = hover(&mut fresh, uri, 7, last);
    let now = |h: &Value| -> Vec<Vec<String>> {
        rows(
            h["result"]["contents"]["value"]
                .as_str()
                .unwrap_or_default(),
        )
        .into_iter()
        .map(|r| r[..4].to_vec())
        .collect()
    };
    assert_eq!(now(&at_end).len(), 31, "{at_end}");
    assert_eq!(now(&at_end), now(&want));
}
