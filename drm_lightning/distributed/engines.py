"""Three engines behind one interface: single process, torch.distributed replicas, ZeRO-3.

An engine executes a :class:`~drm_lightning.distributed.plan.MergePlan` for a
:class:`MergeJob` (method, target, base, branches, coefficients). All three produce, for
every tensor, exactly what :func:`drm_lightning.merge.merge_tensor` produces on the full
tensors — the owner of an item literally calls it.

* :class:`SingleProcessEngine` — one process (CPU or one GPU): items in plan order.
* :class:`ReplicaEngine` — every rank holds full weights (DDP). Wave by wave (consecutive
  rounds holding at most 1 GiB of results per rank): every rank merges its items of the wave
  back to back, then each result is broadcast from its owner and written on every rank.
* :class:`Zero3Engine` — DeepSpeed ZeRO-3, parameters partitioned. Sharded items (see
  :mod:`~drm_lightning.distributed.sharded`) are merged slice by slice with no gather. For
  owner items, round k: every rank sends its partition of the base and of each branch of
  each item of the round to that item's owner (``gather``: only the owner ever holds the
  full tensors, one item at a time), owners merge in parallel, and the merged tensor goes
  back as one fp32 partition per rank (``scatter``). Each rank writes its partition into the
  working parameter (``p.ds_tensor``) and into the optimizer's fp32 master
  (``safe_set_local_fp32_param``), so the next optimizer step starts from the merged
  weights; frozen parameters have no master and need only the first. Parameters stay
  partitioned throughout (``p.shape == (0,)``). A persistent parameter (below
  ``stage3_param_persistence_threshold``) is full on every rank: its result is broadcast and
  written in full, partition and master included.

  This is the ``GatheredParameters(params, modifier_rank=owner)`` recipe reduced to what
  it does — a gather to the owner and a write-back of partitions — without materialising
  every parameter on every rank and without the full-tensor
  ``safe_set_full_fp32_param`` (which needs the full value on every rank and cannot narrow
  the padded last partition when ``numel`` is not a multiple of the world size).

Every engine checks for errors at fixed synchronisation points (after reading, after
merging, after writing) and raises :class:`~drm_lightning.distributed.comm.DistributedMergeError`
with the same message on every rank.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import count
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from drm_lightning.distributed.comm import Comm, guarded
from drm_lightning.distributed.plan import EngineKind, MergeItem, MergePlan, ShardablePredicate
from drm_lightning.distributed.sharded import ShardedMerger, sharded_rule
from drm_lightning.distributed.tensors import (
    ParamSet,
    is_partitioned,
    local_partition,
    partition_size,
)
from drm_lightning.merge.plan import TensorSourceLike, input_label, origin_label
from drm_lightning.merge.routing import Routing
from drm_lightning.merge.tensor import check_fits, merge_tensor, tensor_generator
from drm_lightning.methods.base import MergeMethod
from drm_lightning.methods.drm import DRM

OptimizerState = Literal["keep", "reset"]


@dataclass
class MergeJob:
    """Everything an engine needs besides the plan.

    Attributes:
        method: the merge method.
        target: where merged values are written (``None``: collect them, replica/single only).
        base: the base weights θ₀ (a weight source: ``keys``/``meta``/``get``).
        branches: the N branches (weight sources).
        coefficients: N per-branch coefficients.
        compute_dtype: dtype of the merge maths.
        seed: seed of the per-tensor generators of random methods (DARE).
        optimizer_state: ``"keep"`` the optimizer moments or ``"reset"`` (zero) them for
            every merged parameter.
        optimizer: the optimizer whose state is reset (replica/single; ZeRO-3 finds it
            through the parameters).
        state_keys: optimizer state entries zeroed by ``"reset"``.
        collect: also return ``{name: merged tensor}`` (replica/single).
        routing: the tensor routing (for fused-QKV row blocks); ``None``: no splitting.
    """

    method: MergeMethod
    target: ParamSet | None
    base: TensorSourceLike
    branches: Sequence[TensorSourceLike]
    coefficients: Sequence[float]
    compute_dtype: torch.dtype = torch.float32
    seed: int = 0
    optimizer_state: OptimizerState = "keep"
    optimizer: Any = None
    state_keys: Sequence[str] = ("exp_avg", "exp_avg_sq")
    collect: bool = False
    routing: Routing | None = None


@dataclass
class EngineStats:
    """What one rank did during a merge.

    Attributes:
        owner_items: items this rank merged as owner.
        sharded_items: items merged slice-wise by all ranks.
        max_full_numel: the most elements of *full* (unpartitioned) tensors this rank held
            at once — gathered inputs, compute copies and the merged tensor of one item.
        seconds: wall time of the merge on this rank.
        comm_seconds, bytes_sent, bytes_received, collectives: from the process group wrapper.
    """

    owner_items: int = 0
    sharded_items: int = 0
    max_full_numel: int = 0
    seconds: float = 0.0
    comm_seconds: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    collectives: int = 0

    def hold(self, numel: int) -> None:
        """Record that ``numel`` elements of full tensors are held at once."""
        self.max_full_numel = max(self.max_full_numel, int(numel))


@dataclass
class MergeResult:
    """Outcome of a merge on one rank: the plan, this rank's stats, collected tensors."""

    plan: MergePlan
    stats: EngineStats
    merged: dict[str, Tensor] | None = None
    engine: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _out_dtype(job: MergeJob, name: str) -> torch.dtype:
    """The dtype the merged value is computed to: at least fp32, so fp32 masters stay exact."""
    return torch.promote_types(job.compute_dtype, torch.float32)


def _merge_full(job: MergeJob, item: MergeItem, base: Tensor, branches: list[Tensor]) -> Tensor:
    """The single-process merge of one item (in ``_out_dtype``)."""
    generator = tensor_generator(job.seed, item.name) if job.method.uses_randomness else None
    origins = [origin_label(job.base, None), *map(origin_label, job.branches, count())]
    value = merge_tensor(
        job.method,
        item.route,
        base,
        branches,
        job.coefficients,
        compute_dtype=job.compute_dtype,
        out_dtype=_out_dtype(job, item.name),
        generator=generator,
        name=item.name,
        origins=origins,
        row_blocks=job.routing.row_blocks(item.name, item.shape) if job.routing is not None else 1,
    )
    check_fits(item.name, value, job.base.meta(item.name).dtype)
    return value


class MergeEngine(ABC):
    """Executes a merge plan; subclasses differ in where tensors live and how results travel."""

    kind: ClassVar[EngineKind]

    def __init__(self, comm: Comm | None = None) -> None:
        self.comm = comm or Comm(None)

    @property
    def world_size(self) -> int:
        """Ranks taking part."""
        return self.comm.world_size

    def shardable(
        self, method: MergeMethod, n_branches: int, target: ParamSet | None, enabled: bool
    ) -> ShardablePredicate | None:
        """Which items may take the sharded mode (only the ZeRO-3 engine has one)."""
        return None

    def run(self, plan: MergePlan, job: MergeJob) -> MergeResult:
        """Execute ``plan``; returns this rank's result."""
        stats = EngineStats()
        start = time.perf_counter()
        merged = self._execute(plan, job, stats)
        stats.seconds = time.perf_counter() - start
        c = self.comm.stats
        stats.comm_seconds, stats.bytes_sent, stats.bytes_received, stats.collectives = (
            c.comm_seconds,
            c.bytes_sent,
            c.bytes_received,
            c.collectives,
        )
        return MergeResult(plan, stats, merged, self.kind)

    @abstractmethod
    def _execute(
        self, plan: MergePlan, job: MergeJob, stats: EngineStats
    ) -> dict[str, Tensor] | None:
        """Do the merge; return collected tensors when ``job.collect``."""

    # ------------------------------------------------------------------ shared helpers
    def _after_write(self, job: MergeJob, name: str) -> None:
        if job.optimizer_state == "reset" and job.target is not None:
            job.target.reset_optimizer_state(name, job.optimizer, job.state_keys)

    def _store(
        self, job: MergeJob, item: MergeItem, value: Tensor, out: dict[str, Tensor] | None
    ) -> None:
        """Write a full merged value into the target and/or the collected dict."""
        if job.target is not None:
            job.target.write_full(item.name, value, self.comm.world_size, self.comm.rank)
            self._after_write(job, item.name)
        if out is not None:
            out[item.name] = value.to(job.base.meta(item.name).dtype)

    def _collect_skipped(
        self, plan: MergePlan, job: MergeJob, out: dict[str, Tensor] | None
    ) -> None:
        """Ignored tensors: the target keeps its value; a collected dict gets the base."""
        if out is None:
            return
        for item in plan.skipped():
            out[item.name] = job.base.get(item.name).detach().clone()


class SingleProcessEngine(MergeEngine):
    """One process: every item in plan order, on the full tensors."""

    kind = "single"

    def _execute(
        self, plan: MergePlan, job: MergeJob, stats: EngineStats
    ) -> dict[str, Tensor] | None:
        out: dict[str, Tensor] | None = {} if job.collect else None
        n = len(job.branches)
        for item in plan.items:
            if item.mode == "skip":
                continue
            base = job.base.get(item.name)
            branches = [b.get(item.name) for b in job.branches]
            stats.hold((n + 2) * item.numel)
            self._store(job, item, _merge_full(job, item, base, branches), out)
            stats.owner_items += 1
        self._collect_skipped(plan, job, out)
        return out


class ReplicaEngine(MergeEngine):
    """torch.distributed replicas (DDP): each rank merges its share, owners broadcast results."""

    kind = "replica"

    def _execute(
        self, plan: MergePlan, job: MergeJob, stats: EngineStats
    ) -> dict[str, Tensor] | None:
        comm = self.comm
        out: dict[str, Tensor] | None = {} if job.collect else None
        n = len(job.branches)
        # Waves, not rounds: each rank merges all its items of a wave back to back, so only the
        # wave's total is synchronised and a round's slow item does not stall the other ranks.
        for wave in plan.waves():
            results: dict[str, Tensor] = {}
            held = 0
            for item in wave:
                if item.owner != comm.rank:
                    continue

                def compute(item: MergeItem = item) -> Tensor:
                    base = job.base.get(item.name)
                    branches = [b.get(item.name) for b in job.branches]
                    stats.hold(held + (n + 2) * item.numel)
                    return _merge_full(job, item, base, branches)

                results[item.name] = guarded(comm, f"merging {item.name!r}", compute, lambda: None)
                held += item.numel
                stats.owner_items += 1
            comm.check(f"merging {[it.name for it in wave]}")
            for item in wave:
                value = results.pop(item.name, None)
                if value is None:
                    value = torch.empty(item.shape, dtype=_out_dtype(job, item.name))
                comm.broadcast(value, item.owner)
                stats.hold(item.numel)
                guarded(
                    comm,
                    f"writing {item.name!r}",
                    lambda item=item, value=value: self._store(job, item, value, out),
                    lambda: None,
                )
            comm.check("writing merged tensors")
        self._collect_skipped(plan, job, out)
        return out


class Zero3Engine(MergeEngine):
    """DeepSpeed ZeRO-3: gather-to-owner / scatter-back for owner items, no gather for sharded
    ones."""

    kind = "zero3"

    def shardable(
        self, method: MergeMethod, n_branches: int, target: ParamSet | None, enabled: bool
    ) -> ShardablePredicate | None:  # noqa: D102
        return sharded_rule(method, n_branches, target, enabled=enabled)

    def _execute(
        self, plan: MergePlan, job: MergeJob, stats: EngineStats
    ) -> dict[str, Tensor] | None:
        if job.collect:
            raise NotImplementedError(
                "collect=True is not available under ZeRO-3: the merged weights are written "
                "into the partitioned target parameters and never exist in full on one rank"
            )
        if job.target is None:
            raise ValueError(
                "the ZeRO-3 engine writes into a target: pass target=<module or ParamSet>"
            )
        comm = self.comm
        sharded = plan.sharded()
        if sharded:
            assert isinstance(job.method, DRM), "the sharded route merges DRM items only"
            ShardedMerger(
                comm,
                job.method,
                job.coefficients,
                job.compute_dtype,
                on_write=lambda name: self._after_write(job, name),
            ).run(sharded, job.target, job.base, job.branches)
            stats.sharded_items += len(sharded)
        for round_items in plan.rounds():
            self._owner_round(round_items, job, stats)
        return None

    def _owner_round(self, items: Sequence[MergeItem], job: MergeJob, stats: EngineStats) -> None:
        comm = self.comm
        world, rank = comm.world_size, comm.rank
        sources = [job.base, *job.branches]
        n = len(job.branches)

        # 1. Local reads: partitions of partitioned sources; the owner reads the others in full.
        local: list[list[Tensor | None]] = []
        for item in items:
            size = partition_size(item.numel, world)
            row: list[Tensor | None] = []
            for k, src in enumerate(sources):
                who = "base" if k == 0 else f"branch {k - 1}"
                if is_partitioned(src, item.name):
                    row.append(
                        guarded(
                            comm,
                            f"reading {item.name!r} from {input_label(who, src)}",
                            lambda src=src, item=item: local_partition(
                                src, item.name, world, rank
                            ).contiguous(),
                            lambda src=src, item=item, size=size: torch.zeros(
                                size, dtype=src.meta(item.name).dtype
                            ),
                        )
                    )
                elif item.owner == rank:
                    row.append(
                        guarded(
                            comm,
                            f"reading {item.name!r} from {input_label(who, src)}",
                            lambda src=src, item=item: src.get(item.name),
                            lambda: None,
                        )
                    )
                else:
                    row.append(None)
            local.append(row)
        comm.check(f"reading the inputs of {[it.name for it in items]}")

        # 2. Partitions to the owners (every rank enters every gather, in item order).
        full: dict[str, list[Tensor]] = {}
        for item, row in zip(items, local):
            tensors: list[Tensor] = []
            for src, value in zip(sources, row):
                if is_partitioned(src, item.name):
                    assert value is not None
                    parts = comm.gather(value, item.owner)
                    if parts is not None:
                        tensors.append(torch.cat(parts)[: item.numel].reshape(item.shape))
                elif value is not None:
                    tensors.append(value)
            if item.owner == rank:
                full[item.name] = tensors
        del local

        # 3. Owners merge (in parallel across ranks).
        merged: dict[str, Tensor] = {}
        for item in items:
            if item.owner != rank:
                continue
            tensors = full.pop(item.name)
            stats.hold((n + 2) * item.numel)

            def compute(item: MergeItem = item, tensors: list[Tensor] = tensors) -> Tensor:
                return _merge_full(job, item, tensors[0], tensors[1:])

            merged[item.name] = guarded(comm, f"merging {item.name!r}", compute, lambda: None)
            stats.owner_items += 1
            del tensors
        comm.check(f"merging {[it.name for it in items]}")

        # 4. Results back: one fp32 partition per rank (or the full value for replicated targets).
        target = job.target
        assert target is not None
        for item in items:
            value = merged.pop(item.name, None)
            mine = item.owner == rank
            if target.is_partitioned(item.name):
                size = partition_size(item.numel, world)
                dtype = _out_dtype(job, item.name)
                chunks = None
                if mine:
                    assert value is not None
                    padded = torch.zeros(size * world, dtype=dtype)
                    padded[: item.numel] = value.reshape(-1)
                    chunks = list(padded.split(size))
                chunk = comm.scatter(chunks, torch.empty(size, dtype=dtype), item.owner)
                guarded(
                    comm,
                    f"writing {item.name!r}",
                    lambda item=item, chunk=chunk: self._write_part(job, item, chunk),
                    lambda: None,
                )
            else:
                if value is None:
                    value = torch.empty(item.shape, dtype=_out_dtype(job, item.name))
                comm.broadcast(value, item.owner)
                stats.hold(item.numel)
                guarded(
                    comm,
                    f"writing {item.name!r}",
                    lambda item=item, value=value: self._store(job, item, value, None),
                    lambda: None,
                )
        comm.check("writing merged tensors")

    def _write_part(self, job: MergeJob, item: MergeItem, chunk: Tensor) -> None:
        assert job.target is not None
        job.target.write_partition(item.name, chunk)
        self._after_write(job, item.name)


ENGINES: dict[str, type[MergeEngine]] = {
    "single": SingleProcessEngine,
    "replica": ReplicaEngine,
    "zero3": Zero3Engine,
}
