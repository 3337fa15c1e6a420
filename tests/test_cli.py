"""``drm-merge`` end to end on a tiny Llama: artefacts, oracles, dry run, and every bad input.

Every failing run must (1) exit with status 2, (2) print one message naming the file, key
and shapes involved, without a traceback, and (3) leave nothing behind: no ``OUT`` folder
and no temporary sibling.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers import tiny_llama_config
from safetensors.torch import load_file, save_file

from drm_lightning.cli.command import main, parse_size
from drm_lightning.merge.loop import merge_state_dicts
from drm_lightning.merge.routing import Routing
from drm_lightning.methods import get_method

transformers = pytest.importorskip("transformers")

N_BRANCHES = 3
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ fixtures


_llama_config = tiny_llama_config


def _save_model(
    state: dict[str, torch.Tensor], folder: Path, config: Any, **save_kwargs: Any
) -> Path:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(state)
    model.save_pretrained(folder, safe_serialization=True, **save_kwargs)
    return folder


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny Llama base, three fine-tunes (one sharded) and a LoRA adapter, all on disk."""
    root = tmp_path_factory.mktemp("zoo")
    config = _llama_config()
    torch.manual_seed(0)
    base_model = transformers.LlamaForCausalLM(config)
    base_sd = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
    base_model.save_pretrained(root / "base", safe_serialization=True)
    (root / "base" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    branches = []
    for i in range(N_BRANCHES):
        g = torch.Generator().manual_seed(10 + i)
        sd = {k: v + 0.02 * (i + 1) * torch.randn(v.shape, generator=g) for k, v in base_sd.items()}
        kwargs = {"max_shard_size": "40KB"} if i == 1 else {}
        _save_model(sd, root / f"branch{i}", config, **kwargs)
        branches.append(sd)
    assert (root / "branch1" / "model.safetensors.index.json").is_file()
    return {"root": root, "config": config, "base_sd": base_sd, "branches": branches}


@pytest.fixture(scope="module")
def lora_adapter(zoo: dict[str, Any]) -> Path:
    """A PEFT LoRA adapter (q/v projections, rank 4) trained "on" the zoo's base."""
    peft = pytest.importorskip("peft")
    model = transformers.LlamaForCausalLM(zoo["config"])
    model.load_state_dict(zoo["base_sd"])
    lora = peft.get_peft_model(
        model,
        peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
        ),
    )
    out = zoo["root"] / "lora"
    lora.save_pretrained(out)
    return out


def _write_config(tmp_path: Path, zoo: dict[str, Any], **overrides: Any) -> Path:
    data: dict[str, Any] = {
        "method": "drm",
        "base": str(zoo["root"] / "base"),
        "branches": [
            {"path": str(zoo["root"] / f"branch{i}"), "coefficient": c}
            for i, c in zip(range(N_BRANCHES), (1.0, 0.5, 0.8), strict=True)
        ],
        "parameters": {"drop_rate": 0.5},
        "routing": {"ignore": [r"lm_head\."]},
    }
    data.update(overrides)
    path = tmp_path / f"cfg-{len(list(tmp_path.glob('cfg-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _read_folder(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str], out: Path) -> str:
    """Run the CLI, expect status 2 with a short message and no trace of ``out`` on disk."""
    parent = out.parent
    before = set(parent.iterdir()) if parent.exists() else set()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("drm-merge: error: "), err
    assert "Traceback" not in err
    assert not out.exists(), f"{out} was created by a failing run"
    after = set(parent.iterdir()) if parent.exists() else set()
    assert after == before, f"leftovers next to OUT: {sorted(map(str, after - before))}"
    return err


@pytest.fixture()
def out(tmp_path: Path) -> Path:
    (tmp_path / "outs").mkdir()
    return tmp_path / "outs" / "merged"


# --------------------------------------------------------------------------- happy paths


def test_merge_writes_hf_folder_equal_to_state_dict_merge(
    zoo: dict[str, Any], tmp_path: Path, out: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _write_config(tmp_path, zoo)
    assert main([str(cfg), "-o", str(out), "--no-progress", "--max-shard-size", "60KB"]) == 0
    assert "wrote" in capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "tokenizer_config.json",
        "README.md",
        "model.safetensors.index.json",
    } <= names
    assert not any(n.startswith(".") or "tmp" in n for n in names)
    assert (out / "config.json").read_text() == (zoo["root"] / "base" / "config.json").read_text()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(zoo["base_sd"])
    assert set(index["weight_map"].values()) == {p.name for p in out.glob("*.safetensors")}
    merged = _read_folder(out)
    assert set(merged) == set(zoo["base_sd"])
    for name, tensor in merged.items():
        assert (
            tensor.dtype == zoo["base_sd"][name].dtype
            and tensor.shape == zoo["base_sd"][name].shape
        )
        assert torch.isfinite(tensor).all(), name
    assert torch.equal(
        merged["lm_head.weight"], zoo["base_sd"]["lm_head.weight"]
    )  # ignored: bit-identical
    expected = merge_state_dicts(
        get_method("drm", drop_rate=0.5),
        zoo["base_sd"],
        zoo["branches"],
        coefficients=[1.0, 0.5, 0.8],
        routing=Routing(ignore=[r"lm_head\."]),
    )
    for name in expected:
        torch.testing.assert_close(merged[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    changed = [n for n in merged if not torch.equal(merged[n], zoo["base_sd"][n])]
    assert "model.layers.0.self_attn.q_proj.weight" in changed and "lm_head.weight" not in changed
    card = (out / "README.md").read_text()
    assert "drm" in card and "drop_rate" in card and "0.8" in card  # coefficient of branch 2
    assert (
        str(zoo["root"] / "branch1" / "model.safetensors.index.json") in card
    )  # files with sha256
    assert card.count("| `") >= N_BRANCHES + 1


def test_subprocess_entry_point(zoo: dict[str, Any], tmp_path: Path, out: Path) -> None:
    cfg = _write_config(
        tmp_path, zoo, method="ties", parameters={"density": 0.5}, out_dtype="bfloat16"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "drm_lightning.cli", str(cfg), "-o", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    merged = _read_folder(out)
    assert all(t.dtype == torch.bfloat16 for t in merged.values())
    expected = merge_state_dicts(
        get_method("ties", density=0.5),
        zoo["base_sd"],
        zoo["branches"],
        coefficients=[1.0, 0.5, 0.8],
        routing=Routing(ignore=[r"lm_head\."]),
        out_dtype=torch.bfloat16,
    )
    for name in expected:
        torch.testing.assert_close(merged[name], expected[name], rtol=0, atol=0, msg=name)
    bad = subprocess.run(
        [sys.executable, "-m", "drm_lightning.cli", str(cfg), "-o", str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert bad.returncode == 2 and "already exists" in bad.stderr and "Traceback" not in bad.stderr


def _forbid_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every tensor read fail, to prove a code path works from metadata only."""
    from drm_lightning.sources.base import WeightSource

    def boom(self: Any, name: str, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"weights were read: {name}")

    stack = [WeightSource]
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        for attr in ("get", "lowrank", "delta"):
            if attr in vars(cls):
                monkeypatch.setattr(cls, attr, boom)


def test_dry_run_prints_plan_without_reading_weights(
    zoo: dict[str, Any],
    lora_adapter: Path,
    tmp_path: Path,
    out: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _forbid_reading(monkeypatch)
    branches = [str(zoo["root"] / "branch0"), {"path": str(lora_adapter), "coefficient": 0.5}]
    cfg = _write_config(tmp_path, zoo, branches=branches)
    assert main([str(cfg), "-o", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert not out.exists()
    assert "no weight was read" in text
    assert "matrix" in text and "fallback" in text and "ignore" in text and "GFLOP" in text
    assert "estimated peak memory" in text and "coefficient 0.5" in text
    assert "merge plan: 21 tensors" in text and "engine single" in text  # the distributed planner
    n_matrix = 2 * 7  # q k v o gate up down per layer
    assert any(line.split()[:2] == ["matrix", str(n_matrix)] for line in text.splitlines()), text
    assert any(line.split()[:2] == ["ignore", "1"] for line in text.splitlines()), text


def test_yaml_settings_change_the_output(
    zoo: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression for the reference's B2/B8: direction, drop_rate and λ must reach the merge."""
    variants = {
        "default": {},
        "direction": {"parameters": {"drop_rate": 0.5, "direction": "vertical"}},
        "drop_rate": {"parameters": {"drop_rate": 0.9}},
        "coefficients": {
            "branches": [
                {"path": str(zoo["root"] / f"branch{i}"), "coefficient": c}
                for i, c in enumerate((0.2, 1.0, 0.3))
            ]
        },
    }
    outputs = {}
    for label, overrides in variants.items():
        folder = tmp_path / label
        assert (
            main(
                [str(_write_config(tmp_path, zoo, **overrides)), "-o", str(folder), "--no-progress"]
            )
            == 0
        )
        outputs[label] = _read_folder(folder)
    key = "model.layers.1.mlp.down_proj.weight"
    for label in ("direction", "drop_rate", "coefficients"):
        assert not torch.equal(outputs[label][key], outputs["default"][key]), f"{label} was ignored"
    expected = merge_state_dicts(
        get_method("drm", drop_rate=0.5, direction="vertical"),
        zoo["base_sd"],
        zoo["branches"],
        coefficients=[1.0, 0.5, 0.8],
        routing=Routing(ignore=[r"lm_head\."]),
    )
    torch.testing.assert_close(outputs["direction"][key], expected[key], rtol=1e-5, atol=1e-6)
    capsys.readouterr()


def test_lora_branch_merges_like_the_dense_adapter(
    zoo: dict[str, Any], lora_adapter: Path, tmp_path: Path, out: Path
) -> None:
    peft = pytest.importorskip("peft")
    cfg = _write_config(
        tmp_path,
        zoo,
        compute_dtype="float64",
        branches=[str(zoo["root"] / "branch0"), {"path": str(lora_adapter), "coefficient": 0.5}],
    )
    assert main([str(cfg), "-o", str(out), "--no-progress"]) == 0
    merged = _read_folder(out)
    model = transformers.LlamaForCausalLM(zoo["config"])
    model.load_state_dict(zoo["base_sd"])
    dense = peft.PeftModel.from_pretrained(model, lora_adapter).merge_and_unload().state_dict()
    expected = merge_state_dicts(
        get_method("drm", drop_rate=0.5),
        zoo["base_sd"],
        [zoo["branches"][0], dense],
        coefficients=[1.0, 0.5],
        routing=Routing(ignore=[r"lm_head\."]),
        compute_dtype=torch.float64,
    )
    for name in expected:
        torch.testing.assert_close(merged[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_overwrite_replaces_existing_output(
    zoo: dict[str, Any],
    tmp_path: Path,
    out: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = _write_config(tmp_path, zoo, method="linear", parameters={})
    assert main([str(cfg), "-o", str(out), "--no-progress"]) == 0  # an earlier output
    first = out.stat().st_ino
    _forbid_reading(monkeypatch)  # refusing must happen before any weight is read
    assert main([str(cfg), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"output folder '{out}' already exists; pass --overwrite" in err
    assert out.stat().st_ino == first
    monkeypatch.undo()
    assert main([str(cfg), "-o", str(out), "--overwrite", "--no-progress"]) == 0
    assert out.stat().st_ino != first and (out / "model.safetensors").is_file()


def test_parse_size() -> None:
    assert parse_size("1KiB") == 1024 and parse_size("2kb") == 2000 and parse_size("3") == 3
    with pytest.raises(Exception, match="invalid size"):
        parse_size("lots")


# ----------------------------------------------------------------------------- bad inputs


def _branch_folder(zoo: dict[str, Any], name: str, edit: Any, config: Any = None) -> Path:
    """A branch saved with safetensors after ``edit(state_dict)``; config.json from the base."""
    folder = zoo["root"] / name
    if not folder.exists():
        folder.mkdir()
        sd = {k: v.clone() for k, v in zoo["branches"][0].items()}
        edit(sd)
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text((zoo["root"] / "base" / "config.json").read_text())
    return folder


def _with_branch(tmp_path: Path, zoo: dict[str, Any], folder: Path, **overrides: Any) -> Path:
    branches = [str(zoo["root"] / "branch0"), str(folder)]
    return _write_config(tmp_path, zoo, branches=branches, **overrides)


def test_missing_file_or_folder(
    zoo: dict[str, Any], tmp_path: Path, out: Path, capsys: Any
) -> None:
    missing = tmp_path / "no-such-model"
    err = _fails([str(_with_branch(tmp_path, zoo, missing)), "-o", str(out)], capsys, out)
    assert f"branches[1].path: branch not found: '{missing}'" in err
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    err = _fails([str(_with_branch(tmp_path, zoo, empty)), "-o", str(out)], capsys, out)
    assert str(empty) in err
    err = _fails([str(tmp_path / "nope.yaml"), "-o", str(out)], capsys, out)
    assert "config file not found" in err and "nope.yaml" in err


def test_branch_with_missing_and_extra_keys(
    zoo: dict[str, Any], tmp_path: Path, out: Path, capsys: Any
) -> None:
    def edit(sd: dict[str, torch.Tensor]) -> None:
        del sd["model.layers.1.mlp.up_proj.weight"]
        sd["model.layers.1.mlp.extra_proj.weight"] = torch.zeros(4, 4)

    folder = _branch_folder(zoo, "keys", edit)
    err = _fails([str(_with_branch(tmp_path, zoo, folder)), "-o", str(out)], capsys, out)
    assert "branch 1" in err and str(folder) in err
    assert "missing 1 key(s) of the base: model.layers.1.mlp.up_proj.weight" in err
    assert "1 key(s) not in the base: model.layers.1.mlp.extra_proj.weight" in err


def test_shape_mismatch_lists_every_key_and_shape(
    zoo: dict[str, Any], tmp_path: Path, out: Path, capsys: Any
) -> None:
    def edit(sd: dict[str, torch.Tensor]) -> None:
        sd["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(16, 32)
        sd["model.layers.1.post_attention_layernorm.weight"] = torch.ones(30)

    folder = _branch_folder(zoo, "shapes", edit)
    err = _fails([str(_with_branch(tmp_path, zoo, folder)), "-o", str(out)], capsys, out)
    assert "shape mismatch in 2 tensor(s)" in err
    assert (
        "model.layers.0.self_attn.q_proj.weight: "
        "base [32, 32], branch 0 [32, 32], branch 1 [16, 32]" in err
    )
    assert (
        "model.layers.1.post_attention_layernorm.weight: base [32], branch 0 [32], branch 1 [30]"
        in err
    )
    assert f"base = {zoo['root'] / 'base'}" in err and f"branch 1 = {folder}" in err


def test_vocab_size_mismatch(zoo: dict[str, Any], tmp_path: Path, out: Path, capsys: Any) -> None:
    def edit(sd: dict[str, torch.Tensor]) -> None:
        sd["model.embed_tokens.weight"] = torch.zeros(130, 32)
        sd["lm_head.weight"] = torch.zeros(130, 32)

    folder = _branch_folder(zoo, "vocab", edit)
    err = _fails([str(_with_branch(tmp_path, zoo, folder)), "-o", str(out)], capsys, out)
    assert (
        "model.embed_tokens.weight: base [128, 32], branch 0 [128, 32], branch 1 [130, 32]" in err
    )
    assert "vocabulary size differs" in err


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_a_branch(
    zoo: dict[str, Any], tmp_path: Path, out: Path, capsys: Any, bad: float
) -> None:
    def edit(sd: dict[str, torch.Tensor]) -> None:
        sd["model.layers.1.self_attn.o_proj.weight"][3, 5] = bad

    folder = _branch_folder(zoo, f"nonfinite-{bad}", edit)
    err = _fails(
        [str(_with_branch(tmp_path, zoo, folder)), "-o", str(out), "--no-progress"], capsys, out
    )
    assert "'model.layers.1.self_attn.o_proj.weight' in branch 1" in err and str(folder) in err
    assert ("1 NaN" if bad != bad else "1 Inf") in err


def test_non_float_tensor(zoo: dict[str, Any], tmp_path: Path, out: Path, capsys: Any) -> None:
    def edit(sd: dict[str, torch.Tensor]) -> None:
        sd["model.layers.0.mlp.gate_proj.weight"] = torch.ones(64, 32, dtype=torch.int64)

    folder = _branch_folder(zoo, "int", edit)
    err = _fails([str(_with_branch(tmp_path, zoo, folder)), "-o", str(out)], capsys, out)
    assert (
        "'model.layers.0.mlp.gate_proj.weight' in branch 1 has non-float dtype torch.int64" in err
    )
    assert f"branch 1 = {folder}" in err  # the file behind "branch 1"


def test_unsupported_dtype(zoo: dict[str, Any], tmp_path: Path, out: Path, capsys: Any) -> None:
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("torch without float8")

    def edit(sd: dict[str, torch.Tensor]) -> None:
        sd["model.layers.0.mlp.up_proj.weight"] = sd["model.layers.0.mlp.up_proj.weight"].to(
            torch.float8_e4m3fn
        )

    folder = _branch_folder(zoo, "fp8", edit)
    err = _fails([str(_with_branch(tmp_path, zoo, folder)), "-o", str(out)], capsys, out)
    assert "'model.layers.0.mlp.up_proj.weight' in branch 1" in err
    assert "unsupported dtype torch.float8_e4m3fn" in err and f"branch 1 = {folder}" in err


def test_lora_adapter_with_mismatched_base(
    zoo: dict[str, Any], tmp_path: Path, out: Path, capsys: Any
) -> None:
    peft = pytest.importorskip("peft")
    other = transformers.LlamaForCausalLM(_llama_config(hidden_size=48, num_attention_heads=4))
    lora = peft.get_peft_model(
        other, peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    )
    folder = tmp_path / "foreign-lora"
    lora.save_pretrained(folder)
    err = _fails([str(_with_branch(tmp_path, zoo, folder)), "-o", str(out)], capsys, out)
    assert str(folder) in err and "does not match the base" in err
    assert "model.layers.0.self_attn.q_proj" in err and "[48, 48]" in err and "[32, 32]" in err


def test_unknown_method_and_parameter(
    zoo: dict[str, Any], tmp_path: Path, out: Path, capsys: Any
) -> None:
    err = _fails(
        [str(_write_config(tmp_path, zoo, method="dare_tie")), "-o", str(out)], capsys, out
    )
    assert "method: unknown merge method 'dare_tie' (did you mean 'dare_ties'" in err
    cfg = _write_config(tmp_path, zoo, parameters={"drop_rte": 0.5})
    err = _fails([str(cfg), "-o", str(out)], capsys, out)
    assert (
        "parameters.drop_rte: unknown parameter for method 'drm' (did you mean 'drop_rate'?" in err
    )
    assert str(cfg) in err


@pytest.mark.parametrize("rate", [1.0, -0.2])
def test_drop_rate_outside_range(
    zoo: dict[str, Any], tmp_path: Path, out: Path, capsys: Any, rate: float
) -> None:
    err = _fails(
        [str(_write_config(tmp_path, zoo, parameters={"drop_rate": rate})), "-o", str(out)],
        capsys,
        out,
    )
    assert "parameters.drop_rate: must be" in err and str(rate) in err


def test_bad_coefficients(zoo: dict[str, Any], tmp_path: Path, out: Path, capsys: Any) -> None:
    paths = [str(zoo["root"] / f"branch{i}") for i in range(N_BRANCHES)]
    cfg = _write_config(
        tmp_path, zoo, branches=[paths[0], {"path": paths[1], "coefficient": -1.0}, paths[2]]
    )
    err = _fails([str(cfg), "-o", str(out)], capsys, out)
    assert "branches[1].coefficient: must be >= 0 (got -1.0)" in err
    cfg = _write_config(tmp_path, zoo, branches=paths, coefficients=[1.0, 0.5])
    err = _fails([str(cfg), "-o", str(out)], capsys, out)
    assert "coefficients: has 2 value(s) but there are 3 branches" in err


def test_output_inside_an_input_is_refused(
    zoo: dict[str, Any], tmp_path: Path, capsys: Any
) -> None:
    cfg = str(_write_config(tmp_path, zoo))
    inside = zoo["root"] / "base" / "merged"
    err = _fails([cfg, "-o", str(inside), "--overwrite"], capsys, inside)
    assert f"output folder '{inside}' is inside the base input" in err
    before = sorted(p.name for p in (zoo["root"] / "branch1").iterdir())
    assert main([cfg, "-o", str(zoo["root"] / "branch1"), "--overwrite"]) == 2
    assert "contains the branches[1] input" in capsys.readouterr().err
    assert main([cfg, "-o", str(zoo["root"]), "--overwrite"]) == 2
    assert "contains the base input" in capsys.readouterr().err
    assert sorted(p.name for p in (zoo["root"] / "branch1").iterdir()) == before


def test_out_of_disk_space_leaves_nothing(
    zoo: dict[str, Any], tmp_path: Path, out: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    import drm_lightning.sources._shard_file as shard_file

    calls = []

    def full_disk(fd: int, data: Any, offset: int) -> None:
        calls.append(fd)
        os.pwrite(fd, b"partial", offset)  # a half-written shard must be cleaned up too
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shard_file, "write_at", full_disk)
    err = _fails([str(_write_config(tmp_path, zoo)), "-o", str(out), "--no-progress"], capsys, out)
    assert calls and "No space left on device" in err
    assert f"writing {out} failed" in err and "partial output was removed" in err


def test_not_enough_free_space_is_checked_first(
    zoo: dict[str, Any], tmp_path: Path, out: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    import drm_lightning.sources.writer as writer

    monkeypatch.setattr(writer.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 0))  # type: ignore[attr-defined]
    _forbid_reading(monkeypatch)
    err = _fails([str(_write_config(tmp_path, zoo)), "-o", str(out)], capsys, out)
    assert "not enough free space" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_requested_without_gpu(
    zoo: dict[str, Any], tmp_path: Path, out: Path, capsys: Any
) -> None:
    err = _fails(
        [str(_write_config(tmp_path, zoo)), "-o", str(out), "--device", "cuda"], capsys, out
    )
    assert "no CUDA device is available" in err


def test_verbose_shows_traceback(
    zoo: dict[str, Any], tmp_path: Path, out: Path, capsys: Any
) -> None:
    cfg = _write_config(tmp_path, zoo, method="nope")
    assert main([str(cfg), "-o", str(out), "--verbose"]) == 2
    assert "Traceback" in capsys.readouterr().err
