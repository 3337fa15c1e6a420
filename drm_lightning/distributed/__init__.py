"""Rank-parallel, ZeRO-3-sharded merging: a plan, one family of engines, one entry point.

Merging runs on every rank of the training job, on the parameters where they already live:

* :mod:`~drm_lightning.distributed.plan` — cost-balanced, deterministic assignment of tensors
  to ranks (printable for ``drm-merge --dry-run``; no process group needed);
* :mod:`~drm_lightning.distributed.engines` — single process, torch.distributed replicas
  (DDP) and DeepSpeed ZeRO-3 (gather to one owner, scatter partitions back, fp32 master
  included);
* :mod:`~drm_lightning.distributed.sharded` — DRM without gathering (vertical Gram route,
  element-wise fallback) under ZeRO-3, through the same ``merge_coordinates`` as one process;
* :mod:`~drm_lightning.distributed.streaming` — the disk-to-disk engine ``drm-merge`` runs
  under ``torchrun``: ranks merge their share of the checkpoint's tensors, rank 0 writes;
* :mod:`~drm_lightning.distributed.tensors` — live parameters, ZeRO shard snapshots and
  checkpoints read shard-wise;
* :mod:`~drm_lightning.distributed.merger` — :class:`DistributedMerger` /
  :func:`merge_module_branches`, the entry point for in-memory merges (the Lightning
  callback and the Accelerate hook, through :mod:`drm_lightning.inloop`).

Example:
    >>> import torch
    >>> from drm_lightning.methods import get_method
    >>> target = torch.nn.Linear(3, 2)
    >>> base = {k: torch.zeros_like(v) for k, v in target.state_dict().items()}
    >>> branch = {k: torch.ones_like(v) for k, v in target.state_dict().items()}
    >>> result = merge_module_branches(get_method("ties", density=1.0), target, base,
    ...                                [branch, branch])
    >>> target.bias.tolist(), result.engine
    ([1.0, 1.0], 'single')
"""

from drm_lightning.distributed.comm import (
    Comm,
    DistributedMergeError,
    RankUnresponsiveError,
    kth_largest,
    topk_mask_distributed,
)
from drm_lightning.distributed.engines import (
    EngineStats,
    MergeEngine,
    MergeJob,
    MergeResult,
    ReplicaEngine,
    SingleProcessEngine,
    Zero3Engine,
)
from drm_lightning.distributed.merger import DistributedMerger, merge_module_branches
from drm_lightning.distributed.plan import (
    MergeItem,
    MergePlan,
    RankLoad,
    assign_longest_first,
    build_plan,
)
from drm_lightning.distributed.sharded import ShardedMerger, sharded_rule
from drm_lightning.distributed.tensors import (
    ParamSet,
    ShardSnapshot,
    TensorSet,
    as_tensor_set,
    is_partitioned,
    local_partition,
    read_flat,
)

__all__ = [
    "Comm",
    "DistributedMergeError",
    "DistributedMerger",
    "EngineStats",
    "MergeEngine",
    "MergeItem",
    "MergeJob",
    "MergePlan",
    "MergeResult",
    "ParamSet",
    "RankLoad",
    "RankUnresponsiveError",
    "ReplicaEngine",
    "ShardSnapshot",
    "ShardedMerger",
    "SingleProcessEngine",
    "TensorSet",
    "Zero3Engine",
    "as_tensor_set",
    "assign_longest_first",
    "build_plan",
    "is_partitioned",
    "local_partition",
    "read_flat",
    "kth_largest",
    "merge_module_branches",
    "sharded_rule",
    "topk_mask_distributed",
]
