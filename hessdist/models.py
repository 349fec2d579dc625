"""Built-in models for the examples and tests: small digits networks and a CIFAR ResNet-18."""
from __future__ import annotations

import torch
from torch import nn


def digits_mlp(hidden: int = 32, seed: int = 0) -> nn.Module:
    """64 → hidden → 10 tanh MLP for 8×8 digits (2,410 parameters at hidden=32)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))


def digits_cnn(width: int = 8, seed: int = 0) -> nn.Module:
    """Two conv+BatchNorm+ReLU layers, average pooling, linear head, for 1×8×8 digits."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.AvgPool2d(2), nn.Flatten(), nn.Linear(2 * width * 16, 10))


class BasicBlock(nn.Module):
    """Two 3×3 conv+BN layers with an identity (or 1×1 projection) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet (3×3 stem, no max-pool); ``blocks=(2, 2, 2, 2), width=64`` is ResNet-18."""

    def __init__(self, blocks=(2, 2, 2, 2), width: int = 64, in_channels: int = 3, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers, c = [], width
        for i, n in enumerate(blocks):
            c_out = width * 2 ** i
            for j in range(n):
                layers.append(BasicBlock(c, c_out, 2 if (j == 0 and i > 0) else 1))
                c = c_out
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


def resnet_small_cifar(width: int = 4, blocks: tuple[int, ...] = (1, 1, 1), seed: int = 0) -> nn.Module:
    """A narrow CIFAR-variant ResNet (one basic block per stage by default: 5,214 parameters at
    width 4), for CPU runs of the per-epoch loop; ``width=64, blocks=(2, 2, 2, 2)`` is ResNet-18."""
    torch.manual_seed(seed)
    return ResNet(blocks=blocks, width=width)


def resnet18_cifar(seed: int = 0) -> nn.Module:
    """ResNet-18, CIFAR variant: 11,173,962 parameters."""
    torch.manual_seed(seed)
    return ResNet()
