"""Why DRM-V with renorm fails the binary tasks of ``--large``: merge one seed's branches offline.

Trains seed 0 of the ``--large`` demo suite (the demo's own code), then scores on every task:

1. DRM-V and DRM-H, with and without renorm, in float32 and float64 (is it precision?);
2. DRM-V with renorm where ONE weight matrix is taken from the no-renorm merge instead
   (which matrix causes it?), together with each matrix's shape, the joint rank of the
   vertical stack and the largest rank one branch can have there.

    python benchmarks/direction_probe.py

Writes ``benchmarks/results/direction_probe.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from _common import demo_seed
from threadpoolctl import threadpool_limits

from drm_lightning.demo.backbone import ResidualMLP
from drm_lightning.demo.config import DEFAULT_METHODS, DemoConfig
from drm_lightning.demo.runner import _evaluate
from drm_lightning.merge.loop import merge_state_dicts
from drm_lightning.methods import get_method
from drm_lightning.methods.drm import shared_basis

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    torch.set_num_threads(1)
    start = time.perf_counter()
    only_drm = tuple(m for m in DEFAULT_METHODS if m.label == "drm_h")
    config = DemoConfig(
        **{**vars(DemoConfig.large()), "methods": only_drm, "consolidate": (), "seeds": (0,)}
    )
    with threadpool_limits(1):
        suite, module = demo_seed(config, 0)
        base = {k: v.detach().clone() for k, v in module.base.state_dict().items()}
        branches = [
            {k: v.detach().clone() for k, v in module.branches[t].state_dict().items()}
            for t in module.task_names
        ]
        net = ResidualMLP(config.hidden, config.depth)

        def score(state: dict[str, torch.Tensor]) -> dict[str, float]:
            net.load_state_dict(state)

            def predict(_m: Any, task: str, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
                x, y = batch
                return module.heads[task](net(x)), y

            return {t: 100 * v for t, v in _evaluate(module, suite, predict).items()}

        rows: list[dict[str, Any]] = []

        def record(label: str, state: dict[str, torch.Tensor], **extra: Any) -> None:
            scores = score(state)
            rows.append(
                {
                    "label": label,
                    "scores": scores,
                    "average": sum(scores.values()) / len(scores),
                    **extra,
                }
            )
            print(
                f"{label:44s} "
                + " ".join(f"{v:5.1f}" for v in scores.values())
                + f"  avg {rows[-1]['average']:.1f}"
            )

        print(f"{'merge':44s} " + " ".join(t[:5] for t in suite.tasks))
        for direction in ("vertical", "horizontal"):
            for renorm in (True, False):
                for dtype in (torch.float32, torch.float64):
                    method = get_method("drm", direction=direction, renormalize=renorm)
                    record(
                        f"DRM-{direction[0].upper()} renorm={renorm} {str(dtype)[6:]}",
                        merge_state_dicts(method, base, branches, compute_dtype=dtype),
                    )
        with_renorm = merge_state_dicts(get_method("drm", direction="vertical"), base, branches)
        without = merge_state_dicts(
            get_method("drm", direction="vertical", renormalize=False), base, branches
        )
        for name, b in base.items():
            if b.ndim != 2:
                continue
            stack = torch.cat([br[name].double() - b.double() for br in branches])
            joint_rank = shared_basis(stack.reshape(len(branches), *b.shape), rank_rtol=1e-2).rank
            record(
                f"DRM-V renorm, {name} without",
                {**with_renorm, name: without[name]},
                shape=list(b.shape),
                joint_rank=joint_rank,
                branch_rank_max=min(b.shape),
            )
    print(f"{time.perf_counter() - start:.0f} s")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "direction_probe.json"
    path.write_text(
        json.dumps(
            {
                "command": "python benchmarks/direction_probe.py",
                "tasks": list(suite.tasks),
                "rows": rows,
            },
            indent=1,
        )
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
