"""The streaming disk-to-disk engine under ``torchrun``: every rank merges its share of the
tensors, rank 0 writes them in the base's order.

A member of the engine family beside the single, replica and ZeRO-3 engines
(:mod:`drm_lightning.distributed.engines`): those merge into modules in memory, this one
from checkpoints on disk to an HF folder. :func:`stream_schedule` cuts the merged tensors,
in the base's order, into chunks and gives each chunk's tensors to ranks with
:func:`~drm_lightning.distributed.plan.build_plan` (cost-balanced, deterministic);
:func:`run_job_distributed` merges chunk by chunk (each tensor exactly as the single-process
loop does, :func:`drm_lightning.merge.iter_merge`), sends the results to rank 0 point to
point and lets rank 0 write them. A failure on any rank raises the same
:class:`~drm_lightning.distributed.comm.DistributedMergeError` on every rank and leaves no
output; a rank that stops answering (stopped, too slow, or its process ended) is named on the
others by a :class:`~drm_lightning.distributed.comm.RankUnresponsiveError` (``drm-merge
--timeout``, :meth:`~drm_lightning.distributed.comm.Comm.watch`).

The job is a :class:`drm_lightning.cli.job.DiskMergeJob` (config, method, opened sources,
plan); this module only reads its fields.

Example:
    >>> from types import SimpleNamespace
    >>> from drm_lightning.merge import PlannedTensor
    >>> from drm_lightning.methods import get_method
    >>> job = SimpleNamespace(method=get_method("ties"), branches=[0, 0],
    ...     config=SimpleNamespace(out_torch_dtype=None, compute_torch_dtype=torch.float32),
    ...     plan=[PlannedTensor(n, (8, 8), torch.float32, "matrix") for n in "abcde"])
    >>> stream_schedule(job, 2, 4).chunks
    [[0, 1, 2, 3], [4]]
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from drm_lightning.distributed.comm import Comm, guarded
from drm_lightning.distributed.plan import MergePlan, build_plan
from drm_lightning.merge.loop import iter_merge
from drm_lightning.merge.pieces import PIECE_ELEMENTS
from drm_lightning.sources import RowPieces
from drm_lightning.sources.on_device import OnDevice
from drm_lightning.sources.read_ahead import ReadAhead

if TYPE_CHECKING:  # the job is built by the layer above; only its fields are read here
    from drm_lightning.cli.job import DiskMergeJob
    from drm_lightning.sources import HFFolderWriter


def distributed_plan(
    job: DiskMergeJob, world_size: int, positions: Sequence[int] | None = None
) -> MergePlan:
    """Owners of the tensors (all, or those at ``positions``), balanced by cost with
    :func:`build_plan`; the same on every rank."""
    chosen = job.plan if positions is None else [job.plan[p] for p in positions]
    return build_plan(
        [(item.name, item.shape, item.route, item.dtype) for item in chosen],
        job.method,
        n_branches=len(job.branches),
        world_size=world_size,
        engine="single" if world_size == 1 else "replica",
        compute_dtype=job.config.compute_torch_dtype,
    )


@dataclass
class StreamSchedule:
    """Who merges what under torchrun, chunk by chunk, so that rank 0 writes in base order.

    Attributes:
        world_size: ranks.
        owners: rank merging each tensor, by position in the base's order; ``-1`` for
            ignored tensors, which rank 0 copies from the base when their turn comes.
        chunks: positions of each chunk (consecutive merged tensors of the base's order, at
            most ``max_pending``), ascending. Within a chunk the owners come from
            :func:`build_plan` (longest job first, by cost).
        costs: estimated FLOPs of each tensor (0 for ignored ones).
        max_pending: tensors per chunk: rank 0 never holds more merged tensors than this.
        peak_pending_bytes: the most bytes of merged tensors rank 0 holds at once.
    """

    world_size: int
    owners: list[int]
    chunks: list[list[int]]
    costs: list[float]
    max_pending: int
    peak_pending_bytes: int

    def rank_costs(self) -> list[float]:
        """Total estimated FLOPs per rank."""
        out = [0.0] * self.world_size
        for owner, cost in zip(self.owners, self.costs):
            if owner >= 0:
                out[owner] += cost
        return out

    def critical_cost(self) -> float:
        """Sum over chunks of the most loaded rank's FLOPs (chunks run one after another)."""
        total = 0.0
        for chunk in self.chunks:
            per_rank = [0.0] * self.world_size
            for p in chunk:
                per_rank[self.owners[p]] += self.costs[p]
            total += max(per_rank)
        return total

    def fingerprint(self) -> str:
        """Short hash; ranks compare it before the first tensor is read."""
        text = f"{self.world_size}|{self.owners}|{self.chunks}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def stream_schedule(
    job: DiskMergeJob, world_size: int, max_pending: int | None = None
) -> StreamSchedule:
    """Chunks of the rank-parallel merge and the owner of every tensor.

    The merged tensors, in the base's order, are cut into chunks of ``max_pending``
    (default 8 x ranks); each chunk's tensors are given to ranks by :func:`build_plan`
    (cost-balanced, deterministic). Chunks run one after another, so rank 0 can write every
    tensor in the base's order while holding at most one chunk.
    """
    window = max_pending or 8 * world_size
    planned = list(job.plan)
    out_dtype = job.config.out_torch_dtype
    merged = [p for p, t in enumerate(planned) if t.route != "ignore"]
    chunks = [merged[i : i + window] for i in range(0, len(merged), window)]
    owners = [-1] * len(planned)
    costs = [0.0] * len(planned)
    peak = 0
    for chunk in chunks:
        plan = distributed_plan(job, world_size, chunk)
        by_name = {it.name: it for it in plan.items}
        for p in chunk:
            item = by_name[planned[p].name]
            owners[p], costs[p] = item.owner, item.cost
        held = sum(planned[p].numel * (out_dtype or planned[p].dtype).itemsize for p in chunk)
        peak = max(peak, held)
    return StreamSchedule(world_size, owners, chunks, costs, window, peak)


def run_job_distributed(
    job: DiskMergeJob,
    comm: Comm,
    writer: HFFolderWriter | None,
    *,
    device: torch.device | str = "cpu",
    progress: bool = True,
    max_pending: int | None = None,
    piece_elements: int | None = PIECE_ELEMENTS,
) -> dict[str, int]:
    """The rank-parallel merge; call it on every rank (``writer`` on rank 0 only).

    Chunk by chunk (:func:`stream_schedule`): every rank reads and merges the tensors of
    the chunk it owns (exactly what the single-process loop computes for each, on
    ``device``); a check makes every rank raise the same
    :class:`~drm_lightning.distributed.comm.DistributedMergeError` if any failed; then the
    owners send their results to rank 0 one tensor at a time (point to point, in the base's
    order) and rank 0 writes them, so the output equals the single-process output file for
    file. Memory: a rank holds its share of one chunk; rank 0 at most one chunk
    (``max_pending`` tensors); a large entry-wise tensor is merged in row pieces of
    ``piece_elements`` (:mod:`drm_lightning.merge.pieces`) into its output-dtype tensor.
    Rank 0 writes into a temporary folder and renames it into place after the last tensor;
    a failure on any rank removes it and raises everywhere.

    Returns:
        ``{"chunks": ..., "sent_bytes": ..., "received_bytes": ...}`` for this rank.
    """
    rank = comm.rank
    if (writer is None) != (rank != 0):
        raise ValueError("run_job_distributed needs the writer on rank 0 and only there")
    schedule = stream_schedule(job, comm.world_size, max_pending)
    device = torch.device(device)
    base, branches = job.base, job.branches
    if device.type != "cpu":
        base, branches = OnDevice(base, device), [OnDevice(b, device) for b in branches]
    out_dtype = job.config.out_torch_dtype
    stats = {"chunks": len(schedule.chunks), "sent_bytes": 0, "received_bytes": 0}

    ahead = ReadAhead([base, *branches])
    owned = [p for p, owner in enumerate(schedule.owners) if owner == rank]

    def merge_one(position: int) -> Tensor:
        item = job.plan[position]
        later = [p for p in owned if p > position]
        if later:  # the disk reads this rank's next tensor while this one merges
            ahead.ask([job.plan[later[0]].name])
        ((_, value),) = iter_merge(
            job.method,
            base,
            branches,
            coefficients=job.coefficients,
            compute_dtype=job.config.compute_torch_dtype,
            out_dtype=out_dtype,
            seed=job.config.resolved_seed(),
            plan=[item],
            piece_elements=piece_elements,
        )
        value = (
            value.materialize()
            if isinstance(value, RowPieces)
            else value.detach().to("cpu").contiguous()
        )
        expected = out_dtype or item.dtype
        if tuple(value.shape) != item.shape or value.dtype != expected:
            raise ValueError(
                f"merged {item.name!r} is {value.dtype} {list(value.shape)}, "
                f"expected {expected} {list(item.shape)}"
            )
        return value

    pending: dict[int, Tensor] = {}
    cursor = 0
    bar = None
    if rank == 0 and progress:
        name = getattr(job.method, "registered_name", job.method.name)
        bar = tqdm(
            total=len(job.plan), desc=f"merging ({name}, {comm.world_size} ranks)", unit="tensor"
        )

    def drain() -> None:
        """Rank 0: write every tensor whose turn has come (ignored ones copied from the base)."""
        nonlocal cursor
        assert writer is not None
        while cursor < len(job.plan):
            if schedule.owners[cursor] == -1:
                value = merge_one(cursor)
            elif cursor in pending:
                value = pending.pop(cursor)
            else:
                return
            writer.add(job.plan[cursor].name, value)
            del value
            cursor += 1
            if bar is not None:
                bar.update(1)

    try:
        if writer is not None:
            _ranked_guard(
                comm, "creating the temporary output folder", writer.__enter__, lambda: None
            )
        comm.check("creating the temporary output folder")
        for chunk in schedule.chunks:
            mine: dict[int, Tensor | None] = {}
            for p in chunk:
                if schedule.owners[p] == rank:
                    mine[p] = _ranked_guard(
                        comm,
                        f"merging {job.plan[p].name!r}",
                        lambda p=p: merge_one(p),
                        lambda: None,
                    )
            first, last = job.plan[chunk[0]].name, job.plan[chunk[-1]].name
            comm.check(f"merging tensors {first!r} to {last!r}")
            for p in chunk:
                owner, item = schedule.owners[p], job.plan[p]
                if rank == 0 and owner == 0:
                    pending[p] = mine.pop(p)  # type: ignore[assignment]
                elif rank == 0:
                    buffer = torch.empty(item.shape, dtype=out_dtype or item.dtype)
                    comm.recv(buffer, owner, f"sending {item.name!r} from rank {owner} to rank 0")
                    stats["received_bytes"] += buffer.numel() * buffer.element_size()
                    pending[p] = buffer
                elif rank == owner:
                    value = mine.pop(p)
                    assert value is not None
                    comm.send(value, 0, f"sending {item.name!r} from rank {rank} to rank 0")
                    stats["sent_bytes"] += value.numel() * value.element_size()
                    del value
                if writer is not None:
                    _ranked_guard(comm, "writing the output", drain, lambda: None)
        if writer is not None:
            _ranked_guard(comm, "writing the output", drain, lambda: None)
            if not comm.failed:
                _ranked_guard(
                    comm,
                    f"finishing {writer.out_dir}",
                    lambda: writer.__exit__(None, None, None),
                    lambda: None,
                )
        comm.check("writing the output folder")
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        ahead.close()
        if bar is not None:
            bar.close()
    return stats


def _ranked_guard(comm: Comm, where: str, fn: Any, placeholder: Any) -> Any:
    """:func:`~drm_lightning.distributed.comm.guarded`, with this rank named in the error."""
    return guarded(comm, f"{where} (rank {comm.rank})", fn, placeholder)
