"""torch.distributed replicas (DDP) on CPU, 2 ranks, gloo: the replica engine equals single-process.

One start of two forked ranks wraps the training module of ``test_distributed_zero3`` in
``DistributedDataParallel`` and runs every scenario; each rank writes JSON that the tests
check. Also covers the in-memory form (``target=None, collect=True``), which the Lightning
callback uses to get a merged state dict on every rank.
"""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import fork_ranks
from test_distributed_zero3 import (
    COEFFICIENTS,
    IGNORE,
    N_BRANCHES,
    FailingSet,
    _rel,
    batch,
    build_model,
    reference,
)

WORLD = 2


def _replica_worker(rank: int, world: int, port: int, outdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", rank=rank, world_size=world)
    from drm_lightning.distributed import (
        DistributedMergeError,
        DistributedMerger,
        ParamSet,
        ShardSnapshot,
    )
    from drm_lightning.merge.routing import Routing
    from drm_lightning.methods import get_method
    from drm_lightning.methods.drm import DRM

    results: dict[str, Any] = {}
    try:
        model = build_model()
        initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
        ddp = DistributedDataParallel(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        module = ddp.module
        target = ParamSet.from_module(module.base, origin="module.base")
        branches = [
            ParamSet.from_module(b, origin=f"branches[{i}]") for i, b in enumerate(module.branches)
        ]
        routing = Routing(ignore=IGNORE)

        def run(
            key: str,
            method: Any,
            *,
            branch_sets: list[Any] | None = None,
            names: list[str] | None = None,
            optimizer_state: str = "keep",
        ) -> None:
            with torch.no_grad():
                for n, p in module.base.named_parameters():
                    p.copy_(initial[f"base.{n}"])
            inputs = {k: v.detach().clone() for k, v in module.state_dict().items()}
            theta0 = ShardSnapshot.capture(target)
            try:
                result = DistributedMerger(
                    method, routing=routing, optimizer_state=optimizer_state
                ).merge(
                    target,
                    theta0,
                    branch_sets or branches,
                    coefficients=COEFFICIENTS,
                    names=names,
                    optimizer=optimizer,
                )
            except Exception as err:  # noqa: BLE001
                results[key] = {
                    "error": f"{type(err).__name__}: {err}",
                    "is_merge_error": isinstance(err, DistributedMergeError),
                }
                return
            expected = reference(method, inputs, torch.float32, names)
            results[key] = {
                "errs": {
                    n: _rel(p.detach(), expected[n])
                    for n, p in module.base.named_parameters()
                    if n in expected
                },
                "engine": result.engine,
                "owner_items": result.stats.owner_items,
                "rank_costs": [ld.cost for ld in result.plan.loads],
                "item_costs": sorted(
                    (it.cost for it in result.plan.items if it.mode == "owner"), reverse=True
                ),
                "modes": sorted({it.mode for it in result.plan.items}),
                "checksum": float(sum(p.double().sum() for p in module.base.parameters())),
            }

        drm = get_method(
            "drm", drop_rate=0.8, direction="vertical"
        )  # the failing read below targets its plan
        run("drm", drm)
        run("drm_horizontal", get_method("drm", drop_rate=0.7, direction="horizontal"))
        run("ties", get_method("ties", density=0.4))
        run(
            "dare_ties", get_method("dare_ties", density=0.5)
        )  # random: same generator on every rank
        run("one_item", drm, names=["wide.weight"])
        for name in ("tsv_m", "iso_c", "iso_cts", "breadcrumbs_ties", "della"):  # issue 24
            run(name, get_method(name))

        failing = list(branches)
        failing[2] = FailingSet(branches[2], "up.weight", 1)
        run("error_read", drm, branch_sets=failing)

        class Exploding(DRM):
            def merge_matrix(self, deltas, coefficients, *, generator=None):  # noqa: ANN001, D102
                if dist.get_rank() == 1:
                    raise FloatingPointError("eigensolver diverged")
                return super().merge_matrix(deltas, coefficients, generator=generator)

        run("error_compute", Exploding(drop_rate=0.8))
        failing[2] = FailingSet(branches[2], "up.weight", 1, nan=True)
        run("nan_read", drm, branch_sets=failing)
        run("after_errors", drm)

        # Collect mode: the merged state dict on every rank, target untouched.
        base_sd = {k[5:]: v for k, v in initial.items() if k.startswith("base.")}
        branch_sds = [
            {
                k[len(f"branches.{i}.") :]: v
                for k, v in initial.items()
                if k.startswith(f"branches.{i}.")
            }
            for i in range(N_BRANCHES)
        ]
        collected = (
            DistributedMerger(drm, routing=routing)
            .merge(None, base_sd, branch_sds, coefficients=COEFFICIENTS, collect=True)
            .merged
        )
        expected = reference(drm, initial, torch.float32)
        results["collect_errs"] = {n: _rel(collected[n], expected[n]) for n in expected}

        # Training continues from the merged weights; optimizer state reset.
        loss = ddp(*batch(1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        run("reset", drm, optimizer_state="reset")
        results["moments_after_reset"] = max(
            float(optimizer.state[p]["exp_avg"].abs().max())
            for n, p in module.base.named_parameters()
            if p.requires_grad and not n.startswith("classifier")
        )
        merged = {n: p.detach().clone() for n, p in module.base.named_parameters()}
        loss = ddp(*batch(2))
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = 0.0
        optimizer.step()
        results["after_step_errs"] = {
            n: _rel(p.detach(), merged[n]) for n, p in module.base.named_parameters()
        }
    except Exception:  # noqa: BLE001
        results["worker_error"] = traceback.format_exc()
    Path(outdir, f"rank{rank}.json").write_text(json.dumps(results, default=str))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def replica_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Fork 2 DDP ranks once (a fork skips each rank's imports); return each rank's findings."""
    out = tmp_path_factory.mktemp("replica")
    fork_ranks(_replica_worker, WORLD, str(out))
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for r in results:
        assert "worker_error" not in r, r["worker_error"]
    return results


pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]


@pytest.mark.parametrize(
    "key",
    [
        "drm",
        "drm_horizontal",
        "ties",
        "dare_ties",
        "one_item",
        "after_errors",
        "reset",
        "tsv_m",
        "iso_c",
        "iso_cts",
        "breadcrumbs_ties",
        "della",
    ],
)
def test_replica_equals_single_process(replica_results: list[dict[str, Any]], key: str) -> None:
    """Both ranks hold the single-process result (bit for bit: the owner runs merge_tensor)."""
    for res in replica_results:
        entry = res[key]
        assert "error" not in entry, entry
        assert entry["engine"] == "replica"
        assert max(entry["errs"].values()) == 0.0, entry["errs"]
    assert replica_results[0][key]["checksum"] == replica_results[1][key]["checksum"]


def test_replica_work_is_split(replica_results: list[dict[str, Any]]) -> None:
    """Each rank merges a share; with one item the second rank idles without hanging."""
    counts = [res["drm"]["owner_items"] for res in replica_results]
    assert min(counts) > 0 and sum(counts) == len(replica_results[0]["drm"]["item_costs"])
    # Balanced by cost (longest job first), not by count: the busier rank carries at most the
    # lighter one's load plus one item (the LPT bound), and both ranks agree on the plan.
    costs, items = replica_results[0]["drm"]["rank_costs"], replica_results[0]["drm"]["item_costs"]
    assert costs == replica_results[1]["drm"]["rank_costs"] and sum(costs) == pytest.approx(
        sum(items)
    )
    assert max(costs) - min(costs) <= items[0] + 1e-6 * sum(items)
    assert sorted(res["one_item"]["owner_items"] for res in replica_results) == [0, 1]


@pytest.mark.parametrize(
    "key,needle",
    [
        ("error_read", "disk read failed for up.weight"),
        ("error_compute", "eigensolver diverged"),
        ("nan_read", "'up.weight' in branch 2 (failing branches[2]) contains 1 NaN"),
    ],
)
def test_replica_failure_raises_everywhere(
    replica_results: list[dict[str, Any]], key: str, needle: str
) -> None:
    """A rank raising mid-merge makes every rank raise the same DistributedMergeError."""
    messages = [res[key]["error"] for res in replica_results]
    assert all(res[key]["is_merge_error"] for res in replica_results)
    assert messages[0] == messages[1] and needle in messages[0] and "rank 1" in messages[0]


def test_replica_collect_and_training(replica_results: list[dict[str, Any]]) -> None:
    """collect=True returns the merged state dict; training continues
    from merged weights; reset zeroes moments."""
    for res in replica_results:
        assert max(res["collect_errs"].values()) == 0.0
        assert max(res["after_step_errs"].values()) == 0.0
        assert res["moments_after_reset"] == 0.0
