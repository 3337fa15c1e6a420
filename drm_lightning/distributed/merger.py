"""The entry point: :class:`DistributedMerger` and :func:`merge_module_branches`.

Call it on **every rank** with the same arguments (inside a training loop, a Lightning
callback hook, or a script launched by ``torchrun``/``deepspeed``). It validates the inputs
from metadata, builds the same plan on every rank, checks that the plans agree, picks the
engine and runs it.

Typical uses::

    # ZeRO-3: branches are separate parameter sets of the training module; merge into `base`.
    merger = DistributedMerger(get_method("drm", drop_rate=0.8))
    merger.merge(target=engine.module.base, base=theta0_snapshot,
                 branches=[engine.module.branches[t] for t in tasks])

    # Snapshots of a ZeRO-3 model taken during training (each rank keeps its shard only):
    theta0 = ShardSnapshot.capture(ParamSet.from_module(engine.module))
    ...                                  # train task 1
    task1 = ShardSnapshot.capture(ParamSet.from_module(engine.module))
    merger.merge(target=engine.module, base=theta0, branches=[task1, task2])

    # DDP or one process: the same call; `collect=True` also returns the merged state dict.
    result = merger.merge(target=None, base=base_sd, branches=[sd1, sd2], collect=True)

Engine choice (``engine="auto"``): ``"zero3"`` when any target or input tensor is a ZeRO-3
partition, else ``"replica"`` when a process group with more than one rank is initialised,
else ``"single"``.

Example:
    >>> import torch
    >>> from drm_lightning.methods import get_method
    >>> base = {"w": torch.zeros(4, 3), "b": torch.zeros(4)}
    >>> branches = [{"w": torch.ones(4, 3), "b": torch.ones(4)},
    ...             {"w": torch.ones(4, 3), "b": -torch.ones(4)}]
    >>> drm = get_method("drm", drop_rate=0.0)
    >>> result = merge_module_branches(drm, None, base, branches, collect=True)
    >>> result.engine, result.merged["w"][0].tolist()
    ('single', [1.0, 1.0, 1.0])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from drm_lightning.distributed.comm import Comm, DistributedMergeError
from drm_lightning.distributed.engines import (
    ENGINES,
    MergeEngine,
    MergeJob,
    MergeResult,
    OptimizerState,
)
from drm_lightning.distributed.plan import EngineKind, MergePlan, build_plan
from drm_lightning.distributed.tensors import ParamSet, as_tensor_set, is_partitioned
from drm_lightning.merge.plan import (
    TensorSourceLike,
    plan_tensors,
    validate_coefficients,
)
from drm_lightning.merge.routing import Routing
from drm_lightning.methods.base import MergeMethod, Route

EngineChoice = Literal["auto", "single", "replica", "zero3"]


class DistributedMerger:
    """Merge branches into a target on every rank: plan, check, run the right engine.

    Args:
        method: a merge method from :func:`drm_lightning.methods.get_method`.
        routing: name patterns deciding matrix / fallback / ignore (default :class:`Routing`).
        compute_dtype: dtype of the merge maths (float32 or float64).
        seed: seed of the per-tensor generators of random methods (same on every rank).
        engine: ``"auto"`` or an engine name (see the module docstring).
        sharded: let the ZeRO-3 engine merge eligible items without gathering them
            (:mod:`~drm_lightning.distributed.sharded`); ``False`` sends everything to owners.
        optimizer_state: ``"keep"`` the optimizer moments of merged parameters, or
            ``"reset"`` (zero) them.
        group: process group (default: the world). The engines exchange CPU tensors, so
            under NCCL pass a gloo group: ``torch.distributed.new_group(backend="gloo")``.

    Sharding caveats: under ZeRO-3 call it on every rank, outside any
    ``GatheredParameters`` context, between optimizer steps (not between ``backward`` and
    ``step``); hpZ/MiCS partition groups are refused.
    """

    def __init__(
        self,
        method: MergeMethod,
        *,
        routing: Routing | None = None,
        compute_dtype: torch.dtype = torch.float32,
        seed: int = 0,
        engine: EngineChoice = "auto",
        sharded: bool = True,
        optimizer_state: OptimizerState = "keep",
        group: Any = None,
    ) -> None:
        if engine not in ("auto", *ENGINES):
            raise ValueError(
                f"engine must be one of 'auto', {', '.join(map(repr, ENGINES))}; got {engine!r}"
            )
        if optimizer_state not in ("keep", "reset"):
            raise ValueError(f"optimizer_state must be 'keep' or 'reset', got {optimizer_state!r}")
        if compute_dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"compute_dtype must be torch.float32 or torch.float64, got {compute_dtype}"
            )
        self.method = method
        self.routing = routing or Routing()
        self.compute_dtype = compute_dtype
        self.seed = seed
        self.engine_choice = engine
        self.sharded = sharded
        self.optimizer_state = optimizer_state
        self.group = group

    # ------------------------------------------------------------------ pieces
    def _sets(
        self, target: Any, base: Any, branches: Sequence[Any]
    ) -> tuple[ParamSet | None, TensorSourceLike, list[TensorSourceLike]]:
        if not branches:
            raise ValueError("branches is empty: at least one branch is needed to merge")
        target_set = None if target is None else as_tensor_set(target, "target")
        if target_set is not None and not isinstance(target_set, ParamSet):
            raise TypeError(
                "target must be an nn.Module or a mapping of parameters, "
                f"got {type(target).__name__}"
            )
        return (
            target_set,
            as_tensor_set(base, "base"),
            [as_tensor_set(b, f"branch {i}") for i, b in enumerate(branches)],
        )

    def _engine_kind(
        self, comm: Comm, target: ParamSet | None, sets: Sequence[TensorSourceLike]
    ) -> EngineKind:
        if self.engine_choice != "auto":
            return self.engine_choice  # type: ignore[return-value]
        holders = ([target] if target is not None else []) + list(sets)
        if any(is_partitioned(s, n) for s in holders for n in s.keys()):
            return "zero3"
        return "replica" if comm.world_size > 1 else "single"

    def plan(
        self,
        target: nn.Module | Any | None,
        base: Any,
        branches: Sequence[Any],
        *,
        names: Sequence[str] | None = None,
        world_size: int | None = None,
        engine: EngineKind | None = None,
    ) -> MergePlan:
        """The plan :meth:`merge` would run (no collective; ``world_size`` to simulate)."""
        target_set, base_set, branch_sets = self._sets(target, base, branches)
        comm = Comm(self.group)
        kind = engine or self._engine_kind(comm, target_set, [base_set, *branch_sets])
        world = world_size or comm.world_size
        # the planner's checks (the same as the disk job's) on the target and the inputs
        planned = plan_tensors(
            base_set, branch_sets, routing=self.routing, target=target_set, names=names
        )
        entries = [(p.name, p.shape, p.route, p.dtype) for p in planned]
        rule = (
            ENGINES[kind]().shardable(self.method, len(branch_sets), target_set, self.sharded)
            if kind == "zero3"
            else None
        )

        def shardable(n: str, shape: tuple[int, ...], route: Route) -> bool:
            # fused-QKV matrices are merged block by block on an owner
            assert rule is not None
            return self.routing.row_blocks(n, shape) == 1 and rule(n, shape, route)

        return build_plan(
            entries,
            self.method,
            n_branches=len(branch_sets),
            world_size=world,
            engine=kind,
            shardable=None if rule is None else shardable,
            compute_dtype=self.compute_dtype,
        )

    # ------------------------------------------------------------------ run
    def merge(
        self,
        target: nn.Module | Any | None,
        base: Any,
        branches: Sequence[Any],
        *,
        coefficients: Sequence[float] | None = None,
        names: Sequence[str] | None = None,
        optimizer: Any = None,
        collect: bool = False,
    ) -> MergeResult:
        """Merge ``branches`` (relative to ``base``) into ``target`` on every rank.

        Args:
            target: module or parameters written in place (``None`` with ``collect=True``:
                only return the merged tensors; not under ZeRO-3). Ignored tensors are left
                as they are in the target.
            base: θ₀ — module, state dict, :class:`ShardSnapshot`, checkpoint path, source.
            branches: the N branches, same kinds as ``base``.
            coefficients: N per-branch coefficients (default 1.0 each).
            names: tensors to merge (default: every tensor of the target, else of the base).
            optimizer: optimizer whose state ``optimizer_state="reset"`` zeroes (DDP/single).
            collect: also return ``{name: merged tensor}`` on every rank (DDP/single).

        Returns:
            This rank's :class:`MergeResult` (plan, stats, collected tensors).

        Raises:
            ValueError: bad inputs (the same message on every rank, before any merge work).
            DistributedMergeError: a rank failed during the merge (on every rank).
        """
        comm = Comm(self.group)
        problem: str | None = None
        plan: MergePlan | None = None
        try:
            target_set, base_set, branch_sets = self._sets(target, base, branches)
            coefs = validate_coefficients(coefficients, len(branch_sets), self.method)
            kind = self._engine_kind(comm, target_set, [base_set, *branch_sets])
            if target_set is None and not collect:
                raise ValueError(
                    "nothing to do: pass target= (written in place) and/or collect=True"
                )
            if kind == "zero3" and target_set is None:
                raise ValueError(
                    "under ZeRO-3 the merge writes into partitioned parameters: pass target="
                )
            plan = self.plan(target_set, base_set, branch_sets, names=names, engine=kind)
        except (ValueError, TypeError, KeyError, NotImplementedError) as err:
            problem = str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}"
        reports = comm.all_gather_object(problem)
        failures = [(r, p) for r, p in enumerate(reports) if p is not None]
        if failures:
            rank, message = failures[0]
            where = f" (on rank {rank})" if comm.world_size > 1 else ""
            raise ValueError(f"{message}{where}")
        assert plan is not None
        prints = comm.all_gather_object(plan.fingerprint())
        if len(set(prints)) > 1:
            raise DistributedMergeError(
                f"ranks built different merge plans (fingerprints {prints}): "
                "the inputs differ between ranks"
            )
        engine: MergeEngine = ENGINES[plan.engine](comm)
        job = MergeJob(
            self.method,
            target_set,
            base_set,
            branch_sets,
            coefs,
            self.compute_dtype,
            self.seed,
            self.optimizer_state,
            optimizer,
            collect=collect,
            routing=self.routing,
        )
        return engine.run(plan, job)


def merge_module_branches(
    method: MergeMethod,
    target: nn.Module | Any | None,
    base: Any,
    branches: Sequence[Any],
    *,
    coefficients: Sequence[float] | None = None,
    routing: Routing | None = None,
    compute_dtype: torch.dtype = torch.float32,
    seed: int = 0,
    engine: EngineChoice = "auto",
    sharded: bool = True,
    optimizer_state: OptimizerState = "keep",
    optimizer: Any = None,
    names: Sequence[str] | None = None,
    collect: bool = False,
    group: Any = None,
) -> MergeResult:
    """One-call form of :class:`DistributedMerger` (see there and the module docstring)."""
    merger = DistributedMerger(
        method,
        routing=routing,
        compute_dtype=compute_dtype,
        seed=seed,
        engine=engine,
        sharded=sharded,
        optimizer_state=optimizer_state,
        group=group,
    )
    return merger.merge(
        target,
        base,
        branches,
        coefficients=coefficients,
        names=names,
        optimizer=optimizer,
        collect=collect,
    )
