"""Named tensor sets as one rank sees them: live parameters, shard snapshots, checkpoints.

The engines read the base and the branches, and write the target, through
:class:`TensorSet`. A set tells, per tensor, whether this rank holds only a *partition*
(DeepSpeed ZeRO-3: the flat chunk ``p.ds_tensor`` of the flattened parameter, rank r holding
elements ``[r·P, (r+1)·P)`` with ``P = ceil(numel / world)``; the padding at the end is
uninitialised memory under DeepSpeed, so only the valid range is ever read) or
can read any part of the full tensor (ordinary parameters, CPU snapshots, files on disk).

* :class:`ParamSet` — parameters of a module (ZeRO-3-partitioned or not); also a write target.
  Branches that are separate parameter sets inside the training module are
  ``ParamSet.from_module(module.branches[i])``.
* :class:`ShardSnapshot` — a copy of a :class:`ParamSet` taken now; partitioned parameters
  are copied partition-wise, so each rank keeps only its own shard.
* :class:`CheckpointShards` — safetensors files on disk, read shard-wise: a rank reads only
  the rows that cover the flat range it asks for.

Example:
    >>> import torch
    >>> params = ParamSet.from_module(torch.nn.Linear(3, 2))
    >>> params.names()
    ['weight', 'bias']
    >>> snap = ShardSnapshot.capture(params)
    >>> snap.is_partitioned("weight"), tuple(snap.read_full("weight").shape)
    (False, (2, 3))
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from drm_lightning.sources.base import TensorMeta


def partition_size(numel: int, world_size: int) -> int:
    """ZeRO-3 partition length: ``ceil(numel / world_size)`` (the last ones padded)."""
    return math.ceil(numel / world_size) if numel else 0


def held_range(numel: int, world_size: int, rank: int) -> tuple[int, int]:
    """The valid (unpadded) flat range ``[start, stop)`` that ``rank``'s partition covers."""
    size = partition_size(numel, world_size)
    start = min(numel, rank * size)
    return start, min(numel, start + size)


def is_zero3_param(tensor: Tensor) -> bool:
    """True for a DeepSpeed ZeRO-3 parameter (it has ``ds_id`` and a partition)."""
    return hasattr(tensor, "ds_id") and getattr(tensor, "ds_tensor", None) is not None


class TensorSet(ABC):
    """A set of named tensors as this rank sees them (see the module docstring)."""

    origin: str = "tensor set"

    @abstractmethod
    def names(self) -> list[str]:
        """Tensor names, in a fixed order."""

    @abstractmethod
    def shape(self, name: str) -> tuple[int, ...]:
        """Full (unpartitioned) shape."""

    @abstractmethod
    def dtype(self, name: str) -> torch.dtype:
        """Stored dtype."""

    def keys(self) -> list[str]:
        """Tensor names (the planner's view, as a weight source's ``keys``)."""
        return self.names()

    def meta(self, name: str) -> TensorMeta:
        """Full shape and stored dtype of ``name`` (the planner's view)."""
        return TensorMeta(self.shape(name), self.dtype(name))

    def is_partitioned(self, name: str) -> bool:
        """True when this rank holds only its ZeRO-3 partition of ``name``."""
        return False

    def local_partition(self, name: str, world_size: int, rank: int) -> Tensor:
        """This rank's flat ZeRO-3 partition, length ``partition_size`` (zero padded)."""
        numel = math.prod(self.shape(name))
        size = partition_size(numel, world_size)
        start, stop = held_range(numel, world_size, rank)
        out = torch.zeros(size, dtype=self.dtype(name))
        out[: stop - start] = self.read_flat(name, start, stop)
        return out

    def read_full(self, name: str) -> Tensor:
        """The full tensor (only for tensors that are not partitioned)."""
        raise NotImplementedError(f"{self.origin} cannot read {name!r} in full")

    def read_flat(self, name: str, start: int, stop: int) -> Tensor:
        """Elements ``[start, stop)`` of the flattened tensor (not partitioned tensors)."""
        return self.read_full(name).reshape(-1)[start:stop]

    def __contains__(self, name: object) -> bool:
        return name in set(self.names())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.origin}, {len(self.names())} tensors)"


class ParamSet(TensorSet):
    """Live parameters (ZeRO-3-partitioned or ordinary); the write target of the engines.

    Args:
        params: ``{name: parameter}``.
        origin: label used in error messages.
    """

    def __init__(self, params: Mapping[str, Tensor], origin: str = "parameters") -> None:
        self.params = dict(params)
        self.origin = origin

    @classmethod
    def from_module(
        cls, module: nn.Module, *, names: Iterable[str] | None = None, origin: str | None = None
    ) -> ParamSet:
        """The parameters of ``module`` (names relative to it), optionally a subset."""
        params = dict(module.named_parameters())
        if names is not None:
            wanted = list(names)
            missing = [n for n in wanted if n not in params]
            if missing:
                raise KeyError(f"{type(module).__name__} has no parameter(s) {missing}")
            params = {n: params[n] for n in wanted}
        return cls(params, origin or type(module).__name__)

    def names(self) -> list[str]:  # noqa: D102
        return list(self.params)

    def shape(self, name: str) -> tuple[int, ...]:  # noqa: D102
        p = self.params[name]
        return tuple(int(s) for s in (p.ds_shape if hasattr(p, "ds_shape") else p.shape))

    def dtype(self, name: str) -> torch.dtype:  # noqa: D102
        p = self.params[name]
        return p.ds_tensor.dtype if is_zero3_param(p) else p.dtype

    def is_partitioned(self, name: str) -> bool:
        """Partitioned ZeRO-3 parameters, except persistent ones while they are full on every rank.

        A persistent parameter holds only its partition until its first forward fetches it, and
        again after a ``GatheredParameters`` exit re-partitioned it: then it counts as partitioned.
        """
        p = self.params[name]
        if not is_zero3_param(p):
            return False
        return not getattr(p, "ds_persist", False) or p.data.numel() != int(p.ds_numel)

    def local_partition(self, name: str, world_size: int, rank: int) -> Tensor:  # noqa: D102
        p = self.params[name]
        if is_zero3_param(p):
            check_partition_layout(name, p, world_size)
            return p.ds_tensor.detach().reshape(-1).cpu()  # no copy on CPU; merge maths runs on CPU
        return super().local_partition(name, world_size, rank)

    def read_full(self, name: str) -> Tensor:  # noqa: D102
        p = self.params[name]
        if self.is_partitioned(name):
            raise NotImplementedError(
                f"{name!r} is ZeRO-3 partitioned; only its partition can be read"
            )
        return p.detach().cpu()

    # ------------------------------------------------------------------ writing
    def write_full(self, name: str, value: Tensor, world_size: int = 1, rank: int = 0) -> None:
        """Set ``name`` to ``value`` (every rank passes the same full value).

        For a persistent ZeRO-3 parameter (full data on every rank, plus its partition and
        master) ``world_size`` and ``rank`` locate this rank's partition.
        """
        p = self.params[name]
        with torch.no_grad():
            if is_zero3_param(p):
                world, rank = world_size, rank
                p.data.copy_(value.to(p.dtype).reshape(p.shape))
                numel = value.numel()
                start, stop = held_range(numel, world, rank)
                chunk = torch.zeros(partition_size(numel, world), dtype=value.dtype)
                chunk[: stop - start] = value.reshape(-1)[start:stop]
                self.write_partition(name, chunk)
            else:
                p.data.copy_(value.to(p.dtype).reshape(p.shape))

    def write_partition(self, name: str, chunk: Tensor) -> None:
        """Set this rank's ZeRO-3 partition and its fp32 master (trainable parameters).

        ``chunk`` is the padded flat partition in a float dtype of at least the master's
        precision. The working partition gets it cast to the parameter dtype; the
        optimizer's fp32 master partition gets it cast to fp32 with
        ``safe_set_local_fp32_param`` (frozen parameters have no master).
        """
        p = self.params[name]
        with torch.no_grad():
            p.ds_tensor.data.copy_(chunk.to(p.ds_tensor.dtype).reshape(p.ds_tensor.shape))
            if p.requires_grad and getattr(p, "_z3_optimizer", None) is not None:
                from deepspeed.utils import safe_set_local_fp32_param

                safe_set_local_fp32_param(p, chunk.to(torch.float32))

    def reset_optimizer_state(self, name: str, optimizer: Any | None, keys: Iterable[str]) -> None:
        """Zero the optimizer moments ``keys`` of ``name`` (ZeRO-3: this rank's partition).

        Step counters are kept (DeepSpeed keeps one per flat group). Missing state (no step
        taken yet) is left alone.
        """
        p = self.params[name]
        if not p.requires_grad:
            return
        if is_zero3_param(p):
            if getattr(p, "_z3_optimizer", None) is None:
                return
            from deepspeed.utils import (
                safe_get_local_optimizer_state,
                safe_set_local_optimizer_state,
            )

            for key in keys:
                try:
                    current = safe_get_local_optimizer_state(p, key)
                except (KeyError, AttributeError):
                    continue
                if current is not None:
                    safe_set_local_optimizer_state(p, torch.zeros_like(current), key)
            return
        if optimizer is None:
            return
        state = optimizer.state.get(p)
        if not state:
            return
        for key in keys:
            value = state.get(key)
            if isinstance(value, Tensor) and value.shape == p.shape:
                value.zero_()


def check_partition_layout(name: str, p: Tensor, world_size: int) -> None:
    """Refuse ZeRO-3 layouts the engine does not handle (hpZ secondary shards, other groups)."""
    size = partition_size(int(p.ds_numel), world_size)
    if p.ds_tensor.numel() != size:
        raise NotImplementedError(
            f"{name!r}: ZeRO-3 partition has {p.ds_tensor.numel()} elements, expected "
            f"ceil({p.ds_numel} / {world_size}) = {size}; partition groups other than the merge "
            "group (MiCS, hpZ) are not supported"
        )
    if getattr(p, "ds_secondary_tensor", None) is not None:
        raise NotImplementedError(
            f"{name!r} has a secondary (hpZ) partition; set zero_hpz_partition_size=1 to merge"
        )


class ShardSnapshot(TensorSet):
    """A frozen copy of a :class:`TensorSet`, each rank keeping only what it holds.

    Partitioned tensors are copied partition-wise (a ZeRO-3 branch snapshot costs every rank
    ``1/world`` of the branch); ordinary tensors are copied in full. Use it to keep the base
    (θ₀) and finished branches while training continues.

    Args:
        tensors: ``{name: tensor}`` — partitions for the names in ``partitioned``.
        shapes: full shapes.
        partitioned: names stored as this rank's partition.
        origin: label used in error messages.
    """

    def __init__(
        self,
        tensors: Mapping[str, Tensor],
        shapes: Mapping[str, tuple[int, ...]],
        partitioned: Iterable[str] = (),
        origin: str = "snapshot",
    ) -> None:
        self.tensors = dict(tensors)
        self.shapes = {k: tuple(v) for k, v in shapes.items()}
        self.partitioned = set(partitioned)
        self.origin = origin

    @classmethod
    def capture(
        cls,
        source: TensorSet,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        origin: str | None = None,
    ) -> ShardSnapshot:
        """Copy every tensor of ``source`` now (partitions stay partitions)."""
        import torch.distributed as dist

        active = dist.is_available() and dist.is_initialized()
        world = dist.get_world_size() if active else 1
        rank = dist.get_rank() if active else 0
        tensors: dict[str, Tensor] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        partitioned: list[str] = []
        for name in source.names():
            shapes[name] = source.shape(name)
            if source.is_partitioned(name):
                value = source.local_partition(name, world, rank)
                partitioned.append(name)
            else:
                value = source.read_full(name)
            tensors[name] = value.detach().to(device=device, dtype=dtype or value.dtype, copy=True)
        return cls(tensors, shapes, partitioned, origin or f"snapshot of {source.origin}")

    def names(self) -> list[str]:  # noqa: D102
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:  # noqa: D102
        return self.shapes[name]

    def dtype(self, name: str) -> torch.dtype:  # noqa: D102
        return self.tensors[name].dtype

    def is_partitioned(self, name: str) -> bool:  # noqa: D102
        return name in self.partitioned

    def local_partition(self, name: str, world_size: int, rank: int) -> Tensor:  # noqa: D102
        if name in self.partitioned:
            return self.tensors[name]
        return super().local_partition(name, world_size, rank)

    def read_full(self, name: str) -> Tensor:  # noqa: D102
        if name in self.partitioned:
            raise NotImplementedError(f"{self.origin}: {name!r} is stored as a partition only")
        return self.tensors[name]


class TensorDictSet(TensorSet):
    """Full tensors in a mapping (a state dict), readable by every rank."""

    def __init__(self, tensors: Mapping[str, Tensor], origin: str = "state dict") -> None:
        self.tensors = tensors
        self.origin = origin

    def names(self) -> list[str]:  # noqa: D102
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:  # noqa: D102
        return tuple(int(s) for s in self.tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:  # noqa: D102
        return self.tensors[name].dtype

    def read_full(self, name: str) -> Tensor:  # noqa: D102
        return self.tensors[name]


class WeightSourceSet(TensorSet):
    """Any :class:`drm_lightning.sources.WeightSource` (``keys``/``meta``/``get``), read in full."""

    def __init__(self, source: Any, origin: str | None = None) -> None:
        self.source = source
        describe = getattr(source, "describe", None)
        self.origin = origin or (describe() if callable(describe) else type(source).__name__)

    def names(self) -> list[str]:  # noqa: D102
        return list(self.source.keys())

    def shape(self, name: str) -> tuple[int, ...]:  # noqa: D102
        return tuple(int(s) for s in self.source.meta(name).shape)

    def dtype(self, name: str) -> torch.dtype:  # noqa: D102
        return self.source.meta(name).dtype

    def read_full(self, name: str) -> Tensor:  # noqa: D102
        return self.source.get(name)


class CheckpointShards(TensorSet):
    """Checkpoint files read shard-wise, through :mod:`drm_lightning.sources`.

    ``read_flat(name, start, stop)`` reads only the rows that cover the flat range (one
    partial row at each end at most) with the source's ``get_rows`` — for safetensors a
    ``get_slice``, so a rank that needs its ZeRO-3 partition of a branch never reads the
    whole tensor. Accepts what :func:`~drm_lightning.sources.open_source` opens (one
    ``.safetensors`` file, an HF folder, sharded or not) and also a folder of
    ``.safetensors`` files without an index.
    """

    def __init__(self, path: str | os.PathLike[str], origin: str | None = None) -> None:
        from drm_lightning.sources import SafetensorsFileSource, open_source

        root = Path(path)
        hf_layout = any(
            (root / f).exists()
            for f in (
                "model.safetensors.index.json",
                "model.safetensors",
                "pytorch_model.bin",
                "pytorch_model.bin.index.json",
            )
        )
        if root.is_dir() and not hf_layout:
            files = sorted(root.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no .safetensors file under {root}")
            sources = [SafetensorsFileSource(f) for f in files]
        else:
            sources = [open_source(root)]
        self.origin = origin or str(root)
        self._source_of = {name: src for src in sources for name in src.keys()}
        self.bytes_read = 0

    def names(self) -> list[str]:  # noqa: D102
        return list(self._source_of)

    def shape(self, name: str) -> tuple[int, ...]:  # noqa: D102
        return tuple(self._source_of[name].meta(name).shape)

    def dtype(self, name: str) -> torch.dtype:  # noqa: D102
        return self._source_of[name].meta(name).dtype

    def _count(self, out: Tensor) -> Tensor:
        self.bytes_read += out.numel() * out.element_size()
        return out

    def read_full(self, name: str) -> Tensor:  # noqa: D102
        return self._count(self._source_of[name].get(name))

    def read_flat(self, name: str, start: int, stop: int) -> Tensor:  # noqa: D102
        shape = self.shape(name)
        if stop <= start:
            return torch.empty(0, dtype=self.dtype(name))
        if not shape:
            return self.read_full(name).reshape(-1)[start:stop]
        row = math.prod(shape[1:])
        first, last = start // row, -(-stop // row)
        rows = self._count(self._source_of[name].get_rows(name, first, last))
        offset = start - first * row
        return rows.reshape(-1)[offset : offset + stop - start]


def as_tensor_set(obj: Any, origin: str) -> TensorSet:
    """Wrap a module, state dict, weight source, checkpoint path or tensor set.

    Modules become :class:`ParamSet` (live parameters), mappings :class:`TensorDictSet`,
    paths :class:`CheckpointShards`, objects with ``keys/meta/get`` :class:`WeightSourceSet`.
    """
    if isinstance(obj, TensorSet):
        return obj
    if isinstance(obj, nn.Module):
        return ParamSet.from_module(obj, origin=origin)
    if isinstance(obj, (str, os.PathLike)):
        return CheckpointShards(obj, origin=origin)
    if isinstance(obj, Mapping):
        if all(isinstance(v, nn.Parameter) for v in obj.values()):
            return ParamSet(obj, origin)
        return TensorDictSet(obj, origin)
    if all(callable(getattr(obj, attr, None)) for attr in ("keys", "meta", "get")):
        return WeightSourceSet(obj, getattr(obj, "origin", None) or origin)
    raise TypeError(
        f"{origin}: expected an nn.Module, a state dict, a weight source, a safetensors path or a "
        f"TensorSet, got {type(obj).__name__}"
    )
