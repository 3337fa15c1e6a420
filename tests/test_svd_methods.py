"""TSV-M, Iso-C and Iso-CTS against float64 oracles written from the papers, and end to end.

The oracles below are numpy, written from the papers' formulas in the shape of the reference
code (TanGanKe/fusion_bench ``TSVM_utils`` / ``iso_utils``, the authors' repositories): fixed
``min(n, m)``-wide buffers filled block by block, ``svd`` of the stacked singular vectors and
``P Qᵀ`` for the orthogonalisation. On generic (full-rank) inputs the method equals them to
float64 rounding; the rank-deficient cases, where the references keep arbitrary null
directions, are checked by properties instead (docs/methods/tsv_m.md, docs/methods/iso.md).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from test_lightning_common import TASKS, Probe, acc_specs, branched, train_loaders, trainer

from drm_lightning.cli.command import main
from drm_lightning.lightning import MergeCallback
from drm_lightning.methods import available_methods, get_method
from drm_lightning.methods.svd_merge import iso_sizes

F64 = torch.float64
NAMES = ("tsv_m", "iso_c", "iso_cts")


# ----------------------------------------------------------------------------- oracles


def _polar(x: np.ndarray) -> np.ndarray:
    p, _, qh = np.linalg.svd(x, full_matrices=False)
    return p @ qh


def oracle_tsv_m(deltas: np.ndarray, w: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """TSV-M (Gargiulo et al., Alg. 1): top r/T triplets per task, orthogonalised, summed."""
    t, n, m = deltas.shape
    r = min(n, m)
    k = int(r * (1 / t))
    u_cat, s_cat, v_cat = np.zeros((n, r)), np.zeros(r), np.zeros((r, m))
    for i in range(t):
        u, s, vh = np.linalg.svd(w[i] * deltas[i], full_matrices=False)
        u_cat[:, i * k : (i + 1) * k] = u[:, :k]
        s_cat[i * k : (i + 1) * k] = s[:k]
        v_cat[i * k : (i + 1) * k] = vh[:k]
    return alpha * _polar(u_cat) @ np.diag(s_cat) @ _polar(v_cat)


def oracle_iso_c(deltas: np.ndarray, w: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """Iso-C (Marczak et al., Eq. 6): the sum's spectrum replaced by its mean."""
    total = sum(w[i] * deltas[i] for i in range(len(deltas)))
    u, s, vh = np.linalg.svd(total, full_matrices=False)
    return alpha * u @ np.diag(np.full_like(s, s.mean())) @ vh


def oracle_iso_cts(
    deltas: np.ndarray, w: np.ndarray, alpha: float = 1.0, fraction: float = 0.8
) -> np.ndarray:
    """Iso-CTS (Marczak et al., Alg. 1): common subspace of the sum, task-specific subspaces of
    the residuals, orthogonalised, flat spectrum."""
    t, n, m = deltas.shape
    r = min(n, m)
    common = int(r * fraction)
    common = r - round((r - common) / t) * t
    per_task = (r - common) // t
    tvs = [w[i] * deltas[i] for i in range(t)]
    u, s, vh = np.linalg.svd(sum(tvs), full_matrices=False)
    uc, sc, vc = u[:, :common], s[:common], vh[:common]
    u_cat, s_cat, v_cat = np.zeros((n, r)), np.zeros(r), np.zeros((r, m))
    for i, tv in enumerate(tvs):
        ut, st, vt = np.linalg.svd(tv - uc @ uc.T @ tv, full_matrices=False)
        u_cat[:, i * per_task : (i + 1) * per_task] = ut[:, :per_task]
        s_cat[i * per_task : (i + 1) * per_task] = st[:per_task]
        v_cat[i * per_task : (i + 1) * per_task] = vt[:per_task]
    u_cat[:, t * per_task :], s_cat[t * per_task :], v_cat[t * per_task :] = uc, sc, vc
    return alpha * _polar(u_cat) @ np.diag(np.full(r, s_cat.mean())) @ _polar(v_cat)


ORACLES = {"tsv_m": oracle_tsv_m, "iso_c": oracle_iso_c, "iso_cts": oracle_iso_cts}


def _deltas(t: int, n: int, m: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t, n, m, generator=g, dtype=F64)


def _merge(name: str, deltas: torch.Tensor, w: Any = None, **params: Any) -> torch.Tensor:
    w = torch.ones(deltas.shape[0], dtype=deltas.dtype) if w is None else torch.as_tensor(w)
    return get_method(name, **params).merge_matrix(deltas, w.to(deltas.dtype))


# ------------------------------------------------------------------------- against oracles


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("t", "n", "m"), [(3, 24, 15), (4, 13, 30), (2, 9, 9), (8, 40, 40)])
def test_matches_the_float64_oracle(name: str, t: int, n: int, m: int) -> None:
    deltas = _deltas(t, n, m, seed=t * n + m)
    w = np.linspace(0.6, 1.4, t) * np.where(np.arange(t) % 2, -1.0, 1.0)  # signs and scales
    got = _merge(name, deltas, w, scaling=1.3)
    want = ORACLES[name](deltas.numpy(), w, 1.3)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-10 * np.abs(want).max())


def test_iso_c_is_iso_cts_with_the_whole_space_common() -> None:
    deltas = _deltas(3, 12, 10)
    torch.testing.assert_close(
        _merge("iso_c", deltas), _merge("iso_cts", deltas, common_space_fraction=1.0)
    )


def test_iso_cts_sizes_follow_the_reference_rule() -> None:
    for r, t, f in itertools.product(range(1, 70), range(1, 10), (0.0, 0.3, 0.5, 0.8, 1.0)):
        common, per_task = iso_sizes(r, t, f)
        assert common >= 0 and per_task >= 0 and common + t * per_task == r
        ref_common = r - round((r - int(r * f)) / t) * t  # the reference, where it is valid
        if ref_common >= 0:
            assert (common, per_task) == (ref_common, (r - ref_common) // t)


def test_non_matrix_tensors_take_the_scaled_mean() -> None:
    deltas = _deltas(3, 5, 2, seed=1)[:, :, 0]  # (3, 5): biases
    w = torch.tensor([1.0, 0.5, -2.0], dtype=F64)
    for name in NAMES:
        got = get_method(name, scaling=0.7).merge_fallback(deltas, w)
        torch.testing.assert_close(got, 0.7 * (w[:, None] * deltas).sum(0) / 3)


def test_non_matrix_tensors_merge_in_row_pieces() -> None:
    deltas, w = _deltas(3, 7, 4, seed=12), torch.tensor([1.0, -0.5, 2.0], dtype=F64)
    for name in NAMES:
        method = get_method(name, scaling=1.3)
        assert method.merges_in_rows("fallback", (7, 4), 3)
        assert not method.merges_in_rows("matrix", (7, 4), 3)
        pieces = method.merge_rows("fallback", lambda a, b: deltas[:, a:b], (7, 4), w, piece_rows=3)
        torch.testing.assert_close(torch.cat(list(pieces)), method.merge_fallback(deltas, w))


def test_tsv_m_on_a_matrix_too_small_for_every_task_takes_the_mean() -> None:
    deltas = _deltas(4, 10, 3, seed=2)  # min(n, m) = 3 < T = 4: no task would keep a direction
    torch.testing.assert_close(_merge("tsv_m", deltas, scaling=2.0), 2.0 * deltas.mean(0))


# ------------------------------------------------------------------------------ properties


@pytest.mark.parametrize(("n", "m"), [(9, 5), (5, 9)])
def test_one_task(n: int, m: int) -> None:
    delta = _deltas(1, n, m, seed=3)
    torch.testing.assert_close(_merge("tsv_m", delta), delta[0])  # TSV-M keeps it whole
    u, s, vh = torch.linalg.svd(delta[0], full_matrices=False)
    flat = (u * s.mean()) @ vh
    torch.testing.assert_close(_merge("iso_c", delta), flat)
    torch.testing.assert_close(_merge("iso_cts", delta), flat)  # common + residual = all of it


@pytest.mark.parametrize("name", NAMES)
def test_branch_order_does_not_matter(name: str) -> None:
    deltas, w = _deltas(4, 16, 12, seed=4), torch.tensor([1.0, 0.3, -0.8, 2.0], dtype=F64)
    order = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(_merge(name, deltas, w), _merge(name, deltas[order], w[order]))


@pytest.mark.parametrize("name", NAMES)
def test_coefficients_scale_the_task_vectors_and_scaling_the_merge(name: str) -> None:
    deltas, w = _deltas(3, 10, 8, seed=5), torch.tensor([0.5, -1.5, 2.0], dtype=F64)
    torch.testing.assert_close(_merge(name, deltas, w), _merge(name, deltas * w[:, None, None]))
    torch.testing.assert_close(_merge(name, deltas, scaling=-0.4), -0.4 * _merge(name, deltas))


@pytest.mark.parametrize("name", NAMES)
def test_zero_task_vectors(name: str) -> None:
    assert not _merge(name, torch.zeros(3, 6, 4, dtype=F64)).any()
    assert not _merge(name, _deltas(2, 6, 4), [0.0, 0.0]).any()
    # one zero task among others adds no direction of its own (the references add arbitrary
    # singular vectors of the zero matrix): the result stays in the others' column space
    deltas = _deltas(3, 12, 4, seed=6)
    deltas[1] = 0
    got = _merge(name, deltas)
    basis = torch.linalg.qr(torch.cat([deltas[0], deltas[2]], dim=1)).Q
    torch.testing.assert_close(basis @ (basis.mT @ got), got)


def _low_rank(t: int, n: int, m: int, rank: int, seed: int) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, rank, generator=g, dtype=F64), torch.randn(rank, m, generator=g, dtype=F64))
        for _ in range(t)
    ]


@pytest.mark.parametrize("name", NAMES)
def test_rank_deficient_tasks_gain_no_arbitrary_directions(name: str) -> None:
    factors = _low_rank(3, 30, 20, 2, seed=7)
    deltas = torch.stack([b @ a for b, a in factors])
    got = _merge(name, deltas)
    s = torch.linalg.svdvals(got)
    assert int((s > 1e-9 * s[0]).sum()) <= 6  # at most the tasks' joint rank
    cols = torch.linalg.qr(torch.cat([b for b, _ in factors], dim=1)).Q
    torch.testing.assert_close(cols @ (cols.mT @ got), got)
    if name != "tsv_m":  # flat over the kept directions
        kept = s[s > 1e-9 * s[0]]
        torch.testing.assert_close(kept, kept.mean().expand_as(kept))


@pytest.mark.parametrize("name", NAMES)
def test_identical_tasks_are_well_defined(name: str) -> None:
    delta = _deltas(1, 10, 8, seed=8)
    got = _merge(name, delta.expand(3, 10, 8).clone())
    assert torch.isfinite(got).all()
    u = torch.linalg.svd(delta[0], full_matrices=False).U
    torch.testing.assert_close(u @ (u.mT @ got), got)  # within the task's own column space


@pytest.mark.parametrize("name", NAMES)
def test_lora_factors_equal_the_dense_merge(name: str) -> None:
    factors: list[Any] = _low_rank(3, 14, 11, 3, seed=9)
    factors.append(None)  # a branch that did not touch this matrix
    w = torch.tensor([1.0, 0.5, -0.7, 1.0], dtype=F64)
    dense = torch.stack(
        [torch.zeros(14, 11, dtype=F64) if f is None else f[0] @ f[1] for f in factors]
    )
    method = get_method(name, scaling=1.2)
    torch.testing.assert_close(
        method.merge_lowrank(factors, w, (14, 11)), method.merge_matrix(dense, w)
    )


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtype_is_preserved_and_the_svd_runs_in_float64(name: str, dtype: torch.dtype) -> None:
    deltas = _deltas(3, 12, 9, seed=10).to(dtype)
    ones = torch.ones(3, dtype=dtype)
    got = get_method(name).merge_matrix(deltas, ones)
    assert got.dtype == dtype
    want = ORACLES[name](deltas.double().numpy(), np.ones(3))
    tol = 2 * torch.finfo(dtype).eps * np.abs(want).max()
    np.testing.assert_allclose(got.double().numpy(), want, rtol=0, atol=tol)
    fast = get_method(name, basis_precision="compute").merge_matrix(deltas, ones)
    assert fast.dtype == dtype
    fast_tol = max(1e-4 * np.abs(want).max(), tol)  # float32 SVDs, then the output rounding
    np.testing.assert_allclose(fast.double().numpy(), want, rtol=0, atol=fast_tol)


def test_registered_with_validated_parameters() -> None:
    assert set(NAMES) <= set(available_methods())
    with pytest.raises(ValueError, match="fixed to 1.0 by method 'iso_c'"):
        get_method("iso_c", common_space_fraction=0.5)
    with pytest.raises(ValueError, match="iso_cts.common_space_fraction"):
        get_method("iso_cts", common_space_fraction=1.5)
    with pytest.raises(ValueError, match="tsv_m.scaling"):
        get_method("tsv_m", scaling=float("nan"))
    with pytest.raises(ValueError, match="unknown parameter 'alpha'.*scaling"):
        get_method("tsv_m", alpha=1.0)
    for name in NAMES:  # whole tensors: the ZeRO-3 engine gathers them to an owner
        method = get_method(name)
        assert not method.row_local("matrix", (8, 8), 3)
        assert not method.row_local("fallback", (8,), 3)
        with pytest.raises(ValueError, match="branch 1"):
            method.merge_matrix(torch.tensor([[[1.0]], [[float("nan")]]]), torch.ones(2))


# --------------------------------------------------------------------------- entry points


def _folder(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def test_cli_merge(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(11)
    shapes = {"layer.weight": (12, 10), "layer.bias": (12,), "out.weight": (6, 12)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    branches = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}]
    branches += [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}]
    coefficients = [1.0, 0.6]
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "method": "iso_cts",
                "base": str(_folder(tmp_path / "base", base)),
                "branches": [
                    {"path": str(_folder(tmp_path / f"b{i}", b)), "coefficient": c}
                    for i, (b, c) in enumerate(zip(branches, coefficients, strict=True))
                ],
                "parameters": {"scaling": 1.5, "common_space_fraction": 0.5},
            }
        )
    )
    assert main([str(cfg), "-o", str(tmp_path / "out"), "--no-progress"]) == 0
    merged = load_file(tmp_path / "out" / "model.safetensors")
    w = np.array(coefficients)
    for k, b in base.items():
        deltas = np.stack([br[k].double().numpy() - b.double().numpy() for br in branches])
        if b.dim() == 2:
            want = oracle_iso_cts(deltas, w, 1.5, fraction=0.5)
        else:
            want = 1.5 * (w[:, None] * deltas).mean(0)
        got = merged[k].double().numpy() - b.double().numpy()
        assert merged[k].dtype == torch.float32
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max(), err_msg=k)


def test_merge_callback_runs_tsv_m() -> None:
    before = Probe()
    cb = MergeCallback("tsv_m", tasks=acc_specs(), every_n_steps=2)
    trainer(max_steps=2, callbacks=[before, cb]).fit(branched(), train_loaders())
    state, merged = before.states[2], cb.last_merged
    assert merged is not None and [r["step"] for r in cb.history] == [2]
    for key in ("0.weight", "2.weight", "0.bias"):
        base = state[f"base.{key}"].double().numpy()
        deltas = np.stack([state[f"branches.{t}.{key}"].double().numpy() - base for t in TASKS])
        ones = np.ones(len(TASKS))
        want = oracle_tsv_m(deltas, ones) if deltas.ndim == 3 else deltas.mean(0)
        got = merged[key].double().numpy() - base
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max(), err_msg=key)
