//! The layers models are built from, each holding its parameters under PyTorch's names and
//! calling kiln's ops.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Init, ModuleT, VarBuilder};

use super::init::{pytorch_uniform, Scope};
use crate::ops::{self, ConvParams, MemoryFormat};

/// `nn.Conv2d`: `weight` [CO, C, KH, KW] and, unless `bias=False`, `bias` [CO], over
/// activations in `format` (the weight keeps PyTorch's layout either way).
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub params: ConvParams,
    pub format: MemoryFormat,
}

/// `nn.Conv2d(in, out, kernel)` with square kernels and PyTorch's default init: `weight`
/// [out, in, k, k] and `bias` [out], over channels-first activations (SimpleCNN's).
pub fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    params: ConvParams,
    vb: VarBuilder,
) -> candle_core::Result<Conv2d> {
    let init = pytorch_uniform(in_channels * kernel * kernel);
    let weight = vb.get_with_hints((out_channels, in_channels, kernel, kernel), "weight", init)?;
    let bias = vb.get_with_hints(out_channels, "bias", init)?;
    Ok(Conv2d {
        weight,
        bias: Some(bias),
        params,
        format: MemoryFormat::ChannelsFirst,
    })
}

impl ModuleT for Conv2d {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        // Weights in the activations' type: f32 master weights, cast for a bf16 step (the
        // cast's gradient comes back in f32); channels last casts inside the convolution.
        let cast = |t: &Tensor| eval_detached(t, train).to_dtype(x.dtype());
        let bias = self.bias.as_ref().map(cast).transpose()?;
        match self.format {
            MemoryFormat::ChannelsFirst => {
                ops::conv2d(x, &cast(&self.weight)?, bias.as_ref(), self.params)
            }
            MemoryFormat::ChannelsLast => {
                let weight = eval_detached(&self.weight, train);
                ops::conv2d_channels_last(x, &weight, bias.as_ref(), self.params)
            }
        }
    }
}

/// `t` itself in training; in evaluation, the same storage outside the gradient graph. candle
/// has no `no_grad`: an op on a parameter records its inputs, so one evaluation pass kept every
/// activation of a batch alive (24 GB for ResNet-50 at 500 images) until its end.
pub fn eval_detached(t: &Tensor, train: bool) -> Tensor {
    if train {
        t.clone()
    } else {
        t.detach()
    }
}

/// `nn.BatchNorm2d(C)`: `weight` and `bias` (parameters), `running_mean`, `running_var` and
/// `num_batches_tracked` (buffers). Training normalises with the batch's statistics (biased
/// variance) and moves the running ones towards them (unbiased variance); evaluation uses the
/// running ones.
pub struct BatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    /// Kept on the CPU whatever the model's device: only saved, never computed with.
    num_batches_tracked: Var,
    /// The activations' layout.
    format: MemoryFormat,
    settings: NormSettings,
    /// Statistics over every replica's batch (`sync_bn`), when set.
    batch_sync: Option<Arc<dyn ops::CrossReplicaSum>>,
}

/// A batch norm's constants, PyTorch's meaning.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NormSettings {
    /// running = (1 - momentum) * running + momentum * batch.
    pub momentum: f64,
    pub eps: f64,
    /// `weight.requires_grad`: false keeps the scale at 1 (airbench's), a buffer under the same
    /// name that no optimizer sees.
    pub train_weight: bool,
}

impl Default for NormSettings {
    /// PyTorch's defaults.
    fn default() -> Self {
        Self {
            momentum: 0.1,
            eps: 1e-5,
            train_weight: true,
        }
    }
}

impl BatchNorm2d {
    /// With PyTorch's defaults (momentum 0.1, eps 1e-5).
    pub fn new(channels: usize, format: MemoryFormat, scope: &Scope) -> candle_core::Result<Self> {
        Self::with(channels, format, NormSettings::default(), scope)
    }

    pub fn with(
        channels: usize,
        format: MemoryFormat,
        settings: NormSettings,
        scope: &Scope,
    ) -> candle_core::Result<Self> {
        let param = |name, value| {
            scope
                .params
                .get_with_hints(channels, name, Init::Const(value))
        };
        let buffer = |name, value| -> candle_core::Result<Var> {
            Var::from_tensor(
                &scope
                    .buffers
                    .get_with_hints(channels, name, Init::Const(value))?,
            )
        };
        let weight = if settings.train_weight {
            param("weight", 1.0)?
        } else {
            scope
                .buffers
                .get_with_hints(channels, "weight", Init::Const(1.0))?
        };
        let tracked = scope
            .buffers
            .clone()
            .set_device(Device::Cpu)
            .get_with_hints_dtype((), "num_batches_tracked", Init::Const(0.0), DType::I64)?;
        Ok(Self {
            weight,
            bias: param("bias", 0.0)?,
            running_mean: buffer("running_mean", 0.0)?,
            running_var: buffer("running_var", 1.0)?,
            num_batches_tracked: Var::from_tensor(&tracked)?,
            format,
            settings,
            batch_sync: scope.batch_sync.clone(),
        })
    }

    /// The layer's output through `act` (one pass where kiln's kernels fuse it).
    pub fn forward(
        &self,
        x: &Tensor,
        train: bool,
        act: ops::Activation,
    ) -> candle_core::Result<Tensor> {
        if !train {
            return ops::batch_norm_eval(
                x,
                &self.weight.detach(),
                &self.bias.detach(),
                &self.running_mean.as_tensor().detach(),
                &self.running_var.as_tensor().detach(),
                self.settings.eps,
                act,
                self.format,
            );
        }
        if let Some(replicas) = &self.batch_sync {
            let out = ops::batch_norm_train_synced(
                x,
                &self.weight,
                &self.bias,
                self.settings.eps,
                act,
                self.format,
                replicas,
            )?;
            self.track(out.count, &out.statistics)?;
            return Ok(out.y);
        }
        let (y, statistics) = ops::batch_norm_train(
            x,
            &self.weight,
            &self.bias,
            self.settings.eps,
            act,
            self.format,
        )?
        .split();
        self.track(self.count(x)?, &statistics)?;
        Ok(y)
    }

    /// `relu(self(x) + shortcut)`, a residual block's end; in training one node of the graph
    /// ([`ops::batch_norm_add_relu_train`]), so the normalised values are not kept for the
    /// backward pass.
    pub fn forward_add_relu(
        &self,
        x: &Tensor,
        shortcut: Shortcut,
        train: bool,
    ) -> candle_core::Result<Tensor> {
        if !train {
            let joined = match shortcut {
                Shortcut::Identity(r) => r.clone(),
                Shortcut::Normalised(norm, r) => {
                    norm.forward(r, false, ops::Activation::Identity)?
                }
            };
            return ops::add_relu(&self.forward(x, false, ops::Activation::Identity)?, &joined);
        }
        if self.batch_sync.is_some() {
            // Synced statistics come from their own composition: the block's end as three nodes.
            let joined = match shortcut {
                Shortcut::Identity(r) => r.clone(),
                Shortcut::Normalised(norm, r) => {
                    norm.forward(r, true, ops::Activation::Identity)?
                }
            };
            return ops::add_relu(&self.forward(x, true, ops::Activation::Identity)?, &joined);
        }
        let joined = match shortcut {
            Shortcut::Identity(r) => ops::Shortcut::Identity(r),
            Shortcut::Normalised(norm, r) => ops::Shortcut::Normalised(norm.inputs(r)),
        };
        let out = ops::batch_norm_add_relu_train(self.inputs(x), joined, self.format)?;
        if let (Shortcut::Normalised(norm, r), Some(statistics)) = (shortcut, &out.shortcut) {
            norm.track(norm.count(r)?, statistics)?;
        }
        self.track(self.count(x)?, &out.main)?;
        Ok(out.y)
    }

    /// The training kernels' view of this layer applied to `x`.
    fn inputs<'a>(&'a self, x: &'a Tensor) -> ops::NormInputs<'a> {
        ops::NormInputs {
            x,
            gamma: &self.weight,
            beta: &self.bias,
            eps: self.settings.eps,
        }
    }

    /// The values per channel that `x`'s statistics are taken over.
    fn count(&self, x: &Tensor) -> candle_core::Result<f64> {
        let (n, _, h, w) = self.format.nchw_dims(x)?;
        Ok((n * h * w) as f64)
    }

    /// Blends the statistics of a batch of `count` values per channel into the running ones and
    /// counts the batch.
    fn track(&self, count: f64, batch: &ops::BatchStatistics) -> candle_core::Result<()> {
        // PyTorch: running = (1 - momentum) * running + momentum * batch, with the variance
        // made unbiased by count / (count - 1).
        let unbiased = if count > 1.0 {
            count / (count - 1.0)
        } else {
            1.0
        };
        let momentum = self.settings.momentum;
        ops::batch_norm::blend_running(&self.running_mean, &batch.mean, momentum, 1.0)?;
        ops::batch_norm::blend_running(&self.running_var, &batch.var, momentum, unbiased)?;
        let tracked = self.num_batches_tracked.as_tensor().affine(1.0, 1.0)?;
        self.num_batches_tracked.set(&tracked)
    }
}

/// What joins a residual block's end ([`BatchNorm2d::forward_add_relu`]): the block's input as
/// it is, or a downsampling convolution's output through its batch norm.
#[derive(Clone, Copy)]
pub enum Shortcut<'a> {
    Identity(&'a Tensor),
    Normalised(&'a BatchNorm2d, &'a Tensor),
}

impl ModuleT for BatchNorm2d {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.forward(x, train, ops::Activation::Identity)
    }
}
