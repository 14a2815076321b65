//! A small GGUF writer for tests and fixtures: builds headers exactly as asked, including
//! ones no valid file has (the numbers are written as given, never checked).

/// A value of the metadata.
#[derive(Debug, Clone)]
pub enum Value {
    U32(u32),
    F32(f32),
    Str(String),
    /// An array of strings.
    Strs(Vec<String>),
    /// Raw bytes after the type number (for crafted values).
    Raw(u32, Vec<u8>),
}

/// A tensor entry; `data` is appended in order after the aligned data start.
#[derive(Debug, Clone)]
pub struct Tensor {
    pub name: String,
    pub dims: Vec<u64>,
    pub dtype: u32,
    /// `None`: the next aligned offset after the previous tensor.
    pub offset: Option<u64>,
    pub data: Vec<u8>,
}

/// A GGUF file being built.
#[derive(Debug, Clone, Default)]
pub struct Gguf {
    pub keys: Vec<(String, Value)>,
    pub tensors: Vec<Tensor>,
    /// Overrides of the counts written (crafted files).
    pub tensor_count: Option<u64>,
    pub key_count: Option<u64>,
}

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

impl Gguf {
    pub fn key(mut self, k: &str, v: Value) -> Self {
        self.keys.push((k.into(), v));
        self
    }

    /// An f32 tensor of `dims` holding `values`.
    pub fn f32(mut self, name: &str, dims: &[u64], values: &[f32]) -> Self {
        self.tensors.push(Tensor {
            name: name.into(),
            dims: dims.to_vec(),
            dtype: 0,
            offset: None,
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        });
        self
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend_from_slice(&3u32.to_le_bytes());
        let tensors = self.tensor_count.unwrap_or(self.tensors.len() as u64);
        let keys = self.key_count.unwrap_or(self.keys.len() as u64);
        out.extend_from_slice(&tensors.to_le_bytes());
        out.extend_from_slice(&keys.to_le_bytes());
        for (k, v) in &self.keys {
            string(&mut out, k);
            match v {
                Value::U32(x) => {
                    out.extend_from_slice(&4u32.to_le_bytes());
                    out.extend_from_slice(&x.to_le_bytes());
                }
                Value::F32(x) => {
                    out.extend_from_slice(&6u32.to_le_bytes());
                    out.extend_from_slice(&x.to_le_bytes());
                }
                Value::Str(s) => {
                    out.extend_from_slice(&8u32.to_le_bytes());
                    string(&mut out, s);
                }
                Value::Strs(v) => {
                    out.extend_from_slice(&9u32.to_le_bytes());
                    out.extend_from_slice(&8u32.to_le_bytes());
                    out.extend_from_slice(&(v.len() as u64).to_le_bytes());
                    for s in v {
                        string(&mut out, s);
                    }
                }
                Value::Raw(ty, bytes) => {
                    out.extend_from_slice(&ty.to_le_bytes());
                    out.extend_from_slice(bytes);
                }
            }
        }
        let mut next = 0u64;
        let mut offsets = Vec::new();
        for t in &self.tensors {
            string(&mut out, &t.name);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.dtype.to_le_bytes());
            let offset = t.offset.unwrap_or(next);
            out.extend_from_slice(&offset.to_le_bytes());
            offsets.push(next);
            next = (next + t.data.len() as u64).next_multiple_of(32);
        }
        out.resize(out.len().next_multiple_of(32), 0);
        let start = out.len();
        for (t, off) in self.tensors.iter().zip(offsets) {
            out.resize(start + off as usize, 0);
            out.extend_from_slice(&t.data);
        }
        out
    }
}
