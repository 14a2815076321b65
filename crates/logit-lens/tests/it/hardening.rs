//! A daemon that is safe to leave running: bounded memory per client, limits on connections
//! and idle time, duplicate ids, LSP framing recovery, a fuzz of malformed messages over TCP
//! and over LSP stdio, the token from a file, TLS, and the socket and log files.

// The figures measured (RSS, counts) are reported on stderr.
#![allow(clippy::print_stderr)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::ensure_model;
use crate::serve::{assert_error, frame, read_frame, Lsp, Server};

/// The resident memory of process `pid`, in MiB.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kb / 1024.0
}

fn raw(server: &Server) -> (TcpStream, BufReader<TcpStream>) {
    let s = TcpStream::connect(&server.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let r = BufReader::new(s.try_clone().expect("clone"));
    (s, r)
}

fn parse(body: &str) -> Value {
    serde_json::from_str(body).expect("the server writes JSON")
}

/// Send `bytes` on a fresh connection: the server answers once with `code` (id null) and
/// closes it. Writing may fail once the server has closed (it does not read what it refused).
#[track_caller]
fn refused_and_closed(server: &Server, bytes: &[u8], code: i64) {
    let (mut s, mut r) = raw(server);
    let _ = s.write_all(bytes);
    let reply = read_frame(&mut r).expect("an answer before closing");
    let v = parse(&reply);
    assert_error(&v, code, None);
    assert_eq!(v["id"], Value::Null, "{v}");
    assert!(read_frame(&mut r).is_none(), "the connection is closed");
}

#[test]
fn framing_limits_and_duplicate_ids_over_tcp() {
    let server = Server::tcp(&["--max-message-mb", "1", "--max-connections", "6"]);
    let before = rss_mib(server.pid());
    // Header bytes without a newline: cut off at the header-line limit while reading.
    refused_and_closed(&server, &vec![b'a'; 8 << 20], -32700);
    // A declared body over the limit: refused before it is read.
    refused_and_closed(&server, b"Content-Length: 1048577\r\n\r\n", -32600);
    refused_and_closed(
        &server,
        b"Content-Length: 18446744073709551615\r\n\r\n",
        -32600,
    );
    // Newline-delimited JSON with no header.
    refused_and_closed(
        &server,
        b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"lens/modelInfo\"}\n",
        -32700,
    );
    // Unfinished bodies hold what was sent, not what was declared.
    let stalled: Vec<TcpStream> = (0..4)
        .map(|_| {
            let (mut s, _) = raw(&server);
            s.write_all(b"Content-Length: 1000000\r\n\r\n{\"jsonrpc\"")
                .expect("write");
            s
        })
        .collect();
    let mut c = server.connect();
    c.ok("lens/modelInfo", json!({}));
    // A text longer than any prompt of the model's context is refused before tokenizing.
    let t = Instant::now();
    let huge = "word ".repeat(150_000);
    for method in ["lens/tokenize", "lens/analyze"] {
        let r = c.request(method, json!({ "text": huge }));
        assert_error(&r, -32011, Some("prompt_too_long"));
        assert!(
            r["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("bytes")),
            "{r}"
        );
    }
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let after = rss_mib(server.pid());
    eprintln!("server RSS {before:.0} MiB -> {after:.0} MiB after 8 MiB of header flood and 4 stalled bodies");
    assert!(after - before < 64.0, "{before} -> {after}");

    // Two in flight with the same id: both answered, the second refused.
    let text = "The capital of France is Paris, and the capital of Germany is".repeat(8);
    let req = |id: i64| {
        frame(
            json!({ "jsonrpc": "2.0", "id": id, "method": "lens/analyze",
                    "params": { "text": text, "layers": [30] } })
            .to_string()
            .as_bytes(),
        )
    };
    let (mut s, mut r) = raw(&server);
    s.write_all(&[req(5), req(5)].concat()).expect("write");
    let a = parse(&read_frame(&mut r).expect("first reply"));
    let b = parse(&read_frame(&mut r).expect("second reply"));
    assert_eq!((&a["id"], &b["id"]), (&json!(5), &json!(5)));
    assert_error(&a, -32600, None);
    assert!(b.get("result").is_some(), "{b}");

    // The connection cap: `stalled`, `c` and `s` hold 6 slots; one more is refused.
    refused_and_closed(&server, b"", -32016);
    drop(stalled);
    drop(s);
    // Slots free again once the server sees those connections close.
    let start = Instant::now();
    loop {
        let (mut s, mut r) = raw(&server);
        let _ = s.write_all(&frame(
            br#"{"jsonrpc":"2.0","id":1,"method":"lens/cacheStats"}"#,
        ));
        let v = parse(&read_frame(&mut r).expect("an answer"));
        if v.get("result").is_some() {
            break;
        }
        assert_error(&v, -32016, Some("busy"));
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "slots never freed"
        );
    }
}

#[test]
fn idle_connections_are_closed() {
    let server = Server::tcp(&["--idle-timeout", "1"]);
    let (_s, mut r) = raw(&server);
    let start = Instant::now();
    assert!(read_frame(&mut r).is_none(), "closed without an answer");
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(30),
        "{waited:?}"
    );
    // A connection with a request in flight is not idle.
    let mut c = server.connect();
    let long = "word ".repeat(2000);
    c.ok(
        "lens/analyze",
        json!({ "text": long, "layers": [30], "positions": [-1] }),
    );
}

/// Recovery on the LSP door: every kind of broken framing is answered, the session goes on.
#[test]
fn lsp_framing_recovers() {
    let mut lsp = Lsp::start_with(&["--max-message-mb", "1"]);
    lsp.ok("initialize", json!({ "capabilities": {} }));
    lsp.notify("initialized", json!({}));
    let still_here = |lsp: &mut Lsp| {
        let t = lsp.ok("lens/tokenize", json!({ "text": "still here" }));
        assert_eq!(t["tokens"].as_array().map(Vec::len), Some(2));
    };
    let broken: [(&[u8], i64); 7] = [
        (b"Content-Length: 9\r\n\r\n{not json", -32700),
        (b"Content-Length: x\r\n\r\n{}", -32700),
        (b"Content-Type: nothing\r\n\r\n{}", -32700),
        (b"garbage without a colon\r\n\r\n", -32700),
        (
            b"{\"jsonrpc\":\"2.0\",\"id\":99,\"method\":\"lens/modelInfo\"}\n",
            -32700,
        ),
        (&[b'z'; 5000], -32700),
        (b"Content-Length: 2000000\r\n\r\n", -32600),
    ];
    for (bytes, code) in broken {
        lsp.send_raw(bytes);
        if code == -32600 {
            // The refused body is skipped unread.
            lsp.send_raw(&vec![b' '; 2_000_000]);
        }
        let v = lsp.next();
        assert_error(&v, code, None);
        assert_eq!(v["id"], Value::Null, "{v}");
        still_here(&mut lsp);
    }
    // A duplicate id while the first is in flight.
    let text = "The capital of France is Paris, and the capital of Germany is".repeat(8);
    let msg = json!({ "jsonrpc": "2.0", "id": 500, "method": "lens/analyze",
                      "params": { "text": text, "layers": [30] } });
    lsp.send(&msg);
    lsp.send(&msg);
    let (a, b) = (lsp.next(), lsp.next());
    assert_eq!((&a["id"], &b["id"]), (&json!(500), &json!(500)));
    assert_error(&a, -32600, None);
    assert!(b.get("result").is_some(), "{b}");
    still_here(&mut lsp);
    assert!(lsp.is_running());
}

/// xorshift64*: reproducible fuzz without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
}

/// One malformed (or odd) message with `id`: its bytes, and the codes its one reply may
/// carry (`None`: no reply, a notification). Every code is one docs/protocol.md lists for it.
fn fuzz_message(rng: &mut Rng, id: i64) -> (Vec<u8>, Option<(Value, Vec<i64>)>) {
    let i = json!(id);
    let garbage: String = (0..rng.below(40))
        .map(|_| char::from(b' ' + rng.below(95) as u8))
        .collect();
    let texts = [
        "",
        "a",
        "The capital of France is",
        "Zażółć 🦀",
        "\u{0}\u{1}",
        "   ",
    ];
    let text = rng.pick(&texts).to_string();
    let params = [
        json!({ "text": text }),
        json!({ "text": 5 }),
        json!({}),
        json!({ "text": text, "topK": rng.pick(&[json!(0), json!(101), json!(-1), json!("x"), json!(1e300)]) }),
        json!({ "text": text, "layers": rng.pick(&[json!(""), json!(","), json!("x..y"), json!([999]), json!([]), json!(-99), json!("0..99")]) }),
        json!({ "text": text, "positions": rng.pick(&[json!([999]), json!(["a"]), json!([]), json!(-1)]) }),
        json!({ "text": text, "lens": rng.pick(&[json!("tuned"), json!(5), json!("")]) }),
        json!({ "text": text, "position": rng.pick(&[json!(1.5), json!(-99), json!(null), json!(1)]) }),
        json!({ "text": text, "format": rng.pick(&[json!("pdf"), json!(1)]) }),
        json!({ "path": "/etc/passwd" }),
        json!([1, 2]),
        json!(7),
    ];
    let methods = [
        "lens/analyze",
        "lens/position",
        "lens/tokenize",
        "lens/heatmap",
        "lens/modelInfo",
        "lens/cacheStats",
        "lens/nothing",
        "",
        "textDocument/definition",
    ];
    // Codes a request to a known method may get back, or a result (0).
    let lens_codes = vec![0, -32601, -32602, -32010, -32011, -32013];
    match rng.below(10) {
        0 => (garbage.into_bytes(), Some((Value::Null, vec![-32700, -32600]))),
        1 => (
            format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"lens/tokenize","params":{{"text":"#)
                .into_bytes()
                .into_iter()
                .chain(*b"\"\xff\xfe\xc3\x28\"}}")
                .collect(),
            Some((Value::Null, vec![-32700])),
        ),
        2 => (
            rng.pick(&[json!([1]), json!(3), json!("x"), json!(null), json!([])])
                .to_string()
                .into_bytes(),
            Some((Value::Null, vec![-32600])),
        ),
        3 => (
            json!({ "jsonrpc": rng.pick(&[json!("1.0"), json!(2), json!(null)]), "id": id, "method": "lens/modelInfo" })
                .to_string()
                .into_bytes(),
            Some((i, vec![-32600])),
        ),
        4 => (
            json!({ "jsonrpc": "2.0", "id": id, "method": rng.pick(&[json!(42), json!(null), json!(["x"])]) })
                .to_string()
                .into_bytes(),
            Some((i, vec![-32600])),
        ),
        5 => (
            json!({ "jsonrpc": "2.0", "id": rng.pick(&[json!(1.5), json!({}), json!([1])]), "method": "lens/modelInfo" })
                .to_string()
                .into_bytes(),
            Some((Value::Null, vec![-32600])),
        ),
        6 => (
            // A notification: never answered.
            json!({ "jsonrpc": "2.0", "method": rng.pick(&methods), "params": rng.pick(&params) })
                .to_string()
                .into_bytes(),
            None,
        ),
        _ => {
            let method = *rng.pick(&methods);
            let p = rng.pick(&params).clone();
            // Model work only on short texts (the fuzz is about the door, not the model).
            (
                json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": p })
                    .to_string()
                    .into_bytes(),
                Some((i, lens_codes)),
            )
        }
    }
}

/// Check a reply against what its message allows; `true` if it was an error.
#[track_caller]
fn check_reply(v: &Value, allowed: &[i64], sent: &[u8]) -> bool {
    let code = v["error"]["code"].as_i64().unwrap_or(0);
    assert!(
        allowed.contains(&code) && (code != 0 || v.get("result").is_some()),
        "reply {v} to {} (allowed {allowed:?})",
        String::from_utf8_lossy(sent)
    );
    code != 0
}

#[test]
fn fuzz_over_tcp_and_lsp_stdio() {
    let start = Instant::now();
    let mut rng = Rng(0x5851_f42d_4c95_7f2d);
    let server = Server::tcp(&[]);
    let before = rss_mib(server.pid());
    let mut c = server.connect();
    let (mut s, mut r) = raw(&server);
    let mut sent = 0;
    let mut errors = 0;
    for id in 1..=1600_i64 {
        let (bytes, expect) = fuzz_message(&mut rng, id);
        sent += 1;
        s.write_all(&frame(&bytes)).expect("write");
        let Some((want_id, allowed)) = expect else {
            continue;
        };
        let v = parse(&read_frame(&mut r).expect("no reply lost"));
        assert_eq!(
            v["id"],
            want_id,
            "reply {v} to {}",
            String::from_utf8_lossy(&bytes)
        );
        errors += usize::from(check_reply(&v, &allowed, &bytes));
    }
    // Broken framing, each on a connection of its own: answered, then closed.
    let framings: [(&[u8], i64); 6] = [
        (b"Content-Length: 99999999\r\n\r\n", -32600),
        (b"{\"jsonrpc\":\"2.0\",\"id\":1}\n", -32700),
        (b"Content-Length: -1\r\n\r\n", -32700),
        (b"X: y\r\n\r\n", -32700),
        (b"no colon here\r\n", -32700),
        (&[b'q'; 70_000], -32700),
    ];
    for _ in 0..200 {
        let (bytes, code) = rng.pick(&framings);
        refused_and_closed(&server, bytes, *code);
        sent += 1;
    }
    // Nothing was lost on the other connection meanwhile, and the server still serves.
    c.ok("lens/modelInfo", json!({}));
    let after = rss_mib(server.pid());

    // The same over LSP stdio, with framing recovery instead of closing.
    let mut lsp = Lsp::start();
    lsp.ok("initialize", json!({ "capabilities": {} }));
    lsp.notify("initialized", json!({}));
    let lsp_before = rss_mib(lsp.pid());
    for id in 10_000..10_500_i64 {
        let (bytes, expect) = fuzz_message(&mut rng, id);
        sent += 1;
        lsp.send_raw(&frame(&bytes));
        let Some((want_id, mut allowed)) = expect else {
            continue;
        };
        // tower-lsp answers a request with a non-object params or an unknown method -32601
        // or -32602, as the protocol allows.
        allowed.extend([-32601, -32602]);
        let v = lsp.next();
        assert_eq!(
            v["id"],
            want_id,
            "reply {v} to {}",
            String::from_utf8_lossy(&bytes)
        );
        errors += usize::from(check_reply(&v, &allowed, &bytes));
    }
    for _ in 0..50 {
        let (bytes, code) = rng.pick(&framings);
        if *code == -32600 {
            // Over the 4 MiB default, with its body: skipped unread.
            lsp.send_raw(b"Content-Length: 5000000\r\n\r\n");
            lsp.send_raw(&vec![b' '; 5_000_000]);
        } else {
            lsp.send_raw(bytes);
        }
        let v = lsp.next();
        assert_error(&v, *code, None);
        sent += 1;
        lsp.ok("lens/cacheStats", json!({}));
    }
    assert!(lsp.is_running(), "the LSP server is still running");
    let lsp_after = rss_mib(lsp.pid());
    eprintln!(
        "fuzz: {sent} malformed messages ({errors} answered with errors), 0 lost; RSS: TCP server {before:.0} -> {after:.0} MiB, LSP server {lsp_before:.0} -> {lsp_after:.0} MiB; {:.1} s",
        start.elapsed().as_secs_f64()
    );
    assert!(sent >= 2000);
    assert!(after - before < 256.0, "{before} -> {after}");
    assert!(
        lsp_after - lsp_before < 256.0,
        "{lsp_before} -> {lsp_after}"
    );
}

fn serve_cmd(args: &[&str]) -> Command {
    ensure_model();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_logit-lens"));
    cmd.arg("serve")
        .args(args)
        .env_remove("LOGIT_LENS_MODEL")
        .env_remove("LOGIT_LENS_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

/// Run `logit-lens serve ARGS`, expecting it to refuse to start with `expect` on stderr.
#[track_caller]
fn refuses(args: &[&str], expect: &str) {
    let out = serve_cmd(args).output().expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "serve {args:?} started");
    assert!(stderr.contains(expect), "serve {args:?}: {stderr}");
}

#[test]
fn the_token_from_a_file_or_the_environment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("token");
    std::fs::write(&file, "s3cret-from-file\n").expect("write");
    let path = file.to_str().expect("utf8");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    refuses(
        &["--listen", "127.0.0.1:0", "--token-file", path],
        "is readable by others",
    );
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let server = Server::tcp(&["--token-file", path]);
    let mut c = server.connect();
    assert_error(
        &c.request("lens/modelInfo", json!({})),
        -32015,
        Some("unauthorized"),
    );
    assert_error(
        &c.request("lens/modelInfo", json!({ "token": "s3cret-from-fil" })),
        -32015,
        Some("unauthorized"),
    );
    c.ok("lens/modelInfo", json!({ "token": "s3cret-from-file" }));

    // Remote listening needs a token and TLS, or an explicit --insecure.
    refuses(
        &[
            "--listen",
            "0.0.0.0:0",
            "--allow-remote",
            "--token-file",
            path,
        ],
        "needs TLS",
    );
    refuses(
        &["--listen", "0.0.0.0:0", "--allow-remote", "--insecure"],
        "needs a token",
    );
    let mut child = serve_cmd(&["--listen", "0.0.0.0:0", "--allow-remote", "--insecure"])
        .env("LOGIT_LENS_TOKEN", "from-env")
        .spawn()
        .expect("spawn");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let addr = lines
        .find_map(|l| l.ok()?.strip_prefix("listening on ").map(str::to_string))
        .expect("listening");
    let port = addr.rsplit(':').next().expect("port");
    let mut s = TcpStream::connect(format!("127.0.0.1:{port}")).expect("connect");
    s.write_all(&frame(
        br#"{"jsonrpc":"2.0","id":1,"method":"lens/modelInfo","params":{"token":"from-env"}}"#,
    ))
    .expect("write");
    let v = parse(&read_frame(&mut BufReader::new(&s)).expect("reply"));
    assert!(v.get("result").is_some(), "{v}");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn tls_on_the_tcp_door() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("certificate");
    let (cert_pem, key_pem) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_pem, cert.cert.pem()).expect("write");
    std::fs::write(&key_pem, cert.key_pair.serialize_pem()).expect("write");
    let server = Server::tcp(&[
        "--tls-cert",
        cert_pem.to_str().expect("utf8"),
        "--tls-key",
        key_pem.to_str().expect("utf8"),
    ]);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).expect("root");
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).expect("client");
    let tcp = TcpStream::connect(&server.addr).expect("connect");
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(&frame(
        br#"{"jsonrpc":"2.0","id":1,"method":"lens/tokenize","params":{"text":"over TLS"}}"#,
    ))
    .expect("write");
    let v = parse(&read_frame(&mut BufReader::new(&mut tls)).expect("reply over TLS"));
    assert_eq!(
        v["result"]["tokens"].as_array().map(Vec::len),
        Some(2),
        "{v}"
    );
    // A client speaking plain text gets no answer in plain text.
    let (mut s, mut r) = raw(&server);
    s.write_all(&frame(
        br#"{"jsonrpc":"2.0","id":1,"method":"lens/modelInfo"}"#,
    ))
    .expect("write");
    let mut buf = Vec::new();
    let _ = r.read_to_end(&mut buf);
    assert!(!String::from_utf8_lossy(&buf).contains("jsonrpc"));
    // Half a pair is a usage error.
    refuses(
        &["--listen", "127.0.0.1:0", "--tls-cert", "x.pem"],
        "--tls-key",
    );
}

#[test]
fn the_socket_file_and_the_log_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("lens.sock");
    let sock_s = sock.to_str().expect("utf8");
    // A regular file at the path is never deleted.
    std::fs::write(&sock, "precious").expect("write");
    refuses(&["--socket", sock_s], "is not a socket");
    assert_eq!(
        std::fs::read_to_string(&sock).expect("still there"),
        "precious"
    );
    std::fs::remove_file(&sock).expect("rm");
    // A stale socket (nobody listening) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&sock).expect("bind"));
    let log = dir.path().join("serve.log");
    let start = |extra: &[&str]| {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg("umask 000; exec \"$@\"")
            .arg("sh")
            .arg(env!("CARGO_BIN_EXE_logit-lens"))
            .args(["-v", "serve", "--socket", sock_s])
            .args(extra)
            .env_remove("LOGIT_LENS_MODEL")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let stderr = child.stderr.take().expect("stderr");
        (child, stderr)
    };
    ensure_model();
    let (mut child, stderr) = start(&["--log-file", log.to_str().expect("utf8")]);
    // With a log file, the address is still announced on stderr.
    let mut lines = BufReader::new(stderr).lines();
    assert!(lines.any(|l| l.is_ok_and(|l| l.starts_with("listening on"))));
    let mode =
        |p: &std::path::Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&sock), 0o600, "the socket, under umask 000");
    assert_eq!(mode(&log), 0o600, "the log file, under umask 000");
    let mut s = std::os::unix::net::UnixStream::connect(&sock).expect("connect");
    s.write_all(&frame(
        br#"{"jsonrpc":"2.0","id":1,"method":"lens/modelInfo"}"#,
    ))
    .expect("write");
    let v = parse(&read_frame(&mut BufReader::new(&s)).expect("reply"));
    assert!(v.get("result").is_some(), "{v}");
    // A second server on the same path is refused while the first answers.
    refuses(&["--socket", sock_s], "another server is listening");
    // SIGTERM: the socket is removed on the way out.
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let exit = child.wait().expect("wait");
    assert!(exit.success(), "{exit:?}");
    assert!(!sock.exists(), "the socket file is removed on SIGTERM");
    let logged = std::fs::read_to_string(&log).expect("log");
    assert!(logged.contains("shutting down"), "{logged}");
}

/// A NaN in a weight: the daemon answers -32017 naming the layer, and keeps serving.
#[test]
fn the_daemon_reports_non_finite_numbers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fixture = crate::data_dir().join("oracle/tiny-llama/tiny-llama.f32.gguf");
    let mut bytes = std::fs::read(&fixture).expect("fixture");
    let header = lens_gguf::check_file(&fixture).expect("valid fixture");
    let t = header.tensor("blk.2.ffn_norm.weight").expect("tensor");
    let at = (header.data_start + t.offset) as usize;
    bytes[at..at + 4].copy_from_slice(&f32::INFINITY.to_le_bytes());
    let path = dir.path().join("inf.gguf");
    std::fs::write(&path, bytes).expect("write");
    let server = Server::tcp(&["--model", path.to_str().expect("utf8")]);
    let mut c = server.connect();
    let r = c.request(
        "lens/analyze",
        json!({ "text": "The capital of France is" }),
    );
    assert_error(&r, -32017, Some("non_finite"));
    let msg = r["error"]["message"].as_str().expect("message");
    assert!(
        msg.contains("at layer 3, position 0: block 3 produced it"),
        "{msg}"
    );
    c.ok("lens/tokenize", json!({ "text": "still serving" }));
}
