"""Issue 24 item 2: the in-loop α search (``alpha_grid=``) of MergeCallback and MergeHook.

A one-weight linear model makes the expected α computable by hand: base 0, branches 0.25 and
0.75, so task arithmetic's merged delta is 1 and the merge at α has weight α. Each task's target
is ``k_t · x``: the merge's mean squared error is smallest at the α nearest the mean of the
``k_t``, and its R² (a higher-is-better metric) is computed here in float64 for every α.
"""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from test_accelerate_hook import _accelerator
from test_lightning_common import trainer
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.regression import MeanSquaredError, R2Score

from drm_lightning.accelerate import MergeHook
from drm_lightning.evaluation import TaskSpec
from drm_lightning.inloop import BranchedModel, LiveBranches, MergeCore, method_from
from drm_lightning.inloop.alpha import DEFAULT_ALPHA_GRID
from drm_lightning.lightning import BranchedModule, MergeCallback
from drm_lightning.merge import merge_state_dicts
from drm_lightning.methods import get_method

K = {"a": 0.2, "b": 0.8}  # each task's target slope
pytestmark = pytest.mark.filterwarnings("ignore:MergeHook has no schedule")
X = torch.linspace(-2.0, 3.0, 24, dtype=torch.float64).unsqueeze(1)


def _specs(metric: type = MeanSquaredError) -> dict[str, TaskSpec]:
    return {
        t: TaskSpec(DataLoader(TensorDataset(X.float(), (k * X).float()), batch_size=8), metric())
        for t, k in K.items()
    }


def _expected(grid: tuple[float, ...], score: Any, *, higher: bool) -> float:
    """The best α of the grid, from the float64 formula of the score (ties: the smaller α)."""
    averages = {a: sum(score(a * X, k * X) for k in K.values()) / len(K) for a in grid}
    best = max(averages.values()) if higher else min(averages.values())
    return min(a for a, v in averages.items() if v == best)


def _mse(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float(((pred - y) ** 2).mean())


def _r2(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float(1 - ((pred - y) ** 2).sum() / ((y - y.mean()) ** 2).sum())


def _set(base: nn.Module, branches: Any) -> None:
    with torch.no_grad():
        base.weight.zero_()
        branches["a"].weight.fill_(0.25)
        branches["b"].weight.fill_(0.75)


def _model() -> BranchedModel:
    model = BranchedModel(nn.Linear(1, 1, bias=False), {t: nn.Identity() for t in K})
    _set(model.base, model.branches)
    return model


def _module() -> BranchedModule:
    module = BranchedModule(
        nn.Linear(1, 1, bias=False), {t: nn.Identity() for t in K}, loss_fn=F.mse_loss, lr=0.0
    )
    _set(module.base, module.branches)
    return module


def _hook_run(**kwargs: Any) -> tuple[MergeHook, list[tuple[dict[str, float], int]]]:
    accelerator = _accelerator()
    logged: list[tuple[dict[str, float], int]] = []
    accelerator.log = lambda values, step=None, **kw: logged.append((values, step))  # type: ignore[method-assign]
    model = accelerator.prepare(_model())
    kwargs = {"tasks": _specs(), "alpha_grid": "default", **kwargs}
    with MergeHook(accelerator, model, "task_arithmetic", **kwargs) as hook:
        hook.merge()
    return hook, logged


def _fit(tmp_path: Path, **kwargs: Any) -> tuple[MergeCallback, list[dict[str, str]]]:
    cb = MergeCallback(
        "task_arithmetic", tasks=_specs(), alpha_grid="default", every_n_steps=1, **kwargs
    )
    from lightning.pytorch.loggers import CSVLogger

    train = {
        t: DataLoader(TensorDataset(X.float(), k * X.float()), batch_size=8) for t, k in K.items()
    }
    logger = CSVLogger(tmp_path, name="run")
    trainer(max_steps=1, callbacks=[cb], logger=logger).fit(_module(), train)
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        return cb, list(csv.DictReader(f))


def test_the_best_alpha_is_chosen_and_every_alpha_logged() -> None:
    hook, logged = _hook_run()
    expected = _expected(DEFAULT_ALPHA_GRID, _mse, higher=False)
    assert expected == 0.5  # mean(K), by the float64 formula
    record = hook.history[-1]
    assert record["alpha"] == hook.core.alpha == expected
    assert hook.last_merged is not None
    assert float(hook.last_merged["weight"]) == pytest.approx(expected, abs=1e-7)
    ((values, step),) = logged
    assert step == 0 and values["alpha"] == expected
    for alpha in DEFAULT_ALPHA_GRID:  # every α's scores, each equal to the formula
        assert values[f"alpha/{alpha!r}/merged/average"] == pytest.approx(
            sum(_mse(alpha * X, k * X) for k in K.values()) / len(K), rel=1e-5
        )
        assert f"alpha/{alpha!r}/merged/a/MeanSquaredError" in values
        assert f"alpha/{alpha!r}/normalized/average" in values
    # the record's own scores are those of the chosen α, and the merge kept is the one scored
    assert record["merged/average"] == values[f"alpha/{expected!r}/merged/average"]
    # the live weights are untouched (adopt=False)
    assert hook.unwrapped.branches["a"].weight.item() == 0.25


def test_a_higher_is_better_metric_is_maximised() -> None:
    grid = (0.1, 0.2, 0.3, 0.4)
    hook, _ = _hook_run(tasks=_specs(R2Score), alpha_grid=grid)
    expected = _expected(grid, _r2, higher=True)
    assert expected == 0.2  # R² weighs task a (small slope) more than the MSE does
    assert hook.core.alpha == expected


def test_a_tie_keeps_the_smaller_alpha() -> None:
    # base 0: the merge at α has logits α·Δx, the same argmax for every α > 0
    spec = TaskSpec(
        DataLoader(TensorDataset(X.float(), (X[:, 0] > 0).long()), batch_size=8),
        MulticlassAccuracy(num_classes=2),
    )
    model = BranchedModel(nn.Linear(1, 2, bias=False), {t: nn.Identity() for t in K})
    with torch.no_grad():
        model.base.weight.zero_()
    core = MergeCore(
        method_from("task_arithmetic", None),
        LiveBranches(),
        tasks={t: spec for t in K},
        alpha_grid=[0.7, 0.2, 0.5],
    )
    core.start(model, core.make_backend(partitioned=False))
    record = core.merge(model, step=1, epoch=0)
    assert record is not None
    scores = {a: record[f"alpha/{a!r}/merged/average"] for a in (0.7, 0.2, 0.5)}
    assert len(set(scores.values())) == 1 and core.alpha == 0.2


def test_alpha_is_the_scaling_of_task_arithmetic() -> None:
    """One mechanism: the search's merge at α is task arithmetic with ``scaling=α``."""
    torch.manual_seed(0)
    model = BranchedModel(nn.Linear(5, 4), {t: nn.Linear(4, 1) for t in K})
    with torch.no_grad():
        for branch in model.branches.values():
            for p in branch.parameters():
                p.add_(torch.randn_like(p))
    specs = {
        t: TaskSpec(DataLoader(TensorDataset(torch.randn(8, 5), torch.randn(8, 1))), R2Score())
        for t in K
    }
    core = MergeCore(
        method_from("task_arithmetic", None), LiveBranches(), tasks=specs, alpha_grid=[0.35]
    )
    core.start(model, core.make_backend(partitioned=False))
    core.merge(model, step=1, epoch=0)
    state = {k: v.double() for k, v in model.state_dict().items()}
    oracle = merge_state_dicts(
        get_method("task_arithmetic", scaling=0.35),
        {k[5:]: v for k, v in state.items() if k.startswith("base.")},
        [
            {
                k[len(f"branches.{t}.") :]: v
                for k, v in state.items()
                if k.startswith(f"branches.{t}.")
            }
            for t in K
        ],
        compute_dtype=torch.float64,
    )
    assert core.last_merged is not None
    for name, value in oracle.items():
        torch.testing.assert_close(core.last_merged[name].double(), value, rtol=1e-6, atol=1e-6)


def test_hook_and_callback_choose_the_same_alpha(tmp_path: Path) -> None:
    hook, logged = _hook_run()
    cb, rows = _fit(tmp_path)
    assert cb.history[-1]["alpha"] == hook.history[-1]["alpha"] == 0.5
    for alpha in DEFAULT_ALPHA_GRID:
        key = f"alpha/{alpha!r}/merged/average"
        assert cb.history[-1][key] == pytest.approx(hook.history[-1][key], rel=1e-6)
        assert any(row.get(key) for row in rows), key  # in the Lightning logger's file
    assert any(row.get("alpha") == "0.5" for row in rows)


def test_the_chosen_alpha_survives_a_resume(tmp_path: Path) -> None:
    # Lightning: the callback's state_dict carries it.
    cb, _ = _fit(tmp_path)
    resumed = MergeCallback("task_arithmetic", tasks=_specs(), alpha_grid="default")
    resumed.load_state_dict(cb.state_dict())
    assert resumed.core.alpha == 0.5
    # Accelerate: save_state / load_state of a registered hook; then a merge made without a
    # search (final_weights="merged" at exit) is scaled by the restored α.
    kwargs: dict[str, Any] = dict(tasks=_specs(), alpha_grid="default")
    accelerator = _accelerator()
    model = accelerator.prepare(_model())
    with MergeHook(accelerator, model, "task_arithmetic", **kwargs) as hook:
        accelerator.register_for_checkpointing(hook)
        hook.merge()
    accelerator.save_state(tmp_path / "state")
    accelerator = _accelerator()
    model = accelerator.prepare(_model())
    fresh = MergeHook(accelerator, model, "task_arithmetic", final_weights="merged", **kwargs)
    accelerator.register_for_checkpointing(fresh)
    accelerator.load_state(tmp_path / "state")
    assert fresh.core.alpha == 0.5 and fresh.num_steps == 0
    with fresh:
        pass
    assert fresh.unwrapped.branches["a"].weight.item() == pytest.approx(0.5, abs=1e-7)


def _front_ends(**kwargs: Any) -> list[Any]:
    accelerator = SimpleNamespace(is_main_process=True)
    return [
        lambda: MergeCallback(**kwargs),
        lambda: MergeHook(accelerator, _model(), **kwargs),
    ]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(alpha_grid=[]), ValueError, r"^alpha_grid is empty: give at least one α > 0"),
        (
            dict(alpha_grid=[0.5, 0, -1, float("nan"), float("inf")]),
            ValueError,
            r"^alpha_grid values must be finite numbers > 0; invalid: 0, -1, nan, inf$",
        ),
        (dict(alpha_grid=[True]), ValueError, "invalid: True"),
        (dict(alpha_grid=["0.5"]), ValueError, "invalid: 0.5"),
        (dict(alpha_grid="best"), ValueError, r"^alpha_grid='best': give a list of numbers > 0"),
        (dict(alpha_grid=0.5), TypeError, "alpha_grid must be a list of numbers > 0"),
        (dict(alpha_grid=[0.5, 0.5]), ValueError, "^alpha_grid repeats 0.5$"),
        (
            dict(alpha_grid="default"),
            ValueError,
            r"alpha_grid= scores every α on the tasks' validation batches, but no tasks= are",
        ),
        (
            dict(method="ties", method_params={"scaling": 0.5}, alpha_grid=[1.0], tasks=_specs()),
            ValueError,
            r"which for 'ties' is its scaling parameter; leave scaling at 1.0 \(got 0.5\)",
        ),
        (
            dict(
                alpha_grid=[1.0],
                tasks={**_specs(), "c": _specs(R2Score)["a"]},
            ),
            ValueError,
            r"disagree on what is better: lower for \['a', 'b'\], higher for \['c'\]",
        ),
    ],
)
def test_bad_grids_are_refused_by_both_front_ends(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    messages = []
    for build in _front_ends(**kwargs):
        with pytest.raises(error, match=match) as info:
            build()
        messages.append(str(info.value).replace("MergeCallback", "MergeHook"))
    assert messages[0] == messages[1]


def test_refused_under_zero3() -> None:
    from drm_lightning.inloop import MergeOptions

    options = MergeOptions("task_arithmetic", tasks=_specs(), alpha_grid=[1.0])
    with pytest.raises(NotImplementedError, match=r"- alpha_grid= \(the α search rescales"):
        options.refuse_under_zero3(options.provider(), name="MergeHook")


def _ddp_worker(outdir: str) -> None:
    torch.set_num_threads(1)
    hook, _ = _hook_run()
    record = {k: v for k, v in hook.history[-1].items() if not k.startswith("merge/")}
    rank = hook.accelerator.process_index
    torch.save(
        {"world": hook.accelerator.num_processes, "record": record, "merged": hook.last_merged},
        Path(outdir) / f"rank{rank}.pt",
    )


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_two_ranks_choose_the_same_alpha(tmp_path: Path) -> None:
    """2 CPU processes (gloo): each rank scores half the batches, the scores are reduced, and
    both ranks choose the α and keep the merge of one process."""
    from accelerate import debug_launcher

    debug_launcher(_ddp_worker, args=(str(tmp_path),), num_processes=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    single, _ = _hook_run()
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["record"] == ranks[1]["record"]
    assert ranks[0]["record"]["alpha"] == single.core.alpha == 0.5
    for alpha in DEFAULT_ALPHA_GRID:
        key = f"alpha/{alpha!r}/merged/average"
        assert ranks[0]["record"][key] == pytest.approx(single.history[-1][key], rel=1e-6)
    for r in ranks:
        assert single.last_merged is not None
        assert torch.equal(r["merged"]["weight"], single.last_merged["weight"])
