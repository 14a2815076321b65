//! The tuned lens's translators (Belrose et al. 2023): one affine map per block boundary,
//! `h ↦ h + W·h + b`, applied to a layer's residual stream before the norm readout. Plain f32
//! matrices: reading, writing and training them happen outside the core (`lens-tuned`).

use rayon::prelude::*;

use crate::Error;

/// One layer's translator, `h ↦ h + W·h + b` (identity when `W` and `b` are zero).
#[derive(Debug, Clone, PartialEq)]
pub struct Affine {
    /// `W`, `hidden × hidden`, row-major (`out × in`, as torch's `nn.Linear` stores it).
    pub weight: Vec<f32>,
    /// `b`, `hidden`.
    pub bias: Vec<f32>,
}

/// A tuned lens: a translator for each layer `0..N` of a model with `N` blocks (layer `N` is
/// the model's output and is read untranslated), and a label for messages and reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Translators {
    label: String,
    hidden: usize,
    layers: Vec<Affine>,
}

// `Translators::new` refuses non-finite values, so equality is reflexive.
impl Eq for Translators {}

impl Translators {
    /// Translators of width `hidden`, one per layer `0..layers.len()`; every value finite.
    pub fn new(
        label: impl Into<String>,
        hidden: usize,
        layers: Vec<Affine>,
    ) -> Result<Self, Error> {
        for (l, a) in layers.iter().enumerate() {
            if a.weight.len() != hidden * hidden || a.bias.len() != hidden {
                return Err(Error::Shape(format!(
                    "the tuned lens's translator {l} has {} weights and {} biases, expected \
                     {hidden}×{hidden} and {hidden}",
                    a.weight.len(),
                    a.bias.len()
                )));
            }
            if !a.weight.iter().chain(&a.bias).all(|x| x.is_finite()) {
                return Err(Error::Shape(format!(
                    "the tuned lens's translator {l} holds a non-finite value"
                )));
            }
        }
        Ok(Translators {
            label: label.into(),
            hidden,
            layers,
        })
    }

    /// The identity translators (`W = 0`, `b = 0`): the norm lens.
    pub fn identity(label: impl Into<String>, hidden: usize, n_layers: usize) -> Self {
        let zero = Affine {
            weight: vec![0.0; hidden * hidden],
            bias: vec![0.0; hidden],
        };
        Translators {
            label: label.into(),
            hidden,
            layers: vec![zero; n_layers],
        }
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn hidden_size(&self) -> usize {
        self.hidden
    }

    /// The number of blocks `N` of the model the translators fit (one per layer `0..N`).
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    pub fn layers(&self) -> &[Affine] {
        &self.layers
    }

    /// An error unless the translators fit a model of `n_layers` blocks of width `hidden`.
    pub fn check_fits(&self, n_layers: usize, hidden: usize) -> Result<(), Error> {
        if self.hidden != hidden || self.layers.len() != n_layers {
            return Err(Error::Shape(format!(
                "the tuned lens {} was made for {} blocks of width {}, the model has {n_layers} \
                 blocks of width {hidden}",
                self.label,
                self.layers.len(),
                self.hidden
            )));
        }
        Ok(())
    }

    /// Translate rows of `hidden` values, each with its layer: `rows[i] + W_l·rows[i] + b_l`
    /// for `l = layers[i] < N`, unchanged at layer `N`. Dot products accumulate in f32, in
    /// eight lanes.
    pub fn translate(&self, rows: &[f32], layers: &[usize]) -> Vec<f32> {
        let d = self.hidden;
        let mut out = rows.to_vec();
        out.par_chunks_mut(d.max(1))
            .zip(rows.par_chunks(d.max(1)))
            .zip(layers.par_iter())
            .for_each(|((o, h), &l)| {
                let Some(a) = self.layers.get(l) else { return };
                for ((o, w), b) in o.iter_mut().zip(a.weight.chunks(d)).zip(&a.bias) {
                    *o += dot(w, h) + b;
                }
            });
        out
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(weight: &[f32], bias: &[f32], rows: &[f32], layers: &[usize], expect: &[f32]) {
        let t = Translators::new(
            "t",
            2,
            vec![Affine {
                weight: weight.to_vec(),
                bias: bias.to_vec(),
            }],
        )
        .expect("translators");
        assert_eq!(t.translate(rows, layers), expect);
    }

    #[test]
    fn translate_adds_the_affine_map_below_the_last_layer() {
        // h + W h + b with W = [[1, 2], [0, -1]], b = [0.5, 0]: (1, 1) → (1+3+0.5, 1-1+0).
        check(
            &[1.0, 2.0, 0.0, -1.0],
            &[0.5, 0.0],
            &[1.0, 1.0],
            &[0],
            &[4.5, 0.0],
        );
        // Layer 1 is the output of a 1-block model: untranslated.
        check(
            &[1.0, 2.0, 0.0, -1.0],
            &[0.5, 0.0],
            &[1.0, 1.0],
            &[1],
            &[1.0, 1.0],
        );
        // Zero W and b: the identity.
        check(&[0.0; 4], &[0.0; 2], &[3.0, -2.0], &[0], &[3.0, -2.0]);
    }

    #[test]
    fn shapes_and_values_are_checked() {
        let bad = |weight: Vec<f32>, bias: Vec<f32>| {
            Translators::new("t", 2, vec![Affine { weight, bias }]).is_err()
        };
        assert!(bad(vec![0.0; 3], vec![0.0; 2]));
        assert!(bad(vec![0.0; 4], vec![0.0; 1]));
        assert!(bad(vec![f32::NAN, 0.0, 0.0, 0.0], vec![0.0; 2]));
        let t = Translators::identity("t", 2, 3);
        assert!(t.check_fits(3, 2).is_ok());
        assert!(t.check_fits(4, 2).is_err());
        assert!(t.check_fits(3, 5).is_err());
    }
}
