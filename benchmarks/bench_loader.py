"""Does a bring-your-own image folder's loader keep up with its pair's step? Loader samples/s
against training samples/s, by image size and DataLoader worker count, on this machine.

    python benchmarks/bench_loader.py [--quick] [--sizes 32 64 128 224] [--workers 0 1 2] [--out docs/BENCHMARKS.md]

For each image size S an image folder is written once (Fashion-MNIST images, 10 classes,
stored as JPEG at 8/7 S, as ImageNet's 256 px files are cropped to 224), then measured in one run:

1. the loader: ``image_folder`` with ``in_memory: false`` (decode, resize, centre-crop per
   image), ``BatchStream`` batches of ``--batch`` with 0, 1, 2 ... ``workers``; samples/s over
   ``--batches`` batches after a warm-up batch (workers started and the first batch read);
2. the pair's step, for two pairs: torchvision's ResNet-18 -> MobileNetV2 (the paper's shapes) and
   the CPU study's ResNet-18 width 16 -> MobileNetV2 x0.35: forward and backward of both models
   (both train, an ``alone``/KD-like step) and an SGD step on one batch at size S;
   samples/s over ``--steps`` steps after a warm-up step. Batches come from memory: the step's own
   cost, what the loader has to keep up with.

The loader and the step are measured one after the other; in a run they share the machine's
cores, so a loader that needs all cores to keep up is already the bound. Writes
``benchmarks/results/bench_loader.json`` and the ``bench_loader`` section of ``--out``. Nothing
here is a test assertion.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402  (sets thread/env defaults)

from bench_pair import HEADER  # noqa: E402

SECTION = "bench_loader"
RESULTS = bu.ROOT / "benchmarks" / "results" / "bench_loader.json"


def write_folder(root: Path, size: int, per_class: int) -> Path:
    """``root/train/CLASS/*.jpg``: Fashion-MNIST images stored at 8/7 of ``size`` (RGB JPEG)."""
    import numpy as np
    from PIL import Image

    from mergenet_core.data.images import FMNIST_CLASSES, FMNIST_ROOT, read_idx

    x = read_idx(Path(FMNIST_ROOT) / "train-images-idx3-ubyte.gz", 0x803)
    y = read_idx(Path(FMNIST_ROOT) / "train-labels-idx1-ubyte.gz", 0x801)
    stored = round(size * 8 / 7)
    for c, name in enumerate(FMNIST_CLASSES):
        folder = root / "train" / name.replace("/", "-")
        folder.mkdir(parents=True, exist_ok=True)
        for i in np.nonzero(y == c)[0][:per_class]:
            Image.fromarray(x[i]).convert("RGB").resize((stored, stored), Image.BILINEAR).save(
                folder / f"{i:05d}.jpg", quality=90)
    return root


def loader_rate(root: Path, size: int, workers: int, batch: int, batches: int) -> float:
    """Samples/s of streamed batches (after one warm-up batch)."""
    from mergenet_core.data import BatchStream, build_task

    task = build_task("image_folder", {"root": str(root), "image_size": size, "in_memory": False,
                                       "workers": workers, "mean": [0.5] * 3, "std": [0.25] * 3,
                                       "val_fraction": 0.05}, seed=0)
    stream = BatchStream(task.train, batch, seed=0)
    stream.next()
    t0 = time.perf_counter()
    for _ in range(batches):
        stream.next()
    dt = time.perf_counter() - t0
    stream.close()
    return batches * batch / dt


#: the pairs whose step the loader must keep up with: (label, [(model, options)] source and target)
PAIRS = {
    "full": ("torchvision ResNet-18 → MobileNetV2", [("torchvision", {"name": "resnet18"}),
                                                     ("torchvision", {"name": "mobilenet_v2"})]),
    "small": ("ResNet-18 width 16 → MobileNetV2 ×0.35 (the CPU study's pair)",
              [("resnet18", {"width": 16}), ("mobilenetv2", {"width_mult": 0.35})]),
}


def step_rate(pair: str, size: int, batch: int, steps: int) -> float:
    """Samples/s of one training step of a pair's source and target (both train)."""
    import torch

    from mergenet_core.data import TaskInfo
    from mergenet_core.models import build_model

    info = TaskInfo(name="folder", modality="image", num_classes=10, in_channels=3, image_size=size)
    models = [build_model(name, opts, info) for name, opts in PAIRS[pair][1]]
    opts = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in models]
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))

    def step():
        for m, o in zip(models, opts):
            o.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            o.step()

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - t0)


def render(rec: dict) -> str:
    m = rec["machine"]
    lines = [
        "## Bring-your-own image folder: loader vs step (`benchmarks/bench_loader.py`)", "",
        f"Machine: {m['nproc']} cores ({m['cpu']}), {m['ram_gib']:.0f} GiB, torch {m['torch']}; {m['date']}; "
        f"git {m['git']}. Command: `{m['command']}`. Load average (1 min) before / after: "
        f"{rec['load_before'][0]:.2f} / {rec['load_after'][0]:.2f}.", "",
        f"`image_folder` streamed from JPEG files stored at 8/7 of the image size (decode, resize, centre crop), "
        f"batches of {rec['batch']}; a step is both models of a pair training on one batch (forward, backward, "
        "SGD) on the CPU: *full* = " + PAIRS["full"][0] + ", *small* = " + PAIRS["small"][0] + ". Samples per "
        "second; in brackets loader / small step (< 1: the loader is the bound).", "",
        "| image size | step, full | step, small | " + " | ".join(f"loader, {w} workers" for w in rec["workers"])
        + " | bound (small pair) |",
        "|---|---|---|" + "---|" * len(rec["workers"]) + "---|",
    ]
    for row in rec["rows"]:
        small = row["step"]["small"]
        cells = [f"{row['loader'][str(w)]:.0f} (×{row['loader'][str(w)] / small:.1f})" for w in rec["workers"]]
        best = max(rec["workers"], key=lambda w: row["loader"][str(w)])
        bound = "loader" if row["loader"][str(best)] < small else "step"
        lines.append(f"| {row['size']} px | {row['step']['full']:.0f} | {small:.0f} | " + " | ".join(cells)
                     + f" | {bound} |")
    lines += ["", rec["finding"]]
    return "\n".join(lines)


def finding(rows: list[dict], workers: list[int]) -> str:
    """Where the loader becomes the bound on this machine, in words, from the rows."""
    out = []
    for row in rows:
        keeping = [w for w in workers if row["loader"][str(w)] >= row["step"]["small"]]
        out.append(f"{row['size']} px: " + (f"keeps up from {min(keeping)} worker(s)" if keeping
                                            else "the loader is the bound at every worker count"))
    best = "; ".join(f"{row['size']} px {max(row['loader'].values()):.0f}" for row in rows)
    return ("On this machine, against the small pair's step: " + "; ".join(out) + ". The loader's workers and the "
            "step share the same cores: a loader that keeps up only with every core decoding slows the step it "
            f"feeds. The loader's best rate here (samples/s: {best}) is the step rate above which a faster "
            "device (a GPU) would wait for this machine's decoding: more workers (more cores) or data decoded "
            "once into memory (in_memory) then.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128, 224])
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="sizes 32 and 64, 4 batches, 1 step")
    ap.add_argument("--out", default=str(bu.ROOT / "docs" / "BENCHMARKS.md"))
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.batches, args.steps = [32, 64], 4, 1
    rec = {"machine": bu.machine_record(), "load_before": bu.loadavg(), "batch": args.batch,
           "workers": args.workers, "rows": []}
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        for size in args.sizes:
            root = write_folder(Path(tmp) / f"s{size}", size, per_class=max(40, args.batch * (args.batches + 2) // 10))
            row = {"size": size, "step": {p: step_rate(p, size, args.batch, args.steps) for p in PAIRS},
                   "loader": {str(w): loader_rate(root, size, w, args.batch, args.batches) for w in args.workers}}
            print(json.dumps(row), flush=True)
            rec["rows"].append(row)
    rec["load_after"] = bu.loadavg()
    rec["finding"] = finding(rec["rows"], args.workers)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(rec, indent=2))
    bu.write_section(args.out, SECTION, render(rec), HEADER)
    print(render(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
