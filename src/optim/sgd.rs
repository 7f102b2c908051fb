//! SGD with momentum and L2 weight decay, as `torch.optim.SGD` (no dampening, no Nesterov).

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use super::{restore, Optimizer};
use crate::error::Result;

#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub lr: f64,
    pub momentum: f64,
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
            if let Some(grad) = grads.get(&slot.param) {
                reference_step(slot, grad, self.settings)?;
            }
        }
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.settings.lr
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

/// One parameter's update composed from candle's tensor operations (the CPU path: SGD is the
/// set-up check's optimizer, a handful of numbers).
fn reference_step(slot: &mut Slot, grad: &Tensor, s: Settings) -> Result<()> {
    let param = slot.param.as_tensor();
    let mut direction = if s.weight_decay != 0.0 {
        (grad + param.affine(s.weight_decay, 0.0)?)?
    } else {
        grad.clone()
    };
    if s.momentum != 0.0 {
        direction = match &slot.velocity {
            Some(v) => ((v * s.momentum)? + direction)?,
            None => direction,
        };
        slot.velocity = Some(direction.clone());
    }
    slot.param.set(&(param - (direction * s.lr)?)?)?;
    Ok(())
}

#[cfg(feature = "cuda")]
impl Sgd {
    /// The CUDA device, when every parameter is f32 there and kernels.cu's step applies.
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

/// Every parameter's update in one launch per group of eight (kernels.cu: sgd_step).
#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backprop::GradStore;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaDevice, Tensor};

    use super::{Settings, Slot};
    use crate::error::Result;
    use crate::ops::cuda::{address, kernel, per_tensor, GROUP};

    #[repr(C)]
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
    }

    // SAFETY: device addresses, lengths and flags, laid out as kernels.cu's `SgdGroup`.
    unsafe impl DeviceRepr for SgdGroup {}
    // SAFETY: f32 figures, laid out as kernels.cu's `SgdStep`.
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
        };
        let func = kernel(device, "sgd_step")?;
        let stream = device.cuda_stream();
        for group in updates.chunks(GROUP) {
            let mut args = SgdGroup {
                param: [0; GROUP],
                grad: [0; GROUP],
                velocity: [0; GROUP],
                len: [0; GROUP],
                first: [0; GROUP],
            };
            let mut longest = 0;
            for (at, (slot, grad, first)) in group.iter().enumerate() {
                let len = slot.param.elem_count();
                args.param[at] = address(slot.param.as_tensor(), &stream)?;
                args.grad[at] = address(grad, &stream)?;
                if let Some(velocity) = &slot.velocity {
                    args.velocity[at] = address(velocity, &stream)?;
                }
                args.len[at] = u32::try_from(len).map_err(|_| {
                    candle_core::Error::Msg(format!("sgd: {} has {len} elements", slot.name))
                })?;
                args.first[at] = u32::from(*first);
                longest = longest.max(len);
            }
            let mut launch = stream.launch_builder(&func);
            launch.arg(&args).arg(&figures);
            // SAFETY: as in Adam's step: live contiguous f32 buffers of `len` elements, one
            // stream; the velocity address is read only with momentum, when it is set.
            unsafe { launch.launch(per_tensor(group.len(), longest)) }.w()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::quadratic_grads;
    use candle_core::Device;

    #[test]
    fn momentum_and_weight_decay_follow_pytorch() {
        // f(p) = p^2 from p = 1, lr 0.1, momentum 0.9, wd 0.5:
        // step 1: d = 2 + 0.5 = 2.5, buf = 2.5, p = 0.75
        // step 2: d = 1.5 + 0.375 = 1.875, buf = 0.9 * 2.5 + 1.875 = 4.125, p = 0.3375
        let p = Var::new(&[1.0f32], &Device::Cpu).unwrap();
        let mut sgd = Sgd::new(
            vec![("p".into(), p.clone())],
            Settings {
                lr: 0.1,
                momentum: 0.9,
                weight_decay: 0.5,
            },
        );
        for _ in 0..2 {
            let grads = quadratic_grads(&p);
            sgd.step(&grads).unwrap();
        }
        let got = p.as_tensor().to_vec1::<f32>().unwrap()[0];
        assert!((got - 0.3375).abs() < 1e-6, "{got}");
    }
}
