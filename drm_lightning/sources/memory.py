"""In-memory weights: a state dict or an ``nn.Module``, exposed without copying.

Example:
    >>> import torch
    >>> src = StateDictSource(torch.nn.Linear(3, 2))
    >>> src.keys(), src.meta("weight").shape
    (['bias', 'weight'], (2, 3))
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from drm_lightning.sources.base import LoadedTensorsMixin, WeightSource

__all__ = ["StateDictSource"]


class StateDictSource(LoadedTensorsMixin, WeightSource):
    """A mapping of tensors or a module's ``state_dict()``.

    Tensors are detached but not copied: they share memory with the module, so ``get``
    returns the live values (on whatever device they are). Tied parameters appear under
    every name, as in ``state_dict()``.

    Args:
        weights: a mapping ``name -> Tensor`` or an ``nn.Module``.
        origin: a label for logs and error messages.
        device: when given, ``get`` returns each tensor moved there (one at a time, so a
            GPU module's weights reach a CPU merge without a whole-model copy).

    Raises:
        TypeError: ``weights`` is neither, or holds non-tensor values (all listed).

    Example:
        >>> import torch
        >>> w = torch.zeros(2)
        >>> src = StateDictSource({"w": w})
        >>> src.get("w").data_ptr() == w.data_ptr()
        True
    """

    def __init__(
        self,
        weights: Mapping[str, Tensor] | torch.nn.Module,
        *,
        origin: str = "<in-memory>",
        device: torch.device | str | None = None,
    ) -> None:
        if isinstance(weights, torch.nn.Module):
            state: Mapping[str, object] = weights.state_dict(keep_vars=False)
        elif isinstance(weights, Mapping):
            state = weights
        else:
            raise TypeError(
                "StateDictSource expects a mapping of tensors or an nn.Module, "
                f"got {type(weights).__name__}"
            )
        bad = [
            f"{k!r} ({type(v).__name__})"
            for k, v in state.items()
            if not isinstance(v, Tensor) or not isinstance(k, str)
        ]
        if bad:
            raise TypeError(
                f"state dict entries must be str -> Tensor; not tensors: {', '.join(bad[:20])}"
            )
        self._tensors: dict[str, Tensor] = {k: v.detach() for k, v in state.items()}  # type: ignore[union-attr]
        self._keys = sorted(self._tensors)
        self.origin = origin
        self.device = device

    def get(self, name: str) -> Tensor:  # noqa: D102
        tensor = super().get(name)
        return tensor if self.device is None else tensor.to(self.device)

    def get_rows(self, name: str, start: int, stop: int) -> Tensor:  # noqa: D102
        rows = super().get(name)[start:stop]
        return rows if self.device is None else rows.to(self.device)

    def files(self) -> list[Path]:
        return []

    def describe(self) -> str:
        return f"in-memory state dict {self.origin} ({len(self._keys)} tensors)"

    def __contains__(self, name: object) -> bool:
        return name in self._tensors
