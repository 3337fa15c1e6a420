"""Merging task models trained from DIFFERENT random inits on different tasks of the demo suite.

The embedded demo suite (:mod:`drm_lightning.demo.tasks`: views of scikit-learn's digits,
nothing downloaded) supplies the tasks and their train/val splits. Per seed, every task gets
its own model: the demo backbone (:class:`~drm_lightning.demo.backbone.ResidualMLP`, a
pre-LayerNorm residual MLP) plus a linear task head, both from the model's OWN random init
(no shared pretraining), trained with AdamW on that task only. The K backbones are then
merged without training by each alignment method of ``drm_lightning.alignment`` (the six of
the MuDSC paper plus weight-Zip); the heads are kept per task.

How the heads are kept: every model is wrapped as ``backbone + all K heads`` in which model k
carries its trained head for task k and ZERO heads for the other tasks. The heads are then
consumers of the backbone's residual stream, so the merge maps them through the unmerge
matrices: merged head_k = (head_k of model k) · U_k / K (the zero heads contribute nothing,
bias likewise b_k / K) — task k's own head in the merged feature space, scaled by 1/K, which
leaves its argmax (accuracy) unchanged. Calibration: unlabelled training images of every
task (their views), no labels.

Reported per seed and as mean ± std over seeds: per-task accuracy on the task's val split, the
average over tasks (``avg``), and paired differences of ``avg`` per seed.

    OMP_NUM_THREADS=1 python benchmarks/alignment_quality_demo.py [--seeds 0 1 2] [--hidden 64]

Writes ``benchmarks/results/alignment_quality_demo.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from drm_lightning.alignment import derive_spec, merge_models
from drm_lightning.demo.backbone import ResidualMLP
from drm_lightning.demo.tasks import TaskDef, build_suite

METHODS = [
    "weight_average",
    "weight_matching",
    "activation_align",
    "zipit",
    "weight_zip",
    "mudsc_align",
    "mudsc_zip",
]
DEFAULT_TASKS = ["rot90:digit", "flip:digit", "transpose:mod3"]
OUT = Path(__file__).parent / "results" / "alignment_quality_demo.json"


class TaskModel(nn.Module):
    """The demo backbone with one head per task; ``forward`` returns every head's logits."""

    def __init__(self, hidden: int, depth: int, classes: dict[str, int]) -> None:
        super().__init__()
        self.backbone = ResidualMLP(hidden, depth)
        self.heads = nn.ModuleDict({t: nn.Linear(hidden, c) for t, c in classes.items()})

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        z = self.backbone(x)
        return tuple(head(z) for head in self.heads.values())


def train_task_model(suite, task: str, hidden: int, depth: int, steps: int, seed: int) -> TaskModel:
    """Model for ``task`` from its own random init; the other tasks' heads are zeroed."""
    torch.manual_seed(seed)
    classes = {t: d.num_classes for t, d in suite.tasks.items()}
    net = TaskModel(hidden, depth, classes)
    data = suite.tasks[task]
    index = list(classes).index(task)
    params = list(net.backbone.parameters()) + list(net.heads[task].parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(steps):
        idx = torch.randint(len(data.train_y), (64,), generator=g)
        loss = F.cross_entropy(net(data.train_x[idx])[index], data.train_y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        for t, head in net.heads.items():
            if t != task:
                head.weight.zero_()
                head.bias.zero_()
    return net.eval()


def scores(net: TaskModel, suite, only: str | None = None) -> dict[str, float]:
    out = {}
    with torch.no_grad():
        for i, (name, data) in enumerate(suite.tasks.items()):
            if only is not None and name != only:
                continue
            pred = net(data.val_x)[i].argmax(1)
            out[name] = 100 * float((pred == data.val_y).float().mean())
    if only is None:
        out["avg"] = statistics.mean(out.values())
    return out


def one_seed(suite, seed: int, hidden: int, depth: int, steps: int) -> dict[str, dict[str, float]]:
    names = suite.names
    models = [
        train_task_model(suite, t, hidden, depth, steps, 1000 * (k + 1) + seed)
        for k, t in enumerate(names)
    ]
    calib = torch.cat([suite.tasks[t].train_x for t in names])
    calib = calib[torch.randperm(len(calib), generator=torch.Generator().manual_seed(seed))]
    batches = list(torch.split(calib, 256))
    spec = derive_spec(models[0], calib[:2])
    own = {}
    for t, m in zip(names, models):
        own |= scores(m, suite, only=t)
    rows: dict[str, dict[str, float]] = {
        "task_models": own | {"avg": statistics.mean(own.values())}
    }
    for name in METHODS:
        t0 = time.perf_counter()
        merged = merge_models(models, batches, method=name, spec=spec, seed=seed)
        rows[name] = scores(merged, suite) | {"seconds": time.perf_counter() - t0}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS, help="view:label pairs")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    suite = build_suite([TaskDef(*t.split(":")) for t in args.tasks])
    per_seed = {}
    for seed in args.seeds:
        t0 = time.perf_counter()
        per_seed[seed] = one_seed(suite, seed, args.hidden, args.depth, args.steps)
        print(
            f"seed {seed} ({time.perf_counter() - t0:.0f}s): "
            + ", ".join(f"{k} {v['avg']:.1f}" for k, v in per_seed[seed].items()),
            flush=True,
        )
    rows = list(per_seed[args.seeds[0]])
    cols = suite.names + ["avg"]
    summary = {}
    print(f"\n{'method':18s} " + " ".join(f"{c:>16s}" for c in cols))
    for n in rows:
        summary[n] = {}
        cells = []
        for k in cols:
            vals = [per_seed[s][n][k] for s in args.seeds]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            summary[n][k] = (statistics.mean(vals), sd)
            cells.append(f"{statistics.mean(vals):6.1f} ± {sd:4.1f}")
        print(f"{n:18s} " + " ".join(f"{c:>16s}" for c in cells))
    pairs = {
        "mudsc_zip - zipit": ("mudsc_zip", "zipit"),
        "mudsc_align - activation_align": ("mudsc_align", "activation_align"),
        "zipit - mudsc_align": ("zipit", "mudsc_align"),
        "mudsc_align - weight_matching": ("mudsc_align", "weight_matching"),
        "weight_matching - weight_average": ("weight_matching", "weight_average"),
        "mudsc_zip - weight_zip": ("mudsc_zip", "weight_zip"),
    }
    diffs = {
        k: [per_seed[s][a]["avg"] - per_seed[s][b]["avg"] for s in args.seeds]
        for k, (a, b) in pairs.items()
    }
    for k, v in diffs.items():
        print(
            f"paired avg difference {k}: "
            + ", ".join(f"{d:+.1f}" for d in v)
            + f"  (mean {statistics.mean(v):+.1f})"
        )
    result = {
        "tasks": suite.names,
        "hidden": args.hidden,
        "depth": args.depth,
        "steps": args.steps,
        "seeds": args.seeds,
        "per_seed": per_seed,
        "summary": summary,
        "paired_avg_differences": diffs,
    }
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
