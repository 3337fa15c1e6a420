"""One safetensors file written tensor by tensor, in memory that does not grow with the file.

:class:`ShardFile` is the streaming half of :class:`~drm_lightning.sources.writer.HFFolderWriter`.
The file is laid out as safetensors requires — an 8-byte little-endian header length, a JSON
header, then the tensor bytes back to back — but the header is written last, into space
reserved at the start:

- a tensor whose byte size is a multiple of 8 (nearly every weight) is written at once, at
  the next free offset of the data section, and not kept;
- any other tensor (a few bytes: an odd-sized bias, a 0-d scalar) is held until
  :meth:`ShardFile.close`, then written after the others, the widest dtype first, so every
  tensor starts at a multiple of its element size, as ``safetensors.torch.save_file`` ensures;
- the row pieces of a large tensor (:meth:`ShardFile.add_pieces`) that the producer will not
  touch again (``RowPieces.fresh``) are written by a background thread, behind the producer,
  so the merge goes on while the kernel throttles the writes to the disk's pace;
- at :meth:`ShardFile.close` the header is written into the reserve and padded with spaces
  (which the format allows). If it does not fit, the data section is moved up in 8 MiB
  chunks to make room (rare: the default reserve holds ≈ 500 tensors).

Any safetensors reader reads the result; only the header's padding and the order of the
tensors in the data section differ from ``save_file``'s. A little-endian machine is assumed
(as on every platform torch ships for).

Example:
    >>> import tempfile, pathlib, torch
    >>> from safetensors.torch import load_file
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "x.safetensors"
    >>> f = ShardFile(path, header_reserve=64)  # too small: the data moves up at close
    >>> f.add("w", torch.arange(6.0).reshape(2, 3))
    >>> f.add("odd", torch.ones(3, dtype=torch.bfloat16))
    >>> f.close()
    >>> {k: v.tolist() for k, v in sorted(load_file(path).items())}
    {'odd': [1.0, 1.0, 1.0], 'w': [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]}
"""

from __future__ import annotations

import json
import os
import struct
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from drm_lightning.sources.base import _SAFETENSORS_DTYPES, TensorMeta

__all__ = ["RowPieces", "ShardFile", "write_at"]

_CODES: dict[torch.dtype, str] = {
    dtype: code
    for code, attr in _SAFETENSORS_DTYPES.items()
    if isinstance(dtype := getattr(torch, attr, None), torch.dtype)
}
_ALIGN = 8
_MOVE_CHUNK = 8 * 1024 * 1024


@dataclass
class RowPieces:
    """A tensor that arrives as consecutive row pieces (consumed once), e.g. a large tensor
    merged piece by piece (:mod:`drm_lightning.merge.pieces`).

    Attributes:
        shape: the whole tensor's shape.
        dtype: the pieces' dtype.
        pieces: the pieces along dim 0, in order, on any device.
        fresh: every piece is a tensor of its own that nobody modifies once yielded (the merge
            loop's are): the writer may then write it in the background while the next one is
            made. Otherwise each piece is written before the next is asked for.

    Example:
        >>> RowPieces((3, 2), torch.float32,
        ...           iter([torch.ones(2, 2), torch.zeros(1, 2)])).materialize()
        tensor([[1., 1.],
                [1., 1.],
                [0., 0.]])
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    pieces: Iterator[Tensor]
    fresh: bool = False

    @property
    def nbytes(self) -> int:
        """Bytes of the whole tensor."""
        return TensorMeta(self.shape, self.dtype).nbytes

    def materialize(self) -> Tensor:
        """The whole tensor on CPU, for a consumer that needs it whole."""
        out = torch.empty(self.shape, dtype=self.dtype)
        row = 0
        for piece in self.pieces:
            _check_piece(piece, self, row)
            out[row : row + piece.shape[0]] = piece.to("cpu")
            row += piece.shape[0]
        _check_rows(row, self)
        return out


def _check_piece(piece: Tensor, whole: RowPieces, row: int) -> None:
    if (
        piece.dtype != whole.dtype
        or tuple(piece.shape[1:]) != tuple(whole.shape[1:])
        or (row + piece.shape[0] > whole.shape[0])
    ):
        raise ValueError(
            f"piece at row {row} is {piece.dtype} {list(piece.shape)}, which does not continue "
            f"a {whole.dtype} tensor of shape {list(whole.shape)}"
        )


def _check_rows(rows: int, whole: RowPieces) -> None:
    if rows != whole.shape[0]:
        raise ValueError(f"the pieces cover {rows} rows of a tensor of shape {list(whole.shape)}")


def write_at(fd: int, data: memoryview, offset: int) -> None:
    """``os.pwrite`` all of ``data`` at ``offset`` (a short write is continued).

    The one place tensor bytes reach the disk: tests replace it to simulate a full disk.
    """
    written = 0
    while written < len(data):
        written += os.pwrite(fd, data[written:], offset + written)


WRITE_BEHIND_BYTES = 64 * 1024 * 1024
"""Bytes of row pieces queued for the background writer before the producer waits."""


class _WriteBehind:
    """``write_at`` calls run in order by one background thread, at most
    :data:`WRITE_BEHIND_BYTES` queued; an error is raised by the next call after it."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[tuple[Future[None], int]] = deque()
        self._queued = 0

    def write(self, data: memoryview, offset: int) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="drm-write")
        # write_at is looked up when the write runs (tests replace it to fill the disk)
        self._pending.append(
            (self._pool.submit(lambda: write_at(self._fd, data, offset)), len(data))
        )
        self._queued += len(data)
        while self._queued > WRITE_BEHIND_BYTES:
            self._wait_oldest()

    def flush(self) -> None:
        """Wait for every queued write; raise the first error."""
        while self._pending:
            self._wait_oldest()

    def stop(self) -> None:
        """Drop the queued writes not started, wait for the running one; no error raised."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._pending.clear()
        self._queued = 0

    def _wait_oldest(self) -> None:
        future, size = self._pending.popleft()
        self._queued -= size
        future.result()


def _round_up(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _bytes_of(tensor: Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without a copy."""
    flat = tensor.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")


class ShardFile:
    """A safetensors file open for writing, one tensor at a time.

    Args:
        path: the file to create (must not exist).
        header_reserve: bytes kept for the JSON header before the data section; rounded up
            to a multiple of 8. A header that outgrows it costs one move of the data.
        metadata: the ``__metadata__`` string map (``{"format": "pt"}`` by default).

    Raises:
        FileExistsError: ``path`` exists.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        header_reserve: int = 64 * 1024,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self._metadata = dict(metadata if metadata is not None else {"format": "pt"})
        self._reserve = _round_up(max(int(header_reserve), _ALIGN))
        self._entries: dict[str, dict[str, object]] = {}
        self._held: list[tuple[str, Tensor]] = []
        self._end = 0  # bytes of the data section written so far
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        self._behind = _WriteBehind(self._fd)

    @property
    def names(self) -> list[str]:
        """Tensor names added so far (held ones included)."""
        return [*self._entries, *(name for name, _ in self._held)]

    def add(self, name: str, tensor: Tensor) -> None:
        """Write ``tensor`` (CPU, contiguous) now, or hold it if its size is not a multiple of 8.

        A held tensor is cloned, so the caller may reuse its memory at once either way.
        """
        if self._fd is None:
            raise RuntimeError(f"{self.path} is already closed")
        if tensor.dtype not in _CODES:
            known = ", ".join(sorted(str(d).removeprefix("torch.") for d in _CODES))
            raise TypeError(
                f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store; "
                f"cast it to one of: {known}"
            )
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes % _ALIGN:
            self._held.append((name, tensor.clone()))
        else:
            self._put(name, tensor)

    def add_pieces(self, name: str, tensor: RowPieces) -> None:
        """Write a tensor given as row pieces, each as it arrives, at consecutive offsets.

        Pieces of a ``fresh`` tensor are written by a background thread, at most
        :data:`WRITE_BEHIND_BYTES` behind; a write error is raised by a later call
        (:meth:`close` at the latest). On an error the pieces' generator is closed. A
        tensor whose size is not a multiple of 8 bytes is gathered and held like :meth:`add`
        does (such tensors are small).
        """
        if self._fd is None:
            raise RuntimeError(f"{self.path} is already closed")
        if tensor.dtype not in _CODES or tensor.nbytes % _ALIGN or not tensor.shape:
            self.add(name, tensor.materialize())
            return
        start = _ALIGN + self._reserve + self._end
        written, row = 0, 0
        try:
            for piece in tensor.pieces:
                _check_piece(piece, tensor, row)
                data = _bytes_of(piece.detach().to("cpu").contiguous())
                if tensor.fresh:
                    self._behind.write(data, start + written)
                else:
                    write_at(self._fd, data, start + written)
                written += len(data)
                row += piece.shape[0]
            _check_rows(row, tensor)
        except BaseException:
            close = getattr(tensor.pieces, "close", None)
            if close is not None:  # stop the producer now (its threads, its reads)
                close()
            raise
        self._entries[name] = {
            "dtype": _CODES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self._end, self._end + written],
        }
        self._end += written

    def _put(self, name: str, tensor: Tensor) -> None:
        assert self._fd is not None
        data = _bytes_of(tensor)
        write_at(self._fd, data, _ALIGN + self._reserve + self._end)
        self._entries[name] = {
            "dtype": _CODES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self._end, self._end + len(data)],
        }
        self._end += len(data)

    def close(self) -> None:
        """Write the held tensors and the header; the file is then a complete safetensors file."""
        if self._fd is None:
            raise RuntimeError(f"{self.path} is already closed")
        self._behind.flush()
        held = sorted(self._held, key=lambda item: (-item[1].element_size(), item[0]))
        for name, tensor in held:
            self._put(name, tensor)
        self._held = []
        header = json.dumps(
            {"__metadata__": self._metadata, **self._entries}, separators=(",", ":")
        ).encode()
        if len(header) > self._reserve:
            self._move_data(_round_up(len(header)))
        header = header.ljust(self._reserve, b" ")
        write_at(self._fd, memoryview(struct.pack("<Q", len(header)) + header), 0)
        os.ftruncate(self._fd, _ALIGN + self._reserve + self._end)
        os.close(self._fd)
        self._fd = None

    def discard(self) -> None:
        """Close the file descriptor without finishing the file (the caller removes it)."""
        self._held = []
        self._behind.stop()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _move_data(self, reserve: int) -> None:
        """Move the data section up so ``reserve`` header bytes fit; back to front, in chunks."""
        assert self._fd is not None
        old, new = _ALIGN + self._reserve, _ALIGN + reserve
        remaining = self._end
        while remaining:
            size = min(_MOVE_CHUNK, remaining)
            remaining -= size
            chunk = os.pread(self._fd, size, old + remaining)
            write_at(self._fd, memoryview(chunk), new + remaining)
        self._reserve = reserve
