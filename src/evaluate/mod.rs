//! Evaluation of an image classifier on a labelled set: loss, accuracy, per-class accuracy,
//! confusion matrix, each picture's logits ([`predictions`]); and loading a model from nothing
//! but a weights file ([`load`]).

mod load;
mod predictions;

pub use load::{load_model, Loaded};
pub use predictions::{write_predictions, ImageOutputs};

use candle_core::Tensor;
use candle_nn::ModuleT;

use crate::data::batches::{batch_ranges, BatchBuffer, DeviceSet};
use crate::dist::World;
use crate::error::{Error, Result};
use crate::ops::cross_entropy;

pub struct Evaluation {
    /// Mean cross-entropy (no label smoothing).
    pub loss: f64,
    /// `confusion[true][predicted]`: image counts, one row and column per class.
    pub confusion: Vec<Vec<u64>>,
}

impl Evaluation {
    pub fn total(&self) -> u64 {
        self.confusion.iter().flatten().sum()
    }

    pub fn accuracy(&self) -> f64 {
        let correct: u64 = (0..self.confusion.len())
            .map(|c| self.confusion[c][c])
            .sum();
        correct as f64 / self.total().max(1) as f64
    }

    /// The share of each true class predicted correctly (NaN for a class with no images).
    pub fn per_class(&self) -> Vec<f64> {
        self.confusion
            .iter()
            .enumerate()
            .map(|(c, row)| row[c] as f64 / row.iter().sum::<u64>() as f64)
            .collect()
    }
}

/// The logits of `images` [N, C, H, W] averaged over test-time views, as airbench's
/// `tta_level=2` takes them: the image and its mirror image, half each; then the same pair
/// shifted one pixel up-left and one down-right (the border reflected), the unshifted pair
/// weighing one half and each shifted pair a quarter. Six forward passes per batch.
pub fn tta_logits(model: &dyn ModuleT, images: &Tensor) -> Result<Tensor> {
    let (h, w) = (images.dim(2)?, images.dim(3)?);
    if h < 2 || w < 2 {
        return Err(Error::InvalidSetting(format!(
            "test-time augmentation shifts images by a reflected pixel: {h}x{w} is too small"
        )));
    }
    let mirrored = |x: &Tensor| -> candle_core::Result<Tensor> {
        let plain = model.forward_t(x, false)?.detach();
        let flipped = model.forward_t(&x.flip(&[3])?, false)?.detach();
        (plain + flipped)?.affine(0.5, 0.0)
    };
    // Reflection by one pixel: row 1 above row 0, row H-2 below row H-1 (and so for columns).
    let mut padded = images.clone();
    for (dim, len) in [(2, h), (3, w)] {
        let before = padded.narrow(dim, 1, 1)?;
        let after = padded.narrow(dim, len - 2, 1)?;
        padded = Tensor::cat(&[&before, &padded, &after], dim)?;
    }
    let up_left = padded.narrow(2, 0, h)?.narrow(3, 0, w)?.contiguous()?;
    let down_right = padded.narrow(2, 2, h)?.narrow(3, 2, w)?.contiguous()?;
    let centre = mirrored(images)?.affine(0.5, 0.0)?;
    let shifted = (mirrored(&up_left)? + mirrored(&down_right)?)?.affine(0.25, 0.0)?;
    Ok((centre + shifted)?)
}

/// How an evaluation runs: images in batches of `batch_size`, labels in 0..`num_classes`, with
/// `tta` on [`tta_logits`]' views, the images in `dtype` (the training loop's precision; f32 for
/// `evaluate`).
#[derive(Clone, Copy, Debug)]
pub struct EvalSettings {
    pub batch_size: usize,
    pub num_classes: usize,
    pub tta: bool,
    pub dtype: candle_core::DType,
}

/// Runs `model` (in evaluation mode) over every image of `set` as `settings` say, written into
/// `buffer`. The sums stay on the device until the end: one read, not one per batch.
pub fn evaluate(
    model: &dyn ModuleT,
    set: &DeviceSet,
    buffer: &mut BatchBuffer,
    settings: EvalSettings,
) -> Result<Evaluation> {
    evaluate_into(model, set, buffer, settings, None)
}

/// [`evaluate`], appending each image's logits and predicted class to `outputs` where given
/// (read back per batch, so only when asked).
pub fn evaluate_into(
    model: &dyn ModuleT,
    set: &DeviceSet,
    buffer: &mut BatchBuffer,
    settings: EvalSettings,
    outputs: Option<&mut ImageOutputs>,
) -> Result<Evaluation> {
    let all: Vec<usize> = (0..set.len()).collect();
    evaluate_images(model, set, &all, buffer, settings, outputs)
}

/// [`evaluate`] shared by the ranks of a data-parallel run: each evaluates every W-th image
/// from its rank, and the loss and confusion matrix are summed over the ranks, so each holds
/// the figures of the whole set.
pub fn evaluate_share(
    world: &World,
    model: &dyn ModuleT,
    set: &DeviceSet,
    buffer: &mut BatchBuffer,
    settings: EvalSettings,
) -> Result<Evaluation> {
    if !world.is_distributed() {
        return evaluate(model, set, buffer, settings);
    }
    let share: Vec<usize> = world.share(0..set.len()).collect();
    let part = evaluate_images(model, set, &share, buffer, settings, None)?;
    let images = part.total() as f64;
    let loss_sum = if images > 0.0 {
        part.loss * images
    } else {
        0.0
    };
    // f64 holds image counts exactly (below 2^53).
    let mut sums: Vec<f64> = std::iter::once(loss_sum)
        .chain(part.confusion.iter().flatten().map(|&n| n as f64))
        .collect();
    world.sum_f64(&mut sums)?;
    let mut cells = sums[1..].iter();
    let num_classes = settings.num_classes;
    let confusion: Vec<Vec<u64>> = (0..num_classes)
        .map(|_| {
            (0..num_classes)
                .map(|_| *cells.next().unwrap_or(&0.0) as u64)
                .collect()
        })
        .collect();
    let total: u64 = confusion.iter().flatten().sum();
    Ok(Evaluation {
        loss: if total > 0 {
            sums[0] / total as f64
        } else {
            f64::NAN
        },
        confusion,
    })
}

/// The images of `set` at `indices`, evaluated as `settings` say; each image's logits and
/// predicted class appended to `outputs` where given.
fn evaluate_images(
    model: &dyn ModuleT,
    set: &DeviceSet,
    indices: &[usize],
    buffer: &mut BatchBuffer,
    settings: EvalSettings,
    mut outputs: Option<&mut ImageOutputs>,
) -> Result<Evaluation> {
    let EvalSettings {
        batch_size,
        num_classes,
        tta,
        dtype,
    } = settings;
    let mut confusion = vec![vec![0u64; num_classes]; num_classes];
    if indices.is_empty() {
        return Ok(Evaluation {
            loss: f64::NAN,
            confusion,
        });
    }
    let order = set.order(indices)?;
    let mut loss_sum: Option<Tensor> = None;
    let mut predicted = Vec::new();
    for range in batch_ranges(indices.len(), batch_size) {
        let n = range.len() as f64;
        let (images, labels) = set.batch(&order, range, buffer, None)?;
        let images = images.to_dtype(dtype)?;
        let logits = if tta {
            tta_logits(model, &images)?
        } else {
            model.forward_t(&images, false)?.detach()
        };
        let loss = (cross_entropy(&logits, &labels, 0.0)? * n)?;
        loss_sum = Some(match loss_sum {
            Some(sum) => (sum + loss)?,
            None => loss,
        });
        predicted.push(logits.argmax(1)?);
        if let Some(outputs) = outputs.as_deref_mut() {
            // Read per batch only when asked: an evaluation in training reads nothing back.
            let rows = logits.to_dtype(candle_core::DType::F32)?.flatten_all()?;
            outputs.logits.extend(rows.to_vec1::<f32>()?);
        }
    }
    let predicted = Tensor::cat(&predicted, 0)?.to_vec1::<u32>()?;
    if let Some(outputs) = outputs {
        outputs.predicted.extend(&predicted);
    }
    let labels = set.labels();
    for (&index, &p) in indices.iter().zip(&predicted) {
        let label = labels[index];
        let row = confusion.get_mut(label as usize).ok_or_else(|| {
            Error::InvalidSetting(format!(
                "label {label} is past the model's {num_classes} classes"
            ))
        })?;
        if let Some(cell) = row.get_mut(p as usize) {
            *cell += 1;
        }
    }
    let loss_sum = loss_sum.map_or(Ok(0.0), |t| t.to_scalar::<f32>())?;
    Ok(Evaluation {
        loss: loss_sum as f64 / indices.len() as f64,
        confusion,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;
    use candle_core::Device;

    /// Batches of 7 (the last one short), ten classes, no test-time augmentation, f32.
    const SETTINGS: EvalSettings = EvalSettings {
        batch_size: 7,
        num_classes: 10,
        tta: false,
        dtype: DType::F32,
    };

    /// A linear "model" whose every pixel has its own weight per class, so that a flip or a
    /// shift of the image changes its logits.
    struct PixelWeights {
        weights: Vec<f32>,
        classes: usize,
        pixels: usize,
    }

    impl candle_nn::Module for PixelWeights {
        fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
            let n = x.dim(0)?;
            let w = Tensor::from_slice(&self.weights, (self.classes, self.pixels), x.device())?;
            x.reshape((n, self.pixels))?.matmul(&w.t()?)
        }
    }

    /// Test-time augmentation against the six views built by hand, pixel by pixel: the image
    /// and its mirror (weight 1/4 each), and the image shifted one pixel up-left and one pixel
    /// down-right, edges reflected (row 1 above row 0, row H-2 below row H-1, and so for
    /// columns), each with its mirror (1/8 each).
    #[test]
    fn tta_averages_the_six_views_built_by_hand() {
        use rand::{Rng, SeedableRng};
        let (n, c, h, w, classes) = (2, 3, 4, 5, 3);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let pixels = c * h * w;
        let images: Vec<f32> = (0..n * pixels)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let model = PixelWeights {
            weights: (0..classes * pixels)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect(),
            classes,
            pixels,
        };
        let batch = Tensor::from_slice(&images, (n, c, h, w), &Device::Cpu).unwrap();
        let got = tta_logits(&model, &batch)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();

        let reflect = |i: isize, len: usize| -> usize {
            match i {
                -1 => 1,
                i if i == len as isize => len - 2,
                i => i as usize,
            }
        };
        // The pixel a view shows at (ch, y, x) of image `b`: shifted by (dy, dx), then mirrored.
        let view = |b: usize, ch: usize, y: usize, x: usize, shift: isize, flip: bool| -> f32 {
            let x = if flip { w - 1 - x } else { x };
            let sy = reflect(y as isize + shift, h);
            let sx = reflect(x as isize + shift, w);
            images[((b * c + ch) * h + sy) * w + sx]
        };
        let views = [
            (0, false, 0.25),
            (0, true, 0.25),
            (-1, false, 0.125),
            (-1, true, 0.125),
            (1, false, 0.125),
            (1, true, 0.125),
        ];
        for (b, row) in got.iter().enumerate() {
            for (k, logit) in row.iter().enumerate() {
                let mut want = 0f64;
                for (shift, flip, weight) in views {
                    let mut sum = 0f64;
                    for ch in 0..c {
                        for y in 0..h {
                            for x in 0..w {
                                let at = (ch * h + y) * w + x;
                                sum += f64::from(model.weights[k * pixels + at])
                                    * f64::from(view(b, ch, y, x, shift, flip));
                            }
                        }
                    }
                    want += weight * sum;
                }
                assert!(
                    (f64::from(*logit) - want).abs() < 1e-5,
                    "image {b} class {k}: {logit} against {want}"
                );
            }
        }
    }

    /// A "model" that always predicts class 3.
    struct AlwaysThree;
    impl candle_nn::Module for AlwaysThree {
        fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
            let n = x.dim(0)?;
            let hot: Vec<f32> = (0..n * 10)
                .map(|i| if i % 10 == 3 { 10.0 } else { 0.0 })
                .collect();
            Tensor::from_vec(hot, (n, 10), x.device())?.to_dtype(DType::F32)
        }
    }

    #[test]
    fn confusion_accuracy_and_loss_of_a_constant_model() {
        let set = crate::data::synthetic::generate(30, 0);
        let set = DeviceSet::new(set, crate::data::ChannelStats::CIFAR10, &Device::Cpu).unwrap();
        let eval = evaluate(&AlwaysThree, &set, &mut BatchBuffer::default(), SETTINGS).unwrap();
        assert_eq!(eval.total(), 30);
        assert!(
            (eval.accuracy() - 0.1).abs() < 1e-12,
            "3 of 30 images are class 3"
        );
        assert_eq!(eval.confusion[5][3], 3);
        assert_eq!(eval.confusion[5][5], 0);
        // log-softmax of the right class is -10 - log(1 + 9 e^-10) for 27 images, ~0 for 3.
        let wrong = 10.0 + (1.0f64 + 9.0 * (-10.0f64).exp()).ln();
        let right = (1.0f64 + 9.0 * (-10.0f64).exp()).ln();
        let expected = (27.0 * wrong + 3.0 * right) / 30.0;
        assert!(
            (eval.loss - expected).abs() < 1e-4,
            "{} vs {expected}",
            eval.loss
        );
    }

    /// Each image's outputs: the totals' own predictions, in the set's order, and a CSV whose
    /// logits read back to the same bits and whose paths survive commas and quotes.
    #[test]
    fn each_images_outputs_agree_with_the_totals_and_write_as_csv() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let model = PixelWeights {
            weights: (0..10 * 3 * 32 * 32)
                .map(|_| rng.random_range(-0.01..0.01))
                .collect(),
            classes: 10,
            pixels: 3 * 32 * 32,
        };
        let set = crate::data::synthetic::generate(30, 0);
        let set = DeviceSet::new(set, crate::data::ChannelStats::CIFAR10, &Device::Cpu).unwrap();
        let mut buffer = BatchBuffer::default();
        let mut outputs = ImageOutputs::new(10);
        let eval = evaluate_into(&model, &set, &mut buffer, SETTINGS, Some(&mut outputs)).unwrap();
        let plain = evaluate(&model, &set, &mut buffer, SETTINGS).unwrap();
        assert_eq!(eval.confusion, plain.confusion);
        assert_eq!(eval.loss, plain.loss);
        assert_eq!((outputs.len(), outputs.logits.len()), (30, 300));
        let mut confusion = vec![vec![0u64; 10]; 10];
        for (i, &label) in set.labels().iter().enumerate() {
            let row = outputs.logits(i);
            let top = crate::predict::top_k(row, 1)[0].0;
            assert_eq!(outputs.predicted[i] as usize, top, "image {i}: {row:?}");
            confusion[label as usize][top] += 1;
        }
        assert_eq!(confusion, eval.confusion);
        let distinct: std::collections::HashSet<u32> = outputs.predicted.iter().copied().collect();
        assert!(distinct.len() > 1, "a model that tells the images apart");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("predictions.csv");
        let mut files: Vec<std::path::PathBuf> = (0..30)
            .map(|i| dir.path().join(format!("{i}.png")))
            .collect();
        files[1] = "odd, \"quoted\".png".into();
        write_predictions(&path, &outputs, set.labels(), Some(&files)).unwrap();
        let csv = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), 31);
        assert_eq!(
            lines[0],
            "index,path,label,predicted,logit_0,logit_1,logit_2,logit_3,logit_4,logit_5,\
             logit_6,logit_7,logit_8,logit_9"
        );
        assert!(
            lines[2].starts_with("1,\"odd, \"\"quoted\"\".png\","),
            "{}",
            lines[2]
        );
        for (i, line) in lines[1..].iter().enumerate() {
            if i == 1 {
                continue;
            }
            let fields: Vec<&str> = line.split(',').collect();
            let want = [
                i.to_string(),
                files[i].display().to_string(),
                set.labels()[i].to_string(),
                outputs.predicted[i].to_string(),
            ];
            assert_eq!(fields[..4], want, "{line}");
            let logits: Vec<f32> = fields[4..].iter().map(|v| v.parse().unwrap()).collect();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&logits), bits(outputs.logits(i)), "{line}");
        }
        // Without files (CIFAR-10's records) the path is empty; counts that disagree are refused.
        write_predictions(&path, &outputs, set.labels(), None).unwrap();
        let csv = std::fs::read_to_string(&path).unwrap();
        assert!(csv.lines().nth(1).unwrap().starts_with("0,,"));
        assert!(write_predictions(&path, &outputs, &set.labels()[1..], None).is_err());
    }

    /// Reads four pixels of each image as its "logits", so the averaged views can be checked
    /// one by one.
    struct Probe;
    impl candle_nn::Module for Probe {
        fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
            let (_, _, h, w) = x.dims4()?;
            let at = |c: usize, y: usize, x_: usize| {
                x.narrow(1, c, 1)?
                    .narrow(2, y, 1)?
                    .narrow(3, x_, 1)?
                    .flatten_from(1)
            };
            Tensor::cat(
                &[
                    at(0, 0, 0)?,
                    at(0, 0, w - 1)?,
                    at(1, h - 1, 1)?,
                    at(2, 1, 2)?,
                ],
                1,
            )
        }
    }

    #[test]
    fn test_time_augmentation_averages_mirrored_and_shifted_views() {
        let (n, c, h, w) = (2, 3, 4, 5);
        let values: Vec<f32> = (0..n * c * h * w)
            .map(|i| ((i * 37) % 101) as f32)
            .collect();
        let images = Tensor::from_vec(values.clone(), (n, c, h, w), &Device::Cpu).unwrap();
        let got = tta_logits(&Probe, &images)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(got.len(), n);
        // The same views built by hand: pixel (y, x) of a view reads the image at (y + dy,
        // x + dx), reflected at the border, mirrored first where asked.
        let reflect = |i: isize, len: usize| -> usize {
            let len = len as isize;
            (if i < 0 {
                -i
            } else if i >= len {
                2 * len - 2 - i
            } else {
                i
            }) as usize
        };
        let pixel =
            |img: usize, ch: usize, y: usize, x: usize, (dy, dx): (isize, isize), flip: bool| {
                let x = if flip { w - 1 - x } else { x };
                let (y, x) = (reflect(y as isize + dy, h), reflect(x as isize + dx, w));
                values[((img * c + ch) * h + y) * w + x]
            };
        let probes = [(0, 0, 0), (0, 0, w - 1), (1, h - 1, 1), (2, 1, 2)];
        let views = [((0, 0), 0.25), ((-1, -1), 0.125), ((1, 1), 0.125)];
        for (img, row) in got.iter().enumerate() {
            for (k, &(ch, y, x)) in probes.iter().enumerate() {
                let want: f32 = views
                    .iter()
                    .flat_map(|&(shift, weight)| {
                        [false, true].map(|flip| weight * pixel(img, ch, y, x, shift, flip))
                    })
                    .sum();
                assert!(
                    (row[k] - want).abs() < 1e-3,
                    "image {img} probe {k}: {} vs {want}",
                    row[k]
                );
            }
        }
        // A single row or column has no pixel to reflect.
        let thin = Tensor::zeros((1, 3, 1, 5), DType::F32, &Device::Cpu).unwrap();
        assert!(tta_logits(&Probe, &thin).is_err());
    }
}
