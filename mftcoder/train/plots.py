"""curves.png: per-task training and validation loss, and the task weights, over steps (from metrics.jsonl)."""

from __future__ import annotations

import json
from pathlib import Path

CURVES = "curves.png"


def series(rows: list[dict], split: str, prefix: str) -> dict[str, tuple[list[int], list[float]]]:
    """{task: (steps, values)} of the `prefix/<task>` metrics of one split; a task absent at a step is skipped."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for row in rows:
        if row["split"] != split:
            continue
        for key, value in row.items():
            if key.startswith(prefix) and value is not None:
                steps, values = out.setdefault(key[len(prefix):], ([], []))
                steps.append(row["step"])
                values.append(value)
    return out


def write_curves(output_dir: Path) -> Path | None:
    """Draw output_dir/curves.png; None when matplotlib (the `plot` extra) is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    panels = [("training loss", series(rows, "train", "loss/")), ("validation loss", series(rows, "eval", "loss/")),
              ("task weight (share)", series(rows, "train", "weight/"))]
    panels = [(title, data) for title, data in panels if data]
    figure, axes = plt.subplots(1, max(1, len(panels)), figsize=(5 * max(1, len(panels)), 3.6), squeeze=False)
    for axis, (title, data) in zip(axes[0], panels):
        for task, (steps, values) in sorted(data.items()):
            axis.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3, label=task)
        axis.set_title(title)
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
    if panels:
        axes[0][0].legend(fontsize="small")
    figure.tight_layout()
    path = output_dir / CURVES
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
