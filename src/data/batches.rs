//! The in-memory data set (images kept as u8, 3 KiB each) and the batches cut from it.

use std::ops::Range;

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::Rng;

use super::cifar::{CHANNELS, IMAGE_BYTES, MEAN, SIDE, STD};
use crate::error::Result;

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

    /// The order of one epoch: shuffled with `rng`, or file order.
    pub fn epoch_order(&self, rng: Option<&mut impl Rng>) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.len()).collect();
        if let Some(rng) = rng {
            order.shuffle(rng);
        }
        order
    }

    /// Gathers the images at `indices` into a normalised f32 batch `[n, 3, 32, 32]` and their
    /// labels `[n]` (u32), on `device`.
    pub fn batch(&self, indices: &[usize], device: &Device) -> Result<(Tensor, Tensor)> {
        let table = normalisation_table();
        let plane = SIDE * SIDE;
        let mut pixels = Vec::with_capacity(indices.len() * IMAGE_BYTES);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            for (c, channel) in self.image(i).chunks_exact(plane).enumerate() {
                pixels.extend(channel.iter().map(|&b| table[c][b as usize]));
            }
            labels.push(u32::from(self.labels[i]));
        }
        let n = indices.len();
        let images = Tensor::from_vec(pixels, (n, CHANNELS, SIDE, SIDE), &Device::Cpu)?;
        let labels = Tensor::from_vec(labels, n, &Device::Cpu)?;
        Ok((images.to_device(device)?, labels.to_device(device)?))
    }
}

/// `(byte / 255 - mean[c]) / std[c]` for every channel and byte value.
fn normalisation_table() -> [[f32; 256]; CHANNELS] {
    let mut table = [[0f32; 256]; CHANNELS];
    for (c, row) in table.iter_mut().enumerate() {
        for (b, value) in row.iter_mut().enumerate() {
            *value = (b as f32 / 255.0 - MEAN[c]) / STD[c];
        }
    }
    table
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
        let (x, y) = set.batch(&[4, 1], &Device::Cpu).unwrap();
        assert_eq!(x.dims(), &[2, 3, 32, 32]);
        let expected: Vec<u32> = [4, 1].iter().map(|&i| set.labels()[i] as u32).collect();
        assert_eq!(y.to_vec1::<u32>().unwrap(), expected);
        let pixels = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // Second image of the batch (index 1), green channel, pixel 5.
        let byte = set.image(1)[1024 + 5] as f32;
        let want = (byte / 255.0 - MEAN[1]) / STD[1];
        assert!((pixels[IMAGE_BYTES + 1024 + 5] - want).abs() < 1e-6);
    }

    #[test]
    fn shuffling_is_a_seeded_permutation() {
        let set = synthetic::generate(50, 1);
        let order = |seed| set.epoch_order(Some(&mut ChaCha8Rng::seed_from_u64(seed)));
        assert_eq!(order(7), order(7));
        assert_ne!(order(7), order(8));
        let mut sorted = order(7);
        sorted.sort_unstable();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_eq!(
            set.epoch_order(None::<&mut ChaCha8Rng>),
            (0..50).collect::<Vec<_>>()
        );
    }
}
