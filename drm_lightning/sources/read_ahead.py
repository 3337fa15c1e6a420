"""Read the next tensors ahead while the current one is merged.

A disk-to-disk merge reads one tensor, merges it, writes it, then reads the next: the disk
waits while the CPU merges and the CPU waits while the disk reads. :class:`ReadAhead` asks
every source (:meth:`~drm_lightning.sources.WeightSource.prefetch`) to have the OS read the
next tensor's bytes into the page cache, from a background thread, so that reading overlaps
merging. Only a hint: the process's memory does not grow (the page cache holds the bytes),
and a failure is ignored (the read itself reports it).

Example:
    >>> import torch
    >>> from drm_lightning.sources import StateDictSource
    >>> with ReadAhead([StateDictSource({"w": torch.zeros(2)})]) as ahead:
    ...     ahead.ask(["w"])
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any


class ReadAhead:
    """One background thread asking ``sources`` to read tensors ahead, one request at a time."""

    def __init__(self, sources: Sequence[Any]) -> None:
        self._sources = [s for s in sources if callable(getattr(s, "prefetch", None))]
        self._pool: ThreadPoolExecutor | None = None

    def ask(self, names: Sequence[str]) -> None:
        """Ask for ``names`` (returns at once)."""
        if not self._sources or not names:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="drm-read-ahead")
        self._pool.submit(self._prefetch, list(names))

    def _prefetch(self, names: list[str]) -> None:
        for source in self._sources:
            try:
                source.prefetch(names)
            except Exception:  # noqa: BLE001 - a hint only; the read reports real errors
                pass

    def close(self) -> None:
        """Stop: pending requests are dropped, none is waited for."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()
