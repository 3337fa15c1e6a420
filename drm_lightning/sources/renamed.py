"""Rename a source's tensors by a prefix: strip one (``model.fc.w`` -> ``fc.w``) or add one.

Lightning checkpoints name weights after the ``LightningModule`` attribute that holds the
network (``model.``); a Hugging Face base does not. :class:`RenamedSource` wraps any
:class:`~drm_lightning.sources.base.WeightSource` (``prefix:`` / ``add_prefix:`` of a
``drm-merge`` branch); :func:`prefix_hint` explains a key mismatch that is only a prefix.

Example:
    >>> import torch
    >>> from drm_lightning.sources import StateDictSource
    >>> src = StateDictSource({"model.fc.weight": torch.ones(2), "loss.w": torch.ones(1)})
    >>> renamed = RenamedSource(src, strip="model.")
    >>> renamed.keys(), renamed.skipped
    (['fc.weight'], ['loss.w'])
    >>> RenamedSource(StateDictSource({"fc.w": torch.ones(1)}), add="net.").keys()
    ['net.fc.w']
    >>> prefix_hint(["fc.w", "fc.b"], ["model.fc.w", "model.fc.b"])
    "its names are the base's with the prefix 'model.' in front: set prefix: 'model.' on the branch"
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from torch import Tensor

from drm_lightning.sources.base import TensorMeta, WeightSource

__all__ = ["RenamedSource", "prefix_hint"]


class RenamedSource(WeightSource):
    """``source`` with ``strip`` removed from the front of its names and/or ``add`` put there.

    Names that do not start with ``strip`` are left out and listed in :attr:`skipped`.

    Raises:
        ValueError: no name starts with ``strip`` (the first names are listed).
    """

    def __init__(
        self, source: WeightSource, *, strip: str | None = None, add: str | None = None
    ) -> None:
        self.source, self.strip, self.add = source, strip or "", add or ""
        self.origin = source.origin
        self._to_inner: dict[str, str] = {}
        self.skipped: list[str] = []
        for name in source.keys():
            if not name.startswith(self.strip):
                self.skipped.append(name)
                continue
            self._to_inner[self.add + name[len(self.strip) :]] = name
        if self.strip and not self._to_inner:
            raise ValueError(
                f"no tensor name in {source.origin} starts with prefix {self.strip!r}; "
                f"first names: {source.keys()[:5]}. "
                "Give the prefix the names actually start with, or none"
            )
        self._keys = sorted(self._to_inner)

    def _inner(self, name: str) -> str:
        inner = self._to_inner.get(name)
        if inner is None:
            raise self._missing(name)
        return inner

    def keys(self) -> list[str]:
        return list(self._keys)

    def meta(self, name: str) -> TensorMeta:
        return self.source.meta(self._inner(name))

    def get(self, name: str) -> Tensor:
        return self.source.get(self._inner(name))

    def get_rows(self, name: str, start: int, stop: int) -> Tensor:
        return self.source.get_rows(self._inner(name), start, stop)

    def reads_rows(self, name: str) -> bool:
        return self.source.reads_rows(self._inner(name))

    def files(self) -> list[Path]:
        return self.source.files()

    def check_unchanged(self) -> None:
        self.source.check_unchanged()

    def describe(self) -> str:
        change = [f"prefix {self.strip!r} stripped"] if self.strip else []
        change += [f"prefix {self.add!r} added"] if self.add else []
        change += [f"{len(self.skipped)} entries left out"] if self.skipped else []
        return f"{self.source.describe()} [{', '.join(change)}]"

    def __contains__(self, name: object) -> bool:
        return name in self._to_inner


def prefix_hint(base_keys: Iterable[str], branch_keys: Iterable[str]) -> str | None:
    """If ``branch_keys`` are ``base_keys`` up to one common prefix, the config fix; else None.

    Only a hint: it is given when, after stripping (or adding) the prefix, the branch holds
    every base name.
    """
    base, branch = set(base_keys), set(branch_keys)
    if not base or not branch or base <= branch:
        return None
    for outer, inner, verb in ((branch, base, "strip"), (base, branch, "add")):
        sample = next(iter(sorted(outer - inner)), None)
        if sample is None:
            continue
        for name in sorted(inner, key=len, reverse=True):
            if not sample.endswith(name) or sample == name:
                continue
            prefix = sample[: -len(name)]
            if verb == "strip" and base <= {
                k[len(prefix) :] for k in outer if k.startswith(prefix)
            }:
                return (
                    f"its names are the base's with the prefix {prefix!r} in front: set "
                    f"prefix: {prefix!r} on the branch"
                )
            if verb == "add" and base <= {prefix + k for k in branch}:
                return (
                    f"its names are the base's without the prefix {prefix!r}: set "
                    f"add_prefix: {prefix!r} on the branch"
                )
            break
    return None
