"""Both front ends under DeepSpeed ZeRO-3 on 2 CPU ranks (gloo): identical merges and scores.

One ``torch.multiprocessing`` start of two forked ranks (start-up dominates the cost; a fork
skips each rank's imports) runs, on each rank:

* the Accelerate loop — ``Accelerator(deepspeed_plugin=...)`` with the CPU recipe's patch of
  ``PartialState._prepare_backend`` (on a CPU-only box Accelerate otherwise picks no backend and
  believes it is one process; ``Accelerator(cpu=True, deepspeed_plugin=...)`` silently drops the
  plugin) — with :class:`~drm_lightning.accelerate.MergeHook`: uninterrupted; interrupted after
  step 3 by ``save_state`` (the hook registered with ``register_for_checkpointing``); resumed by
  ``load_state`` in a fresh ``Accelerator`` from a model of another seed;
* the same scenario through ``Trainer.fit`` with the public CPU testing route
  :class:`~drm_lightning.lightning.CPUDeepSpeedStrategy` (configured by ``test_lightning_zero3``)
  and :class:`~drm_lightning.lightning.MergeCallback`: uninterrupted;
  crashed after step 5 (its last checkpoint, a DeepSpeed checkpoint folder: end of epoch 0, step
  3); resumed with ``Trainer.fit(ckpt_path=...)`` from a model of another seed;
* ``trainer.validate`` (outside ``fit``) with ``validate_merged=True``: the user's own
  ``validation_step`` scores the merge, not the live branches.

The scenario: a branched MLP whose branches differ from the base, trained with AdamW on every
task each step (same data on every rank), DRM (sharded route) every 2 steps, ``adopt=True``
(periodic consolidation: the merge is written to the partitions and the fp32 masters), 2 epochs
of 3 steps (Lightning: ``max_epochs`` and ``EpochWindow``, see ``test_front_ends_ddp``;
Accelerate: ``hook.end_epoch()``), so the checkpoint falls between two merges.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import cpu_deepspeed_rank, fork_ranks
from lightning.pytorch.callbacks import Callback
from test_lightning_common import (
    CLASSES,
    HIDDEN,
    TASKS,
    backbone,
    branched,
    epoch_loaders,
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

WORLD, LR, EPOCH = (
    2,
    5e-2,
    3,
)  # ranks; learning rate; batches per epoch (checkpoint: end of epoch 0, step 3)
STEPS, N = (
    2 * EPOCH,
    2 * EPOCH * 16,
)  # optimizer steps (merges at 2, 4, 6); training samples per task
pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]


def _perturbed(lr: float = LR, seed: int = 0) -> Any:
    """A BranchedModule whose branches already differ from the base (non-zero task vectors)."""
    model = branched(seed=seed, lr=lr)
    gen = torch.Generator().manual_seed(7 + seed)
    with torch.no_grad():
        for branch in model.branches.values():
            for p in branch.parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model


def _counters(state: dict[str, Any]) -> dict[str, Any]:
    """A merge state dict without the timings of its history records."""
    return {
        **state,
        "history": [
            {k: v for k, v in r.items() if not k.startswith("merge/")} for r in state["history"]
        ],
    }


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
        # Accelerate fills "auto" with 1.0, Lightning with 0.0 (no clipping)
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
    }


# ---------------------------------------------------------------------- worker (runs in each rank)


def _accelerate_setup(seed: int = 0) -> tuple[Any, Any, Any, Any]:
    """A fresh ``Accelerator`` (DeepSpeed ZeRO-3), the prepared model and optimizer, the hook."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState, PartialState
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    from drm_lightning.accelerate import MergeHook
    from drm_lightning.inloop import BranchedModel

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    # The CPU recipe: without it Accelerate picks no backend on a CPU-only box (1 process).
    PartialState._prepare_backend = lambda self, cpu=False, sagemaker_dp=False, backend=None: (  # type: ignore[method-assign]
        "gloo",
        DistributedType.MULTI_CPU,
    )
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=_ds_config()))
    twin = _perturbed(seed=seed)
    model = BranchedModel(
        backbone(seed), {t: nn.Linear(HIDDEN, CLASSES) for t in TASKS}
    )  # trainable branches
    model.load_state_dict(twin.state_dict())
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    hook = MergeHook(
        accelerator,
        model,
        "drm",
        method_params=DRM,
        tasks=specs(),
        every_n_steps=MERGE_STEP,
        adopt=True,
    )
    return accelerator, model, optimizer, hook


def _accelerate_steps(
    run: dict[str, Any], accelerator: Any, model: Any, optimizer: Any, hook: Any, steps: range
) -> None:
    """Optimizer steps ``steps`` (1-based) of the scenario; the weights after each step (before the
    hook runs) go to ``run["states"]``, each merge (reassembled) to ``run["merged"]``."""
    loaders = train_loaders(n=N)
    batches = list(zip(*(loaders[t] for t in TASKS)))
    for step in steps:
        batch = dict(zip(TASKS, batches[step - 1]))
        loss = torch.stack([F.cross_entropy(model(x, t), y) for t, (x, y) in batch.items()]).sum()
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        run["states"][step] = _gather(model.module)  # before the merge
        if hook.step() is not None:
            run["merged"][step] = _reassemble(hook.last_merged_shards)
        if step % EPOCH == 0:
            hook.end_epoch()  # epochs of EPOCH batches, as Lightning's EpochWindow


def _accelerate_result(
    run: dict[str, Any], accelerator: Any, model: Any, hook: Any
) -> dict[str, Any]:
    return {
        **run,
        "world": accelerator.num_processes,
        "type": str(accelerator.distributed_type),
        "zero3": hook.zero3,
        "engine": type(model).__name__,
        "history": _history(hook),
        "counters": _counters(hook.core.state_dict()),
        "final": _gather(hook.unwrapped),
    }


def _accelerate_run(outdir: str) -> dict[str, Any]:
    """The uninterrupted loop; a loop interrupted after step 3 (``save_state``); the loop resumed
    in a fresh ``Accelerator`` from a model of another seed (``load_state``, the rest)."""
    accelerator, model, optimizer, hook = _accelerate_setup()
    full: dict[str, Any] = {"states": {"start": _gather(model.module)}, "merged": {}}
    with hook:
        _accelerate_steps(full, accelerator, model, optimizer, hook, range(1, STEPS + 1))
    results = {"full": _accelerate_result(full, accelerator, model, hook)}

    accelerator, model, optimizer, hook = _accelerate_setup()
    accelerator.register_for_checkpointing(hook)
    with hook:
        _accelerate_steps(
            {"states": {}, "merged": {}}, accelerator, model, optimizer, hook, range(1, EPOCH + 1)
        )
        accelerator.save_state(str(Path(outdir) / "accelerate_state"))
    accelerator, model, optimizer, hook = _accelerate_setup(
        seed=5
    )  # everything must come from the checkpoint
    accelerator.register_for_checkpointing(hook)
    accelerator.load_state(str(Path(outdir) / "accelerate_state"))
    resumed: dict[str, Any] = {"states": {}, "merged": {}}
    with hook:
        _accelerate_steps(resumed, accelerator, model, optimizer, hook, range(EPOCH + 1, STEPS + 1))
    results["resumed"] = _accelerate_result(resumed, accelerator, model, hook)
    return results


class _Crash(Callback):
    """Stops the fit after optimizer step ``at`` (after the merge callback, on every rank)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        if trainer.global_step == self.at:
            raise RuntimeError("simulated crash")


def _lightning_fit(
    outdir: str, name: str, *, seed: int = 0, crash_at: int | None = None, ckpt: Path | None = None
) -> dict[str, Any]:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from drm_lightning.lightning import MergeCallback

    live = MergeCallback(
        "drm", method_params=DRM, tasks=specs(), every_n_steps=MERGE_STEP, adopt=True
    )
    before, probe = ZeroProbe(), ZeroProbe(shards_of=live)
    every_epoch = ModelCheckpoint(
        dirpath=Path(outdir) / f"{name}_ckpt", every_n_epochs=1, save_top_k=-1, filename="{epoch}"
    )
    callbacks = [before, live, probe, every_epoch] + ([_Crash(crash_at)] if crash_at else [])
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy=_cpu_strategy(0),
        max_epochs=2,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=True,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # every rank trains on all the data, as above
    )
    model = _perturbed(seed=seed)
    trainer.fit(model, epoch_loaders(EPOCH, n=N), ckpt_path=ckpt)
    return {
        "world": trainer.world_size,
        "zero3": live._zero3,
        "history": _history(live),
        "counters": _counters(live.state_dict()),
        "merged": probe.merged,
        "final": probe.states[STEPS],
        "states": before.states,
    }


def _lightning_run(outdir: str) -> dict[str, Any]:
    """The uninterrupted fit; a fit that crashes after step 5 (its last checkpoint: the end of
    epoch 0, step 3); the fit resumed from it with a model of another seed."""
    results = {"full": _lightning_fit(outdir, "full")}
    try:
        _lightning_fit(outdir, "crashed", crash_at=EPOCH + 2)
        results["crashed"] = "did not crash"
    except Exception as err:  # noqa: BLE001 - the expected failure, checked by the test
        results["crashed"] = str(err)
    results["resumed"] = _lightning_fit(
        outdir, "resumed", seed=5, ckpt=Path(outdir) / "crashed_ckpt" / "epoch=0.ckpt"
    )
    return results


class _Validating:
    """Mixed into BranchedModule: the user's own ``validation_step`` (one loader per task)."""

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        task = TASKS[dataloader_idx]
        x, y = batch
        self.log(
            f"val/{task}/acc",
            (self(x, task).argmax(-1) == y).float().mean(),
            add_dataloader_idx=False,
        )  # type: ignore[attr-defined]


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
        cb = MergeCallback(
            "drm", method_params=DRM, every_n_steps=MERGE_STEP, validate_merged=validate_merged
        )
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=WORLD,
            strategy=_cpu_strategy(0),
            callbacks=[cb],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            use_distributed_sampler=False,
        )
        loaders = [DataLoader(task_data(t, 48, split=1), batch_size=48) for t in TASKS]
        metrics = trainer.validate(_validating_model(), loaders, verbose=False)
        results[validate_merged] = {k: float(v) for m in metrics for k, v in m.items()}
        results[f"backend_{validate_merged}"] = type(cb.core.backend).__name__
    return results


def _worker(rank: int, world: int, port: int, outdir: str) -> None:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    cpu_deepspeed_rank(rank, world, port)
    results: dict[str, Any] = {}
    try:
        results["accelerate"] = _accelerate_run(outdir)
        results["lightning"] = _lightning_run(outdir)
        results["validate"] = _validate_run()
    except Exception:  # noqa: BLE001 - reported by the test
        results["worker_error"] = traceback.format_exc()
    torch.save(results, Path(outdir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    pytest.importorskip("deepspeed")
    pytest.importorskip("accelerate")
    out = tmp_path_factory.mktemp("front_ends_zero3")
    fork_ranks(_worker, WORLD, str(out))
    results = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for r in results:
        assert "worker_error" not in r, r["worker_error"]
    return results


# ---------------------------------------------------------------------- tests


def test_both_front_ends_really_ran_zero3_on_two_ranks(runs: list[dict[str, Any]]) -> None:
    for res in runs:
        for name in ("full", "resumed"):
            acc, lit = res["accelerate"][name], res["lightning"][name]
            assert acc["world"] == lit["world"] == WORLD
            assert "DEEPSPEED" in acc["type"] and acc["engine"] == "DeepSpeedEngine"
            assert acc["zero3"] and lit["zero3"]
        assert [(r["step"], r["epoch"]) for r in res["accelerate"]["full"]["history"]] == [
            (2, 0),
            (4, 1),
            (6, 1),
        ]


def _assert_equal(a: dict[Any, Tensor], b: dict[Any, Tensor], what: str) -> None:
    assert a.keys() == b.keys() and a, what
    for name, value in b.items():
        assert torch.equal(a[name], value), (what, name)


def _assert_same_run(a: dict[str, Any], b: dict[str, Any], steps: list[Any]) -> None:
    """Same history, counters, merges (reassembled), weights before each
    merge point and at the end."""
    assert a["history"] == b["history"]
    assert a["counters"] == b["counters"]
    assert a["merged"].keys() == b["merged"].keys()
    for step in a["merged"]:
        _assert_equal(a["merged"][step], b["merged"][step], f"merge of step {step}")
    for step in steps:
        _assert_equal(a["states"][step], b["states"][step], f"weights after step {step}")
    _assert_equal(a["final"], b["final"], "final weights")


def test_same_merge_and_scores_through_both_front_ends(runs: list[dict[str, Any]]) -> None:
    """Merged weights (reassembled from the partitions), logged scores, the weights after every step
    (each merge adopted) and at the end: identical through Accelerate and Lightning, on both
    ranks."""
    reference = runs[0]["lightning"]["full"]
    for res in runs:
        acc, lit = res["accelerate"]["full"], res["lightning"]["full"]
        assert lit["history"] == reference["history"]
        assert sorted(lit["merged"]) == [2, 4, 6]
        _assert_same_run(acc, lit, ["start", *range(1, STEPS + 1)])
        pre = lit["states"][MERGE_STEP]
        assert any(
            not torch.equal(pre[f"base.{k}"], v) for k, v in lit["merged"][MERGE_STEP].items()
        )  # it merged


def test_resume_equals_uninterrupted_through_both_front_ends(runs: list[dict[str, Any]]) -> None:
    """Interrupted after step 3 (after the first merge, before the second), resumed from the
    checkpoint (DeepSpeed's partitions, fp32 masters and optimizer state; the merge state) with a
    model of another seed: the history (the restored merge and the two after the resume), counters,
    merges, weights after every resumed step and at the end equal the uninterrupted run's — through
    Accelerate (``save_state``/``load_state``, the hook registered for checkpointing) and Lightning
    (a crash, then ``Trainer.fit(ckpt_path=...)``), and the two resumed runs equal each other."""
    resumed_steps = list(range(EPOCH + 1, STEPS + 1))
    for res in runs:
        assert "simulated crash" in res["lightning"]["crashed"], res["lightning"]["crashed"]
        for front_end in ("accelerate", "lightning"):
            full, resumed = res[front_end]["full"], res[front_end]["resumed"]
            assert [r["step"] for r in resumed["history"]] == [2, 4, 6], front_end
            assert sorted(resumed["merged"]) == [4, 6], front_end  # merged after the resume
            full = {
                **full,
                "merged": {k: v for k, v in full["merged"].items() if k in resumed["merged"]},
            }
            _assert_same_run(resumed, full, resumed_steps)
        _assert_same_run(res["accelerate"]["resumed"], res["lightning"]["resumed"], resumed_steps)


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
    live = {
        t: float(
            (
                _perturbed()(*[task_data(t, 48, split=1).tensors[0], t]).argmax(-1)
                == task_data(t, 48, split=1).tensors[1]
            )
            .float()
            .mean()
        )
        for t in TASKS
    }
    for res in runs:
        validate = res["validate"]
        assert validate["backend_True"] == "Zero3Backend"
        assert validate[True] == pytest.approx(expected, abs=1e-6)
        assert validate[False] == pytest.approx(
            {f"val/{t}/acc": v for t, v in live.items()}, abs=1e-6
        )
        assert validate[True] != validate[False]
