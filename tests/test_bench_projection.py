"""benchmarks/drm_projection.py: the projection decomposes the Gram sizes DRM decomposes, and
the rate measurement runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import drm_projection  # noqa: E402


@pytest.mark.parametrize("direction", ["horizontal", "vertical"])
def test_projection_uses_drms_gram_sizes(direction: str) -> None:
    rates = {
        "fp64_gflops": 1.0,
        "fp32_gflops": 2.0,
        "bandwidth_gbs": 1.0,
        "eigh_seconds": {64: 1.0},
    }
    proj = drm_projection.project("8b", direction, rates)
    layers, classes = drm_projection.MODELS["8b"]
    for row in proj["classes"]:
        n, m = classes[row["class"]]
        if direction == "horizontal":
            n, m = m, n
        s = row["gram_size"]
        assert s == min(4 * n, m)  # the smaller side of the stack, as DRM.cost and DRM decompose
        assert row["eigh"] == pytest.approx(row["count"] * (s / 64) ** 3)
        assert row["count"] == layers * drm_projection.PER_LAYER[row["class"]]
    sizes = {r["class"]: r["gram_size"] for r in proj["classes"]}
    big = "gate/up" if direction == "horizontal" else "down"
    assert sizes[big] == 14336 and all(s <= 4096 for c, s in sizes.items() if c != big)
    assert proj["total"] == pytest.approx(sum(r["total"] for r in proj["classes"]))


def test_measure_runs_on_cpu() -> None:
    rates = drm_projection.measure("cpu", 64, [16, 32])
    assert rates["fp64_gflops"] > 0 and rates["bandwidth_gbs"] > 0
    assert set(rates["eigh_seconds"]) == {16, 32} and rates["eigh_gemm_equivalents"] > 0
