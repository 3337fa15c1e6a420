"""Both front ends in 2 CPU processes (gloo): Lightning DDP and Accelerate multi-CPU
(``accelerate.debug_launcher``) give identical merged weights and scores; on each front end a run
interrupted after step 3 and resumed from its checkpoint in fresh processes (Lightning: a crash,
then ``Trainer.fit(ckpt_path=...)``; Accelerate: ``save_state``, then ``load_state`` in a fresh
``Accelerator``) equals the uninterrupted one, and the two resumed runs equal each other.

The scenario is ``test_accelerate_hook``'s: a branched MLP trained with AdamW on every task each
step, DRM every 2 optimizer steps, every task scored; 2 epochs of 3 batches (Lightning:
``max_epochs=2`` and :class:`~test_lightning_common.EpochWindow`; Accelerate: ``hook.end_epoch()``),
so the end-of-epoch checkpoint (step 3) falls between two merges. Every rank trains on all the
data (Lightning: ``use_distributed_sampler=False``; Accelerate: the training loaders are not
prepared), so DDP averages identical gradients; the evaluation batches are shared out by index.

Lightning's ranks are forked (``DDPStrategy(start_method="fork")``, as ``debug_launcher`` forks):
a spawned rank imports Lightning afresh, about 10 s of CPU per rank and fit, three fits here.
``test_lightning_ddp`` covers ``ddp_spawn``. The fits run with ``max_epochs``: Lightning resumes
an end-of-epoch checkpoint of a ``max_steps`` fit with ``trainer.current_epoch`` one behind (it
skips ``on_train_epoch_start`` of the resumed epoch), so the epoch logged with each later merge
would differ from the uninterrupted run's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from test_accelerate_hook import DRM, EVERY, _accelerator, _branched_model, _scores
from test_lightning_common import (
    TASKS,
    acc_specs,
    branched,
    clone_state,
    epoch_loaders,
    train_loaders,
    trainer,
)
from torch.nn import functional as F

from drm_lightning.accelerate import MergeHook
from drm_lightning.lightning import MergeCallback

WORLD, EPOCH = 2, 3  # processes; batches per epoch (the checkpoint: end of epoch 0, step 3)
STEPS, N = (
    2 * EPOCH,
    2 * EPOCH * 16,
)  # optimizer steps (merges at 2, 4, 6); training samples per task
pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]


class _Record(Callback):
    """Each rank saves what the parent cannot see (forked or spawned
    ranks copy no callback state back)."""

    def __init__(self, out: Path, name: str, merge: MergeCallback) -> None:
        self.out, self.name, self.merge = out, name, merge

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        record = {
            "world": trainer.world_size,
            "history": _scores(self.merge.history),
            "counters": _counters(self.merge.state_dict()),
            "merged": self.merge.last_merged,
            "state": clone_state(pl_module),
        }
        torch.save(record, self.out / f"{self.name}{trainer.global_rank}.pt")


class _Crash(Callback):
    """Stops the run after optimizer step ``at`` (after the merge callback, on every rank)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.at:
            raise RuntimeError("simulated crash")


def _counters(state: dict[str, Any]) -> dict[str, Any]:
    """A merge state dict without the timings of its history records."""
    return {**state, "history": _scores(state["history"])}


def _lightning_fit(
    out: Path, name: str, *, seed: int = 0, crash_at: int | None = None, ckpt: Path | None = None
) -> None:
    merge = MergeCallback("drm", method_params=DRM, tasks=acc_specs(), every_n_steps=EVERY)
    every_epoch = ModelCheckpoint(
        dirpath=out / f"{name}_ckpt", every_n_epochs=1, save_top_k=-1, filename="{epoch}"
    )
    callbacks = [merge, _Record(out, name, merge), every_epoch] + (
        [_Crash(crash_at)] if crash_at else []
    )
    tr = trainer(
        devices=WORLD,
        strategy=DDPStrategy(start_method="fork", process_group_backend="gloo"),
        max_epochs=2,
        callbacks=callbacks,
        deterministic=False,
        use_distributed_sampler=False,
        enable_checkpointing=True,
    )
    tr.fit(branched(seed=seed), epoch_loaders(EPOCH, n=N), ckpt_path=ckpt)


def _lightning_ddp(out: Path) -> dict[str, list[dict[str, Any]]]:
    """The uninterrupted fit; a fit that crashes after step 5 (after the second merge; its last
    checkpoint: the end of epoch 0, step 3); the resumed fit, from a model of another seed
    (everything must come from the checkpoint)."""
    _lightning_fit(out, "full")
    with pytest.raises(Exception, match="simulated crash"):
        _lightning_fit(out, "crashed", crash_at=EPOCH + 2)
    assert not any(out.glob("crashed?.pt"))  # it never reached on_train_end
    _lightning_fit(out, "resumed", seed=5, ckpt=out / "crashed_ckpt" / "epoch=0.ckpt")
    return {
        name: [torch.load(out / f"{name}{r}.pt", weights_only=False) for r in range(WORLD)]
        for name in ("full", "resumed")
    }


# ---------------------------------------------------------------------- Accelerate (each rank)


def _prepared(accelerator: Any, seed: int = 0) -> tuple[Any, Any, MergeHook]:
    model = _branched_model(seed)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=5e-2, weight_decay=0.0
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    hook = MergeHook(
        accelerator, model, "drm", method_params=DRM, tasks=acc_specs(), every_n_steps=EVERY
    )
    return model, optimizer, hook


def _train(accelerator: Any, model: Any, optimizer: Any, hook: MergeHook, steps: range) -> None:
    loaders = train_loaders(n=N)
    batches = list(zip(*(loaders[t] for t in TASKS)))
    for step in steps:
        loss = torch.stack(
            [F.cross_entropy(model(x, t), y) for t, (x, y) in zip(TASKS, batches[step])]
        ).sum()
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        hook.step()
        if (step + 1) % EPOCH == 0:
            hook.end_epoch()  # epochs of EPOCH batches, as Lightning's EpochWindow


def _result(accelerator: Any, hook: MergeHook) -> dict[str, Any]:
    return {
        "world": accelerator.num_processes,
        "type": str(accelerator.distributed_type),
        "history": _scores(hook.history),
        "counters": _counters(hook.core.state_dict()),
        "epoch": hook.epoch,
        "merged": hook.last_merged,
        "state": clone_state(hook.unwrapped),
        "engine": hook.core._last.engine,
    }


def _accelerate_worker(outdir: str) -> None:
    torch.set_num_threads(1)
    out = Path(outdir)
    accelerator = _accelerator()
    model, optimizer, hook = _prepared(accelerator)
    with hook:
        _train(accelerator, model, optimizer, hook, range(STEPS))
    results = {"full": _result(accelerator, hook)}

    # Interrupted after step 3 (after the first merge): save_state; then a fresh Accelerator, a
    # model built from another seed (everything must come from the checkpoint), load_state, the
    # rest.
    accelerator = _accelerator()
    model, optimizer, hook = _prepared(accelerator)
    accelerator.register_for_checkpointing(hook)
    with hook:
        _train(accelerator, model, optimizer, hook, range(EPOCH))
        accelerator.save_state(str(out / "state"))
    accelerator = _accelerator()
    model, optimizer, hook = _prepared(accelerator, seed=5)
    accelerator.register_for_checkpointing(hook)
    accelerator.load_state(str(out / "state"))
    with hook:
        _train(accelerator, model, optimizer, hook, range(EPOCH, STEPS))
    results["resumed"] = _result(accelerator, hook)
    torch.save(results, out / f"accelerate{accelerator.process_index}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from accelerate import debug_launcher

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = tmp_path_factory.mktemp("front_ends_ddp")
    debug_launcher(_accelerate_worker, args=(str(out),), num_processes=WORLD)
    accelerate = [torch.load(out / f"accelerate{r}.pt", weights_only=False) for r in range(WORLD)]
    return {"accelerate": accelerate, "lightning": _lightning_ddp(out)}


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for name, value in b.items():
        assert torch.equal(a[name], value), name


def test_both_front_ends_ran_two_processes(runs: dict[str, Any]) -> None:
    for name in ("full", "resumed"):
        assert [r["world"] for r in runs["lightning"][name]] == [WORLD, WORLD]
    for r in runs["accelerate"]:
        assert r["full"]["world"] == WORLD and "MULTI_CPU" in r["full"]["type"]
        assert r["full"]["engine"] == "replica"
        assert [(h["step"], h["epoch"]) for h in r["full"]["history"]] == [(2, 0), (4, 1), (6, 1)]


def test_same_merge_and_scores_through_both_front_ends(runs: dict[str, Any]) -> None:
    """Bit-identical merged weights, live weights and logged scores: every rank, both front ends."""
    reference = runs["lightning"]["full"][0]
    for lit, acc in zip(runs["lightning"]["full"], runs["accelerate"]):
        assert lit["history"] == acc["full"]["history"] == reference["history"]
        assert lit["counters"] == acc["full"]["counters"]
        _assert_equal(acc["full"]["merged"], lit["merged"])
        _assert_equal(lit["merged"], reference["merged"])
        _assert_equal(acc["full"]["state"], lit["state"])


def test_accelerate_resume_equals_uninterrupted(runs: dict[str, Any]) -> None:
    for r in runs["accelerate"]:
        full, resumed = r["full"], r["resumed"]
        assert resumed["history"] == full["history"]  # the merge before the save and the one after
        assert resumed["counters"] == full["counters"] and resumed["epoch"] == full["epoch"] == 2
        _assert_equal(resumed["merged"], full["merged"])
        _assert_equal(resumed["state"], full["state"])


def test_lightning_ddp_crash_and_resume_equals_uninterrupted(runs: dict[str, Any]) -> None:
    """Lightning DDP: crashed after step 5, resumed from the end-of-epoch-0 checkpoint
    (step 3, after the first merge) from a model of another seed. On every rank: the same history
    (the restored merge and the one after the resume), counters, last merge and weights as the
    uninterrupted fit — and as the resumed Accelerate run."""
    lightning = runs["lightning"]
    for full, resumed, acc in zip(lightning["full"], lightning["resumed"], runs["accelerate"]):
        assert [r["step"] for r in resumed["history"]] == [2, 4, 6]
        assert resumed["history"] == full["history"]
        assert resumed["counters"] == full["counters"]
        _assert_equal(resumed["merged"], full["merged"])
        _assert_equal(resumed["state"], full["state"])
        # both front ends' resumed runs agree
        assert (
            resumed["history"] == acc["resumed"]["history"]
            and resumed["counters"] == acc["resumed"]["counters"]
        )
        _assert_equal(resumed["merged"], acc["resumed"]["merged"])
        _assert_equal(resumed["state"], acc["resumed"]["state"])
