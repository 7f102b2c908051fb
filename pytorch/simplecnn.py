"""The tutorial's SimpleCNN and CIFAR-10 test-set reading, in PyTorch: kiln's reference.

Parameter names match kiln's weights files (conv1.weight, conv1.bias, fc.weight, fc.bias), so
a kiln `best.safetensors` loads with `load_state_dict(strict=True)`, and the other way round.
"""
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
RECORD = 1 + 3 * 32 * 32


class SimpleCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc = nn.Linear(16 * 16 * 16, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        return self.fc(torch.flatten(x, 1))


def read_records(path):
    """Images as uint8 [N, 3, 32, 32] and labels as int64 [N] from a CIFAR-10 binary file."""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size % RECORD:
        raise SystemExit(f"{path}: not a whole number of {RECORD}-byte records")
    raw = raw.reshape(-1, RECORD)
    return raw[:, 1:].reshape(-1, 3, 32, 32), raw[:, 0].astype(np.int64)


def normalise(images_u8):
    x = torch.from_numpy(images_u8).float().div_(255.0)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


def test_set(data_dir):
    return read_records(os.path.join(data_dir, "test_batch.bin"))
