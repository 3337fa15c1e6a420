"""A model folder from a stranger is data (issue 20): no secret copied, no mixed versions, no hang.

* items 4: config / tokenizer files that link out of their folder (to a secret), FIFOs and
  broken JSON are refused when the copied files are chosen, before any weight is read;
* item 5: an input replaced or rewritten while it is merged fails naming it, with no output;
* item 8: FIFOs and devices are never opened, adapter configs that are not objects or whose
  numbers are not numbers are refused at adapter open, random bytes named ``.ckpt`` are
  not called pickles.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import save_file

from drm_lightning.cli import job as disk_job
from drm_lightning.cli.command import main
from drm_lightning.sources import (
    HFFolderWriter,
    LoraBranch,
    SafetensorsFileSource,
    StateDictSource,
    open_source,
    sha256_of,
)
from drm_lightning.sources.torch_file import load_pickled
from drm_lightning.sources.writer import side_files


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layer{i}.weight": torch.randn(8, 4, generator=g) for i in range(6)}


@pytest.fixture()
def models(tmp_path: Path) -> dict[str, Path]:
    """A base folder (weights, config, tokenizer), a safetensors branch, a .ckpt branch, a
    secret outside them all and an output folder's parent that holds nothing else."""
    root = tmp_path / "models"
    base = root / "base"
    base.mkdir(parents=True)
    save_file(_state(0), str(base / "model.safetensors"))
    (base / "config.json").write_text('{"model_type": "toy"}')
    (base / "tokenizer.json").write_text('{"who": "base"}')
    save_file(_state(1), str(root / "a.safetensors"))
    torch.save({"state_dict": _state(2)}, root / "b.ckpt")
    marker = f"SECRET-{uuid.uuid4().hex}"
    (tmp_path / "secret.txt").write_text(f"root:{marker}:19000:0:99999:7:::\n")
    (tmp_path / "outputs").mkdir()
    return {
        "root": root,
        "base": base,
        "a": root / "a.safetensors",
        "b": root / "b.ckpt",
        "secret": tmp_path / "secret.txt",
        "marker": Path(marker),
        "out": tmp_path / "outputs" / "merged",
    }


def _config(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / f"cfg-{len(list(tmp_path.glob('cfg-*')))}.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _own(tmp_path: Path, base: Path, branches: list[Path]) -> Path:
    data = {"method": "task_arithmetic", "base": str(base), "branches": [str(b) for b in branches]}
    return _config(tmp_path, data)


def _run(argv: list[Any], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    status = main([*map(str, argv), "--no-progress"])
    return status, capsys.readouterr().err


def _nowhere(marker: str, folder: Path) -> None:
    """``marker`` is in no file under ``folder``."""
    for file in folder.rglob("*"):
        if file.is_file() and not file.is_symlink():
            assert marker.encode() not in file.read_bytes(), f"the secret reached {file}"


# ------------------------------------------------------------------ 4. no secret copied


@pytest.mark.parametrize("dry_run", [False, True], ids=["merge", "dry-run"])
def test_config_json_linking_to_a_secret_is_refused(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], dry_run: bool
) -> None:
    config = models["base"] / "config.json"
    config.unlink()
    config.symlink_to(models["secret"])
    cfg = _own(tmp_path, models["base"], [models["a"]])
    status, err = _run([cfg, "-o", models["out"], *(["--dry-run"] if dry_run else [])], capsys)
    assert status == 2
    assert f"{config} is a link to {models['secret']}, outside the model folder" in err
    assert not models["out"].exists()
    assert str(models["marker"]) not in err
    _nowhere(str(models["marker"]), models["out"].parent)


def test_tokenizer_source_linking_to_a_secret_is_refused(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tok = models["root"] / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").symlink_to(models["secret"])
    data = {
        "merge_method": "task_arithmetic",
        "base_model": str(models["base"]),
        "models": [{"model": str(models["a"]), "parameters": {"weight": 1.0}}],
        "tokenizer_source": str(tok),
    }
    status, err = _run([_config(tmp_path, data), "-o", models["out"]], capsys)
    assert status == 2
    assert f"{tok / 'tokenizer.json'} is a link to {models['secret']}" in err
    assert not models["out"].exists()
    _nowhere(str(models["marker"]), models["out"].parent)


def test_tokenizer_source_files_come_through_the_writer(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tok = models["root"] / "tok"
    tok.mkdir()
    (tok / "tokenizer_config.json").write_text('{"who": "tok"}')
    data = {
        "merge_method": "task_arithmetic",
        "base_model": str(models["base"]),
        "models": [{"model": str(models["a"]), "parameters": {"weight": 1.0}}],
        "tokenizer_source": str(tok),
    }
    status, err = _run([_config(tmp_path, data), "-o", models["out"]], capsys)
    assert status == 0, err
    names = sorted(p.name for p in models["out"].iterdir())
    assert names == [
        "README.md",
        "config.json",
        "mergekit_config.yml",  # the config itself, as mergekit-yaml's output has it
        "model.safetensors",
        "tokenizer_config.json",
    ]
    assert json.loads((models["out"] / "tokenizer_config.json").read_text()) == {"who": "tok"}


def test_links_inside_the_folder_are_followed(tmp_path: Path) -> None:
    folder = tmp_path / "base"
    (folder / "configs").mkdir(parents=True)
    (folder / "configs" / "real.json").write_text('{"model_type": "toy"}')
    (folder / "config.json").symlink_to("configs/real.json")
    cache = tmp_path / "hub" / "models--org--name"  # a Hugging Face cache snapshot
    (cache / "blobs").mkdir(parents=True)
    (cache / "snapshots" / "abc").mkdir(parents=True)
    (cache / "blobs" / "1234").write_text('{"v": 1}')
    (cache / "snapshots" / "abc" / "tokenizer.json").symlink_to("../../blobs/1234")
    assert list(side_files(folder)) == ["config.json"]
    assert list(side_files(cache / "snapshots" / "abc")) == ["tokenizer.json"]
    out = tmp_path / "out"
    with HFFolderWriter(out, copy_from=folder) as w:
        w.add("w", torch.ones(2))
    assert json.loads((out / "config.json").read_text()) == {"model_type": "toy"}
    assert not (out / "config.json").is_symlink()


@pytest.mark.parametrize("kind", ["outside", "fifo", "bad-json", "dangling"])
def test_writer_refuses_bad_side_files_at_construction(
    tmp_path: Path, models: dict[str, Path], kind: str
) -> None:
    folder = tmp_path / "base"
    folder.mkdir()
    file = folder / ("vocab.txt" if kind == "fifo" else "config.json")
    if kind == "outside":
        file.symlink_to(models["secret"])
    elif kind == "fifo":
        os.mkfifo(file)
    elif kind == "bad-json":
        file.write_text('{"model_type": ')
    else:
        file.symlink_to(folder / "gone.json")
    expected = {
        "outside": "outside the model folder",
        "fifo": r"vocab.txt is not a regular file \(a FIFO\)",
        "bad-json": "config.json is not valid JSON",
        "dangling": "config.json is a link to .*gone.json', which does not exist",
    }[kind]
    with pytest.raises((ValueError, FileNotFoundError), match=expected):
        HFFolderWriter(tmp_path / "out", copy_from=folder)
    assert not (tmp_path / "out").exists()


def test_a_side_file_replaced_after_it_was_chosen_is_not_copied(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    out = tmp_path / "out"
    changed = pytest.raises(ValueError, match="config.json changed while it was being merged")
    with changed, HFFolderWriter(out, copy_from=folder) as w:
        w.add("w", torch.ones(2))
        (folder / "new.json").symlink_to(models["secret"])
        os.replace(folder / "new.json", folder / "config.json")
    assert not out.exists()
    _nowhere(str(models["marker"]), tmp_path / "models")


# ------------------------------------------------------------------ 5. inputs changed mid-merge


def _replace(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Write a new version next to ``path`` and rename it over (how tools save)."""
    tmp = path.with_name(path.name + ".new")
    if path.suffix == ".ckpt":
        torch.save({"state_dict": state}, tmp)
    else:
        save_file(state, str(tmp))
    os.replace(tmp, path)


def _rewrite_in_place(path: Path) -> None:
    """Overwrite the last tensor bytes of ``path`` (same size, same inode)."""
    with open(path, "r+b") as f:
        f.seek(-64, os.SEEK_END)
        f.write(os.urandom(64))


@pytest.mark.parametrize(
    ("branch", "how"),
    [("a", "replace"), ("a", "rewrite"), ("b", "replace"), ("base", "replace")],
)
def test_input_changed_after_the_plan_fails_with_no_output(
    models: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    branch: str,
    how: str,
) -> None:
    victim = models["base"] / "model.safetensors" if branch == "base" else models[branch]
    real_iter_merge = disk_job.iter_merge

    def change_then_merge(*args: Any, **kwargs: Any) -> Any:
        if how == "replace":
            _replace(victim, _state(7))
        else:
            _rewrite_in_place(victim)
        yield from real_iter_merge(*args, **kwargs)

    monkeypatch.setattr(disk_job, "iter_merge", change_then_merge)
    cfg = _own(tmp_path, models["base"], [models["a"], models["b"]])
    status, err = _run([cfg, "-o", models["out"]], capsys)
    assert status == 2, err
    assert f"{victim} changed while it was being merged (replaced or rewritten)" in err
    assert not models["out"].exists()
    assert list(models["out"].parent.iterdir()) == []


def test_a_replaced_file_fails_here_and_in_a_copy_in_another_process(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file(_state(0), str(path))
    source = SafetensorsFileSource(path)
    copy = pickle.loads(pickle.dumps(source))  # what a forked or spawned worker gets
    _replace(path, _state(1))
    for call in (
        source.check_unchanged,
        lambda: source.get("layer0.weight"),  # from the descriptor held since the header
        lambda: copy.get_rows("layer0.weight", 0, 2),  # opens its own: must be that file
    ):
        with pytest.raises(ValueError, match="m.safetensors changed while it was being merged"):
            call()


def test_rewritten_file_fails_every_read_path(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file(_state(0), str(path))
    source = SafetensorsFileSource(path)
    _rewrite_in_place(path)
    for read in (
        lambda: source.get("layer5.weight"),
        lambda: source.get_rows("layer0.weight", 0, 1),
        lambda: source.prefetch(["layer1.weight"]),
    ):
        with pytest.raises(ValueError, match="changed while it was being merged"):
            read()


# ------------------------------------------------------------------ 8. FIFOs, devices, bad JSON


@pytest.mark.timeout(60)
@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "merge"])
def test_fifo_branch_is_refused_without_being_opened(
    models: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    suffix: str,
    dry_run: bool,
) -> None:
    fifo = models["root"] / f"pipe{suffix}"
    os.mkfifo(fifo)
    cfg = _own(tmp_path, models["base"], [fifo])
    status, err = _run([cfg, "-o", models["out"], *(["--dry-run"] if dry_run else [])], capsys)
    assert status == 2
    assert f"{fifo} is not a regular file (a FIFO)" in err
    assert not models["out"].exists()


@pytest.mark.timeout(60)
def test_link_to_a_device_as_branch_is_refused(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    link = models["root"] / "random.safetensors"
    link.symlink_to("/dev/urandom")
    cfg = _own(tmp_path, models["base"], [link])
    status, err = _run([cfg, "-o", models["out"], "--dry-run"], capsys)
    assert status == 2
    assert f"{link} is not a regular file (a link to /dev/urandom, a character device)" in err


def _adapter(folder: Path, config: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(
        config if isinstance(config, str) else json.dumps(config)
    )
    g = torch.Generator().manual_seed(0)
    save_file(
        {
            "base_model.model.layer0.lora_A.weight": torch.randn(2, 4, generator=g),
            "base_model.model.layer0.lora_B.weight": torch.randn(8, 2, generator=g),
        },
        str(folder / "adapter_model.safetensors"),
    )
    return folder


_LORA = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["layer0"]}


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ("[1, 2]", r"expected a JSON object \(.*\), got a list"),
        ('"LORA"', r"expected a JSON object \(.*\), got a string"),
        ({**_LORA, "lora_alpha": float("nan")}, r"lora_alpha must be a finite number.*got nan"),
        ({**_LORA, "lora_alpha": "16"}, "lora_alpha must be a finite number.*got '16'"),
        ({**_LORA, "lora_alpha": True}, "lora_alpha must be a finite number.*got True"),
        ({**_LORA, "r": 0}, "r must be a positive integer.*got 0"),
        ({**_LORA, "r": -2}, "r must be a positive integer.*got -2"),
        ({**_LORA, "r": "2"}, "r must be a positive integer.*got '2'"),
        ({**_LORA, "alpha_pattern": {"layer0": float("inf")}}, r"alpha_pattern\['layer0'\]"),
        ({**_LORA, "rank_pattern": {"layer0": 0}}, r"rank_pattern\['layer0'\] must be"),
        ({**_LORA, "rank_pattern": [2]}, "rank_pattern must be an object"),
    ],
)
def test_bad_adapter_config_is_refused_at_adapter_open(
    tmp_path: Path, config: Any, expected: str
) -> None:
    folder = _adapter(tmp_path / "adapter", config)
    with pytest.raises(ValueError, match=f"{folder / 'adapter_config.json'}: {expected}"):
        LoraBranch(folder, StateDictSource(_state(0)))


def test_nan_lora_alpha_is_refused_by_the_cli_dry_run(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _adapter(models["root"] / "adapter", {**_LORA, "lora_alpha": float("nan")})
    cfg = _own(tmp_path, models["base"], [folder])
    status, err = _run([cfg, "-o", models["out"], "--dry-run"], capsys)
    assert status == 2
    assert "adapter_config.json: lora_alpha must be a finite number" in err


@pytest.mark.parametrize("first", [b"\x80", b"P", b"\x00"])
def test_random_bytes_ckpt_is_not_called_a_pickle(tmp_path: Path, first: bytes) -> None:
    path = tmp_path / "noise.ckpt"
    rng = random.Random(first[0])
    path.write_bytes(first + bytes(rng.getrandbits(8) for _ in range(4095)))
    with pytest.raises(ValueError, match="noise.ckpt is not a readable torch checkpoint") as err:
        open_source(path)
    assert "--trust-pickles" not in str(err.value)
    assert "Weights only load failed" not in str(err.value)


def test_a_real_pickle_asking_for_more_still_names_the_opt_in(tmp_path: Path) -> None:
    path = tmp_path / "protocol4.pt"
    torch.save({"w": torch.ones(2)}, path, pickle_protocol=4)  # a pickle weights-only refuses
    with pytest.raises(ValueError, match="--trust-pickles"):
        load_pickled(path)
    assert torch.equal(load_pickled(path, trust_pickles=True)["w"], torch.ones(2))


@pytest.mark.timeout(60)
def test_hashing_for_the_card_never_opens_a_fifo(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.bin")
    with pytest.raises(ValueError, match=r"pipe.bin is not a regular file \(a FIFO\)"):
        sha256_of(tmp_path / "pipe.bin")
