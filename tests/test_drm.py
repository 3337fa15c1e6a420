"""DRM oracles and properties from the spec (shared/spec/drm.md §13), in float64."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from drm_lightning.methods import get_method
from drm_lightning.methods.drm import (
    drm_merge,
    drm_merge_lowrank,
    merge_coordinates,
    pruning_scores,
    shared_basis,
)
from drm_lightning.methods.ops import (
    disjoint_mean,
    elect_signs,
    kept_count,
    kth_smallest,
    topk_mask,
)

F64 = torch.float64
FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "drm_reference.safetensors"


def _deltas(n_branches: int, n: int, m: int, seed: int = 0, scales=None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(n_branches, n, m, generator=g, dtype=F64)
    scales = scales or [1.0 + 0.5 * i for i in range(n_branches)]
    return d * torch.tensor(scales, dtype=F64).reshape(-1, 1, 1)


def _ones(n: int) -> torch.Tensor:
    return torch.ones(n, dtype=F64)


def _fixture_cases():
    meta = json.loads(safe_open(str(FIXTURES), "pt").metadata()["cases"])
    return sorted(meta.items())


# 1. Reference match (frozen fixtures from the reference library).
@pytest.mark.parametrize("case", [name for name, _ in _fixture_cases()])
@pytest.mark.parametrize("direction", ["vertical", "horizontal"])
@pytest.mark.parametrize("solver", ["svd", "gram"])
def test_matches_reference_fixtures(case: str, direction: str, solver: str) -> None:
    tensors = load_file(str(FIXTURES))
    info = dict(_fixture_cases())[case]
    deltas = tensors[f"{case}.deltas"]
    expected = tensors[f"{case}.{direction}"]
    coefs = torch.tensor(info["coefficients"], dtype=F64)
    out = drm_merge(
        deltas,
        coefs,
        drop_rate=info["drop_rate"],
        direction=direction,
        reference_compat=True,
        solver=solver,
    )
    tol = 1e-12 if solver == "svd" else 1e-10
    assert torch.allclose(out, expected, rtol=0, atol=tol * expected.abs().max()), case


def test_exact_topk_differs_from_reference_only_at_the_cut() -> None:
    tensors = load_file(str(FIXTURES))
    deltas = tensors["square_n3_p08.deltas"]
    exact = drm_merge(deltas, _ones(3), drop_rate=0.8)
    compat = drm_merge(deltas, _ones(3), drop_rate=0.8, reference_compat=True)
    rel = (exact - compat).norm() / compat.norm()
    assert 0 < rel < 0.05
    # In the shared basis the two keep-masks differ at the cut only: the reference keeps the
    # k-th smallest score too (one extra entry; float64 scores have no ties), nothing else.
    basis = shared_basis(deltas.mT, solver="svd")
    coords = deltas.mT @ basis.vectors
    scores = pruning_scores(coords, basis.sigma)
    exact_mask, compat_mask = topk_mask(scores, 0.2), topk_mask(scores, 0.2, reference_compat=True)
    assert int((exact_mask & ~compat_mask).sum()) == 0
    assert int((compat_mask & ~exact_mask).sum()) == 1
    cut = scores.abs()[exact_mask].min()
    assert float(scores.abs()[compat_mask & ~exact_mask].max()) <= float(cut)


# 2. Duality.
@pytest.mark.parametrize("shape", [(12, 7), (7, 12), (9, 9)])
def test_horizontal_is_transposed_vertical(shape) -> None:
    d = _deltas(3, *shape, seed=1)
    lam = torch.tensor([1.0, 0.5, 2.0], dtype=F64)
    h = drm_merge(d, lam, direction="horizontal")
    v = drm_merge(d.mT, lam, direction="vertical").mT
    assert torch.allclose(h, v, atol=1e-12)


# 3. Projection identity: T_i = Δ_i V_r and c_ij = σ_j ||U_i[:, j]||.
def test_projection_identity() -> None:
    d = _deltas(3, 10, 6, seed=2)
    u, s, vh = torch.linalg.svd(d.reshape(30, 6), full_matrices=False)
    basis = shared_basis(d, solver="svd")
    assert basis.rank == 6
    coords = d @ basis.vectors
    blocks = u.reshape(3, 10, 6)
    # up to the sign of each singular vector
    signs = torch.sign((basis.vectors * vh.mT).sum(0))
    assert torch.allclose(coords, blocks * s * signs, atol=1e-12)
    assert torch.allclose(coords.norm(dim=1), s * blocks.norm(dim=1), atol=1e-12)


# 4. Single model, no pruning: truncated SVD; full-rank well-conditioned → Δ·λ.
def test_single_model_no_pruning_is_truncated_svd() -> None:
    g = torch.Generator().manual_seed(3)
    q1, _ = torch.linalg.qr(torch.randn(12, 8, generator=g, dtype=F64))
    q2, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=F64))
    sig = torch.tensor([10.0, 5, 3, 1, 0.5, 0.2, 0.05, 0.01], dtype=F64)  # last two below 1 %
    delta = (q1 * sig) @ q2.mT
    out = drm_merge(delta[None], _ones(1), drop_rate=0.0)
    truncated = (q1[:, :6] * sig[:6]) @ q2[:, :6].mT
    assert torch.allclose(out, truncated, atol=1e-12)
    well = (q1 * torch.linspace(1, 2, 8, dtype=F64)) @ q2.mT
    assert torch.allclose(
        drm_merge(well[None], torch.tensor([0.7], dtype=F64), drop_rate=0.0), 0.7 * well, atol=1e-12
    )


# 5. Identical deltas.
@pytest.mark.parametrize("direction", ["vertical", "horizontal"])
@pytest.mark.parametrize("n_branches", [2, 3])
def test_identical_deltas_equal_single(direction: str, n_branches: int) -> None:
    d = _deltas(1, 14, 8, seed=4)  # every kept count L·(1-p) is an integer: no rounding drift
    same = d.expand(n_branches, -1, -1).contiguous()
    for solver in ("svd", "gram"):
        # every coordinate appears N times: the reference rule keeps whole tie groups, so the
        # kept set is the same as for one copy (exact top-k would split a tied pair at the cut)
        kw = dict(drop_rate=0.5, direction=direction, solver=solver, reference_compat=True)
        multi = drm_merge(same, _ones(n_branches), **kw)
        single = drm_merge(d, _ones(1), **kw)
        assert torch.allclose(multi, single, atol=1e-10)


# 6. Disjoint supports are summed, not averaged down.
def test_disjoint_supports_add_up() -> None:
    d = torch.zeros(2, 8, 20, dtype=F64)
    g = torch.Generator().manual_seed(5)
    d[0, :, :10] = torch.randn(8, 10, generator=g, dtype=F64)
    d[1, :, 10:] = torch.randn(8, 10, generator=g, dtype=F64)
    out = drm_merge(d, _ones(2), drop_rate=0.0, rank_rtol=0.0)
    assert torch.allclose(out, d[0] + d[1], atol=1e-12)
    dh = d.mT.contiguous()  # disjoint output rows for DRM-H
    outh = drm_merge(dh, _ones(2), drop_rate=0.0, rank_rtol=0.0, direction="horizontal")
    assert torch.allclose(outh, dh[0] + dh[1], atol=1e-12)


# 7. Order invariance (models permuted with their λ).
def test_model_order_invariance() -> None:
    d = _deltas(4, 11, 7, seed=6)
    lam = torch.tensor([1.0, 0.3, 0.8, 1.5], dtype=F64)
    perm = torch.tensor([2, 0, 3, 1])
    for direction in ("vertical", "horizontal"):
        a = drm_merge(d, lam, drop_rate=0.6, direction=direction)
        b = drm_merge(d[perm], lam[perm], drop_rate=0.6, direction=direction)
        assert torch.allclose(a, b, atol=1e-12)


# 8. Odd symmetry and scale equivariance.
def test_odd_symmetry_and_scaling() -> None:
    d = _deltas(3, 9, 13, seed=7)
    lam = _ones(3)
    base = drm_merge(d, lam, drop_rate=0.5)
    assert torch.allclose(drm_merge(-d, lam, drop_rate=0.5), -base, atol=1e-12)
    assert torch.allclose(drm_merge(3.5 * d, lam, drop_rate=0.5), 3.5 * base, atol=1e-11)
    assert torch.allclose(drm_merge(d, 0.25 * lam, drop_rate=0.5), 0.25 * base, atol=1e-12)


# 9. Singular-vector sign invariance (flip basis vectors inside the pipeline).
def test_basis_sign_invariance() -> None:
    d = _deltas(3, 10, 8, seed=8)
    basis = shared_basis(d, solver="svd")
    flip = torch.tensor([1, -1, 1, -1, -1, 1, 1, -1], dtype=F64)[: basis.rank]
    outs = []
    for vectors in (basis.vectors, basis.vectors * flip):
        coords = d @ vectors
        merged = merge_coordinates(coords, basis.sigma, _ones(3), reduced_dim=8, drop_rate=0.8)
        outs.append(merged @ vectors.mT)
    assert torch.allclose(outs[0], outs[1], atol=1e-12)


# 10. Pruning count and the renormalised score (injected basis).
def test_pruning_keeps_exact_count_and_compat_one_more() -> None:
    scores = torch.randn(3, 50, 7, dtype=F64)
    total = scores.numel()
    for p in (0.5, 0.8, 0.9):
        assert int(topk_mask(scores, 1 - p).sum()) == kept_count(total, 1 - p)
        assert (
            int(topk_mask(scores, 1 - p, reference_compat=True).sum())
            == kept_count(total, 1 - p) + 1
        )
    assert int(topk_mask(torch.randn(1000, dtype=F64), 0.2, reference_compat=True).sum()) == 201


def test_renormalised_mask_ignores_branch_scale() -> None:
    g = torch.Generator().manual_seed(9)
    coords = torch.randn(3, 20, 5, generator=g, dtype=F64)
    sigma = torch.tensor([5.0, 4, 3, 2, 1], dtype=F64)
    scaled = coords.clone()
    scaled[1] *= 1000
    mask = topk_mask(pruning_scores(coords, sigma), 0.2)
    assert torch.equal(topk_mask(pruning_scores(scaled, sigma), 0.2), mask)
    merged = merge_coordinates(scaled, sigma, _ones(3), reduced_dim=20, drop_rate=0.8)
    assert torch.equal(merged != 0, mask.any(dim=0) & (merged != 0))


# 11. Renorm ablation: without renorm, scaling one branch's coordinates takes the budget.
def test_without_renorm_scaled_branch_takes_the_budget() -> None:
    g = torch.Generator().manual_seed(10)
    coords = torch.randn(3, 20, 5, generator=g, dtype=F64)
    sigma = torch.ones(5, dtype=F64)
    scaled = coords.clone()
    scaled[1] *= 1000
    budget = kept_count(coords.numel(), 0.2)
    raw = topk_mask(pruning_scores(scaled, sigma, renormalize=False), 0.2)
    renorm = topk_mask(pruning_scores(scaled, sigma, renormalize=True), 0.2)
    assert int(raw[1].sum()) == budget  # branch 1 holds every kept entry
    assert int(renorm[1].sum()) < budget // 2


def test_renorm_changes_result_only_through_pruning() -> None:
    d = _deltas(3, 12, 10, seed=11, scales=[1.0, 20.0, 0.1])
    on = drm_merge(d, _ones(3), drop_rate=0.0, renormalize=True)
    off = drm_merge(d, _ones(3), drop_rate=0.0, renormalize=False)
    assert torch.allclose(on, off, atol=1e-12)
    assert not torch.allclose(
        drm_merge(d, _ones(3), drop_rate=0.8, renormalize=True),
        drm_merge(d, _ones(3), drop_rate=0.8, renormalize=False),
    )


# 12. Zero handling.
@pytest.mark.parametrize("direction", ["vertical", "horizontal"])
@pytest.mark.parametrize("solver", ["svd", "gram"])
def test_zero_deltas(direction: str, solver: str) -> None:
    zeros = torch.zeros(3, 6, 5, dtype=F64)
    out = drm_merge(zeros, _ones(3), direction=direction, solver=solver)
    assert torch.equal(out, torch.zeros(6, 5, dtype=F64))
    d = _deltas(2, 6, 5, seed=12)
    with_zero = torch.cat([d, torch.zeros(1, 6, 5, dtype=F64)])
    a = drm_merge(with_zero, _ones(3), drop_rate=0.0, direction=direction, solver=solver)
    b = drm_merge(d, _ones(2), drop_rate=0.0, direction=direction, solver=solver)
    assert torch.isfinite(a).all()
    assert torch.allclose(a, b, atol=1e-12)
    pruned = drm_merge(with_zero, _ones(3), drop_rate=0.8, direction=direction, solver=solver)
    assert torch.isfinite(pruned).all()


def test_gram_route_zero_and_full_rank_large() -> None:
    # matrices of 64+ take the partial-eigensolver path on CPU
    zeros = torch.zeros(2, 100, 80, dtype=F64)
    assert torch.equal(drm_merge(zeros, _ones(2), solver="gram"), torch.zeros(100, 80, dtype=F64))
    d = _deltas(2, 100, 80, seed=21)
    assert shared_basis(d, solver="gram").rank == shared_basis(d, solver="svd").rank == 80
    a = drm_merge(d, _ones(2), solver="gram")
    b = drm_merge(d, _ones(2), solver="svd")
    assert torch.allclose(a, b, atol=1e-9 * b.abs().max())


def test_single_zero_branch_and_n1() -> None:
    assert torch.equal(
        drm_merge(torch.zeros(1, 4, 4, dtype=F64), _ones(1)), torch.zeros(4, 4, dtype=F64)
    )
    d = _deltas(1, 6, 4, seed=13)
    out = drm_merge(d, _ones(1), drop_rate=0.8)
    assert torch.isfinite(out).all() and out.abs().sum() > 0


# 13. LoRA factored path equals the dense path.
@pytest.mark.parametrize("direction", ["vertical", "horizontal"])
@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_lowrank_equals_dense(direction: str, shape) -> None:
    n, m = shape
    g = torch.Generator().manual_seed(14)
    factors = [
        (torch.randn(n, r, generator=g, dtype=F64), torch.randn(r, m, generator=g, dtype=F64))
        for r in (4, 2, 3)
    ]
    factors.append(None)  # a branch that did not touch this matrix
    lam = torch.tensor([1.0, 0.5, 1.2, 1.0], dtype=F64)
    dense = torch.stack([b @ a for b, a in factors[:3]] + [torch.zeros(n, m, dtype=F64)])
    for p in (0.0, 0.5, 0.8):
        exact = drm_merge(dense, lam, drop_rate=p, direction=direction, solver="svd")
        low = drm_merge_lowrank(factors, lam, (n, m), drop_rate=p, direction=direction)
        assert torch.allclose(low, exact, rtol=0, atol=1e-10), p
    assert torch.equal(
        drm_merge_lowrank([None, None], _ones(2), (n, m)), torch.zeros(n, m, dtype=F64)
    )


# 14. dtype: bf16 in → bf16 out equal to fp32 computation rounded once.
def test_bf16_inputs_round_once() -> None:
    from drm_lightning.merge.tensor import merge_tensor

    g = torch.Generator().manual_seed(15)
    base = torch.randn(16, 12, generator=g).to(torch.bfloat16)
    branches = [
        (base.float() + 0.05 * torch.randn(16, 12, generator=g)).to(torch.bfloat16)
        for _ in range(3)
    ]
    method = get_method("drm", drop_rate=0.8)
    out = merge_tensor(method, "matrix", base, branches, [1.0, 1.0, 1.0])
    assert out.dtype == torch.bfloat16
    ref = merge_tensor(
        method, "matrix", base.float(), [b.float() for b in branches], [1.0, 1.0, 1.0]
    )
    assert torch.equal(out, ref.to(torch.bfloat16))
    assert torch.isfinite(out.float()).all()
    half = merge_tensor(method, "matrix", base.half(), [b.half() for b in branches], [1.0] * 3)
    assert half.dtype == torch.float16 and torch.isfinite(half).all()


# Gram route equals the SVD route.
@pytest.mark.parametrize("shape", [(200, 40), (40, 200), (60, 60), (300, 96), (96, 300)])
@pytest.mark.parametrize("direction", ["vertical", "horizontal"])
def test_gram_route_equals_svd(shape, direction: str) -> None:
    g = torch.Generator().manual_seed(16)
    n, m = shape
    # low rank plus noise, as real fine-tuning deltas look
    d = torch.stack(
        [
            torch.randn(n, 8, generator=g, dtype=F64) @ torch.randn(8, m, generator=g, dtype=F64)
            + 0.05 * torch.randn(n, m, generator=g, dtype=F64)
            for _ in range(3)
        ]
    )
    a = drm_merge(d, _ones(3), direction=direction, solver="svd")
    b = drm_merge(d, _ones(3), direction=direction, solver="gram")
    assert torch.allclose(a, b, rtol=0, atol=1e-9 * a.abs().max())


# TIES-stage oracles against peft (spec §13 items 15–17).
def test_elect_and_disjoint_equal_peft() -> None:
    merge_utils = pytest.importorskip("peft.utils.merge_utils")
    g = torch.Generator().manual_seed(17)
    x = torch.randn(4, 30, 6, generator=g, dtype=F64)
    lam = torch.tensor([1.0, 0.5, 2.0, 0.7], dtype=F64)
    ours = disjoint_mean(x, elect_signs(x, tie_break="positive"), lam)
    mask = merge_utils.calculate_majority_sign_mask(x, method="total")
    theirs = merge_utils.disjoint_merge(x * lam.reshape(-1, 1, 1), mask)
    assert torch.equal(ours, theirs)


def test_fallback_equals_peft_ties() -> None:
    merge_utils = pytest.importorskip("peft.utils.merge_utils")
    g = torch.Generator().manual_seed(18)
    x = torch.randn(3, 25, generator=g, dtype=F64)
    lam = torch.tensor([1.0, 0.4, 1.3], dtype=F64)
    ours = get_method("drm").merge_fallback(x, lam)
    theirs = merge_utils.ties(list(x), lam, density=1.0, majority_sign_method="total")
    assert torch.equal(ours, theirs)


def test_tie_break_conventions_pinned() -> None:
    x = torch.tensor([[1.0, -4.0, -2.0], [-1.0, -1.0, -1.0]], dtype=F64)
    lam = _ones(2)
    drm_style = disjoint_mean(x, elect_signs(x, tie_break="majority"), lam)
    peft_style = disjoint_mean(x, elect_signs(x, tie_break="positive"), lam)
    assert drm_style.tolist() == [-1.0, -2.5, -1.5]
    assert peft_style.tolist() == [1.0, -2.5, -1.5]


def test_coefficient_zero_branch_is_not_counted() -> None:
    x = torch.tensor([[2.0, 2.0], [4.0, 6.0]], dtype=F64)
    out = disjoint_mean(x, elect_signs(x), torch.tensor([1.0, 0.0], dtype=F64))
    assert out.tolist() == [2.0, 2.0]


def test_parameter_validation() -> None:
    with pytest.raises(ValueError, match="did you mean 'drop_rate'"):
        get_method("drm", drop_rat=0.5)
    with pytest.raises(ValueError, match="drop_rate"):
        get_method("drm", drop_rate=1.0)
    with pytest.raises(ValueError, match="drop_rate"):
        get_method("drm", drop_rate=-0.1)
    with pytest.raises(ValueError, match="did you mean 'drm'"):
        get_method("dmr")
    with pytest.raises(ValueError, match="direction"):
        get_method("drm", direction="diagonal")
    assert get_method("drm", direction="h").params.direction == "horizontal"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_kth_smallest_equals_torch_kthvalue(dtype: torch.dtype) -> None:
    """The CPU selection (numpy introselect) returns torch.kthvalue's value, ties included."""
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(5000, generator=gen, dtype=torch.float64).round(decimals=2).abs().to(dtype)
    values[torch.rand(5000, generator=gen) < 0.4] = 0  # masses of exact zeros, as in pruning scores
    for k in (1, 2, 1234, 2500, 4999, 5000):
        got = kth_smallest(values, k)
        assert got.dtype == dtype and got.dim() == 0
        assert torch.equal(got, torch.kthvalue(values, k).values), k
    assert torch.equal(kth_smallest(torch.zeros(7, dtype=dtype), 7), torch.zeros((), dtype=dtype))
