"""Measure what :class:`MergeCallback` adds to ``Trainer.fit``.

Runs the same fit of a :class:`BranchedModule` (K tasks, MLP backbone, synthetic teacher
tasks) without and with the callback, and prints the wall times, the relative overhead and
the callback's own accounting (time spent merging and scoring, from ``history``), which is
robust to a busy machine.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/_lightning_overhead.py --steps 600 --every 200
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from drm_lightning.evaluation import TaskSpec
from drm_lightning.lightning.branched import BranchedModule
from drm_lightning.lightning.callback import MergeCallback


def teacher_task(index: int, n: int, dim: int, classes: int, split: int) -> TensorDataset:
    """``n`` samples of synthetic task ``index``: ``argmax(x @ W_index)``; ``split`` 0 train,
    1 validation."""
    teacher = torch.Generator().manual_seed(100 + index)
    w = torch.randn(dim, classes, generator=teacher)
    g = torch.Generator().manual_seed(10_000 * (split + 1) + index)
    x = torch.randn(n, dim, generator=g)
    return TensorDataset(x, (x @ w).argmax(-1))


@dataclass
class Loop:
    """What one measured loop trains: new backbone and heads, training loaders, validation tasks."""

    backbone: nn.Module
    heads: dict[str, nn.Module]
    train: dict[str, DataLoader]
    specs: dict[str, TaskSpec]
    lr: float


def toy_loop(args: argparse.Namespace) -> Loop:
    """The MLP of :func:`build_parser`'s settings on ``--tasks`` synthetic teacher tasks.

    Example:
        >>> loop = toy_loop(build_parser().parse_args(["--tasks", "2"]))
        >>> sorted(loop.heads), loop.lr
        (['t0', 't1'], 0.001)
    """
    tasks = [f"t{i}" for i in range(args.tasks)]
    backbone = nn.Sequential(
        nn.Linear(args.dim, args.hidden), nn.ReLU(), nn.Linear(args.hidden, args.hidden), nn.ReLU()
    )
    heads: dict[str, nn.Module] = {t: nn.Linear(args.hidden, args.classes) for t in tasks}
    train = {
        t: DataLoader(
            teacher_task(i, args.train_size, args.dim, args.classes, 0),
            batch_size=args.batch_size,
            shuffle=True,
        )
        for i, t in enumerate(tasks)
    }
    specs = {
        t: TaskSpec(
            DataLoader(teacher_task(i, args.val_size, args.dim, args.classes, 1), batch_size=256),
            MulticlassAccuracy(num_classes=args.classes),
        )
        for i, t in enumerate(tasks)
    }
    return Loop(backbone, heads, train, specs, lr=1e-3)


def fit(
    args: argparse.Namespace,
    with_callback: bool,
    build: Callable[[argparse.Namespace], Loop] = toy_loop,
) -> tuple[float, MergeCallback | None, BranchedModule]:
    """One fit of ``build(args)`` (seeded): its wall seconds, the callback, the module."""
    pl.seed_everything(0, verbose=False)
    loop = build(args)
    model = BranchedModule(loop.backbone, loop.heads, lr=loop.lr)
    callbacks: list[Any] = []
    cb = None
    if with_callback:
        cb = MergeCallback(
            args.method, tasks=loop.specs, every_n_steps=args.every, adopt=args.adopt
        )
        callbacks.append(cb)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(model, loop.train)
    return time.perf_counter() - start, cb, model


def build_parser(*, add_help: bool = True) -> argparse.ArgumentParser:
    """The loop's settings (the Accelerate benchmark builds on the same parser)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, add_help=add_help
    )
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=200, help="merge every n optimizer steps")
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train-size", type=int, default=2048)
    parser.add_argument("--val-size", type=int, default=512)
    parser.add_argument("--method", default="drm")
    parser.add_argument("--adopt", action="store_true")
    parser.add_argument(
        "--repeats", type=int, default=2, help="alternate plain/callback fits; keep the fastest"
    )
    return parser


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run both fits and print (and return) the measurements."""
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> dict[str, float]:
    """Both fits with the settings of :func:`build_parser`; prints and returns the measurements."""
    torch.set_num_threads(1)
    plain, with_cb = [], []
    cb = None
    for _ in range(args.repeats):
        plain.append(fit(args, False)[0])
        seconds, cb, _ = fit(args, True)
        with_cb.append(seconds)
    assert cb is not None
    merge_s = sum(r["merge/seconds"] for r in cb.history)
    total_s = sum(r["merge/total_seconds"] for r in cb.history)
    result = {
        "fit_without_s": min(plain),
        "fit_with_s": min(with_cb),
        "overhead_wall_pct": 100 * (min(with_cb) - min(plain)) / min(plain),
        "merges": len(cb.history),
        "merge_s_per_merge": merge_s / len(cb.history),
        "merge_and_eval_s_per_merge": total_s / len(cb.history),
        "overhead_accounted_pct": 100 * total_s / min(with_cb),
        "merged_average_last": cb.history[-1].get("merged/average", float("nan")),
        "normalized_average_last": cb.history[-1].get("normalized/average", float("nan")),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
