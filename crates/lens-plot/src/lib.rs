//! Logit-lens heatmaps people would rather look at: an SVG, the same SVG rasterised to PNG by
//! resvg (with the font this crate ships, so the pixels are the same on every machine), and a
//! self-contained interactive HTML page (inline CSS, JS and data; no network).
//!
//! Rows are layers (bottom = embeddings, top = the last layer, unless flipped), columns are the
//! prompt's tokens; each cell shows the lens's top-1 token there, coloured by a [`Metric`] on
//! the viridis colour map, and is outlined where that top-1 is the token that actually comes
//! next. Long prompts wrap into panels of at most [`Options::max_columns`] columns.

mod color;
mod diff;
mod grid;
mod html;
mod lines;
mod svg;
mod text;

use lens_core::{Answer, Token};

pub use color::{dark_text, rgb};
pub use diff::{diff_html, diff_png, diff_svg, kl_t, DiffPlot};
pub use grid::Metric;
pub use lines::{line_chart, Series};
pub use text::visible;

/// The font every label is drawn with: DejaVu Sans Condensed (see `fonts/PROVENANCE.md`).
pub const FONT: &[u8] = include_bytes!("../fonts/DejaVuSansCondensed.ttf");

/// Largest PNG side we render, in pixels (a guard against absurd `scale`s).
pub const MAX_PNG_SIDE: u32 = 16_384;

/// Errors of rasterising.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the PNG scale must be a finite number in (0, 16], not {0}")]
    Scale(f32),
    #[error("the PNG would be {width}×{height} pixels, more than {max} on a side: use a smaller scale or fewer tokens/layers")]
    TooLarge { width: u32, height: u32, max: u32 },
    #[error("cannot read the generated SVG: {0}")]
    Svg(String),
    #[error("cannot encode the PNG: {0}")]
    Png(String),
}

/// What to plot: a query's answer (`lens_core::Query::run`: one view per plotted position, in
/// prompt order, and the layers) and what is needed to label it. The page's trajectory chart
/// reads the cells too (each cell's final top-1 and next-token probabilities), so every number
/// drawn comes from the one lens computation.
pub struct Plot<'a> {
    pub answer: &'a Answer,
    /// The whole tokenized prompt (input labels, and the actual next tokens).
    pub tokens: &'a [Token],
    /// The text of a token id (`Backend::decode`).
    pub decode: &'a dyn Fn(u32) -> String,
    /// Model name for the title.
    pub model: &'a str,
}

/// How to draw it.
#[derive(Debug, Clone)]
pub struct Options {
    /// What colours the cells.
    pub metric: Metric,
    /// Put the embeddings at the top and the last layer at the bottom.
    pub flip: bool,
    /// Columns per panel in the SVG/PNG; longer prompts wrap into several panels.
    pub max_columns: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            metric: Metric::Prob,
            flip: false,
            max_columns: 20,
        }
    }
}

/// The heatmap as a standalone SVG document.
pub fn svg(plot: &Plot<'_>, options: &Options) -> String {
    let grid = grid::Grid::build(plot);
    svg::render(&grid, options)
}

/// The heatmap as PNG bytes: the SVG of [`svg`] rasterised by resvg at `scale` (1 = one
/// pixel per SVG unit), on a white background.
pub fn png(plot: &Plot<'_>, options: &Options, scale: f32) -> Result<Vec<u8>, Error> {
    rasterize(&svg(plot, options), scale)
}

/// The heatmap as one self-contained interactive HTML page.
pub fn html(plot: &Plot<'_>, options: &Options) -> String {
    let grid = grid::Grid::build(plot);
    html::render(&grid, options)
}

/// Rasterise an SVG made by this crate with the embedded font only (no system fonts).
pub fn rasterize(svg: &str, scale: f32) -> Result<Vec<u8>, Error> {
    if !scale.is_finite() || scale <= 0.0 || scale > 16.0 {
        return Err(Error::Scale(scale));
    }
    let mut opt = resvg::usvg::Options::default();
    {
        let db = opt.fontdb_mut();
        db.load_font_data(FONT.to_vec());
        let family = db
            .faces()
            .next()
            .and_then(|f| f.families.first())
            .map(|(name, _)| name.clone());
        if let Some(family) = family {
            db.set_sans_serif_family(family.clone());
            opt.font_family = family;
        }
    }
    let tree = resvg::usvg::Tree::from_str(svg, &opt).map_err(|e| Error::Svg(e.to_string()))?;
    let size = tree.size();
    let width = (size.width() * scale).ceil() as u32;
    let height = (size.height() * scale).ceil() as u32;
    if width > MAX_PNG_SIDE || height > MAX_PNG_SIDE {
        return Err(Error::TooLarge {
            width,
            height,
            max: MAX_PNG_SIDE,
        });
    }
    let mut pixmap = resvg::tiny_skia::Pixmap::new(width.max(1), height.max(1))
        .ok_or_else(|| Error::Png(format!("cannot allocate {width}×{height} pixels")))?;
    pixmap.fill(resvg::tiny_skia::Color::WHITE);
    resvg::render(
        &tree,
        resvg::tiny_skia::Transform::from_scale(scale, scale),
        &mut pixmap.as_mut(),
    );
    pixmap.encode_png().map_err(|e| Error::Png(e.to_string()))
}
