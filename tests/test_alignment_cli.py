"""``drm-merge`` with alignment (issue 11): ``method: mudsc_zip`` and the ``align:`` pre-step.

Oracles: the CLI's merged folder equals :func:`merge_models` on the same models and batches;
align-then-DRM of a permuted copy through the CLI equals DRM of the unpermuted branches. Bad
inputs: every problem at once with its YAML line, before any weight is read, nothing written.
"""

from __future__ import annotations

import copy
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from _alignment_nets import MLP, inputs, seeded
from safetensors.torch import load_file, save_file

from drm_lightning.alignment import (
    derive_spec,
    merge_models,
    permute_state_dict,
    random_permutations,
)
from drm_lightning.cli.align_inputs import load_batches
from drm_lightning.cli.command import example_configs, main
from drm_lightning.config.errors import ConfigError
from drm_lightning.config.loading import load_config
from drm_lightning.merge.loop import merge_state_dicts
from drm_lightning.methods import get_method

NETS_MODULE = """
import torch
from _alignment_nets import MLP, inputs

def mlp():
    return MLP().double()

def wide():
    return MLP(width=48).double()

def loader():
    data = torch.utils.data.TensorDataset(torch.cat([inputs("mlp", 32, seed=s) for s in (1, 2, 3)]))
    return torch.utils.data.DataLoader(data, batch_size=32)

def spec(model):
    from drm_lightning.alignment import derive_spec
    return derive_spec(model, inputs("mlp"))
"""


@pytest.fixture()
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with the user's module (nets_cli), calibration files, and it as the cwd."""
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    for name in ("nets_cli", "mynets"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    (tmp_path / "nets_cli.py").write_text(textwrap.dedent(NETS_MODULE))
    calib = torch.cat([inputs("mlp", 32, seed=s) for s in (1, 2, 3)])
    save_file({"inputs": calib}, str(tmp_path / "calib.safetensors"))
    torch.save(calib, tmp_path / "calib.pt")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _save(model: torch.nn.Module | dict[str, torch.Tensor], folder: Path) -> Path:
    folder.mkdir()
    state = model.state_dict() if isinstance(model, torch.nn.Module) else model
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    return folder


def _config(folder: Path, data: dict[str, Any] | str) -> Path:
    path = folder / "cfg.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def _forbid_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    from drm_lightning.sources.base import WeightSource

    def boom(self: Any, name: str, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"weights were read: {name}")

    stack = [WeightSource]
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if "get" in vars(cls):
            monkeypatch.setattr(cls, "get", boom)


def _fails(cfg: Path, out: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    assert main([str(cfg), "-o", str(out), "--trust-code", *extra]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and not out.exists()
    return err


def test_mudsc_zip_from_the_cli_equals_merge_models(
    work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = [seeded(MLP, s) for s in (0, 1)]
    paths = [_save(m, work / f"seed{i}") for i, m in enumerate(models)]
    (paths[0] / "config.json").write_text("{}")  # copied from the anchor
    cfg = _config(
        work,
        {
            "method": "mudsc_zip",
            "branches": [str(p) for p in paths],
            "model": "nets_cli:mlp",
            "batches": "calib.safetensors",
            "batch_size": 32,
            "parameters": {"fix_rate": 0.3},
        },
    )
    out = work / "out"
    assert main([str(cfg), "-o", str(out), "--no-progress", "--trust-code"]) == 0
    assert "wrote" in capsys.readouterr().out
    got = load_file(str(next(out.glob("*.safetensors"))))
    calib = load_batches("calib.safetensors", batch_size=32)
    want = merge_models(models, calib, method="mudsc_zip", fix_rate=0.3).state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert (out / "config.json").is_file() and "mudsc_zip" in (out / "README.md").read_text()


def test_align_pre_step_then_drm_equals_drm_of_the_unpermuted(work: Path) -> None:
    base = seeded(MLP, 0)
    branches = []
    for s in (1, 2):
        g = torch.Generator().manual_seed(s)
        branches.append(
            {
                k: v + 0.01 * torch.randn(v.shape, generator=g, dtype=v.dtype)
                for k, v in base.state_dict().items()
            }
        )
    spec = derive_spec(base, inputs("mlp"))
    perms = random_permutations(
        spec, spec.check([base.state_dict()]), torch.Generator().manual_seed(9)
    )
    moved = permute_state_dict(branches[1], spec, perms)
    assert not torch.equal(moved["fc1.weight"], branches[1]["fc1.weight"])
    cfg = _config(
        work,
        {
            "method": "drm",
            "base": str(_save(base, work / "base")),
            "branches": [str(_save(branches[0], work / "a")), str(_save(moved, work / "b"))],
            "compute_dtype": "float64",
            "align": {
                "method": "mudsc_align",
                "anchor": 0,
                "model": "nets_cli:mlp",
                "batches": "nets_cli:loader",
            },
        },
    )
    out = work / "out"
    assert main([str(cfg), "-o", str(out), "--no-progress", "--trust-code"]) == 0
    got = load_file(str(next(out.glob("*.safetensors"))))
    want = merge_state_dicts(
        get_method("drm"), base.state_dict(), branches, compute_dtype=torch.float64
    )
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert "mudsc_align" in (out / "README.md").read_text()  # the card names the pre-step


def test_dry_runs_read_no_weight(
    work: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from drm_lightning.cli.align_job import run_alignment_merge

    paths = [str(_save(seeded(MLP, s), work / f"m{s}")) for s in (0, 1)]
    _forbid_reading(monkeypatch)
    cfg = _config(
        work,
        {
            "method": "zipit",
            "branches": paths,
            "model": "nets_cli:mlp",
            "batches": "calib.pt",
            "spec": "nets_cli:spec",
        },
    )
    # the user's own code (a config validated with code="import"): everything is built
    text = run_alignment_merge(load_config(cfg, code="import"), work / "out", dry_run=True)
    assert "no weight was read" in text and "alignment: zipit" in text and "3 group(s)" in text
    assert "2 batch(es) from calib.pt" in text  # 96 rows, batch_size 64
    # drm-merge --dry-run --trust-code imports nothing: the references are only named
    monkeypatch.delitem(sys.modules, "nets_cli", raising=False)
    assert main([str(cfg), "-o", str(work / "out"), "--dry-run", "--trust-code"]) == 0
    text = capsys.readouterr().out
    assert "no weight was read" in text and "alignment: zipit" in text
    assert "architecture: nets_cli:mlp (not built: it runs code" in text
    assert "check of the architecture against the branches was skipped" in text
    assert "2 batch(es) from calib.pt" in text  # a tensor file is still loaded (weights-only)
    assert "nets_cli" not in sys.modules
    cfg = _config(
        work,
        {
            "method": "ties",
            "base": paths[0],
            "branches": paths,
            "align": {
                "method": "weight_matching",
                "anchor": 1,
                "model": "nets_cli:mlp",
                "spec": "nets_cli:spec",
            },
        },
    )
    assert main([str(cfg), "-o", str(work / "out"), "--dry-run", "--trust-code"]) == 0
    text = capsys.readouterr().out
    assert "align alignment: weight_matching" in text and "calibration: none (weights only)" in text
    assert "align permutation spec: not checked (nets_cli:spec: not built" in text
    assert not (work / "out").exists() and "nets_cli" not in sys.modules


def test_every_config_problem_at_once_with_its_line(work: Path) -> None:
    paths = [str(_save(seeded(MLP, s), work / f"m{s}")) for s in (0, 1)]
    text = textwrap.dedent(f"""\
        method: mudsc_zip
        base: {paths[0]}
        branches:
          - {paths[0]}
          - {{path: {paths[1]}, coefficient: 0.5}}
        model: nets_cli:nope
        batches: calib.txt
        parameters: {{fixrate: 0.5, solver: align, seed: -1.5}}
        """)
    (work / "calib.txt").write_text("x")
    with pytest.raises(ConfigError) as info:
        load_config(_config(work, text), code="import")
    msg = str(info.value)
    assert "line 2: base: not used by alignment method 'mudsc_zip'" in msg
    assert "line 5: branches[1].coefficient: not used" in msg
    assert "line 6: model: module 'nets_cli' has no attribute 'nope'" in msg
    assert "line 7: batches: must be module:function returning a DataLoader or a tensor" in msg
    assert (
        "parameters.fixrate: unknown parameter for method 'mudsc_zip' (did you mean 'fix_rate'"
        in msg
    )
    assert "parameters.solver: fixed to 'zip' by method 'mudsc_zip'" in msg
    assert msg.startswith(f"invalid configuration {work / 'cfg.yaml'} (")

    text = textwrap.dedent(f"""\
        method: drm
        base: {paths[0]}
        branches: [{paths[0]}, {paths[1]}]
        align:
          method: mudsc_zip
          anchor: 2
          model: no_such_module_xyz:build
        """)
    with pytest.raises(ConfigError) as info:
        load_config(_config(work, text), code="import")
    msg = str(info.value)
    assert "line 5: align.method: 'mudsc_zip' merges units within a model" in msg
    assert "line 6: align.anchor: out of range for 2 branches" in msg
    assert "line 7: align.model: cannot import module 'no_such_module_xyz'" in msg
    with pytest.raises(
        ConfigError,
        match=r"method: unknown alignment method 'mudsc_zipp' \(did you mean 'mudsc_zip'",
    ):
        load_config(
            _config(work, {"method": "mudsc_zipp", "branches": paths, "model": "nets_cli:mlp"}),
            code="import",
        )
    with pytest.raises(ConfigError, match=r"batches: method 'zipit' reads activations"):
        load_config(
            _config(work, {"method": "zipit", "branches": paths, "model": "nets_cli:mlp"}),
            code="import",
        )
    with pytest.raises(ConfigError, match=r"model: required: name the architecture"):
        load_config(_config(work, {"method": "weight_matching", "branches": paths}))


def test_architecture_mismatch_named_before_any_read(
    work: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _save(seeded(MLP, 0), work / "a")
    _save(seeded(MLP, 1, width=48), work / "b")
    paths = ["a", "b"]  # relative to the cwd
    _forbid_reading(monkeypatch)
    cfg = _config(
        work,
        {"method": "mudsc_zip", "branches": paths, "model": "nets_cli:mlp", "batches": "calib.pt"},
    )
    err = _fails(cfg, work / "out", capsys)
    assert "branches[1] (b) does not fit the architecture of model: 'nets_cli:mlp'" in err
    assert "fc1.weight: model [32, 20], file [48, 20]" in err and "branches[0]" not in err
    cfg = _config(
        work,
        {
            "method": "drm",
            "base": paths[0],
            "branches": [paths[0], paths[0]],
            "align": {"model": "nets_cli:wide", "batches": "calib.pt"},
        },
    )
    err = _fails(cfg, work / "out", capsys)
    assert "align.model: branches[0] (a) does not fit" in err


def test_align_refused_under_torchrun(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from drm_lightning.cli.align_job import run_alignment_merge

    paths = [str(_save(seeded(MLP, s), work / f"m{s}")) for s in (0, 1)]
    cfg = load_config(
        _config(
            work,
            {
                "method": "weight_matching",
                "branches": paths,
                "model": "nets_cli:mlp",
                "spec": "nets_cli:spec",
            },
        ),
        code="import",
    )
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="runs in one process: launch drm-merge without torchrun"):
        run_alignment_merge(cfg, work / "out", dry_run=True)


def test_calibration_batches_shapes(work: Path) -> None:
    assert [b.shape[0] for b in load_batches("calib.pt", batch_size=40)] == [40, 40, 16]
    assert len(load_batches("nets_cli:loader")) == 3
    save_file({"a": torch.zeros(2), "b": torch.zeros(2)}, str(work / "two.safetensors"))
    with pytest.raises(
        ValueError, match=r"holds \['a', 'b'\]: keep one tensor, or name the inputs 'inputs'"
    ):
        load_batches("two.safetensors")
    model = copy.deepcopy(seeded(MLP, 0))
    assert model(load_batches("calib.pt")[0]).shape == (64, 10)


def test_example_config_and_its_align_variant_validate(work: Path) -> None:
    example = example_configs()["mudsc_zip"]
    (work / "mynets.py").write_text(
        "from nets_cli import mlp as build_mlp, loader as calibration\n"
    )
    for s in range(3):
        (work / "runs" / f"seed{s}").mkdir(parents=True)
    text = example.read_text()
    cfg = load_config(_config(work, text), code="import")
    assert (
        cfg.method == "mudsc_zip" and len(cfg.branches) == 3 and cfg.parameters["fix_rate"] == 0.5
    )
    start = text.index("#   method: drm")
    variant = "\n".join(line[4:] for line in text[start:].splitlines())
    aligned = load_config(_config(work, variant), code="import")
    assert aligned.method == "drm" and aligned.align.method == "mudsc_align"
