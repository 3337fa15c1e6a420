"""One ``.safetensors`` file, read lazily: metadata from the header, one tensor per ``get``.

Example:
    >>> import tempfile, pathlib, torch
    >>> from safetensors.torch import save_file
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "w.safetensors"
    >>> save_file({"w": torch.ones(2, 3), "b": torch.zeros(2)}, str(path))
    >>> src = SafetensorsFileSource(path)
    >>> src.keys(), src.meta("w").shape
    (['b', 'w'], (2, 3))
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from drm_lightning.sources.base import TensorMeta, WeightSource, dtype_from_safetensors
from drm_lightning.sources.input_files import check_unchanged, open_regular

PREFETCH_CHUNK = 8 * 1024 * 1024
"""Bytes of one read of :meth:`SafetensorsFileSource.prefetch`."""

_SCRATCH = threading.local()


def _scratch() -> memoryview:
    if not hasattr(_SCRATCH, "buffer"):
        _SCRATCH.buffer = memoryview(bytearray(PREFETCH_CHUNK))
    return _SCRATCH.buffer


_OPENING = threading.Lock()
os.register_at_fork(after_in_child=lambda: globals().__setitem__("_OPENING", threading.Lock()))

__all__ = ["SafetensorsFileSource"]


class SafetensorsFileSource(WeightSource):
    """A single safetensors file.

    The header (names, shapes, dtypes) is read once at construction, from a descriptor kept
    open from then on: ``get`` and :meth:`get_rows` read the tensor's (the rows') bytes
    with ``os.pread`` at their offset from that same file, and each read checks that it was
    not rewritten (replaced or rewritten: ``ValueError`` naming the file). Not a regular
    file (a FIFO, a device): refused before it is opened.

    Args:
        path: the ``.safetensors`` file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        IsADirectoryError: ``path`` is a folder (use :class:`HFFolderSource`).
        ValueError: the file is not a valid safetensors file, or not a regular file.

    Example:
        >>> import tempfile, pathlib, torch
        >>> from safetensors.torch import save_file
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "m.safetensors"
        >>> save_file({"w": torch.arange(4.0)}, str(path))
        >>> SafetensorsFileSource(path).get("w")
        tensor([0., 1., 2., 3.])
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.origin = str(self.path)
        if not self.path.exists():
            raise FileNotFoundError(f"safetensors file not found: {self.path}")
        if self.path.is_dir():
            raise IsADirectoryError(
                f"{self.path} is a folder; SafetensorsFileSource expects one .safetensors file "
                "(use HFFolderSource or open_source for model folders)"
            )
        # held from the header read on: every read is of this file, checked against its identity
        fd, self._identity = open_regular(self.path)
        self._fd: tuple[int, int] | None = (os.getpid(), fd)  # (pid, descriptor) of this process
        self._meta: dict[str, TensorMeta] = {}
        try:
            with safe_open(str(self.path), framework="pt") as f:
                self.header_metadata: dict[str, str] = dict(f.metadata() or {})
                for name in f.keys():
                    sl = f.get_slice(name)
                    dtype = dtype_from_safetensors(sl.get_dtype(), where=f"{self.path}:{name}")
                    self._meta[name] = TensorMeta(tuple(int(s) for s in sl.get_shape()), dtype)
        except SafetensorError as err:
            raise ValueError(f"{self.path} is not a valid safetensors file: {err}") from err
        self._keys = sorted(self._meta)
        self._offsets = _data_offsets(fd, self._meta)
        check_unchanged(self.path, self._identity, fd)  # safe_open read the same file

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fd": None}  # a descriptor does not cross processes

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None and fd[0] == os.getpid():
            os.close(fd[1])

    def _descriptor(self) -> int:
        """This process's descriptor of the file; another process (a forked or unpickled
        copy) opens its own, which must be the file the header was read from."""
        fd = self._fd
        if fd is None or fd[0] != os.getpid():
            with _OPENING:  # the merge's piece threads read at once: one descriptor, not one each
                if self._fd is None or self._fd[0] != os.getpid():
                    self._fd = (os.getpid(), open_regular(self.path, expect=self._identity)[0])
                fd = self._fd
        return fd[1]

    def check_unchanged(self) -> None:
        """Raise if the file was replaced or rewritten since its header was read."""
        fd = self._fd
        held = fd[1] if fd is not None and fd[0] == os.getpid() else None
        check_unchanged(self.path, self._identity, held)

    def keys(self) -> list[str]:
        return list(self._keys)

    def meta(self, name: str) -> TensorMeta:
        return self._lookup(self._meta, name)

    def get(self, name: str) -> Tensor:
        """The tensor ``name``, read with ``os.pread`` from the file the header was read from."""
        if name not in self._meta:
            raise self._missing(name)
        meta = self._meta[name]
        out = torch.empty(meta.shape, dtype=meta.dtype)
        view = _bytes_view(out)
        if self._read_into(view, self._offsets[name]) < len(view):
            raise ValueError(f"{self.path}: {name!r} ends before its data does (file truncated?)")
        return out

    def get_rows(self, name: str, start: int, stop: int) -> Tensor:
        """Rows ``start:stop``, read with ``os.pread`` at their offset: nothing else of the file
        is read or mapped (a merge in row pieces reads each piece several times; opening and
        mapping the file each time cost about as much as the rows)."""
        if name not in self._meta:
            raise self._missing(name)
        meta = self._meta[name]
        rows = meta.shape[0] if meta.shape else 1
        start, stop = max(0, min(start, rows)), max(0, min(stop, rows))
        stop = max(start, stop)
        out = torch.empty((stop - start, *meta.shape[1:]), dtype=meta.dtype)
        view = _bytes_view(out)
        row_bytes = out[0].numel() * out.element_size() if out.shape[0] else 0
        if self._read_into(view, self._offsets[name] + start * row_bytes) < len(view):
            raise ValueError(
                f"{self.path}: {name!r} ends before its rows {start}:{stop} (file truncated?)"
            )
        return out

    def prefetch(self, names: Sequence[str]) -> None:
        """Read the bytes of those of ``names`` stored here into the page cache.

        Real reads, :data:`PREFETCH_CHUNK` at a time into a scratch buffer (a copy of about
        0.1 s per GB): ``posix_fadvise(WILLNEED)`` starts reading only the first read-ahead
        window (``read_ahead_kb``) of its range."""
        scratch = _scratch()
        for name in names:
            meta = self._meta.get(name)
            if meta is None:
                continue
            offset, end = self._offsets[name], self._offsets[name] + meta.nbytes
            while offset < end:
                size = min(len(scratch), end - offset)
                if self._read_into(scratch[:size], offset) < size:
                    break  # the file ends early: get_rows will say so
                offset += size

    def _read_into(self, view: memoryview, offset: int) -> int:
        """Fill ``view`` with the file's bytes from ``offset``; returns how many were read
        (fewer than asked only where the file ends)."""
        done, fd = 0, self._descriptor()
        while done < len(view):
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                break
            done += got
        check_unchanged(self.path, self._identity, fd, path_too=False)  # one fstat
        return done

    def reads_rows(self, name: str) -> bool:  # noqa: D102
        return True

    def files(self) -> list[Path]:
        return [self.path]

    def describe(self) -> str:
        return f"safetensors file {self.path} ({len(self._keys)} tensors)"

    def __contains__(self, name: object) -> bool:
        return name in self._meta


def _bytes_view(tensor: Tensor) -> memoryview:
    """The bytes of a new contiguous CPU tensor, writable in place."""
    if not tensor.numel():
        return memoryview(bytearray())
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy()).cast("B")


def _data_offsets(fd: int, meta: dict[str, TensorMeta]) -> dict[str, int]:
    """Byte offset of each tensor's data in the file (safetensors' header, already validated
    by ``safe_open``: ``data_offsets`` start after the 8-byte length and the JSON header)."""
    (length,) = struct.unpack("<Q", os.pread(fd, 8, 0))
    header = json.loads(os.pread(fd, length, 8))
    return {name: 8 + length + int(header[name]["data_offsets"][0]) for name in meta}
