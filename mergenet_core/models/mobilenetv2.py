"""MobileNetV2 for 32x32 inputs (the pytorch-cifar100 layout: stride-1 stem, stages with
strides 1,2,2,2,1,1,1, so 32 -> 4 spatially; last 1x1 conv to 1280; linear classifier).

Names: ``features.0`` is the stem, ``features.1``..``features.17`` the inverted residual
blocks (each with ``expand`` / ``depthwise`` / ``project`` = ``{conv, bn}``), ``conv`` the
final 1x1 conv, ``classifier`` the linear. Stage of each block (t, c, n, s):
1: features.1 | 2: .2-.3 | 3: .4-.6 | 4: .7-.10 | 5: .11-.13 | 6: .14-.16 | 7: .17.
The authors' MergeNet target (the 160x960 1x1 projection of stage 6) is
``features.16.project.conv.weight``.
"""
from __future__ import annotations

from collections import OrderedDict

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from ..data.base import TaskInfo
from .base import MODELS

# (expansion t, channels c, repeats n, first stride s), CIFAR strides.
CONFIG = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
          (6, 96, 3, 1), (6, 160, 3, 1), (6, 320, 1, 1)]
LAST_STAGE_FIRST_BLOCK = 1 + sum(n for _, _, n, _ in CONFIG[:5])  # features.14 (stage 6)


class MobileNetV2Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    width_mult: float = Field(1.0, gt=0, le=8)


def _div8(v: float) -> int:
    """Round channels to a multiple of 8, never dropping more than 10%."""
    n = max(8, int(v + 4) // 8 * 8)
    return n + 8 if n < 0.9 * v else n


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1,
            act: bool = True) -> nn.Sequential:
    layers = OrderedDict(conv=nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                         bn=nn.BatchNorm2d(cout))
    if act:
        layers["act"] = nn.ReLU6(inplace=True)
    return nn.Sequential(layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, t: int):
        super().__init__()
        hidden = cin * t
        self.expand = conv_bn(cin, hidden, 1) if t != 1 else None
        self.depthwise = conv_bn(hidden, hidden, 3, stride, groups=hidden)
        self.project = conv_bn(hidden, cout, 1, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        out = x if self.expand is None else self.expand(x)
        out = self.project(self.depthwise(out))
        return x + out if self.residual else out


class MobileNetV2(nn.Module):
    classifier_name = "classifier"
    # stage 6 and 7 blocks plus the final 1x1 conv
    last_stage_prefixes = tuple(f"features.{i}." for i in range(LAST_STAGE_FIRST_BLOCK, 18)) + ("conv.",)

    def __init__(self, num_classes: int, in_channels: int = 3, width_mult: float = 1.0):
        super().__init__()
        cin = _div8(32 * width_mult)
        layers: list[nn.Module] = [conv_bn(in_channels, cin, 3)]
        for t, c, n, s in CONFIG:
            cout = _div8(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        self.features = nn.Sequential(*layers)
        last = _div8(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv = conv_bn(cin, last, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.conv(self.features(x))).flatten(1)
        return self.classifier(x)


@MODELS.register("mobilenetv2", MobileNetV2Options, modality="image")
def mobilenetv2(opts: MobileNetV2Options, info: TaskInfo) -> MobileNetV2:
    return MobileNetV2(info.num_classes, info.in_channels or 3, opts.width_mult)
