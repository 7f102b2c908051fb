//! A set of labelled RGB images of one square size, as u8 CHW bytes, knowing nothing of the
//! file format they came from: in memory, or memory-mapped from a decoded cache file so that
//! a data set larger than memory still trains.

use std::ops::Range;
use std::sync::Arc;

use crate::error::{Error, Result};

/// Colour channels of every image kiln trains on (grey and alpha are converted at decoding).
pub const CHANNELS: usize = 3;

/// Where a set's bytes live.
#[derive(Clone)]
enum Pixels {
    Owned(Vec<u8>),
    /// `len` bytes from `offset` of a mapped cache file.
    Mapped {
        map: Arc<memmap2::Mmap>,
        offset: usize,
        len: usize,
    },
}

impl Pixels {
    fn bytes(&self) -> &[u8] {
        match self {
            Pixels::Owned(v) => v,
            Pixels::Mapped { map, offset, len } => &map[*offset..*offset + *len],
        }
    }
}

/// Labelled CHW images, `side` x `side`, in one buffer.
#[derive(Clone)]
pub struct ImageSet {
    pixels: Pixels,
    labels: Vec<u32>,
    side: usize,
}

impl std::fmt::Debug for ImageSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageSet")
            .field("images", &self.len())
            .field("side", &self.side)
            .finish()
    }
}

impl PartialEq for ImageSet {
    fn eq(&self, other: &Self) -> bool {
        self.side == other.side && self.labels == other.labels && self.bytes() == other.bytes()
    }
}

impl ImageSet {
    /// An empty set of `side` x `side` images with room for `count`.
    pub fn with_capacity(count: usize, side: usize) -> Self {
        Self {
            pixels: Pixels::Owned(Vec::with_capacity(count * CHANNELS * side * side)),
            labels: Vec::with_capacity(count),
            side,
        }
    }

    /// `labels.len()` images read from `map` at `offset`, without copying them.
    pub fn mapped(
        map: Arc<memmap2::Mmap>,
        offset: usize,
        labels: Vec<u32>,
        side: usize,
    ) -> Result<Self> {
        let len = labels.len() * CHANNELS * side * side;
        if offset + len > map.len() {
            return Err(Error::InvalidSetting(format!(
                "a cache of {} bytes cannot hold {} images of {side}x{side} at {offset}",
                map.len(),
                labels.len()
            )));
        }
        Ok(Self {
            pixels: Pixels::Mapped { map, offset, len },
            labels,
            side,
        })
    }

    /// Appends one image (its CHW bytes) and its label. A mapped set is copied into memory
    /// first (never done on a training path).
    pub fn push(&mut self, image: &[u8], label: u32) {
        debug_assert_eq!(image.len(), self.image_bytes());
        self.owned().extend_from_slice(image);
        self.labels.push(label);
    }

    pub fn extend(&mut self, other: ImageSet) {
        self.owned().extend_from_slice(other.bytes());
        self.labels.extend(other.labels);
    }

    fn owned(&mut self) -> &mut Vec<u8> {
        if let Pixels::Mapped { .. } = self.pixels {
            self.pixels = Pixels::Owned(self.pixels.bytes().to_vec());
        }
        match &mut self.pixels {
            Pixels::Owned(v) => v,
            Pixels::Mapped { .. } => unreachable!("converted to owned above"),
        }
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn labels(&self) -> &[u32] {
        &self.labels
    }

    /// Image side in pixels.
    pub fn side(&self) -> usize {
        self.side
    }

    /// Bytes of one image: CHANNELS * side * side.
    pub fn image_bytes(&self) -> usize {
        CHANNELS * self.side * self.side
    }

    /// Every image's bytes, one after the other.
    pub fn bytes(&self) -> &[u8] {
        self.pixels.bytes()
    }

    /// Whether the bytes are a mapped file rather than memory of this process.
    pub fn is_mapped(&self) -> bool {
        matches!(self.pixels, Pixels::Mapped { .. })
    }

    /// The mapped file and where the bytes start in it, for a set that is one.
    pub fn mapping(&self) -> Option<(Arc<memmap2::Mmap>, usize)> {
        match &self.pixels {
            Pixels::Mapped { map, offset, .. } => Some((Arc::clone(map), *offset)),
            Pixels::Owned(_) => None,
        }
    }

    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.image_bytes();
        &self.bytes()[i * n..(i + 1) * n]
    }

    pub fn subset(&self, range: Range<usize>) -> ImageSet {
        let n = self.image_bytes();
        ImageSet {
            pixels: Pixels::Owned(self.bytes()[range.start * n..range.end * n].to_vec()),
            labels: self.labels[range].to_vec(),
            side: self.side,
        }
    }

    /// The images at `indices`, in that order, copied.
    pub fn select(&self, indices: &[usize]) -> ImageSet {
        let mut out = ImageSet::with_capacity(indices.len(), self.side);
        for &i in indices {
            out.push(self.image(i), self.labels[i]);
        }
        out
    }

    /// Takes the bytes out (copied if mapped) with the labels.
    pub fn into_parts(self) -> (Vec<u8>, Vec<u32>) {
        let bytes = match self.pixels {
            Pixels::Owned(v) => v,
            mapped @ Pixels::Mapped { .. } => mapped.bytes().to_vec(),
        };
        (bytes, self.labels)
    }
}

/// Per-channel mean and standard deviation of pixel values scaled to [0, 1]: what inputs are
/// normalised with, recorded in every weights file.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChannelStats {
    pub mean: [f32; CHANNELS],
    pub std: [f32; CHANNELS],
}

impl ChannelStats {
    /// The standard figures of CIFAR-10's training set.
    pub const CIFAR10: ChannelStats = ChannelStats {
        mean: [0.4914, 0.4822, 0.4465],
        std: [0.2470, 0.2435, 0.2616],
    };

    /// ImageNet's, which torchvision's pretrained ResNets expect.
    pub const IMAGENET: ChannelStats = ChannelStats {
        mean: [0.485, 0.456, 0.406],
        std: [0.229, 0.224, 0.225],
    };

    /// A set's own figures, over every pixel of every image (sums in f64).
    pub fn of(set: &ImageSet) -> ChannelStats {
        let plane = set.side() * set.side();
        let mut sums = [0f64; CHANNELS];
        let mut squares = [0f64; CHANNELS];
        for image in set.bytes().chunks_exact(set.image_bytes().max(1)) {
            for (c, channel) in image.chunks_exact(plane).enumerate() {
                // Per plane in u64: exact, and far faster than a float per pixel.
                let (s, q) = channel.iter().fold((0u64, 0u64), |(s, q), &b| {
                    (s + u64::from(b), q + u64::from(b) * u64::from(b))
                });
                sums[c] += s as f64;
                squares[c] += q as f64;
            }
        }
        let count = (set.len() * plane).max(1) as f64;
        let mean: [f64; CHANNELS] = std::array::from_fn(|c| sums[c] / count / 255.0);
        ChannelStats {
            mean: mean.map(|m| m as f32),
            std: std::array::from_fn(|c| {
                let var = squares[c] / count / (255.0 * 255.0) - mean[c] * mean[c];
                (var.max(1e-12).sqrt() as f32).max(1e-3)
            }),
        }
    }

    /// As a weights file's metadata writes it: `0.4914,0.4822,0.4465`.
    pub fn list(values: &[f32; CHANNELS]) -> String {
        values
            .iter()
            .map(f32::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Reads the figures a weights file's metadata recorded.
    pub fn parse(mean: &str, std: &str) -> Option<ChannelStats> {
        let three = |text: &str| -> Option<[f32; CHANNELS]> {
            let values: Vec<f32> = text
                .split(',')
                .map(|v| v.trim().parse().ok())
                .collect::<Option<_>>()?;
            values.try_into().ok()
        };
        Some(ChannelStats {
            mean: three(mean)?,
            std: three(std)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_stats_are_the_sets_own() {
        // Two 1x1 images: red 0 and 255, green 51 both, blue 102 and 204.
        let mut set = ImageSet::with_capacity(2, 1);
        set.push(&[0, 51, 102], 0);
        set.push(&[255, 51, 204], 1);
        let stats = ChannelStats::of(&set);
        assert!((stats.mean[0] - 0.5).abs() < 1e-6 && (stats.std[0] - 0.5).abs() < 1e-6);
        assert!((stats.mean[1] - 0.2).abs() < 1e-6);
        assert_eq!(
            stats.std[1], 1e-3,
            "a constant channel keeps a usable deviation"
        );
        assert!((stats.mean[2] - 0.6).abs() < 1e-6 && (stats.std[2] - 0.2).abs() < 1e-6);
        let text = ChannelStats::list(&stats.mean);
        assert_eq!(ChannelStats::parse(&text, &text).unwrap().mean, stats.mean);
        assert!(ChannelStats::parse("1,2", "1,2,3").is_none());
    }
}
