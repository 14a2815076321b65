//! The messages between the daemon's backend and rank 0 (over a local socket, each framed by
//! its length) and between the ranks (over MPI, the same bytes): little-endian numbers,
//! strings and vectors prefixed by their length. Floats cross bit for bit.

use std::io::{Read, Write};

use lens_core::{Cell, LensKind, ModelInfo, NextToken, PositionView, Prediction, Site, Token};

use crate::Error;

/// What the daemon asks of the job (rank 0 hands the forward and lens requests to every rank).
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    Tokenize(String),
    /// Run `tokens` and keep the states under `id`, reusing the states kept under `prefix`
    /// for the tokens both prompts share; then drop the states of `free`.
    Forward {
        id: u64,
        prefix: Option<u64>,
        tokens: Vec<u32>,
        free: Vec<u64>,
    },
    /// The lens of the states kept under `id`.
    Lens {
        id: u64,
        positions: Vec<usize>,
        sites: Vec<usize>,
        kind: LensKind,
        top_k: usize,
    },
    Shutdown,
}

/// Rank 0's answer to a [`Request`] (the job's first message is [`Reply::Hello`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Hello {
        info: ModelInfo,
        /// Each rank's blocks, `[start, end)`.
        stages: Vec<(usize, usize)>,
        /// Every token of the vocabulary decoded on its own.
        vocab: Vec<String>,
    },
    Tokens(Vec<Token>),
    /// The forward ran; the bytes of keys and values the ranks keep for it.
    Forwarded {
        kv_bytes: u64,
    },
    Views(Vec<PositionView>),
    Failed(String),
}

/// Write one frame: its length (u32, little-endian), then the bytes.
pub fn write_frame(w: &mut impl Write, bytes: &[u8]) -> std::io::Result<()> {
    let n = u32::try_from(bytes.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "frame too large"))?;
    w.write_all(&n.to_le_bytes())?;
    w.write_all(bytes)?;
    w.flush()
}

/// Read one frame written by [`write_frame`] (at most `max` bytes).
pub fn read_frame(r: &mut impl Read, max: usize) -> std::io::Result<Vec<u8>> {
    let mut n = [0u8; 4];
    r.read_exact(&mut n)?;
    let n = u32::from_le_bytes(n) as usize;
    if n > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a frame of {n} bytes is over the limit of {max}"),
        ));
    }
    let mut bytes = vec![0u8; n];
    r.read_exact(&mut bytes)?;
    Ok(bytes)
}

#[derive(Default)]
pub struct Enc(pub Vec<u8>);

impl Enc {
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn usize(&mut self, v: usize) -> &mut Self {
        self.u64(v as u64)
    }
    pub fn f32(&mut self, v: f32) -> &mut Self {
        self.u32(v.to_bits())
    }
    pub fn f64(&mut self, v: f64) -> &mut Self {
        self.u64(v.to_bits())
    }
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.usize(s.len());
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    fn seq<T>(&mut self, items: &[T], mut each: impl FnMut(&mut Self, &T)) -> &mut Self {
        self.usize(items.len());
        for item in items {
            each(self, item);
        }
        self
    }
}

pub struct Dec<'a> {
    bytes: &'a [u8],
}

impl<'a> Dec<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Dec { bytes }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        if self.bytes.len() < n {
            return Err(Error::Protocol("a message ended early".into()));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], Error> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    pub fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.array::<1>()?[0])
    }
    pub fn u32(&mut self) -> Result<u32, Error> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub fn u64(&mut self) -> Result<u64, Error> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    pub fn usize(&mut self) -> Result<usize, Error> {
        usize::try_from(self.u64()?).map_err(|_| Error::Protocol("a length overflows".into()))
    }
    pub fn f32(&mut self) -> Result<f32, Error> {
        Ok(f32::from_bits(self.u32()?))
    }
    pub fn f64(&mut self) -> Result<f64, Error> {
        Ok(f64::from_bits(self.u64()?))
    }
    pub fn str(&mut self) -> Result<String, Error> {
        let n = self.usize()?;
        String::from_utf8(self.take(n)?.to_vec())
            .map_err(|_| Error::Protocol("a string is not UTF-8".into()))
    }
    /// A count of items, each at least `min` bytes (so a corrupt count cannot allocate).
    fn count(&mut self, min: usize) -> Result<usize, Error> {
        let n = self.usize()?;
        match n.checked_mul(min.max(1)) {
            Some(b) if b <= self.bytes.len() => Ok(n),
            _ => Err(Error::Protocol("a count exceeds the message".into())),
        }
    }
    fn seq<T>(
        &mut self,
        min: usize,
        mut each: impl FnMut(&mut Self) -> Result<T, Error>,
    ) -> Result<Vec<T>, Error> {
        let n = self.count(min)?;
        (0..n).map(|_| each(self)).collect()
    }
    pub fn end(&self) -> Result<(), Error> {
        match self.bytes.is_empty() {
            true => Ok(()),
            false => Err(Error::Protocol("a message has trailing bytes".into())),
        }
    }
}

fn kind_code(kind: LensKind) -> u8 {
    match kind {
        LensKind::Norm => 0,
        LensKind::Raw => 1,
        // Refused before it is sent (the ranks hold no translators).
        LensKind::Tuned => 2,
    }
}

impl Request {
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        match self {
            Request::Tokenize(text) => {
                e.u8(0).str(text);
            }
            Request::Forward {
                id,
                prefix,
                tokens,
                free,
            } => {
                e.u8(1).u64(*id).u64(prefix.map_or(0, |p| p + 1));
                e.seq(tokens, |e, t| {
                    e.u32(*t);
                });
                e.seq(free, |e, f| {
                    e.u64(*f);
                });
            }
            Request::Lens {
                id,
                positions,
                sites,
                kind,
                top_k,
            } => {
                e.u8(2).u64(*id).u8(kind_code(*kind)).usize(*top_k);
                e.seq(positions, |e, p| {
                    e.usize(*p);
                });
                e.seq(sites, |e, s| {
                    e.usize(*s);
                });
            }
            Request::Shutdown => {
                e.u8(3);
            }
        }
        e.0
    }

    pub fn decode(bytes: &[u8]) -> Result<Request, Error> {
        let mut d = Dec::new(bytes);
        let r = match d.u8()? {
            0 => Request::Tokenize(d.str()?),
            1 => Request::Forward {
                id: d.u64()?,
                prefix: d.u64()?.checked_sub(1),
                tokens: d.seq(4, Dec::u32)?,
                free: d.seq(8, Dec::u64)?,
            },
            2 => {
                let id = d.u64()?;
                let kind = match d.u8()? {
                    0 => LensKind::Norm,
                    1 => LensKind::Raw,
                    k => return Err(Error::Protocol(format!("unknown lens kind {k}"))),
                };
                Request::Lens {
                    id,
                    kind,
                    top_k: d.usize()?,
                    positions: d.seq(8, Dec::usize)?,
                    sites: d.seq(8, Dec::usize)?,
                }
            }
            3 => Request::Shutdown,
            t => return Err(Error::Protocol(format!("unknown request {t}"))),
        };
        d.end()?;
        Ok(r)
    }
}

impl Reply {
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        match self {
            Reply::Hello {
                info,
                stages,
                vocab,
            } => {
                e.u8(0)
                    .str(&info.name)
                    .str(&info.architecture)
                    .usize(info.n_layers)
                    .usize(info.hidden_size)
                    .usize(info.vocab_size)
                    .usize(info.context_length)
                    .str(&info.precision);
                e.seq(stages, |e, (a, b)| {
                    e.usize(*a).usize(*b);
                });
                e.seq(vocab, |e, v| {
                    e.str(v);
                });
            }
            Reply::Tokens(tokens) => {
                e.u8(1).seq(tokens, |e, t| {
                    e.u32(t.id).str(&t.text).usize(t.start).usize(t.end);
                });
            }
            Reply::Forwarded { kv_bytes } => {
                e.u8(2).u64(*kv_bytes);
            }
            Reply::Views(views) => {
                e.u8(3);
                encode_views(&mut e, views);
            }
            Reply::Failed(why) => {
                e.u8(4).str(why);
            }
        }
        e.0
    }

    pub fn decode(bytes: &[u8]) -> Result<Reply, Error> {
        let mut d = Dec::new(bytes);
        let r = match d.u8()? {
            0 => Reply::Hello {
                info: ModelInfo {
                    name: d.str()?,
                    architecture: d.str()?,
                    n_layers: d.usize()?,
                    hidden_size: d.usize()?,
                    vocab_size: d.usize()?,
                    context_length: d.usize()?,
                    precision: d.str()?,
                },
                stages: d.seq(16, |d| Ok((d.usize()?, d.usize()?)))?,
                vocab: d.seq(8, Dec::str)?,
            },
            1 => Reply::Tokens(d.seq(28, |d| {
                Ok(Token {
                    id: d.u32()?,
                    text: d.str()?,
                    start: d.usize()?,
                    end: d.usize()?,
                })
            })?),
            2 => Reply::Forwarded { kv_bytes: d.u64()? },
            3 => Reply::Views(decode_views(&mut d)?),
            4 => Reply::Failed(d.str()?),
            t => return Err(Error::Protocol(format!("unknown reply {t}"))),
        };
        d.end()?;
        Ok(r)
    }
}

fn prediction(e: &mut Enc, p: &Prediction) {
    e.u32(p.id).f32(p.logit).f32(p.prob);
}

fn read_prediction(d: &mut Dec<'_>) -> Result<Prediction, Error> {
    Ok(Prediction {
        id: d.u32()?,
        logit: d.f32()?,
        prob: d.f32()?,
    })
}

/// Position views (only layer sites: the pipeline captures no mid-block rows).
pub fn encode_views(e: &mut Enc, views: &[PositionView]) {
    e.seq(views, |e, v| {
        e.usize(v.position).u32(v.token);
        prediction(e, &v.final_top1);
        e.u64(v.decided_at.map_or(0, |l| l as u64 + 1));
        e.seq(&v.cells, |e, c| {
            let (Site::Layer(l) | Site::MidBlock(l)) = c.site;
            e.u8(u8::from(matches!(c.site, Site::MidBlock(_)))).usize(l);
            e.seq(&c.top, prediction);
            e.f64(c.entropy).f64(c.kl_to_final);
            match &c.next {
                Some(n) => e.u8(1).u32(n.id).usize(n.rank).f32(n.prob),
                None => e.u8(0),
            };
            e.usize(c.final_top1_rank).f32(c.final_top1_prob);
        });
    });
}

pub fn decode_views(d: &mut Dec<'_>) -> Result<Vec<PositionView>, Error> {
    d.seq(36, |d| {
        Ok(PositionView {
            position: d.usize()?,
            token: d.u32()?,
            final_top1: read_prediction(d)?,
            decided_at: d.usize()?.checked_sub(1),
            cells: d.seq(40, |d| {
                let mid = d.u8()? == 1;
                let l = d.usize()?;
                Ok(Cell {
                    site: if mid {
                        Site::MidBlock(l)
                    } else {
                        Site::Layer(l)
                    },
                    top: d.seq(12, read_prediction)?,
                    entropy: d.f64()?,
                    kl_to_final: d.f64()?,
                    next: match d.u8()? {
                        1 => Some(NextToken {
                            id: d.u32()?,
                            rank: d.usize()?,
                            prob: d.f32()?,
                        }),
                        _ => None,
                    },
                    final_top1_rank: d.usize()?,
                    final_top1_prob: d.f32()?,
                })
            })?,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check_request(r: Request) {
        assert_eq!(Request::decode(&r.encode()).expect("decodes"), r);
    }

    #[track_caller]
    fn check_reply(r: Reply) {
        assert_eq!(Reply::decode(&r.encode()).expect("decodes"), r);
    }

    #[test]
    fn messages_round_trip_bit_for_bit() {
        check_request(Request::Tokenize("héllo".into()));
        check_request(Request::Forward {
            id: 7,
            prefix: Some(0),
            tokens: vec![1, 2, u32::MAX],
            free: vec![3, 4],
        });
        check_request(Request::Forward {
            id: 1,
            prefix: None,
            tokens: vec![5],
            free: vec![],
        });
        check_request(Request::Lens {
            id: 2,
            positions: vec![0, 9],
            sites: vec![0, 30],
            kind: LensKind::Raw,
            top_k: 5,
        });
        check_request(Request::Shutdown);
        let cell = Cell {
            site: Site::Layer(3),
            top: vec![Prediction {
                id: 9,
                logit: -1.5e-30,
                prob: 0.25,
            }],
            entropy: 1.0 / 3.0,
            kl_to_final: f64::MIN_POSITIVE,
            next: Some(NextToken {
                id: 4,
                rank: 17,
                prob: 1e-9,
            }),
            final_top1_rank: 2,
            final_top1_prob: f32::EPSILON,
        };
        check_reply(Reply::Views(vec![PositionView {
            position: 3,
            token: 11,
            final_top1: Prediction {
                id: 9,
                logit: 2.0,
                prob: 0.5,
            },
            decided_at: Some(0),
            cells: vec![cell.clone(), Cell { next: None, ..cell }],
        }]));
        check_reply(Reply::Failed("rank 1: boom".into()));
        check_reply(Reply::Forwarded { kv_bytes: 1 << 40 });
        check_reply(Reply::Tokens(vec![Token {
            id: 1,
            text: "a".into(),
            start: 0,
            end: 1,
        }]));
    }

    #[test]
    fn corrupt_messages_are_errors_not_panics() {
        let good = Request::Forward {
            id: 1,
            prefix: None,
            tokens: vec![5, 6],
            free: vec![],
        }
        .encode();
        for cut in 0..good.len() {
            assert!(Request::decode(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut huge = vec![1u8];
        huge.extend(1u64.to_le_bytes());
        huge.extend(0u64.to_le_bytes());
        huge.extend(u64::MAX.to_le_bytes());
        assert!(Request::decode(&huge).is_err());
    }
}
