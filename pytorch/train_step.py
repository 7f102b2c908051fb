#!/usr/bin/env python3
"""PyTorch's side of kiln's step benchmark: SimpleCNN training steps on one random batch held in
memory (Adam, lr 1e-3, cross-entropy), warm-up excluded. Prints one JSON line:
{"framework": "pytorch", "batch": B, "threads": T, "images_per_s": [one figure per repeat],
"peak_device_bytes": max_memory_reserved on CUDA, else null}.

    python3 pytorch/train_step.py --batch 64 --steps 200 --repeats 5 --threads 2 [--device cpu]
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from simplecnn import SimpleCNN  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = SimpleCNN().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)

    def steps(n):
        for _ in range(n):
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    steps(max(10, args.steps // 10))  # warm-up
    rates = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        steps(args.steps)
        rates.append(args.steps * args.batch / (time.perf_counter() - start))
    peak = torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None
    print(json.dumps({"framework": "pytorch", "version": torch.__version__, "batch": args.batch,
                      "threads": args.threads, "images_per_s": rates, "peak_device_bytes": peak}))


if __name__ == "__main__":
    main()
