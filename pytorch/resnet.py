#!/usr/bin/env python3
"""torchvision's ResNet-18/34/50 with kiln's two stems and a width knob: kiln's reference.

    from resnet import build
    model = build("resnet18", num_classes=10, stem="cifar", width=64)

    python3 pytorch/resnet.py        # self-check against torchvision (needs torchvision)

Structure, parameter names and initialisation are torchvision's (conv kaiming_normal_ fan_out
relu, BN weight 1 and bias 0, Linear's default init); modules are built in torchvision's order,
so with the imagenet stem and width 64 the same seed gives bit-identical weights. Stems:
`imagenet` = torchvision's (7x7/2 pad 3 conv, BN, ReLU, 3x3/2 pad 1 max-pool); `cifar` = conv1 a
3x3/1 pad 1 conv without bias, max-pool an Identity (the cifar conv1 gets the kaiming_normal_
init too, where torchvision-plus-swap would leave it at Conv2d's default). `width` is the first
stage's width (stages width, 2w, 4w, 8w; torchvision's is 64), so tests can use tiny models with
the same maths. The self-check loads state dicts both ways (strict=True) with torchvision's own
models at width 64, for resnet18/34/50 and both stems, and compares outputs.
"""
import torch
import torch.nn as nn

BLOCKS = {"resnet18": ("basic", [2, 2, 2, 2]), "resnet34": ("basic", [3, 4, 6, 3]),
          "resnet50": ("bottleneck", [3, 4, 6, 3])}
STEMS = ("cifar", "imagenet")


def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck: the stride sits on the 3x3 conv."""
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, block, layers, num_classes=1000, stem="imagenet", width=64):
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"stem {stem!r}: expected one of {STEMS}")
        self.inplanes = width
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = conv3x3(3, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = (nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if stem == "imagenet"
                        else nn.Identity())
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, 2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * width, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * width * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build(model: str, num_classes: int, stem: str, width: int = 64) -> nn.Module:
    """A kiln ResNet: model resnet18 | resnet34 | resnet50, stem cifar | imagenet."""
    if model not in BLOCKS:
        raise ValueError(f"model {model!r}: expected one of {sorted(BLOCKS)}")
    kind, layers = BLOCKS[model]
    block = BasicBlock if kind == "basic" else Bottleneck
    return ResNet(block, layers, num_classes=num_classes, stem=stem, width=width)


def torchvision_model(model: str, num_classes: int, stem: str) -> nn.Module:
    """torchvision's own ResNet (width 64), stem swapped for kiln's cifar stem when asked."""
    import torchvision

    if model not in BLOCKS:
        raise ValueError(f"model {model!r}: expected one of {sorted(BLOCKS)}")
    if stem not in STEMS:
        raise ValueError(f"stem {stem!r}: expected one of {STEMS}")
    m = getattr(torchvision.models, model)(weights=None, num_classes=num_classes)
    if stem == "cifar":
        m.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        m.maxpool = nn.Identity()
    return m


def _self_check():
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    for name in BLOCKS:
        for stem in STEMS:
            ours, theirs = build(name, 10, stem).eval(), torchvision_model(name, 10, stem).eval()
            a, b = ours.state_dict(), theirs.state_dict()
            assert list(a) == list(b), f"{name}/{stem}: state_dict keys or order differ"
            for k in a:
                assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, (name, stem, k)
            theirs.load_state_dict(a, strict=True)
            x = torch.randn(2, 3, 32, 32)
            with torch.no_grad():
                same = torch.equal(ours(x), theirs(x))
            torch.manual_seed(1)
            ours.load_state_dict(torchvision_model(name, 10, stem).state_dict(), strict=True)
            assert same, f"{name}/{stem}: outputs differ with the same weights"
            print(f"{name:8s} {stem:8s} {len(a):3d} tensors "
                  f"{sum(p.numel() for p in ours.parameters()):>10,d} parameters: "
                  "state_dict loads both ways (strict), same outputs")
    # Same construction and init order as torchvision: bit-identical weights from one seed.
    torch.manual_seed(123)
    ours = build("resnet50", 10, "imagenet").state_dict()
    torch.manual_seed(123)
    theirs = torchvision_model("resnet50", 10, "imagenet").state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    print("resnet50 imagenet: same seed gives torchvision's initial weights bit for bit")
    small = build("resnet50", 10, "cifar", width=4)
    print(f"resnet50 cifar width 4: {sum(p.numel() for p in small.parameters()):,d} parameters, "
          f"fc {tuple(small.fc.weight.shape)}")


if __name__ == "__main__":
    _self_check()
