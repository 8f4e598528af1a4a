"""Run folders that never lose a run and never keep half-written files.

* :func:`prepare_run_dir`: ``mergenet train`` refuses to write into a folder that holds a run
  unless ``--resume`` (continue it) or ``--overwrite`` (replace it); ``--resume`` needs a
  checkpoint; a file, unwritable or read-only ``--out`` is refused before any training.
* :func:`write_atomic` / :func:`save_checkpoint`: write to a unique temporary file in the same
  folder, ``fsync``, then rename over the target; on any failure the temporary file is removed
  and the error is one :class:`~mergenet_core.errors.MergenetError` line naming the file
  (disk full, read-only, permission).
* :func:`load_checkpoint`: ``torch.load(weights_only=True)``; a corrupt, truncated, foreign or
  malicious file is one line naming the file and the problem, never a traceback (and never
  the advice to retry with ``weights_only=False``).
"""
from __future__ import annotations

import errno
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from ..errors import MergenetError, short
from . import BUNDLES, CONFIG, FINAL, METRICS, PLACEMENT

CHECKPOINT = "checkpoint.pt"
#: what a run folder holds (engine outputs, and the Ray Train run of ``--ray``)
RUN_FILES = ("checkpoint.pt", "best.pt", METRICS, FINAL, CONFIG, PLACEMENT, BUNDLES, "ray", "pids")
RAY_RUN = ("ray", "pair")  # run_pair_on_ray's default storage: OUT/ray/pair/checkpoint_*/pair.pt
BUNDLE_KEYS = ("epoch", "step", "roles", "method", "history")


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return short(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__, 100)


# --------------------------------------------------------------------------- writing


class _RecordingWriter:
    """A file wrapper that remembers the OSError of a failed write (``torch.save`` turns it
    into an opaque ``RuntimeError: unexpected pos``)."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def _atomic(path: Path, write: Callable[[object], None], what: str) -> None:
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as raw:
            w = _RecordingWriter(raw)
            try:
                write(w)
                raw.flush()
                os.fsync(raw.fileno())
            except Exception as e:  # noqa: BLE001
                raise (w.error or e) from None
        os.replace(tmp, path)
        tmp = None
    except (OSError, RuntimeError) as e:
        raise MergenetError(f"{path}: cannot write {what}: {_reason(e)}") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def write_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically (a reader sees the old or the new file)."""
    _atomic(Path(path), lambda f: f.write(text.encode()), "file")


def save_checkpoint(path: str | Path, state: dict) -> None:
    import torch

    _atomic(Path(path), lambda f: torch.save(state, f), "checkpoint")


# --------------------------------------------------------------------------- reading


def load_checkpoint(path: str | Path) -> dict:
    """A pair bundle, loaded with ``weights_only=True``; every failure is one line."""
    import torch

    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise MergenetError(f"{path}: no such checkpoint") from None
    except pickle.UnpicklingError as e:
        m = re.search(r"GLOBAL (\S+)", str(e))
        if m:  # weights_only refused a callable: never retried unrestricted
            raise MergenetError(f"{path}: refused: the checkpoint references {short(m.group(1), 60)}; a checkpoint "
                                "may hold only tensors and plain containers") from None
        raise MergenetError(f"{path}: not a readable checkpoint (corrupt: not a torch zip archive)") from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, AttributeError, ImportError) as e:
        kind = "truncated or corrupt" if isinstance(e, (RuntimeError, EOFError)) else "unreadable"
        raise MergenetError(f"{path}: not a readable checkpoint ({kind}: {_reason(e)})") from None
    missing = [k for k in BUNDLE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise MergenetError(f"{path}: not a mergenet checkpoint (no {', '.join(missing)})")
    return state


def restore_into(path: str | Path, load: Callable[[dict], None], state: dict) -> None:
    """Apply a loaded bundle (``load(state)``); a bundle of another config is one line."""
    try:
        load(state)
    except (KeyError, RuntimeError, ValueError, TypeError, IndexError, AttributeError) as e:
        raise MergenetError(f"{path}: checkpoint does not match this config ({type(e).__name__}: "
                            f"{_reason(e)})") from None


# --------------------------------------------------------------------------- run folders


def ray_checkpoints(out: Path) -> list[Path]:
    run = out.joinpath(*RAY_RUN)
    return sorted(run.glob("checkpoint_*/pair.pt")) if run.is_dir() else []


def holds_run(out: Path) -> bool:
    return out.is_dir() and any((out / n).exists() for n in RUN_FILES)


def prepare_run_dir(out: str | Path, resume: bool = False, overwrite: bool = False, ray: bool = False) -> Path:
    """Check (and create) ``mergenet train``'s output folder before anything is trained."""
    out = Path(out)
    flag = "--out"
    if resume and overwrite:
        raise MergenetError("--resume and --overwrite exclude each other")
    for p in [out, *out.parents]:
        if p.exists() and not p.is_dir():
            raise MergenetError(f"{flag} {out}: {p} is a file, not a folder")
        if p.exists():
            break
    if resume:
        found = ray_checkpoints(out) if ray else [out / CHECKPOINT] if (out / CHECKPOINT).is_file() else []
        if not found:
            where = out.joinpath(*RAY_RUN) if ray else out / CHECKPOINT
            raise MergenetError(f"--resume: no checkpoint to resume from at {where}"
                                + ("" if out.exists() else " (the folder does not exist)"))
    elif holds_run(out):
        if not overwrite:
            raise MergenetError(f"{flag} {out}: holds a run already; pass --resume to continue it or "
                                "--overwrite to replace it")
        clear_run(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        reason = "read-only file system" if e.errno == errno.EROFS else _reason(e)
        raise MergenetError(f"{flag} {out}: cannot write there: {reason}") from None
    return out


def clear_run(out: Path) -> None:
    """Remove a run's outputs (``--overwrite``); other files in the folder stay."""
    try:
        for n in RUN_FILES:
            p = out / n
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
    except OSError as e:
        raise MergenetError(f"--overwrite {out}: cannot remove the old run: {_reason(e)}") from None
