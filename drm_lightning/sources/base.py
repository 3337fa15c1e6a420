"""The weight-source contract: name, shape and dtype from metadata; one tensor at a time on demand.

Every reader in :mod:`drm_lightning.sources` implements :class:`WeightSource`. Upper layers
(the merge loop, the planner, the CLI) only ever call ``keys()``, ``meta(name)`` (no tensor
data read) and ``get(name)`` (one tensor read), so a merge never holds more than a few
tensors of any model in memory.

Example:
    >>> import torch
    >>> from drm_lightning.sources import StateDictSource
    >>> src = StateDictSource({"b": torch.zeros(2), "a": torch.ones(3, 4)})
    >>> src.keys()
    ['a', 'b']
    >>> src.meta("a")
    TensorMeta(shape=(3, 4), dtype=torch.float32)
    >>> src.total_bytes()
    56
"""

from __future__ import annotations

import difflib
import hashlib
import math
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from drm_lightning.sources._digest_store import file_key, store_digest, stored_digest
from drm_lightning.sources.input_files import changed_error, open_regular

__all__ = [
    "TensorMeta",
    "WeightSource",
    "dtype_from_safetensors",
    "hash_in_background",
    "sha256_of",
]

_SAFETENSORS_DTYPES: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
    "C64": "complex64",
}


def dtype_from_safetensors(code: str, *, where: str = "") -> torch.dtype:
    """The torch dtype of a safetensors header dtype code such as ``"BF16"``.

    Args:
        code: the dtype string stored in a safetensors header.
        where: file and tensor name, used in the error message.

    Raises:
        ValueError: the code has no torch equivalent in this torch build.

    Example:
        >>> dtype_from_safetensors("BF16")
        torch.bfloat16
    """
    attr = _SAFETENSORS_DTYPES.get(code)
    dtype = getattr(torch, attr, None) if attr else None
    if not isinstance(dtype, torch.dtype):
        known = ", ".join(sorted(_SAFETENSORS_DTYPES))
        raise ValueError(
            f"unsupported safetensors dtype {code!r}{f' in {where}' if where else ''}; "
            f"known: {known}"
        )
    return dtype


@dataclass(frozen=True)
class TensorMeta:
    """Shape and dtype of one stored tensor, known without reading its data.

    Example:
        >>> m = TensorMeta((4, 8), torch.bfloat16)
        >>> m.numel, m.nbytes
        (32, 64)
    """

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        """Number of elements (1 for a scalar)."""
        return math.prod(int(s) for s in self.shape)

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return self.numel * self.dtype.itemsize

    @classmethod
    def of(cls, tensor: Tensor) -> TensorMeta:
        """The metadata of an in-memory tensor."""
        return cls(tuple(int(s) for s in tensor.shape), tensor.dtype)


class WeightSource(ABC):
    """A read-only, lazy collection of named tensors (a model's weights).

    Subclasses implement :meth:`keys`, :meth:`meta`, :meth:`get`, :meth:`files` and
    :meth:`describe`, and set :attr:`origin`. ``meta`` must not read tensor data, ``get``
    reads exactly one tensor. Unknown names raise ``KeyError`` naming the source and the
    closest existing names.

    Attributes:
        origin: the path the weights come from, or ``"<in-memory>"``.

    Example:
        >>> import torch
        >>> from drm_lightning.sources import StateDictSource
        >>> src = StateDictSource({"fc.weight": torch.ones(2, 2)})
        >>> "fc.weight" in src, len(src)
        (True, 1)
        >>> src.get("fc.wieght")
        Traceback (most recent call last):
        ...
        KeyError: "tensor 'fc.wieght' not found in <in-memory> (1 tensors); closest: ['fc.weight']"
    """

    origin: str = "<in-memory>"

    @abstractmethod
    def keys(self) -> list[str]:
        """All tensor names, sorted."""

    @abstractmethod
    def meta(self, name: str) -> TensorMeta:
        """Shape and dtype of ``name`` without reading its data."""

    @abstractmethod
    def get(self, name: str) -> Tensor:
        """Read the tensor ``name`` (one tensor, on CPU for file sources)."""

    def get_rows(self, name: str, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` (along dim 0) of ``name``; file formats that can read a slice
        without the rest override this (safetensors), the default reads the whole tensor."""
        return self.get(name)[start:stop]

    def prefetch(self, names: Sequence[str]) -> None:
        """Hint that ``names`` will be read soon: file sources ask the OS to read their bytes
        ahead (into the page cache, not into this process). Default: nothing."""

    def reads_rows(self, name: str) -> bool:
        """True when :meth:`get_rows` of ``name`` costs only the rows asked for (a slice read,
        or a tensor already in memory); the merge loop then merges a large tensor in row
        pieces (:mod:`drm_lightning.merge.pieces`). Default: no."""
        return False

    @abstractmethod
    def files(self) -> list[Path]:
        """Every file this source reads (for hashing in the model card); empty in memory."""

    @abstractmethod
    def describe(self) -> str:
        """One line for logs and the model card: kind, origin, number of tensors."""

    def check_unchanged(self) -> None:
        """Raise ``ValueError`` naming a file of :meth:`files` that was replaced or rewritten
        since this source read its header (the model card's SHA-256 must be of the files
        merged). Default (in memory): nothing to check."""

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in set(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.origin!r})"

    def total_bytes(self) -> int:
        """Sum of the data sizes of every tensor, from metadata."""
        return sum(self.meta(k).nbytes for k in self.keys())

    def _missing(self, name: str, names: Iterable[str] | None = None) -> KeyError:
        """A ``KeyError`` for an unknown tensor name, listing the closest known names."""
        known = list(self.keys() if names is None else names)
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f"; closest: {close}" if close else ""
        return KeyError(f"tensor {name!r} not found in {self.origin} ({len(known)} tensors){hint}")

    def _lookup(self, table: Mapping[str, Any], name: str) -> Any:
        """``table[name]``, or :meth:`_missing`'s error for an unknown name."""
        try:
            return table[name]
        except KeyError:
            raise self._missing(name) from None


_HASH_CACHE: dict[str, str] = {}  # by file_key: path, size, inode, both times
_HASH_FILE_LOCKS: dict[str, threading.Lock] = {}
_HASH_LOCK = threading.Lock()


def sha256_of(path: str | os.PathLike[str], *, chunk_bytes: int = 8 * 1024 * 1024) -> str:
    """Hex SHA-256 of a file, read in chunks; cached per file state (real path, size, inode,
    modification and change times), and across runs in the digest store
    (:mod:`drm_lightning.sources._digest_store`).

    Args:
        path: the file to hash.
        chunk_bytes: read size.

    Raises:
        FileNotFoundError: the file does not exist.
        IsADirectoryError: ``path`` is a folder.
        ValueError: ``path`` is not a regular file (a FIFO, a device), or it changed while
            it was hashed.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.txt"
        >>> _ = p.write_bytes(b"abc")
        >>> sha256_of(p)[:16]
        'ba7816bf8f01cfea'
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"cannot hash {p}: no such file")
    if p.is_dir():
        raise IsADirectoryError(f"cannot hash {p}: it is a folder, expected a file")
    key = file_key(p)
    with _HASH_LOCK:
        file_lock = _HASH_FILE_LOCKS.setdefault(key, threading.Lock())
    with file_lock:  # a second caller for the same file waits here, then finds the digest cached
        with _HASH_LOCK:
            cached = _HASH_CACHE.get(key)
        if cached is None:
            cached = stored_digest(p, key)
        if cached is not None:
            with _HASH_LOCK:
                _HASH_CACHE[key] = cached
            return cached
        h = hashlib.sha256()
        fd, _ = open_regular(p)  # never a FIFO or a device
        with os.fdopen(fd, "rb") as f:
            while chunk := f.read(chunk_bytes):
                h.update(chunk)
        digest = h.hexdigest()
        if file_key(p) != key:  # replaced or rewritten while hashed: the digest is of neither
            raise changed_error(p)
        store_digest(p, digest, key)
        with _HASH_LOCK:
            _HASH_CACHE[key] = digest
        return digest


def hash_in_background(paths: Iterable[str | os.PathLike[str]]) -> threading.Thread:
    """Start hashing ``paths`` with :func:`sha256_of` in a daemon thread; returns the thread.

    Later ``sha256_of`` calls take the cached digests, or wait for a file being hashed. Errors
    are left to those later calls (which raise them with their own messages). hashlib and file
    reads release the GIL, so the hashing overlaps the merge.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "y.txt"
        >>> _ = p.write_bytes(b"abc")
        >>> hash_in_background([p]).join()
        >>> sha256_of(p)[:16]
        'ba7816bf8f01cfea'
    """
    files = [Path(f) for f in paths]

    def work() -> None:
        for f in files:
            try:
                sha256_of(f)
            except (OSError, ValueError):
                continue

    thread = threading.Thread(target=work, name="drm-lightning-sha256", daemon=True)
    thread.start()
    return thread


class LoadedTensorsMixin:
    """``keys``/``meta``/``get`` of a source whose tensors sit in ``self._tensors``.

    For sources that hold (memory-mapped or in-memory) tensors in a dict, with their sorted
    names in ``self._keys``; unknown names raise the source's own ``_missing`` error.
    """

    _tensors: dict[str, Tensor]
    _keys: list[str]

    def keys(self) -> list[str]:
        return list(self._keys)

    def meta(self, name: str) -> TensorMeta:
        return TensorMeta.of(self._lookup(self._tensors, name))

    def get(self, name: str) -> Tensor:
        return self._lookup(self._tensors, name)

    def reads_rows(self, name: str) -> bool:
        """The tensors are in memory (or memory-mapped): a row slice costs nothing."""
        return True
