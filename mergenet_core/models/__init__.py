"""Model registry: image (CIFAR-style ResNet, MobileNetV2, small CNN) and text (MiniLM) models.

Every model is a plain ``nn.Module`` whose parameters are addressable by dotted name
(``dict(model.named_parameters())``), so MergeNet layer pairs are just two names. Each
model class also carries two class attributes that :mod:`.inspect` reads:
``classifier_name`` (the final linear) and ``last_stage_prefixes``. Its input kind is
declared once, as ``modality=`` on its registry entry.

Image models: ``forward(x: Tensor[N, C, H, W]) -> logits [N, K]``.
Text models: ``forward({"input_ids", "attention_mask"}) -> logits [N, K]``.
"""
import importlib
import pkgutil

from .base import MODELS, build_model, build_model_shapes, weightless

# Every module here is imported, so a new model is one module that registers itself in MODELS.
# (models/text.py imports transformers only inside its builders.)
for _m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["MODELS", "build_model", "build_model_shapes", "weightless"]
