"""Merging without gathering: every rank merges the slice of a tensor it already holds.

Under ZeRO-3 a rank holds a flat chunk of every parameter. Two kinds of item can be merged
from such chunks with only small collectives, so no rank ever holds the whole tensor:

**DRM fallback path (element-wise).** Sign election, coefficients and the disjoint mean act
entry by entry; the only global quantities are the majority sign of the tie-break (one
all-reduce of a sign count, batched over a group of items) and, with
``fallback_trim_rate > 0``, each branch's magnitude threshold (a distributed k-th value,
:func:`~drm_lightning.distributed.comm.kth_largest`). Works on the flat chunks directly.

**DRM vertical matrix path (row-local).** With ``B`` the shared basis (right singular vectors
of the row stack ``[Δ_1; …; Δ_N]``), every step but the basis is row-local (spec §4.7):

1. ``G = Σ_i Δ_iᵀΔ_i`` is a sum over rows: each rank adds its rows' m×m Gram
   (:func:`~drm_lightning.methods.basis.gram_of_rows`, in the basis precision — float64 by
   default), one reduce sends G to the rank that decomposes it, which broadcasts ``B``
   (m×r) and σ. Matrices go in waves (:func:`matrix_waves`: as many as fit a memory
   budget, at least one per rank; one synchronisation per wave) whose Grams are spread over
   the ranks longest first (:func:`eigh_owners`), so the eigendecompositions run in parallel
   and balance whatever the order of the items;
2. everything after the basis is :func:`~drm_lightning.methods.drm.merge_coordinates` on
   this rank's rows, the same code as the single-process merge, given collective reductions
   (:class:`~drm_lightning.distributed.comm.CollectiveReductions`): the column norms of the
   renormalisation and the rounding floor (one all-reduce of N×r sums of squares), the
   joint pruning top-k (a distributed k-th value over all N·n·r scores, ties at the cut
   broken by global position like the single-process top-k) and the majority sign count;
3. the reconstruction ``merge(T) Bᵀ`` is row-local.

ZeRO-3 chunks are not row-aligned: rank r's chunk ``[r·P, (r+1)·P)`` starts and ends inside
rows. Each rank therefore works on the rows that *start* in its chunk; the tail of its last
row (held by the next rank or ranks) comes over point to point before the merge, and the
pieces of merged rows that belong to other ranks' chunks go back after it
(:meth:`~drm_lightning.distributed.comm.Comm.redistribute`). At most one row per rank and
tensor moves each way.

Which items take this route is decided by :func:`sharded_rule`: items the method calls
row-local (:meth:`~drm_lightning.methods.base.MergeMethod.row_local`; for DRM, fallback
tensors and vertical matrices on the Gram solver with ``N·n ≥ m`` — exactly when the
single-process DRM builds the same m×m Gram), not random, and, for matrices, where moving
the Gram and the basis (≈ 8·m² bytes) costs less than gathering the N + 1 inputs and
scattering the fp32 result (``((N+1)·itemsize + 4)·n·m`` bytes) — for Llama-8B with 4 bf16
branches: q/o/gate/up sharded, k/v (1024×4096) and down_proj (4096×14336) to owners — and
only when the target parameter is ZeRO-3-partitioned. Everything else (horizontal DRM, the
SVD solver, wide stacks, fused-QKV matrices, TIES/DARE/task arithmetic, non-partitioned
targets) takes the owner route.

Numerics: the fallback path is bit-identical to the single-process merge. The matrix path
sums in a different order: in float64 it equals the single-process merge to ~1e-12; in
float32 it stays within the package's float32 bound of the float64 merge (1e-2 of the
merged delta; measured ~1e-7 on the tests' matrices) — an entry at the pruning cut may fall
the other way (docs/precision.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from drm_lightning.distributed.comm import (
    CollectiveReductions,
    Comm,
    guarded,
    topk_mask_distributed,
)
from drm_lightning.distributed.plan import (
    WAVE_BYTES,
    MergeItem,
    ShardablePredicate,
    assign_longest_first,
    transient_bytes,
)
from drm_lightning.distributed.tensors import (
    ParamSet,
    held_range,
    is_partitioned,
    local_partition,
    partition_size,
    read_flat,
)
from drm_lightning.merge.plan import TensorSourceLike, input_label
from drm_lightning.merge.tensor import RESULT_HINT, check_finite, check_fits
from drm_lightning.methods.base import MergeMethod, Route
from drm_lightning.methods.basis import basis_dtype, basis_from_gram, gram_of_rows
from drm_lightning.methods.drm import DRM, merge_coordinates
from drm_lightning.methods.ops import (
    break_ties,
    disjoint_mean,
    majority_count,
    mass_signs,
    trim_per_branch,
)


def sharded_rule(
    method: MergeMethod, n_branches: int, target: ParamSet | None, *, enabled: bool = True
) -> ShardablePredicate:
    """The predicate deciding which items take the sharded route (see the module docstring)."""

    def rule(name: str, shape: tuple[int, ...], route: Route) -> bool:
        if not enabled or method.uses_randomness or not method.row_local(route, shape, n_branches):
            return False
        if target is None or not isinstance(target, ParamSet) or not target.is_partitioned(name):
            return False
        if route != "matrix":
            return True
        # Moving the m×m Gram (reduce) and the basis (broadcast, ≤ m×m) must be cheaper than
        # gathering N + 1 tensors to an owner and scattering the fp32 result back.
        n, m = shape
        itemsize = torch.empty((), dtype=target.meta(name).dtype).element_size()
        return 8 * m * m <= ((n_branches + 1) * itemsize + 4) * n * m

    return rule


def matrix_waves(
    items: Sequence[MergeItem], world: int, n_branches: int, itemsize: int
) -> list[list[MergeItem]]:
    """Consecutive sharded matrices grouped into waves: at least ``world`` items each, more
    while a rank's share of the wave (:func:`~drm_lightning.distributed.plan.transient_bytes`
    of its items) stays within :data:`~drm_lightning.distributed.plan.WAVE_BYTES`. A wave
    synchronises once, and :func:`eigh_owners` balances its eigendecompositions. The same on
    every rank (a function of the plan).

    Example:
        >>> item = MergeItem("w", (4, 4), "matrix", 1.0, 64, mode="sharded")
        >>> [len(w) for w in matrix_waves([item] * 5, 2, 3, 4)]
        [5]
    """
    waves: list[list[MergeItem]] = []
    current: list[MergeItem] = []
    held = 0
    for it in items:
        share = transient_bytes(it, n_branches, world, itemsize, owner=False)
        if len(current) >= world and held + share > WAVE_BYTES:
            waves.append(current)
            current, held = [], 0
        current.append(it)
        held += share
    if current:
        waves.append(current)
    return waves


def eigh_owners(items: Sequence[MergeItem], world: int) -> list[int]:
    """The rank that decomposes each item's m×m Gram: longest job first on ``m³``.

    Example:
        >>> big = MergeItem("down", (4, 16), "matrix", 1.0, 256, mode="sharded")
        >>> small = MergeItem("q", (4, 4), "matrix", 1.0, 64, mode="sharded")
        >>> eigh_owners([small, big, small, small], 2)
        [1, 0, 1, 1]
    """
    return assign_longest_first([float(it.shape[-1]) ** 3 for it in items], world)


class ShardedMerger:
    """Runs the sharded route for a list of items on every rank (see the module docstring).

    Args:
        comm: the process group wrapper.
        method: a :class:`~drm_lightning.methods.drm.DRM` instance.
        coefficients: (N,) per-branch coefficients.
        compute_dtype: dtype of the merge maths.
        on_write: called with ``(name, chunk)`` after a partition is written (optimizer
            state handling), or ``None``.
    """

    def __init__(
        self,
        comm: Comm,
        method: DRM,
        coefficients: Sequence[float],
        compute_dtype: torch.dtype,
        on_write: Callable[[str], None] | None = None,
    ) -> None:
        self.comm = comm
        self.method = method
        self.params = method.params
        self.coefficients = torch.as_tensor(list(coefficients), dtype=compute_dtype)
        self.dtype = compute_dtype
        self.basis_dtype = basis_dtype(compute_dtype, method.params.basis_precision)
        self.on_write = on_write

    # ------------------------------------------------------------------ entry point
    def run(
        self,
        items: Sequence[MergeItem],
        target: ParamSet,
        base: TensorSourceLike,
        branches: Sequence[TensorSourceLike],
    ) -> None:
        """Merge every item (all ranks call this with the same items in the same order)."""
        fallback = [it for it in items if it.route != "matrix"]
        matrices = [it for it in items if it.route == "matrix"]
        if matrices and self.params.direction != "vertical":
            raise ValueError(
                "the sharded route merges matrices with DRM-V only; "
                f"{matrices[0].name!r} was routed here with "
                f"direction={self.params.direction!r} (see sharded_rule)"
            )
        for start in range(0, len(fallback), 64):
            self._fallback_group(fallback[start : start + 64], target, base, branches)
        for wave in matrix_waves(
            matrices, self.comm.world_size, len(branches), self.dtype.itemsize
        ):
            self._matrix_wave(wave, target, base, branches)

    # ------------------------------------------------------------------ common pieces
    def _held(self, src: TensorSourceLike, item: MergeItem) -> Tensor:
        """This rank's valid chunk of ``src``'s ``item`` (flat, unpadded)."""
        world, rank = self.comm.world_size, self.comm.rank
        lo, hi = held_range(item.numel, world, rank)
        if is_partitioned(src, item.name):
            part = local_partition(src, item.name, world, rank)
            return part[: hi - lo]
        return read_flat(src, item.name, lo, hi)

    def _held_finite(self, src: TensorSourceLike, item: MergeItem, who: str) -> Tensor:
        """:meth:`_held`, refusing NaN/Inf with the tensor and input named."""
        chunk = self._held(src, item)
        check_finite(item.name, chunk, input_label(who, src))
        return chunk

    def _read_all(
        self,
        items: Sequence[MergeItem],
        base: TensorSourceLike,
        branches: Sequence[TensorSourceLike],
    ) -> list[list[Tensor]]:
        """Chunks of base and branches per item; failures become zero placeholders."""
        world, rank = self.comm.world_size, self.comm.rank
        out = []
        for it in items:
            lo, hi = held_range(it.numel, world, rank)
            row = []
            for k, src in enumerate([base, *branches]):
                who = "base" if k == 0 else f"branch {k - 1}"
                row.append(
                    guarded(
                        self.comm,
                        f"reading {it.name!r} from {input_label(who, src)}",
                        lambda src=src, it=it, who=who: self._held_finite(src, it, who),
                        lambda lo=lo, hi=hi: torch.zeros(hi - lo, dtype=self.dtype),
                    )
                )
            out.append(row)
        return out

    def _write(self, target: ParamSet, item: MergeItem, flat_valid: Tensor) -> None:
        """Pad this rank's merged chunk to the partition length and write it."""
        world = self.comm.world_size
        check_finite(item.name, flat_valid, "the merged result", RESULT_HINT)
        check_fits(item.name, flat_valid, target.meta(item.name).dtype)
        chunk = torch.zeros(partition_size(item.numel, world), dtype=flat_valid.dtype)
        chunk[: flat_valid.numel()] = flat_valid
        target.write_partition(item.name, chunk)
        if self.on_write is not None:
            self.on_write(item.name)

    # ------------------------------------------------------------------ fallback (element-wise)
    def _fallback_group(
        self,
        items: Sequence[MergeItem],
        target: ParamSet,
        base: TensorSourceLike,
        branches: Sequence[TensorSourceLike],
    ) -> None:
        comm, p = self.comm, self.params
        chunks = self._read_all(items, base, branches)
        comm.check("reading the local shards of fallback tensors")
        deltas: list[Tensor] = []
        bases: list[Tensor] = []
        for it, row in zip(items, chunks):
            base_c = row[0].to(self.dtype)
            stacked = torch.stack([b.to(self.dtype) - base_c for b in row[1:]])
            if p.fallback_trim_rate > 0:
                stacked = trim_per_branch(
                    stacked,
                    1.0 - p.fallback_trim_rate,
                    mask=lambda row, density, it=it: topk_mask_distributed(
                        row[None], it.numel, density, comm
                    )[0],
                )
            deltas.append(stacked)
            bases.append(base_c)
        signs: list[Tensor | None] = [None] * len(items)
        if p.elect_signs:
            masses = [mass_signs(d) for d in deltas]
            counts = torch.zeros(len(items), dtype=torch.int64)
            if p.tie_break == "majority":  # one all-reduce for the whole group
                counts = comm.all_reduce(torch.stack([majority_count(m) for m in masses]))
            signs = [
                break_ties(m, tie_break=p.tie_break, majority=c) for m, c in zip(masses, counts)
            ]
        for it, base_c, d, s in zip(items, bases, deltas, signs):
            guarded(
                comm,
                f"writing {it.name!r}",
                lambda it=it, base_c=base_c, d=d, s=s: self._write(
                    target,
                    it,
                    base_c + disjoint_mean(d, s, self.coefficients, disjoint=p.disjoint_mean),
                ),
                lambda: None,
            )
        comm.check("writing fallback tensors")

    # ------------------------------------------------------------------ matrix (row-local DRM-V)
    def _row_ranges(self, n: int, m: int) -> list[tuple[int, int]]:
        """Flat ranges of the rows each rank works on: the rows that start in its chunk."""
        world = self.comm.world_size
        size = partition_size(n * m, world)
        out = []
        for r in range(world):
            first = min(n, -(-r * size // m))
            last = min(n, -(-(r + 1) * size // m))
            out.append((first * m, last * m))
        return out

    def _matrix_wave(
        self,
        items: Sequence[MergeItem],
        target: ParamSet,
        base: TensorSourceLike,
        branches: Sequence[TensorSourceLike],
    ) -> None:
        comm, p = self.comm, self.params
        world, rank = comm.world_size, comm.rank
        n_br = len(branches)
        owners = eigh_owners(items, world)
        chunks = self._read_all(items, base, branches)
        comm.check("reading the local shards of matrices")

        # 1. Row-aligned local rows (boundary rows come from the neighbours), deltas, Gram.
        state: list[dict[str, Any]] = []
        for j, (it, row) in enumerate(zip(items, chunks)):
            n, m = it.shape
            held = [held_range(it.numel, world, q) for q in range(world)]
            wanted = self._row_ranges(n, m)
            lo, hi = wanted[rank]
            n_local = (hi - lo) // m
            rows = [comm.redistribute(c, held, wanted) for c in row]
            base_c = rows[0].to(self.dtype).reshape(n_local, m)
            deltas = guarded(
                comm,
                f"building the deltas of {it.name!r}",
                lambda rows=rows, base_c=base_c, n_local=n_local, m=m: torch.stack(
                    [r.to(self.dtype).reshape(n_local, m) - base_c for r in rows[1:]]
                ),
                lambda n_local=n_local, m=m: torch.zeros(n_br, n_local, m, dtype=self.dtype),
            )

            gram = guarded(
                comm,
                f"the Gram of {it.name!r}",
                lambda deltas=deltas: gram_of_rows(deltas, self.basis_dtype),
                lambda m=m: torch.zeros(m, m, dtype=self.basis_dtype),
            )
            comm.reduce(gram, dst=owners[j])
            state.append(
                {
                    "item": it,
                    "n": n,
                    "m": m,
                    "base": base_c,
                    "deltas": deltas,
                    "gram": gram if owners[j] == rank else None,
                    "held": held,
                    "wanted": wanted,
                }
            )
            del rows

        # 2. Eigendecompositions in parallel, each on its owner (the reduced Gram is scratch).
        for j, st in enumerate(state):
            if owners[j] == rank:
                gram = st.pop("gram")
                st["basis"] = guarded(
                    comm,
                    f"the basis of {st['item'].name!r}",
                    lambda gram=gram: basis_from_gram(
                        gram, p.rank_rtol, overwrite=True, refine=p.solver == "refined"
                    ),
                    lambda: None,
                )
            else:
                st.pop("gram")
        comm.check("decomposing the Gram matrices")

        # 3. Bases to every rank.
        for j, st in enumerate(state):
            src = owners[j]
            basis = st.get("basis")
            m = st["m"]
            r_t = torch.tensor([basis.rank if basis is not None else 0], dtype=torch.int64)
            comm.broadcast(r_t, src)
            r = int(r_t[0])
            vectors = (
                basis.vectors.to(self.dtype).contiguous()
                if basis is not None
                else torch.empty(m, r, dtype=self.dtype)
            )
            sigma = (
                basis.sigma.to(self.dtype).contiguous()
                if basis is not None
                else torch.empty(r, dtype=self.dtype)
            )
            comm.broadcast(vectors, src)
            comm.broadcast(sigma, src)
            st["vectors"], st["sigma"], st["rank"] = vectors, sigma, r

        # 4. Row-local merge in the shared basis, then back to the ZeRO-3 partitions.
        for st in state:
            it = st["item"]
            merged_rows = self._merge_rows(st)
            out = st["base"] + merged_rows
            back = comm.redistribute(out.reshape(-1), st["wanted"], st["held"])
            guarded(
                comm,
                f"writing {it.name!r}",
                lambda it=it, back=back: self._write(target, it, back),
                lambda: None,
            )
        comm.check("writing merged matrices")

    def _merge_rows(self, st: dict[str, Any]) -> Tensor:
        """:func:`~drm_lightning.methods.drm.merge_coordinates` on this rank's rows, then
        ``@ Bᵀ``."""
        deltas, vectors, sigma, r = st["deltas"], st["vectors"], st["sigma"], st["rank"]
        n, m = st["n"], st["m"]
        n_br, n_local = deltas.shape[0], deltas.shape[1]
        if r == 0:
            return torch.zeros(n_local, m, dtype=self.dtype)
        merged = merge_coordinates(
            deltas @ vectors,
            sigma,
            self.coefficients,
            reduced_dim=m,
            reductions=CollectiveReductions(self.comm, numel=n_br * n * r),
            **self.method.coordinate_kwargs(),
        )
        return merged @ vectors.mT
