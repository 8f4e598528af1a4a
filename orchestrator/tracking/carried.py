"""Summary rows of settings whose MLflow records are not in this store.

``mergenet summary`` reads each setting's latest submission from MLflow. A study outlives one
machine's store (a new checkout, a cleaned working directory): a setting that this store never
ran keeps the rows and note that the summary wrote for it before, read back from that same
section of the Markdown file, marked as carried over -- never silently dropped, never recomputed
from numbers it cannot see. Comparisons against a ``control: shuffled_source`` arm that ran
before the shuffle became an entry permutation are marked uninformative (docs/METHOD.md,
"Controls": the former row/column shuffle was the real arm under a relabelled adapter).
"""
from __future__ import annotations

from pathlib import Path

FORMER_SHUFFLE = "uninformative: the former row/column shuffle (docs/METHOD.md, Controls)"


def _section_text(results_md: Path, title: str) -> str:
    from orchestrator.tracking.publish import section_name

    if not results_md.exists():
        return ""
    text, name = results_md.read_text(), section_name(title)
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in text or end not in text:
        return ""
    return text[text.index(start):text.index(end)]


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def carried_rows(label: str, results_md: str | Path | None, title: str,
                 shuffled_arms: set[str]) -> tuple[list[list[str]], list[str]] | None:
    """The rows and note the section ``title`` of ``results_md`` holds for the setting ``label``
    (its first cell), marked carried over; ``None`` when it holds none."""
    if not results_md:
        return None
    text = _section_text(Path(results_md), title)
    rows = [_cells(l) for l in text.splitlines() if l.startswith(f"| {label} |") and "not run yet" not in l]
    if not rows:
        return None
    for r in rows:
        arm = r[1].strip("`")
        if any(f"(`{s}`)" in r[3] for s in shuffled_arms) and FORMER_SHUFFLE not in r[3]:
            r[3] += f" — {FORMER_SHUFFLE}"
        if arm in shuffled_arms and "former" not in r[5]:
            r[5] += " (the former shuffle: uninformative)"
    notes = [l[2:] for l in text.splitlines() if l.startswith(f"- {label} ")]
    carried = (f"{label}: rows carried over from this summary's previous version — this MLflow store holds "
               "no run of the grid (its records lived in another store); `mergenet run` on the file refreshes them")
    return rows, [*(n for n in notes if "rows carried over" not in n), carried]
