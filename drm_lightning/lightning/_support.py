"""Lightning-side checks of the merge callback: strategies and named validation dataloaders."""

from __future__ import annotations

from collections.abc import Mapping

import lightning.pytorch as pl
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
)
from lightning.pytorch.utilities.model_helpers import is_overridden

from drm_lightning.evaluation import TaskSpec

SAVE_WHILE_SWAPPED = (
    "a checkpoint was requested while MergeCallback has the merged weights swapped into the "
    "module for evaluation; it would store merged weights as the live ones. Save from a hook that "
    "runs outside the merge evaluation (e.g. ModelCheckpoint)."
)
ZERO3_CHECKPOINT = (
    "MergeCallback under ZeRO-3: the checkpoint stores the merge counters and history but not the "
    "base or the snapshots (they are per-rank partitions); after a resume the base is the "
    "module's weights when fit starts, before DeepSpeed loads the checkpoint (the original base "
    "if the module is built the same way), and snapshots start afresh."
)


def resolve_tasks(trainer: pl.Trainer, tasks: Mapping[str, TaskSpec]) -> None:
    """Bind tasks that name a validation dataloader to the datamodule's (or the trainer's) loaders.

    The datamodule's ``val_dataloader()`` is called once more (its loaders as returned, without
    Lightning's distributed sampler: under DDP the callback splits the batches itself).
    """
    named = [spec for spec in tasks.values() if spec.reference is not None]
    if not named:
        return
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None and is_overridden("val_dataloader", datamodule):
        loaders = datamodule.val_dataloader()
    else:
        source = trainer.fit_loop.epoch_loop.val_loop._data_source
        loaders = source.dataloader() if source.is_defined() else None
    for spec in named:
        spec.resolve(loaders)


def check_strategy(trainer: pl.Trainer, *, adopt: bool, live: bool) -> bool:
    """Refuse unsupported strategies; returns whether the strategy is DeepSpeed ZeRO-3."""
    strategy = trainer.strategy
    name = type(strategy).__name__
    if isinstance(strategy, DeepSpeedStrategy):
        if strategy.zero_stage_3:
            return True
        if adopt:
            raise NotImplementedError(
                "MergeCallback(adopt=True) is not supported with DeepSpeed ZeRO-1/2: the "
                "optimizer's fp32 master weights would overwrite the adopted weights at the next "
                "step. Use adopt=False, ZeRO-3 or DDP."
            )
        return False
    if isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)):
        raise NotImplementedError(
            f"MergeCallback does not support {name}: parameters are sharded across ranks. Use DDP "
            "or a single device."
        )
    if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        raise NotImplementedError(
            "MergeCallback supports single-device, DDP (ddp, ddp_spawn) and DeepSpeed "
            f"(ZeRO-1/2/3) strategies; got {name}"
        )
    return False
