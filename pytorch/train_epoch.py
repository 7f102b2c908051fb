#!/usr/bin/env python3
"""The tutorial's training loop in PyTorch, for whole-epoch figures beside kiln's: SimpleCNN,
Adam lr 1e-3, batch 64, shuffled DataLoader (0 workers) over the CIFAR-10 binary files,
normalised as kiln does. Prints one JSON line per epoch (images/s of the training part, test
accuracy) and the process's peak RSS.

    python3 pytorch/train_epoch.py --data-dir data/cifar-10-batches-bin --epochs 1 --threads 2

On a GPU, `--device cuda` runs the same loop (batches built on the host, copied over each
step, as the tutorial does), with `--workers N` for DataLoader worker processes, and
`--resident` keeps the whole data set where training runs (CPU or GPU) as one normalised float
tensor and indexes each batch out of it (PyTorch's best case: no DataLoader, no per-batch
conversion), and `--pil` builds each image as the tutorials do,
torchvision's CIFAR10 way: a PIL image per sample through ToTensor and Normalize (needs
torchvision and Pillow).
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
from simplecnn import MEAN, STD, SimpleCNN, normalise, read_records, test_set  # noqa: E402


class PilImages(torch.utils.data.Dataset):
    """Samples as torchvision.datasets.CIFAR10 makes them: a PIL image, ToTensor, Normalize."""

    def __init__(self, images, labels):
        from torchvision import transforms

        self.images, self.labels = images.numpy(), labels
        self.transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i].transpose(1, 2, 0))), self.labels[i]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default="data/cifar-10-batches-bin")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--resident", action="store_true")
    ap.add_argument("--u8", action="store_true",
                    help="with --resident: keep the set as u8 and normalise each batch (as kiln does)")
    ap.add_argument("--pil", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    parts = [read_records(os.path.join(args.data_dir, f"data_batch_{i}.bin")) for i in range(1, 6)]
    train = TensorDataset(torch.from_numpy(np.concatenate([p[0] for p in parts])),
                          torch.from_numpy(np.concatenate([p[1] for p in parts])))
    if args.pil:
        train = PilImages(*train.tensors)
    loader = DataLoader(train, batch_size=args.batch, shuffle=True, num_workers=args.workers)
    test_x, test_y = test_set(args.data_dir)
    if args.resident:
        # PyTorch's best case: the whole training set normalised once into one float tensor
        # where training runs (600 MB), each batch an index into it; not timed.
        images, labels_all = (t.to(device) for t in train.tensors)
        mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
        std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
        if not args.u8:
            images = (images.float() / 255.0 - mean) / std

    def batches():
        if args.pil:
            for x, y in loader:
                yield x.to(device), y.to(device)
            return
        if not args.resident:
            for x, y in loader:
                yield normalise(x.numpy()).to(device), y.to(device)
            return
        order = torch.randperm(len(labels_all), device=device)
        for i in range(0, len(order), args.batch):
            at = order[i:i + args.batch]
            if args.u8:
                yield (images[at].float() / 255.0 - mean) / std, labels_all[at]
            else:
                yield images[at], labels_all[at]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    model = SimpleCNN().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    for epoch in range(1, args.epochs + 1):
        model.train()
        sync()
        start = time.perf_counter()
        for x, y in batches():
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
        sync()
        seconds = time.perf_counter() - start
        model.eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, len(test_y), 500):
                logits = model(normalise(test_x[i:i + 500]).to(device))
                correct += (logits.argmax(1).cpu().numpy() == test_y[i:i + 500]).sum()
        print(json.dumps({"framework": "pytorch", "epoch": epoch, "train_seconds": seconds,
                          "images_per_s": len(train) / seconds, "test_acc": correct / len(test_y),
                          "device": args.device, "resident": args.resident, "u8": args.u8,
                          "pil": args.pil,
                          "workers": args.workers}))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"framework": "pytorch", "peak_rss_bytes": peak}))


if __name__ == "__main__":
    main()
