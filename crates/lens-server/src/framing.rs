//! The base protocol's framing (`Content-Length: N\r\n\r\n<body>`), shared by both doors,
//! read with bounded memory: a header line is cut off at [`MAX_HEADER_LINE`] bytes while it
//! is being read (not after its newline arrives), a header block has at most
//! [`MAX_HEADER_LINES`] lines, and a body longer than the connection's limit is refused
//! before a byte of it is read. A body is read as it arrives, never allocated up front on the
//! header's word.
//!
//! What a door does with a [`FrameError`] is its own choice: the socket door answers and
//! closes the connection; the LSP door answers and [`resync`]s, because closing stdio would
//! end the editor's session.

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt};

/// Longest header line accepted, in bytes.
pub const MAX_HEADER_LINE: usize = 1024;
/// Most header lines in one message.
pub const MAX_HEADER_LINES: usize = 16;
/// Default largest message body, in bytes (`serve --max-message-mb`): the largest legitimate
/// request is a prompt of the model's context, a few hundred KiB at most; LSP documents are
/// bounded by it too.
pub const DEFAULT_MAX_MESSAGE: usize = 4 << 20;

/// Why a message could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The connection failed or ended in the middle of a message.
    #[error("{0}")]
    Broken(String),
    /// The declared body is larger than the limit; nothing of it was read.
    #[error("a message of {length} bytes is larger than the limit of {limit} bytes")]
    TooLarge { length: u64, limit: usize },
    /// The header block is not `Name: value` lines with a `Content-Length`.
    #[error("{0}")]
    Malformed(String),
}

impl FrameError {
    fn malformed(s: impl Into<String>) -> Self {
        FrameError::Malformed(s.into())
    }
}

/// One header line read by [`read_line`].
enum Line {
    /// A complete line (the newline removed, and a `\r` before it).
    Text(Vec<u8>),
    /// A line longer than the limit: what was read of it is discarded, the rest is not read.
    TooLong,
    /// The end of the stream, with what came before it on the line.
    End(Vec<u8>),
}

/// Read up to and including the next `\n`, holding at most `limit` bytes.
async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R, limit: usize) -> Result<Line, FrameError> {
    let mut line = Vec::new();
    loop {
        let buf = r
            .fill_buf()
            .await
            .map_err(|e| FrameError::Broken(e.to_string()))?;
        if buf.is_empty() {
            return Ok(Line::End(line));
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        if line.len() + take > limit + 2 {
            let n = take.min(buf.len());
            r.consume(n);
            return Ok(Line::TooLong);
        }
        line.extend_from_slice(&buf[..take]);
        r.consume(take);
        if done {
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Ok(Line::Text(line));
        }
    }
}

/// A header name is an HTTP token; anything else (a `{` of newline-delimited JSON, say) means
/// the peer is not speaking this framing.
fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Read one framed message. `Ok(None)` at a clean end of stream (between messages).
pub async fn read_message<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    max_body: usize,
) -> Result<Option<Vec<u8>>, FrameError> {
    read_from(reader, max_body, None).await
}

/// Skip input up to the next `Content-Length:` header (case-insensitive, anywhere: a broken
/// message's body or a flood with no newline may run into the next header), then read that
/// message. Holds a few bytes while it scans. `Ok(None)` when the stream ends first.
pub async fn resync<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    max_body: usize,
) -> Result<Option<Vec<u8>>, FrameError> {
    const NEEDLE: &[u8] = b"content-length:";
    // The end of what was scanned last time: a needle may straddle two reads.
    let mut tail: Vec<u8> = Vec::with_capacity(NEEDLE.len() * 2);
    loop {
        let buf = reader
            .fill_buf()
            .await
            .map_err(|e| FrameError::Broken(e.to_string()))?;
        if buf.is_empty() {
            return Ok(None);
        }
        let mut window = tail.clone();
        window.extend_from_slice(&buf[..buf.len().min(4096)]);
        let scanned = window.len() - tail.len();
        let found = window
            .windows(NEEDLE.len())
            .position(|w| w.eq_ignore_ascii_case(NEEDLE));
        match found {
            Some(at) => {
                // Consume through the needle, then the rest of its line is the value.
                let through = at + NEEDLE.len() - tail.len();
                reader.consume(through);
                let rest = match read_line(reader, MAX_HEADER_LINE).await? {
                    Line::Text(rest) => rest,
                    Line::TooLong => continue,
                    Line::End(_) => return Ok(None),
                };
                let mut first = b"Content-Length:".to_vec();
                first.extend_from_slice(&rest);
                return read_from(reader, max_body, Some(first)).await;
            }
            None => {
                reader.consume(scanned);
                let keep = window.len().min(NEEDLE.len() - 1);
                tail = window[window.len() - keep..].to_vec();
            }
        }
    }
}

async fn read_from<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    max_body: usize,
    mut first: Option<Vec<u8>>,
) -> Result<Option<Vec<u8>>, FrameError> {
    let mut length: Option<u64> = None;
    let mut lines = 0;
    loop {
        let line = match first.take() {
            Some(line) => line,
            None => match read_line(reader, MAX_HEADER_LINE).await? {
                Line::Text(line) => line,
                Line::TooLong => {
                    return Err(FrameError::malformed(format!(
                        "a header line is longer than {MAX_HEADER_LINE} bytes"
                    )))
                }
                Line::End(rest) if rest.is_empty() && lines == 0 => return Ok(None),
                Line::End(_) => {
                    return Err(FrameError::Broken(
                        "the stream ended inside a header".into(),
                    ))
                }
            },
        };
        lines += 1;
        if lines > MAX_HEADER_LINES {
            return Err(FrameError::malformed(format!(
                "more than {MAX_HEADER_LINES} header lines"
            )));
        }
        if line.is_empty() {
            break;
        }
        let text = String::from_utf8_lossy(&line);
        let Some((name, value)) = text.split_once(':').filter(|(n, _)| is_token(n.trim_end()))
        else {
            let shown: String = text.chars().take(40).collect();
            return Err(FrameError::malformed(format!(
                "not a header: `{shown}` (messages are framed as `Content-Length: N\\r\\n\\r\\n` and N bytes of JSON)"
            )));
        };
        if name.trim().eq_ignore_ascii_case("content-length") {
            let value = value.trim();
            length = Some(
                value
                    .parse()
                    .map_err(|_| FrameError::malformed(format!("bad Content-Length `{value}`")))?,
            );
        }
    }
    let length = length.ok_or_else(|| FrameError::malformed("missing Content-Length header"))?;
    if length > max_body as u64 {
        return Err(FrameError::TooLarge {
            length,
            limit: max_body,
        });
    }
    // Grows as bytes arrive: a peer that declares a body and stalls holds what it sent.
    let mut body = Vec::new();
    reader
        .take(length)
        .read_to_end(&mut body)
        .await
        .map_err(|e| FrameError::Broken(e.to_string()))?;
    if body.len() as u64 != length {
        return Err(FrameError::Broken("the stream ended inside a body".into()));
    }
    Ok(Some(body))
}

/// Read and discard `length` bytes (a refused body), holding a few KiB at a time.
pub async fn skip<R: AsyncBufRead + Unpin>(reader: &mut R, length: u64) -> Result<(), FrameError> {
    let copied = tokio::io::copy(&mut reader.take(length), &mut tokio::io::sink())
        .await
        .map_err(|e| FrameError::Broken(e.to_string()))?;
    if copied == length {
        Ok(())
    } else {
        Err(FrameError::Broken("the stream ended inside a body".into()))
    }
}

/// Frame a body.
pub fn frame_bytes(body: &[u8]) -> Vec<u8> {
    let mut out = format!("Content-Length: {}\r\n\r\n", body.len()).into_bytes();
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Read every message of `input` the way the LSP door does (answer, resync, go on) and
    /// describe each outcome on a line.
    fn check(input: &[u8], max: usize, expect: expect_test::Expect) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let out = rt.block_on(async {
            let mut r = tokio::io::BufReader::new(input);
            let mut out = String::new();
            let mut broken = false;
            loop {
                let got = if broken {
                    resync(&mut r, max).await
                } else {
                    read_message(&mut r, max).await
                };
                broken = false;
                match got {
                    Ok(None) => break,
                    Ok(Some(body)) => out += &format!("body {}\n", String::from_utf8_lossy(&body)),
                    Err(FrameError::TooLarge { length, .. }) => {
                        out += &format!("too large {length}\n");
                        if skip(&mut r, length).await.is_err() {
                            out += "ended\n";
                            break;
                        }
                    }
                    Err(FrameError::Broken(e)) => {
                        out += &format!("broken: {e}\n");
                        break;
                    }
                    Err(e) => {
                        out += &format!("error: {e}\n");
                        broken = true;
                    }
                }
            }
            out
        });
        expect.assert_eq(&out);
    }

    #[test]
    fn framing() {
        use expect_test::expect;
        check(
            b"Content-Length: 2\r\n\r\n{}content-length:3\n\n[1]",
            100,
            expect![[r#"
                body {}
                body [1]
            "#]],
        );
        // A bad length, then the next header glued to the body it announced.
        check(
            b"Content-Length: x\r\n\r\n{}Content-Length: 2\r\n\r\n{}",
            100,
            expect![[r#"
                error: bad Content-Length `x`
                body {}
            "#]],
        );
        // Newline-delimited JSON is not a header; a header line with no newline is cut off.
        check(
            b"{\"jsonrpc\":\"2.0\"}\nContent-Length: 2\r\n\r\n{}",
            100,
            expect![[r#"
                error: not a header: `{"jsonrpc":"2.0"}` (messages are framed as `Content-Length: N\r\n\r\n` and N bytes of JSON)
                body {}
            "#]],
        );
        let mut flood = vec![b'a'; 5000];
        flood.extend_from_slice(b"CONTENT-length: 2\r\n\r\n{}");
        check(
            &flood,
            100,
            expect![[r#"
                error: a header line is longer than 1024 bytes
            "#]],
        );
        check(
            b"\r\n\r\nContent-Length: 2\r\n\r\n{}",
            100,
            expect![[r#"
                error: missing Content-Length header
                body {}
            "#]],
        );
        // Too large: refused before its body is read, skipped, and the stream goes on.
        check(
            b"Content-Length: 5\r\n\r\n12345Content-Length: 2\r\n\r\n{}",
            4,
            expect![[r#"
                too large 5
                body {}
            "#]],
        );
        check(
            b"Content-Length: 18446744073709551615\r\n\r\n{}",
            4,
            expect![[r#"
                too large 18446744073709551615
                ended
            "#]],
        );
        check(
            b"Content-Length: 10\r\n\r\n{}",
            100,
            expect![[r#"
                broken: the stream ended inside a body
            "#]],
        );
        check(
            b"Content-Length: 2\r\n",
            100,
            expect![[r#"
                broken: the stream ended inside a header
            "#]],
        );
        let many = "X-A: 1\r\n".repeat(20) + "Content-Length: 2\r\n\r\n{}";
        check(
            many.as_bytes(),
            100,
            expect![[r#"
                error: more than 16 header lines
                body {}
            "#]],
        );
    }
}
