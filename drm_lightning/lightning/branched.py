"""A LightningModule holding K task branches of one backbone, for merging live branches."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.nn import functional as F

LossFn = Callable[[Tensor, Tensor], Tensor]


class BranchedModule(pl.LightningModule):
    """K copies of one backbone ("branches") with one head per task, trained side by side.

    ``branches[task]`` and ``heads[task]`` form the model of ``task``; ``base`` is a frozen copy
    of the backbone as given (the merge base: task vectors are ``branch - base``). The module
    is what :class:`~drm_lightning.lightning.MergeCallback` merges with ``branches="live"``:
    only backbones are merged, heads stay per task. Memory: K + 1 copies of the backbone.

    Batches routed by :meth:`training_step`:

    * a mapping ``{task: batch}`` — what Lightning's ``CombinedLoader`` yields when ``fit`` gets
      a dict of dataloaders (tasks missing from the dict, or ``None``, are skipped);
    * a tuple ``(task, batch)`` from one dataloader that tags its batches. Under DDP, a step
      that trains only some branches needs ``strategy="ddp_find_unused_parameters_true"``.

    Every task's loss is summed: branches share no parameter, so each one gets exactly the
    gradient of its own task.

    Override :meth:`task_loss` and :meth:`predict_task` for batches that are not ``(x, y)``,
    and :meth:`configure_optimizers` for another optimizer (default ``AdamW``).

    Args:
        backbone: The shared starting point, copied K + 1 times (it is not used afterwards).
        heads: ``{task: head}``; task names must be valid ``nn.ModuleDict`` keys (no ``.``).
        loss_fn: ``loss_fn(logits, target)``; default cross-entropy.
        lr: Learning rate of the default optimizer.
        weight_decay: Weight decay of the default optimizer.

    Example:
        >>> model = BranchedModule(nn.Linear(4, 8), {"a": nn.Linear(8, 2), "b": nn.Linear(8, 3)})
        >>> model.task_names
        ['a', 'b']
        >>> model(torch.zeros(5, 4), "b").shape
        torch.Size([5, 3])
        >>> batch = {"a": (torch.zeros(5, 4), torch.zeros(5, dtype=torch.long)), "b": None}
        >>> [task for task, _ in model.split_batch(batch)]
        ['a']
    """

    def __init__(
        self,
        backbone: nn.Module,
        heads: Mapping[str, nn.Module],
        *,
        loss_fn: LossFn = F.cross_entropy,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be an nn.Module, got {type(backbone).__name__}")
        if not isinstance(heads, Mapping) or not heads:
            raise ValueError("heads must be a non-empty mapping {task name: head module}")
        bad = [f"{name!r}" for name in heads if not isinstance(name, str) or not name or "." in name]
        bad += [f"{name!r} ({type(h).__name__})" for name, h in heads.items() if not isinstance(h, nn.Module)]
        if bad:
            raise ValueError(
                "heads must map non-empty task names without '.' to nn.Module heads; invalid: " + ", ".join(bad)
            )
        self.task_names: list[str] = list(heads)
        self.base = copy.deepcopy(backbone).requires_grad_(False)
        self.branches = nn.ModuleDict({task: copy.deepcopy(backbone) for task in self.task_names})
        self.heads = nn.ModuleDict(dict(heads))
        self.loss_fn = loss_fn
        self.lr = lr
        self.weight_decay = weight_decay

    def forward(self, x: Any, task: str) -> Tensor:
        """Output of ``task``'s head on ``task``'s branch."""
        return self.heads[task](self.branches[task](x))

    def task_loss(self, task: str, batch: Any) -> Tensor:
        """Loss of one task's batch; default ``loss_fn(self(x, task), y)`` for ``batch = (x, y)``."""
        x, y = batch
        return self.loss_fn(self(x, task), y)

    def predict_task(self, task: str, batch: Any) -> tuple[Tensor, Tensor]:
        """``(preds, target)`` for the task's metrics; default ``(self(x, task), y)``."""
        x, y = batch
        return self(x, task), y

    def split_batch(self, batch: Any) -> list[tuple[str, Any]]:
        """``[(task, batch), ...]`` from a ``{task: batch}`` mapping or a ``(task, batch)`` tuple."""
        if isinstance(batch, Mapping):
            items = [(task, b) for task, b in batch.items() if b is not None]
        elif isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], str):
            items = [(batch[0], batch[1])]
        else:
            raise TypeError(
                f"BranchedModule cannot route a batch of type {type(batch).__name__}: give a "
                "mapping {task: batch} (a dict of dataloaders) or a tuple (task, batch)"
            )
        unknown = [task for task, _ in items if task not in self.heads]
        if unknown:
            raise KeyError(f"batch for unknown task(s) {unknown}; known tasks: {self.task_names}")
        return items

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Sum of the per-task losses of the batch; logs ``train/<task>/loss``."""
        total: Tensor | None = None
        for task, task_batch in self.split_batch(batch):
            loss = self.task_loss(task, task_batch)
            self.log(f"train/{task}/loss", loss.detach(), on_step=True, on_epoch=False)
            total = loss if total is None else total + loss
        if total is None:
            raise ValueError("the batch holds no task data (every entry is None)")
        return total

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """``AdamW`` over the branches and heads (the base stays frozen)."""
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
