"""Both front ends under DeepSpeed ZeRO-3 on 2 CPU ranks (gloo): identical merges and scores.

One ``torch.multiprocessing.spawn`` of two ranks (start-up dominates the cost) runs, on each rank:

* the Accelerate loop — ``Accelerator(deepspeed_plugin=...)`` with the CPU recipe's patch of
  ``PartialState._prepare_backend`` (on a CPU-only box Accelerate otherwise picks no backend and
  believes it is one process; ``Accelerator(cpu=True, deepspeed_plugin=...)`` silently drops the
  plugin) — with :class:`~drm_lightning.accelerate.MergeHook`;
* the same scenario through ``Trainer.fit`` with the test-only ``CPUDeepSpeedStrategy``
  (``test_lightning_zero3``) and :class:`~drm_lightning.lightning.MergeCallback`;
* ``trainer.validate`` (outside ``fit``) with ``validate_merged=True``: the user's own
  ``validation_step`` scores the merge, not the live branches.

The scenario: a branched MLP whose branches differ from the base, trained with AdamW on every
task each step (same data on every rank), DRM (sharded route) every 2 steps, ``adopt=True``
(periodic consolidation: the merge is written to the partitions and the fp32 masters), 3 steps.
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import free_port
from test_lightning_common import (
    CLASSES,
    HIDDEN,
    TASKS,
    backbone,
    branched,
    specs,
    task_data,
    train_loaders,
)
from test_lightning_zero3 import (
    DRM,
    MERGE_STEP,
    ZeroProbe,
    _cpu_strategy,
    _history,
    _oracle,
    _reassemble,
    _sub,
)
from torch import Tensor, nn
from torch.nn import functional as F

WORLD, STEPS, LR = 2, MERGE_STEP + 1, 5e-2
pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]


def _perturbed(lr: float = LR) -> Any:
    """A BranchedModule whose branches already differ from the base (non-zero task vectors)."""
    model = branched(lr=lr)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for branch in model.branches.values():
            for p in branch.parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model


def _gather(module: nn.Module) -> dict[str, Tensor]:
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        return {k: v.detach().float().clone() for k, v in module.named_parameters()}


def _ds_config() -> dict[str, Any]:
    return {
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "train_micro_batch_size_per_gpu": 16,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,  # Accelerate fills "auto" with 1.0, Lightning with 0.0 (no clipping)
        "steps_per_print": 10**9,
    }


# ---------------------------------------------------------------------- worker (runs in each rank)


def _accelerate_run() -> dict[str, Any]:
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    from drm_lightning.accelerate import MergeHook
    from drm_lightning.inloop import BranchedModel

    # The CPU recipe: without it Accelerate picks no backend on a CPU-only box (1 process).
    PartialState._prepare_backend = lambda self, cpu=False, sagemaker_dp=False, backend=None: (  # type: ignore[method-assign]
        "gloo", DistributedType.MULTI_CPU,
    )
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=_ds_config()))
    twin = _perturbed()
    model = BranchedModel(backbone(0), {t: nn.Linear(HIDDEN, CLASSES) for t in TASKS})  # trainable branches
    model.load_state_dict(twin.state_dict())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    merged: dict[str, Tensor] = {}
    loaders = train_loaders(n=64)
    batches = zip(*(loaders[t] for t in TASKS))
    states = {"start": _gather(model.module)}
    with MergeHook(accelerator, model, "drm", method_params=DRM, tasks=specs(), every_n_steps=MERGE_STEP, adopt=True) as hook:
        for step in range(1, STEPS + 1):
            batch = dict(zip(TASKS, next(batches)))
            loss = torch.stack([F.cross_entropy(model(x, t), y) for t, (x, y) in batch.items()]).sum()
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            states[step] = _gather(model.module)  # before the merge
            hook.step()
            if step == MERGE_STEP:
                merged = _reassemble(hook.last_merged_shards)
    return {
        "world": accelerator.num_processes, "type": str(accelerator.distributed_type), "zero3": hook.zero3,
        "engine": type(model).__name__, "history": _history(hook), "merged": merged, "final": _gather(hook.unwrapped),
        "states": states,
    }


def _lightning_run() -> dict[str, Any]:
    import lightning.pytorch as pl

    from drm_lightning.lightning import MergeCallback

    live = MergeCallback("drm", method_params=DRM, tasks=specs(), every_n_steps=MERGE_STEP, adopt=True)
    before, probe = ZeroProbe(), ZeroProbe(shards_of=live)
    trainer = pl.Trainer(
        accelerator="cpu", devices=WORLD, strategy=_cpu_strategy(0), max_steps=STEPS, callbacks=[before, live, probe],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, use_distributed_sampler=False,  # every rank trains on all the data, as above
    )
    model = _perturbed()
    trainer.fit(model, train_loaders(n=64))
    return {
        "world": trainer.world_size, "zero3": live._zero3, "history": _history(live),
        "merged": probe.merged[MERGE_STEP], "final": probe.states[STEPS], "states": before.states,
    }


class _Validating:
    """Mixed into BranchedModule: the user's own ``validation_step`` (one loader per task)."""

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        task = TASKS[dataloader_idx]
        x, y = batch
        self.log(f"val/{task}/acc", (self(x, task).argmax(-1) == y).float().mean(), add_dataloader_idx=False)  # type: ignore[attr-defined]


def _validating_model() -> Any:
    from drm_lightning.lightning import BranchedModule

    class Validating(_Validating, BranchedModule):
        pass

    src = _perturbed()
    model = Validating(src.base, dict(src.heads), lr=LR)
    model.load_state_dict(src.state_dict())
    return model


def _validate_run() -> dict[str, Any]:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from drm_lightning.lightning import MergeCallback

    results: dict[str, Any] = {}
    for validate_merged in (True, False):
        cb = MergeCallback("drm", method_params=DRM, every_n_steps=MERGE_STEP, validate_merged=validate_merged)
        trainer = pl.Trainer(
            accelerator="cpu", devices=WORLD, strategy=_cpu_strategy(0), callbacks=[cb], logger=False,
            enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
        )
        loaders = [DataLoader(task_data(t, 48, split=1), batch_size=48) for t in TASKS]
        metrics = trainer.validate(_validating_model(), loaders, verbose=False)
        results[validate_merged] = {k: float(v) for m in metrics for k, v in m.items()}
        results[f"backend_{validate_merged}"] = type(cb.core.backend).__name__
    return results


def _worker(rank: int, world: int, port: int, outdir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      NODE_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu",
                      OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import importlib
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # skip a 95 s JIT build
    results: dict[str, Any] = {}
    try:
        results["accelerate"] = _accelerate_run()
        results["lightning"] = _lightning_run()
        results["validate"] = _validate_run()
    except Exception:  # noqa: BLE001 - reported by the test
        results["worker_error"] = traceback.format_exc()
    torch.save(results, Path(outdir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    pytest.importorskip("deepspeed")
    pytest.importorskip("accelerate")
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("front_ends_zero3")
    mp.spawn(_worker, args=(WORLD, free_port(), str(out)), nprocs=WORLD, join=True)
    results = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for r in results:
        assert "worker_error" not in r, r["worker_error"]
    return results


# ---------------------------------------------------------------------- tests


def test_both_front_ends_really_ran_zero3_on_two_ranks(runs: list[dict[str, Any]]) -> None:
    for res in runs:
        acc, lit = res["accelerate"], res["lightning"]
        assert acc["world"] == lit["world"] == WORLD
        assert "DEEPSPEED" in acc["type"] and acc["engine"] == "DeepSpeedEngine"
        assert acc["zero3"] and lit["zero3"]
        assert [r["step"] for r in acc["history"]] == [MERGE_STEP]


def test_same_merge_and_scores_through_both_front_ends(runs: list[dict[str, Any]]) -> None:
    """Merged weights (reassembled from the partitions), logged scores and the weights after the
    step that follows the adopted merge: identical through Accelerate and Lightning, on both ranks."""
    for res in runs:
        acc, lit = res["accelerate"], res["lightning"]
        assert acc["history"] == lit["history"] == runs[0]["lightning"]["history"]
        assert acc["merged"].keys() == lit["merged"].keys() and acc["merged"]
        for name, value in lit["merged"].items():
            assert torch.equal(acc["merged"][name], value), name
        for key in ("start", 1, MERGE_STEP):  # trained identically up to the merge
            assert acc["states"][key].keys() == lit["states"][key].keys()
            assert all(torch.equal(acc["states"][key][k], v) for k, v in lit["states"][key].items()), key
        assert acc["final"].keys() == lit["final"].keys()
        for name, value in lit["final"].items():
            assert torch.equal(acc["final"][name], value), name
        pre = lit["states"][MERGE_STEP]
        assert any(not torch.equal(pre[f"base.{k}"], v) for k, v in lit["merged"].items())  # the merge changed it


def test_validate_outside_fit_scores_the_merge_under_zero3(runs: list[dict[str, Any]]) -> None:
    """``trainer.validate`` with ``validate_merged=True`` under ZeRO-3: the backend starts at the
    validation epoch (the module is partitioned only then) and the user's ``validation_step``
    scores the merge, equal to a one-process evaluation of the oracle merge."""
    state = _perturbed().state_dict()
    merged = _oracle(_sub(state, "base."), [_sub(state, f"branches.{t}.") for t in TASKS])
    expected = {}
    for t in TASKS:
        model = _perturbed()
        model.branches[t].load_state_dict(merged)
        x, y = task_data(t, 48, split=1).tensors
        expected[f"val/{t}/acc"] = float((model(x, t).argmax(-1) == y).float().mean())
    live = {t: float((_perturbed()(*[task_data(t, 48, split=1).tensors[0], t]).argmax(-1)
                      == task_data(t, 48, split=1).tensors[1]).float().mean()) for t in TASKS}
    for res in runs:
        validate = res["validate"]
        assert validate["backend_True"] == "Zero3Backend"
        assert validate[True] == pytest.approx(expected, abs=1e-6)
        assert validate[False] == pytest.approx({f"val/{t}/acc": v for t, v in live.items()}, abs=1e-6)
        assert validate[True] != validate[False]
