"""ZeRO-3 helpers of the in-loop core: merged partitions, partition swaps, adoption.

Under DeepSpeed ZeRO-3 every rank holds only its flat partition ``p.ds_tensor`` of each
parameter (``p.shape == (0,)`` outside a gather). The core never gathers the whole model:

* :class:`MergedShards` is the target handed to
  :class:`~drm_lightning.distributed.DistributedMerger`: it looks like the module's
  parameters (names, shapes, dtypes, partitioning) but *keeps* the merged values — this
  rank's fp32 partition, or the full value of a persistent parameter — instead of writing
  them, so one merge serves evaluation and adoption.
* :class:`PartitionSwap` writes values into the working partitions only (never the fp32
  master) for evaluation and puts the saved partitions back bit for bit.
* :func:`adopt_values` writes merged values into partitions **and** the optimizer's fp32
  master (``safe_set_local_fp32_param`` through :meth:`ParamSet.write_partition`), so the
  next optimizer step continues from them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchmetrics import Metric

from drm_lightning.distributed import ParamSet, local_partition
from drm_lightning.distributed.tensors import is_zero3_param


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class MergedShards(ParamSet):
    """A merge target that stores the merged values instead of writing them.

    ``values[name]`` is this rank's padded flat partition (fp32 or wider) for partitioned
    parameters and the full merged tensor for persistent ones (``ds_persist``, full on every
    rank). Ignored tensors never reach it.
    """

    def __init__(self, params: Mapping[str, Tensor], origin: str = "merge target") -> None:
        super().__init__(params, origin)
        self.values: dict[str, Tensor] = {}

    def write_full(self, name: str, value: Tensor, world_size: int = 1, rank: int = 0) -> None:  # noqa: D102
        self.values[name] = value.detach().clone()

    def write_partition(self, name: str, chunk: Tensor) -> None:  # noqa: D102
        self.values[name] = chunk.detach().reshape(-1).clone()

    def reset_optimizer_state(self, name: str, optimizer: Any | None, keys: Iterable[str]) -> None:  # noqa: D102
        return None


def local_values(source: Any, params: ParamSet, names: Iterable[str]) -> dict[str, Tensor]:
    """What :class:`PartitionSwap` loads for ``names`` from ``source``: this rank's partition of
    every ZeRO-3 parameter (persistent ones included), the full tensor of ordinary ones."""
    rank, world = rank_and_world()
    return {
        name: local_partition(source, name, world, rank)
        if is_zero3_param(params.params[name])
        else source.get(name)
        for name in names
    }


def release_gathered(params: Iterable[Tensor], *, persistent_too: bool = False) -> None:
    """Re-partition parameters left gathered (prefetch, reuse distance) so partitions are the truth.

    Local (no collective): dropping a gathered copy that was not modified only frees it.
    Persistent parameters stay full unless ``persistent_too``.
    """
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    for p in params:
        if not is_zero3_param(p) or p.ds_status == ZeroParamStatus.NOT_AVAILABLE:
            continue
        if getattr(p, "ds_persist", False) and not persistent_too:
            continue
        if not getattr(p, "ds_active_sub_modules", None):
            p.partition(has_been_updated=False)


class PartitionSwap:
    """Load values into the working partitions (never the fp32 master); restore them exactly.

    During a swap every ZeRO-3 parameter that is loaded is held as its partition only:
    persistent parameters are re-partitioned first (their next fetch reads the swapped
    partition), and a full value (a persistent parameter's merge result) is cut to this rank's
    partition. ``load`` may be called several times; :meth:`restore` puts back every partition
    (or, for ordinary parameters, every tensor) touched since the swap began and drops any
    gathered copy made meanwhile, so the next forward gathers the restored partitions.
    """

    def __init__(self, params: ParamSet) -> None:
        self.params = params
        self._backup: dict[str, Tensor] = {}

    def _held(self, name: str) -> Tensor:
        p = self.params.params[name]
        return p.ds_tensor if is_zero3_param(p) else p.data

    @torch.no_grad()
    def load(self, values: Mapping[str, Tensor]) -> None:
        unknown = [k for k in values if k not in self.params.params]
        if unknown:
            raise KeyError(f"cannot load weights for unknown parameters: {unknown[:10]}")
        release_gathered([self.params.params[k] for k in values], persistent_too=True)
        for name, value in values.items():
            held = self._held(name)
            if name not in self._backup:
                self._backup[name] = held.detach().clone()
            if held is not self.params.params[name].data:
                value = as_partition(value, held.numel())
            held.copy_(value.to(held.dtype).reshape(held.shape))

    @torch.no_grad()
    def restore(self) -> None:
        for name, saved in self._backup.items():
            self._held(name).copy_(saved)
        release_gathered([self.params.params[k] for k in self._backup], persistent_too=True)
        self._backup.clear()


def as_partition(value: Tensor, size: int) -> Tensor:
    """This rank's padded flat partition of ``value`` (returned as is when it already is one)."""
    flat = value.reshape(-1)
    if flat.numel() == size:
        return flat
    rank, _ = rank_and_world()
    chunk = torch.zeros(size, dtype=flat.dtype)
    piece = flat[rank * size : (rank + 1) * size]
    chunk[: piece.numel()] = piece
    return chunk


@torch.no_grad()
def adopt_values(targets: Iterable[ParamSet], values: Mapping[str, Tensor]) -> None:
    """Make ``values`` the live weights of each target: partitions, persistent data, fp32 master."""
    rank, world = rank_and_world()
    for target in targets:
        # Persistent parameters too: every ZeRO-3 parameter is then written as its partition
        # (and master); the next forward gathers the adopted values.
        release_gathered(target.params.values(), persistent_too=True)
        for name, value in values.items():
            p = target.params[name]
            if is_zero3_param(p):
                target.write_partition(name, as_partition(value, p.ds_tensor.numel()))
            else:
                target.write_full(name, value, world, rank)


@contextmanager
def metrics_unsynced(collection: nn.Module) -> Iterator[None]:
    """Turn off torchmetrics' cross-rank sync (every rank scores every batch itself)."""
    metrics = [m for m in collection.modules() if isinstance(m, Metric)]
    saved = [m.sync_on_compute for m in metrics]
    for m in metrics:
        m.sync_on_compute = False
    try:
        yield
    finally:
        for m, s in zip(metrics, saved):
            m.sync_on_compute = s
