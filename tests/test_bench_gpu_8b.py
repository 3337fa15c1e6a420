"""benchmarks/gpu_8b.py: the 8B-shaped GPU benchmark runs end to end on tiny shapes (CPU),
and the GPU paths it exercises use torch on the device, not CPU-only libraries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_8b.py"
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_8b


def _run(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "r.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--threads", "1", "--json", str(out), *extra],
        check=True,
        env=env,
        timeout=120,
        capture_output=True,
        text=True,
    )
    return json.loads(out.read_text())


def test_8b_shapes_are_llama_3_1_8b() -> None:
    tensors = gpu_8b.model_tensors(gpu_8b.SHAPES["8b"])
    n = sum(torch.Size(t.shape).numel() for t in tensors)
    assert n == 8_030_261_248  # Llama-3.1-8B's parameter count
    assert len(tensors) == 32 * 9 + 3


def test_smoke_runs_every_method_and_class_on_cpu(tmp_path: Path) -> None:
    """1 rank then 2 ranks (torchrun, gloo): every class timed, every tensor merged once."""
    result = _run(tmp_path, "--ranks", "1,2")
    expected = {}
    for t in gpu_8b.model_tensors(gpu_8b.SHAPES["smoke"]):
        expected[t.cls] = expected.get(t.cls, 0) + 1
    one = result["runs"]["1"]["methods"]
    assert set(one) == {"drm_h", "drm_v", "ties"}
    for key, m in one.items():
        assert {c: r["count"] for c, r in m["classes"].items()} == expected, key
        assert all(
            r["timed"] == r["count"] and not r["extrapolated"] for r in m["classes"].values()
        )
        assert m["total"]["seconds"] > 0 and m["peak_device_bytes"] > 0
        assert (
            m["classes"]["q_proj"]["route"] == "matrix"
            and m["classes"]["norm"]["route"] == "fallback"
        )
        # the merged delta is of the size of the branch deltas: DRM averages (coefficients 1/N),
        # TIES sums the elected entries (coefficients 1)
        assert 0.2 < m["delta_norm_over_mean_delta_norm"] < 5, key
    two = result["runs"]["2"]["methods"]
    for key, m in two.items():
        ranks = m["ranks"]
        assert len(ranks) == 2
        counts = [
            sum(r["classes"][c]["count"] for r in ranks if c in r["classes"]) for c in expected
        ]
        assert counts == list(expected.values()), key  # each tensor merged by exactly one rank
    assert (tmp_path / "r.md").read_text().startswith("| class | shape | count |")


def test_class_budget_extrapolates(tmp_path: Path) -> None:
    result = _run(tmp_path, "--methods", "ties", "--class-budget-s", "0")
    classes = result["runs"]["1"]["methods"]["ties"]["classes"]
    assert all(r["timed"] == 1 for r in classes.values())
    norm = classes["norm"]
    assert norm["extrapolated"] and norm["seconds"] == pytest.approx(norm["seconds_per_matrix"] * 5)


def test_selection_off_cpu_uses_torch_not_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    """TIES' k-th smallest magnitude: numpy's introselect on CPU only (meta stands in for CUDA)."""
    from drm_lightning.methods import ops

    def no_numpy(*args: object, **kwargs: object) -> None:
        raise AssertionError("numpy used off the CPU")

    monkeypatch.setattr(ops.np, "partition", no_numpy)
    assert ops.kth_smallest(torch.empty(100, device="meta"), 5).device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_smoke_shapes_on_cuda(tmp_path: Path) -> None:
    result = _run(tmp_path, "--device", "cuda", "--ranks", "1")
    for m in result["runs"]["1"]["methods"].values():
        assert 0.2 < m["delta_norm_over_mean_delta_norm"] < 5
