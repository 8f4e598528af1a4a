"""``mergenet report GRID_OR_EXPERIMENT``: compare pairs across methods and seeds.

Reads the trials (MLflow child runs) of a grid's latest submission, writes a Parquet table of
every trial's final metrics, a Markdown table pair × method (mean ± std over seeds, gain over
``alone``), and a heatmap of MergeNet's gain (sources × targets); logs all three to the
submission's parent run.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from mergenet_core.errors import MergenetError
from orchestrator import tracking

METRICS = ("target/final_test_acc", "target/test_acc_at_best_val")


def resolve_experiment(c, what: str) -> tuple[str, str, str | None]:
    """(experiment id, name, parent run id or None) from a grid YAML, a grid folder (local or a
    bucket URI) or a name."""
    from orchestrator.storage import Location

    parent = None
    name = what
    p = Path(what)
    folder = Location.parse(what) if "://" in what or p.is_dir() else None
    if folder is not None and (folder / "mergenet_grid.json").exists():
        import json

        name = json.loads((folder / "mergenet_grid.json").read_text())["grid"]
        f = folder / "mlflow_parent_run_id"
        parent = f.read_text().strip() if f.exists() else None
    elif p.is_file():
        from orchestrator.grid import load_grid

        name = load_grid(p, deep=False).grid
    exp = c.get_experiment_by_name(name)
    if exp is None:
        raise MergenetError(f"report: no MLflow experiment '{name}' at {c.tracking_uri}")
    if parent is None:
        runs = c.search_runs([exp.experiment_id], "tags.`mergenet.kind` = 'submission'",
                             order_by=["attributes.start_time DESC"], max_results=1)
        parent = runs[0].info.run_id if runs else None
    return exp.experiment_id, name, parent


def trials_frame(c, experiment_id: str, parent: str | None) -> pd.DataFrame:
    flt = f"tags.`{tracking.TRIAL_TAG}` = '1'"
    if parent:
        flt += f" and tags.`mlflow.parentRunId` = '{parent}'"
    runs = c.search_runs([experiment_id], flt, max_results=10000)
    rows = []
    for r in runs:
        t, m = r.data.tags, r.data.metrics
        row = {"run_id": r.info.run_id, "status": r.info.status, "pair": t.get("mergenet.pair"),
               "method": t.get("mergenet.method"), "seed": int(t.get("mergenet.seed", -1)),
               "source": t.get("mergenet.source"), "target": t.get("mergenet.target")}
        row.update({k: v for k, v in r.data.params.items() if k.startswith("hp.")})
        row.update(m)
        rows.append(row)
    if not rows:
        raise MergenetError("report: the grid has no trial runs yet")
    return pd.DataFrame(rows).sort_values(["pair", "method", "seed"]).reset_index(drop=True)


def _fmt(mean: float, std: float) -> str:
    return f"{100 * mean:.2f} ± {100 * (0 if pd.isna(std) else std):.2f}"


def markdown_table(df: pd.DataFrame, metric: str) -> str:
    done = df[df["status"] == "FINISHED"].dropna(subset=[metric])
    methods = sorted(done["method"].unique(), key=lambda m: (m != "alone", m))
    lines = [f"| pair (source → target) | " + " | ".join(methods) + " | " +
             " | ".join(f"{m} − alone" for m in methods if m != "alone") + " |",
             "|---" * (1 + len(methods) + sum(m != "alone" for m in methods)) + "|"]
    for pair, g in done.groupby("pair", sort=True):
        stats = {m: g[g["method"] == m][metric].agg(["mean", "std", "count"]) for m in methods}
        label = f"{pair} ({g['source'].dropna().iloc[0] if g['source'].notna().any() else '-'} → {g['target'].iloc[0]})"
        cells = [(_fmt(s["mean"], s["std"]) + f" (n={int(s['count'])})") if s["count"] else "–" for s in stats.values()]
        base = stats.get("alone")
        gains = []
        for m in methods:
            if m == "alone":
                continue
            s = stats[m]
            gains.append(f"{100 * (s['mean'] - base['mean']):+.2f}" if base is not None and base["count"] and s["count"]
                         else "–")
        lines.append(f"| {label} | " + " | ".join(cells) + " | " + " | ".join(gains) + " |")
    return "\n".join(lines)


def gain_heatmap(df: pd.DataFrame, path: Path, metric: str = METRICS[0]) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if metric not in df:
        return None
    done = df[df["status"] == "FINISHED"].dropna(subset=[metric])
    mean = done.groupby(["pair", "method"])[metric].mean().unstack()
    if "alone" not in mean or "mergenet" not in mean:
        return None
    gain = (mean["mergenet"] - mean["alone"]).dropna() * 100
    labels = done.drop_duplicates("pair").set_index("pair")
    src = done[done["method"] == "mergenet"].drop_duplicates("pair").set_index("pair")["source"]
    table = pd.DataFrame({"source": src.reindex(gain.index), "target": labels["target"].reindex(gain.index),
                          "gain": gain}).pivot_table(index="source", columns="target", values="gain", aggfunc="mean")
    fig, ax = plt.subplots(figsize=(1.6 + 1.6 * table.shape[1], 1.2 + 0.8 * table.shape[0]))
    lim = max(1e-9, float(abs(table.values[~pd.isna(table.values)]).max()) if table.notna().any().any() else 1.0)
    im = ax.imshow(table.values.astype(float), cmap="RdBu", vmin=-lim, vmax=lim)
    ax.set_xticks(range(table.shape[1]), table.columns, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(table.shape[0]), table.index, fontsize=8)
    for i in range(table.shape[0]):
        for j in range(table.shape[1]):
            v = table.values[i, j]
            if not pd.isna(v):
                ax.text(j, i, f"{v:+.2f}", ha="center", va="center", fontsize=8)
    ax.set_xlabel("target (model@task)")
    ax.set_ylabel("source (model@task)")
    ax.set_title("MergeNet gain over alone\n(target final test acc, points)", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_report(what: str, out_dir: str | Path | None = None) -> dict:
    c = tracking.existing_client()  # reading: never creates an empty mlflow.db
    experiment_id, name, parent = resolve_experiment(c, what)
    df = trials_frame(c, experiment_id, parent)
    out = Path(out_dir or Path("runs") / "reports" / name)
    out.mkdir(parents=True, exist_ok=True)
    parquet = out / "trials.parquet"
    df.to_parquet(parquet, index=False)
    parts = [f"# {name}: pair × method\n",
             f"MLflow experiment `{name}` ({experiment_id}), submission run `{parent}`; "
             f"{(df['status'] == 'FINISHED').sum()} finished / {len(df)} trials. "
             "Accuracy in %, mean ± std over seeds (n = seeds).\n"]
    for metric, title in ((METRICS[0], "Target test accuracy at the final epoch"),
                          (METRICS[1], "Target test accuracy at the best-validation epoch")):
        if metric in df:
            parts += [f"\n## {title}\n", markdown_table(df, metric), ""]
    md = out / "report.md"
    md.write_text("\n".join(parts) + "\n")
    heat = gain_heatmap(df, out / "mergenet_gain.png")
    if parent:
        for f in (parquet, md, heat):
            if f is not None:
                c.log_artifact(parent, str(f), artifact_path="report")
    return {"markdown": md, "parquet": parquet, "heatmap": heat, "text": md.read_text()}
