//! AdamW with decoupled weight decay, global-norm gradient clipping, gradient accumulation, and
//! optimizer state that saves and loads (safetensors) so a resumed run continues exactly.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Tensor, Var, backprop::GradStore};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{safetensors_bytes, write_atomic};
use crate::error::{ModelError, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Clip the global gradient norm to this value (`None`: no clipping).
    pub max_grad_norm: Option<f64>,
    /// Apply weight decay to 1-D tensors (norm weights, biases) too. Off by default, as in most
    /// transformer recipes.
    #[serde(default)]
    pub decay_1d: bool,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            max_grad_norm: Some(1.0),
            decay_1d: false,
        }
    }
}

/// Gradients by parameter name, in f32.
#[derive(Debug, Clone, Default)]
pub struct Gradients {
    pub grads: BTreeMap<String, Tensor>,
}

impl Gradients {
    /// Collects the gradients of `params` from a backward pass. Parameters that received none
    /// are absent.
    pub fn from_store(store: &GradStore, params: &BTreeMap<String, Var>) -> Result<Self> {
        let mut grads = BTreeMap::new();
        for (name, var) in params {
            if let Some(g) = store.get(var.as_tensor()) {
                grads.insert(name.clone(), g.to_dtype(DType::F32)?);
            }
        }
        Ok(Self { grads })
    }

    /// `loss.backward()` restricted to `params`.
    pub fn backward(loss: &Tensor, params: &BTreeMap<String, Var>) -> Result<Self> {
        let store = loss.backward()?;
        Self::from_store(&store, params)
    }

    /// `self += scale * other` (gradient accumulation over micro-batches).
    pub fn accumulate(&mut self, other: &Gradients, scale: f64) -> Result<()> {
        for (name, g) in &other.grads {
            let scaled = (g * scale)?;
            let next = match self.grads.get(name) {
                Some(acc) => (acc + scaled)?,
                None => scaled,
            };
            self.grads.insert(name.clone(), next);
        }
        Ok(())
    }

    pub fn scale(&mut self, s: f64) -> Result<()> {
        for g in self.grads.values_mut() {
            *g = (&*g * s)?;
        }
        Ok(())
    }

    /// The L2 norm over every gradient. Each tensor's sum of squares stays on the gradients'
    /// device and all of them come back in one transfer (one per tensor would stall a GPU
    /// hundreds of times a step); they are added in f64 on the host, in name order.
    pub fn global_norm(&self) -> Result<f64> {
        let sums = (self.grads.values())
            .map(|g| g.sqr()?.sum_all())
            .collect::<candle_core::Result<Vec<_>>>()?;
        if sums.is_empty() {
            return Ok(0.0);
        }
        let sums = Tensor::stack(&sums, 0)?.to_vec1::<f32>()?;
        Ok(sums.iter().map(|&s| s as f64).sum::<f64>().sqrt())
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Factor the gradients were multiplied by (1 when not clipped).
    pub clip_scale: f64,
    pub step: u64,
}

#[derive(Debug)]
pub struct AdamW {
    cfg: AdamWConfig,
    params: BTreeMap<String, Var>,
    exp_avg: BTreeMap<String, Tensor>,
    exp_avg_sq: BTreeMap<String, Tensor>,
    step: u64,
}

impl AdamW {
    pub fn new(params: BTreeMap<String, Var>, cfg: AdamWConfig) -> Result<Self> {
        let mut exp_avg = BTreeMap::new();
        let mut exp_avg_sq = BTreeMap::new();
        for (name, var) in &params {
            let z = Tensor::zeros(var.shape(), DType::F32, var.device())?;
            exp_avg.insert(name.clone(), z.clone());
            exp_avg_sq.insert(name.clone(), z);
        }
        Ok(Self {
            cfg,
            params,
            exp_avg,
            exp_avg_sq,
            step: 0,
        })
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }
    pub fn step_count(&self) -> u64 {
        self.step
    }
    pub fn params(&self) -> &BTreeMap<String, Var> {
        &self.params
    }

    /// One update at learning rate `lr`. A non-finite gradient norm is refused before any
    /// parameter changes.
    pub fn step(&mut self, grads: &Gradients, lr: f64) -> Result<StepStats> {
        for name in grads.grads.keys() {
            if !self.params.contains_key(name) {
                return Err(ModelError::input(format!(
                    "gradient for `{name}`, which this optimizer does not own"
                )));
            }
        }
        let grad_norm = grads.global_norm()?;
        if !grad_norm.is_finite() {
            return Err(ModelError::NonFinite(format!(
                "gradient norm is {grad_norm} at step {}; the update was skipped",
                self.step + 1
            )));
        }
        let clip_scale = match self.cfg.max_grad_norm {
            Some(max) if grad_norm > max => max / (grad_norm + 1e-6),
            _ => 1.0,
        };
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let bias1 = 1.0 - b1.powi(t);
        let bias2 = 1.0 - b2.powi(t);
        for (name, var) in &self.params {
            let Some(g) = grads.grads.get(name) else {
                continue;
            };
            let g = (g * clip_scale)?;
            let m = ((&self.exp_avg[name] * b1)? + (&g * (1.0 - b1))?)?;
            let v = ((&self.exp_avg_sq[name] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let update = ((&m / bias1)? / ((&v / bias2)?.sqrt()? + self.cfg.eps)?)?;
            let p = var.as_tensor().to_dtype(DType::F32)?;
            let decay = if var.rank() >= 2 || self.cfg.decay_1d {
                self.cfg.weight_decay
            } else {
                0.0
            };
            let p = ((p * (1.0 - lr * decay))? - (update * lr)?)?;
            var.set(&p.to_dtype(var.dtype())?)?;
            self.exp_avg.insert(name.clone(), m);
            self.exp_avg_sq.insert(name.clone(), v);
        }
        Ok(StepStats {
            grad_norm,
            clip_scale,
            step: self.step,
        })
    }

    /// Saves the moments and the step count to a safetensors file (atomically).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = BTreeMap::new();
        for (name, m) in &self.exp_avg {
            tensors.insert(format!("{name}.exp_avg"), m.clone());
            tensors.insert(format!("{name}.exp_avg_sq"), self.exp_avg_sq[name].clone());
        }
        let mut meta = HashMap::new();
        meta.insert("step".to_string(), self.step.to_string());
        meta.insert(
            "config".to_string(),
            serde_json::to_string(&self.cfg).map_err(|e| ModelError::input(e.to_string()))?,
        );
        write_atomic(path, &safetensors_bytes(&tensors, Some(meta))?)
    }

    /// Restores the moments and step count saved by [`AdamW::save`]; the parameter set and
    /// shapes must match exactly.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
        let bad = |reason: String| ModelError::Checkpoint {
            path: path.to_path_buf(),
            reason,
        };
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let step: u64 = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("step"))
            .ok_or_else(|| bad("no `step` in the metadata".into()))?
            .parse()
            .map_err(|e| bad(format!("`step` is not an integer: {e}")))?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, &candle_core::Device::Cpu)
            .map_err(|e| bad(format!("unreadable tensors: {e}")))?;
        let mut exp_avg = BTreeMap::new();
        let mut exp_avg_sq = BTreeMap::new();
        for (name, var) in &self.params {
            for (suffix, out) in [("exp_avg", &mut exp_avg), ("exp_avg_sq", &mut exp_avg_sq)] {
                let key = format!("{name}.{suffix}");
                let t = tensors
                    .get(&key)
                    .ok_or_else(|| bad(format!("tensor `{key}` is missing")))?;
                if t.dims() != var.dims() {
                    return Err(bad(format!(
                        "tensor `{key}` has shape {:?}, the parameter has {:?}",
                        t.dims(),
                        var.dims()
                    )));
                }
                out.insert(
                    name.clone(),
                    t.to_dtype(DType::F32)?.to_device(var.device())?,
                );
            }
        }
        if tensors.len() != 2 * self.params.len() {
            let extra = tensors
                .keys()
                .find(|k| {
                    let base = k
                        .strip_suffix(".exp_avg_sq")
                        .or_else(|| k.strip_suffix(".exp_avg"))
                        .unwrap_or(k);
                    !self.params.contains_key(base)
                })
                .cloned()
                .unwrap_or_default();
            return Err(bad(format!("unexpected tensor `{extra}`")));
        }
        self.exp_avg = exp_avg;
        self.exp_avg_sq = exp_avg_sq;
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn one_param(values: &[f32]) -> (BTreeMap<String, Var>, Var) {
        let var = Var::from_tensor(
            &Tensor::new(values, &Device::Cpu)
                .unwrap()
                .reshape((1, values.len()))
                .unwrap(),
        )
        .unwrap();
        (BTreeMap::from([("w".to_string(), var.clone())]), var)
    }

    fn grads(values: &[f32]) -> Gradients {
        let g = Tensor::new(values, &Device::Cpu)
            .unwrap()
            .reshape((1, values.len()))
            .unwrap();
        Gradients {
            grads: BTreeMap::from([("w".to_string(), g)]),
        }
    }

    /// The first AdamW step moves every coordinate by lr * sign(g) (bias-corrected m/sqrt(v) is
    /// g/|g|) after decoupled weight decay, whatever the clipping; clipping shows in the stats
    /// and in the moments.
    #[test]
    fn first_step_matches_the_closed_form_and_clipping_scales_the_gradient() {
        let (params, var) = one_param(&[1.0, -2.0]);
        let cfg = AdamWConfig {
            weight_decay: 0.1,
            max_grad_norm: Some(1.0),
            eps: 0.0,
            ..Default::default()
        };
        let mut opt = AdamW::new(params, cfg).unwrap();
        let stats = opt.step(&grads(&[3.0, -4.0]), 0.01).unwrap();
        assert!((stats.grad_norm - 5.0).abs() < 1e-6);
        assert!((stats.clip_scale - 0.2).abs() < 1e-6);
        let w: Vec<Vec<f32>> = var.as_tensor().to_vec2().unwrap();
        let expected = [
            1.0 * (1.0 - 0.01 * 0.1) - 0.01,
            -2.0 * (1.0 - 0.01 * 0.1) + 0.01,
        ];
        for (a, e) in w[0].iter().zip(expected) {
            assert!((a - e).abs() < 1e-6, "{a} vs {e}");
        }
        let m: Vec<Vec<f32>> = opt.exp_avg["w"].to_vec2().unwrap();
        assert!(
            (m[0][0] - 0.1 * 3.0 * 0.2).abs() < 1e-6,
            "moment uses the clipped gradient"
        );
    }

    #[test]
    fn state_for_another_parameter_set_is_refused() {
        let (params, _) = one_param(&[1.0, 2.0]);
        let mut opt = AdamW::new(params, AdamWConfig::default()).unwrap();
        opt.step(&grads(&[1.0, 1.0]), 0.1).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("opt.safetensors");
        opt.save(&path).unwrap();
        let (other, _) = one_param(&[1.0, 2.0, 3.0]);
        let mut wrong = AdamW::new(other, AdamWConfig::default()).unwrap();
        let err = wrong.load(&path).unwrap_err().to_string();
        assert!(err.contains("w.exp_avg") && err.contains("shape"), "{err}");
        assert_eq!(wrong.step_count(), 0);
    }
}
