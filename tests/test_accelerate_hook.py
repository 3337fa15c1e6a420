"""MergeHook (the Accelerate front end): one process, two processes, checkpoints, refusals.

The scenario is the Lightning tests' one (``test_lightning_common``): three linear-teacher
tasks, a branched MLP trained with AdamW on every task each step, a merge every 2 optimizer
steps. The same scenario through the Lightning callback and through the hook gives identical
merged weights and scores (one process here; two Accelerate processes against the one-process
Lightning run below).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from test_lightning_common import (
    CLASSES,
    HIDDEN,
    TASKS,
    MultiHead,
    acc_specs,
    backbone,
    branched,
    task_data,
    train_loaders,
    trainer,
)
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import DataLoader

from drm_lightning.accelerate import MergeHook
from drm_lightning.inloop import BranchedModel
from drm_lightning.lightning import MergeCallback
from drm_lightning.merge.routing import Routing

DRM = {"drop_rate": 0.5}
STEPS, EVERY = 4, 2


def _accelerator(**kwargs: Any) -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    return Accelerator(cpu=True, **kwargs)


def _branched_model(seed: int = 0) -> BranchedModel:
    """The BranchedModel twin of ``branched(seed)``: same names, same initial weights."""
    twin = branched(seed=seed)
    model = BranchedModel(backbone(seed), {t: torch.nn.Linear(HIDDEN, CLASSES) for t in TASKS})
    model.load_state_dict(twin.state_dict())
    return model


def _train(
    model: torch.nn.Module,
    optimizer: Any,
    accelerator: Any,
    hook: MergeHook,
    steps: int,
    loaders: Any,
) -> None:
    batches = zip(*(loaders[t] for t in TASKS))
    for _ in range(steps):
        batch = dict(zip(TASKS, next(batches)))
        loss: Tensor | None = None
        for task, (x, y) in batch.items():
            task_loss = F.cross_entropy(model(x, task), y)
            loss = task_loss if loss is None else loss + task_loss
        assert loss is not None
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        hook.step()


def _run_hook(
    accelerator: Any,
    *,
    tasks: Any = None,
    steps: int = STEPS,
    method: str = "drm",
    method_params: dict[str, Any] | None = DRM,
    **kwargs: Any,
) -> tuple[BranchedModel, MergeHook]:
    model = _branched_model()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=5e-2, weight_decay=0.0
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    with MergeHook(
        accelerator,
        model,
        method,
        method_params=method_params,
        tasks=tasks or acc_specs(),
        every_n_steps=EVERY,
        **kwargs,
    ) as hook:
        _train(model, optimizer, accelerator, hook, steps, train_loaders())
    return model, hook


def _scores(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if not k.startswith("merge/")} for r in history]


def _lightning_run(
    method: str = "drm", method_params: dict[str, Any] | None = DRM
) -> MergeCallback:
    cb = MergeCallback(method, method_params=method_params, tasks=acc_specs(), every_n_steps=EVERY)
    trainer(max_steps=STEPS, callbacks=[cb]).fit(branched(), train_loaders())
    return cb


def test_same_scenario_both_front_ends_single_process() -> None:
    cb = _lightning_run()
    accelerator = _accelerator()
    logged: list[tuple[dict[str, float], int]] = []
    accelerator.log = lambda values, step=None, **kw: logged.append((values, step))  # type: ignore[method-assign]
    _, hook = _run_hook(accelerator)
    assert [r["step"] for r in hook.history] == [2, 4]
    assert _scores(hook.history) == _scores(cb.history)
    assert hook.last_merged is not None and cb.last_merged is not None
    assert hook.last_merged.keys() == cb.last_merged.keys()
    for name in cb.last_merged:
        assert torch.equal(hook.last_merged[name], cb.last_merged[name]), name
    assert [step for _, step in logged] == [2, 4]
    assert logged[-1][0]["merged/average"] == hook.history[-1]["merged/average"]
    assert {
        "merged/a/MulticlassAccuracy",
        "branch/a/MulticlassAccuracy",
        "normalized/average",
        "merge/seconds",
    } <= set(logged[-1][0])


@pytest.mark.parametrize("method", ["tsv_m", "iso_cts", "della", "model_stock"])
def test_issue_24_methods_merge_the_same_through_both_front_ends(method: str) -> None:
    """The new methods run in the Accelerate loop as in the Lightning one: the same merges."""
    cb = _lightning_run(method, None)
    _, hook = _run_hook(_accelerator(), method=method, method_params=None)
    assert [r["step"] for r in hook.history] == [2, 4] and hook.last_merged is not None
    assert _scores(hook.history) == _scores(cb.history)
    for name in cb.last_merged:
        assert torch.equal(hook.last_merged[name], cb.last_merged[name]), name


def test_disabled_is_a_no_op() -> None:
    accelerator = _accelerator()
    before = _branched_model().state_dict()
    model, hook = _run_hook(accelerator, steps=2, enabled=False, adopt=True)
    assert hook.history == [] and hook.num_steps == 0
    assert any(
        not torch.equal(before[k], v) for k, v in model.state_dict().items()
    )  # trained, not merged


def test_adopt_and_final_weights() -> None:
    accelerator = _accelerator()
    model, hook = _run_hook(accelerator, adopt=True)
    state = model.state_dict()
    for prefix in ["base."] + [f"branches.{t}." for t in TASKS]:
        for name, value in hook.last_merged.items():
            assert torch.equal(state[prefix + name], value)
    accelerator = _accelerator()
    model, hook = _run_hook(
        accelerator, steps=3, final_weights="merged"
    )  # last merge at step 2: merged anew
    merged = hook.core.latest(model, step=3).values
    assert all(torch.equal(model.state_dict()[f"branches.a.{k}"], v) for k, v in merged.items())


def _snapshot_hook(accelerator: Any, model: Any) -> MergeHook:
    return MergeHook(
        accelerator,
        model,
        "drm",
        method_params=DRM,
        tasks=acc_specs(),
        branches="snapshots",
        snapshot_every_n_steps=1,
        every_n_steps=EVERY,
        routing=Routing(ignore=[r"heads\."]),
    )


def _single_train(
    model: Any, optimizer: Any, accelerator: Any, hook: MergeHook, steps: range
) -> None:
    loaders = train_loaders(n=96)
    batches = list(zip(*(loaders[t] for t in TASKS)))
    for step in steps:
        task = TASKS[step % len(TASKS)]
        model.current_task = task
        x, y = batches[step][TASKS.index(task)]
        accelerator.backward(F.cross_entropy(model(x, task), y))
        optimizer.step()
        optimizer.zero_grad()
        hook.step()


def test_checkpoint_round_trip_and_resume_equal_uninterrupted(tmp_path: Path) -> None:
    # Uninterrupted: 6 steps, a snapshot each step, a merge every 2.
    accelerator = _accelerator()
    torch.manual_seed(0)
    model = MultiHead()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=5e-2))
    with _snapshot_hook(accelerator, model) as full:
        _single_train(model, optimizer, accelerator, full, range(6))

    # Interrupted after 3 steps: save_state, then a new process-like start and load_state.
    accelerator = _accelerator()
    torch.manual_seed(0)
    model = MultiHead()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=5e-2))
    with _snapshot_hook(accelerator, model) as first:
        accelerator.register_for_checkpointing(first)
        _single_train(model, optimizer, accelerator, first, range(3))
        accelerator.save_state(str(tmp_path / "state"))
        saved = first.state_dict()
    accelerator = _accelerator()
    torch.manual_seed(5)  # different init: everything must come from the checkpoint
    model = MultiHead()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=5e-2))
    second = _snapshot_hook(accelerator, model)
    accelerator.register_for_checkpointing(second)
    accelerator.load_state(str(tmp_path / "state"))
    with second:
        _assert_same(second.state_dict(), saved)  # exact round trip
        _single_train(model, optimizer, accelerator, second, range(3, 6))
    assert _scores(second.history) == _scores(full.history)
    assert [s.step for s in second.core.provider.snapshots] == [1, 2, 3, 4, 5, 6]
    for name, value in full.last_merged.items():
        assert torch.equal(second.last_merged[name], value), name


def _assert_same(a: Any, b: Any) -> None:
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


def test_refusals_and_bad_input() -> None:
    from accelerate import DistributedType

    accelerator = _accelerator()
    with pytest.raises(ValueError, match="not prepared by this accelerator"):
        MergeHook(accelerator, _branched_model(), every_n_steps=1).__enter__()
    fake = SimpleNamespace(distributed_type=DistributedType.FSDP, is_main_process=True)
    with pytest.raises(
        NotImplementedError, match=r"FSDP.*supported: NO \(one process\), MULTI_CPU, MULTI_GPU"
    ):
        MergeHook(fake, _branched_model(), every_n_steps=1).__enter__()
    ds2 = SimpleNamespace(
        distributed_type=DistributedType.DEEPSPEED,
        is_main_process=True,
        state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=2)),
    )
    with pytest.raises(NotImplementedError, match="adopt=True.*ZeRO-2"):
        MergeHook(ds2, _branched_model(), every_n_steps=1, adopt=True).__enter__()
    # Mismatched branches: one branch of another width.
    model = _branched_model()
    model.branches["b"] = torch.nn.Sequential(
        torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 16)
    )
    model = accelerator.prepare(model)
    with pytest.raises(ValueError, match="shape"):
        MergeHook(accelerator, model, every_n_steps=1).__enter__()
    # tasks must name every branch
    model = accelerator.prepare(_branched_model())
    with pytest.raises(ValueError, match=r"branch task\(s\) \['c'\] have no TaskSpec"):
        MergeHook(accelerator, model, tasks=acc_specs(("a", "b")), every_n_steps=1).__enter__()


def test_schedule_that_never_fires_warns_once() -> None:
    accelerator = _accelerator()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = accelerator.prepare(_branched_model())
        with MergeHook(accelerator, model, "drm") as hook:
            for _ in range(3):
                hook.step()
    ours = [w for w in caught if "MergeHook" in str(w.message)]
    assert len(ours) == 1 and "no schedule" in str(ours[0].message)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with MergeHook(accelerator, model, "drm", every_n_steps=10) as hook:
            hook.step()
    ours = [w for w in caught if "MergeHook" in str(w.message)]
    assert len(ours) == 1 and "never merged in 1 optimizer steps" in str(ours[0].message)


# ---------------------------------------------------------------------- two processes


def _worker(outdir: str) -> None:
    torch.set_num_threads(1)
    from accelerate.utils import DataLoaderConfiguration

    accelerator = _accelerator(dataloader_config=DataLoaderConfiguration(even_batches=False))
    tasks = acc_specs()
    # Uneven per-rank evaluation shares for task "a": 5 batches over 2 ranks (3 and 2).
    tasks["a"].dataloader = accelerator.prepare(
        DataLoader(task_data("a", 48, split=1), batch_size=10)
    )
    _, hook = _run_hook(accelerator, tasks=tasks)
    torch.save(
        {
            "world": accelerator.num_processes,
            "type": str(accelerator.distributed_type),
            "engine": hook.core._last.engine if hook.core._last else None,
            "history": _scores(hook.history),
            "merged": hook.last_merged,
            "a_batches": len(tasks["a"].dataloader),
        },
        Path(outdir) / f"rank{accelerator.process_index}.pt",
    )


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_two_processes_equal_each_other_and_single_process(tmp_path: Path) -> None:
    from accelerate import debug_launcher

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    debug_launcher(_worker, args=(str(tmp_path),), num_processes=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert all("MULTI_CPU" in r["type"] for r in ranks)
    assert [r["engine"] for r in ranks] == ["replica", "replica"]
    assert sorted(r["a_batches"] for r in ranks) == [2, 3]  # uneven shares, no hang
    assert ranks[0]["history"] == ranks[1]["history"]
    for name, value in ranks[0]["merged"].items():
        assert torch.equal(value, ranks[1]["merged"][name]), name
    # The same scenario in one process through the Lightning callback (same data on every rank:
    # DDP averages identical gradients, so training is the single-process one).
    cb = _lightning_run()
    assert ranks[0]["history"] == _scores(cb.history)
    for name, value in cb.last_merged.items():
        torch.testing.assert_close(
            ranks[0]["merged"][name].double(), value.double(), rtol=0, atol=1e-6
        )
