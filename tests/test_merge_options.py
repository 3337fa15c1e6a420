"""Issue 21 item 6: one options object under both in-loop front ends.

``MergeCallback`` and ``MergeHook`` build a :class:`~drm_lightning.inloop.MergeOptions` from
their keyword arguments: the same arguments give equal options, a bad argument the same error
from both (raised by the options, before any training), and the same core.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from drm_lightning.accelerate import MergeHook
from drm_lightning.evaluation import TaskSpec
from drm_lightning.inloop import BranchedModel, LiveBranches, MergeOptions, SingleModelBranches
from drm_lightning.lightning import MergeCallback
from drm_lightning.merge.routing import Routing
from drm_lightning.methods import get_method


def _hook(**kwargs: Any) -> MergeHook:
    accelerator = SimpleNamespace(is_main_process=True)  # construction does not use it
    model = BranchedModel(torch.nn.Linear(2, 2), {"a": torch.nn.Linear(2, 1)})
    return MergeHook(accelerator, model, **kwargs)


def _both(kwargs: dict[str, Any]) -> tuple[MergeOptions, MergeOptions]:
    return MergeCallback(**kwargs).options, _hook(**kwargs).options


def _task() -> TaskSpec:
    data = TensorDataset(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))
    return TaskSpec(DataLoader(data, batch_size=2), MulticlassAccuracy(num_classes=2))


SPECS = {"a": _task(), "b": _task()}
ROUTING = Routing(ignore=[r"heads\."])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(method="ties", method_params={"density": 0.5}, every_n_steps=3, adopt=True),
        dict(
            method="drm",
            tasks=SPECS,
            every_n_epochs=2,
            coefficients={"a": 0.5},
            compute_dtype=torch.float64,
            seed=7,
            evaluate_branches=False,
            final_weights="merged",
        ),
        dict(
            branches={"a": "runs/a.safetensors", "b": "runs/b.ckpt"},
            include_live=False,
            live_task="c",
            base="runs/base.safetensors",
            routing=ROUTING,
            export_dir="out",
            trust_pickles=True,
        ),
        dict(branches="snapshots", snapshot_every_n_steps=2, every_n_steps=4),
    ],
)
def test_both_front_ends_build_equal_options(kwargs: dict[str, Any]) -> None:
    callback, hook = _both(kwargs)
    assert callback == hook == MergeOptions(**kwargs)
    assert callback.mode == hook.mode and callback.paths == hook.paths
    assert callback.merge_method.params == hook.merge_method.params
    front_ends = (MergeCallback(**kwargs), _hook(**kwargs))
    for front_end in front_ends:
        assert front_end.mode == front_end.options.mode
        assert front_end.method is front_end.options.merge_method
    cores = [f.core for f in front_ends]
    assert type(cores[0].provider) is type(cores[1].provider)
    for attr in ("every_n_steps", "every_n_epochs"):
        assert getattr(cores[0].merge_schedule, attr) == getattr(cores[1].merge_schedule, attr)
    assert [c.name for c in cores] == ["MergeCallback", "MergeHook"]


def test_options_normalise_and_build_the_provider(tmp_path: Path) -> None:
    options = MergeOptions(branches=[tmp_path / "a.safetensors"], export_dir=str(tmp_path))
    assert options.mode == "checkpoints" and options.paths == {"a": tmp_path / "a.safetensors"}
    assert options.live_included and options.routing == Routing()
    assert options.export_dir == tmp_path and isinstance(options.export_dir, Path)
    provider = options.provider()
    assert isinstance(provider, SingleModelBranches) and provider.include_live
    assert options.provider() is not provider  # each front end holds its own
    assert isinstance(MergeOptions().provider(), LiveBranches)
    assert not MergeOptions(branches="snapshots").live_included
    with pytest.raises(TypeError):
        MergeOptions("drm", SPECS)  # type: ignore[misc]  # only the method is positional


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(every_n_steps=0), ValueError, "every_n_steps must be a positive integer"),
        (dict(every_n_epochs=True), ValueError, "every_n_epochs must be a positive integer"),
        (
            dict(branches="snapshots", snapshot_every_n_steps=-1),
            ValueError,
            "snapshot_every_n_steps must be a positive integer",
        ),
        (dict(final_weights="best"), ValueError, "final_weights must be 'live' or 'merged'"),
        (dict(branches="bogus"), ValueError, "branches='bogus': use 'live', 'snapshots'"),
        (dict(branches=[]), ValueError, "branches is an empty list"),
        (dict(branches=["x/a.pt", "y/a.pt"]), ValueError, "checkpoint file names must differ"),
        (
            dict(snapshot_every_n_steps=2),
            ValueError,
            "^snapshot_every_n_steps is only used with branches='snapshots'$",
        ),
        (dict(method="nope"), ValueError, "unknown merge method"),
        (dict(method="ties", method_params={"densty": 0.5}), ValueError, "densty"),
        (
            dict(method=get_method("ties"), method_params={"density": 0.5}),
            ValueError,
            "method_params is only used with a method name",
        ),
        (dict(method=3), TypeError, "method must be a method name or a MergeMethod"),
        (dict(tasks={"a": 3}), TypeError, r"tasks values must be TaskSpec.*'a' \(int\)"),
    ],
)
def test_a_bad_argument_gets_the_same_error_from_both(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    caught = []
    for build in (MergeCallback, _hook):
        with pytest.raises(error, match=match) as info:
            build(**kwargs)
        caught.append(str(info.value))
    assert caught[0] == caught[1]


def test_callback_names_both_snapshot_settings() -> None:
    with pytest.raises(
        ValueError,
        match="^snapshot_every_n_steps and snapshot_every_n_epochs are only used with branches=",
    ):
        MergeCallback(snapshot_every_n_steps=1, snapshot_every_n_epochs=1)


def test_zero3_refusals_are_one_list_for_both(tmp_path: Path) -> None:
    from accelerate import DistributedType

    kwargs: dict[str, Any] = dict(
        branches={"a": tmp_path / "a.pt"}, export_dir=tmp_path / "out", final_weights="merged"
    )
    (tmp_path / "a.pt").write_bytes(b"")
    ds3 = SimpleNamespace(
        distributed_type=DistributedType.DEEPSPEED,
        is_main_process=True,
        state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=3)),
    )
    hook = MergeHook(ds3, torch.nn.Linear(2, 2), **kwargs)
    with pytest.raises(NotImplementedError) as from_hook:
        hook.__enter__()
    options = MergeOptions(**kwargs)
    with pytest.raises(NotImplementedError) as from_options:
        options.refuse_under_zero3(options.provider(), name="MergeHook")
    assert str(from_hook.value) == str(from_options.value)
    lines = str(from_hook.value).splitlines()
    assert lines[0] == "MergeHook under DeepSpeed ZeRO-3 does not support:"
    assert lines[1].startswith("- export_dir= (exporting would assemble the whole merged model")
    assert lines[2].startswith("- final_weights='merged' (use adopt=True: ZeRO-3 adoption")
    assert "'a'" in lines[3] and "is not safetensors" in lines[3]
