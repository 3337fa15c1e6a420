"""MergeCallback on a single CPU device: live branches, snapshots, checkpoints, bad input."""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from test_lightning_common import (
    CLASSES,
    TASKS,
    MultiHead,
    Probe,
    acc_specs,
    assert_state_equal,
    branched,
    clone_state,
    specs,
    task_data,
    train_loaders,
    trainer,
)
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

from drm_lightning.evaluation import TaskSpec, evaluate_task
from drm_lightning.lightning import BranchedModule, MergeCallback
from drm_lightning.merge.loop import merge_state_dicts
from drm_lightning.merge.routing import Routing
from drm_lightning.methods import get_method

DRM = dict(drop_rate=0.5)


def _sub(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def test_live_merge_equals_core_and_live_weights_restored(tmp_path: Path) -> None:
    model = branched()
    before, after = Probe(), Probe()
    cb = MergeCallback("drm", method_params=DRM, tasks=specs(), every_n_steps=3)
    trainer(max_steps=7, callbacks=[before, cb, after], logger=CSVLogger(tmp_path)).fit(
        model, train_loaders()
    )

    assert [r["step"] for r in cb.history] == [3, 6]
    for step in (3, 6):  # the live weights after the merge are bit-identical to those before it
        assert_state_equal(before.states[step], after.states[step])
    state = before.states[6]
    oracle = merge_state_dicts(
        get_method("drm", **DRM),
        _sub(state, "base."),
        [_sub(state, f"branches.{t}.") for t in TASKS],
        seed=1,  # the second merge
    )
    assert cb.last_merged is not None
    assert_state_equal(cb.last_merged, oracle)

    # Logged scores equal an independent evaluation of the merged weights with each task's head.
    merged_model = branched()
    merged_model.load_state_dict(state)
    for t in TASKS:
        merged_model.branches[t].load_state_dict(oracle)
    record = cb.history[-1]
    for t in TASKS:
        expected = evaluate_task(merged_model, t, specs()[t])
        assert record[f"merged/{t}/acc"] == pytest.approx(expected["acc"])
        assert record[f"merged/{t}/micro"] == pytest.approx(expected["micro"])
    live_model = branched()
    live_model.load_state_dict(state)
    for t in TASKS:
        own = evaluate_task(live_model, t, specs()[t])
        assert record[f"branch/{t}/acc"] == pytest.approx(own["acc"])
        if own["acc"]:
            assert record[f"normalized/{t}/acc"] == pytest.approx(
                record[f"merged/{t}/acc"] / own["acc"]
            )
    assert record["merged/average"] == pytest.approx(
        sum(record[f"merged/{t}/acc"] for t in TASKS) / 3
    )
    assert "normalized/average" in record and "branch/average" in record

    # ... and they reach the logger and callback_metrics.
    csv = (Path(cb_logger_dir(tmp_path)) / "metrics.csv").read_text()
    header = csv.splitlines()[0].split(",")
    for key in (
        "merged/a/acc",
        "merged/c/micro",
        "branch/b/acc",
        "normalized/average",
        "merged/average",
    ):
        assert key in header


def cb_logger_dir(tmp_path: Path) -> Path:
    return next(tmp_path.glob("lightning_logs/version_*"))


def test_adopt_consolidates_branches_and_base() -> None:
    model = branched()
    before, after = Probe(), Probe()
    cb = MergeCallback("drm", method_params=DRM, tasks=acc_specs(), every_n_steps=2, adopt=True)
    with pytest.warns(UserWarning, match="each of the 3 branches and the base are overwritten"):
        trainer(max_steps=4, callbacks=[before, cb, after]).fit(model, train_loaders())
    pre, post = before.states[4], after.states[4]
    assert cb.last_merged is not None
    assert not torch.equal(
        pre["branches.a.0.weight"], pre["branches.b.0.weight"]
    )  # branches had diverged
    for prefix in ["base."] + [f"branches.{t}." for t in TASKS]:
        assert_state_equal(_sub(post, prefix), cb.last_merged)
    assert_state_equal(_sub(post, "heads."), _sub(pre, "heads."))  # heads stay per task
    # The next merge measures progress since the consolidation: base == merged at step 2.
    assert_state_equal(_sub(after.states[2], "base."), _sub(after.states[2], "branches.a."))


def test_no_checkpoint_while_swapped(tmp_path: Path) -> None:
    model = branched()
    holder: dict[str, pl.Trainer] = {}

    def predict(module: nn.Module, task: str, batch: Any) -> Any:
        holder["trainer"].save_checkpoint(tmp_path / "never-written.ckpt")
        return module.predict_task(task, batch)  # type: ignore[operator]

    tasks = {
        t: TaskSpec(
            DataLoader(task_data(t, 16), batch_size=16),
            MulticlassAccuracy(num_classes=CLASSES),
            predict=predict,
        )
        for t in TASKS
    }
    tr = trainer(max_steps=2, callbacks=[MergeCallback("drm", tasks=tasks, every_n_steps=1)])
    holder["trainer"] = tr
    with pytest.raises(RuntimeError, match="swapped into the module"):
        tr.fit(model, train_loaders())
    assert not (tmp_path / "never-written.ckpt").exists()


def test_model_checkpoint_at_merge_step_holds_live_weights(tmp_path: Path) -> None:
    model = branched()
    before = Probe()
    cb = MergeCallback("drm", method_params=DRM, tasks=acc_specs(), every_n_steps=2)
    ckpt = ModelCheckpoint(
        dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1, filename="{step}"
    )
    trainer(max_steps=4, callbacks=[before, cb, ckpt], enable_checkpointing=True).fit(
        model, train_loaders()
    )
    for step in (2, 4):
        saved = torch.load(tmp_path / f"step={step}.ckpt", weights_only=False)["state_dict"]
        assert_state_equal(saved, before.states[step])


def test_gradient_accumulation_merges_once_per_optimizer_step() -> None:
    cb = MergeCallback("drm", tasks=None, every_n_steps=2)
    trainer(max_steps=4, accumulate_grad_batches=2, callbacks=[cb]).fit(
        branched(), train_loaders(batch_size=8)
    )
    assert [r["step"] for r in cb.history] == [2, 4]


def test_epoch_schedule_and_custom_should_merge() -> None:
    class Custom(MergeCallback):
        def should_merge(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
            return step_idx in (0, 5)

    cb_epoch = MergeCallback("drm", every_n_epochs=2)
    custom = Custom("drm")
    trainer(max_epochs=4, callbacks=[cb_epoch, custom]).fit(branched(), train_loaders(n=32))
    assert [r["epoch"] for r in cb_epoch.history] == [1, 3]
    assert [r["step"] for r in custom.history] == [1, 6]


# --------------------------------------------------------------------------- snapshots


@pytest.mark.parametrize("on_disk", [False, True])
def test_snapshots_sequential_tasks(tmp_path: Path, on_disk: bool) -> None:
    model = MultiHead()
    base = clone_state(model)
    before = Probe()
    routing = Routing(ignore=[r"heads\."])
    cb = MergeCallback(
        "drm",
        method_params=DRM,
        branches="snapshots",
        tasks=acc_specs(),
        snapshot_every_n_epochs=1,
        every_n_epochs=3,
        routing=routing,
        snapshot_dir=tmp_path / "snaps" if on_disk else None,
    )
    trainer(max_epochs=3, callbacks=[before, cb]).fit(model, train_loaders(n=32))
    assert [s.task for s in cb._snapshots] == list(TASKS)
    if on_disk:
        assert len(list((tmp_path / "snaps").glob("*.safetensors"))) == 3
    else:  # compact: a snapshot holds only the tensors that changed (its own head, the backbone)
        first = cb._snapshots[0].delta
        assert first is not None
        assert (
            "heads.b.weight" not in first
            and "heads.a.weight" in first
            and "backbone.0.weight" in first
        )

    # Oracle: the live states at the end of each epoch are the three branches.
    ends = sorted(before.states)
    per_epoch = len(ends) // 3
    branch_states = [before.states[ends[(i + 1) * per_epoch - 1]] for i in range(3)]
    oracle = merge_state_dicts(get_method("drm", **DRM), base, branch_states, routing=routing)
    assert cb.last_merged is not None
    for k in oracle:
        torch.testing.assert_close(cb.last_merged[k], oracle[k], rtol=1e-5, atol=1e-6)

    # Task b is scored with the merged backbone and snapshot b's own head.
    probe = MultiHead()
    probe.load_state_dict(
        {**oracle, **{k: v for k, v in branch_states[1].items() if k.startswith("heads.")}}
    )
    expected = evaluate_task(probe, "b", acc_specs()["b"])
    assert cb.history[-1]["merged/b/MulticlassAccuracy"] == pytest.approx(
        next(iter(expected.values()))
    )
    # The live model (task c's state) is untouched.
    assert_state_equal(clone_state(model), before.states[ends[-1]])


# --------------------------------------------------------------------------- checkpoints


def _write_ckpt(tmp_path: Path, name: str, seed: int) -> tuple[Path, dict[str, torch.Tensor]]:
    model = MultiHead(seed=0)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path / f"{name}.ckpt"
    torch.save({"state_dict": model.state_dict()}, path)
    return path, clone_state(model)


def test_checkpoints_merged_with_live_model(tmp_path: Path) -> None:
    path_a, state_a = _write_ckpt(tmp_path, "task_a", 1)
    path_b, state_b = _write_ckpt(tmp_path, "task_b", 2)
    model = MultiHead()
    model.task_order = ["c"]
    base = clone_state(model)
    before = Probe()
    cb = MergeCallback(
        "drm",
        method_params=DRM,
        branches={"a": path_a, "b": path_b},
        tasks=acc_specs(),
        every_n_steps=2,
        live_task="c",
        routing=Routing(ignore=[r"heads\."]),
        export_dir=tmp_path / "export",
    )
    trainer(max_steps=2, callbacks=[before, cb]).fit(model, train_loaders(n=32))
    assert cb.history[0]["branches"] == ["a", "b", "c"]
    oracle = merge_state_dicts(
        get_method("drm", **DRM),
        base,
        [state_a, state_b, before.states[2]],
        routing=Routing(ignore=[r"heads\."]),
    )
    assert cb.last_merged is not None
    assert_state_equal(cb.last_merged, oracle)
    from safetensors.torch import load_file

    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert_state_equal(exported, oracle)
    assert "drm" in (tmp_path / "export" / "README.md").read_text()  # the core writer's model card


def test_export_live_branches_with_heads(tmp_path: Path) -> None:
    model = branched()
    cb = MergeCallback("drm", method_params=DRM, every_n_steps=3, export_dir=tmp_path / "out")
    trainer(max_steps=4, callbacks=[cb]).fit(model, train_loaders())
    from safetensors.torch import load_file

    # Step 4 did not merge, so the export is a fresh merge of the final branches.
    state = clone_state(model)
    oracle = merge_state_dicts(
        get_method("drm", **DRM),
        _sub(state, "base."),
        [_sub(state, f"branches.{t}.") for t in TASKS],
        seed=1,
    )
    assert_state_equal(load_file(str(tmp_path / "out" / "model.safetensors")), oracle)
    assert_state_equal(
        load_file(str(tmp_path / "out" / "heads.safetensors")),
        {f"heads.{k}": v for k, v in _sub(state, "heads.").items()},
    )


def test_missing_checkpoint_fails_at_setup(tmp_path: Path) -> None:
    model = MultiHead()
    cb = MergeCallback("drm", branches=[tmp_path / "nope.ckpt"], every_n_steps=1)
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        trainer(max_steps=5, callbacks=[cb]).fit(model, train_loaders(n=32))
    assert cb.history == [] and model.global_step == 0


def test_checkpoint_with_other_parameters_fails_at_setup(tmp_path: Path) -> None:
    other = MultiHead(tasks=("a", "b"))  # no head for task c
    torch.save({"state_dict": other.state_dict()}, tmp_path / "other.ckpt")
    cb = MergeCallback("drm", branches=[tmp_path / "other.ckpt"], every_n_steps=1)
    with pytest.raises(ValueError, match=r"missing 2 key\(s\).*heads\.c\.bias"):
        trainer(max_steps=5, callbacks=[cb]).fit(MultiHead(), train_loaders(n=32))


# --------------------------------------------------------------------------- bad input


def test_branches_with_different_parameter_sets() -> None:
    model = branched()
    model.branches["b"][2] = nn.Linear(16, 16, bias=False)
    model.branches["c"][0] = nn.Linear(8, 32)
    model.branches["c"][2] = nn.Linear(32, 16)
    with pytest.raises(ValueError) as err:
        trainer(max_steps=2, callbacks=[MergeCallback("drm", every_n_steps=1)]).fit(
            model, train_loaders()
        )
    message = str(err.value)
    assert "branch 'b'" in message and "2.bias" in message  # missing key named
    assert (
        "0.weight: base [16, 8]" in message and "branch 2 [32, 8]" in message
    )  # every shape listed


def test_task_without_dataloader_or_metric() -> None:
    with pytest.raises(ValueError, match="dataloader is None"):
        TaskSpec(None, MulticlassAccuracy(num_classes=3))
    with pytest.raises(ValueError, match="metrics is None"):
        TaskSpec([], None)
    with pytest.raises(TypeError, match="torchmetrics"):
        TaskSpec([], {"acc": lambda p, t: 0.0})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="TaskSpec"):
        MergeCallback("drm", tasks={"a": DataLoader(task_data("a"))})  # type: ignore[dict-item]
    cb = MergeCallback("drm", tasks=acc_specs(("a", "b")), every_n_steps=1)
    with pytest.raises(ValueError, match=r"branch task\(s\) \['c'\] have no TaskSpec"):
        trainer(max_steps=2, callbacks=[cb]).fit(branched(), train_loaders())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(), "has no schedule"),
        (dict(every_n_steps=50), "every_n_steps=50 > 4 optimizer steps"),
        (dict(every_n_epochs=3), "every_n_epochs=3 > max_epochs=1"),
    ],
)
def test_schedule_that_never_fires_warns_once(kwargs: dict[str, Any], match: str) -> None:
    cb = MergeCallback("drm", **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_epochs=1, callbacks=[cb]).fit(branched(), train_loaders())
    ours = [w for w in caught if "MergeCallback" in str(w.message) and "never" in str(w.message)]
    assert len(ours) == 1
    assert match in str(ours[0].message)
    assert cb.history == []


def test_constructor_errors() -> None:
    with pytest.raises(ValueError, match="every_n_steps must be a positive integer"):
        MergeCallback("drm", every_n_steps=0)
    with pytest.raises(ValueError, match="unknown merge method"):
        MergeCallback("nope")
    with pytest.raises(ValueError, match="branches='bogus'"):
        MergeCallback("drm", branches="bogus")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="only used with branches='snapshots'"):
        MergeCallback("drm", snapshot_every_n_epochs=1)
    with pytest.raises(TypeError, match="BranchedModule"):
        trainer(max_steps=1, callbacks=[MergeCallback("drm", every_n_steps=1)]).fit(
            MultiHead(), train_loaders()
        )


def test_snapshot_mode_needs_a_snapshot_before_merging() -> None:
    with pytest.raises(ValueError, match="without a snapshot schedule"):
        trainer(
            max_steps=1, callbacks=[MergeCallback("drm", branches="snapshots", every_n_steps=1)]
        ).fit(MultiHead(), train_loaders(n=32))
    cb = MergeCallback("drm", branches="snapshots", every_n_steps=1, snapshot_every_n_steps=2)
    with pytest.warns(UserWarning, match="merge skipped at step 1: no snapshot captured yet"):
        trainer(max_steps=2, callbacks=[cb]).fit(MultiHead(), train_loaders(n=32))
    assert [r["step"] for r in cb.history] == [2]


def test_coefficients_by_task() -> None:
    model = branched()
    before = Probe()
    coefficients = {"a": 0.5, "c": 2.0}  # b gets 1.0
    cb = MergeCallback("drm", method_params=DRM, every_n_steps=2, coefficients=coefficients)
    trainer(max_steps=2, callbacks=[before, cb]).fit(model, train_loaders())
    state = before.states[2]
    oracle = merge_state_dicts(
        get_method("drm", **DRM),
        _sub(state, "base."),
        [_sub(state, f"branches.{t}.") for t in TASKS],
        coefficients=[0.5, 1.0, 2.0],
    )
    assert cb.last_merged is not None
    assert_state_equal(cb.last_merged, oracle)


def _stub_trainer(strategy: Any) -> Any:
    return SimpleNamespace(strategy=strategy)


def test_zero3_limits_and_sharded_strategies_refused(tmp_path: Path) -> None:
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    cb = MergeCallback("drm", every_n_steps=1)
    cb.setup(
        _stub_trainer(DeepSpeedStrategy(stage=3)), branched(), "fit"
    )  # ZeRO-3 goes through the engine
    assert cb._zero3
    # What the ZeRO-3 route cannot do is refused at setup, all of it in one message.
    ckpt = tmp_path / "a.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    zero3 = MergeCallback(
        "drm", branches={"a": ckpt}, export_dir=tmp_path / "out", snapshot_dir=None
    )
    with pytest.raises(NotImplementedError, match=r"(?s)ZeRO-3.*export_dir=.*'a'.*not safetensors"):
        zero3.setup(_stub_trainer(DeepSpeedStrategy(stage=3)), MultiHead(), "fit")
    with pytest.raises(NotImplementedError, match=r"adopt=True\) is not supported with DeepSpeed"):
        MergeCallback("drm", adopt=True).setup(
            _stub_trainer(DeepSpeedStrategy(stage=2)), branched(), "fit"
        )
    with pytest.raises(NotImplementedError, match="FSDPStrategy"):
        cb.setup(_stub_trainer(FSDPStrategy()), branched(), "fit")


def test_branched_module_routing_errors() -> None:
    model = branched()
    with pytest.raises(TypeError, match="cannot route a batch"):
        model.split_batch(torch.zeros(3))
    with pytest.raises(KeyError, match="unknown task"):
        model.split_batch(("zzz", (torch.zeros(1, 8), torch.zeros(1))))
    with pytest.raises(ValueError, match="without '.'"):
        BranchedModule(nn.Linear(2, 2), {"a.b": nn.Linear(2, 2)})
    # A (task, batch) tuple trains only that task's branch and head.
    before = clone_state(model)
    trainer(max_steps=1).fit(
        model,
        DataLoader(
            [("b", b) for b in DataLoader(task_data("b", 16), batch_size=16)], batch_size=None
        ),
    )
    after = clone_state(model)
    changed = {
        k.split(".")[0] + "." + k.split(".")[1]
        for k in before
        if not torch.equal(before[k], after[k])
    }
    assert changed == {"branches.b", "heads.b"}
