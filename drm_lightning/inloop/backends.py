"""Where merged weights live: full tensors (one process, DDP replicas) or ZeRO-3 partitions.

A backend gives the in-loop core one set of operations — read a module as a merge input,
keep a base or a snapshot, merge, swap merged values in for scoring, read a branch's values,
adopt — so that the core never asks which strategy it runs under. Every merge is one call to
:class:`~drm_lightning.distributed.DistributedMerger` with ``engine="auto"``: the merger itself
chooses the single-process, replica (more than one rank) or ZeRO-3 engine from the process
group and the tensors it is given.

* :class:`DenseBackend` — every rank holds whole tensors (single device, DDP, DeepSpeed
  ZeRO-1/2). Merged values are full tensors, identical on every rank.
* :class:`Zero3Backend` — DeepSpeed ZeRO-3: every rank holds its partitions. Merged values
  are this rank's partitions (:class:`~drm_lightning.inloop.zero3.MergedShards`); swaps touch
  the working partitions only; adoption also writes the optimizer's fp32 master.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from drm_lightning.distributed import (
    DistributedMerger,
    EngineStats,
    ParamSet,
    ShardSnapshot,
)
from drm_lightning.inloop.weights import (
    DeltaSource,
    WeightSwap,
    compute_delta,
    cpu_clone,
    float_state,
    restoring,
)
from drm_lightning.inloop.zero3 import MergedShards, PartitionSwap, adopt_values, local_values
from drm_lightning.merge.plan import plan_merge
from drm_lightning.merge.routing import Routing
from drm_lightning.methods import MergeMethod
from drm_lightning.sources import StateDictSource


@dataclass
class Merged:
    """One merge result.

    ``values``: full merged tensors (dense) or this rank's partitions (ZeRO-3), keyed by the
    names of the merge target; ``shards``: the ZeRO-3 target holding them; ``stats``: the
    engine's statistics; ``engine``: the engine the merger chose.
    """

    values: dict[str, Tensor]
    stats: EngineStats | None = None
    engine: str = "single"
    shards: MergedShards | None = None


def gloo_group(world_size: int) -> Any:
    """A gloo group for the merge engines if the default group is not gloo, else ``None``."""
    if (
        world_size > 1
        and dist.is_available()
        and dist.is_initialized()
        and dist.get_backend() != "gloo"
    ):
        return dist.new_group(backend="gloo")  # the engines exchange CPU tensors
    return None


class Backend(ABC):
    """The operations the in-loop core needs, for one way of holding weights."""

    #: ``True`` when weights are ZeRO-3 partitions (scoring runs the same forwards on every rank).
    partitioned: bool = False

    def __init__(
        self,
        method: MergeMethod,
        *,
        routing: Routing | None = None,
        compute_dtype: torch.dtype = torch.float32,
        group: Any = None,
    ) -> None:
        self.method = method
        self.routing = routing or Routing()
        self.compute_dtype = compute_dtype
        self.group = group

    def merger(self, seed: int = 0) -> DistributedMerger:
        """The merger of every merge and check (the engine is chosen by the merger)."""
        return DistributedMerger(
            self.method,
            routing=self.routing,
            compute_dtype=self.compute_dtype,
            seed=seed,
            group=self.group,
        )

    def ignored(self, names: Iterable[str], shape_of: Any) -> list[str]:
        """The names that the routing leaves per task (``"ignore"``)."""
        return [n for n in names if self.routing.route(n, tuple(shape_of(n))) == "ignore"]

    @abstractmethod
    def module_input(self, module: nn.Module, origin: str, device: str | None = None) -> Any:
        """``module``'s current weights as a merge input (no copy; dense tensors read onto
        ``device``)."""

    @abstractmethod
    def frozen_copy(self, module: nn.Module, origin: str) -> Any:
        """A copy of ``module``'s weights now, kept as a base."""

    @abstractmethod
    def capture(
        self, module: nn.Module, base: Any, *, dtype: torch.dtype | None, origin: str
    ) -> Any:
        """What a snapshot of ``module`` stores (a delta to ``base``, or this rank's partitions)."""

    @abstractmethod
    def snapshot_input(self, stored: Any, base: Any, origin: str) -> Any:
        """The merge input of a stored snapshot (``stored``: delta mapping, file or partitions)."""

    @abstractmethod
    def check(self, target: nn.Module, base: Any, inputs: Sequence[Any]) -> None:
        """Check names, shapes and dtypes from metadata (no collective); raises ``ValueError``."""

    @abstractmethod
    def merge(
        self,
        target: nn.Module,
        base: Any,
        inputs: Sequence[Any],
        coefficients: Sequence[float] | None,
        seed: int,
    ) -> Merged:
        """Merge ``inputs`` against ``base`` for the tensors of ``target`` (not written to)."""

    @abstractmethod
    def swap(self, module: nn.Module) -> Any:
        """A context manager yielding an object whose ``load(values)`` writes into ``module``;
        every value loaded is restored bit for bit on exit."""

    @abstractmethod
    def values(self, module: nn.Module, source: Any, names: Sequence[str]) -> dict[str, Tensor]:
        """``names`` of a merge input, in the form ``swap(module).load`` takes."""

    @abstractmethod
    def input_names(self, module: nn.Module, source: Any) -> list[str]:
        """The names of a merge input that can be loaded into ``module``."""

    @abstractmethod
    def ignored_live(self, module: nn.Module, merged: Merged) -> dict[str, Tensor]:
        """Copies of ``module``'s current per-task (ignored) tensors, as ``load`` takes them."""

    @abstractmethod
    def adopt(self, modules: Sequence[nn.Module], merged: Merged) -> None:
        """Make the merged values the live weights of every module (ignored tensors untouched)."""


class DenseBackend(Backend):
    """Whole tensors on every rank: one process, DDP replicas, DeepSpeed ZeRO-1/2.

    Example:
        >>> from drm_lightning.methods import get_method
        >>> backend = DenseBackend(get_method("task_arithmetic", scaling=1.0))
        >>> target = nn.Linear(2, 1)
        >>> with torch.no_grad():
        ...     _ = target.weight.fill_(0.0), target.bias.fill_(0.0)
        >>> base = backend.frozen_copy(target, "base")
        >>> branch = {"weight": torch.ones(1, 2), "bias": torch.ones(1)}
        >>> backend.merge(target, base, [branch], None, seed=0).values["weight"].tolist()
        [[1.0, 1.0]]
    """

    def module_input(self, module: nn.Module, origin: str, device: str | None = None) -> Any:  # noqa: D102
        return StateDictSource(float_state(module), origin=origin, device=device)

    def frozen_copy(self, module: nn.Module, origin: str) -> Any:  # noqa: D102
        return StateDictSource(cpu_clone(float_state(module)), origin=origin)

    def capture(
        self, module: nn.Module, base: Any, *, dtype: torch.dtype | None, origin: str
    ) -> Any:  # noqa: D102
        return compute_delta(float_state(module), _tensors(base), dtype)

    def snapshot_input(self, stored: Any, base: Any, origin: str) -> Any:  # noqa: D102
        delta = Path(stored) if isinstance(stored, str) else stored
        return DeltaSource(_tensors(base), delta, origin)

    def check(self, target: nn.Module, base: Any, inputs: Sequence[Any]) -> None:  # noqa: D102
        plan_merge(base, list(inputs), routing=self.routing)

    def merge(  # noqa: D102
        self,
        target: nn.Module,
        base: Any,
        inputs: Sequence[Any],
        coefficients: Sequence[float] | None,
        seed: int,
    ) -> Merged:
        result = self.merger(seed).merge(
            None, base, list(inputs), coefficients=coefficients, collect=True
        )
        assert result.merged is not None
        return Merged(dict(result.merged), result.stats, result.engine)

    def swap(self, module: nn.Module) -> Any:  # noqa: D102
        return restoring(WeightSwap(module))

    def values(self, module: nn.Module, source: Any, names: Sequence[str]) -> dict[str, Tensor]:  # noqa: D102
        return {k: source.get(k) for k in names}

    def input_names(self, module: nn.Module, source: Any) -> list[str]:  # noqa: D102
        return list(source.keys())

    def ignored_live(self, module: nn.Module, merged: Merged) -> dict[str, Tensor]:  # noqa: D102
        names = set(self.ignored(merged.values, lambda n: merged.values[n].shape))
        return {k: v.clone() for k, v in float_state(module).items() if k in names}

    @torch.no_grad()
    def adopt(self, modules: Sequence[nn.Module], merged: Merged) -> None:  # noqa: D102
        keep = [
            n
            for n in merged.values
            if n not in self.ignored(merged.values, lambda n: merged.values[n].shape)
        ]
        for module in modules:
            state = module.state_dict(keep_vars=True)
            for name in keep:
                value = merged.values[name]
                state[name].copy_(value.to(state[name].device, state[name].dtype))


class Zero3Backend(Backend):
    """DeepSpeed ZeRO-3: merge, swap and adopt this rank's partitions; never gather the model.

    Merge inputs are partitioned parameter sets (live modules), :class:`ShardSnapshot` copies
    (base and snapshots, each rank keeping its partitions) or checkpoint files read
    shard-wise. Only parameters are merged (buffers keep their live values).
    """

    partitioned = True

    def module_input(self, module: nn.Module, origin: str, device: str | None = None) -> Any:  # noqa: D102
        return ParamSet.from_module(module, origin=origin)

    def frozen_copy(self, module: nn.Module, origin: str) -> Any:  # noqa: D102
        return ShardSnapshot.capture(ParamSet.from_module(module), origin=origin)

    def capture(
        self, module: nn.Module, base: Any, *, dtype: torch.dtype | None, origin: str
    ) -> Any:  # noqa: D102
        return ShardSnapshot.capture(ParamSet.from_module(module), dtype=dtype, origin=origin)

    def snapshot_input(self, stored: Any, base: Any, origin: str) -> Any:  # noqa: D102
        return stored

    def _target(self, target: nn.Module) -> MergedShards:
        return MergedShards(dict(target.named_parameters()), f"merged {type(target).__name__}")

    def check(self, target: nn.Module, base: Any, inputs: Sequence[Any]) -> None:  # noqa: D102
        self.merger().plan(self._target(target), base, list(inputs))

    def merge(  # noqa: D102
        self,
        target: nn.Module,
        base: Any,
        inputs: Sequence[Any],
        coefficients: Sequence[float] | None,
        seed: int,
    ) -> Merged:
        shards = self._target(target)
        result = self.merger(seed).merge(shards, base, list(inputs), coefficients=coefficients)
        return Merged(shards.values, result.stats, result.engine, shards)

    def swap(self, module: nn.Module) -> Any:  # noqa: D102
        return restoring(PartitionSwap(ParamSet.from_module(module)))

    def values(self, module: nn.Module, source: Any, names: Sequence[str]) -> dict[str, Tensor]:  # noqa: D102
        return local_values(source, ParamSet.from_module(module), names)

    def input_names(self, module: nn.Module, source: Any) -> list[str]:  # noqa: D102
        params = dict(module.named_parameters())
        return [k for k in source.keys() if k in params]  # parameters only: buffers are not merged

    def ignored_live(self, module: nn.Module, merged: Merged) -> dict[str, Tensor]:  # noqa: D102
        params = ParamSet.from_module(module)
        names = self.ignored(params.keys(), lambda n: params.meta(n).shape)
        return {k: v.clone() for k, v in local_values(params, params, names).items()}

    @torch.no_grad()
    def adopt(self, modules: Sequence[nn.Module], merged: Merged) -> None:  # noqa: D102
        adopt_values([ParamSet.from_module(m) for m in modules], merged.values)


def _tensors(base: Any) -> Mapping[str, Tensor]:
    """The mapping behind a dense base (a ``StateDictSource`` or a mapping)."""
    if isinstance(base, Mapping):
        return base
    return {k: base.get(k) for k in base.keys()}
