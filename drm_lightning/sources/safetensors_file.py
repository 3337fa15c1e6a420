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

import os
from pathlib import Path

from safetensors import SafetensorError, safe_open
from torch import Tensor

from drm_lightning.sources.base import TensorMeta, WeightSource, dtype_from_safetensors

__all__ = ["SafetensorsFileSource"]


class SafetensorsFileSource(WeightSource):
    """A single safetensors file.

    The header (names, shapes, dtypes) is read once at construction; ``get`` memory-maps
    the file and copies out one tensor. The file is not kept open between calls.

    Args:
        path: the ``.safetensors`` file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        IsADirectoryError: ``path`` is a folder (use :class:`HFFolderSource`).
        ValueError: the file is not a valid safetensors file.

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

    def keys(self) -> list[str]:
        return list(self._keys)

    def meta(self, name: str) -> TensorMeta:
        try:
            return self._meta[name]
        except KeyError:
            raise self._missing(name) from None

    def get(self, name: str) -> Tensor:
        if name not in self._meta:
            raise self._missing(name)
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(name)

    def get_rows(self, name: str, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` read through ``get_slice``: nothing else of the tensor is read."""
        if name not in self._meta:
            raise self._missing(name)
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_slice(name)[start:stop]

    def reads_rows(self, name: str) -> bool:  # noqa: D102
        return True

    def files(self) -> list[Path]:
        return [self.path]

    def describe(self) -> str:
        return f"safetensors file {self.path} ({len(self._keys)} tensors)"

    def __contains__(self, name: object) -> bool:
        return name in self._meta
