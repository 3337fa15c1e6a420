"""``drm-merge`` under ``torchrun``: 2 CPU ranks (gloo) against the single-process CLI.

Each multi-process test launches ``python -m torch.distributed.run --nproc_per_node 2 -m
drm_lightning.cli ...`` as a subprocess with one thread per rank and a hang timeout. The
schedule, the per-rank dry-run table and the device choice are checked in process.
"""

from __future__ import annotations

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

from drm_lightning.cli import command as cli
from drm_lightning.cli.command import main

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
N_BRANCHES = 3


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama base and three fine-tunes (one sharded into several files)."""
    root = tmp_path_factory.mktemp("zoo")
    config = tiny_llama_config()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    base_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.save_pretrained(root / "base", safe_serialization=True)
    for i in range(N_BRANCHES):
        g = torch.Generator().manual_seed(10 + i)
        model.load_state_dict(
            {k: v + 0.02 * (i + 1) * torch.randn(v.shape, generator=g) for k, v in base_sd.items()}
        )
        kwargs = {"max_shard_size": "40KB"} if i == 1 else {}
        model.save_pretrained(root / f"branch{i}", safe_serialization=True, **kwargs)
    return root


def _config(
    root: Path, tmp_path: Path, method: str, parameters: dict[str, Any], **extra: Any
) -> Path:
    data: dict[str, Any] = {
        "method": method,
        "base": str(root / "base"),
        "branches": [
            {"path": str(extra.pop("branch0", root / "branch0")), "coefficient": 1.0},
            {"path": str(root / "branch1"), "coefficient": 0.5},
            str(root / "branch2"),
        ],
        "parameters": parameters,
        **extra,
    }
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _torchrun(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    env.pop("WORLD_SIZE", None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",
        "-m",
        "drm_lightning.cli",
        *args,
        "--no-progress",
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def _rank_exit_codes(text: str) -> list[int]:
    """Exit codes of the ranks from torchrun's failure summary (both ranks, by rank)."""
    import re

    found = re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)", text)
    return [code for _, code in sorted((int(r), int(c)) for r, c in found)]


def _read(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


@pytest.mark.distributed
@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("method", "parameters", "extra", "pieces"),
    [
        ("drm", {"drop_rate": 0.5}, {}, []),
        # Tensors of more than 64 entries across branches merged in row pieces (issue 13).
        ("ties", {"density": 0.5}, {"out_dtype": "bfloat16"}, ["--piece-size", "64"]),
    ],
)
def test_two_ranks_equal_single_process(
    zoo: Path,
    tmp_path: Path,
    method: str,
    parameters: dict[str, Any],
    extra: dict[str, Any],
    pieces: list[str],
) -> None:
    cfg = _config(zoo, tmp_path, method, parameters, **extra)
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert (
        main([str(cfg), "-o", str(single), "--no-progress", "--max-shard-size", "30KB", *pieces])
        == 0
    )
    run = _torchrun(
        str(cfg), "-o", str(multi), "--max-shard-size", "30KB", "--max-pending", "3", *pieces
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "drm-merge: wrote" in run.stdout and "2 ranks" in run.stdout
    # Same files (shards cut at the same tensors), same tensors bit for bit.
    assert sorted(p.name for p in multi.iterdir()) == sorted(p.name for p in single.iterdir())
    assert len(list(multi.glob("*.safetensors"))) > 1
    assert (multi / "model.safetensors.index.json").read_text() == (
        single / "model.safetensors.index.json"
    ).read_text()
    for shard in sorted(single.glob("*.safetensors")):  # shard by shard: same keys, same bits
        expected, got = load_file(shard), load_file(multi / shard.name)
        assert sorted(got) == sorted(expected), shard.name
        for name, value in expected.items():
            assert got[name].dtype == value.dtype and torch.equal(got[name], value), name
    assert not list(tmp_path.glob("multi.tmp-*"))
    if pieces:  # and the pieces equal the whole-tensor merge (float32 maths, bf16 output)
        whole = tmp_path / "whole"
        assert main([str(cfg), "-o", str(whole), "--no-progress", "--piece-size", "0"]) == 0
        merged_whole, merged_pieces = _read(whole), _read(single)
        for name, value in merged_whole.items():
            diff = (value.double() - merged_pieces[name].double()).abs().max()
            assert float(diff) <= 1e-2 * float(value.double().abs().max()), name


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_bad_branch_path_fails_on_every_rank(zoo: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    cfg = _config(zoo, tmp_path, "drm", {"drop_rate": 0.5}, branch0=missing)
    out = tmp_path / "out"
    run = _torchrun(str(cfg), "-o", str(out))
    assert run.returncode != 0
    text = run.stdout + run.stderr
    for rank in (0, 1):
        assert f"drm-merge [rank {rank}/2]: error:" in text, text
        assert f"branch not found: '{missing}'" in text
    assert _rank_exit_codes(text) == [2, 2], text
    assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_rank_failing_mid_merge_stops_every_rank(zoo: Path, tmp_path: Path) -> None:
    """A NaN in a tensor that rank 1 merges: every rank raises the same error, nothing written."""
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in (zoo / "branch0").iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    tensors = load_file(bad / "model.safetensors")
    cfg = _config(zoo, tmp_path, "drm", {"drop_rate": 0.5}, branch0=bad)
    job = cli.open_job(cli.load_config(cfg))
    schedule = cli.stream_schedule(job, 2)
    victim = next(job.plan[p].name for p, owner in enumerate(schedule.owners) if owner == 1)
    tensors[victim][0, 0] = float("nan")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    run = _torchrun(str(cfg), "-o", str(out))
    assert run.returncode != 0
    text = run.stdout + run.stderr
    assert _rank_exit_codes(text) == [2, 2], text
    message = "distributed merge failed on rank 1 during merging"
    for rank in (0, 1):
        tag = f"drm-merge [rank {rank}/2]: error:"
        line = next(line for line in text.splitlines() if tag in line)
        assert message in line and victim in line and "NaN" in line, text
    assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))


# ------------------------------------------------------------------------------ in process


def test_dry_run_prints_per_rank_plan(zoo: Path, tmp_path: Path, capsys: Any) -> None:
    cfg = _config(zoo, tmp_path, "drm", {"drop_rate": 0.5})
    out = tmp_path / "out"
    assert main([str(cfg), "-o", str(out), "--dry-run", "--ranks", "2"]) == 0
    text = capsys.readouterr().out
    assert "2 ranks (torchrun)" in text and "to rank 0 MiB" in text
    assert "schedule: 2 chunk(s) of at most 16 tensors" in text and "speed-up" in text
    assert not out.exists()


def test_schedule_is_bounded_ordered_balanced_and_complete(zoo: Path, tmp_path: Path) -> None:
    job = cli.open_job(cli.load_config(_config(zoo, tmp_path, "drm", {"drop_rate": 0.5})))
    for world in (1, 2, 3, 5, 40):
        for window in (1, 2, 7, None):
            s = cli.stream_schedule(job, world, window)
            merged = [p for chunk in s.chunks for p in chunk]
            assert merged == [p for p, o in enumerate(s.owners) if o != -1]  # base order
            assert all(0 < len(chunk) <= s.max_pending for chunk in s.chunks)
            assert all(0 <= s.owners[p] < world for p in merged)
            assert s.fingerprint() == cli.stream_schedule(job, world, window).fingerprint()
    s = cli.stream_schedule(job, 2)
    costs = s.rank_costs()
    assert max(costs) / (sum(costs) / 2) < 1.1 and s.critical_cost() < 0.6 * sum(costs)


def test_cuda_device_is_chosen_per_local_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    """No GPU here: the device choice is checked with a faked CUDA runtime."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert cli.resolve_device("cuda", 3) == torch.device("cuda", 1)
    assert cli.resolve_device("cuda") == torch.device("cuda")
    assert cli.resolve_device("cpu", 3) == torch.device("cpu")


def test_on_device_wrapper_moves_reads(zoo: Path) -> None:
    """The wrapper the GPU path reads through, exercised with the CPU as the target device."""
    from drm_lightning.sources import open_source

    source = open_source(zoo / "base")
    from drm_lightning.sources.on_device import OnDevice

    wrapped = OnDevice(source, torch.device("cpu"))
    name = source.keys()[0]
    assert torch.equal(wrapped.get(name), source.get(name)) and wrapped.keys() == source.keys()


def test_ranks_needs_dry_run(zoo: Path, tmp_path: Path, capsys: Any) -> None:
    cfg = _config(zoo, tmp_path, "drm", {"drop_rate": 0.5})
    with pytest.raises(SystemExit) as exc:
        main([str(cfg), "-o", str(tmp_path / "out"), "--ranks", "2"])
    assert exc.value.code == 2 and "--ranks only applies with --dry-run" in capsys.readouterr().err


def test_world_size_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert cli.launched_world_size() == 4
    monkeypatch.setenv("WORLD_SIZE", "junk")
    assert cli.launched_world_size() == 1
    monkeypatch.delenv("WORLD_SIZE")
    assert cli.launched_world_size() == 1
