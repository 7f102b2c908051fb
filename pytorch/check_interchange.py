#!/usr/bin/env python3
"""Load a kiln ResNet weights file into torchvision's own ResNet and evaluate it.

    python3 pytorch/check_interchange.py models/resnet18/best.safetensors \
        [--data-dir DIR] [--device cuda] [--save-torch torchvision.safetensors]

The model is torchvision.models.resnetNN(num_classes=N) (NN and N from the file's metadata,
N from fc.weight's rows when absent), with the stem swapped when the metadata says `stem` cifar
(the default): conv1 a 3x3/1 pad 1 conv without bias, maxpool an Identity. The width must be
64 (torchvision's). It loads the file with strict=True, evaluates on the test set (inputs
normalised by the file's normalize_mean / normalize_std, kiln's by default; mean cross-entropy,
no smoothing) and prints {"loss", "accuracy", "images"}. `--save-torch OUT` writes that
torchvision model's state_dict back out (safetensors.torch.save_file, metadata model,
num_classes, stem, width, normalize_mean, normalize_std, and classes when the source has them)
for kiln to load the other way.
"""
import argparse
import json
import os
import sys

from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from evaluate import RESNETS, evaluate, floats, model_name  # noqa: E402
from resnet import torchvision_model  # noqa: E402
from simplecnn import MEAN, STD, test_set  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("weights", help="a kiln ResNet weights file (safetensors)")
    ap.add_argument("--data-dir", default="data/cifar-10-batches-bin")
    ap.add_argument("--device", default="cpu", help="cpu (default) | cuda")
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--save-torch", metavar="OUT", help="write torchvision's state_dict here")
    args = ap.parse_args()

    with safe_open(args.weights, "pt") as f:
        meta = f.metadata() or {}
    tensors = load_file(args.weights)
    name = model_name(meta, tensors)
    if name not in RESNETS:
        sys.exit(f"{args.weights} holds a {name} model, not one of {RESNETS}")
    width = int(meta.get("width", 64))
    if width != 64:
        sys.exit(f"{args.weights}: width {width}; torchvision's ResNets have width 64")
    stem = meta.get("stem", "cifar")
    num_classes = int(meta.get("num_classes", tensors["fc.weight"].shape[0]))
    model = torchvision_model(name, num_classes, stem)
    model.load_state_dict(tensors, strict=True)
    mean = floats(meta["normalize_mean"]) if "normalize_mean" in meta else MEAN
    std = floats(meta["normalize_std"]) if "normalize_std" in meta else STD

    images, labels = test_set(args.data_dir)
    loss, accuracy = evaluate(model, images, labels, mean, std, args.device, args.batch)
    print(json.dumps({"loss": loss, "accuracy": accuracy, "images": len(labels),
                      "model": f"torchvision.models.{name}", "stem": stem}))

    if args.save_torch:
        out = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        keep = {"model": name, "num_classes": str(num_classes), "stem": stem, "width": "64",
                "normalize_mean": ",".join(repr(v) for v in mean),
                "normalize_std": ",".join(repr(v) for v in std)}
        if "classes" in meta:
            keep["classes"] = meta["classes"]
        save_file(out, args.save_torch, metadata=keep)


if __name__ == "__main__":
    main()
