//! A data set where training runs, and the batches cut from it.

use std::ops::Range;

use candle_core::{DType, Device, Tensor};
use rand::seq::SliceRandom;
use rand::Rng;

use super::images::{ChannelStats, ImageSet, CHANNELS};
use crate::error::Result;
use crate::ops::gather::{gather_normalise_from_bytes_into, ByteSource};
use crate::ops::{gather_normalise_into, Augmentation, Normalisation};

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
    /// The first `n` rows [n, bytes], the buffer made (or grown) on first need.
    fn rows(&mut self, n: usize, bytes: usize, device: &Device) -> Result<Tensor> {
        if let Some(buffer) = &self.0 {
            if buffer.dim(0)? >= n && buffer.dim(1)? == bytes {
                return Ok(buffer.narrow(0, 0, n)?);
            }
        }
        let buffer = Tensor::zeros((n, bytes), DType::F32, device)?;
        self.0 = Some(buffer.clone());
        Ok(buffer)
    }
}

/// A labelled set held where training runs, as u8 (CIFAR-10's training set: 150 MB): each batch
/// is gathered, augmented, converted and normalised there in one pass (kiln's op), so a GPU
/// step copies nothing from the host. A set memory-mapped from its cache file stays mapped on
/// the CPU: batches read the file's pages, and a set larger than memory still trains.
pub struct DeviceSet {
    images: Images,
    /// [N] u32
    labels: Tensor,
    /// The labels on the host too, for figures such as a confusion matrix.
    host_labels: Vec<u32>,
    side: usize,
    stats: ChannelStats,
}

enum Images {
    /// [N, bytes] u8 on the device.
    Tensor(Tensor),
    /// `count` images at `offset` of a mapped file (CPU only).
    Mapped {
        source: ByteSource,
        offset: usize,
        count: usize,
    },
}

impl DeviceSet {
    /// Takes `set` where training runs, to be normalised with `stats`: on the CPU its bytes move
    /// into the tensor (one copy of the data set in memory, not two) or stay mapped; on a GPU
    /// they are uploaded once.
    pub fn new(set: ImageSet, stats: ChannelStats, device: &Device) -> Result<Self> {
        let (count, side, bytes) = (set.len(), set.side(), set.image_bytes());
        let mapping = set.mapping().filter(|_| device.is_cpu());
        let (images, labels) = match mapping {
            Some((map, offset)) => {
                let labels = set.labels().to_vec();
                let source: ByteSource = map;
                let images = Images::Mapped {
                    source,
                    offset,
                    count,
                };
                (images, labels)
            }
            None => {
                let (pixels, labels) = set.into_parts();
                let images = Tensor::from_vec(pixels, (count, bytes), device)?;
                (Images::Tensor(images), labels)
            }
        };
        Ok(Self {
            images,
            labels: Tensor::from_vec(labels.clone(), count, device)?,
            host_labels: labels,
            side,
            stats,
        })
    }

    pub fn len(&self) -> usize {
        self.host_labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.host_labels.is_empty()
    }

    pub fn labels(&self) -> &[u32] {
        &self.host_labels
    }

    /// Image side in pixels.
    pub fn side(&self) -> usize {
        self.side
    }

    /// An epoch's order (from [`epoch_order`]) on the device, copied there once.
    pub fn order(&self, order: &[usize]) -> Result<Tensor> {
        let order: Vec<u32> = order.iter().map(|&i| i as u32).collect();
        let len = order.len();
        Ok(Tensor::from_vec(order, len, self.labels.device())?)
    }

    /// The images at `order[range]` as a normalised f32 batch [n, 3, side, side], written into
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
        let plane = self.side * self.side;
        let norm = Normalisation {
            mean: &self.stats.mean,
            std: &self.stats.std,
            plane,
        };
        let bytes = CHANNELS * plane;
        let images = buffer.rows(n, bytes, self.labels.device())?;
        match &self.images {
            Images::Tensor(all) => gather_normalise_into(&images, all, &indices, norm, augment)?,
            Images::Mapped {
                source,
                offset,
                count,
            } => gather_normalise_from_bytes_into(
                &images, source, *offset, *count, bytes, &indices, norm, augment,
            )?,
        }
        Ok((
            images.reshape((n, CHANNELS, self.side, self.side))?,
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
        let stats = ChannelStats::CIFAR10;
        let on_device = DeviceSet::new(set.clone(), stats, &Device::Cpu).unwrap();
        let order = on_device.order(&[0, 4, 1, 2]).unwrap();
        let mut buffer = BatchBuffer::default();
        let (x, y) = on_device.batch(&order, 1..3, &mut buffer, None).unwrap();
        assert_eq!(x.dims(), &[2, 3, 32, 32]);
        let expected: Vec<u32> = [4, 1].iter().map(|&i| set.labels()[i]).collect();
        assert_eq!(y.to_vec1::<u32>().unwrap(), expected);
        let pixels = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // Second image of the batch (index 1), green channel, pixel 5.
        let byte = set.image(1)[1024 + 5] as f32;
        let want = (byte / 255.0 - stats.mean[1]) / stats.std[1];
        assert_eq!(pixels[3072 + 1024 + 5], want);
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
