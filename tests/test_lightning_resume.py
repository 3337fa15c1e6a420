"""Checkpoint semantics of MergeCallback: crash-and-resume equals an
uninterrupted run; load cases."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from test_lightning_common import (
    MultiHead,
    acc_specs,
    assert_state_equal,
    branched,
    clone_state,
    train_loaders,
    trainer,
)

from drm_lightning.lightning import BranchedModule, MergeCallback
from drm_lightning.merge.routing import Routing


class Crash(Callback):
    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.at_step:
            raise RuntimeError("simulated crash")


def _scores(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if not k.startswith("merge/")} for r in history]


def _run(
    make_model: Any,
    make_cb: Any,
    tmp: Path,
    *,
    max_epochs: int,
    n: int = 32,
    crash_at: int | None = None,
    resume: str | None = None,
) -> tuple[pl.LightningModule, MergeCallback]:
    model, cb = make_model(), make_cb(tmp)
    ckpt = ModelCheckpoint(
        dirpath=tmp / "ckpt", every_n_epochs=1, save_top_k=-1, filename="{epoch}"
    )
    callbacks: list[Callback] = [cb, ckpt] + ([Crash(crash_at)] if crash_at is not None else [])
    tr = trainer(max_epochs=max_epochs, callbacks=callbacks, enable_checkpointing=True)
    if crash_at is None:
        tr.fit(model, train_loaders(n=n), ckpt_path=resume)
    else:
        with pytest.raises(RuntimeError, match="simulated crash"):
            tr.fit(model, train_loaders(n=n), ckpt_path=resume)
    return model, cb


def _live_model() -> BranchedModule:
    return branched()


def _live_cb(tmp: Path) -> MergeCallback:
    return MergeCallback(
        "drm", method_params={"drop_rate": 0.5}, tasks=acc_specs(), every_n_steps=3, adopt=True
    )


def _snap_model(seed: int = 0) -> MultiHead:
    return MultiHead(seed=seed)


def _snap_cb(on_disk: bool) -> Any:
    def make(tmp: Path) -> MergeCallback:
        return MergeCallback(
            "drm",
            method_params={"drop_rate": 0.3},
            branches="snapshots",
            tasks=acc_specs(),
            snapshot_every_n_epochs=1,
            every_n_epochs=2,
            routing=Routing(ignore=[r"heads\."]),
            snapshot_dir=tmp / "snaps" if on_disk else None,
        )

    return make


def _assert_same_run(
    a: tuple[pl.LightningModule, MergeCallback], b: tuple[pl.LightningModule, MergeCallback]
) -> None:
    assert_state_equal(clone_state(a[0]), clone_state(b[0]))
    assert _scores(a[1].history) == _scores(b[1].history)
    assert a[1].last_merged is not None and b[1].last_merged is not None
    assert_state_equal(a[1].last_merged, b[1].last_merged)


def test_crash_and_resume_live_consolidation(tmp_path: Path) -> None:
    full = _run(_live_model, _live_cb, tmp_path / "full", max_epochs=3, n=64)
    assert [r["step"] for r in full[1].history] == [3, 6, 9, 12]
    _run(_live_model, _live_cb, tmp_path / "crash", max_epochs=3, n=64, crash_at=10)
    ckpt = tmp_path / "crash" / "ckpt" / "epoch=1.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    state = next(v for k, v in saved["callbacks"].items() if "MergeCallback" in k)
    assert state["latest_merge_step"] == 6 and state["num_merges"] == 2  # small counters
    resumed = _run(_live_model, _live_cb, tmp_path / "crash", max_epochs=3, n=64, resume=str(ckpt))
    _assert_same_run(full, resumed)


@pytest.mark.parametrize("on_disk", [False, True])
def test_crash_and_resume_snapshots(tmp_path: Path, on_disk: bool) -> None:
    full = _run(_snap_model, _snap_cb(on_disk), tmp_path / "full", max_epochs=4)
    assert [r["epoch"] for r in full[1].history] == [1, 3]
    assert [s.task for s in full[1]._snapshots] == ["a", "b", "c", "a"]
    _run(_snap_model, _snap_cb(on_disk), tmp_path / "crash", max_epochs=4, crash_at=7)
    ckpt = tmp_path / "crash" / "ckpt" / "epoch=2.ckpt"
    # The resumed model starts from other weights: the base must come from the checkpoint.
    resumed = _run(
        lambda: _snap_model(seed=5),
        _snap_cb(on_disk),
        tmp_path / "crash",
        max_epochs=4,
        resume=str(ckpt),
    )
    assert [s.task for s in resumed[1]._snapshots] == ["a", "b", "c", "a"]
    _assert_same_run(full, resumed)


class _Validating(BranchedModule):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        return None


def test_load_outside_fit_warns(tmp_path: Path) -> None:
    model = _Validating(branched().base, {t: torch.nn.Linear(16, 3) for t in "abc"})
    fit_tr = trainer(max_steps=2, callbacks=[MergeCallback("drm", every_n_steps=2)])
    fit_tr.fit(model, train_loaders())
    path = tmp_path / "x.ckpt"
    fit_tr.save_checkpoint(path)
    with pytest.warns(UserWarning, match="loading a checkpoint outside fit"):
        trainer(callbacks=[MergeCallback("drm", every_n_steps=2)]).validate(
            model, train_loaders()["a"], ckpt_path=path
        )


def test_load_ours_and_foreign(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A checkpoint written without the callback ("foreign") ...
    foreign_tr = trainer(
        max_steps=2, callbacks=[ModelCheckpoint(dirpath=tmp_path)], enable_checkpointing=True
    )
    trained = MultiHead()
    foreign_tr.fit(trained, train_loaders(n=32))
    foreign = tmp_path / "foreign.ckpt"
    foreign_tr.save_checkpoint(foreign)
    cb = MergeCallback("drm", branches="snapshots", snapshot_every_n_steps=1, every_n_steps=1)
    with pytest.warns(
        UserWarning,
        match="not written with this callback; the merge base is the weights just loaded",
    ):
        trainer(max_steps=3, callbacks=[cb]).fit(
            MultiHead(seed=3), train_loaders(n=32), ckpt_path=foreign
        )
    assert cb._base is not None
    assert_state_equal(cb._base, {k: v for k, v in clone_state(trained).items()})
    assert [s.step for s in cb._snapshots] == [3]  # counters start at zero, nothing restored

    # ... and one written with it ("ours").
    ours = tmp_path / "ours.ckpt"
    tr = trainer(
        max_steps=2,
        callbacks=[
            MergeCallback("drm", branches="snapshots", snapshot_every_n_steps=1, every_n_steps=2)
        ],
    )
    tr.fit(MultiHead(), train_loaders(n=32))
    tr.save_checkpoint(ours)
    resumed = MergeCallback("drm", branches="snapshots", snapshot_every_n_steps=1, every_n_steps=2)
    with caplog.at_level(logging.INFO), warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "foreign" warning
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        warnings.filterwarnings("ignore", message=".*(dataloader|num_workers|log_every_n_steps).*")
        trainer(max_steps=3, callbacks=[resumed]).fit(
            MultiHead(seed=3), train_loaders(n=32), ckpt_path=ours
        )
    assert [s.step for s in resumed._snapshots] == [1, 2, 3]
    assert [r["step"] for r in resumed.history] == [2]  # history restored, no merge at step 3
    assert resumed._num_merges == 1


def test_checkpoint_of_another_configuration_is_foreign(tmp_path: Path) -> None:
    tr = trainer(
        max_steps=1,
        callbacks=[
            MergeCallback("drm", branches="snapshots", snapshot_every_n_steps=1, every_n_steps=1)
        ],
    )
    tr.fit(MultiHead(), train_loaders(n=32))
    tr.save_checkpoint(tmp_path / "s.ckpt")
    path_cb = MergeCallback("drm", branches=[tmp_path / "s.ckpt"], every_n_steps=1)
    with pytest.warns(
        UserWarning, match=r"holds the merge state of other MergeCallback configurations"
    ):
        trainer(max_steps=2, callbacks=[path_cb]).fit(
            MultiHead(), train_loaders(n=32), ckpt_path=tmp_path / "s.ckpt"
        )
