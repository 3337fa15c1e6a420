"""In-loop overhead of both front ends at the default schedule: Lightning and Accelerate.

The same training (a branched MLP over K synthetic teacher tasks, AdamW, one optimizer step
per batch of every task) runs without and with the merge front end, merging every ``--every``
optimizer steps and scoring every task:

* Lightning: ``Trainer.fit`` with and without :class:`~drm_lightning.lightning.MergeCallback`
  (``python -m drm_lightning.lightning.overhead``, reused as is);
* Accelerate: a plain ``Accelerator(cpu=True)`` loop with and without
  :class:`~drm_lightning.accelerate.MergeHook`.

Two numbers per front end: the wall-clock overhead (fastest of ``--repeats`` alternating runs
without/with; noisy on a shared machine) and the accounted overhead (time the front end spent
merging and scoring, from its ``history``, over the loop's wall time; robust to load).
The load average before and after is recorded (``_common.load_average``).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/inloop_overhead.py            # writes results/inloop_overhead.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_average

from drm_lightning.lightning import overhead as lightning_overhead
from drm_lightning.lightning.overhead import _task


def _accelerate_loop(args: argparse.Namespace, with_hook: bool) -> tuple[float, Any]:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState, PartialState
    from torchmetrics.classification import MulticlassAccuracy

    from drm_lightning.accelerate import MergeHook
    from drm_lightning.evaluation import TaskSpec
    from drm_lightning.inloop import BranchedModel

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    torch.manual_seed(0)
    tasks = [f"t{i}" for i in range(args.tasks)]
    backbone = nn.Sequential(nn.Linear(args.dim, args.hidden), nn.ReLU(), nn.Linear(args.hidden, args.hidden), nn.ReLU())
    model = BranchedModel(backbone, {t: nn.Linear(args.hidden, args.classes) for t in tasks})
    # As BranchedModule.configure_optimizers: AdamW over branches and heads (the base is frozen).
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    train = [
        DataLoader(_task(i, args.train_size, args.dim, args.classes, 0), batch_size=args.batch_size, shuffle=True)
        for i in range(args.tasks)
    ]
    specs = {
        t: TaskSpec(
            DataLoader(_task(i, args.val_size, args.dim, args.classes, 1), batch_size=256),
            MulticlassAccuracy(num_classes=args.classes),
        )
        for i, t in enumerate(tasks)
    }
    hook = MergeHook(accelerator, model, args.method, tasks=specs, every_n_steps=args.every, enabled=with_hook)
    start = time.perf_counter()
    with hook:
        step = 0
        while step < args.steps:
            for batches in zip(*train):
                loss = torch.stack([F.cross_entropy(model(x, t), y) for t, (x, y) in zip(tasks, batches)]).sum()
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
                hook.step()
                step += 1
                if step == args.steps:
                    break
    return time.perf_counter() - start, hook


def accelerate_overhead(args: argparse.Namespace) -> dict[str, float]:
    plain, with_hook = [], []
    hook = None
    for _ in range(args.repeats):
        plain.append(_accelerate_loop(args, False)[0])
        seconds, hook = _accelerate_loop(args, True)
        with_hook.append(seconds)
    assert hook is not None and hook.history
    merge_s = sum(r["merge/seconds"] for r in hook.history)
    total_s = sum(r["merge/total_seconds"] for r in hook.history)
    return {
        "loop_without_s": min(plain),
        "loop_with_s": min(with_hook),
        "overhead_wall_pct": 100 * (min(with_hook) - min(plain)) / min(plain),
        "merges": len(hook.history),
        "merge_s_per_merge": merge_s / len(hook.history),
        "merge_and_eval_s_per_merge": total_s / len(hook.history),
        "overhead_accounted_pct": 100 * total_s / min(with_hook),
        "merged_average_last": hook.history[-1].get("merged/average", float("nan")),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[lightning_overhead.build_parser(add_help=False)],
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "inloop_overhead.json")
    args = parser.parse_args(argv)
    if args.adopt:  # the Accelerate loop has no adopt variant: the two rows would differ
        parser.error("--adopt is for the Lightning loop alone: python -m drm_lightning.lightning.overhead --adopt")
    torch.set_num_threads(1)
    load_before = load_average()
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "load_average_before": load_before,
        "lightning": lightning_overhead.run(args),
        "accelerate": accelerate_overhead(args),
        "load_average_after": load_average(),
    }
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
