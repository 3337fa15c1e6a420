"""Pickled torch state dicts (``pytorch_model.bin``, ``.pt``, ``.pth``), memory-mapped.

Files are opened with ``torch.load(..., mmap=True, map_location="cpu")``: the pickle is read
at construction, tensor data stays on disk until a tensor is used. Pickles are loaded
with ``weights_only=True``; files that need full unpickling are refused unless
``trust_pickles=True`` (see :mod:`drm_lightning.sources.trust`).

Where the state dict sits in the file is :class:`TorchFileSource`'s ``key``: an entry path
written with ``/`` between entries (``"state_dict"``, ``"model/ema"``). A file whose top level
holds no tensors is refused with the entries that do hold some (:class:`CheckpointLayoutError`);
nothing is picked for the user. A whole pickled module (``torch.save(model)``, only loadable
with ``trust_pickles``) gives its ``state_dict()``; when its code is not importable the
error says so (:func:`load_pickled`).

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
from torch import Tensor, nn

from drm_lightning.sources.base import LoadedTensorsMixin, WeightSource
from drm_lightning.sources.input_files import check_regular, check_unchanged, file_identity
from drm_lightning.sources.trust import UntrustedPickleError, _essence

__all__ = [
    "KEY_SEPARATOR",
    "CheckpointLayoutError",
    "TorchFileSource",
    "key_hint",
    "load_pickled",
    "tensor_entries",
    "top_level_entries",
]

KEY_SEPARATOR = "/"
"""Between the entries of a nested ``key`` (``"model/ema"``: the entry ``ema`` of ``model``)."""


class CheckpointLayoutError(ValueError):
    """The state dict of a checkpoint is not where it was looked for (no ``key`` and no tensors
    at the top level, or a ``key`` the file does not have).

    Attributes:
        candidates: entry path -> tensor names, for each entry that holds tensors (what
            ``key`` could be); callers add hints from the names (a common prefix).
    """

    def __init__(self, message: str, candidates: dict[str, list[str]] | None = None) -> None:
        super().__init__(message)
        self.candidates = candidates or {}


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
        ValueError: the file is not a torch checkpoint (not a zip or pickle torch wrote), or
            (fully unpickled) it names a class whose code is not importable here: the message
            names the class and says whether the file is a whole pickled module
            (``torch.save(model)``, whose ``state_dict()`` should be saved instead).

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
            module = _whole_module(_pickle_ops(p, mmap))
            note = (
                f"It is a whole pickled module (class {module!r}): its state_dict(), saved with "
                "torch.save(model.state_dict(), path), loads without the opt-in"
                if module
                else ""
            )
            raise UntrustedPickleError(p, str(err), note=note) from None
    except Exception as err:
        raise _unreadable(p, err) from err
    try:
        return torch.load(p, map_location="cpu", mmap=mmap, weights_only=False)
    except (ModuleNotFoundError, AttributeError) as err:  # a class it names cannot be found
        missing = _missing_code(p, mmap, err)
        if missing is None:
            raise _unreadable(p, err) from err
        raise ValueError(missing) from err
    except Exception as err:
        raise _unreadable(p, err) from err


def _is_pickle(path: Path, is_zip: bool) -> bool:
    """The file (a torch zip archive: its ``data.pkl``) is a well-formed pickle stream, so full
    unpickling could load what the weights-only loader refused; random bytes are not."""
    ops = _pickle_ops(path, is_zip, skip=0)
    return bool(ops) and ops[-1][0] == "STOP"


def _pickle_ops(path: Path, is_zip: bool, *, skip: int = 3) -> list[tuple[str, Any]]:
    """``(opcode name, argument)`` of the file's pickle: a torch zip archive's ``data.pkl``, or
    the pickle after the first ``skip`` of a legacy file (magic number, protocol and system
    info come first); ``[]`` if it does not parse. The opcodes are only parsed
    (:func:`pickletools.genops`), nothing is run."""
    try:
        if is_zip:
            with zipfile.ZipFile(path) as archive:
                pkl = next(n for n in archive.namelist() if n.rsplit("/", 1)[-1] == "data.pkl")
                with archive.open(pkl) as f:
                    return _parse(f)
        with path.open("rb") as f:
            for _ in range(skip):
                if not _parse(f):
                    return []
            return _parse(f)
    except (OSError, StopIteration, zipfile.BadZipFile):
        return []


def _parse(stream: Any) -> list[tuple[str, Any]]:
    try:
        return [(op.name, arg) for op, arg, _pos in pickletools.genops(stream)]
    except Exception:  # noqa: BLE001 - any parse error: not a pickle
        return []


def _pickled_classes(ops: list[tuple[str, Any]]) -> list[str]:
    """``module.qualname`` of every class or function the pickle names, in order (``GLOBAL``,
    and ``STACK_GLOBAL`` from the strings pushed before it, memo included)."""
    found, strings, memo = [], [], {}
    for name, arg in ops:
        if name == "GLOBAL":
            found.append(arg.replace(" ", ".", 1))
        elif "UNICODE" in name or name.endswith("STRING"):
            strings.append(arg)
        elif name in ("BINPUT", "LONG_BINPUT", "PUT") and strings:
            memo[arg] = strings[-1]
        elif name == "MEMOIZE" and strings:
            memo[len(memo)] = strings[-1]
        elif name in ("BINGET", "LONG_BINGET", "GET") and arg in memo:
            strings.append(memo[arg])
        elif name == "STACK_GLOBAL" and len(strings) >= 2:
            found.append(f"{strings[-2]}.{strings[-1]}")
    return found


def _missing_code(path: Path, is_zip: bool, err: BaseException) -> str | None:
    """What a full unpickling that failed on a class it could not import means, or None when
    ``err`` is something else: the class, whether the file is a whole pickled module
    (``torch.save(model)``) and what to do."""
    text = str(err)
    ops = _pickle_ops(path, is_zip)
    classes = _pickled_classes(ops)
    if isinstance(err, ModuleNotFoundError) and err.name:
        needed = [c for c in classes if c.startswith(f"{err.name}.")]
    elif text.startswith("Can't get attribute '"):
        attr = text.split("'")[1]
        needed = [c for c in classes if c.rsplit(".", 1)[-1] == attr]
    else:
        return None
    if not needed:
        return None
    whole = _whole_module(ops) == needed[0]
    what = "a whole pickled module" if whole else "a pickled object"
    fix = (
        "save its state_dict() instead (torch.save(model.state_dict(), ...)), or make the "
        "module importable"
        if whole
        else "make the module importable, or save the checkpoint with tensors and plain "
        "containers only (a model's state_dict(), not the model)"
    )
    reason = text.splitlines()[0][:200] if text else type(err).__name__
    return (
        f"{path} holds {what} of class {needed[0]!r} whose code is not importable here "
        f"({reason}); {fix}"
    )


def _whole_module(ops: list[tuple[str, Any]]) -> str | None:
    """The class of the pickled object if it is an ``nn.Module`` (``torch.save(model)``): its
    first opcode names a class and the pickle holds a module's ``_parameters``/``_modules``."""
    first = next((name for name, _ in ops if name != "PROTO"), "")  # the object's first op
    strings = {arg for name, arg in ops if isinstance(arg, str) and "UNICODE" in name}
    if not (first == "GLOBAL" or "UNICODE" in first) or not {"_parameters", "_modules"} <= strings:
        return None
    return next(iter(_pickled_classes(ops)), None)


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
        key: the entry holding the state dict (``"state_dict"``, ``"model"``), nested entries
            written with ``/`` (``"model/ema"``). Without it the file itself must be a mapping
            of tensors; a file whose top level holds none is refused with the entries that
            hold some. An entry (or the file) holding a whole ``nn.Module`` gives its
            ``state_dict()``.
        prefix: optional name prefix: only tensors whose name starts with it are kept,
            with the prefix removed (``"model."`` turns ``model.fc.weight`` into
            ``fc.weight``). Names without it are left out and listed in :attr:`skipped`.
            Nothing is stripped unless asked.
        trust_pickles: allow full unpickling, see :func:`load_pickled`.

    Attributes:
        skipped: names left out (not matching ``prefix``, or not tensors).

    Raises:
        FileNotFoundError: the file does not exist.
        CheckpointLayoutError: (a ``ValueError``) ``key`` is not in the file (the entries
            there are listed), or no ``key`` and no tensors at the top level (the entries
            holding tensors are named).
        ValueError: no state dict of tensors found, or no name starts with ``prefix``.

    Example:
        >>> import tempfile, pathlib, torch
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "sd.pt"
        >>> torch.save({"model.fc.weight": torch.ones(1, 2), "loss.w": torch.ones(1)}, p)
        >>> src = TorchFileSource(p, prefix="model.")
        >>> src.keys(), src.skipped
        (['fc.weight'], ['loss.w'])
        >>> torch.save({"epoch": 3, "state_dict": {"module.w": torch.ones(2)}}, p)
        >>> TorchFileSource(p, key="state_dict", prefix="module.").keys()
        ['w']
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
        self.key = key
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
        """The state dict of ``payload``: its entry ``key``, else the payload itself."""
        where = ""
        if key is not None:
            payload, where = _entry(self.path, payload, key), f" entry {key!r}"
        payload = _state_of(payload)
        if not isinstance(payload, Mapping):
            raise ValueError(
                f"{self.path}{where} holds a {type(payload).__name__}, "
                "expected a state dict (a mapping of tensors)"
            )
        if payload and not any(isinstance(v, Tensor) for v in payload.values()):
            top = sorted(str(k) for k in payload)[:10]
            candidates = {
                f"{key}{KEY_SEPARATOR}{c}" if key else c: n
                for c, n in tensor_entries(payload).items()
            }
            raise CheckpointLayoutError(
                f"{self.path}{where} holds no tensors at its top level (entries: {top}); "
                + key_hint(candidates),
                candidates,
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
        extra = f", entry {self.key!r}" if self.key else ""
        extra += f", prefix {self.prefix!r} stripped" if self.prefix else ""
        extra += f", {len(self.skipped)} entries left out" if self.skipped else ""
        return f"{self.kind} {self.path} ({len(self._keys)} tensors{extra})"

    def __contains__(self, name: object) -> bool:
        return name in self._tensors


def top_level_entries(payload: Any) -> list[str] | str:
    """What a loaded file holds at its top level, for error messages: sorted keys or a type name."""
    return (
        sorted(str(k) for k in payload) if isinstance(payload, Mapping) else type(payload).__name__
    )


def _state_of(value: Any) -> Any:
    """A whole ``nn.Module`` (only in a fully unpickled file) stands for its ``state_dict()``."""
    return value.state_dict() if isinstance(value, nn.Module) else value


def _entry(path: Path, payload: Any, key: str) -> Any:
    """The entry ``key`` (``/`` between nested entries) of ``payload``.

    Raises:
        CheckpointLayoutError: an entry on the way is missing; the entries there are listed.
    """
    node = payload
    parts = key.split(KEY_SEPARATOR)
    for depth, part in enumerate(parts):
        node = _state_of(node) if depth else node
        if not isinstance(node, Mapping) or part not in node:
            at = KEY_SEPARATOR.join(parts[:depth])
            here = "its top level" if not depth else f"its entry {at!r}"
            candidates = tensor_entries(payload)
            hint = "; " + key_hint(candidates) if candidates else ""
            raise CheckpointLayoutError(
                f"{path} has no entry {key!r} (key): {here} has no {part!r}; entries there: "
                f"{top_level_entries(node)}{hint}",
                candidates,
            )
        node = node[part]
    return node


def tensor_entries(payload: Any, *, depth: int = 2) -> dict[str, list[str]]:
    """Entry path -> tensor names, for each entry of ``payload`` (down to ``depth`` levels)
    that is a mapping (or module) holding tensors: what ``key`` could be.

    Example:
        >>> import torch
        >>> tensor_entries({"epoch": 1, "model": {"ema": {"w": torch.ones(1)}, "step": 2}})
        {'model/ema': ['w']}
    """
    found: dict[str, list[str]] = {}
    if depth <= 0 or not isinstance(payload, Mapping):
        return found
    for name, value in payload.items():
        if not isinstance(name, str):
            continue
        value = _state_of(value)
        if not isinstance(value, Mapping):
            continue
        names = [str(k) for k, v in value.items() if isinstance(v, Tensor)]
        if names:
            found[name] = names
        for inner, tensors in tensor_entries(value, depth=depth - 1).items():
            found[f"{name}{KEY_SEPARATOR}{inner}"] = tensors
    return found


def key_hint(candidates: Mapping[str, list[str]]) -> str:
    """The sentence that says which ``key`` holds the state dict (``candidates``: entry path
    -> tensor names, from :func:`tensor_entries`)."""
    if not candidates:
        return (
            "none of its entries holds tensors; expected a state dict, as written by "
            "torch.save(model.state_dict(), path)"
        )
    best = next((c for c in candidates if c.rsplit(KEY_SEPARATOR, 1)[-1] == "state_dict"), None)
    best = best or next(iter(candidates))
    listed = ", ".join(
        f"{c!r} ({len(n)} tensor{'s' * (len(n) != 1)})" for c, n in list(candidates.items())[:8]
    )
    where = "its entry" if len(candidates) == 1 else "its entries"
    return (
        f"the tensors are in {where} {listed}: set key: {best} on the branch "
        f"(key={best!r} of open_source)"
    )
