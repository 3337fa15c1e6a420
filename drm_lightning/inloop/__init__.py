"""The in-loop merge core shared by the Lightning callback and the Accelerate hook.

Framework-free (no Lightning or Accelerate import): branch providers
(:mod:`~drm_lightning.inloop.providers`: live branches, snapshots, checkpoints), backends
(:mod:`~drm_lightning.inloop.backends`: whole tensors or ZeRO-3 partitions, every merge through
:class:`~drm_lightning.distributed.DistributedMerger`), scoring with torchmetrics
(:mod:`~drm_lightning.inloop.scoring`), schedules, history and checkpoint state
(:class:`MergeCore`), export as a Hugging Face folder (:mod:`~drm_lightning.inloop.export`),
and the options both front ends share, checked once (:class:`MergeOptions`).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from drm_lightning.inloop import BranchedModel, LiveBranches, MergeCore, method_from
    >>> model = BranchedModel(nn.Linear(3, 4), {"a": nn.Linear(4, 2), "b": nn.Linear(4, 2)})
    >>> core = MergeCore(method_from("ties", {"density": 1.0}), LiveBranches(), adopt=True)
    >>> core.start(model, core.make_backend(partitioned=False))
    >>> core.merge(model, step=1, epoch=0)["branches"]
    ['a', 'b']
"""

from drm_lightning.inloop.align import BranchAligner
from drm_lightning.inloop.backends import Backend, DenseBackend, Merged, Zero3Backend
from drm_lightning.inloop.branched import BranchedModel
from drm_lightning.inloop.core import MergeCore, check_tasks, method_from
from drm_lightning.inloop.export import write_export
from drm_lightning.inloop.options import MergeOptions
from drm_lightning.inloop.providers import (
    Branch,
    BranchProvider,
    LiveBranches,
    SingleModelBranches,
    Snapshot,
)
from drm_lightning.inloop.schedule import Schedule
from drm_lightning.inloop.scoring import Scorer

__all__ = [
    "Backend",
    "Branch",
    "BranchAligner",
    "BranchProvider",
    "BranchedModel",
    "DenseBackend",
    "LiveBranches",
    "MergeCore",
    "MergeOptions",
    "Merged",
    "Schedule",
    "Scorer",
    "SingleModelBranches",
    "Snapshot",
    "Zero3Backend",
    "check_tasks",
    "method_from",
    "write_export",
]
