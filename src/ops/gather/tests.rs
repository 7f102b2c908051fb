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
    let ours = gather_normalise(&images, &order, norm, None).unwrap();
    let reference = gather_normalise_reference(&images, &order, norm, None).unwrap();
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
    gather_normalise_into(&buffer, &images, &full, norm, None).unwrap();
    let expected = gather_normalise_reference(&images, &full, norm, None).unwrap();
    assert_eq!(
        buffer.to_vec2::<f32>().unwrap(),
        expected.to_vec2::<f32>().unwrap()
    );
    // A short last batch: the first rows of the same buffer, the rest untouched.
    let short = Tensor::new(&[4u32], &Device::Cpu).unwrap();
    gather_normalise_into(
        &buffer.narrow(0, 0, 1).unwrap(),
        &images,
        &short,
        norm,
        None,
    )
    .unwrap();
    let rows = buffer.to_vec2::<f32>().unwrap();
    let expected_short = gather_normalise_reference(&images, &short, norm, None).unwrap();
    assert_eq!(rows[0], expected_short.to_vec2::<f32>().unwrap()[0]);
    assert_eq!(rows[1..], expected.to_vec2::<f32>().unwrap()[1..]);

    let wrong = Tensor::zeros((2, 12), DType::F32, &Device::Cpu).unwrap();
    let err = gather_normalise_into(&wrong, &images, &full, norm, None).unwrap_err();
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
    let err = gather_normalise(&images, &order, norm, None).unwrap_err();
    assert!(err.to_string().contains("past the 2 images"), "{err}");
}

use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Crop (zero or reflect) or resized crop, flip and cutout: the kernel and candle's
    /// composition agree exactly, on odd sizes and paddings up to the image's side.
    #[test]
    fn augmented_batches_match_candles_composition(
        h in 2usize..9, w in 2usize..9, c in 1usize..4, padding in 0usize..5,
        reflect in any::<bool>(), flip in any::<bool>(), cutout in 0usize..6, key in any::<u64>(),
        resized in any::<bool>(), min_share in 0.05f32..1.0, alternate in 0u32..3,
    ) {
        prop_assume!(!reflect || padding < h.min(w));
        let padding = if resized { 0 } else { padding };
        let resized_crop = resized.then_some([min_share, 1.0]);
        let count = 5;
        let bytes: Vec<u8> = (0..count * c * h * w).map(|i| (i * 97 % 251) as u8).collect();
        let images = Tensor::from_vec(bytes, (count, c * h * w), &Device::Cpu).unwrap();
        let order = Tensor::new(&[3u32, 0, 4, 4, 1, 2, 0], &Device::Cpu).unwrap();
        let norm = Normalisation { mean: &MEAN[..c], std: &STD[..c], plane: h * w };
        let alternate_flip = (alternate > 0).then_some(AlternateFlip {
            key: key.rotate_left(7),
            turned: alternate == 2,
        });
        let a = Augmentation {
            key, width: w, crop_padding: padding, reflect, flip, alternate_flip, cutout,
            resized_crop, positions: Positions::WHOLE,
        };
        let ours = gather_normalise(&images, &order, norm, Some(&a)).unwrap();
        let reference = gather_normalise_reference(&images, &order, norm, Some(&a)).unwrap();
        prop_assert_eq!(ours.to_vec2::<f32>().unwrap(), reference.to_vec2::<f32>().unwrap());
    }
}

/// The draws cover their ranges evenly enough: every crop offset, flips about half the
/// time, cutout centres everywhere; and another key draws otherwise.
#[test]
fn draws_cover_their_ranges() {
    let a = Augmentation {
        key: 42,
        width: 32,
        crop_padding: 4,
        reflect: false,
        flip: true,
        alternate_flip: None,
        cutout: 8,
        resized_crop: None,
        positions: Positions::WHOLE,
    };
    let draws: Vec<Draw> = (0..4000).map(|i| a.draw(i, i, 32)).collect();
    let mut offsets = [0usize; 9];
    for d in &draws {
        offsets[d.dy] += 1;
    }
    assert!(
        offsets.iter().all(|&n| (350..550).contains(&n)),
        "{offsets:?}"
    );
    let flips = draws.iter().filter(|d| d.flip).count();
    assert!((1800..2200).contains(&flips), "{flips}");
    assert!(draws.iter().any(|d| d.cut_rows == (0, 4)));
    assert!(draws.iter().any(|d| d.cut_cols.1 == 32));
    let other = Augmentation { key: 43, ..a };
    assert_ne!(other.draw(0, 0, 32), a.draw(0, 0, 32));
}

/// Alternating flips: about half the images flipped, each image the same way wherever it
/// sits in a batch and whatever the batch's key, and every one of them the other way on a
/// turned epoch.
#[test]
fn alternating_flips_follow_the_image_and_turn_every_other_epoch() {
    let epoch = |key: u64, turned: bool| Augmentation {
        key,
        width: 32,
        crop_padding: 2,
        reflect: true,
        flip: true,
        alternate_flip: Some(AlternateFlip { key: 9, turned }),
        cutout: 0,
        resized_crop: None,
        positions: Positions::WHOLE,
    };
    let flips = |a: &Augmentation, slot: usize| -> Vec<bool> {
        (0..2000)
            .map(|image| a.draw(slot, image, 32).flip)
            .collect()
    };
    let first = flips(&epoch(1, false), 0);
    let count = first.iter().filter(|&&f| f).count();
    assert!((900..1100).contains(&count), "{count}");
    assert_eq!(flips(&epoch(2, false), 17), first);
    let turned: Vec<bool> = first.iter().map(|f| !f).collect();
    assert_eq!(flips(&epoch(3, true), 5), turned);
}

/// Resized crops: boxes inside the image with area shares and aspect ratios in range
/// (torchvision's fallback aside), spread over the range, and the whole image as its own
/// crop resizes to itself.
#[test]
fn resized_crops_fit_their_ranges_and_the_full_box_is_the_identity() {
    let a = Augmentation {
        key: 7,
        width: 64,
        crop_padding: 0,
        reflect: false,
        flip: false,
        alternate_flip: None,
        cutout: 0,
        resized_crop: Some([0.25, 1.0]),
        positions: Positions::WHOLE,
    };
    let (mut smallest, mut largest) = (f64::MAX, 0f64);
    for i in 0..2000 {
        let b = a.draw(i, i, 48).crop.unwrap();
        assert!(b.top + b.height <= 48 && b.left + b.width <= 64, "{b:?}");
        let share = (b.height * b.width) as f64 / (48.0 * 64.0);
        let ratio = b.width as f64 / b.height as f64;
        assert!((0.22..=1.0).contains(&share), "{b:?}");
        assert!((0.7..=1.4).contains(&ratio), "{b:?}");
        smallest = smallest.min(share);
        largest = largest.max(share);
    }
    assert!(smallest < 0.3 && largest > 0.9, "{smallest} {largest}");

    // A square image's whole box (within the ratio range) resizes to itself.
    let bytes: Vec<u8> = (0..2 * 3 * 36).map(|i| (i * 89 % 256) as u8).collect();
    let images = Tensor::from_vec(bytes, (2, 3 * 36), &Device::Cpu).unwrap();
    let order = Tensor::new(&[1u32, 0], &Device::Cpu).unwrap();
    let norm = Normalisation {
        mean: &MEAN,
        std: &STD,
        plane: 36,
    };
    let whole = Augmentation {
        width: 6,
        resized_crop: Some([1.0, 1.0]),
        ..a
    };
    let b = whole.draw(0, 0, 6).crop.unwrap();
    assert_eq!((b.height, b.width), (6, 6));
    let batch = |augment| {
        gather_normalise(&images, &order, norm, augment)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
    };
    assert_eq!(batch(Some(&whole)), batch(None));
}

/// The integer taps are PyTorch's bilinear sampling positions to within a 256th of a pixel.
#[test]
fn resize_taps_follow_half_pixel_centres() {
    for (size, extent) in [(32, 11), (32, 32), (224, 97), (7, 30)] {
        for p in 0..size {
            let exact = ((p as f64 + 0.5) * extent as f64 / size as f64 - 0.5)
                .clamp(0.0, (extent - 1) as f64);
            let (first, weight) = resize_tap(p, size, extent);
            let ours = first as f64 + weight as f64 / 256.0;
            assert!((ours - exact).abs() < 1.0 / 256.0, "{size} {extent} {p}");
        }
    }
}

/// A data-parallel rank's share of a batch draws what its images draw in the whole batch: rank r
/// of W takes positions r, r + W, ..., so W never changes an image's crop, flip or cutout.
#[test]
fn a_ranks_share_draws_as_the_whole_batch() {
    let whole = Augmentation {
        key: 7,
        width: 32,
        crop_padding: 4,
        reflect: true,
        flip: true,
        alternate_flip: None,
        cutout: 8,
        resized_crop: Some([0.35, 1.0]),
        positions: Positions::WHOLE,
    };
    let world = 3;
    for rank in 0..world {
        let share = Augmentation {
            positions: Positions {
                first: rank,
                stride: world,
            },
            ..whole
        };
        for i in 0..10 {
            let position = rank + i * world;
            assert_eq!(
                share.draw(i, 100 + position, 32),
                whole.draw(position, 100 + position, 32)
            );
        }
    }
    let other = Augmentation {
        positions: Positions {
            first: 1,
            stride: 2,
        },
        ..whole
    };
    assert_ne!(other.draw(0, 0, 32), whole.draw(0, 0, 32));
}
