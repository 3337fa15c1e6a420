"""Tiny models, data and probes shared by the ``test_lightning_*`` files (no tests here)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Sampler, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from drm_lightning.evaluation import TaskSpec
from drm_lightning.lightning import BranchedModule

TASKS = ("a", "b", "c")
DIM, HIDDEN, CLASSES = 8, 16, 3


def task_data(task: str, n: int = 64, *, split: int = 0) -> TensorDataset:
    """A linear-teacher classification task; each task has its own teacher."""
    teacher = torch.Generator().manual_seed(100 + TASKS.index(task) if task in TASKS else 999)
    w = torch.randn(DIM, CLASSES, generator=teacher)
    g = torch.Generator().manual_seed(1000 * (split + 1) + sum(map(ord, task)))
    x = torch.randn(n, DIM, generator=g)
    return TensorDataset(x, (x @ w).argmax(-1))


def train_loaders(
    tasks: Sequence[str] = TASKS, batch_size: int = 16, n: int = 64
) -> dict[str, DataLoader]:
    return {t: DataLoader(task_data(t, n), batch_size=batch_size) for t in tasks}


class EpochWindow(Sampler[int]):
    """Epoch *e* reads the *e*-th window of ``size`` consecutive samples (``set_epoch``, which
    Lightning calls at each epoch start, chooses it).

    With it, epochs of ``size / batch_size`` batches walk through the same batch sequence as one
    pass over the dataset, and a resume from an end-of-epoch checkpoint starts exactly where the
    interrupted run stopped (a plain loader would start the epoch over).
    """

    def __init__(self, n: int, size: int) -> None:
        self.n, self.size, self.epoch = n, size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _window(self) -> range:
        return range(min(self.epoch * self.size, self.n), min((self.epoch + 1) * self.size, self.n))

    def __iter__(self) -> Iterator[int]:
        return iter(self._window())

    def __len__(self) -> int:
        return len(self._window())


def epoch_loaders(
    batches_per_epoch: int, tasks: Sequence[str] = TASKS, batch_size: int = 16, n: int = 64
) -> dict[str, DataLoader]:
    """:func:`train_loaders`' batches, in order, cut into epochs of
    ``batches_per_epoch`` batches."""
    return {
        t: DataLoader(
            task_data(t, n),
            batch_size=batch_size,
            sampler=EpochWindow(n, batches_per_epoch * batch_size),
        )
        for t in tasks
    }


def specs(tasks: Sequence[str] = TASKS, n: int = 48, batch_size: int = 16) -> dict[str, TaskSpec]:
    """Two metrics per task: macro accuracy (primary) and micro accuracy."""
    return {
        t: TaskSpec(
            DataLoader(task_data(t, n, split=1), batch_size=batch_size),
            {
                "acc": MulticlassAccuracy(num_classes=CLASSES),
                "micro": MulticlassAccuracy(num_classes=CLASSES, average="micro"),
            },
        )
        for t in tasks
    }


def backbone(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIM, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN))


def branched(tasks: Sequence[str] = TASKS, seed: int = 0, lr: float = 5e-2) -> BranchedModule:
    body = backbone(seed)
    heads = {t: nn.Linear(HIDDEN, CLASSES) for t in tasks}
    return BranchedModule(body, heads, lr=lr)


def acc_specs(
    tasks: Sequence[str] = TASKS, n: int = 48, batch_size: int = 16
) -> dict[str, TaskSpec]:
    """Accuracy only (the common case)."""
    return {
        t: TaskSpec(
            DataLoader(task_data(t, n, split=1), batch_size=batch_size),
            MulticlassAccuracy(num_classes=CLASSES),
        )
        for t in tasks
    }


def trainer(**kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def clone_state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_state_equal(a: dict[str, Tensor], b: dict[str, Tensor], *, exact: bool = True) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], msg=k)


class Probe(Callback):
    """Records the module's state at ``on_train_batch_end`` (before or after the merge callback)."""

    def __init__(self) -> None:
        self.states: dict[int, dict[str, Tensor]] = {}

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        self.states[trainer.global_step] = clone_state(pl_module)


class MultiHead(pl.LightningModule):
    """One backbone, one head per task, trained on one task per epoch (``current_task``)."""

    def __init__(self, tasks: Sequence[str] = TASKS, seed: int = 0, lr: float = 5e-2) -> None:
        super().__init__()
        self.task_order = list(tasks)
        self.backbone = backbone(seed)
        self.heads = nn.ModuleDict({t: nn.Linear(HIDDEN, CLASSES) for t in tasks})
        self.lr = lr
        self.current_task = self.task_order[0]

    def on_train_epoch_start(self) -> None:
        self.current_task = self.task_order[self.current_epoch % len(self.task_order)]

    def forward(self, x: Tensor, task: str) -> Tensor:
        return self.heads[task](self.backbone(x))

    def predict_task(self, task: str, batch: Any) -> tuple[Tensor, Tensor]:
        x, y = batch
        return self(x, task), y

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        x, y = batch[self.current_task]
        return F.cross_entropy(self(x, self.current_task), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)
