"""The embedded multitask suite: tasks, data split, the in-fit merges and the report files."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("lightning")
pytest.importorskip("torchmetrics")
pytest.importorskip("matplotlib")

from drm_lightning.demo import (  # noqa: E402
    DEFAULT_METHODS,
    DemoConfig,
    ResidualMLP,
    TaskDef,
    build_suite,
    format_table,
    run_demo,
    run_seed,
    run_to_dict,
)
from drm_lightning.demo.report import paired_differences, summarize  # noqa: E402
from drm_lightning.demo.tasks import VIEWS, load_digits_tensors, split_indices  # noqa: E402
from drm_lightning.evaluation import evaluate_tasks  # noqa: E402
from drm_lightning.merge.loop import merge_state_dicts  # noqa: E402

TINY_METHODS = tuple(
    m for m in DEFAULT_METHODS if m.label in ("linear", "ties", "drm_h", "drm_h_norenorm")
)


def test_views_are_the_named_image_transforms() -> None:
    x, _ = load_digits_tensors()
    images = x[:5].reshape(5, 8, 8)
    assert torch.equal(VIEWS["rot90"](x[:5]).reshape(5, 8, 8), torch.rot90(images, 1, (1, 2)))
    assert torch.equal(VIEWS["flip"](x[:5]).reshape(5, 8, 8), images.flip(2))
    assert torch.equal(VIEWS["invert"](x[:5]), 1.0 - x[:5])
    permuted = VIEWS["perm"](x[:5])
    assert not torch.equal(permuted, x[:5])
    assert torch.equal(permuted.sort(dim=1).values, x[:5].sort(dim=1).values)  # same pixels, moved
    assert torch.equal(VIEWS["perm"](x[:5]), permuted)  # fixed across calls


def test_split_is_disjoint_and_validation_never_trained_on() -> None:
    parts = split_indices(1797, [0.4, 0.3, 0.3], seed=0)
    joined = torch.cat(parts)
    assert len(joined) == 1797 and len(torch.unique(joined)) == 1797
    suite = build_suite([TaskDef("identity", "digit"), TaskDef("rot180", "parity")])
    val = {tuple(r.tolist()) for r in suite.tasks["identity_digit"].val_x}
    seen = {
        tuple(r.tolist())
        for r in torch.cat([suite.pretrain_x, suite.tasks["identity_digit"].train_x])
    }
    # digits has a few duplicate images; beyond those, no validation image was trained on
    assert len(val & seen) <= 5
    assert set(suite.tasks["rot180_parity"].val_y.tolist()) == {0, 1}
    # the corpus holds the identity and every task view, labelled with the digit
    assert len(suite.pretrain_x) == 2 * len(parts[0]) and int(suite.pretrain_y.max()) == 9


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="multiple of merges"):
        DemoConfig(finetune_steps=301, merges=4)
    with pytest.raises(ValueError, match="at least 2 tasks"):
        DemoConfig(tasks=(TaskDef("rot90", "digit"),))
    with pytest.raises(ValueError, match="unknown view 'rot45'.*valid: identity"):
        TaskDef("rot45", "digit")


def test_callback_scores_equal_an_offline_merge_of_the_final_branches() -> None:
    """The table's numbers are the merge of the final branches, each task with its own head."""
    config = DemoConfig.tiny(methods=TINY_METHODS, finetune_steps=30, merges=3)
    suite = build_suite(config.tasks, data_seed=config.data_seed)
    torch.manual_seed(0)
    backbone = ResidualMLP(config.hidden, config.depth)
    pretrained = {k: v.clone() for k, v in backbone.state_dict().items()}
    result = run_seed(suite, pretrained, seed=0, config=config, keep_module=True)
    module = result.module
    assert module is not None
    # the branches trained and diverged from the base and from each other
    names = suite.names
    first = module.branches[names[0]].state_dict()
    second = module.branches[names[1]].state_dict()
    base = module.base.state_dict()
    assert all(torch.equal(base[k], pretrained[k]) for k in base)  # adopt=False: base untouched
    assert any(not torch.allclose(first[k], base[k]) for k in base)
    assert any(not torch.allclose(first[k], second[k]) for k in base)
    # periodic merges at steps 10, 20, 30 for every method
    assert all([s for s, _ in curve] == [10, 20, 30] for curve in result.curves.values())

    from drm_lightning.demo.runner import task_specs

    for spec in TINY_METHODS:
        merged = merge_state_dicts(
            spec.build(), base, [module.branches[t].state_dict() for t in names], seed=0 + 2
        )
        net = ResidualMLP(config.hidden, config.depth)
        net.load_state_dict(merged)
        heads = module.heads

        def predict(
            _m: torch.nn.Module, task: str, batch: tuple, net: torch.nn.Module = net
        ) -> tuple:
            x, y = batch
            return heads[task](net(x)), y

        offline = evaluate_tasks(module, task_specs(suite, predict=predict))
        for task in names:
            assert result.scores[spec.label][task] == pytest.approx(
                offline[task]["acc"], abs=1e-6
            ), (spec.label, task)
    # the merged model is not a branch: some method differs from the branch on some task
    assert any(result.scores[m.label] != result.scores["branch"] for m in TINY_METHODS)


def test_run_demo_writes_consistent_report(tmp_path: Path) -> None:
    config = DemoConfig.tiny(methods=TINY_METHODS, seeds=(0, 1))
    run = run_demo(config, progress=False, log=None, out_dir=tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert files == {"results.json", "results.csv", "per_seed.csv", "results.png"}
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    data = json.loads((tmp_path / "results.json").read_text())
    tasks = [t.name for t in config.tasks]
    assert data["tasks"] == tasks and data["seeds"] == [0, 1]
    assert data["rows"] == ["branch", "joint", *[m.label for m in TINY_METHODS], "base_heads"]
    assert data["methods"]["ties"]["params"]["density"] == 0.2  # the library default, recorded
    assert data["methods"]["drm_h"]["params"]["drop_rate"] == 0.8
    assert data["methods"]["drm_h_norenorm"]["params"]["renormalize"] is False
    for scores in data["per_seed"]:
        assert all(0.0 <= scores[r][t] <= 1.0 for r in data["rows"] for t in tasks)
    summary = data["summary"]
    assert summary["branch"]["normalized"]["mean"] == pytest.approx(100.0)
    # the normalised average is recomputed from the per-seed accuracies
    for row in data["rows"]:
        per_seed = [
            100 * sum(s[row][t] / s["branch"][t] for t in tasks) / len(tasks)
            for s in data["per_seed"]
        ]
        mean = sum(per_seed) / 2
        std = math.sqrt(sum((v - mean) ** 2 for v in per_seed))  # ddof=1 with n=2
        assert summary[row]["normalized"]["mean"] == pytest.approx(mean)
        assert summary[row]["normalized"]["std"] == pytest.approx(std)
    assert data == json.loads(json.dumps(run_to_dict(run), ensure_ascii=False))

    with (tmp_path / "results.csv").open() as handle:
        rows = {r["row"]: r for r in csv.DictReader(handle)}
    assert float(rows["ties"]["normalized_mean"]) == pytest.approx(
        summary["ties"]["normalized"]["mean"], abs=1e-4
    )
    with (tmp_path / "per_seed.csv").open() as handle:
        assert sum(1 for _ in csv.DictReader(handle)) == 2 * len(data["rows"]) * len(tasks)
    table = format_table(data)
    assert "DRM-H w/o renorm" in table and "Joint multitask" in table
    targets = {t["target"]: t for t in data["targets"]}
    assert "DRM-H ≥ TIES + 1 point" in targets and "DRM-H > DRM-H without renorm" in targets


def test_consolidation_fit_adopts_the_merge() -> None:
    """With ``consolidate``, a second fit resets branches and base to each merge (adopt=True)."""
    drm = tuple(m for m in DEFAULT_METHODS if m.label == "drm_h")
    config = DemoConfig.tiny(methods=drm, consolidate=("drm_h",), finetune_steps=20, merges=2)
    suite = build_suite(config.tasks, data_seed=config.data_seed)
    torch.manual_seed(0)
    pretrained = ResidualMLP(config.hidden, config.depth).state_dict()
    result = run_seed(suite, pretrained, seed=0, config=config)
    assert set(result.scores) == {"drm_h", "drm_h_consolidated", "branch", "joint", "base_heads"}
    assert [s for s, _ in result.curves["drm_h_consolidated"]] == [10, 20]
    # the first merge happens before any consolidation: both fits merge identical branches
    assert result.curves["drm_h_consolidated"][0] == pytest.approx(result.curves["drm_h"][0])
    with pytest.raises(ValueError, match="consolidate names unknown"):
        DemoConfig.tiny(consolidate=("nope",))


def test_paired_differences_and_target_verdicts() -> None:
    data = {
        "tasks": ["a"],
        "rows": ["branch", "ties", "task_arithmetic", "drm_v", "drm_v_norenorm"],
        "per_seed": [
            {
                "branch": {"a": 1.0},
                "ties": {"a": 0.80},
                "task_arithmetic": {"a": 0.9},
                "drm_v": {"a": 0.825},
                "drm_v_norenorm": {"a": 0.825},
            },
            {
                "branch": {"a": 0.5},
                "ties": {"a": 0.40},
                "task_arithmetic": {"a": 0.4},
                "drm_v": {"a": 0.41},
                "drm_v_norenorm": {"a": 0.40},
            },
        ],
    }
    targets = {t["target"]: t for t in paired_differences(data)}
    assert not any(t.startswith("DRM-H") for t in targets)  # no DRM-H rows in the data
    ties = targets["DRM-V ≥ TIES + 1 point"]
    assert ties["mean"] == pytest.approx((2.5 + 2.0) / 2) and ties["met"]
    assert targets["DRM-V ≥ task arithmetic"]["mean"] == pytest.approx((-7.5 + 2.0) / 2)
    assert not targets["DRM-V ≥ task arithmetic"]["met"]
    assert targets["DRM-V > DRM-V without renorm"]["met"]  # +1.0 on average, strict
    assert summarize(data)["ties"]["average"]["mean"] == pytest.approx(60.0)
