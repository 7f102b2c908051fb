//! SGD with momentum (optionally Nesterov's) and L2 weight decay, as `torch.optim.SGD` (no
//! dampening).

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Tensor, Var};

use super::{restore, Optimizer};
use crate::error::Result;
use crate::ops::{contiguous_f32, contiguous_f32_mut};

#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub lr: f64,
    pub momentum: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
}

struct Slot {
    name: String,
    param: Var,
    /// PyTorch's `momentum_buffer`: absent until the first step, which sets it to the gradient.
    velocity: Option<Tensor>,
}

pub struct Sgd {
    slots: Vec<Slot>,
    settings: Settings,
}

impl Sgd {
    pub fn new(params: Vec<(String, Var)>, settings: Settings) -> Self {
        let slots = params
            .into_iter()
            .map(|(name, param)| Slot {
                name,
                param,
                velocity: None,
            })
            .collect();
        Self { slots, settings }
    }
}

impl Optimizer for Sgd {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Some(device) = self.fused_on(grads) {
            return cuda::step(&device, &mut self.slots, grads, self.settings);
        }
        for slot in &mut self.slots {
            let Some(grad) = grads.get(&slot.param) else {
                continue;
            };
            let f32s = slot.param.dtype() == DType::F32 && grad.dtype() == DType::F32;
            if slot.param.device().is_cpu() && f32s {
                cpu_step(slot, &grad.contiguous()?, self.settings)?;
            } else {
                reference_step(slot, grad, self.settings)?;
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
        Ok(self
            .slots
            .iter()
            .filter_map(|slot| {
                Some((
                    format!("momentum_buffer/{}", slot.name),
                    slot.velocity.clone()?,
                ))
            })
            .collect())
    }

    fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let mut restored = Vec::with_capacity(self.slots.len());
        for slot in &self.slots {
            let name = format!("momentum_buffer/{}", slot.name);
            // A buffer is absent until the first step with momentum, as in PyTorch.
            let velocity = if state.contains_key(&name) {
                Some(restore(state, &name, slot.param.as_tensor())?)
            } else {
                None
            };
            restored.push(velocity);
        }
        for (slot, velocity) in self.slots.iter_mut().zip(restored) {
            slot.velocity = velocity;
        }
        Ok(())
    }
}

/// One parameter's update composed from candle's tensor operations: the reference the fused
/// CPU step is held to, and the path for other backends and dtypes.
fn reference_step(slot: &mut Slot, grad: &Tensor, s: Settings) -> Result<()> {
    let param = slot.param.as_tensor();
    let mut direction = if s.weight_decay != 0.0 {
        (grad + param.affine(s.weight_decay, 0.0)?)?
    } else {
        grad.clone()
    };
    if s.momentum != 0.0 {
        let buffer = match &slot.velocity {
            Some(v) => ((v * s.momentum)? + &direction)?,
            None => direction.clone(),
        };
        direction = if s.nesterov {
            (direction + (&buffer * s.momentum)?)?
        } else {
            buffer.clone()
        };
        slot.velocity = Some(buffer);
    }
    slot.param.set(&(param - (direction * s.lr)?)?)?;
    Ok(())
}

/// The same update in place, with no temporary: the momentum buffer, then the parameter
/// (candle lends one tensor at a time for writing). A new buffer starts at zero, which gives
/// PyTorch's first buffer (the direction itself).
fn cpu_step(slot: &mut Slot, grad: &Tensor, s: Settings) -> Result<()> {
    let param = slot.param.as_tensor();
    if s.momentum == 0.0 {
        param.inplace_op2(grad, &UpdateParam(s))?;
        return Ok(());
    }
    let velocity = match &slot.velocity {
        Some(v) => v.clone(),
        None => {
            let zeros = param.zeros_like()?;
            slot.velocity = Some(zeros.clone());
            zeros
        }
    };
    velocity.inplace_op3(grad, param, &UpdateBuffer(s))?;
    param.inplace_op3(grad, &velocity, &UpdateParam(s))?;
    Ok(())
}

impl Settings {
    /// The gradient with the L2 term: PyTorch's `d_p`.
    fn direction(&self, g: f32, p: f32) -> f32 {
        if self.weight_decay != 0.0 {
            g + p * self.weight_decay as f32
        } else {
            g
        }
    }
}

/// buffer <- buffer * momentum + d_p.
struct UpdateBuffer(Settings);

impl InplaceOp3 for UpdateBuffer {
    fn name(&self) -> &'static str {
        "kiln-sgd-buffer"
    }

    fn cpu_fwd(
        &self,
        bs: &mut CpuStorage,
        bl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
    ) -> candle_core::Result<()> {
        let (grad, param) = (
            contiguous_f32(gs, gl, "gradient")?,
            contiguous_f32(ps, pl, "parameter")?,
        );
        let momentum = self.0.momentum as f32;
        let buffer = contiguous_f32_mut(bs, bl, "momentum buffer")?;
        for ((b, &g), &p) in buffer.iter_mut().zip(grad).zip(param) {
            *b = *b * momentum + self.0.direction(g, p);
        }
        Ok(())
    }
}

/// param <- param - lr * step, the step being d_p (no momentum), the buffer, or with Nesterov
/// d_p + momentum * buffer.
struct UpdateParam(Settings);

impl UpdateParam {
    fn apply(&self, param: &mut [f32], grad: &[f32], buffer: Option<&[f32]>) {
        let (lr, momentum) = (self.0.lr as f32, self.0.momentum as f32);
        for (i, (p, &g)) in param.iter_mut().zip(grad).enumerate() {
            let direction = self.0.direction(g, *p);
            let step = match buffer {
                None => direction,
                Some(b) if self.0.nesterov => direction + b[i] * momentum,
                Some(b) => b[i],
            };
            *p -= step * lr;
        }
    }
}

impl InplaceOp2 for UpdateParam {
    fn name(&self) -> &'static str {
        "kiln-sgd-param"
    }

    fn cpu_fwd(
        &self,
        ps: &mut CpuStorage,
        pl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        let grad = contiguous_f32(gs, gl, "gradient")?;
        self.apply(contiguous_f32_mut(ps, pl, "parameter")?, grad, None);
        Ok(())
    }
}

impl InplaceOp3 for UpdateParam {
    fn name(&self) -> &'static str {
        "kiln-sgd-param"
    }

    fn cpu_fwd(
        &self,
        ps: &mut CpuStorage,
        pl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<()> {
        let (grad, buffer) = (
            contiguous_f32(gs, gl, "gradient")?,
            contiguous_f32(bs, bl, "momentum buffer")?,
        );
        self.apply(contiguous_f32_mut(ps, pl, "parameter")?, grad, Some(buffer));
        Ok(())
    }
}

#[cfg(feature = "cuda")]
impl Sgd {
    /// The CUDA device, when every parameter is f32 there and optim/kernels.cu's step applies.
    fn fused_on(&self, grads: &GradStore) -> Option<candle_core::CudaDevice> {
        let first = self.slots.first()?;
        let candle_core::Device::Cuda(device) = first.param.device() else {
            return None;
        };
        let f32s = self.slots.iter().all(|slot| {
            slot.param.dtype() == candle_core::DType::F32
                && grads
                    .get(&slot.param)
                    .is_none_or(|g| g.dtype() == candle_core::DType::F32)
        });
        f32s.then(|| device.clone())
    }
}

/// Every parameter's update in one launch per group of eight (optim/kernels.cu: sgd_step).
#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backprop::GradStore;
    use candle_core::cuda_backend::cudarc::driver::{CudaStream, DeviceRepr};
    use candle_core::{CudaDevice, Tensor};

    use super::super::cuda::{address, launch_groups, len32, GROUP};
    use super::{Settings, Slot};
    use crate::error::Result;

    #[repr(C)]
    #[derive(Default)]
    struct SgdGroup {
        param: [u64; GROUP],
        grad: [u64; GROUP],
        velocity: [u64; GROUP],
        len: [u32; GROUP],
        first: [u32; GROUP],
    }

    #[repr(C)]
    struct SgdStep {
        lr: f32,
        momentum: f32,
        weight_decay: f32,
        nesterov: u32,
    }

    // SAFETY: device addresses, lengths and flags, laid out as optim/kernels.cu's `SgdGroup`.
    unsafe impl DeviceRepr for SgdGroup {}
    // SAFETY: f32 figures, laid out as optim/kernels.cu's `SgdStep`.
    unsafe impl DeviceRepr for SgdStep {}

    pub(super) fn step(
        device: &CudaDevice,
        slots: &mut [Slot],
        grads: &GradStore,
        s: Settings,
    ) -> Result<()> {
        let with_momentum = s.momentum != 0.0;
        let mut updates: Vec<(&Slot, Tensor, bool)> = Vec::new();
        for slot in slots.iter_mut() {
            let Some(grad) = grads.get(&slot.param) else {
                continue;
            };
            // The buffer's first value is the first direction; the kernel writes it whole.
            let first = with_momentum && slot.velocity.is_none();
            if first {
                slot.velocity = Some(slot.param.zeros_like()?);
            }
            updates.push((slot, grad.contiguous()?, first));
        }
        let figures = SgdStep {
            lr: s.lr as f32,
            momentum: s.momentum as f32,
            weight_decay: s.weight_decay as f32,
            nesterov: u32::from(s.nesterov),
        };
        // SAFETY: SgdGroup and SgdStep are sgd_step's arguments; as in Adam's step: live
        // contiguous f32 buffers of `len` elements, one stream; the velocity address is read
        // only with momentum, when it is set.
        unsafe { launch_groups(device, "sgd_step", &updates, &figures, fill) }
    }

    /// Writes update `at`'s addresses, length and first-step flag into the group; returns the
    /// length.
    fn fill(
        args: &mut SgdGroup,
        at: usize,
        (slot, grad, first): &(&Slot, Tensor, bool),
        stream: &CudaStream,
    ) -> Result<usize> {
        let len = slot.param.elem_count();
        args.param[at] = address(slot.param.as_tensor(), stream)?;
        args.grad[at] = address(grad, stream)?;
        if let Some(velocity) = &slot.velocity {
            args.velocity[at] = address(velocity, stream)?;
        }
        args.len[at] = len32("sgd", &slot.name, len)?;
        args.first[at] = u32::from(*first);
        Ok(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::quadratic_grads;
    use candle_core::Device;

    fn settings(nesterov: bool) -> Settings {
        Settings {
            lr: 0.1,
            momentum: 0.9,
            nesterov,
            weight_decay: 0.5,
        }
    }

    #[test]
    fn momentum_nesterov_and_weight_decay_follow_pytorch() {
        // f(p) = p^2 from p = 1, lr 0.1, momentum 0.9, wd 0.5:
        // step 1: d = 2 + 0.5 = 2.5, buf = 2.5, p = 0.75
        // step 2: d = 1.5 + 0.375 = 1.875, buf = 0.9 * 2.5 + 1.875 = 4.125, p = 0.3375
        // Nesterov steps by d + 0.9 * buf instead:
        // step 1: 2.5 + 2.25 = 4.75, p = 0.525
        // step 2: d = 1.05 + 0.2625 = 1.3125, buf = 2.25 + 1.3125 = 3.5625,
        //         p = 0.525 - 0.1 * (1.3125 + 3.20625) = 0.073125
        for (nesterov, want) in [(false, 0.3375f32), (true, 0.073125)] {
            let p = Var::new(&[1.0f32], &Device::Cpu).unwrap();
            let mut sgd = Sgd::new(vec![("p".into(), p.clone())], settings(nesterov));
            for _ in 0..2 {
                sgd.step(&quadratic_grads(&p)).unwrap();
            }
            let got = p.as_tensor().to_vec1::<f32>().unwrap()[0];
            assert!((got - want).abs() < 1e-6, "nesterov {nesterov}: {got}");
        }
    }

    /// The in-place CPU step gives the composition's bits, step after step.
    #[test]
    fn fused_step_matches_the_reference_bit_for_bit() {
        for (momentum, nesterov) in [(0.0, false), (0.9, false), (0.9, true)] {
            let s = Settings {
                momentum,
                nesterov,
                ..settings(false)
            };
            let start = crate::ops::random_tensor(&[3, 7], 5);
            let (fused, reference) = (
                Var::from_tensor(&start.copy().unwrap()).unwrap(),
                Var::from_tensor(&start.copy().unwrap()).unwrap(),
            );
            let mut sgd = Sgd::new(vec![("p".into(), fused.clone())], s);
            let mut slot = Slot {
                name: "p".into(),
                param: reference.clone(),
                velocity: None,
            };
            for _ in 0..4 {
                sgd.step(&quadratic_grads(&fused)).unwrap();
                let grads = quadratic_grads(&reference);
                reference_step(&mut slot, grads.get(&reference).unwrap(), s).unwrap();
            }
            let bits = |v: &Var| -> Vec<u32> {
                let values = v
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                values.iter().map(|x| x.to_bits()).collect()
            };
            assert_eq!(
                bits(&fused),
                bits(&reference),
                "momentum {momentum}, nesterov {nesterov}"
            );
        }
    }

    /// torch.optim.SGD(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4), torch 2.15,
    /// three steps on f(p) = sum(p^2) from [1, -2, 0.5].
    #[test]
    fn nesterov_matches_pytorch() {
        let p = Var::new(&[1.0f32, -2.0, 0.5], &Device::Cpu).unwrap();
        let s = Settings {
            weight_decay: 5e-4,
            ..settings(true)
        };
        let mut sgd = Sgd::new(vec![("p".into(), p.clone())], s);
        for _ in 0..3 {
            sgd.step(&quadratic_grads(&p)).unwrap();
        }
        let want = [-0.10851737f32, 0.21703474, -0.054258686];
        let got = p.as_tensor().to_vec1::<f32>().unwrap();
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() <= 1e-6, "{got:?} vs {want:?}");
        }
    }
}
