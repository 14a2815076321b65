//! The `lens/*` methods and the JSON-RPC 2.0 door for sockets (TCP, Unix): LSP base-protocol
//! framing (`Content-Length: N\r\n\r\n<json>`), many requests in flight per connection,
//! `$/cancelRequest`, an optional token in every request's params.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use lens_core::Stop;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use crate::engine::{AnalyzeParams, HeatmapParams, PositionParams, TokenizeParams};
use crate::{wire, Engine, RpcError, Turns};

/// Largest message body accepted (a document of a few MB plus JSON overhead).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

fn params<T: DeserializeOwned>(params: Value) -> Result<T, RpcError> {
    let params = if params.is_null() { json!({}) } else { params };
    serde_json::from_value(params).map_err(|e| RpcError::invalid_params(e.to_string()))
}

async fn blocking<T: Send + 'static>(
    turns: &Turns,
    f: impl FnOnce(&Stop) -> Result<T, RpcError> + Send + 'static,
) -> Result<T, RpcError> {
    turns.compute(f).await?
}

fn to_value<T: serde::Serialize>(v: &T) -> Result<Value, RpcError> {
    serde_json::to_value(v).map_err(|e| RpcError::internal(e.to_string()))
}

/// Run one `lens/*` method. Model work runs on a blocking thread.
pub async fn call(engine: Arc<Engine>, method: &str, p: Value) -> Result<Value, RpcError> {
    let turns = engine.turns().clone();
    match method {
        "lens/analyze" => {
            let p: AnalyzeParams = params(p)?;
            let report = blocking(&turns, move |stop| engine.analyze(&p, stop)).await?;
            to_value(&report)
        }
        "lens/position" => {
            let p: PositionParams = params(p)?;
            let report = blocking(&turns, move |stop| engine.position(&p, stop)).await?;
            to_value(&report)
        }
        "lens/tokenize" => {
            let p: TokenizeParams = params(p)?;
            let tokens = blocking(&turns, move |_| engine.tokenize(&p.text)).await?;
            Ok(json!({ "tokens": wire::token_json(&tokens) }))
        }
        "lens/heatmap" => {
            let p: HeatmapParams = params(p)?;
            let (format, content) = blocking(&turns, move |stop| engine.heatmap(&p, stop)).await?;
            Ok(json!({ "format": format, "content": content }))
        }
        "lens/modelInfo" => to_value(&wire::model_json(engine.backend())),
        "lens/cacheStats" => to_value(&engine.stats()),
        _ => Err(RpcError::method_not_found(method)),
    }
}

/// The names of the `lens/*` methods.
pub const METHODS: [&str; 6] = [
    "lens/analyze",
    "lens/position",
    "lens/tokenize",
    "lens/heatmap",
    "lens/modelInfo",
    "lens/cacheStats",
];

/// Read one framed message. `Ok(None)` at a clean end of stream; `Err` when the framing is
/// broken (the connection cannot continue).
pub async fn read_message<R: AsyncBufRead + Unpin>(
    reader: &mut R,
) -> Result<Option<Vec<u8>>, String> {
    let mut length: Option<usize> = None;
    let mut line = Vec::new();
    let mut first = true;
    loop {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .await
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return if first {
                Ok(None)
            } else {
                Err("the stream ended inside a header".into())
            };
        }
        first = false;
        if line.len() > 1024 {
            return Err("header line too long".into());
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\r', '\n']);
        if text.is_empty() {
            break;
        }
        let Some((name, value)) = text.split_once(':') else {
            return Err(format!("malformed header `{text}`"));
        };
        if name.trim().eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .trim()
                    .parse()
                    .map_err(|_| format!("bad Content-Length `{}`", value.trim()))?,
            );
        }
    }
    let length = length.ok_or("missing Content-Length header")?;
    if length > MAX_MESSAGE_BYTES {
        return Err(format!(
            "message of {length} bytes is larger than the limit of {MAX_MESSAGE_BYTES}"
        ));
    }
    let mut body = vec![0; length];
    reader
        .read_exact(&mut body)
        .await
        .map_err(|e| e.to_string())?;
    Ok(Some(body))
}

pub fn frame(body: &Value) -> Vec<u8> {
    let text = body.to_string();
    let mut out = format!("Content-Length: {}\r\n\r\n", text.len()).into_bytes();
    out.extend_from_slice(text.as_bytes());
    out
}

pub fn response(id: Value, result: Result<Value, RpcError>) -> Value {
    match result {
        Ok(result) => json!({ "jsonrpc": "2.0", "id": id, "result": result }),
        Err(e) => json!({ "jsonrpc": "2.0", "id": id, "error": e.to_json() }),
    }
}

type InFlight = Arc<Mutex<HashMap<String, AbortHandle>>>;

/// Serve one connection until it closes or its framing breaks.
pub async fn serve_connection<R, W>(
    engine: Arc<Engine>,
    reader: R,
    writer: W,
    token: Option<Arc<str>>,
) where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = mpsc::unbounded_channel::<Value>();
    let writer_task = tokio::spawn(async move {
        let mut writer = writer;
        while let Some(msg) = rx.recv().await {
            if writer.write_all(&frame(&msg)).await.is_err() || writer.flush().await.is_err() {
                break;
            }
        }
    });
    let in_flight: InFlight = Arc::default();
    let mut reader = reader;
    loop {
        let body = match read_message(&mut reader).await {
            Ok(Some(body)) => body,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!("closing a connection: {e}");
                let _ = tx.send(response(Value::Null, Err(RpcError::parse(e))));
                break;
            }
        };
        handle(&engine, &body, &tx, &in_flight, token.as_deref());
    }
    for (_, h) in in_flight
        .lock()
        .map(|mut m| m.drain().collect::<Vec<_>>())
        .unwrap_or_default()
    {
        h.abort();
    }
    drop(tx);
    let _ = writer_task.await;
}

/// A JSON-RPC 2.0 message that passed envelope checks.
pub struct Envelope {
    pub id: Option<Value>,
    pub method: Option<String>,
    pub params: Value,
}

/// Check a message's envelope. `Err` carries the id to answer with and the error
/// (-32700 not JSON, -32600 not a JSON-RPC 2.0 object, -32602 params neither object nor array).
pub fn validate(body: &[u8]) -> Result<Envelope, (Value, RpcError)> {
    let msg: Value = serde_json::from_slice(body)
        .map_err(|e| (Value::Null, RpcError::parse(format!("not JSON: {e}"))))?;
    let Value::Object(mut msg) = msg else {
        return Err((
            Value::Null,
            RpcError::invalid_request(
                "a message must be a JSON object (batches are not supported)",
            ),
        ));
    };
    let id = msg.remove("id");
    if let Some(id) = &id {
        if !(id.is_string() || id.is_i64() || id.is_u64() || id.is_null()) {
            return Err((
                Value::Null,
                RpcError::invalid_request("id must be a string or an integer"),
            ));
        }
    }
    let reply_id = id.clone().unwrap_or(Value::Null);
    if msg.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err((
            reply_id,
            RpcError::invalid_request("jsonrpc must be \"2.0\""),
        ));
    }
    let params = msg.remove("params").unwrap_or(Value::Null);
    let method = match msg.get("method") {
        Some(Value::String(m)) => Some(m.clone()),
        None if id.is_some() && (msg.contains_key("result") || msg.contains_key("error")) => None,
        _ => {
            return Err((
                reply_id,
                RpcError::invalid_request("method must be a string"),
            ))
        }
    };
    if !(params.is_object() || params.is_array() || params.is_null()) {
        return Err((
            reply_id,
            RpcError::invalid_params("params must be an object"),
        ));
    }
    Ok(Envelope { id, method, params })
}

fn handle(
    engine: &Arc<Engine>,
    body: &[u8],
    tx: &mpsc::UnboundedSender<Value>,
    in_flight: &InFlight,
    token: Option<&str>,
) {
    let send = |v: Value| {
        let _ = tx.send(v);
    };
    let Envelope {
        id,
        method,
        params: mut p,
    } = match validate(body) {
        Ok(e) => e,
        Err((id, e)) => return send(response(id, Err(e))),
    };
    let Some(method) = method else { return };
    let reply_id = id.clone().unwrap_or(Value::Null);
    if !(p.is_object() || p.is_null()) {
        if id.is_some() {
            send(response(
                reply_id,
                Err(RpcError::invalid_params("params must be an object")),
            ));
        }
        return;
    }
    let Some(id) = id else {
        // A notification: only cancellation means something here.
        if method == "$/cancelRequest" {
            let key = p.get("id").map(Value::to_string).unwrap_or_default();
            let handle = in_flight.lock().ok().and_then(|mut m| m.remove(&key));
            if let Some(h) = handle {
                h.abort();
                send(response(
                    p.get("id").cloned().unwrap_or(Value::Null),
                    Err(RpcError::cancelled()),
                ));
            }
        }
        return;
    };
    if let Some(expected) = token {
        let given = p.as_object_mut().and_then(|o| o.remove("token"));
        if given.as_ref().and_then(Value::as_str) != Some(expected) {
            return send(response(id, Err(RpcError::unauthorized())));
        }
    } else if let Some(o) = p.as_object_mut() {
        o.remove("token");
    }
    let key = id.to_string();
    let engine = engine.clone();
    let tx2 = tx.clone();
    let in_flight2 = in_flight.clone();
    let key2 = key.clone();
    // Hold the map's lock while spawning, so the task cannot finish before it is registered.
    let Ok(mut map) = in_flight.lock() else {
        return;
    };
    let task = tokio::spawn(async move {
        let result = call(engine, &method, p).await;
        // Answer only if the request was not cancelled meanwhile.
        let still_ours = in_flight2
            .lock()
            .ok()
            .and_then(|mut m| m.remove(&key2))
            .is_some();
        if still_ours {
            let _ = tx2.send(response(id, result));
        }
    });
    map.insert(key, task.abort_handle());
}
