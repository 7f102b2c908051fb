//! Predictions for image files: each decoded and normalised exactly as evaluation's images
//! are, run through the model in batches, and its classes ranked by probability.

use std::path::{Path, PathBuf};

use candle_core::{Device, D};
use candle_nn::ModuleT;
use rayon::prelude::*;

use crate::data::batches::{BatchBuffer, DeviceSet};
use crate::data::folder;
use crate::data::{ChannelStats, ImageSet};
use crate::error::{Error, Result};

/// One image's most likely classes, best first: (class index, probability).
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub path: PathBuf,
    pub top: Vec<(usize, f32)>,
}

/// How images are prepared and batched.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// The model's input size: the shorter side resized to it, then the centre square.
    pub image_size: usize,
    pub stats: ChannelStats,
    pub batch_size: usize,
    pub top_k: usize,
    /// Skip images that do not decode (returned with the reason) instead of stopping.
    pub skip_bad_images: bool,
}

/// What [`predict`] found: predictions in the files' order, and the files skipped.
pub struct Predictions {
    pub predictions: Vec<Prediction>,
    pub skipped: Vec<(PathBuf, String)>,
}

/// Predicts every file of `files` with `model` (in evaluation mode) on `device`, calling
/// `progress(done, total)` after each batch.
pub fn predict(
    model: &dyn ModuleT,
    files: &[PathBuf],
    options: &Options,
    device: &Device,
    progress: &dyn Fn(usize, usize),
) -> Result<Predictions> {
    let side = options.image_size;
    let mut predictions = Vec::with_capacity(files.len());
    let mut skipped = Vec::new();
    let mut buffer = BatchBuffer::default();
    let batch_size = options.batch_size.max(1);
    for chunk in files.chunks(batch_size) {
        let decoded: Vec<_> = chunk
            .par_iter()
            .map(|path| (path, folder::decode(path, side)))
            .collect();
        let mut set = ImageSet::with_capacity(chunk.len(), side);
        let mut paths = Vec::with_capacity(chunk.len());
        for (path, image) in decoded {
            match image {
                Ok(bytes) => {
                    set.push(&bytes, 0);
                    paths.push(path.clone());
                }
                Err(reason) if options.skip_bad_images => skipped.push((path.clone(), reason)),
                Err(reason) => return Err(bad_image(path, &reason)),
            }
        }
        if !set.is_empty() {
            let n = set.len();
            let on_device = DeviceSet::new(set, options.stats, device)?;
            let order = on_device.order(&(0..n).collect::<Vec<_>>())?;
            let (x, _) = on_device.batch(&order, 0..n, &mut buffer, None)?;
            let logits = model.forward_t(&x, false)?;
            let probabilities = candle_nn::ops::softmax(&logits, D::Minus1)?.to_vec2::<f32>()?;
            for (path, row) in paths.into_iter().zip(probabilities) {
                predictions.push(Prediction {
                    path,
                    top: top_k(&row, options.top_k),
                });
            }
        }
        progress(predictions.len() + skipped.len(), files.len());
    }
    Ok(Predictions {
        predictions,
        skipped,
    })
}

fn bad_image(path: &Path, reason: &str) -> Error {
    Error::DataInvalid {
        path: path.to_path_buf(),
        message: format!("{reason}; fix or remove it, or pass --skip-bad-images"),
    }
}

/// The `k` largest entries of `row` with their indices, largest first (ties: lower index first).
pub fn top_k(row: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut ranked: Vec<(usize, f32)> = row.iter().copied().enumerate().collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    ranked.truncate(k);
    ranked
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_ranks_by_probability_and_breaks_ties_by_index() {
        let row = [0.1, 0.4, 0.1, 0.4];
        assert_eq!(top_k(&row, 3), vec![(1, 0.4), (3, 0.4), (0, 0.1)]);
        assert_eq!(top_k(&row, 10).len(), 4);
    }
}
