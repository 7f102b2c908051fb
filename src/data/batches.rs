//! The in-memory data set (images kept as u8, 3 KiB each) and the batches cut from it.

use std::ops::Range;

use candle_core::{DType, Device, Tensor};
use rand::seq::SliceRandom;
use rand::Rng;

use super::cifar::{CHANNELS, IMAGE_BYTES, MEAN, SIDE, STD};
use crate::error::Result;
use crate::ops::{gather_normalise_into, Augmentation, Normalisation};

/// Labelled CHW images, 3072 bytes each, in one contiguous buffer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageSet {
    images: Vec<u8>,
    labels: Vec<u8>,
}

impl ImageSet {
    pub fn with_capacity(count: usize) -> Self {
        Self {
            images: Vec::with_capacity(count * IMAGE_BYTES),
            labels: Vec::with_capacity(count),
        }
    }

    /// Appends one image (3072 CHW bytes) and its label.
    pub fn push(&mut self, image: &[u8], label: u8) {
        debug_assert_eq!(image.len(), IMAGE_BYTES);
        self.images.extend_from_slice(image);
        self.labels.push(label);
    }

    pub fn extend(&mut self, other: ImageSet) {
        self.images.extend(other.images);
        self.labels.extend(other.labels);
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn labels(&self) -> &[u8] {
        &self.labels
    }

    pub fn image(&self, i: usize) -> &[u8] {
        &self.images[i * IMAGE_BYTES..(i + 1) * IMAGE_BYTES]
    }

    pub fn subset(&self, range: Range<usize>) -> ImageSet {
        ImageSet {
            images: self.images[range.start * IMAGE_BYTES..range.end * IMAGE_BYTES].to_vec(),
            labels: self.labels[range].to_vec(),
        }
    }
}

/// The order of one epoch over `len` items: shuffled with `rng`, or file order.
pub fn epoch_order(len: usize, rng: Option<&mut impl Rng>) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    if let Some(rng) = rng {
        order.shuffle(rng);
    }
    order
}

/// The f32 tensor a [`DeviceSet`]'s batches are written into, kept from batch to batch so that
/// a step allocates nothing for its input. A batch shares its storage: the next batch written
/// into the same buffer overwrites it.
#[derive(Default)]
pub struct BatchBuffer(Option<Tensor>);

impl BatchBuffer {
    /// The first `n` rows [n, 3072], the buffer made (or grown) on first need.
    fn rows(&mut self, n: usize, device: &Device) -> Result<Tensor> {
        if let Some(buffer) = &self.0 {
            if buffer.dim(0)? >= n {
                return Ok(buffer.narrow(0, 0, n)?);
            }
        }
        let buffer = Tensor::zeros((n, IMAGE_BYTES), DType::F32, device)?;
        self.0 = Some(buffer.clone());
        Ok(buffer)
    }
}

/// A labelled set held where training runs, as u8 (CIFAR-10's training set: 150 MB): each batch
/// is gathered, converted and normalised there in one pass (kiln's op), so a GPU step copies
/// nothing from the host.
pub struct DeviceSet {
    /// [N, 3072] u8
    images: Tensor,
    /// [N] u32
    labels: Tensor,
    /// The labels on the host too, for figures such as a confusion matrix.
    host_labels: Vec<u8>,
}

impl DeviceSet {
    /// Takes `set` where training runs: on the CPU its bytes move into the tensor (one copy of
    /// the data set in memory, not two); on a GPU they are uploaded once.
    pub fn new(set: ImageSet, device: &Device) -> Result<Self> {
        let ImageSet { images, labels } = set;
        let count = labels.len();
        let device_labels: Vec<u32> = labels.iter().map(|&l| u32::from(l)).collect();
        Ok(Self {
            images: Tensor::from_vec(images, (count, IMAGE_BYTES), device)?,
            labels: Tensor::from_vec(device_labels, count, device)?,
            host_labels: labels,
        })
    }

    pub fn len(&self) -> usize {
        self.host_labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.host_labels.is_empty()
    }

    pub fn labels(&self) -> &[u8] {
        &self.host_labels
    }

    /// An epoch's order (from [`epoch_order`]) on the device, copied there once.
    pub fn order(&self, order: &[usize]) -> Result<Tensor> {
        let order: Vec<u32> = order.iter().map(|&i| i as u32).collect();
        let len = order.len();
        Ok(Tensor::from_vec(order, len, self.labels.device())?)
    }

    /// The images at `order[range]` as a normalised f32 batch [n, 3, 32, 32], written into
    /// `buffer`, augmented as `augment` draws, and their labels [n] (u32).
    pub fn batch(
        &self,
        order: &Tensor,
        range: Range<usize>,
        buffer: &mut BatchBuffer,
        augment: Option<&Augmentation>,
    ) -> Result<(Tensor, Tensor)> {
        let n = range.len();
        let indices = order.narrow(0, range.start, n)?;
        let norm = Normalisation {
            mean: &MEAN,
            std: &STD,
            plane: SIDE * SIDE,
        };
        let images = buffer.rows(n, self.images.device())?;
        gather_normalise_into(&images, &self.images, &indices, norm, augment)?;
        Ok((
            images.reshape((n, CHANNELS, SIDE, SIDE))?,
            self.labels.index_select(&indices, 0)?,
        ))
    }
}

/// `range`s of `batch_size` (the last one shorter) covering `len` items.
pub fn batch_ranges(len: usize, batch_size: usize) -> impl Iterator<Item = Range<usize>> {
    let batch_size = batch_size.max(1);
    (0..len)
        .step_by(batch_size)
        .map(move |start| start..(start + batch_size).min(len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::synthetic;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn batches_are_normalised_chw_with_their_labels() {
        let set = synthetic::generate(5, 3);
        let on_device = DeviceSet::new(set.clone(), &Device::Cpu).unwrap();
        let order = on_device.order(&[0, 4, 1, 2]).unwrap();
        let mut buffer = BatchBuffer::default();
        let (x, y) = on_device.batch(&order, 1..3, &mut buffer, None).unwrap();
        assert_eq!(x.dims(), &[2, 3, 32, 32]);
        let expected: Vec<u32> = [4, 1].iter().map(|&i| set.labels()[i] as u32).collect();
        assert_eq!(y.to_vec1::<u32>().unwrap(), expected);
        let pixels = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // Second image of the batch (index 1), green channel, pixel 5.
        let byte = set.image(1)[1024 + 5] as f32;
        let want = (byte / 255.0 - MEAN[1]) / STD[1];
        assert_eq!(pixels[IMAGE_BYTES + 1024 + 5], want);
    }

    #[test]
    fn batch_ranges_cover_everything_once() {
        let ranges: Vec<_> = batch_ranges(10, 4).collect();
        assert_eq!(ranges, [0..4, 4..8, 8..10]);
        assert_eq!(batch_ranges(0, 4).count(), 0);
    }

    #[test]
    fn shuffling_is_a_seeded_permutation() {
        let set = synthetic::generate(50, 1);
        let order = |seed| epoch_order(set.len(), Some(&mut ChaCha8Rng::seed_from_u64(seed)));
        assert_eq!(order(7), order(7));
        assert_ne!(order(7), order(8));
        let mut sorted = order(7);
        sorted.sort_unstable();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_eq!(
            epoch_order(set.len(), None::<&mut ChaCha8Rng>),
            (0..50).collect::<Vec<_>>()
        );
    }
}
