"""Row pieces worked on by a few threads, their results taken in order.

The fused kernels (:mod:`drm_lightning.methods._fused`) release the GIL and the safetensors
reader's ``pread`` does too, so plain threads run one piece's read beside another's kernel.
No numba or OpenMP thread pool is involved: nothing here stops a process from forking.

This is the engine's side of :class:`~drm_lightning.methods.rowwise.PieceRunner`: the merge
loop passes :class:`ThreadedPieces` to a method's ``merge_stored_rows``; the method only
supplies thread-safe piece work.

Example:
    >>> list(in_order(lambda x: x * x, range(5), threads=2))
    [0, 1, 4, 9, 16]
    >>> list(ThreadedPieces(2).map(lambda x: -x, range(3)))
    [0, -1, -2]
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

AHEAD_PER_THREAD = 4
"""Pieces submitted ahead of the one the caller waits for, per thread: room for a consumer
that stalls for a while (a writer the kernel throttles) without idling the threads."""


def in_order(
    work: Callable[[Item], Result], items: Iterable[Item], threads: int
) -> Iterator[Result]:
    """``work(item)`` of each item, yielded in the items' order, computed on ``threads`` threads.

    One thread: computed in the caller's thread, one at a time. More: items start in order,
    at most ``AHEAD_PER_THREAD * threads`` ahead of the one yielded next; an exception is
    raised where its item's result would have been. Closing the iterator early cancels the
    items not started and waits for those running.
    """
    if threads <= 1:
        for item in items:
            yield work(item)
        return
    pending: deque[Future[Result]] = deque()
    remaining = iter(items)
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="drm-pieces")
    try:
        for item in remaining:
            pending.append(pool.submit(work, item))
            if len(pending) >= AHEAD_PER_THREAD * threads:
                break
        while pending:
            result = pending.popleft().result()
            for item in remaining:
                pending.append(pool.submit(work, item))
                break
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@dataclass(frozen=True)
class ThreadedPieces:
    """A :class:`~drm_lightning.methods.rowwise.PieceRunner` on ``threads`` plain threads
    (:func:`in_order`)."""

    threads: int

    def map(self, work: Callable[[Item], Result], items: Iterable[Item]) -> Iterator[Result]:
        return in_order(work, items, self.threads)
