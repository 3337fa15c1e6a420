"""Issue 23 items 6 and 7: what the wheel ships and declares, and what drm-merge prints.

* item 6: the wheel holds the example configs (``drm-merge --example NAME``) and declares the
  ``[accelerate]`` and ``[lightning]`` extras (LightningCLI's ``jsonargparse[signatures]``
  included); ``[test]`` pulls in every extra, so the CI's fresh venv installs each of them;
  ``--help`` lists the merge and alignment methods.
* item 7: ``TaskSpec(name=...)`` names the logged metric; ``heads.safetensors`` gets the mode
  of ``model.safetensors``; the dry run prints fused-QKV routing and every parameter in force
  (``density`` 0.2 for ``method: ties``, 1.0 for ``merge_method: ties``); a merge ends with a
  summary.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from drm_lightning.alignment import available_alignments
from drm_lightning.cli.command import build_parser, example_configs, main
from drm_lightning.methods import available_methods

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------- item 6: packaging


@pytest.fixture(scope="module")
def wheel_metadata(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], str]:
    """The file names and METADATA of a wheel built offline from a copy of the sources."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(
        REPO / "drm_lightning", src / "drm_lightning", ignore=shutil.ignore_patterns("__pycache__")
    )
    run = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation"]
        + ["--no-index", "-w", "dist", "-q"],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    (wheel,) = (src / "dist").glob("drm_lightning-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        return names, zf.read(meta).decode()


def test_wheel_ships_the_example_configs(wheel_metadata: tuple[list[str], str]) -> None:
    names, _ = wheel_metadata
    shipped = {n for n in names if "/example_configs/" in n}
    folder = "drm_lightning/cli/example_configs/"
    expected = {
        folder + ("alignment/" if name == "mudsc_zip" else "") + f"{name}.yaml"
        for name in example_configs()
    }
    assert len(expected) == 9 and expected <= shipped, sorted(shipped)


def test_wheel_declares_the_extras(wheel_metadata: tuple[list[str], str]) -> None:
    meta = Parser().parsestr(wheel_metadata[1])
    extras = set(meta.get_all("Provides-Extra"))
    assert {"accelerate", "lightning", "hf", "distributed", "demo", "test"} <= extras
    requires = [r.replace(" ", "") for r in meta.get_all("Requires-Dist")]

    def of(extra: str) -> list[str]:
        return [r.split(";")[0] for r in requires if f'extra=="{extra}"' in r]

    assert "accelerate>=0.34" in of("accelerate")
    assert "jsonargparse[signatures]>=4.27" in of("lightning")
    (self_ref,) = [r for r in of("test") if r.startswith("drm_lightning[")]
    assert {"accelerate", "lightning", "hf", "distributed", "demo"} <= set(
        self_ref.removeprefix("drm_lightning[").removesuffix("]").split(",")
    )


def test_example_lists_and_prints_the_configs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--example"])
    assert done.value.code == 0
    listing = capsys.readouterr().out
    for name in ("drm", "drm-vertical", "drm-lora", "ties", "dare_ties", "linear", "mudsc_zip"):
        assert f"  {name} " in listing
    with pytest.raises(SystemExit) as done:
        main(["--example", "ties"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert text == Path(str(example_configs()["ties"])).read_text(encoding="utf-8")
    assert text.startswith("# TIES") and yaml.safe_load(text)["method"] == "ties"
    with pytest.raises(SystemExit) as done:
        main(["--example", "tie"])
    assert done.value.code == 2
    assert "--example: no example config 'tie' (did you mean 'ties'" in capsys.readouterr().err


def test_help_lists_the_methods() -> None:
    text = build_parser().format_help()
    assert "--example [NAME]" in text and "see configs/" not in text
    methods = text[text.index("merge methods") :]
    for name in available_methods() + available_alignments():
        assert name in methods


# ------------------------------------------------------------- item 7: TaskSpec metric name


def test_taskspec_names_its_metric() -> None:
    from torchmetrics.classification import MulticlassAccuracy

    from drm_lightning.evaluation.tasks import TaskSpec, evaluate_tasks, summarize_scores

    batches = [(torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 1]))]
    named = TaskSpec(batches, MulticlassAccuracy(num_classes=2), name="acc")
    assert named.metric_names == ["acc"] and named.primary_name == "acc"
    scores = evaluate_tasks(nn.Identity(), {"a": named})
    assert "merged/a/acc" in summarize_scores(scores, scores)
    default = TaskSpec(batches, MulticlassAccuracy(num_classes=2))
    assert default.metric_names == ["MulticlassAccuracy"]
    with pytest.raises(TypeError, match="TaskSpec.name names a single Metric"):
        TaskSpec(batches, {"x": MulticlassAccuracy(num_classes=2)}, name="acc")
    with pytest.raises(ValueError, match=r"TaskSpec.name='a/b': give a non-empty metric name"):
        TaskSpec(batches, MulticlassAccuracy(num_classes=2), name="a/b")


# ---------------------------------------------------------- item 7: heads.safetensors mode


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_heads_file_has_the_mode_of_the_weights(tmp_path: Path, umask: int) -> None:
    from drm_lightning.inloop.export import write_export

    model = nn.Linear(3, 2)
    provider = SimpleNamespace(
        target=lambda m: m, heads=lambda m: {"head_a.weight": torch.ones(2, 2)}
    )
    merged = {k: v.detach() for k, v in model.state_dict().items()}
    old = os.umask(umask)
    try:
        folder = write_export(tmp_path / "out", model, provider, merged, {"method": "drm"})
    finally:
        os.umask(old)
    weights = stat.S_IMODE((folder / "model.safetensors").stat().st_mode)
    heads = stat.S_IMODE((folder / "heads.safetensors").stat().st_mode)
    assert weights == 0o644 & ~umask and heads == weights


# ------------------------------------------------------- item 7: dry-run plan and summary


def _inputs(tmp_path: Path) -> dict[str, Path]:
    """A base and two fine-tunes: a fused QKV matrix, a plain matrix and a bias."""
    g = torch.Generator().manual_seed(0)
    base = {
        "attn.in_proj_weight": torch.randn(12, 4, generator=g),
        "fc.weight": torch.randn(5, 4, generator=g),
        "fc.bias": torch.randn(5, generator=g),
    }
    paths = {"base": tmp_path / "base.safetensors"}
    save_file(base, paths["base"])
    for name in ("a", "b"):
        paths[name] = tmp_path / f"{name}.safetensors"
        save_file(
            {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}, paths[name]
        )
    return paths


def _ties_config(tmp_path: Path, paths: dict[str, Path]) -> Path:
    cfg = tmp_path / "ties.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "method": "ties",
                "base": str(paths["base"]),
                "branches": [str(paths["a"]), str(paths["b"])],
                "parameters": {"scaling": 0.5},
                "routing": {"fused_qkv": [".*in_proj_weight"]},
            }
        )
    )
    return cfg


def test_dry_run_prints_fused_qkv_and_parameters_in_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = _inputs(tmp_path)
    cfg = _ties_config(tmp_path, paths)
    assert main([str(cfg), "-o", str(tmp_path / "out"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "(defaults)" not in text
    assert "density=0.2 (default)" in text and "scaling=0.5," in text
    assert "fused QKV (routing.fused_qkv): 1 matrix tensor(s) merged as 3 row blocks" in text
    assert "attn.in_proj_weight" in text.split("fused QKV", 1)[1].splitlines()[0]

    mergekit = tmp_path / "mk.yaml"
    mergekit.write_text(
        f"merge_method: ties\nbase_model: {paths['base']}\nparameters: {{weight: 1.0}}\n"
        f"models:\n  - model: {paths['a']}\n  - model: {paths['b']}\n"
    )
    assert main([str(mergekit), "-o", str(tmp_path / "out"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "density=1.0," in text and "density=1.0 (default)" not in text


def test_merge_ends_with_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = _inputs(tmp_path)
    out = tmp_path / "out"
    assert main([str(_ties_config(tmp_path, paths)), "-o", str(out), "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = lines.index(f"drm-merge: wrote {out}")
    assert lines[start + 1 : start + 3] == [
        "  method: ties, 2 branches",
        "  tensors: 2 matrix (1 fused QKV), 1 fallback, 0 ignored (kept from the base)",
    ]
    assert lines[start + 3].startswith("  time: ") and lines[start + 3].endswith(" s")
    assert lines[start + 4] == f"  model card: {out / 'README.md'}"
    assert (out / "README.md").is_file()
