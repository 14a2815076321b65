/// Why a model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a GGUF file or an HF model folder (config.json + *.safetensors + tokenizer.json)")]
    NotAModel { path: String },
    #[error("{path} is truncated: {detail}")]
    Truncated { path: String, detail: String },
    #[error(
        "unsupported architecture `{0}` (this backend knows: {known})",
        known = crate::model::ARCHITECTURES.join(", ")
    )]
    UnsupportedArchitecture(String),
    /// A load option this backend cannot honour.
    #[error("{0}")]
    Option(String),
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("malformed model file: {0}")]
    Format(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("stopped before it finished")]
    Stopped,
}

impl From<Error> for lens_core::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Stopped => lens_core::Error::Stopped,
            e => lens_core::Error::Backend(e.to_string()),
        }
    }
}
