//! The launch that Adam's and SGD's CUDA steps share: every parameter's update in one launch
//! per group of [`GROUP`] tensors (kernels.cu beside this file: `adam_step`, `sgd_step`), the
//! group's addresses and lengths in one argument, the step's figures in the other. Each
//! optimizer keeps its maths and its argument layouts; only the grouping and the launch live
//! here.

use candle_core::cuda_backend::cudarc::driver::{CudaStream, DeviceRepr, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::CudaDevice;

use crate::error::Result;
pub(super) use crate::ops::cuda::{address, GROUP};
use crate::ops::cuda::{kernel, per_tensor};

/// A parameter's length as the kernels' `unsigned`; `optimizer` and `name` say whose it is.
pub(super) fn len32(optimizer: &str, name: &str, len: usize) -> candle_core::Result<u32> {
    u32::try_from(len)
        .map_err(|_| candle_core::Error::Msg(format!("{optimizer}: {name} has {len} elements")))
}

/// Launches `kernel_name` with `(group, figures)` once for each [`GROUP`] of `updates`:
/// `fill(group, at, update, stream)` writes update `at`'s addresses and flags into the group,
/// which starts all zeros, and returns its length; the longest sizes the grid.
///
/// # Safety
///
/// `Group` and `Figures` must be laid out as the kernel's two arguments, and every address
/// `fill` writes must be a live contiguous f32 buffer of the length the kernel reads for it,
/// held until the launch is queued (candle orders all work on the device's one stream); the
/// buffers the kernel writes must be read by nothing else until the next step.
pub(super) unsafe fn launch_groups<U, Group, Figures>(
    device: &CudaDevice,
    kernel_name: &str,
    updates: &[U],
    figures: &Figures,
    mut fill: impl FnMut(&mut Group, usize, &U, &CudaStream) -> Result<usize>,
) -> Result<()>
where
    Group: DeviceRepr + Default,
    Figures: DeviceRepr,
{
    let func = kernel(device, kernel_name)?;
    let stream = device.cuda_stream();
    for group in updates.chunks(GROUP) {
        let mut args = Group::default();
        let mut longest = 0;
        for (at, update) in group.iter().enumerate() {
            longest = longest.max(fill(&mut args, at, update, &stream)?);
        }
        let mut launch = stream.launch_builder(&func);
        launch.arg(&args).arg(figures);
        // SAFETY: the caller's contract above: arguments laid out as the kernel's, every
        // address live and long enough, the written buffers read by nothing else meanwhile.
        unsafe { launch.launch(per_tensor(group.len(), longest)) }.w()?;
    }
    Ok(())
}
