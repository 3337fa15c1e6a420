"""Issue 10 §2: the whole MergeCallback configured from a LightningCLI YAML file.

``tasks`` name the datamodule's validation dataloaders (by name, or by index) instead of
holding them, so every argument of the callback is plain YAML.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import yaml
from test_lightning_common import (
    CLASSES,
    HIDDEN,
    TASKS,
    acc_specs,
    backbone,
    branched,
    task_data,
    train_loaders,
    trainer,
)
from torch.utils.data import DataLoader

from drm_lightning.lightning import BranchedModule, MergeCallback

pytest.importorskip("jsonargparse", reason="LightningCLI needs jsonargparse[signatures]")


class CLIModel(BranchedModule):
    """``branched()`` with a constructor of plain values (what a CLI can build)."""

    def __init__(self, lr: float = 5e-2) -> None:
        super().__init__(backbone(0), {t: torch.nn.Linear(HIDDEN, CLASSES) for t in TASKS}, lr=lr)
        self.load_state_dict(branched(lr=lr).state_dict())


class CLIData(pl.LightningDataModule):
    """Training batches of every task; validation loaders returned by task name."""

    def train_dataloader(self) -> Any:
        return train_loaders()

    def val_dataloader(self) -> Any:
        return {t: DataLoader(task_data(t, 48, split=1), batch_size=16) for t in TASKS}


def _task(reference: str | int) -> dict[str, Any]:
    metric = {
        "class_path": "torchmetrics.classification.MulticlassAccuracy",
        "init_args": {"num_classes": CLASSES},
    }
    return {
        "class_path": "drm_lightning.evaluation.TaskSpec",
        "init_args": {"dataloader": reference, "metrics": metric},
    }


CONFIG: dict[str, Any] = {
    "seed_everything": False,
    "trainer": {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": 4,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
        "deterministic": True,
        "callbacks": [
            {
                "class_path": "drm_lightning.lightning.MergeCallback",
                "init_args": {
                    "method": "drm",
                    "method_params": {"drop_rate": 0.5},
                    "every_n_steps": 2,
                    # task b names its loader by index (the datamodule's second validation loader)
                    "tasks": {"a": _task("a"), "b": _task(1), "c": _task("c")},
                },
            }
        ],
    },
}


def test_callback_built_from_lightning_cli_yaml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.setattr(sys, "argv", ["cli"])  # the arguments are args=, not pytest's command line
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    assert "dataloader: a" in path.read_text()  # plain YAML: no object in the file
    cli = LightningCLI(
        CLIModel, CLIData, args=["fit", "--config", str(path)], save_config_callback=None
    )
    merges = [cb for cb in cli.trainer.callbacks if isinstance(cb, MergeCallback)]
    assert len(merges) == 1
    cb = merges[0]
    assert cb.every_n_steps == 2 and cb.method.params.drop_rate == 0.5
    assert [r["step"] for r in cb.history] == [2, 4]
    # The same run with the loaders themselves in TaskSpec: the same scores.
    direct = MergeCallback(
        "drm", method_params={"drop_rate": 0.5}, tasks=acc_specs(), every_n_steps=2
    )
    trainer(max_steps=4, callbacks=[direct], limit_val_batches=0).fit(branched(), train_loaders())

    def strip(h: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if not k.startswith("merge/")} for r in h]

    assert strip(cb.history) == strip(direct.history)
