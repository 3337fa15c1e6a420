"""The rank DRM keeps on real fine-tuned deltas: MiniLM branches of ``minilm_suite.py``.

DRM keeps the directions of the stacked deltas with σ > ``rank_rtol``·σ₁ (default 1e-2). Where
that kept rank ``r`` is well below the size of the Gram DRM decomposes, a partial
eigendecomposition costs O(n·m·T·r) instead of O(n³) (issue 22). This measures ``r`` on real
full fine-tunes: the MiniLM encoders (6 layers, hidden 384, FFN 1536) that
``benchmarks/minilm_suite.py`` fine-tunes on its generated text tasks (read from its cache; run
that first), one seed, all cached tasks stacked. For every encoder matrix and both directions —
DRM-H stacks the T deltas side by side (n × T·m, Gram n × n), DRM-V on top of each other
(T·n × m, Gram m × m) — the singular values are computed in float64 and the kept rank counted
at ``rank_rtol`` 1e-2 (and 1e-3 for contrast). For comparison, the synthetic deltas of
``merge_core.py`` (low rank plus dense noise) keep the full rank.

    python benchmarks/minilm_suite.py            # fine-tunes and caches the branches
    python benchmarks/kept_rank.py               # table + benchmarks/results/kept_rank.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import minilm_suite  # noqa: E402

RTOLS = (1e-2, 1e-3)
CLASS = re.compile(r"encoder\.layer\.\d+\.(.+)\.weight$")


def cached_branches(cache: Path, seed: int) -> dict[str, Path]:
    """``{task: file}`` of the cached branches of ``seed`` (the newest file per task)."""
    found: dict[str, Path] = {}
    for path in sorted(cache.glob(f"*-seed{seed}-*.safetensors"), key=lambda p: p.stat().st_mtime):
        found[path.name.split(f"-seed{seed}-")[0]] = path
    return found


def kept_ranks(deltas: torch.Tensor) -> dict[str, Any]:
    """Kept ranks of the (T, n, m) deltas stacked both ways, float64 singular values."""
    t, n, m = deltas.shape
    out: dict[str, Any] = {"shape": [n, m], "branches": t}
    stacks = {
        "drm_h": deltas.permute(1, 0, 2).reshape(n, t * m),  # [Δ1 | … | ΔT], Gram n × n
        "drm_v": deltas.reshape(t * n, m),  # [Δ1; …; ΔT], Gram m × m
    }
    for key, stacked in stacks.items():
        sigma = torch.linalg.svdvals(stacked.double())
        out[key] = {
            "gram": n if key == "drm_h" else m,
            **{f"kept@{r:g}": int((sigma > r * sigma[0]).sum()) for r in RTOLS},
        }
    return out


def measure(cache: Path, seed: int) -> dict[str, Any]:
    """Per-matrix kept ranks of the cached branches of one seed."""
    from safetensors.torch import load_file

    files = cached_branches(cache, seed)
    if len(files) < 2:
        raise SystemExit(
            f"{cache}: {len(files)} cached branch(es) for seed {seed}; "
            "run benchmarks/minilm_suite.py first"
        )
    _, model = minilm_suite.load_pretrained()
    base = model.state_dict()
    branches = {task: load_file(str(path)) for task, path in files.items()}
    rows = {}
    for name, weight in base.items():
        if not CLASS.match(name) or weight.dim() != 2:
            continue
        deltas = torch.stack([b[name].double() - weight.double() for b in branches.values()])
        rows[name] = kept_ranks(deltas)
    return {"seed": seed, "tasks": sorted(files), "rtols": list(RTOLS), "matrices": rows}


def by_class(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Kept-rank range and mean fraction of the Gram per matrix class and direction."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for name, row in result["matrices"].items():
        groups[CLASS.match(name).group(1)].append(row)  # type: ignore[union-attr]
    out = {}
    for cls, rows in groups.items():
        entry: dict[str, Any] = {"count": len(rows), "shape": rows[0]["shape"]}
        for key in ("drm_h", "drm_v"):
            for rtol in RTOLS:
                kept = [r[key][f"kept@{rtol:g}"] for r in rows]
                gram = rows[0][key]["gram"]
                entry[f"{key}@{rtol:g}"] = {
                    "gram": gram,
                    "min": min(kept),
                    "max": max(kept),
                    "mean_fraction": sum(kept) / len(kept) / gram,
                }
        out[cls] = entry
    return out


def table(classes: dict[str, dict[str, Any]]) -> str:
    """Markdown table: one row per matrix class."""
    lines = [
        "| matrix | shape | count | DRM-H kept / Gram (1e-2) | DRM-V kept / Gram (1e-2) "
        "| DRM-H (1e-3) | DRM-V (1e-3) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for cls, e in classes.items():
        cells = []
        for rtol in RTOLS:
            for key in ("drm_h", "drm_v"):
                c = e[f"{key}@{rtol:g}"]
                cells.append(
                    f"{c['min']}–{c['max']} / {c['gram']} ({100 * c['mean_fraction']:.0f} %)"
                )
        shape = "×".join(str(s) for s in e["shape"])
        lines.append(f"| {cls} | {shape} | {e['count']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/drm_bench/minilm_suite"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "kept_rank.json",
    )
    args = parser.parse_args(argv)
    result = measure(args.cache_dir, args.seed)
    result["classes"] = by_class(result)
    print(f"seed {result['seed']}, {len(result['tasks'])} branches: {', '.join(result['tasks'])}")
    print(table(result["classes"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
