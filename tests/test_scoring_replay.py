"""Scoring a merge reads each validation dataloader once, and leaves torch's global RNG as it was.

The merge and each task's own branch are scored on the same batches: the first pass keeps them
(within a byte budget) and the second replays them. Scoring draws from the global RNG (every
DataLoader iteration takes a seed), so it runs under a forked RNG: a run that merges with
``adopt=False`` trains exactly as the same run without the front end.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from test_accelerate_hook import _accelerator, _branched_model
from test_lightning_common import CLASSES, TASKS, task_data
from torch.nn import functional as F
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

from drm_lightning.accelerate import MergeHook
from drm_lightning.evaluation import TaskSpec
from drm_lightning.evaluation.replay import ReplayBatches, ReplayBudget, batch_nbytes


class CountingLoader:
    """A DataLoader that counts how often it is iterated."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader
        self.iterations = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        self.iterations += 1
        return iter(self.loader)


def _batches(n: int, size: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.full((size,), float(i)), torch.zeros(size, dtype=torch.int64)) for i in range(n)]


def test_replay_keeps_the_first_pass_and_yields_it_again() -> None:
    loader = CountingLoader(_batches(3))  # type: ignore[arg-type]
    replay = ReplayBatches(loader, max_bytes=1 << 20)
    assert len(replay) == 3 and not replay.replayable
    first = list(replay)
    assert replay.replayable and loader.iterations == 1
    second = list(replay)
    assert loader.iterations == 1
    assert all(a[0] is b[0] for a, b in zip(first, second, strict=True))


def test_batches_over_the_budget_are_read_again_and_the_budget_is_given_back() -> None:
    batch_bytes = batch_nbytes(_batches(1)[0])  # 4 float32 + 4 int64 = 48 bytes
    assert batch_bytes == 48
    budget = ReplayBudget(2 * batch_bytes)
    loader = CountingLoader(_batches(3))  # type: ignore[arg-type]
    replay = ReplayBatches(loader, budget)
    assert [x[0].item() for x, _ in replay] == [0.0, 1.0, 2.0]
    assert not replay.replayable and budget.left == 2 * batch_bytes
    assert [x[0].item() for x, _ in replay] == [0.0, 1.0, 2.0] and loader.iterations == 2
    # a task that fits takes from the same budget; an iteration stopped early keeps nothing
    small = ReplayBatches(_batches(2), budget)
    next(iter(small))
    assert not small.replayable
    list(small)
    assert small.replayable and budget.left == 0


def test_an_iterable_without_length_is_replayed_too() -> None:
    replay = ReplayBatches(iter(_batches(2)), max_bytes=1 << 20)
    with pytest.raises(TypeError):
        len(replay)
    assert len(list(replay)) == 2 and len(list(replay)) == 2


def _counting_specs() -> dict[str, TaskSpec]:
    return {
        t: TaskSpec(
            CountingLoader(DataLoader(task_data(t, 48, split=1), batch_size=16)),
            MulticlassAccuracy(num_classes=CLASSES),
        )
        for t in TASKS
    }


def _shuffled_train_loaders() -> dict[str, DataLoader]:
    return {t: DataLoader(task_data(t, 64), batch_size=16, shuffle=True) for t in TASKS}


def _fit(
    *, enabled: bool, epochs: int = 3, replay_bytes: int | None = None
) -> tuple[dict[str, torch.Tensor], MergeHook, dict]:
    """Three epochs of 4 steps with shuffled loaders (the global RNG draws each epoch's order)."""
    torch.manual_seed(0)
    accelerator = _accelerator()
    model = _branched_model()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=5e-2, weight_decay=0.0
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    specs = _counting_specs()
    loaders = _shuffled_train_loaders()
    hook = MergeHook(
        accelerator,
        model,
        "drm",
        method_params={"drop_rate": 0.5},
        tasks=specs,
        every_n_steps=3,
        enabled=enabled,
    )
    if replay_bytes is not None:
        hook.core.scorer.replay_bytes = replay_bytes
    with hook:
        for _ in range(epochs):
            for batches in zip(*(loaders[t] for t in TASKS)):
                loss = sum(F.cross_entropy(model(x, t), y) for t, (x, y) in zip(TASKS, batches))
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
                hook.step()
    return {k: v.clone() for k, v in model.state_dict().items()}, hook, specs


def test_merging_with_adopt_false_trains_exactly_as_without_the_front_end() -> None:
    plain, _, _ = _fit(enabled=False)
    merged, hook, _ = _fit(enabled=True)
    assert [r["step"] for r in hook.history] == [3, 6, 9, 12]
    assert plain.keys() == merged.keys()
    for name in plain:
        assert torch.equal(plain[name], merged[name]), name


def test_each_validation_loader_is_read_once_per_merge_and_scores_do_not_change() -> None:
    _, replayed, specs = _fit(enabled=True, epochs=2)
    assert len(replayed.history) == 2
    assert [spec.dataloader.iterations for spec in specs.values()] == [2] * len(TASKS)  # type: ignore[union-attr]
    _, reread, specs = _fit(enabled=True, epochs=2, replay_bytes=0)
    assert [spec.dataloader.iterations for spec in specs.values()] == [4] * len(TASKS)  # type: ignore[union-attr]
    scores = [{k: v for k, v in r.items() if not k.startswith("merge/")} for r in replayed.history]
    assert scores == [
        {k: v for k, v in r.items() if not k.startswith("merge/")} for r in reread.history
    ]
