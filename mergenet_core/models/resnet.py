"""CIFAR-style ResNet-18/34/50: 3x3 stride-1 stem, no max-pool, four stages (x1, x2, x4, x8 width).

Parameter names follow the familiar layout: ``conv1``, ``bn1``, ``layer{1..4}.{i}.conv{1..3}``,
``layer{s}.0.downsample.{0,1}`` and the final linear ``fc``.
"""
from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

from ..data.base import TaskInfo
from .base import MODELS


class ResNetOptions(BaseModel):
    """``width``: channels of the stem / first stage; ``blocks``: blocks per stage (4 ints)."""

    model_config = ConfigDict(extra="forbid")
    width: int = Field(64, ge=1, le=1024)
    blocks: list[int] | None = None

    @field_validator("blocks")
    @classmethod
    def _four_stages(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (len(v) != 4 or min(v) < 1 or max(v) > 64):
            raise ValueError("blocks must be 4 integers from 1 to 64 (one per stage)")
        return v


def _downsample(cin: int, cout: int, stride: int) -> nn.Module | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(cin, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = _downsample(cin, cout, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """CIFAR ResNet; input ``[N, C, H, W]`` of any size >= 8 (global average pool)."""

    classifier_name = "fc"
    last_stage_prefixes: tuple[str, ...] = ("layer4.",)

    def __init__(self, block: type[BasicBlock | Bottleneck], blocks: list[int],
                 num_classes: int, in_channels: int = 3, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        cin = width
        for s, n in enumerate(blocks):
            planes = width * 2**s
            layers = []
            for i in range(n):
                layers.append(block(cin, planes, (1 if s == 0 else 2) if i == 0 else 1))
                cin = planes * block.expansion
            setattr(self, f"layer{s + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _factory(block: type[BasicBlock | Bottleneck], default_blocks: list[int]):
    def build(opts: ResNetOptions, info: TaskInfo) -> ResNet:
        return ResNet(block, opts.blocks or default_blocks, info.num_classes,
                      info.in_channels or 3, opts.width)
    return build


MODELS.register("resnet18", ResNetOptions, modality="image")(_factory(BasicBlock, [2, 2, 2, 2]))
MODELS.register("resnet34", ResNetOptions, modality="image")(_factory(BasicBlock, [3, 4, 6, 3]))
MODELS.register("resnet50", ResNetOptions, modality="image")(_factory(Bottleneck, [3, 4, 6, 3]))
