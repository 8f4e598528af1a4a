"""Modalities: the kinds of input a task gives and a model takes (``image``, ``text``,
``image_question``, ``image_caption``).

A model declares its modality once, as ``modality=`` on its ``MODELS`` entry, and a task as
``modality=`` on its ``TASKS`` entry and in its :class:`TaskInfo`. Everything that depends on
the kind of input asks the registered :class:`Modality`: a role's batch preparation
(:class:`mergenet_core.training.roles.Role`), the stand-in task of ``mergenet pairs``, and the one
model/task check (:func:`mismatch`), and what the model's output means: the loss of a batch
(:meth:`Modality.loss`), the train-time hit count and the evaluation numbers
(:meth:`Modality.evaluate`; ``image_caption``: retrieval recall). A new modality is one
subclass registered here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import Registry
from .augment import prepare_images
from .base import TaskInfo
from .stream import iter_eval

MODALITIES = Registry("modality")


class Modality:
    """How one kind of input reaches a model. Subclasses set ``name`` and ``title`` and
    implement :meth:`example_info` and :meth:`prepare`."""

    name: str = ""
    title: str = ""  # plain description of the input
    score: str = "accuracy"  # what ``acc`` is for this modality (reports name it so)

    def example_info(self, num_classes: int) -> TaskInfo:
        """A stand-in task of this modality, to build a model without data (``mergenet pairs``)."""
        raise NotImplementedError

    def prepare(self, x, info: TaskInfo, device: torch.device, train: bool,
                generator: torch.Generator | None = None, channels_last: bool = False):
        """A batch's inputs ``x`` (as the task's splits hold them) moved to ``device`` and made
        what the model takes; ``train`` applies the training-time augmentation, drawn from
        ``generator``."""
        raise NotImplementedError

    def prepare_model(self, model: nn.Module, channels_last: bool) -> None:
        """Set the model's memory layout for this input (the model is on its device already)."""

    # What the model's output means. Default: class logits ``[N, K]`` against labels ``y``.
    #: the numbers :meth:`evaluate` returns (a role reports each as ``{split}_{name}``)
    metric_names: tuple[str, ...] = ("loss", "acc")

    def loss(self, logits: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        """The training loss of a batch's model output (default: cross-entropy)."""
        return F.cross_entropy(logits, y, label_smoothing=label_smoothing)

    def hits(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """How many of the batch's examples the output gets right (``train_acc``'s count), as a
        0-dim tensor on the output's device (a training step never waits for the device)."""
        return (logits.detach().argmax(1) == y).sum()

    def evaluate(self, role, data) -> dict[str, float]:
        """:attr:`metric_names` of ``role``'s model on the split ``data`` (no gradients, eval mode)."""
        loss_sum, correct, n = 0.0, 0, 0
        for x, y in iter_eval(data, role.recipe.eval_batch_size):
            x = self.prepare(x, role.task.info, role.device, train=False, channels_last=role.channels_last)
            y = y.to(role.device)
            loss, logits = role.loss(x, y)
            loss_sum += float(loss) * len(y)
            correct += int(self.hits(logits, y))
            n += len(y)
        return {"loss": loss_sum / max(1, n), "acc": correct / max(1, n)}


def register(cls: type[Modality]) -> type[Modality]:
    """Class decorator: register one instance of ``cls`` under ``cls.name``."""
    MODALITIES.register(cls.name)(cls())
    return cls


def check_task_entry(entry) -> None:
    """A ``TASKS`` entry declares its modality (a registered one) and a ``probe`` (fast
    validation); a plugin's mistake is refused where it registers, naming the task."""
    if entry.meta.get("modality") not in MODALITIES:
        raise ValueError(f"task '{entry.name}': modality= must be one of {MODALITIES.names()}, "
                         f"not {entry.meta.get('modality')!r}")
    if not callable(entry.meta.get("probe")):
        raise ValueError(f"task '{entry.name}': probe= (options -> TaskShape, no data read) is required")


def get_modality(name: str, field: str = "modality") -> Modality:
    return MODALITIES.get(name, field).fn


def mismatch(model: str, takes: str | None, task: str, gives: str | None) -> str | None:
    """The problem of putting model ``model`` (taking ``takes`` input) on task ``task``
    (giving ``gives``), or None when the modalities agree."""
    if takes == gives:
        return None
    return f"model '{model}' takes {takes} input but task '{task}' is {gives}"


def _to(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.to(device, non_blocking=True)


@register
class Image(Modality):
    """uint8 ``[N, C, H, W]``, normalised (and augmented when training) on the device."""

    name = "image"
    title = "images (uint8 [N, C, H, W], normalised per batch)"

    def example_info(self, num_classes: int) -> TaskInfo:
        return TaskInfo(name="image", modality="image", num_classes=num_classes, in_channels=3, image_size=32)

    def prepare(self, x, info, device, train, generator=None, channels_last=False):
        x = prepare_images(_to(x, device), info, train=train, generator=generator)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    def prepare_model(self, model, channels_last):
        if channels_last:
            model.to(memory_format=torch.channels_last)


@register
class Text(Modality):
    """``{"input_ids", "attention_mask"}`` int64 ``[N, L]``, moved to the device as they are."""

    name = "text"
    title = "text (token ids and attention mask, int64 [N, L])"

    def example_info(self, num_classes: int) -> TaskInfo:
        return TaskInfo(name="text", modality="text", num_classes=num_classes, max_length=64, vocab_size=30522)

    def prepare(self, x, info, device, train, generator=None, channels_last=False):
        return {k: _to(v, device) for k, v in x.items()}


class _ImageText(Modality):
    """``{"image": uint8 [N, C, H, W], "input_ids", "attention_mask": int64 [N, L]}``: the image
    prepared as :class:`Image` prepares it, the tokens moved as they are."""

    augment = True

    def example_info(self, num_classes: int) -> TaskInfo:
        return TaskInfo(name=self.name, modality=self.name, num_classes=num_classes, in_channels=3, image_size=64,
                        max_length=16, vocab_size=30522)

    def prepare(self, x, info, device, train, generator=None, channels_last=False):
        out = {k: _to(v, device) for k, v in x.items() if k != "image"}
        img = prepare_images(_to(x["image"], device), info, train=train and self.augment, generator=generator)
        out["image"] = img.contiguous(memory_format=torch.channels_last) if channels_last else img
        return out

    def prepare_model(self, model, channels_last):
        if channels_last and hasattr(model, "image"):
            model.image.to(memory_format=torch.channels_last)


@register
class ImageQuestion(_ImageText):
    """An image and a question about it (visual question answering); the output is answer logits."""

    name = "image_question"
    title = "an image and a question (uint8 image [N, C, H, W] + token ids and mask [N, L])"


@register
class ImageCaption(_ImageText):
    """An image and its caption (image-text retrieval). The model's output for a batch is the
    similarity logits ``[N, N]`` of every image (rows) with every caption (columns) of the batch;
    ``y`` is each example's caption id, so every pair with the same caption is a match (templated
    captions repeat). The loss is the symmetric contrastive loss (image->text and text->image
    cross-entropy against the matches, spread evenly); a hit is an image whose best caption in
    the batch matches. No augmentation: captions name positions.

    Evaluation (:meth:`evaluate`) embeds the whole split (the model's ``embed(x) -> (image,
    text)``, L2-normalised) and ranks: ``recall1`` / ``recall5`` image->text (the image's caption
    among the split's distinct captions' top 1 / 5), ``recall1_t2i`` / ``recall5_t2i``
    text->image (an image of the caption among a distinct caption's top 1 / 5 images). ``acc`` is
    ``recall1`` (what the loop's best-validation epoch, summaries and reports read)."""

    name = "image_caption"
    title = "an image and a caption (uint8 image [N, C, H, W] + token ids and mask [N, L])"
    score = "image→text recall@1"
    augment = False
    metric_names = ("loss", "acc", "recall1", "recall5", "recall1_t2i", "recall5_t2i")

    def loss(self, logits, y, label_smoothing=0.0):
        match = (y[:, None] == y[None, :]).to(logits.dtype)
        target = match / match.sum(1, keepdim=True)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))

    def hits(self, logits, y):
        return (y[logits.detach().argmax(1)] == y).sum()

    def evaluate(self, role, data):
        model, info, dev = role.model, role.task.info, role.device
        imgs, txts, ys, loss_sum, n = [], [], [], 0.0, 0
        for x, y in iter_eval(data, role.recipe.eval_batch_size):
            x = self.prepare(x, info, dev, train=False, channels_last=role.channels_last)
            y = y.to(dev)
            with role.autocast():
                a, b = model.embed(x)
                logits = model.similarity(a, b)
            loss_sum += float(self.loss(logits.float(), y)) * len(y)
            n += len(y)
            imgs.append(a.float())
            txts.append(b.float())
            ys.append(y)
        r = recall_at_k(torch.cat(imgs), torch.cat(txts), torch.cat(ys), (1, 5))
        return {"loss": loss_sum / max(1, n), "acc": r["recall1"], **r}


def recall_at_k(img: torch.Tensor, txt: torch.Tensor, y: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """Retrieval recall over a split: ``img`` / ``txt`` ``[N, D]`` embeddings of N image-caption
    pairs, ``y`` each pair's caption id (equal ids: the same caption text). The gallery of
    captions is the split's distinct captions (one embedding each, its first occurrence).

    ``recall{k}`` (image->text): the fraction of images whose own caption is among the k captions
    most similar to it. ``recall{k}_t2i`` (text->image): the fraction of distinct captions with
    an image of that caption among the k images most similar to it. Cosine similarity."""
    img, txt = F.normalize(img, dim=1), F.normalize(txt, dim=1)
    ids, first = _first_of_each(y)
    sim = img @ txt[first].t()                        # [N images, C captions]
    out = {}
    for k in ks:
        top = sim.topk(min(k, sim.shape[1]), dim=1).indices
        out[f"recall{k}"] = float((ids[top] == y[:, None]).any(1).float().mean()) if len(y) else 0.0
        top_i = sim.t().topk(min(k, sim.shape[0]), dim=1).indices  # [C, k] images
        out[f"recall{k}_t2i"] = float((y[top_i] == ids[:, None]).any(1).float().mean()) if len(ids) else 0.0
    return out


def _first_of_each(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the distinct values of ``y``, sorted; the index of each one's first occurrence)."""
    ids, inverse = torch.unique(y, sorted=True, return_inverse=True)
    pos = torch.arange(len(y), device=y.device)
    first = torch.full((len(ids),), len(y), dtype=torch.long, device=y.device).scatter_reduce(
        0, inverse, pos, reduce="amin")
    return ids, first
