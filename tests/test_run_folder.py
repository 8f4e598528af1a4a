"""Nothing lost: ``mergenet train`` never overwrites a run without being told, ``--resume``
needs a checkpoint, and every failed write or bad checkpoint ends with exit 2 and one line
naming the file — on real files, a real full disk and a real read-only file system (tmpfs
mounts; skipped where this process may not mount)."""
from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest
import torch

from helpers import tiny_pair, write_yaml
from mergenet_core.training.engine import CHECKPOINT, FINAL, METRICS
from orchestrator.cli import main


def _train(cfg: Path, out: Path, *flags: str) -> int:
    return main(["train", str(cfg), "--out", str(out), "--quiet", *flags])


def _one_line(capsys, *needles: str) -> str:
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    for n in needles:
        assert n in err[0], (n, err[0])
    return err[0]


@pytest.fixture
def cfg(tmp_path) -> Path:
    return write_yaml(tmp_path / "pair.yaml", tiny_pair("alone", source_model=None))


@pytest.fixture
def finished(tmp_path, cfg, capsys) -> Path:
    out = tmp_path / "run"
    assert _train(cfg, out) == 0
    capsys.readouterr()
    return out


def _snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def _tmp_files(out: Path) -> list[str]:
    return [p.name for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_train_refuses_a_folder_holding_a_run(finished, cfg, capsys):
    before = _snapshot(finished)
    assert _train(cfg, finished) == 2
    _one_line(capsys, str(finished), "holds a run already", "--resume", "--overwrite")
    assert _snapshot(finished) == before  # nothing wiped, no stale final.json


def test_overwrite_replaces_the_run(finished, cfg, capsys):
    (finished / "notes.txt").write_text("mine")
    assert _train(cfg, finished, "--overwrite") == 0
    assert (finished / CHECKPOINT).is_file() and len((finished / CHECKPOINT).read_bytes()) > 0
    assert json.loads((finished / FINAL).read_text())["epochs"] == 1
    assert (finished / "notes.txt").read_text() == "mine"  # only the run's own files are replaced


def test_resume_of_a_finished_run_keeps_it(finished, cfg, capsys):
    before = json.loads((finished / FINAL).read_text())
    assert _train(cfg, finished, "--resume") == 0
    assert json.loads((finished / FINAL).read_text())["target/final_test_acc"] == before["target/final_test_acc"]


@pytest.mark.parametrize("ray", [False, True], ids=["engine", "ray"])
def test_resume_without_checkpoint_is_an_error(tmp_path, cfg, capsys, ray):
    out = tmp_path / "never-ran"
    assert _train(cfg, out, "--resume", *(["--ray"] if ray else [])) == 2
    _one_line(capsys, "--resume: no checkpoint", str(out), "does not exist")
    assert not out.exists()
    out.mkdir()
    (out / METRICS).write_text("")
    assert _train(cfg, out, "--resume") == 2
    _one_line(capsys, "--resume: no checkpoint", str(out / CHECKPOINT))


def test_file_as_out_is_refused(tmp_path, cfg, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    assert _train(cfg, f) == 2
    _one_line(capsys, str(f), "is a file, not a folder")
    assert _train(cfg, f / "sub") == 2
    _one_line(capsys, str(f), "is a file, not a folder")
    assert f.read_text() == "x"


# --------------------------------------------------------------------------- real file systems


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a small real tmpfs (root only); yields a function that (re)mounts it."""
    mnt = tmp_path / f"mnt-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    mounted = []

    def mount(size: str = "1m", ro: bool = False) -> Path:
        opts = f"size={size}" + (",ro" if ro else "")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()[:100]}")
        mounted.append(mnt)
        return mnt

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    for m in mounted:
        subprocess.run(["umount", "-l", str(m)], capture_output=True)


def test_read_only_out_is_refused_before_training(tmpfs, cfg, capsys):
    mnt = tmpfs(ro=True)
    assert _train(cfg, mnt / "run") == 2
    _one_line(capsys, str(mnt / "run"), "cannot write there", "ead-only file system")


def test_disk_full_leaves_no_temporary_file(tmpfs, cfg, capsys):
    """A real full disk while the checkpoint is written: one line naming the checkpoint, and no
    temporary file survives. The disk fills right after the metrics of epoch 1 are written."""
    mnt = tmpfs(size="48k")
    out = mnt / "run"
    # leave room for config.json and metrics.jsonl (~5 KiB) but not for the checkpoint (~60 KiB)
    out.mkdir()
    free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
    (mnt / "filler").write_bytes(b"\0" * (free - 16 * 1024))
    assert _train(cfg, out) == 2
    _one_line(capsys, str(out / CHECKPOINT), "cannot write checkpoint", "No space left on device")
    assert _tmp_files(mnt) == []
    assert not (out / CHECKPOINT).exists()


# --------------------------------------------------------------------------- bad checkpoints


class _Evil:
    def __reduce__(self):
        return os.system, ("echo pwned > /dev/null",)


def _corrupt(ck: Path, kind: str, tmp_path: Path) -> None:
    data = ck.read_bytes()
    if kind == "truncated":
        ck.write_bytes(data[: len(data) // 2])
    elif kind == "corrupt":
        ck.write_bytes(b"garbage" * 100)
    elif kind == "empty":
        ck.write_bytes(b"")
    elif kind == "malicious":
        torch.save({"epoch": _Evil()}, ck)
    elif kind == "not-a-bundle":
        torch.save({"weights": torch.zeros(2)}, ck)
    elif kind == "mismatched":  # a checkpoint of another pair: a wider CNN
        other = write_yaml(tmp_path / "other.yaml", tiny_pair(
            "alone", source_model=None, target_model={"name": "cnn", "options": {"channels": [4], "hidden": 0}}))
        assert main(["train", str(other), "--out", str(tmp_path / "other"), "--quiet"]) == 0
        ck.write_bytes((tmp_path / "other" / CHECKPOINT).read_bytes())


@pytest.mark.parametrize("kind, needle", [
    ("truncated", "not a readable checkpoint"),
    ("corrupt", "not a readable checkpoint"),
    ("empty", "not a readable checkpoint"),
    ("malicious", "refused"),
    ("not-a-bundle", "not a mergenet checkpoint"),
    ("mismatched", "does not match this config"),
])
def test_bad_checkpoint_on_resume_is_one_line(finished, cfg, capsys, tmp_path, kind, needle):
    ck = finished / CHECKPOINT
    _corrupt(ck, kind, tmp_path)
    capsys.readouterr()
    assert _train(cfg, finished, "--resume") == 2
    line = _one_line(capsys, str(ck), needle)
    assert "weights_only=False" not in line and "Traceback" not in line and len(line) < 400
