"""Two-tower image+text models: an image tower and a text tower, each a registered single-modality
model (the project's CNN / ResNet / MobileNetV2, MiniLM) with its classifier removed.

* ``vqa`` (modality ``image_question``): visual question answering. Image and question features
  are projected to ``dim``, fused by an elementwise product of their ``tanh``, then a hidden
  layer and the answer ``classifier``.
* ``retrieval`` (modality ``image_caption``): image-text retrieval. Both towers' features are
  projected to ``dim`` and L2-normalised (``embed``); the output for a batch is the similarity
  logits of every image with every caption, scaled by a learned temperature (``similarity``).

Names: ``image.<the image model's names>`` (e.g. ``image.features.2.conv.weight``: the CNN's own
names under ``image.``, so a CNN trained on its own is the image tower's donor), ``text.<the text
model's names>`` (e.g. ``text.bert.encoder.layer.0.attention.output.dense.weight``),
``image_proj``, ``text_proj``; ``vqa`` adds ``hidden`` and ``classifier``; ``retrieval`` adds
``logit_scale``.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from ..data.base import TaskInfo
from ..errors import ConfigError
from .base import MODELS


class Tower(BaseModel):
    """One tower: a registered model of the tower's modality and its options."""

    model_config = ConfigDict(extra="forbid")
    name: str
    options: dict[str, Any] = Field(default_factory=dict)


class TwoTowerOptions(BaseModel):
    """``image``: an image model (``cnn``, ``resnet18``, ...); ``text``: a text model (``minilm_l3``,
    ``minilm_l6``); each without its classifier. ``pretrained: false`` builds every tower that has
    a ``pretrained`` option without its packaged weights (an untrained control role does this)."""

    model_config = ConfigDict(extra="forbid")
    image: Tower = Field(default_factory=lambda: Tower(name="cnn"))
    text: Tower = Field(default_factory=lambda: Tower(name="minilm_l3"))
    dim: int = Field(256, ge=1, le=8192, description="joint width of the two projections")
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    pretrained: bool = True


class VQAOptions(TwoTowerOptions):
    hidden: int = Field(256, ge=1, le=65536)


class RetrievalOptions(TwoTowerOptions):
    temperature: float = Field(0.07, gt=0.0, le=1.0, description="initial softmax temperature (learned)")


_TOWER_MODALITY = {"image": "image", "text": "text"}


def _tower(which: str, spec: Tower, opts: TwoTowerOptions, info: TaskInfo, weightless: bool) -> tuple[nn.Module, int]:
    """The tower model (its classifier replaced by the identity) and its feature width."""
    from .base import build_model, build_model_shapes

    field = f"model.options.{which}"
    want = _TOWER_MODALITY[which]
    if spec.name not in MODELS:
        raise ConfigError(f"{field}.name", f"unknown model '{spec.name}' (known: {', '.join(MODELS.names())})")
    takes = MODELS.get(spec.name).meta.get("modality")
    if takes != want:
        raise ConfigError(f"{field}.name", f"the {which} tower must be a{'n' if want == 'image' else ''} {want} "
                                           f"model, but '{spec.name}' takes {takes} input")
    options = dict(spec.options)
    if not opts.pretrained and "pretrained" in MODELS.get(spec.name).options.model_fields:
        options["pretrained"] = False
    sub = TaskInfo(name=info.name, modality=want, num_classes=1, in_channels=info.in_channels or 3,
                   image_size=info.image_size, max_length=info.max_length, vocab_size=info.vocab_size,
                   mean=info.mean, std=info.std, description=info.description)
    try:
        model = (build_model_shapes if weightless else build_model)(spec.name, options, sub)
    except ConfigError as e:  # name the tower's field
        where = e.field.removeprefix("model.")
        raise ConfigError(f"{field}.{where}" if where != "name" else f"{field}.name", e.problem) from None
    head = getattr(model, "classifier_name", None)
    linear = model.get_submodule(head) if head else None
    if not isinstance(linear, nn.Linear):
        raise ConfigError(f"{field}.name", f"model '{spec.name}' has no final linear classifier to remove")
    parent, _, leaf = head.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, nn.Identity())
    model.classifier_name = None
    return model, linear.in_features


class _TwoTower(nn.Module):
    #: the modality of each tower's parameter names (``mergenet pairs`` pairs within a modality)
    tower_prefixes = {"image.": "image", "text.": "text"}

    def __init__(self, image: nn.Module, image_dim: int, text: nn.Module, text_dim: int, dim: int, dropout: float):
        super().__init__()
        self.image = image
        self.text = text
        self.image_proj = nn.Linear(image_dim, dim)
        self.text_proj = nn.Linear(text_dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.last_stage_prefixes = tuple(f"image.{p}" for p in getattr(image, "last_stage_prefixes", ()))

    def features(self, x: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return self.image_proj(self.image(x["image"])), self.text_proj(self.text(x))


class VQAModel(_TwoTower):
    """``forward({"image", "input_ids", "attention_mask"}) -> answer logits [N, K]``."""

    classifier_name = "classifier"

    def __init__(self, image, image_dim, text, text_dim, num_classes: int, dim: int, hidden: int, dropout: float):
        super().__init__(image, image_dim, text, text_dim, dim, dropout)
        self.hidden = nn.Linear(dim, hidden)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: dict[str, Tensor]) -> Tensor:
        a, q = self.features(x)
        h = torch.relu(self.hidden(self.dropout(torch.tanh(a) * torch.tanh(q))))
        return self.classifier(self.dropout(h))


class RetrievalModel(_TwoTower):
    """``forward({"image", "input_ids", "attention_mask"}) -> logits [N, N]`` (image i, caption j)."""

    classifier_name = None  # no classifier: the projections are the last layers

    def __init__(self, image, image_dim, text, text_dim, dim: int, dropout: float, temperature: float):
        super().__init__(image, image_dim, text, text_dim, dim, dropout)
        self.logit_scale = nn.Parameter(torch.full((), math.log(1.0 / temperature)))

    def embed(self, x: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """L2-normalised (image, caption) embeddings ``[N, dim]`` each."""
        a, t = self.features(x)
        return F.normalize(self.dropout(a), dim=-1), F.normalize(self.dropout(t), dim=-1)

    def similarity(self, img: Tensor, txt: Tensor) -> Tensor:
        return self.logit_scale.exp().clamp(max=100.0) * img @ txt.t()

    def forward(self, x: dict[str, Tensor]) -> Tensor:
        return self.similarity(*self.embed(x))


def _vqa(opts: VQAOptions, info: TaskInfo, weightless: bool = False) -> VQAModel:
    img, di = _tower("image", opts.image, opts, info, weightless)
    txt, dt = _tower("text", opts.text, opts, info, weightless)
    return VQAModel(img, di, txt, dt, info.num_classes, opts.dim, opts.hidden, opts.dropout)


def _retrieval(opts: RetrievalOptions, info: TaskInfo, weightless: bool = False) -> RetrievalModel:
    img, di = _tower("image", opts.image, opts, info, weightless)
    txt, dt = _tower("text", opts.text, opts, info, weightless)
    return RetrievalModel(img, di, txt, dt, opts.dim, opts.dropout, opts.temperature)


MODELS.register("vqa", VQAOptions, modality="image_question",
                shapes=lambda o, i: _vqa(o, i, weightless=True))(_vqa)
MODELS.register("retrieval", RetrievalOptions, modality="image_caption",
                shapes=lambda o, i: _retrieval(o, i, weightless=True))(_retrieval)
