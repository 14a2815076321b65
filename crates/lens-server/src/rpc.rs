//! The `lens/*` methods and the JSON-RPC 2.0 door for sockets (TCP, Unix): LSP base-protocol
//! framing (`Content-Length: N\r\n\r\n<json>`), many requests in flight per connection,
//! `$/cancelRequest`, an optional token in every request's params.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use lens_core::Stop;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::io::{AsyncBufRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use crate::engine::{
    AnalyzeParams, DiffOut, DiffParams, GenerateParams, HeatmapParams, PositionParams,
    TokenizeParams,
};
use crate::framing::{self, FrameError};
use crate::{wire, ClientId, Engine, Limits, RpcError, Turns};

fn params<T: DeserializeOwned>(params: Value) -> Result<T, RpcError> {
    let params = if params.is_null() { json!({}) } else { params };
    serde_json::from_value(params).map_err(|e| RpcError::invalid_params(e.to_string()))
}

async fn blocking<T: Send + 'static>(
    turns: &Turns,
    client: ClientId,
    f: impl FnOnce(&Stop) -> Result<T, RpcError> + Send + 'static,
) -> Result<T, RpcError> {
    turns.compute_for(client, Stop::new(), f).await?
}

/// Work that needs no turn (tokenizing): on a blocking thread of its own, so it never waits
/// behind model work.
async fn beside<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, RpcError> + Send + 'static,
) -> Result<T, RpcError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| RpcError::internal(format!("worker failed: {e}")))?
}

fn to_value<T: serde::Serialize>(v: &T) -> Result<Value, RpcError> {
    serde_json::to_value(v).map_err(|e| RpcError::internal(e.to_string()))
}

/// Run one `lens/*` method for `client`. Model work runs on a blocking thread and takes turns
/// ([`Turns`]: fair between clients); cheap methods (tokenize, model info, cache stats) never
/// wait for a turn.
pub async fn call(
    engine: Arc<Engine>,
    method: &str,
    p: Value,
    client: ClientId,
) -> Result<Value, RpcError> {
    let turns = engine.turns().clone();
    match method {
        "lens/analyze" => {
            let p: AnalyzeParams = params(p)?;
            let report = blocking(&turns, client, move |stop| engine.analyze(&p, stop)).await?;
            to_value(&report)
        }
        "lens/position" => {
            let p: PositionParams = params(p)?;
            let report = blocking(&turns, client, move |stop| engine.position(&p, stop)).await?;
            to_value(&report)
        }
        "lens/tokenize" => {
            let p: TokenizeParams = params(p)?;
            let tokens = beside(move || engine.tokenize_text(&p.text)).await?;
            Ok(json!({ "tokens": wire::token_json(&tokens) }))
        }
        "lens/heatmap" => {
            let p: HeatmapParams = params(p)?;
            let (format, content) =
                blocking(&turns, client, move |stop| engine.heatmap(&p, stop)).await?;
            Ok(json!({ "format": format, "content": content }))
        }
        "lens/diff" => {
            let p: DiffParams = params(p)?;
            match blocking(&turns, client, move |stop| engine.diff(&p, stop)).await? {
                DiffOut::Report(report) => to_value(&report),
                DiffOut::Page { format, content } => {
                    Ok(json!({ "format": format, "content": content }))
                }
            }
        }
        "lens/modelInfo" => to_value(&wire::model_json(engine.backend())),
        "lens/cacheStats" => to_value(&engine.stats()),
        _ => Err(RpcError::method_not_found(method)),
    }
}

/// `lens/generate` (the socket doors only: it streams): each new token goes out at once as a
/// `lens/generateStep` notification whose params are the step ([`wire::GenerateStepJson`])
/// and the request's `id`; the answer ([`crate::engine::GenerateOut`]) comes when generation
/// ends. `$/cancelRequest` stops it within a token: after its answer at most the step that
/// was being sent follows.
async fn generate(
    engine: Arc<Engine>,
    p: Value,
    client: ClientId,
    id: Value,
    tx: mpsc::UnboundedSender<Value>,
) -> Result<Value, RpcError> {
    let p: GenerateParams = params(p)?;
    let turns = engine.turns().clone();
    let out = blocking(&turns, client, move |stop| {
        engine.generate(&p, stop, &mut |step| {
            if stop.is_stopped() {
                return;
            }
            let mut params = serde_json::to_value(&step).unwrap_or_else(|_| json!({}));
            if let Some(o) = params.as_object_mut() {
                o.insert("id".into(), id.clone());
            }
            let _ = tx.send(json!({
                "jsonrpc": "2.0",
                "method": "lens/generateStep",
                "params": params,
            }));
        })
    })
    .await?;
    to_value(&out)
}

/// The names of the `lens/*` methods.
pub const METHODS: [&str; 7] = [
    "lens/analyze",
    "lens/position",
    "lens/tokenize",
    "lens/heatmap",
    "lens/diff",
    "lens/modelInfo",
    "lens/cacheStats",
];

pub fn frame(body: &Value) -> Vec<u8> {
    framing::frame_bytes(body.to_string().as_bytes())
}

pub fn response(id: Value, result: Result<Value, RpcError>) -> Value {
    match result {
        Ok(result) => json!({ "jsonrpc": "2.0", "id": id, "result": result }),
        Err(e) => json!({ "jsonrpc": "2.0", "id": id, "error": e.to_json() }),
    }
}

type InFlight = Arc<Mutex<HashMap<String, AbortHandle>>>;

/// Requests one connection may have in flight at once; more are answered -32016.
pub const MAX_IN_FLIGHT: usize = 256;

/// A new client's id (for [`Turns`]' fairness).
pub fn next_client() -> ClientId {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Serve one connection until it closes, its framing breaks (answered, then closed: a socket
/// client can reconnect), or it has been idle for `limits.idle_timeout` (no message arriving
/// and no request in flight). `closed` runs once the last answer is written, just before the
/// write side is shut (and before the last moments spent reading what the client may still
/// send): a client that has seen the connection close can count on its slot being free.
pub async fn serve_connection<R, W>(
    engine: Arc<Engine>,
    reader: R,
    writer: W,
    token: Option<Arc<str>>,
    limits: Limits,
    closed: impl FnOnce() + Send + 'static,
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
        closed();
        let _ = writer.shutdown().await;
    });
    let in_flight: InFlight = Arc::default();
    let client = next_client();
    let mut reader = reader;
    let mut linger = false;
    loop {
        let read = framing::read_message(&mut reader, limits.max_message);
        tokio::pin!(read);
        let got = loop {
            tokio::select! {
                got = &mut read => break Some(got),
                () = tokio::time::sleep(limits.idle_timeout) => {
                    if in_flight.lock().map(|m| m.is_empty()).unwrap_or(true) {
                        break None;
                    }
                }
            }
        };
        let body = match got {
            None => {
                tracing::info!("closing a connection idle for {:?}", limits.idle_timeout);
                break;
            }
            Some(Ok(Some(body))) => body,
            Some(Ok(None)) => break,
            Some(Err(FrameError::Broken(e))) => {
                tracing::info!("a connection broke: {e}");
                break;
            }
            Some(Err(e)) => {
                tracing::warn!("closing a connection: {e}");
                let error = match e {
                    FrameError::TooLarge { .. } => RpcError::invalid_request(e.to_string()),
                    _ => RpcError::parse(e.to_string()),
                };
                let _ = tx.send(response(Value::Null, Err(error)));
                linger = true;
                break;
            }
        };
        handle(&engine, &body, &tx, &in_flight, token.as_deref(), client);
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
    if linger {
        // The answer is sent and the write side shut: read (and drop) a little of what the
        // client is still sending, so that closing does not reset the connection before the
        // client has read the answer.
        let (mut rest, mut sink) = ((&mut reader).take(4 << 20), tokio::io::sink());
        let drain = tokio::io::copy(&mut rest, &mut sink);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), drain).await;
    }
}

/// Compare a given token with the expected one in time that does not depend on where they
/// differ.
pub fn token_matches(given: Option<&str>, expected: &str) -> bool {
    use subtle::ConstantTimeEq;
    given.is_some_and(|g| bool::from(g.as_bytes().ct_eq(expected.as_bytes())))
}

/// A JSON-RPC 2.0 message that passed envelope checks.
pub struct Envelope {
    pub id: Option<Value>,
    pub method: Option<String>,
    pub params: Value,
}

/// Check a message's envelope. `Err` carries the id to answer with and the error
/// (-32700 not JSON, -32600 not a JSON-RPC 2.0 object, -32602 params neither object nor array),
/// or no id when the message is a notification, which is never answered (its error is only
/// logged).
pub fn validate(body: &[u8]) -> Result<Envelope, (Option<Value>, RpcError)> {
    let msg: Value = serde_json::from_slice(body)
        .map_err(|e| (Some(Value::Null), RpcError::parse(format!("not JSON: {e}"))))?;
    let Value::Object(mut msg) = msg else {
        return Err((
            Some(Value::Null),
            RpcError::invalid_request(
                "a message must be a JSON object (batches are not supported)",
            ),
        ));
    };
    let id = msg.remove("id");
    if let Some(id) = &id {
        if !(id.is_string() || id.is_i64() || id.is_u64() || id.is_null()) {
            return Err((
                Some(Value::Null),
                RpcError::invalid_request("id must be a string or an integer"),
            ));
        }
    }
    let reply_id = Some(id.clone().unwrap_or(Value::Null));
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
            id.clone(),
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
    client: ClientId,
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
        Err((Some(id), e)) => return send(response(id, Err(e))),
        Err((None, e)) => return tracing::debug!("ignoring a notification: {e}"),
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
        if !token_matches(given.as_ref().and_then(Value::as_str), expected) {
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
    if map.contains_key(&key) {
        return send(response(
            id,
            Err(RpcError::invalid_request(
                "a request with this id is already in flight on this connection",
            )),
        ));
    }
    if map.len() >= MAX_IN_FLIGHT {
        return send(response(
            id,
            Err(RpcError::busy(format!(
                "{MAX_IN_FLIGHT} requests are already in flight on this connection"
            ))),
        ));
    }
    let stream = (tx.clone(), id.clone());
    let task = tokio::spawn(async move {
        let result = match method.as_str() {
            "lens/generate" => generate(engine, p, client, stream.1, stream.0).await,
            _ => call(engine, &method, p, client).await,
        };
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
