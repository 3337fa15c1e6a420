"""Hugging Face model folders: sharded or single safetensors, or ``pytorch_model.bin``
(sharded too).

The layout is found from the file names ``save_pretrained`` writes, in the order
``transformers`` prefers them:

1. ``model.safetensors.index.json`` + shards,
2. ``model.safetensors``,
3. ``pytorch_model.bin.index.json`` + shards,
4. ``pytorch_model.bin``.

Shards are opened lazily, the first time one of their tensors is asked for.

Example:
    >>> import tempfile, pathlib, torch
    >>> from safetensors.torch import save_file
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> save_file({"w": torch.ones(2)}, str(folder / "model.safetensors"))
    >>> src = HFFolderSource(folder)
    >>> src.layout, src.keys()
    ('safetensors', ['w'])
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from torch import Tensor

from drm_lightning.sources.base import TensorMeta, WeightSource
from drm_lightning.sources.input_files import FileIdentity, check_unchanged, read_regular
from drm_lightning.sources.safetensors_file import SafetensorsFileSource
from drm_lightning.sources.torch_file import TorchFileSource

__all__ = ["EXPECTED_INPUTS", "HFFolderSource"]

Layout = Literal["safetensors-sharded", "safetensors", "bin-sharded", "bin"]

EXPECTED_INPUTS = (
    "expected a .safetensors file, a folder with model.safetensors[.index.json] or "
    "pytorch_model.bin, a Lightning .ckpt, or a PEFT adapter folder with adapter_config.json"
)

SAFETENSORS_INDEX = "model.safetensors.index.json"
_CANDIDATES: tuple[tuple[str, Layout], ...] = (
    (SAFETENSORS_INDEX, "safetensors-sharded"),
    ("model.safetensors", "safetensors"),
    ("pytorch_model.bin.index.json", "bin-sharded"),
    ("pytorch_model.bin", "bin"),
)


class HFFolderSource(WeightSource):
    """The weights of a ``save_pretrained`` folder.

    Args:
        path: the folder.
        trust_pickles: for ``.bin`` files (``pytorch_model.bin``, or shards an index names),
            allow full unpickling, see :func:`~drm_lightning.sources.torch_file.load_pickled`
            (default: weights-only, anything else refused).

    Attributes:
        path: the folder.
        layout: which of the four layouts was found.

    Raises:
        FileNotFoundError: the folder does not exist, has none of the weight files, or its
            index names shard files that are missing (all listed).
        ValueError: the index file is malformed.

    Example:
        >>> import tempfile
        >>> HFFolderSource(tempfile.mkdtemp())
        Traceback (most recent call last):
        ...
        FileNotFoundError: no model weights in ...: expected a .safetensors file, a folder with
        model.safetensors[.index.json] or pytorch_model.bin, ...
    """

    def __init__(self, path: str | os.PathLike[str], *, trust_pickles: bool = False) -> None:
        self.path = Path(path)
        self.origin = str(self.path)
        self._trust_pickles = trust_pickles
        if not self.path.exists():
            raise FileNotFoundError(f"model folder not found: {self.path}; {EXPECTED_INPUTS}")
        if not self.path.is_dir():
            raise NotADirectoryError(
                f"{self.path} is a file, not a model folder; {EXPECTED_INPUTS}"
            )
        for filename, layout in _CANDIDATES:
            if (self.path / filename).is_file():
                self.layout: Layout = layout
                self._main = self.path / filename
                break
        else:
            present = sorted(p.name for p in self.path.iterdir())[:20]
            raise FileNotFoundError(
                f"no model weights in {self.path}: {EXPECTED_INPUTS}; the folder holds {present}"
            )
        self._shards: dict[str, WeightSource] = {}
        self._index_identity: FileIdentity | None = None
        self._weight_map: dict[str, str]
        if self.layout.endswith("sharded"):
            self._weight_map = self._read_index(self._main)
        else:
            single = self._open_shard(self._main.name)
            self._weight_map = {k: self._main.name for k in single.keys()}
        self._keys = sorted(self._weight_map)

    def _read_index(self, index: Path) -> dict[str, str]:
        text, self._index_identity = read_regular(index)
        try:
            data = json.loads(text)
            weight_map = data["weight_map"]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(
                f"{index} is not a valid shard index (needs a 'weight_map' object): {err}"
            ) from err
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise ValueError(f"{index}: 'weight_map' must map tensor names to shard file names")
        bad = sorted({v for v in weight_map.values() if Path(v).name != v})
        if bad:
            raise ValueError(
                f"{index}: shard file names must be plain names inside the folder, got {bad}"
            )
        missing = sorted({v for v in weight_map.values() if not (self.path / v).is_file()})
        if missing:
            raise FileNotFoundError(
                f"{index} names shard file(s) missing from {self.path}: {missing}"
            )
        return dict(weight_map)

    def _open_shard(self, filename: str) -> WeightSource:
        shard = self._shards.get(filename)
        if shard is None:
            file = self.path / filename
            if filename.endswith(".safetensors"):
                shard = SafetensorsFileSource(file)
            else:
                shard = TorchFileSource(file, trust_pickles=self._trust_pickles)
            self._shards[filename] = shard
        return shard

    def _shard_of(self, name: str) -> WeightSource:
        filename = self._weight_map.get(name)
        if filename is None:
            raise self._missing(name)
        shard = self._open_shard(filename)
        if name not in shard:
            raise ValueError(
                f"{self._main} maps {name!r} to {filename}, but that shard does not contain it"
            )
        return shard

    def keys(self) -> list[str]:
        return list(self._keys)

    def meta(self, name: str) -> TensorMeta:
        return self._shard_of(name).meta(name)

    def get(self, name: str) -> Tensor:
        return self._shard_of(name).get(name)

    def get_rows(self, name: str, start: int, stop: int) -> Tensor:
        return self._shard_of(name).get_rows(name, start, stop)

    def prefetch(self, names: Sequence[str]) -> None:  # noqa: D102
        shards: dict[int, tuple[WeightSource, list[str]]] = {}
        for name in names:
            if name in self._weight_map:
                shard = self._shard_of(name)
                shards.setdefault(id(shard), (shard, []))[1].append(name)
        for shard, names_here in shards.values():
            shard.prefetch(names_here)

    def reads_rows(self, name: str) -> bool:  # noqa: D102
        return self._shard_of(name).reads_rows(name)

    def files(self) -> list[Path]:
        shards = sorted({self.path / f for f in self._weight_map.values()})
        return ([self._main] if self.layout.endswith("sharded") else []) + shards

    def check_unchanged(self) -> None:
        """Raise if the index or a shard read so far was replaced or rewritten since."""
        if self._index_identity is not None:
            check_unchanged(self._main, self._index_identity)
        for shard in list(self._shards.values()):
            shard.check_unchanged()

    def describe(self) -> str:
        n_files = len(set(self._weight_map.values()))
        return (
            f"HF folder {self.path} ({self.layout}, {n_files} file(s), {len(self._keys)} tensors)"
        )

    def __contains__(self, name: object) -> bool:
        return name in self._weight_map
