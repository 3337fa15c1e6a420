"""Run the suite: pretrain once, then per seed one ``Trainer.fit`` with one merge callback a method.

Per seed, :func:`run_seed` builds a :class:`~drm_lightning.demo.module.MultitaskDemoModule`
(K branches of the pretrained backbone, each with its head, plus the joint reference model)
and fine-tunes everything in ONE ``Trainer.fit``, every step on one mini-batch of every task.
One :class:`~drm_lightning.lightning.MergeCallback` per compared method merges the live
branches every ``merge_every`` steps and scores the merge on every task's validation data
with that task's own head (``adopt=False``: the branches keep training independently, so
every method merges exactly the same branches). The final merge, at the last step, gives
the result table; the earlier ones give the curves of the chart.
"""

from __future__ import annotations

import logging
import os
import platform
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning
import lightning.pytorch as pl
import torch
from threadpoolctl import threadpool_limits
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy
from tqdm.auto import tqdm

from drm_lightning.demo.backbone import ResidualMLP, pretrain_backbone
from drm_lightning.demo.config import CONSOLIDATED_SUFFIX, DemoConfig, MethodSpec
from drm_lightning.demo.module import MultitaskDemoModule
from drm_lightning.demo.report import write_report
from drm_lightning.demo.tasks import Suite, build_suite
from drm_lightning.evaluation import TaskSpec, evaluate_tasks
from drm_lightning.lightning import BranchedModule, MergeCallback

METRIC = "acc"
"""Name of every task's metric: multiclass accuracy (micro average)."""


@dataclass
class SeedResult:
    """What one seed produced.

    Attributes:
        seed: The fine-tuning seed.
        scores: ``{row: {task: accuracy}}`` at the final step; rows are the method labels and
            ``branch``, ``joint``, ``base_heads``.
        curves: ``{method label: [(step, normalised average), ...]}`` over the periodic merges.
        fit_seconds: Wall time of ``Trainer.fit`` (training and every callback).
        callback_seconds: ``{method label: seconds}`` spent in that callback's merges and scoring.
        merge_seconds: ``{method label: seconds}`` spent in the merge arithmetic alone.
        module: The trained module (only with ``run_seed(..., keep_module=True)``).
    """

    seed: int
    scores: dict[str, dict[str, float]]
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    fit_seconds: float = 0.0
    callback_seconds: dict[str, float] = field(default_factory=dict)
    merge_seconds: dict[str, float] = field(default_factory=dict)
    module: MultitaskDemoModule | None = field(default=None, repr=False)


@dataclass
class DemoRun:
    """The outcome of :func:`run_demo`: the configuration, every seed, and timings."""

    config: DemoConfig
    seeds: list[SeedResult]
    methods: dict[str, dict[str, Any]]
    pretrain_seconds: float
    wall_seconds: float
    environment: dict[str, Any]

    @property
    def tasks(self) -> list[str]:
        """Task names, in order."""
        return [t.name for t in self.config.tasks]


def _accuracy(num_classes: int) -> Any:
    return MulticlassAccuracy(num_classes=num_classes, average="micro")


def task_specs(
    suite: Suite,
    *,
    predict: Callable[[nn.Module, str, Any], tuple[Tensor, Tensor]] | None = None,
) -> dict[str, Any]:
    """One :class:`~drm_lightning.evaluation.TaskSpec` a task: its validation set, accuracy.

    Args:
        suite: The tasks.
        predict: ``predict(module, task, batch)``; default the module's ``predict_task``.
    """
    specs = {}
    for name, task in suite.tasks.items():
        loader = DataLoader(TensorDataset(task.val_x, task.val_y), batch_size=1024)
        specs[name] = TaskSpec(loader, {METRIC: _accuracy(task.num_classes)}, predict=predict)
    return specs


def _labelled_callback_class() -> type:
    class LabelledMergeCallback(MergeCallback):
        """A MergeCallback whose ``state_key`` also holds the demo's method label.

        Lightning refuses two stateful callbacks with one ``state_key``, and the base key
        names only the registered method (DRM-V and DRM-H are both ``drm``).
        """

        def __init__(self, label: str, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.label = label

        @property
        def state_key(self) -> str:
            return self._generate_state_key(label=self.label, base=super().state_key)

    return LabelledMergeCallback


def _progress_callback(bar: Any) -> Any:
    class ProgressCallback(pl.Callback):
        """Advances the run's progress bar by one after every optimizer step."""

        def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
            bar.update(1)

    return ProgressCallback()


@contextmanager
def _thread_limits(threads: int | None) -> Iterator[None]:
    """Cap torch's intra-op threads and the BLAS/OpenMP pools (scipy's LAPACK included).

    scipy's eigensolver (DRM's Gram route) runs on OpenBLAS's own thread pool, which
    ``torch.set_num_threads`` does not reach; on a busy 2-core machine a 2-thread LAPACK call
    can be 10× slower than a 1-thread one, so the demo caps both.
    """
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Silence Lightning's per-fit banners and its warnings about this CPU-only toy setup."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*number of training batches.*")
        warnings.filterwarnings("ignore", message=".*adopt=True.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        warnings.filterwarnings("ignore", message=".*litlogger.*")
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def _evaluate(
    module: nn.Module, suite: Suite, predict: Callable[..., tuple[Tensor, Tensor]]
) -> dict[str, float]:
    scores = evaluate_tasks(module, task_specs(suite, predict=predict))
    return {task: values[METRIC] for task, values in scores.items()}


def pretrain(
    suite: Suite, config: DemoConfig, *, on_step: Callable[[int], None] | None = None
) -> dict[str, Tensor]:
    """State dict of the run's pretrained backbone (the same for every seed; global RNG
    untouched)."""
    with torch.random.fork_rng():
        torch.manual_seed(config.pretrain_seed)
        backbone = ResidualMLP(config.hidden, config.depth)
    return pretrain_backbone(
        backbone,
        suite.pretrain_x,
        suite.pretrain_y,
        steps=config.pretrain_steps,
        lr=config.pretrain_lr,
        seed=config.pretrain_seed,
        on_step=on_step,
    )


def run_seed(
    suite: Suite,
    pretrained: dict[str, Tensor],
    seed: int,
    config: DemoConfig,
    *,
    bar: Any = None,
    keep_module: bool = False,
) -> SeedResult:
    """Fine-tune the K branches and the joint model in one ``Trainer.fit``; merge with every method.

    Args:
        suite: The tasks.
        pretrained: State dict of the pretrained :class:`ResidualMLP`.
        seed: Seed of the heads' initialisation, the batch order and the DARE masks.
        config: The run's configuration.
        bar: A tqdm-like progress bar advanced once per optimizer step (optional).
        keep_module: Return the trained module too (for checks; it holds K + 2 backbones).

    Returns:
        The final scores of every row, the curves of every method, and timings.
    """
    pl.seed_everything(seed, verbose=False)
    backbone = ResidualMLP(config.hidden, config.depth)
    backbone.load_state_dict(pretrained)
    heads = {name: nn.Linear(config.hidden, task.num_classes) for name, task in suite.tasks.items()}
    joint_heads = {
        name: nn.Linear(config.hidden, task.num_classes) for name, task in suite.tasks.items()
    }
    module = MultitaskDemoModule(backbone, heads, joint_heads, lr=config.finetune_lr)
    # Every callback merges the same live branches; the first one also scores the branches
    # themselves (the denominators of the normalised scores), the others skip that repeat.
    callbacks = {
        spec.label: _merge_callback(spec, suite, config, seed, evaluate_branches=index == 0)
        for index, spec in enumerate(config.methods)
    }
    start = time.perf_counter()
    _fit(module, list(callbacks.values()), train_loaders(suite, config, seed), config, bar)
    fit_seconds = time.perf_counter() - start

    tasks = suite.names
    scores: dict[str, dict[str, float]] = {}
    curves: dict[str, list[tuple[int, float]]] = {}
    callback_seconds: dict[str, float] = {}
    merge_seconds: dict[str, float] = {}
    branch_history = {int(r["step"]): r for r in next(iter(callbacks.values())).history}
    for label, callback in callbacks.items():
        final = _final_record(label, callback, config)
        scores[label] = {t: float(final[f"merged/{t}/{METRIC}"]) for t in tasks}
        curves[label] = [
            (int(r["step"]), _normalized_average(r, branch_history[int(r["step"])], tasks))
            for r in callback.history
        ]
        callback_seconds[label] = sum(float(r["merge/total_seconds"]) for r in callback.history)
        merge_seconds[label] = sum(float(r["merge/seconds"]) for r in callback.history)
    scores["branch"] = {
        t: float(branch_history[config.finetune_steps][f"branch/{t}/{METRIC}"]) for t in tasks
    }
    scores["joint"] = _evaluate(module, suite, lambda m, t, b: m.predict_joint(t, b))
    scores["base_heads"] = _evaluate(module, suite, lambda m, t, b: m.predict_base(t, b))

    # Periodic consolidation: one more fit per listed method, whose callback adopts the merge
    # (branches and base reset to it) at every merge; scored against the same branch-alone
    # accuracies as the rest of the table.
    specs = {spec.label: spec for spec in config.methods}
    for label in config.consolidate:
        pl.seed_everything(seed, verbose=False)
        backbone = ResidualMLP(config.hidden, config.depth)
        backbone.load_state_dict(pretrained)
        heads = {
            name: nn.Linear(config.hidden, task.num_classes) for name, task in suite.tasks.items()
        }
        branched = BranchedModule(backbone, heads, lr=config.finetune_lr)
        callback = _merge_callback(
            specs[label], suite, config, seed, evaluate_branches=False, adopt=True
        )
        _fit(branched, [callback], train_loaders(suite, config, seed), config, bar)
        _final_record(label, callback, config)
        row = f"{label}{CONSOLIDATED_SUFFIX}"
        scores[row] = {t: float(callback.history[-1][f"merged/{t}/{METRIC}"]) for t in tasks}
        curves[row] = [
            (int(r["step"]), _normalized_average(r, branch_history[int(r["step"])], tasks))
            for r in callback.history
        ]
    return SeedResult(
        seed=seed,
        scores=scores,
        curves=curves,
        fit_seconds=fit_seconds,
        callback_seconds=callback_seconds,
        merge_seconds=merge_seconds,
        module=module if keep_module else None,
    )


def train_loaders(suite: Suite, config: DemoConfig, seed: int) -> dict[str, DataLoader]:
    """One shuffled training loader a task, each with its own seeded generator."""
    return {
        name: DataLoader(
            TensorDataset(task.train_x, task.train_y),
            batch_size=config.batch_size,
            shuffle=True,
            drop_last=True,
            generator=torch.Generator().manual_seed(seed * 1000 + index),
        )
        for index, (name, task) in enumerate(suite.tasks.items())
    }


def _merge_callback(
    spec: MethodSpec,
    suite: Suite,
    config: DemoConfig,
    seed: int,
    *,
    evaluate_branches: bool,
    adopt: bool = False,
) -> Any:
    """The method's MergeCallback: live branches, every ``merge_every`` steps, every task scored."""
    return _labelled_callback_class()(
        spec.label,
        spec.method,
        method_params=spec.params,
        tasks=task_specs(suite),
        branches="live",
        every_n_steps=config.merge_every,
        adopt=adopt,
        seed=seed,
        evaluate_branches=evaluate_branches,
    )


def _fit(
    module: Any, callbacks: list[Any], loaders: dict[str, DataLoader], config: DemoConfig, bar: Any
) -> None:
    """One quiet CPU ``Trainer.fit`` of ``finetune_steps`` optimizer steps."""
    extra = [_progress_callback(bar)] if bar is not None else []
    with _quiet_lightning():
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=config.finetune_steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            callbacks=[*callbacks, *extra],
        )
        trainer.fit(module, train_dataloaders=loaders)


def _final_record(label: str, callback: Any, config: DemoConfig) -> dict[str, Any]:
    """The callback's record of the merge at the last step (an error if it did not merge there)."""
    if not callback.history or callback.history[-1]["step"] != config.finetune_steps:
        raise RuntimeError(f"method {label!r}: no merge at the final step {config.finetune_steps}")
    return callback.history[-1]


def _normalized_average(merged: dict[str, Any], branch: dict[str, Any], tasks: list[str]) -> float:
    """Mean over tasks of merged ÷ branch accuracy, from two callback history records."""
    ratios = [
        float(merged[f"merged/{t}/{METRIC}"]) / float(branch[f"branch/{t}/{METRIC}"]) for t in tasks
    ]
    return sum(ratios) / len(ratios)


def _environment() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }


def run_demo(
    config: DemoConfig,
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
    out_dir: str | Path | None = None,
) -> DemoRun:
    """Pretrain the backbone, run every seed, and (with ``out_dir``) write the report.

    Args:
        config: What to run.
        progress: Show a progress bar over all optimizer steps (pretraining included).
        log: Where one-line status messages go (``None``: nowhere).
        out_dir: If given, write ``results.json``, ``results.csv``, ``per_seed.csv`` and
            ``results.png`` there (see :func:`drm_lightning.demo.report.write_report`).

    Returns:
        The :class:`DemoRun` with every seed's scores.
    """
    start = time.perf_counter()
    with _thread_limits(config.threads):
        suite = build_suite(config.tasks, data_seed=config.data_seed)
        methods = {spec.label: _describe_method(spec) for spec in config.methods}
        fits = 1 + len(config.consolidate)
        total = config.pretrain_steps + len(config.seeds) * fits * config.finetune_steps
        with tqdm(total=total, unit="step", disable=not progress, dynamic_ncols=True) as bar:
            bar.set_description("pretrain")
            t0 = time.perf_counter()
            pretrained = pretrain(suite, config, on_step=lambda _: bar.update(1))
            pretrain_seconds = time.perf_counter() - t0
            results = []
            for seed in config.seeds:
                bar.set_description(f"seed {seed}")
                results.append(run_seed(suite, pretrained, seed, config, bar=bar))
        run = DemoRun(
            config=config,
            seeds=results,
            methods=methods,
            pretrain_seconds=pretrain_seconds,
            wall_seconds=time.perf_counter() - start,
            environment=_environment(),
        )
    if out_dir is not None:
        paths = write_report(run, out_dir)
        if log is not None:
            log("wrote " + ", ".join(str(p) for p in paths))
    return run


def _describe_method(spec: MethodSpec) -> dict[str, Any]:
    method = spec.build()
    return {
        "display": spec.display or spec.label,
        "method": spec.method,
        "given": dict(spec.params),
        "params": method.params.model_dump(mode="json"),
        "paper": method.paper,
    }
