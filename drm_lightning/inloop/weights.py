"""Weight helpers of the in-loop core: float states, deltas, loading, and the dense weight swap."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from drm_lightning.sources import open_source


def float_state(module: nn.Module) -> dict[str, Tensor]:
    """Detached floating-point tensors of ``module.state_dict()`` (integer buffers excluded)."""
    return {k: v.detach() for k, v in module.state_dict().items() if torch.is_floating_point(v)}


def cpu_clone(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A CPU copy of every tensor (never sharing storage with the input)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}


class DeltaSource:
    """Weights stored as ``base + delta``; tensors absent from ``delta`` equal the base.

    ``delta`` is either an in-memory mapping or a safetensors file read one tensor at a time.
    """

    def __init__(
        self, base: Mapping[str, Tensor], delta: Mapping[str, Tensor] | Path, origin: str
    ) -> None:
        self.base = base
        self.delta = delta
        self.origin = origin
        self._names: set[str] | None = None

    def _delta_names(self) -> set[str]:
        if self._names is None:
            if isinstance(self.delta, Path):
                with safe_open(str(self.delta), framework="pt") as handle:
                    self._names = set(handle.keys())
            else:
                self._names = set(self.delta.keys())
        return self._names

    def keys(self) -> list[str]:
        return list(self.base.keys())

    def meta(self, name: str) -> Tensor:
        return self.base[name]

    def get(self, name: str) -> Tensor:
        base = self.base[name]
        if name not in self._delta_names():
            return base
        if isinstance(self.delta, Path):
            with safe_open(str(self.delta), framework="pt") as handle:
                delta = handle.get_tensor(name)
        else:
            delta = self.delta[name]
        return (base.to(torch.float32) + delta.to(base.device, torch.float32)).to(base.dtype)


def compute_delta(
    live: Mapping[str, Tensor], base: Mapping[str, Tensor], dtype: torch.dtype | None
) -> dict[str, Tensor]:
    """CPU ``live - base`` for every tensor that changed (unchanged tensors are left out)."""
    out: dict[str, Tensor] = {}
    for name, base_t in base.items():
        live_t = live[name].detach().to("cpu")
        if torch.equal(live_t, base_t):
            continue
        delta = live_t.to(torch.float32) - base_t.to(torch.float32)
        out[name] = delta.to(dtype or live_t.dtype).contiguous()
    return out


def load_weights(path: Path, *, trust_pickles: bool = False) -> dict[str, Tensor]:
    """CPU copies of the floating-point weights of a file or folder, through the core's readers.

    Lightning ``.ckpt`` (its ``state_dict``; for ``WeightAveraging`` checkpoints the averaged
    model), ``.safetensors``, ``.bin``/``.pt`` or a Hugging Face folder: see
    :func:`drm_lightning.sources.open_source`. Pickles that need more than a weights-only
    load are refused unless ``trust_pickles`` (see :mod:`drm_lightning.sources.trust`).
    """
    source = open_source(path, trust_pickles=trust_pickles)
    return {
        name: source.get(name).detach().to("cpu", copy=True)
        for name in source.keys()
        if source.meta(name).dtype.is_floating_point
    }


def check_paths(paths: Mapping[str, Path]) -> None:
    """Raise ``FileNotFoundError`` listing every missing path."""
    missing = [f"{task!r}: {os.fspath(p)}" for task, p in paths.items() if not p.exists()]
    if missing:
        raise FileNotFoundError("checkpoint branch path(s) do not exist: " + "; ".join(missing))


@contextmanager
def restoring(swap: Any) -> Iterator[Any]:
    """``swap`` (a :class:`WeightSwap` or a ZeRO-3 partition swap), restored on exit
    (exceptions included)."""
    try:
        yield swap
    finally:
        swap.restore()


class WeightSwap:
    """Temporarily load weights into a module and put the live ones back bit for bit.

    ``swap.load(weights)`` may be called several times; :meth:`restore` copies back every
    tensor touched since the swap began.
    """

    def __init__(self, module: nn.Module) -> None:
        self._targets = module.state_dict(keep_vars=True)
        self._backup: dict[str, Tensor] = {}

    @torch.no_grad()
    def load(self, weights: Mapping[str, Tensor]) -> None:
        unknown = [k for k in weights if k not in self._targets]
        if unknown:
            raise KeyError(f"cannot load weights for unknown module entries: {unknown[:10]}")
        for name, value in weights.items():
            target = self._targets[name]
            if name not in self._backup:
                self._backup[name] = target.detach().clone()
            target.copy_(value.to(target.device, target.dtype))

    @torch.no_grad()
    def restore(self) -> None:
        for name, saved in self._backup.items():
            self._targets[name].copy_(saved)
        self._backup.clear()
