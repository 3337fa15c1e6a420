"""What renormalisation changes on the demo's branches: per matrix, direction and renorm switch.

DRM's renormalisation only changes which coordinates survive the pruning (spec §4.4). This
script trains one seed of the demo suite (the same code as ``examples/multitask_demo.py``)
and, for every DRM matrix, reports in float64:

* ``rank``: directions kept by the rank cut;
* ``top_share``: per direction, the largest task's share of the direction's column norms
  (median over directions; 1/K when every task uses every direction equally, 1.0 when each
  direction belongs to one task);
* ``kept_min`` / ``kept_max``: the fraction of its coordinates each task keeps (the budget
  split between tasks), with and without renorm;
* ``mask_overlap``: the share of kept coordinates that both settings keep;
* ``small_share``: of the coordinates that survive and agree with the elected sign, the share
  below 10 % of the largest agreeing one at the same place (small entries that still count
  in the disjoint mean's denominator).

    python benchmarks/renorm_probe.py [--large] [--seed 0]

Writes ``benchmarks/results/renorm_probe.json`` (``renorm_probe_large.json`` with ``--large``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from _common import demo_seed
from threadpoolctl import threadpool_limits

from drm_lightning.demo.config import DEFAULT_METHODS, DemoConfig
from drm_lightning.methods.drm import drop_numerical_zeros, pruning_scores, shared_basis
from drm_lightning.methods.ops import elect_signs, topk_mask

RESULTS = Path(__file__).parent / "results"


def trained_branches(
    config: DemoConfig, seed: int
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Base and branch state dicts (float64) after one seed's fit of the demo."""
    _, module = demo_seed(config, seed)
    base = {k: v.detach().double() for k, v in module.base.state_dict().items()}
    branches = [
        {k: v.detach().double() for k, v in module.branches[t].state_dict().items()}
        for t in module.task_names
    ]
    return base, branches


def probe(deltas: torch.Tensor, drop_rate: float = 0.8, rank_rtol: float = 1e-2) -> dict[str, Any]:
    """The statistics of the module docstring for (N, n, m) deltas, vertical layout."""
    basis = shared_basis(deltas, rank_rtol=rank_rtol)
    coords = drop_numerical_zeros(deltas @ basis.vectors.to(deltas.dtype), deltas.shape[-1])
    norms = coords.norm(dim=1)
    top_share = (norms / norms.sum(0, keepdim=True).clamp_min(1e-300)).max(0).values
    out: dict[str, Any] = {"rank": basis.rank, "top_share": float(top_share.median())}
    masks = {}
    for renorm in (True, False):
        mask = topk_mask(pruning_scores(coords, basis.sigma, renormalize=renorm), 1.0 - drop_rate)
        masks[renorm] = mask
        kept = coords * mask
        signs = elect_signs(kept)
        agree = (kept != 0) & (torch.sign(kept) == signs)
        magnitude = kept.abs() * agree
        largest = magnitude.max(dim=0).values
        small = agree & (magnitude < 0.1 * largest)
        per_task = mask.reshape(mask.shape[0], -1).double().mean(1)
        key = "renorm" if renorm else "no_renorm"
        out[key] = {
            "kept_min": float(per_task.min()),
            "kept_max": float(per_task.max()),
            "small_share": float(small.sum() / agree.sum().clamp_min(1)),
        }
    both = (masks[True] & masks[False]).sum()
    out["mask_overlap"] = float(both / masks[True].sum().clamp_min(1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--large", action="store_true", help="the --large suite of the demo")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    drm_only = tuple(m for m in DEFAULT_METHODS if m.label == "drm_h")
    config = DemoConfig.large() if args.large else DemoConfig()
    config = DemoConfig(
        **{**vars(config), "methods": drm_only, "consolidate": (), "seeds": (args.seed,)}
    )
    start = time.perf_counter()
    with threadpool_limits(1):
        base, branches = trained_branches(config, args.seed)
        rows = []
        for name, b in base.items():
            if b.ndim != 2:
                continue
            stacked = torch.stack([br[name] - b for br in branches])
            for direction, deltas in (("H", stacked.mT), ("V", stacked)):
                rows.append(
                    {
                        "matrix": name,
                        "direction": direction,
                        "shape": list(b.shape),
                        **probe(deltas),
                    }
                )
    header = (
        f"{'matrix':22s} dir  rank  top_share  kept/task renorm  kept/task no-renorm  "
        "overlap  small (r / no-r)"
    )
    print(header)
    for r in rows:
        print(
            f"{r['matrix']:22s} {r['direction']:>3s} {r['rank']:5d}  {r['top_share']:9.2f}  "
            f"{r['renorm']['kept_min']:.2f}–{r['renorm']['kept_max']:.2f}        "
            f"{r['no_renorm']['kept_min']:.2f}–{r['no_renorm']['kept_max']:.2f}            "
            f"{r['mask_overlap']:.2f}     "
            f"{r['renorm']['small_share']:.3f} / {r['no_renorm']['small_share']:.3f}"
        )
    print(
        f"median top_share {statistics.median(r['top_share'] for r in rows):.2f} "
        f"(1/K = {1 / len(config.tasks):.2f}); {time.perf_counter() - start:.0f} s"
    )
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / ("renorm_probe_large.json" if args.large else "renorm_probe.json")
    path.write_text(
        json.dumps(
            {
                "command": "python benchmarks/renorm_probe.py"
                + (" --large" if args.large else "")
                + f" --seed {args.seed}",
                "tasks": [t.name for t in config.tasks],
                "seed": args.seed,
                "rows": rows,
            },
            indent=1,
        )
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
