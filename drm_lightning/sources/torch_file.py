"""Pickled torch state dicts (``pytorch_model.bin``, ``.pt``, ``.pth``), memory-mapped.

Files are opened with ``torch.load(..., mmap=True, map_location="cpu")``: the pickle is read
at construction, tensor data stays on disk until a tensor is used. Pickles are loaded
with ``weights_only=True``; files that need full unpickling are refused unless
``trust_pickles=True`` (see :mod:`drm_lightning.sources.trust`).

Example:
    >>> import tempfile, pathlib, torch
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "pytorch_model.bin"
    >>> torch.save({"w": torch.ones(2, 2)}, path)
    >>> TorchFileSource(path).meta("w")
    TensorMeta(shape=(2, 2), dtype=torch.float32)
"""

from __future__ import annotations

import os
import pickle
import pickletools
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from drm_lightning.sources.base import LoadedTensorsMixin, WeightSource
from drm_lightning.sources.input_files import check_regular, check_unchanged, file_identity
from drm_lightning.sources.trust import UntrustedPickleError, _essence

__all__ = ["TorchFileSource", "load_pickled"]


def load_pickled(path: str | os.PathLike[str], *, trust_pickles: bool = False) -> Any:
    """``torch.load`` a file on CPU, memory-mapped when the format allows it.

    The file is always tried with ``weights_only=True`` first (tensors, numbers, strings and
    plain containers only; no code runs). A file that needs more is refused with
    :class:`~drm_lightning.sources.trust.UntrustedPickleError` unless ``trust_pickles`` is
    true, in which case it is fully unpickled (which runs whatever code the file holds).

    Args:
        path: the pickled file.
        trust_pickles: allow full unpickling of files that need it (trusted files only).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UntrustedPickleError: (a ``ValueError``) the file needs full unpickling and
            ``trust_pickles`` is false; the message says how to opt in.
        ValueError: the file is not a torch checkpoint (not a zip or pickle torch wrote).

    Example:
        >>> import tempfile, pathlib, torch
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "sd.pt"
        >>> torch.save({"w": torch.zeros(1)}, p)
        >>> load_pickled(p)
        {'w': tensor([0.])}
    """
    p = Path(path)
    if not p.exists() or p.is_dir():
        raise FileNotFoundError(
            f"torch checkpoint not found: {p}" + (" (it is a folder)" if p.is_dir() else "")
        )
    check_regular(p)  # a FIFO or a device is not opened
    mmap = zipfile.is_zipfile(p)  # legacy (pre-1.6) pickles cannot be memory-mapped
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(p, map_location="cpu", mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as err:
        if not _is_pickle(p, mmap):
            raise _unreadable(p, err) from err
        if not trust_pickles:
            raise UntrustedPickleError(p, str(err)) from None
    except Exception as err:
        raise _unreadable(p, err) from err
    try:
        return torch.load(p, map_location="cpu", mmap=mmap, weights_only=False)
    except Exception as err:
        raise _unreadable(p, err) from err


def _is_pickle(path: Path, is_zip: bool) -> bool:
    """The file (a torch zip archive: its ``data.pkl``) is a well-formed pickle stream, so full
    unpickling could load what the weights-only loader refused; random bytes are not.

    The opcodes are only parsed (:func:`pickletools.genops`), nothing is run."""
    try:
        if is_zip:
            with zipfile.ZipFile(path) as archive:
                pkl = next(n for n in archive.namelist() if n.rsplit("/", 1)[-1] == "data.pkl")
                with archive.open(pkl) as f:
                    return _parses(f)
        with path.open("rb") as f:
            return _parses(f)
    except (OSError, StopIteration, zipfile.BadZipFile):
        return False


def _parses(stream: Any) -> bool:
    try:
        ops = list(pickletools.genops(stream))
    except Exception:  # noqa: BLE001 - any parse error: not a pickle
        return False
    return bool(ops) and ops[-1][0].name == "STOP"


def _unreadable(path: Path, err: BaseException) -> ValueError:
    reason = _essence(str(err)) if isinstance(err, pickle.UnpicklingError) else str(err)
    detail = f"{type(err).__name__}: {reason}".strip().splitlines()[0][:200]
    return ValueError(
        f"{path} is not a readable torch checkpoint ({detail}); expected a file written by "
        "torch.save or a Lightning Trainer (for safetensors files use the .safetensors suffix)"
    )


class TorchFileSource(LoadedTensorsMixin, WeightSource):
    """A pickled state dict file (``torch.save(model.state_dict(), path)``).

    Args:
        path: the file (``.bin``, ``.pt``, ``.pth``, ``.ckpt``).
        key: optional top-level entry holding the state dict (``"state_dict"``,
            ``"model"``...). Without it the file itself must be a mapping of tensors.
        prefix: optional name prefix: only tensors whose name starts with it are kept,
            with the prefix removed (``"model."`` turns ``model.fc.weight`` into
            ``fc.weight``). Names without it are left out and listed in :attr:`skipped`.
            Nothing is stripped unless asked.
        trust_pickles: allow full unpickling, see :func:`load_pickled`.

    Attributes:
        skipped: names left out (not matching ``prefix``, or not tensors).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: no state dict of tensors found, or no name starts with ``prefix``.

    Example:
        >>> import tempfile, pathlib, torch
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "sd.pt"
        >>> torch.save({"model.fc.weight": torch.ones(1, 2), "loss.w": torch.ones(1)}, p)
        >>> src = TorchFileSource(p, prefix="model.")
        >>> src.keys(), src.skipped
        (['fc.weight'], ['loss.w'])
    """

    kind = "torch state dict file"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        key: str | None = None,
        prefix: str | None = None,
        trust_pickles: bool = False,
    ) -> None:
        self.path = Path(path)
        self.origin = str(self.path)
        self.prefix = prefix
        self._identity = file_identity(self.path) if self.path.is_file() else None
        payload = load_pickled(self.path, trust_pickles=trust_pickles)
        if self._identity is not None:
            check_unchanged(self.path, self._identity)  # the file loaded is the one recorded
        state = self._select(payload, key)
        self._tensors: dict[str, Tensor] = {}
        self.skipped: list[str] = []
        for name, value in state.items():
            if not isinstance(name, str) or not isinstance(value, Tensor):
                self.skipped.append(str(name))
                continue
            if prefix:
                if not name.startswith(prefix):
                    self.skipped.append(name)
                    continue
                name = name[len(prefix) :]
            self._tensors[name] = value.detach()
        if prefix and not self._tensors:
            sample = sorted(str(k) for k in state)[:5]
            raise ValueError(
                f"no tensor name in {self.path} starts with prefix {prefix!r}; "
                f"first names: {sample}. "
                "Give the prefix the names actually start with, or none"
            )
        self._keys = sorted(self._tensors)
        del payload, state

    def _select(self, payload: Any, key: str | None) -> Mapping[Any, Any]:
        if key is not None:
            if not isinstance(payload, Mapping) or key not in payload:
                raise ValueError(
                    f"{self.path} has no top-level entry {key!r}; top-level entries: "
                    f"{top_level_entries(payload)}"
                )
            payload = payload[key]
        if not isinstance(payload, Mapping):
            raise ValueError(
                f"{self.path} holds a {type(payload).__name__}, "
                "expected a state dict (a mapping of tensors)"
            )
        if payload and not any(isinstance(v, Tensor) for v in payload.values()):
            top = sorted(str(k) for k in payload)[:10]
            raise ValueError(
                f"{self.path} holds no tensors at the top level (entries: {top}); "
                "give key= the entry that holds the state dict"
            )
        return payload

    def files(self) -> list[Path]:
        return [self.path]

    def check_unchanged(self) -> None:
        """Raise if the file was replaced or rewritten since it was loaded (its tensors are
        memory-mapped: a rewrite shows through)."""
        if self._identity is not None:
            check_unchanged(self.path, self._identity)

    def describe(self) -> str:
        extra = f", prefix {self.prefix!r} stripped" if self.prefix else ""
        extra += f", {len(self.skipped)} entries left out" if self.skipped else ""
        return f"{self.kind} {self.path} ({len(self._keys)} tensors{extra})"

    def __contains__(self, name: object) -> bool:
        return name in self._tensors


def top_level_entries(payload: Any) -> list[str] | str:
    """What a loaded file holds at its top level, for error messages: sorted keys or a type name."""
    return (
        sorted(str(k) for k in payload) if isinstance(payload, Mapping) else type(payload).__name__
    )
