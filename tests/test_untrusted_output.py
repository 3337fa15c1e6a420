"""The output folder and start-up under hostile or unlucky conditions (issue 20, items 6 and 8).

``--overwrite`` swaps the new output in with one ``renameat2(RENAME_EXCHANGE)``, and an
interruption at any step of the swap says what is really on disk; the config file is an input
``-o`` may not replace; Ctrl-C during start-up prints one line; ``-o '~'`` and ``-o /proc/x``
are refused with the real reason; the digest store is trusted no more than ``~/.ssh``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers import wait_for_background_hashing
from safetensors.torch import load_file, save_file

from drm_lightning.cli import command as cli
from drm_lightning.cli.command import main
from drm_lightning.sources import (
    HFFolderWriter,
    _digest_store,
    check_free_space,
    output_guard,
    sha256_of,
)
from drm_lightning.sources import base as base_module
from drm_lightning.sources import writer as writer_module
from drm_lightning.sources._digest_store import file_key, store_digest


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"fc.weight": torch.randn(4, 3, generator=g), "fc.bias": torch.randn(4, generator=g)}


@pytest.fixture()
def inputs(tmp_path: Path) -> dict[str, Path]:
    """A base folder and two branches; ``cfg1``/``cfg2`` merge a different branch each."""
    root = tmp_path / "models"
    (root / "base").mkdir(parents=True)
    save_file(_state(0), str(root / "base" / "model.safetensors"))
    found = {"root": root, "base": root / "base"}
    for i in (1, 2):
        save_file(_state(i), str(root / f"b{i}.safetensors"))
        cfg = tmp_path / f"cfg{i}.yaml"
        data = {
            "method": "task_arithmetic",
            "base": str(root / "base"),
            "branches": [str(root / f"b{i}.safetensors")],
        }
        cfg.write_text(yaml.safe_dump(data), encoding="utf-8")
        found[f"cfg{i}"] = cfg
    return found


def _run(argv: list[Any], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    status = main([*map(str, argv), "--no-progress"])
    return status, capsys.readouterr().err


def _holds(folder: Path, i: int) -> bool:
    """``folder`` holds the merge of branch ``i`` (task arithmetic, one branch: the branch)."""
    merged = load_file(str(folder / "model.safetensors"))["fc.bias"].double()
    return torch.allclose(merged, _state(i)["fc.bias"].double(), atol=1e-6)


def _siblings(out: Path) -> list[Path]:
    return sorted(p for p in out.parent.iterdir() if p.name.startswith(f"{out.name}."))


# ------------------------------------------------------------------ 6. --overwrite, atomically


def test_overwrite_never_leaves_out_missing_or_incomplete(
    inputs: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After every file-system step of the swap ``-o`` holds one complete output (the earlier
    or the new one): a SIGKILL between two steps cannot leave it missing."""
    out = tmp_path / "out"
    assert _run([inputs["cfg1"], "-o", out], capsys)[0] == 0
    seen: list[str] = []

    def checked(step: Callable[..., Any], name: str) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            result = step(*args, **kwargs)
            if any(str(a).startswith(str(out)) for a in args):
                assert (out / "README.md").is_file(), f"{out} incomplete after {name}{args}"
                assert _holds(out, 1) or _holds(out, 2)
                seen.append(name)
            return result

        return run

    monkeypatch.setattr(os, "rename", checked(os.rename, "rename"))
    monkeypatch.setattr(writer_module, "exchange", checked(output_guard.exchange, "exchange"))
    monkeypatch.setattr(
        writer_module,
        "rename_noreplace",
        checked(output_guard.rename_noreplace, "rename_noreplace"),
    )
    status, err = _run([inputs["cfg2"], "-o", out, "--overwrite"], capsys)
    assert status == 0, err
    assert seen == ["exchange"]  # one step, where the file system can (ext4, tmpfs, xfs, btrfs)
    assert _holds(out, 2) and _siblings(out) == []


def _interrupt(
    step: Callable[..., Any], out: Path, *, after: bool, nth: int = 1
) -> Callable[..., Any]:
    """``step`` that raises KeyboardInterrupt at its ``nth`` call on ``out`` or its siblings,
    before or after doing it."""
    calls = [0]

    def run(*args: Any, **kwargs: Any) -> Any:
        if not any(str(a).startswith(str(out)) for a in args):
            return step(*args, **kwargs)
        calls[0] += 1
        if calls[0] != nth:
            return step(*args, **kwargs)
        if after:
            step(*args, **kwargs)
        raise KeyboardInterrupt

    return run


# (how the swap is done, where Ctrl-C strikes)
PHASES = {
    "exchange/before": ("exchange", "exchange", False, 1),
    "exchange/after": ("exchange", "exchange", True, 1),
    "exchange/deleting-old": ("exchange", "rmtree", False, 1),
    "renames/before-first": ("renames", "rename", False, 1),
    "renames/between": ("renames", "rename", True, 1),
    "renames/after-second": ("renames", "rename", True, 2),
    "renames/deleting-old": ("renames", "rmtree", False, 1),
}


@pytest.mark.parametrize("phase", list(PHASES))
def test_ctrl_c_during_the_swap_says_what_is_on_disk(
    inputs: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    phase: str,
) -> None:
    route, where, after, nth = PHASES[phase]
    out = tmp_path / "out"
    assert _run([inputs["cfg1"], "-o", out], capsys)[0] == 0
    if route == "renames":  # a file system without RENAME_EXCHANGE
        monkeypatch.setattr(writer_module, "exchange", lambda a, b: False)
    if where == "exchange":
        monkeypatch.setattr(
            writer_module, "exchange", _interrupt(output_guard.exchange, out, after=after)
        )
    elif where == "rename":
        monkeypatch.setattr(os, "rename", _interrupt(os.rename, out, after=after, nth=nth))
    else:
        import shutil

        monkeypatch.setattr(
            writer_module.shutil, "rmtree", _interrupt(shutil.rmtree, out, after=after, nth=nth)
        )
    status, err = _run([inputs["cfg2"], "-o", out, "--overwrite"], capsys)
    assert status == 130 and err.count("\n") == 1, err
    assert err.startswith("drm-merge: interrupted; ")
    assert out.is_dir() and (out / "README.md").is_file()
    if f"{out} was written" in err:
        assert _holds(out, 2), phase
        left = re.search(r"left at (\S+): delete it", err)
        assert left is not None, err
        assert _holds(Path(left.group(1)), 1)
        assert _siblings(out) == [Path(left.group(1))]
        assert phase in (
            "exchange/after",
            "exchange/deleting-old",
            "renames/after-second",
            "renames/deleting-old",
        )
    else:
        assert "nothing was written" in err, err
        assert _holds(out, 1), phase
        assert _siblings(out) == []
        assert phase in ("exchange/before", "renames/before-first", "renames/between")


def test_the_fallback_route_puts_the_earlier_output_back_if_the_second_rename_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    with HFFolderWriter(out) as w:
        w.add("w", torch.zeros(2))
    monkeypatch.setattr(writer_module, "exchange", lambda a, b: False)
    real = os.rename

    def rename(src: Any, dst: Any) -> None:
        if Path(dst) == out and ".tmp-" in Path(src).name:  # the new output: fails
            raise OSError(18, "Invalid cross-device link")
        real(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="cross-device"), HFFolderWriter(out, overwrite=True) as w:
        w.add("w", torch.ones(2))
    assert torch.equal(load_file(str(out / "model.safetensors"))["w"], torch.zeros(2))
    assert _siblings(out) == []


def test_a_folder_that_appears_just_before_the_rename_is_not_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"

    def race(src: Path, dst: Path) -> None:
        out.mkdir()  # empty: rename() would replace it without a word
        output_guard.rename_noreplace(src, dst)

    monkeypatch.setattr(writer_module, "rename_noreplace", race)
    with pytest.raises(FileExistsError, match="appeared while writing"), HFFolderWriter(out) as w:
        w.add("w", torch.ones(2))
    assert list(out.iterdir()) == [] and _siblings(out) == []


def test_renameat2_through_the_raw_system_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where glibc lacks the renameat2 wrapper (before 2.28), the system call number is used."""
    import ctypes
    import platform

    if platform.machine() not in ("x86_64", "aarch64") or os.uname().sysname != "Linux":
        pytest.skip("renameat2 system call numbers are known for Linux x86_64/aarch64")

    libc = ctypes.CDLL(None, use_errno=True)

    class NoWrapper:  # a libc without renameat2
        syscall = libc.syscall

    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: NoWrapper())
    output_guard._renameat2_call.cache_clear()
    try:
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        (tmp_path / "a" / "x").write_text("a")
        assert output_guard.exchange(tmp_path / "a", tmp_path / "b")
        assert (tmp_path / "b" / "x").read_text() == "a" and not (tmp_path / "a" / "x").exists()
        with pytest.raises(FileExistsError):
            output_guard.rename_noreplace(tmp_path / "a", tmp_path / "b")
    finally:
        output_guard._renameat2_call.cache_clear()


# ------------------------------------------------------------------ 8. the config is an input


def test_overwrite_refuses_an_output_folder_holding_the_config(
    inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert _run([inputs["cfg1"], "-o", out], capsys)[0] == 0
    config = out / "config.json"  # a file name the writer writes, in an earlier output
    config.write_text(json.dumps(yaml.safe_load(inputs["cfg2"].read_text())))
    for extra in (["--dry-run"], []):
        status, err = _run([config, "-o", out, "--overwrite", *extra], capsys)
        assert status == 2 and f"contains the config file '{config}'" in err, err
    assert json.loads(config.read_text())["method"] == "task_arithmetic"


# ------------------------------------------------------------------ 8. Ctrl-C during start-up

ONE_LINE = "drm-merge: interrupted; nothing was written\n"


@pytest.mark.parametrize(
    "step", ["build_parser", "launched_world_size", "_load_config", "check_output", "open_job"]
)
def test_ctrl_c_at_any_step_of_start_up_prints_one_line(
    inputs: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    step: str,
) -> None:
    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, step, interrupted)
    status, err = _run([inputs["cfg1"], "-o", tmp_path / "out"], capsys)
    assert (status, err) == (130, ONE_LINE)
    assert not (tmp_path / "out").exists()


def _swallowed_ctrl_c() -> None:
    """Ctrl-C whose KeyboardInterrupt library code swallowed (C code that clears errors while
    importing, a finalizer): what leaves modules half-imported."""
    assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler  # drm-merge's own
    try:
        signal.raise_signal(signal.SIGINT)
        sum(range(100))  # the handler runs between bytecodes
    except KeyboardInterrupt:
        pass


def test_an_error_caused_by_ctrl_c_is_reported_as_the_interruption(
    inputs: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def half_imported(config: Any) -> Any:
        _swallowed_ctrl_c()
        raise AttributeError("partially initialized module 'torch' has no attribute 'float8'")

    monkeypatch.setattr(cli, "open_job", half_imported)
    status, err = _run([inputs["cfg1"], "-o", tmp_path / "out"], capsys)
    assert (status, err) == (130, ONE_LINE)


@pytest.mark.parametrize("when", ["start-up", "merge"])
def test_a_swallowed_ctrl_c_still_stops_the_run(
    inputs: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    when: str,
) -> None:
    from drm_lightning.cli import job as disk_job

    if when == "start-up":
        real_open = cli.open_job

        def open_job(config: Any) -> Any:
            _swallowed_ctrl_c()
            return real_open(config)

        monkeypatch.setattr(cli, "open_job", open_job)
    else:
        real_merge = disk_job.iter_merge

        def iter_merge(*args: Any, **kwargs: Any) -> Any:
            _swallowed_ctrl_c()  # a JIT callback, while the first tensor is merged
            yield from real_merge(*args, **kwargs)

        monkeypatch.setattr(disk_job, "iter_merge", iter_merge)
    status, err = _run([inputs["cfg1"], "-o", tmp_path / "out"], capsys)
    assert status == 130 and err.startswith(ONE_LINE.rstrip("\n")) and err.count("\n") == 1
    assert not (tmp_path / "out").exists() and list(tmp_path.glob("out.*")) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


# ------------------------------------------------------------------ 8. -o '~' and -o /proc/x


@pytest.mark.parametrize("given", ["~", "~/merged", "~someone/merged"])
def test_a_tilde_the_shell_did_not_expand_is_refused(
    inputs: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    given: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main([str(inputs["cfg1"]), "-o", given, "--no-progress"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "which the shell did not expand" in err, err
    assert f"'./{given}' if you really mean a folder named" in err
    assert not any(p.name.startswith("~") for p in tmp_path.iterdir())
    status, err = _run([inputs["cfg1"], "-o", f"./{given}"], capsys)  # meant: a folder named ~
    assert status == 0, err
    assert (tmp_path / given.split("/")[0]).is_dir()


def _pseudo_fs() -> Path:
    if not os.path.isdir("/proc") or os.statvfs("/proc").f_blocks != 0:
        pytest.skip("needs /proc mounted as a pseudo file system")
    return Path("/proc/drm-lightning-out")


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "merge"])
def test_output_on_a_pseudo_file_system_names_the_problem(
    inputs: dict[str, Path], capsys: pytest.CaptureFixture[str], dry_run: bool
) -> None:
    out = _pseudo_fs()
    status, err = _run([inputs["cfg1"], "-o", out, *(["--dry-run"] if dry_run else [])], capsys)
    assert status == 2 and "/proc is not on a file system that can hold a model" in err, err
    assert "GiB free" not in err
    with pytest.raises(OSError, match="not on a file system that can hold a model"):
        check_free_space(out, 1)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_output_in_a_folder_without_write_permission_names_the_problem(
    inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    status, err = _run([inputs["cfg1"], "-o", locked / "out", "--dry-run"], capsys)
    assert status == 2 and f"you may not create files in {locked}" in err, err


# ------------------------------------------------------------------ 8. the digest store


@pytest.fixture()
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    wait_for_background_hashing()
    folder = tmp_path / "cache"
    folder.mkdir(mode=0o700)
    monkeypatch.setenv("DRM_LIGHTNING_CACHE", str(folder))
    monkeypatch.setattr(base_module, "_HASH_CACHE", {})  # a fresh process, as far as hashing goes
    monkeypatch.setattr(_digest_store, "_WARNED", set())  # and as far as its warnings go
    return folder / "sha256.json"


def _plant(store: Path, file: Path, digest: str) -> None:
    store.write_text(json.dumps({file_key(file): digest}))
    store.chmod(0o600)


def _card(tmp_path: Path, file: Path) -> str:
    out = tmp_path / "carded"
    with HFFolderWriter(out, metadata={"method": "x", "files": [file]}) as w:
        w.add("w", torch.ones(2))
    return (out / "README.md").read_text()


def test_a_planted_digest_in_a_world_writable_store_is_not_in_the_card(
    store: Path, tmp_path: Path
) -> None:
    data = tmp_path / "input.bin"
    data.write_bytes(b"the real weights")
    _plant(store, data, "f" * 64)  # well formed, but not the file's
    store.parent.chmod(0o777)
    with pytest.warns(UserWarning, match=r"ignoring the input digest store .*writable by others"):
        card = _card(tmp_path, data)
    assert "f" * 64 not in card and hashlib.sha256(b"the real weights").hexdigest() in card


def test_a_store_of_another_user_is_ignored(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "input.bin"
    data.write_bytes(b"abc")
    _plant(store, data, "f" * 64)
    monkeypatch.setattr(os, "geteuid", lambda: os.stat(store).st_uid + 1)
    with pytest.warns(UserWarning, match="belongs to user id"):
        assert sha256_of(data) == hashlib.sha256(b"abc").hexdigest()


@pytest.mark.parametrize(
    "value",
    ["`touch PWNED`", "F" * 64, "f" * 63, 12345, "f" * 64 + "\n| x |"],
    ids=["text", "uppercase", "short", "number", "table-row"],
)
def test_a_malformed_stored_value_is_ignored_and_the_file_hashed_again(
    store: Path, tmp_path: Path, value: Any
) -> None:
    data = tmp_path / "input.bin"
    data.write_bytes(b"abc")
    store.write_text(json.dumps({file_key(data): value}))
    card = _card(tmp_path, data)
    assert f"| `{data}` | `{hashlib.sha256(b'abc').hexdigest()}` |" in card
    assert "PWNED" not in card and "| x |" not in card


def test_a_lock_link_never_creates_the_file_it_points_to(store: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    (store.parent / "sha256.lock").symlink_to(victim)
    data = tmp_path / "input.bin"
    data.write_bytes(b"abc")
    with pytest.warns(UserWarning, match="sha256.lock: it is a link"):
        store_digest(data, hashlib.sha256(b"abc").hexdigest())
    assert not os.path.lexists(victim)


def test_a_store_link_is_not_read(store: Path, tmp_path: Path) -> None:
    data = tmp_path / "input.bin"
    data.write_bytes(b"abc")
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps({file_key(data): "f" * 64}))
    store.symlink_to(elsewhere)
    with pytest.warns(UserWarning, match="sha256.json: it is a link"):
        assert sha256_of(data) == hashlib.sha256(b"abc").hexdigest()


def test_the_store_folder_is_created_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DRM_LIGHTNING_CACHE", str(tmp_path / "new" / "cache"))
    monkeypatch.setattr(base_module, "_HASH_CACHE", {})
    data = tmp_path / "input.bin"
    data.write_bytes(b"abc")
    old = os.umask(0o002)  # a group-writable default must not make the store untrusted
    try:
        sha256_of(data)
    finally:
        os.umask(old)
    folder = tmp_path / "new" / "cache"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / "sha256.json").stat().st_mode) & 0o022 == 0
    expected = hashlib.sha256(b"abc").hexdigest()
    monkeypatch.setattr(base_module, "_HASH_CACHE", {})
    monkeypatch.setattr(base_module.hashlib, "sha256", None)  # found in the store: not hashed
    assert sha256_of(data) == expected
