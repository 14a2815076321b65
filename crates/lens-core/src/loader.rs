//! How backends are found: each backend crate exports one [`Loader`]; the binary collects the
//! loaders compiled in (cargo features) into a [`Registry`] and picks one by name or by what
//! it accepts. Nothing outside that one place names a backend crate.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::{Backend, Error};

/// How the weights are used in the matrix products.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Precision {
    /// Every weight dequantized to f32 and multiplied in f32: the reference numbers.
    #[default]
    F32,
    /// The backend's quantized kernels (e.g. ggml blocks multiplied as stored): faster, not
    /// the reference numbers.
    Fast,
    /// bfloat16 weights and activations, where a backend has them.
    Bf16,
    /// float16 weights and activations, where a backend has them.
    F16,
}

impl Precision {
    pub const ALL: [Precision; 4] = [
        Precision::F32,
        Precision::Fast,
        Precision::Bf16,
        Precision::F16,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Fast => "fast",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Precision::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!("unknown precision `{s}`: use f32, fast, bf16 or f16"))
    }
}

/// In-situ quantization: an unquantized model's linear layers quantized to a GGML block type
/// as it loads (mistral.rs's ISQ), so that safetensors run on the quantized kernels a GGUF
/// file would.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isq {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
}

impl Isq {
    pub const ALL: [Isq; 10] = [
        Isq::Q4_0,
        Isq::Q4_1,
        Isq::Q5_0,
        Isq::Q5_1,
        Isq::Q8_0,
        Isq::Q2K,
        Isq::Q3K,
        Isq::Q4K,
        Isq::Q5K,
        Isq::Q6K,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Isq::Q4_0 => "q4_0",
            Isq::Q4_1 => "q4_1",
            Isq::Q5_0 => "q5_0",
            Isq::Q5_1 => "q5_1",
            Isq::Q8_0 => "q8_0",
            Isq::Q2K => "q2k",
            Isq::Q3K => "q3k",
            Isq::Q4K => "q4k",
            Isq::Q5K => "q5k",
            Isq::Q6K => "q6k",
        }
    }
}

impl fmt::Display for Isq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Isq {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.to_ascii_lowercase().replace("_k", "k");
        Isq::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| {
                let all: Vec<&str> = Isq::ALL.iter().map(|t| t.as_str()).collect();
                format!("unknown ISQ type `{s}`: use {}", all.join(", "))
            })
    }
}

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Device {
    #[default]
    Cpu,
    /// A CUDA GPU by ordinal.
    Cuda(usize),
    /// An Apple GPU by ordinal.
    Metal(usize),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
            Device::Metal(i) => write!(f, "metal:{i}"),
        }
    }
}

impl FromStr for Device {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, ordinal) = match s.split_once(':') {
            Some((k, n)) => (
                k,
                n.parse::<usize>()
                    .map_err(|_| format!("`{n}` is not a device number in `{s}`"))?,
            ),
            None => (s, 0),
        };
        match (kind, s.contains(':')) {
            ("cpu", false) => Ok(Device::Cpu),
            ("cuda", _) => Ok(Device::Cuda(ordinal)),
            ("metal", _) => Ok(Device::Metal(ordinal)),
            _ => Err(format!(
                "unknown device `{s}`: use cpu, cuda, cuda:N, metal or metal:N"
            )),
        }
    }
}

impl Device {
    /// The device family (`cuda:1` and `cuda:0` are both `cuda`), as capabilities list it.
    pub fn family(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda(_) => "cuda",
            Device::Metal(_) => "metal",
        }
    }
}

/// What a loader is asked to do besides reading the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LoadOptions {
    pub precision: Precision,
    pub device: Device,
    /// Worker threads for the backend's parallel work; `None` = one per core.
    pub threads: Option<usize>,
    /// Quantize an unquantized model's linear layers as it loads (where a backend can).
    pub isq: Option<Isq>,
}

/// The kinds of model source a loader may accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceKind {
    /// One GGUF file.
    Gguf,
    /// An HF-style folder: `config.json`, `*.safetensors`, `tokenizer.json`.
    HfFolder,
    /// A model a backend knows by name (resolved by the backend itself).
    Named,
}

impl SourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Gguf => "gguf",
            SourceKind::HfFolder => "hf-folder",
            SourceKind::Named => "named",
        }
    }
}

/// A model to load. Telling a GGUF file from a folder takes IO, which happens where models are
/// chosen (the binary's `backends::source`), not here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Gguf(PathBuf),
    HfFolder(PathBuf),
    Named(String),
}

impl Source {
    pub fn kind(&self) -> SourceKind {
        match self {
            Source::Gguf(_) => SourceKind::Gguf,
            Source::HfFolder(_) => SourceKind::HfFolder,
            Source::Named(_) => SourceKind::Named,
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Gguf(p) => write!(f, "the GGUF file {}", p.display()),
            Source::HfFolder(p) => write!(f, "the HF folder {}", p.display()),
            Source::Named(n) => write!(f, "the model `{n}`"),
        }
    }
}

/// What one loader offers in this build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    pub sources: Vec<SourceKind>,
    /// Device families compiled in (`Device::Cuda(0)` stands for every CUDA ordinal).
    pub devices: Vec<Device>,
    pub precisions: Vec<Precision>,
    /// Architectures as model files name them (`llama`, `qwen2`, ...).
    pub architectures: Vec<&'static str>,
    /// Whether it quantizes unquantized models as they load ([`LoadOptions::isq`]).
    pub isq: bool,
}

impl Capabilities {
    /// The one clear reason `source`/`options` are outside these capabilities, if they are.
    pub fn refuse(&self, name: &str, source: &Source, options: &LoadOptions) -> Option<String> {
        let list = |v: Vec<&str>| v.join(", ");
        if !self.sources.contains(&source.kind()) {
            return Some(format!(
                "the {name} backend cannot load {source}: it reads {}",
                list(self.sources.iter().map(|s| s.as_str()).collect())
            ));
        }
        if !self
            .devices
            .iter()
            .any(|d| d.family() == options.device.family())
        {
            return Some(format!(
                "the {name} backend in this build runs on {}, not {}{}",
                list(self.devices.iter().map(|d| d.family()).collect()),
                options.device,
                match options.device {
                    Device::Cpu => "",
                    _ => " (rebuild with that device's cargo feature)",
                }
            ));
        }
        if let (Some(isq), false) = (options.isq, self.isq) {
            return Some(format!(
                "the {name} backend has no in-situ quantization (--isq {isq})"
            ));
        }
        if options.isq.is_some() && source.kind() != SourceKind::HfFolder {
            return Some(format!(
                "--isq quantizes an HF folder as it loads; {source} is not one (a GGUF file is \
                 quantized already)"
            ));
        }
        if !self.precisions.contains(&options.precision) {
            return Some(format!(
                "the {name} backend has no {} precision (it offers {})",
                options.precision,
                list(self.precisions.iter().map(|p| p.as_str()).collect())
            ));
        }
        None
    }
}

/// One backend's entry point: a name, what it offers, and `load`. Object-safe; each backend
/// crate exports one, and the binary registers it behind a cargo feature.
pub trait Loader: Send + Sync {
    /// The name on the command line (`--backend candle`).
    fn name(&self) -> &'static str;

    fn capabilities(&self) -> Capabilities;

    /// How the backend runs the model, in a few words (`logit-lens backends`): one process
    /// unless it says otherwise (a pipeline over several processes, ...).
    fn mode(&self) -> &'static str {
        ONE_PROCESS
    }

    /// `Ok` when [`Loader::load`] can honour `source` and `options` (as far as can be told
    /// before reading the model); otherwise [`Error::Unsupported`] saying why. The default
    /// checks [`Loader::capabilities`].
    fn supports(&self, source: &Source, options: &LoadOptions) -> Result<(), Error> {
        match self.capabilities().refuse(self.name(), source, options) {
            Some(why) => Err(Error::Unsupported(why)),
            None => Ok(()),
        }
    }

    /// Load the model. An option the backend cannot honour is an error, never ignored.
    fn load(&self, source: &Source, options: &LoadOptions) -> Result<Box<dyn Backend>, Error>;
}

/// [`Loader::mode`] of a backend that runs the model in the calling process.
pub const ONE_PROCESS: &str = "one process";

/// The loaders compiled into a program, in order of preference.
#[derive(Default)]
pub struct Registry {
    loaders: Vec<&'static dyn Loader>,
}

impl Registry {
    pub fn new(loaders: Vec<&'static dyn Loader>) -> Registry {
        Registry { loaders }
    }

    pub fn loaders(&self) -> &[&'static dyn Loader] {
        &self.loaders
    }

    /// The loader named `name`, or with `None` or `"auto"` the first that supports `source`
    /// with `options`.
    pub fn pick(
        &self,
        name: Option<&str>,
        source: &Source,
        options: &LoadOptions,
    ) -> Result<&'static dyn Loader, Error> {
        match name.filter(|n| *n != "auto") {
            Some(name) => {
                let loader = self
                    .loaders
                    .iter()
                    .find(|l| l.name() == name)
                    .ok_or_else(|| {
                        Error::Unsupported(format!(
                            "unknown backend `{name}`: this build has {}",
                            self.names()
                        ))
                    })?;
                loader.supports(source, options)?;
                Ok(*loader)
            }
            None => {
                let mut reasons = Vec::new();
                for loader in &self.loaders {
                    match loader.supports(source, options) {
                        Ok(()) => return Ok(*loader),
                        Err(e) => reasons.push(e.to_string()),
                    }
                }
                Err(Error::Unsupported(match reasons.len() {
                    0 => "this build has no backend".to_string(),
                    1 => reasons.remove(0),
                    _ => format!("no backend can: {}", reasons.join("; ")),
                }))
            }
        }
    }

    /// Pick a loader ([`Registry::pick`]) and load.
    pub fn load(
        &self,
        name: Option<&str>,
        source: &Source,
        options: &LoadOptions,
    ) -> Result<Box<dyn Backend>, Error> {
        self.pick(name, source, options)?.load(source, options)
    }

    /// `auto` and every loader's name, for messages and `--help`.
    pub fn names(&self) -> String {
        let mut names = vec!["auto"];
        names.extend(self.loaders.iter().map(|l| l.name()));
        names.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check<T: FromStr<Err = String> + fmt::Debug>(s: &str, expect: &str) {
        let got = match s.parse::<T>() {
            Ok(v) => format!("{v:?}"),
            Err(e) => format!("error: {e}"),
        };
        assert_eq!(got, expect, "{s:?}");
    }

    #[test]
    fn devices_and_precisions_parse() {
        check::<Device>("cpu", "Cpu");
        check::<Device>("cuda", "Cuda(0)");
        check::<Device>("cuda:3", "Cuda(3)");
        check::<Device>("metal", "Metal(0)");
        check::<Device>(
            "cpu:1",
            "error: unknown device `cpu:1`: use cpu, cuda, cuda:N, metal or metal:N",
        );
        check::<Device>("cuda:x", "error: `x` is not a device number in `cuda:x`");
        check::<Device>(
            "tpu",
            "error: unknown device `tpu`: use cpu, cuda, cuda:N, metal or metal:N",
        );
        check::<Precision>("f32", "F32");
        check::<Precision>("fast", "Fast");
        check::<Precision>("bf16", "Bf16");
        check::<Precision>(
            "int4",
            "error: unknown precision `int4`: use f32, fast, bf16 or f16",
        );
        for d in ["cpu", "cuda:0", "metal:2"] {
            assert_eq!(d.parse::<Device>().map(|d| d.to_string()), Ok(d.into()));
        }
        check::<Isq>("q8_0", "Q8_0");
        check::<Isq>("Q4_K", "Q4K");
        check::<Isq>(
            "q9",
            "error: unknown ISQ type `q9`: use q4_0, q4_1, q5_0, q5_1, q8_0, q2k, q3k, q4k, q5k, q6k",
        );
    }

    #[test]
    fn capabilities_refuse_with_one_reason() {
        let caps = Capabilities {
            sources: vec![SourceKind::Gguf],
            devices: vec![Device::Cpu],
            precisions: vec![Precision::F32, Precision::Fast],
            architectures: vec!["llama"],
            isq: false,
        };
        let gguf = Source::Gguf("m.gguf".into());
        let opts = |precision, device| LoadOptions {
            precision,
            device,
            ..LoadOptions::default()
        };
        let check = |source: &Source, o: LoadOptions, expect: Option<&str>| {
            assert_eq!(caps.refuse("x", source, &o).as_deref(), expect);
        };
        check(&gguf, opts(Precision::F32, Device::Cpu), None);
        check(&gguf, opts(Precision::Fast, Device::Cpu), None);
        check(
            &gguf,
            LoadOptions {
                isq: Some(Isq::Q8_0),
                ..LoadOptions::default()
            },
            Some("the x backend has no in-situ quantization (--isq q8_0)"),
        );
        check(
            &Source::HfFolder("dir".into()),
            opts(Precision::F32, Device::Cpu),
            Some("the x backend cannot load the HF folder dir: it reads gguf"),
        );
        check(
            &gguf,
            opts(Precision::F32, Device::Cuda(1)),
            Some("the x backend in this build runs on cpu, not cuda:1 (rebuild with that device's cargo feature)"),
        );
        check(
            &gguf,
            opts(Precision::Bf16, Device::Cpu),
            Some("the x backend has no bf16 precision (it offers f32, fast)"),
        );
    }
}
