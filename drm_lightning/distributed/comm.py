"""Collectives the engines are built from, with byte/time accounting and uniform errors.

Everything here takes an optional process ``group`` (default: the world) and is called by
every rank of that group in the same order. Two rules keep a failing merge from hanging:

* local work (reading a tensor, merging it) never runs *between* the collectives of one
  step on some ranks only — a rank that fails keeps entering the same collectives with
  placeholder tensors of the planned shape;
* at every synchronisation point :meth:`Comm.check` exchanges an ok/error flag and the
  message with ``all_gather_object``; if any rank failed, every rank raises the same
  :class:`DistributedMergeError` naming the lowest failing rank, the step and the error.

A rank that stops answering (stopped, too slow, or its process ended) cannot take part in
that protocol; the ranks still running raise :class:`RankUnresponsiveError` naming it. A
collective that fails because a peer is gone (gloo's "Connection closed by peer", a timed-out
receive) is translated into that error, the rank named where it can be told: the peer of a
point-to-point transfer, the only other rank of two, or a rank whose process this machine
sees ended or stopped (each rank leaves its process identity in the group's store). With
:meth:`Comm.watch` (``drm-merge`` under ``torchrun``, where the package creates the group)
every rank also counts its finished steps in the store and waits for the others *before* a
collective: a rank showing no progress for ``timeout`` seconds is named, while one merging a
long run of tensors is waited for however long the run takes.

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

import contextlib
import os
import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from drm_lightning.methods.ops import Reductions, kept_count
from drm_lightning.methods.selection import (
    count_digits,
    from_ordered_bits,
    ordered_bits,
    radix_select,
)

# Seconds a rank waits for another that shows no progress (``drm-merge --timeout``). A rank
# marks progress after each tensor it merges, so this bounds one tensor's merge: the slowest
# measured at 8B shapes on CPU is a 14336x4096 DRM matrix, 56 s on 2 threads (about 110 s on
# the one thread torchrun gives a rank; benchmarks/RESULTS.md, precision at 8B shapes).
# 600 s leaves over 5x for slower or shared CPUs.
DEFAULT_TIMEOUT_S = 600.0

_T = TypeVar("_T")
_STORE_PREFIX = "drm_lightning"
# Substrings of backend errors that mean the peer's process or connection is gone.
_PEER_GONE = (
    "connection closed",
    "connection reset",
    "read error",
    "write error",
    "broken pipe",
    "connection refused",
    "socket closed",
    "remote process exited",
)


class DistributedMergeError(RuntimeError):
    """Raised on every rank, with the same message, when any rank failed during a merge."""


class RankUnresponsiveError(DistributedMergeError):
    """A rank stopped answering: raised on the ranks still running (the stopped one cannot).

    Attributes:
        ranks: the group ranks named (empty when it could not be told which).
        ended: True when their processes ended or their connections closed; False when they
            did not answer in time (stopped or too slow).
    """

    def __init__(self, message: str, ranks: Sequence[int], ended: bool) -> None:
        super().__init__(message)
        self.ranks = list(ranks)
        self.ended = ended


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
        self._watch: _Watch | None = None
        self._identities: dict[int, str | None] = {}
        self.timeout_hint = "the process group's timeout sets how long ranks wait"
        self._store = _default_store() if self.active and self.world_size > 1 else None
        identity = _identity()
        if self._store is not None and identity is not None:
            try:  # lets a rank on the same machine tell whether this process ended or stopped
                self._store.set(f"{_STORE_PREFIX}/who/{dist.get_rank()}", identity)
            except Exception:  # noqa: BLE001 - only the error messages get less precise
                self._store = None

    def watch(self, timeout: float, hint: str = "") -> None:
        """Name a rank that shows no progress for ``timeout`` seconds (collective, once).

        Call it on every rank right after creating the group (with the same ``timeout`` as
        the group's). From then on every rank counts its finished steps (:func:`guarded`)
        in the group's store, and before each collective waits there for the others: one
        that has not arrived and has not progressed for ``timeout`` seconds, or whose process
        ended, is named in a :class:`RankUnresponsiveError` (``hint`` is added to a timeout's
        message). Without a store (or with one rank) it does nothing.
        """
        if self._store is None or self.world_size == 1:
            return
        store = self._store
        ranks = [self.global_rank(r) for r in range(self.world_size)]
        token: list[str | None] = [None]
        if self.rank == 0:  # a fresh namespace, its counters created before anyone reads them
            token[0] = f"{_STORE_PREFIX}/{uuid.uuid4().hex}"
            for g in ranks:
                store.add(f"{token[0]}/arrived/{g}", 0)
                store.add(f"{token[0]}/progress/{g}", 0)
        self._run(
            "starting the merge",
            lambda: dist.broadcast_object_list(token, src=self.global_rank(0), group=self.group),
            peer=None,
            wait=False,
        )
        assert token[0] is not None
        self._watch = _Watch(store, token[0], ranks, self.rank, float(timeout))
        if hint:
            self.timeout_hint = hint

    def mark_progress(self) -> None:
        """Tell the waiting ranks this one is alive and progressing (:func:`guarded` calls it)."""
        if self._watch is not None:
            self._watch.mark_progress()

    # ------------------------------------------------------------------ helpers
    def global_rank(self, rank: int) -> int:
        """Global rank of group rank ``rank`` (collectives address ranks globally)."""
        if not self.active or self.group is None:
            return rank
        return dist.get_global_rank(self.group, rank)

    # ------------------------------------------------------------------ unresponsive ranks
    def _run(self, what: str, fn: Callable[[], _T], *, peer: int | None, wait: bool = True) -> _T:
        """Run a collective (``peer``: the other end of a point-to-point transfer); a backend
        failure caused by a peer that is gone becomes a :class:`RankUnresponsiveError`."""
        if wait and peer is None and self._watch is not None:
            self._await_peers(what)
        try:
            return fn()
        except RuntimeError as err:
            lost = self._peer_failure(err, what, peer)
            if lost is None:
                raise
            raise lost from err

    def _await_peers(self, what: str) -> None:
        """Wait in the store until every rank has arrived here (:meth:`watch`)."""
        watch = self._watch
        assert watch is not None
        try:
            arrival = watch.arrive()
        except Exception:  # noqa: BLE001 - the store is gone: the collective itself will tell
            return
        seen: dict[int, tuple[int, int]] = {}
        since: dict[int, float] = {}
        pause = 0.002
        while True:
            try:
                counters = watch.read()
            except Exception:  # noqa: BLE001 - as above
                return
            now = time.monotonic()
            late = []
            for r, counter in enumerate(counters):
                if r == self.rank or counter[0] >= arrival:
                    continue
                if seen.get(r) != counter:  # arrived elsewhere or finished a step: alive
                    seen[r], since[r] = counter, now
                late.append(r)
            if not late:
                return
            ended = [r for r in late if self._state(r) == "ended"]
            if ended:
                raise self._lost(ended, what, ended=True)
            overdue = [r for r in late if now - since[r] >= watch.timeout]
            if overdue:
                raise self._lost(overdue, what, ended=False, waited=watch.timeout)
            time.sleep(pause)
            pause = min(2 * pause, 0.2)  # a store round trip per poll: light on the store

    def _state(self, rank: int) -> str | None:
        """``ended``, ``stopped`` or ``running`` for group rank ``rank`` when its process is
        on this machine (same pid namespace); ``None`` when that cannot be told."""
        if rank not in self._identities:  # left by its Comm before the first collective
            key = f"{_STORE_PREFIX}/who/{self.global_rank(rank)}"
            try:
                found = self._store is not None and self._store.check([key])
                self._identities[rank] = self._store.get(key).decode() if found else None
            except Exception:  # noqa: BLE001 - store gone
                self._identities[rank] = None
        return _process_state(self._identities[rank])

    def _peer_failure(
        self, err: BaseException, what: str, peer: int | None
    ) -> RankUnresponsiveError | None:
        """The rank(s) a backend error points at, or ``None`` if it is not about a peer."""
        text = str(err)
        lowered = text.lower()
        timed_out = "timed out" in lowered or "timeout" in lowered
        closed = any(s in lowered for s in _PEER_GONE)
        if not (timed_out or closed):
            return None
        others = (
            [peer] if peer is not None else [r for r in range(self.world_size) if r != self.rank]
        )
        states = {r: self._state(r) for r in others}
        ended = [r for r, s in states.items() if s == "ended"]
        if ended:
            return self._lost(ended, what, ended=True)
        stopped = [r for r, s in states.items() if s == "stopped"]
        named = stopped or (others if len(others) == 1 else [])
        if closed and not stopped:
            return self._lost(named, what, ended=True, among=others)
        waited = self._watch.timeout if self._watch is not None else None
        match = re.search(r"timed out waiting (\d+)\s*ms", lowered)
        if waited is None and match:
            waited = int(match.group(1)) / 1000
        return self._lost(named, what, ended=False, waited=waited, among=others)

    def _lost(
        self,
        ranks: Sequence[int],
        what: str,
        *,
        ended: bool,
        waited: float | None = None,
        among: Sequence[int] = (),
    ) -> RankUnresponsiveError:
        """The message naming the ranks that stopped answering."""
        if ranks:
            names = _rank_list(ranks)
        else:
            names = f"one of ranks {_rank_list(among, prefix=False)}"
        its = "its process" if len(ranks) <= 1 else "their processes"
        if ended:
            message = (
                f"{names} stopped ({its} ended / connection closed) during {what}; "
                f"see that rank's output and the launcher's report for why"
            )
        else:
            how = "stopped or too slow"
            if ranks and all(self._state(r) == "stopped" for r in ranks):
                how += f"; {its} {'is' if len(ranks) == 1 else 'are'} stopped"
            within = f"within {waited:g} s" if waited is not None else "in time"
            message = f"{names} did not answer {within} ({how}) during {what}"
            if self.timeout_hint:
                message += f"; {self.timeout_hint}"
        return RankUnresponsiveError(message, ranks, ended)

    def ended_peers(self, what: str) -> RankUnresponsiveError | None:
        """The error naming the ranks whose processes this machine sees ended, if any (for a
        rank stopped by the launcher because another rank died)."""
        if not self.active or self.world_size == 1:
            return None
        ended = [r for r in range(self.world_size) if r != self.rank and self._state(r) == "ended"]
        return self._lost(ended, what, ended=True) if ended else None

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
            self._run(
                step, lambda: dist.all_gather_object(reports, mine, group=self.group), peer=None
            )
            self._account(start, 0, 0)
        failures = [(r, msg) for r, msg in enumerate(reports) if msg is not None]
        self._errors.clear()
        if failures:
            rank, msg = failures[0]
            others = f" (and {len(failures) - 1} other rank(s))" if len(failures) > 1 else ""
            raise DistributedMergeError(
                f"distributed merge failed on rank {rank}{others} during {step}: {msg}"
            )

    # ------------------------------------------------------------------ collectives
    def all_gather_object(self, obj: Any, what: str = "an exchange between ranks") -> list[Any]:
        """``all_gather_object`` (a one-element list without a group)."""
        if not self.active or self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        start = time.perf_counter()
        self._run(what, lambda: dist.all_gather_object(out, obj, group=self.group), peer=None)
        self._account(start, 0, 0)
        return out

    def send(self, tensor: Tensor, dst: int, what: str) -> None:
        """Point-to-point send to group rank ``dst``."""
        start = time.perf_counter()
        self._run(
            what, lambda: dist.send(tensor, dst=self.global_rank(dst), group=self.group), peer=dst
        )
        self._account(start, tensor.numel() * tensor.element_size(), 0)

    def recv(self, tensor: Tensor, src: int, what: str) -> Tensor:
        """Point-to-point receive from group rank ``src`` into ``tensor``; returns it."""
        start = time.perf_counter()
        self._run(
            what, lambda: dist.recv(tensor, src=self.global_rank(src), group=self.group), peer=src
        )
        self._account(start, 0, tensor.numel() * tensor.element_size())
        return tensor

    def all_reduce(self, tensor: Tensor) -> Tensor:
        """In-place sum over ranks; returns ``tensor``."""
        if self.world_size > 1:
            start = time.perf_counter()
            self._run("an all-reduce", lambda: dist.all_reduce(tensor, group=self.group), peer=None)
            nbytes = tensor.numel() * tensor.element_size()
            self._account(start, nbytes, nbytes)
        return tensor

    def reduce(self, tensor: Tensor, dst: int) -> Tensor:
        """In-place sum onto group rank ``dst`` (other ranks' buffers are undefined after)."""
        if self.world_size > 1:
            start = time.perf_counter()
            self._run(
                "a reduce",
                lambda: dist.reduce(tensor, dst=self.global_rank(dst), group=self.group),
                peer=None,
            )
            nbytes = tensor.numel() * tensor.element_size()
            self._account(
                start, 0 if self.rank == dst else nbytes, nbytes if self.rank == dst else 0
            )
        return tensor

    def broadcast(self, tensor: Tensor, src: int) -> Tensor:
        """In-place broadcast from group rank ``src``."""
        if self.world_size > 1:
            start = time.perf_counter()
            self._run(
                "a broadcast",
                lambda: dist.broadcast(tensor, src=self.global_rank(src), group=self.group),
                peer=None,
            )
            nbytes = tensor.numel() * tensor.element_size()
            mine = self.rank == src
            self._account(
                start, nbytes * (self.world_size - 1) if mine else 0, 0 if mine else nbytes
            )
        return tensor

    def gather(self, chunk: Tensor, dst: int) -> list[Tensor] | None:
        """Every rank's equally sized ``chunk`` onto ``dst`` (a list there, ``None`` elsewhere)."""
        if self.world_size == 1:
            return [chunk]
        mine = self.rank == dst
        out = [torch.empty_like(chunk) for _ in range(self.world_size)] if mine else None
        start = time.perf_counter()
        self._run(
            "a gather",
            lambda: dist.gather(
                chunk, gather_list=out, dst=self.global_rank(dst), group=self.group
            ),
            peer=None,
        )
        nbytes = chunk.numel() * chunk.element_size()
        self._account(start, 0 if mine else nbytes, nbytes * (self.world_size - 1) if mine else 0)
        return out

    def scatter(self, chunks: Sequence[Tensor] | None, like: Tensor, src: int) -> Tensor:
        """Chunk ``rank`` of ``chunks`` (given on ``src`` only) into a tensor shaped like
        ``like``."""
        if self.world_size == 1:
            assert chunks is not None
            return chunks[0]
        out = torch.empty_like(like)
        mine = self.rank == src
        start = time.perf_counter()
        scatter_list = list(chunks) if mine and chunks is not None else None
        self._run(
            "a scatter",
            lambda: dist.scatter(
                out, scatter_list=scatter_list, src=self.global_rank(src), group=self.group
            ),
            peer=None,
        )
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
        if self._watch is not None:
            self._await_peers("a redistribution")
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
                requests.append(
                    dist.irecv(out[a - lo : b - lo], src=self.global_rank(q), group=self.group)
                )
                received += (b - a) * held.element_size()
            # What I hold that q wants.
            w_lo, w_hi = wanted_ranges[q]
            a, b = max(w_lo, my_lo), min(w_hi, my_hi)
            if a < b:
                piece = held[a - my_lo : b - my_lo].contiguous()
                requests.append(dist.isend(piece, dst=self.global_rank(q), group=self.group))
                sent += (b - a) * held.element_size()
        self._run(
            "a redistribution", lambda: [req.wait() for req in requests], peer=None, wait=False
        )
        self._account(start, sent, received)
        return out


class _Watch:
    """Per-rank arrival and progress counters in the group's store (:meth:`Comm.watch`)."""

    def __init__(
        self, store: Any, prefix: str, ranks: Sequence[int], me: int, timeout: float
    ) -> None:
        self.store = store
        self.timeout = timeout
        self.keys = [k for g in ranks for k in (f"{prefix}/arrived/{g}", f"{prefix}/progress/{g}")]
        self.me = me

    def arrive(self) -> int:
        """Count this rank's arrival at the next collective; returns the count."""
        return int(self.store.add(self.keys[2 * self.me], 1))

    def mark_progress(self) -> None:
        """One more step finished on this rank."""
        with contextlib.suppress(Exception):  # store gone: the next collective tells
            self.store.add(self.keys[2 * self.me + 1], 1)

    def read(self) -> list[tuple[int, int]]:
        """(arrivals, progress) of every rank, in group rank order (one store round trip)."""
        values = [int(v) for v in self.store.multi_get(self.keys)]
        return list(zip(values[0::2], values[1::2]))


def _default_store() -> Any | None:
    """The default group's store (``None`` if torch does not expose it)."""
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - private API: without it, messages are less precise
        return None


_IDENTITY: dict[int, str | None] = {}


def _identity() -> str | None:
    """``boot id|pid namespace|pid`` of this process (``None`` without Linux ``/proc``)."""
    pid = os.getpid()
    if pid not in _IDENTITY:
        try:
            boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
            namespace = os.readlink("/proc/self/ns/pid")
            _IDENTITY[pid] = f"{boot}|{namespace}|{pid}"
        except OSError:
            _IDENTITY[pid] = None
    return _IDENTITY[pid]


def _process_state(identity: str | None) -> str | None:
    """``ended``, ``stopped`` or ``running`` for a process of :func:`_identity`, when it is on
    this machine in this pid namespace (else ``None``: its pid means nothing here)."""
    mine = _identity()
    if identity is None or mine is None:
        return None
    where, _, pid = identity.rpartition("|")
    if where != mine.rpartition("|")[0]:
        return None
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
    except FileNotFoundError:
        return "ended"
    except (OSError, ValueError):
        return None
    state = stat.rpartition(")")[2].split()[:1]
    if state and state[0] in ("Z", "X", "x"):
        return "ended"
    return "stopped" if state and state[0] in ("T", "t") else "running"


def _rank_list(ranks: Sequence[int], prefix: bool = True) -> str:
    """``rank 1``, ``ranks 1 and 2``, ``ranks 1, 2 and 3`` (without "rank(s)": ``1, 2 and 3``)."""
    items = [str(r) for r in ranks]
    text = items[0] if len(items) == 1 else ", ".join(items[:-1]) + f" and {items[-1]}"
    if not prefix:
        return text
    return f"rank {text}" if len(items) == 1 else f"ranks {text}"


# ---------------------------------------------------------------------- distributed selection


WIDE_DIGITS_FROM = 1 << 20
"""Entries (over all ranks) from which the distributed top-k selects with 16-bit digits."""


def kth_largest(values: Tensor, k: int, comm: Comm, *, digit_bits: int = 8) -> Tensor:
    """The exact k-th largest of the non-negative ``values`` of all ranks (1-based k).

    :func:`~drm_lightning.methods.selection.radix_select`: each round every rank counts its
    candidates per digit, one all-reduce of ``2**digit_bits`` counts picks the digit, and the
    candidates shrink to those with the chosen prefix. 8-bit digits: 4 rounds for float32, 8
    for float64, 2 KiB a round; 16-bit digits halve the passes over large tensors for
    512 KiB a round. The traffic does not depend on the size. Every rank returns the same
    value; ``digit_bits`` must be the same on every rank.
    """
    bits, width = ordered_bits(values)
    candidates = [bits]  # the entries whose higher digits match the prefix chosen so far

    def count(shift: int, prefixes: Sequence[int]) -> Tensor:
        if shift + digit_bits < width:
            candidates[0] = candidates[0][(candidates[0] >> (shift + digit_bits)) == prefixes[0]]
        hist = count_digits(candidates[0], shift, prefixes[0], width, digit_bits)
        return comm.all_reduce(hist.to(torch.int64)).unsqueeze(0)

    ((pattern, _),) = radix_select([int(k)], width, count, digit_bits=digit_bits)
    return from_ordered_bits(pattern, width, values.dtype)


def guarded(comm: Comm, where: str, fn: Callable[[], Any], placeholder: Callable[[], Any]) -> Any:
    """Run local work; on failure record the error (raised on every rank at the next
    :meth:`Comm.check`) and return ``placeholder()`` so the collectives stay in step. Each
    call counts as this rank's progress for :meth:`Comm.watch`."""
    if comm.failed:
        return placeholder()
    try:
        return fn()
    except RankUnresponsiveError:  # a collective inside: no check can share it, raise now
        raise
    except Exception as err:  # noqa: BLE001 - re-raised on every rank by comm.check
        comm.record_error(where, err)
        return placeholder()
    finally:
        comm.mark_progress()


class CollectiveReductions(Reductions):
    """The reductions of a merge step over a tensor whose rows are split across ranks.

    Args:
        comm: the process group wrapper.
        numel: number of entries of the whole (branch-stacked) tensor the top-k selects from.
    """

    def __init__(self, comm: Comm, numel: int) -> None:
        self.comm = comm
        self.numel = numel

    def sum(self, t: Tensor) -> Tensor:
        flat = t.reshape(-1).clone()
        return self.comm.all_reduce(flat).reshape(t.shape)

    def topk_mask(
        self, scores: Tensor, density: float, *, reference_compat: bool = False
    ) -> Tensor:
        return topk_mask_distributed(
            scores, self.numel, density, self.comm, reference_compat=reference_compat
        )


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
    # Wide digits pay once the passes over the entries outweigh the larger all-reduce; `total`
    # is global, so every rank picks the same width.
    digit_bits = 16 if total >= WIDE_DIGITS_FROM else 8
    if total == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if reference_compat:
        drop = total - keep
        if drop <= 0:
            return torch.ones_like(scores, dtype=torch.bool)
        threshold = kth_largest(magnitude, total - drop + 1, comm, digit_bits=digit_bits)
        return magnitude >= threshold
    if keep >= total:
        return torch.ones_like(scores, dtype=torch.bool)
    if keep <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    threshold = kth_largest(magnitude, keep, comm, digit_bits=digit_bits)
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
