//! Adam (Kingma & Ba), written as `torch.optim.Adam` computes it, L2 `weight_decay` included,
//! and AdamW (Loshchilov & Hutter) as `torch.optim.AdamW`: the decay applied to the parameter
//! itself (`p *= 1 - lr * weight_decay`) before the update, not through the gradient.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, Device, InplaceOp2, InplaceOp3, Layout, Tensor, Var};

use super::{restore, Optimizer};
use crate::error::{Error, Result};
use crate::ops::{contiguous_f32, contiguous_f32_mut};

#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// AdamW's decoupled weight decay instead of Adam's L2 term.
    pub decoupled: bool,
}

struct Slot {
    name: String,
    param: Var,
    /// PyTorch's `exp_avg` then `exp_avg_sq`, as one [2, numel] tensor: the fused step updates
    /// both in place.
    moments: Tensor,
}

impl Slot {
    fn moment(&self, which: usize) -> Result<Tensor> {
        Ok(self.moments.get(which)?.reshape(self.param.shape())?)
    }
}

pub struct Adam {
    slots: Vec<Slot>,
    settings: Settings,
    step: u64,
}

impl Adam {
    pub fn new(params: Vec<(String, Var)>, settings: Settings) -> Result<Self> {
        let slots = params
            .into_iter()
            .map(|(name, param)| {
                let moments =
                    Tensor::zeros((2, param.elem_count()), param.dtype(), param.device())?;
                Ok(Slot {
                    name,
                    param,
                    moments,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            slots,
            settings,
            step: 0,
        })
    }
}

/// Step `t`'s figures, each computed in f64 and rounded to f32 once, as candle's scalar
/// operations round them: the fused step and the reference composition agree to the bit.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct StepFigures {
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    eps: f32,
    weight_decay: f32,
    /// lr / (1 - beta1^t)
    step_size: f32,
    /// 1 / sqrt(1 - beta2^t)
    inv_bias_correction2_sqrt: f32,
    /// AdamW: 1 - lr * weight_decay, applied to the parameter first; Adam: 1.
    decay: f32,
}

impl StepFigures {
    fn new(s: &Settings, t: u64) -> Self {
        let t = t as i32;
        let (l2, decay) = if s.decoupled {
            (0.0, 1.0 - s.lr * s.weight_decay)
        } else {
            (s.weight_decay, 1.0)
        };
        Self {
            beta1: s.beta1 as f32,
            one_minus_beta1: (1.0 - s.beta1) as f32,
            beta2: s.beta2 as f32,
            one_minus_beta2: (1.0 - s.beta2) as f32,
            eps: s.eps as f32,
            weight_decay: l2 as f32,
            step_size: (s.lr / (1.0 - s.beta1.powi(t))) as f32,
            inv_bias_correction2_sqrt: (1.0 / (1.0 - s.beta2.powi(t)).sqrt()) as f32,
            decay: decay as f32,
        }
    }

    /// The gradient with weight decay, and the new moments.
    fn moments(&self, p: f32, g: f32, m: f32, v: f32) -> (f32, f32) {
        let g = if self.weight_decay != 0.0 {
            g + p * self.weight_decay
        } else {
            g
        };
        (
            m * self.beta1 + g * self.one_minus_beta1,
            v * self.beta2 + (g * g) * self.one_minus_beta2,
        )
    }

    fn param(&self, p: f32, m: f32, v: f32) -> f32 {
        let p = if self.decay != 1.0 { p * self.decay } else { p };
        let denom = v.sqrt() * self.inv_bias_correction2_sqrt + self.eps;
        p - (m / denom) * self.step_size
    }
}

impl Optimizer for Adam {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step += 1;
        let figures = StepFigures::new(&self.settings, self.step);
        let updates: Vec<(&Slot, Tensor)> = self
            .slots
            .iter()
            .filter_map(|slot| Some((slot, grads.get(&slot.param)?.contiguous())))
            .map(|(slot, grad)| Ok((slot, grad?)))
            .collect::<Result<_>>()?;
        let Some((first, _)) = updates.first() else {
            return Ok(());
        };
        let fused = updates
            .iter()
            .all(|(s, g)| s.param.dtype() == DType::F32 && g.dtype() == DType::F32);
        match first.param.device() {
            Device::Cpu if fused => {
                for (slot, grad) in &updates {
                    cpu_step(slot, grad, figures)?;
                }
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(device) if fused => cuda::step(device, &updates, figures)?,
            _ => {
                for (slot, grad) in &updates {
                    reference_step(slot, grad, &self.settings, self.step)?;
                }
            }
        }
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.settings.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.settings.lr = lr;
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        // f64 holds every step count a run can reach exactly.
        let mut state = vec![(
            STEP.to_string(),
            Tensor::new(self.step as f64, &Device::Cpu)?,
        )];
        for slot in &self.slots {
            state.push((format!("exp_avg/{}", slot.name), slot.moment(0)?));
            state.push((format!("exp_avg_sq/{}", slot.name), slot.moment(1)?));
        }
        Ok(state)
    }

    fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let step = state.get(STEP).ok_or_else(|| {
            Error::CheckpointMismatch(
                "Adam's step count is missing (a checkpoint of another optimizer?)".into(),
            )
        })?;
        let step = step.to_scalar::<f64>()? as u64;
        let mut restored = Vec::with_capacity(self.slots.len());
        for slot in &self.slots {
            let param = slot.param.as_tensor();
            let m = restore(state, &format!("exp_avg/{}", slot.name), param)?;
            let v = restore(state, &format!("exp_avg_sq/{}", slot.name), param)?;
            restored.push(Tensor::stack(&[m.flatten_all()?, v.flatten_all()?], 0)?);
        }
        // Only once everything checked out: a failed load leaves the optimizer as it was.
        for (slot, moments) in self.slots.iter_mut().zip(restored) {
            slot.moments = moments;
        }
        self.step = step;
        Ok(())
    }
}

/// One parameter's update in two in-place passes and no temporary: the moments, then the
/// parameter (candle lends one tensor at a time for writing).
fn cpu_step(slot: &Slot, grad: &Tensor, figures: StepFigures) -> Result<()> {
    slot.moments
        .inplace_op3(grad, slot.param.as_tensor(), &UpdateMoments(figures))?;
    slot.param
        .as_tensor()
        .inplace_op2(&slot.moments, &UpdateParam(figures))?;
    Ok(())
}

/// The same update composed from candle's tensor operations: the reference the fused steps are
/// tested against, and the path for other backends and dtypes.
fn reference_step(slot: &Slot, grad: &Tensor, s: &Settings, t: u64) -> Result<()> {
    let t = t as i32;
    let step_size = s.lr / (1.0 - s.beta1.powi(t));
    let bias_correction2_sqrt = (1.0 - s.beta2.powi(t)).sqrt();
    let figures = StepFigures::new(s, t as u64);
    let param = if s.decoupled {
        slot.param
            .as_tensor()
            .affine(f64::from(figures.decay), 0.0)?
    } else {
        slot.param.as_tensor().clone()
    };
    let grad = if s.weight_decay != 0.0 && !s.decoupled {
        (grad + param.affine(s.weight_decay, 0.0)?)?
    } else {
        grad.clone()
    };
    let m = ((slot.moment(0)? * s.beta1)? + (&grad * (1.0 - s.beta1))?)?;
    let v = ((slot.moment(1)? * s.beta2)? + (grad.sqr()? * (1.0 - s.beta2))?)?;
    let denom = ((v.sqrt()? / bias_correction2_sqrt)? + s.eps)?;
    let update = ((&m / denom)? * step_size)?;
    slot.param.set(&(&param - update)?)?;
    let moments = Tensor::stack(&[m.flatten_all()?, v.flatten_all()?], 0)?;
    slot.moments.slice_set(&moments, 0, 0)?;
    Ok(())
}

/// moments [2, n] <- (grad, param): the new exp_avg and exp_avg_sq.
struct UpdateMoments(StepFigures);

impl InplaceOp3 for UpdateMoments {
    fn name(&self) -> &'static str {
        "kiln-adam-moments"
    }

    fn cpu_fwd(
        &self,
        ms: &mut CpuStorage,
        ml: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
    ) -> candle_core::Result<()> {
        let (grad, param) = (
            contiguous_f32(gs, gl, "gradient")?,
            contiguous_f32(ps, pl, "parameter")?,
        );
        let (m, v) = contiguous_f32_mut(ms, ml, "moments")?.split_at_mut(param.len());
        for (((m, v), &g), &p) in m.iter_mut().zip(v).zip(grad).zip(param) {
            (*m, *v) = self.0.moments(p, g, *m, *v);
        }
        Ok(())
    }
}

/// param <- moments [2, n]: the step itself.
struct UpdateParam(StepFigures);

impl InplaceOp2 for UpdateParam {
    fn name(&self) -> &'static str {
        "kiln-adam-param"
    }

    fn cpu_fwd(
        &self,
        ps: &mut CpuStorage,
        pl: &Layout,
        ms: &CpuStorage,
        ml: &Layout,
    ) -> candle_core::Result<()> {
        let param = contiguous_f32_mut(ps, pl, "parameter")?;
        let (m, v) = contiguous_f32(ms, ml, "moments")?.split_at(param.len());
        for ((p, &m), &v) in param.iter_mut().zip(m).zip(v) {
            *p = self.0.param(*p, m, v);
        }
        Ok(())
    }
}

/// Every parameter's update in one launch per group of eight (optim/kernels.cu: adam_step).
#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{CudaStream, DeviceRepr};
    use candle_core::{CudaDevice, Tensor};

    use super::super::cuda::{address, launch_groups, len32, GROUP};
    use super::{Slot, StepFigures};
    use crate::error::Result;

    #[repr(C)]
    #[derive(Default)]
    struct AdamGroup {
        param: [u64; GROUP],
        grad: [u64; GROUP],
        m: [u64; GROUP],
        v: [u64; GROUP],
        len: [u32; GROUP],
    }

    // SAFETY: device addresses and lengths, laid out as optim/kernels.cu's `AdamGroup`.
    unsafe impl DeviceRepr for AdamGroup {}
    // SAFETY: f32 figures, laid out as optim/kernels.cu's `AdamStep`.
    unsafe impl DeviceRepr for StepFigures {}

    pub(super) fn step(
        device: &CudaDevice,
        updates: &[(&Slot, Tensor)],
        figures: StepFigures,
    ) -> Result<()> {
        // SAFETY: AdamGroup and StepFigures are adam_step's arguments; every address is a live
        // contiguous f32 buffer of `len` elements (two for the moments) held by this optimizer
        // or the gradient store until the launch is queued. The kernel writes only the
        // parameters and moments, which nothing else reads until the next step.
        unsafe { launch_groups(device, "adam_step", updates, &figures, fill) }
    }

    /// Writes update `at`'s addresses and length into the group; returns the length.
    fn fill(
        args: &mut AdamGroup,
        at: usize,
        (slot, grad): &(&Slot, Tensor),
        stream: &CudaStream,
    ) -> Result<usize> {
        let len = slot.param.elem_count();
        args.param[at] = address(slot.param.as_tensor(), stream)?;
        args.grad[at] = address(grad, stream)?;
        args.m[at] = address(&slot.moments, stream)?;
        // The moments are [2, n]: exp_avg_sq follows exp_avg.
        args.v[at] = args.m[at] + (len * std::mem::size_of::<f32>()) as u64;
        args.len[at] = len32("adam", &slot.name, len)?;
        Ok(len)
    }
}

const STEP: &str = "step";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::quadratic_grads;
    use candle_core::Device;

    /// Two steps on f(p) = sum(p^2) against values worked out with torch.optim.Adam's formulas.
    #[test]
    fn matches_pytorch_on_a_quadratic() {
        let p = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
        let settings = Settings {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            decoupled: false,
        };
        let mut adam = Adam::new(vec![("p".into(), p.clone())], settings).unwrap();
        for _ in 0..2 {
            let grads = quadratic_grads(&p);
            adam.step(&grads).unwrap();
        }
        // Step 1 moves each coordinate by lr against its gradient's sign; step 2 is worked out
        // in f64 below, following PyTorch's update (bias corrections 1 - beta^2).
        let expected: Vec<f32> = [1.0f64, -2.0]
            .iter()
            .map(|&p0| {
                let (b1, b2, lr, eps) = (0.9f64, 0.999f64, 0.1, 1e-8);
                let g1 = 2.0 * p0;
                let p1 = p0 - lr * g1.signum();
                let g2 = 2.0 * p1;
                let m = b1 * (1.0 - b1) * g1 + (1.0 - b1) * g2;
                let v = b2 * (1.0 - b2) * g1 * g1 + (1.0 - b2) * g2 * g2;
                let denom = v.sqrt() / (1.0 - b2 * b2).sqrt() + eps;
                (p1 - lr / (1.0 - b1 * b1) * m / denom) as f32
            })
            .collect();
        let got = p.as_tensor().to_vec1::<f32>().unwrap();
        for (g, e) in got.iter().zip(&expected) {
            assert!((g - e).abs() < 1e-5, "got {got:?}, expected {expected:?}");
        }
    }

    /// The fused step against the composition of candle operations, five steps with weight
    /// decay on a matrix and a vector: the same bits.
    #[test]
    fn fused_step_matches_the_reference_bit_for_bit() {
        let settings = Settings {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.05,
            decoupled: false,
        };
        let init = |seed| crate::ops::random_tensor(&[3, 7], seed);
        let run = |fused: bool| -> Vec<u32> {
            let (a, b) = (
                Var::from_tensor(&init(1)).unwrap(),
                Var::from_tensor(&init(2).get(0).unwrap()).unwrap(),
            );
            let mut adam = Adam::new(
                vec![("a".into(), a.clone()), ("b".into(), b.clone())],
                settings,
            )
            .unwrap();
            for _ in 0..5 {
                let loss = (a.as_tensor().sqr().unwrap().sum_all().unwrap()
                    + (b.as_tensor() * 3.0)
                        .unwrap()
                        .sin()
                        .unwrap()
                        .sum_all()
                        .unwrap())
                .unwrap();
                let grads = loss.backward().unwrap();
                if fused {
                    adam.step(&grads).unwrap();
                } else {
                    adam.step += 1;
                    for slot in &adam.slots {
                        reference_step(slot, grads.get(&slot.param).unwrap(), &settings, adam.step)
                            .unwrap();
                    }
                }
            }
            [
                a.as_tensor().flatten_all().unwrap(),
                b.as_tensor().clone(),
                adam.slots[0].moments.flatten_all().unwrap(),
            ]
            .iter()
            .flat_map(|t| t.to_vec1::<f32>().unwrap())
            .map(f32::to_bits)
            .collect()
        };
        assert_eq!(run(true), run(false));
    }

    #[test]
    fn state_round_trips_and_continues_identically() {
        let settings = Settings {
            lr: 0.05,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.01,
            decoupled: false,
        };
        let quadratic_step = |opt: &mut Adam, p: &Var| {
            let grads = quadratic_grads(p);
            opt.step(&grads).unwrap();
        };
        let p = Var::new(&[1.0f32, -2.0, 0.5], &Device::Cpu).unwrap();
        let mut straight = Adam::new(vec![("p".into(), p.clone())], settings).unwrap();
        for _ in 0..3 {
            quadratic_step(&mut straight, &p);
        }
        let saved: HashMap<String, Tensor> = straight.state().unwrap().into_iter().collect();
        // A copy: Var::from_tensor would share p's storage, and the two runs would step it twice.
        let q = Var::new(p.to_vec1::<f32>().unwrap(), &Device::Cpu).unwrap();
        let mut resumed = Adam::new(vec![("p".into(), q.clone())], settings).unwrap();
        resumed.load_state(&saved).unwrap();
        quadratic_step(&mut straight, &p);
        quadratic_step(&mut resumed, &q);
        let bits = |v: &Var| -> Vec<u32> {
            v.to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect()
        };
        assert_eq!(bits(&p), bits(&q));

        let mut wrong = Adam::new(vec![("other".into(), q)], settings).unwrap();
        let err = wrong.load_state(&saved).unwrap_err().to_string();
        assert!(err.contains("exp_avg/other"), "{err}");
    }

    /// torch.optim.Adam and AdamW (torch 2.15, float32) with lr 0.1 and weight_decay 0.05,
    /// three steps on f(p) = sum(p^2) from [1, -2, 0.5]: the L2 and the decoupled decay.
    #[test]
    fn weight_decay_matches_pytorchs_adam_and_adamw() {
        for (decoupled, want) in [
            (false, [0.70158625f32, -1.7006234, 0.20487127]),
            (true, [0.68827003, -1.672348, 0.19910657]),
        ] {
            let p = Var::new(&[1.0f32, -2.0, 0.5], &Device::Cpu).unwrap();
            let settings = Settings {
                lr: 0.1,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.05,
                decoupled,
            };
            let mut adam = Adam::new(vec![("p".into(), p.clone())], settings).unwrap();
            for _ in 0..3 {
                adam.step(&quadratic_grads(&p)).unwrap();
            }
            let got = p.as_tensor().to_vec1::<f32>().unwrap();
            for (g, w) in got.iter().zip(want) {
                assert!(
                    (g - w).abs() <= 2e-7 * w.abs().max(1.0),
                    "decoupled {decoupled}: {got:?} vs {want:?}"
                );
            }
        }
    }
}
