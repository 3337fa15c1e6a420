"""The merge plan: which rank merges which tensor, decided the same way on every rank.

A plan is a pure function of the tensor list (names, shapes, dtypes, routes), the method,
the number of branches and the world size — no process group, no tensor data — so every
rank computes the identical plan, ``drm-merge --dry-run`` can print it, and tests check it
without launching processes.

Every tensor becomes one :class:`MergeItem` with a *mode*:

* ``"owner"`` — one rank (the owner) gets the whole tensor of the base and of every branch,
  runs :func:`drm_lightning.merge.merge_tensor` and hands the result back (under ZeRO-3 it
  scatters one partition to each rank; with replicas it broadcasts). Any method, any route.
* ``"sharded"`` — every rank merges its own slice and no rank ever holds the whole tensor;
  only possible where the maths is slice-local up to a few small all-reduces
  (see :mod:`drm_lightning.distributed.sharded`): DRM's vertical matrix path (Gram
  all-reduce) and DRM's element-wise fallback path. Only the ZeRO-3 engine uses it.
* ``"skip"`` — ignored tensors: nothing to merge, no communication.

Owner items are assigned longest-job-first: sorted by decreasing cost (name breaks ties),
each goes to the currently least-loaded rank (lowest rank breaks ties), then a few
deterministic move/swap passes lower the most loaded rank further. A sharded item adds
``cost / world_size`` to every rank. The result is within a few percent of the mean load
whenever the largest item is small against the mean; when one item alone is heavier than
the mean (few items, many ranks) no assignment can balance it and :meth:`MergePlan.imbalance`
says so.

Example:
    >>> from drm_lightning.methods import get_method
    >>> entries = [(f"layers.{i}.w", (64, 64), "matrix") for i in range(6)]
    >>> entries += [("norm", (64,), "fallback")]
    >>> plan = build_plan(entries, get_method("drm"), n_branches=4, world_size=2)
    >>> [len(plan.owned_by(r)) for r in range(2)]
    [4, 3]
    >>> plan.max_over_mean() < 1.1
    True
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from drm_lightning.methods.base import MergeMethod, Route

Mode = Literal["owner", "sharded", "skip"]
EngineKind = Literal["single", "replica", "zero3"]

#: Signature of the predicate that decides whether an item may take the sharded mode.
ShardablePredicate = Callable[[str, tuple[int, ...], Route], bool]


WAVE_BYTES = 1 << 30
"""What a rank may hold for one wave: the results of replica rounds (:meth:`MergePlan.waves`),
the working set of sharded matrices (:func:`~drm_lightning.distributed.sharded.matrix_waves`)."""


@dataclass(frozen=True)
class MergeItem:
    """One tensor of the merge.

    Attributes:
        name: parameter name (the same in the base, every branch and the target).
        shape: full (unpartitioned) shape.
        route: ``"matrix"`` | ``"fallback"`` | ``"ignore"`` from
            :class:`~drm_lightning.merge.routing.Routing`.
        cost: estimated FLOPs of merging it (:meth:`MergeMethod.cost`).
        bytes: size of one copy of the tensor in its stored dtype.
        mode: ``"owner"`` | ``"sharded"`` | ``"skip"`` (see the module docstring).
        owner: rank that merges an owner item; ``-1`` for sharded and skipped items.
    """

    name: str
    shape: tuple[int, ...]
    route: Route
    cost: float
    bytes: int
    mode: Mode = "owner"
    owner: int = -1

    @property
    def numel(self) -> int:
        """Number of elements of the full tensor."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class RankLoad:
    """What one rank does and holds under a plan (estimates, for printing and balancing).

    Attributes:
        rank: the rank.
        items: number of owner items it merges.
        cost: FLOPs it computes (its owner items plus its share of the sharded items).
        comm_bytes: bytes it sends plus receives.
        peak_bytes: the largest transient working set of one item (gathered inputs and
            compute copies), on top of the partitions it holds anyway.
    """

    rank: int
    items: int
    cost: float
    comm_bytes: int
    peak_bytes: int


@dataclass
class MergePlan:
    """Items with their modes and owners, plus per-rank load estimates.

    Build it with :func:`build_plan`. The owner items of one rank, in the order that rank
    processes them, are :meth:`owned_by`; :meth:`rounds` groups owner items into the rounds
    the engines run (round k holds the k-th item of every rank, so all ranks compute at the
    same time and enter the collectives of a round in the same order).
    """

    items: list[MergeItem]
    world_size: int
    n_branches: int
    engine: EngineKind = "zero3"
    compute_itemsize: int = 4
    loads: list[RankLoad] = field(default_factory=list)

    # ------------------------------------------------------------------ queries
    def owned_by(self, rank: int) -> list[MergeItem]:
        """Owner items of ``rank`` in processing order (decreasing cost, then name)."""
        return [it for it in self.items if it.mode == "owner" and it.owner == rank]

    def sharded(self) -> list[MergeItem]:
        """Items every rank merges a slice of, in processing order."""
        return [it for it in self.items if it.mode == "sharded"]

    def skipped(self) -> list[MergeItem]:
        """Ignored items."""
        return [it for it in self.items if it.mode == "skip"]

    def rounds(self) -> list[list[MergeItem]]:
        """Owner items grouped by round: round k = the k-th item of each rank, by rank."""
        per_rank = [self.owned_by(r) for r in range(self.world_size)]
        depth = max((len(x) for x in per_rank), default=0)
        return [[x[k] for x in per_rank if k < len(x)] for k in range(depth)]

    def waves(self, max_bytes: int = WAVE_BYTES) -> list[list[MergeItem]]:
        """Consecutive rounds grouped so that no rank holds more than ``max_bytes`` of results.

        Within a wave every rank merges all its items without waiting for the others, then
        the results travel; only the wave's total is synchronised, not each round's slowest
        item. A wave always takes at least one round. The grouping depends on the plan
        alone, so it is the same on every rank.
        """
        waves: list[list[MergeItem]] = []
        current: list[MergeItem] = []
        held = [0] * self.world_size
        for round_items in self.rounds():
            added = [0] * self.world_size
            for it in round_items:
                added[it.owner] += it.numel * self.compute_itemsize
            if current and any(h + a > max_bytes for h, a in zip(held, added)):
                waves.append(current)
                current, held = [], [0] * self.world_size
            current.extend(round_items)
            held = [h + a for h, a in zip(held, added)]
        if current:
            waves.append(current)
        return waves

    def max_over_mean(self) -> float:
        """Most loaded rank's cost divided by the mean cost (1.0 = perfect balance)."""
        costs = [ld.cost for ld in self.loads]
        mean = sum(costs) / len(costs) if costs else 0.0
        return max(costs) / mean if mean > 0 else 1.0

    def imbalance(self) -> str | None:
        """Why the plan cannot be balanced within 10 %, or ``None`` when it is."""
        ratio = self.max_over_mean()
        if ratio <= 1.1:
            return None
        owner_items = [it for it in self.items if it.mode == "owner"]
        mean = sum(ld.cost for ld in self.loads) / max(1, len(self.loads))
        biggest = max(owner_items, key=lambda it: it.cost, default=None)
        if biggest is not None and biggest.cost >= mean:
            return (
                f"max/mean = {ratio:.2f}: item {biggest.name!r} alone costs "
                f"{biggest.cost:.3g} FLOPs, more than the mean rank load {mean:.3g}; "
                "fewer ranks, or the sharded mode, would balance it"
            )
        return (
            f"max/mean = {ratio:.2f} with {len(owner_items)} owner items on {self.world_size} ranks"
        )

    def fingerprint(self) -> str:
        """A short hash of the plan; ranks compare it before the first collective."""
        payload = json.dumps(
            [(it.name, it.shape, it.route, it.mode, it.owner) for it in self.items]
        )
        return hashlib.sha256(f"{self.world_size}|{payload}".encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ output
    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (items, loads and the summary numbers)."""
        return {
            "world_size": self.world_size,
            "n_branches": self.n_branches,
            "engine": self.engine,
            "max_over_mean": self.max_over_mean(),
            "fingerprint": self.fingerprint(),
            "items": [asdict(it) for it in self.items],
            "loads": [asdict(ld) for ld in self.loads],
        }

    def summary(self, *, items: bool = False) -> str:
        """A printable table: one row per rank, optionally one row per item."""
        n_owner = sum(it.mode == "owner" for it in self.items)
        lines = [
            f"merge plan: {len(self.items)} tensors "
            f"({n_owner} owner, {len(self.sharded())} sharded, {len(self.skipped())} skipped), "
            f"{self.n_branches} branches, {self.world_size} rank(s), "
            f"engine {self.engine}; max/mean cost {self.max_over_mean():.3f}",
            f"{'rank':>4}  {'items':>5}  {'GFLOP':>10}  {'comm MiB':>10}  {'peak MiB':>10}",
        ]
        for ld in self.loads:
            lines.append(
                f"{ld.rank:>4}  {ld.items:>5}  {ld.cost / 1e9:>10.2f}  "
                f"{ld.comm_bytes / 2**20:>10.1f}  {ld.peak_bytes / 2**20:>10.1f}"
            )
        warning = self.imbalance()
        if warning:
            lines.append(f"note: {warning}")
        if items:
            lines.append(
                f"{'owner':>5}  {'mode':<7}  {'route':<8}  {'GFLOP':>9}  {'shape':<16}  name"
            )
            for it in self.items:
                who = (
                    "all" if it.mode == "sharded" else ("-" if it.mode == "skip" else str(it.owner))
                )
                lines.append(
                    f"{who:>5}  {it.mode:<7}  {it.route:<8}  {it.cost / 1e9:>9.3f}  "
                    f"{'x'.join(map(str, it.shape)):<16}  {it.name}"
                )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def assign_longest_first(
    costs: Sequence[float], world_size: int, *, base_load: float = 0.0, passes: int = 4
) -> list[int]:
    """Deterministic longest-job-first assignment of jobs to ``world_size`` bins.

    Jobs are taken by decreasing cost (index breaks ties) and each goes to the least-loaded
    bin (lowest index breaks ties). Then up to ``passes`` rounds of improvement: move a job
    off the most loaded bin, or swap one with a lighter bin, whenever that lowers the larger
    of the two loads. Returns the bin of every job, in input order.

    Example:
        >>> assign_longest_first([5, 4, 3, 3, 3], 2)  # greedy gives loads 8/10, one swap 9/9
        [0, 0, 1, 1, 1]
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    loads = [base_load] * world_size
    owner = [0] * len(costs)
    for i in order:
        r = min(range(world_size), key=lambda b: (loads[b], b))
        owner[i] = r
        loads[r] += costs[i]
    for _ in range(passes):
        improved = False
        hi = max(range(world_size), key=lambda b: (loads[b], -b))
        hi_jobs = sorted(
            (i for i in range(len(costs)) if owner[i] == hi), key=lambda i: (-costs[i], i)
        )
        for lo in sorted(range(world_size), key=lambda b: (loads[b], b)):
            if lo == hi:
                continue
            gap = loads[hi] - loads[lo]
            # Move: a job smaller than the gap lowers the maximum of the pair.
            movable = [i for i in hi_jobs if 0 < costs[i] < gap]
            if movable:
                best = min(movable, key=lambda i: (abs(gap / 2 - costs[i]), i))
                owner[best] = lo
                loads[hi] -= costs[best]
                loads[lo] += costs[best]
                improved = True
                break
            # Swap: exchange a job of hi with a smaller job of lo.
            lo_jobs = [j for j in range(len(costs)) if owner[j] == lo]
            best_pair: tuple[float, int, int] | None = None
            for i in hi_jobs:
                for j in lo_jobs:
                    delta = costs[i] - costs[j]
                    if 0 < delta < gap:
                        score = abs(gap / 2 - delta)
                        if best_pair is None or (score, i, j) < best_pair:
                            best_pair = (score, i, j)
            if best_pair is not None:
                _, i, j = best_pair
                owner[i], owner[j] = lo, hi
                loads[hi] += costs[j] - costs[i]
                loads[lo] += costs[i] - costs[j]
                improved = True
                break
        if not improved:
            break
    return owner


def _owner_traffic(
    item: MergeItem, n_branches: int, world: int, engine: EngineKind, itemsize: int
) -> tuple[int, int]:
    """(bytes at the owner, bytes at every other rank) moved for one owner item."""
    if world == 1 or engine == "single":
        return 0, 0
    part = math.ceil(item.numel / world) * itemsize
    if engine == "replica":
        # Broadcast of the merged tensor from the owner (sent to each peer).
        full = item.bytes
        return (world - 1) * full, full
    # ZeRO-3: gather (N + 1) partitions to the owner, scatter fp32 partitions back.
    fp32_part = math.ceil(item.numel / world) * 4
    at_owner = (n_branches + 1) * (world - 1) * part + (world - 1) * fp32_part
    at_peer = (n_branches + 1) * part + fp32_part
    return at_owner, at_peer


def _sharded_traffic(item: MergeItem, n_branches: int, world: int) -> int:
    """Bytes moved per rank for one sharded item (reductions of the Gram and the small vectors)."""
    if world == 1:
        return 0
    if item.route == "matrix":
        n, m = item.shape
        gram = m * m * 4
        basis = m * m * 4  # broadcast of the basis (rank <= m), upper bound
        halo = 2 * (n_branches + 1) * m * 4  # boundary rows in and out
        return 2 * gram + basis + halo + 4 * 2**16 * 8  # + k-th value histograms
    return 4 * 2**16 * 8 * n_branches  # k-th value histograms of the trim, when used


def transient_bytes(
    item: MergeItem, n_branches: int, world: int, compute_itemsize: int, owner: bool
) -> int:
    """Transient bytes for one item on one rank (an estimate: the plan's peaks, the waves)."""
    if item.mode == "sharded":
        rows = math.ceil(item.numel / world)
        extra = item.shape[-1] ** 2 * compute_itemsize * 2 if item.route == "matrix" else 0
        return (2 * n_branches + 3) * rows * compute_itemsize + extra
    if not owner:
        return math.ceil(item.numel / world) * compute_itemsize
    # Gathered inputs (stored dtype) + deltas and base in the compute dtype + merged result.
    return (n_branches + 1) * item.bytes + (n_branches + 2) * item.numel * compute_itemsize


def build_plan(
    entries: Iterable[
        tuple[str, Sequence[int], Route] | tuple[str, Sequence[int], Route, torch.dtype]
    ],
    method: MergeMethod,
    *,
    n_branches: int,
    world_size: int,
    engine: EngineKind = "zero3",
    shardable: ShardablePredicate | None = None,
    compute_dtype: torch.dtype = torch.float32,
    default_dtype: torch.dtype = torch.float32,
) -> MergePlan:
    """Plan a merge: item modes, owners (longest job first) and per-rank load estimates.

    Args:
        entries: ``(name, shape, route)`` or ``(name, shape, route, dtype)`` per tensor, in
            a fixed order (the base model's order); the result does not depend on it.
        method: the merge method (for :meth:`MergeMethod.cost`).
        n_branches: number of branches N.
        world_size: number of ranks.
        engine: ``"single"``, ``"replica"`` or ``"zero3"`` (only changes the traffic and
            memory estimates).
        shardable: ``(name, shape, route) -> bool``; items for which it is true take the
            sharded mode (the ZeRO-3 engine passes its own rule, see
            :func:`drm_lightning.distributed.sharded.sharded_rule`). Default: none.
        compute_dtype: dtype of the merge maths (memory estimate).
        default_dtype: stored dtype when an entry gives none.

    Returns:
        The plan; identical for identical arguments on every rank.
    """
    if n_branches < 1:
        raise ValueError(f"n_branches must be >= 1, got {n_branches}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    raw: list[MergeItem] = []
    seen: set[str] = set()
    for entry in entries:
        name, shape, route = entry[0], tuple(int(s) for s in entry[1]), entry[2]
        dtype = entry[3] if len(entry) > 3 else default_dtype  # type: ignore[misc]
        if name in seen:
            raise ValueError(f"tensor {name!r} appears twice in the merge plan")
        seen.add(name)
        if route == "ignore":
            raw.append(
                MergeItem(name, shape, route, 0.0, math.prod(shape) * dtype.itemsize, "skip")
            )
            continue
        cost = float(method.cost(route, shape, n_branches))
        mode: Mode = (
            "sharded" if shardable is not None and shardable(name, shape, route) else "owner"
        )
        raw.append(MergeItem(name, shape, route, cost, math.prod(shape) * dtype.itemsize, mode))
    sharded_cost = sum(it.cost for it in raw if it.mode == "sharded") / world_size
    # Name order first, so equal costs tie-break by name whatever the input order.
    owner_idx = sorted(
        (i for i, it in enumerate(raw) if it.mode == "owner"), key=lambda i: raw[i].name
    )
    owners = assign_longest_first(
        [raw[i].cost for i in owner_idx], world_size, base_load=sharded_cost
    )
    for i, r in zip(owner_idx, owners):
        it = raw[i]
        raw[i] = MergeItem(it.name, it.shape, it.route, it.cost, it.bytes, it.mode, r)
    # Processing order: decreasing cost, then name (identical on every rank).
    items = sorted(raw, key=lambda it: (-it.cost, it.name))
    csize = compute_dtype.itemsize
    loads = []
    for r in range(world_size):
        mine = [it for it in items if it.mode == "owner" and it.owner == r]
        cost = sharded_cost + sum(it.cost for it in mine)
        comm = 0
        peak = 0
        for it in items:
            if it.mode == "owner":
                itemsize = max(1, it.bytes // max(1, it.numel))
                at_owner, at_peer = _owner_traffic(it, n_branches, world_size, engine, itemsize)
                comm += at_owner if it.owner == r else at_peer
                if engine != "replica" or it.owner == r:
                    peak = max(
                        peak, transient_bytes(it, n_branches, world_size, csize, it.owner == r)
                    )
            elif it.mode == "sharded":
                comm += _sharded_traffic(it, n_branches, world_size)
                peak = max(peak, transient_bytes(it, n_branches, world_size, csize, False))
        loads.append(RankLoad(r, len(mine), cost, comm, peak))
    return MergePlan(items, world_size, n_branches, engine, csize, loads)
