#!/usr/bin/env python3
"""Write tests/fixtures/shapes-resnet18.safetensors: a tiny ResNet-18 trained by PyTorch, for
kiln's fine-tuning test ("fine-tuning from PyTorch weights beats training from scratch").

    python3 pytorch/make_pretrained_fixture.py [--out tests/fixtures/shapes-resnet18.safetensors]

The network is pytorch/resnet.py's build("resnet18", 4, "cifar", width=4), trained with Adam
(lr 3e-3, batch 64, 8 epochs, seed 0, one thread) on 4,000 generated 32x32 pictures of four
classes: cross, disc, square and triangle, each a flat random colour on a flat random background,
size and place random (`picture` below; tests/finetune.rs draws discs and squares the same way).
The file holds the state_dict as torch saves it (safetensors.torch.save_file) with kiln's
metadata: model, stem, width, num_classes, classes, and the normalisation it was trained with
(mean 0.5, std 0.25 per channel). It prints the held-out accuracy it reached (about 0.99).
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from resnet import build  # noqa: E402

CLASSES = ["cross", "disc", "square", "triangle"]  # sorted, as a folder's classes are
SIZE, WIDTH, MEAN, STD = 32, 4, 0.5, 0.25


def picture(kind, rng):
    """HWC uint8: a flat shape of a random colour, half-size 6..11, on a flat background."""
    background = rng.integers(0, 256, 3)
    colour = (background + rng.integers(64, 192, 3)) % 256
    r = int(rng.integers(6, 12))
    cy, cx = (int(v) for v in rng.integers(r, SIZE - r, 2))
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    dy, dx = y - cy, x - cx
    if kind == "disc":
        mask = dy * dy + dx * dx <= r * r
    elif kind == "square":
        mask = (abs(dy) <= r) & (abs(dx) <= r)
    elif kind == "triangle":
        mask = (dy <= r) & (2 * abs(dx) <= dy + r)
    else:
        mask = ((abs(dy) <= r) & (abs(dx) <= r // 3)) | ((abs(dx) <= r) & (abs(dy) <= r // 3))
    image = np.empty((SIZE, SIZE, 3), np.uint8)
    image[:] = background
    image[mask] = colour
    return image


def data(count, rng):
    labels = rng.integers(0, len(CLASSES), count)
    images = np.stack([picture(CLASSES[c], rng) for c in labels])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255).sub(MEAN).div(STD)
    return x, torch.from_numpy(labels)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    parser.add_argument("--out", default=os.path.join(here, "..", "tests", "fixtures",
                                                      "shapes-resnet18.safetensors"))
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    x, y = data(4000, rng)
    test_x, test_y = data(400, rng)
    model = build("resnet18", len(CLASSES), "cifar", WIDTH)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for epoch in range(8):
        model.train()
        order = torch.randperm(len(x))
        for start in range(0, len(x), 64):
            idx = order[start:start + 64]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            accuracy = (model(test_x).argmax(1) == test_y).float().mean().item()
        print(f"epoch {epoch + 1}: loss {loss.item():.4f}, held-out accuracy {accuracy:.4f}")
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    metadata = {
        "model": "resnet18",
        "stem": "cifar",
        "width": str(WIDTH),
        "num_classes": str(len(CLASSES)),
        "classes": json.dumps(CLASSES),
        "normalize_mean": ",".join([str(MEAN)] * 3),
        "normalize_std": ",".join([str(STD)] * 3),
        "accuracy": f"{accuracy:.4f}",
        "torch": torch.__version__,
    }
    save_file(tensors, args.out, metadata=metadata)
    print(f"wrote {args.out}: {len(tensors)} tensors")


if __name__ == "__main__":
    main()
