"""HFFolderWriter: shards + index, side files, model card, atomicity on
failure, overwrite, tied weights."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import drm_lightning
import drm_lightning.sources._shard_file as shard_file_module
import drm_lightning.sources.writer as writer_module
from drm_lightning.sources import HFFolderSource, HFFolderWriter, StateDictSource, check_free_space


def _tensors(n: int = 10, rows: int = 16, cols: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"layers.{i}.weight": torch.randn(rows, cols, generator=g) for i in range(n)}


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def _write(out: Path, tensors: dict[str, torch.Tensor], **kwargs: object) -> None:
    with HFFolderWriter(out, **kwargs) as w:  # type: ignore[arg-type]
        for name, t in tensors.items():
            w.add(name, t)


def test_sharding_and_index(tmp_path: Path) -> None:
    tensors = _tensors(10)  # 1 KiB each
    tensors["big.weight"] = torch.randn(40, 40)  # 6400 B > the shard limit: a shard of its own
    out = tmp_path / "merged"
    _write(out, tensors, max_shard_bytes=3 * 1024)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shards)
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert n == 5  # 3 + 3 + 3 + (1 + then big alone) -> [0-2], [3-5], [6-8], [9], [big]
    assert sorted(index["weight_map"]) == sorted(tensors)
    assert set(index["weight_map"].values()) == set(shards)
    assert index["weight_map"]["big.weight"] == shards[-1]
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in tensors.values())
    for shard in shards:
        names = [k for k, v in index["weight_map"].items() if v == shard]
        size = sum(tensors[k].numel() * 4 for k in names)
        assert size <= 3 * 1024 or names == ["big.weight"]
    source = HFFolderSource(out)
    assert source.layout == "safetensors-sharded"
    for name, t in tensors.items():
        assert torch.equal(source.get(name), t)
    assert not (out / "model.safetensors").exists() and _leftovers(tmp_path) == []


def test_single_shard_is_model_safetensors(tmp_path: Path) -> None:
    tensors = _tensors(3)
    out = tmp_path / "one"
    _write(out, tensors)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "model.safetensors"]
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}  # transformers refuses shards without it
        assert sorted(f.keys()) == sorted(tensors)
        for name in tensors:
            assert torch.equal(f.get_tensor(name), tensors[name])


def test_copies_config_and_tokenizer_files(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    side = {
        "config.json": '{"model_type": "llama"}',
        "generation_config.json": "{}",
        "tokenizer.json": "{}",
        "tokenizer_config.json": "{}",
        "special_tokens_map.json": "{}",
        "vocab.txt": "a\nb\n",
        "merges.txt": "#",
        "tokenizer.model": "\x00\x01",
    }
    for name, text in side.items():
        (base / name).write_text(text)
    (base / "README.md").write_text("base card")
    (base / "optimizer.pt").write_bytes(b"not copied")
    (base / "model.safetensors").write_bytes(b"not copied")
    out = tmp_path / "out"
    _write(out, _tensors(2), copy_from=base)
    for name, text in side.items():
        assert (out / name).read_text() == text, name
    assert not (out / "optimizer.pt").exists()
    assert (out / "README.md").read_text() != "base card"
    with pytest.raises(NotADirectoryError, match=r"copy_from=.*nope does not exist"):
        HFFolderWriter(tmp_path / "x", copy_from=tmp_path / "nope")


def test_model_card_lists_method_branches_and_hashes(tmp_path: Path) -> None:
    files = {}
    for name in ("base", "a", "b"):
        files[name] = tmp_path / f"{name}.safetensors"
        save_file({"w": torch.randn(3, 3)}, str(files[name]))
    from drm_lightning.sources import open_source

    metadata = {
        "method": "drm",
        "parameters": {"drop_rate": 0.8, "direction": "vertical"},
        "base": open_source(files["base"]),
        "branches": [
            {"source": open_source(files["a"]), "coefficient": 0.7},
            {"path": str(files["b"]), "coefficient": 1.5},
        ],
        "seed": 123,
    }
    out = tmp_path / "out"
    _write(out, {"w": torch.zeros(3, 3)}, metadata=metadata)
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "# Merged model (drm)" in card and f"drm_lightning {drm_lightning.__version__}" in card
    assert "| `drop_rate` | `0.8` |" in card and '| `direction` | `"vertical"` |' in card
    assert "| 0 | `safetensors file " in card and "| 0.7 |" in card
    assert f"| 1 | `{files['b']}` | 1.5 |" in card
    for path in files.values():
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert f"| `{path}` | `{digest}` |" in card
    assert '"seed": 123' in card


def test_enospc_midway_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = shard_file_module.write_at
    shards_started: list[str] = []

    def failing_write(fd: int, data: memoryview, offset: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if path not in shards_started:
            shards_started.append(path)
        if len(shards_started) == 2:
            os.pwrite(fd, b"partial shard", offset)  # a half-written file, as a full disk leaves
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(fd, data, offset)

    monkeypatch.setattr(shard_file_module, "write_at", failing_write)
    out = tmp_path / "merged"
    with pytest.raises(OSError) as info:
        _write(out, _tensors(10), max_shard_bytes=2048)
    assert info.value.errno == errno.ENOSPC
    assert ".tmp-" in info.value.filename and "shard-00002" in info.value.filename
    assert len(shards_started) == 2  # it failed midway, after one complete shard
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_error_in_the_with_block_or_at_finish_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "merged"
    with pytest.raises(RuntimeError, match="merge failed"):
        with HFFolderWriter(out, max_shard_bytes=1024) as w:
            w.add("a", torch.zeros(512))
            w.add("b", torch.zeros(512))  # first shard finished, second being written
            assert len(list(w.tmp_dir.iterdir())) == 2
            raise RuntimeError("merge failed")
    assert list(tmp_path.iterdir()) == []

    def broken_copy(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    monkeypatch.setattr(writer_module.shutil, "copyfileobj", broken_copy)
    with pytest.raises(OSError, match="No space left"):
        _write(out, _tensors(2), copy_from=base)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]

    with pytest.raises(ValueError, match="no tensors were added"), HFFolderWriter(out):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


def test_overwrite_semantics(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    with HFFolderWriter(out) as w:  # an earlier output: the only kind --overwrite replaces
        w.add("w", torch.zeros(2))
    with pytest.raises(
        FileExistsError,
        match=rf"output folder {out} already exists; pass overwrite=True \(--overwrite\)",
    ):
        HFFolderWriter(out)
    # a failed overwrite keeps the old folder untouched
    with pytest.raises(RuntimeError), HFFolderWriter(out, overwrite=True) as w:
        w.add("w", torch.ones(2))
        raise RuntimeError("boom")
    assert torch.equal(HFFolderSource(out).get("w"), torch.zeros(2)) and _leftovers(tmp_path) == []
    # the old folder is replaced only once the new one is complete
    with HFFolderWriter(out, overwrite=True) as w:
        w.add("w", torch.ones(2))
        assert torch.equal(HFFolderSource(out).get("w"), torch.zeros(2))
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "model.safetensors"]
    assert torch.equal(HFFolderSource(out).get("w"), torch.ones(2))
    assert _leftovers(tmp_path) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        HFFolderWriter(tmp_path / "file", overwrite=True)


def test_tied_and_shared_tensors_are_cloned(tmp_path: Path) -> None:
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # tied, as in tie_word_embeddings models
    model = torch.nn.ModuleDict({"embed": emb, "head": head})
    big = torch.arange(20.0)
    out = tmp_path / "tied"
    with HFFolderWriter(out) as w:
        for name, t in model.state_dict().items():
            w.add(name, t)
        w.add("view.first", big[:5])  # views of one storage
        w.add("view.strided", big[::2])
        w.add("view.t", torch.randn(3, 5).T)
        big.zero_()  # the writer copied: later changes by the caller are not written
    source = HFFolderSource(out)
    assert torch.equal(source.get("embed.weight"), emb.weight.detach())
    assert torch.equal(source.get("head.weight"), emb.weight.detach())
    assert torch.equal(source.get("view.first"), torch.arange(5.0))
    assert torch.equal(source.get("view.strided"), torch.arange(0.0, 20.0, 2.0))
    assert source.meta("view.t").shape == (5, 3)


def test_add_misuse(tmp_path: Path) -> None:
    w = HFFolderWriter(tmp_path / "m")
    with pytest.raises(RuntimeError, match="inside the writer's `with` block"):
        w.add("a", torch.ones(1))
    with w:
        w.add("a", torch.ones(1))
        with pytest.raises(ValueError, match="'a' was already added"):
            w.add("a", torch.ones(1))
        with pytest.raises(TypeError, match="expected a torch.Tensor, got list"):
            w.add("b", [1.0])  # type: ignore[arg-type]
    with pytest.raises(RuntimeError):
        w.add("c", torch.ones(1))
    with pytest.raises(ValueError, match="max_shard_bytes must be > 0"):
        HFFolderWriter(tmp_path / "n", max_shard_bytes=0)


def test_free_space_checked_before_work(tmp_path: Path) -> None:
    out = tmp_path / "deep" / "merged"
    with pytest.raises(
        OSError, match=r"not enough free space to write .*merged: needs .* GiB"
    ) as info:
        check_free_space(out, 1 << 60)
    assert info.value.errno == errno.ENOSPC
    check_free_space(out, 1)
    with pytest.raises(OSError, match="not enough free space"):
        HFFolderWriter(out, expected_bytes=1 << 60)
    assert list(tmp_path.iterdir()) == []


def test_writes_a_folder_transformers_loads(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from helpers import tiny_llama_config

    cfg = tiny_llama_config(tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path / "base")
    source = StateDictSource(model)
    assert (
        source.get("lm_head.weight").data_ptr()
        == source.get("model.embed_tokens.weight").data_ptr()
    )
    out = tmp_path / "merged"
    with HFFolderWriter(
        out,
        max_shard_bytes=20_000,
        copy_from=tmp_path / "base",
        metadata={"method": "linear", "base": tmp_path / "base"},
    ) as w:
        for name in source.keys():
            w.add(name, source.get(name) * 2)
    assert (out / "model.safetensors.index.json").is_file()
    loaded = transformers.LlamaForCausalLM.from_pretrained(out)
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t * 2), name
    assert loaded.config.tie_word_embeddings
    card = (out / "README.md").read_text()
    digest = hashlib.sha256((tmp_path / "base" / "model.safetensors").read_bytes()).hexdigest()
    assert digest in card


def test_background_hashing_matches_hashlib_and_leaves_errors_to_the_caller(tmp_path: Path) -> None:
    """Digests hashed in the background equal hashlib's; concurrent callers wait for them."""
    import threading

    from drm_lightning.sources import hash_in_background, sha256_of

    data = bytes(range(256)) * 40_000
    f = tmp_path / "w.bin"
    f.write_bytes(data)
    missing = tmp_path / "missing.bin"
    thread = hash_in_background([missing, f])
    results: list[str] = []
    callers = [
        threading.Thread(target=lambda: results.append(sha256_of(f, chunk_bytes=4096)))
        for _ in range(3)
    ]
    for c in callers:
        c.start()
    for c in callers:
        c.join()
    thread.join()
    assert results == [hashlib.sha256(data).hexdigest()] * 3
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        sha256_of(missing)


def test_shard_file_mixed_dtypes_odd_sizes_and_header_overflow(tmp_path: Path) -> None:
    """Every dtype and odd size round-trips; each tensor starts at a multiple of its element
    size; a header larger than its reserve moves the data (many tensors, tiny reserve)."""
    from safetensors import safe_open

    g = torch.Generator().manual_seed(1)
    tensors: dict[str, torch.Tensor] = {
        "scalar": torch.tensor(3.5),
        "bf16.odd": torch.randn(3, generator=g).to(torch.bfloat16),
        "f32.odd": torch.randn(5, generator=g),
        "f16.even": torch.randn(4, 4, generator=g).to(torch.float16),
        "f64": torch.randn(3, generator=g, dtype=torch.float64),
        "i8": torch.arange(7, dtype=torch.int8),
        "bool": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
        **{f"layer.{i}.w": torch.randn(2, 4, generator=g) for i in range(40)},
    }
    path = tmp_path / "x.safetensors"
    shard = shard_file_module.ShardFile(path, header_reserve=16)
    for name, t in tensors.items():
        shard.add(name, t)
    shard.close()
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert header_len % 8 == 0 and header_len > 16  # the data moved up once
    header = json.loads(path.read_bytes()[8 : 8 + header_len])
    assert header.pop("__metadata__") == {"format": "pt"}
    assert path.stat().st_size == 8 + header_len + sum(
        t.numel() * t.element_size() for t in tensors.values()
    )
    for name, t in tensors.items():
        assert header[name]["data_offsets"][0] % t.element_size() == 0, name
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == sorted(tensors)
        for name, t in tensors.items():
            got = f.get_tensor(name)
            assert got.dtype == t.dtype and torch.equal(got, t), name


def test_writer_output_equals_save_file_tensor_for_tensor(tmp_path: Path) -> None:
    """Same shards, names, dtypes and bytes as a save_file of the same tensors."""
    from safetensors.torch import load_file

    tensors = {f"l.{i}.w": torch.randn(33, 7).to(torch.bfloat16) for i in range(6)}
    tensors["norm"] = torch.ones(7)
    out = tmp_path / "merged"
    _write(out, tensors, max_shard_bytes=1500)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        names = sorted(k for k, v in index["weight_map"].items() if v == shard)
        reference = tmp_path / f"ref-{shard}"
        save_file({k: tensors[k] for k in names}, str(reference), metadata={"format": "pt"})
        ours, theirs = load_file(out / shard), load_file(reference)
        assert sorted(ours) == sorted(theirs) == names
        for k in names:
            assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k


_PEAK_SCRIPT = """
import re, sys, tempfile, pathlib, torch
from drm_lightning.sources import HFFolderWriter
def peak():  # VmHWM: this process's own high-water mark (ru_maxrss keeps the parent's across exec)
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
copies = int(sys.argv[1])
chunk = torch.ones(16 * 1024 * 1024)  # 64 MiB, float32
before = peak()
out = pathlib.Path(tempfile.mkdtemp(dir=sys.argv[2])) / "m"
with HFFolderWriter(out) as w:  # one 2 GiB-limit shard holding every copy
    for i in range(copies):
        w.add(f"layer.{i}.weight", chunk)
print((peak() - before) * 1024)
"""


def test_writer_peak_memory_does_not_grow_with_the_shard(tmp_path: Path) -> None:
    """Writing a 64 MiB shard and a 512 MiB shard raise peak RSS by the same few MiB.

    (The writer used to hold a whole shard, up to 2 GiB, before writing it: +512 MiB here.)
    Peak RSS of a fresh interpreter, so earlier tests do not mask the growth.
    """
    import subprocess
    import sys

    growth = {}
    for copies in (1, 8):
        run = subprocess.run(
            [sys.executable, "-c", _PEAK_SCRIPT, str(copies), str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        growth[copies] = int(run.stdout.split()[-1])
    mib = 1024 * 1024
    assert growth[8] < 32 * mib, growth  # 512 MiB of tensors written
    assert growth[8] - growth[1] < 16 * mib, growth


def test_row_pieces_written_behind_the_producer_raise_a_write_error_and_leave_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Row pieces go to a background writer thread; its error surfaces in the writer's caller
    # (at the next add or at close), located at the shard, and nothing is left.
    from drm_lightning.sources import RowPieces

    real_write = shard_file_module.write_at
    writes: list[int] = []

    def failing_write(fd: int, data: memoryview, offset: int) -> None:
        writes.append(offset)
        if len(writes) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(fd, data, offset)

    monkeypatch.setattr(shard_file_module, "write_at", failing_write)
    pieces = (torch.full((4, 8), float(i)) for i in range(5))
    out = tmp_path / "merged"
    with pytest.raises(OSError) as info:
        with HFFolderWriter(out) as w:
            w.add("big", RowPieces((20, 8), torch.float32, pieces))
    assert info.value.errno == errno.ENOSPC and "shard-00001" in info.value.filename
    assert len(writes) >= 3 and list(tmp_path.iterdir()) == []

    monkeypatch.setattr(shard_file_module, "write_at", real_write)
    with HFFolderWriter(out) as w:  # and written whole when the disk holds it
        w.add(
            "big",
            RowPieces((20, 8), torch.float32, (torch.full((4, 8), float(i)) for i in range(5))),
        )
    from safetensors.torch import load_file

    (shard,) = out.glob("*.safetensors")
    assert torch.equal(
        load_file(shard)["big"], torch.arange(5.0).repeat_interleave(4)[:, None].expand(20, 8)
    )


def test_pieces_not_marked_fresh_may_reuse_one_buffer(tmp_path: Path) -> None:
    # A producer that refills one buffer: each piece must be on disk before the next is made.
    from safetensors.torch import load_file

    from drm_lightning.sources import RowPieces

    def refilled():
        buffer = torch.empty(4, 8)
        for i in range(5):
            buffer.fill_(float(i))
            yield buffer

    with HFFolderWriter(tmp_path / "m") as w:
        w.add("big", RowPieces((20, 8), torch.float32, refilled()))
    (shard,) = (tmp_path / "m").glob("*.safetensors")
    assert load_file(shard)["big"][:, 0].tolist() == [float(i) for i in range(5) for _ in range(4)]


def test_write_behind_waits_when_full_and_a_failed_write_stops_the_producer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading
    import time

    from drm_lightning.sources import RowPieces

    monkeypatch.setattr(shard_file_module, "WRITE_BEHIND_BYTES", 3 * 4 * 8 * 4)  # three pieces
    real_write = shard_file_module.write_at
    release = threading.Event()
    made: list[int] = []
    made_while_held: list[int] = []

    def hold_the_disk_a_while() -> None:
        time.sleep(0.5)
        made_while_held.append(len(made))
        release.set()

    def slow_then_full(fd: int, data: memoryview, offset: int) -> None:
        release.wait(timeout=30)
        if len(made) > 10:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(fd, data, offset)

    def pieces():
        try:
            for i in range(40):
                made.append(i)
                yield torch.full((4, 8), float(i))
        finally:
            made.append(-1)  # closed

    monkeypatch.setattr(shard_file_module, "write_at", slow_then_full)
    threading.Thread(target=hold_the_disk_a_while, daemon=True).start()
    with pytest.raises(OSError) as info:
        with HFFolderWriter(tmp_path / "m") as w:
            w.add("big", RowPieces((160, 8), torch.float32, pieces(), fresh=True))
            w.add("after", torch.ones(2))  # the error surfaces here at the latest
    assert info.value.errno == errno.ENOSPC
    assert made_while_held == [4]  # the 4th piece waits for room: none made past it
    assert made[-1] == -1 and len(made) < 41  # the producer stopped at the error, and was closed
    assert list(tmp_path.iterdir()) == []
