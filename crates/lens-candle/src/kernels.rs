//! Exact f32 products of a few activation rows with a weight matrix, read in its own layout.
//!
//! candle multiplies through `gemm`, which packs its operands first: for the one or two new
//! tokens of an edit, or the 31 rows of a one-position lens, the packing of a weight matrix costs
//! more than the product. These kernels take the weights as stored (`[n, k]` row-major, f32 or
//! ggml blocks) and the rows as `[m, k]`, and produce `[m, n]` with every product and sum in
//! f32: quantized weights are dequantized on the fly to exactly the values candle's
//! `dequantize` gives (Q4_1: `q·d + m` with one rounding; Q8_0 and Q5_0: `q·d`, exact; Q4_K:
//! `(d·sc)·q - dmin·m`; Q6_K: `(d·sc)·q`, candle's order of operations), so the results differ
//! from the dense path only in the order of the sums.
//!
//! The code is plain safe Rust over `[f32; 8]` lanes, which LLVM turns into AVX2/FMA
//! instructions under the workspace's `target-cpu=x86-64-v3` (and into correct, slower code
//! elsewhere). Where the CPU has AVX-512, every quantized matrix is instead repacked at load
//! into the panels of [`panels`], which take products of any size (a prompt's forward pass
//! too) and make the dense f32 copy unnecessary.

use candle_core::{Storage, Tensor};
use lens_core::Stop;
use rayon::prelude::*;

/// Weight rows per parallel task.
const TILE: usize = 64;

/// Up to this many rows, Q4_1 blocks by rows (CPUs without AVX-512, where Q4_1 is not in
/// panels) are dequantized in registers for each use; more rows share a dequantized copy of
/// each group of weight rows. Measured on SmolLM2's forward pass of t new tokens after a cached
/// prefix (2 cores), in registers vs shared: t = 1: 11 vs 19 ms, 3: 21 vs 25 ms, 4: 28 vs
/// 28 ms, 8: 51 vs 35 ms.
const FUSED_ROWS: usize = 3;

/// Below this many multiply-adds a product runs on the calling thread.
const PARALLEL_MIN: usize = 1 << 17;

/// A weight matrix `[n, k]` in a layout the kernels read directly.
pub(crate) enum Weights {
    /// f32, row-major: a dense candle tensor, read in place.
    F32(Tensor),
    /// ggml Q4_1, repacked: per block of 32 a scale, a minimum and 16 bytes of nibbles (low
    /// nibbles are elements 0..16, high nibbles 16..32).
    Q4_1 {
        scale: Vec<f32>,
        min: Vec<f32>,
        qs: Vec<[u8; 16]>,
    },
    /// ggml Q8_0, repacked: per block of 32 a scale and 32 signed bytes.
    Q8_0 { scale: Vec<f32>, qs: Vec<[i8; 32]> },
    /// ggml blocks in panels of [`panels::WIDTH`] weight rows, for the AVX-512 kernel (where the
    /// CPU has it): per panel, `qs[k][WIDTH]` (weight `j` of input `i` at `i·WIDTH + j`, one
    /// byte each), `scale[k / group][WIDTH]` and, for the types with an offset (Q4_1, Q4_K),
    /// `min` in the same layout (else empty): weight = `q·scale (+ min)`. A last partial panel
    /// is padded with zero rows.
    #[cfg(target_arch = "x86_64")]
    Panels {
        scale: Vec<f32>,
        min: Vec<f32>,
        qs: Vec<i8>,
        group: usize,
    },
    /// Other ggml blocks as stored (each weight row a whole number of blocks), dequantized a
    /// few rows at a time.
    Blocks { kind: BlockKind, raw: Vec<u8> },
}

/// The ggml blocks the kernels read: their layouts, in one place.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum BlockKind {
    /// `d: f16, qs: [i8; 32]`: weights `q·d`.
    Q8_0,
    /// `d: f16, m: f16, qs: [u8; 16]` (low nibbles are elements 0..16, high nibbles
    /// 16..32): weights `q·d + m`.
    Q4_1,
    /// `d: f16, qh: [u8; 4], qs: [u8; 16]`: weights `(q - 16)·d`, q of 5 bits.
    Q5_0,
    /// 256 weights in 8 groups of 32, `(d·sc)·q - dmin·m` with 6-bit scales and minimums.
    Q4K,
    /// 256 weights in 16 groups of 16, `(d·sc)·(q - 32)`, q of 6 bits.
    Q6K,
}

impl BlockKind {
    /// (weights, bytes) per block.
    fn size(self) -> (usize, usize) {
        match self {
            BlockKind::Q8_0 => (32, 34),
            BlockKind::Q4_1 => (32, 20),
            BlockKind::Q5_0 => (32, 22),
            BlockKind::Q4K => (256, 144),
            BlockKind::Q6K => (256, 210),
        }
    }

    /// Weights per scale.
    fn group(self) -> usize {
        match self {
            BlockKind::Q6K => 16,
            _ => 32,
        }
    }

    fn has_min(self) -> bool {
        matches!(self, BlockKind::Q4_1 | BlockKind::Q4K)
    }

    /// Whether `raw` holds an `[n, k]` matrix of these blocks: a whole number of blocks per
    /// row, and nothing more or less.
    fn fits(self, n: usize, k: usize, raw: &[u8]) -> bool {
        let (elems, bytes) = self.size();
        n > 0 && k > 0 && k.is_multiple_of(elems) && raw.len() == n * (k / elems) * bytes
    }

    /// One raw block as integers and, per group, a scale and an offset, such that weight
    /// `i` is `q[i]·scale[i / group] + min[i / group]` with candle's values and rounding:
    /// `q·scale` is exact in f32 but for Q6_K, whose one rounding is candle's too (it
    /// multiplies `d·sc` by q), and `+ min` is candle's one rounding of Q4_1 (`+ m`) and
    /// Q4_K (`- dmin·m`).
    fn decode(self, b: &[u8], q: &mut [i8; 256], scale: &mut [f32; 16], min: &mut [f32; 16]) {
        match self {
            BlockKind::Q8_0 => {
                scale[0] = f16(b[0], b[1]);
                for (q, &v) in q.iter_mut().zip(&b[2..34]) {
                    *q = v as i8;
                }
            }
            BlockKind::Q4_1 => {
                (scale[0], min[0]) = (f16(b[0], b[1]), f16(b[2], b[3]));
                for (i, &v) in b[4..20].iter().enumerate() {
                    (q[i], q[i + 16]) = ((v & 0x0f) as i8, (v >> 4) as i8);
                }
            }
            BlockKind::Q5_0 => {
                scale[0] = f16(b[0], b[1]);
                let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                for (j, &v) in b[6..22].iter().enumerate() {
                    let h0 = ((qh >> j) << 4) & 0x10;
                    let h1 = (qh >> (j + 12)) & 0x10;
                    q[j] = ((u32::from(v) & 0x0f) | h0) as i8 - 16;
                    q[j + 16] = ((u32::from(v) >> 4) | h1) as i8 - 16;
                }
            }
            BlockKind::Q4K => {
                let (d, dmin) = (f16(b[0], b[1]), f16(b[2], b[3]));
                let scales = &b[4..16];
                for g in 0..4 {
                    let (sc1, m1) = scale_min_k4(2 * g, scales);
                    let (sc2, m2) = scale_min_k4(2 * g + 1, scales);
                    scale[2 * g] = d * f32::from(sc1);
                    scale[2 * g + 1] = d * f32::from(sc2);
                    min[2 * g] = -(dmin * f32::from(m1));
                    min[2 * g + 1] = -(dmin * f32::from(m2));
                    let qs = &b[16 + 32 * g..16 + 32 * (g + 1)];
                    for (i, &v) in qs.iter().enumerate() {
                        q[64 * g + i] = (v & 0x0f) as i8;
                        q[64 * g + 32 + i] = (v >> 4) as i8;
                    }
                }
            }
            BlockKind::Q6K => {
                let d = f16(b[208], b[209]);
                for (g, s) in scale.iter_mut().enumerate() {
                    *s = d * f32::from(b[192 + g] as i8);
                }
                for half in 0..2 {
                    let (ql, qh) = (&b[64 * half..], &b[128 + 32 * half..]);
                    let q = &mut q[128 * half..];
                    for l in 0..32 {
                        let six =
                            |low: u8, shift: u8| (low | (((qh[l] >> shift) & 3) << 4)) as i8 - 32;
                        q[l] = six(ql[l] & 0x0f, 0);
                        q[l + 32] = six(ql[l + 32] & 0x0f, 2);
                        q[l + 64] = six(ql[l] >> 4, 4);
                        q[l + 96] = six(ql[l + 32] >> 4, 6);
                    }
                }
            }
        }
    }

    /// Weights per block.
    fn elems(self) -> usize {
        self.size().0
    }

    /// Bytes per block.
    fn bytes(self) -> usize {
        self.size().1
    }

    /// One block's weights, `q·scale (+ offset)` from [`BlockKind::decode`]: candle's values.
    fn dequantize(self, b: &[u8], out: &mut [f32]) {
        let (mut q, mut scale, mut min) = ([0i8; 256], [0f32; 16], [0f32; 16]);
        self.decode(b, &mut q, &mut scale, &mut min);
        let group = self.group();
        for (i, o) in out.iter_mut().take(self.elems()).enumerate() {
            let w = f32::from(q[i]) * scale[i / group];
            *o = if self.has_min() {
                w + min[i / group]
            } else {
                w
            };
        }
    }
}

/// The 6-bit scale and minimum of group `j` of a Q4_K block (ggml's `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// A weight matrix and its shape.
pub(crate) struct Matrix {
    pub n: usize,
    pub k: usize,
    pub w: Weights,
}

const QK: usize = 32;

impl Matrix {
    /// Repack raw ggml Q4_1 blocks (`d: f16, m: f16, qs: [u8; 16]`) of an `[n, k]` matrix:
    /// into panels where the CPU has AVX-512, else by rows.
    pub(crate) fn from_q4_1(n: usize, k: usize, raw: &[u8]) -> Option<Matrix> {
        #[cfg(target_arch = "x86_64")]
        if panels::supported() {
            return panels::pack(n, k, raw, BlockKind::Q4_1);
        }
        Matrix::from_q4_1_rows(n, k, raw)
    }

    /// [`Matrix::from_q4_1`] by rows, on any CPU.
    fn from_q4_1_rows(n: usize, k: usize, raw: &[u8]) -> Option<Matrix> {
        let blocks = blocks(n, k, raw, BlockKind::Q4_1)?;
        let mut scale = Vec::with_capacity(blocks.len());
        let mut min = Vec::with_capacity(blocks.len());
        let mut qs = Vec::with_capacity(blocks.len());
        for b in blocks {
            scale.push(f16(b[0], b[1]));
            min.push(f16(b[2], b[3]));
            qs.push(b[4..20].try_into().ok()?);
        }
        Some(Matrix {
            n,
            k,
            w: Weights::Q4_1 { scale, min, qs },
        })
    }

    /// Repack raw ggml Q8_0 blocks (`d: f16, qs: [i8; 32]`) of an `[n, k]` matrix: into
    /// panels where the CPU has AVX-512, else by rows.
    pub(crate) fn from_q8_0(n: usize, k: usize, raw: &[u8]) -> Option<Matrix> {
        #[cfg(target_arch = "x86_64")]
        if panels::supported() {
            return panels::pack(n, k, raw, BlockKind::Q8_0);
        }
        Matrix::from_q8_0_rows(n, k, raw)
    }

    /// [`Matrix::from_q8_0`] by rows, on any CPU.
    fn from_q8_0_rows(n: usize, k: usize, raw: &[u8]) -> Option<Matrix> {
        let blocks = blocks(n, k, raw, BlockKind::Q8_0)?;
        let mut scale = Vec::with_capacity(blocks.len());
        let mut qs = Vec::with_capacity(blocks.len());
        for b in blocks {
            scale.push(f16(b[0], b[1]));
            qs.push(std::array::from_fn(|i| b[2 + i] as i8));
        }
        Some(Matrix {
            n,
            k,
            w: Weights::Q8_0 { scale, qs },
        })
    }

    /// Raw ggml blocks of `kind` for an `[n, k]` matrix: in panels where the CPU has AVX-512,
    /// else kept as stored.
    pub(crate) fn from_blocks(n: usize, k: usize, raw: &[u8], kind: BlockKind) -> Option<Matrix> {
        #[cfg(target_arch = "x86_64")]
        if panels::supported() {
            return panels::pack(n, k, raw, kind);
        }
        Matrix::from_blocks_as_stored(n, k, raw, kind)
    }

    /// [`Matrix::from_blocks`] as stored, on any CPU.
    fn from_blocks_as_stored(n: usize, k: usize, raw: &[u8], kind: BlockKind) -> Option<Matrix> {
        kind.fits(n, k, raw).then(|| Matrix {
            n,
            k,
            w: Weights::Blocks {
                kind,
                raw: raw.to_vec(),
            },
        })
    }

    /// A dense `[n, k]` f32 tensor on the CPU, used in place.
    pub(crate) fn from_f32(w: &Tensor) -> Option<Matrix> {
        let (n, k) = w.dims2().ok()?;
        let m = Matrix {
            n,
            k,
            w: Weights::F32(w.clone()),
        };
        (n > 0 && k > 0 && m.with_dense(|s| s.len() == n * k) == Some(true)).then_some(m)
    }

    /// `f` of the contiguous f32 data of a dense matrix.
    fn with_dense<T>(&self, f: impl FnOnce(&[f32]) -> T) -> Option<T> {
        let Weights::F32(t) = &self.w else {
            return None;
        };
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            return None;
        };
        let (start, end) = layout.contiguous_offsets()?;
        let data = cpu.as_slice::<f32>().ok()?.get(start..end)?;
        Some(f(data))
    }

    /// `x · Wᵀ` for `x = [m, k]` row-major: `[m, n]` row-major. `None` when `x` is not whole
    /// rows or the weights are not readable on the CPU.
    pub(crate) fn matmul_nt(&self, x: &[f32]) -> Option<Vec<f32>> {
        self.matmul_nt_until(x, &Stop::never())
    }

    /// [`Matrix::matmul_nt`] that skips the tiles it has not started once `stop` is raised;
    /// the caller then looks at `stop` and throws the result away.
    pub(crate) fn matmul_nt_until(&self, x: &[f32], stop: &Stop) -> Option<Vec<f32>> {
        match &self.w {
            Weights::F32(_) => self.with_dense(|w| self.product(x, w, stop))?,
            _ => self.product(x, &[], stop),
        }
    }

    fn product(&self, x: &[f32], dense: &[f32], stop: &Stop) -> Option<Vec<f32>> {
        let (n, k) = (self.n, self.k);
        if !x.len().is_multiple_of(k) {
            return None;
        }
        let m = x.len() / k;
        let mut out = vec![0f32; m * n];
        if m == 0 {
            return Some(out);
        }
        let rows = Rows::new(x, k, self.panels());
        let work = |(t, r0, mut cols): Task<'_>| {
            if !stop.is_stopped() {
                self.tile(&rows, t, r0, dense, &mut cols);
            }
        };
        let tasks = tasks(pieces(&mut out, n, m), self.panels());
        if m * n * k >= PARALLEL_MIN {
            tasks.into_par_iter().for_each(work);
        } else {
            tasks.into_iter().for_each(work);
        }
        Some(out)
    }

    /// Whether the weights are in panels.
    fn panels(&self) -> bool {
        #[cfg(target_arch = "x86_64")]
        if let Weights::Panels { .. } = self.w {
            return true;
        }
        false
    }

    /// Whether a product of many rows is faster here than through candle's GEMM (which packs
    /// the weights on every call): true for panels (measured on SmolLM2's readout of 128 rows
    /// and its forward pass: see `panels`).
    pub(crate) fn fast_for_batches(&self) -> bool {
        self.panels()
    }

    /// Tile `t` (weight rows `t·TILE..`) of the product for the rows from `r0`: `cols[r]` are
    /// row `r0 + r`'s output cells of that tile. `dense` is the matrix's data when it is dense
    /// f32.
    fn tile(&self, x: &Rows<'_>, t: usize, r0: usize, dense: &[f32], cols: &mut [&mut [f32]]) {
        let (n, k) = (self.n, self.k);
        let j0 = t * TILE;
        let j1 = (j0 + TILE).min(n);
        let nb = k / QK;
        let r = j0 * nb..j1 * nb;
        let rows = &x.rows[r0..r0 + cols.len()];
        match &self.w {
            #[cfg(target_arch = "x86_64")]
            Weights::Panels {
                scale,
                min,
                qs,
                group,
            } => {
                let m = x.rows.len();
                let w = panels::Panel {
                    scale,
                    min,
                    qs,
                    group: *group,
                };
                panels::tile(&x.packed, m, k, &w, j0..j1, r0, cols)
            }
            Weights::F32(_) => dense_tile(rows, &dense[j0 * k..j1 * k], k, cols),
            Weights::Q4_1 { scale, min, qs } => {
                q4_1_tile(rows, &scale[r.clone()], &min[r.clone()], &qs[r], nb, cols)
            }
            Weights::Q8_0 { scale, qs } => q8_0_tile(rows, &scale[r.clone()], &qs[r], nb, cols),
            Weights::Blocks { kind, raw } => {
                let row_bytes = k / kind.elems() * kind.bytes();
                let raw = &raw[j0 * row_bytes..j1 * row_bytes];
                quant_tile(rows, j1 - j0, k, cols, |j, out| {
                    let blocks = raw[j * row_bytes..(j + 1) * row_bytes].chunks_exact(kind.bytes());
                    for (b, out) in blocks.zip(out.chunks_exact_mut(kind.elems())) {
                        kind.dequantize(b, out);
                    }
                });
            }
        }
    }
}

/// `x · Wᵀ` for several quantized matrices that take the same input (a block's q, k and v
/// projections; its gate and up), in one parallel section instead of one each: on two cores
/// the joins of small products cost about as much as their arithmetic. `None` when a matrix is
/// dense or the shapes do not fit (multiply them one by one then).
pub(crate) fn matmul_nt_many(mats: &[&Matrix], x: &[f32]) -> Option<Vec<Vec<f32>>> {
    let k = mats.first()?.k;
    if x.is_empty()
        || !x.len().is_multiple_of(k)
        || mats
            .iter()
            .any(|a| a.k != k || matches!(a.w, Weights::F32(_)))
    {
        return None;
    }
    let m = x.len() / k;
    let rows = Rows::new(x, k, mats.iter().any(|a| a.panels()));
    let mut outs: Vec<Vec<f32>> = mats.iter().map(|a| vec![0f32; m * a.n]).collect();
    let macs: usize = mats.iter().map(|a| m * a.n * k).sum();
    let tasks: Vec<(usize, Task<'_>)> = outs
        .iter_mut()
        .zip(mats)
        .enumerate()
        .flat_map(|(i, (out, a))| {
            tasks(pieces(out, a.n, m), a.panels())
                .into_iter()
                .map(move |task| (i, task))
        })
        .collect();
    let work =
        |(i, (t, r0, mut cols)): (usize, Task<'_>)| mats[i].tile(&rows, t, r0, &[], &mut cols);
    if macs >= PARALLEL_MIN {
        tasks.into_par_iter().for_each(work);
    } else {
        tasks.into_iter().for_each(work);
    }
    Some(outs)
}

/// The activation rows of a product: one slice per row, and, for panels, the rows packed
/// as their kernel reads them.
struct Rows<'a> {
    rows: Vec<&'a [f32]>,
    packed: Vec<f32>,
}

impl<'a> Rows<'a> {
    fn new(x: &'a [f32], k: usize, panels: bool) -> Self {
        #[cfg(target_arch = "x86_64")]
        let packed = if panels {
            panels::pack_rows(x, k)
        } else {
            Vec::new()
        };
        #[cfg(not(target_arch = "x86_64"))]
        let packed = {
            let _ = panels;
            Vec::new()
        };
        Rows {
            rows: x.chunks_exact(k).collect(),
            packed,
        }
    }
}

/// One task of a product: a tile, its first row, and the output cells of its rows.
type Task<'a> = (usize, usize, Vec<&'a mut [f32]>);

/// The tasks of a product from its [`pieces`]: one per tile, and for panels one per tile and
/// chunk of rows (more tasks than two cores' worth when a projection has few tiles, e.g. 9 for
/// SmolLM2's 576 outputs; each chunk's rows stay in L2). Other kernels dequantize a tile's
/// weights once for all its rows, so they take whole tiles.
fn tasks(pieces: Vec<Vec<&mut [f32]>>, panels: bool) -> Vec<Task<'_>> {
    #[cfg(target_arch = "x86_64")]
    let chunk = if panels {
        panels::ROW_CHUNK
    } else {
        usize::MAX
    };
    #[cfg(not(target_arch = "x86_64"))]
    let chunk = {
        let _ = panels;
        usize::MAX
    };
    let mut tasks = Vec::new();
    for (t, cols) in pieces.into_iter().enumerate() {
        let mut cols = cols.into_iter().peekable();
        let mut r0 = 0;
        while cols.peek().is_some() {
            let group: Vec<&mut [f32]> = cols.by_ref().take(chunk).collect();
            let rows = group.len();
            tasks.push((t, r0, group));
            r0 += rows;
        }
    }
    tasks
}

/// The output cells of each tile of `n` columns in every one of `m` rows of `out`, so that each
/// task writes its own cells.
fn pieces(out: &mut [f32], n: usize, m: usize) -> Vec<Vec<&mut [f32]>> {
    let mut pieces: Vec<Vec<&mut [f32]>> = (0..n.div_ceil(TILE))
        .map(|_| Vec::with_capacity(m))
        .collect();
    for row in out.chunks_mut(n) {
        for (t, piece) in row.chunks_mut(TILE).enumerate() {
            pieces[t].push(piece);
        }
    }
    pieces
}

fn f16(lo: u8, hi: u8) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([lo, hi])).to_f32()
}

/// The blocks of an `[n, k]` matrix of `kind`, if `raw` holds exactly them.
fn blocks(
    n: usize,
    k: usize,
    raw: &[u8],
    kind: BlockKind,
) -> Option<std::slice::ChunksExact<'_, u8>> {
    kind.fits(n, k, raw).then(|| raw.chunks_exact(kind.bytes()))
}

/// Weight rows dequantized (and multiplied) together.
const C: usize = 8;

/// `cols[r][j] = rows[r] · w[j]` for the weight rows `w` (`[n, k]`), `j` from 0.
fn dense_tile(rows: &[&[f32]], w: &[f32], k: usize, cols: &mut [&mut [f32]]) {
    // [`C`] weight rows at a time (18 KB for k = 576), so that they stay in L1 while every
    // activation row passes over them.
    let arch = pulp::Arch::new();
    for (g, w) in w.chunks(C * k).enumerate() {
        arch.dispatch(DenseTile {
            rows,
            w,
            k,
            cols,
            j0: g * C,
        });
    }
}

/// The same for quantized weights: each group of [`C`] rows is dequantized by `dequant(j, out)`
/// (weight row `j` into `out`, `k` values) and multiplied as dense rows.
fn quant_tile(
    rows: &[&[f32]],
    n: usize,
    k: usize,
    cols: &mut [&mut [f32]],
    dequant: impl Fn(usize, &mut [f32]),
) {
    let mut scratch = vec![0f32; C * k];
    let arch = pulp::Arch::new();
    let mut j = 0;
    while j < n {
        let c = (n - j).min(C);
        for (i, out) in scratch.chunks_exact_mut(k).take(c).enumerate() {
            dequant(j + i, out);
        }
        arch.dispatch(DenseTile {
            rows,
            w: &scratch[..c * k],
            k,
            cols,
            j0: j,
        });
        j += c;
    }
}

fn q4_1_tile(
    rows: &[&[f32]],
    scale: &[f32],
    min: &[f32],
    qs: &[[u8; 16]],
    nb: usize,
    cols: &mut [&mut [f32]],
) {
    #[cfg(target_arch = "x86_64")]
    if rows.len() <= FUSED_ROWS {
        if let Some(simd) = pulp::x86::V3::try_new() {
            let n = scale.len() / nb;
            simd.vectorize(|| {
                // Two accumulators per row for three rows, four for one or two.
                for (rows, cols) in rows.chunks(3).zip(cols.chunks_mut(3)) {
                    match rows.len() {
                        3 => x86::q4_1::<3, 2>(simd, rows, scale, min, qs, nb, n, cols),
                        2 => x86::q4_1::<2, 4>(simd, rows, scale, min, qs, nb, n, cols),
                        _ => x86::q4_1::<1, 4>(simd, rows, scale, min, qs, nb, n, cols),
                    }
                }
            });
            return;
        }
    }
    quant_tile(rows, scale.len() / nb, nb * QK, cols, |j, out| {
        let (out, _) = out.as_chunks_mut::<QK>();
        for (b, o) in (j * nb..(j + 1) * nb).zip(out) {
            // Exactly candle's dequantization: `q·d` is exact in f32, one rounding in `+ m`.
            let (d, m, q) = (scale[b], min[b], &qs[b]);
            let lo: [f32; 16] = std::array::from_fn(|i| f32::from(q[i] & 0x0f) * d + m);
            let hi: [f32; 16] = std::array::from_fn(|i| f32::from(q[i] >> 4) * d + m);
            o[..16].copy_from_slice(&lo);
            o[16..].copy_from_slice(&hi);
        }
    });
}

fn q8_0_tile(rows: &[&[f32]], scale: &[f32], qs: &[[i8; 32]], nb: usize, cols: &mut [&mut [f32]]) {
    quant_tile(rows, scale.len() / nb, nb * QK, cols, |j, out| {
        let (out, _) = out.as_chunks_mut::<QK>();
        for (b, o) in (j * nb..(j + 1) * nb).zip(out) {
            let (d, q) = (scale[b], &qs[b]);
            *o = std::array::from_fn(|i| f32::from(q[i]) * d);
        }
    });
}

/// AVX2 kernels for up to [`FUSED_ROWS`] rows (an edit's new tokens), where dequantizing
/// through memory would cost more than the product: the blocks are dequantized in registers.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use pulp::bytemuck::cast;
    use pulp::x86::V3;
    use std::arch::x86_64::{__m128i, __m256};

    /// `cols[r][j] = rows[r] · dequant(weight row j)` for `j < n`, Q4_1 weights, `R` rows.
    #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
    #[inline(always)]
    pub(super) fn q4_1<const R: usize, const A: usize>(
        simd: V3,
        rows: &[&[f32]],
        scale: &[f32],
        min: &[f32],
        qs: &[[u8; 16]],
        nb: usize,
        n: usize,
        cols: &mut [&mut [f32]],
    ) {
        let x: [&[[[f32; 8]; 4]]; R] =
            std::array::from_fn(|r| rows[r].as_chunks::<8>().0.as_chunks::<4>().0);
        let mask = simd.sse2._mm_set1_epi8(0x0f);
        let zero = simd.avx._mm256_setzero_ps();
        for j in 0..n {
            // `A` independent accumulators per row (4 for one or two rows; 2 for more, within
            // AVX2's 16 registers).
            let mut acc = [[zero; A]; R];
            for b in 0..nb {
                let i = j * nb + b;
                let q: __m128i = cast(qs[i]);
                let (d, m) = (
                    simd.avx._mm256_set1_ps(scale[i]),
                    simd.avx._mm256_set1_ps(min[i]),
                );
                let lo = simd.sse2._mm_and_si128(q, mask);
                let hi = simd
                    .sse2
                    ._mm_and_si128(simd.sse2._mm_srli_epi16::<4>(q), mask);
                let parts = [
                    lo,
                    simd.sse2._mm_srli_si128::<8>(lo),
                    hi,
                    simd.sse2._mm_srli_si128::<8>(hi),
                ];
                // `q·d + m` with one rounding: the same f32 as candle's dequantization.
                let w: [__m256; 4] = parts.map(|p| {
                    let qf = simd
                        .avx
                        ._mm256_cvtepi32_ps(simd.avx2._mm256_cvtepu8_epi32(p));
                    simd.fma._mm256_fmadd_ps(qf, d, m)
                });
                for r in 0..R {
                    let xb = &x[r][b];
                    for v in 0..4 {
                        acc[r][v % A] = simd.fma._mm256_fmadd_ps(cast(xb[v]), w[v], acc[r][v % A]);
                    }
                }
            }
            for r in 0..R {
                let s = acc[r][1..]
                    .iter()
                    .fold(acc[r][0], |s, &a| simd.avx._mm256_add_ps(s, a));
                let s: [f32; 8] = cast(s);
                cols[r][j] = ((s[0] + s[4]) + (s[2] + s[6])) + ((s[1] + s[5]) + (s[3] + s[7]));
            }
        }
    }
}

/// Q8_0, Q4_1, Q5_0, Q4_K and Q6_K weights in panels of [`WIDTH`] rows and the AVX-512 kernel
/// that reads them, for the lens readout (19–128 rows against a vocabulary of 49k–262k) and
/// every other product of those types, the forward pass's included, at any number of rows.
///
/// Weight row `j` is column `j % WIDTH` of a panel, so one 512-bit vector holds one input's
/// weights of sixteen rows (one byte each: the blocks' 4, 5 and 6-bit values are unpacked at
/// load, [`BlockKind::decode`]). The activation rows are packed by row blocks (`[k][rows]`,
/// [`pack_rows`]), one broadcast per row and input. Up to [`MAX_ROWS`] rows accumulate against
/// each vector as it is loaded and dequantized in registers (`q·scale`, or `q·scale + offset`
/// in one rounding: the values candle's `dequantize` gives), so each weight is read once per
/// [`MAX_ROWS`] rows and there is no horizontal sum. Every product is one FMA chain over the
/// inputs in order, so a row gets the same sums alone (an edit's token) as in any batch (the
/// prompt's forward pass).
///
/// Measured on SmolLM2's readout (49,152 × 576) on this 2-core AVX-512 machine, best of 9:
/// 31 rows (one position, every layer) 10.1 ms = 173 GFLOP/s, against 17 ms for the
/// dot-product kernel over rows of dequantized weights; Gemma 3's (262,144 × 640), 19 rows:
/// 36 ms = 175 GFLOP/s. The FMA peak of the machine is 212 GFLOP/s. On SmolLM2's Q4_1
/// projections (576 or 1,536 inputs and outputs), 16–256 rows: 120–190 GFLOP/s against
/// candle's GEMM at 60–160 on the same shapes (the widest gap at few rows); its forward pass
/// of 16 tokens took 36–41 ms against 69–118 through candle's GEMM, of 64 tokens 127–181 ms
/// against 181–220, and of 256 tokens about the same (alternating runs in one sitting).
/// Gemma 3's (Q5_0, Q4_K, Q6_K): the forward pass of 16 tokens 50 ms against 130–146, the
/// daemon's one-token edit 9 ms against 15–19 (dequantized a few weight rows at a time).
///
/// The one module of the workspace that is allowed `unsafe`: AVX-512 intrinsics on stable Rust
/// (pulp's safe AVX-512 wrappers would switch candle's own GEMM to other kernels through
/// feature unification). Its contract is two lines: the kernel runs only after
/// `is_x86_feature_detected!("avx512f")`, and it reads only inside slices whose lengths the
/// safe caller asserts.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod panels {
    use rayon::prelude::*;
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// Weight rows per panel: one AVX-512 vector of f32.
    pub(super) const WIDTH: usize = 16;
    /// Activation rows per pass over a panel (accumulators; AVX-512 has 32 registers).
    const MAX_ROWS: usize = 24;
    /// Activation rows that every panel of a tile passes over before the next ones: 96 rows of
    /// 1,536 inputs are 590 KB, within L2. Without the chunks, SmolLM2's down projection
    /// of 256 rows (1.5 MB of activations) ran at 116 GFLOP/s instead of about 180.
    pub(super) const ROW_CHUNK: usize = 96;
    /// Inputs per pass over a row chunk: a panel's 512 inputs are 8 KB of weights (and 1 KB of
    /// scales), which stay in L1 while the row blocks pass. Whole, SmolLM2's down projection
    /// (1,536 inputs: 30 KB with the scales) ran at 126 GFLOP/s instead of about 180.
    const K_CHUNK: usize = 512;

    pub(super) fn supported() -> bool {
        is_x86_feature_detected!("avx512f")
    }

    /// The weights of [`super::Weights::Panels`], borrowed.
    pub(super) struct Panel<'a> {
        pub scale: &'a [f32],
        pub min: &'a [f32],
        pub qs: &'a [i8],
        pub group: usize,
    }

    /// An `[n, k]` matrix of raw `block`s (row-major, whole blocks per row) repacked into
    /// [`super::Weights::Panels`]; `None` when `raw` is not such a matrix.
    pub(super) fn pack(
        n: usize,
        k: usize,
        raw: &[u8],
        block: super::BlockKind,
    ) -> Option<super::Matrix> {
        let (elems, bytes) = block.size();
        let group = block.group();
        if !block.fits(n, k, raw) {
            return None;
        }
        let (row_bytes, ng) = (k / elems * bytes, k / group);
        let panels = n.div_ceil(WIDTH);
        let mut scale = vec![0f32; panels * ng * WIDTH];
        let mut min = vec![0f32; if block.has_min() { scale.len() } else { 0 }];
        let mut qs = vec![0i8; panels * k * WIDTH];
        // Panel by panel, in parallel: Gemma 3's 262,144-row embedding is 16,384 panels.
        let mins: Vec<&mut [f32]> = if min.is_empty() {
            (0..panels).map(|_| &mut [][..]).collect()
        } else {
            min.chunks_mut(ng * WIDTH).collect()
        };
        scale
            .par_chunks_mut(ng * WIDTH)
            .zip(mins)
            .zip(qs.par_chunks_mut(k * WIDTH))
            .zip(raw.par_chunks(row_bytes * WIDTH))
            .for_each(|(((scale, min), qs), rows)| {
                let (mut q, mut s, mut m) = ([0i8; 256], [0f32; 16], [0f32; 16]);
                for (c, row) in rows.chunks_exact(row_bytes).enumerate() {
                    for (b, raw) in row.chunks_exact(bytes).enumerate() {
                        block.decode(raw, &mut q, &mut s, &mut m);
                        for (i, &q) in q[..elems].iter().enumerate() {
                            qs[(b * elems + i) * WIDTH + c] = q;
                        }
                        let g0 = b * elems / group;
                        for g in 0..elems / group {
                            scale[(g0 + g) * WIDTH + c] = s[g];
                            if let Some(min) = min.get_mut((g0 + g) * WIDTH + c) {
                                *min = m[g];
                            }
                        }
                    }
                }
            });
        Some(super::Matrix {
            n,
            k,
            w: super::Weights::Panels {
                scale,
                min,
                qs,
                group,
            },
        })
    }

    /// The row blocks of `m` rows, in order: `(first row, rows)`. Chunks of [`ROW_CHUNK`] rows
    /// (which stay in L2 while every panel of a tile passes over them), each cut into blocks
    /// of equal size, at most [`MAX_ROWS`] rows.
    fn row_blocks(m: usize) -> impl Iterator<Item = (usize, usize)> {
        (0..m).step_by(ROW_CHUNK).flat_map(move |c0| {
            let c1 = (c0 + ROW_CHUNK).min(m);
            let size = (c1 - c0).div_ceil((c1 - c0).div_ceil(MAX_ROWS));
            (c0..c1)
                .step_by(size)
                .map(move |r0| (r0, size.min(c1 - r0)))
        })
    }

    /// The `m` activation rows of `k` inputs (`x`, row-major) as [`tile`] reads them: each row
    /// block's inputs interleaved (`[k][rows]`, at the block's place), so that the kernel
    /// reads its rows' values of one input from one cache line. (Read in place, rows `k` apart
    /// fall into the same few L1 sets: two for 1,536 inputs.)
    pub(super) fn pack_rows(x: &[f32], k: usize) -> Vec<f32> {
        let m = x.len() / k;
        let mut packed = vec![0f32; m * k];
        let mut rest = &mut packed[..];
        let mut blocks = Vec::new();
        for (r0, rows) in row_blocks(m) {
            let (block, tail) = rest.split_at_mut(rows * k);
            blocks.push((&x[r0 * k..(r0 + rows) * k], rows, block));
            rest = tail;
        }
        let pack = |(src, rows, block): (&[f32], usize, &mut [f32])| {
            for (i, dst) in block.chunks_exact_mut(rows).enumerate() {
                for (r, d) in dst.iter_mut().enumerate() {
                    *d = src[r * k + i];
                }
            }
        };
        if m * k >= 1 << 16 {
            blocks.into_par_iter().for_each(pack);
        } else {
            blocks.into_iter().for_each(pack);
        }
        packed
    }

    /// `cols[r][j - j0] = x_{first + r} · w_j` for the weight rows `js` (`j0 = js.start`, a
    /// multiple of [`WIDTH`]) and the rows from `first` (a multiple of [`ROW_CHUNK`]);
    /// `packed` is all `m` activation rows of `k` inputs from [`pack_rows`]; `min` is empty
    /// for Q8_0.
    pub(super) fn tile(
        packed: &[f32],
        m: usize,
        k: usize,
        w: &Panel<'_>,
        js: Range<usize>,
        first: usize,
        cols: &mut [&mut [f32]],
    ) {
        let (group, min) = (w.group, w.min);
        let nb = k / group;
        assert!(packed.len() >= k * m && k.is_multiple_of(group) && K_CHUNK.is_multiple_of(group));
        assert!(first.is_multiple_of(ROW_CHUNK) && first + cols.len() <= m);
        let mut out = [[0f32; WIDTH]; ROW_CHUNK];
        let blocks: Vec<(usize, usize)> = row_blocks(m)
            .filter(|&(r0, _)| (first..first + cols.len()).contains(&r0))
            .collect();
        for chunk in blocks.chunk_by(|a, b| a.0 / ROW_CHUNK == b.0 / ROW_CHUNK) {
            let c0 = chunk[0].0;
            for j in js.clone().step_by(WIDTH) {
                let p = j / WIDTH;
                let (scale, qs) = (&w.scale[p * nb * WIDTH..], &w.qs[p * k * WIDTH..]);
                // Q4_1's minimums (none for Q8_0).
                let min = (!min.is_empty()).then(|| min.get(p * nb * WIDTH..).unwrap_or_default());
                assert!(scale.len() >= nb * WIDTH && qs.len() >= k * WIDTH);
                assert!(min.is_none_or(|min| min.len() >= nb * WIDTH));
                // Inputs in chunks whose weights stay in L1 across the row blocks; each
                // product goes on as one FMA chain over the inputs in order.
                for k0 in (0..k).step_by(K_CHUNK) {
                    let kc = K_CHUNK.min(k - k0);
                    for &(r0, rows) in chunk {
                        let x = &packed[r0 * k + k0 * rows..(r0 + rows) * k];
                        let out = &mut out[r0 - c0..r0 - c0 + rows];
                        // SAFETY: AVX-512F is present (`supported`, checked when the panels
                        // were built); the pointers cover the panel (asserted above) and `x`
                        // (inputs `k0..k` of the row block), and the kernel reads inputs
                        // `k0..k0 + kc` of `rows` rows and their weights.
                        unsafe {
                            kernel(
                                group,
                                x.as_ptr(),
                                scale.as_ptr().add(k0 / group * WIDTH),
                                min.map(|min| min.as_ptr().add(k0 / group * WIDTH)),
                                qs.as_ptr().add(k0 * WIDTH),
                                kc,
                                k0 > 0,
                                out,
                            )
                        };
                    }
                }
                let width = (js.end - j).min(WIDTH);
                let c1 = c0 + chunk.iter().map(|b| b.1).sum::<usize>();
                for (r, o) in (c0..c1).zip(&out) {
                    cols[r - first][j - js.start..j - js.start + width]
                        .copy_from_slice(&o[..width]);
                }
            }
        }
    }

    /// The kernel for `out.len()` rows (1..=MAX_ROWS), through a constant-size instance; Q4_1
    /// when there are minimums. `accumulate`: go on from the sums in `out`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn kernel(
        group: usize,
        x: *const f32,
        scale: *const f32,
        min: Option<*const f32>,
        qs: *const i8,
        kc: usize,
        accumulate: bool,
        out: &mut [[f32; WIDTH]],
    ) {
        macro_rules! by_rows {
            ($g:literal, $min:expr, $($r:literal)*) => {
                match out.len() {
                    $($r => rows_kernel::<$r, $g>(x, scale, $min, qs, kc, accumulate, out),)*
                    _ => unreachable!("row blocks are 1..=MAX_ROWS"),
                }
            };
        }
        // One instance per kind of block (constant branches inside the loop).
        match (group, min) {
            (32, Some(min)) => {
                by_rows!(32, Some(min), 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24)
            }
            (32, None) => {
                by_rows!(32, None, 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24)
            }
            (16, None) => {
                by_rows!(16, None, 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24)
            }
            _ => unreachable!("panels have groups of 32 (with or without offsets) or 16"),
        }
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn rows_kernel<const R: usize, const G: usize>(
        x: *const f32,
        scale: *const f32,
        min: Option<*const f32>,
        qs: *const i8,
        kc: usize,
        accumulate: bool,
        out: &mut [[f32; WIDTH]],
    ) {
        let mut acc = [_mm512_setzero_ps(); R];
        if accumulate {
            for (a, o) in acc.iter_mut().zip(out.iter()) {
                *a = _mm512_loadu_ps(o.as_ptr());
            }
        }
        for b in 0..kc / G {
            let d = _mm512_loadu_ps(scale.add(b * WIDTH));
            let dm = min.map(|min| _mm512_loadu_ps(min.add(b * WIDTH)));
            for i in b * G..(b + 1) * G {
                let q = _mm_loadu_si128(qs.add(i * WIDTH).cast::<__m128i>());
                let q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
                // `q·d`, or `q·d + m` with one rounding: the values candle's `dequantize`
                // gives (see `BlockKind::decode`).
                let w = match dm {
                    Some(dm) => _mm512_fmadd_ps(q, d, dm),
                    None => _mm512_mul_ps(q, d),
                };
                // The R rows' values of input i, packed together.
                let x = x.add(i * R);
                for (r, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(_mm512_set1_ps(*x.add(r)), w, *a);
                }
            }
        }
        for (o, a) in out.iter_mut().zip(acc) {
            _mm512_storeu_ps(o.as_mut_ptr(), a);
        }
    }
}

struct DenseTile<'a, 'b> {
    rows: &'a [&'a [f32]],
    w: &'a [f32],
    k: usize,
    cols: &'a mut [&'b mut [f32]],
    /// Column of `cols` that weight row 0 of `w` writes.
    j0: usize,
}

impl pulp::WithSimd for DenseTile<'_, '_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        // Register blocking for AVX2's 16 registers: two rows against four weight rows (8
        // accumulators), or one row against eight (8 independent FMA chains).
        let DenseTile {
            rows,
            w,
            k,
            cols,
            j0,
        } = self;
        let mut r = 0;
        while r < rows.len() {
            if rows.len() - r >= 2 {
                let (x, out) = (&rows[r..r + 2], &mut cols[r..r + 2]);
                let done = block::<S, 2, 4>(simd, x, w, k, out, j0, 0);
                block::<S, 2, 1>(simd, x, w, k, out, j0, done);
                r += 2;
            } else {
                let (x, out) = (&rows[r..r + 1], &mut cols[r..r + 1]);
                let done = block::<S, 1, 8>(simd, x, w, k, out, j0, 0);
                block::<S, 1, 1>(simd, x, w, k, out, j0, done);
                r += 1;
            }
        }
    }
}

/// `RR` activation rows against the weight rows `from..` of `ws`, `CC` at a time, written from
/// column `j` of `cols`. Returns the first weight row not done (fewer than `CC` remain).
#[inline(always)]
fn block<S: pulp::Simd, const RR: usize, const CC: usize>(
    simd: S,
    rows: &[&[f32]],
    ws: &[f32],
    k: usize,
    cols: &mut [&mut [f32]],
    j: usize,
    from: usize,
) -> usize {
    let n = ws.len() / k;
    let mut c0 = from;
    while c0 + CC <= n {
        let w: [(&[S::f32s], &[f32]); CC] =
            std::array::from_fn(|c| S::as_simd_f32s(&ws[(c0 + c) * k..(c0 + c + 1) * k]));
        let x: [(&[S::f32s], &[f32]); RR] = std::array::from_fn(|r| S::as_simd_f32s(rows[r]));
        let len = w[0].0.len();
        let zero = simd.splat_f32s(0.0);
        let mut acc = [[zero; CC]; RR];
        for i in 0..len {
            let wi: [S::f32s; CC] = std::array::from_fn(|c| w[c].0[i]);
            for r in 0..RR {
                let xi = x[r].0[i];
                for c in 0..CC {
                    acc[r][c] = simd.mul_add_f32s(xi, wi[c], acc[r][c]);
                }
            }
        }
        for r in 0..RR {
            for c in 0..CC {
                let mut s = simd.reduce_sum_f32s(acc[r][c]);
                for (a, b) in x[r].1.iter().zip(w[c].1) {
                    s = a.mul_add(*b, s);
                }
                cols[r][j + c0 + c] = s;
            }
        }
        c0 += CC;
    }
    c0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], w: &[f32], k: usize) -> Vec<f32> {
        let (m, n) = (x.len() / k, w.len() / k);
        let mut out = vec![0f32; m * n];
        for r in 0..m {
            for j in 0..n {
                let s: f64 = (0..k)
                    .map(|i| f64::from(x[r * k + i]) * f64::from(w[j * k + i]))
                    .sum();
                out[r * n + j] = s as f32;
            }
        }
        out
    }

    fn pseudo(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    fn check_close(got: &[f32], want: &[f32], k: usize) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-5 * (k as f32).sqrt() * (1.0 + w.abs()),
                "cell {i}: {g} vs {w}"
            );
        }
    }

    #[test]
    fn dense_matches_f64_reference_for_every_tile_shape() {
        // k with a remainder past the lanes, n past a tile with a partial group of 4.
        for (m, n, k) in [
            (1, 7, 19),
            (2, 130, 64),
            (3, 5, 8),
            (5, 67, 576),
            (31, 70, 100),
        ] {
            let x = pseudo(m * k, 1);
            let w = pseudo(n * k, 2);
            let t = Tensor::from_slice(&w, (n, k), &candle_core::Device::Cpu).ok();
            let got = t
                .as_ref()
                .and_then(Matrix::from_f32)
                .and_then(|mm| mm.matmul_nt(&x));
            check_close(&got.unwrap_or_default(), &naive(&x, &w, k), k);
        }
    }

    /// Pseudo-random bytes (xorshift): every nibble and byte value occurs in a few blocks.
    fn pseudo_bytes(n: usize, seed: u32) -> Vec<u8> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s >> 24) as u8
            })
            .collect()
    }

    /// Raw ggml Q4_1 blocks of an `[n, k]` matrix: positive scales over two decades (ggml's
    /// are `(max - min) / 15 ≥ 0`), minimums of both signs, random nibbles.
    fn q4_1_raw(n: usize, k: usize) -> Vec<u8> {
        let nb = n * k / QK;
        let qs = pseudo_bytes(nb * 16, 3);
        let mut raw = Vec::with_capacity(nb * 20);
        for (b, q) in qs.chunks_exact(16).enumerate() {
            let d = half::f16::from_f32(1e-3 * (1.0 + (b * 37 % 100) as f32));
            let m = half::f16::from_f32(-1.2 + (b * 53 % 151) as f32 * 0.01);
            raw.extend(d.to_bits().to_le_bytes());
            raw.extend(m.to_bits().to_le_bytes());
            raw.extend(q);
        }
        raw
    }

    /// Raw ggml Q8_0 blocks of an `[n, k]` matrix: positive scales (ggml's are `amax / 127`),
    /// every signed byte.
    fn q8_0_raw(n: usize, k: usize) -> Vec<u8> {
        let nb = n * k / QK;
        let qs = pseudo_bytes(nb * 32, 5);
        let mut raw = Vec::with_capacity(nb * 34);
        for (b, q) in qs.chunks_exact(32).enumerate() {
            let d = half::f16::from_f32(1e-4 * (1.0 + (b * 41 % 997) as f32));
            raw.extend(d.to_bits().to_le_bytes());
            raw.extend(q);
        }
        raw
    }

    /// candle's own reading of raw blocks: the bytes as candle stores them (what the GGUF loader
    /// hands to [`Matrix::from_q4_1`] / [`Matrix::from_q8_0`]) and candle's `dequantize`.
    fn candle_dequantized(
        dtype: candle_core::quantized::GgmlDType,
        n: usize,
        k: usize,
        raw: &[u8],
    ) -> (Vec<u8>, Vec<f32>) {
        use candle_core::quantized::{QStorage, QTensor};
        let cpu = candle_core::Device::Cpu;
        let storage = QStorage::from_data(std::borrow::Cow::Borrowed(raw), &cpu, dtype);
        let q = QTensor::new(storage.expect("candle storage"), (n, k)).expect("candle QTensor");
        assert_eq!(q.dtype(), dtype);
        let data = q.data().expect("candle raw data").into_owned();
        assert_eq!(data, raw, "candle keeps the blocks as given");
        let dense = q
            .dequantize(&cpu)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .expect("candle dequantize");
        assert_eq!(dense.len(), n * k);
        (data, dense)
    }

    /// The weights a kernel multiplies with, read back through products with unit rows: row
    /// `e_i` times `Wᵀ` is column `i` of `W`, exactly (one product `1·w`, every other term a
    /// zero; a zero `w` comes back as `+0`). The unit rows go `group` at a time, so that every
    /// kernel for that many rows is the one read.
    fn weights_seen_by_kernel(mm: &Matrix, group: usize) -> Vec<f32> {
        let (n, k) = (mm.n, mm.k);
        let mut w = vec![f32::NAN; n * k];
        for i0 in (0..k).step_by(group) {
            let g = group.min(k - i0);
            let mut x = vec![0f32; g * k];
            for r in 0..g {
                x[r * k + i0 + r] = 1.0;
            }
            let out = mm.matmul_nt(&x).expect("product");
            assert_eq!(out.len(), g * n);
            for r in 0..g {
                for j in 0..n {
                    w[j * k + i0 + r] = out[r * n + j];
                }
            }
        }
        w
    }

    #[test]
    fn quantized_kernels_dequantize_like_candle() {
        use candle_core::quantized::GgmlDType;
        // 1..3 rows: Q4_1 in registers (x86-64-v3); 4 and 8: dequantized into a shared copy
        // (and Q8_0 always); the last group of each size is shorter than the others.
        let (n, k) = (70, 96);
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let (raw, want) = match dtype {
                GgmlDType::Q4_1 => candle_dequantized(dtype, n, k, &q4_1_raw(n, k)),
                _ => candle_dequantized(dtype, n, k, &q8_0_raw(n, k)),
            };
            // The data does not degenerate: finite, both signs, no -0 (which a product cannot
            // return).
            assert!(want
                .iter()
                .all(|w| w.is_finite() && w.to_bits() != (-0f32).to_bits()));
            assert!(want.iter().filter(|w| **w > 0.0).count() > n * k / 4);
            assert!(want.iter().filter(|w| **w < 0.0).count() > n * k / 4);
            // Both layouts: panels (where the CPU has AVX-512) and rows.
            let mms = match dtype {
                GgmlDType::Q4_1 => vec![
                    Matrix::from_q4_1(n, k, &raw),
                    Matrix::from_q4_1_rows(n, k, &raw),
                ],
                _ => vec![
                    Matrix::from_q8_0(n, k, &raw),
                    Matrix::from_q8_0_rows(n, k, &raw),
                ],
            };
            for mm in mms {
                let mm = mm.expect("matrix");
                // Up to 31 rows: one row block of the panels' kernel, and two.
                for group in [1, 2, 3, 4, 8, 24, 31] {
                    let got = weights_seen_by_kernel(&mm, group);
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert_eq!(
                            g.to_bits(),
                            w.to_bits(),
                            "{dtype:?}, {group} rows: weight [{}, {}]: {g:e} vs candle's {w:e}",
                            i / k,
                            i % k
                        );
                    }
                }
            }
        }
    }

    /// Q5_0, Q4_K and Q6_K: the weights every kernel size multiplies with are candle's
    /// `dequantize` values, bit for bit (a zero may come back as +0 where candle has -0), and
    /// products agree with an f64 reference on them.
    #[test]
    fn block_kernels_dequantize_like_candle() {
        use candle_core::quantized::{GgmlDType, QTensor};
        let cpu = candle_core::Device::Cpu;
        let (n, k) = (70, 512);
        for (dtype, kind) in [
            (GgmlDType::Q5_0, BlockKind::Q5_0),
            (GgmlDType::Q4K, BlockKind::Q4K),
            (GgmlDType::Q6K, BlockKind::Q6K),
        ] {
            let t = Tensor::from_vec(pseudo(n * k, 9), (n, k), &cpu).expect("tensor");
            let q = QTensor::quantize(&t, dtype).expect("quantize");
            let raw = q.data().expect("raw").into_owned();
            let want = q
                .dequantize(&cpu)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .expect("dequantize");
            assert!(want.iter().filter(|w| **w > 0.0).count() > n * k / 4);
            assert!(want.iter().filter(|w| **w < 0.0).count() > n * k / 4);
            // Both layouts: panels (where the CPU has AVX-512) and the blocks as stored.
            for mm in [
                Matrix::from_blocks(n, k, &raw, kind),
                Matrix::from_blocks_as_stored(n, k, &raw, kind),
            ] {
                let mm = mm.expect("matrix");
                for group in [1, 3, 8, 30] {
                    let got = weights_seen_by_kernel(&mm, group);
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            g.to_bits() == w.to_bits() || (*g == 0.0 && *w == 0.0),
                            "{dtype:?}, {group} rows: weight [{}, {}]: {g:e} vs candle's {w:e}",
                            i / k,
                            i % k
                        );
                    }
                }
                for m in [1, 2, 5, 130] {
                    let x = pseudo(m * k, 10);
                    let got = mm.matmul_nt(&x).unwrap_or_default();
                    check_close(&got, &naive(&x, &want, k), k);
                }
            }
            assert!(Matrix::from_blocks(n, k, &raw[1..], kind).is_none());
            assert!(Matrix::from_blocks(n, k + 32 * 8, &raw, kind).is_none());
        }
    }

    #[test]
    fn q4_1_multiplies_in_f32() {
        // A forward pass's shapes too: 200 rows (three chunks of the panels' rows, the last
        // short) and 1,536 inputs (three chunks of the panels' inputs).
        for (m, n, k) in [
            (1, 3, 32),
            (2, 65, 64),
            (3, 130, 576),
            (4, 9, 96),
            (5, 70, 64),
            (8, 66, 576),
            (9, 5, 64),
            (200, 40, 1536),
        ] {
            let (raw, dense) = candle_dequantized(
                candle_core::quantized::GgmlDType::Q4_1,
                n,
                k,
                &q4_1_raw(n, k),
            );
            let x = pseudo(m * k, 4);
            let want = naive(&x, &dense, k);
            for mm in [
                Matrix::from_q4_1(n, k, &raw),
                Matrix::from_q4_1_rows(n, k, &raw),
            ] {
                let got = mm.and_then(|mm| mm.matmul_nt(&x));
                check_close(&got.unwrap_or_default(), &want, k);
            }
        }
    }

    /// In panels, each product is one FMA chain over the inputs in order, whatever the rows
    /// beside it: a row alone (an edit's token) gets the very sums it gets in a batch of 200
    /// (the prompt's forward pass), and so does every batch size between.
    #[test]
    fn panels_give_a_row_the_same_sums_in_any_batch() {
        let (n, k, m) = (50, 1536, 200);
        let x = pseudo(m * k, 12);
        for mm in [
            Matrix::from_q4_1(n, k, &q4_1_raw(n, k)),
            Matrix::from_q8_0(n, k, &q8_0_raw(n, k)),
        ] {
            let mm = mm.expect("matrix");
            let all = mm.matmul_nt(&x).expect("product");
            for (first, rows) in [
                (0, 1),
                (7, 1),
                (199, 1),
                (3, 2),
                (10, 25),
                (90, 20),
                (5, 150),
            ] {
                let part = mm
                    .matmul_nt(&x[first * k..(first + rows) * k])
                    .expect("product");
                let want = &all[first * n..(first + rows) * n];
                let same = part
                    .iter()
                    .zip(want)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                // Rows kernels sum in other orders for other batch sizes: only panels promise.
                assert!(same || !mm.fast_for_batches(), "rows {first}..+{rows}");
            }
        }
    }

    #[test]
    fn q8_0_multiplies_in_f32() {
        // A readout's shapes too: 19 and 31 rows (one position of Gemma 3 and SmolLM2), 50
        // (three row blocks of the panels), a last panel of 2 weight rows (n = 130).
        for (m, n, k) in [
            (1, 7, 32),
            (3, 70, 96),
            (6, 130, 576),
            (19, 64, 640),
            (31, 130, 576),
            (50, 33, 96),
        ] {
            let (raw, dense) = candle_dequantized(
                candle_core::quantized::GgmlDType::Q8_0,
                n,
                k,
                &q8_0_raw(n, k),
            );
            let x = pseudo(m * k, 5);
            let want = naive(&x, &dense, k);
            for mm in [
                Matrix::from_q8_0(n, k, &raw),
                Matrix::from_q8_0_rows(n, k, &raw),
            ] {
                check_close(
                    &mm.and_then(|mm| mm.matmul_nt(&x)).unwrap_or_default(),
                    &want,
                    k,
                );
            }
        }
    }

    /// Where the CPU has AVX-512 (this project's test machines do), Q8_0 and Q4_1 are read in
    /// panels, which also take large batches; elsewhere by rows.
    #[test]
    fn panels_where_the_cpu_has_avx512() {
        let (n, k) = (40, 64);
        let mm = Matrix::from_q8_0(n, k, &q8_0_raw(n, k)).expect("matrix");
        let q4 = Matrix::from_q4_1(n, k, &q4_1_raw(n, k)).expect("matrix");
        let avx512 = cfg!(target_arch = "x86_64") && {
            #[cfg(target_arch = "x86_64")]
            let yes = std::arch::is_x86_feature_detected!("avx512f");
            #[cfg(not(target_arch = "x86_64"))]
            let yes = false;
            yes
        };
        assert_eq!(mm.fast_for_batches(), avx512);
        assert_eq!(q4.fast_for_batches(), avx512);
        let rows = Matrix::from_q8_0_rows(n, k, &q8_0_raw(n, k)).expect("matrix");
        assert!(!rows.fast_for_batches());
        let rows = Matrix::from_q4_1_rows(n, k, &q4_1_raw(n, k)).expect("matrix");
        assert!(!rows.fast_for_batches());
    }

    #[test]
    fn many_matrices_in_one_section_equal_one_by_one() {
        let k = 576;
        let mats: Vec<Matrix> = [576, 192, 1536]
            .into_iter()
            .filter_map(|n| Matrix::from_q4_1(n, k, &q4_1_raw(n, k)))
            .collect();
        assert_eq!(mats.len(), 3);
        let refs: Vec<&Matrix> = mats.iter().collect();
        for m in [1, 2, 3, 5] {
            let x = pseudo(m * k, 6);
            let many = matmul_nt_many(&refs, &x).unwrap_or_default();
            let one: Vec<Vec<f32>> = mats.iter().filter_map(|a| a.matmul_nt(&x)).collect();
            assert_eq!(many, one, "{m} rows");
        }
        // Dense weights, mismatched inner sizes and partial rows are left to one-by-one calls.
        let q = Matrix::from_q4_1(64, 64, &q4_1_raw(64, 64));
        let dense = Tensor::from_slice(&pseudo(64 * 64, 7), (64, 64), &candle_core::Device::Cpu)
            .ok()
            .and_then(|t| Matrix::from_f32(&t));
        let (Some(q), Some(dense)) = (q, dense) else {
            panic!("test matrices");
        };
        assert!(matmul_nt_many(&[&q, &dense], &pseudo(64, 8)).is_none());
        assert!(matmul_nt_many(&[&q, refs[0]], &pseudo(64, 8)).is_none());
        assert!(matmul_nt_many(&[&q], &pseudo(63, 8)).is_none());
        assert!(matmul_nt_many(&[], &pseudo(64, 8)).is_none());
    }

    #[test]
    fn rejects_raw_data_of_the_wrong_size() {
        assert!(Matrix::from_q4_1(2, 32, &[0; 39]).is_none());
        assert!(Matrix::from_q4_1(2, 30, &[0; 40]).is_none());
        assert!(Matrix::from_q8_0(1, 32, &[0; 35]).is_none());
        let t = Tensor::zeros((3, 2), candle_core::DType::F32, &candle_core::Device::Cpu);
        assert!(t
            .ok()
            .and_then(|t| Matrix::from_f32(&t.t().ok()?))
            .is_none());
    }
}
