"""Small CNN: ``len(channels)`` blocks of conv3x3-BN-ReLU-maxpool2, global average pool,
optional hidden linear (``hidden``), linear ``classifier``.

Names: ``features.{i}.conv.weight``, ``hidden.weight``, ``classifier.weight``.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from ..data.base import TaskInfo
from .base import MODELS


class CNNOptions(BaseModel):
    """``channels``: output channels per conv block; ``hidden``: 0 disables the hidden linear."""

    model_config = ConfigDict(extra="forbid")
    channels: list[Annotated[int, Field(ge=1, le=4096)]] = Field(default_factory=lambda: [32, 64, 128],
                                                                 min_length=1, max_length=5)
    hidden: int = Field(256, ge=0, le=65536)


class SmallCNN(nn.Module):
    classifier_name = "classifier"

    def __init__(self, num_classes: int, in_channels: int = 3,
                 channels: list[int] = (32, 64, 128), hidden: int = 256):
        super().__init__()
        blocks, cin = [], in_channels
        for c in channels:
            blocks.append(nn.Sequential(OrderedDict(
                conv=nn.Conv2d(cin, c, 3, 1, 1, bias=False), bn=nn.BatchNorm2d(c),
                act=nn.ReLU(inplace=True), pool=nn.MaxPool2d(2, ceil_mode=True))))
            cin = c
        self.features = nn.Sequential(*blocks)
        self.last_stage_prefixes = (f"features.{len(channels) - 1}.",)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.hidden = nn.Linear(cin, hidden) if hidden else None
        self.classifier = nn.Linear(hidden or cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x)).flatten(1)
        if self.hidden is not None:
            x = torch.relu(self.hidden(x))
        return self.classifier(x)


@MODELS.register("cnn", CNNOptions, modality="image")
def cnn(opts: CNNOptions, info: TaskInfo) -> SmallCNN:
    return SmallCNN(info.num_classes, info.in_channels or 3, opts.channels, opts.hidden)
