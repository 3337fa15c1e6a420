"""The LightningModule of the demo: K task branches plus a jointly trained reference model."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn
from torch.nn import functional as F

from drm_lightning.lightning import BranchedModule


class MultitaskDemoModule(BranchedModule):
    """:class:`~drm_lightning.lightning.BranchedModule` with a joint multitask model beside it.

    The K branches (one per task, each with its head) are what the merge callbacks merge.
    ``joint`` is one more copy of the pretrained backbone with its own heads
    (``joint_heads``), trained in the same steps on the sum of all the tasks' losses: the
    usual upper reference of model merging (one model trained on every task at once). The
    two share no parameter, so each receives exactly its own gradient, and ``joint`` is never
    merged (the callback only reads ``branches`` and ``base``).

    Args:
        backbone: The pretrained backbone (copied; the argument is not used afterwards).
        heads: ``{task: head}`` of the branches.
        joint_heads: ``{task: head}`` of the joint model (same tasks as ``heads``).
        lr: AdamW learning rate of branches, heads and the joint model.

    Example:
        >>> import torch
        >>> module = MultitaskDemoModule(nn.Linear(4, 8), {"a": nn.Linear(8, 2)},
        ...                              {"a": nn.Linear(8, 2)})
        >>> sorted(name for name, _ in module.named_children())
        ['base', 'branches', 'heads', 'joint', 'joint_heads']
        >>> batch = {"a": (torch.zeros(3, 4), torch.zeros(3, dtype=torch.long))}
        >>> module.predict_joint("a", batch["a"])[0].shape
        torch.Size([3, 2])
    """

    def __init__(
        self,
        backbone: nn.Module,
        heads: Mapping[str, nn.Module],
        joint_heads: Mapping[str, nn.Module],
        *,
        lr: float = 1e-3,
    ) -> None:
        super().__init__(backbone, heads, lr=lr)
        if set(joint_heads) != set(heads):
            raise ValueError(
                f"joint_heads tasks {sorted(joint_heads)} differ from the branch tasks "
                f"{sorted(heads)}"
            )
        self.joint = copy.deepcopy(backbone)
        self.joint_heads = nn.ModuleDict(dict(joint_heads))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Branch losses (as :class:`BranchedModule`) plus the joint model's summed loss."""
        branch_loss = super().training_step(batch, batch_idx)
        joint_loss = branch_loss.new_zeros(())
        for task, (x, y) in self.split_batch(batch):
            joint_loss = joint_loss + F.cross_entropy(self.joint_heads[task](self.joint(x)), y)
        self.log("train/joint/loss", joint_loss.detach(), on_step=True, on_epoch=False)
        return branch_loss + joint_loss

    def predict_joint(self, task: str, batch: Any) -> tuple[Tensor, Tensor]:
        """``(logits, target)`` of the joint model on one task's batch."""
        x, y = batch
        return self.joint_heads[task](self.joint(x)), y

    def predict_base(self, task: str, batch: Any) -> tuple[Tensor, Tensor]:
        """``(logits, target)`` of the pretrained backbone with the task's fine-tuned head."""
        x, y = batch
        return self.heads[task](self.base(x)), y
