//! The plot's data model, built once from the lens results and shared by every output.

use std::fmt;
use std::str::FromStr;

use lens_core::{Cell, LensKind, PositionView, Site};

use crate::text::visible;
use crate::{color, Plot};

/// What colours a cell. Bright (yellow) always means "more sure / closer / righter": the
/// scales of entropy, KL and rank run from dark at their worst to bright at 0 (rank 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum Metric {
    /// Probability of the cell's top-1 token, 0..1.
    #[default]
    Prob,
    /// Probability of the token that actually comes next, 0..1 (none at the last position).
    NextProb,
    /// Entropy of the cell's distribution, nats; 0 is bright.
    Entropy,
    /// KL divergence from the model's output to the cell, nats; 0 is bright.
    Kl,
    /// Rank of the actual next token (1 = top-1), log scale; 1 is bright.
    Rank,
}

impl Metric {
    pub const ALL: [Metric; 5] = [
        Metric::Prob,
        Metric::NextProb,
        Metric::Entropy,
        Metric::Kl,
        Metric::Rank,
    ];

    /// The name on the command line and in the HTML page.
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::Prob => "prob",
            Metric::NextProb => "next-prob",
            Metric::Entropy => "entropy",
            Metric::Kl => "kl",
            Metric::Rank => "rank",
        }
    }

    /// What the colour shows, for titles and legends.
    pub fn label(self) -> &'static str {
        match self {
            Metric::Prob => "top-1 probability",
            Metric::NextProb => "next-token probability",
            Metric::Entropy => "entropy (nats)",
            Metric::Kl => "KL to output (nats)",
            Metric::Rank => "next-token rank",
        }
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Metric {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Metric::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| {
                format!("unknown metric `{s}`: use one of prob, next-prob, entropy, kl, rank")
            })
    }
}

pub struct CellData {
    /// Top-k as (visible text, probability), best first.
    pub top: Vec<(String, f32)>,
    pub entropy: f64,
    pub kl: f64,
    /// Rank (0-based) and probability of the actual next token.
    pub next: Option<(usize, f32)>,
    pub final_top1_rank: usize,
    /// The top-1 is the actual next token.
    pub hit: bool,
}

impl CellData {
    pub fn top1(&self) -> &str {
        self.top.first().map_or("", |(t, _)| t.as_str())
    }

    fn raw(&self, metric: Metric) -> Option<f64> {
        match metric {
            Metric::Prob => self.top.first().map(|(_, p)| f64::from(*p)),
            Metric::NextProb => self.next.map(|(_, p)| f64::from(p)),
            Metric::Entropy => Some(self.entropy),
            Metric::Kl => Some(self.kl),
            Metric::Rank => self.next.map(|(r, _)| ((r + 1) as f64).log10()),
        }
    }
}

pub struct TrackData {
    pub label: String,
    /// Per layer, in `Grid::layers` order; `None` where unknown.
    pub probs: Vec<Option<f32>>,
}

pub struct Column {
    pub position: usize,
    /// Visible text of the input token.
    pub input: String,
    /// Visible text of the actual next token.
    pub next: Option<String>,
    pub final_top1: String,
    /// Per layer, in `Grid::layers` order.
    pub cells: Vec<Option<CellData>>,
    pub tracks: Vec<TrackData>,
}

/// A colour scale: raw metric values map linearly onto `[lo, hi]`, bright at `bright`.
pub struct Scale {
    pub lo: f64,
    pub hi: f64,
    /// Whether `lo` (rather than `hi`) is the bright end.
    pub low_is_bright: bool,
    /// Tick positions in raw units, with their labels.
    pub ticks: Vec<(f64, String)>,
}

impl Scale {
    /// Position on the colour map, 0 = dark, 1 = bright.
    pub fn t(&self, raw: f64) -> f64 {
        let span = (self.hi - self.lo).max(f64::MIN_POSITIVE);
        let u = ((raw - self.lo) / span).clamp(0.0, 1.0);
        if self.low_is_bright {
            1.0 - u
        } else {
            u
        }
    }
}

/// A column's trajectory chart: the probability of the model's final top-1 and of the
/// actual next token at every layer (one line when they are the same token), read from the
/// cells.
fn tracks(
    view: &PositionView,
    layers: &[usize],
    final_top1: &str,
    next_id: Option<u32>,
    next: Option<&str>,
) -> Vec<TrackData> {
    let per_layer = |f: &dyn Fn(&Cell) -> Option<f32>| -> Vec<Option<f32>> {
        layers
            .iter()
            .map(|&l| {
                view.cells
                    .iter()
                    .find(|c| c.site == Site::Layer(l))
                    .and_then(f)
            })
            .collect()
    };
    let same = next_id == Some(view.final_top1.id);
    let mut out = vec![TrackData {
        label: match same {
            true => format!("final top-1 = next «{final_top1}»"),
            false => format!("final top-1 «{final_top1}»"),
        },
        probs: per_layer(&|c| Some(c.final_top1_prob)),
    }];
    if let (false, Some(next)) = (same, next) {
        out.push(TrackData {
            label: format!("next «{next}»"),
            probs: per_layer(&|c| c.next.map(|n| n.prob)),
        });
    }
    out
}

pub struct Grid {
    pub model: String,
    pub lens: LensKind,
    /// Ascending.
    pub layers: Vec<usize>,
    pub columns: Vec<Column>,
    scales: Vec<Scale>,
}

impl Grid {
    pub fn build(plot: &Plot<'_>) -> Grid {
        // Ascending and distinct: a query's answer resolves its layers so.
        let layers = plot.answer.layers.clone();
        let decode = |id: u32| visible(&(plot.decode)(id));
        let columns: Vec<Column> = plot
            .answer
            .views
            .iter()
            .map(|view| {
                let p = view.position;
                let input = plot
                    .tokens
                    .get(p)
                    .map_or_else(|| decode(view.token), |t| visible(&t.text));
                let next_id = plot
                    .tokens
                    .get(p + 1)
                    .map(|t| t.id)
                    .or_else(|| view.cells.iter().find_map(|c| c.next.map(|n| n.id)));
                let next = plot
                    .tokens
                    .get(p + 1)
                    .map(|t| visible(&t.text))
                    .or_else(|| next_id.map(decode));
                let cells: Vec<Option<CellData>> = layers
                    .iter()
                    .map(|&l| {
                        let c = view.cells.iter().find(|c| c.site == Site::Layer(l))?;
                        Some(CellData {
                            top: c.top.iter().map(|t| (decode(t.id), t.prob)).collect(),
                            entropy: c.entropy,
                            kl: c.kl_to_final,
                            next: c.next.map(|n| (n.rank, n.prob)),
                            final_top1_rank: c.final_top1_rank,
                            hit: c
                                .next
                                .is_some_and(|n| c.top.first().is_some_and(|t| t.id == n.id)),
                        })
                    })
                    .collect();
                let final_top1 = decode(view.final_top1.id);
                let tracks = tracks(view, &layers, &final_top1, next_id, next.as_deref());
                Column {
                    position: p,
                    input,
                    next,
                    final_top1,
                    cells,
                    tracks,
                }
            })
            .collect();
        let mut grid = Grid {
            model: plot.model.to_string(),
            lens: plot.answer.kind,
            layers,
            columns,
            scales: Vec::new(),
        };
        grid.scales = Metric::ALL.iter().map(|&m| grid.make_scale(m)).collect();
        grid
    }

    fn cells(&self) -> impl Iterator<Item = &CellData> {
        self.columns.iter().flat_map(|c| c.cells.iter().flatten())
    }

    fn make_scale(&self, metric: Metric) -> Scale {
        let max = self
            .cells()
            .filter_map(|c| c.raw(metric))
            .fold(0.0_f64, f64::max);
        match metric {
            Metric::Prob | Metric::NextProb => Scale {
                lo: 0.0,
                hi: 1.0,
                low_is_bright: false,
                ticks: [0.0, 0.25, 0.5, 0.75, 1.0]
                    .iter()
                    .map(|&v| (v, format!("{v}")))
                    .collect(),
            },
            Metric::Entropy | Metric::Kl => {
                let step = nice_step(max / 4.0);
                let hi = ((max / step).ceil() * step).max(step);
                let n = (hi / step).round() as usize;
                let ticks = (0..=n)
                    .map(|i| {
                        let v = i as f64 * step;
                        (v, trim_float(v))
                    })
                    .collect();
                Scale {
                    lo: 0.0,
                    hi,
                    low_is_bright: true,
                    ticks,
                }
            }
            Metric::Rank => {
                let hi = max.ceil().max(1.0);
                let ticks = (0..=hi as u32)
                    .map(|k| {
                        let label = match k {
                            0..=2 => format!("{}", 10_u64.pow(k)),
                            3..=5 => format!("{}k", 10_u64.pow(k - 3)),
                            _ => format!("{}M", 10_u64.pow(k.saturating_sub(6))),
                        };
                        (f64::from(k), label)
                    })
                    .collect();
                Scale {
                    lo: 0.0,
                    hi,
                    low_is_bright: true,
                    ticks,
                }
            }
        }
    }

    pub fn scale(&self, metric: Metric) -> &Scale {
        let i = Metric::ALL.iter().position(|&m| m == metric).unwrap_or(0);
        &self.scales[i]
    }

    /// The colour-table index of `cell` under `metric`, or `None` where the metric has no value
    /// (next-token metrics at the last position).
    pub fn color_index(&self, cell: &CellData, metric: Metric) -> Option<usize> {
        let raw = cell.raw(metric)?;
        Some(color::index(self.scale(metric).t(raw)))
    }

    pub fn title(&self) -> String {
        format!("Logit lens · {}", self.model)
    }

    pub fn subtitle(&self, metric: Metric) -> String {
        let lens = match self.lens {
            LensKind::Norm => "norm lens (final norm + unembedding)",
            LensKind::Raw => "raw lens (unembedding only)",
            LensKind::Tuned => "tuned lens (translator + final norm + unembedding)",
        };
        format!(
            "{lens} · colour: {} · outlined: top-1 = actual next token",
            metric.label()
        )
    }
}

/// 1, 2 or 5 times a power of ten, at least `x`.
pub(crate) fn nice_step(x: f64) -> f64 {
    if x.is_nan() || x <= 0.0 || x.is_infinite() {
        return 0.5;
    }
    let p = 10_f64.powf(x.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|&s| s >= x)
        .unwrap_or(10.0 * p)
}

pub(crate) fn trim_float(v: f64) -> String {
    let s = format!("{v:.2}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    s.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_steps() {
        assert_eq!(nice_step(0.3), 0.5);
        assert_eq!(nice_step(1.2), 2.0);
        assert_eq!(nice_step(2.7), 5.0);
        assert_eq!(nice_step(0.0), 0.5);
        assert_eq!(trim_float(2.5), "2.5");
        assert_eq!(trim_float(2.0), "2");
    }

    #[test]
    fn metric_names_round_trip() {
        for m in Metric::ALL {
            assert_eq!(m.as_str().parse::<Metric>(), Ok(m));
        }
        assert!("probability".parse::<Metric>().is_err());
    }
}
