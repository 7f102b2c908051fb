#!/usr/bin/env python3
"""Load a kiln weights file into PyTorch (SimpleCNN or ResNet) and print its test accuracy.

    python3 pytorch/evaluate.py models/simplecnn/best.safetensors [--data-dir DIR] [--json]
    python3 pytorch/evaluate.py models/resnet18/best.safetensors --device cuda [--json]

Needs torch, numpy and safetensors. The accuracy printed should equal kiln's
`evaluate --checkpoint` on the same file: the same weights and the same normalisation.

The metadata's `model` picks the network: simplecnn (the default, as before) or resnet18 |
resnet34 | resnet50, built by pytorch/resnet.py from `num_classes`, `stem` and `width` and
loaded with strict=True; where those keys are absent they are read off the tensors (num_classes
from fc.weight's rows, width from conv1.weight's rows (64 for torchvision's), stem from conv1's
kernel (3x3 cifar, 7x7 imagenet); a file without `model` that holds layer1.0.conv1.weight is a
ResNet whose depth is read off its keys). ResNet inputs are normalised by the file's
normalize_mean / normalize_std (kiln's by default). The loss is the mean cross-entropy, no label
smoothing. `--json` prints {"loss", "accuracy", "images"} instead of the sentence.
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from simplecnn import MEAN, STD, SimpleCNN, test_set  # noqa: E402

RESNETS = ("resnet18", "resnet34", "resnet50")


def floats(text):
    return tuple(float(v) for v in text.split(","))


def model_name(meta, tensors):
    if "model" in meta:
        return meta["model"]
    if "layer1.0.conv1.weight" not in tensors:
        return "simplecnn"
    if "layer1.0.conv3.weight" in tensors:
        return "resnet50"
    return "resnet34" if "layer3.5.conv1.weight" in tensors else "resnet18"


def resnet_from_file(meta, tensors, path):
    """A pytorch/resnet.py model holding the file's weights (strict), its mean and std."""
    from resnet import build

    name = model_name(meta, tensors)
    if name not in RESNETS:
        sys.exit(f"{path} holds a {name} model, not one of {RESNETS}")
    num_classes = int(meta.get("num_classes", tensors["fc.weight"].shape[0]))
    width = int(meta.get("width", tensors["conv1.weight"].shape[0]))
    stem = meta.get("stem", "imagenet" if tensors["conv1.weight"].shape[-1] == 7 else "cifar")
    model = build(name, num_classes, stem, width)
    model.load_state_dict(tensors, strict=True)
    mean = floats(meta["normalize_mean"]) if "normalize_mean" in meta else MEAN
    std = floats(meta["normalize_std"]) if "normalize_std" in meta else STD
    return model.eval(), mean, std


def evaluate(model, images, labels, mean=MEAN, std=STD, device="cpu", batch=500):
    """(mean cross-entropy, accuracy) of model.eval() on uint8 [N,3,H,W] images and labels."""
    device = torch.device(device)
    model = model.to(device).eval()
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=device).view(1, -1, 1, 1)
    correct, loss_sum = 0, 0.0
    with torch.no_grad():
        for start in range(0, len(labels), batch):
            x = torch.from_numpy(images[start:start + batch]).to(device).float().div_(255.0)
            x = (x - m) / s
            y = torch.from_numpy(labels[start:start + batch]).to(device)
            logits = model(x)
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
    n = len(labels)
    return loss_sum / n, correct / n


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("weights", help="a kiln last/best.safetensors")
    ap.add_argument("--data-dir", default="data/cifar-10-batches-bin")
    ap.add_argument("--device", default="cpu", help="cpu (default) | cuda")
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--json", action="store_true", help='print {"loss","accuracy","images"}')
    args = ap.parse_args()

    with safe_open(args.weights, "pt") as f:
        meta = f.metadata() or {}
    tensors = load_file(args.weights)
    name = model_name(meta, tensors)
    if name == "simplecnn":
        for key, ours in (("normalize_mean", MEAN), ("normalize_std", STD)):
            if key in meta and floats(meta[key]) != tuple(ours):
                sys.exit(f"{args.weights}: {key} {meta[key]} differs from this script's {ours}")
        model, mean, std = SimpleCNN(), MEAN, STD
        model.load_state_dict(tensors, strict=True)
    elif name in RESNETS:
        model, mean, std = resnet_from_file(meta, tensors, args.weights)
    else:
        sys.exit(f"{args.weights} holds a {name} model: this script knows simplecnn, "
                 + ", ".join(RESNETS))
    images, labels = test_set(args.data_dir)
    loss, accuracy = evaluate(model, images, labels, mean, std, args.device, args.batch)
    n = len(labels)
    if args.json:
        print(json.dumps({"loss": loss, "accuracy": accuracy, "images": n}))
    else:
        print(f"pytorch: {args.weights} (epoch {meta.get('epoch', '?')}): "
              f"test images {n}, loss {loss:.4f}, accuracy {accuracy:.4f}")


if __name__ == "__main__":
    main()
