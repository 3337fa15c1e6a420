"""Task-vector family (task_arithmetic, ties, dare_ties, dare_linear, linear).

Oracles: the installed libraries on the same tensors — ``peft.utils.merge_utils`` for the
``peft`` convention and mergekit 0.1.5's own ``GeneralizedTaskArithmeticMerge.merge_group`` /
``linear`` kernel for the ``mergekit`` convention (called directly on tensors, base = 0).

DARE against the libraries: the random masks are made identical by REPRODUCING their RNG
consumption — the library runs after ``torch.manual_seed(s)``, we run with
``torch.Generator().manual_seed(s)``; both draw ``torch.bernoulli`` branch by branch in the
same dtype — so the whole DARE pipeline (mask, rescale, election, normalisation) is compared.
The deterministic L1 rescale is also checked alone with an INJECTED mask against mergekit's
``rescaled_masked_tensor``.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from drm_lightning.methods import available_methods, get_method, method_parameters
from drm_lightning.methods._sparsify import magnitude_mask, rescale_masked
from drm_lightning.methods.ops import kept_count
from drm_lightning.methods.task_vector import TaskVectorMethod, task_vector_merge

peft_merge = pytest.importorskip("peft.utils.merge_utils")
mk_registry = pytest.importorskip("mergekit.merge_methods.registry")
mk_base = pytest.importorskip("mergekit.merge_methods.base")
mk_sparsify = pytest.importorskip("mergekit.sparsify")

F64 = torch.float64
F32 = torch.float32
NAMES = ["task_arithmetic", "ties", "dare_ties", "dare_linear", "linear"]
WEIGHTS = [0.6, 1.3, 0.25]


def _deltas(shape=(3, 24, 40), dtype=F64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(*shape, generator=g, dtype=F64)
    scales = torch.tensor([1.0 + 0.7 * i for i in range(shape[0])], dtype=F64)
    return (d * scales.reshape((-1,) + (1,) * (len(shape) - 1))).to(dtype)


def _weights(n: int = 3, dtype=F64) -> torch.Tensor:
    return torch.tensor((WEIGHTS * n)[:n], dtype=dtype)


def _method(name: str, **params) -> TaskVectorMethod:
    method = get_method(name, **params)
    assert isinstance(method, TaskVectorMethod)
    return method


def _ours(name: str, x: torch.Tensor, w: torch.Tensor, seed: int | None = None, **params):
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    return _method(name, **params).merge_fallback(x, w, generator=gen)


# --------------------------------------------------------------------------- library calls


def _peft(fn: str, x: torch.Tensor, w: torch.Tensor, seed: int | None = None, **kw):
    if seed is not None:
        torch.manual_seed(seed)
    with warnings.catch_warnings():  # "density >= 1, no pruning will be performed"
        warnings.simplefilter("ignore", UserWarning)
        return getattr(peft_merge, fn)(list(x), w, **kw)


def _mergekit(
    name: str,
    x: torch.Tensor,
    w: torch.Tensor,
    *,
    density: float = 1.0,
    seed: int | None = None,
    **shared,
) -> torch.Tensor:
    """mergekit's own kernel on (base = 0, branches = x); returns the merged delta."""
    method = mk_registry.get(name)
    ids = [f"m{i}" for i in range(x.shape[0])]
    group = mk_base.TensorGroup.from_tensors(
        [torch.zeros_like(x[0]), *x], ids=["base", *ids], base_index=0
    )
    params = {
        p.name: p.default
        for p in method.spec.parameters
        if p.scope == mk_base.ParameterScope.SHARED
    }
    params.update(shared)
    params["weight"] = dict(zip(ids, w.tolist()))
    params["density"] = dict.fromkeys(ids, density)
    if seed is not None:
        torch.manual_seed(seed)
    return method.merge_group(group, **params)


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype
    return float((a - b).abs().max())


# --------------------------------------------------------------------------- peft oracles


@pytest.mark.parametrize("shape", [(3, 24, 40), (4, 57), (2, 3, 5, 7)])
def test_peft_task_arithmetic_and_linear(shape) -> None:
    x, w = _deltas(shape), _weights(shape[0])
    assert _maxdiff(_ours("task_arithmetic", x, w), _peft("task_arithmetic", x, w)) == 0.0
    assert _maxdiff(_ours("linear", x, w), _peft("task_arithmetic", x, w) / w.sum()) < 1e-14


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("density", [0.05, 0.2, 0.29, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("shape", [(3, 24, 40), (4, 57)])
def test_peft_ties_bit_equal(shape, density: float, dtype) -> None:
    x, w = _deltas(shape, dtype), _weights(shape[0], dtype)
    ref = _peft("ties", x, w, density=density)
    assert _maxdiff(_ours("ties", x, w, density=density), ref) == 0.0


def test_peft_magnitude_prune_is_ties_without_election() -> None:
    x, w = _deltas(), _weights()
    ours = TaskVectorMethod(sparsify="magnitude", elect_signs=False, density=0.3)
    ref = _peft("magnitude_prune", x, w, density=0.3)
    assert _maxdiff(ours.merge_matrix(x, w), ref) == 0.0


def test_peft_count_rule_may_keep_nothing() -> None:
    x, w = _deltas((2, 9)), _weights(2)  # int(0.1 * 9) == 0: PEFT keeps no entry
    ref = _peft("ties", x, w, density=0.1)
    ours = _ours("ties", x, w, density=0.1)
    assert torch.equal(ours, ref) and not ours.any()
    # mergekit keeps at least one entry per branch
    assert _ours("ties", x, w, density=0.1, convention="mergekit").count_nonzero() >= 1


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("density", [0.1, 0.5, 0.8])
@pytest.mark.parametrize("seed", [0, 7])
def test_peft_dare_same_rng(seed: int, density: float, dtype) -> None:
    x, w = _deltas((3, 16, 24), dtype), _weights(3, dtype)
    for ours_name, ref_name in [("dare_ties", "dare_ties"), ("dare_linear", "dare_linear")]:
        ref = _peft(ref_name, x, w, seed=seed, density=density)
        ours = _ours(ours_name, x, w, seed=seed, density=density)
        assert _maxdiff(ours, ref) == 0.0, ours_name


def test_peft_zero_weight_branch_still_votes_and_counts() -> None:
    x = _deltas((3, 50))
    w = torch.tensor([1.0, 0.0, 2.0], dtype=F64)
    for name, kw in [("ties", {"density": 0.4}), ("dare_ties", {"density": 0.6})]:
        seed = 3 if name == "dare_ties" else None
        ref = _peft(name, x, w, seed=seed, **kw)
        assert _maxdiff(_ours(name, x, w, seed=seed, **kw), ref) == 0.0


def test_tie_break_pin_spec_13_17() -> None:
    x = torch.tensor([[1.0, -4.0, -2.0], [-1.0, -1.0, -1.0]], dtype=F64)
    w = torch.ones(2, dtype=F64)
    expected = torch.tensor([1.0, -2.5, -1.5], dtype=F64)
    assert torch.equal(_ours("ties", x, w, density=1.0), expected)
    assert torch.equal(_ours("ties", x, w, density=1.0, convention="mergekit"), expected)
    assert torch.equal(_peft("ties", x, w, density=1.0), expected)
    assert torch.equal(_mergekit("ties", x, w), expected)


# --------------------------------------------------------------------------- mergekit oracles


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("shape", [(3, 24, 40), (4, 57)])
def test_mergekit_task_arithmetic(shape, dtype) -> None:
    x, w = _deltas(shape, dtype), _weights(shape[0], dtype)
    for normalize in (False, True):
        for lam in (1.0, 0.7):
            ref = _mergekit("task_arithmetic", x, w, normalize=normalize, **{"lambda": lam})
            ours = _ours(
                "task_arithmetic", x, w, convention="mergekit", normalize=normalize, scaling=lam
            )
            assert _maxdiff(ours, ref) == 0.0


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("density", [0.01, 0.2, 0.29, 0.7, 1.0])
@pytest.mark.parametrize("normalize", [True, False])
def test_mergekit_ties(density: float, normalize: bool, dtype) -> None:
    x, w = _deltas((3, 24, 40), dtype), _weights(3, dtype)
    ref = _mergekit("ties", x, w, density=density, normalize=normalize, **{"lambda": 1.5})
    ours = _ours(
        "ties", x, w, density=density, convention="mergekit", normalize=normalize, scaling=1.5
    )
    assert _maxdiff(ours, ref) == 0.0


def test_mergekit_ties_default_normalize_and_zero_weight() -> None:
    x = _deltas((3, 30))
    w = torch.tensor([1.0, 0.0, 2.0], dtype=F64)
    ref = _mergekit("ties", x, w, density=0.5)  # normalize: true by default
    assert _maxdiff(_ours("ties", x, w, density=0.5, convention="mergekit"), ref) == 0.0
    # a 0-weight branch takes no part: same as leaving it out (not so in peft)
    dropped = _ours("ties", x[[0, 2]], w[[0, 2]], density=0.5, convention="mergekit")
    assert _maxdiff(ref, dropped) == 0.0


@pytest.mark.parametrize("density", [0.3, 0.6])
@pytest.mark.parametrize("seed", [0, 11])
def test_mergekit_dare_same_rng_float32(seed: int, density: float) -> None:
    x, w = _deltas((3, 16, 24), F32), _weights(3, F32)
    for name in ("dare_ties", "dare_linear"):
        for normalize in (False, True):
            ref = _mergekit(name, x, w, density=density, seed=seed, normalize=normalize)
            ours = _ours(
                name,
                x,
                w,
                seed=seed,
                density=density,
                convention="mergekit",
                normalize=normalize,
            )
            assert _maxdiff(ours, ref) == 0.0, (name, normalize)


def test_mergekit_dare_same_rng_float64() -> None:
    """mergekit computes DARE's mask and L1 rescale in float32 on CPU: agree to ~1e-7 rel."""
    x, w = _deltas((3, 16, 24), F64), _weights(3, F64)
    for name in ("dare_ties", "dare_linear"):
        ref = _mergekit(name, x, w, density=0.4, seed=5)
        ours = _ours(name, x, w, seed=5, density=0.4, convention="mergekit")
        assert torch.equal(ours != 0, ref != 0), name  # same masks and election
        assert _maxdiff(ours, ref) < 1e-6 * float(ref.abs().max()), name


def test_mergekit_dare_rescale_is_l1_match_not_inverse_density() -> None:
    """What mergekit's ``rescale: true`` does, checked with an injected mask."""
    t = _deltas((1, 40, 30))[0]
    mask = (torch.rand(t.shape, generator=torch.Generator().manual_seed(1)) < 0.3).to(F64)
    ref = mk_sparsify.rescaled_masked_tensor(t, mask, mk_sparsify.RescaleNorm.l1)
    ours = rescale_masked(t, t * mask, how="l1", density=0.3)
    assert _maxdiff(ours, ref) == 0.0
    assert abs(float(ours.abs().sum() - t.abs().sum())) < 1e-10  # L1 norm preserved
    assert _maxdiff(ours, t * mask / 0.3) > 1e-3  # and that is not 1/density
    # mergekit's eps guard: tiny deltas are left unscaled
    tiny = t * 1e-10
    assert torch.equal(rescale_masked(tiny, tiny * mask, how="l1", density=0.3), tiny * mask)
    assert torch.equal(
        mk_sparsify.rescaled_masked_tensor(tiny, mask, mk_sparsify.RescaleNorm.l1), tiny * mask
    )


@pytest.mark.parametrize("dtype", [F64, F32])
def test_mergekit_linear(dtype) -> None:
    base = _deltas((1, 12, 10), dtype, seed=9)[0]
    x, w = _deltas((3, 12, 10), dtype), _weights(3, dtype)
    thetas = base + x
    batch = mk_base.TensorBatch(tensors=[t.unsqueeze(0) for t in thetas])
    linear = mk_registry.get("linear")
    ref = linear.merge_batch(batch, weight=w.unsqueeze(0), normalize=True)[0]
    ours = base + _ours("linear", x, w, convention="mergekit")
    tol = 1e-13 if dtype == F64 else 1e-5  # base added before vs after averaging
    assert _maxdiff(ours, ref) < tol


# --------------------------------------------------------------------------- properties


@pytest.mark.parametrize("convention", ["peft", "mergekit"])
@pytest.mark.parametrize("name", ["task_arithmetic", "ties", "linear"])
def test_order_invariance(name: str, convention: str) -> None:
    x, w = _deltas(), _weights()
    kw = {"density": 0.3} if name == "ties" else {}
    ref = _ours(name, x, w, convention=convention, **kw)
    perm = torch.tensor([2, 0, 1])
    assert _maxdiff(_ours(name, x[perm], w[perm], convention=convention, **kw), ref) < 1e-14


@pytest.mark.parametrize("convention", ["peft", "mergekit"])
def test_dare_at_density_one_is_ta_or_ties(convention: str) -> None:
    """No mask and no rescale at density 1 (both libraries), so DARE reduces to its parent."""
    x, w = _deltas(), _weights()
    for dare, parent in [("dare_ties", "ties"), ("dare_linear", "task_arithmetic")]:
        kw = {"normalize": True} if dare == "dare_ties" else {}
        a = _ours(dare, x, w, seed=0, density=1.0, convention=convention, **kw)
        assert _maxdiff(a, _ours(parent, x, w, density=1.0, convention=convention)) == 0.0


def test_conventions_differ_only_with_unequal_weights() -> None:
    x = _deltas()
    equal = torch.ones(3, dtype=F64)
    a = _ours("ties", x, equal, density=0.3)
    assert _maxdiff(a, _ours("ties", x, equal, density=0.3, convention="mergekit")) < 1e-15
    w = _weights()
    peft_style = _ours("ties", x, w, density=0.3)
    mk_style = _ours("ties", x, w, density=0.3, convention="mergekit")
    assert _maxdiff(peft_style, mk_style) > 0.1


@pytest.mark.parametrize("convention", ["peft", "mergekit"])
def test_single_branch(convention: str) -> None:
    x = _deltas((1, 24, 40))
    w = torch.tensor([0.5], dtype=F64)
    trimmed = x[0] * magnitude_mask(x[0], kept_count(x[0].numel(), 0.25, rule="floor"))
    ties = _ours("ties", x, w, density=0.25, convention=convention)
    # peft: w · trim(Δ); mergekit normalises by the weight: trim(Δ)
    expected = 0.5 * trimmed if convention == "peft" else trimmed
    assert _maxdiff(ties, expected) < 1e-15
    assert _maxdiff(_ours("task_arithmetic", x, w, convention=convention), 0.5 * x[0]) == 0.0
    assert _maxdiff(_ours("linear", x, w, convention=convention), x[0]) < 1e-15


@pytest.mark.parametrize("convention", ["peft", "mergekit"])
def test_identical_deltas(convention: str) -> None:
    one = _deltas((1, 24, 40))
    many = one.expand(3, -1, -1).clone()
    ones = torch.ones(3, dtype=F64)
    for name, kw in [("ties", {"density": 0.2}), ("linear", {})]:
        single = _ours(name, one, ones[:1], convention=convention, **kw)
        assert _maxdiff(_ours(name, many, ones, convention=convention, **kw), single) < 1e-15
    ta = _ours("task_arithmetic", many, ones, convention=convention)
    assert _maxdiff(ta, 3 * one[0]) < 1e-14


@pytest.mark.parametrize("convention", ["peft", "mergekit"])
@pytest.mark.parametrize("name", NAMES)
def test_scaling_is_linear(name: str, convention: str) -> None:
    x, w = _deltas(), _weights()
    base = _ours(name, x, w, seed=1, convention=convention)
    scaled = _ours(name, x, w, seed=1, convention=convention, scaling=-2.5)
    assert _maxdiff(scaled, -2.5 * base) < 1e-13


@pytest.mark.parametrize("convention", ["peft", "mergekit"])
@pytest.mark.parametrize("name", NAMES)
def test_zero_inputs_are_finite(name: str, convention: str) -> None:
    zeros = torch.zeros(3, 6, 5, dtype=F64)
    out = _ours(name, zeros, _weights(), seed=0, convention=convention)
    assert torch.equal(out, torch.zeros(6, 5, dtype=F64))
    x = _deltas((3, 6, 5))
    x[1] = 0
    if name == "linear" or (name == "ties" and convention == "mergekit"):
        # divides by the sum of the coefficients: all 0 is refused, not merged into the base
        with pytest.raises(ValueError, match="normalises by the sum of the coefficients"):
            _ours(name, x, torch.zeros(3, dtype=F64), seed=0, convention=convention)
        return
    out = _ours(name, x, torch.zeros(3, dtype=F64), seed=0, convention=convention)
    assert torch.isfinite(out).all() and not out.any()


@pytest.mark.parametrize("name", NAMES)
def test_matrix_fallback_lowrank_agree_and_dtypes(name: str) -> None:
    method = _method(name)
    x, w = _deltas((3, 8, 6)), _weights()
    gen = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    a = method.merge_matrix(x, w, generator=gen())
    assert torch.equal(a, method.merge_fallback(x, w, generator=gen()))
    factors = [(xi, torch.eye(6, dtype=F64)) for xi in x]
    assert torch.equal(a, method.merge_lowrank(factors, w, (8, 6), generator=gen()))
    bf = method.merge_matrix(x.to(torch.bfloat16), w.to(torch.bfloat16), generator=gen())
    assert bf.dtype == torch.bfloat16 and torch.isfinite(bf).all()
    assert method.cost("matrix", (8, 6), 3) > 0 and method.cost("ignore", (8, 6), 3) == 0


def test_dare_randomness_comes_from_generator_or_seed() -> None:
    method = _method("dare_ties", density=0.5)
    assert method.uses_randomness
    assert not _method("dare_ties", density=1.0).uses_randomness
    assert not _method("ties").uses_randomness
    x, w = _deltas(), _weights()

    def run(seed: int) -> torch.Tensor:
        return method.merge_matrix(x, w, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))
    # no generator: one seeded with the ``seed`` parameter
    assert torch.equal(method.merge_matrix(x, w), run(0))
    assert torch.equal(_method("dare_ties", density=0.5, seed=2).merge_matrix(x, w), run(2))


def test_peft_dare_rescale_is_unbiased_in_expectation() -> None:
    x = torch.ones(1, 200_000, dtype=F64)
    out = _ours("dare_linear", x, torch.ones(1, dtype=F64), seed=0, density=0.3)
    assert abs(float(out.mean()) - 1.0) < 0.01


def test_functional_input_checks() -> None:
    with pytest.raises(ValueError, match="N >= 1"):
        task_vector_merge(torch.zeros(0, 3), torch.zeros(0))
    with pytest.raises(ValueError, match=r"coefficients must have shape \(2,\)"):
        task_vector_merge(torch.zeros(2, 3), torch.ones(3))
    with pytest.raises(ValueError, match="needs a torch.Generator"):
        task_vector_merge(torch.zeros(2, 3), torch.ones(2), sparsify="random", density=0.5)


# --------------------------------------------------------------------------- registry / params


def test_registered_with_documented_defaults() -> None:
    assert set(NAMES) <= set(available_methods())
    resolved = {
        name: _method(name).params.model_dump(exclude={"seed", "scaling"}) for name in NAMES
    }
    assert resolved["ties"] == dict(
        sparsify="magnitude",
        elect_signs=True,
        density=0.2,
        normalize=True,
        rescale="none",
        convention="peft",
    )
    assert resolved["dare_ties"]["density"] == 0.5
    assert resolved["dare_ties"]["rescale"] == "inverse_density"
    assert resolved["dare_ties"]["normalize"] is True
    assert resolved["dare_linear"]["normalize"] is False
    assert resolved["task_arithmetic"]["normalize"] is False
    assert resolved["linear"]["normalize"] is True
    mk = _method("dare_ties", convention="mergekit").params
    assert (mk.rescale, mk.normalize) == ("l1", False)  # mergekit's dare_ties defaults
    assert _method("ties", convention="mergekit").params.normalize is True
    assert set(method_parameters("ties")) == {
        "density",
        "scaling",
        "normalize",
        "rescale",
        "convention",
        "seed",
    }
    assert "normalize" not in method_parameters("linear")


@pytest.mark.parametrize("name", NAMES)
def test_unknown_parameter_lists_closest(name: str) -> None:
    with pytest.raises(ValueError, match=r"unknown parameter 'scalling'.*did you mean 'scaling'"):
        get_method(name, scalling=0.5)


def test_unknown_method_lists_closest() -> None:
    with pytest.raises(ValueError, match=r"did you mean 'ties'"):
        get_method("tie")
    with pytest.raises(ValueError, match=r"dare_linear"):
        get_method("dare_linaer")


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
@pytest.mark.parametrize("name", ["ties", "dare_ties", "dare_linear"])
def test_density_out_of_range(name: str, bad: float) -> None:
    with pytest.raises(ValueError, match=rf"{name}\.density: .*must be in \(0, 1\]"):
        get_method(name, density=bad)


def test_invalid_values_and_fixed_presets() -> None:
    with pytest.raises(ValueError, match=r"task_arithmetic\.density: .*has no effect"):
        get_method("task_arithmetic", density=0.5)
    assert _method("task_arithmetic", density=1.0).params.density == 1.0
    with pytest.raises(ValueError, match="rescale has no effect"):
        get_method("linear", rescale="l1")
    with pytest.raises(ValueError, match=r"ties\.convention"):
        get_method("ties", convention="hf")
    with pytest.raises(ValueError, match=r"dare_ties\.rescale"):
        get_method("dare_ties", rescale="l2")
    with pytest.raises(ValueError, match=r"scaling"):
        get_method("ties", scaling=float("nan"))
    with pytest.raises(ValueError, match=r"'sparsify' is fixed to 'magnitude' by method 'ties'"):
        get_method("ties", sparsify="random")
    with pytest.raises(ValueError, match=r"is fixed to .* by method 'linear'"):
        get_method("linear", normalize=False)
