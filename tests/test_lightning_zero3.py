"""MergeCallback under DeepSpeed ZeRO-3: a real ``Trainer.fit`` on 2 CPU ranks (gloo).

Lightning's ``DeepSpeedStrategy`` refuses the CPU accelerator, so the CPU tier uses the
package's public testing route, :class:`drm_lightning.lightning.CPUDeepSpeedStrategy`. One
``torch.multiprocessing`` start of two forked ranks runs the fits back to back (start-up
dominates the cost; a fork skips each rank's imports); each rank saves its findings and the
tests below compare them with the single-process merge
(:func:`drm_lightning.merge.merge_state_dicts`) on the same weights, gathered by probes that run
before and after the merge callback.

* fit 1 — ``BranchedModule``, live branches, ``adopt=True``, every parameter partitioned
  (``stage3_param_persistence_threshold: 0``), lr = 0: the step after the merge must leave the
  adopted weights in place, which it does only if the fp32 master was written too.
* fit 2 — one model with per-task heads (ignored by the merge), snapshots and safetensors
  checkpoints, ``adopt=False``, small parameters persistent (full on every rank): the merged
  values are reassembled from each rank's partitions; the live weights, partitions and fp32
  masters are restored bit for bit.
* fit 3 — a NaN in one rank's partition stops every rank.
* fit 4 — DeepSpeed's default persistence threshold keeps every toy parameter whole: the merge
  runs the replica engine and warns once, on rank 0, naming the threshold.

The GPU tier runs the same live-branch consolidation with Lightning's real
``DeepSpeedStrategy`` and skips cleanly without CUDA.
"""

from __future__ import annotations

import traceback
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import cpu_deepspeed_rank, fork_ranks
from lightning.pytorch.callbacks import Callback
from test_lightning_common import TASKS, MultiHead, branched, specs, train_loaders
from torch import Tensor
from torch.nn import functional as F

WORLD = 2
DRM = {"drop_rate": 0.5, "direction": "vertical"}  # the sharded (gather-free) route
IGNORE = [r"heads\."]
MERGE_STEP = 2


def perturbed_branches(seed: int = 0) -> pl.LightningModule:
    """A BranchedModule whose branches already differ from the base
    (non-zero task vectors), lr = 0."""
    model = branched(seed=seed, lr=0.0)
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for branch in model.branches.values():
            for p in branch.parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model


class HeadsModel(MultiHead):
    """One backbone, one head per task; every step trains every task (no unused parameter)."""

    def __init__(self, lr: float = 5e-2) -> None:
        super().__init__(TASKS, seed=0, lr=lr)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.current_task = TASKS[batch_idx % len(TASKS)]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        losses = [F.cross_entropy(self(batch[t][0], t), batch[t][1]) for t in TASKS]
        return torch.stack(losses).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.0)


def checkpoint_states() -> dict[str, dict[str, Tensor]]:
    """Two 'earlier task checkpoints' of HeadsModel (full state dicts, written as safetensors)."""
    states = {}
    for i, task in enumerate(("a", "b")):
        torch.manual_seed(0)
        model = HeadsModel()
        gen = torch.Generator().manual_seed(50 + i)
        states[task] = {
            k: (v + 0.1 * torch.randn(v.shape, generator=gen)).contiguous()
            for k, v in model.state_dict().items()
        }
    return states


# ---------------------------------------------------------------------- worker (runs in each rank)


def _cpu_strategy(threshold: int | None) -> Any:
    """The public CPU ZeRO-3 strategy; ``threshold=None``: DeepSpeed's default persistence."""
    from drm_lightning.lightning import CPUDeepSpeedStrategy

    zero: dict[str, Any] = {"stage": 3}
    if threshold is not None:
        zero["stage3_param_persistence_threshold"] = threshold
    config = {
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "train_micro_batch_size_per_gpu": 16,
        "steps_per_print": 10**9,
    }
    return CPUDeepSpeedStrategy(config=config)


WHOLE = "stage3_param_persistence_threshold"  # named by the warning when nothing is partitioned


def _whole_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if WHOLE in str(w.message)]


class ZeroProbe(Callback):
    """Gathers the full state (collective), the fp32 masters and the local partitions at each step.

    ``shards_of``: a MergeCallback whose merges (this rank's partitions) are reassembled, at each
    step where it merged.
    """

    def __init__(self, shards_of: Any = None) -> None:
        self.shards_of = shards_of
        self.states: dict[Any, dict[str, Tensor]] = {}
        self.masters: dict[int, dict[str, Tensor]] = {}
        self.partitions: dict[int, dict[str, Tensor]] = {}
        self.shapes: dict[int, dict[str, tuple[int, ...]]] = {}
        self.merged: dict[int, dict[str, Tensor]] = {}

    def _gather(self, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(pl_module.parameters()), modifier_rank=None):
            return {k: v.detach().float().clone() for k, v in pl_module.named_parameters()}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.states["start"] = self._gather(pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        from deepspeed.utils import safe_get_full_fp32_param

        step = trainer.global_step
        self.shapes[step] = {k: tuple(p.shape) for k, p in pl_module.named_parameters()}
        self.partitions[step] = {
            k: p.ds_tensor.detach().clone() for k, p in pl_module.named_parameters()
        }
        masters = {}
        for k, p in pl_module.named_parameters():
            master = safe_get_full_fp32_param(p)  # collective: every rank, same order
            if master is not None:
                masters[k] = master.detach().clone()
        self.masters[step] = masters
        self.states[step] = self._gather(pl_module)
        if (
            self.shards_of is not None and self.shards_of.core.last_merge_step == step
        ):  # it merged at this step
            self.merged[step] = _reassemble(self.shards_of.last_merged_shards)


def _reassemble(shards: Any) -> dict[str, Tensor]:
    """Full merged tensors from every rank's partitions (test only: all_gather of the chunks)."""
    import torch.distributed as dist

    out = {}
    for name, value in shards.values.items():
        p = shards.params[name]
        if shards.is_partitioned(name):
            parts = [torch.empty_like(value) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, value.contiguous())
            out[name] = torch.cat(parts)[: int(p.ds_numel)].reshape(tuple(p.ds_shape)).float()
        else:
            out[name] = value.float().clone()
    return out


def _history(cb: Any) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if not k.startswith("merge/")} for r in cb.history]


def _fit(
    model: pl.LightningModule, strategy: Any, callbacks: list[Callback], max_steps: int
) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy=strategy,
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, train_loaders(n=64))
    return trainer


def _worker(rank: int, world: int, port: int, outdir: str, ckpt_dir: str) -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    cpu_deepspeed_rank(rank, world, port)
    from drm_lightning.lightning import MergeCallback
    from drm_lightning.merge.routing import Routing

    results: dict[str, Any] = {}
    try:
        # fit 1: live branches, consolidation (adopt=True), lr = 0, every parameter partitioned.
        before, after = ZeroProbe(), ZeroProbe()
        live = MergeCallback(
            "drm", method_params=DRM, tasks=specs(), every_n_steps=MERGE_STEP, adopt=True
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer = _fit(
                perturbed_branches(), _cpu_strategy(0), [before, live, after], MERGE_STEP + 1
            )
        results["live"] = {
            "strategy": type(trainer.strategy),
            "world_size": trainer.world_size,
            "engine": live.core._last.engine,
            "whole_warnings": _whole_warnings(caught),
            "before": before.states,
            "after": after.states,
            "after_masters": after.masters,
            "after_shapes": after.shapes,
            "history": _history(live),
            "zero3": live._zero3,
            "stats": vars(live.last_merge_stats),
            "global_rank": trainer.global_rank,
        }

        # fit 2: one model, heads ignored, snapshots + safetensors checkpoints, adopt=False,
        # small parameters persistent (full on every rank).
        before, after = ZeroProbe(), ZeroProbe()
        routing = Routing(ignore=IGNORE)
        snaps = MergeCallback(
            "drm",
            method_params=DRM,
            tasks=specs(),
            branches="snapshots",
            routing=routing,
            snapshot_every_n_steps=1,
            every_n_steps=MERGE_STEP,
        )
        ckpts = MergeCallback(
            "drm",
            method_params=DRM,
            tasks=specs(),
            routing=routing,
            live_task="c",
            branches={t: Path(ckpt_dir) / f"{t}.safetensors" for t in ("a", "b")},
            every_n_steps=MERGE_STEP,
        )
        probe_snaps, probe_ckpts = ZeroProbe(shards_of=snaps), ZeroProbe(shards_of=ckpts)
        callbacks: list[Callback] = [before, snaps, ckpts, after, probe_snaps, probe_ckpts]
        _fit(HeadsModel(), _cpu_strategy(20), callbacks, MERGE_STEP)
        results["single"] = {
            "before": before.states,
            "after": after.states,
            "before_partitions": before.partitions,
            "after_partitions": after.partitions,
            "before_masters": before.masters,
            "after_masters": after.masters,
            "after_shapes": after.shapes,
            "snap_merged": probe_snaps.merged,
            "ckpt_merged": probe_ckpts.merged,
            "snap_history": _history(snaps),
            "ckpt_history": _history(ckpts),
            "snap_tasks": [s.task for s in snaps._snapshots],
        }

        # fit 3: a NaN enters one branch's partition on rank 1 right before the merge (issue 8).
        class Poison(Callback):
            def on_train_batch_end(
                self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
            ) -> None:
                if trainer.global_rank == 1 and trainer.global_step == MERGE_STEP:
                    name, param = next(
                        (n, q)
                        for n, q in pl_module.named_parameters()
                        if n.startswith("branches.") and n.endswith("weight")
                    )
                    results["poisoned"] = name
                    with torch.no_grad():
                        param.ds_tensor[0] = float("nan")

        nan_merge = MergeCallback("drm", method_params=DRM, tasks=specs(), every_n_steps=MERGE_STEP)
        try:
            _fit(perturbed_branches(), _cpu_strategy(0), [Poison(), nan_merge], MERGE_STEP + 1)
            results["nan_error"] = None
        except Exception as err:  # noqa: BLE001 - the expected failure, checked by the test
            results["nan_error"] = f"{type(err).__name__}: {err}"

        # fit 4: DeepSpeed's default persistence threshold: every toy parameter stays whole.
        whole = MergeCallback("drm", method_params=DRM, tasks=specs(), every_n_steps=1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _fit(perturbed_branches(), _cpu_strategy(None), [whole], MERGE_STEP)
        results["whole"] = {
            "engine": whole.core._last.engine,
            "merges": whole.core.num_merges,
            "warnings": _whole_warnings(caught),
        }
    except Exception:  # noqa: BLE001 - reported by the test
        results["worker_error"] = traceback.format_exc()
    torch.save(results, Path(outdir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def zero3_fits(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Fork 2 ZeRO-3 ranks once (two fits); return each rank's findings."""
    pytest.importorskip("deepspeed")
    from safetensors.torch import save_file

    out = tmp_path_factory.mktemp("zero3_fit")
    ckpt = tmp_path_factory.mktemp("zero3_ckpt")
    for task, state in checkpoint_states().items():
        save_file(state, str(ckpt / f"{task}.safetensors"))
    fork_ranks(_worker, WORLD, str(out), str(ckpt))
    results = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for r in results:
        assert "worker_error" not in r, r["worker_error"]
    return results


pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]


def _sub(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def _assert_close(merged: dict[str, Tensor], expected: dict[str, Tensor], names: list[str]) -> None:
    assert names
    errors = {n: _rel(merged[n], expected[n]) for n in names}
    assert max(errors.values()) < 1e-5, errors


def _oracle(
    base: dict[str, Tensor], branches: list[dict[str, Tensor]], routing: Any = None
) -> dict[str, Tensor]:
    from drm_lightning.merge.loop import merge_state_dicts
    from drm_lightning.methods import get_method

    return merge_state_dicts(get_method("drm", **DRM), base, branches, routing=routing, seed=0)


def test_live_consolidation_equals_single_process(zero3_fits: list[dict[str, Any]]) -> None:
    """Live branches under ZeRO-3: the adopted merge equals
    merge_state_dicts on the same weights."""
    for res in zero3_fits:
        live = res["live"]
        assert live["zero3"]
        state = live["before"][MERGE_STEP]
        expected = _oracle(_sub(state, "base."), [_sub(state, f"branches.{t}.") for t in TASKS])
        adopted = live["after"][MERGE_STEP]
        for target in ["base."] + [
            f"branches.{t}." for t in TASKS
        ]:  # consolidation: base and every branch
            _assert_close(_sub(adopted, target), expected, list(expected))
        heads = [k for k in state if k.startswith("heads.")]
        assert all(torch.equal(adopted[k], state[k]) for k in heads)  # heads stay per task


def test_merge_never_holds_the_whole_model(zero3_fits: list[dict[str, Any]]) -> None:
    """At most one item's inputs and result (N branches + base + merged) in full at a time."""
    for res in zero3_fits:
        live = res["live"]
        largest = max(v.numel() for v in live["before"]["start"].values())
        assert live["stats"]["max_full_numel"] <= (len(TASKS) + 2) * largest
        inputs = sum(
            v.numel() for k, v in live["before"]["start"].items() if not k.startswith("heads.")
        )
        assert live["stats"]["max_full_numel"] < inputs  # never base + every branch at once


def test_live_training_continues_from_merged_weights(zero3_fits: list[dict[str, Any]]) -> None:
    """fp32 masters hold the merge, and an lr = 0 step leaves the adopted weights in place."""
    for res in zero3_fits:
        live = res["live"]
        adopted = live["after"][MERGE_STEP]
        for name, master in live["after_masters"][MERGE_STEP].items():
            assert torch.equal(master, adopted[name]), name
        next_step = live["before"][MERGE_STEP + 1]
        assert all(torch.equal(next_step[k], adopted[k]) for k in adopted)
        assert any(
            not torch.equal(live["before"][MERGE_STEP][k], adopted[k]) for k in adopted
        )  # it did change


def test_public_cpu_zero3_strategy_on_two_ranks(zero3_fits: list[dict[str, Any]]) -> None:
    """The public CPU ZeRO-3 strategy on 2 ranks: the fit runs on DeepSpeed stage 3 with every
    parameter partitioned, the merge takes the ZeRO-3 engine and nothing warns about whole
    parameters (threshold 0)."""
    from drm_lightning.lightning import CPUDeepSpeedStrategy

    for res in zero3_fits:
        live = res["live"]
        assert live["strategy"] is CPUDeepSpeedStrategy and live["world_size"] == WORLD
        assert live["zero3"] and live["engine"] == "zero3"
        assert live["whole_warnings"] == []


def test_whole_parameters_under_zero3_warn_once_on_rank_zero(
    zero3_fits: list[dict[str, Any]],
) -> None:
    """DeepSpeed's default persistence threshold keeps a toy model whole: the merges run the
    replica engine, and rank 0 warns once, naming the threshold and how to lower it."""
    for res in zero3_fits:
        assert res["whole"]["engine"] == "replica" and res["whole"]["merges"] == MERGE_STEP
    rank0, rank1 = (res["whole"]["warnings"] for res in zero3_fits)
    assert len(rank0) == 1 and rank1 == []
    assert "replica engine" in rank0[0]
    assert '"stage3_param_persistence_threshold": 0' in rank0[0]


def test_cpu_strategy_refuses_a_backend_other_than_gloo() -> None:
    """The CPU route runs over gloo; another process-group backend is refused at construction."""
    from drm_lightning.lightning import CPUDeepSpeedStrategy

    with pytest.raises(ValueError, match="process_group_backend must be 'gloo'"):
        CPUDeepSpeedStrategy(process_group_backend="nccl")


def test_parameters_stay_partitioned(zero3_fits: list[dict[str, Any]]) -> None:
    """After every merge, evaluation and adoption the partitioned parameters are 0-sized again."""
    for res in zero3_fits:
        assert all(s == (0,) for s in res["live"]["after_shapes"][MERGE_STEP].values())
        shapes = res["single"]["after_shapes"][MERGE_STEP]
        assert all(
            s == (0,)
            for k, s in shapes.items()
            if k.endswith("weight") and not k.startswith("heads.")
        )


def test_single_model_merges_equal_single_process(zero3_fits: list[dict[str, Any]]) -> None:
    """Snapshots (shards) and safetensors checkpoints read shard-wise: merges equal the oracle."""
    from drm_lightning.merge.routing import Routing

    routing = Routing(ignore=IGNORE)
    checkpoints = checkpoint_states()
    for res in zero3_fits:
        single = res["single"]
        base = single["before"]["start"]
        merged_names = [k for k in base if not k.startswith("heads.")]
        snaps = [single["before"][1], single["before"][2]]
        _assert_close(
            single["snap_merged"][MERGE_STEP], _oracle(base, snaps, routing), merged_names
        )
        assert set(single["snap_merged"][MERGE_STEP]) == set(merged_names)  # heads are never merged
        branches = [{k: v.float() for k, v in checkpoints[t].items()} for t in ("a", "b")] + [
            single["before"][MERGE_STEP]
        ]
        _assert_close(
            single["ckpt_merged"][MERGE_STEP], _oracle(base, branches, routing), merged_names
        )


def test_live_weights_restored_exactly(zero3_fits: list[dict[str, Any]]) -> None:
    """adopt=False: full weights, local partitions and fp32 masters
    bit-identical around the merges."""
    for res in zero3_fits:
        single = res["single"]
        for step in (1, MERGE_STEP):
            for key in ("", "_partitions", "_masters"):
                b, a = single[f"before{key}"][step], single[f"after{key}"][step]
                assert b.keys() == a.keys() and b
                changed = {k: _where_changed(b[k], a[k]) for k in b if not _same_bits(b[k], a[k])}
                assert not changed, (step, key, changed)


def _same_bits(a: Tensor, b: Tensor) -> bool:
    """Bit-identical. A partition's padding is uninitialised memory (DeepSpeed allocates it with
    ``torch.empty``); it may hold NaN patterns, which ``torch.equal`` reports as different."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(
            a.contiguous().reshape(-1).view(torch.uint8),
            b.contiguous().reshape(-1).view(torch.uint8),
        )
    )


def _where_changed(before: Tensor, after: Tensor) -> str:
    bits_b, bits_a = (
        before.contiguous().reshape(-1).view(torch.uint8),
        after.contiguous().reshape(-1).view(torch.uint8),
    )
    idx = (
        (bits_b != bits_a)
        .nonzero()
        .reshape(-1)
        .div(before.element_size(), rounding_mode="floor")
        .unique()
        .tolist()
    )
    flat_b, flat_a = before.reshape(-1), after.reshape(-1)
    return (
        f"numel {flat_b.numel()}, changed at {idx[:8]}: "
        f"{flat_b[idx[:4]].tolist()} -> {flat_a[idx[:4]].tolist()}"
    )


def test_logged_scores_identical_on_every_rank(zero3_fits: list[dict[str, Any]]) -> None:
    """merged/<task>/<metric> (and the rest of each record) is the same on both ranks."""
    rank0, rank1 = zero3_fits
    for key, mode in (("history", "live"), ("snap_history", "single"), ("ckpt_history", "single")):
        h0, h1 = rank0[mode][key], rank1[mode][key]
        assert [r["step"] for r in h0] == [MERGE_STEP]
        assert h0 == h1
        for t in TASKS:
            assert 0.0 <= h0[0][f"merged/{t}/acc"] <= 1.0 and f"merged/{t}/micro" in h0[0]


def test_merged_scores_match_a_single_process_evaluation(zero3_fits: list[dict[str, Any]]) -> None:
    """The scores logged under ZeRO-3 are those of the merged weights scored in one process."""
    from drm_lightning.evaluation import evaluate_task

    live = zero3_fits[0]["live"]
    model = branched()
    model.load_state_dict({**model.state_dict(), **live["after"][MERGE_STEP]})
    for t in TASKS:
        expected = evaluate_task(model, t, specs()[t])
        assert live["history"][0][f"merged/{t}/acc"] == pytest.approx(expected["acc"], abs=1e-6)


# ---------------------------------------------------------------------- GPU tier


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="Lightning's DeepSpeedStrategy needs CUDA"
)
def test_real_deepspeed_strategy_live_consolidation() -> None:
    """Lightning's own DeepSpeedStrategy (stage 3, one GPU): the adopted merge equals the oracle."""
    pytest.importorskip("deepspeed")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from drm_lightning.lightning import MergeCallback

    before, after = ZeroProbe(), ZeroProbe()
    live = MergeCallback(
        "drm", method_params=DRM, tasks=specs(), every_n_steps=MERGE_STEP, adopt=True
    )
    config = {
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "train_micro_batch_size_per_gpu": 16,
    }
    trainer = pl.Trainer(
        accelerator="cuda",
        devices=1,
        strategy=DeepSpeedStrategy(config=config),
        max_steps=MERGE_STEP + 1,
        callbacks=[before, live, after],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(perturbed_branches(), train_loaders(n=64))
    assert live._zero3
    state = {k: v.cpu() for k, v in before.states[MERGE_STEP].items()}
    expected = _oracle(_sub(state, "base."), [_sub(state, f"branches.{t}.") for t in TASKS])
    adopted = {k: v.cpu() for k, v in after.states[MERGE_STEP].items()}
    _assert_close(_sub(adopted, "base."), expected, list(expected))
    assert all(
        torch.equal(before.states[MERGE_STEP + 1][k], after.states[MERGE_STEP][k]) for k in adopted
    )
    assert f"merged/{TASKS[0]}/acc" in live.history[-1]


def test_single_model_scores_use_each_tasks_own_heads(zero3_fits: list[dict[str, Any]]) -> None:
    """Scores logged under ZeRO-3 equal a one-process evaluation of the merged backbone with each
    task's heads taken from its own branch (snapshot / checkpoint) or from the live model."""
    from drm_lightning.evaluation import evaluate_task

    single = zero3_fits[0]["single"]
    live = single["before"][MERGE_STEP]
    snapshots = dict(
        zip(single["snap_tasks"], (single["before"][1], single["before"][2]))
    )  # last one wins
    checkpoints = {t: {k: v.float() for k, v in s.items()} for t, s in checkpoint_states().items()}
    for merged_key, history_key, owners in (
        ("snap_merged", "snap_history", snapshots),
        ("ckpt_merged", "ckpt_history", checkpoints),
    ):
        for t in TASKS:
            heads = {k: v for k, v in owners.get(t, live).items() if k.startswith("heads.")}
            model = HeadsModel()
            model.load_state_dict({**live, **heads, **single[merged_key][MERGE_STEP]})
            expected = evaluate_task(model, t, specs()[t])
            assert single[history_key][0][f"merged/{t}/acc"] == pytest.approx(
                expected["acc"], abs=1e-6
            ), (merged_key, t)


def test_nan_in_a_partition_stops_every_rank_naming_it(zero3_fits: list[dict[str, Any]]) -> None:
    """Issue 8, callback under ZeRO-3: a NaN in one rank's partition of a branch stops the run on
    every rank at the merge, with the tensor and the branch named (nothing merged silently)."""
    poisoned = zero3_fits[1]["poisoned"]
    tensor = poisoned.split(".", 2)[2]  # branches.<task>.<tensor>
    for res in zero3_fits:
        assert res["nan_error"] is not None, "the merge went through with a NaN branch"
        assert f"'{tensor}' in branch" in res["nan_error"] and "NaN" in res["nan_error"], res[
            "nan_error"
        ]
