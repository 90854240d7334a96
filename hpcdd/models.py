"""Local CNNs and the global CNN: VGG-type and ResNet-type families, 2D or 3D.

A local CNN is the global CNN's family sized for its subimage, with widths scaled by
``width_scale`` (default 1/sqrt(N): convolution parameters grow with width squared, so the N local
CNNs together hold about as many parameters as the global CNN). Every net ends in global average
pooling, so it accepts any input size its pooling allows.
"""

from __future__ import annotations

import math

from torch import nn

from .config import FAMILIES, ModelConfig
from .errors import UserError


def _layers(dims: int):
    if dims == 2:
        return nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d
    return nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d, nn.AdaptiveAvgPool3d


class VGG(nn.Module):
    """Blocks of (conv3-BN-ReLU) x k followed by 2x max pooling (on axes still >= 2 pixels)."""

    def __init__(self, in_channels: int, num_classes: int, spatial: tuple[int, ...], widths, convs_per_block=2,
                 hidden=128, dropout=0.2):
        super().__init__()
        conv, bn, pool, gap = _layers(len(spatial))
        layers, c, size = [], in_channels, list(spatial)
        for w in widths:
            for _ in range(convs_per_block):
                layers += [conv(c, w, 3, padding=1, bias=False), bn(w), nn.ReLU(inplace=True)]
                c = w
            kernel = tuple(2 if s >= 2 else 1 for s in size)
            if max(kernel) > 1:
                layers.append(pool(kernel, ceil_mode=True))
                size = [math.ceil(s / k) for s, k in zip(size, kernel)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(gap(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(c, hidden),
                                  nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, dims: int, c_in: int, c_out: int, stride):
        super().__init__()
        conv, bn, _, _ = _layers(dims)
        self.conv1 = conv(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = bn(c_out)
        self.conv2 = conv(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = bn(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 and stride != (1,) * dims or c_in != c_out:
            self.shortcut = nn.Sequential(conv(c_in, c_out, 1, stride=stride, bias=False), bn(c_out))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet-(6n+2) (3 stages) or ImageNet-style ResNet-18 (stem 7x7/2 + max pool, 4 stages).

    The ResNet-18 layout is torchvision's (BasicBlock, [2, 2, 2, 2], widths 64..512); it is rebuilt
    here so that width scaling and 3D volumes work the same way as for the other families.
    """

    def __init__(self, in_channels: int, num_classes: int, spatial: tuple[int, ...], widths, blocks, imagenet_stem):
        super().__init__()
        dims = len(spatial)
        conv, bn, pool, gap = _layers(dims)
        size = list(spatial)
        if imagenet_stem:
            stem = [conv(in_channels, widths[0], 7, stride=2, padding=3, bias=False), bn(widths[0]),
                    nn.ReLU(inplace=True), pool(3, stride=2, padding=1)]
            size = [math.ceil(s / 4) for s in size]
        else:
            stem = [conv(in_channels, widths[0], 3, padding=1, bias=False), bn(widths[0]), nn.ReLU(inplace=True)]
        layers, c = stem, widths[0]
        for stage, (w, n) in enumerate(zip(widths, blocks)):
            for b in range(n):
                stride = 1
                if stage > 0 and b == 0:
                    stride = tuple(2 if s >= 2 else 1 for s in size)
                    size = [math.ceil(s / st) for s, st in zip(size, stride)]
                layers.append(BasicBlock(dims, c, w, stride))
                c = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(gap(1), nn.Flatten(), nn.Linear(c, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


def scaled(widths, scale: float) -> tuple[int, ...]:
    return tuple(max(4, int(round(w * scale))) for w in widths)


def build_model(spec: ModelConfig, in_channels: int, spatial, num_classes: int, width_scale: float = 1.0) -> nn.Module:
    """The family's CNN for inputs (C, *spatial), with widths multiplied by ``width_scale``."""
    spatial = tuple(int(s) for s in spatial)
    if spec.family == "vgg":
        return VGG(in_channels, num_classes, spatial, scaled(spec.widths, width_scale), spec.convs_per_block,
                   max(4, int(round(spec.hidden * width_scale))), spec.dropout)
    if spec.family in ("resnet20", "resnet32"):
        n = (int(spec.family[6:]) - 2) // 6
        widths = scaled(spec.widths[:3] if len(spec.widths) >= 3 else (16, 32, 64), width_scale)
        return ResNet(in_channels, num_classes, spatial, widths, (n, n, n), imagenet_stem=False)
    if spec.family == "resnet18":
        if min(spatial) < 32:
            raise UserError(f"model.family resnet18 needs inputs of at least 32 pixels per side, got "
                            f"{'x'.join(map(str, spatial))}; use resnet20, resnet32 or vgg")
        widths = scaled(spec.widths if len(spec.widths) == 4 else (64, 128, 256, 512), width_scale)
        return ResNet(in_channels, num_classes, spatial, widths, (2, 2, 2, 2), imagenet_stem=True)
    raise UserError(f"model.family {spec.family!r}: expected one of {', '.join(FAMILIES)}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def default_width_scale(n_subdomains: int) -> float:
    return 1.0 / math.sqrt(n_subdomains)
