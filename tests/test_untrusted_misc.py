"""Smaller bad inputs of issue 20 (item 8), each refused at once with a clear message.

* a FIFO (or another non-regular file) as the config: refused before it is opened, instead
  of blocking the read forever (``--dry-run`` too);
* a YAML alias bomb ("billion laughs", merge-key variant, thousands of aliases) and a config
  over 1 MiB: refused while composing, with the file, line and column, before anything expands;
* an empty validation dataloader: refused at setup by both in-loop front ends (the shared
  core), naming the task, not at the first merge;
* ``MergeHook.step()`` outside ``with MergeHook(...)``: refused at the first call, even when no
  merge is due;
* calibration batches of the wrong dtype for the model: refused naming the batches file or
  function, the dtype and what the model's first layer takes, before any tracing (instead of
  a ``torch.fx`` ShapeProp traceback).
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from test_lightning_common import CLASSES, DIM, TASKS, acc_specs, branched, train_loaders, trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from drm_lightning.config.errors import ConfigError
from drm_lightning.config.loading import MAX_CONFIG_BYTES, load_config, parse_config
from drm_lightning.config.yaml_file import load_yaml
from drm_lightning.evaluation import TaskSpec

# ------------------------------------------------------------ config file


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
@pytest.mark.timeout(30, method="signal")  # without the check the read blocks forever
def test_fifo_as_config_is_refused_not_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fifo = tmp_path / "cfg.yaml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match=r"cfg\.yaml is not a regular file \(a FIFO\)"):
        load_config(fifo)
    from drm_lightning.cli.command import main

    out = tmp_path / "out"
    assert main([str(fifo), "-o", str(out), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "is not a regular file (a FIFO)" in err and "Traceback" not in err and not out.exists()


def test_other_non_regular_files_and_oversized_configs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"is not a regular file \(a folder\)"):
        load_config(tmp_path)
    if os.path.exists("/dev/zero"):  # endless: read_text would never return
        with pytest.raises(
            ConfigError, match=r"/dev/zero is not a regular file \(a character device\)"
        ):
            load_config("/dev/zero")
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * (MAX_CONFIG_BYTES // 10 + 1))
    with pytest.raises(ConfigError, match=r"big\.yaml: is larger than 1 MiB"):
        load_config(big)


def _laughs(levels: int = 9) -> str:
    """The classic "billion laughs": 9 anchors of 9 aliases each, 9^9 values expanded."""
    lines = ['lol0: &lol0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"lol{i}: &lol{i} [" + ", ".join([f"*lol{i - 1}"] * 9) + "]")
    return "method: drm\nbase: base\n" + "\n".join(lines) + f"\nbranches: *lol{levels - 1}\n"


@pytest.mark.timeout(60, method="signal")  # without the budget: 75 s and 800 MB, then a refusal
def test_billion_laughs_is_refused_without_expanding(tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(_laughs())
    assert cfg.stat().st_size < 2048
    start = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert time.perf_counter() - start < 10  # well under 1 s: nothing is expanded
    msg = str(info.value)
    match = re.match(
        re.escape(str(cfg)) + r":(\d+):(\d+): too many YAML aliases: expanded, they would ", msg
    )
    assert match, msg
    line, col = int(match[1]), int(match[2])
    assert (
        _laughs().splitlines()[line - 1][col - 1 :].startswith("*lol")
    )  # the alias over the budget
    assert msg.endswith("(a config needs few; this looks like an alias bomb)")


@pytest.mark.timeout(60, method="signal")
def test_merge_key_bomb_and_alias_count_are_refused() -> None:
    lines = ["m0: &m0 {a: 1, b: 2, c: 3, d: 4, e: 5, f: 6, g: 7, h: 8, i: 9}"]
    for i in range(1, 9):  # each <<: copies its merged pairs into the node: 9^8 pairs
        lines.append(f"m{i}: &m{i} {{<<: [" + ", ".join([f"*m{i - 1}"] * 9) + "]}")
    with pytest.raises(ConfigError, match=r"^m\.yaml:\d+:\d+: too many YAML aliases: expanded"):
        parse_config("\n".join(lines), source="m.yaml")
    many = "x: &x 1\nys: [" + ", ".join(["*x"] * 1500) + "]\n"
    with pytest.raises(ConfigError, match=r"^a\.yaml:2:\d+: too many YAML aliases: more than 1000"):
        parse_config(many, source="a.yaml")


def test_a_config_with_a_few_aliases_still_loads() -> None:
    text = "defaults: &d {density: 0.5, weight: 1.0}\nbranches:\n  - {<<: *d, path: a}\n  - *d\n"
    data, lines = load_yaml(text)
    assert data["branches"] == [
        {"density": 0.5, "weight": 1.0, "path": "a"},
        {"density": 0.5, "weight": 1.0},
    ]
    assert lines.of(("branches", 0, "path")) == 3


# ------------------------------------------------------------ empty validation data


def _empty_task() -> dict[str, TaskSpec]:
    specs = acc_specs()
    tiny = TensorDataset(torch.randn(3, DIM), torch.zeros(3, dtype=torch.long))
    specs["b"] = TaskSpec(
        DataLoader(tiny, batch_size=4, drop_last=True), MulticlassAccuracy(num_classes=CLASSES)
    )
    return specs


def _accelerator() -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    return Accelerator(cpu=True)


def _prepared_model(accelerator: Any) -> Any:
    from test_lightning_common import HIDDEN, backbone

    from drm_lightning.inloop import BranchedModel

    model = BranchedModel(backbone(0), {t: nn.Linear(HIDDEN, CLASSES) for t in TASKS})
    return accelerator.prepare(model)


EMPTY = r"task 'b': the validation dataloader is empty \(len\(\) == 0\)"


def test_empty_validation_loader_refused_at_setup_by_the_hook() -> None:
    from drm_lightning.accelerate import MergeHook

    accelerator = _accelerator()
    hook = MergeHook(
        accelerator, _prepared_model(accelerator), "drm", tasks=_empty_task(), every_n_steps=1
    )
    with pytest.raises(ValueError, match="^MergeHook: " + EMPTY):
        hook.__enter__()


def test_empty_validation_loader_refused_at_setup_by_the_callback() -> None:
    from lightning.pytorch.callbacks import Callback

    from drm_lightning.lightning import MergeCallback

    class Steps(Callback):
        count = 0

        def on_train_batch_start(self, *args: Any) -> None:
            Steps.count += 1

    cb = MergeCallback("drm", tasks=_empty_task(), every_n_steps=1)
    with pytest.raises(ValueError, match="^MergeCallback: " + EMPTY):
        trainer(max_steps=2, callbacks=[cb, Steps()]).fit(branched(), train_loaders())
    assert Steps.count == 0  # at setup, before the first step


def test_loaders_without_length_are_not_consumed_at_setup() -> None:
    from drm_lightning.inloop import BranchedModel, LiveBranches, MergeCore, method_from

    pulled: list[int] = []

    class Stream:  # an iterable without len(): checking it would consume it
        def __iter__(self) -> Any:
            pulled.append(1)
            yield torch.randn(2, DIM), torch.zeros(2, dtype=torch.long)

    tasks = {t: TaskSpec(Stream(), MulticlassAccuracy(num_classes=CLASSES)) for t in "ab"}
    model = BranchedModel(nn.Linear(DIM, 4), {t: nn.Linear(4, CLASSES) for t in "ab"})
    MergeCore(method_from("ties", {"density": 1.0}), LiveBranches(), tasks=tasks).check_model(model)
    assert pulled == []


# ------------------------------------------------------------ MergeHook.step() outside `with`


@pytest.mark.filterwarnings("ignore:MergeHook never merged")
def test_hook_step_outside_with_is_refused_at_the_first_call() -> None:
    from drm_lightning.accelerate import MergeHook

    accelerator = _accelerator()
    model = _prepared_model(accelerator)
    hook = MergeHook(accelerator, model, "drm", every_n_steps=100)  # no merge due for 99 steps
    with pytest.raises(
        RuntimeError, match=r"^MergeHook\.step\(\) called outside `with MergeHook\(\.\.\.\)`"
    ):
        hook.step()
    assert hook.num_steps == 0
    with pytest.raises(RuntimeError, match=r"MergeHook\.end_epoch\(\) called outside"):
        hook.end_epoch()
    with hook:
        assert hook.step() is None
    with pytest.raises(RuntimeError, match=r"MergeHook\.step\(\) called outside"):
        hook.step()  # after the block too
    off = MergeHook(accelerator, model, "drm", every_n_steps=1, enabled=False)
    assert off.step() is None  # disabled: a no-op anywhere


# ------------------------------------------------------------ calibration dtype


@pytest.fixture()
def calib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from safetensors.torch import save_file

    save_file({"inputs": torch.randint(0, 5, (40, 20))}, str(tmp_path / "ints.safetensors"))
    save_file({"inputs": torch.randn(40, 20)}, str(tmp_path / "f32.safetensors"))
    (tmp_path / "calib_fns.py").write_text(
        "import torch\n\ndef tokens():\n    return torch.rand(8, 20)\n\n"
        "def ids():\n    return torch.randint(0, 9, (8, 20))\n"
    )
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    monkeypatch.delitem(sys.modules, "calib_fns", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_calibration_batches_of_the_wrong_dtype_are_refused(calib: Path) -> None:
    from _alignment_nets import MLP

    from drm_lightning.cli.align_inputs import load_batches

    model = MLP().double()
    with pytest.raises(ValueError) as info:
        load_batches("ints.safetensors", batch_size=16, model=model)
    assert str(info.value) == (
        "batches file 'ints.safetensors': the calibration batch is torch.int64, "
        "but the model's first layer fc1 (Linear) takes floating-point inputs "
        "(torch.float64, the dtype of its weight); "
        "convert the batches to torch.float64"
    )
    with pytest.raises(
        ValueError,
        match=r"^batches file 'f32\.safetensors': the calibration batch is torch\.float32, "
        r"but the model's first layer fc1 \(Linear\) takes torch\.float64 inputs .* "
        r"or build the model in torch\.float32$",
    ):
        load_batches("f32.safetensors", batch_size=16, model=model)
    with pytest.raises(
        ValueError,
        match=r"^batches 'calib_fns:tokens': the calibration batch is torch\.float32, "
        r"but the model's first layer 0 \(Embedding\) takes integer indices; convert the batches "
        r"to torch\.int64$",
    ):
        load_batches("calib_fns:tokens", model=nn.Sequential(nn.Embedding(9, 4), nn.Linear(4, 2)))


def test_calibration_batches_that_fit_are_accepted(calib: Path) -> None:
    from _alignment_nets import MLP

    from drm_lightning.cli.align_inputs import load_batches

    assert len(load_batches("f32.safetensors", batch_size=16, model=MLP())) == 3
    assert (
        len(load_batches("calib_fns:ids", model=nn.Sequential(nn.Embedding(9, 4), nn.Linear(4, 2))))
        == 1
    )

    class Converts(nn.Module):  # converts its input first: the first layer never sees the batch
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(20, 2).double()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.double())

    assert len(load_batches("ints.safetensors", batch_size=20, model=Converts())) == 2
    assert len(load_batches("ints.safetensors", batch_size=20)) == 2  # no model: nothing checked
