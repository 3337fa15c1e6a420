"""Aggregate a demo run over seeds and report it: console table, JSON, CSV, Markdown and a PNG.

Normalised score of a row on a task = its accuracy ÷ the accuracy of that task's own branch
(fine-tuned alone) in the same seed. Averages are over tasks within a seed; ``mean ± std``
is over seeds (sample standard deviation, ``ddof=1``; 0 with a single seed).

Example:
    >>> summary = summarize({"tasks": ["a", "b"], "rows": ["branch", "m"],
    ...     "per_seed": [{"branch": {"a": 1.0, "b": 0.5}, "m": {"a": 0.5, "b": 0.5}}]})
    >>> summary["m"]["normalized"]["mean"], summary["m"]["average"]["mean"]
    (75.0, 50.0)
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from drm_lightning.demo.config import CONSOLIDATED_SUFFIX, REFERENCE_ROWS

TARGETS: tuple[tuple[str, str, str, float, bool], ...] = (
    ("drm_{d}", "ties", "{D} ≥ TIES + 1 point", 1.0, False),
    ("drm_{d}", "task_arithmetic", "{D} ≥ task arithmetic", 0.0, False),
    ("drm_{d}", "drm_{d}_norenorm", "{D} > {D} without renorm", 0.0, True),
)
"""The issue's quality targets: (row, compared row, text, margin in normalised points, strict),
for each direction ``{d}``. "DRM" is the library default, DRM-H; DRM-V is reported too."""

DIRECTIONS: tuple[tuple[str, str], ...] = (("h", "DRM-H"), ("v", "DRM-V"))
"""Row suffix and display name of each DRM direction, the library default first."""


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """``{"mean", "std", "n"}`` of ``values`` (sample std; 0 for one value).

    Example:
        >>> mean_std([1.0, 2.0, 3.0])
        {'mean': 2.0, 'std': 1.0, 'n': 3}
    """
    n = len(values)
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n}


def _normalized(scores: Mapping[str, Mapping[str, float]], row: str, tasks: Sequence[str]) -> float:
    branch = scores["branch"]
    return 100.0 * math.fsum(scores[row][t] / branch[t] for t in tasks) / len(tasks)


def summarize(data: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per row: per-task accuracy, average accuracy and normalised average, ``mean ± std`` in %.

    Args:
        data: ``{"tasks": [...], "rows": [...], "per_seed": [{row: {task: accuracy}}, ...]}``;
            every seed must have the ``branch`` row.
    """
    tasks: list[str] = list(data["tasks"])
    per_seed: list[Mapping[str, Mapping[str, float]]] = list(data["per_seed"])
    out: dict[str, dict[str, Any]] = {}
    for row in data["rows"]:
        out[row] = {
            "tasks": {t: mean_std([100.0 * s[row][t] for s in per_seed]) for t in tasks},
            "average": mean_std(
                [100.0 * math.fsum(s[row][t] for t in tasks) / len(tasks) for s in per_seed]
            ),
            "normalized": mean_std([_normalized(s, row, tasks) for s in per_seed]),
        }
    return out


def paired_differences(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per-seed differences of normalised averages for the quality targets (DRM-H and DRM-V).

    A difference is computed within each seed (same branches, same heads), then
    ``mean ± std`` over seeds; ``met`` compares the mean with the target's margin.
    """
    tasks = list(data["tasks"])
    per_seed = list(data["per_seed"])
    rows = set(data["rows"])
    out = []
    for row, other, text, margin, strict in TARGETS:
        for d, display in DIRECTIONS:
            a, b = row.format(d=d), other.format(d=d)
            if a not in rows or b not in rows:
                continue
            diffs = [_normalized(s, a, tasks) - _normalized(s, b, tasks) for s in per_seed]
            stats = mean_std(diffs)
            met = stats["mean"] > margin if strict else stats["mean"] >= margin
            out.append(
                {
                    "target": text.format(D=display),
                    "row": a,
                    "other": b,
                    "margin": margin,
                    **stats,
                    "met": met,
                }
            )
    return out


def run_to_dict(run: Any) -> dict[str, Any]:
    """JSON-ready record of a :class:`~drm_lightning.demo.runner.DemoRun`."""
    config = run.config
    consolidated = [f"{label}{CONSOLIDATED_SUFFIX}" for label in config.consolidate]
    rows = ["branch", "joint"] + [m.label for m in config.methods] + consolidated + ["base_heads"]
    display = {**REFERENCE_ROWS, **{k: v["display"] for k, v in run.methods.items()}}
    for label in config.consolidate:
        display[f"{label}{CONSOLIDATED_SUFFIX}"] = f"{display[label]}, consolidated"
    per_seed = [s.scores for s in run.seeds]
    data: dict[str, Any] = {
        "suite": (
            "digits views (scikit-learn load_digits), residual-MLP backbone pretrained by the demo"
        ),
        "tasks": run.tasks,
        "rows": rows,
        "display": display,
        "methods": run.methods,
        "config": config.to_dict(),
        "seeds": [s.seed for s in run.seeds],
        "per_seed": per_seed,
        "curves": {label: [s.curves[label] for s in run.seeds] for label in run.seeds[0].curves},
    }
    data["summary"] = summarize(data)
    data["targets"] = paired_differences(data)
    fit = [s.fit_seconds for s in run.seeds]
    callback = [math.fsum(s.callback_seconds.values()) for s in run.seeds]
    merge = [math.fsum(s.merge_seconds.values()) for s in run.seeds]
    data["timing"] = {
        "wall_seconds": run.wall_seconds,
        "pretrain_seconds": run.pretrain_seconds,
        "fit_seconds": fit,
        "callbacks_seconds": callback,
        "merge_arithmetic_seconds": merge,
        "callbacks_share_of_fit": [c / f for c, f in zip(callback, fit)],
        "one_callback_share_of_fit": [
            c / f / max(len(run.methods), 1) for c, f in zip(callback, fit)
        ],
    }
    data["environment"] = run.environment
    return data


def _cell(stats: Mapping[str, float], digits: int = 1) -> str:
    return f"{stats['mean']:.{digits}f}±{stats['std']:.{digits}f}"


def format_table(data: Mapping[str, Any], *, markdown: bool = False) -> str:
    """The result table: accuracy per task (%), average accuracy, normalised average.

    Example:
        >>> data = {"tasks": ["a"], "rows": ["branch"], "display": {"branch": "Branch alone"},
        ...         "summary": summarize({"tasks": ["a"], "rows": ["branch"],
        ...                               "per_seed": [{"branch": {"a": 0.5}}]})}
        >>> print(format_table(data))
        method        a         avg acc   normalised
        Branch alone  50.0±0.0  50.0±0.0  100.0±0.0
    """
    tasks = list(data["tasks"])
    header = ["method", *tasks, "avg acc", "normalised"]
    body = []
    for row in data["rows"]:
        stats = data["summary"][row]
        body.append(
            [
                data["display"].get(row, row),
                *[_cell(stats["tasks"][t]) for t in tasks],
                _cell(stats["average"]),
                _cell(stats["normalized"]),
            ]
        )
    if markdown:
        lines = [
            "| " + " | ".join(header) + " |",
            "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
        ]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *body]
    )


def format_targets(data: Mapping[str, Any]) -> str:
    """One line per quality target: paired difference ``mean ± std`` and whether it is met."""
    lines = []
    for t in data["targets"]:
        verdict = "met" if t["met"] else "NOT met"
        lines.append(
            f"{t['target']}: {data['display'][t['row']]} − {data['display'][t['other']]} = "
            f"{t['mean']:+.2f} ± {t['std']:.2f} normalised points over {t['n']} seeds → {verdict}"
        )
    return "\n".join(lines)


def write_report(run: Any, out_dir: str | Path) -> list[Path]:
    """Write ``results.json``, ``results.csv``, ``per_seed.csv`` and ``results.png`` to
    ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = run_to_dict(run)
    paths = [out / "results.json", out / "results.csv", out / "per_seed.csv", out / "results.png"]
    paths[0].write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    write_csv(data, paths[1])
    write_per_seed_csv(data, paths[2])
    plot(data, paths[3])
    return paths


def write_csv(data: Mapping[str, Any], path: Path) -> None:
    """One line per row: ``mean``/``std`` of each task, of the average and of the normalised
    average."""
    tasks = list(data["tasks"])
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["row", "display"]
            + [f"{t}_{s}" for t in tasks for s in ("mean", "std")]
            + ["avg_mean", "avg_std", "normalized_mean", "normalized_std", "n_seeds"]
        )
        for row in data["rows"]:
            stats = data["summary"][row]
            writer.writerow(
                [row, data["display"].get(row, row)]
                + [f"{stats['tasks'][t][s]:.4f}" for t in tasks for s in ("mean", "std")]
                + [f"{stats['average']['mean']:.4f}", f"{stats['average']['std']:.4f}"]
                + [f"{stats['normalized']['mean']:.4f}", f"{stats['normalized']['std']:.4f}"]
                + [stats["average"]["n"]]
            )


def write_per_seed_csv(data: Mapping[str, Any], path: Path) -> None:
    """Long format: ``seed, row, task, accuracy, normalized``."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["seed", "row", "task", "accuracy", "normalized"])
        for seed, scores in zip(data["seeds"], data["per_seed"]):
            for row in data["rows"]:
                for task in data["tasks"]:
                    value = scores[row][task]
                    writer.writerow(
                        [seed, row, task, f"{value:.6f}", f"{value / scores['branch'][task]:.6f}"]
                    )


def plot(data: Mapping[str, Any], path: Path) -> None:
    """Two panels: normalised average per row (mean ± std), and its curve over the fit per
    method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["rows"] if r != "branch"]
    names = [data["display"].get(r, r) for r in rows]
    means = [data["summary"][r]["normalized"]["mean"] for r in rows]
    stds = [data["summary"][r]["normalized"]["std"] for r in rows]
    colors = [
        "#4c72b0" if r.startswith("drm") else "#999999" if r in REFERENCE_ROWS else "#dd8452"
        for r in rows
    ]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [1.1, 1]})
    positions = list(range(len(rows)))[::-1]
    left.barh(positions, means, xerr=stds, color=colors, capsize=3)
    left.set_yticks(positions, names)
    left.axvline(100.0, color="black", linewidth=0.8, linestyle="--")
    low = min(m - s for m, s in zip(means, stds))
    left.set_xlim(max(0.0, low - 5.0), 102.0)
    left.set_xlabel("normalised accuracy (% of each task's own branch), mean ± std over seeds")
    for y, m, s in zip(positions, means, stds):
        left.text(m + s + 0.4, y, f"{m:.1f}", va="center", fontsize=8)
    for label, per_seed in data["curves"].items():
        steps = [step for step, _ in per_seed[0]]
        values = [
            math.fsum(c[i][1] for c in per_seed) / len(per_seed) * 100.0 for i in range(len(steps))
        ]
        style = ":" if "norenorm" in label else "-" if label.startswith("drm") else "--"
        if label.endswith("_consolidated"):
            style = "-."
        right.plot(
            steps, values, style, marker="o", markersize=3, label=data["display"].get(label, label)
        )
    right.set_xlabel("optimizer step of the fit (merge points)")
    right.set_ylabel("normalised accuracy of the merge (%)")
    right.legend(fontsize=7, loc="lower left")
    right.grid(alpha=0.3)
    n = len(data["seeds"])
    fig.suptitle(
        f"{len(data['tasks'])} tasks, {n} seed{'s' if n != 1 else ''}: "
        "merged model vs. each task's branch"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
