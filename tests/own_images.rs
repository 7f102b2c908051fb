//! Your own images end to end: a folder of generated PNG and JPEG pictures trained on,
//! fine-tuned from PyTorch-saved weights, predicted on, and every bad input a clear error.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use candle_core::Device;
use common::{column, run, text};
use image::{ImageEncoder, Rgb, RgbImage};
use kiln::checkpoint::load_weights;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// PyTorch-trained ResNet-18 (width 4, cifar stem) on discs, squares, triangles and crosses
/// (pytorch/make_pretrained_fixture.py).
const PRETRAINED: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/shapes-resnet18.safetensors"
);

/// A flat shape of a random colour on a flat random background, as the fixture's script
/// draws them: "disc" or "square" (anything else: a disc with a hole, for extra classes).
fn picture(kind: &str, rng: &mut ChaCha8Rng) -> RgbImage {
    let background: [u8; 3] = std::array::from_fn(|_| rng.random());
    let colour: [u8; 3] =
        std::array::from_fn(|c| background[c].wrapping_add(rng.random_range(64..192)));
    let r: i32 = rng.random_range(6..12);
    let (cy, cx): (i32, i32) = (rng.random_range(r..32 - r), rng.random_range(r..32 - r));
    RgbImage::from_fn(32, 32, |x, y| {
        let (dy, dx) = (y as i32 - cy, x as i32 - cx);
        let inside = match kind {
            "square" => dy.abs() <= r && dx.abs() <= r,
            "disc" => dy * dy + dx * dx <= r * r,
            _ => (r * r / 4..=r * r).contains(&(dy * dy + dx * dx)),
        };
        Rgb(if inside { colour } else { background })
    })
}

/// `dir/<split>/<class>/NNN.png|jpg`: `count` pictures per class for each split, PNG and JPEG
/// alternating; `classes` maps a folder name to the shape it holds.
fn write_folder(dir: &Path, classes: &[(&str, &str)], splits: &[(&str, usize)], seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for (split, count) in splits {
        for (class, shape) in classes {
            let folder = dir.join(split).join(class);
            std::fs::create_dir_all(&folder).unwrap();
            for i in 0..*count {
                let ext = if i % 2 == 0 { "png" } else { "jpg" };
                picture(shape, &mut rng)
                    .save(folder.join(format!("{i:03}.{ext}")))
                    .unwrap();
            }
        }
    }
}

/// A ResNet-18 config the fixture's weights fit (width 4, cifar stem), trained briefly.
fn write_config(root: &Path, epochs: usize) -> String {
    let base = kiln::models::find("resnet18").unwrap().default_config;
    let mut config: toml::Table = toml::from_str(base).unwrap();
    for (key, value) in [
        ("width", toml::Value::Integer(4)),
        ("stem", "cifar".into()),
        ("epochs", toml::Value::Integer(epochs as i64)),
        ("batch_size", toml::Value::Integer(8)),
        ("optimizer", "adam".into()),
        ("lr", toml::Value::Float(0.01)),
        ("weight_decay", toml::Value::Float(0.0)),
        ("label_smoothing", toml::Value::Float(0.0)),
        ("dataset", "folder".into()),
    ] {
        config.insert(key.into(), value);
    }
    config.insert("schedule".into(), toml::toml! { kind = "constant" }.into());
    config.insert("augment".into(), toml::Table::new().into());
    let path = root.join("tiny-resnet18.toml");
    std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
    path.display().to_string()
}

fn train(args: &[&str], root: &Path) -> Output {
    run("train", args, root)
}

fn best_accuracy(run_dir: &Path) -> f64 {
    let csv = std::fs::read_to_string(run_dir.join("metrics.csv")).unwrap();
    column(&csv, "test_acc").into_iter().fold(0.0, f64::max)
}

#[test]
fn fine_tuning_from_pytorch_weights_beats_training_from_scratch() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("shapes");
    // Few training pictures: the pretrained features carry the task, scratch cannot learn it.
    write_folder(
        &data,
        &[("boxy", "square"), ("round", "disc")],
        &[("train", 8), ("val", 40)],
        7,
    );
    let config = write_config(root.path(), 8);
    let data_dir = data.display().to_string();
    let common = [
        "--config",
        &config,
        "--data-dir",
        &data_dir,
        "--device",
        "cpu",
    ];
    let scratch = train(&[&common[..], &["--run", "scratch"]].concat(), root.path());
    assert!(scratch.status.success(), "{}", text(&scratch.stderr));
    let tuned = train(
        &[
            &common[..],
            &[
                "--run",
                "tuned",
                "--init-weights",
                PRETRAINED,
                "--finetune",
                "--backbone-lr-scale",
                "0.1",
            ],
        ]
        .concat(),
        root.path(),
    );
    assert!(tuned.status.success(), "{}", text(&tuned.stderr));
    let stdout = text(&tuned.stdout);
    assert!(
        stdout.contains("120 tensors loaded; started afresh: fc.weight [2, 32] (the file's is [4, 32]), fc.bias [2] (the file's is [4])"),
        "{stdout}"
    );
    let models = root.path().join("models");
    let (scratch_acc, tuned_acc) = (
        best_accuracy(&models.join("scratch")),
        best_accuracy(&models.join("tuned")),
    );
    assert!(
        tuned_acc >= 0.85 && tuned_acc > scratch_acc + 0.2,
        "fine-tuned {tuned_acc} vs scratch {scratch_acc}"
    );

    // predict agrees with evaluate: the share of pictures whose top class is their folder's is
    // evaluate's accuracy on the same pictures.
    let weights = models.join("tuned/best.safetensors");
    let weights = weights.display().to_string();
    let evaluated = run(
        "evaluate",
        &["--checkpoint", &weights, "--json"],
        root.path(),
    );
    assert!(evaluated.status.success(), "{}", text(&evaluated.stderr));
    let report: serde_json::Value = serde_json::from_slice(&evaluated.stdout).unwrap();
    let val = data.join("val").display().to_string();
    let predicted = run(
        "predict",
        &["--weights", &weights, &val, "--json", "--top-k", "1"],
        root.path(),
    );
    assert!(predicted.status.success(), "{}", text(&predicted.stderr));
    let lines: Vec<serde_json::Value> = text(&predicted.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 80);
    let right = lines
        .iter()
        .filter(|p| {
            let folder = Path::new(p["path"].as_str().unwrap())
                .parent()
                .and_then(Path::file_name)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            p["top"][0]["class"] == folder
        })
        .count();
    assert_eq!(report["images"], 80);
    assert_eq!(right as f64 / 80.0, report["accuracy"].as_f64().unwrap());

    // Frozen: the backbone's weights stay the file's, bit for bit; the classifier trains.
    let frozen = train(
        &[
            &common[..],
            &[
                "--run",
                "frozen",
                "--init-weights",
                PRETRAINED,
                "--finetune",
                "--freeze-backbone",
                "--epochs",
                "1",
            ],
        ]
        .concat(),
        root.path(),
    );
    assert!(frozen.status.success(), "{}", text(&frozen.stderr));
    let before = load_weights(Path::new(PRETRAINED), &Device::Cpu).unwrap();
    let after = load_weights(&models.join("frozen/last.safetensors"), &Device::Cpu).unwrap();
    let bits = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut compared = 0;
    for (name, tensor) in &after.tensors {
        let trained = name.ends_with(".weight") || name.ends_with(".bias");
        if name.starts_with("fc.") || !trained {
            continue; // the new classifier; BatchNorm's running statistics
        }
        assert_eq!(bits(tensor), bits(&before.tensors[name]), "{name} moved");
        compared += 1;
    }
    assert_eq!(compared, 60);
}

/// A valid folder of two classes, split by val_split.
fn small_folder(dir: &Path) {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for class in ["boxy", "round"] {
        let folder = dir.join(class);
        std::fs::create_dir_all(&folder).unwrap();
        for i in 0..6 {
            let shape = if class == "boxy" { "square" } else { "disc" };
            picture(shape, &mut rng)
                .save(folder.join(format!("{i}.png")))
                .unwrap();
        }
    }
}

/// Every file under `dir` but the decoded caches, with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if path.file_name().is_some_and(|n| n == ".kiln-cache") {
                continue;
            }
            if meta.is_dir() {
                walk(&path, out);
            } else if meta.is_file() {
                out.insert(path.clone(), std::fs::read(&path).unwrap());
            } else {
                out.insert(path.clone(), Vec::new());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, &mut out);
    out
}

/// `train` on a folder fails with exit code 1 and one line on stderr holding `needle`,
/// without a panic, leaving `watched` (data and earlier runs) as it was.
fn refused(args: &[&str], root: &Path, watched: &Path, needle: &str) {
    let before = snapshot(watched);
    let out = train(args, root);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains(needle), "{needle:?} not in {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        before == snapshot(watched),
        "{args:?} changed {}",
        watched.display()
    );
}

#[test]
fn bad_folders_are_one_line_errors_that_touch_nothing() {
    let root = tempfile::tempdir().unwrap();
    let config = write_config(root.path(), 1);
    let case = |name: &str| {
        let dir = root.path().join(name);
        small_folder(&dir);
        dir
    };
    let go = |dir: &Path, extra: &[&str], needle: &str| {
        let d = dir.display().to_string();
        let args = [
            &["--config", &config, "--data-dir", &d, "--run", "x"][..],
            extra,
        ]
        .concat();
        refused(&args, root.path(), root.path(), needle);
    };

    let truncated = case("truncated");
    let bytes = std::fs::read(truncated.join("round/0.png")).unwrap();
    let bad = truncated.join("round/1.png");
    std::fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
    go(&truncated, &[], &format!("{}", bad.display()));
    let skipped = train(
        &[
            "--config",
            &config,
            "--data-dir",
            &truncated.display().to_string(),
            "--run",
            "skipping",
            "--skip-bad-images",
        ],
        root.path(),
    );
    assert!(skipped.status.success(), "{}", text(&skipped.stderr));
    assert!(text(&skipped.stdout).contains("skipped 1 pictures that do not decode"));

    let empty = case("empty");
    std::fs::create_dir(empty.join("square")).unwrap();
    go(&empty, &[], "square");

    let single = root.path().join("single");
    small_folder(&single);
    std::fs::remove_dir_all(single.join("round")).unwrap();
    go(&single, &[], "a classifier needs at least two");

    let nothing = root.path().join("nothing");
    std::fs::create_dir_all(nothing.join("a")).unwrap();
    std::fs::create_dir_all(nothing.join("b")).unwrap();
    std::fs::write(nothing.join("a/notes.txt"), "no pictures here").unwrap();
    go(&nothing, &[], "nothing");

    // A PNG whose header claims 100,000 x 100,000 pixels: refused by the decoder's limits
    // before any memory is taken.
    let bomb = case("bomb");
    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new(&mut png)
        .write_image(&[0u8; 3], 1, 1, image::ExtendedColorType::Rgb8)
        .unwrap();
    png[16..20].copy_from_slice(&100_000u32.to_be_bytes());
    png[20..24].copy_from_slice(&100_000u32.to_be_bytes());
    let bomb_file = bomb.join("boxy/bomb.png");
    std::fs::write(&bomb_file, &png).unwrap();
    go(&bomb, &[], &format!("{}", bomb_file.display()));

    #[cfg(unix)]
    {
        let looped = case("looped");
        std::os::unix::fs::symlink("..", looped.join("round/again")).unwrap();
        go(&looped, &[], "symbolic link loop");
    }

    // Files that are not pictures are ignored and counted.
    let notes = case("notes");
    std::fs::write(notes.join("boxy/README.txt"), "about these").unwrap();
    let ignored = train(
        &[
            "--config",
            &config,
            "--data-dir",
            &notes.display().to_string(),
            "--run",
            "notes",
        ],
        root.path(),
    );
    assert!(ignored.status.success(), "{}", text(&ignored.stderr));
    assert!(text(&ignored.stdout).contains("ignored 1 files that are not pictures"));

    // Classes that differ from the run's: refused on resume, on evaluate, and for weights
    // loaded without --finetune.
    std::fs::create_dir(notes.join("spiky")).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    for i in 0..6 {
        picture("ring", &mut rng)
            .save(notes.join(format!("spiky/{i}.png")))
            .unwrap();
    }
    let notes_dir = notes.display().to_string();
    let resume = [
        "--config",
        &config,
        "--data-dir",
        &notes_dir,
        "--run",
        "notes",
        "--resume",
        "--epochs",
        "2",
    ];
    refused(
        &resume,
        root.path(),
        root.path(),
        "trained on the classes boxy, round",
    );
    let weights = root.path().join("models/notes/best.safetensors");
    let before = snapshot(root.path());
    let evaluated = run(
        "evaluate",
        &[
            "--checkpoint",
            &weights.display().to_string(),
            "--data-dir",
            &notes_dir,
        ],
        root.path(),
    );
    assert_eq!(evaluated.status.code(), Some(1));
    let stderr = text(&evaluated.stderr);
    assert!(
        stderr.contains("trained on the classes boxy, round")
            && stderr.trim_end().lines().count() == 1,
        "{stderr}"
    );
    assert!(before == snapshot(root.path()));
    refused(
        &[
            "--config",
            &config,
            "--data-dir",
            &notes_dir,
            "--run",
            "other",
            "--init-weights",
            &weights.display().to_string(),
        ],
        root.path(),
        root.path(),
        "--finetune",
    );
}

/// `predict` as a user meets it: a table with the default three classes per picture (the same
/// top class as `--json`), an undecodable picture named in one error line (exit 1) or, with
/// `--skip-bad-images`, listed while the rest are predicted, and bad flags refused by clap
/// (exit 2, as `evaluate` does).
#[test]
fn predict_prints_a_table_names_bad_pictures_and_refuses_bad_flags() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("shapes");
    let classes = [("disc", "disc"), ("ring", "ring"), ("square", "square")];
    write_folder(&data, &classes, &[("train", 8), ("val", 3)], 11);
    let d = data.display().to_string();
    let out = train(
        &[
            "--model",
            "simplecnn",
            "--dataset",
            "folder",
            "--data-dir",
            &d,
            "--epochs",
            "1",
            "--device",
            "cpu",
            "--run",
            "p",
        ],
        root.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let weights = root.path().join("models/p/best.safetensors");
    let weights = weights.display().to_string();
    let val = data.join("val").display().to_string();
    let predict = |extra: &[&str]| {
        let args = [&["--weights", &weights, "--device", "cpu"][..], extra].concat();
        run("predict", &args, root.path())
    };

    let table = predict(&[&val]);
    assert!(table.status.success(), "{}", text(&table.stderr));
    let table = text(&table.stdout);
    let rows: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows[0], ["image", "top-1", "p", "top-2", "p", "top-3", "p"]);
    assert_eq!(rows.len(), 1 + 9, "{table}");
    let json = predict(&[&val, "--json"]);
    let json: Vec<serde_json::Value> = text(&json.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for row in &rows[1..] {
        assert_eq!(row.len(), 7, "{row:?}");
        let p: Vec<f64> = [2, 4, 6].map(|i| row[i].parse().unwrap()).to_vec();
        assert!(p[0] >= p[1] && p[1] >= p[2] && p[2] >= 0.0, "{row:?}");
        assert!(
            (p.iter().sum::<f64>() - 1.0).abs() < 1e-3,
            "three classes: {row:?}"
        );
        let same = json.iter().find(|j| j["path"] == row[0]).unwrap();
        assert_eq!(same["top"][0]["class"], row[1], "{row:?}");
    }

    let broken = data.join("broken.jpg");
    std::fs::write(&broken, b"not a picture").unwrap();
    let b = broken.display().to_string();
    let refused = predict(&[&val, &b]);
    let stderr = text(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains(&b), "{stderr}");
    let skipped = predict(&[&val, &b, "--skip-bad-images", "--top-k", "1"]);
    let stderr = text(&skipped.stderr);
    assert!(skipped.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("skipped {b}")), "{stderr}");
    assert_eq!(text(&skipped.stdout).lines().count(), 1 + 9);

    for (binary, args) in [
        ("predict", vec!["--weights", &weights, &val, "--top-k", "0"]),
        ("predict", vec!["--weights", &weights]),
        ("predict", vec!["--weights", &weights, &val, "--bogus"]),
        ("evaluate", vec!["--weights", &weights, "--bogus"]),
    ] {
        let out = run(binary, &args, root.path());
        assert_eq!(
            out.status.code(),
            Some(2),
            "{binary} {args:?}: {}",
            text(&out.stderr)
        );
    }
}

/// The rows of an `evaluate --predictions` CSV, split at commas (the test's paths hold none),
/// after checking its header for `classes` logits.
fn prediction_rows(path: &Path, classes: usize) -> Vec<Vec<String>> {
    let csv = std::fs::read_to_string(path).unwrap();
    let mut lines = csv.lines();
    let header: Vec<String> = ["index", "path", "label", "predicted"]
        .into_iter()
        .map(String::from)
        .chain((0..classes).map(|k| format!("logit_{k}")))
        .collect();
    assert_eq!(lines.next().unwrap().split(',').collect::<Vec<_>>(), header);
    lines
        .map(|l| l.split(',').map(String::from).collect())
        .collect()
}

fn logits_of(row: &[String]) -> Vec<f32> {
    row[4..].iter().map(|v| v.parse().unwrap()).collect()
}

/// `evaluate --predictions` as a user meets it: one row per held-out picture in the test set's
/// order (class folders sorted, files sorted), each with its file, its folder's class and the
/// class of its top logit, which `predict` names too, picture by picture; the rows' share right
/// is evaluate's accuracy; with `--tta` the logits are the averaged views'; a file that cannot
/// be written is one error line, before any work.
#[test]
fn evaluate_writes_each_pictures_prediction_as_predict_sees_it() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("shapes");
    let classes = ["disc", "ring", "square"];
    write_folder(
        &data,
        &classes.map(|c| (c, c)),
        &[("train", 12), ("val", 5)],
        5,
    );
    let d = data.display().to_string();
    let out = train(
        &[
            "--model",
            "simplecnn",
            "--dataset",
            "folder",
            "--data-dir",
            &d,
            "--epochs",
            "3",
            "--device",
            "cpu",
            "--run",
            "p",
        ],
        root.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let weights = root.path().join("models/p/best.safetensors");
    let weights = weights.display().to_string();
    let evaluate = |extra: &[&str]| {
        let args = [&["--checkpoint", &weights, "--device", "cpu"][..], extra].concat();
        run("evaluate", &args, root.path())
    };

    let csv = root.path().join("predictions.csv");
    let c = csv.display().to_string();
    let evaluated = evaluate(&["--json", "--predictions", &c]);
    assert!(evaluated.status.success(), "{}", text(&evaluated.stderr));
    let report: serde_json::Value = serde_json::from_slice(&evaluated.stdout).unwrap();
    assert_eq!(report["predictions"], c.as_str());
    let rows = prediction_rows(&csv, 3);
    assert_eq!(rows.len(), 15);
    assert_eq!(report["images"], 15);

    // The test set's order: class folders in sorted order, each one's files sorted.
    let val = data.join("val");
    let mut expected = Vec::new();
    for (label, class) in classes.iter().enumerate() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(val.join(class))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        expected.extend(files.into_iter().map(|f| (f.display().to_string(), label)));
    }
    for (i, (row, (path, label))) in rows.iter().zip(&expected).enumerate() {
        assert_eq!(row.len(), 4 + 3, "{row:?}");
        assert_eq!(row[0], i.to_string());
        assert_eq!(&row[1], path);
        assert_eq!(row[2], label.to_string(), "{row:?}");
        let logits = logits_of(row);
        let top = (0..3).fold(0, |best, k| if logits[k] > logits[best] { k } else { best });
        assert_eq!(
            row[3],
            top.to_string(),
            "predicted is the top logit: {row:?}"
        );
    }
    let right = rows.iter().filter(|r| r[2] == r[3]).count();
    assert_eq!(
        right as f64 / rows.len() as f64,
        report["accuracy"].as_f64().unwrap()
    );

    // predict names the same class for each picture, with the softmax of evaluate's logits.
    let predicted = run(
        "predict",
        &[
            "--weights",
            &weights,
            "--device",
            "cpu",
            &val.display().to_string(),
            "--json",
            "--top-k",
            "1",
        ],
        root.path(),
    );
    assert!(predicted.status.success(), "{}", text(&predicted.stderr));
    let predictions: BTreeMap<String, (String, f64)> = text(&predicted.stdout)
        .lines()
        .map(|l| {
            let p: serde_json::Value = serde_json::from_str(l).unwrap();
            let top = &p["top"][0];
            let path = p["path"].as_str().unwrap().to_string();
            let index = top["index"].as_u64().unwrap().to_string();
            (path, (index, top["probability"].as_f64().unwrap()))
        })
        .collect();
    assert_eq!(predictions.len(), rows.len());
    for row in &rows {
        let (index, probability) = &predictions[&row[1]];
        assert_eq!(index, &row[3], "{}", row[1]);
        let logits: Vec<f64> = logits_of(row).into_iter().map(f64::from).collect();
        let max = logits.iter().copied().fold(f64::MIN, f64::max);
        let softmax = 1.0 / logits.iter().map(|l| (l - max).exp()).sum::<f64>();
        assert!(
            (softmax - probability).abs() < 1e-4,
            "{row:?}: {probability}"
        );
    }
    let distinct: std::collections::BTreeSet<&String> = rows.iter().map(|r| &r[3]).collect();
    assert!(
        distinct.len() > 1,
        "the model predicts one class for every picture: the picture-by-picture checks above \
         need a model that tells them apart"
    );

    // --tta: the averaged logits, whose top classes give the TTA accuracy.
    let tta_csv = root.path().join("tta.csv");
    let t = tta_csv.display().to_string();
    let evaluated = evaluate(&["--json", "--tta", "--predictions", &t]);
    assert!(evaluated.status.success(), "{}", text(&evaluated.stderr));
    let report: serde_json::Value = serde_json::from_slice(&evaluated.stdout).unwrap();
    let tta_rows = prediction_rows(&tta_csv, 3);
    assert_eq!(tta_rows.len(), 15);
    let right = tta_rows.iter().filter(|r| r[2] == r[3]).count();
    assert_eq!(right as f64 / 15.0, report["accuracy"].as_f64().unwrap());
    assert!(
        rows.iter().zip(&tta_rows).all(|(a, b)| a[..3] == b[..3])
            && rows.iter().zip(&tta_rows).any(|(a, b)| a[4..] != b[4..]),
        "the same pictures with other logits"
    );

    // Nowhere to write: one line naming the file, exit 1, nothing written.
    let before = snapshot(root.path());
    for (target, why) in [
        (root.path().join("missing/p.csv"), "does not exist"),
        (root.path().join("models"), "it is a folder"),
        (csv.join("p.csv"), "is not a folder"),
    ] {
        let t = target.display().to_string();
        let out = evaluate(&["--predictions", &t]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(&t) && stderr.contains(why), "{stderr}");
    }
    assert!(before == snapshot(root.path()));
}
