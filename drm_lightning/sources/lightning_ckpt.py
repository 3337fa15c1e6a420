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

import os
from collections.abc import Mapping
from typing import Any

from drm_lightning.sources.torch_file import TorchFileSource, top_level_entries

__all__ = ["LightningCheckpointSource"]


class LightningCheckpointSource(TorchFileSource):
    """The model weights of a Lightning checkpoint (its ``"state_dict"`` entry).

    Optimizer states, loops and callbacks in the file are never touched (the file is
    memory-mapped). For checkpoints written with Lightning's ``WeightAveraging`` callback,
    ``state_dict`` holds the averaged weights.

    Args:
        path: the ``.ckpt`` file.
        prefix: remove this prefix from every name, keep only names that have it (e.g.
            ``"model."``). No prefix is stripped unless given.
        trust_pickles: allow full unpickling of checkpoints that store Python objects
            (custom hyper-parameter classes); refused by default, see
            :func:`~drm_lightning.sources.torch_file.load_pickled`.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file has no ``state_dict`` entry (not a Lightning checkpoint), or
            no name starts with ``prefix``.

    Example:
        >>> import tempfile, pathlib, torch
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "bad.ckpt"
        >>> torch.save({"weights": {}}, p)
        >>> LightningCheckpointSource(p)
        Traceback (most recent call last):
        ...
        ValueError: .../bad.ckpt is not a Lightning checkpoint: it has no 'state_dict' entry
        (top-level entries: ['weights'])...
    """

    kind = "Lightning checkpoint"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        prefix: str | None = None,
        trust_pickles: bool = False,
    ) -> None:
        super().__init__(path, key="state_dict", prefix=prefix, trust_pickles=trust_pickles)

    def _select(self, payload: Any, key: str | None) -> Mapping[Any, Any]:
        if not isinstance(payload, Mapping) or "state_dict" not in payload:
            raise ValueError(
                f"{self.path} is not a Lightning checkpoint: it has no 'state_dict' entry "
                f"(top-level entries: {top_level_entries(payload)}). For a plain state dict "
                "file use TorchFileSource"
            )
        return super()._select(payload, key)
