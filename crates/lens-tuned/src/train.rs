//! Training the translators with candle: per layer `l < N`, minimise the mean over tokens of
//! `KL(p_N ‖ softmax(W_U · norm(h_l + W_l·h_l + b_l)))`, `p_N` being the model's output, the
//! final norm and `W_U` frozen.
//!
//! Optimiser: AdamW (β = 0.9, 0.999, ε = 1e-8; weight decay 1e-3 pulls `W`, `b` towards 0,
//! i.e. the translator towards the identity), learning rate linearly warmed up over the first
//! fifth of the steps, then linearly decayed to 0: the tuned-lens package's Adam recipe. The
//! update is candle-nn's `AdamW`'s, written here because candle-nn keeps its moments private and
//! a resumed run must go on with them ([`AdamState`], saved beside the lens). Adam
//! rather than the paper's SGD with Nesterov momentum because our budgets are small (tens to a
//! few hundred steps of a few hundred tokens, on two cores): per-parameter step sizes reach a
//! useful translator in far fewer steps than SGD tuned for 250 steps of 2^18 tokens.
//!
//! The readout's backward pass is written out instead of recorded: with `q = softmax(z·W_Uᵀ)`,
//! `∂KL/∂z = (q − p)·W_U / T`, so each step costs two `T × hidden × vocab` products per
//! layer (candle's matmul backward would also form the unused gradient of the frozen `W_U`);
//! candle's autograd then carries `∂KL/∂z` through the final norm and the translator.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var, D};
use lens_core::{Affine, FinalNorm, HiddenStates, ReadoutWeights, Site, Translators};

use crate::Error;

/// How to train.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainOptions {
    /// Optimisation steps in all (a resumed lens continues the count).
    pub steps: usize,
    /// Peak learning rate.
    pub lr: f64,
    pub weight_decay: f64,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            steps: 100,
            lr: 1e-3,
            weight_decay: 1e-3,
        }
    }
}

impl TrainOptions {
    /// The learning rate at `step` (0-based): linear warm-up over the first fifth, then linear
    /// decay to 0 at `steps`.
    pub fn lr_at(&self, step: usize) -> f64 {
        let warmup = (self.steps / 5).max(1);
        let s = step as f64 + 1.0;
        match step < warmup {
            true => self.lr * s / warmup as f64,
            false => {
                self.lr
                    * ((self.steps as f64 - step as f64) / (self.steps - warmup).max(1) as f64)
                        .clamp(0.0, 1.0)
            }
        }
    }
}

/// One step's tokens: the residual stream at every layer `0..=N`, `T × hidden` each.
pub struct Batch {
    layers: Vec<Vec<f32>>,
    tokens: usize,
}

impl Batch {
    /// The positions of `states` (one or more prompts' captures) as one batch.
    pub fn of(states: &[&HiddenStates]) -> Batch {
        let n = states.first().map_or(0, |s| s.n_layers());
        let layers = (0..=n)
            .map(|l| {
                states
                    .iter()
                    .flat_map(|s| {
                        (0..s.n_positions())
                            .flat_map(move |p| s.row(Site::Layer(l), p).unwrap_or(&[]).iter())
                    })
                    .copied()
                    .collect()
            })
            .collect();
        Batch {
            layers,
            tokens: states.iter().map(|s| s.n_positions()).sum(),
        }
    }

    pub fn tokens(&self) -> usize {
        self.tokens
    }
}

/// AdamW's first and second moments of one parameter.
struct Moments {
    m: Tensor,
    v: Tensor,
}

impl Moments {
    fn zeros(like: &Var) -> Result<Moments, Error> {
        Ok(Moments {
            m: like.as_tensor().zeros_like()?,
            v: like.as_tensor().zeros_like()?,
        })
    }

    /// One AdamW update of `theta` (candle-nn's formula): the moments' running means of the
    /// gradient and its square, bias-corrected for step `t` (1-based), decoupled weight decay.
    fn update(
        &mut self,
        theta: &Var,
        grads: &GradStore,
        lr: f64,
        decay: f64,
        t: usize,
    ) -> Result<(), Error> {
        let Some(g) = grads.get(theta) else {
            return Ok(());
        };
        let m = ((&self.m * BETA1)? + (g * (1.0 - BETA1))?)?;
        let v = ((&self.v * BETA2)? + (g.sqr()? * (1.0 - BETA2))?)?;
        let m_hat = (&m * (1.0 / (1.0 - BETA1.powi(t as i32))))?;
        let v_hat = (&v * (1.0 / (1.0 - BETA2.powi(t as i32))))?;
        let step = (m_hat / (v_hat.sqrt()? + EPS)?)?;
        theta.set(&((theta.as_tensor() * (1.0 - lr * decay))? - (step * lr)?)?)?;
        (self.m, self.v) = (m, v);
        Ok(())
    }
}

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;

struct Layer {
    weight: Var,
    bias: Var,
    weight_moments: Moments,
    bias_moments: Moments,
}

/// The optimiser's state, to resume training where it stopped: AdamW's update count and, per
/// layer, the moments of `W` (`hidden × hidden`, row-major) and `b`.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamState {
    /// Updates the moments have seen.
    pub t: usize,
    pub layers: Vec<LayerMoments>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LayerMoments {
    pub weight_m: Vec<f32>,
    pub weight_v: Vec<f32>,
    pub bias_m: Vec<f32>,
    pub bias_v: Vec<f32>,
}

/// The translators being trained, their optimisers and the frozen readout.
pub struct Trainer {
    device: Device,
    hidden: usize,
    norm: FinalNorm,
    norm_weight: Tensor,
    norm_bias: Option<Tensor>,
    /// `W_U`, `[vocab, hidden]`, and its transpose, contiguous.
    unembed: Tensor,
    unembed_t: Tensor,
    layers: Vec<Layer>,
    options: TrainOptions,
    /// Steps done (including those of the lens it resumed).
    pub step: usize,
    /// AdamW updates since its moments started (fewer than `step` when a run resumed without
    /// them).
    adam_t: usize,
}

impl Trainer {
    /// Start from `start` (identity translators, or a saved lens to resume) after `step` steps,
    /// with fresh moments ([`Trainer::restore`] puts saved ones back).
    pub fn new(
        start: &Translators,
        weights: &ReadoutWeights,
        options: TrainOptions,
        step: usize,
    ) -> Result<Trainer, Error> {
        let device = Device::Cpu;
        let d = start.hidden_size();
        let vocab = weights.unembedding.len() / d.max(1);
        let unembed = Tensor::from_slice(&weights.unembedding, (vocab, d), &device)?;
        let unembed_t = unembed.t()?.contiguous()?;
        let layers = start
            .layers()
            .iter()
            .map(|a| {
                let weight = Var::from_tensor(&Tensor::from_slice(&a.weight, (d, d), &device)?)?;
                let bias = Var::from_tensor(&Tensor::from_slice(&a.bias, d, &device)?)?;
                Ok(Layer {
                    weight_moments: Moments::zeros(&weight)?,
                    bias_moments: Moments::zeros(&bias)?,
                    weight,
                    bias,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        Ok(Trainer {
            hidden: d,
            norm: weights.norm,
            norm_weight: Tensor::from_slice(&weights.norm_weight, d, &device)?,
            norm_bias: weights
                .norm_bias
                .as_ref()
                .map(|b| Tensor::from_slice(b, d, &device))
                .transpose()?,
            unembed,
            unembed_t,
            layers,
            options,
            step,
            adam_t: 0,
            device,
        })
    }

    /// The optimiser's state now (to save beside the lens).
    pub fn adam_state(&self) -> Result<AdamState, Error> {
        let flat = |t: &Tensor| -> Result<Vec<f32>, Error> { Ok(t.flatten_all()?.to_vec1()?) };
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(LayerMoments {
                    weight_m: flat(&l.weight_moments.m)?,
                    weight_v: flat(&l.weight_moments.v)?,
                    bias_m: flat(&l.bias_moments.m)?,
                    bias_v: flat(&l.bias_moments.v)?,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        Ok(AdamState {
            t: self.adam_t,
            layers,
        })
    }

    /// Go on with saved moments (of a lens with the same layers and width).
    pub fn restore(&mut self, state: &AdamState) -> Result<(), Error> {
        let d = self.hidden;
        if state.layers.len() != self.layers.len() {
            return Err(Error::Lens(lens_core::Error::Shape(format!(
                "the optimiser state has {} layers, the lens {}",
                state.layers.len(),
                self.layers.len()
            ))));
        }
        let tensor = |v: &[f32], shape: &[usize]| -> Result<Tensor, Error> {
            Ok(Tensor::from_slice(v, shape, &self.device)?)
        };
        let restored = state
            .layers
            .iter()
            .map(|m| {
                Ok((
                    Moments {
                        m: tensor(&m.weight_m, &[d, d])?,
                        v: tensor(&m.weight_v, &[d, d])?,
                    },
                    Moments {
                        m: tensor(&m.bias_m, &[d])?,
                        v: tensor(&m.bias_v, &[d])?,
                    },
                ))
            })
            .collect::<Result<Vec<_>, Error>>()?;
        for (layer, (w, b)) in self.layers.iter_mut().zip(restored) {
            (layer.weight_moments, layer.bias_moments) = (w, b);
        }
        self.adam_t = state.t;
        Ok(())
    }

    /// The final norm, in differentiable candle ops.
    fn norm(&self, x: &Tensor) -> Result<Tensor, Error> {
        let y = match self.norm {
            FinalNorm::Rms { eps } => {
                let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
                x.broadcast_div(&(ms + eps)?.sqrt()?)?
            }
            FinalNorm::Layer { eps } => {
                let xc = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
                let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
                xc.broadcast_div(&(var + eps)?.sqrt()?)?
            }
        };
        let y = y.broadcast_mul(&self.norm_weight)?;
        Ok(match &self.norm_bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// The log-probabilities of the readout of `x` (`[T, hidden]`), no gradient.
    fn log_probs(&self, z: &Tensor) -> Result<Tensor, Error> {
        Ok(candle_nn::ops::log_softmax(
            &z.matmul(&self.unembed_t)?,
            D::Minus1,
        )?)
    }

    /// One optimisation step on `batch`; the mean KL (nats) of each layer `0..N` before it.
    /// Each layer's translator has its own loss and optimiser, so they are stepped one after
    /// another (only one layer's logits are alive at a time).
    pub fn step(&mut self, batch: &Batch) -> Result<Vec<f32>, Error> {
        let (t, d) = (batch.tokens, self.hidden);
        let n = self.layers.len();
        let rows = |l: usize| Tensor::from_slice(&batch.layers[l], (t, d), &self.device);
        let log_p = self.log_probs(&self.norm(&rows(n)?)?)?;
        let p = log_p.exp()?;
        let (lr, decay) = (self.options.lr_at(self.step), self.options.weight_decay);
        self.adam_t += 1;
        let mut losses = Vec::with_capacity(n);
        for l in 0..n {
            let x = rows(l)?;
            let layer = &self.layers[l];
            let h = (&x
                + x.matmul(&layer.weight.as_tensor().t()?)?
                    .broadcast_add(layer.bias.as_tensor())?)?;
            let z = self.norm(&h)?;
            let log_q = self.log_probs(&z.detach())?;
            let kl = (&p * (&log_p - &log_q)?)?.sum_all()?.to_scalar::<f32>()? / t as f32;
            // ∂(mean KL)/∂z = (q − p)·W_U / T, carried back by autograd from z.
            let dz = ((log_q.exp()? - &p)?.matmul(&self.unembed)? / t as f64)?;
            let grads = (z * dz)?.sum_all()?.backward()?;
            let layer = &mut self.layers[l];
            let at = self.adam_t;
            layer
                .weight_moments
                .update(&layer.weight, &grads, lr, decay, at)?;
            layer
                .bias_moments
                .update(&layer.bias, &grads, lr, decay, at)?;
            losses.push(kl);
        }
        self.step += 1;
        Ok(losses)
    }

    /// The translators as they are now.
    pub fn translators(&self, label: &str) -> Result<Translators, Error> {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(Affine {
                    weight: l
                        .weight
                        .as_tensor()
                        .flatten_all()?
                        .to_dtype(DType::F32)?
                        .to_vec1()?,
                    bias: l.bias.as_tensor().to_vec1()?,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        Ok(Translators::new(label, self.hidden, layers)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_learning_rate_warms_up_then_decays_to_zero() {
        let o = TrainOptions {
            steps: 10,
            lr: 1.0,
            weight_decay: 0.0,
        };
        let lrs: Vec<f64> = (0..10).map(|s| o.lr_at(s)).collect();
        assert_eq!(lrs[0], 0.5);
        assert_eq!(lrs[1], 1.0);
        assert_eq!(lrs[2], 1.0);
        assert!(lrs[2..].windows(2).all(|w| w[1] < w[0]), "{lrs:?}");
        assert_eq!(o.lr_at(10), 0.0);
    }
}
