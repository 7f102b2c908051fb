//! A batch from a data set kept on the device as u8: images gathered by index, optionally
//! augmented (random crop with zero or reflect padding, or a random resized crop; horizontal
//! flip; cutout), scaled to
//! [0, 1] and normalised per channel, in one pass where the data lives (CPU or CUDA), into a
//! buffer the caller keeps from batch to batch. Elsewhere (Metal): candle's index-select, cast,
//! slicing and broadcast arithmetic, which is also the reference, copied into the buffer.
//!
//! What the augmentation draws for each image, and how, lives in `gather/draws.rs`
//! ([`Augmentation::draw`]).

use candle_core::{CpuStorage, DType, Device, InplaceOp3, Layout, Tensor};
use rayon::prelude::*;

use super::{contiguous_f32_mut, contiguous_u32};

mod draws;
pub use draws::{mix, resize_tap, AlternateFlip, Augmentation, CropBox, Draw, Positions};

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
    augment: Option<&Augmentation>,
) -> candle_core::Result<Tensor> {
    let out = Tensor::zeros((order.dim(0)?, images.dim(1)?), DType::F32, images.device())?;
    gather_normalise_into(&out, images, order, norm, augment)?;
    Ok(out)
}

/// The same, written into `out` (contiguous f32 [n, bytes]), so that one buffer serves every
/// batch of an epoch.
pub fn gather_normalise_into(
    out: &Tensor,
    images: &Tensor,
    order: &Tensor,
    norm: Normalisation,
    augment: Option<&Augmentation>,
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
    if let Some(a) = augment {
        let height = norm.plane / a.width.max(1);
        if a.width == 0 || height * a.width != norm.plane {
            candle_core::bail!(
                "gather_normalise: planes of {} pixels are not {} wide",
                norm.plane,
                a.width
            );
        }
        if a.crop_padding >= height.min(a.width) && a.reflect {
            candle_core::bail!(
                "gather_normalise: reflect padding of {} needs images larger than {height}x{}",
                a.crop_padding,
                a.width
            );
        }
        if let Some([min, max]) = a.resized_crop {
            if a.crop_padding > 0 || !(min > 0.0 && min <= max && max <= 1.0) {
                candle_core::bail!(
                    "gather_normalise: a resized crop takes an area share in (0, 1] and no padding"
                );
            }
        }
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
            augment: augment.copied(),
        };
        out.inplace_op3(&images.contiguous()?, &order.contiguous()?, &op)
    } else {
        let batch = gather_normalise_reference(images, order, norm, augment)?;
        out.slice_set(&batch, 0, 0)
    }
}

/// A source of image bytes outside any tensor: a memory-mapped cache file.
pub type ByteSource = std::sync::Arc<dyn AsRef<[u8]> + Send + Sync>;

/// [`gather_normalise_into`] from `count` images of `bytes` each at `offset` in `source`, on
/// the CPU: a data set memory-mapped from its cache file trains without being read into memory
/// first (the OS pages in what the batches touch).
#[allow(clippy::too_many_arguments)]
pub fn gather_normalise_from_bytes_into(
    out: &Tensor,
    source: &ByteSource,
    offset: usize,
    count: usize,
    bytes: usize,
    order: &Tensor,
    norm: Normalisation,
    augment: Option<&Augmentation>,
) -> candle_core::Result<()> {
    let end = offset + count * bytes;
    if end > source.as_ref().as_ref().len() {
        candle_core::bail!(
            "gather_normalise: {count} images of {bytes} bytes overrun their source"
        );
    }
    let op = GatherFromBytes {
        gather: GatherNormalise {
            mean: norm.mean.to_vec(),
            std: norm.std.to_vec(),
            plane: norm.plane,
            augment: augment.copied(),
        },
        source: source.clone(),
        range: offset..end,
        bytes,
    };
    out.inplace_op2(&order.contiguous()?, &op)
}

struct GatherFromBytes {
    gather: GatherNormalise,
    source: ByteSource,
    range: std::ops::Range<usize>,
    bytes: usize,
}

impl candle_core::InplaceOp2 for GatherFromBytes {
    fn name(&self) -> &'static str {
        "kiln-gather-normalise-bytes"
    }

    fn cpu_fwd(
        &self,
        out: &mut CpuStorage,
        out_layout: &Layout,
        os: &CpuStorage,
        ol: &Layout,
    ) -> candle_core::Result<()> {
        let out = contiguous_f32_mut(out, out_layout, "output")?;
        let order = contiguous_u32(os, ol, "indices")?;
        let images = &self.source.as_ref().as_ref()[self.range.clone()];
        let count = self.range.len() / self.bytes.max(1);
        self.gather.cpu(images, count, self.bytes, order, out)
    }
}

/// The same from candle operations: an independent statement of the maths (the draws aside),
/// image by image where augmented.
pub fn gather_normalise_reference(
    images: &Tensor,
    order: &Tensor,
    norm: Normalisation,
    augment: Option<&Augmentation>,
) -> candle_core::Result<Tensor> {
    let (_, bytes) = images.dims2()?;
    let channels = norm.mean.len();
    let device = images.device();
    let per_channel = |v: &[f32]| Tensor::from_slice(v, (1, channels, 1), device);
    let n = order.dim(0)?;
    // A true division, as the kernels do (candle's `/ 255.0` multiplies by the reciprocal).
    let full_scale = Tensor::new(255f32, device)?;
    let normalise = |pixels: &Tensor| {
        pixels
            .reshape((n, channels, bytes / channels))?
            .broadcast_div(&full_scale)?
            .broadcast_sub(&per_channel(norm.mean)?)?
            .broadcast_div(&per_channel(norm.std)?)?
            .reshape((n, bytes))
    };
    let gathered = images.index_select(order, 0)?.to_dtype(DType::F32)?;
    let Some(a) = augment else {
        return normalise(&gathered);
    };
    let sources = order.to_device(&Device::Cpu)?.to_vec1::<u32>()?;
    let (h, w) = (norm.plane / a.width, a.width);
    let reversed =
        |len: usize| Tensor::from_vec((0..len as u32).rev().collect::<Vec<_>>(), len, device);
    // Zero or reflect padding along `dim` (1 rows, 2 columns) of one [C, H, W] image.
    let pad = |image: &Tensor, dim: usize| -> candle_core::Result<Tensor> {
        let (p, size) = (a.crop_padding, image.dim(dim)?);
        if p == 0 {
            return Ok(image.clone());
        }
        if !a.reflect {
            return image.pad_with_zeros(dim, p, p);
        }
        let mirrored = |start: usize| {
            image
                .narrow(dim, start, p)?
                .contiguous()?
                .index_select(&reversed(p)?, dim)
        };
        let (before, after) = (mirrored(1)?, mirrored(size - 1 - p)?);
        Tensor::cat(&[&before, image, &after], dim)
    };
    let mut augmented = Vec::with_capacity(n);
    for (i, &source) in sources.iter().enumerate() {
        let d = a.draw(i, source as usize, h);
        let image = gathered.get(i)?.reshape((channels, h, w))?;
        let mut crop = match d.crop {
            // Resizing as two matrix products: every weight is a multiple of 1/256 and every
            // sum fits f32's mantissa, so the result is exact whatever the order of additions.
            Some(b) => {
                let taps = |size: usize, extent: usize| {
                    let mut m = vec![0f32; size * extent];
                    for p in 0..size {
                        let (first, weight) = resize_tap(p, size, extent);
                        m[p * extent + first] += (256 - weight) as f32 / 256.0;
                        if weight > 0 {
                            m[p * extent + first + 1] += weight as f32 / 256.0;
                        }
                    }
                    Tensor::from_vec(m, (size, extent), device)
                };
                let window = image
                    .narrow(1, b.top, b.height)?
                    .narrow(2, b.left, b.width)?
                    .contiguous()?;
                taps(h, b.height)?
                    .broadcast_matmul(&window)?
                    .broadcast_matmul(&taps(w, b.width)?.t()?)?
            }
            None => pad(&pad(&image, 1)?, 2)?
                .narrow(1, d.dy, h)?
                .narrow(2, d.dx, w)?
                .contiguous()?,
        };
        if d.flip {
            crop = crop.index_select(&reversed(w)?, 2)?;
        }
        augmented.push(crop.reshape(bytes)?);
    }
    let normalised = normalise(&Tensor::stack(&augmented, 0)?)?;
    if a.cutout == 0 {
        return Ok(normalised);
    }
    let mut keep = vec![1f32; n * h * w];
    for i in 0..n {
        let d = a.draw(i, sources[i] as usize, h);
        for y in d.cut_rows.0..d.cut_rows.1 {
            for x in d.cut_cols.0..d.cut_cols.1 {
                keep[(i * h + y) * w + x] = 0.0;
            }
        }
    }
    let keep = Tensor::from_vec(keep, (n, 1, h * w), device)?;
    normalised
        .reshape((n, channels, h * w))?
        .broadcast_mul(&keep)?
        .reshape((n, bytes))
}

struct GatherNormalise {
    mean: Vec<f32>,
    std: Vec<f32>,
    plane: usize,
    augment: Option<Augmentation>,
}

impl GatherNormalise {
    fn sizes(&self, il: &Layout, ol: &Layout) -> candle_core::Result<(usize, usize, usize)> {
        let (count, bytes) = il.shape().dims2()?;
        Ok((count, bytes, ol.shape().dims1()?))
    }

    /// The CPU kernel: images (`count` of `bytes` each) at `order`, written into `out`.
    fn cpu(
        &self,
        images: &[u8],
        count: usize,
        bytes: usize,
        order: &[u32],
        out: &mut [f32],
    ) -> candle_core::Result<()> {
        let n = order.len();
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
        if bytes == 0 {
            return Ok(());
        }
        out.par_chunks_mut(bytes)
            .zip(order)
            .enumerate()
            .for_each(|(slot, (out, &i))| {
                let image = &images[i as usize * bytes..][..bytes];
                let planes = out
                    .chunks_mut(self.plane)
                    .zip(image.chunks(self.plane))
                    .zip(&table);
                let Some(a) = &self.augment else {
                    for ((out, image), table) in planes {
                        for (o, &b) in out.iter_mut().zip(image) {
                            *o = table[b as usize];
                        }
                    }
                    return;
                };
                let (h, w) = (self.plane / a.width, a.width);
                let d = a.draw(slot, i as usize, h);
                if let Some(crop) = d.crop {
                    let rows: Vec<_> = (0..h).map(|y| resize_tap(y, h, crop.height)).collect();
                    let cols: Vec<_> = (0..w)
                        .map(|x| resize_tap(if d.flip { w - 1 - x } else { x }, w, crop.width))
                        .collect();
                    for (((out, image), m), s) in out
                        .chunks_mut(self.plane)
                        .zip(image.chunks(self.plane))
                        .zip(&self.mean)
                        .zip(&self.std)
                    {
                        for (row, &(y, fy)) in out.chunks_mut(w).zip(&rows) {
                            let near = &image[(crop.top + y) * w + crop.left..];
                            let far =
                                &image[(crop.top + y + usize::from(fy > 0)) * w + crop.left..];
                            for (o, &(x, fx)) in row.iter_mut().zip(&cols) {
                                let x1 = x + usize::from(fx > 0);
                                let lerp = |line: &[u8]| {
                                    line[x] as u32 * (256 - fx) + line[x1] as u32 * fx
                                };
                                let value = lerp(near) * (256 - fy) + lerp(far) * fy;
                                *o = (value as f32 / 65536.0 / 255.0 - m) / s;
                            }
                        }
                        for row in d.cut_rows.0..d.cut_rows.1 {
                            out[row * w..][d.cut_cols.0..d.cut_cols.1].fill(0.0);
                        }
                    }
                    return;
                }
                for ((out, image), table) in planes {
                    for (y, row) in out.chunks_mut(w).enumerate() {
                        let Some(sy) = a.source(y + d.dy, h) else {
                            row.fill(table[0]);
                            continue;
                        };
                        for (x, o) in row.iter_mut().enumerate() {
                            let x = if d.flip { w - 1 - x } else { x };
                            *o = match a.source(x + d.dx, w) {
                                Some(sx) => table[image[sy * w + sx] as usize],
                                None => table[0],
                            };
                        }
                    }
                    for row in d.cut_rows.0..d.cut_rows.1 {
                        out[row * w..][d.cut_cols.0..d.cut_cols.1].fill(0.0);
                    }
                }
            });
        Ok(())
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
        let (count, bytes, _) = self.sizes(il, ol)?;
        let out = contiguous_f32_mut(out, out_layout, "output")?;
        let (CpuStorage::U8(images), Some((i0, i1))) = (is, il.contiguous_offsets()) else {
            candle_core::bail!("gather_normalise: images must be a contiguous u8 tensor");
        };
        let order = contiguous_u32(os, ol, "indices")?;
        self.cpu(&images[i0..i1], count, bytes, order, out)
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
        // SAFETY: plain f32 arrays, laid out as gather/kernels.cu's `Normalisation`.
        unsafe impl DeviceRepr for Norm {}

        /// gather/kernels.cu's `Augment`; `on` = 0 leaves images as they are.
        #[repr(C)]
        struct Augment {
            key: u64,
            flip_key: u64,
            on: u32,
            width: u32,
            crop_padding: u32,
            reflect: u32,
            flip: u32,
            cutout: u32,
            resized: u32,
            alternate: u32,
            first: u32,
            stride: u32,
        }
        // SAFETY: integers, laid out as gather/kernels.cu's `Augment`.
        unsafe impl DeviceRepr for Augment {}
        let augment = match &self.augment {
            Some(a) => Augment {
                key: a.key,
                flip_key: a.alternate_flip.map_or(0, |f| f.key),
                on: 1,
                width: a.width as u32,
                crop_padding: a.crop_padding as u32,
                reflect: u32::from(a.reflect),
                flip: u32::from(a.flip),
                cutout: a.cutout as u32,
                resized: u32::from(a.resized_crop.is_some()),
                alternate: a.alternate_flip.map_or(0, |f| 1 + u32::from(f.turned)),
                first: a.positions.first as u32,
                stride: a.positions.stride as u32,
            },
            None => Augment {
                key: 0,
                flip_key: 0,
                on: 0,
                width: 1,
                crop_padding: 0,
                reflect: 0,
                flip: 0,
                cutout: 0,
                resized: 0,
                alternate: 0,
                first: 0,
                stride: 1,
            },
        };

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
        let stream = dev.cuda_stream();
        // Resized crops' boxes are drawn here (f64 logarithms, as on the CPU) and uploaded:
        // four u32 per image, or one unused figure.
        let mut boxes = vec![0u32];
        if let Some((a, scale)) = self.augment.and_then(|a| Some((a, a.resized_crop?))) {
            let height = self.plane / a.width;
            boxes = (0..n)
                .flat_map(|i| {
                    let b = a.crop_box(i, scale, height);
                    [b.top, b.left, b.height, b.width].map(|v| v as u32)
                })
                .collect();
        }
        let boxes = stream.clone_htod(&boxes).w()?;
        let func = kernel(dev, "gather_normalise")?;
        let mut launch = stream.launch_builder(&func);
        let (rows, bytes32, plane) = (n as u32, bytes as u32, self.plane as u32);
        launch
            .arg(&images)
            .arg(&order)
            .arg(&rows)
            .arg(&bytes32)
            .arg(&plane)
            .arg(&norm)
            .arg(&augment)
            .arg(&boxes)
            .arg(&mut out);
        // SAFETY: the arguments match the kernel's signature; it writes all n * bytes outputs.
        // Indices are the epoch's permutation of the set, made and checked on the host.
        unsafe { launch.launch(per_item(n * bytes)) }.w()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
