"""The in-loop merge core: state and sequence of one merge-during-training, no framework.

:class:`MergeCore` is what the Lightning callback and the Accelerate hook hold. The front end
says *when* (its hooks, its schedule) and with which backend (its strategy); the core does the
rest — capture snapshots, merge through the backend (always
:class:`~drm_lightning.distributed.DistributedMerger`), score every task, adopt, keep the
history, export, and save/restore its state. It imports neither Lightning nor Accelerate.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from drm_lightning.evaluation import TaskSpec
from drm_lightning.inloop.alpha import (
    ScaledDelta,
    alpha_key,
    best_alpha,
    check_alpha_grid,
    check_alpha_search,
)
from drm_lightning.inloop.backends import Backend, DenseBackend, Merged, Zero3Backend
from drm_lightning.inloop.export import write_export
from drm_lightning.inloop.providers import Branch, BranchProvider, Snapshot, coefficient_list
from drm_lightning.inloop.schedule import Schedule
from drm_lightning.inloop.scoring import Scorer
from drm_lightning.inloop.zero3 import rank_and_world
from drm_lightning.merge.routing import Routing
from drm_lightning.methods import MergeMethod, get_method

Message = Callable[[str], None]

ZERO3_WHOLE = (
    "{name}: under ZeRO-3 DeepSpeed keeps every merged parameter whole on every rank, so the "
    "merge ran the {engine} engine on full tensors, not the ZeRO-3 engine on partitions: "
    "parameters with fewer elements than zero_optimization.stage3_param_persistence_threshold "
    "(DeepSpeed's default: 100000) are not partitioned. To partition them, set "
    '"zero_optimization": {{"stage3_param_persistence_threshold": 0}} in the DeepSpeed config.'
)


def method_from(method: str | MergeMethod, params: Mapping[str, Any] | None) -> MergeMethod:
    """A :class:`MergeMethod` from a name and parameters, or the instance given.

    Example:
        >>> method_from("ties", {"density": 0.5}).params.density
        0.5
    """
    if isinstance(method, MergeMethod):
        if params:
            raise ValueError(
                "method_params is only used with a method name, not a MergeMethod instance"
            )
        return method
    if isinstance(method, str):
        return get_method(method, **dict(params or {}))
    raise TypeError(f"method must be a method name or a MergeMethod, got {type(method).__name__}")


def check_tasks(tasks: Mapping[str, TaskSpec] | None) -> dict[str, TaskSpec]:
    """``tasks`` as a dict, with every value checked to be a :class:`TaskSpec`."""
    if tasks is None:
        return {}
    if not isinstance(tasks, Mapping):
        raise TypeError(f"tasks must be a mapping {{task: TaskSpec}}, got {type(tasks).__name__}")
    bad = [f"{k!r} ({type(v).__name__})" for k, v in tasks.items() if not isinstance(v, TaskSpec)]
    if bad:
        raise TypeError(
            "tasks values must be TaskSpec(dataloader, metrics); invalid: " + ", ".join(bad)
        )
    return dict(tasks)


def _rank_zero(message: str) -> None:
    if rank_and_world()[0] == 0:
        warnings.warn(message, UserWarning, stacklevel=3)


class MergeCore:
    """Merge task branches during training, score the merge on every task, keep the history.

    Args:
        method: The merge method.
        provider: Where the branches come from (:mod:`~drm_lightning.inloop.providers`).
        tasks: ``{task: TaskSpec}`` scored at every merge (empty: no scoring).
        routing: Which tensors are merged and which stay per task.
        coefficients: One weight per branch (branch order) or ``{task: weight}``.
        compute_dtype: dtype of the merge arithmetic.
        seed: Seed of random methods; merge *i* uses ``seed + i``.
        evaluate_branches: Also score each task's own branch.
        adopt: Make the merged weights the live weights after each merge.
        name: The front end's name, used in messages.
        warn: Called with each warning (default: ``warnings.warn`` on rank 0).
        info: Called with each information line, one per merge (default: nothing).
        aligner: Permute the branches into one unit order before each merge
            (:class:`~drm_lightning.inloop.align.BranchAligner`; branches of different inits).
        alpha_grid: Search the scale α of the merged delta at each merge: ``base + α·Δ`` scored
            for every α of the grid (or ``"default"``), the best ``merged/average`` kept
            (:mod:`~drm_lightning.inloop.alpha`); needs ``tasks``. Dense weights only.

    Example:
        >>> from drm_lightning.inloop import BranchedModel, LiveBranches
        >>> model = BranchedModel(nn.Linear(3, 4), {"a": nn.Linear(4, 2), "b": nn.Linear(4, 2)})
        >>> core = MergeCore(method_from("task_arithmetic", {"scaling": 0.5}), LiveBranches())
        >>> core.start(model, DenseBackend(core.method))
        >>> record = core.merge(model, step=1, epoch=0)
        >>> record["branches"], torch.equal(core.last_merged["weight"], model.base.weight)
        (['a', 'b'], True)
    """

    def __init__(
        self,
        method: MergeMethod,
        provider: BranchProvider,
        *,
        tasks: Mapping[str, TaskSpec] | None = None,
        routing: Any = None,
        coefficients: Sequence[float] | Mapping[str, float] | None = None,
        compute_dtype: torch.dtype = torch.float32,
        seed: int = 0,
        evaluate_branches: bool = True,
        adopt: bool = False,
        name: str = "MergeCore",
        warn: Message | None = None,
        info: Message | None = None,
        aligner: Any = None,
        alpha_grid: Any = None,
    ) -> None:
        self.method = method
        self.provider = provider
        self.scorer = Scorer(check_tasks(tasks), evaluate_branches=evaluate_branches)
        self.routing = routing or Routing()
        self.coefficients = coefficients
        self.compute_dtype = compute_dtype
        self.seed = seed
        self.adopt = adopt
        self.name = name
        self.warn: Message = warn or _rank_zero
        self.info: Message = info or (lambda message: None)
        self.aligner = aligner
        #: The α grid searched at each merge (``None``: no search).
        self.alpha_grid = check_alpha_grid(alpha_grid)
        self._alpha_higher = check_alpha_search(self.alpha_grid, method, self.tasks, name)
        #: The α chosen by the latest search (kept in :meth:`state_dict`; ``None``: none yet).
        self.alpha: float | None = None
        self.backend: Backend | None = None
        #: One record per merge: step, epoch, branch labels, timings and scores.
        self.history: list[dict[str, Any]] = []
        #: The latest merge (dense: full tensors of the merge target; ZeRO-3: ``None``).
        self.last_merged: dict[str, Tensor] | None = None
        #: Under ZeRO-3: this rank's share of the latest merge.
        self.last_merged_shards: Any = None
        #: This rank's engine statistics of the latest merge.
        self.last_merge_stats: Any = None
        self.last_merge_step: int | None = None
        self.num_merges = 0
        self.merge_schedule = Schedule()
        self.snapshot_schedule = Schedule()
        self._last: Merged | None = None
        self._warned: set[str] = set()
        self.swapped = False

    @property
    def tasks(self) -> dict[str, TaskSpec]:
        """The tasks scored at every merge."""
        return self.scorer.tasks

    def make_backend(self, *, partitioned: bool, group: Any = None) -> Backend:
        """The backend for weights held whole (``partitioned=False``) or as ZeRO-3 partitions."""
        cls = Zero3Backend if partitioned else DenseBackend
        return cls(self.method, routing=self.routing, compute_dtype=self.compute_dtype, group=group)

    def warn_once(self, key: str, message: str) -> None:
        """Warn with ``message`` the first time ``key`` is seen."""
        if key not in self._warned:
            self._warned.add(key)
            self.warn(message)

    # ------------------------------------------------------------------ lifecycle

    def check_model(self, model: nn.Module) -> None:
        """Check that ``model`` fits the provider, that ``tasks`` name every branch of it and that
        no task's dataloader is empty (both front ends call it at setup)."""
        self.provider.check_model(model)
        self.scorer.check_loaders(self.name)
        names = self.provider.tasks(model)
        if names is None or not self.tasks:
            return
        problems: list[str] = []
        missing = [t for t in names if t not in self.tasks]
        unknown = [t for t in self.tasks if t not in names]
        if missing:
            problems.append(
                f"branch task(s) {missing} have no TaskSpec (validation dataloader + metric) in "
                "tasks=; every branch must be scored"
            )
        if unknown:
            problems.append(f"tasks= names {unknown} that are not branches of the module {names}")
        if problems:
            raise ValueError(f"{self.name}: " + "; ".join(problems))

    def start(self, model: nn.Module, backend: Backend) -> None:
        """Record the base and check every input (call on every rank, before the first step)."""
        self.backend = backend
        self.provider.setup(model, backend)
        self.scorer.cache.clear()

    def _need_backend(self) -> Backend:
        if self.backend is None:
            raise RuntimeError(f"{self.name}: start() has not run (no backend)")
        return self.backend

    def capture(
        self, model: nn.Module, *, task: str | None = None, step: int, epoch: int
    ) -> Snapshot:
        """Capture a snapshot of the live model (``branches="snapshots"``), labelled ``task``
        (default: the live model's task, else ``snapshot_<i>``)."""
        return self.provider.capture(model, self._need_backend(), task=task, step=step, epoch=epoch)

    def branches(self, model: nn.Module) -> list[Branch]:
        """The merge inputs now."""
        return self.provider.branches(model, self._need_backend())

    def compute(self, model: nn.Module, branches: Sequence[Branch] | None = None) -> Merged:
        """Merge the branches now (no scoring, no adoption); seed ``seed + num_merges``."""
        backend = self._need_backend()
        branches = self.branches(model) if branches is None else branches
        sources = [b.source for b in branches]
        if self.aligner is not None:  # into the anchor's unit order first (inloop/align.py)
            sources = self.aligner.permute(self.provider.target(model), sources, backend)
        merged = backend.merge(
            self.provider.target(model),
            self.provider.base(model, backend),
            sources,
            coefficient_list(self.coefficients, branches),
            self.seed + self.num_merges,
        )
        if backend.partitioned and merged.engine != "zero3":  # small params stay whole
            self.warn_once("zero3-whole", ZERO3_WHOLE.format(name=self.name, engine=merged.engine))
        return merged

    def merge(self, model: nn.Module, *, step: int, epoch: int) -> dict[str, Any] | None:
        """Merge, score every task, adopt if asked; the history record (``None``: no branch yet)."""
        backend = self._need_backend()
        start = time.perf_counter()
        branches = self.branches(model)
        if not branches:
            self.warn_once(
                "empty",
                f"{self.name}: merge skipped at step {step}: no snapshot captured yet and "
                "include_live=False (the merge schedule fired before the snapshot schedule)",
            )
            return None
        merged = self.compute(model, branches)
        merge_seconds = time.perf_counter() - start
        self.swapped = True
        try:
            if self.alpha_grid is None:
                scores = self.scorer.evaluate(model, backend, self.provider, merged, branches)
            else:
                merged, scores = self._search(model, merged, branches)
        finally:
            self.swapped = False
        if self.adopt:
            backend.adopt(self.provider.adopt_modules(model), merged)
        self._remember(merged, step)
        record: dict[str, Any] = {
            "step": step,
            "epoch": epoch,
            "branches": [b.task for b in branches],
            "merge/seconds": merge_seconds,
            "merge/total_seconds": time.perf_counter() - start,
            **scores,
        }
        self.history.append(record)
        self.info(self.describe(record, merged))
        return record

    def _scaled(self, model: nn.Module, merged: Merged) -> ScaledDelta:
        backend = self._need_backend()
        base = self.provider.base(model, backend)
        target = self.provider.target(model)
        return ScaledDelta(
            merged, lambda name: backend.values(target, base, [name])[name], self.compute_dtype
        )

    def _search(
        self, model: nn.Module, merged: Merged, branches: Sequence[Branch]
    ) -> tuple[Merged, dict[str, Any]]:
        """Score ``base + α·Δ`` for every α of the grid; the best merge and its scores, with
        ``alpha`` and every α's ``alpha/<α>/merged/…`` and ``…/normalized/…`` scores."""
        grid = self.alpha_grid
        assert grid is not None
        scaled = self._scaled(model, merged)
        results = self.scorer.evaluate_each(
            model,
            self._need_backend(),
            self.provider,
            (scaled.at(alpha) for alpha in grid),
            branches,
        )
        averages = {a: r.get("merged/average", float("nan")) for a, r in zip(grid, results)}
        self.alpha = best_alpha(averages, higher=self._alpha_higher)
        scores: dict[str, Any] = {**results[grid.index(self.alpha)], "alpha": self.alpha}
        for alpha, result in zip(grid, results):
            scores.update(
                {
                    alpha_key(alpha) + k: v
                    for k, v in result.items()
                    if k.startswith(("merged/", "normalized/"))
                }
            )
        return scaled.finish(self.alpha), scores

    def _remember(self, merged: Merged, step: int) -> None:
        self._last = merged
        self.last_merge_stats = merged.stats
        self.last_merge_step = step
        if merged.shards is not None:
            self.last_merged_shards = merged.shards
        else:
            self.last_merged = merged.values
        self.num_merges += 1

    def describe(self, record: Mapping[str, Any], merged: Merged) -> str:
        """The one line logged per merge."""
        name = getattr(self.method, "registered_name", self.method.name)
        line = (
            f"{self.name}: merge {self.num_merges} at step {record['step']} (epoch "
            f"{record['epoch']}): {name} of {len(record['branches'])} branches "
            f"{record['branches']} in {record['merge/seconds']:.2f} s ({merged.engine} engine)"
        )
        if "merged/average" in record:
            line += f"; merged/average={record['merged/average']:.4f}"
        if "normalized/average" in record:
            line += f", normalized/average={record['normalized/average']:.4f}"
        if "alpha" in record and self.alpha_grid is not None:
            line += f" at alpha={record['alpha']:g} (best of {len(self.alpha_grid)})"
        return line + f"; {record['merge/total_seconds']:.2f} s with scoring"

    def latest(self, model: nn.Module, *, step: int) -> Merged:
        """The merge of ``step``: the last one if it ran at ``step``, else a new unrecorded one
        (scaled by the latest searched α, if any: a resumed run keeps it)."""
        if self._last is not None and self.last_merge_step == step:
            return self._last
        merged = self.compute(model)
        if self.alpha_grid is not None and self.alpha is not None:
            merged = self._scaled(model, merged).finish(self.alpha)
        return merged

    @contextmanager
    def merged_in(self, model: nn.Module, merged: Merged | None = None) -> Iterator[Merged | None]:
        """The latest merge (or ``merged``) loaded into ``model``; live weights restored on exit.

        Per-task tensors of a single model stay live. Yields ``None`` (and swaps nothing) before
        the first merge.
        """
        merged = merged or self._last
        if merged is None:
            yield None
            return
        backend = self._need_backend()
        self.swapped = True
        try:
            with backend.swap(model) as swap:
                values = self.provider.swap_values(model, merged)
                if self.provider.per_task_ignored:
                    ignored = set(backend.ignored_live(model, merged))
                    values = {k: v for k, v in values.items() if k not in ignored}
                swap.load(values)
                yield merged
        finally:
            self.swapped = False

    def adopt_into(self, model: nn.Module, merged: Merged) -> None:
        """Make ``merged`` the live weights of ``model`` (ignored tensors untouched)."""
        self._need_backend().adopt(self.provider.adopt_modules(model), merged)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Counters, snapshot index and history (small; tensors go to :meth:`payload`)."""
        return {
            "latest_merge_step": self.merge_schedule.latest_step,
            "latest_merge_epoch": self.merge_schedule.latest_epoch,
            "latest_snapshot_step": self.snapshot_schedule.latest_step,
            "latest_snapshot_epoch": self.snapshot_schedule.latest_epoch,
            "num_merges": self.num_merges,
            "snapshots": [
                {"task": s.task, "step": s.step, "epoch": s.epoch, "path": s.path}
                for s in self.provider.snapshots
            ],
            "history": [dict(r) for r in self.history],
            "alpha": self.alpha,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` wrote."""
        self.merge_schedule.load_state_dict(
            {"latest_step": state["latest_merge_step"], "latest_epoch": state["latest_merge_epoch"]}
        )
        self.snapshot_schedule.load_state_dict(
            {
                "latest_step": state["latest_snapshot_step"],
                "latest_epoch": state["latest_snapshot_epoch"],
            }
        )
        self.num_merges = int(state["num_merges"])
        self.history = [dict(r) for r in state.get("history", [])]
        alpha = state.get("alpha")  # absent from checkpoints written before the α search
        self.alpha = None if alpha is None else float(alpha)

    def payload(self) -> dict[str, Any] | None:
        """The provider's tensors (base, snapshots) for a checkpoint."""
        return self.provider.payload(self.backend)

    def load_payload(self, payload: Mapping[str, Any]) -> None:
        """Restore :meth:`payload`; the scores of frozen branches are computed again."""
        if payload.get("mode") != self.provider.kind:
            raise ValueError(
                f"{self.name}: checkpoint written with branches mode {payload.get('mode')!r}, this "
                f"one uses {self.provider.kind!r}; use the same mode to resume"
            )
        self.provider.load_payload(payload)
        self.scorer.cache.clear()

    # ------------------------------------------------------------------ export

    def export(
        self, model: nn.Module, folder: Any, *, step: int, front_end: str, write: bool = True
    ) -> Merged:
        """Write the merge of ``step`` (the last one, or a new one) as a Hugging Face folder.

        Every rank must call it (a new merge is collective); only ``write=True`` ranks write.
        See :func:`~drm_lightning.inloop.export.write_export` for the folder's layout.
        """
        branches = self.branches(model)
        merged = self.latest(model, step=step)
        if write:
            coefficients = coefficient_list(self.coefficients, branches) or [1.0] * len(branches)
            base = self.provider.base(model, self._need_backend())
            parameters = self.method.params.model_dump()
            alpha = self.alpha if self.alpha_grid is not None else None
            if alpha is not None and "scaling" in parameters:  # α is the method's own scale
                parameters["scaling"], alpha = alpha, None
            metadata = {
                "method": getattr(self.method, "registered_name", self.method.name),
                "parameters": parameters,
                "base": getattr(base, "origin", "base"),
                "branches": [
                    {"source": f"{b.task}: {getattr(b.source, 'origin', b.key)}", "coefficient": c}
                    for b, c in zip(branches, coefficients)
                ],
                "trained with": f"drm_lightning {front_end}, step {step}",
            }
            if alpha is not None:
                metadata["alpha (searched scale of the merged delta)"] = alpha
            write_export(folder, model, self.provider, merged.values, metadata)
        return merged
