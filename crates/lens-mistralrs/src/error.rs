/// What can go wrong loading or running a model through mistral.rs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Format(String),
    #[error("the {0} architecture is not supported by the mistralrs backend's capture forward")]
    UnsupportedArchitecture(String),
    /// An option this backend cannot honour.
    #[error("{0}")]
    Option(String),
    /// mistral.rs itself failed (or panicked, which is contained and reported here).
    #[error("mistral.rs: {0}")]
    Engine(String),
    #[error("stopped before it finished")]
    Stopped,
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
}

impl From<Error> for lens_core::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Option(why) => lens_core::Error::Unsupported(why),
            Error::Stopped => lens_core::Error::Stopped,
            e => lens_core::Error::Backend(e.to_string()),
        }
    }
}
