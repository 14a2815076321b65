//! The viridis colour map (perceptually uniform), as a 256-entry table shared by the SVG and
//! the HTML page so that both colour a cell identically.

use std::sync::OnceLock;

pub const STEPS: usize = 256;

/// `#rrggbb` of viridis at 256 evenly spaced points.
pub fn table() -> &'static [String] {
    static T: OnceLock<Vec<String>> = OnceLock::new();
    T.get_or_init(|| {
        (0..STEPS)
            .map(|i| {
                let c = colorous::VIRIDIS.eval_continuous(i as f64 / (STEPS - 1) as f64);
                format!("#{:02x}{:02x}{:02x}", c.r, c.g, c.b)
            })
            .collect()
    })
}

/// Viridis at `t` in `[0, 1]` as RGB (the table's entry: terminals, SVG and page agree).
pub fn rgb(t: f64) -> (u8, u8, u8) {
    let c = colorous::VIRIDIS.eval_continuous(index(t) as f64 / (STEPS - 1) as f64);
    (c.r, c.g, c.b)
}

/// Whether text on viridis at `t` reads better dark than white ([`text_on`]).
pub fn dark_text(t: f64) -> bool {
    text_on(index(t)) == "#111111"
}

/// Index into [`table`] of `t` in `[0, 1]` (clamped; NaN maps to 0).
pub fn index(t: f64) -> usize {
    let t = if t.is_nan() { 0.0 } else { t.clamp(0.0, 1.0) };
    (t * (STEPS - 1) as f64).round() as usize
}

/// Text colour that reads well on the table's colour `i`: dark on the light (yellow/green)
/// end, white on the dark (purple/blue) end: whichever has the higher WCAG contrast ratio.
pub fn text_on(i: usize) -> &'static str {
    let c = colorous::VIRIDIS.eval_continuous(i as f64 / (STEPS - 1) as f64);
    let lin = |v: u8| {
        let v = f64::from(v) / 255.0;
        if v <= 0.04045 {
            v / 12.92
        } else {
            ((v + 0.055) / 1.055).powf(2.4)
        }
    };
    let l = 0.2126 * lin(c.r) + 0.7152 * lin(c.g) + 0.0722 * lin(c.b);
    if l > 0.19 {
        "#111111"
    } else {
        "#ffffff"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn viridis_ends_and_contrast() {
        // Reference values of matplotlib's viridis: #440154 at 0, #fde725 at 1.
        assert_eq!(table()[0], "#440154");
        assert_eq!(table()[255], "#fde725");
        assert_eq!(index(0.5), 128);
        assert_eq!(index(f64::NAN), 0);
        assert_eq!(rgb(0.0), (0x44, 0x01, 0x54));
        assert_eq!(rgb(1.0), (0xfd, 0xe7, 0x25));
        assert_eq!(rgb(f64::NAN), rgb(0.0));
        assert_eq!(text_on(0), "#ffffff");
        assert_eq!(text_on(255), "#111111");
    }
}
