"""Model registry: image (CIFAR-style ResNet, MobileNetV2, small CNN) and text (MiniLM) models.

Every model is a plain ``nn.Module`` whose parameters are addressable by dotted name
(``dict(model.named_parameters())``), so MergeNet layer pairs are just two names. Each
model class also carries three class attributes that :mod:`.inspect` reads:
``modality``, ``classifier_name`` (the final linear) and ``last_stage_prefixes``.

Image models: ``forward(x: Tensor[N, C, H, W]) -> logits [N, K]``.
Text models: ``forward({"input_ids", "attention_mask"}) -> logits [N, K]``.
"""
from . import cnn, mobilenetv2, resnet, text  # noqa: F401  (register entries)
from .base import MODELS, build_model, build_model_shapes, weightless

__all__ = ["MODELS", "build_model", "build_model_shapes", "weightless"]
