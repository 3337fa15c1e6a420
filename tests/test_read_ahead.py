"""Disk-to-disk merges ask their sources to read the next tensor ahead (sources/read_ahead.py)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from drm_lightning.merge.loop import iter_merge
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
        time.sleep(
            0.3
        )  # "merging": the read-ahead thread works meanwhile (pending asks are dropped at the end)
    assert names == ["a", "b", "c"]
    assert done.wait(10)
    assert asked == [["b"], ["c"]]  # the last tensor has no next one


def test_read_ahead_ignores_sources_that_fail_or_cannot_prefetch() -> None:
    class Broken:
        def prefetch(self, names) -> None:  # type: ignore[no-untyped-def]
            raise OSError("no such file")

    with ReadAhead([Broken(), object()]) as ahead:
        ahead.ask(["w"])  # a hint: nothing raises here or later


def test_safetensors_prefetch_reads_every_byte_of_the_tensors_asked(
    tmp_path: Path, monkeypatch
) -> None:
    # posix_fadvise(WILLNEED) would start only the first read-ahead window of a range: the
    # prefetch reads the whole tensor (in chunks), and nothing else of the file.
    import os

    import drm_lightning.sources.safetensors_file as module

    save_file(
        {"a": torch.zeros(300, 100), "b": torch.ones(50, 100)}, str(tmp_path / "m.safetensors")
    )
    source = SafetensorsFileSource(tmp_path / "m.safetensors")
    monkeypatch.setattr(module, "PREFETCH_CHUNK", 4096)
    monkeypatch.setattr(module, "_SCRATCH", threading.local())
    reads: list[tuple[int, int]] = []
    real = os.preadv

    def recording(fd, buffers, offset):  # type: ignore[no-untyped-def]
        got = real(fd, buffers, offset)
        reads.append((offset, got))
        return got

    monkeypatch.setattr(module.os, "preadv", recording)
    source.prefetch(["a", "missing"])
    start = source._offsets["a"]
    assert reads[0][0] == start and len(reads) == -(-300 * 100 * 4 // 4096)
    assert all(a + n == b for (a, n), (b, _) in zip(reads, reads[1:]))  # back to back
    assert reads[-1][0] + reads[-1][1] == start + 300 * 100 * 4  # the whole tensor, no more
