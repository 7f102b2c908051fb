#!/usr/bin/env python3
"""PyTorch's side of kiln's step benchmark: training steps on one random batch held in memory,
warm-up excluded, with each model's recipe as kiln's configs have it: SimpleCNN with Adam lr 1e-3
and cross-entropy; the ResNets (pytorch/resnet.py, CIFAR stem) with SGD lr 0.1, Nesterov momentum
0.9, weight decay 5e-4 and label smoothing 0.1, in float32 (TF32 off on a GPU), or with
`--precision bf16` in PyTorch's fastest eager setting: bf16 autocast, channels_last and
cudnn.benchmark (f32 master weights, as kiln's bf16), or `--precision f16`: the same in f16 with
torch.amp.GradScaler's dynamic loss scaling (as kiln's f16). Prints one JSON
line: {"framework": "pytorch", "batch": B, "threads": T, "images_per_s": [one figure per repeat],
"peak_device_bytes": max_memory_reserved on CUDA, else null, "peak_in_use_bytes": the timed
steps' max_memory_allocated on CUDA, else null} (the peaks are reset after the warm-up; the
caching allocator keeps what it reserved, so the reserved figure still counts cudnn.benchmark's
search).

    python3 pytorch/train_step.py --model resnet18 --batch 64 --steps 10 --repeats 5 --threads 2
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from resnet import build  # noqa: E402
from simplecnn import SimpleCNN  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="simplecnn")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="f32", choices=["f32", "bf16", "f16"])
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile(model), the optimizer eager (as PyTorch's tutorials)")
    ap.add_argument("--saved", action="store_true",
                    help="also count the bytes autograd saves for one step's backward pass")
    ap.add_argument("--account", action="store_true",
                    help="on CUDA, first print one step's account to stderr: the forward graph at "
                         "its end and the backward pass's peak above the step's start (as kiln's "
                         "step bench with --census)")
    ap.add_argument("--side", type=int, default=32,
                    help="the images' side; from 64 on the ResNets take ImageNet's stem")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    if args.model == "simplecnn":
        model = SimpleCNN().to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        loss_fn = torch.nn.CrossEntropyLoss()
    else:
        stem = "cifar" if args.side < 64 else "imagenet"
        model = build(args.model, 10, stem).to(device).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                                    weight_decay=5e-4)
        loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    x = torch.randn(args.batch, 3, args.side, args.side, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    half = {"bf16": torch.bfloat16, "f16": torch.float16}.get(args.precision)
    if half is not None:
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    scaler = torch.amp.GradScaler(device.type, enabled=half == torch.float16)
    if args.compile:
        model = torch.compile(model)

    def forward():
        with torch.autocast(device.type, dtype=half or torch.float32, enabled=half is not None):
            return loss_fn(model(x), y)

    def steps(n):
        for _ in range(n):
            optimizer.zero_grad()
            loss = forward()
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize()

    steps(max(2, args.steps // 10))  # warm-up
    saved_bytes = None
    if args.saved:
        # Each storage autograd saves, counted once (views of one storage share it).
        storages = {}

        def pack(t):
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
            return t

        optimizer.zero_grad()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = forward()
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved_bytes = sum(n for ptr, n in storages.items() if ptr not in params)
        del loss
    if device.type == "cuda" and args.account:
        # What one step holds, as kiln's step bench prints it: the forward graph at its end, and
        # the backward pass's peak above the step's start.
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated(device)
        loss = forward()
        torch.cuda.synchronize()
        graph = torch.cuda.memory_allocated(device) - start
        torch.cuda.reset_peak_memory_stats(device)
        scaler.scale(loss).backward()
        torch.cuda.synchronize()
        backward = torch.cuda.max_memory_allocated(device) - start
        del loss
        print(f"batch {args.batch}: the forward graph holds {graph / 2**20:.1f} MiB at its end; "
              f"the backward pass peaks {backward / 2**20:.1f} MiB above the step's start",
              file=sys.stderr)
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # "in use": the timed steps' peak only
    rates = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        steps(args.steps)
        rates.append(args.steps * args.batch / (time.perf_counter() - start))
    # KILN_PROFILE_STEPS=N: N more steps inside a CUDA profiler range, for
    # `ncu --profile-from-start off` (as kiln's step bench does).
    profiled = int(os.environ.get("KILN_PROFILE_STEPS", "0"))
    if profiled and device.type == "cuda":
        torch.cuda.profiler.start()
        steps(profiled)
        torch.cuda.profiler.stop()
    cuda = device.type == "cuda"
    peak = torch.cuda.max_memory_reserved(device) if cuda else None
    in_use = torch.cuda.max_memory_allocated(device) if cuda else None
    print(json.dumps({"framework": "pytorch", "version": torch.__version__, "model": args.model,
                      "precision": args.precision, "batch": args.batch, "side": args.side,
                      "compiled": args.compile, "saved_bytes": saved_bytes,
                      "threads": args.threads, "images_per_s": rates, "peak_device_bytes": peak,
                      "peak_in_use_bytes": in_use}))


if __name__ == "__main__":
    main()
