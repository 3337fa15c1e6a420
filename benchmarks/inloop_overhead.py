r"""In-loop overhead of both front ends at the default schedule: Lightning and Accelerate.

The loop: a branched MLP (``--dim`` → ``--hidden`` → ``--hidden``, one head per task, ``--tasks``
synthetic teacher tasks), AdamW, one optimizer step per batch of every task, ``--steps`` steps;
with the front end merging (DRM) every ``--every`` optimizer steps and scoring every task (the
merge and each task's own branch, ``--val-size`` samples each):

* Lightning: ``Trainer.fit`` without and with :class:`~drm_lightning.lightning.MergeCallback`
  (``benchmarks/_lightning_overhead.py``);
* Accelerate: a plain ``Accelerator(cpu=True)`` loop without and with
  :class:`~drm_lightning.accelerate.MergeHook`.

``--loop demo`` trains the README demo suite instead, the loop of
``examples/accelerate_multitask.py``: the demo's pretrained residual MLP (digits), six task
branches and heads, the demo's training loaders and validation sets.

**The default schedule.** Neither front end merges without a schedule (``every_n_steps=None``
warns that it never merges). The schedule their documentation gives — the README quick starts of
both front ends and the ``MergeCallback`` example — is ``every_n_steps=200`` with every other
argument at its default (DRM with its defaults, ``evaluate_branches=True``, ``adopt=False``):
``--every 200``, this benchmark's default.

**Timing on a shared machine.** Every repeat runs the four loops (Lightning without / with,
Accelerate without / with) back to back, the order rotated from one repeat to the next, so both
front ends and both variants see the same load. Per front end:

* wall overhead: ``(with - without) / without`` of the fastest runs, and the median of the
  per-repeat ratios (noisy: other jobs share the cores);
* accounted overhead: the seconds the front end spent merging and scoring (its ``history``)
  over the wall time of the same run; median and maximum over repeats (robust to load);
* seconds per merge, merge and scoring apart: the first merge of each loop and the later ones;
  ``cold_merge`` is the first merge of the process (first eigh, first pass over each loader);
* the load average before, after and at the start of every repeat.

``--profile N`` then runs one more merge + scoring of each front end under cProfile and keeps
the ``N`` entries of highest cumulative time.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/inloop_overhead.py  # writes results/inloop_overhead.json
    OMP_NUM_THREADS=1 python benchmarks/inloop_overhead.py --loop demo \
        --out results/inloop_overhead_demo.json
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import json
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _lightning_overhead as lightning_overhead
from _common import load_average
from _lightning_overhead import Loop, toy_loop

from drm_lightning.demo import DemoConfig
from drm_lightning.demo.backbone import ResidualMLP
from drm_lightning.demo.runner import pretrain, task_specs, train_loaders
from drm_lightning.demo.tasks import build_suite

FRONT_ENDS = ("lightning", "accelerate")


@dataclass
class Run:
    """One loop: its wall seconds, the front end's history (empty without it), a way to merge
    again."""

    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    merge_again: Callable[[], Any] | None = None


@functools.cache
def _demo_inputs(pretrain_steps: int | None) -> tuple[Any, Any, dict[str, torch.Tensor]]:
    """The demo's config, task suite and pretrained backbone state (built once a process)."""
    config = DemoConfig() if pretrain_steps is None else DemoConfig(pretrain_steps=pretrain_steps)
    suite = build_suite(config.tasks, data_seed=config.data_seed)
    return config, suite, pretrain(suite, config)


def demo_loop(args: argparse.Namespace) -> Loop:
    """The README demo suite (``examples/accelerate_multitask.py``): the pretrained residual MLP,
    one branch and head per demo task (six), the demo's training loaders and validation tasks."""
    config, suite, state = _demo_inputs(args.pretrain_steps)
    backbone = ResidualMLP(config.hidden, config.depth)
    backbone.load_state_dict(state)
    heads: dict[str, nn.Module] = {
        name: nn.Linear(config.hidden, t.num_classes) for name, t in suite.tasks.items()
    }
    return Loop(
        backbone,
        heads,
        train_loaders(suite, config, seed=0),
        task_specs(suite),
        lr=config.finetune_lr,
    )


LOOPS: dict[str, Callable[[argparse.Namespace], Loop]] = {"toy": toy_loop, "demo": demo_loop}


def lightning_run(args: argparse.Namespace, with_front_end: bool) -> Run:
    """``Trainer.fit`` without or with ``MergeCallback``."""
    seconds, cb, module = lightning_overhead.fit(args, with_front_end, LOOPS[args.loop])
    if cb is None:
        return Run(seconds)
    return Run(seconds, list(cb.history), lambda: cb.core.merge(module, step=args.steps, epoch=0))


def accelerate_run(args: argparse.Namespace, with_front_end: bool) -> Run:
    """A plain ``Accelerator(cpu=True)`` loop without or with ``MergeHook`` (``enabled=``)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState, PartialState

    from drm_lightning.accelerate import MergeHook
    from drm_lightning.inloop import BranchedModel

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    torch.manual_seed(0)
    loop = LOOPS[args.loop](args)
    tasks = list(loop.heads)
    model = BranchedModel(loop.backbone, loop.heads)
    # As BranchedModule.configure_optimizers: AdamW over branches and heads (the base is frozen).
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=loop.lr, weight_decay=0.0
    )
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    train = [loop.train[t] for t in tasks]
    hook = MergeHook(
        accelerator,
        model,
        args.method,
        tasks=loop.specs,
        every_n_steps=args.every,
        enabled=with_front_end,
    )
    start = time.perf_counter()
    with hook:
        step = 0
        while step < args.steps:
            for batches in zip(*train):
                loss = torch.stack(
                    [F.cross_entropy(model(x, t), y) for t, (x, y) in zip(tasks, batches)]
                ).sum()
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
                hook.step()
                step += 1
                if step == args.steps:
                    break
    seconds = time.perf_counter() - start
    if not with_front_end:
        return Run(seconds)
    return Run(seconds, list(hook.history), hook.merge)


RUNNERS: dict[str, Callable[[argparse.Namespace, bool], Run]] = {
    "lightning": lightning_run,
    "accelerate": accelerate_run,
}


def _pct(part: float, whole: float) -> float:
    return 100.0 * part / whole


def summarize(without: list[Run], with_: list[Run]) -> dict[str, Any]:
    """The table row of one front end from its runs (same repeat order in both lists)."""
    plain, merged = [r.seconds for r in without], [r.seconds for r in with_]
    spent = [sum(rec["merge/total_seconds"] for rec in r.history) for r in with_]
    first = [r.history[0] for r in with_]
    later = [rec for r in with_ for rec in r.history[1:]]
    median = statistics.median
    return {
        "loop_without_s": min(plain),
        "loop_with_s": min(merged),
        "loop_without_s_median": median(plain),
        "loop_with_s_median": median(merged),
        "overhead_wall_pct": _pct(min(merged) - min(plain), min(plain)),
        "overhead_wall_pct_median_paired": median(_pct(w - p, p) for w, p in zip(merged, plain)),
        "merges_per_loop": len(with_[-1].history),
        "overhead_accounted_pct": median(_pct(s, w) for s, w in zip(spent, merged)),
        "overhead_accounted_pct_max": max(_pct(s, w) for s, w in zip(spent, merged)),
        "merge_and_scoring_s_per_merge": median(s / len(r.history) for s, r in zip(spent, with_)),
        "first_merge_s": median(rec["merge/seconds"] for rec in first),
        "first_scoring_s": median(
            rec["merge/total_seconds"] - rec["merge/seconds"] for rec in first
        ),
        "later_merge_s": median(rec["merge/seconds"] for rec in later) if later else float("nan"),
        "later_scoring_s": median(
            rec["merge/total_seconds"] - rec["merge/seconds"] for rec in later
        )
        if later
        else float("nan"),
        "merged_average_last": [r.history[-1].get("merged/average", float("nan")) for r in with_],
        "per_repeat": [
            {
                "without_s": p.seconds,
                "with_s": w.seconds,
                "merges_s": [
                    [rec["merge/seconds"], rec["merge/total_seconds"]] for rec in w.history
                ],
            }
            for p, w in zip(without, with_)
        ],
    }


def profile(run: Run, top: int) -> list[str]:
    """The ``top`` entries of highest cumulative time of one more merge + scoring."""
    assert run.merge_again is not None
    profiler = cProfile.Profile()
    profiler.runcall(run.merge_again)
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(top)
    return [line for line in out.getvalue().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the interleaved repeats, print the table and write the JSON."""
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[lightning_overhead.build_parser(add_help=False)],
    )
    parser.set_defaults(repeats=5)
    parser.add_argument(
        "--loop",
        choices=sorted(LOOPS),
        default="toy",
        help=(
            "toy: the MLP of --dim/--hidden/--tasks on teacher tasks; "
            "demo: the README demo suite (six tasks)"
        ),
    )
    parser.add_argument(
        "--pretrain-steps",
        type=int,
        default=None,
        metavar="N",
        help="demo loop: pretraining steps of the backbone (default: the demo's)",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="cProfile one more merge of each front end",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "inloop_overhead.json",
    )
    args = parser.parse_args(argv)
    if args.adopt:  # the Accelerate loop has no adopt variant: the two rows would differ
        parser.error(
            "--adopt is for the Lightning loop alone: "
            "python benchmarks/_lightning_overhead.py --adopt"
        )
    torch.set_num_threads(1)
    variants = [
        (front_end, with_front_end) for front_end in FRONT_ENDS for with_front_end in (False, True)
    ]
    runs: dict[tuple[str, bool], list[Run]] = {v: [] for v in variants}
    load_before, load_per_repeat, cold = load_average(), [], None
    for repeat in range(args.repeats):
        load_per_repeat.append(load_average())
        order = variants[repeat % len(variants) :] + variants[: repeat % len(variants)]
        for front_end, with_front_end in order:
            run = RUNNERS[front_end](args, with_front_end)
            runs[front_end, with_front_end].append(run)
            if cold is None and run.history:
                cold = {
                    "front_end": front_end,
                    "merge_s": run.history[0]["merge/seconds"],
                    "merge_and_scoring_s": run.history[0]["merge/total_seconds"],
                }
            print(
                f"repeat {repeat}: {front_end:10s} "
                f"{'with' if with_front_end else 'without':7s} {run.seconds:7.2f} s",
                flush=True,
            )
    result: dict[str, Any] = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "threads": torch.get_num_threads(),
        "load_average_before": load_before,
        "load_average_per_repeat": load_per_repeat,
        "cold_merge": cold,
        **{
            front_end: summarize(runs[front_end, False], runs[front_end, True])
            for front_end in FRONT_ENDS
        },
        "load_average_after": load_average(),
    }
    if args.profile:
        result["profile"] = {fe: profile(runs[fe, True][-1], args.profile) for fe in FRONT_ENDS}
        for front_end, lines in result["profile"].items():
            print(f"--- {front_end}: one more merge + scoring\n" + "\n".join(lines))
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def table(result: dict[str, Any]) -> str:
    """The Markdown table of RESULTS.md §5."""
    lines = [
        (
            "| front end | loop without s | loop with s | "
            "wall overhead (min; median paired) | merges | "
            "merge s (first; later) | scoring s (first; later) | accounted overhead (median; max) |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for front_end in FRONT_ENDS:
        r = result[front_end]
        lines.append(
            f"| {front_end} | {r['loop_without_s']:.2f} | {r['loop_with_s']:.2f} | "
            f"{r['overhead_wall_pct']:.1f} %; {r['overhead_wall_pct_median_paired']:.1f} % | "
            f"{r['merges_per_loop']} | "
            f"{r['first_merge_s']:.3f}; {r['later_merge_s']:.3f} | "
            f"{r['first_scoring_s']:.3f}; {r['later_scoring_s']:.3f} | "
            f"**{r['overhead_accounted_pct']:.1f} %**; {r['overhead_accounted_pct_max']:.1f} % |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
