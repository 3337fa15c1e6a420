"""Collectives the engines are built from, with byte/time accounting and uniform errors.

Everything here takes an optional process ``group`` (default: the world) and is called by
every rank of that group in the same order. Two rules keep a failing merge from hanging:

* local work (reading a tensor, merging it) never runs *between* the collectives of one
  step on some ranks only — a rank that fails keeps entering the same collectives with
  placeholder tensors of the planned shape;
* at every synchronisation point :meth:`Comm.check` exchanges an ok/error flag and the
  message with ``all_gather_object``; if any rank failed, every rank raises the same
  :class:`DistributedMergeError` naming the lowest failing rank, the step and the error.

Example (one process, no group):
    >>> import torch
    >>> comm = Comm(None)
    >>> comm.world_size, comm.rank
    (1, 0)
    >>> values = torch.tensor([0.5, 3.0, 2.0, 3.0, 1.0])
    >>> kth_largest(values, 2, comm)
    tensor(3.)
    >>> topk_mask_distributed(values.reshape(1, 5), 5, 0.4, comm)
    tensor([[False,  True, False,  True, False]])
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from drm_lightning.methods._select import count_digits, from_ordered_bits, ordered_bits, radix_select
from drm_lightning.methods.ops import Reductions, kept_count


class DistributedMergeError(RuntimeError):
    """Raised on every rank, with the same message, when any rank failed during a merge."""


@dataclass
class CommStats:
    """Per-rank counters of one merge.

    Attributes:
        bytes_sent: payload bytes this rank sent (point-to-point model of each collective).
        bytes_received: payload bytes this rank received.
        comm_seconds: wall time inside collectives (including waiting for peers).
        collectives: number of collective calls.
    """

    bytes_sent: int = 0
    bytes_received: int = 0
    comm_seconds: float = 0.0
    collectives: int = 0


@dataclass
class Comm:
    """A process group (or none) plus counters; all collectives of the engines go through it."""

    group: Any = None
    stats: CommStats = field(default_factory=CommStats)

    def __post_init__(self) -> None:
        self.active = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size(self.group) if self.active else 1
        self.rank = dist.get_rank(self.group) if self.active else 0
        self._errors: list[str] = []

    # ------------------------------------------------------------------ helpers
    def global_rank(self, rank: int) -> int:
        """Global rank of group rank ``rank`` (collectives address ranks globally)."""
        if not self.active or self.group is None:
            return rank
        return dist.get_global_rank(self.group, rank)

    def _account(self, start: float, sent: int, received: int) -> None:
        self.stats.comm_seconds += time.perf_counter() - start
        self.stats.bytes_sent += sent
        self.stats.bytes_received += received
        self.stats.collectives += 1

    # ------------------------------------------------------------------ error protocol
    def record_error(self, where: str, err: BaseException) -> None:
        """Remember a local failure; it is raised everywhere at the next :meth:`check`."""
        self._errors.append(f"{where}: {type(err).__name__}: {err}")

    @property
    def failed(self) -> bool:
        """True when this rank recorded an error since the last :meth:`check`."""
        return bool(self._errors)

    def check(self, step: str) -> None:
        """Synchronisation point: raise the same error on every rank if any rank failed."""
        mine = self._errors[0] if self._errors else None
        if not self.active or self.world_size == 1:
            reports: list[str | None] = [mine]
        else:
            reports = [None] * self.world_size
            start = time.perf_counter()
            dist.all_gather_object(reports, mine, group=self.group)
            self._account(start, 0, 0)
        failures = [(r, msg) for r, msg in enumerate(reports) if msg is not None]
        self._errors.clear()
        if failures:
            rank, msg = failures[0]
            others = f" (and {len(failures) - 1} other rank(s))" if len(failures) > 1 else ""
            raise DistributedMergeError(f"distributed merge failed on rank {rank}{others} during {step}: {msg}")

    # ------------------------------------------------------------------ collectives
    def all_gather_object(self, obj: Any) -> list[Any]:
        """``all_gather_object`` (a one-element list without a group)."""
        if not self.active or self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        start = time.perf_counter()
        dist.all_gather_object(out, obj, group=self.group)
        self._account(start, 0, 0)
        return out

    def all_reduce(self, tensor: Tensor) -> Tensor:
        """In-place sum over ranks; returns ``tensor``."""
        if self.world_size > 1:
            start = time.perf_counter()
            dist.all_reduce(tensor, group=self.group)
            nbytes = tensor.numel() * tensor.element_size()
            self._account(start, nbytes, nbytes)
        return tensor

    def reduce(self, tensor: Tensor, dst: int) -> Tensor:
        """In-place sum onto group rank ``dst`` (other ranks' buffers are undefined after)."""
        if self.world_size > 1:
            start = time.perf_counter()
            dist.reduce(tensor, dst=self.global_rank(dst), group=self.group)
            nbytes = tensor.numel() * tensor.element_size()
            self._account(start, 0 if self.rank == dst else nbytes, nbytes if self.rank == dst else 0)
        return tensor

    def broadcast(self, tensor: Tensor, src: int) -> Tensor:
        """In-place broadcast from group rank ``src``."""
        if self.world_size > 1:
            start = time.perf_counter()
            dist.broadcast(tensor, src=self.global_rank(src), group=self.group)
            nbytes = tensor.numel() * tensor.element_size()
            mine = self.rank == src
            self._account(start, nbytes * (self.world_size - 1) if mine else 0, 0 if mine else nbytes)
        return tensor

    def gather(self, chunk: Tensor, dst: int) -> list[Tensor] | None:
        """Every rank's equally sized ``chunk`` onto ``dst`` (a list there, ``None`` elsewhere)."""
        if self.world_size == 1:
            return [chunk]
        mine = self.rank == dst
        out = [torch.empty_like(chunk) for _ in range(self.world_size)] if mine else None
        start = time.perf_counter()
        dist.gather(chunk, gather_list=out, dst=self.global_rank(dst), group=self.group)
        nbytes = chunk.numel() * chunk.element_size()
        self._account(start, 0 if mine else nbytes, nbytes * (self.world_size - 1) if mine else 0)
        return out

    def scatter(self, chunks: Sequence[Tensor] | None, like: Tensor, src: int) -> Tensor:
        """Chunk ``rank`` of ``chunks`` (given on ``src`` only) into a tensor shaped like ``like``."""
        if self.world_size == 1:
            assert chunks is not None
            return chunks[0]
        out = torch.empty_like(like)
        mine = self.rank == src
        start = time.perf_counter()
        dist.scatter(out, scatter_list=list(chunks) if mine and chunks is not None else None,
                     src=self.global_rank(src), group=self.group)
        nbytes = out.numel() * out.element_size()
        self._account(start, nbytes * (self.world_size - 1) if mine else 0, 0 if mine else nbytes)
        return out

    def redistribute(
        self,
        held: Tensor,
        held_ranges: Sequence[tuple[int, int]],
        wanted_ranges: Sequence[tuple[int, int]],
    ) -> Tensor:
        """Move pieces of a flat tensor so that each rank ends up with its wanted range.

        Rank q holds elements ``held_ranges[q]`` (``held`` on this rank) and wants
        ``wanted_ranges[q]``; each overlap between a held range of q and a wanted range of
        r != q travels point to point. Every rank computes the same overlap table, so the
        sends and receives match. Returns the wanted range of this rank.
        """
        lo, hi = wanted_ranges[self.rank]
        out = held.new_empty(hi - lo)
        my_lo, my_hi = held_ranges[self.rank]
        a, b = max(lo, my_lo), min(hi, my_hi)
        if a < b:
            out[a - lo : b - lo] = held[a - my_lo : b - my_lo]
        if self.world_size == 1:
            return out
        requests = []
        sent = received = 0
        start = time.perf_counter()
        for q in range(self.world_size):
            if q == self.rank:
                continue
            # What q holds that I want.
            q_lo, q_hi = held_ranges[q]
            a, b = max(lo, q_lo), min(hi, q_hi)
            if a < b:
                requests.append(dist.irecv(out[a - lo : b - lo], src=self.global_rank(q), group=self.group))
                received += (b - a) * held.element_size()
            # What I hold that q wants.
            w_lo, w_hi = wanted_ranges[q]
            a, b = max(w_lo, my_lo), min(w_hi, my_hi)
            if a < b:
                piece = held[a - my_lo : b - my_lo].contiguous()
                requests.append(dist.isend(piece, dst=self.global_rank(q), group=self.group))
                sent += (b - a) * held.element_size()
        for req in requests:
            req.wait()
        self._account(start, sent, received)
        return out


# ---------------------------------------------------------------------- distributed selection


def kth_largest(values: Tensor, k: int, comm: Comm) -> Tensor:
    """The exact k-th largest of the non-negative ``values`` of all ranks (1-based k).

    :func:`~drm_lightning.methods._select.radix_select` with 8-bit digits: each round every
    rank counts its candidates per digit, one all-reduce of 256 counts picks the digit, and
    the candidates shrink to those with the chosen prefix. 4 rounds for float32, 8 for
    float64; the traffic does not depend on the size. Every rank returns the same value.
    """
    bits, width = ordered_bits(values)
    candidates = [bits]  # the entries whose higher digits match the prefix chosen so far

    def count(shift: int, prefixes: Sequence[int]) -> Tensor:
        if shift + 8 < width:
            candidates[0] = candidates[0][(candidates[0] >> (shift + 8)) == prefixes[0]]
        hist = count_digits(candidates[0], shift, prefixes[0], width, digit_bits=8).to(torch.int64)
        return comm.all_reduce(hist).unsqueeze(0)

    (pattern, _), = radix_select([int(k)], width, count, digit_bits=8)
    return from_ordered_bits(pattern, width, values.dtype)


def guarded(comm: Comm, where: str, fn: Callable[[], Any], placeholder: Callable[[], Any]) -> Any:
    """Run local work; on failure record the error (raised on every rank at the next
    :meth:`Comm.check`) and return ``placeholder()`` so the collectives stay in step."""
    if comm.failed:
        return placeholder()
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - re-raised on every rank by comm.check
        comm.record_error(where, err)
        return placeholder()


class CollectiveReductions(Reductions):
    """The reductions of a merge step over a tensor whose rows are split across ranks.

    Args:
        comm: the process group wrapper.
        numel: number of entries of the whole (branch-stacked) tensor the top-k selects from.
    """

    def __init__(self, comm: Comm, numel: int) -> None:
        self.comm = comm
        self.numel = numel

    def sum(self, t: Tensor) -> Tensor:  # noqa: D102
        flat = t.reshape(-1).clone()
        return self.comm.all_reduce(flat).reshape(t.shape)

    def topk_mask(self, scores: Tensor, density: float, *, reference_compat: bool = False) -> Tensor:  # noqa: D102
        return topk_mask_distributed(scores, self.numel, density, self.comm, reference_compat=reference_compat)


def topk_mask_distributed(
    scores: Tensor, total: int, density: float, comm: Comm, *, reference_compat: bool = False
) -> Tensor:
    """:func:`drm_lightning.methods.ops.topk_mask` over a tensor split across ranks.

    ``scores`` is this rank's block of shape ``(B, ...)``: the global tensor is branch-major
    (B blocks) and within each block the ranks' pieces follow each other in rank order —
    the layout of both the row-sharded matrix path (rows split) and the flat fallback path
    (``B = 1``). ``total`` is the global number of entries. Exact mode keeps exactly
    ``round(total * density)`` entries with ties at the cut broken by global flattened
    position, like the single-process function; ``reference_compat`` keeps
    ``|s| >= (L - round(L d))``-th smallest.
    """
    magnitude = scores.detach().abs()
    keep = kept_count(total, density)
    if total == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if reference_compat:
        drop = total - keep
        if drop <= 0:
            return torch.ones_like(scores, dtype=torch.bool)
        threshold = kth_largest(magnitude, total - drop + 1, comm)
        return magnitude >= threshold
    if keep >= total:
        return torch.ones_like(scores, dtype=torch.bool)
    if keep <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    threshold = kth_largest(magnitude, keep, comm)
    mask = magnitude > threshold
    above = comm.all_reduce(torch.tensor([int(mask.sum())], dtype=torch.int64))
    missing = keep - int(above[0])
    if missing <= 0:
        return mask
    ties = magnitude == threshold
    blocks = ties.shape[0]
    local_counts = ties.reshape(blocks, -1).sum(dim=1).to(torch.int64)
    table = torch.zeros(comm.world_size, blocks, dtype=torch.int64)
    table[comm.rank] = local_counts
    comm.all_reduce(table)
    flat_mask = mask.reshape(blocks, -1)
    flat_ties = ties.reshape(blocks, -1)
    before = 0
    for b in range(blocks):
        mine_before = before + int(table[: comm.rank, b].sum())
        take = max(0, min(int(local_counts[b]), missing - mine_before))
        if take > 0:
            positions = torch.nonzero(flat_ties[b]).squeeze(1)[:take]
            flat_mask[b, positions] = True
        before += int(table[:, b].sum())
    return flat_mask.reshape(mask.shape)
