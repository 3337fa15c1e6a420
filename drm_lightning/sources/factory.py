"""``open_source``: the right :class:`WeightSource` for a path, a state dict or a module.

Example:
    >>> import torch
    >>> open_source({"w": torch.ones(1)}).describe()
    'in-memory state dict <in-memory> (1 tensors)'
    >>> open_source("/no/such/model")
    Traceback (most recent call last):
    ...
    FileNotFoundError: /no/such/model does not exist; expected a .safetensors file, ...
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from drm_lightning.sources.base import WeightSource
from drm_lightning.sources.hf_folder import EXPECTED_INPUTS, HFFolderSource
from drm_lightning.sources.lightning_ckpt import LightningCheckpointSource
from drm_lightning.sources.lora import LoraBranch
from drm_lightning.sources.memory import StateDictSource
from drm_lightning.sources.safetensors_file import SafetensorsFileSource
from drm_lightning.sources.torch_file import TorchFileSource

__all__ = ["CHECKPOINT_SUFFIXES", "SourceLike", "open_source"]

SourceLike = WeightSource | Mapping[str, torch.Tensor] | torch.nn.Module | str | os.PathLike[str]
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
CHECKPOINT_SUFFIXES = (".ckpt", *_PICKLE_SUFFIXES)
"""Torch checkpoint files: the inputs that take ``prefix=`` and ``key=``."""


def open_source(
    obj: SourceLike,
    *,
    base: SourceLike | None = None,
    prefix: str | None = None,
    key: str | None = None,
    trust_pickles: bool = False,
    adapter_name: str | None = None,
) -> WeightSource:
    """Open weights from any supported input.

    ========================================  ===============================
    input                                     source
    ========================================  ===============================
    a :class:`WeightSource`                   returned unchanged
    a mapping of tensors / ``nn.Module``      :class:`StateDictSource`
    ``*.safetensors`` file                    :class:`SafetensorsFileSource`
    ``*.ckpt`` file                           :class:`LightningCheckpointSource`
    ``*.bin`` / ``*.pt`` / ``*.pth`` file     :class:`TorchFileSource`
    folder with ``adapter_config.json``       :class:`LoraBranch` (needs ``base``)
    other folder                              :class:`HFFolderSource`
    ========================================  ===============================

    Args:
        obj: what to open.
        base: the base model, required for (and only used by) PEFT adapter folders.
        prefix: name prefix to strip, for ``.ckpt`` / ``.bin`` / ``.pt`` files only.
        key: the entry of a ``.ckpt`` / ``.bin`` / ``.pt`` file that holds the state dict,
            nested entries written with ``/`` (``"state_dict"``, ``"model/ema"``); a
            ``.ckpt`` without it is read as a Lightning checkpoint (its ``state_dict``).
        trust_pickles: allow full unpickling of ``.ckpt`` / ``.bin`` / ``.pt`` files that
            hold more than tensors (they can run code; refused by default, see
            :mod:`drm_lightning.sources.trust`).
        adapter_name: for adapter files holding several adapters.

    Raises:
        FileNotFoundError: the path does not exist or holds no weights (says what was expected).
        ValueError: unsupported file type, adapter folder without ``base``, ``prefix`` or
            ``key`` where it does not apply.
        CheckpointLayoutError: (a ``ValueError``) the state dict is not where it was looked
            for (see :class:`~drm_lightning.sources.torch_file.TorchFileSource`).
        TypeError: ``obj`` is of an unsupported type.

    Example:
        >>> import tempfile, pathlib, torch
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "model.txt"
        >>> _ = p.write_text("hello")
        >>> open_source(p)
        Traceback (most recent call last):
        ...
        ValueError: .../model.txt: unsupported file type '.txt'; expected a .safetensors file, ...
    """
    if isinstance(obj, WeightSource):
        return obj
    if isinstance(obj, (torch.nn.Module, Mapping)):
        if prefix or key:
            raise ValueError(
                f"{'prefix' if prefix else 'key'}= is only supported for .ckpt/.bin/.pt files; "
                "rename or pick in-memory entries yourself"
            )
        return StateDictSource(obj)
    if not isinstance(obj, (str, os.PathLike)):
        raise TypeError(
            f"cannot open weights from a {type(obj).__name__}; "
            "give a path, a state dict, an nn.Module or a WeightSource"
        )
    path = Path(obj)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; {EXPECTED_INPUTS}")
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            if base is None:
                raise ValueError(
                    f"{path} is a PEFT adapter folder; "
                    "open it with base= the model it was trained on"
                )
            _checkpoint_only(path, prefix=None, key=key)
            return LoraBranch(
                path,
                open_source(base, trust_pickles=trust_pickles),
                adapter_name=adapter_name,
                trust_pickles=trust_pickles,
            )
        _checkpoint_only(path, prefix=prefix, key=key)
        return HFFolderSource(path, trust_pickles=trust_pickles)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        _checkpoint_only(path, prefix=prefix, key=key)
        return SafetensorsFileSource(path)
    if suffix == ".ckpt":
        return LightningCheckpointSource(path, key=key, prefix=prefix, trust_pickles=trust_pickles)
    if suffix in _PICKLE_SUFFIXES:
        return TorchFileSource(path, key=key, prefix=prefix, trust_pickles=trust_pickles)
    raise ValueError(f"{path}: unsupported file type {suffix!r}; {EXPECTED_INPUTS}")


def _checkpoint_only(path: Path, *, prefix: str | None, key: str | None) -> None:
    for name, value in (("prefix", prefix), ("key", key)):
        if value:
            raise ValueError(f"{name}= is only supported for .ckpt/.bin/.pt files, not {path}")
