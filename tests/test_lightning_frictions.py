"""Issue 10 §2: what a new Lightning user ran into, one test each."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from test_lightning_common import (
    CLASSES,
    TASKS,
    acc_specs,
    branched,
    clone_state,
    task_data,
    train_loaders,
    trainer,
)
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

from drm_lightning.evaluation import TaskSpec, evaluate_task
from drm_lightning.lightning import BranchedModule, MergeCallback


class _Validating(BranchedModule):
    """A BranchedModule with the user's own validation_step (one val
    loader per task, in TASKS order)."""

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        task = TASKS[dataloader_idx]
        x, y = batch
        acc = (self(x, task).argmax(-1) == y).float().mean()
        self.log(f"val/{task}/acc", acc, add_dataloader_idx=False)


def _val_loaders() -> list[DataLoader]:
    return [DataLoader(task_data(t, 48, split=1), batch_size=48) for t in TASKS]


def _validating(lr: float = 5e-2) -> _Validating:
    src = branched(lr=lr)
    model = _Validating(src.base, dict(src.heads), lr=lr)
    model.load_state_dict(src.state_dict())
    with torch.no_grad():
        for branch in model.branches.values():
            for p in branch.parameters():
                p.requires_grad_(True)
    return model


def test_validate_and_test_score_the_merge() -> None:
    model = _validating()
    cb = MergeCallback("task_arithmetic", every_n_steps=2, validate_merged=True)
    tr = trainer(max_steps=2, callbacks=[cb])
    tr.fit(model, train_loaders())
    live = clone_state(model)
    merged_metrics = _flat(tr.validate(model, _val_loaders(), verbose=False))
    assert all(torch.equal(v, clone_state(model)[k]) for k, v in live.items())  # restored
    plain = MergeCallback("task_arithmetic", every_n_steps=2)
    live_metrics = _flat(trainer(callbacks=[plain]).validate(model, _val_loaders(), verbose=False))
    # The merge, scored by hand: merged backbone into every branch.
    assert cb.last_merged is not None
    expected = {}
    for i, t in enumerate(TASKS):
        x, y = task_data(t, 48, split=1).tensors
        body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16))
        body.load_state_dict(cb.last_merged)
        expected[f"val/{t}/acc"] = float((model.heads[t](body(x)).argmax(-1) == y).float().mean())
    assert {k: pytest.approx(v) for k, v in expected.items()} == merged_metrics
    assert merged_metrics != live_metrics


def _flat(results: list[dict[str, float]]) -> dict[str, float]:
    return {k: v for result in results for k, v in result.items()}


def test_tasks_name_datamodule_val_loaders() -> None:
    class DM(pl.LightningDataModule):
        def train_dataloader(self) -> Any:
            return train_loaders()

        def val_dataloader(self) -> Any:
            return {t: DataLoader(task_data(t, 48, split=1), batch_size=16) for t in TASKS}

    by_name = MergeCallback(
        "drm",
        every_n_steps=2,
        tasks={t: TaskSpec(t, MulticlassAccuracy(num_classes=CLASSES)) for t in TASKS},
    )
    by_ref = MergeCallback("drm", every_n_steps=2, tasks=acc_specs())
    model_a, model_b = branched(), branched()
    trainer(max_steps=2, callbacks=[by_name], limit_val_batches=0).fit(model_a, datamodule=DM())
    trainer(max_steps=2, callbacks=[by_ref], limit_val_batches=0).fit(model_b, train_loaders())
    strip = lambda h: [{k: v for k, v in r.items() if not k.startswith("merge/")} for r in h]  # noqa: E731
    assert strip(by_name.history) == strip(by_ref.history)
    bad = MergeCallback(
        "drm",
        every_n_steps=2,
        tasks={t: TaskSpec("zzz", MulticlassAccuracy(num_classes=CLASSES)) for t in TASKS},
    )
    with pytest.raises(ValueError, match=r"dataloader='zzz'.*have \['a', 'b', 'c'\]"):
        trainer(max_steps=1, callbacks=[bad]).fit(branched(), datamodule=DM())


def test_load_from_checkpoint(tmp_path: Path) -> None:
    model = branched()
    tr = trainer(max_steps=2)
    tr.fit(model, train_loaders())
    tr.save_checkpoint(tmp_path / "m.ckpt")
    with pytest.raises(ValueError, match="trust_pickles=True"):
        BranchedModule.load_from_checkpoint(tmp_path / "m.ckpt")
    loaded = BranchedModule.load_from_checkpoint(tmp_path / "m.ckpt", trust_pickles=True)
    assert loaded.task_names == list(TASKS) and loaded.lr == model.lr
    for k, v in clone_state(model).items():
        assert torch.equal(loaded.state_dict()[k], v), k
    given = BranchedModule.load_from_checkpoint(
        tmp_path / "m.ckpt", backbone=branched().base, heads=dict(branched().heads)
    )
    assert torch.equal(given.branches["a"][0].weight, model.branches["a"][0].weight)


def test_one_log_line_per_merge(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        trainer(
            max_steps=4, callbacks=[MergeCallback("drm", every_n_steps=2, tasks=acc_specs())]
        ).fit(branched(), train_loaders())
    lines = [r.getMessage() for r in caplog.records if "MergeCallback: merge" in r.getMessage()]
    assert len(lines) == 2
    assert lines[1].startswith("MergeCallback: merge 2 at step 4") and "merged/average=" in lines[1]


def test_final_weights_merged_with_adopt_false() -> None:
    model = branched()
    cb = MergeCallback("drm", every_n_steps=2, final_weights="merged")
    trainer(max_steps=3, callbacks=[cb]).fit(
        model, train_loaders()
    )  # last merge at step 2: merged again
    state = clone_state(model)
    final = cb.core.latest(model, step=3).values
    for prefix in ["base."] + [f"branches.{t}." for t in TASKS]:
        assert all(torch.equal(state[prefix + k], v) for k, v in final.items())
    with pytest.raises(ValueError, match="final_weights"):
        MergeCallback("drm", final_weights="average")  # type: ignore[arg-type]


def test_hf_export_loads_with_from_pretrained(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    backbone = transformers.BertModel(config)

    class Branched(BranchedModule):
        def forward(self, x: Tensor, task: str) -> Tensor:
            return self.heads[task](self.branches[task](input_ids=x).last_hidden_state[:, 0])

    heads = {t: nn.Linear(16, 2) for t in ("a", "b")}
    model = Branched(backbone, heads)
    gen = torch.Generator().manual_seed(0)
    data = {
        t: DataLoader(
            [(torch.randint(0, 40, (6,), generator=gen), i % 2) for i in range(16)], batch_size=8
        )
        for t in heads
    }
    out = tmp_path / "export"
    cb = MergeCallback("task_arithmetic", every_n_steps=2, export_dir=out)
    trainer(max_steps=2, callbacks=[cb]).fit(model, data)
    assert (out / "config.json").is_file() and (out / "heads.safetensors").is_file()
    loaded = transformers.AutoModel.from_pretrained(out)
    assert type(loaded).__name__ == "BertModel"
    assert cb.last_merged is not None
    for name, value in cb.last_merged.items():
        assert torch.equal(loaded.state_dict()[name], value), name
    card = (out / "README.md").read_text()
    assert "| 0 | `a: branch 'a'` | 1.0 |" in card  # the Inputs table lists the branches


def test_model_output_logits_are_scored() -> None:
    transformers = pytest.importorskip("transformers")

    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(8, CLASSES)

        def forward(self, x: Tensor) -> Any:
            return transformers.modeling_outputs.SequenceClassifierOutput(logits=self.linear(x))

    model = Classifier()
    spec = TaskSpec(
        DataLoader(task_data("a", 32, split=1), batch_size=16),
        MulticlassAccuracy(num_classes=CLASSES),
    )
    x, y = task_data("a", 32, split=1).tensors
    expected = MulticlassAccuracy(num_classes=CLASSES)(model.linear(x), y).item()
    assert evaluate_task(model, "a", spec)["MulticlassAccuracy"] == pytest.approx(expected)
    assert F.softmax(model(x).logits, -1).shape == (32, CLASSES)
