"""Safe by default (issue 9): no code from inputs, no folder deleted by mistake, no debris.

Every test here fails on the behaviour the issue reported: pickles unpickled with a warning
(the marker folder appears), ``--overwrite`` deleting foreign files, temp folders left by
SIGTERM/SIGHUP, unlocated errors, duplicate YAML keys and booleans taken as numbers, and
prefixed Lightning checkpoints without a hint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from drm_lightning.cli.command import main
from drm_lightning.sources import HFFolderWriter, open_source

ROOT = Path(__file__).resolve().parents[1]


class Evil:
    """Unpickling this runs ``os.makedirs(marker)``: the proof that code from a file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.makedirs, (self.marker,))


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "fc1.weight": torch.randn(6, 4, generator=g),
        "fc1.bias": torch.randn(6, generator=g),
        "fc2.weight": torch.randn(3, 6, generator=g),
    }


@pytest.fixture()
def models(tmp_path: Path) -> dict[str, Path]:
    """A base folder, a safetensors branch and the same branch as a Lightning .ckpt."""
    root = tmp_path / "models"
    (root / "base").mkdir(parents=True)
    save_file(_state(0), str(root / "base" / "model.safetensors"))
    save_file(_state(1), str(root / "a.safetensors"))
    torch.save(
        {"state_dict": _state(2), "epoch": 1, "hyper_parameters": {"lr": 0.1}}, root / "b.ckpt"
    )
    return {"root": root, "base": root / "base", "a": root / "a.safetensors", "b": root / "b.ckpt"}


def _config(tmp_path: Path, base: Any, branches: list[Any], **extra: Any) -> Path:
    data = {"method": "task_arithmetic", "base": str(base), "branches": branches, **extra}
    path = tmp_path / f"cfg-{len(list(tmp_path.glob('cfg-*')))}.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    status = main([*map(str, argv), "--no-progress"])
    return status, capsys.readouterr().err


def _evil_ckpt(path: Path, marker: Path, state: dict[str, torch.Tensor]) -> Path:
    torch.save({"state_dict": state, "hp": Evil(marker)}, path)
    return path


# ------------------------------------------------------------------ 1. pickles run no code


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "merge"])
def test_untrusted_pickle_is_refused_and_runs_no_code(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], dry_run: bool
) -> None:
    marker = tmp_path / "pwned"
    evil = _evil_ckpt(models["root"] / "evil.ckpt", marker, _state(3))
    cfg = _config(tmp_path, models["base"], [str(models["a"]), str(evil)])
    out = tmp_path / "out"
    status, err = _run([cfg, "-o", out, *(["--dry-run"] if dry_run else [])], capsys)
    assert status == 2
    assert not marker.exists(), "code from the pickle ran"
    assert not out.exists()
    assert "evil.ckpt holds Python objects other than tensors" in err
    assert "--trust-pickles" in err and "trust_pickles=True" in err and "safetensors" in err
    assert "trust_pickles: true" not in err  # a config file cannot opt in (issue 20)
    assert "os.makedirs" in err  # names what torch's weights-only loader refused


def test_pickle_behind_a_safetensors_index_is_refused(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "pwned"
    folder = tmp_path / "indexed"
    folder.mkdir()
    torch.save({**_state(4), "hp": Evil(marker)}, folder / "weights.bin")
    index = {"metadata": {}, "weight_map": dict.fromkeys(_state(4), "weights.bin")}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg = _config(tmp_path, models["base"], [str(folder)])
    status, err = _run([cfg, "-o", tmp_path / "out", "--dry-run"], capsys)
    assert status == 2 and not marker.exists()
    assert "weights.bin holds Python objects" in err and "--trust-pickles" in err


def test_trust_pickles_opt_in_loads_the_checkpoint(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "ran"
    evil = _evil_ckpt(models["root"] / "trusted.ckpt", marker, _state(3))
    cfg = _config(tmp_path, models["base"], [str(evil)])
    out = tmp_path / "out"
    status, err = _run([cfg, "-o", out, "--trust-pickles"], capsys)
    assert status == 0, err
    assert marker.is_dir()  # the user trusted the file: it was fully unpickled
    merged = load_file(str(out / "model.safetensors"))
    expected = {k: _state(0)[k] + (_state(3)[k] - _state(0)[k]) for k in _state(0)}
    for name, value in expected.items():
        torch.testing.assert_close(merged[name], value)


def test_trust_pickles_config_key_is_strict(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _config(tmp_path, models["base"], [str(models["a"])], trust_pickles="yes please")
    status, err = _run([cfg, "-o", tmp_path / "out", "--dry-run"], capsys)
    assert status == 2 and "trust_pickles: is not read from a config file" in err


def test_weights_only_checkpoints_need_no_opt_in(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Tensors, numbers, strings and plain containers (what Trainer checkpoints hold) load."""
    cfg = _config(tmp_path, models["base"], [str(models["a"]), str(models["b"])])
    status, err = _run([cfg, "-o", tmp_path / "out"], capsys)
    assert status == 0, err


def test_real_trainer_checkpoint_with_hyperparameters_loads_weights_only(tmp_path: Path) -> None:
    pl = pytest.importorskip("lightning.pytorch")

    class Module(pl.LightningModule):
        def __init__(self, lr: float = 0.1, hidden: int = 4, name: str = "x") -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = torch.nn.Linear(2, hidden)

        def training_step(self, batch: Any, _: int) -> torch.Tensor:
            return self.net(batch[0]).sum()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.ones(4, 2)), batch_size=2
    )
    trainer = pl.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Module(), data)
    trainer.save_checkpoint(tmp_path / "real.ckpt")
    assert open_source(tmp_path / "real.ckpt", prefix="net.").keys() == ["bias", "weight"]


def test_callback_refuses_untrusted_checkpoint_branch_unless_trusted(tmp_path: Path) -> None:
    from test_lightning_common import MultiHead, train_loaders, trainer

    from drm_lightning.lightning import MergeCallback

    marker = tmp_path / "pwned"
    model = MultiHead()
    _evil_ckpt(
        tmp_path / "evil.ckpt",
        marker,
        {k: v.detach().clone() for k, v in model.state_dict().items()},
    )
    cb = MergeCallback("task_arithmetic", branches=[tmp_path / "evil.ckpt"], every_n_steps=1)
    with pytest.raises(ValueError, match=r"evil\.ckpt holds Python objects.*trust_pickles=True"):
        trainer(max_steps=2, callbacks=[cb]).fit(MultiHead(), train_loaders(n=32))
    assert not marker.exists()
    trusted = MergeCallback(
        "task_arithmetic", branches=[tmp_path / "evil.ckpt"], every_n_steps=1, trust_pickles=True
    )
    trainer(max_steps=2, callbacks=[trusted]).fit(MultiHead(), train_loaders(n=32))
    assert marker.is_dir() and len(trusted.history) == 2


def test_ckpt_that_is_not_a_pickle_is_located(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = models["root"] / "text.ckpt"
    bad.write_text("hello, not a checkpoint at all")
    cfg = _config(tmp_path, models["base"], [str(bad)])
    status, err = _run([cfg, "-o", tmp_path / "out", "--dry-run"], capsys)
    assert status == 2
    assert "text.ckpt is not a readable torch checkpoint" in err and "error: 101" not in err


# ------------------------------------------------------------------ 2. what --overwrite replaces


def test_overwrite_refuses_a_folder_with_foreign_files(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "my_thesis.tex").write_text("years of work")
    (out / "zzz.txt").write_text("more")
    cfg = _config(tmp_path, models["base"], [str(models["a"])])
    for extra in (["--dry-run"], []):
        status, err = _run([cfg, "-o", out, "--overwrite", *extra], capsys)
        assert status == 2 and "'my_thesis.tex'" in err and "and 1 more" in err
    assert sorted(p.name for p in out.iterdir()) == ["my_thesis.tex", "zzz.txt"]


def test_overwrite_refuses_a_model_folder_another_tool_wrote(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "downloaded"
    out.mkdir()
    save_file(_state(9), str(out / "model.safetensors"))
    (out / "README.md").write_text("# somebody's model\n")
    cfg = _config(tmp_path, models["base"], [str(models["a"])])
    status, err = _run([cfg, "-o", out, "--overwrite"], capsys)
    assert status == 2 and "not a drm_lightning model card" in err
    torch.testing.assert_close(
        load_file(str(out / "model.safetensors"))["fc1.bias"], _state(9)["fc1.bias"]
    )


@pytest.mark.parametrize("target", [".", "~", "/", "parent-of-cwd", "parent-of-inputs"])
def test_overwrite_refuses_special_folders(
    models: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    target: str,
) -> None:
    cwd = tmp_path / "work" / "here"
    cwd.mkdir(parents=True)
    (cwd / "my_thesis.tex").write_text("keep")
    monkeypatch.chdir(cwd)
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("keep")
    monkeypatch.setenv("HOME", str(home))
    out = {
        "~": os.path.expanduser("~"),  # what the shell passes for ~
        "parent-of-cwd": str(cwd.parent),
        "parent-of-inputs": str(models["root"]),
    }.get(target, target)
    cfg = _config(tmp_path, models["base"], [str(models["a"])])
    status, err = _run([cfg, "-o", out, "--overwrite"], capsys)
    assert status == 2 and ("refusing" in err or "contains the" in err), err
    assert (cwd / "my_thesis.tex").read_text() == "keep" and (home / ".bashrc").exists()
    assert models["a"].is_file()


def test_overwrite_replaces_an_earlier_output_through_a_symlink_without_leftovers(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    real, link = tmp_path / "outs" / "real", tmp_path / "outlink"
    cfg = _config(tmp_path, models["base"], [str(models["a"])])
    assert _run([cfg, "-o", real], capsys)[0] == 0
    link.symlink_to(real, target_is_directory=True)
    cfg2 = _config(tmp_path, models["base"], [str(models["b"])])
    status, err = _run([cfg2, "-o", link, "--overwrite"], capsys)
    assert status == 0, err
    assert link.is_symlink() and link.resolve() == real.resolve()
    merged = load_file(str(link / "model.safetensors"))
    torch.testing.assert_close(merged["fc1.bias"], _state(2)["fc1.bias"])
    assert (
        sorted(p.name for p in tmp_path.iterdir() if ".old-" in p.name or ".tmp-" in p.name) == []
    )
    assert sorted(p.name for p in (tmp_path / "outs").iterdir()) == ["real"]


# ------------------------------------------------------------------ 3. crash debris

_SLOW_MERGE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from drm_lightning.sources import writer as w
    original = w.HFFolderWriter.add
    def slow_add(self, name, tensor):
        original(self, name, tensor)
        Path(sys.argv[1]).touch()          # the temporary folder exists now
        time.sleep(60)
    w.HFFolderWriter.add = slow_add
    from drm_lightning.cli import main
    sys.exit(main(sys.argv[2:]))
    """
)


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_signal_removes_the_temporary_folder(
    models: dict[str, Path], tmp_path: Path, signame: str
) -> None:
    cfg = _config(tmp_path, models["base"], [str(models["a"])])
    outs = tmp_path / "outs"
    outs.mkdir()
    ready = tmp_path / "ready"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _SLOW_MERGE,
            str(ready),
            str(cfg),
            "-o",
            str(outs / "m"),
            "--no-progress",
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), proc.stderr.read() if proc.poll() is not None else "timed out"
        assert next(p.name for p in outs.iterdir()).startswith("m.tmp-")
        proc.send_signal(getattr(signal, signame))
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + getattr(signal, signame)
    assert f"stopped by {signame}" in err
    assert list(outs.iterdir()) == []


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_folders_are_reported_then_removed_with_overwrite(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outs = tmp_path / "outs"
    stale = outs / f"m.tmp-{_dead_pid()}-0123abcd"
    old = outs / f"m.old-{_dead_pid()}-89abcdef"
    alive = outs / f"m.tmp-{os.getpid()}-00000000"  # a run still going: never touched
    for folder in (stale, old, alive):
        folder.mkdir(parents=True)
    cfg = _config(tmp_path, models["base"], [str(models["a"])])
    status, err = _run([cfg, "-o", outs / "m"], capsys)
    assert status == 0 and "found 2 folder(s) left by killed earlier runs" in err
    assert stale.name in err and old.name in err and alive.name not in err
    assert stale.exists() and old.exists()
    status, err = _run([cfg, "-o", outs / "m", "--overwrite", "--dry-run"], capsys)
    assert status == 0 and stale.exists()  # a dry run changes nothing
    status, err = _run([cfg, "-o", outs / "m", "--overwrite"], capsys)
    assert status == 0 and "removed 2 folder(s)" in err
    assert sorted(p.name for p in outs.iterdir()) == sorted(["m", alive.name])


# ------------------------------------------------------------------ 4. located errors


def test_disk_full_names_the_output(
    models: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import errno

    from drm_lightning.sources import _shard_file

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_shard_file, "write_at", full)
    out = tmp_path / "outs" / "m"
    cfg = _config(tmp_path, models["base"], [str(models["a"])])
    status, err = _run([cfg, "-o", out], capsys)
    assert status == 2 and "No space left on device" in err and str(out) in err
    assert list((tmp_path / "outs").iterdir()) == []


def test_safetensors_io_error_becomes_a_located_oserror(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors import SafetensorError

    from drm_lightning.sources import _shard_file

    def full(*args: Any, **kwargs: Any) -> None:
        raise SafetensorError(
            "Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
            'message: "No space left on device" })'
        )

    monkeypatch.setattr(_shard_file, "write_at", full)
    with (
        pytest.raises(OSError, match="No space left on device") as info,
        HFFolderWriter(tmp_path / "m") as w,
    ):
        w.add("w", torch.ones(2))
    assert info.value.errno == 28 and str(tmp_path / "m.tmp-") in str(info.value.filename)
    assert list(tmp_path.iterdir()) == []


def test_parent_of_output_is_a_file(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "afile").write_text("x")
    cfg = _config(tmp_path, models["base"], [str(models["a"])])
    status, err = _run([cfg, "-o", tmp_path / "afile" / "out", "--dry-run"], capsys)
    assert status == 2 and f"{tmp_path / 'afile'} is a file, not a folder" in err


def test_missing_relative_path_says_where_it_was_looked_for(
    models: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = _config(tmp_path, models["base"], ["models/nope.safetensors", "some-org/some-model"])
    status, err = _run([cfg, "-o", "out", "--dry-run"], capsys)
    assert status == 2
    local, hub = [line for line in err.splitlines() if "branch not found" in line]
    assert "relative paths are resolved against the current directory" in local
    assert str(tmp_path / "models" / "nope.safetensors") in local and "huggingface" not in local
    assert "huggingface-cli download some-org/some-model" in hub


def test_output_name_of_250_characters(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / ("m" * 250)
    cfg = _config(tmp_path, models["base"], [str(models["a"])])
    status, err = _run([cfg, "-o", out], capsys)
    assert status == 0, err
    assert (out / "model.safetensors").is_file() and [
        p.name for p in tmp_path.iterdir() if ".tmp-" in p.name
    ] == []


# ------------------------------------------------------------------ 5. silent acceptance


def test_duplicate_yaml_key_is_refused_with_its_line(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "dup.yaml"
    cfg.write_text(
        f"method: ties\nbase: {models['base']}\nbranches: [{models['a']}]\nmethod: linear\n"
    )
    status, err = _run([cfg, "-o", tmp_path / "out", "--dry-run"], capsys)
    assert status == 2 and f"{cfg}:4:1: duplicate key 'method' (first at line 1)" in err


@pytest.mark.parametrize(
    ("snippet", "field", "line"),
    [
        ("branches:\n  - path: {a}\n    coefficient: true\n", "branches[0].coefficient", 5),
        ("branches: [{a}]\ncoefficients: [yes]\n", "coefficients[0]", 4),
        ("branches: [{a}]\nparameters:\n  density: true\nmethod_x: 1\n", "parameters.density", 5),
    ],
    ids=["coefficient", "coefficients", "method-parameter"],
)
def test_boolean_where_a_number_is_expected_is_refused_with_its_line(
    models: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    snippet: str,
    field: str,
    line: int,
) -> None:
    cfg = tmp_path / "bool.yaml"
    text = f"method: ties\nbase: {models['base']}\n" + snippet.format(a=models["a"])
    cfg.write_text(text.replace("method_x: 1\n", ""))
    status, err = _run([cfg, "-o", tmp_path / "out", "--dry-run"], capsys)
    assert status == 2 and f"line {line}: {field}: must be a number, not a boolean" in err, err


# ------------------------------------------------------------------ 6. prefixed checkpoints


def test_prefixed_lightning_checkpoint_gets_a_hint_and_a_prefix_key(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = models["root"] / "prefixed.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in _state(5).items()}}, ckpt)
    cfg = _config(tmp_path, models["base"], [str(ckpt)])
    status, err = _run([cfg, "-o", tmp_path / "out", "--dry-run"], capsys)
    assert status == 2 and "set prefix: 'model.' on the branch" in err
    cfg = _config(tmp_path, models["base"], [{"path": str(ckpt), "prefix": "model."}])
    status, err = _run([cfg, "-o", tmp_path / "out"], capsys)
    assert status == 0, err
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    torch.testing.assert_close(merged["fc2.weight"], _state(5)["fc2.weight"])


def test_add_prefix_renames_a_branch_to_the_bases_names(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = models["root"] / "wrapped.safetensors"
    save_file({f"model.{k}": v for k, v in _state(0).items()}, str(base))
    cfg = _config(tmp_path, base, [str(models["a"])])
    status, err = _run([cfg, "-o", tmp_path / "out", "--dry-run"], capsys)
    assert status == 2 and "set add_prefix: 'model.' on the branch" in err
    cfg = _config(tmp_path, base, [{"path": str(models["a"]), "add_prefix": "model."}])
    status, err = _run([cfg, "-o", tmp_path / "out"], capsys)
    assert status == 0, err
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    torch.testing.assert_close(merged["model.fc1.weight"], _state(1)["fc1.weight"])


def test_writer_refuses_foreign_folder_in_python_too(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileExistsError, match="'notes.txt'"):
        HFFolderWriter(tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").exists()


def test_check_replaceable_names_each_special_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from drm_lightning.sources.output_guard import check_replaceable

    home, cwd = tmp_path / "home", tmp_path / "work" / "here"
    home.mkdir()
    cwd.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    for target, what in [
        ("/", "the file system root"),
        (str(home), "your home folder"),
        (".", "the current directory"),
        ("..", "a parent of the current directory"),
    ]:
        with pytest.raises(ValueError, match=f"it is {what}"):
            check_replaceable(target)
    check_replaceable(tmp_path / "empty-or-new")  # nothing there: fine


_KILL_RANK_1 = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    from drm_lightning.sources import writer as w
    ready = Path(sys.argv[1])
    original = w.HFFolderWriter.add
    def slow_add(self, name, tensor):          # rank 0: the temporary folder exists, wait
        original(self, name, tensor)
        ready.touch()
        time.sleep(120)
    w.HFFolderWriter.add = slow_add
    if os.environ["RANK"] == "1":               # rank 1: die hard once rank 0 is writing
        import threading
        def killer():
            while not ready.exists():
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)
        threading.Thread(target=killer, daemon=True).start()
    from drm_lightning.cli import main
    sys.exit(main(sys.argv[2:]))
    """
)


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_torchrun_rank_killed_leaves_no_temporary_folder(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """torchrun stops the surviving rank 0 with SIGTERM: its temporary folder is removed."""
    script = tmp_path / "kill_rank_1.py"
    script.write_text(_KILL_RANK_1)
    cfg = _config(tmp_path, models["base"], [str(models["a"]), str(models["b"])])
    outs = tmp_path / "outs"
    outs.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",
        str(script),
        str(tmp_path / "ready"),
        str(cfg),
        "-o",
        str(outs / "m"),
        "--no-progress",
    ]
    run = subprocess.run(
        cmd, check=False, capture_output=True, text=True, timeout=200, env=env, cwd=ROOT
    )
    assert run.returncode != 0 and (tmp_path / "ready").exists(), run.stderr[-3000:]
    assert list(outs.iterdir()) == [], run.stderr[-3000:]
