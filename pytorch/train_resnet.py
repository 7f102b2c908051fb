#!/usr/bin/env python3
"""Train a ResNet on CIFAR-10 by a kiln TOML recipe, in PyTorch: kiln's reference run.

    python3 pytorch/train_resnet.py configs/resnet18.toml --data-dir data/cifar-10-batches-bin \
        --device cuda --precision bf16 [--seed N] [--epochs N] [--save final.safetensors]
    python3 pytorch/train_resnet.py --self-test      # schedules and augmentation, CPU, seconds

The config is kiln's TOML schema (configs/resnet18.toml); keys left out take the defaults that
file documents, unknown keys are an error; dataset and synthetic_images are ignored (the data
is always the CIFAR-10 binary files of --data-dir, by default the config's data_dir).

The whole data set stays on the device as uint8; each epoch gathers batches by a seeded
permutation (a device generator seeded with `seed`), and augments them there: random crop
(`crop_padding`, zero or reflect padding, one offset per image), horizontal flip (p 0.5) on the
uint8 pixels, then /255, normalisation by kiln's mean and std, then cutout. Optimizers: SGD
(momentum, nesterov, weight_decay), Adam, AdamW; label smoothing; clip_grad_norm_. The learning
rate is set on the param groups before every step from `lr_at(t, T, S, cfg)` (onecycle equals
torch's OneCycleLR exactly; `--self-test` checks it). The last batch of an epoch may be partial
(S = ceil(images / batch_size)). `early_stop = N` (N > 0) stops after N epochs without a better
test accuracy. Precision: fp32 = TF32 off for matmul and cuDNN; tf32 = on; bf16 = autocast
bf16 with channels_last (TF32 on). cudnn.benchmark is on.

Output: one JSON line per epoch, {"event": "epoch", "epoch", "epochs", "train_loss" (smoothed,
as trained, over augmented images), "train_acc", "test_loss" (plain cross-entropy), "test_acc",
"seconds" (whole epoch), "train_seconds", "images_per_s" (training images / train_seconds), "lr"
(the last step's), "best"}, then {"event": "summary", "best_test_acc", "best_epoch",
"final_test_acc", "epochs", "seconds", "peak_memory_bytes" (CUDA max_memory_allocated, or the
process's peak RSS on the CPU), and the settings used}. `--save FILE` writes the final
state_dict as safetensors with kiln's metadata (model, num_classes, stem, width,
normalize_mean, normalize_std, classes, epoch). `--limit N` / `--test-limit N` use the first N
images only (quick checks).
"""
import argparse
import json
import math
import os
import resource
import sys
import time
import tomllib

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from resnet import BLOCKS, build  # noqa: E402
from simplecnn import MEAN, STD, read_records  # noqa: E402

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")

DEFAULTS = {
    "model": "resnet18", "epochs": 30, "batch_size": 128, "eval_batch_size": 500, "seed": 42,
    "shuffle": True, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True,
    "weight_decay": 5e-4, "betas": [0.9, 0.999], "eps": 1e-8,
    # The defaults kiln's configs (configs/resnet18.toml) document for keys left out:
    "label_smoothing": 0.1, "grad_clip_norm": 0.0, "early_stop": 0, "stem": "auto", "width": 64,
    "backbone_lr_scale": 1.0,
    "schedule": {"kind": "onecycle", "warmup_epochs": 0.0, "step_epochs": 10, "gamma": 0.1,
                 "min_lr": 0.0, "pct_start": 0.3, "div_factor": 25.0, "final_div_factor": 1e4},
    "augment": {"crop_padding": 4, "padding_mode": "zero", "flip": True, "cutout": 0,
                "resized_crop": False, "resized_crop_scale": [0.08, 1.0]},
}
# Keys of kiln's configs that this script has no use for: the data's source, picture folders'
# settings, and the precision (--precision here).
IGNORED = {"data_dir", "dataset", "synthetic_images", "image_size", "val_split",
           "skip_bad_images", "precision"}
# Keys this script accepts only at these values (kiln's fine-tuning and photo recipes).
ONLY = {"backbone_lr_scale": 1.0, "augment.resized_crop": False}
CHOICES = {"optimizer": ("sgd", "adam", "adamw"), "stem": ("auto", "cifar", "imagenet"),
           "schedule.kind": ("constant", "step", "cosine", "linear", "onecycle"),
           "augment.padding_mode": ("zero", "reflect"), "model": tuple(BLOCKS)}


def load_config(path):
    """The recipe with defaults filled in for missing keys; unknown keys are an error."""
    with open(path, "rb") as f:
        raw = tomllib.load(f)
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in DEFAULTS.items()}
    for key, value in raw.items():
        if key in IGNORED:
            cfg[key] = value
        elif key not in DEFAULTS:
            raise SystemExit(f"{path}: unknown key {key!r}")
        elif isinstance(DEFAULTS[key], dict):
            if not isinstance(value, dict):
                raise SystemExit(f"{path}: {key} must be a table")
            for sub, v in value.items():
                if sub not in DEFAULTS[key]:
                    raise SystemExit(f"{path}: unknown key {key}.{sub}")
                cfg[key][sub] = v
        else:
            cfg[key] = value
    if cfg.get("dataset", "cifar10") != "cifar10":
        print(f"{path}: dataset = {cfg['dataset']!r} ignored: this script reads the CIFAR-10 "
              "binary files in --data-dir", file=sys.stderr)
    for key, only in ONLY.items():
        table, _, sub = key.rpartition(".")
        value = cfg[table][sub] if table else cfg[key]
        if value != only:
            raise SystemExit(f"{path}: {key} = {value!r}: this script runs only {only!r}")
    for key, allowed in CHOICES.items():
        table, _, sub = key.rpartition(".")
        value = cfg[table][sub] if table else cfg[key]
        if value not in allowed:
            raise SystemExit(f"{path}: {key} = {value!r}, expected one of {allowed}")
    return cfg


def warmup_steps(cfg, S):
    """W = round(warmup_epochs * S), halves rounded away from zero (as Rust's f64::round)."""
    return int(math.floor(cfg["schedule"]["warmup_epochs"] * S + 0.5))


def lr_at(t, T, S, cfg):
    """The learning rate of global step t (0-based) of T, S steps per epoch."""
    lr, sch = float(cfg["lr"]), cfg["schedule"]
    kind = sch["kind"]
    if kind == "constant":
        return lr
    if kind == "step":
        return lr * sch["gamma"] ** (t // (sch["step_epochs"] * S))
    if kind in ("cosine", "linear"):
        W, min_lr = warmup_steps(cfg, S), float(sch["min_lr"])
        if t < W:
            return lr * (t + 1) / W
        frac = (t - W) / (T - W) if T > W else 1.0
        if kind == "cosine":
            return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * frac)) / 2
        return lr + (min_lr - lr) * frac
    if kind == "onecycle":
        # torch.optim.lr_scheduler.OneCycleLR.get_lr with last_epoch = t, three_phase=False,
        # anneal_strategy='cos', written with the same operations so that the floats agree.
        if t > T:
            raise ValueError(f"step {t} past the {T} steps of the one-cycle schedule")
        initial_lr = lr / sch["div_factor"]
        min_lr = initial_lr / sch["final_div_factor"]
        phases = [(float(sch["pct_start"] * T) - 1, initial_lr, lr), (T - 1, lr, min_lr)]
        start_step = 0.0
        for i, (end_step, start, end) in enumerate(phases):
            if t <= end_step or i == len(phases) - 1:
                pct = (t - start_step) / (end_step - start_step)
                cos_out = math.cos(math.pi * pct) + 1
                return end + (start - end) / 2.0 * cos_out
            start_step = end_step
    raise ValueError(f"schedule kind {kind!r}")


# --- data --------------------------------------------------------------------------------------

def load_split(data_dir, names, limit):
    parts = [read_records(os.path.join(data_dir, n)) for n in names
             if os.path.exists(os.path.join(data_dir, n))]
    if not parts:
        raise SystemExit(f"{data_dir}: none of {names[0]}..{names[-1]}")
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if limit:
        images, labels = images[:limit], labels[:limit]
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels)


def class_names(data_dir):
    path = os.path.join(data_dir, "batches.meta.txt")
    if os.path.exists(path):
        with open(path) as f:
            names = [line.strip() for line in f if line.strip()]
        if len(names) == 10:
            return names
    return list(CIFAR10_CLASSES)


def augment(images, idx, aug, mean, std, gen):
    """Batch images[idx] (uint8 [N,C,H,W] on the device), cropped, flipped, normalised, cut out.

    Crop: the image padded by p on each side (zeros or a mirror without edge repeat, as
    F.pad(mode="reflect")), then an HxW window at a per-image offset in [0, 2p]^2, i.e. torchvision's
    RandomCrop(H, padding=p); flip: the window's columns reversed with p 0.5. Both are one gather
    from the resident uint8 images. Cutout: after normalisation, a c x c square at rows
    cy - c//2 .. cy - c//2 + c - 1 (likewise columns), (cy, cx) uniform over the pixels, clipped
    at the borders, set to 0.
    """
    dev = images.device
    B = idx.numel()
    _, C, H, W = images.shape
    p, flip, cut = int(aug["crop_padding"]), bool(aug["flip"]), int(aug["cutout"])
    if p or flip:
        rows = torch.arange(H, device=dev).expand(B, H)
        cols = torch.arange(W, device=dev).expand(B, W)
        if p:
            rows = rows + (torch.randint(0, 2 * p + 1, (B, 1), device=dev, generator=gen) - p)
            cols = cols + (torch.randint(0, 2 * p + 1, (B, 1), device=dev, generator=gen) - p)
        if flip:
            flipped = torch.rand(B, 1, device=dev, generator=gen) < 0.5
            cols = torch.where(flipped, cols.flip(1), cols)
        inside = None
        if p and aug["padding_mode"] == "reflect":
            rows = torch.where(rows < 0, -rows, torch.where(rows >= H, 2 * (H - 1) - rows, rows))
            cols = torch.where(cols < 0, -cols, torch.where(cols >= W, 2 * (W - 1) - cols, cols))
        elif p:
            inside = (((rows >= 0) & (rows < H))[:, None, :, None]
                      & ((cols >= 0) & (cols < W))[:, None, None, :])
            rows, cols = rows.clamp(0, H - 1), cols.clamp(0, W - 1)
        x = images[idx[:, None, None, None], torch.arange(C, device=dev)[None, :, None, None],
                   rows[:, None, :, None], cols[:, None, None, :]]
        if inside is not None:
            x = x.masked_fill(~inside, 0)
    else:
        x = images[idx]
    x = (x.float() / 255.0 - mean) / std
    if cut:
        cy = torch.randint(0, H, (B, 1), device=dev, generator=gen) - cut // 2
        cx = torch.randint(0, W, (B, 1), device=dev, generator=gen) - cut // 2
        r, c = torch.arange(H, device=dev), torch.arange(W, device=dev)
        in_r = (r >= cy) & (r < cy + cut)
        in_c = (c >= cx) & (c < cx + cut)
        x = x.masked_fill(in_r[:, None, :, None] & in_c[:, None, None, :], 0.0)
    return x


# --- training ----------------------------------------------------------------------------------

def make_optimizer(cfg, params):
    name, lr, wd = cfg["optimizer"], float(cfg["lr"]), float(cfg["weight_decay"])
    if name == "sgd":
        momentum = float(cfg["momentum"])
        return torch.optim.SGD(params, lr=lr, momentum=momentum,
                               nesterov=bool(cfg["nesterov"]) and momentum > 0, weight_decay=wd)
    cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    return cls(params, lr=lr, betas=tuple(float(b) for b in cfg["betas"]), eps=float(cfg["eps"]),
               weight_decay=wd)


def set_precision(precision, device):
    tf32 = precision != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = True
    return {"matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_tf32": torch.backends.cudnn.allow_tf32,
            "autocast": "bf16" if precision == "bf16" else None}


def evaluate(model, images, labels, batch, mean, std, autocast, channels_last):
    """(sum of cross-entropy, correct) over a resident uint8 test set, as device tensors."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=images.device)
    correct = torch.zeros((), dtype=torch.int64, device=images.device)
    with torch.no_grad():
        for i in range(0, len(labels), batch):
            x = (images[i:i + batch].float() / 255.0 - mean) / std
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = labels[i:i + batch]
            with autocast():
                logits = model(x)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
            correct += (logits.argmax(1) == y).sum()
    return loss_sum, correct


def weights_metadata(model, num_classes, stem, width, classes, epoch):
    return {"model": model, "num_classes": str(num_classes), "stem": stem, "width": str(width),
            "normalize_mean": ",".join(repr(float(v)) for v in MEAN),
            "normalize_std": ",".join(repr(float(v)) for v in STD),
            "classes": ",".join(classes), "epoch": str(epoch),
            "input": "float32 [N,3,H,W], RGB scaled to [0,1] then normalised"}


def save_weights(path, model, meta):
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tensors, path, metadata=meta)


def train(args):
    cfg = load_config(args.config)
    for key in ("seed", "epochs"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = set_precision(args.precision, device)
    bf16 = args.precision == "bf16"

    train_x, train_y = load_split(args.data_dir, [f"data_batch_{i}.bin" for i in range(1, 6)],
                                  args.limit)
    test_x, test_y = load_split(args.data_dir, ["test_batch.bin"], args.test_limit)
    classes = class_names(args.data_dir)
    num_classes = len(classes)
    size = train_x.shape[-1]
    stem = cfg["stem"] if cfg["stem"] != "auto" else ("cifar" if size < 64 else "imagenet")
    train_x, train_y, test_x, test_y = (t.to(device) for t in (train_x, train_y, test_x, test_y))
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)

    torch.manual_seed(cfg["seed"])
    model = build(cfg["model"], num_classes, stem, int(cfg["width"])).to(device)
    if bf16:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model.parameters())
    loss_fn = nn.CrossEntropyLoss(label_smoothing=float(cfg["label_smoothing"]))
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg["seed"])

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    N, B = len(train_y), int(cfg["batch_size"])
    S = math.ceil(N / B)
    T = int(cfg["epochs"]) * S
    clip = float(cfg["grad_clip_norm"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start_run = time.perf_counter()
    best_acc, best_epoch, test_acc, epoch, t, lr = -1.0, 0, 0.0, 0, 0, float(cfg["lr"])
    for epoch in range(1, int(cfg["epochs"]) + 1):
        sync()
        start = time.perf_counter()
        model.train()
        order = (torch.randperm(N, device=device, generator=gen) if cfg["shuffle"]
                 else torch.arange(N, device=device))
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        for s in range(S):
            idx = order[s * B:(s + 1) * B]
            x = augment(train_x, idx, cfg["augment"], mean, std, gen)
            if bf16:
                x = x.contiguous(memory_format=torch.channels_last)
            y = train_y[idx]
            lr = lr_at(t, T, S, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast():
                logits = model(x)
            loss = loss_fn(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            t += 1
            with torch.no_grad():
                loss_sum += loss.detach().double() * len(idx)
                correct += (logits.argmax(1) == y).sum()
        sync()
        train_seconds = time.perf_counter() - start
        test_loss, test_correct = evaluate(model, test_x, test_y, int(cfg["eval_batch_size"]),
                                           mean, std, autocast, bf16)
        test_acc = test_correct.item() / len(test_y)
        best = test_acc > best_acc
        if best:
            best_acc, best_epoch = test_acc, epoch
        record = {"event": "epoch", "epoch": epoch, "epochs": int(cfg["epochs"]),
                  "train_loss": loss_sum.item() / N, "train_acc": correct.item() / N,
                  "test_loss": test_loss.item() / len(test_y), "test_acc": test_acc,
                  "seconds": time.perf_counter() - start, "train_seconds": train_seconds,
                  "images_per_s": N / train_seconds, "lr": lr, "best": best}
        print(json.dumps(record), flush=True)
        if cfg["early_stop"] and epoch - best_epoch >= int(cfg["early_stop"]):
            break

    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({
        "event": "summary", "best_test_acc": best_acc, "best_epoch": best_epoch,
        "final_test_acc": test_acc, "epochs": epoch, "seconds": time.perf_counter() - start_run,
        "peak_memory_bytes": peak, "model": cfg["model"], "stem": stem, "width": cfg["width"],
        "train_images": N, "test_images": len(test_y), "steps": t, "precision": args.precision,
        **settings, "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                               else "cpu"), "torch": torch.__version__}), flush=True)
    if args.save:
        save_weights(args.save, model, weights_metadata(cfg["model"], num_classes, stem,
                                                        cfg["width"], classes, epoch))


# --- self-test ---------------------------------------------------------------------------------

def self_test():
    torch.manual_seed(0)
    base = load_defaults_for_test()
    # onecycle == OneCycleLR at every step, exactly, for a few shapes of T.
    for T, pct, div, fdiv in ((37, 0.3, 25.0, 1e4), (10, 0.25, 10.0, 100.0), (7, 0.5, 25.0, 1e4),
                              (200, 0.15, 8.0, 1e3)):
        cfg = dict(base, lr=0.1, schedule=dict(base["schedule"], kind="onecycle", pct_start=pct,
                                               div_factor=div, final_div_factor=fdiv))
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=0.1, total_steps=T, pct_start=pct, div_factor=div,
            final_div_factor=fdiv, anneal_strategy="cos", cycle_momentum=False,
            three_phase=False)
        for t in range(T):
            ours, theirs = lr_at(t, T, 1, cfg), opt.param_groups[0]["lr"]
            assert ours == theirs, (T, t, ours, theirs)
            opt.step()
            sched.step()
        print(f"onecycle T={T} pct_start={pct}: equals OneCycleLR at all {T} steps (==)")
    # The other kinds, spot values.
    S, T = 10, 50
    c = dict(base, lr=1.0, schedule=dict(base["schedule"], kind="step", step_epochs=2, gamma=0.5))
    assert [lr_at(t, T, S, c) for t in (0, 19, 20, 39, 40)] == [1.0, 1.0, 0.5, 0.5, 0.25]
    c = dict(base, lr=1.0, schedule=dict(base["schedule"], kind="cosine", warmup_epochs=0.5,
                                         min_lr=0.1))
    assert warmup_steps(c, S) == 5 and lr_at(0, T, S, c) == 0.2 and lr_at(4, T, S, c) == 1.0
    assert lr_at(5, T, S, c) == 1.0 and abs(lr_at(T, T, S, c) - 0.1) < 1e-12
    assert abs(lr_at(5 + 45 // 2, T, S, c) - (0.1 + 0.9 * (1 + math.cos(math.pi * 22 / 45)) / 2)) < 1e-12
    c = dict(c, schedule=dict(c["schedule"], kind="linear"))
    assert lr_at(5, T, S, c) == 1.0 and abs(lr_at(5 + 9, T, S, c) - 0.82) < 1e-12
    c = dict(c, schedule=dict(c["schedule"], warmup_epochs=0.25))
    assert warmup_steps(c, S) == 3  # 2.5 rounds away from zero
    print("step, cosine, linear (with warm-up): spot values right")

    # Augmentation against straightforward per-image code.
    gen = torch.Generator().manual_seed(1)
    imgs = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    idx = torch.tensor([3, 0, 15, 7, 7, 1, 2, 9, 11, 4, 5, 6])
    for mode in ("zero", "reflect"):
        aug = {"crop_padding": 3, "padding_mode": mode, "flip": True, "cutout": 0}
        g = torch.Generator().manual_seed(5)
        got = augment(imgs, idx, aug, mean, std, g)
        g = torch.Generator().manual_seed(5)
        oy = torch.randint(0, 7, (12, 1), generator=g)[:, 0]
        ox = torch.randint(0, 7, (12, 1), generator=g)[:, 0]
        fl = torch.rand(12, 1, generator=g)[:, 0] < 0.5
        padded = F.pad(imgs[idx].float(), (3, 3, 3, 3),
                       mode="constant" if mode == "zero" else "reflect")
        want = torch.stack([padded[i, :, oy[i]:oy[i] + 8, ox[i]:ox[i] + 8] for i in range(12)])
        want = torch.where(fl[:, None, None, None], want.flip(3), want)
        want = (want / 255.0 - mean) / std
        assert torch.equal(got, want), mode
        assert 0 < fl.sum() < 12
    print("crop (zero, reflect) + flip: equal to F.pad + per-image slicing + flip")
    aug = {"crop_padding": 0, "padding_mode": "zero", "flip": False, "cutout": 4}
    got = augment(imgs, idx, aug, mean, std, gen)
    plain = (imgs[idx].float() / 255.0 - mean) / std
    zeroed = (got != plain).all(1)  # [B,H,W]: pixels cut out (plain is never exactly 0)
    for i in range(len(idx)):
        r = zeroed[i].any(1).nonzero()[:, 0]
        c = zeroed[i].any(0).nonzero()[:, 0]
        assert zeroed[i].sum() == len(r) * len(c) and 1 <= len(r) <= 4 and 1 <= len(c) <= 4
        assert len(r) == 4 or r[0] == 0 or r[-1] == 7
        assert (got[i][:, zeroed[i]] == 0).all()
    print("cutout: one clipped 4x4 square of zeros per image")
    print("self-test passed")


def load_defaults_for_test():
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in DEFAULTS.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", nargs="?", help="a kiln TOML recipe (configs/resnet18.toml)")
    ap.add_argument("--data-dir", help="CIFAR-10 binary files (default: the config's data_dir)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--precision", choices=("fp32", "tf32", "bf16"), default="fp32")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--limit", type=int, default=0, help="train on the first N images only")
    ap.add_argument("--test-limit", type=int, default=0, help="test on the first N images only")
    ap.add_argument("--save", help="write the final weights here (safetensors, kiln metadata)")
    ap.add_argument("--self-test", action="store_true")
    args = ap.parse_args()
    if args.self_test:
        self_test()
        return
    if not args.config:
        ap.error("CONFIG is required")
    if not args.data_dir:
        with open(args.config, "rb") as f:
            args.data_dir = tomllib.load(f).get("data_dir", "data/cifar-10-batches-bin")
    train(args)


if __name__ == "__main__":
    main()
