"""A source read onto a device: tensors and LoRA factors moved there as they are read.

Example:
    >>> import torch
    >>> from drm_lightning.sources import StateDictSource
    >>> OnDevice(StateDictSource({"w": torch.ones(2)}), torch.device("cpu")).get("w")
    tensor([1., 1.])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["OnDevice"]


class OnDevice:
    """A source whose tensors (and LoRA factors) are moved to ``device`` when read."""

    def __init__(self, source: Any, device: torch.device) -> None:
        self._source, self._device = source, device
        if callable(getattr(source, "lowrank", None)):
            self.lowrank = self._lowrank

    def __getattr__(self, name: str) -> Any:
        return getattr(self._source, name)

    def get(self, name: str) -> Tensor:
        return self._source.get(name).to(self._device)

    def get_rows(self, name: str, start: int, stop: int) -> Tensor:
        return self._source.get_rows(name, start, stop).to(self._device)

    def _lowrank(self, name: str) -> tuple[Tensor, Tensor] | None:
        pair = self._source.lowrank(name)
        return None if pair is None else (pair[0].to(self._device), pair[1].to(self._device))
