//! Folders of generated pictures: layouts, splits, colour modes, orientation, the cache, and
//! every kind of bad input.

use super::*;
use image::{GrayImage, ImageBuffer, Luma, Rgb, RgbImage, Rgba, RgbaImage};

fn options(image_size: usize) -> FolderOptions {
    FolderOptions {
        image_size,
        val_split: 0.25,
        seed: 7,
        skip_bad_images: false,
    }
}

fn quiet(_: usize, _: usize) {}

/// A `w` x `h` picture of one colour.
fn solid(w: u32, h: u32, colour: [u8; 3]) -> RgbImage {
    RgbImage::from_pixel(w, h, Rgb(colour))
}

/// `count` pictures per class under `dir/<class>/`, alternating PNG and JPEG, of the class's
/// colour; returns the file paths.
fn write_classes(dir: &Path, classes: &[(&str, [u8; 3])], count: usize) -> Vec<PathBuf> {
    let mut paths = Vec::new();
    for (name, colour) in classes {
        std::fs::create_dir_all(dir.join(name)).unwrap();
        for i in 0..count {
            let ext = if i % 2 == 0 { "png" } else { "jpg" };
            let path = dir.join(name).join(format!("{i:03}.{ext}"));
            solid(40 + i as u32, 30, *colour).save(&path).unwrap();
            paths.push(path);
        }
    }
    paths
}

fn mean_colour(set: &ImageSet, i: usize) -> [f64; 3] {
    let plane = set.side() * set.side();
    let image = set.image(i);
    std::array::from_fn(|c| {
        image[c * plane..(c + 1) * plane]
            .iter()
            .map(|&b| f64::from(b))
            .sum::<f64>()
            / plane as f64
    })
}

#[test]
fn classes_in_sorted_order_a_seeded_stratified_split_and_the_cache() {
    let root = tempfile::tempdir().unwrap();
    let red_blue = [("zebra", [250, 10, 10]), ("ant", [10, 10, 250])];
    write_classes(root.path(), &red_blue, 8);
    std::fs::write(root.path().join("zebra/notes.txt"), "not a picture").unwrap();
    let (sets, report) = load(root.path(), &options(16), &quiet).unwrap();
    assert_eq!(sets.classes, ["ant", "zebra"], "sorted by name");
    assert_eq!(
        (sets.train.len(), sets.test.len()),
        (12, 4),
        "a quarter of each class held out"
    );
    assert_eq!(sets.train.side(), 16);
    assert_eq!(report.ignored, 1);
    assert_eq!(report.decoded, 16);
    for set in [&sets.train, &sets.test] {
        for (i, &label) in set.labels().iter().enumerate() {
            let colour = mean_colour(set, i);
            let (bright, dim) = if label == 0 { (2, 0) } else { (0, 2) };
            assert!(
                colour[bright] > 200.0 && colour[dim] < 60.0,
                "{label}: {colour:?}"
            );
        }
    }
    let per_class =
        |set: &ImageSet, class: u32| set.labels().iter().filter(|&&l| l == class).count();
    assert_eq!((per_class(&sets.test, 0), per_class(&sets.test, 1)), (2, 2));

    // Again: from the cache (mapped), the same images; another seed, another split.
    let (again, report) = load(root.path(), &options(16), &quiet).unwrap();
    assert_eq!(report.decoded, 0);
    assert!(again.train.is_mapped());
    assert!(again.train == sets.train && again.test == sets.test);
    let other = FolderOptions {
        seed: 8,
        ..options(16)
    };
    let (reshuffled, _) = load(root.path(), &other, &quiet).unwrap();
    assert!(
        reshuffled.test != sets.test,
        "the seed chooses the held-out images"
    );

    // A changed file is decoded again.
    solid(50, 50, [250, 250, 250])
        .save(root.path().join("ant/000.png"))
        .unwrap();
    let (changed, report) = load(root.path(), &options(16), &quiet).unwrap();
    assert!(report.decoded > 0);
    assert!(changed.train != sets.train || changed.test != sets.test);
}

#[test]
fn train_and_val_folders_are_the_split() {
    let root = tempfile::tempdir().unwrap();
    write_classes(
        &root.path().join("train"),
        &[("a", [200, 0, 0]), ("b", [0, 200, 0])],
        3,
    );
    write_classes(
        &root.path().join("val"),
        &[("a", [200, 0, 0]), ("b", [0, 200, 0])],
        2,
    );
    let (sets, _) = load(root.path(), &options(8), &quiet).unwrap();
    assert_eq!((sets.train.len(), sets.test.len()), (6, 4));
    assert_eq!(sets.test.labels(), [0, 0, 1, 1]);
    let val = root.path().join("val");
    let files = ["a/000.png", "a/001.jpg", "b/000.png", "b/001.jpg"].map(|f| val.join(f));
    assert_eq!(sets.test_files.as_deref(), Some(&files[..]));

    std::fs::create_dir_all(root.path().join("val/c")).unwrap();
    solid(8, 8, [1, 2, 3])
        .save(root.path().join("val/c/x.png"))
        .unwrap();
    let err = load(root.path(), &options(8), &quiet)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("not") && err.contains("same class folders"),
        "{err}"
    );
}

#[test]
fn every_colour_mode_becomes_rgb_and_the_shorter_side_is_cropped_around_the_centre() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("modes");
    std::fs::create_dir_all(&dir).unwrap();
    GrayImage::from_pixel(20, 20, Luma([128]))
        .save(dir.join("grey.png"))
        .unwrap();
    RgbaImage::from_pixel(20, 20, Rgba([255, 0, 0, 10]))
        .save(dir.join("rgba.png"))
        .unwrap();
    ImageBuffer::<Luma<u16>, Vec<u16>>::from_pixel(20, 20, Luma([65535]))
        .save(dir.join("deep.png"))
        .unwrap();
    // 30 wide, 10 high: the middle third is green, the sides red; the centre crop keeps green.
    RgbImage::from_fn(30, 10, |x, _| {
        if (10..20).contains(&x) {
            Rgb([0, 255, 0])
        } else {
            Rgb([255, 0, 0])
        }
    })
    .save(dir.join("wide.bmp"))
    .unwrap();
    let grey = decode(&dir.join("grey.png"), 4).unwrap();
    assert!(grey.iter().all(|&b| b == 128));
    let rgba = decode(&dir.join("rgba.png"), 4).unwrap();
    assert_eq!((rgba[0], rgba[16], rgba[32]), (255, 0, 0), "alpha dropped");
    assert!(decode(&dir.join("deep.png"), 4)
        .unwrap()
        .iter()
        .all(|&b| b == 255));
    let wide = decode(&dir.join("wide.bmp"), 10).unwrap();
    assert!(
        wide[..100].iter().all(|&b| b < 20) && wide[100..200].iter().all(|&b| b > 235),
        "green centre"
    );
}

/// A JPEG with an EXIF APP1 segment saying Orientation = `value`.
fn with_orientation(jpeg: &[u8], value: u16) -> Vec<u8> {
    let mut tiff = b"MM\x00\x2a\x00\x00\x00\x08".to_vec();
    tiff.extend([0, 1]); // one IFD entry
    tiff.extend([0x01, 0x12, 0x00, 0x03, 0, 0, 0, 1]); // Orientation, SHORT, count 1
    tiff.extend(value.to_be_bytes());
    tiff.extend([0, 0, 0, 0, 0, 0]); // value padding, no next IFD
    let mut app1 = b"Exif\x00\x00".to_vec();
    app1.extend(tiff);
    let mut out = jpeg[..2].to_vec(); // SOI
    out.extend([0xFF, 0xE1]);
    out.extend(((app1.len() + 2) as u16).to_be_bytes());
    out.extend(app1);
    out.extend(&jpeg[2..]);
    out
}

#[test]
fn exif_orientation_is_honoured() {
    // 16 wide, 8 high: red on the left half, blue on the right. Turned 90 degrees clockwise
    // (Orientation 6), red is on top.
    let picture = RgbImage::from_fn(16, 8, |x, _| {
        if x < 8 {
            Rgb([255, 0, 0])
        } else {
            Rgb([0, 0, 255])
        }
    });
    let mut jpeg = Vec::new();
    picture
        .write_to(
            &mut std::io::Cursor::new(&mut jpeg),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
    let turned = decode_bytes(&with_orientation(&jpeg, 6), 8).unwrap();
    let red = &turned[..64];
    let (top, bottom) = (
        red[..8].iter().map(|&b| u32::from(b)).sum::<u32>(),
        red[56..].iter().map(|&b| u32::from(b)).sum::<u32>(),
    );
    assert!(
        top > 1500 && bottom < 500,
        "red on top after turning: {top} {bottom}"
    );
    let plain = decode_bytes(&jpeg, 8).unwrap();
    let left: u32 = (0..8).map(|y| u32::from(plain[y * 8])).sum();
    assert!(left > 1500, "untouched without EXIF: red on the left");
}

#[test]
fn bad_inputs_are_clear_errors_or_counted_skips() {
    let root = tempfile::tempdir().unwrap();
    let case = |name: &str| {
        let dir = root.path().join(name);
        write_classes(&dir, &[("a", [9, 9, 9]), ("b", [99, 99, 99])], 4);
        dir
    };
    let err = |dir: &Path| load(dir, &options(8), &quiet).unwrap_err().to_string();

    let broken = case("broken");
    std::fs::write(broken.join("a/bad.jpg"), b"\xFF\xD8\xFF\xE0 truncated").unwrap();
    let message = err(&broken);
    assert!(
        message.contains("bad.jpg") && message.contains("--skip-bad-images"),
        "{message}"
    );
    let skip = FolderOptions {
        skip_bad_images: true,
        ..options(8)
    };
    let (sets, report) = load(&broken, &skip, &quiet).unwrap();
    assert_eq!(report.skipped.len(), 1);
    assert_eq!(sets.train.len() + sets.test.len(), 8);
    // The held-out images' files leave the skipped picture out, decoded or from the cache; a
    // split that holds it out leaves a gap that the cache records.
    let bad = broken.join("a/bad.jpg");
    let mut gap = false;
    for seed in 0..64 {
        let skip = FolderOptions {
            seed,
            ..skip.clone()
        };
        let (decoded, _) = load(&broken, &skip, &quiet).unwrap();
        let (cached, report) = load(&broken, &skip, &quiet).unwrap();
        assert_eq!(report.decoded, 0);
        let files = decoded.test_files.unwrap();
        assert_eq!(cached.test_files.unwrap(), files);
        assert_eq!(files.len(), decoded.test.len());
        assert!(!files.contains(&bad));
        for (file, &label) in files.iter().zip(decoded.test.labels()) {
            let class = if label == 0 { "a" } else { "b" };
            assert!(file.starts_with(broken.join(class)), "{}", file.display());
        }
        // The bad picture held out: one picture of two left, the other class's.
        gap = files.len() == 1;
        if gap {
            break;
        }
    }
    assert!(gap, "no seed held the bad picture out");

    let empty = case("empty");
    std::fs::create_dir_all(empty.join("c")).unwrap();
    std::fs::write(empty.join("c/readme.txt"), "no pictures").unwrap();
    let message = err(&empty);
    assert!(
        message.contains("empty/c") && message.contains("holds no images"),
        "{message}"
    );

    let single = root.path().join("single");
    write_classes(&single, &[("only", [1, 1, 1])], 3);
    assert!(err(&single).contains("one class folder (only)"));

    let nothing = root.path().join("nothing");
    std::fs::create_dir_all(&nothing).unwrap();
    std::fs::write(nothing.join("x.txt"), "").unwrap();
    assert!(err(&nothing).contains("no class folders"));

    let bomb = case("bomb");
    // A PNG header announcing a 100,000 x 100,000 picture (and nothing after).
    let mut png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR".to_vec();
    png.extend(100_000u32.to_be_bytes());
    png.extend(100_000u32.to_be_bytes());
    png.extend([8, 2, 0, 0, 0]);
    png.extend(crc32fast::hash(&png[12..]).to_be_bytes());
    std::fs::write(bomb.join("b/huge.png"), png).unwrap();
    let message = err(&bomb);
    assert!(
        message.contains("huge.png") && message.to_lowercase().contains("limit"),
        "{message}"
    );

    #[cfg(unix)]
    {
        let looped = case("looped");
        std::os::unix::fs::symlink(looped.join("a"), looped.join("a/again")).unwrap();
        let message = err(&looped);
        assert!(message.contains("symbolic link loop"), "{message}");
    }
    assert!(
        !root
            .path()
            .join("broken/.kiln-cache")
            .read_dir()
            .unwrap()
            .any(|e| { e.unwrap().file_name().to_string_lossy().contains("tmp") }),
        "a failed decode leaves no partial cache"
    );
}
