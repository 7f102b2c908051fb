//! What a batch's augmentation draws for each image (crop offsets or a resized crop's box,
//! flip, cutout square) and where a crop samples its source, the same on every backend.
//!
//! The random draws come from a counter-based hash of a per-batch key, the image's place in the
//! batch and the draw's number ([`Augmentation::draw`]): every backend draws the same numbers,
//! and a resumed run the same as an uninterrupted one.

/// The random transforms of one batch, as torchvision's `RandomCrop(size, padding,
/// padding_mode)` then `RandomHorizontalFlip()` on the u8 image, normalisation, then cutout
/// (DeVries & Taylor: a `cutout` x `cutout` square around a random pixel, clipped at the
/// borders, set to zero after normalisation). With `resized_crop`, torchvision's
/// `RandomResizedCrop(size, scale)` takes the place of the padded crop: a box of a random share
/// of the area and aspect ratio in [3/4, 4/3], resized back to the image's size bilinearly
/// (half-pixel centres, no antialiasing), with weights in 1/256 steps so that every backend
/// computes the same bytes exactly.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Augmentation {
    /// The batch's key: every draw derives from it (see `data::augment`).
    pub key: u64,
    /// Image width in pixels (the height is the channel plane over it).
    pub width: usize,
    /// Crop offsets are drawn from [0, 2 * crop_padding]; 0 means no crop.
    pub crop_padding: usize,
    /// Pad by reflection (torchvision's `reflect`: no edge repeat) instead of with zeros.
    pub reflect: bool,
    pub flip: bool,
    /// With `flip`: flips drawn once per image rather than per batch, turned on alternate
    /// epochs.
    pub alternate_flip: Option<AlternateFlip>,
    /// The cutout square's side; 0 means none.
    pub cutout: usize,
    /// The share of the area a resized crop keeps, drawn from [min, max]; None means none.
    pub resized_crop: Option<[f32; 2]>,
    /// Where this batch's images sit in the batch the key was drawn for.
    pub positions: Positions,
}

/// Where a batch's images sit in the (global) batch whose key their draws come from: image `i`
/// draws as position `first + i * stride`. One process takes the whole batch (0, 1); a
/// data-parallel rank r of W takes every W-th image from r (r, W), so an image's crop, flip and
/// cutout are the same however many processes share the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Positions {
    pub first: usize,
    pub stride: usize,
}

impl Positions {
    /// The whole batch, in order.
    pub const WHOLE: Self = Self {
        first: 0,
        stride: 1,
    };

    fn of(self, i: usize) -> usize {
        self.first + i * self.stride
    }
}

impl Default for Positions {
    fn default() -> Self {
        Self::WHOLE
    }
}

/// airbench's alternating flip: each image's flip is a coin drawn once, from `key` and the
/// image's index in the data set, and every image is turned the other way when `turned` (on
/// every other epoch), so that two epochs show each image both ways.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlternateFlip {
    pub key: u64,
    pub turned: bool,
}

/// A resized crop's box in the source image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropBox {
    pub top: usize,
    pub left: usize,
    pub height: usize,
    pub width: usize,
}

/// One image's draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Draw {
    /// Crop offsets into the padded image.
    pub dy: usize,
    pub dx: usize,
    /// The resized crop's box, when there is one.
    pub crop: Option<CropBox>,
    pub flip: bool,
    /// The cutout square's rows and columns, half-open (empty without cutout).
    pub cut_rows: (usize, usize),
    pub cut_cols: (usize, usize),
}

/// SplitMix64's finaliser: a well-mixed 64-bit hash of `z` (gather/kernels.cu has the same).
pub fn mix(z: u64) -> u64 {
    let z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Augmentation {
    /// Draw `k` of image `i`: uniform in [0, n) (multiply-shift of the hash's top 32 bits).
    fn uniform(&self, i: usize, k: u64, n: usize) -> usize {
        let i = self.positions.of(i);
        let h = mix(self.key ^ mix(((i as u64) << 3) | k));
        (((h >> 32) * n as u64) >> 32) as usize
    }

    /// Draw `k` of attempt `attempt` at a resized crop of image `i`: uniform in [0, 1).
    fn unit(&self, i: usize, attempt: u64, k: u64) -> f64 {
        let i = self.positions.of(i);
        let h = mix(mix(self.key ^ mix(((i as u64) << 3) | 5)) ^ (attempt << 2 | k));
        (h >> 11) as f64 / (1u64 << 53) as f64
    }

    /// torchvision's `RandomResizedCrop.get_params` on a `height` x `width` image: up to ten
    /// tries at a box of a random area share and log-uniform aspect ratio that fits, then the
    /// centre crop with the ratio clamped to [3/4, 4/3].
    pub(super) fn crop_box(&self, i: usize, [min, max]: [f32; 2], height: usize) -> CropBox {
        let (h, w) = (height as f64, self.width as f64);
        let (min_ratio, max_ratio) = (3f64 / 4.0, 4f64 / 3.0);
        for attempt in 0..10 {
            let share = min as f64 + (max as f64 - min as f64) * self.unit(i, attempt, 0);
            let log_ratio =
                min_ratio.ln() + (max_ratio.ln() - min_ratio.ln()) * self.unit(i, attempt, 1);
            let area = h * w * share;
            let ratio = log_ratio.exp();
            let cw = (area * ratio).sqrt().round_ties_even() as usize;
            let ch = (area / ratio).sqrt().round_ties_even() as usize;
            if (1..=self.width).contains(&cw) && (1..=height).contains(&ch) {
                let pick = |k, room: usize| {
                    ((self.unit(i, attempt, k) * (room + 1) as f64) as usize).min(room)
                };
                return CropBox {
                    top: pick(2, height - ch),
                    left: pick(3, self.width - cw),
                    height: ch,
                    width: cw,
                };
            }
        }
        let (ch, cw) = if w / h < min_ratio {
            ((w / min_ratio).round_ties_even() as usize, self.width)
        } else if w / h > max_ratio {
            (height, (h * max_ratio).round_ties_even() as usize)
        } else {
            (height, self.width)
        };
        CropBox {
            top: (height - ch) / 2,
            left: (self.width - cw) / 2,
            height: ch,
            width: cw,
        }
    }

    /// The crop offsets or box, flip and cutout square of the batch's image `i`, which is
    /// `image` in the data set, for images of `height` rows.
    pub fn draw(&self, i: usize, image: usize, height: usize) -> Draw {
        let side = 2 * self.crop_padding + 1;
        let (dy, dx) = (self.uniform(i, 0, side), self.uniform(i, 1, side));
        let flip = match self.alternate_flip {
            Some(f) => ((mix(f.key ^ image as u64) >> 63) == 1) != f.turned,
            None => self.flip && self.uniform(i, 2, 2) == 1,
        };
        let span = |centre: usize, size: usize| {
            let half = self.cutout / 2;
            if self.cutout == 0 {
                (0, 0)
            } else {
                (centre.saturating_sub(half), (centre + half).min(size))
            }
        };
        Draw {
            dy,
            dx,
            crop: self
                .resized_crop
                .map(|scale| self.crop_box(i, scale, height)),
            flip,
            cut_rows: span(self.uniform(i, 3, height), height),
            cut_cols: span(self.uniform(i, 4, self.width), self.width),
        }
    }

    /// The source index along a side of `size` for padded position `p` (= output position +
    /// offset), or None where it is zero padding.
    pub(super) fn source(&self, p: usize, size: usize) -> Option<usize> {
        let pad = self.crop_padding;
        if p >= pad && p - pad < size {
            return Some(p - pad);
        }
        if !self.reflect {
            return None;
        }
        // Reflect without repeating the edge: -1 -> 1, size -> size - 2.
        Some(if p < pad {
            pad - p
        } else {
            2 * (size - 1) - (p - pad)
        })
    }
}

/// Where output position `p` (of `size`) samples a crop of `extent` source pixels, bilinearly
/// with half-pixel centres (PyTorch's `align_corners=False`): the first source pixel and the
/// second's weight in 1/256 steps (0 at the far edge). Integer arithmetic, as in gather/kernels.cu.
pub fn resize_tap(p: usize, size: usize, extent: usize) -> (usize, u32) {
    let at = ((2 * p + 1) * extent * 256).saturating_sub(size * 256) / (2 * size);
    let (first, weight) = (at / 256, (at % 256) as u32);
    if first + 1 >= extent {
        (extent - 1, 0)
    } else {
        (first, weight)
    }
}
