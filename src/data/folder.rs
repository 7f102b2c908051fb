//! Folders of pictures in the ImageFolder layout: `DIR/<class>/<image files>`, class ids in
//! sorted name order, JPEG, PNG, BMP or WebP in any colour mode. `DIR/train` with `DIR/val` (or
//! `DIR/test`) are the two splits when they exist; otherwise a seeded, stratified share of each
//! class is held out.
//!
//! Every image is decoded once (in parallel, EXIF orientation applied, converted to RGB, its
//! shorter side resized to the model's input size and the centre cropped) into a u8 cache file
//! beside the data, keyed by the file list, sizes and modification times. Later runs map that
//! file into memory and start at once; a set larger than memory still trains.

use std::collections::HashSet;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use image::imageops::FilterType;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use super::images::{ChannelStats, ImageSet, CHANNELS};
use super::DataSets;
use crate::error::{Error, Result};

/// File name endings read as images (compared without case).
pub const IMAGE_EXTENSIONS: [&str; 5] = ["jpg", "jpeg", "png", "bmp", "webp"];

/// The decoder's limits against decompression bombs: a picture past either is refused.
const MAX_SIDE: u32 = 16_384;
const MAX_DECODE_BYTES: u64 = 512 << 20;

/// Images decoded between two writes of the cache file: bounds the memory the first run needs.
const IMAGES_PER_WRITE: usize = 1024;

/// How a folder becomes data sets.
#[derive(Debug, Clone)]
pub struct FolderOptions {
    /// Images are `image_size` x `image_size` after resizing and cropping.
    pub image_size: usize,
    /// Without train/ and val/ folders, the share of each class held out for evaluation.
    pub val_split: f64,
    /// Seeds the held-out split.
    pub seed: u64,
    /// Skip (and count) images that do not decode, instead of stopping.
    pub skip_bad_images: bool,
}

/// What a scan and decode found besides the images.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct FolderReport {
    /// Files that are not images by their extension, ignored.
    pub ignored: usize,
    /// Images that did not decode, skipped with `skip_bad_images`.
    pub skipped: Vec<PathBuf>,
    /// Images decoded now (0 when every split came from its cache).
    pub decoded: usize,
    /// Cache files used or written.
    pub caches: Vec<PathBuf>,
    /// Seconds the scan, decoding (or mapping the caches) and the statistics took.
    pub seconds: f64,
}

/// Told how decoding goes: (images done, images in all).
pub type Progress<'a> = &'a (dyn Fn(usize, usize) + Sync);

/// One labelled image file.
#[derive(Debug, Clone)]
struct Entry {
    path: PathBuf,
    label: u32,
}

/// Loads both splits of the folder at `dir`.
pub fn load(
    dir: &Path,
    options: &FolderOptions,
    progress: Progress,
) -> Result<(DataSets, FolderReport)> {
    let started = std::time::Instant::now();
    let mut report = FolderReport::default();
    let (classes, train, test) = match split_folders(dir)? {
        Some((train_dir, test_dir)) => {
            let (classes, train) = scan(&train_dir, &mut report)?;
            let (test_classes, test) = scan(&test_dir, &mut report)?;
            if test_classes != classes {
                return Err(invalid(
                    &test_dir,
                    format!(
                        "its classes ({}) are not {}'s ({}); both splits need the same class folders",
                        test_classes.join(", "),
                        train_dir.display(),
                        classes.join(", ")
                    ),
                ));
            }
            (classes, train, test)
        }
        None => {
            let (classes, all) = scan(dir, &mut report)?;
            let (train, test) =
                stratified_split(all, classes.len(), options.val_split, options.seed);
            if test.is_empty() {
                return Err(invalid(
                    dir,
                    format!(
                        "val_split = {} holds out no image; use a larger --val-split, or DIR/train and DIR/val folders",
                        options.val_split
                    ),
                ));
            }
            (classes, train, test)
        }
    };
    let total = train.len() + test.len();
    let done = AtomicUsize::new(0);
    let (train, _) = decode_cached(dir, &train, options, &done, total, progress, &mut report)?;
    let (test, test_files) =
        decode_cached(dir, &test, options, &done, total, progress, &mut report)?;
    if train.is_empty() || test.is_empty() {
        return Err(invalid(dir, "no image decoded in one of the splits".into()));
    }
    let stats = ChannelStats::of(&train);
    report.seconds = started.elapsed().as_secs_f64();
    Ok((
        DataSets {
            train,
            test,
            test_files: Some(test_files),
            classes,
            stats,
        },
        report,
    ))
}

fn invalid(path: &Path, message: String) -> Error {
    Error::DataInvalid {
        path: path.to_path_buf(),
        message,
    }
}

/// `DIR/train` with `DIR/val` or `DIR/test`, when the folder is split already.
fn split_folders(dir: &Path) -> Result<Option<(PathBuf, PathBuf)>> {
    if !dir.is_dir() {
        return Err(Error::DataMissing {
            dir: dir.to_path_buf(),
            missing: "the folder".into(),
        });
    }
    let train = dir.join("train");
    if !train.is_dir() {
        return Ok(None);
    }
    match ["val", "test"].iter().map(|s| dir.join(s)).find(|p| p.is_dir()) {
        Some(test) => Ok(Some((train, test))),
        None => Err(invalid(
            dir,
            "it has a train/ folder but no val/ or test/ beside it: add one, or put the class folders directly in it".into(),
        )),
    }
}

/// The class folders of `dir` (sorted by name; hidden ones skipped) and every image file in
/// them, recursively, links followed.
fn scan(dir: &Path, report: &mut FolderReport) -> Result<(Vec<String>, Vec<Entry>)> {
    let listing = std::fs::read_dir(dir).map_err(Error::io("cannot list", dir))?;
    let mut class_dirs = Vec::new();
    for entry in listing {
        let path = entry.map_err(Error::io("cannot list", dir))?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.starts_with('.') {
            continue;
        }
        if path.is_dir() {
            class_dirs.push((name, path));
        } else {
            report.ignored += 1;
        }
    }
    class_dirs.sort();
    if class_dirs.is_empty() {
        return Err(invalid(
            dir,
            "it holds no class folders: put each class's images in a folder of its own (DIR/cat/*.jpg, DIR/dog/*.jpg)".into(),
        ));
    }
    if class_dirs.len() == 1 {
        return Err(invalid(
            dir,
            format!(
                "it holds one class folder ({}): a classifier needs at least two",
                class_dirs[0].0
            ),
        ));
    }
    let mut entries = Vec::new();
    let mut classes = Vec::new();
    for (label, (name, path)) in class_dirs.into_iter().enumerate() {
        let mut files = Vec::new();
        let mut visited = HashSet::new();
        walk(&path, &mut files, &mut visited, report)?;
        if files.is_empty() {
            return Err(invalid(
                &path,
                "this class folder holds no images (.jpg, .jpeg, .png, .bmp, .webp): add some or remove it".into(),
            ));
        }
        files.sort();
        entries.extend(files.into_iter().map(|path| Entry {
            path,
            label: label as u32,
        }));
        classes.push(name);
    }
    Ok((classes, entries))
}

/// Collects the image files under `dir`; a link back to a folder on the current path is a loop.
fn walk(
    dir: &Path,
    files: &mut Vec<PathBuf>,
    visited: &mut HashSet<PathBuf>,
    report: &mut FolderReport,
) -> Result<()> {
    let real = std::fs::canonicalize(dir).map_err(Error::io("cannot resolve", dir))?;
    if !visited.insert(real.clone()) {
        return Err(invalid(
            dir,
            format!(
                "a symbolic link loop (it leads back to {}); remove the link",
                real.display()
            ),
        ));
    }
    let listing = std::fs::read_dir(dir).map_err(Error::io("cannot list", dir))?;
    for entry in listing {
        let path = entry.map_err(Error::io("cannot list", dir))?.path();
        let hidden = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if hidden {
            continue;
        }
        if path.is_dir() {
            walk(&path, files, visited, report)?;
        } else if is_image(&path) {
            files.push(path);
        } else {
            report.ignored += 1;
        }
    }
    visited.remove(&real);
    Ok(())
}

/// The image files `paths` name: files as they are, folders' images (searched recursively,
/// in sorted order); and how many other files the folders held.
pub fn image_files(paths: &[PathBuf]) -> Result<(Vec<PathBuf>, usize)> {
    let mut files = Vec::new();
    let mut report = FolderReport::default();
    for path in paths {
        if path.is_dir() {
            let mut found = Vec::new();
            walk(path, &mut found, &mut HashSet::new(), &mut report)?;
            found.sort();
            files.extend(found);
        } else if path.exists() {
            files.push(path.clone());
        } else {
            return Err(invalid(path, "no such file or folder".into()));
        }
    }
    Ok((files, report.ignored))
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.as_str()))
}

/// Holds out `share` of each class (at least one image of a class with two or more), chosen by
/// a shuffle seeded with `seed`; both parts keep the scan's order.
fn stratified_split(
    entries: Vec<Entry>,
    classes: usize,
    share: f64,
    seed: u64,
) -> (Vec<Entry>, Vec<Entry>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut held_out = vec![false; entries.len()];
    for class in 0..classes as u32 {
        let mut members: Vec<usize> = (0..entries.len())
            .filter(|&i| entries[i].label == class)
            .collect();
        members.shuffle(&mut rng);
        let take = ((members.len() as f64 * share).round() as usize)
            .max(usize::from(members.len() >= 2 && share > 0.0))
            .min(members.len().saturating_sub(1));
        for &i in &members[..take] {
            held_out[i] = true;
        }
    }
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for (entry, out) in entries.into_iter().zip(held_out) {
        if out {
            test.push(entry);
        } else {
            train.push(entry);
        }
    }
    (train, test)
}

/// The cache file's last bytes; the version changes when the layout or the decoding does. A
/// cache file is the pixels of every image (from byte 0, so the mapping is aligned), then one
/// u32 label per image, then one u32 per image for its place in the file list (pictures skipped
/// as undecodable leave gaps, and evaluation names each image's file), then the image count and
/// side (u64 each) and this mark.
const MAGIC: &[u8; 8] = b"KILNIMG2";
const TRAILER: usize = 8 + 8 + 8;

/// Where the decoded images of `entries` are cached: beside the data, or (for a folder that
/// cannot be written, such as a read-only share) in the user's cache directory.
fn cache_path(dir: &Path, key: &str) -> PathBuf {
    let beside = dir.join(".kiln-cache");
    if std::fs::create_dir_all(&beside).is_ok() && writable(&beside) {
        return beside.join(format!("{key}.u8"));
    }
    let home = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    let fallback = home.join("kiln");
    // Best effort: a failure shows when the cache is written.
    let _ = std::fs::create_dir_all(&fallback);
    fallback.join(format!("{key}.u8"))
}

fn writable(dir: &Path) -> bool {
    let probe = dir.join(format!(".probe-{}", std::process::id()));
    let ok = File::create(&probe).is_ok();
    let _ = std::fs::remove_file(&probe);
    ok
}

/// The cache key: the decoding's settings, then every file's path, size and modification time.
fn cache_key(entries: &[Entry], options: &FolderOptions) -> Result<String> {
    let mut hash = Sha256::new();
    hash.update(MAGIC);
    hash.update((options.image_size as u64).to_le_bytes());
    hash.update([u8::from(options.skip_bad_images)]);
    for entry in entries {
        let meta = std::fs::metadata(&entry.path).map_err(Error::io("cannot read", &entry.path))?;
        let modified = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .unwrap_or_default();
        hash.update(entry.path.to_string_lossy().as_bytes());
        hash.update([0]);
        hash.update(entry.label.to_le_bytes());
        hash.update(meta.len().to_le_bytes());
        hash.update(modified.as_nanos().to_le_bytes());
    }
    let digest = hash.finalize();
    Ok(digest.iter().take(16).map(|b| format!("{b:02x}")).collect())
}

/// The images of `entries` from their cache, decoding and writing it first if there is none;
/// and the file of each image (`entries` less the pictures skipped as undecodable).
#[allow(clippy::too_many_arguments)]
fn decode_cached(
    dir: &Path,
    entries: &[Entry],
    options: &FolderOptions,
    done: &AtomicUsize,
    total: usize,
    progress: Progress,
    report: &mut FolderReport,
) -> Result<(ImageSet, Vec<PathBuf>)> {
    let path = cache_path(dir, &cache_key(entries, options)?);
    report.caches.push(path.clone());
    let files = |kept: Vec<u32>| -> Vec<PathBuf> {
        kept.into_iter()
            .map(|i| entries[i as usize].path.clone())
            .collect()
    };
    if let Some((set, kept)) = read_cache(&path, options.image_size, entries.len()) {
        done.fetch_add(entries.len(), Ordering::Relaxed);
        progress(done.load(Ordering::Relaxed), total);
        return Ok((set, files(kept)));
    }
    write_cache(&path, entries, options, done, total, progress, report)?;
    let (set, kept) = read_cache(&path, options.image_size, entries.len())
        .ok_or_else(|| invalid(&path, "the cache just written does not read back".into()))?;
    Ok((set, files(kept)))
}

/// A complete cache file of images from a list of `entries` files, mapped into memory, with
/// each image's place in that list; None if there is none (or it does not fit).
fn read_cache(path: &Path, side: usize, entries: usize) -> Option<(ImageSet, Vec<u32>)> {
    let file = File::open(path).ok()?;
    // SAFETY: cache files are written under a temporary name and renamed into place whole,
    // and never modified after: the mapped bytes do not change under the program.
    let map = Arc::new(unsafe { memmap2::Mmap::map(&file) }.ok()?);
    let end = map.len().checked_sub(TRAILER)?;
    let word = |at: usize| -> Option<u64> {
        Some(u64::from_le_bytes(map.get(at..at + 8)?.try_into().ok()?))
    };
    if map.get(end + 16..)? != MAGIC || word(end + 8)? != side as u64 {
        return None;
    }
    let count = usize::try_from(word(end)?).ok()?;
    let pixels = count.checked_mul(CHANNELS * side * side)?;
    let places = pixels.checked_add(count.checked_mul(4)?)?;
    if places.checked_add(count.checked_mul(4)?)? != end {
        return None;
    }
    let words = |bytes: &[u8]| -> Vec<u32> {
        bytes
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    };
    let labels = words(&map[pixels..places]);
    let kept = words(&map[places..end]);
    // In the list's order, each file once: anything else is not a cache of this list.
    let ordered = kept.windows(2).all(|w| w[0] < w[1]);
    if !ordered || kept.last().is_some_and(|&i| i as usize >= entries) {
        return None;
    }
    Some((ImageSet::mapped(map, 0, labels, side).ok()?, kept))
}

/// Decodes `entries` in parallel, a block at a time, straight into the cache file (written
/// under a temporary name and renamed once complete: a killed run leaves no partial cache).
#[allow(clippy::too_many_arguments)]
fn write_cache(
    path: &Path,
    entries: &[Entry],
    options: &FolderOptions,
    done: &AtomicUsize,
    total: usize,
    progress: Progress,
    report: &mut FolderReport,
) -> Result<()> {
    let side = options.image_size;
    let mut labels = Vec::with_capacity(entries.len());
    let mut kept = Vec::with_capacity(entries.len());
    let mut failure = None;
    if u32::try_from(entries.len()).is_err() {
        return Err(invalid(
            path,
            format!(
                "{} pictures in one split: the cache holds at most {}",
                entries.len(),
                u32::MAX
            ),
        ));
    }
    let written = crate::fs::write_atomic_with(path, |file| {
        for (b, block) in entries.chunks(IMAGES_PER_WRITE).enumerate() {
            let decoded: Vec<std::result::Result<Vec<u8>, String>> = block
                .par_iter()
                .map(|entry| {
                    let image = decode(&entry.path, side);
                    progress(done.fetch_add(1, Ordering::Relaxed) + 1, total);
                    image
                })
                .collect();
            for (i, (entry, image)) in block.iter().zip(decoded).enumerate() {
                match image {
                    Ok(bytes) => {
                        file.write_all(&bytes)?;
                        labels.push(entry.label);
                        // Below u32::MAX: the list's length was checked above.
                        kept.push((b * IMAGES_PER_WRITE + i) as u32);
                        report.decoded += 1;
                    }
                    Err(why) if options.skip_bad_images => {
                        tracing::warn!("skipped {}: {why}", entry.path.display());
                        report.skipped.push(entry.path.clone());
                    }
                    Err(why) => {
                        failure = Some(invalid(
                            &entry.path,
                            format!("{why}; fix or remove the file, or pass --skip-bad-images to skip such files"),
                        ));
                        return Err(std::io::Error::other("a bad image"));
                    }
                }
            }
        }
        for word in labels.iter().chain(&kept) {
            file.write_all(&word.to_le_bytes())?;
        }
        file.write_all(&(labels.len() as u64).to_le_bytes())?;
        file.write_all(&(side as u64).to_le_bytes())?;
        file.write_all(MAGIC)
    });
    match (failure, written) {
        (Some(bad_image), _) => Err(bad_image),
        (None, result) => result.map_err(|e| match e {
            Error::Io { path, cause, .. } => Error::Io {
                action: "cannot write the image cache",
                path,
                cause,
            },
            other => other,
        }),
    }
}

/// One image file as `side` x `side` RGB CHW bytes: decoded within limits, turned as its EXIF
/// orientation says, converted to RGB, shorter side resized to `side`, centre cropped.
pub fn decode(path: &Path, side: usize) -> std::result::Result<Vec<u8>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read it ({e})"))?;
    decode_bytes(&bytes, side)
}

/// [`decode`] for bytes already read.
pub fn decode_bytes(bytes: &[u8], side: usize) -> std::result::Result<Vec<u8>, String> {
    use image::ImageDecoder;
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| format!("not an image ({e})"))?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| format!("not a readable image ({e})"))?;
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut image =
        image::DynamicImage::from_decoder(decoder).map_err(|e| format!("does not decode ({e})"))?;
    image.apply_orientation(orientation);
    let rgb = image.to_rgb8();
    let (w, h) = rgb.dimensions();
    if w == 0 || h == 0 {
        return Err("an empty image".into());
    }
    // Shorter side to `side`, as torchvision's Resize(side), then the centre square.
    let scale = side as f64 / f64::from(w.min(h));
    let (nw, nh) = (
        ((f64::from(w) * scale).round() as u32).max(side as u32),
        ((f64::from(h) * scale).round() as u32).max(side as u32),
    );
    let resized = image::imageops::resize(&rgb, nw, nh, FilterType::Triangle);
    let (x0, y0) = ((nw - side as u32) / 2, (nh - side as u32) / 2);
    let mut chw = vec![0u8; CHANNELS * side * side];
    for y in 0..side {
        for x in 0..side {
            let pixel = resized.get_pixel(x0 + x as u32, y0 + y as u32);
            for c in 0..CHANNELS {
                chw[c * side * side + y * side + x] = pixel[c];
            }
        }
    }
    Ok(chw)
}

#[cfg(test)]
mod tests;
