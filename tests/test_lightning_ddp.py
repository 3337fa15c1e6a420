"""MergeCallback under DDP: 2 CPU processes (``ddp_spawn``; forked for the NaN test), gloo;
replica engine, merges identical on every rank."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from test_lightning_common import (
    TASKS,
    assert_state_equal,
    branched,
    clone_state,
    specs,
    train_loaders,
    trainer,
)

from drm_lightning.evaluation import evaluate_task
from drm_lightning.lightning import MergeCallback
from drm_lightning.merge.routing import Routing

MERGE_STEPS = (2, 4)


class DriftOnRankOne(Callback):
    """Runs before the merge callback: on rank 1 only, the branches drift right before a merge.

    The replica engine merges each tensor on one owner rank and broadcasts it: even with
    inputs that differ between ranks, every rank ends up with bit-identical merged weights.
    """

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        if trainer.global_rank == 1 and trainer.global_step in MERGE_STEPS:
            with torch.no_grad():
                for name, p in pl_module.named_parameters():
                    if name.startswith(("branches.", "backbone.")):
                        p.add_(0.01)


class Record(Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        record: dict[str, Any] = {"state": clone_state(pl_module)}
        for cb in trainer.callbacks:
            if isinstance(cb, MergeCallback):
                record[cb.mode] = {
                    "history": [
                        {k: v for k, v in r.items() if not k.startswith("merge/")}
                        for r in cb.history
                    ],
                    "merged": cb.last_merged,
                    "snapshots": [s.path for s in cb._snapshots],
                }
        torch.save(record, self.out / f"rank{trainer.global_rank}.pt")


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_ddp_merges_identical_on_every_rank(tmp_path: Path) -> None:
    live = MergeCallback(
        "drm", method_params={"drop_rate": 0.5}, tasks=specs(), every_n_steps=2, adopt=True
    )
    snapshots = MergeCallback(
        "drm",
        branches="snapshots",
        snapshot_every_n_steps=1,
        every_n_steps=2,
        routing=Routing(ignore=[r"heads\."]),
        snapshot_dir=tmp_path / "snaps",
    )
    tr = trainer(
        devices=2,
        strategy=DDPStrategy(start_method="spawn", process_group_backend="gloo"),
        max_steps=MERGE_STEPS[-1],
        callbacks=[DriftOnRankOne(), live, snapshots, Record(tmp_path)],
        deterministic=False,
    )
    tr.fit(branched(), train_loaders(n=64))
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))

    assert [r["step"] for r in rank0["live"]["history"]] == list(MERGE_STEPS)
    assert_state_equal(rank0["live"]["merged"], rank1["live"]["merged"])  # bit-identical merges
    assert_state_equal(
        rank0["state"], rank1["state"]
    )  # adopted identically: the ranks stay in sync
    assert rank0["live"]["history"] == rank1["live"]["history"]  # identical scores on every rank

    # Scores computed on half the validation batches per rank and synchronised by torchmetrics
    # equal a single-process evaluation of the merged model on all of them.
    merged_model = branched()
    merged_model.load_state_dict(rank0["state"])
    for t in TASKS:
        expected = evaluate_task(merged_model, t, specs()[t])
        assert rank0["live"]["history"][-1][f"merged/{t}/acc"] == pytest.approx(expected["acc"])
        assert rank0["live"]["history"][-1][f"merged/{t}/micro"] == pytest.approx(expected["micro"])

    # Snapshots on disk: written once (rank 0), seen by both ranks; merges identical.
    paths = rank0["snapshots"]["snapshots"]
    assert paths == rank1["snapshots"]["snapshots"] and len(paths) == 4
    assert all(Path(p).exists() for p in paths)
    assert_state_equal(rank0["snapshots"]["merged"], rank1["snapshots"]["merged"])


class PoisonOnRankOne(Callback):
    """Runs before the merge callback: on rank 1 only, a NaN enters
    branch b right before the merge."""

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        if trainer.global_rank == 1 and trainer.global_step == MERGE_STEPS[0]:
            with torch.no_grad():
                pl_module.branches["b"][0].weight[0, 0] = float("nan")


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_ddp_nan_in_one_rank_branch_stops_the_run_naming_it(tmp_path: Path) -> None:
    """Issue 8: a NaN in a branch on one rank stops the DDP run at the
    merge, tensor and branch named. The ranks are forked (``ddp_spawn`` is the test above's):
    a spawned rank imports Lightning afresh, ≈ 6 s of CPU per rank."""
    merge = MergeCallback("drm", method_params={"drop_rate": 0.5}, tasks=specs(), every_n_steps=2)
    tr = trainer(
        devices=2,
        strategy=DDPStrategy(start_method="fork", process_group_backend="gloo"),
        max_steps=MERGE_STEPS[-1],
        callbacks=[PoisonOnRankOne(), merge],
        deterministic=False,
    )
    with pytest.raises(Exception, match=r"'0\.weight' in branch 1 \(branch 'b'\) contains 1 NaN"):
        tr.fit(branched(), train_loaders(n=64))
