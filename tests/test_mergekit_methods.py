"""mergekit's slerp, nuslerp, breadcrumbs(_ties), della(_linear) and model_stock.

Oracles: mergekit 0.1.5's own kernels on the same tensors (``slerp`` through its batch
kernel, the others through ``merge_group``), float64 formulas written here, and a
``mergekit-yaml``-style run of mergekit's ``run_merge`` next to ``drm-merge`` on one tiny Llama
(the zoo of tests/test_mergekit_format.py).

Bounds: float64 inputs agree with mergekit to 1e-12 (measured ~1e-16; slerp's norms and dot
are summed in another order). DELLA's masks are made identical by reproducing mergekit's RNG
use (``torch.manual_seed(s)`` before mergekit, ``torch.Generator().manual_seed(s)`` for us,
both drawing ``torch.bernoulli`` branch by branch from float32 probabilities); mergekit
rescales in float32, so float64 results agree to ~1e-7 relative. In a whole-model merge the
streams differ (mergekit: one global stream over its tensor order; drm-merge: one generator
per tensor name), so della is compared there statistically.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from drm_lightning.cli import command as cli
from drm_lightning.config.errors import ConfigError
from drm_lightning.config.loading import load_config
from drm_lightning.config.mergekit import MergekitConfig, PerTensorParameters, layer_position
from drm_lightning.merge import merge_state_dicts, merge_tensor
from drm_lightning.merge.pieces import merges_in_pieces
from drm_lightning.merge.plan import PlannedTensor
from drm_lightning.methods import get_method, method_parameters
from drm_lightning.methods._sparsify import magprune_probabilities, outlier_mask
from drm_lightning.methods.slerp import slerp_delta
from drm_lightning.sources import StateDictSource

mk_registry = pytest.importorskip("mergekit.merge_methods.registry")
mk_base = pytest.importorskip("mergekit.merge_methods.base")
mk_sparsify = pytest.importorskip("mergekit.sparsify")
pytest.importorskip("transformers")
import test_mergekit_format as mk_format  # noqa: E402 - after the skips

mk_config = pytest.importorskip("mergekit.config")
mk_merge = pytest.importorskip("mergekit.merge")
mk_options = pytest.importorskip("mergekit.options")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
F64, F32 = torch.float64, torch.float32
BOUND64 = 1e-12
_read, _yaml = mk_format._read, mk_format._yaml


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/test_mergekit_format.py's tiny float32 Llama base and three fine-tunes."""
    return mk_format.zoo.__wrapped__(tmp_path_factory)


def _rand(*shape: int, seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


def _ones(n: int, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.ones(n, dtype=dtype)


def _worst(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float((a.double() - b.double()).abs().max())


# --------------------------------------------------------------------------- mergekit calls


def _mk_slerp(t: float, base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    batch = mk_base.TensorBatch((base[None], other[None]), base_index=0)
    return mk_registry.get("slerp").merge_batch(batch, t=torch.tensor([t], dtype=base.dtype))[0]


def _mk_group(
    name: str, base: torch.Tensor | None, others: list[torch.Tensor], **params: Any
) -> torch.Tensor:
    ids = [f"m{i}" for i in range(len(others))]
    tensors = ([base] if base is not None else []) + others
    group = mk_base.TensorGroup.from_tensors(
        tensors,
        ids=(["base"] if base is not None else []) + ids,
        base_index=0 if base is not None else None,
    )
    per_input = {k: dict(zip(ids, v)) for k, v in params.items() if isinstance(v, list)}
    method = mk_registry.get(name)
    shared = {
        p.name: p.default
        for p in method.spec.parameters
        if p.scope == mk_base.ParameterScope.SHARED and p.name not in per_input
    }
    shared.update({k: v for k, v in params.items() if not isinstance(v, list)})
    if name == "nuslerp":
        per_input = {k: mk_base.PerInputValues(list(v.items())) for k, v in per_input.items()}
    return method.merge_group(group, **shared, **per_input)


def _ours(name: str, base: torch.Tensor, others: list[torch.Tensor], coefs=None, **params):
    """``base + merged delta`` through merge_tensor (the one whole-tensor merge)."""
    method = get_method(name, **params)
    route = "matrix" if base.dim() == 2 else "fallback"
    coefs = coefs if coefs is not None else [1.0] * len(others)
    gen = torch.Generator().manual_seed(params.get("seed", 0))
    return merge_tensor(method, route, base, others, coefs, compute_dtype=base.dtype, generator=gen)


# --------------------------------------------------------------------------- slerp


def _slerp_oracle(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Float64 slerp from the angle measured with atan2 (no acos near ±1)."""
    x, y = a.double().reshape(-1), b.double().reshape(-1)
    ux, uy = x / x.norm(), y / y.norm()
    cos = float(ux @ uy)
    sin = float((uy - cos * ux).norm())
    theta = math.atan2(sin, cos)
    out = (math.sin((1 - t) * theta) * x + math.sin(t * theta) * y) / math.sin(theta)
    return out.reshape(a.shape)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 0.85, 1.0])
@pytest.mark.parametrize("shape", [(24, 40), (57,), (2, 3, 5)])
def test_slerp_equals_mergekit_and_oracle(shape: tuple[int, ...], t: float) -> None:
    base = _rand(*shape)
    other = base + 0.8 * _rand(*shape, seed=1)
    ours = _ours("slerp", base, [other], t=t)
    assert _worst(ours, _mk_slerp(t, base, other)) <= BOUND64
    assert _worst(ours, _slerp_oracle(t, base, other)) <= BOUND64


def test_slerp_geometry_and_endpoints() -> None:
    """Equal-norm vectors: the result keeps the norm and sits at angle t·θ from the base;
    t = 0 gives the base exactly, t = 1 the branch."""
    a = torch.tensor([3.0, 0.0, 4.0], dtype=F64)
    b = torch.tensor([0.0, 5.0, 0.0], dtype=F64)
    for t in (0.2, 0.5, 0.9):
        r = _ours("slerp", a, [b], t=t)
        assert abs(float(r.norm()) - 5.0) < 1e-13
        assert abs(math.acos(float(r @ a) / 25.0) - t * math.pi / 2) < 1e-12
    assert torch.equal(_ours("slerp", a, [b], t=0.0), a)
    assert _worst(_ours("slerp", a, [b], t=1.0), b) <= 1e-15


@pytest.mark.parametrize("dtype", [F32, torch.bfloat16])
def test_slerp_low_precision_within_rounding(dtype: torch.dtype) -> None:
    base = _rand(64, 48, dtype=dtype)
    other = (base.double() + 0.5 * _rand(64, 48, seed=1)).to(dtype)
    exact = _slerp_oracle(0.4, base, other)
    ours = _ours("slerp", base.float(), [other.float()], t=0.4)
    mk = _mk_slerp(0.4, base, other)
    scale = float(exact.abs().max())
    assert _worst(ours, exact) <= 1e-6 * scale
    assert _worst(mk, exact) <= (1e-6 if dtype == F32 else 1e-2) * scale


@pytest.mark.parametrize("factor", [2.0, -1.0, 1.0])
def test_slerp_colinear_is_lerp(factor: float) -> None:
    """|cos θ| > 0.9995 (mergekit's DOT_THRESHOLD): the straight line, as mergekit."""
    a = _rand(30)
    b = factor * a
    t = 0.3
    ours = _ours("slerp", a, [b], t=t)
    assert _worst(ours, (1 - t) * a + t * b) <= 1e-15
    assert _worst(ours, _mk_slerp(t, a, b)) <= BOUND64


@pytest.mark.parametrize("cos", [0.9994, 0.9996])
def test_slerp_threshold_as_mergekit(cos: float) -> None:
    a = torch.tensor([1.0, 0.0], dtype=F64)
    b = torch.tensor([cos, math.sqrt(1 - cos * cos)], dtype=F64)
    assert _worst(_ours("slerp", a, [b], t=0.5), _mk_slerp(0.5, a, b)) <= BOUND64


def test_slerp_zero_vectors_as_mergekit() -> None:
    """A zero vector is not normalised (θ = π/2): mergekit's result, and zero for two zeros."""
    z, b = torch.zeros(6, dtype=F64), _rand(6)
    for x, y in ((z, b), (b, z), (z, z)):
        ours = _ours("slerp", x, [y], t=0.3)
        assert _worst(ours, _mk_slerp(0.3, x, y)) <= BOUND64
    assert _worst(_ours("slerp", z, [b], t=0.3), math.sin(0.3 * math.pi / 2) * b) <= 1e-15


def test_slerp_refuses_what_it_cannot_do() -> None:
    a, b = _rand(4), _rand(4, seed=1)
    with pytest.raises(ValueError, match="one branch; got 2"):
        _ours("slerp", a, [b, b])
    with pytest.raises(ValueError, match="coefficient must be 1, got 0.5"):
        _ours("slerp", a, [b], coefs=[0.5])
    with pytest.raises(ValueError, match="needs the base tensor"):
        get_method("slerp").merge_fallback((b - a)[None], _ones(1))
    with pytest.raises(ValueError, match=r"slerp\.t"):
        get_method("slerp", t=float("nan"))
    # the base itself is checked by a direct call, as the deltas are
    with pytest.raises(ValueError, match="'base' in the merge call contains 4 NaN"):
        get_method("slerp").merge_fallback((b - a)[None], _ones(1), base=a.clone().fill_(math.nan))


def test_slerp_base_reaches_every_route() -> None:
    """merge_tensor passes the base on the matrix and fallback routes, for LoRA branches
    (densified) and fused-QKV row blocks; the row-pieces route reads such tensors whole."""
    base, other = _rand(8, 6), _rand(8, 6, seed=1)
    want = _slerp_oracle(0.3, base, other)
    method = get_method("slerp", t=0.3)
    for route in ("matrix", "fallback"):
        got = merge_tensor(method, route, base, [other], [1.0], compute_dtype=F64)
        assert _worst(got, want) <= BOUND64
    lora_b, lora_a = _rand(8, 2, seed=2), _rand(2, 6, seed=3)
    got = merge_tensor(method, "matrix", base, [(lora_b, lora_a)], [1.0], compute_dtype=F64)
    assert _worst(got, _slerp_oracle(0.3, base, base + lora_b @ lora_a)) <= BOUND64
    blocks = merge_tensor(method, "matrix", base, [other], [1.0], compute_dtype=F64, row_blocks=2)
    halves = [_slerp_oracle(0.3, base[r], other[r]) for r in (slice(0, 4), slice(4, 8))]
    assert _worst(blocks, torch.cat(halves)) <= BOUND64
    item = PlannedTensor("w", (8, 6), F64, "matrix")
    src = StateDictSource({"w": base})
    assert not merges_in_pieces(method, item, src, [StateDictSource({"w": other})], 1)
    assert not method.row_local("matrix", (8, 6), 1)  # ZeRO-3 gathers it to an owner


def test_slerp_python_api_and_in_memory_engine() -> None:
    """merge_state_dicts (Python API) and the in-memory engine of the callback and the hook."""
    from drm_lightning.distributed.merger import merge_module_branches

    base = {"w": _rand(6, 5, dtype=F32), "b": _rand(5, dtype=F32, seed=4)}
    other = {k: v + 0.3 * _rand(*v.shape, dtype=F32, seed=5) for k, v in base.items()}
    want = {k: _slerp_oracle(0.25, base[k], other[k]) for k in base}
    merged = merge_state_dicts(get_method("slerp", t=0.25), base, [other])
    assert all(_worst(merged[k], want[k]) <= 1e-6 for k in base)
    module = torch.nn.Linear(6, 5)
    state = {"weight": base["w"].T.contiguous(), "bias": base["b"]}
    branch = {"weight": other["w"].T.contiguous(), "bias": other["b"]}
    module.load_state_dict(state)
    merge_module_branches(get_method("slerp", t=0.25), module, state, [branch])
    assert _worst(module.weight.detach(), want["w"].T) <= 1e-6
    assert _worst(module.bias.detach(), want["b"]) <= 1e-6


# --------------------------------------------------------------------------- nuslerp


@pytest.mark.parametrize(
    "flatten,row_wise", [(True, False), (False, False), (False, True), (True, True)]
)
@pytest.mark.parametrize("shape", [(12, 7), (9,), (3, 4, 5)])
def test_nuslerp_equals_mergekit(shape: tuple[int, ...], flatten: bool, row_wise: bool) -> None:
    base = _rand(*shape)
    x, y = base + _rand(*shape, seed=1), base + _rand(*shape, seed=2)
    opts = {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
    weights = [0.3, 0.9]
    ref = _mk_group("nuslerp", base, [x, y], weight=weights, **opts)
    assert _worst(_ours("nuslerp", base, [x, y], coefs=weights, **opts), ref) <= BOUND64
    # without a base model mergekit interpolates the models: base = the first model
    ref = _mk_group("nuslerp", None, [x, y], weight=weights, **opts)
    ours = _ours("nuslerp", x, [x, y], coefs=weights, interpolate="weights", **opts)
    assert _worst(ours, ref) <= BOUND64


def test_nuslerp_oracle_weights_and_edges() -> None:
    d0 = torch.tensor([1.0, 0.0], dtype=F64)
    d1 = torch.tensor([0.0, 2.0], dtype=F64)
    base = torch.zeros(2, dtype=F64)
    got = _ours("nuslerp", base, [d0, d1], coefs=[1.0, 3.0])  # t = 3/4 of the quarter circle
    want = math.sin(0.25 * math.pi / 2) * d0 + math.sin(0.75 * math.pi / 2) * d1
    assert _worst(got, want) <= 1e-15
    zero_sum = _ours("nuslerp", base, [d0, d1], coefs=[0.0, 0.0])  # t = 0.5, as mergekit
    assert _worst(zero_sum, _ours("nuslerp", base, [d0, d1], coefs=[1.0, 1.0])) <= 1e-15
    colinear = _ours("nuslerp", base, [d0, 3 * d0], coefs=[1.0, 1.0])
    assert _worst(colinear, 2 * d0) <= 1e-15
    with pytest.raises(ValueError, match="two branches; got 1"):
        _ours("nuslerp", base, [d0])
    assert get_method("nuslerp", interpolate="weights").needs_base
    assert not get_method("nuslerp").needs_base


# --------------------------------------------------------------------------- model_stock


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("shape", [(10, 6), (17,), (2, 3, 4)])
def test_model_stock_equals_mergekit(shape: tuple[int, ...], n: int, filter_wise: bool) -> None:
    base = _rand(*shape)
    common = _rand(*shape, seed=99)
    others = [base + common + _rand(*shape, seed=i + 1) for i in range(n)]
    ref = _mk_group("model_stock", base, others, filter_wise=filter_wise)
    assert _worst(_ours("model_stock", base, others, filter_wise=filter_wise), ref) <= BOUND64


def test_model_stock_oracle_and_edges() -> None:
    """Two deltas at 60°: cos 1/2, t = 2·½ / (1 + ½) = 2/3 of their mean; opposite deltas:
    1 + cos = 0, no finite t, the base (as mergekit)."""
    base = _rand(2)
    d0 = torch.tensor([1.0, 0.0], dtype=F64)
    d1 = torch.tensor([0.5, math.sqrt(3) / 2], dtype=F64)
    got = _ours("model_stock", base, [base + d0, base + d1])
    assert _worst(got, base + (2 / 3) * (d0 + d1) / 2) <= 1e-15
    opposite = _ours("model_stock", base, [base + d0, base - d0])
    assert _worst(opposite, base) == 0.0
    with pytest.raises(ValueError, match="at least 2 branches"):
        _ours("model_stock", base, [base + d0])
    with pytest.raises(ValueError, match="coefficients must be 1"):
        _ours("model_stock", base, [base + d0, base + d1], coefs=[1.0, 2.0])


# --------------------------------------------------------------------------- breadcrumbs


def test_outlier_mask_oracle() -> None:
    """The band: entries ranked top+1 .. top+keep by magnitude, from a full sort."""
    x = _rand(200)
    for keep, top in ((50, 0), (50, 10), (0, 5), (190, 10), (200, 0)):
        order = x.abs().argsort(descending=True)
        want = torch.zeros(200, dtype=torch.bool)
        want[order[top : top + keep]] = True
        assert torch.equal(outlier_mask(x, keep, top), want)


@pytest.mark.parametrize("name", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize(
    "density,gamma", [(0.3, 0.0), (0.5, 0.01), (0.9, 0.1), (0.05, 0.5), (0.7, 0.5)]
)
@pytest.mark.parametrize("normalize,rescale", [(False, False), (True, True)])
def test_breadcrumbs_equals_mergekit(
    name: str, density: float, gamma: float, normalize: bool, rescale: bool
) -> None:
    base = _rand(16, 25)
    others = [base + (1 + i) * _rand(16, 25, seed=i + 1) for i in range(3)]
    weights = [0.6, 1.3, 0.25]
    ref = _mk_group(
        name,
        base,
        others,
        weight=weights,
        density=[density] * 3,
        gamma=[gamma] * 3,
        normalize=normalize,
        rescale=rescale,
    )
    ours = _ours(
        name,
        base,
        others,
        coefs=weights,
        density=density,
        gamma=gamma,
        normalize=normalize,
        rescale="l1" if rescale else "none",
    )
    assert _worst(ours, ref) <= BOUND64


def test_breadcrumbs_defaults_and_parameters() -> None:
    m = get_method("breadcrumbs_ties")
    p = m.params
    assert (p.density, p.gamma, p.normalize, p.rescale, p.convention) == (
        0.9,
        0.01,
        False,
        "none",
        "mergekit",
    )
    assert "gamma" in method_parameters("breadcrumbs")
    assert "gamma" not in method_parameters("ties") and "epsilon" not in method_parameters("ties")
    assert not m.merges_in_rows("matrix", (4, 4), 2)  # the band is cut over the whole tensor
    with pytest.raises(ValueError, match=r"breadcrumbs\.gamma"):
        get_method("breadcrumbs", gamma=1.0)
    with pytest.raises(ValueError, match="unknown parameter 'epsilon'"):
        get_method("breadcrumbs", epsilon=0.1)


# --------------------------------------------------------------------------- della


def test_magprune_probabilities_oracle() -> None:
    """Rank r of m in its row (0 = smallest magnitude): density - ε + 2ε·r/(m-1); mergekit's
    own probabilities bit for bit (float32), and density for a one-entry row (mergekit: 0/0)."""
    x = _rand(5, 9)
    got = magprune_probabilities(x, 0.5, 0.2, F64)
    ranks = x.abs().argsort(dim=1).argsort(dim=1).double()
    assert _worst(got, 0.3 + 0.4 * ranks / 8) <= 1e-15
    assert torch.equal(magprune_probabilities(_rand(4, 1), 0.6, 0.1, F32), torch.full((4, 1), 0.6))
    xf = x.float()
    ranks32 = xf.abs().argsort(dim=1).argsort(dim=1).float() + 1
    norm = ((ranks32 - 1) / (9 - 1)).clamp(0, 1)
    assert torch.equal(magprune_probabilities(xf, 0.5, 0.2, F32), (0.5 - 0.2) + norm * 2 * 0.2)


@pytest.mark.parametrize("name", ["della", "della_linear"])
@pytest.mark.parametrize("shape", [(16, 25), (40,)])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_della_equals_mergekit_with_the_same_draws(
    name: str, shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    base = _rand(*shape, dtype=dtype)
    others = [base + (1 + i) * _rand(*shape, seed=i + 1, dtype=dtype) for i in range(3)]
    weights = [0.6, 1.3, 0.25]
    torch.manual_seed(7)
    ref = _mk_group(name, base, others, weight=weights, density=[0.4] * 3, epsilon=[0.15] * 3)
    ours = _ours(name, base, others, coefs=weights, density=0.4, epsilon=0.15, seed=7)
    scale = float(ref.abs().max())
    assert _worst(ours, ref) <= 1e-6 * scale  # mergekit masks and rescales in float32
    changed = (ours - base) != 0
    assert 0.2 < float(changed.double().mean()) < 0.95


def test_della_statistics_and_defaults() -> None:
    """Kept fraction = density (6 sigma) and larger entries kept more often; the L1 rescale
    keeps each branch's L1 norm."""
    x = _rand(400, 500)
    gen = torch.Generator().manual_seed(3)
    m = get_method("della_linear", density=0.3, epsilon=0.2)
    out = m.merge_matrix(x[None], _ones(1), generator=gen)
    kept = out != 0
    sigma = (0.3 * 0.7 / x.numel()) ** 0.5
    assert abs(float(kept.double().mean()) - 0.3) < 6 * sigma
    big = x.abs() > x.abs().quantile(0.9)
    small = x.abs() < x.abs().quantile(0.1)
    assert float(kept[big].double().mean()) > 0.45 and float(kept[small].double().mean()) < 0.15
    assert abs(float(out.abs().sum() / x.abs().sum()) - 1) < 1e-12
    p = get_method("della").params
    assert (p.density, p.epsilon, p.normalize, p.rescale, p.convention) == (
        0.5,
        0.15,
        True,
        "l1",
        "mergekit",
    )
    assert (
        get_method("della").uses_randomness and not get_method("della", density=1.0).uses_randomness
    )
    with pytest.raises(ValueError, match=r"density - epsilon and density \+ epsilon"):
        get_method("della", density=0.9, epsilon=0.15)


# --------------------------------------------------------------------------- mergekit YAML


def test_layer_position_as_mergekit() -> None:
    assert layer_position("model.layers.0.mlp.up_proj.weight", 4) == 0.0
    assert layer_position("model.layers.3.self_attn.q_proj.weight", 4) == 1.0
    assert layer_position("model.embed_tokens.weight", 4) == 0.0
    assert layer_position("model.layers.0.mlp.up_proj.weight", 1) == 1.0


def _cases(z: Path) -> dict[str, dict[str, Any]]:
    base, ft = str(z / "base"), [str(z / f"ft{i}") for i in range(3)]
    t_list = [
        {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
        {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
        {"value": 0.5},
    ]
    return {
        "slerp": {
            "merge_method": "slerp",
            "base_model": base,
            "dtype": "float64",
            "parameters": {"t": t_list},
            "models": [{"model": base}, {"model": ft[1]}],
        },
        "slerp_gradient": {
            "merge_method": "slerp",
            "base_model": base,
            "dtype": "float64",
            "parameters": {"t": [0.2, 0.9]},
            "models": [{"model": ft[0]}],
        },
        "nuslerp": {
            "merge_method": "nuslerp",
            "dtype": "float64",
            "models": [
                {"model": ft[0], "parameters": {"weight": 0.3}},
                {"model": ft[2], "parameters": {"weight": 0.7}},
            ],
        },
        "model_stock": {
            "merge_method": "model_stock",
            "base_model": base,
            "dtype": "float64",
            "models": [{"model": m} for m in ft],
        },
        "breadcrumbs_ties": {
            "merge_method": "breadcrumbs_ties",
            "base_model": base,
            "dtype": "float64",
            "parameters": {"density": 0.6, "gamma": 0.05, "weight": 0.5},
            "models": [{"model": ft[0]}, {"model": ft[1], "parameters": {"density": 0.3}}],
        },
        "della": {
            "merge_method": "della",
            "base_model": base,
            "dtype": "float32",
            "parameters": {"density": 0.5, "epsilon": 0.1, "weight": 1.0},
            "models": [{"model": ft[0]}, {"model": ft[2]}],
        },
    }


@pytest.fixture(scope="module")
def runs(zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("mkmethods")
    out: dict[str, Any] = {}
    options = mk_options.MergeOptions(quiet=True, random_seed=0, copy_tokenizer=False)
    for name, case in _cases(zoo).items():
        mk_out, ours_out = root / f"mk-{name}", root / f"ours-{name}"
        mk_merge.run_merge(mk_config.MergeConfiguration.model_validate(case), str(mk_out), options)
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(case, sort_keys=False))
        assert cli.main([str(path), "-o", str(ours_out), "--no-progress"]) == 0
        out[name] = (_read(mk_out), _read(ours_out))
    return out


@pytest.mark.parametrize(
    "name", ["slerp", "slerp_gradient", "nuslerp", "model_stock", "breadcrumbs_ties"]
)
def test_mergekit_yaml_equal(runs: dict[str, Any], name: str) -> None:
    theirs, ours = runs[name]
    assert sorted(theirs) == sorted(ours)
    worst = max(_worst(theirs[k], ours[k]) for k in theirs)
    assert worst <= BOUND64, f"{name}: max abs {worst:.3g}"


def test_slerp_t_per_layer_reaches_the_merge(zoo: Path, runs: dict[str, Any]) -> None:
    """The filtered gradient gives each tensor its own t: attention of layer 0 stays at the
    base (t = 0), its MLP takes the branch (t = 1); norms and embeddings at the default 0.5."""
    theirs, ours = runs["slerp"]
    base, ft1 = _read(zoo / "base"), _read(zoo / "ft1")
    q = "model.layers.0.self_attn.q_proj.weight"
    up = "model.layers.0.mlp.up_proj.weight"
    assert _worst(ours[q], base[q]) == 0.0
    assert _worst(ours[up], ft1[up]) <= 1e-15
    cfg = load_config(_yaml(zoo, _cases(zoo)["slerp"]))
    assert isinstance(cfg, MergekitConfig) and cfg.num_layers == 2
    method = cfg.build_method()
    assert isinstance(method, PerTensorParameters)
    assert method.for_tensor("model.norm.weight").params.t == 0.5
    assert method.for_tensor("model.layers.1.self_attn.o_proj.weight").params.t == 1.0


def test_della_yaml_statistically_equivalent(zoo: Path, runs: dict[str, Any]) -> None:
    """Other random streams (see the module docstring): the same kept fraction and L1 mass."""
    theirs, ours = runs["della"]
    base = _read(zoo / "base")
    stats = []
    for merged in (theirs, ours):
        deltas = [(merged[k] - base[k]).double() for k in merged if merged[k].dim() == 2]
        kept = sum(int((d != 0).sum()) for d in deltas)
        total = sum(d.numel() for d in deltas)
        stats.append((kept / total, sum(float(d.abs().sum()) for d in deltas)))
    assert abs(stats[0][0] - stats[1][0]) < 0.03, stats
    assert abs(stats[0][1] / stats[1][1] - 1) < 0.05, stats


def test_mergekit_yaml_refusals(zoo: Path, tmp_path: Path) -> None:
    base, ft0, ft1 = (str(zoo / n) for n in ("base", "ft0", "ft1"))

    def refusal(**data: Any) -> str:
        with pytest.raises(ConfigError) as info:
            load_config(_yaml(zoo, data, tmp_path))
        return str(info.value)

    msg = refusal(merge_method="slerp", base_model=base, models=[{"model": ft0}])
    assert "parameters.t: required by mergekit's slerp" in msg
    msg = refusal(
        merge_method="slerp",
        base_model=base,
        parameters={"t": [{"filter": "mlp", "value": 0.3}]},
        models=[{"model": ft0}],
    )
    assert "parameters.t: add a last entry without filter" in msg
    msg = refusal(merge_method="nuslerp", models=[{"model": ft0, "parameters": {"weight": 1}}])
    assert "models: nuslerp interpolates two models; got 1" in msg
    msg = refusal(merge_method="model_stock", base_model=base, models=[{"model": ft0}])
    assert "model_stock needs at least two models besides the base; got 1" in msg
    msg = refusal(
        merge_method="della",
        base_model=base,
        parameters={"weight": 1.0, "epsilon": 0.2},
        models=[{"model": ft0, "parameters": {"density": 0.9}}, {"model": ft1}],
    )
    assert "models[0].parameters.density: density ± epsilon must be in (0, 1)" in msg
    msg = refusal(
        merge_method="breadcrumbs",
        base_model=base,
        parameters={"weight": 1.0, "density": 0.5},
        models=[
            {"model": ft0, "parameters": {"gamma": 0.1}},
            {"model": ft1, "parameters": {"gamma": 0.2}},
        ],
    )
    assert "models[0].parameters.gamma: differs between models (0.1, 0.2)" in msg


def test_mergekit_yaml_ignored_weight_is_warned(zoo: Path, tmp_path: Path) -> None:
    data = {
        "merge_method": "model_stock",
        "base_model": str(zoo / "base"),
        "models": [{"model": str(zoo / f"ft{i}"), "parameters": {"weight": 0.5}} for i in (0, 1)],
    }
    cfg = load_config(_yaml(zoo, data, tmp_path))
    assert isinstance(cfg, MergekitConfig)
    assert [b.coefficient for b in cfg.branches] == [1.0, 1.0]
    assert any("weight: ignored: model_stock does not use it" in w for w in cfg.ignored)


# --------------------------------------------------------------------------- native config


def test_native_config_through_the_cli(zoo: Path, tmp_path: Path) -> None:
    """drm-merge's own schema: slerp with one t, della with a seed; slerp equals the oracle."""
    base = _read(zoo / "base")
    ft0 = _read(zoo / "ft0")
    path = tmp_path / "slerp.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "method": "slerp",
                "base": str(zoo / "base"),
                "branches": [str(zoo / "ft0")],
                "parameters": {"t": 0.35},
                "compute_dtype": "float64",
            }
        )
    )
    assert cli.main([str(path), "-o", str(tmp_path / "out"), "--no-progress"]) == 0
    merged = _read(tmp_path / "out")
    for k in (
        "model.layers.1.mlp.down_proj.weight",
        "model.norm.weight",
        "model.embed_tokens.weight",
    ):
        want = base[k].double() + slerp_delta(0.35, base[k].double(), (ft0[k] - base[k]).double())
        assert _worst(merged[k], want) <= 1e-6  # norm weights: nearly colinear, the lerp
    k = "model.layers.1.mlp.down_proj.weight"
    assert _worst(merged[k], _slerp_oracle(0.35, base[k], ft0[k])) <= 1e-6
    for method, params in (("della", {"density": 0.6}), ("model_stock", {})):
        path = tmp_path / f"{method}.yaml"
        branches = [str(zoo / f"ft{i}") for i in range(3)]
        path.write_text(
            yaml.safe_dump(
                {
                    "method": method,
                    "base": str(zoo / "base"),
                    "branches": branches,
                    "parameters": params,
                }
            )
        )
        assert cli.main([str(path), "-o", str(tmp_path / method), "--no-progress"]) == 0
        out = _read(tmp_path / method)
        assert sorted(out) == sorted(base)
        assert not torch.equal(
            out["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"]
        )
