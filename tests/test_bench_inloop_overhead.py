"""benchmarks/inloop_overhead.py runs end to end on both loops (tiny settings), and both front
ends merge the same training to the same scores."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "inloop_overhead.py"


def _run(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "r.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--repeats",
            "1",
            "--steps",
            "4",
            "--every",
            "2",
            "--out",
            str(out),
            *args,
        ],
        env=env,
        timeout=240,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize(
    "loop_args",
    [
        [
            "--loop",
            "toy",
            "--tasks",
            "2",
            "--hidden",
            "16",
            "--val-size",
            "64",
            "--train-size",
            "256",
        ],
        ["--loop", "demo", "--pretrain-steps", "20"],
    ],
    ids=["toy", "demo"],
)
def test_both_front_ends_merge_on_schedule_and_agree(tmp_path: Path, loop_args: list[str]) -> None:
    result = _run(tmp_path, *loop_args)
    assert result["config"]["loop"] == loop_args[1]
    lightning, accelerate = result["lightning"], result["accelerate"]
    for row in (lightning, accelerate):
        assert row["merges_per_loop"] == 2  # steps 2 and 4
        assert 0 < row["overhead_accounted_pct"] < 100
        assert row["later_merge_s"] > 0 and row["later_scoring_s"] > 0
    (ours,), (theirs,) = lightning["merged_average_last"], accelerate["merged_average_last"]
    assert math.isfinite(ours)
    # The same seeded training through either front end: the same merge, scored the same.
    assert ours == pytest.approx(theirs, abs=1e-6)
