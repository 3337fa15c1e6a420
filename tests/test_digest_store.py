"""Input digests kept across runs (sources/_digest_store.py): found again, never stale."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from helpers import wait_for_background_hashing

from drm_lightning.sources import base as base_module
from drm_lightning.sources import sha256_of
from drm_lightning.sources._digest_store import MAX_ENTRIES, store_digest, store_file, stored_digest


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    wait_for_background_hashing()
    monkeypatch.setenv("DRM_LIGHTNING_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(base_module, "_HASH_CACHE", {})  # a fresh process, as far as hashing goes
    return tmp_path / "cache" / "sha256.json"


def _no_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> None:
        raise AssertionError("the file was hashed again")

    monkeypatch.setattr(base_module.hashlib, "sha256", refuse)


def test_a_second_run_takes_the_stored_digest_without_reading_the_file(
    store, tmp_path, monkeypatch
) -> None:
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"weights" * 1000)
    digest = sha256_of(f)
    assert digest == hashlib.sha256(b"weights" * 1000).hexdigest() and store.exists()
    monkeypatch.setattr(base_module, "_HASH_CACHE", {})
    _no_hashing(monkeypatch)
    assert sha256_of(f) == digest
    assert sha256_of(tmp_path / "." / "w.safetensors") == digest  # the real path is the key


def test_a_rewritten_file_is_hashed_again_even_with_its_old_size_and_mtime(
    store, tmp_path, monkeypatch
) -> None:
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"A" * 64)
    first = sha256_of(f)
    stat = f.stat()
    f.write_bytes(b"B" * 64)  # same size; the modification time set back as it was
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert stored_digest(f) is None  # the change time moved: the stored digest is not taken
    monkeypatch.setattr(base_module, "_HASH_CACHE", {})
    assert sha256_of(f) == hashlib.sha256(b"B" * 64).hexdigest() != first


def test_a_file_changed_while_it_was_hashed_is_not_stored(store, tmp_path) -> None:
    from drm_lightning.sources._digest_store import file_key

    f = tmp_path / "w.bin"
    f.write_bytes(b"old")
    before = file_key(f)
    f.write_bytes(b"new")  # same size: only the times tell
    store_digest(f, "0" * 64, before)
    assert stored_digest(f) is None


def test_store_off_unwritable_or_corrupt_is_ignored(tmp_path, monkeypatch) -> None:
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    monkeypatch.setattr(base_module, "_HASH_CACHE", {})
    monkeypatch.setenv("DRM_LIGHTNING_CACHE", "off")
    assert store_file() is None
    assert sha256_of(f) == hashlib.sha256(b"abc").hexdigest() and stored_digest(f) is None
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("DRM_LIGHTNING_CACHE", str(blocker / "cache"))  # cannot be a folder
    store_digest(f, "7" * 64)
    assert stored_digest(f) is None
    monkeypatch.setenv("DRM_LIGHTNING_CACHE", str(tmp_path / "c"))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "sha256.json").write_text("{not json")
    assert stored_digest(f) is None
    store_digest(f, "8" * 64)
    assert stored_digest(f) == "8" * 64


def test_the_store_keeps_the_newest_entries(store, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("drm_lightning.sources._digest_store.MAX_ENTRIES", 3)
    files = []
    for i in range(5):
        files.append(tmp_path / f"f{i}")
        files[-1].write_bytes(bytes([i]))
        store_digest(files[-1], f"{i}" * 64)
    assert [stored_digest(f) for f in files] == [None, None, "2" * 64, "3" * 64, "4" * 64]
    assert MAX_ENTRIES >= 1000


def test_processes_updating_the_store_at_once_keep_every_digest(store, tmp_path) -> None:
    import multiprocessing

    files = []
    for i in range(160):
        files.append(tmp_path / f"f{i}")
        files[-1].write_bytes(i.to_bytes(2, "little"))
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_store_each, args=(files[i::8],)) for i in range(8)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert all(w.exitcode == 0 for w in workers)
    assert [stored_digest(f) for f in files] == [_digest_of(f) for f in files]


def _digest_of(f: Path) -> str:  # a well-formed digest: the store keeps no other kind
    return hashlib.sha256(f.name.encode()).hexdigest()


def _store_each(files: list[Path]) -> None:  # in a forked process: each read-modify-replace once
    for f in files:
        store_digest(f, _digest_of(f))
