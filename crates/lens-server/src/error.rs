//! JSON-RPC errors with the codes of the protocol (`docs/protocol.md`).

use serde_json::{json, Value};

/// An error answered to a request: a JSON-RPC code, a message, and for the server-defined
/// codes (-32010..) a machine-readable `data.kind`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message} ({code})")]
pub struct RpcError {
    pub code: i64,
    pub message: String,
    pub kind: Option<&'static str>,
}

pub const PARSE_ERROR: i64 = -32700;
pub const INVALID_REQUEST: i64 = -32600;
pub const METHOD_NOT_FOUND: i64 = -32601;
pub const INVALID_PARAMS: i64 = -32602;
pub const INTERNAL_ERROR: i64 = -32603;
pub const REQUEST_CANCELLED: i64 = -32800;
pub const CONTENT_MODIFIED: i64 = -32801;
pub const EMPTY_TEXT: i64 = -32010;
pub const PROMPT_TOO_LONG: i64 = -32011;
pub const DOCUMENT_NOT_OPEN: i64 = -32012;
pub const OUT_OF_RANGE: i64 = -32013;
pub const MODEL: i64 = -32014;
pub const UNAUTHORIZED: i64 = -32015;
pub const BUSY: i64 = -32016;
pub const NON_FINITE: i64 = -32017;

impl RpcError {
    fn new(code: i64, message: impl Into<String>, kind: Option<&'static str>) -> Self {
        RpcError {
            code,
            message: message.into(),
            kind,
        }
    }
    pub fn parse(message: impl Into<String>) -> Self {
        Self::new(PARSE_ERROR, message, None)
    }
    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(INVALID_REQUEST, message, None)
    }
    pub fn method_not_found(method: &str) -> Self {
        Self::new(
            METHOD_NOT_FOUND,
            format!("method not found: {method}"),
            None,
        )
    }
    pub fn invalid_params(message: impl Into<String>) -> Self {
        Self::new(INVALID_PARAMS, message, None)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(INTERNAL_ERROR, message, None)
    }
    pub fn cancelled() -> Self {
        Self::new(REQUEST_CANCELLED, "request cancelled", None)
    }
    pub fn content_modified() -> Self {
        Self::new(
            CONTENT_MODIFIED,
            "the document changed; the request was superseded",
            None,
        )
    }
    pub fn empty_text() -> Self {
        Self::new(EMPTY_TEXT, "the text is empty", Some("empty_text"))
    }
    pub fn prompt_too_long(tokens: usize, context: usize) -> Self {
        Self::new(
            PROMPT_TOO_LONG,
            format!("the text has {tokens} tokens, more than the model's context of {context}"),
            Some("prompt_too_long"),
        )
    }
    pub fn document_not_open(uri: &str) -> Self {
        Self::new(
            DOCUMENT_NOT_OPEN,
            format!("the document {uri} is not open"),
            Some("document_not_open"),
        )
    }
    pub fn out_of_range(message: impl Into<String>) -> Self {
        Self::new(OUT_OF_RANGE, message, Some("out_of_range"))
    }
    pub fn model(message: impl Into<String>) -> Self {
        Self::new(MODEL, message, Some("model"))
    }
    pub fn prompt_too_many_bytes(bytes: usize, limit: usize) -> Self {
        Self::new(
            PROMPT_TOO_LONG,
            format!(
                "the text has {bytes} bytes, more than any prompt of the model's context can \
                 have ({limit} bytes)"
            ),
            Some("prompt_too_long"),
        )
    }
    /// The server refused work to stay responsive (too many connections, or too many
    /// requests in flight on one connection).
    pub fn busy(message: impl Into<String>) -> Self {
        Self::new(BUSY, message, Some("busy"))
    }
    pub fn unauthorized() -> Self {
        Self::new(UNAUTHORIZED, "missing or wrong token", Some("unauthorized"))
    }

    /// The JSON-RPC `error` object.
    pub fn to_json(&self) -> Value {
        match self.kind {
            Some(kind) => {
                json!({ "code": self.code, "message": self.message, "data": { "kind": kind } })
            }
            None => json!({ "code": self.code, "message": self.message }),
        }
    }

    pub fn to_lsp(&self) -> tower_lsp::jsonrpc::Error {
        tower_lsp::jsonrpc::Error {
            code: tower_lsp::jsonrpc::ErrorCode::from(self.code),
            message: self.message.clone().into(),
            data: self.kind.map(|kind| json!({ "kind": kind })),
        }
    }
}

impl From<&lens_core::Error> for RpcError {
    fn from(e: &lens_core::Error) -> Self {
        use lens_core::Error as E;
        match e {
            E::EmptyPrompt => RpcError::empty_text(),
            E::Stopped => RpcError::cancelled(),
            E::PromptTooLong { tokens, context } => RpcError::prompt_too_long(*tokens, *context),
            E::PositionOutOfRange { .. } | E::Positions(_) => RpcError::out_of_range(e.to_string()),
            E::NonFinite { .. } => Self::new(NON_FINITE, e.to_string(), Some("non_finite")),
            E::LayerOutOfRange { .. } | E::TokenOutOfRange { .. } | E::Layers(_) => {
                RpcError::invalid_params(e.to_string())
            }
            _ => RpcError::model(e.to_string()),
        }
    }
}

impl From<lens_core::Error> for RpcError {
    fn from(e: lens_core::Error) -> Self {
        RpcError::from(&e)
    }
}
