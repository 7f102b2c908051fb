//! A batch from a data set kept on the device as u8: images gathered by index, scaled to [0, 1]
//! and normalised per channel, in one pass where the data lives (CPU or CUDA), into a buffer the
//! caller keeps from batch to batch. Elsewhere (Metal): candle's index-select, cast and broadcast
//! arithmetic, which is also the reference, copied into the buffer.

use candle_core::{CpuStorage, DType, Device, InplaceOp3, Layout, Tensor};
use rayon::prelude::*;

use super::{contiguous_f32_mut, contiguous_u32};

/// Per-channel normalisation: `(byte / 255 - mean[c]) / std[c]`, channels being planes of
/// `plane` bytes.
#[derive(Debug, Clone, Copy)]
pub struct Normalisation<'a> {
    pub mean: &'a [f32],
    pub std: &'a [f32],
    pub plane: usize,
}

/// Most channels the CUDA kernel takes (its argument holds four of each figure).
const MAX_CHANNELS: usize = 4;

/// `images` [N, bytes] (u8) at the rows `order` [n] (u32), normalised: f32 [n, bytes], in a
/// new tensor.
pub fn gather_normalise(
    images: &Tensor,
    order: &Tensor,
    norm: Normalisation,
) -> candle_core::Result<Tensor> {
    let out = Tensor::zeros((order.dim(0)?, images.dim(1)?), DType::F32, images.device())?;
    gather_normalise_into(&out, images, order, norm)?;
    Ok(out)
}

/// The same, written into `out` (contiguous f32 [n, bytes]), so that one buffer serves every
/// batch of an epoch.
pub fn gather_normalise_into(
    out: &Tensor,
    images: &Tensor,
    order: &Tensor,
    norm: Normalisation,
) -> candle_core::Result<()> {
    let (_, bytes) = images.dims2()?;
    if norm.plane == 0 || bytes % norm.plane != 0 || norm.mean.len() != bytes / norm.plane {
        candle_core::bail!(
            "gather_normalise: {bytes} bytes per image are not {} planes of {}",
            norm.mean.len(),
            norm.plane
        );
    }
    if norm.std.len() != norm.mean.len() {
        candle_core::bail!("gather_normalise: as many std figures as means are needed");
    }
    let n = order.dim(0)?;
    if out.dims() != [n, bytes] || out.dtype() != DType::F32 || !out.is_contiguous() {
        candle_core::bail!(
            "gather_normalise: the output must be a contiguous f32 [{n}, {bytes}] tensor, not {:?} {:?}",
            out.dtype(),
            out.dims()
        );
    }
    let ours = match images.device() {
        Device::Cpu => true,
        Device::Cuda(_) => cfg!(feature = "cuda") && norm.mean.len() <= MAX_CHANNELS,
        Device::Metal(_) => false,
    };
    if ours && images.dtype() == DType::U8 && order.dtype() == DType::U32 {
        let op = GatherNormalise {
            mean: norm.mean.to_vec(),
            std: norm.std.to_vec(),
            plane: norm.plane,
        };
        out.inplace_op3(&images.contiguous()?, &order.contiguous()?, &op)
    } else {
        out.slice_set(&gather_normalise_reference(images, order, norm)?, 0, 0)
    }
}

/// The same from candle operations.
pub fn gather_normalise_reference(
    images: &Tensor,
    order: &Tensor,
    norm: Normalisation,
) -> candle_core::Result<Tensor> {
    let (_, bytes) = images.dims2()?;
    let channels = norm.mean.len();
    let per_channel = |v: &[f32]| Tensor::from_slice(v, (1, channels, 1), images.device());
    let n = order.dim(0)?;
    // A true division, as the kernels do (candle's `/ 255.0` multiplies by the reciprocal).
    let full_scale = Tensor::new(255f32, images.device())?;
    images
        .index_select(order, 0)?
        .to_dtype(DType::F32)?
        .reshape((n, channels, bytes / channels))?
        .broadcast_div(&full_scale)?
        .broadcast_sub(&per_channel(norm.mean)?)?
        .broadcast_div(&per_channel(norm.std)?)?
        .reshape((n, bytes))
}

struct GatherNormalise {
    mean: Vec<f32>,
    std: Vec<f32>,
    plane: usize,
}

impl GatherNormalise {
    fn sizes(&self, il: &Layout, ol: &Layout) -> candle_core::Result<(usize, usize, usize)> {
        let (count, bytes) = il.shape().dims2()?;
        Ok((count, bytes, ol.shape().dims1()?))
    }
}

impl InplaceOp3 for GatherNormalise {
    fn name(&self) -> &'static str {
        "kiln-gather-normalise"
    }

    fn cpu_fwd(
        &self,
        out: &mut CpuStorage,
        out_layout: &Layout,
        is: &CpuStorage,
        il: &Layout,
        os: &CpuStorage,
        ol: &Layout,
    ) -> candle_core::Result<()> {
        let (count, bytes, n) = self.sizes(il, ol)?;
        let out = contiguous_f32_mut(out, out_layout, "output")?;
        let (CpuStorage::U8(images), Some((i0, i1))) = (is, il.contiguous_offsets()) else {
            candle_core::bail!("gather_normalise: images must be a contiguous u8 tensor");
        };
        let (images, order) = (&images[i0..i1], contiguous_u32(os, ol, "indices")?);
        if let Some(bad) = order.iter().find(|&&i| i as usize >= count) {
            candle_core::bail!("gather_normalise: index {bad} is past the {count} images");
        }
        // Every byte value's result per channel: the formula once, looked up per pixel.
        let table: Vec<[f32; 256]> = self
            .mean
            .iter()
            .zip(&self.std)
            .map(|(m, s)| std::array::from_fn(|b| (b as f32 / 255.0 - m) / s))
            .collect();
        if out.len() != n * bytes {
            candle_core::bail!(
                "gather_normalise: the output holds {} values, not {n} x {bytes}",
                out.len()
            );
        }
        if bytes > 0 {
            out.par_chunks_mut(bytes).zip(order).for_each(|(out, &i)| {
                let image = &images[i as usize * bytes..][..bytes];
                for ((out, image), table) in out
                    .chunks_mut(self.plane)
                    .zip(image.chunks(self.plane))
                    .zip(&table)
                {
                    for (o, &b) in out.iter_mut().zip(image) {
                        *o = table[b as usize];
                    }
                }
            });
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        out: &mut candle_core::CudaStorage,
        out_layout: &Layout,
        is: &candle_core::CudaStorage,
        il: &Layout,
        os: &candle_core::CudaStorage,
        ol: &Layout,
    ) -> candle_core::Result<()> {
        use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;

        use super::cuda::{kernel, per_item, view, view_mut};

        #[repr(C)]
        struct Norm {
            mean: [f32; MAX_CHANNELS],
            std: [f32; MAX_CHANNELS],
        }
        // SAFETY: plain f32 arrays, laid out as kernels.cu's `Normalisation`.
        unsafe impl DeviceRepr for Norm {}

        let (_, bytes, n) = self.sizes(il, ol)?;
        let dev = &is.device;
        let (images, order) = (
            view::<u8>(is, il, "images")?,
            view::<u32>(os, ol, "indices")?,
        );
        let mut norm = Norm {
            mean: [0.0; MAX_CHANNELS],
            std: [1.0; MAX_CHANNELS],
        };
        norm.mean[..self.mean.len()].copy_from_slice(&self.mean);
        norm.std[..self.std.len()].copy_from_slice(&self.std);
        let mut out = view_mut::<f32>(out, out_layout, "output")?;
        if out.len() != n * bytes {
            candle_core::bail!(
                "gather_normalise: the output holds {} values, not {n} x {bytes}",
                out.len()
            );
        }
        let func = kernel(dev, "gather_normalise")?;
        let stream = dev.cuda_stream();
        let mut launch = stream.launch_builder(&func);
        let (rows, bytes32, plane) = (n as u32, bytes as u32, self.plane as u32);
        launch
            .arg(&images)
            .arg(&order)
            .arg(&rows)
            .arg(&bytes32)
            .arg(&plane)
            .arg(&norm)
            .arg(&mut out);
        // SAFETY: the arguments match the kernel's signature; it writes all n * bytes outputs.
        // Indices are the epoch's permutation of the set, made and checked on the host.
        unsafe { launch.launch(per_item(n * bytes)) }.w()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEAN: [f32; 3] = [0.4914, 0.4822, 0.4465];
    const STD: [f32; 3] = [0.247, 0.243, 0.261];

    #[test]
    fn matches_candles_composition_bit_for_bit() {
        let bytes: Vec<u8> = (0..5 * 12).map(|i| (i * 37 % 256) as u8).collect();
        let images = Tensor::from_vec(bytes, (5, 12), &Device::Cpu).unwrap();
        let order = Tensor::new(&[4u32, 0, 4, 2], &Device::Cpu).unwrap();
        let norm = Normalisation {
            mean: &MEAN,
            std: &STD,
            plane: 4,
        };
        let ours = gather_normalise(&images, &order, norm).unwrap();
        let reference = gather_normalise_reference(&images, &order, norm).unwrap();
        assert_eq!(ours.dims(), &[4, 12]);
        assert_eq!(
            ours.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            reference.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn writes_into_a_kept_buffer_and_its_leading_rows() {
        let bytes: Vec<u8> = (0..5 * 12).map(|i| (i * 53 % 256) as u8).collect();
        let images = Tensor::from_vec(bytes, (5, 12), &Device::Cpu).unwrap();
        let norm = Normalisation {
            mean: &MEAN,
            std: &STD,
            plane: 4,
        };
        let buffer = Tensor::full(7f32, (3, 12), &Device::Cpu).unwrap();
        let full = Tensor::new(&[1u32, 3, 0], &Device::Cpu).unwrap();
        gather_normalise_into(&buffer, &images, &full, norm).unwrap();
        let expected = gather_normalise_reference(&images, &full, norm).unwrap();
        assert_eq!(
            buffer.to_vec2::<f32>().unwrap(),
            expected.to_vec2::<f32>().unwrap()
        );
        // A short last batch: the first rows of the same buffer, the rest untouched.
        let short = Tensor::new(&[4u32], &Device::Cpu).unwrap();
        gather_normalise_into(&buffer.narrow(0, 0, 1).unwrap(), &images, &short, norm).unwrap();
        let rows = buffer.to_vec2::<f32>().unwrap();
        let expected_short = gather_normalise_reference(&images, &short, norm).unwrap();
        assert_eq!(rows[0], expected_short.to_vec2::<f32>().unwrap()[0]);
        assert_eq!(rows[1..], expected.to_vec2::<f32>().unwrap()[1..]);

        let wrong = Tensor::zeros((2, 12), DType::F32, &Device::Cpu).unwrap();
        let err = gather_normalise_into(&wrong, &images, &full, norm).unwrap_err();
        assert!(err.to_string().contains("[3, 12]"), "{err}");
    }

    #[test]
    fn an_index_past_the_end_is_an_error() {
        let images = Tensor::zeros((2, 3), DType::U8, &Device::Cpu).unwrap();
        let order = Tensor::new(&[2u32], &Device::Cpu).unwrap();
        let norm = Normalisation {
            mean: &[0.0],
            std: &[1.0],
            plane: 3,
        };
        let err = gather_normalise(&images, &order, norm).unwrap_err();
        assert!(err.to_string().contains("past the 2 images"), "{err}");
    }
}
