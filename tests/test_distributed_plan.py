"""In-process tests of the distributed package: plan, selection, sharded
maths, sources, entry point.

No process group: the plan is a pure function, and the collectives degrade to local
operations with one rank, so the sharded DRM maths can be checked against the
single-process DRM here in milliseconds.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import counting_source
from torch import nn

from drm_lightning.distributed import (
    Comm,
    DistributedMerger,
    MergeItem,
    ParamSet,
    ShardedMerger,
    ShardSnapshot,
    assign_longest_first,
    build_plan,
    kth_largest,
    merge_module_branches,
    sharded_rule,
    topk_mask_distributed,
)
from drm_lightning.distributed import comm as comm_module
from drm_lightning.distributed.sharded import eigh_owners, matrix_waves
from drm_lightning.distributed.tensors import (
    held_range,
    local_partition,
    partition_size,
    read_flat,
)
from drm_lightning.merge.loop import merge_state_dicts
from drm_lightning.merge.tensor import merge_tensor
from drm_lightning.methods import basis as basis_module
from drm_lightning.methods import get_method
from drm_lightning.methods.ops import topk_mask
from drm_lightning.sources import StateDictSource


def llama_entries(layers: int = 32) -> list[tuple[str, tuple[int, ...], str]]:
    """Llama-3.1-8B tensor list (hidden 4096, MLP 14336, GQA 8 kv heads, vocab 128256)."""
    entries: list[tuple[str, tuple[int, ...], str]] = [
        ("model.embed_tokens.weight", (128256, 4096), "fallback")
    ]
    for i in range(layers):
        p = f"model.layers.{i}."
        entries += [
            (p + "self_attn.q_proj.weight", (4096, 4096), "matrix"),
            (p + "self_attn.k_proj.weight", (1024, 4096), "matrix"),
            (p + "self_attn.v_proj.weight", (1024, 4096), "matrix"),
            (p + "self_attn.o_proj.weight", (4096, 4096), "matrix"),
            (p + "mlp.gate_proj.weight", (14336, 4096), "matrix"),
            (p + "mlp.up_proj.weight", (14336, 4096), "matrix"),
            (p + "mlp.down_proj.weight", (4096, 14336), "matrix"),
            (p + "input_layernorm.weight", (4096,), "fallback"),
            (p + "post_attention_layernorm.weight", (4096,), "fallback"),
        ]
    entries += [
        ("model.norm.weight", (4096,), "fallback"),
        ("lm_head.weight", (128256, 4096), "fallback"),
    ]
    return entries


# ---------------------------------------------------------------------- plan


@pytest.mark.parametrize("world", [2, 4, 8, 16])
def test_plan_balanced_for_llama_8b(world: int) -> None:
    """Longest-job-first keeps the most loaded rank within 10 % of the mean."""
    plan = build_plan(llama_entries(), get_method("drm"), n_branches=4, world_size=world)
    assert plan.max_over_mean() <= 1.10
    assert plan.imbalance() is None
    assert sum(ld.items for ld in plan.loads) == len(plan.items)


def test_plan_is_deterministic_and_order_free() -> None:
    """Same plan (and fingerprint) whatever the input order: every rank agrees."""
    entries = llama_entries(4)
    a = build_plan(entries, get_method("drm"), n_branches=4, world_size=4)
    b = build_plan(list(reversed(entries)), get_method("drm"), n_branches=4, world_size=4)
    assert a.fingerprint() == b.fingerprint()
    assert [(it.name, it.owner) for it in a.items] == [(it.name, it.owner) for it in b.items]


def test_waves_bound_what_each_rank_holds() -> None:
    """Waves are whole rounds in plan order, each rank's results per wave fit the budget."""
    plan = build_plan(
        llama_entries(4), get_method("drm"), n_branches=4, world_size=4, engine="replica"
    )
    rounds = plan.rounds()
    biggest = max(it.numel for it in plan.items) * plan.compute_itemsize
    for budget in (1, biggest, 4 * biggest, 1 << 40):
        waves = plan.waves(budget)
        assert [it.name for w in waves for it in w] == [it.name for r in rounds for it in r]
        for wave in waves:
            held = [
                sum(it.numel * plan.compute_itemsize for it in wave if it.owner == r)
                for r in range(4)
            ]
            one_round = any(wave == r for r in rounds)
            assert one_round or max(held) <= budget
    assert len(plan.waves(1)) == len(rounds) and len(plan.waves(1 << 40)) == 1


def test_plan_more_ranks_than_items() -> None:
    """World size > number of items: idle ranks, an explanation of the
    imbalance, rounds still well formed."""
    entries = [("a", (64, 64), "matrix"), ("b", (32, 64), "matrix"), ("head", (2, 64), "ignore")]
    plan = build_plan(entries, get_method("drm"), n_branches=2, world_size=4)
    assert [len(plan.owned_by(r)) for r in range(4)] == [1, 1, 0, 0]
    assert plan.skipped()[0].name == "head"
    assert len(plan.rounds()) == 1 and len(plan.rounds()[0]) == 2
    assert "alone costs" in (plan.imbalance() or "")
    text = plan.summary(items=True)
    assert "rank" in text and "head" in text and "skip" in text


def test_plan_sharded_items_spread_over_all_ranks() -> None:
    """Sharded items add cost/world to every rank and have no owner."""
    entries = [("w", (256, 64), "matrix"), ("v", (16, 512), "matrix"), ("b", (64,), "fallback")]
    plan = build_plan(
        entries,
        get_method("drm"),
        n_branches=4,
        world_size=2,
        shardable=lambda name, shape, route: name in ("w", "b"),
    )
    modes = {it.name: (it.mode, it.owner) for it in plan.items}
    assert (
        modes["w"] == ("sharded", -1) and modes["b"] == ("sharded", -1) and modes["v"][0] == "owner"
    )
    assert min(ld.cost for ld in plan.loads) >= sum(it.cost for it in plan.sharded()) / 2


def test_plan_rejects_duplicates_and_bad_sizes() -> None:
    """Duplicate names and non-positive sizes are refused."""
    with pytest.raises(ValueError, match="twice"):
        build_plan([("a", (2, 2), "matrix")] * 2, get_method("drm"), n_branches=1, world_size=1)
    with pytest.raises(ValueError, match="world_size"):
        build_plan([], get_method("drm"), n_branches=1, world_size=0)


def test_assign_longest_first_improves_greedy() -> None:
    """The move/swap passes never make the maximum worse than plain greedy."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        costs = (torch.rand(23, generator=gen) ** 3 * 100).tolist()
        owner = assign_longest_first(costs, 4)
        loads = [sum(c for c, o in zip(costs, owner) if o == r) for r in range(4)]
        greedy = assign_longest_first(costs, 4, passes=0)
        gloads = [sum(c for c, o in zip(costs, greedy) if o == r) for r in range(4)]
        assert max(loads) <= max(gloads) + 1e-9
        assert max(loads) <= max(max(costs), sum(costs) / 4) * 4 / 3 + 1e-9


# ---------------------------------------------------------------------- selection


@pytest.mark.parametrize("digit_bits", [8, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kth_largest_exact(dtype: torch.dtype, digit_bits: int) -> None:
    """Radix selection equals sorting, with duplicates and zeros, for both digit widths."""
    gen = torch.Generator().manual_seed(1)
    values = torch.cat(
        [
            torch.rand(500, generator=gen, dtype=dtype),
            torch.zeros(20, dtype=dtype),
            torch.full((30,), 0.5, dtype=dtype),
        ]
    )
    ordered = values.sort(descending=True).values
    comm = Comm(None)
    for k in (1, 2, 17, 200, 510, 550):
        assert kth_largest(values, k, comm, digit_bits=digit_bits) == ordered[k - 1]


@pytest.mark.parametrize("wide_from", [1 << 20, 1])
@pytest.mark.parametrize("compat", [False, True])
@pytest.mark.parametrize("density", [0.0, 0.2, 0.5, 0.999, 1.0])
def test_topk_mask_distributed_matches_topk_mask(
    compat: bool, density: float, wide_from: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One rank: the distributed mask is the single-process mask, ties included, whether
    the selection runs with 8-bit or (``wide_from=1``) 16-bit digits."""
    monkeypatch.setattr(comm_module, "WIDE_DIGITS_FROM", wide_from)
    gen = torch.Generator().manual_seed(2)
    scores = torch.randint(-5, 6, (3, 7, 4), generator=gen).float()  # many ties
    expected = topk_mask(scores, density, reference_compat=compat)
    got = topk_mask_distributed(
        scores, scores.numel(), density, Comm(None), reference_compat=compat
    )
    assert torch.equal(got, expected)


# ---------------------------------------------------------------------- sharded maths (one rank)


class _FlatTarget(ParamSet):
    """A one-rank stand-in for a ZeRO-3 target: the partition is the whole flattened tensor."""

    def is_partitioned(self, name: str) -> bool:
        return True

    def write_partition(self, name: str, chunk: torch.Tensor) -> None:
        p = self.params[name]
        with torch.no_grad():
            p.copy_(chunk[: p.numel()].reshape(p.shape).to(p.dtype))


@pytest.mark.parametrize(
    "params",
    [
        dict(drop_rate=0.8),
        dict(drop_rate=0.5, renormalize=False, tie_break="positive"),
        dict(drop_rate=0.8, reference_compat=True),
        dict(drop_rate=0.0, disjoint_mean=False),
        dict(drop_rate=0.6, fallback_trim_rate=0.4),
    ],
)
def test_sharded_merger_equals_drm(params: dict) -> None:
    """The sharded route's maths (Gram, norms, distributed top-k, elect) equals DRM, in float64."""
    method = get_method("drm", direction="vertical", **params)
    gen = torch.Generator().manual_seed(3)
    shapes = {"w": (40, 36), "b": (40,), "z": (33, 32)}
    base = {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in shapes.items()}
    branches = [
        {k: v + torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in base.items()}
        for _ in range(3)
    ]
    branches[1]["z"] = base["z"].clone()  # an untouched branch: zero delta
    coefficients = [1.0, 0.5, 2.0]
    target = _FlatTarget({k: nn.Parameter(v.clone()) for k, v in base.items()}, "target")
    items = [
        MergeItem(k, s, "matrix" if len(s) == 2 else "fallback", 1.0, 8 * math.prod(s), "sharded")
        for k, s in shapes.items()
    ]
    merger = ShardedMerger(Comm(None), method, coefficients, torch.float64)
    merger.run(items, target, StateDictSource(base), [StateDictSource(b) for b in branches])
    for it in items:
        expected = merge_tensor(
            method,
            it.route,
            base[it.name],
            [b[it.name] for b in branches],
            coefficients,
            compute_dtype=torch.float64,
        )
        torch.testing.assert_close(
            target.params[it.name].detach(), expected, rtol=1e-10, atol=1e-12
        )


def test_sharded_refined_solver_on_low_rank_deltas(monkeypatch: pytest.MonkeyPatch) -> None:
    """``solver: refined`` reaches the sharded route: on low-rank deltas (few directions kept,
    so the refinement runs rather than falling back) it equals the single-process merge with
    the same solver, and the default float64 merge, to 1e-9."""
    gen = torch.Generator().manual_seed(4)
    n, m, rank = 96, 64, 5
    base = {"w": torch.randn(n, m, generator=gen, dtype=torch.float64)}
    branches = [
        {
            "w": base["w"]
            + torch.randn(n, rank, generator=gen, dtype=torch.float64)
            @ torch.randn(rank, m, generator=gen, dtype=torch.float64)
            + 1e-6 * torch.randn(n, m, generator=gen, dtype=torch.float64)
        }
        for _ in range(3)
    ]
    refined = get_method("drm", direction="vertical", drop_rate=0.5, solver="refined")
    solved = []
    real = basis_module.eigh_refined
    monkeypatch.setattr(
        basis_module, "eigh_refined", lambda *a, **k: solved.append(real(*a, **k)) or solved[-1]
    )
    target = _FlatTarget({"w": nn.Parameter(base["w"].clone())}, "target")
    item = MergeItem("w", (n, m), "matrix", 1.0, 8 * n * m, "sharded")
    ShardedMerger(Comm(None), refined, [1.0] * 3, torch.float64).run(
        [item], target, StateDictSource(base), [StateDictSource(b) for b in branches]
    )
    assert len(solved) == 1 and solved[0] is not None  # refined, not the fallback
    for method in (refined, get_method("drm", direction="vertical", drop_rate=0.5)):
        expected = merge_tensor(
            method,
            "matrix",
            base["w"],
            [b["w"] for b in branches],
            [1.0] * 3,
            compute_dtype=torch.float64,
        )
        torch.testing.assert_close(target.params["w"].detach(), expected, rtol=1e-9, atol=1e-9)


def test_matrix_waves_balance_unequal_grams() -> None:
    """Waves hold at least one matrix per rank and more while the memory budget allows; the
    Grams of a wave go to ranks longest first, so two large ones land on different ranks."""
    q = MergeItem("q", (64, 64), "matrix", 1.0, 4 * 64 * 64, "sharded")
    down = MergeItem("down", (64, 176), "matrix", 1.0, 4 * 64 * 176, "sharded")
    items = [q, q, q, down, q, q, q, down]
    waves = matrix_waves(items, 2, 4, 4)
    assert waves == [items]
    owners = eigh_owners(items, 2)
    assert owners[3] != owners[7]
    loads = [
        sum(176**3 if it is down else 64**3 for it, o in zip(items, owners) if o == r)
        for r in range(2)
    ]
    assert max(loads) - min(loads) <= 64**3
    # A tight budget: waves of exactly `world` items, in order, nothing lost.
    big = MergeItem("big", (8192, 8192), "matrix", 1.0, 4 * 8192**2, "sharded")
    tight = matrix_waves([big] * 5, 2, 4, 4)
    assert [len(w) for w in tight] == [2, 2, 1]


def test_sharded_rule() -> None:
    """Which items may skip the gather (see drm_lightning.distributed.sharded)."""
    target = _FlatTarget({"w": nn.Parameter(torch.zeros(1))}, "t")
    drm = sharded_rule(get_method("drm", direction="vertical"), 4, target)
    assert drm("w", (64, 64), "matrix")  # 4·64 >= 64, min >= 32, Gram cheaper than gathering
    assert not drm("w", (64, 200), "matrix")  # N·n >= m but the 200×200 Gram outweighs the tensors
    assert drm("w", (64,), "fallback")
    assert not drm("w", (8, 512), "matrix")  # N·n < m: the single-process merge uses the n×n Gram
    assert not drm("w", (8, 16), "matrix")  # tiny: the single-process merge uses the SVD
    assert not sharded_rule(get_method("drm", direction="horizontal"), 4, target)(
        "w", (64, 64), "matrix"
    )
    assert not sharded_rule(get_method("drm", solver="svd"), 4, target)("w", (64, 64), "matrix")
    assert sharded_rule(get_method("drm"), 4, target)("w", (64,), "fallback")  # any direction
    assert not sharded_rule(get_method("ties"), 4, target)("w", (64,), "fallback")
    assert not sharded_rule(get_method("drm"), 4, ParamSet({"w": nn.Parameter(torch.zeros(1))}))(
        "w", (64,), "fallback"
    )


# ---------------------------------------------------------------------- tensor sets


def test_safetensors_read_flat(tmp_path) -> None:
    """Flat ranges read shard-wise equal slices of the full tensor; only covering rows are read."""
    from safetensors.torch import save_file

    tensors = {
        "m": torch.arange(7 * 9, dtype=torch.float32).reshape(7, 9),
        "v": torch.arange(10.0),
        "s": torch.tensor(3.0),
    }
    save_file(tensors, str(tmp_path / "x.safetensors"))
    ckpt = counting_source(tmp_path / "x.safetensors")
    assert ckpt.meta("m").shape == (7, 9) and ckpt.meta("v").dtype == torch.float32
    for start, stop in [(0, 63), (5, 23), (17, 18), (30, 30), (62, 63)]:
        ckpt.bytes_read = 0
        assert torch.equal(read_flat(ckpt, "m", start, stop), tensors["m"].reshape(-1)[start:stop])
        if stop > start:
            assert ckpt.bytes_read <= (stop - start + 2 * 9) * 4
    assert torch.equal(read_flat(ckpt, "v", 3, 8), tensors["v"][3:8])
    assert torch.equal(read_flat(ckpt, "s", 0, 1), tensors["s"].reshape(1))
    for world in (1, 2, 3, 4, 5):
        parts = [local_partition(ckpt, "m", world, r) for r in range(world)]
        assert all(p.numel() == partition_size(63, world) for p in parts)
        assert torch.equal(torch.cat(parts)[:63], tensors["m"].reshape(-1))
        assert held_range(63, world, world - 1)[1] == 63


def test_one_reader_protocol(tmp_path) -> None:
    """Tensor sets are weight sources, and a weight source is an engine input as it is (no
    wrapper): the disk path's merge loop reads tensor sets, the in-memory path reads sources,
    and a ZeRO-3 rank's partition of a safetensors file reads only the rows that cover it."""
    from safetensors.torch import save_file

    import drm_lightning.distributed as distributed
    from drm_lightning.distributed.tensors import as_tensor_set, local_partition
    from drm_lightning.sources import SafetensorsFileSource, StateDictSource, WeightSource

    assert not hasattr(distributed, "WeightSourceSet")
    gen = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(6, 5, generator=gen), "b": torch.randn(6, generator=gen)}
    branches = [{k: v + torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in "ab"]
    src = StateDictSource(base, origin="base.pt")
    assert as_tensor_set(src, "base") is src
    live = ParamSet({k: nn.Parameter(v.clone()) for k, v in branches[0].items()})
    sets = [ShardSnapshot.capture(live)]
    sets.append(StateDictSource(branches[1]))
    assert all(isinstance(s, WeightSource) for s in sets)
    method = get_method("ties", density=0.5)
    disk = merge_state_dicts(method, StateDictSource(base), sets)
    result = merge_module_branches(
        method, None, src, [StateDictSource(b) for b in branches], collect=True
    )
    assert result.merged is not None
    for name, value in disk.items():
        assert torch.allclose(value.double(), result.merged[name].double(), atol=1e-6), name
    save_file({"m": torch.arange(40.0).reshape(8, 5)}, str(tmp_path / "m.safetensors"))
    file_src = SafetensorsFileSource(tmp_path / "m.safetensors")
    rows: list[tuple[int, int]] = []
    get_rows = file_src.get_rows
    file_src.get_rows = lambda n, a, b: rows.append((a, b)) or get_rows(n, a, b)  # type: ignore[method-assign]
    part = local_partition(file_src, "m", 3, 1)  # elements 14..28: rows 2..5
    assert torch.equal(part, torch.arange(14.0, 28.0)) and rows == [(2, 6)]


def test_snapshot_copies() -> None:
    """A snapshot is a copy: later training does not change it."""
    layer = nn.Linear(4, 3)
    snap = ShardSnapshot.capture(ParamSet.from_module(layer))
    before = snap.get("weight").clone()
    with torch.no_grad():
        layer.weight.add_(1.0)
    assert torch.equal(snap.get("weight"), before)


# ---------------------------------------------------------------------- entry point (one process)


def test_single_process_entry_point_matches_merge_state_dicts() -> None:
    """merge_module_branches writes exactly merge_state_dicts' result into the target module."""
    torch.manual_seed(0)
    target = nn.Sequential(nn.Linear(40, 36), nn.LayerNorm(36), nn.Linear(36, 5))
    base = {k: v.clone() for k, v in target.state_dict().items()}
    branches = [{k: v + 0.1 * torch.randn_like(v) for k, v in base.items()} for _ in range(3)]
    method = get_method("drm", drop_rate=0.7)
    expected = merge_state_dicts(method, base, branches, coefficients=[1.0, 0.5, 0.8])
    result = merge_module_branches(method, target, base, branches, coefficients=[1.0, 0.5, 0.8])
    assert result.engine == "single" and result.stats.owner_items == len(base)
    for name, value in target.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_entry_point_validation_lists_every_problem() -> None:
    """Missing tensors and shape mismatches are reported together, before any merge work."""
    base = {"a": torch.zeros(3, 2), "b": torch.zeros(4)}
    bad = [{"a": torch.zeros(3, 3), "b": torch.zeros(4)}, {"a": torch.zeros(3, 2)}]
    with pytest.raises(ValueError) as info:
        merge_module_branches(get_method("ties"), None, base, bad, collect=True)
    text = str(info.value)
    assert "branch 1 is missing 1 key(s) of the base: b" in text
    assert (
        "shape mismatch in 1 tensor(s):\n  a: base [3, 2], branch 0 [3, 3], branch 1 [3, 2]" in text
    )
    with pytest.raises(ValueError, match="coefficients"):
        merge_module_branches(
            get_method("ties"), None, base, [base], coefficients=[1.0, 2.0], collect=True
        )
    with pytest.raises(ValueError, match="nothing to do"):
        merge_module_branches(get_method("ties"), None, base, [base])
    with pytest.raises(ValueError, match="engine"):
        DistributedMerger(get_method("ties"), engine="fsdp")  # type: ignore[arg-type]


def test_disk_and_distributed_paths_share_the_planner_messages() -> None:
    """One planner: plan_merge (disk job, merge loop) and DistributedMerger refuse the same
    inputs with the same message (missing and extra names, shapes, dtypes, fused-QKV split)."""
    from drm_lightning.merge.plan import plan_merge
    from drm_lightning.merge.routing import Routing
    from drm_lightning.sources import StateDictSource

    base = {
        "a": torch.zeros(4, 3),
        "b": torch.zeros(5, 3),
        "ids": torch.zeros(2, dtype=torch.long),
        "attn.qkv.weight": torch.zeros(7, 3),
    }
    wide = base | {"a": torch.zeros(4, 2)}
    short = {k: v for k, v in base.items() if k != "b"} | {"extra": torch.zeros(1)}
    routing = Routing(fused_qkv=[r".*qkv\.weight"])

    def sources() -> tuple[StateDictSource, list[StateDictSource]]:
        return StateDictSource(base, origin="b.pt"), [
            StateDictSource(d, origin=f"x{i}.pt") for i, d in enumerate([wide, short])
        ]

    with pytest.raises(ValueError) as disk:
        plan_merge(*sources(), routing=routing)
    with pytest.raises(ValueError) as dist:
        merge_module_branches(get_method("ties"), None, *sources(), routing=routing, collect=True)
    assert str(dist.value) == str(disk.value)
    text = str(disk.value)
    assert "branch 1 (x1.pt) is missing 1 key(s) of the base: b" in text
    assert "branch 1 (x1.pt) has 1 key(s) not in the base: extra" in text
    assert "a: base [4, 3], branch 0 [4, 2], branch 1 [4, 3]" in text
    assert "'ids' in branch 0 has non-float dtype torch.int64" in text
    assert "'attn.qkv.weight' matches routing.fused_qkv but its 7 rows" in text
    # The same messages from dicts (the in-memory path wraps them without a source label).
    with pytest.raises(ValueError) as plain:
        merge_module_branches(
            get_method("ties"), None, base, [wide, short], routing=routing, collect=True
        )
    assert "branch 1 is missing 1 key(s) of the base: b" in str(plain.value)


def test_distributed_planner_checks_the_target_names() -> None:
    """With a target, its names are merged: every input must hold them (the planner's
    message), and inputs may hold more (a state dict's buffers next to the parameters)."""
    target = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    state = {k: v.clone() for k, v in target.state_dict().items()}  # buffers, one int64
    plan = DistributedMerger(get_method("ties")).plan(target, state, [state])
    assert sorted(it.name for it in plan.items) == sorted(n for n, _ in target.named_parameters())
    partial = {k: v for k, v in state.items() if k != "1.bias"}
    with pytest.raises(ValueError, match=r"branch 0 is missing 1 key\(s\) of the target: 1\.bias"):
        merge_module_branches(get_method("ties"), target, state, [partial])
    with pytest.raises(ValueError, match=r"base is missing 1 key\(s\) of the names to merge: z"):
        DistributedMerger(get_method("ties")).plan(None, state, [state], names=["0.weight", "z"])


def test_dry_run_plan_without_process_group() -> None:
    """The planner simulates any world size from metadata only (drm-merge --dry-run)."""
    base = {f"l{i}.weight": torch.zeros(64, 64) for i in range(8)} | {"norm": torch.zeros(64)}
    plan = DistributedMerger(get_method("drm")).plan(
        None, base, [base, base], world_size=4, engine="replica"
    )
    assert plan.world_size == 4 and plan.engine == "replica"
    assert [len(plan.owned_by(r)) for r in range(4)] in (
        [3, 2, 2, 2],
        [2, 2, 2, 3],
        [2, 3, 2, 2],
        [2, 2, 3, 2],
    )


def test_sharded_merger_refuses_horizontal_matrices() -> None:
    """DRM-H's basis is not a sum over rows: a matrix routed to the sharded merger is refused."""
    target = _FlatTarget({"w": nn.Parameter(torch.zeros(4, 4))}, "target")
    merger = ShardedMerger(
        Comm(None), get_method("drm", direction="horizontal"), [1.0, 1.0], torch.float64
    )
    item = MergeItem("w", (4, 4), "matrix", 1.0, 128, "sharded")
    base = StateDictSource({"w": torch.zeros(4, 4)})
    with pytest.raises(ValueError, match="DRM-V only"):
        merger.run([item], target, base, [base, base])
