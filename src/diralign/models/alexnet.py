"""H-AlexNet: the PyTorch CIFAR-10 tutorial network with every bias disabled (paper, App. A).

    python -c "import torch, diralign.models as m; net = m.build_model('h-alexnet'); print(m.homogeneity_degree(net, torch.randn(4, 3, 32, 32)).verdict())"

conv(3,6,5) -> ReLU -> maxpool 2 -> conv(6,16,5) -> ReLU -> maxpool 2 -> fc(400,120) -> ReLU
-> fc(120,84) -> ReLU -> fc(84,10).  ReLU and max-pooling are positively 1-homogeneous and
there are five weight layers and no biases, so ``f(x; cW) = c^5 f(x; W)``: the network is
5-homogeneous and definable, inside Assumption 2.1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .registry import register


def _pooled(size: int) -> int:
    """Spatial size after conv(5) + maxpool(2), twice (32 -> 14 -> 5)."""
    for _ in range(2):
        size = (size - 4) // 2
    return size


class HAlexNet(nn.Module):
    homogeneity_degree = 5

    def __init__(self, num_classes: int = 10, in_shape: Sequence[int] = (3, 32, 32)):
        super().__init__()
        if len(in_shape) != 3:
            raise ValueError(f"h-alexnet takes images [C, H, W], got examples of shape {list(in_shape)}")
        channels, height, width = (int(v) for v in in_shape)
        side_h, side_w = _pooled(height), _pooled(width)
        if side_h < 1 or side_w < 1:
            raise ValueError(f"h-alexnet needs images of at least 16x16 pixels, got {height}x{width}")
        self.conv1 = nn.Conv2d(channels, 6, 5, bias=False)
        self.conv2 = nn.Conv2d(6, 16, 5, bias=False)
        self.fc1 = nn.Linear(16 * side_h * side_w, 120, bias=False)
        self.fc2 = nn.Linear(120, 84, bias=False)
        self.fc3 = nn.Linear(84, int(num_classes), bias=False)
        self.pool = nn.MaxPool2d(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


@register("h-alexnet")
def h_alexnet(num_classes: int = 10, in_shape: Sequence[int] = (3, 32, 32)) -> HAlexNet:
    return HAlexNet(num_classes=num_classes, in_shape=in_shape)
