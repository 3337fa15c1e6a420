"""Disk-to-disk merges ask their sources to read the next tensor ahead (sources/read_ahead.py)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from drm_lightning.merge import iter_merge
from drm_lightning.methods import get_method
from drm_lightning.sources import SafetensorsFileSource
from drm_lightning.sources.read_ahead import ReadAhead


class _Recording(SafetensorsFileSource):
    def __init__(self, path: Path, asked: list[list[str]], done: threading.Event) -> None:
        super().__init__(path)
        self._asked, self._done = asked, done

    def prefetch(self, names) -> None:  # type: ignore[no-untyped-def]
        super().prefetch(names)  # the real posix_fadvise must not fail either
        self._asked.append(list(names))
        if len(self._asked) == 2:
            self._done.set()


def test_iter_merge_asks_for_the_next_tensor_while_one_merges(tmp_path: Path) -> None:
    tensors = {name: torch.randn(64, 32).to(torch.bfloat16) for name in ("a", "b", "c")}
    save_file(tensors, str(tmp_path / "base.safetensors"))
    save_file({k: v + 1 for k, v in tensors.items()}, str(tmp_path / "branch.safetensors"))
    asked: list[list[str]] = []
    done = threading.Event()
    base = _Recording(tmp_path / "base.safetensors", asked, done)
    branch = SafetensorsFileSource(tmp_path / "branch.safetensors")
    names = []
    for name, _ in iter_merge(get_method("task_arithmetic"), base, [branch], piece_elements=256):
        names.append(name)
        time.sleep(0.3)  # "merging": the read-ahead thread works meanwhile (pending asks are dropped at the end)
    assert names == ["a", "b", "c"]
    assert done.wait(10)
    assert asked == [["b"], ["c"]]  # the last tensor has no next one


def test_read_ahead_ignores_sources_that_fail_or_cannot_prefetch() -> None:
    class Broken:
        def prefetch(self, names) -> None:  # type: ignore[no-untyped-def]
            raise OSError("no such file")

    with ReadAhead([Broken(), object()]) as ahead:
        ahead.ask(["w"])  # a hint: nothing raises here or later
