//! `evaluate` against training's own figures, `--init-weights`, and bad input to both binaries.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::{column, fixture_dir, models_dir, run, text, train_ok};

fn evaluate_json(root: &Path, args: &[&str]) -> serde_json::Value {
    let out = run("evaluate", args, root);
    assert!(
        out.status.success(),
        "evaluate {args:?}:\n{}",
        text(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("--json prints one JSON object")
}

#[test]
fn evaluate_reproduces_the_accuracy_training_recorded() {
    let root = tempfile::tempdir().unwrap();
    let data = fixture_dir(root.path());
    train_ok(
        root.path(),
        &[
            "--device",
            "cpu",
            "--data-dir",
            &data,
            "--epochs",
            "2",
            "--lr",
            "0.0002",
        ],
    );
    let run_dir = models_dir(root.path()).join("simplecnn");
    let csv = std::fs::read_to_string(run_dir.join("metrics.csv")).unwrap();
    let (accuracy, loss) = (column(&csv, "test_acc"), column(&csv, "test_loss"));

    let best = run_dir.join("best.safetensors").display().to_string();
    let epoch1 = run_dir
        .join("checkpoints/epoch-0001.safetensors")
        .display()
        .to_string();
    let best_epoch = if accuracy[1] > accuracy[0] { 1 } else { 0 };
    for (file, epoch) in [(&best, best_epoch), (&epoch1, 0)] {
        let report = evaluate_json(
            root.path(),
            &[
                "--checkpoint",
                file,
                "--data-dir",
                &data,
                "--device",
                "cpu",
                "--json",
            ],
        );
        assert!(
            (report["accuracy"].as_f64().unwrap() - accuracy[epoch]).abs() < 1e-6,
            "{file}: {report}"
        );
        assert!(
            (report["loss"].as_f64().unwrap() - loss[epoch]).abs() < 1e-4,
            "{file}: {report}"
        );
        assert_eq!(report["model"], "simplecnn");
        assert_eq!(report["images"], 200);
        let confusion: Vec<Vec<u64>> = serde_json::from_value(report["confusion"].clone()).unwrap();
        assert_eq!(confusion.iter().flatten().sum::<u64>(), 200);
        assert_eq!(report["per_class"].as_object().unwrap().len(), 10);
        assert_eq!(report["tta"], false);
    }

    // Test-time augmentation evaluates every image once, through other views than training's.
    let report = evaluate_json(
        root.path(),
        &[
            "--checkpoint",
            &best,
            "--data-dir",
            &data,
            "--device",
            "cpu",
            "--tta",
            "--json",
        ],
    );
    assert_eq!(report["tta"], true);
    assert_eq!(report["images"], 200);
    assert!(
        (report["loss"].as_f64().unwrap() - loss[best_epoch]).abs() > 1e-6,
        "the views changed nothing: {report}"
    );

    let out = run(
        "evaluate",
        &[
            "--checkpoint",
            &best,
            "--data-dir",
            &data,
            "--device",
            "cpu",
        ],
        root.path(),
    );
    let table = text(&out.stdout);
    for part in ["accuracy", "per class:", "automobile", "confusion matrix"] {
        assert!(table.contains(part), "{part} missing:\n{table}");
    }

    // CIFAR-10's records: a row per test image in the file's order, with no path, the label
    // the record's, and the rows' share right evaluate's accuracy.
    let csv = root.path().join("predictions.csv");
    let report = evaluate_json(
        root.path(),
        &[
            "--checkpoint",
            &best,
            "--data-dir",
            &data,
            "--device",
            "cpu",
            "--json",
            "--predictions",
            &csv.display().to_string(),
        ],
    );
    let csv = std::fs::read_to_string(&csv).unwrap();
    let mut lines = csv.lines();
    let header = lines.next().unwrap();
    assert!(header.starts_with("index,path,label,predicted,logit_0,logit_1,"));
    assert!(header.ends_with(",logit_9"), "{header}");
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 200);
    let labels = kiln::data::cifar::load_test(Path::new(&data))
        .unwrap()
        .labels()
        .to_vec();
    let mut right = 0;
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row.len(), 14, "{row:?}");
        assert_eq!((row[0], row[1]), (i.to_string().as_str(), ""));
        assert_eq!(row[2], labels[i].to_string());
        right += usize::from(row[2] == row[3]);
    }
    assert_eq!(right as f64 / 200.0, report["accuracy"].as_f64().unwrap());
}

#[test]
fn init_weights_starts_from_a_weights_file_and_refuses_one_that_does_not_fit() {
    let root = tempfile::tempdir().unwrap();
    let data = fixture_dir(root.path());
    let base = ["--device", "cpu", "--data-dir", &data, "--epochs", "1"];
    train_ok(root.path(), &[&base[..], &["--run", "first"]].concat());
    let trained = models_dir(root.path())
        .join("first/last.safetensors")
        .display()
        .to_string();
    train_ok(
        root.path(),
        &[&base[..], &["--run", "second", "--init-weights", &trained]].concat(),
    );
    let first_loss = |run: &str| {
        let csv =
            std::fs::read_to_string(models_dir(root.path()).join(run).join("metrics.csv")).unwrap();
        column(&csv, "train_loss")[0]
    };
    assert!(
        first_loss("second") < first_loss("first") / 2.0,
        "training went on from the trained weights"
    );

    // Wrong names, shapes and dtype: one error listing them, and the earlier run untouched.
    let bad = root.path().join("bad.safetensors");
    let tensors = HashMap::from([
        (
            "conv1.weight".to_string(),
            Tensor::zeros((16, 3, 5, 5), DType::F32, &Device::Cpu).unwrap(),
        ),
        (
            "conv1.bias".to_string(),
            Tensor::zeros(16, DType::F64, &Device::Cpu).unwrap(),
        ),
        (
            "fc.weight".to_string(),
            Tensor::zeros((10, 4096), DType::F32, &Device::Cpu).unwrap(),
        ),
        (
            "head.bias".to_string(),
            Tensor::zeros(10, DType::F32, &Device::Cpu).unwrap(),
        ),
    ]);
    candle_core::safetensors::save(&tensors, &bad).unwrap();
    let before = std::fs::read(models_dir(root.path()).join("first/metrics.csv")).unwrap();
    let out = run(
        "train",
        &[
            &base[..],
            &[
                "--run",
                "first",
                "--overwrite",
                "--init-weights",
                bad.to_str().unwrap(),
            ],
        ]
        .concat(),
        root.path(),
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    for part in [
        "bad.safetensors",
        "conv1.weight has shape [16, 3, 5, 5]",
        "conv1.bias is F64",
        "missing fc.bias",
        "unexpected head.bias",
    ] {
        assert!(stderr.contains(part), "{part} missing: {stderr}");
    }
    assert_eq!(
        std::fs::read(models_dir(root.path()).join("first/metrics.csv")).unwrap(),
        before
    );
}

#[test]
fn bad_files_are_one_clear_error_and_never_a_panic() {
    let root = tempfile::tempdir().unwrap();
    let data = fixture_dir(root.path());
    train_ok(
        root.path(),
        &["--device", "cpu", "--data-dir", &data, "--epochs", "1"],
    );
    let run_dir = models_dir(root.path()).join("simplecnn");
    let best = run_dir.join("best.safetensors");
    let bytes = std::fs::read(&best).unwrap();
    let truncated = root.path().join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let garbage = root.path().join("garbage.safetensors");
    std::fs::write(
        &garbage,
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all",
    )
    .unwrap();
    let path = |p: &Path| p.display().to_string();
    let checkpoint = path(&run_dir.join("checkpoints/epoch-0001.safetensors"));

    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "evaluate",
            vec!["--checkpoint".into(), "missing.safetensors".into()],
            "cannot read missing.safetensors",
        ),
        (
            "evaluate",
            vec!["--checkpoint".into(), path(&truncated)],
            "truncated.safetensors: not a safetensors file, or truncated",
        ),
        (
            "evaluate",
            vec!["--checkpoint".into(), path(&garbage)],
            "not a safetensors file",
        ),
        (
            "evaluate",
            vec![
                "--checkpoint".into(),
                path(&best),
                "--model".into(),
                "linear".into(),
            ],
            "holds a simplecnn model, not linear",
        ),
        (
            "evaluate",
            vec![
                "--checkpoint".into(),
                path(&best),
                "--data-dir".into(),
                "nowhere".into(),
                "--no-download".into(),
            ],
            "test_batch.bin is missing",
        ),
        (
            "train",
            vec!["--resume".into(), path(&truncated)],
            "truncated.safetensors: not a safetensors file, or truncated",
        ),
        (
            "train",
            vec!["--resume".into(), path(&best)],
            "not a kiln checkpoint",
        ),
        (
            "train",
            vec![
                "--resume".into(),
                checkpoint,
                "--model".into(),
                "linear".into(),
            ],
            "--resume does not apply to --model linear",
        ),
        (
            "train",
            vec!["--models-dir".into(), "/proc/kiln-cannot-write-here".into()],
            "cannot create run directory",
        ),
    ];
    let before = std::fs::read(run_dir.join("metrics.csv")).unwrap();
    for (binary, args, expected) in cases {
        let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
        args.extend(["--device", "cpu"]);
        if binary == "train" {
            args.extend(["--data-dir", &data]);
        }
        let out = run(binary, &args, root.path());
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{binary} {args:?}: {stderr}");
        assert!(stderr.contains(expected), "{binary} {args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    }
    assert_eq!(
        std::fs::read(run_dir.join("metrics.csv")).unwrap(),
        before,
        "nothing saved was touched"
    );
    assert!(best.exists());
}

/// ResNet-18 at width 4: the model, BatchNorm and all, small enough to train in a second.
fn resnet_config(root: &Path) -> String {
    let text = include_str!("../configs/resnet18.toml")
        .replace("width = 64 ", "width = 4  ")
        .replace("epochs = 15", "epochs = 1")
        .replace("batch_size = 128", "batch_size = 32");
    assert!(text.contains("width = 4 ") && text.contains("epochs = 1\n"));
    let path = root.join("resnet.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// A resnet's weights saved as a file of PyTorch's (no metadata), or with kiln's `model` key.
fn save_resnet(path: &Path, model: &str, num_classes: usize, with_metadata: bool) {
    use kiln::models::{self, Architecture, Stem};
    let arch = Architecture::new(num_classes, 32, Stem::Cifar, 4).unwrap();
    let built = models::build(models::find(model).unwrap(), &arch, 1, &Device::Cpu).unwrap();
    let tensors = built
        .params
        .state()
        .into_iter()
        .map(|(name, var)| (name, var.as_tensor().clone()))
        .collect();
    let metadata = if with_metadata {
        std::collections::BTreeMap::from([("model".to_string(), model.to_string())])
    } else {
        Default::default()
    };
    kiln::checkpoint::save_tensors(path, tensors, metadata).unwrap();
}

#[test]
fn resnet_weights_evaluate_in_eval_mode_and_files_that_do_not_fit_are_one_clear_line() {
    let root = tempfile::tempdir().unwrap();
    let data = fixture_dir(root.path());
    let config = resnet_config(root.path());
    let base = ["--config", &config, "--device", "cpu", "--data-dir", &data];
    train_ok(root.path(), &[&base[..], &["--run", "r18"]].concat());
    let run_dir = models_dir(root.path()).join("r18");
    let csv = std::fs::read_to_string(run_dir.join("metrics.csv")).unwrap();
    let best = run_dir.join("best.safetensors").display().to_string();
    let report = evaluate_json(
        root.path(),
        &[
            "--checkpoint",
            &best,
            "--data-dir",
            &data,
            "--device",
            "cpu",
            "--json",
        ],
    );
    // Evaluation mode (running statistics) both times: the same figures as training recorded.
    assert!(
        (report["accuracy"].as_f64().unwrap() - column(&csv, "test_acc")[0]).abs() < 1e-9,
        "{report}"
    );
    assert!((report["loss"].as_f64().unwrap() - column(&csv, "test_loss")[0]).abs() < 1e-4);
    assert_eq!(report["model"], "resnet18");

    let path = |name: &str| root.path().join(name);
    save_resnet(&path("r34.safetensors"), "resnet34", 10, false);
    save_resnet(&path("seven.safetensors"), "resnet18", 7, true);
    save_resnet(&path("seven-torch.safetensors"), "resnet18", 7, false);
    let file = |name: &str| path(name).display().to_string();
    let checkpoint = run_dir
        .join("checkpoints/epoch-0001.safetensors")
        .display()
        .to_string();
    let cases: Vec<(&str, Vec<String>, Vec<&str>)> = vec![
        (
            "evaluate",
            vec![
                "--checkpoint".into(),
                file("r34.safetensors"),
                "--model".into(),
                "resnet18".into(),
            ],
            vec![
                "r34.safetensors",
                "do not fit the model",
                "unexpected layer1.2",
                "more",
            ],
        ),
        (
            "evaluate",
            vec!["--checkpoint".into(), file("seven.safetensors")],
            vec!["seven.safetensors", "7 classes", "has 10"],
        ),
        (
            "evaluate",
            vec![
                "--checkpoint".into(),
                best.clone(),
                "--model".into(),
                "resnet50".into(),
            ],
            vec!["holds a resnet18 model, not resnet50"],
        ),
        (
            "train",
            vec![
                "--init-weights".into(),
                file("seven-torch.safetensors"),
                "--run".into(),
                "a".into(),
            ],
            vec!["fc.weight has shape [7, 32], the model needs [10, 32]"],
        ),
        (
            "train",
            vec![
                "--init-weights".into(),
                best.clone(),
                "--model".into(),
                "resnet50".into(),
                "--run".into(),
                "b".into(),
            ],
            vec!["holds a resnet18 model, not resnet50"],
        ),
        (
            "train",
            vec![
                "--resume".into(),
                checkpoint,
                "--model".into(),
                "resnet50".into(),
            ],
            vec!["holds a resnet18 checkpoint, but this command trains resnet50"],
        ),
    ];
    for (binary, args, expected) in cases {
        let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
        args.extend(["--device", "cpu", "--data-dir", &data]);
        if binary == "train" && !args.contains(&"--model") {
            args.extend(["--config", &config]);
        }
        let out = run(binary, &args, root.path());
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{binary} {args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
        for part in expected {
            assert!(stderr.contains(part), "{part} missing: {stderr}");
        }
    }
    assert!(
        !models_dir(root.path()).join("a").exists() && !models_dir(root.path()).join("b").exists()
    );
}
