//! Training-time augmentation settings (`[augment]` in a config) and the per-batch draws they
//! lead to: each batch's key derives from (seed, epoch, step) alone, so a resumed run augments
//! exactly as an uninterrupted one, on any device.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ops::gather::{mix, AlternateFlip};
use crate::ops::Augmentation;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[value(rename_all = "lower")]
#[serde(rename_all = "lowercase")]
pub enum PaddingMode {
    /// Black pixels (byte 0), as torchvision's `RandomCrop(padding_mode="constant")`.
    #[default]
    Zero,
    /// The image mirrored at its edge, without repeating the edge (torchvision's `reflect`).
    Reflect,
}

/// The `[augment]` table: what is done to each training image (never to test images).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Augment {
    /// Random crop of the original size from the image padded by this many pixels; 0 = off.
    pub crop_padding: usize,
    pub padding_mode: PaddingMode,
    /// torchvision's `RandomResizedCrop`: a box of a random share of the area (drawn from
    /// `resized_crop_scale`) and aspect ratio in [3/4, 4/3], resized back to the image size.
    pub resized_crop: bool,
    pub resized_crop_scale: [f32; 2],
    /// Horizontal flip with probability 1/2.
    pub flip: bool,
    /// With `flip`: each image's flip drawn once for the run, and every image flipped the
    /// other way on every other epoch (airbench's alternating flip: each image seen both ways
    /// in any two epochs).
    pub alternate_flip: bool,
    /// Side of a square set to zero (the data's mean) around a random pixel; 0 = off.
    pub cutout: usize,
}

impl Default for Augment {
    fn default() -> Self {
        Self {
            crop_padding: 0,
            padding_mode: PaddingMode::Zero,
            resized_crop: false,
            // torchvision's default scale.
            resized_crop_scale: [0.08, 1.0],
            flip: false,
            alternate_flip: false,
            cutout: 0,
        }
    }
}

/// Tags the augmentation's hash apart from anything else a seed feeds.
const STREAM: u64 = 0x6175_676d_656e_7400; // "augment\0"
/// The same for the alternating flip's once-per-run coins.
const FLIP_STREAM: u64 = 0x666c_6970_0000_0000; // "flip"

impl Augment {
    pub fn is_off(&self) -> bool {
        self.crop_padding == 0 && !self.resized_crop && !self.flip && self.cutout == 0
    }

    /// Checks the settings against the data's image size.
    pub fn validate(&self, image_size: usize) -> Result<()> {
        let [min, max] = self.resized_crop_scale;
        if !(min > 0.0 && min <= max && max <= 1.0) {
            return Err(Error::InvalidSetting(format!(
                "augment.resized_crop_scale = [{min}, {max}] is not a range of area shares; \
                 use 0 < min <= max <= 1, e.g. [0.08, 1.0]"
            )));
        }
        if self.resized_crop && self.crop_padding > 0 {
            return Err(Error::InvalidSetting(
                "augment.resized_crop and augment.crop_padding are two kinds of random crop; \
                 set crop_padding = 0 or resized_crop = false"
                    .into(),
            ));
        }
        if self.padding_mode == PaddingMode::Reflect && self.crop_padding >= image_size {
            return Err(Error::InvalidSetting(format!(
                "augment.crop_padding = {} reflects more than a {image_size}-pixel image holds; \
                 use at most {} or padding_mode = \"zero\"",
                self.crop_padding,
                image_size.saturating_sub(1)
            )));
        }
        if self.alternate_flip && !self.flip {
            return Err(Error::InvalidSetting(
                "augment.alternate_flip is a way of flipping; set flip = true with it".into(),
            ));
        }
        if self.cutout > image_size {
            return Err(Error::InvalidSetting(format!(
                "augment.cutout = {} is larger than the {image_size}-pixel images",
                self.cutout
            )));
        }
        Ok(())
    }

    /// The draws for the batch at `step` (counted within the epoch) of `epoch`, for images
    /// `width` pixels wide; None when nothing is switched on.
    pub fn for_batch(
        &self,
        seed: u64,
        epoch: usize,
        step: usize,
        width: usize,
    ) -> Option<Augmentation> {
        if self.is_off() {
            return None;
        }
        let key = mix(mix(mix(seed ^ STREAM) ^ epoch as u64) ^ step as u64);
        Some(Augmentation {
            key,
            width,
            crop_padding: self.crop_padding,
            reflect: self.padding_mode == PaddingMode::Reflect,
            flip: self.flip,
            alternate_flip: self.alternate_flip.then_some(AlternateFlip {
                key: mix(seed ^ FLIP_STREAM),
                turned: epoch.is_multiple_of(2),
            }),
            cutout: self.cutout,
            resized_crop: self.resized_crop.then_some(self.resized_crop_scale),
            positions: crate::ops::Positions::WHOLE,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_depend_on_seed_epoch_and_step_only() {
        let a = Augment {
            crop_padding: 4,
            flip: true,
            ..Augment::default()
        };
        let key = |seed, epoch, step| a.for_batch(seed, epoch, step, 32).unwrap().key;
        assert_eq!(key(1, 2, 3), key(1, 2, 3));
        let keys = [
            key(1, 2, 3),
            key(2, 2, 3),
            key(1, 3, 3),
            key(1, 2, 4),
            key(1, 3, 2),
        ];
        for (i, a) in keys.iter().enumerate() {
            for b in &keys[i + 1..] {
                assert_ne!(a, b);
            }
        }
        assert!(Augment::default().for_batch(1, 1, 1, 32).is_none());
    }

    #[test]
    fn settings_that_do_not_fit_the_images_are_refused() {
        let reflect = Augment {
            crop_padding: 32,
            padding_mode: PaddingMode::Reflect,
            ..Augment::default()
        };
        let err = reflect.validate(32).unwrap_err().to_string();
        assert!(err.contains("at most 31"), "{err}");
        assert!(Augment {
            crop_padding: 32,
            ..Augment::default()
        }
        .validate(32)
        .is_ok());
        assert!("mirror".parse::<PaddingMode>().is_err());
    }
}
