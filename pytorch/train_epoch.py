#!/usr/bin/env python3
"""The tutorial's training loop in PyTorch, for whole-epoch figures beside kiln's: SimpleCNN,
Adam lr 1e-3, batch 64, shuffled DataLoader (0 workers) over the CIFAR-10 binary files,
normalised as kiln does. Prints one JSON line per epoch (images/s of the training part, test
accuracy) and the process's peak RSS.

    python3 pytorch/train_epoch.py --data-dir data/cifar-10-batches-bin --epochs 1 --threads 2
"""
import argparse
import json
import os
import resource
import sys
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from simplecnn import SimpleCNN, normalise, read_records, test_set  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default="data/cifar-10-batches-bin")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    parts = [read_records(os.path.join(args.data_dir, f"data_batch_{i}.bin")) for i in range(1, 6)]
    train = TensorDataset(torch.from_numpy(np.concatenate([p[0] for p in parts])),
                          torch.from_numpy(np.concatenate([p[1] for p in parts])))
    loader = DataLoader(train, batch_size=args.batch, shuffle=True, num_workers=0)
    test_x, test_y = test_set(args.data_dir)

    model = SimpleCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    for epoch in range(1, args.epochs + 1):
        model.train()
        start = time.perf_counter()
        for images, labels in loader:
            optimizer.zero_grad()
            loss_fn(model(normalise(images.numpy())), labels).backward()
            optimizer.step()
        seconds = time.perf_counter() - start
        model.eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, len(test_y), 500):
                logits = model(normalise(test_x[i:i + 500]))
                correct += (logits.argmax(1).numpy() == test_y[i:i + 500]).sum()
        print(json.dumps({"framework": "pytorch", "epoch": epoch, "train_seconds": seconds,
                          "images_per_s": len(train) / seconds, "test_acc": correct / len(test_y)}))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"framework": "pytorch", "peak_rss_bytes": peak}))


if __name__ == "__main__":
    main()
