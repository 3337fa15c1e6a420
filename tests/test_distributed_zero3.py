"""DeepSpeed ZeRO-3 on CPU, 2 ranks, gloo: the distributed merge equals the single-process one.

One ``torch.multiprocessing`` start of two forked ranks runs every scenario against one
``deepspeed.initialize`` engine (start-up dominates the cost); each rank writes its findings
to JSON and the tests below check them. The module under merge is a training module with a
``base`` network and ``branches[i]`` networks (separate ZeRO-3-partitioned parameter sets);
shapes are uneven so ZeRO partitions cut rows in the middle and the last one is padded.
Routes covered: sharded DRM-V matrix (Gram all-reduce), sharded element-wise fallback,
owner matrix (wide stack, horizontal DRM, TIES, ``sharded=False``), owner fallback, ignored,
frozen parameters.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import counting_source, cpu_deepspeed_rank, fork_ranks
from torch import nn

WORLD = 2
N_BRANCHES = 3
IGNORE = [r"classifier\."]


class Net(nn.Module):
    """A backbone with every kind of tensor: matrices (tall and wide),
    embedding, norm, conv, head, frozen."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(11, 40)  # fallback route (excluded from matrices)
        self.q_proj = nn.Linear(40, 37)  # 37x40: N·n >= m -> sharded Gram route
        self.up = nn.Linear(37, 53)  # 53x37, odd numel: padded last partition
        self.wide = nn.Linear(120, 9, bias=False)  # 9x120: N·n < m -> owner route
        self.norm = nn.LayerNorm(53)
        self.conv = nn.Conv1d(3, 5, 3)  # 3-D weight: fallback
        self.classifier = nn.Linear(9, 2)  # ignored (task head)
        self.frozen = nn.Linear(40, 45)  # frozen matrix: no fp32 master
        self.frozen.requires_grad_(False)

    def forward(
        self, idx: torch.Tensor, x: torch.Tensor, w: torch.Tensor, c: torch.Tensor
    ) -> torch.Tensor:
        e = self.embed_tokens(idx).mean(1) + x
        h = self.norm(self.up(torch.tanh(self.q_proj(e))))
        out = self.classifier(self.wide(w))
        return (
            h.pow(2).mean()
            + out.pow(2).mean()
            + self.conv(c).pow(2).mean()
            + self.frozen(e).pow(2).mean()
        )


class Branched(nn.Module):
    """Training module: ``base`` plus ``branches[i]``, all trained together."""

    def __init__(self, n_branches: int) -> None:
        super().__init__()
        self.base = Net()
        self.branches = nn.ModuleList(Net() for _ in range(n_branches))

    def forward(self, *batch: torch.Tensor) -> torch.Tensor:
        return self.base(*batch) + sum(b(*batch) for b in self.branches)


def build_model(seed: int = 0, noise: float = 1e-4) -> Branched:
    """Deterministic weights: branch = base + delta, with sign conflicts between branches.

    Matrix deltas are rank 3 with well separated singular values plus ``noise``: with the
    default the noise sits below DRM's 1 % rank cut, so the shared basis is well conditioned
    and float32 results are reproducible to ~1e-6 whatever the summation order. With
    ``noise=0.05`` the kept spectrum has near-degenerate noise directions: float32 DRM is then
    only accurate to ~1e-5 against float64 (the single-process merge included).
    """
    torch.manual_seed(seed)
    model = Branched(N_BRANCHES)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for branch in model.branches:
            for p, p0 in zip(branch.parameters(), model.base.parameters()):
                delta = noise * torch.randn(p0.shape, generator=gen)
                if p0.dim() == 2:
                    n, m = p0.shape
                    k = min(3, n, m)
                    scale = torch.tensor([1.0, 0.6, 0.35])[:k]
                    left = torch.linalg.qr(torch.randn(n, k, generator=gen))[0]
                    right = torch.linalg.qr(torch.randn(m, k, generator=gen))[0]
                    delta += 0.3 * (left * scale) @ right.mT
                else:
                    delta += 0.05 * torch.randn(p0.shape, generator=gen)
                p.copy_(p0 + delta)
    return model


def batch(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """One deterministic input batch."""
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randint(0, 11, (4, 5), generator=g),
        torch.randn(4, 40, generator=g),
        torch.randn(4, 120, generator=g),
        torch.randn(4, 3, 8, generator=g),
    )


def reference(
    method: Any,
    full: dict[str, torch.Tensor],
    compute_dtype: torch.dtype,
    names: list[str] | None = None,
    coefficients: list[float] | None = None,
) -> dict[str, torch.Tensor]:
    """Single-process merge_tensor of every base tensor (ignored ones keep the base value)."""
    from drm_lightning.merge.routing import Routing
    from drm_lightning.merge.tensor import merge_tensor, tensor_generator

    routing = Routing(ignore=IGNORE)
    out = {}
    for name, base in full.items():
        if not name.startswith("base.") or (names is not None and name[5:] not in names):
            continue
        short = name[len("base.") :]
        branches = [full[f"branches.{i}.{short}"] for i in range(N_BRANCHES)]
        route = routing.route(short, tuple(base.shape))
        generator = (
            tensor_generator(0, short) if method.uses_randomness else None
        )  # as iter_merge does
        out[short] = merge_tensor(
            method,
            route,
            base,
            branches,
            coefficients or COEFFICIENTS,
            compute_dtype=compute_dtype,
            generator=generator,
        )
    return out


COEFFICIENTS = [1.0, 0.7, 1.3]


# ---------------------------------------------------------------------- worker (runs in each rank)


class FailingSet:
    """Wraps a TensorSet; reading ``name`` on ``rank`` raises (a rank failing mid-merge), or
    with ``nan=True`` returns the values with a NaN in the first entry read."""

    def __new__(cls, inner: Any, name: str, rank: int, nan: bool = False) -> Any:
        from drm_lightning.distributed import TensorSet

        class _Failing(TensorSet):
            origin = f"failing {inner.origin}"

            def keys(self) -> list[str]:
                return inner.keys()

            def meta(self, n: str) -> Any:
                return inner.meta(n)

            def is_partitioned(self, n: str) -> bool:
                return inner.is_partitioned(n)

            def _read(self, n: str, read: Any) -> torch.Tensor:
                import torch.distributed as dist

                if n != name or dist.get_rank() != rank:
                    return read()
                if not nan:
                    raise OSError(f"disk read failed for {n}")
                value = read().clone()
                value.view(-1)[0] = float("nan")
                return value

            def local_partition(self, n: str, world: int, r: int) -> torch.Tensor:
                return self._read(n, lambda: inner.local_partition(n, world, r))

            def get(self, n: str) -> torch.Tensor:
                return self._read(n, lambda: inner.get(n))

            def get_rows(self, n: str, a: int, b: int) -> torch.Tensor:
                return self._read(n, lambda: inner.get_rows(n, a, b))

        return _Failing()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def _zero3_worker(rank: int, world: int, port: int, outdir: str, ckpt_dir: str) -> None:
    cpu_deepspeed_rank(rank, world, port)
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_local_optimizer_state

    deepspeed.init_distributed(dist_backend="gloo")

    from drm_lightning.distributed import (
        DistributedMergeError,
        DistributedMerger,
        ParamSet,
        ShardSnapshot,
    )
    from drm_lightning.merge.routing import Routing
    from drm_lightning.methods import get_method
    from drm_lightning.methods.drm import DRM

    model = build_model()
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    noisy = {k: v.detach().clone() for k, v in build_model(noise=0.05).state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.0)
    cfg = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg)
    module = engine.module
    target = ParamSet.from_module(module.base, origin="module.base")
    branch_sets = [
        ParamSet.from_module(b, origin=f"module.branches[{i}]")
        for i, b in enumerate(module.branches)
    ]
    coefficients = COEFFICIENTS
    everything = ParamSet.from_module(module, origin="module")
    routing = Routing(ignore=IGNORE)
    results: dict[str, Any] = {
        "total_numel": sum(v.numel() for v in initial.values()),
        "largest_numel": max(v.numel() for v in initial.values()),
    }

    def gathered(p: torch.nn.Parameter) -> torch.Tensor:
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            return p.detach().clone()

    def load(values: dict[str, torch.Tensor]) -> None:
        """Set every parameter of the module (partition + fp32 master)
        with the engine's own writer."""
        rank_ = dist.get_rank()
        for name, p in module.named_parameters():
            value = values[name].reshape(-1)
            size = p.ds_tensor.numel()
            chunk = torch.zeros(size)
            piece = value[rank_ * size : (rank_ + 1) * size]
            chunk[: piece.numel()] = piece
            everything.write_partition(name, chunk)

    def current() -> dict[str, torch.Tensor]:
        return {name: gathered(p) for name, p in module.named_parameters()}

    def compare(expected: dict[str, torch.Tensor]) -> dict[str, Any]:
        errs, master_errs, partitioned = {}, {}, True
        for name, p in module.base.named_parameters():
            if name not in expected:
                continue
            errs[name] = _rel(gathered(p), expected[name])
            master = safe_get_full_fp32_param(p)  # collective, every rank
            if master is not None:
                master_errs[name] = _rel(master, expected[name])
            partitioned &= p.numel() == 0 and tuple(p.shape) == (0,)
        return {"errs": errs, "master_errs": master_errs, "partitioned": partitioned}

    def run(
        key: str,
        method: Any,
        *,
        compute_dtype: torch.dtype = torch.float32,
        names: list[str] | None = None,
        branches: list[Any] | None = None,
        sharded: bool = True,
        optimizer_state: str = "keep",
        coefs: list[float] | None = None,
    ) -> None:
        load_base = {k: v for k, v in current().items()}
        for k in list(load_base):
            if k.startswith("base."):
                load_base[k] = initial[k]
        load(load_base)  # the target back at θ0; branches as they are now
        inputs = current()
        base_snapshot = ShardSnapshot.capture(target, origin="θ0")
        try:
            merger = DistributedMerger(
                method,
                routing=routing,
                compute_dtype=compute_dtype,
                sharded=sharded,
                optimizer_state=optimizer_state,
            )
            result = merger.merge(
                target,
                base_snapshot,
                branches or branch_sets,
                coefficients=coefs or coefficients,
                names=names,
            )
        except Exception as err:  # noqa: BLE001 - recorded for the test
            results[key] = {
                "error": f"{type(err).__name__}: {err}",
                "is_merge_error": isinstance(err, DistributedMergeError),
            }
            return
        expected = reference(method, inputs, compute_dtype, names, coefs)
        entry = compare(expected)
        # Distance of both results to the float64 merge of the same inputs, relative to the merged
        # delta.
        exact = reference(
            method, {k: v.double() for k, v in inputs.items()}, torch.float64, names, coefs
        )
        delta = {n: exact[n] - inputs[f"base.{n}"].double() for n in exact}
        entry["delta_err_vs_fp64"] = {
            n: float((gathered(p).double() - exact[n]).norm() / delta[n].norm().clamp(min=1e-30))
            for n, p in module.base.named_parameters()
            if n in exact and delta[n].norm() > 0
        }
        entry["single_delta_err_vs_fp64"] = {
            n: float((expected[n].double() - exact[n]).norm() / delta[n].norm())
            for n in entry["delta_err_vs_fp64"]
        }
        entry["stats"] = vars(result.stats)
        entry["modes"] = {it.name: it.mode for it in result.plan.items}
        entry["owners"] = {it.name: it.owner for it in result.plan.items}
        entry["ignored_unchanged"] = all(
            torch.equal(gathered(p), initial[f"base.{n}"])
            for n, p in module.base.named_parameters()
            if n.startswith("classifier")
        )
        results[key] = entry

    drm = get_method("drm", drop_rate=0.8, direction="vertical")
    try:
        run("drm_sharded", drm)
        run("drm_owner", drm, sharded=False)
        # Near-degenerate spectra: float64 equal to 1e-9; float32 as close to the exact merge as
        # the single-process float32 merge is.
        load(noisy)
        run("noisy_fp64", drm, compute_dtype=torch.float64)
        run("noisy_fp32", drm)
        load(initial)
        run("drm_sharded_fp64", drm, compute_dtype=torch.float64)
        run(
            "drm_horizontal_fp64",
            get_method("drm", drop_rate=0.7, direction="horizontal"),
            compute_dtype=torch.float64,
        )
        run("drm_horizontal", get_method("drm", drop_rate=0.7, direction="horizontal"))
        run(
            "drm_trim",
            get_method("drm", drop_rate=0.5, fallback_trim_rate=0.3, tie_break="positive"),
        )
        run("ties", get_method("ties", density=0.4))
        # Issue 24's methods: not row-local, so ZeRO-3 gathers each matrix to its owner.
        run("tsv_m", get_method("tsv_m"))
        run("iso_cts", get_method("iso_cts"))
        run("model_stock", get_method("model_stock"), coefs=[1.0, 1.0, 1.0])
        run("one_item_owner", drm, names=["wide.weight"], sharded=False)
        run("one_item_sharded", drm, names=["up.weight"])
        # Branches from ZeRO shard snapshots and from checkpoint files read shard-wise.
        snaps = [
            ShardSnapshot.capture(b, origin=f"snapshot {i}") for i, b in enumerate(branch_sets)
        ]
        results["snapshot_numel"] = sum(t.numel() for t in snaps[0].tensors.values())
        run("drm_snapshots", drm, branches=snaps)
        ckpts = [
            counting_source(Path(ckpt_dir) / f"branch{i}.safetensors") for i in range(N_BRANCHES)
        ]
        run("drm_checkpoints", drm, branches=ckpts)
        results["checkpoint_bytes_read"] = ckpts[0].bytes_read

        # A rank raising mid-merge: every rank raises the same message, nobody hangs.
        failing = list(branch_sets)
        failing[1] = FailingSet(branch_sets[1], "up.weight", 1)
        run("error_read_sharded", drm, branches=failing)
        failing[1] = FailingSet(branch_sets[1], "wide.weight", 1)
        run("error_read_owner", drm, branches=failing, sharded=False)

        class Exploding(DRM):
            def merge_matrix(self, deltas, coefficients, *, generator=None):  # noqa: ANN001, D102
                if dist.get_rank() == 1:
                    raise FloatingPointError("eigensolver diverged")
                return super().merge_matrix(deltas, coefficients, generator=generator)

        run("error_compute", Exploding(drop_rate=0.8), sharded=False)
        # NaN in one branch, on the rank that reads it; a result that overflows.
        failing[1] = FailingSet(branch_sets[1], "up.weight", 1, nan=True)
        run("nan_sharded", drm, branches=failing)
        failing[1] = FailingSet(branch_sets[1], "wide.weight", 1, nan=True)
        run("nan_owner", drm, branches=failing, sharded=False)
        run("overflow", get_method("task_arithmetic"), coefs=[1e300, 1.0, 1.0])
        run("after_errors", drm)  # the group is still consistent

        # Training continues from the merged weights: a step with lr = 0 keeps them exactly
        # (the fp32 master was written), then real steps run.
        engine.train()
        loss = engine(*batch(1))
        engine.backward(loss)
        engine.step()  # creates optimizer moments
        run("before_step", drm)
        merged = {n: gathered(p) for n, p in module.base.named_parameters()}
        for group in engine.optimizer.param_groups:
            group["lr"] = 0.0
        loss = engine(*batch(2))
        engine.backward(loss)
        engine.step()
        results["after_step_errs"] = {
            n: _rel(gathered(p), merged[n]) for n, p in module.base.named_parameters()
        }
        for group in engine.optimizer.param_groups:
            group["lr"] = 1e-3
        losses = []
        for step in range(3):
            loss = engine(*batch(3 + step))
            engine.backward(loss)
            engine.step()
            losses.append(float(loss))
        results["losses"] = losses
        # Optimizer state reset.
        run("reset", drm, optimizer_state="reset")
        moments = {}
        for name, p in module.base.named_parameters():
            if p.requires_grad and not name.startswith(
                "classifier"
            ):  # ignored: not merged, not reset
                moments[name] = float(safe_get_local_optimizer_state(p, "exp_avg").abs().max())
        results["moments_after_reset"] = moments
    except Exception:  # noqa: BLE001
        results["worker_error"] = traceback.format_exc()
    Path(outdir, f"rank{rank}.json").write_text(json.dumps(results, default=str))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def zero3_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Fork 2 ZeRO-3 ranks once (a fork skips each rank's imports); return each rank's findings."""
    pytest.importorskip("deepspeed")
    from safetensors.torch import save_file

    out = tmp_path_factory.mktemp("zero3")
    ckpt = tmp_path_factory.mktemp("ckpt")
    full = build_model().state_dict()
    for i in range(N_BRANCHES):
        prefix = f"branches.{i}."
        save_file(
            {k[len(prefix) :]: v.contiguous() for k, v in full.items() if k.startswith(prefix)},
            str(ckpt / f"branch{i}.safetensors"),
        )
    fork_ranks(_zero3_worker, WORLD, str(out), str(ckpt))
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for r in results:
        assert "worker_error" not in r, r["worker_error"]
    return results


pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]

# Same code in the same order as the single-process merge_tensor (owner route): equal to 1e-5.
EXACT = [
    "drm_owner",
    "drm_horizontal",
    "ties",
    "one_item_owner",
    "drm_trim",
    "tsv_m",
    "iso_cts",
    "model_stock",
]
# The sharded route sums in another order. In float64 it equals the single-process merge to
# 1e-12; in float32 an entry at the pruning cut may flip, so float32 is held to the bound the
# package states for float32 DRM: within F32_DELTA_BOUND of the float64 merge of the same
# inputs, relative to the merged delta (benchmarks/RESULTS.md § Precision).
FLOAT64 = ["noisy_fp64", "drm_sharded_fp64", "drm_horizontal_fp64"]
SHARDED = [
    "drm_sharded",
    "noisy_fp32",
    "one_item_sharded",
    "drm_snapshots",
    "drm_checkpoints",
    "after_errors",
    "before_step",
    "reset",
]
F32_DELTA_BOUND = 1e-2


@pytest.mark.parametrize("key", EXACT + FLOAT64)
def test_equals_single_process(zero3_results: list[dict[str, Any]], key: str) -> None:
    """Owner route and every route in float64, both ranks: working
    weights and fp32 masters match merge_tensor."""
    tol = 1e-12 if key in FLOAT64 else 1e-5
    for r, res in enumerate(zero3_results):
        entry = res[key]
        assert "error" not in entry, entry
        assert entry["errs"], "nothing compared"
        bad = {n: e for n, e in entry["errs"].items() if e > tol}
        assert not bad, f"rank {r}: {bad}"
        bad = {n: e for n, e in entry["master_errs"].items() if e > tol}
        assert not bad, f"rank {r} fp32 master: {bad}"
        assert entry["partitioned"], (
            "parameters must be re-partitioned (shape (0,)) after the merge"
        )
        assert entry["ignored_unchanged"]


@pytest.mark.parametrize("key", SHARDED)
def test_float32_sharded_within_stated_bound(zero3_results: list[dict[str, Any]], key: str) -> None:
    """Float32 sharded route, both ranks: as close to the float64 merge as the package promises
    (F32_DELTA_BOUND of the merged delta), like the single-process float32 merge; partitions
    restored."""
    for r, res in enumerate(zero3_results):
        entry = res[key]
        assert "error" not in entry, entry
        assert entry["delta_err_vs_fp64"], "nothing compared"
        bad = {n: e for n, e in entry["delta_err_vs_fp64"].items() if not e <= F32_DELTA_BOUND}
        assert not bad, f"rank {r}: {bad}"
        bad = {
            n: e for n, e in entry["single_delta_err_vs_fp64"].items() if not e <= F32_DELTA_BOUND
        }
        assert not bad, f"single process: {bad}"
        assert entry["partitioned"] and entry["ignored_unchanged"]


@pytest.mark.parametrize(
    "key,needle",
    [
        ("nan_sharded", "'up.weight' in branch 1 (failing module.branches[1]) contains 1 NaN"),
        ("nan_owner", "'wide.weight' in branch 1 (failing module.branches[1]) contains 1 NaN"),
        ("overflow", "the merged result"),
    ],
)
def test_non_finite_input_or_result_raises_everywhere(
    zero3_results: list[dict[str, Any]], key: str, needle: str
) -> None:
    """NaN in a branch (sharded and owner routes) or an overflowing
    result: every rank raises, naming it."""
    messages = [res[key]["error"] for res in zero3_results]
    assert all(res[key]["is_merge_error"] for res in zero3_results)
    assert messages[0] == messages[1] and needle in messages[0], messages[0]


def test_routes_taken(zero3_results: list[dict[str, Any]]) -> None:
    """The documented routes: tall DRM-V matrices and fallbacks sharded,
    the rest owner, heads skipped."""
    modes = zero3_results[0]["drm_sharded"]["modes"]
    assert modes["q_proj.weight"] == modes["up.weight"] == modes["frozen.weight"] == "sharded"
    assert modes["embed_tokens.weight"] == modes["norm.weight"] == modes["conv.weight"] == "sharded"
    assert modes["wide.weight"] == "owner"  # N·n < m: the single-process merge uses the n×n Gram
    assert modes["classifier.weight"] == "skip"
    assert set(zero3_results[0]["drm_owner"]["modes"].values()) <= {"owner", "skip"}
    horizontal = zero3_results[0]["drm_horizontal"]["modes"]
    assert (
        horizontal["up.weight"] == horizontal["q_proj.weight"] == "owner"
    )  # DRM-H is not row-local
    assert horizontal["norm.weight"] == "sharded"  # the fallback is element-wise in both directions
    assert set(zero3_results[0]["ties"]["modes"].values()) <= {"owner", "skip"}


def test_memory_bounded(zero3_results: list[dict[str, Any]]) -> None:
    """No rank holds the whole model: at most one item's N + 2 full tensors at a time."""
    for res in zero3_results:
        whole = res["total_numel"]  # base + all branches
        for key in ("drm_sharded", "drm_owner", "ties"):
            held = res[key]["stats"]["max_full_numel"]
            assert held <= (N_BRANCHES + 2) * res["largest_numel"]
            assert held < whole / 2
        # The sharded run gathers only the one owner item (wide.weight); the rest never in full.
        assert res["drm_sharded"]["stats"]["max_full_numel"] <= (N_BRANCHES + 2) * 9 * 120
        assert res["one_item_sharded"]["stats"]["max_full_numel"] == 0
        # Snapshots and checkpoint reads are shard-wise.
        assert res["snapshot_numel"] <= whole // (N_BRANCHES + 1) // 2 + 64
        assert res["checkpoint_bytes_read"] < 4 * whole // (N_BRANCHES + 1)


def test_rank_without_items(zero3_results: list[dict[str, Any]]) -> None:
    """World size larger than the number of owner items: the idle rank
    neither hangs nor diverges."""
    owners = zero3_results[0]["one_item_owner"]["owners"]
    assert [o for n, o in owners.items() if n == "wide.weight"] == [0]
    assert zero3_results[1]["one_item_owner"]["stats"]["owner_items"] == 0
    assert zero3_results[0]["one_item_owner"]["errs"] == zero3_results[1]["one_item_owner"]["errs"]


@pytest.mark.parametrize(
    "key,needle",
    [
        ("error_read_sharded", "disk read failed for up.weight"),
        ("error_read_owner", "disk read failed for wide.weight"),
        ("error_compute", "eigensolver diverged"),
    ],
)
def test_rank_failure_raises_everywhere(
    zero3_results: list[dict[str, Any]], key: str, needle: str
) -> None:
    """A rank raising mid-merge makes every rank raise the same DistributedMergeError."""
    messages = [res[key]["error"] for res in zero3_results]
    assert all(res[key]["is_merge_error"] for res in zero3_results)
    assert messages[0] == messages[1]
    assert needle in messages[0] and "rank 1" in messages[0]


def test_training_continues_from_merged_weights(zero3_results: list[dict[str, Any]]) -> None:
    """An optimizer step (lr = 0) keeps the merged weights: the fp32 master was updated too."""
    for res in zero3_results:
        assert max(res["after_step_errs"].values()) < 1e-7, res["after_step_errs"]
        assert all(loss == loss and abs(loss) < 1e6 for loss in res["losses"])
        assert max(res["moments_after_reset"].values()) == 0.0
