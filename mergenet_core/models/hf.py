"""Bring-your-own text models: a Transformers model from a local folder or the local Hugging Face
cache (``hf``), always offline (``local_files_only=True``; nothing is downloaded).

Two heads (``head``):

* ``classify``: ``AutoModelForSequenceClassification`` with the task's classes as ``num_labels``
  (a classifier of another size in the checkpoint is re-initialised: ``ignore_mismatched_sizes``).
  Names: ``model.<the Transformers names>``, e.g. ``model.bert.encoder.layer.0.attention.output.
  dense.weight``, ``model.classifier.weight``.
* ``encoder``: ``AutoModel`` (its pooler dropped) + mean pooling over ``attention_mask`` +
  dropout + a fresh linear ``classifier``. Names: ``<base_model_prefix>.<the encoder's names>``
  + ``classifier``, e.g. ``bert.encoder.layer.0.attention.output.dense.weight``: for a BERT
  folder, the names of the ``minilm_l6`` entry.

``forward({"input_ids", "attention_mask"[, "token_type_ids"]}) -> logits [N, K]``. The tensors
left at their fresh initialisation are recorded in ``skipped_weights``. The entry's
``task_defaults(opts)`` gives ``{"tokenizer": the model's folder or name}``: a text task
tokenises with the model's own tokenizer unless told otherwise.

Fast validation (:func:`~.base.build_model_shapes`) reads ``config.json`` only and builds the
same modules on the meta device (the weights file must exist; it is not read).
"""
from __future__ import annotations

import contextlib
import inspect
import os
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from ..data.base import TaskInfo
from ..errors import ConfigError, DataMissingError, short
from .base import MODELS
from .vision import import_torchvision, library_imports

TEXT_HINT = "pip install transformers"
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class HFOptions(BaseModel):
    """``path``: a local folder of a Transformers model (``config.json``, weights, tokenizer);
    ``name``: a model id already in the local Hugging Face cache (exactly one of the two);
    ``head``: ``classify`` (the model's own sequence-classification head) or ``encoder`` (mean
    pooling + a fresh linear ``classifier``); ``pretrained: false`` builds from the config alone
    (random weights; an untrained control role sets it); ``dropout``: before the ``encoder``
    head's classifier."""

    model_config = ConfigDict(extra="forbid")
    path: str | None = Field(None, min_length=1)
    name: str | None = Field(None, min_length=1)
    head: Literal["classify", "encoder"] = "classify"
    pretrained: bool = True
    dropout: float = Field(0.1, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.name is None):
            raise ValueError("give exactly one of path (a local model folder) or name (a model id in the local "
                             "Hugging Face cache)")
        return self


def task_defaults(opts: HFOptions | dict) -> dict:
    """What a text task uses by default with this model: its own tokenizer, as the model's local
    folder (``name``: its snapshot in the Hugging Face cache; none when it is not cached, which
    the model's own build reports)."""
    opts = opts if isinstance(opts, HFOptions) else HFOptions.model_validate(opts or {})
    if opts.path is not None:
        return {"tokenizer": opts.path}
    try:
        return {"tokenizer": str(_folder(opts))}
    except ConfigError:
        return {}


def _folder(opts: HFOptions) -> Path:
    """The model's local folder: ``path``, or ``name``'s snapshot in the Hugging Face cache."""
    if opts.path is not None:
        p = Path(opts.path).expanduser()
        if not (p / "config.json").is_file():
            raise ConfigError("model.options.path", f"{p}: not a Transformers model folder (no config.json)")
        return p
    from huggingface_hub import snapshot_download

    try:
        p = Path(snapshot_download(opts.name, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or an invalid id): offline, nothing to fetch
        raise ConfigError("model.options.name", f"'{short(opts.name)}' is not in the local Hugging Face cache "
                                                "(nothing is downloaded: fetch it beforehand with "
                                                "`hf download NAME`, or give options.path)") from None
    if not (p / "config.json").is_file():
        raise ConfigError("model.options.name", f"'{short(opts.name)}': the cached snapshot {p} has no config.json")
    return p


def _check_weights(folder: Path, opts: HFOptions) -> None:
    if opts.pretrained and not any((folder / f).is_file() for f in _WEIGHT_FILES):
        raise DataMissingError(f"{folder}: no weights file ({' / '.join(_WEIGHT_FILES[::2])}); "
                               "pretrained: false builds the model from config.json alone")


@contextlib.contextmanager
def _quiet_transformers():
    """Transformers' loading reports (progress bar, newly initialised weights) off for a load: the
    tensors left at their initialisation are recorded in ``skipped_weights`` instead."""
    from transformers.utils import logging

    level, bar = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bar:
            logging.enable_progress_bar()


def _import_transformers(folder: Path, opts: HFOptions):
    """``(transformers, config, the auto class)``, imported outside :func:`~.base.weightless`
    with the model's class resolved (its module imported) there too."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with library_imports():
        import_torchvision(required=False)  # transformers imports it where installed
        try:
            import transformers
        except ImportError:
            raise ConfigError("model.name", f"transformers is not installed: {TEXT_HINT}") from None
        try:
            cfg = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(_field(opts), f"{folder}: config.json not usable ({short(str(e), 160)})") from None
        auto = (transformers.AutoModelForSequenceClassification if opts.head == "classify"
                else transformers.AutoModel)
        try:
            auto._model_mapping[type(cfg)]  # imports the model's module (lazily loaded otherwise)
        except (KeyError, ValueError):
            raise ConfigError("model.options.head", f"{type(cfg).__name__} has no {auto.__name__} class") from None
    return transformers, cfg, auto


def _field(opts: HFOptions) -> str:
    return "model.options.path" if opts.path is not None else "model.options.name"


def _check_task(cfg, info: TaskInfo) -> None:
    vocab = getattr(cfg, "vocab_size", None)
    if vocab and info.vocab_size > vocab:
        raise ConfigError("model.name", f"task '{info.name}' has vocab_size {info.vocab_size} > the model's {vocab} "
                                        "(tokenise with the model's own tokenizer)")
    positions = getattr(cfg, "max_position_embeddings", None)
    if positions and info.max_length > positions:
        raise ConfigError("model.name", f"task '{info.name}' max_length {info.max_length} > the model's "
                                        f"{positions} positions")


def _accepted(module: nn.Module) -> tuple[str, ...]:
    params = inspect.signature(module.forward).parameters
    return tuple(k for k in _INPUTS if k in params)


def _inputs(x: dict[str, Tensor], accepted: tuple[str, ...]) -> dict[str, Tensor]:
    return {k: x[k] for k in accepted if k in x}


class HFSequenceClassifier(nn.Module):
    """A Transformers sequence-classification model taking the batch dict, returning logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self._accepted = _accepted(model)
        linears = [n for n, m in self.named_modules() if isinstance(m, nn.Linear)]
        self.classifier_name = linears[-1] if linears else None

    def forward(self, x: dict[str, Tensor]) -> Tensor:
        return self.model(**_inputs(x, self._accepted)).logits


class HFEncoderClassifier(nn.Module):
    """A Transformers encoder -> mean pool over ``attention_mask`` -> dropout -> ``classifier``."""

    classifier_name = "classifier"

    def __init__(self, encoder: nn.Module, num_classes: int, dropout: float):
        super().__init__()
        if isinstance(getattr(encoder, "pooler", None), nn.Module):
            encoder.pooler = None  # unused by mean pooling (BERT-style encoders skip a None pooler)
        self._prefix = getattr(encoder, "base_model_prefix", "") or "encoder"
        setattr(self, self._prefix, encoder)
        self._accepted = _accepted(encoder)
        cfg = encoder.config
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(getattr(cfg, "hidden_size", None) or cfg.d_model, num_classes)

    def forward(self, x: dict[str, Tensor]) -> Tensor:
        h = getattr(self, self._prefix)(**_inputs(x, self._accepted))[0]
        m = x["attention_mask"].unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return self.classifier(self.dropout(pooled))


def _load(auto, folder: Path, cfg, opts: HFOptions, load: bool) -> tuple[nn.Module, list[str]]:
    """The Transformers model (from the weights, from the config alone, or on meta) and the names
    of its tensors left at their fresh initialisation."""
    if not (load and opts.pretrained):
        return auto.from_config(cfg), []
    try:
        with _quiet_transformers():
            model, report = auto.from_pretrained(str(folder), config=cfg, local_files_only=True,
                                                 ignore_mismatched_sizes=True, output_loading_info=True,
                                                 dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as e:
        raise ConfigError(_field(opts), f"{folder}: weights not loadable ({short(str(e), 160)})") from None
    fresh = set(report.get("missing_keys", ())) | {k[0] if isinstance(k, tuple) else k
                                                    for k in report.get("mismatched_keys", ())}
    return model, sorted(fresh)


def _hf_model(opts: HFOptions, info: TaskInfo, load: bool) -> nn.Module:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # besides local_files_only: no hub call at all
    folder = _folder(opts)
    _check_weights(folder, opts)
    _, cfg, auto = _import_transformers(folder, opts)
    _check_task(cfg, info)
    if opts.head == "classify":
        cfg.num_labels = info.num_classes
    model, fresh = _load(auto, folder, cfg, opts, load)
    if opts.head == "classify":
        out = HFSequenceClassifier(model)
        out.skipped_weights = [f"model.{k}" for k in fresh]
    else:
        out = HFEncoderClassifier(model, info.num_classes, opts.dropout)
        out.skipped_weights = [f"{out._prefix}.{k}" for k in fresh]
    return out


@MODELS.register("hf", HFOptions, modality="text", task_defaults=task_defaults,
                 shapes=lambda opts, info: _hf_model(opts, info, load=False))
def hf_model(opts: HFOptions, info: TaskInfo) -> nn.Module:
    return _hf_model(opts, info, load=True)
