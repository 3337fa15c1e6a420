"""Where a torch checkpoint keeps its state dict (issue 23 item 3): ``key:`` / ``key=``.

open_clip's training checkpoints are ``{'epoch', 'name', 'state_dict': {'module.…'}, ...}``;
other trainers nest the weights deeper (``model/ema``), and ``torch.save(model)`` pickles a
whole module. Each is read through ``key`` (one reader: ``TorchFileSource._select``) or
refused with the entries that hold tensors, the ``key:`` and ``prefix:`` to set, or what is
really wrong with a whole-module pickle.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from drm_lightning.cli.command import main
from drm_lightning.config.errors import ConfigError
from drm_lightning.config.loading import parse_config
from drm_lightning.sources import open_source
from drm_lightning.sources.torch_file import CheckpointLayoutError

COEFFICIENTS = (1.0, 0.5)


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=g), "b": torch.randn(4, generator=g)}


def _open_clip(path: Path, state: dict[str, torch.Tensor]) -> Path:
    """A checkpoint in open_clip's training layout (DDP-wrapped names, optimizer state)."""
    torch.save(
        {
            "epoch": 3,
            "name": "x",
            "state_dict": {f"module.{k}": v for k, v in state.items()},
            "optimizer": {"state": {0: {"exp_avg": torch.zeros(2)}}, "param_groups": []},
        },
        path,
    )
    return path


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Any]:
    base = tmp_path / "base.safetensors"
    save_file(_state(0), str(base))
    branches = [_open_clip(tmp_path / f"epoch_{i}.pt", _state(i + 1)) for i in range(2)]
    return {"base": base, "branches": branches, "out": tmp_path / "out"}


def _config(tmp_path: Path, base: Path, branches: list[str]) -> Path:
    """A config written by hand (one branch setting a line), so that lines can be asserted."""
    text = f"method: task_arithmetic\nbase: {base}\nbranches:\n" + "".join(branches)
    path = tmp_path / f"cfg-{len(list(tmp_path.glob('cfg-*')))}.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _branch(path: Path, coefficient: float, **settings: str) -> str:
    lines = [f"  - path: {path}\n", f"    coefficient: {coefficient}\n"]
    return "".join(lines + [f"    {k}: {v}\n" for k, v in settings.items()])


def _run(argv: list[Any], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main([*map(str, argv), "--no-progress"])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _expected(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Task arithmetic in float64: base + sum of lambda_i (branch_i - base)."""
    base = {k: v.double() for k, v in _state(0).items()}
    return {
        k: base[k] + sum(c * (s[k].double() - base[k]) for c, s in zip(COEFFICIENTS, states))
        for k in base
    }


def _assert_merged(out: Path, expected: dict[str, torch.Tensor]) -> None:
    merged = load_file(str(out / "model.safetensors"))
    assert sorted(merged) == sorted(expected)
    for name, value in expected.items():
        torch.testing.assert_close(merged[name].double(), value, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------- open_clip layout


def test_open_clip_checkpoint_with_key_merges_through_the_cli(
    files: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    branches = [
        _branch(p, c, key="state_dict", prefix="module.")
        for p, c in zip(files["branches"], COEFFICIENTS)
    ]
    cfg = _config(tmp_path, files["base"], branches)
    status, out, err = _run([cfg, "-o", files["out"], "--dry-run"], capsys)
    assert status == 0, err
    assert "(2 tensors, entry 'state_dict') [prefix 'module.' stripped]" in out
    status, _, err = _run([cfg, "-o", files["out"]], capsys)
    assert status == 0, err
    _assert_merged(files["out"], _expected([_state(1), _state(2)]))


def test_open_clip_checkpoint_with_key_in_python(files: dict[str, Any]) -> None:
    source = open_source(files["branches"][0], key="state_dict", prefix="module.")
    assert source.keys() == ["b", "w"]
    for name, value in _state(1).items():
        assert torch.equal(source.get(name), value)
    with pytest.raises(ValueError, match=r"key= is only supported for \.ckpt/\.bin/\.pt files"):
        open_source(files["base"], key="state_dict")


def test_without_key_the_error_names_the_entry_and_the_prefix(
    files: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(CheckpointLayoutError) as caught:
        open_source(files["branches"][0])
    message = str(caught.value)
    assert "holds no tensors at its top level (entries: ['epoch', 'name', 'optimizer'" in message
    assert "its entry 'state_dict' (2 tensors): set key: state_dict on the branch" in message
    assert "key='state_dict' of open_source" in message
    assert "optimizer" not in message.split("the tensors are in")[1]  # its state is no candidate

    cfg = _config(tmp_path, files["base"], [_branch(files["branches"][0], 1.0)])
    status, _, err = _run([cfg, "-o", files["out"], "--dry-run"], capsys)
    assert status == 2 and "Traceback" not in err
    assert "drm-merge: error: branches[0]: " in err
    assert "set key: state_dict on the branch" in err
    # the base's names, compared by prefix_hint: the prefix to strip comes with the key
    assert (
        "with key: state_dict, its names are the base's with the prefix 'module.' in front: "
        "set prefix: 'module.' on the branch" in err
    )
    assert not files["out"].exists()

    # key without prefix: the plan's mismatch hint (prefix_hint again) names the prefix
    cfg = _config(tmp_path, files["base"], [_branch(files["branches"][0], 1.0, key="state_dict")])
    status, _, err = _run([cfg, "-o", files["out"], "--dry-run"], capsys)
    assert status == 2 and "set prefix: 'module.' on the branch" in err


def test_nested_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ema.pt"
    ema = _state(1)
    torch.save({"step": 7, "model": {"ema": ema, "raw": _state(9), "decay": 0.999}}, path)
    with pytest.raises(CheckpointLayoutError) as caught:
        open_source(path)
    message = str(caught.value)
    assert "its entries 'model/ema' (2 tensors), 'model/raw' (2 tensors)" in message
    assert "set key: model/ema" in message
    with pytest.raises(CheckpointLayoutError, match=r"entry 'model' holds no tensors at its top"):
        open_source(path, key="model")
    source = open_source(path, key="model/ema")
    assert source.keys() == ["b", "w"] and torch.equal(source.get("w"), ema["w"])

    base = tmp_path / "base.safetensors"
    save_file(_state(0), str(base))
    branches = [_branch(path, 1.0, key="model/ema"), _branch(path, 0.5, key="model/raw")]
    cfg = _config(tmp_path, base, branches)
    status, _, err = _run([cfg, "-o", tmp_path / "out"], capsys)
    assert status == 0, err
    _assert_merged(tmp_path / "out", _expected([ema, _state(9)]))


def test_missing_key_lists_the_entries(
    files: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = files["branches"][0]
    with pytest.raises(CheckpointLayoutError) as caught:
        open_source(path, key="model")
    assert (
        "has no entry 'model' (key): its top level has no 'model'; entries there: "
        "['epoch', 'name', 'optimizer', 'state_dict']; the tensors are in its entry "
        "'state_dict'" in str(caught.value)
    )
    with pytest.raises(CheckpointLayoutError, match=r"its entry 'state_dict' has no 'ema'"):
        open_source(path, key="state_dict/ema")

    cfg = _config(tmp_path, files["base"], [_branch(path, 1.0, key="model", prefix="module.")])
    status, _, err = _run([cfg, "-o", files["out"], "--dry-run"], capsys)
    assert status == 2 and "drm-merge: error: branches[0].key: " in err
    assert "entries there: ['epoch', 'name', 'optimizer', 'state_dict']" in err
    assert not files["out"].exists()


def test_key_config_errors_are_located(files: dict[str, Any], tmp_path: Path) -> None:
    lora = tmp_path / "adapter"
    lora.mkdir()
    (lora / "adapter_config.json").write_text("{}")
    text = (
        "method: task_arithmetic\n"  # 1
        f"base: {files['base']}\n"  # 2
        "branches:\n"  # 3
        f"  - path: {files['branches'][0]}\n"  # 4
        "    key: state_dict//model\n"  # 5
        f"  - path: {files['base']}\n"  # 6
        "    key: state_dict\n"  # 7
        f"  - path: {files['branches'][1]}\n"  # 8
        "    key: ''\n"  # 9
        f"  - path: {files['branches'][1]}\n"  # 10
        "    key: [state_dict]\n"  # 11
        f"  - path: {lora}\n"  # 12
        "    key: state_dict\n"  # 13
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(text, source="cfg.yaml")
    message = str(caught.value)
    assert "invalid configuration cfg.yaml (5 problems)" in message
    assert "line 5: branches[0].key: an empty entry name; nested entries are written with '/'" in (
        message
    )
    assert "line 7: branches[1].key: only applies to a torch checkpoint file (.ckpt, .bin" in (
        message
    )
    assert "is a .safetensors file" in message
    assert "line 9: branches[2].key: " in message
    assert "line 11: branches[3].key: " in message
    assert "line 13: branches[4].key: only applies to a torch checkpoint file" in message
    assert "is a folder" in message


def test_lightning_suffix_with_another_trainers_layout(
    files: dict[str, Any], tmp_path: Path
) -> None:
    path = tmp_path / "run.ckpt"
    torch.save({"model": _state(1), "epoch": 2}, path)
    with pytest.raises(CheckpointLayoutError) as caught:
        open_source(path)
    assert "is not a Lightning checkpoint: it has no 'state_dict' entry" in str(caught.value)
    assert "set key: model on the branch" in str(caught.value)
    assert open_source(path, key="model").keys() == ["b", "w"]


# ------------------------------------------------------------------ whole-module pickles

MODULE_CODE = """
import torch


class VisionTransformer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(4, 3))
        self.b = torch.nn.Parameter(torch.zeros(4))
"""


def _pickle_module(tmp_path: Path, name: str, state: dict[str, torch.Tensor]) -> Path:
    """``torch.save(model)`` of a class from ``name.py`` in tmp_path, then the module made
    unimportable again (off ``sys.path``, out of ``sys.modules``)."""
    code = tmp_path / "code"
    code.mkdir(exist_ok=True)
    (code / f"{name}.py").write_text(MODULE_CODE, encoding="utf-8")
    sys.path.insert(0, str(code))
    try:
        importlib.invalidate_caches()
        model = importlib.import_module(name).VisionTransformer()
        model.load_state_dict(state)
        path = tmp_path / f"{name}.pt"
        torch.save(model, path)
    finally:
        sys.path.remove(str(code))
        sys.modules.pop(name, None)
    return path


def test_whole_module_pickle_whose_code_is_not_importable(
    files: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _pickle_module(tmp_path, "drmtest_vit", _state(1))
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("drmtest_vit")
    cfg = _config(tmp_path, files["base"], [_branch(path, 1.0)])
    status, _, err = _run([cfg, "-o", files["out"], "--dry-run", "--trust-pickles"], capsys)
    assert status == 2 and "Traceback" not in err
    assert (
        f"{path} holds a whole pickled module of class 'drmtest_vit.VisionTransformer' whose "
        "code is not importable here (No module named 'drmtest_vit'); save its state_dict() "
        "instead (torch.save(model.state_dict(), ...)), or make the module importable" in err
    )
    assert "expected a file written by torch.save" not in err
    # without the opt-in nothing is unpickled, and the refusal says what the file is
    status, _, err = _run([cfg, "-o", files["out"], "--dry-run"], capsys)
    assert status == 2 and "--trust-pickles" in err
    assert "It is a whole pickled module (class 'drmtest_vit.VisionTransformer')" in err
    assert "drmtest_vit" not in sys.modules and not files["out"].exists()


def test_whole_module_pickle_with_importable_code_is_merged(
    files: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _pickle_module(tmp_path, "drmtest_vit_ok", _state(1))
    status, _, err = _run(
        [_config(tmp_path, files["base"], [_branch(path, 1.0)]), "-o", files["out"]], capsys
    )
    assert status == 2 and "--trust-pickles" in err  # full unpickling needs the opt-in
    sys.path.insert(0, str(tmp_path / "code"))
    try:
        source = open_source(path, trust_pickles=True)
        assert source.keys() == ["b", "w"]
        branches = [_branch(path, COEFFICIENTS[0]), _branch(files["branches"][1], COEFFICIENTS[1])]
        branches[1] += "    key: state_dict\n    prefix: module.\n"
        cfg = _config(tmp_path, files["base"], branches)
        status, _, err = _run([cfg, "-o", files["out"], "--trust-pickles"], capsys)
    finally:
        sys.path.remove(str(tmp_path / "code"))
        sys.modules.pop("drmtest_vit_ok", None)
    assert status == 0, err
    _assert_merged(files["out"], _expected([_state(1), _state(2)]))
