"""A checkpoint, a config or a model folder from a stranger is data, never code (issue 20).

Each hostile input would create a marker file if its code ran; no test lets it appear unless
the user opted in on the command line (``--trust-pickles``, ``--trust-code``) or in their own
code (``trust_pickles=True``):

* ``BranchedModule.load_from_checkpoint`` of a local file, an ``http://`` URL (Lightning
  fully unpickles URLs by default) or an fsspec path loads weights-only;
* ``trust_pickles:`` in a config file (ours, mergekit's, an alignment config) is refused;
* ``module:function`` references of a config (``model:``, ``batches:``, ``spec:``) are
  imported only with ``--trust-code``, and never by ``--dry-run``.
"""

from __future__ import annotations

import functools
import http.server
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import lightning
import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from drm_lightning.cli.command import main
from drm_lightning.config.errors import ConfigError
from drm_lightning.config.loading import load_config
from drm_lightning.lightning import BranchedModule
from drm_lightning.sources import UntrustedPickleError


class Evil:
    """Unpickling this runs ``os.makedirs(marker)``: the proof that code from a file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.makedirs, (self.marker,))


# ------------------------------------------------- 1. BranchedModule.load_from_checkpoint


def _branched() -> BranchedModule:
    torch.manual_seed(0)
    return BranchedModule(nn.Linear(4, 8), {"a": nn.Linear(8, 2), "b": nn.Linear(8, 3)})


def _ckpt(model: BranchedModule, **extra: Any) -> dict[str, Any]:
    """What a Lightning checkpoint holds, plus ``extra``."""
    return {
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
        "pytorch-lightning_version": lightning.__version__,
        **extra,
    }


def _parts() -> dict[str, Any]:
    model = _branched()
    return {"backbone": model.base, "heads": dict(model.heads)}


@pytest.fixture()
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, str]]:
    """A folder served over http on 127.0.0.1 (no internet); torch.hub's cache in tmp_path."""
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.mark.parametrize("given", [True, False], ids=["backbone-given", "from-checkpoint"])
def test_branched_url_checkpoint_runs_no_code(
    served: tuple[Path, str], tmp_path: Path, given: bool
) -> None:
    root, url = served
    marker = tmp_path / "PWNED"
    torch.save(_ckpt(_branched(), hp=Evil(marker)), root / "evil.ckpt")
    with pytest.raises(UntrustedPickleError) as info:
        BranchedModule.load_from_checkpoint(f"{url}/evil.ckpt", **(_parts() if given else {}))
    assert not marker.exists(), "code from the checkpoint ran"
    msg = str(info.value)
    assert f"{url}/evil.ckpt holds Python objects other than tensors" in msg
    assert "trust_pickles=True" in msg and "os.makedirs" in msg


def test_branched_url_checkpoint_of_tensors_loads(served: tuple[Path, str]) -> None:
    root, url = served
    model = _branched()
    torch.save(_ckpt(model), root / "good.ckpt")
    loaded = BranchedModule.load_from_checkpoint(f"{url}/good.ckpt", **_parts())
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_branched_fsspec_and_local_checkpoints_name_the_opt_in(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    local = tmp_path / "evil.ckpt"
    torch.save(_ckpt(_branched(), hp=Evil(marker)), local)
    with fsspec.open("memory://issue20/evil.ckpt", "wb") as f:
        f.write(local.read_bytes())
    for path in (local, "memory://issue20/evil.ckpt"):
        with pytest.raises(UntrustedPickleError, match=r"trust_pickles=True") as info:
            BranchedModule.load_from_checkpoint(path, **_parts())
        assert str(path) in str(info.value)
    with pytest.raises(ValueError, match=r"weights_only=False .* pass trust_pickles=True"):
        BranchedModule.load_from_checkpoint(local, weights_only=False, **_parts())
    assert not marker.exists(), "code from the checkpoint ran"
    BranchedModule.load_from_checkpoint(local, trust_pickles=True, **_parts())
    assert marker.is_dir()  # the user's own code opted in: the file was fully unpickled


# ----------------------------------------------------------- 2. trust_pickles: in a config


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"fc.weight": torch.randn(3, 4, generator=g), "fc.bias": torch.randn(3, generator=g)}


@pytest.fixture()
def inputs(tmp_path: Path) -> dict[str, Path]:
    """A safetensors base and branch, and a hostile .ckpt branch whose unpickling makes PWNED."""
    (tmp_path / "base").mkdir()
    save_file(_state(0), str(tmp_path / "base" / "model.safetensors"))
    save_file(_state(1), str(tmp_path / "a.safetensors"))
    marker = tmp_path / "PWNED"
    torch.save({"state_dict": _state(2), "hp": Evil(marker)}, tmp_path / "evil.ckpt")
    return {
        "base": tmp_path / "base",
        "a": tmp_path / "a.safetensors",
        "evil": tmp_path / "evil.ckpt",
        "marker": marker,
    }


def _cli(argv: list[Any], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main([*map(str, argv), "--no-progress"])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize("fmt", ["ours", "mergekit", "alignment"])
def test_trust_pickles_in_a_config_is_refused(
    inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    base, evil = inputs["base"], inputs["evil"]
    text = {
        "ours": f"method: task_arithmetic\nbase: {base}\nbranches: [{evil}]\ntrust_pickles: true\n",
        "mergekit": f"merge_method: task_arithmetic\nbase_model: {base}\n"
        f"models:\n  - model: {evil}\n    parameters: {{weight: 1.0}}\ntrust_pickles: true\n",
        "alignment": f"method: weight_matching\nbranches: [{evil}, {evil}]\nmodel: {base}\n"
        "trust_pickles: true\n",
    }[fmt]
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(text)
    line = text.splitlines().index("trust_pickles: true") + 1
    status, _, err = _cli([cfg, "-o", tmp_path / "out", "--dry-run"], capsys)
    assert status == 2 and not inputs["marker"].exists(), "code from the pickle ran"
    assert f"line {line}: trust_pickles: is not read from a config file" in err
    assert "pass --trust-pickles on the command line" in err
    assert not (tmp_path / "out").exists()


def test_trust_pickles_opt_in_is_the_flag(
    inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"method: task_arithmetic\nbase: {inputs['base']}\nbranches: [{inputs['evil']}]\n"
    )
    status, _, err = _cli([cfg, "-o", tmp_path / "out", "--dry-run"], capsys)
    assert status == 2 and not inputs["marker"].exists()
    assert "--trust-pickles on the drm-merge command line" in err and "YAML" not in err
    status, _, err = _cli([cfg, "-o", tmp_path / "out", "--dry-run", "--trust-pickles"], capsys)
    assert status == 0, err
    assert inputs["marker"].is_dir()  # the user opted in on the command line


# ------------------------------------------------------- 3. module:function in a config

EVILNETS = """
import pathlib
pathlib.Path({marker!r}).mkdir()  # importing this module is the attack

import torch
from torch import nn

def build():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()

def calibration():
    return torch.randn(16, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
"""


@pytest.fixture()
def beside(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """The current directory holds two models, calibration inputs and a hostile evilnets.py."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # resolve_callable appends the cwd
    for name in ("evilnets", "this"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    marker = tmp_path / "PWNED"
    (tmp_path / "evilnets.py").write_text(EVILNETS.format(marker=str(marker)))
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()
        (tmp_path / f"m{seed}").mkdir()
        save_file(net.state_dict(), str(tmp_path / f"m{seed}" / "model.safetensors"))
    save_file(
        {"inputs": torch.randn(16, 4, dtype=torch.float64)}, str(tmp_path / "calib.safetensors")
    )
    return {"root": tmp_path, "marker": marker}


def _write(root: Path, data: dict[str, Any]) -> Path:
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _line(cfg: Path, value: str) -> int:
    """The line of the first key whose value is ``value``."""
    lines = cfg.read_text().splitlines()
    return next(i for i, text in enumerate(lines, 1) if text.rstrip().endswith(f": {value}"))


ALIGNMENT = {
    "method": "weight_matching",
    "branches": ["m0", "m1"],
    "model": "evilnets:build",
    "batches": "calib.safetensors",
}
ALIGN_STEP = {
    "method": "drm",
    "base": "m0",
    "branches": ["m0", "m1"],
    "align": {
        "method": "weight_matching",
        "model": "evilnets:build",
        "batches": "evilnets:calibration",
    },
}


@pytest.mark.parametrize("data", [ALIGNMENT, ALIGN_STEP], ids=["method", "align-step"])
@pytest.mark.parametrize("flags", [[], ["--dry-run"]], ids=["run", "dry-run"])
def test_config_code_is_refused_without_trust_code(
    beside: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    data: dict[str, Any],
    flags: list[str],
) -> None:
    root = beside["root"]
    cfg = _write(root, data)
    status, _, err = _cli([cfg, "-o", root / "out", *flags], capsys)
    assert status == 2
    assert not beside["marker"].exists() and "evilnets" not in sys.modules, "the config's code ran"
    field = "model" if "model" in data else "align.model"
    line = _line(cfg, "evilnets:build")
    assert f"line {line}: {field}: 'evilnets:build' names Python code (module:function)" in err
    assert "pass --trust-code on the command line" in err
    if field == "align.model":
        line = _line(cfg, "evilnets:calibration")
        assert f"line {line}: align.batches: 'evilnets:calibration' names Python code" in err
    assert not (root / "out").exists()


@pytest.mark.parametrize("data", [ALIGNMENT, ALIGN_STEP], ids=["method", "align-step"])
def test_dry_run_imports_nothing_even_with_trust_code(
    beside: dict[str, Path], capsys: pytest.CaptureFixture[str], data: dict[str, Any]
) -> None:
    root = beside["root"]
    status, out, err = _cli(
        [_write(root, data), "-o", root / "out", "--dry-run", "--trust-code"], capsys
    )
    assert status == 0, err
    assert not beside["marker"].exists() and "evilnets" not in sys.modules, "the config's code ran"
    assert "architecture: evilnets:build (not built: it runs code" in out
    assert "check of the architecture against the branches was skipped" in out
    assert not (root / "out").exists()


def test_trust_code_imports_and_merges(
    beside: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    root = beside["root"]
    status, _, err = _cli([_write(root, ALIGNMENT), "-o", root / "out", "--trust-code"], capsys)
    assert status == 0, err
    assert beside["marker"].is_dir()  # the user opted in: the module was imported
    assert (root / "out" / "model.safetensors").is_file()


def test_an_installed_module_is_refused_too(
    beside: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    root = beside["root"]
    cfg = _write(root, {**ALIGNMENT, "model": "this:s", "spec": "os:system"})
    status, out, err = _cli([cfg, "-o", root / "out", "--dry-run"], capsys)
    assert status == 2 and "Beautiful is better than ugly" not in out + err
    assert "this" not in sys.modules
    assert f"line {_line(cfg, 'this:s')}: model: 'this:s' names Python code" in err
    assert f"line {_line(cfg, 'os:system')}: spec: 'os:system' names Python code" in err
    assert "--trust-code" in err
    with pytest.raises(ConfigError, match=r"model: 'this:s' names Python code"):
        load_config(cfg)  # the Python API reading a file refuses by default too
