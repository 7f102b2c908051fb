"""airbench94's network (kiln's `fastnet`) in PyTorch: kiln's reference.

    from fastnet import build
    model = build(num_classes=10, width=64)

The modules and their order are airbench94.py's `make_net()` (Keller Jordan, arXiv 2404.00498),
so the state_dict's names are the ones kiln's fastnet weights files use (`0.weight`, `0.bias`,
`2.conv1.weight`, `2.norm1.running_mean`, ..., `7.weight`) and a kiln file loads with
`load_state_dict(strict=True)`:

    0  Conv2d(3, 24, 2, bias)   the whitening layer (its weight set from data, never trained)
    1  GELU
    2  ConvGroup(24, w)         conv3x3, max-pool 2, BatchNorm, GELU, conv3x3, BatchNorm, GELU
    3  ConvGroup(w, 4w)
    4  ConvGroup(4w, 4w)
    5  MaxPool2d(3)             the 3x3 maps left of a 32x32 input, to 1x1
    6  Flatten
    7  Linear(4w, classes, no bias)
    8  x 1/9

w is `width` (airbench's 64). Unlike airbench's script it stays in f32 and channels first, on
whichever device it is moved to; its initialisation is airbench's (3x3 convolutions bias-free
with their first filters the identity, BatchNorm eps 1e-12 with its weight frozen at 1), but
only loading weights is what kiln's checks use it for.
"""
import torch
from torch import nn

WHITEN_KERNEL = 2
WHITEN_WIDTH = 2 * 3 * WHITEN_KERNEL ** 2
SCALING_FACTOR = 1 / 9
# airbench's momentum 0.6 in its own convention: PyTorch's is 1 - 0.6.
BATCHNORM_MOMENTUM = 0.4


class Flatten(nn.Module):
    def forward(self, x):
        return x.view(x.size(0), -1)


class Mul(nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return x * self.scale


class BatchNorm(nn.BatchNorm2d):
    def __init__(self, num_features, eps=1e-12):
        super().__init__(num_features, eps=eps, momentum=BATCHNORM_MOMENTUM)
        self.weight.requires_grad = False


class Conv(nn.Conv2d):
    def __init__(self, cin, cout, kernel_size=3, padding="same", bias=False):
        super().__init__(cin, cout, kernel_size=kernel_size, padding=padding, bias=bias)

    def reset_parameters(self):
        super().reset_parameters()
        if self.bias is not None:
            self.bias.data.zero_()
        w = self.weight.data
        torch.nn.init.dirac_(w[:w.size(1)])


class ConvGroup(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv1 = Conv(cin, cout)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = BatchNorm(cout)
        self.conv2 = Conv(cout, cout)
        self.norm2 = BatchNorm(cout)
        self.activ = nn.GELU()

    def forward(self, x):
        x = self.activ(self.norm1(self.pool(self.conv1(x))))
        return self.activ(self.norm2(self.conv2(x)))


def build(num_classes=10, width=64):
    net = nn.Sequential(
        Conv(3, WHITEN_WIDTH, WHITEN_KERNEL, padding=0, bias=True),
        nn.GELU(),
        ConvGroup(WHITEN_WIDTH, width),
        ConvGroup(width, 4 * width),
        ConvGroup(4 * width, 4 * width),
        nn.MaxPool2d(3),
        Flatten(),
        nn.Linear(4 * width, num_classes, bias=False),
        Mul(SCALING_FACTOR),
    )
    net[0].weight.requires_grad = False
    return net
