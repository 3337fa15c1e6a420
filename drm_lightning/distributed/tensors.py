"""Named tensors as one rank sees them: live parameters, shard snapshots, checkpoints.

The engines read the base and the branches through the one reader protocol,
:class:`~drm_lightning.sources.WeightSource` (``keys``, ``meta``, ``get``, ``get_rows``; an
object with ``keys``/``meta``/``get`` will do, as for the merge loop); any weight source is an
input as it is. A :class:`TensorSet` is a weight source
that adds the partition facts ZeRO-3 needs: per tensor, whether this rank holds only a
*partition* (DeepSpeed ZeRO-3: the flat chunk ``p.ds_tensor`` of the flattened parameter, rank
r holding elements ``[r·P, (r+1)·P)`` with ``P = ceil(numel / world)``; the padding at the end
is uninitialised memory under DeepSpeed, so only the valid range is ever read) or can read any
part of the full tensor (ordinary parameters, CPU snapshots, files on disk). The engines ask
those facts of any input through :func:`is_partitioned` and :func:`local_partition`, and
read a flat range of any input with :func:`read_flat`.

* :class:`ParamSet` — parameters of a module (ZeRO-3-partitioned or not); also a write target.
  Branches that are separate parameter sets inside the training module are
  ``ParamSet.from_module(module.branches[i])``.
* :class:`ShardSnapshot` — a copy of a :class:`ParamSet` taken now; partitioned parameters
  are copied partition-wise, so each rank keeps only its own shard.
* Any other :class:`~drm_lightning.sources.WeightSource` (a state dict, safetensors files on
  disk) holds no partition: :func:`read_flat` reads only the rows that cover a flat range,
  so a rank reading its ZeRO-3 share of a branch file never reads the whole tensor.

Example:
    >>> import torch
    >>> params = ParamSet.from_module(torch.nn.Linear(3, 2))
    >>> params.keys(), params.meta("weight")
    (['weight', 'bias'], TensorMeta(shape=(2, 3), dtype=torch.float32))
    >>> snap = ShardSnapshot.capture(params)
    >>> snap.is_partitioned("weight"), tuple(snap.get("weight").shape)
    (False, (2, 3))
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from drm_lightning.sources.base import TensorMeta, WeightSource
from drm_lightning.sources.factory import open_source
from drm_lightning.sources.memory import StateDictSource


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


class TensorSet(WeightSource):
    """A weight source that also tells which tensors this rank holds as a ZeRO-3 partition.

    Subclasses implement ``keys`` (in a fixed order: a module's, a state dict's), ``meta`` and
    ``get`` (the full tensor; refused for a partition-only tensor), and override
    :meth:`is_partitioned` / :meth:`local_partition` where they hold partitions. Nothing here
    is read from a file: :meth:`files` is empty.
    """

    origin: str = "tensor set"

    def is_partitioned(self, name: str) -> bool:
        """True when this rank holds only its ZeRO-3 partition of ``name``."""
        return False

    def local_partition(self, name: str, world_size: int, rank: int) -> Tensor:
        """This rank's flat ZeRO-3 partition, length ``partition_size`` (zero padded)."""
        return padded_partition(self, name, world_size, rank)

    def files(self) -> list[Path]:  # noqa: D102
        return []

    def describe(self) -> str:  # noqa: D102
        return f"{type(self).__name__} {self.origin} ({len(self.keys())} tensors)"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.origin}, {len(self.keys())} tensors)"


def is_partitioned(source: Any, name: str) -> bool:
    """True when this rank holds only its ZeRO-3 partition of ``name`` in ``source`` (only a
    :class:`TensorSet` can)."""
    return isinstance(source, TensorSet) and source.is_partitioned(name)


def local_partition(source: Any, name: str, world_size: int, rank: int) -> Tensor:
    """This rank's flat ZeRO-3 partition of ``name`` in ``source``, zero padded."""
    if isinstance(source, TensorSet):
        return source.local_partition(name, world_size, rank)
    return padded_partition(source, name, world_size, rank)


def padded_partition(source: Any, name: str, world_size: int, rank: int) -> Tensor:
    """``rank``'s partition cut from a source that reads any part of ``name``
    (:func:`read_flat`), zero padded."""
    meta = source.meta(name)
    size = partition_size(meta.numel, world_size)
    start, stop = held_range(meta.numel, world_size, rank)
    out = torch.zeros(size, dtype=meta.dtype)
    out[: stop - start] = read_flat(source, name, start, stop)
    return out


def read_flat(source: Any, name: str, start: int, stop: int) -> Tensor:
    """Elements ``start:stop`` of ``name`` flattened (a tensor this rank can read in full):
    only the rows that cover the range, with the source's ``get_rows`` (a slice read for a
    safetensors file), or from ``get`` for a reader without it."""
    meta = source.meta(name)
    shape = tuple(int(s) for s in meta.shape)
    if stop <= start:
        return torch.empty(0, dtype=meta.dtype)
    get_rows = getattr(source, "get_rows", None)
    if not shape or not callable(get_rows):
        return source.get(name).reshape(-1)[start:stop]
    row = math.prod(shape[1:])
    first, last = start // row, -(-stop // row)
    offset = start - first * row
    return get_rows(name, first, last).reshape(-1)[offset : offset + stop - start]


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

    def keys(self) -> list[str]:  # noqa: D102
        return list(self.params)

    def meta(self, name: str) -> TensorMeta:
        """Full shape (``ds_shape`` under ZeRO-3) and stored dtype (the partition's)."""
        p = self._lookup(self.params, name)
        shape = tuple(int(s) for s in (p.ds_shape if hasattr(p, "ds_shape") else p.shape))
        return TensorMeta(shape, p.ds_tensor.dtype if is_zero3_param(p) else p.dtype)

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

    def get(self, name: str) -> Tensor:  # noqa: D102
        p = self._lookup(self.params, name)
        if self.is_partitioned(name):
            raise NotImplementedError(
                f"{name!r} is ZeRO-3 partitioned; only its partition can be read"
            )
        return p.detach().cpu()

    def __contains__(self, name: object) -> bool:
        return name in self.params

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
        source: WeightSource,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        origin: str | None = None,
    ) -> ShardSnapshot:
        """Copy every tensor of ``source`` now (partitions stay partitions)."""
        active = dist.is_available() and dist.is_initialized()
        world = dist.get_world_size() if active else 1
        rank = dist.get_rank() if active else 0
        tensors: dict[str, Tensor] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        partitioned: list[str] = []
        for name in source.keys():
            shapes[name] = source.meta(name).shape
            if is_partitioned(source, name):
                value = local_partition(source, name, world, rank)
                partitioned.append(name)
            else:
                value = source.get(name)
            tensors[name] = value.detach().to(device=device, dtype=dtype or value.dtype, copy=True)
        return cls(tensors, shapes, partitioned, origin or f"snapshot of {source.origin}")

    def keys(self) -> list[str]:  # noqa: D102
        return list(self.tensors)

    def meta(self, name: str) -> TensorMeta:  # noqa: D102
        if name not in self.tensors:
            raise self._missing(name)
        return TensorMeta(self.shapes[name], self.tensors[name].dtype)

    def is_partitioned(self, name: str) -> bool:  # noqa: D102
        return name in self.partitioned

    def local_partition(self, name: str, world_size: int, rank: int) -> Tensor:  # noqa: D102
        if name in self.partitioned:
            return self.tensors[name]
        return super().local_partition(name, world_size, rank)

    def get(self, name: str) -> Tensor:  # noqa: D102
        if name in self.partitioned:
            raise NotImplementedError(f"{self.origin}: {name!r} is stored as a partition only")
        if name not in self.tensors:
            raise self._missing(name)
        return self.tensors[name]

    def __contains__(self, name: object) -> bool:
        return name in self.tensors


def as_tensor_set(obj: Any, origin: str) -> Any:
    """The reader of a module, state dict, checkpoint path or weight source.

    Modules (and mappings of parameters) become :class:`ParamSet` (live parameters, the
    engines' write target); anything else :func:`~drm_lightning.sources.open_source` opens —
    a state dict, a safetensors file or HF folder (read row-wise, so a rank reads only what
    covers its partition) — is opened by it. A duck-typed reader with ``keys``/``meta``/``get``
    (as the merge loop takes) is used as it is. ``origin`` labels what is built from a module
    or a mapping in messages.
    """
    if isinstance(obj, nn.Module):
        return ParamSet.from_module(obj, origin=origin)
    if isinstance(obj, Mapping) and obj and all(isinstance(v, nn.Parameter) for v in obj.values()):
        return ParamSet(obj, origin)
    if isinstance(obj, Mapping):
        return StateDictSource(obj, origin=origin)
    if isinstance(obj, (WeightSource, str, os.PathLike)):
        return open_source(obj)
    if all(callable(getattr(obj, attr, None)) for attr in ("keys", "meta", "get")):
        return obj
    raise TypeError(
        f"{origin}: expected an nn.Module, a state dict, a weight source or a safetensors path, "
        f"got {type(obj).__name__}"
    )
