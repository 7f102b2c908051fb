#!/usr/bin/env python3
"""Load a kiln weights file into the tutorial's PyTorch SimpleCNN and print its test accuracy.

    python3 pytorch/evaluate.py models/simplecnn/best.safetensors [--data-dir DIR]

Needs torch, numpy and safetensors. The accuracy printed should equal kiln's
`evaluate --checkpoint` on the same file: the same weights and the same normalisation.
"""
import argparse
import os
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from simplecnn import MEAN, STD, SimpleCNN, normalise, test_set  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("weights", help="a kiln last/best.safetensors")
    ap.add_argument("--data-dir", default="data/cifar-10-batches-bin")
    args = ap.parse_args()

    with safe_open(args.weights, "pt") as f:
        meta = f.metadata() or {}
    if meta.get("model", "simplecnn") != "simplecnn":
        sys.exit(f"{args.weights} holds a {meta['model']} model, not simplecnn")
    for key, ours in (("normalize_mean", MEAN), ("normalize_std", STD)):
        if key in meta and tuple(float(v) for v in meta[key].split(",")) != tuple(ours):
            sys.exit(f"{args.weights}: {key} {meta[key]} differs from this script's {ours}")

    model = SimpleCNN()
    model.load_state_dict(load_file(args.weights), strict=True)
    model.eval()
    images, labels = test_set(args.data_dir)
    correct, loss_sum = 0, 0.0
    with torch.no_grad():
        for start in range(0, len(labels), 500):
            x = normalise(images[start:start + 500])
            y = torch.from_numpy(labels[start:start + 500])
            logits = model(x)
            loss_sum += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
    n = len(labels)
    print(f"pytorch: {args.weights} (epoch {meta.get('epoch', '?')}): "
          f"test images {n}, loss {loss_sum / n:.4f}, accuracy {correct / n:.4f}")


if __name__ == "__main__":
    main()
