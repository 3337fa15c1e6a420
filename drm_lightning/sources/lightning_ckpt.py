"""Lightning ``.ckpt`` files: the ``state_dict`` entry, memory-mapped, optional prefix strip.

A Lightning checkpoint names weights after the ``LightningModule`` attributes
(``model.layers.0...`` when the module keeps its network in ``self.model``). Merging them
with a Hugging Face base needs the prefix removed: pass ``prefix="model."``. Nothing is
guessed; names that do not start with the prefix are left out and listed in ``skipped``.

Example:
    >>> import tempfile, pathlib, torch
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "last.ckpt"
    >>> torch.save({"epoch": 3, "state_dict": {"model.w": torch.ones(2)}}, p)
    >>> LightningCheckpointSource(p, prefix="model.").keys()
    ['w']
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from drm_lightning.sources.torch_file import (
    CheckpointLayoutError,
    TorchFileSource,
    key_hint,
    tensor_entries,
    top_level_entries,
)

__all__ = ["LightningCheckpointSource"]


class LightningCheckpointSource(TorchFileSource):
    """The model weights of a Lightning checkpoint (its ``"state_dict"`` entry).

    Optimizer states, loops and callbacks in the file are never touched (the file is
    memory-mapped). For checkpoints written with Lightning's ``WeightAveraging`` callback,
    ``state_dict`` holds the averaged weights.

    Args:
        path: the ``.ckpt`` file.
        key: the entry holding the weights when it is not Lightning's ``state_dict`` (a
            ``.ckpt`` another trainer wrote: ``"model"``, ``"model/ema"``; see
            :class:`~drm_lightning.sources.torch_file.TorchFileSource`).
        prefix: remove this prefix from every name, keep only names that have it (e.g.
            ``"model."``). No prefix is stripped unless given.
        trust_pickles: allow full unpickling of checkpoints that store Python objects
            (custom hyper-parameter classes); refused by default, see
            :func:`~drm_lightning.sources.torch_file.load_pickled`.

    Raises:
        FileNotFoundError: the file does not exist.
        CheckpointLayoutError: (a ``ValueError``) no ``key`` and no ``state_dict`` entry
            (not a Lightning checkpoint; the entries holding tensors are named), or a ``key``
            the file does not have.
        ValueError: no name starts with ``prefix``.

    Example:
        >>> import tempfile, pathlib, torch
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "bad.ckpt"
        >>> torch.save({"weights": {}}, p)
        >>> LightningCheckpointSource(p)
        Traceback (most recent call last):
        ...
        drm_lightning.sources.torch_file.CheckpointLayoutError: .../bad.ckpt is not a Lightning
        checkpoint: it has no 'state_dict' entry (top-level entries: ['weights'])...
        >>> torch.save({"weights": {"w": torch.ones(1)}}, p)
        >>> LightningCheckpointSource(p, key="weights").keys()
        ['w']
    """

    kind = "Lightning checkpoint"

    def _select(self, payload: Any, key: str | None) -> Mapping[Any, Any]:
        if key is not None or isinstance(payload, nn.Module):  # a module: its state_dict()
            return super()._select(payload, key)
        if not isinstance(payload, Mapping) or "state_dict" not in payload:
            candidates = tensor_entries(payload)
            hint = f"; {key_hint(candidates)}" if candidates else ""
            raise CheckpointLayoutError(
                f"{self.path} is not a Lightning checkpoint: it has no 'state_dict' entry "
                f"(top-level entries: {top_level_entries(payload)}){hint}. For a plain state "
                "dict file use TorchFileSource",
                candidates,
            )
        return super()._select(payload, "state_dict")
