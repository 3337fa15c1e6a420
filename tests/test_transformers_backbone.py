"""Transformers backbones in a branched model (issue 23 items 1 and 5).

``BranchedModule(BertModel(config), heads)`` trains, merges and exports as it is (the pooled
output, else the first token, reaches the heads; ``features=`` for anything else), and the
export loads with ``AutoModel.from_pretrained`` with no missing or unexpected weights. The
Accelerate hook's per-merge line reaches stdout without any logging configuration.
Tiny configs built in the test: nothing is downloaded.
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from test_accelerate_hook import _accelerator
from test_lightning_common import trainer
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

from drm_lightning.accelerate import MergeHook
from drm_lightning.evaluation import TaskSpec
from drm_lightning.inloop import BranchedModel
from drm_lightning.inloop.branched import backbone_features
from drm_lightning.lightning import BranchedModule, MergeCallback

transformers = pytest.importorskip("transformers")
from lightning.pytorch.loggers import Logger  # noqa: E402

VOCAB, HIDDEN, SEQ, CLASSES = 100, 32, 6, 3
TASKS = ("a", "b")


def bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
    )
    return transformers.BertModel(config)


def llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    return transformers.LlamaModel(config)


def last_token(out: Any) -> Tensor:
    """Features of a decoder-only backbone: the last position sees the whole sequence."""
    return out.last_hidden_state[:, -1]


def data(task: int, n: int, seed: int) -> list[tuple[Tensor, int]]:
    """Token sequences labelled by the count of token ``task`` among them (mod CLASSES)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (n, SEQ), generator=gen)
    return [(row, int((row == task).sum()) % CLASSES) for row in x]


def loaders(seed: int = 0) -> dict[str, DataLoader]:
    return {t: DataLoader(data(i, 16, seed + i), batch_size=8) for i, t in enumerate(TASKS)}


def specs() -> dict[str, TaskSpec]:
    return {
        t: TaskSpec(DataLoader(data(i, 8, 100 + i), batch_size=8), MulticlassAccuracy(CLASSES))
        for i, t in enumerate(TASKS)
    }


class Recorder(Logger):
    """Keeps every ``log_metrics`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[dict[str, float]] = []

    name = property(lambda self: "recorder")
    version = property(lambda self: 0)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.logged.append(dict(metrics))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


def merged_backbone(model: nn.Module, merged: dict[str, Tensor]) -> nn.Module:
    """The model's backbone with the merged weights (buffers as trained)."""
    body = copy.deepcopy(model.base)
    body.load_state_dict(merged)
    return body


@pytest.mark.parametrize(
    ("make", "features", "pooled"),
    [(bert, None, "pooler_output"), (llama, last_token, None)],
    ids=["bert-default", "llama-features"],
)
def test_transformers_backbone_fits_merges_and_exports(
    tmp_path: Path, make: Any, features: Any, pooled: str | None
) -> None:
    model = BranchedModule(
        make(), {t: nn.Linear(HIDDEN, CLASSES) for t in TASKS}, features=features, lr=1e-2
    )
    x = torch.stack([row for row, _ in data(0, 4, 7)])
    model.eval()  # no dropout
    body = model.branches["a"]
    expected = model.heads["a"](
        getattr(body(x), pooled) if pooled else last_token(body(x))
    )  # the documented default (pooled output) or the callable
    torch.testing.assert_close(model(x, "a"), expected, rtol=0, atol=0)
    model.train()

    out = tmp_path / "export"
    recorder = Recorder()
    cb = MergeCallback("ties", tasks=specs(), every_n_steps=2, export_dir=out)
    trainer(max_steps=4, callbacks=[cb], logger=recorder).fit(model, loaders())
    assert [r["step"] for r in cb.history] == [2, 4]
    assert any("merged/a/MulticlassAccuracy" in m for m in recorder.logged), recorder.logged
    assert any("normalized/average" in m for m in recorder.logged)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded, info = transformers.AutoModel.from_pretrained(out, output_loading_info=True)
    assert [str(w.message) for w in caught] == []
    assert type(loaded) is type(model.base)
    assert {k: v for k, v in info.items() if v} == {}, info  # missing/unexpected/mismatched
    assert cb.last_merged is not None
    state = loaded.state_dict()
    for name, value in cb.last_merged.items():
        assert torch.equal(state[name], value), name
    reference = merged_backbone(model, cb.last_merged).eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(x).last_hidden_state, reference(x).last_hidden_state, rtol=0, atol=0
        )
    assert (out / "heads.safetensors").is_file()


def test_from_pretrained_logs_no_missing_weights(tmp_path: Path) -> None:
    """transformers' own logger warns of nothing when the export is loaded."""
    model = BranchedModule(bert(), {t: nn.Linear(HIDDEN, CLASSES) for t in TASKS})
    out = tmp_path / "export"
    cb = MergeCallback("task_arithmetic", every_n_steps=2, export_dir=out)
    trainer(max_steps=2, callbacks=[cb]).fit(model, loaders())
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(handler)
    try:
        transformers.AutoModel.from_pretrained(out)
    finally:
        hf_logger.removeHandler(handler)
    # a missing or unexpected weight is a WARNING ("LOAD REPORT" in transformers 5)
    assert [r.getMessage() for r in records if r.levelno >= logging.WARNING] == []


def test_default_features_and_refusals() -> None:
    torch.manual_seed(0)
    config = bert().config
    no_pooler = transformers.BertModel(config, add_pooling_layer=False)
    x = torch.randint(0, VOCAB, (2, SEQ))
    out = no_pooler(x)
    assert torch.equal(backbone_features(out), out.last_hidden_state[:, 0])  # first token
    tensor = torch.randn(2, 4)
    assert backbone_features(tensor) is tensor  # tensor backbones: unchanged
    pair = (tensor, tensor)
    assert backbone_features(pair) is pair
    logits = transformers.modeling_outputs.SequenceClassifierOutput(logits=tensor)
    with pytest.raises(TypeError, match=r"SequenceClassifierOutput.*'logits'.*features="):
        backbone_features(logits)
    with pytest.raises(TypeError, match="features must be a callable"):
        BranchedModule(nn.Linear(2, 2), {"a": nn.Linear(2, 2)}, features="pooler_output")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"features \(Linear\) holds weights"):
        BranchedModel(nn.Linear(2, 2), {"a": nn.Linear(2, 2)}, features=nn.Linear(2, 2))


def test_tensor_backbone_unchanged() -> None:
    torch.manual_seed(0)
    model = BranchedModule(nn.Linear(4, 8), {"a": nn.Linear(8, 2)})
    x = torch.randn(3, 4)
    assert torch.equal(model(x, "a"), model.heads["a"](model.branches["a"](x)))
    assert sorted(model.state_dict()) == sorted(
        ["base.weight", "base.bias", "branches.a.weight", "branches.a.bias"]
        + ["heads.a.weight", "heads.a.bias"]
    )


def test_features_must_be_passed_again_at_load(tmp_path: Path) -> None:
    model = BranchedModule(
        llama(), {t: nn.Linear(HIDDEN, CLASSES) for t in TASKS}, features=lambda o: last_token(o)
    )
    fit = trainer(max_steps=1)
    fit.fit(model, loaders())
    path = tmp_path / "m.ckpt"
    fit.save_checkpoint(path)
    parts = {"backbone": llama(), "heads": {t: nn.Linear(HIDDEN, CLASSES) for t in TASKS}}
    with pytest.raises(ValueError, match=r"m\.ckpt: the checkpoint was trained with features=.*"):
        BranchedModule.load_from_checkpoint(path, **parts)
    with pytest.raises(ValueError, match=r"m\.ckpt: features=.*<lambda> could not be stored"):
        BranchedModule.load_from_checkpoint(path, trust_pickles=True)
    x = torch.randint(0, VOCAB, (2, SEQ))
    for loaded in (
        BranchedModule.load_from_checkpoint(path, features=last_token, **parts),
        BranchedModule.load_from_checkpoint(path, trust_pickles=True, features=last_token),
    ):
        torch.testing.assert_close(loaded(x, "b"), model(x, "b"), rtol=0, atol=0)

    model.features = last_token  # a module-level function is pickled with the architecture
    fit.save_checkpoint(path)
    rebuilt = BranchedModule.load_from_checkpoint(path, trust_pickles=True)
    assert rebuilt.features is last_token


def _hook_run() -> None:
    """Two optimizer steps of a Bert BranchedModel under MergeHook, a merge after each."""
    accelerator = _accelerator()
    model = BranchedModel(bert(), {t: nn.Linear(HIDDEN, CLASSES) for t in TASKS})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    batches = {t: next(iter(loader)) for t, loader in loaders().items()}
    with MergeHook(accelerator, model, "ties", tasks=specs(), every_n_steps=1) as hook:
        for _ in range(2):
            loss = sum(F.cross_entropy(model(x, t), y) for t, (x, y) in batches.items())
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            hook.step()


def test_hook_prints_one_line_per_merge_without_logging_config(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """Item 5: MergeHook's per-merge line reaches stdout with logging left as it is; once
    logging is set to INFO it goes to the logger instead (not twice)."""
    name = "drm_lightning.accelerate.hook"
    assert not logging.getLogger(name).isEnabledFor(logging.INFO)
    _hook_run()
    lines = [line for line in capsys.readouterr().out.splitlines() if "MergeHook: merge" in line]
    assert len(lines) == 2, lines

    with caplog.at_level(logging.INFO, logger=name):
        _hook_run()
    assert [r.getMessage()[:16] for r in caplog.records if r.name == name] == [
        "MergeHook: merge"
    ] * 2
    assert "MergeHook: merge" not in capsys.readouterr().out
