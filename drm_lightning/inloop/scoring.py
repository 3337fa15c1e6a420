"""Score a merge on every task: swap it in, run each task's torchmetrics, swap back.

Every rank calls the same functions for the same tasks in the same order (torchmetrics
synchronises on ``compute()``; ZeRO-3 forwards are collective). How batches are shared:

* the same full dataloader on every rank (the Lightning callback's ``TaskSpec`` loaders): each
  rank scores every ``world``-th batch; under ZeRO-3 only when the batches divide evenly,
  otherwise every rank scores every batch with torchmetrics' sync off (identical weights give
  identical scores);
* per-rank dataloaders (prepared by Accelerate, :func:`is_per_rank`): each rank scores its own
  share and torchmetrics combines them. Shares of different lengths never hang: the metric
  states are reduced once per task, and under ZeRO-3 shorter ranks **pad** with forwards on
  their last batch that are not scored, so every rank runs as many forwards.

The merge and each task's own branch are scored on the same batches, read once per merge
(:class:`~drm_lightning.evaluation.replay.ReplayBatches`), and scoring leaves torch's global
RNG as it found it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence, Sized
from typing import Any

import torch
from torch import nn

from drm_lightning.evaluation import TaskSpec, evaluate_task, summarize_scores
from drm_lightning.evaluation.replay import REPLAY_BYTES, ReplayBatches, ReplayBudget
from drm_lightning.evaluation.tasks import eval_mode, loader_length
from drm_lightning.inloop.backends import Backend, Merged
from drm_lightning.inloop.providers import Branch, BranchProvider
from drm_lightning.inloop.zero3 import metrics_unsynced, rank_and_world


def is_per_rank(loader: Any) -> bool:
    """Whether ``loader`` already yields only this rank's share (an Accelerate-prepared loader).

    Example:
        >>> is_per_rank([1, 2, 3])
        False
    """
    return type(loader).__module__.split(".")[0] == "accelerate"


class Scorer:
    """Per-task scores of merges and branches, with the scores of frozen branches cached.

    Args:
        tasks: ``{task: TaskSpec}``.
        evaluate_branches: Also score each task's own branch (for normalised scores).
    """

    def __init__(
        self,
        tasks: Mapping[str, TaskSpec],
        *,
        evaluate_branches: bool = True,
        replay_bytes: int = REPLAY_BYTES,
    ) -> None:
        self.tasks = dict(tasks)
        self.evaluate_branches = evaluate_branches
        self.replay_bytes = replay_bytes
        self.cache: dict[str, dict[str, float]] = {}
        self._batches: dict[
            str, ReplayBatches
        ] = {}  # during one evaluate(): each task's batches, read once

    def check_loaders(self, name: str) -> None:
        """Refuse, at setup, a task whose dataloader has no batch (``len() == 0``).

        ``name`` (the front end) starts the message.

        Only a length is read: a loader without one (an iterable dataset, a generator) or a
        factory is not iterated, as that would consume or build data; an empty one is found at
        the first merge. An Accelerate-prepared share may be empty when there are several
        ranks (the others' batches make the score).
        """
        world = rank_and_world()[1]
        for task, spec in self.tasks.items():
            loader = spec.dataloader
            if spec.reference is not None or (callable(loader) and not hasattr(loader, "__iter__")):
                continue
            if world > 1 and is_per_rank(loader):
                continue
            if loader_length(loader) == 0:
                raise ValueError(
                    f"{name}: task {task!r}: the validation dataloader is empty (len() == 0), so "
                    "no merge could be scored on it; give it at least one batch (a DataLoader "
                    "with drop_last=True and fewer samples than batch_size has none)"
                )

    def score(self, model: nn.Module, task: str, *, partitioned: bool) -> dict[str, float]:
        """Score ``model`` as it is on one task (batches shared as the module docstring says)."""
        spec = self.tasks[task]
        replay = self._batches.get(task)
        loader = replay.loader if replay is not None else spec.batches()
        batches = replay if replay is not None else loader
        device = _device(model)
        rank, world = rank_and_world()
        if world == 1:
            return evaluate_task(model, task, spec, device=device, batches=batches)
        if is_per_rank(loader):
            pad_to = None
            if partitioned:
                lengths = [None] * world
                torch.distributed.all_gather_object(lengths, loader_length(batches))
                pad_to = max(n or 0 for n in lengths)
            return evaluate_task(
                model, task, spec, device=device, per_rank=True, pad_to=pad_to, batches=batches
            )
        length = loader_length(batches)
        if not partitioned or (length is not None and length % world == 0):
            return evaluate_task(
                model, task, spec, device=device, shard=(rank, world), batches=batches
            )
        with metrics_unsynced(spec.collection):
            return evaluate_task(model, task, spec, device=device, batches=batches)

    def score_merged(
        self,
        model: nn.Module,
        backend: Backend,
        provider: BranchProvider,
        merged: Merged,
        branches: Sequence[Branch],
    ) -> dict[str, dict[str, float]]:
        """Swap the merge in and score every task (per-task tensors from each task's own branch)."""
        out: dict[str, dict[str, float]] = {}
        live_ignored = backend.ignored_live(model, merged) if provider.per_task_ignored else {}
        with backend.swap(model) as swap:
            swap.load(provider.swap_values(model, merged))
            for task in self.tasks:
                if live_ignored:
                    own = own_branch(branches, task)
                    if own is None or own.live:
                        swap.load(live_ignored)
                    else:
                        swap.load(backend.values(model, own.source, list(live_ignored)))
                out[task] = self.score(model, task, partitioned=backend.partitioned)
        return out

    def score_branches(
        self, model: nn.Module, backend: Backend, branches: Sequence[Branch]
    ) -> dict[str, dict[str, float]]:
        """Each task's own branch (the live weights for live branches; frozen ones cached)."""
        out: dict[str, dict[str, float]] = {}
        for task in self.tasks:
            own = own_branch(branches, task)
            if own is None or own.live:
                out[task] = self.score(model, task, partitioned=backend.partitioned)
            elif own.key in self.cache:
                out[task] = self.cache[own.key]
            else:
                with backend.swap(model) as swap:
                    swap.load(
                        backend.values(model, own.source, backend.input_names(model, own.source))
                    )
                    out[task] = self.cache[own.key] = self.score(
                        model, task, partitioned=backend.partitioned
                    )
        return out

    def evaluate(
        self,
        model: nn.Module,
        backend: Backend,
        provider: BranchProvider,
        merged: Merged,
        branches: Sequence[Branch],
    ) -> dict[str, float]:
        """The flat ``merged/…``, ``branch/…``, ``normalized/…`` scores of one merge."""
        return self.evaluate_each(model, backend, provider, [merged], branches)[0]

    def evaluate_each(
        self,
        model: nn.Module,
        backend: Backend,
        provider: BranchProvider,
        merges: Iterable[Merged],
        branches: Sequence[Branch],
    ) -> list[dict[str, float]]:
        """:meth:`evaluate` of each merge of ``merges`` (the α search's scaled merges), all on
        the same batches, the branches scored once.

        ``merges`` is read one merge at a time, each dropped once scored, so a generator
        holds only one in memory.
        """
        if not self.tasks:
            return [{} for _ in merges]
        several = not isinstance(merges, Sized) or len(merges) > 1
        # Scoring draws from torch's global RNG (every DataLoader iteration takes a seed; an
        # Accelerate-prepared loader even synchronises the ranks' states): restore it after, so
        # that merging with adopt=False leaves the training run exactly as it would be without.
        with torch.random.fork_rng(devices=_cuda_devices(model)), eval_mode(model):
            replay = self.evaluate_branches or several
            self._batches = self._replayable_batches() if replay else {}
            try:
                merged_scores = []
                for merged in merges:
                    merged_scores.append(
                        self.score_merged(model, backend, provider, merged, branches)
                    )
                    del merged  # before the next one is built
                branch_scores = (
                    self.score_branches(model, backend, branches) if self.evaluate_branches else {}
                )
            finally:
                self._batches = {}
        primary = {t: spec.primary_name for t, spec in self.tasks.items()}
        return [summarize_scores(m, branch_scores, primary=primary) for m in merged_scores]

    def _replayable_batches(self) -> dict[str, ReplayBatches]:
        """Each task's batches, kept from the merge's pass for its branch's (one byte budget).

        Not for per-rank dataloaders across ranks: their shares differ in size, so ranks could
        decide differently, and iterating such a loader can be collective.
        """
        budget = ReplayBudget(self.replay_bytes)
        world = rank_and_world()[1]
        out = {}
        for task, spec in self.tasks.items():
            loader = spec.batches()
            if world == 1 or not is_per_rank(loader):
                out[task] = ReplayBatches(loader, budget)
        return out


def _cuda_devices(model: nn.Module) -> list[int]:
    device = _device(model)
    return [device.index or 0] if device.type == "cuda" else []


def own_branch(branches: Sequence[Branch], task: str) -> Branch | None:
    """The latest branch labelled ``task``."""
    own = [b for b in branches if b.task == task]
    return own[-1] if own else None


def _device(model: nn.Module) -> torch.device:
    first = next(iter(model.parameters()), None)
    if first is None or first.device.type == "meta":
        return torch.device("cpu")
    return first.device
