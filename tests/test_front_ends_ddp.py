"""Both front ends in 2 CPU processes (gloo): Lightning ``ddp_spawn`` and Accelerate multi-CPU
(``accelerate.debug_launcher``) give identical merged weights and scores; an Accelerate run
interrupted by ``save_state`` and resumed by ``load_state`` in a fresh ``Accelerator`` equals
the uninterrupted one.

The scenario is ``test_accelerate_hook``'s: a branched MLP trained with AdamW on every task each
step, DRM every 2 optimizer steps over 4 steps, every task scored. Every rank trains on all the
data (Lightning: ``use_distributed_sampler=False``; Accelerate: the training loaders are not
prepared), so DDP averages identical gradients; the evaluation batches are shared out by index.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from test_accelerate_hook import DRM, EVERY, STEPS, _accelerator, _branched_model, _scores
from test_lightning_common import TASKS, acc_specs, branched, clone_state, train_loaders, trainer
from torch.nn import functional as F

from drm_lightning.accelerate import MergeHook
from drm_lightning.lightning import MergeCallback

WORLD = 2
pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]


class _Record(Callback):
    """Each spawned rank saves what the parent cannot see (``ddp_spawn`` copies no callback state back)."""

    def __init__(self, out: Path, merge: MergeCallback) -> None:
        self.out, self.merge = out, merge

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        record = {
            "world": trainer.world_size, "history": _scores(self.merge.history),
            "merged": self.merge.last_merged, "state": clone_state(pl_module),
        }
        torch.save(record, self.out / f"lightning{trainer.global_rank}.pt")


def _lightning_ddp(out: Path) -> list[dict[str, Any]]:
    merge = MergeCallback("drm", method_params=DRM, tasks=acc_specs(), every_n_steps=EVERY)
    tr = trainer(
        devices=WORLD, strategy=DDPStrategy(start_method="spawn", process_group_backend="gloo"), max_steps=STEPS,
        callbacks=[merge, _Record(out, merge)], deterministic=False, use_distributed_sampler=False,
    )
    tr.fit(branched(), train_loaders())
    return [torch.load(out / f"lightning{r}.pt", weights_only=False) for r in range(WORLD)]


# ---------------------------------------------------------------------- Accelerate (each rank)


def _prepared(accelerator: Any, seed: int = 0) -> tuple[Any, Any, MergeHook]:
    model = _branched_model(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2, weight_decay=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    hook = MergeHook(accelerator, model, "drm", method_params=DRM, tasks=acc_specs(), every_n_steps=EVERY)
    return model, optimizer, hook


def _train(accelerator: Any, model: Any, optimizer: Any, hook: MergeHook, steps: range) -> None:
    loaders = train_loaders()
    batches = list(zip(*(loaders[t] for t in TASKS)))
    for step in steps:
        loss = torch.stack([F.cross_entropy(model(x, t), y) for t, (x, y) in zip(TASKS, batches[step])]).sum()
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        hook.step()


def _result(accelerator: Any, hook: MergeHook) -> dict[str, Any]:
    return {
        "world": accelerator.num_processes, "type": str(accelerator.distributed_type), "history": _scores(hook.history),
        "merged": hook.last_merged, "state": clone_state(hook.unwrapped), "engine": hook.core._last.engine,
    }


def _accelerate_worker(outdir: str) -> None:
    torch.set_num_threads(1)
    out = Path(outdir)
    accelerator = _accelerator()
    model, optimizer, hook = _prepared(accelerator)
    with hook:
        _train(accelerator, model, optimizer, hook, range(STEPS))
    results = {"full": _result(accelerator, hook)}

    # Interrupted after the first merge: save_state; then a fresh Accelerator, a model built
    # from another seed (everything must come from the checkpoint), load_state, the rest.
    accelerator = _accelerator()
    model, optimizer, hook = _prepared(accelerator)
    accelerator.register_for_checkpointing(hook)
    with hook:
        _train(accelerator, model, optimizer, hook, range(EVERY + 1))
        accelerator.save_state(str(out / "state"))
    accelerator = _accelerator()
    model, optimizer, hook = _prepared(accelerator, seed=5)
    accelerator.register_for_checkpointing(hook)
    accelerator.load_state(str(out / "state"))
    with hook:
        _train(accelerator, model, optimizer, hook, range(EVERY + 1, STEPS))
    results["resumed"] = _result(accelerator, hook)
    torch.save(results, out / f"accelerate{accelerator.process_index}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
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


def test_both_front_ends_ran_two_processes(runs: dict[str, list[dict[str, Any]]]) -> None:
    assert [r["world"] for r in runs["lightning"]] == [WORLD, WORLD]
    for r in runs["accelerate"]:
        assert r["full"]["world"] == WORLD and "MULTI_CPU" in r["full"]["type"]
        assert r["full"]["engine"] == "replica"
        assert [h["step"] for h in r["full"]["history"]] == [EVERY, STEPS]


def test_same_merge_and_scores_through_both_front_ends(runs: dict[str, list[dict[str, Any]]]) -> None:
    """Bit-identical merged weights, live weights and logged scores: every rank, both front ends."""
    reference = runs["lightning"][0]
    for lit, acc in zip(runs["lightning"], runs["accelerate"]):
        assert lit["history"] == acc["full"]["history"] == reference["history"]
        _assert_equal(acc["full"]["merged"], lit["merged"])
        _assert_equal(lit["merged"], reference["merged"])
        _assert_equal(acc["full"]["state"], lit["state"])


def test_accelerate_resume_equals_uninterrupted(runs: dict[str, list[dict[str, Any]]]) -> None:
    for r in runs["accelerate"]:
        full, resumed = r["full"], r["resumed"]
        assert resumed["history"] == full["history"]  # the merge before the save and the one after
        _assert_equal(resumed["merged"], full["merged"])
        _assert_equal(resumed["state"], full["state"])
