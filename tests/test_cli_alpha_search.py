"""``drm-merge`` with ``alpha_search:``: merge once, score each α with the user's command.

The validation command is a small script written here: it scores the model folder it is given
by minus the squared distance of its tensors to a target built as base + 0.3·(merged − base)
in float64, so the best α of every grid holding 0.3 is 0.3. Each call appends to a ``RAN`` file
beside the script (the marker that proves, where the command must not run, that it never did).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from drm_lightning.cli.command import main
from drm_lightning.config.alpha_search import DEFAULT_ALPHA_GRID

REPO = Path(__file__).resolve().parents[1]
COEFFICIENTS = (1.0, 0.7)
NAMES = ("layer.weight", "layer.bias", "head.weight")  # head.weight: routing ignore

SCRIPT = r"""
import hashlib, json, os, signal, sys, time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

model, scores = Path(sys.argv[1]), Path(sys.argv[2])
here = Path(__file__).parent
mode = (here / "mode.txt").read_text().strip() if (here / "mode.txt").exists() else "ok"
tensors = load_file(str(model / "model.safetensors"))
digest = hashlib.sha256(b"".join(tensors[k].tobytes() for k in sorted(tensors))).hexdigest()
with open(here / "RAN", "a") as log:
    log.write(json.dumps({"model": str(model), "sha256": digest}) + "\n")
target = load_file(str(here / "target.safetensors"))
dist = {k: float(((tensors[k].astype(np.float64) - target[k]) ** 2).sum()) for k in target}
sign = 1.0 if mode == "losses" else -1.0
result = {"weight": sign * dist["layer.weight"], "bias": sign * dist["layer.bias"]}
if mode == "vary" and len((here / "RAN").read_text().splitlines()) > 1:
    result["other"] = result.pop("bias")
if mode == "exit":
    print("evaluating ...")
    print("CUDA out of memory (pretend)")
    sys.exit(3)
if mode == "sigint":  # Ctrl-C in the terminal: the parent gets SIGINT while this runs
    os.kill(os.getppid(), signal.SIGINT)
    time.sleep(60)
text = {
    "bad_json": "{not json",
    "list": "[1, 2]",
    "nan": '{"weight": NaN}',
    "string": '{"weight": "high"}',
}.get(mode, json.dumps(result))
if mode != "no_file":
    scores.write_text(text)
"""


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Base and two fine-tunes as safetensors folders, the merge in float64, the script."""
    root = tmp_path_factory.mktemp("alpha")
    g = torch.Generator().manual_seed(0)
    shapes = {"layer.weight": (8, 6), "layer.bias": (8,), "head.weight": (4, 8)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    branches = [
        {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        for _ in COEFFICIENTS
    ]
    for name, sd in [("base", base), ("a", branches[0]), ("b", branches[1])]:
        (root / name).mkdir()
        save_file(sd, root / name / "model.safetensors")
    merged = {  # task arithmetic (scaling 1), float64; head.weight is ignored: the base
        k: v.double()
        + (0 if k == "head.weight" else 1)
        * sum(c * (b[k].double() - v.double()) for c, b in zip(COEFFICIENTS, branches, strict=True))
        for k, v in base.items()
    }
    target = {k: base[k].double() + 0.3 * (merged[k] - base[k].double()) for k in base}
    scripts = root / "scripts"
    scripts.mkdir()
    (scripts / "score.py").write_text(SCRIPT)
    save_file(target, scripts / "target.safetensors")
    return {"root": root, "base": base, "merged": merged, "script": scripts / "score.py"}


@pytest.fixture()
def script(zoo: dict[str, Any], tmp_path: Path) -> Path:
    """The scoring script in a folder of this test's own (its RAN log and mode file)."""
    folder = tmp_path / "scoring"
    folder.mkdir()
    (folder / "score.py").write_text(zoo["script"].read_text())
    (folder / "target.safetensors").write_bytes(
        (zoo["script"].parent / "target.safetensors").read_bytes()
    )
    return folder / "score.py"


@pytest.fixture()
def out(tmp_path: Path) -> Path:
    (tmp_path / "outs").mkdir()
    return tmp_path / "outs" / "merged"


def _config(tmp_path: Path, zoo: dict[str, Any], script: Path, **search: Any) -> Path:
    section = {"command": f"{sys.executable} {script} {{model}} {{scores}}", **search}
    data = {
        "method": "task_arithmetic",
        "base": str(zoo["root"] / "base"),
        "branches": [
            {"path": str(zoo["root"] / name), "coefficient": c}
            for name, c in zip("ab", COEFFICIENTS, strict=True)
        ],
        "routing": {"ignore": [r"head\."]},
        "alpha_search": section,
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _calls(script: Path) -> list[dict[str, str]]:
    log = script.parent / "RAN"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str], out: Path) -> str:
    """Status 2, one message, and nothing beside ``out`` changed (no output, no temp folder)."""
    before = sorted(out.parent.iterdir())
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "drm-merge: error: " in err and "Traceback" not in err, err
    assert sorted(out.parent.iterdir()) == before, "a failing run left files beside OUT"
    return err


def _line_of(path: Path, key: str) -> int:
    """The line of ``key``'s value (the next line for a block list)."""
    lines = path.read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if line.strip().startswith(key))
    return i + (2 if lines[i].rstrip().endswith(":") else 1)


# ------------------------------------------------------------------------------ the search


def test_search_keeps_the_best_alpha_and_writes_it(
    zoo: dict[str, Any], tmp_path: Path, script: Path, out: Path, capsys: Any
) -> None:
    cfg = _config(tmp_path, zoo, script)
    assert main([str(cfg), "-o", str(out), "--trust-code", "--no-progress"]) == 0
    text = capsys.readouterr().out
    # every α of the default grid scored once, each on its own folder, removed afterwards
    calls = _calls(script)
    assert len(calls) == len(DEFAULT_ALPHA_GRID)
    assert len({c["model"] for c in calls}) == len(calls)
    assert not any(Path(c["model"]).exists() for c in calls)
    assert sorted(out.parent.iterdir()) == [out]  # no temporary folder left
    # the output is base + 0.3·(merged − base), in float64 terms; the ignored tensor the base
    written = load_file(out / "model.safetensors")
    for name in NAMES:
        base = zoo["base"][name].double()
        expected = base + 0.3 * (zoo["merged"][name] - base)
        torch.testing.assert_close(written[name].double(), expected, rtol=0, atol=1e-6)
    assert torch.equal(written["head.weight"], zoo["base"]["head.weight"])
    # bit for bit the folder that was scored at α = 0.3 (the 3rd of the grid)
    digest = hashlib.sha256(b"".join(written[k].numpy().tobytes() for k in sorted(written)))
    assert calls[DEFAULT_ALPHA_GRID.index(0.3)]["sha256"] == digest.hexdigest()
    # the model card records α and every α's scores; the table marks the kept one
    card = (out / "README.md").read_text()
    settings = json.loads(card.split("## Other settings")[1].split("```json")[1].split("```")[0])
    assert settings["alpha"] == 0.3
    scores = settings["alpha_search"]["scores"]
    assert list(scores) == [repr(a) for a in DEFAULT_ALPHA_GRID]
    assert max(scores, key=lambda a: scores[a]["average"]) == "0.3"
    assert set(scores["0.3"]) == {"weight", "bias", "average"}
    assert settings["alpha_search"]["command"].endswith("{model} {scores}")
    assert "α = 0.3 kept (highest average of 10" in text
    assert any(line.split()[:2] == ["*", "0.3"] for line in text.splitlines()), text


def test_losses_keep_the_lowest_average_on_the_users_grid(
    zoo: dict[str, Any], tmp_path: Path, script: Path, out: Path, capsys: Any
) -> None:
    (script.parent / "mode.txt").write_text("losses")
    cfg = _config(tmp_path, zoo, script, grid=[0.5, 0.3, 2], higher_is_better=False)
    assert main([str(cfg), "-o", str(out), "--trust-code", "--no-progress"]) == 0
    assert len(_calls(script)) == 3
    assert "α = 0.3 kept (lowest average of 3" in capsys.readouterr().out
    card = (out / "README.md").read_text()
    assert '"alpha": 0.3' in card and '"higher_is_better": false' in card


def test_failing_command_over_an_earlier_output_leaves_it_as_it_was(
    zoo: dict[str, Any], tmp_path: Path, script: Path, out: Path, capsys: Any
) -> None:
    cfg = _config(tmp_path, zoo, script, grid=[0.3])
    assert main([str(cfg), "-o", str(out), "--trust-code", "--no-progress"]) == 0
    earlier = {p.name: p.read_bytes() for p in out.iterdir()}
    (script.parent / "mode.txt").write_text("exit")
    argv = [str(cfg), "-o", str(out), "--trust-code", "--no-progress", "--overwrite"]
    err = _fails(argv, capsys, out)
    assert "alpha_search.command failed at α=0.3 (exit status 3)" in err
    assert "CUDA out of memory (pretend)" in err  # the command's own output, its tail
    assert {p.name: p.read_bytes() for p in out.iterdir()} == earlier


# ------------------------------------------------------------------------------ refusals


def test_command_refused_without_trust_code_and_never_run(
    zoo: dict[str, Any], tmp_path: Path, script: Path, out: Path, capsys: Any
) -> None:
    cfg = _config(tmp_path, zoo, script)
    line = _line_of(cfg, "command:")
    for extra in ([], ["--dry-run"]):
        err = _fails([str(cfg), "-o", str(out), *extra], capsys, out)
        assert f"cfg.yaml: line {line}: alpha_search.command: " in err
        assert "is a validation command: running it runs code, which a config file cannot" in err
        assert "pass --trust-code on the command line to run it" in err
    assert not (script.parent / "RAN").exists()


def test_dry_run_shows_the_grid_and_command_and_runs_nothing(
    zoo: dict[str, Any], tmp_path: Path, script: Path, out: Path, capsys: Any
) -> None:
    cfg = _config(tmp_path, zoo, script, grid=[0.25, 0.5, 1])
    assert main([str(cfg), "-o", str(out), "--dry-run", "--trust-code"]) == 0
    text = capsys.readouterr().out
    assert "α search (alpha_search): 3 values of α: 0.25, 0.5, 1;" in text
    assert f"command (not run: a dry run runs nothing): {sys.executable} {script}" in text
    assert not out.exists() and not (script.parent / "RAN").exists()
    assert sorted(out.parent.iterdir()) == []


@pytest.mark.parametrize(
    "search, field, message",
    [
        ({"grid": [0.5, 0, -1]}, "grid", "grid values must be finite numbers > 0; invalid: 0, -1"),
        ({"grid": "best"}, "grid", "grid='best': give a list of numbers > 0, or 'default'"),
        ({"grid": []}, "grid", "grid is empty: give at least one α > 0"),
        ({"grid": [0.5, 0.5]}, "grid", "grid repeats 0.5"),
        ({"higher_is_better": "yes"}, "higher_is_better", "Input should be a valid boolean"),
        ({"tasks": {}}, "tasks", "unknown key (valid: command, grid, higher_is_better)"),
        ({"command": "python eval.py {model}"}, "command", "has no {scores}: {model} is the"),
        ({"command": "python eval.py {modle} {scores}"}, "command", "unknown placeholder {modle}"),
        ({"command": "python 'eval.py {model} {scores}"}, "command", "cannot be split"),
        (
            {"command": "no-such-evaluator {model} {scores}"},
            "command",
            "cannot run 'no-such-evaluator': not found",
        ),
        ({"command": None}, "command", "required: the validation command"),
    ],
)
def test_bad_section_fields_are_refused_with_their_line(
    zoo: dict[str, Any],
    tmp_path: Path,
    script: Path,
    out: Path,
    capsys: Any,
    search: dict[str, Any],
    field: str,
    message: str,
) -> None:
    cfg = _config(tmp_path, zoo, script, **search)
    line = _line_of(cfg, f"{field}:")
    err = _fails([str(cfg), "-o", str(out), "--trust-code"], capsys, out)
    assert f"cfg.yaml: line {line}: alpha_search.{field}: {message}" in err, err
    assert not (script.parent / "RAN").exists()


def test_scaling_other_than_one_is_refused(
    zoo: dict[str, Any], tmp_path: Path, script: Path, out: Path, capsys: Any
) -> None:
    cfg = _config(tmp_path, zoo, script)
    data = yaml.safe_load(cfg.read_text())
    cfg.write_text(yaml.safe_dump({**data, "parameters": {"scaling": 0.5}}, sort_keys=False))
    err = _fails([str(cfg), "-o", str(out), "--trust-code"], capsys, out)
    assert (
        f"line {_line_of(cfg, 'scaling:')}: parameters.scaling: alpha_search searches the scale of "
        "the merged delta, which for 'task_arithmetic' is its scaling parameter; leave scaling at "
        "1.0 (got 0.5) or drop alpha_search"
    ) in err
    assert not (script.parent / "RAN").exists()


def test_refused_for_a_rank_parallel_plan(
    zoo: dict[str, Any], tmp_path: Path, script: Path, out: Path, capsys: Any
) -> None:
    cfg = _config(tmp_path, zoo, script)
    err = _fails(
        [str(cfg), "-o", str(out), "--trust-code", "--dry-run", "--ranks", "2"], capsys, out
    )
    assert "alpha_search: not supported under torchrun" in err


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_refused_under_torchrun_on_every_rank(
    zoo: dict[str, Any], tmp_path: Path, script: Path, out: Path
) -> None:
    cfg = _config(tmp_path, zoo, script)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    env.pop("WORLD_SIZE", None)
    run = subprocess.run(
        [
            *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"),
            *("--standalone", "-m", "drm_lightning.cli", str(cfg), "-o", str(out)),
            *("--trust-code", "--no-progress"),
        ],
        capture_output=True,
        text=True,
        timeout=150,
        env=env,
        cwd=REPO,
    )
    text = run.stdout + run.stderr
    assert run.returncode != 0
    for rank in (0, 1):
        assert (
            f"drm-merge [rank {rank}/2]: error: alpha_search: not supported under torchrun" in text
        )
    assert sorted(out.parent.iterdir()) == [] and not (script.parent / "RAN").exists()


# ------------------------------------------------------------------------------ failures


@pytest.mark.parametrize(
    "mode, message",
    [
        ("exit", "alpha_search.command failed at α=0.1 (exit status 3): "),
        ("no_file", "exited with status 0 at α=0.1 but wrote no scores file"),
        (
            "bad_json",
            "the scores file of α=0.1 (.../scores-0.1.json), written by alpha_search.command: "
            "is not valid JSON",
        ),
        ("list", "must be a JSON object {task: score} with at least one task, got a JSON list"),
        ("nan", "task 'weight': the score must be a finite number, got nan"),
        ("string", "task 'weight': the score must be a finite number, got 'high'"),
    ],
)
def test_failing_command_fails_cleanly(
    zoo: dict[str, Any],
    tmp_path: Path,
    script: Path,
    out: Path,
    capsys: Any,
    mode: str,
    message: str,
) -> None:
    (script.parent / "mode.txt").write_text(mode)
    cfg = _config(tmp_path, zoo, script)
    err = _fails([str(cfg), "-o", str(out), "--trust-code", "--no-progress"], capsys, out)
    head, _, tail = message.partition("...")
    assert head in err and tail in err, err
    assert len(_calls(script)) == 1  # stopped at the first α
    assert not Path(_calls(script)[0]["model"]).exists()


def test_tasks_that_change_between_alphas_are_refused(
    zoo: dict[str, Any], tmp_path: Path, script: Path, out: Path, capsys: Any
) -> None:
    (script.parent / "mode.txt").write_text("vary")
    cfg = _config(tmp_path, zoo, script)
    err = _fails([str(cfg), "-o", str(out), "--trust-code", "--no-progress"], capsys, out)
    assert (
        "alpha_search.command scored tasks ['other', 'weight'] at α=0.2 but ['bias', 'weight'] "
        "at α=0.1; it must score the same tasks at every α"
    ) in err
    assert len(_calls(script)) == 2


def test_ctrl_c_during_the_command_removes_every_temporary_folder(
    zoo: dict[str, Any], tmp_path: Path, script: Path, out: Path, capsys: Any
) -> None:
    (script.parent / "mode.txt").write_text("sigint")
    cfg = _config(tmp_path, zoo, script)
    assert main([str(cfg), "-o", str(out), "--trust-code", "--no-progress"]) == 130
    assert "drm-merge: interrupted; nothing was written" in capsys.readouterr().err
    assert sorted(out.parent.iterdir()) == []
    assert os.getpid() > 0 and len(_calls(script)) == 1
