#!/usr/bin/env python3
"""kiln's weights in PyTorch and back: logits, accuracy and loss checked against kiln's own.

    python3 pytorch/ci_interchange.py --evaluate target/release/evaluate \
        --data-dir DIR --work OUT models/a/last.safetensors models/b/last.safetensors ...

For each kiln weights file (SimpleCNN, ResNet-18/34/50 or fastnet, trained on the CIFAR-10
binary files in DIR):

1. kiln's `evaluate --predictions` gives each test picture's logits, its loss and accuracy;
2. the file loads into the PyTorch model (pytorch/simplecnn.py, resnet.py, fastnet.py) with
   strict=True, and PyTorch's logits on the same pictures (normalised by the file's
   normalize_mean / normalize_std) must match kiln's: max |difference| <= 1e-4 x the logits'
   scale (the largest |logit|, at least 1). PyTorch's accuracy must be kiln's, but for
   pictures whose two best logits are closer than that bound;
3. PyTorch's state_dict is saved (safetensors.torch.save_file, with the metadata kiln reads:
   model, classes, normalisation, architecture), and kiln's `evaluate` of that file must give
   the same loss and accuracy as of kiln's own file.

Prints one line per check and exits 1 if any failed. Needs torch, numpy and safetensors.
"""
import argparse
import csv
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fastnet  # noqa: E402
from evaluate import RESNETS, floats, model_name, resnet_from_file  # noqa: E402
from simplecnn import MEAN, STD, SimpleCNN, test_set  # noqa: E402

RELATIVE_TOLERANCE = 1e-4
# The metadata a PyTorch-saved file carries for kiln: which model, its shape, its classes and the
# input normalisation. (Training's history, config and checksum are kiln's own.)
KEPT_METADATA = ("model", "num_classes", "stem", "width", "image_size", "classes", "dataset",
                 "normalize_mean", "normalize_std")


def torch_model(path):
    """The PyTorch model holding the file's weights (strict), its name, metadata, mean and std."""
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    tensors = load_file(path)
    name = model_name(meta, tensors)
    mean = floats(meta["normalize_mean"]) if "normalize_mean" in meta else MEAN
    std = floats(meta["normalize_std"]) if "normalize_std" in meta else STD
    if name == "simplecnn":
        model = SimpleCNN()
        model.load_state_dict(tensors, strict=True)
    elif name in RESNETS:
        model, mean, std = resnet_from_file(meta, tensors, path)
    elif name == "fastnet":
        num_classes = int(meta.get("num_classes", tensors["7.weight"].shape[0]))
        width = int(meta.get("width", tensors["2.conv1.weight"].shape[0]))
        model = fastnet.build(num_classes, width)
        model.load_state_dict(tensors, strict=True)
    else:
        sys.exit(f"{path} holds a {name} model: this script knows simplecnn, fastnet, "
                 + ", ".join(RESNETS))
    return model.eval(), name, meta, mean, std


def torch_logits(model, images, mean, std, batch=250):
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            x = torch.from_numpy(images[start:start + batch]).float().div_(255.0)
            out.append(model((x - m) / s).float())
    return torch.cat(out).numpy()


def kiln_evaluate(binary, weights, data_dir, predictions=None):
    """kiln's `evaluate --json` report of `weights` (and its predictions CSV, when asked)."""
    command = [binary, "--checkpoint", weights, "--data-dir", data_dir, "--dataset", "cifar10",
               "--no-download", "--device", "cpu", "--json"]
    if predictions:
        command += ["--predictions", predictions]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"kiln's evaluate failed ({' '.join(command)}):\n{done.stderr}")
    return json.loads(done.stdout)


def read_predictions(path, classes):
    """(index, path, label, predicted) columns and the logits [N, classes] of kiln's CSV."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header = ["index", "path", "label", "predicted"] + [f"logit_{k}" for k in range(classes)]
    if rows[0] != header:
        sys.exit(f"{path}: header {rows[0]}, expected {header}")
    body = rows[1:]
    columns = {name: [r[i] for r in body] for i, name in enumerate(header[:4])}
    logits = np.array([[float(v) for v in r[4:]] for r in body], dtype=np.float32)
    return columns, logits


def check(weights, args, images, labels):
    """The checks of one weights file; returns the failures' descriptions."""
    failures = []

    def need(ok, what):
        print(f"  {'ok  ' if ok else 'FAIL'} {what}")
        if not ok:
            failures.append(f"{weights}: {what}")

    started = time.time()
    model, name, meta, mean, std = torch_model(weights)
    print(f"{weights}: {name}, loaded into PyTorch with strict=True")
    run = os.path.basename(os.path.dirname(os.path.abspath(weights)))
    csv_path = os.path.join(args.work, f"{run}-{name}-kiln.csv")
    kiln = kiln_evaluate(args.evaluate, weights, args.data_dir, csv_path)
    n = len(labels)
    num_classes = len(kiln["classes"])
    columns, kiln_logits = read_predictions(csv_path, num_classes)
    kiln_predicted = np.array([int(v) for v in columns["predicted"]])

    # kiln's CSV on its own: one row per picture in the test set's order, its label, no path
    # (CIFAR-10's records have none), the predicted class the top logit, the accuracy kiln's.
    need(len(kiln_predicted) == n == kiln["images"],
         f"{len(kiln_predicted)} prediction rows for {n} test pictures")
    need(columns["index"] == [str(i) for i in range(n)], "rows indexed 0..N-1 in order")
    need(all(p == "" for p in columns["path"]), "no path for CIFAR-10's records")
    need(np.array_equal(np.array([int(v) for v in columns["label"]]), labels),
         "labels are the test set's, picture by picture")
    top = kiln_logits[np.arange(n), kiln_predicted]
    need(bool(np.all(top == kiln_logits.max(axis=1))), "predicted is the top logit's class")
    csv_accuracy = float(np.mean(kiln_predicted == labels))
    need(csv_accuracy == kiln["accuracy"],
         f"share of rows predicted right {csv_accuracy:.4f} = kiln's accuracy "
         f"{kiln['accuracy']:.4f}")

    # PyTorch against kiln, logit by logit.
    ours = torch_logits(model, images, mean, std)
    difference = np.abs(ours.astype(np.float64) - kiln_logits.astype(np.float64))
    worst = np.unravel_index(np.argmax(difference), difference.shape)
    scale = max(1.0, float(np.abs(kiln_logits).max()))
    bound = RELATIVE_TOLERANCE * scale
    need(float(difference[worst]) <= bound,
         f"logits: max |PyTorch - kiln| {difference[worst]:.3e} (picture {worst[0]}, class "
         f"{worst[1]}: {ours[worst]:.7g} vs {kiln_logits[worst]:.7g}) <= {bound:.1e} "
         f"(1e-4 x scale {scale:.3g})")
    torch_predicted = ours.argmax(axis=1)
    differ = np.nonzero(torch_predicted != kiln_predicted)[0]
    gaps = (kiln_logits[differ, kiln_predicted[differ]]
            - kiln_logits[differ, torch_predicted[differ]])
    need(bool(np.all(gaps <= 2 * bound)),
         f"top classes differ on {len(differ)} pictures, each a near-tie (gap <= {2 * bound:.1e})")
    torch_accuracy = float(np.mean(torch_predicted == labels))
    torch_loss = float(F.cross_entropy(torch.from_numpy(ours), torch.from_numpy(labels)))
    need(abs(torch_accuracy - kiln["accuracy"]) <= len(differ) / n,
         f"accuracy PyTorch {torch_accuracy:.4f}, kiln {kiln['accuracy']:.4f}; "
         f"loss PyTorch {torch_loss:.6f}, kiln {kiln['loss']:.6f}")

    # Back: PyTorch's state_dict saved for kiln, evaluated by kiln as its own file was.
    saved = os.path.join(args.work, f"{run}-{name}-torch.safetensors")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {k: meta[k] for k in KEPT_METADATA if k in meta}
    metadata["model"] = name
    save_file(state, saved, metadata=metadata)
    back = kiln_evaluate(args.evaluate, saved, args.data_dir)
    need(back["accuracy"] == kiln["accuracy"] and abs(back["loss"] - kiln["loss"]) <= 1e-6,
         f"PyTorch-saved file in kiln: loss {back['loss']:.6f}, accuracy {back['accuracy']:.4f} "
         f"(kiln's own file: {kiln['loss']:.6f}, {kiln['accuracy']:.4f})")
    print(f"  {name}: {time.time() - started:.1f} s")
    return failures


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("weights", nargs="+", help="kiln weights files (safetensors)")
    ap.add_argument("--evaluate", required=True, help="kiln's evaluate binary")
    ap.add_argument("--data-dir", required=True,
                    help="the CIFAR-10 binary files they were trained on")
    ap.add_argument("--work", required=True, help="a folder for the CSV and PyTorch-saved files")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    torch.manual_seed(0)
    images, labels = test_set(args.data_dir)
    failures = []
    for weights in args.weights:
        failures += check(weights, args, images, labels)
    if failures:
        print(f"\n{len(failures)} interchange checks failed:", file=sys.stderr)
        for failure in failures:
            print(f"  {failure}", file=sys.stderr)
        sys.exit(1)
    print(f"interchange: {len(args.weights)} models, every check passed")


if __name__ == "__main__":
    main()
