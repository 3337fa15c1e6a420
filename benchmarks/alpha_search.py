"""The in-loop α search (``alpha_grid=``) on the embedded digit suite.

Per seed, one ``Trainer.fit`` of the demo suite (``DemoConfig()``: 6 tasks, 300 fine-tuning
steps) with two ``MergeCallback``s per method, one without and one with the α search, merging
once at the last step. Each task's validation set is split by index parity: α is chosen on the
even half and the merge is reported on the odd half (the demo has no test split; choosing and
reporting on the same data would flatter the search). Normalised accuracy = merged ÷ the task's
own branch on the odd half, mean over tasks, in %.

    OMP_NUM_THREADS=1 python benchmarks/alpha_search.py --seeds 3
    OMP_NUM_THREADS=1 python benchmarks/alpha_search.py --seeds 3 \
        --grid 0.6,0.8,1,1.2,1.4,1.6,1.8,2 --methods ties drm iso_c tsv_m
"""

from __future__ import annotations

import argparse
import json
import time

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from drm_lightning.demo import DemoConfig, MultitaskDemoModule, ResidualMLP, build_suite
from drm_lightning.demo.runner import (
    METRIC,
    _accuracy,
    _fit,
    _labelled_callback_class,
    pretrain,
    train_loaders,
)
from drm_lightning.evaluation import TaskSpec, evaluate_tasks

PARAMS = {"drm": {"direction": "horizontal"}}

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--seeds", type=int, default=3)
parser.add_argument(
    "--methods", nargs="+", default=["task_arithmetic", "ties", "drm", "tsv_m", "iso_c"]
)
parser.add_argument("--grid", default="default", help="'default' or comma-separated α values")
args = parser.parse_args()
seeds, methods = args.seeds, args.methods
GRID = "default" if args.grid == "default" else [float(a) for a in args.grid.split(",")]
torch.set_num_threads(1)
config = DemoConfig()
suite = build_suite(config.tasks, data_seed=config.data_seed)
pretrained = pretrain(suite, config)


def specs(half: int) -> dict[str, TaskSpec]:
    out = {}
    for name, task in suite.tasks.items():
        idx = torch.arange(half, len(task.val_y), 2)
        data = TensorDataset(task.val_x[idx], task.val_y[idx])
        out[name] = TaskSpec(
            DataLoader(data, batch_size=1024), {METRIC: _accuracy(task.num_classes)}
        )
    return out


rows: dict[str, list[float]] = {}
alphas: dict[str, list[float]] = {}
start = time.perf_counter()
for seed in range(seeds):
    pl.seed_everything(seed, verbose=False)
    backbone = ResidualMLP(config.hidden, config.depth)
    backbone.load_state_dict(pretrained)
    heads = {n: nn.Linear(config.hidden, t.num_classes) for n, t in suite.tasks.items()}
    joint = {n: nn.Linear(config.hidden, t.num_classes) for n, t in suite.tasks.items()}
    module = MultitaskDemoModule(backbone, heads, joint, lr=config.finetune_lr)
    callbacks = {}
    for method in methods:
        for grid in (None, GRID):
            label = method + ("+alpha" if grid else "")
            callbacks[label] = _labelled_callback_class()(
                label,
                method,
                method_params=PARAMS.get(method),
                tasks=specs(0),
                every_n_steps=config.finetune_steps,
                seed=seed,
                evaluate_branches=False,
                alpha_grid=grid,
            )
    _fit(module, list(callbacks.values()), train_loaders(suite, config, seed), config, None)
    held_out = specs(1)
    own = {t: s[METRIC] for t, s in evaluate_tasks(module, held_out).items()}
    for label, cb in callbacks.items():
        with cb.core.merged_in(module):
            merged = {t: s[METRIC] for t, s in evaluate_tasks(module, held_out).items()}
        rows.setdefault(label, []).append(100 * sum(merged[t] / own[t] for t in own) / len(own))
        if cb.core.alpha is not None:
            alphas.setdefault(label, []).append(cb.core.alpha)
    print(f"seed {seed} done, {time.perf_counter() - start:.0f} s", flush=True)

for label, values in rows.items():
    mean = sum(values) / len(values)
    print(
        f"{label:24s} {mean:6.1f}  per seed {[round(v, 1) for v in values]}"
        + (f"  alpha {alphas[label]}" if label in alphas else "")
    )
print(json.dumps({"rows": rows, "alphas": alphas, "seconds": time.perf_counter() - start}))
