"""No silent wrong numbers (issue 20, item 9 and part of 8).

* DRM in half precision: the rounding floor of a bfloat16 projection (``4·eps·√m`` = 1.17 of a
  branch's norm at m = 1408) dropped every column, so the merge was the base; float16 squared
  norms overflowed. DRM now computes in float32 and rounds the result once. Checked against a
  float64 merge of the same half-precision deltas, with the package's float32 bound
  (``FLOAT32_BOUND``, tests/test_precision.py) plus one rounding of the output.
* The method-level entry points refuse NaN/Inf (and non-float inputs) with the merge loop's
  message, once: the merge loop, which checked the tensors it read, does not check again.
* ``merge_tensor`` refuses integer and bool tensors (it truncated them) with ``plan_merge``'s
  message.
* Methods that divide by a sum of the coefficients (``linear``, mergekit-convention TIES)
  refuse coefficients that do not sum to > 0 (all 0 wrote the base) on every entry point.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from drm_lightning.alignment import align_then_merge, get_alignment, merge_models
from drm_lightning.alignment.spec import PermSpec
from drm_lightning.distributed import merge_module_branches
from drm_lightning.merge.loop import merge_state_dicts
from drm_lightning.merge.plan import plan_merge
from drm_lightning.merge.tensor import merge_tensor
from drm_lightning.methods import (
    available_methods,
    drm_merge,
    drm_merge_lowrank,
    get_method,
    ops,
    task_vector_merge,
)
from drm_lightning.sources.memory import StateDictSource

F64 = torch.float64
HALF = [torch.bfloat16, torch.float16]
FLOAT32_BOUND = 1e-2
"""Float32 DRM against float64, relative Frobenius norm of the merged delta (test_precision.py)."""
SHAPE = (64, 1408)
N = 3


def _tol(dtype: torch.dtype) -> float:
    """The float32 bound plus one rounding of the result to ``dtype``."""
    return FLOAT32_BOUND + torch.finfo(dtype).eps


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).norm() / b.norm())


def _deltas(dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (0.01 * torch.randn(N, *SHAPE, generator=g)).to(dtype)


# ------------------------------------------------------------------------ DRM in half precision


@pytest.mark.parametrize("direction", ["horizontal", "vertical"])
@pytest.mark.parametrize("dtype", HALF)
def test_drm_half_deltas_match_float64(dtype: torch.dtype, direction: str) -> None:
    """Was a zero delta in bfloat16 (relative error 1.0)."""
    method = get_method("drm", direction=direction)
    deltas = _deltas(dtype)
    out = method.merge_matrix(deltas, torch.ones(N, dtype=dtype))
    exact = method.merge_matrix(deltas.double(), torch.ones(N, dtype=F64))
    assert out.dtype == dtype
    assert _rel(out, exact) <= _tol(dtype)


@pytest.mark.parametrize("dtype", HALF)
def test_drm_half_lowrank_matches_float64(dtype: torch.dtype) -> None:
    """The LoRA route: float16 squared column norms overflowed (a zero delta)."""
    g = torch.Generator().manual_seed(1)
    factors = [
        (
            torch.randn(SHAPE[0], 8, generator=g).to(dtype),
            torch.randn(8, SHAPE[1], generator=g).to(dtype),
        )
        for _ in range(N)
    ]
    method = get_method("drm")
    out = method.merge_lowrank(factors, torch.ones(N, dtype=dtype), SHAPE)
    exact = method.merge_lowrank(
        [(b.double(), a.double()) for b, a in factors], torch.ones(N, dtype=F64), SHAPE
    )
    assert out.dtype == dtype
    assert _rel(out, exact) <= _tol(dtype)


@pytest.mark.parametrize("dtype", HALF)
def test_drm_half_fallback_matches_float64(dtype: torch.dtype) -> None:
    """The fallback has no rounding floor: one rounding of the output only."""
    deltas = _deltas(dtype)
    method = get_method("drm", fallback_trim_rate=0.5)
    out = method.merge_fallback(deltas, torch.ones(N, dtype=dtype))
    exact = method.merge_fallback(deltas.double(), torch.ones(N, dtype=F64))
    assert out.dtype == dtype
    assert _rel(out, exact) <= torch.finfo(dtype).eps


@pytest.mark.parametrize("dtype", HALF)
def test_merge_tensor_half_compute_matches_float64(dtype: torch.dtype) -> None:
    """``compute_dtype=bfloat16`` returned the base. The deltas are formed in the compute dtype,
    so the float64 reference merges those same rounded deltas; the weight is rounded once more
    when the delta is added to the base in the compute dtype."""
    g = torch.Generator().manual_seed(2)
    base = torch.randn(*SHAPE, generator=g)
    branches = [base + 0.01 * torch.randn(*SHAPE, generator=g) for _ in range(N)]
    method = get_method("drm")
    out = merge_tensor(method, "matrix", base, branches, [1.0] * N, compute_dtype=dtype)
    base_c = base.to(dtype)
    deltas = torch.stack([b.to(dtype) - base_c for b in branches])
    delta = method.merge_matrix(deltas.double(), torch.ones(N, dtype=F64))
    exact = base_c.double() + delta
    assert out.dtype == base.dtype
    err = float((out.double() - exact).norm())
    assert err <= _tol(dtype) * float(delta.norm()) + torch.finfo(dtype).eps * float(exact.norm())
    merged = merge_state_dicts(
        method, {"fc.weight": base}, [{"fc.weight": b} for b in branches], compute_dtype=dtype
    )
    assert torch.equal(merged["fc.weight"], out)


# ------------------------------------------------------------------ NaN/Inf at the method level


def _poisoned(bad: float, shape=(3, 12, 10)) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    x[1].view(-1)[4] = bad
    return x


def _count(bad: float) -> str:
    return "1 NaN and 0 Inf" if math.isnan(bad) else "0 NaN and 1 Inf"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", available_methods())
def test_method_entry_points_refuse_non_finite(name: str, bad: float) -> None:
    """TIES and DARE-TIES dropped a NaN and returned finite numbers; task arithmetic, linear and
    DRM's fallback returned NaN; DRM's Gram and LoRA routes raised a LinAlgError."""
    method = get_method(name)
    x, ones = _poisoned(bad), torch.ones(3)
    match = rf"'deltas' in branch 1 contains {_count(bad)} value\(s\)"
    with pytest.raises(ValueError, match=match):
        method.merge_matrix(x, ones)
    with pytest.raises(ValueError, match=match):
        method.merge_fallback(x, ones)
    factors = [(torch.randn(12, 2), torch.randn(2, 10)) for _ in range(3)]
    factors[1][1][0, 3] = bad
    with pytest.raises(
        ValueError, match=rf"'factor A' in branch 1 contains {_count(bad)} value\(s\)"
    ):
        method.merge_lowrank(factors, ones, (12, 10))
    with pytest.raises(ValueError, match=r"'coefficients' in the merge call contains 1 NaN"):
        method.merge_fallback(torch.randn(3, 5), torch.tensor([1.0, float("nan"), 1.0]))


def test_functions_refuse_non_finite() -> None:
    x, ones = _poisoned(float("nan")), torch.ones(3)
    for call in (
        lambda: task_vector_merge(x, ones, elect_signs=True, normalize=True),
        lambda: drm_merge(x, ones, solver="gram"),
        lambda: drm_merge(x, ones, solver="svd"),
        lambda: drm_merge_lowrank([(x[i], torch.eye(10)) for i in range(3)], ones, (12, 10)),
    ):
        with pytest.raises(ValueError, match=r"in branch 1 contains 1 NaN"):
            call()


def test_method_entry_points_refuse_integer_deltas() -> None:
    with pytest.raises(
        ValueError, match=r"'deltas' in the merge call has non-float dtype torch.int64"
    ):
        get_method("linear").merge_fallback(
            torch.tensor([[1, 2], [2, 3]]), torch.tensor([0.5, 0.5])
        )


def _stack_checks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The dims of every tensor a finiteness check passes over."""
    seen: list[int] = []
    real = ops._sum_is_finite

    def spy(tensor: torch.Tensor) -> bool:
        seen.append(tensor.dim())
        return real(tensor)

    monkeypatch.setattr(ops, "_sum_is_finite", spy)
    return seen


@pytest.mark.parametrize("name", ["drm", "ties", "linear"])
def test_the_stack_is_checked_once(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A direct call passes over the (N, n, m) stack once (the entry point and the function it
    calls do not both check); ``merge_tensor``, which checked each tensor it was given, never."""
    seen = _stack_checks(monkeypatch)
    method = get_method(name)
    method.merge_matrix(torch.randn(3, 40, 30), torch.ones(3))
    assert seen.count(3) == 1, seen
    seen.clear()
    base = torch.randn(40, 30)
    merge_tensor(method, "matrix", base, [base + torch.randn(40, 30) for _ in range(3)], [1.0] * 3)
    assert 3 not in seen and seen.count(2) == 5, seen  # base, 3 branches, the result


# ------------------------------------------------------------------------ alignment merges


def _nets(bad: float | None = None) -> list[nn.Module]:
    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)) for _ in range(2)]
    if bad is not None:
        with torch.no_grad():
            nets[1][0].weight[2, 1] = bad
    return nets


@pytest.mark.parametrize(
    "method", ["weight_average", "weight_matching", "mudsc_zip", "mudsc_align"]
)
def test_alignment_merges_refuse_non_finite(method: str) -> None:
    """``weight_average`` returned NaN weights; the solvers failed with unrelated messages."""
    batches = [torch.randn(32, 4) for _ in range(2)]
    with pytest.raises(ValueError, match=r"'0.weight' in model 1 contains 1 NaN"):
        merge_models(_nets(float("nan")), batches, method=method)


def test_alignment_result_and_align_then_merge_refuse_non_finite() -> None:
    spec = PermSpec.declare({"h": {"out": ["0.weight", "0.bias"], "in": ["2.weight"]}})
    good = [n.state_dict() for n in _nets()]
    result = get_alignment("weight_matching").solve(good, spec)
    bad = [n.state_dict() for n in _nets(float("inf"))]
    with pytest.raises(ValueError, match=r"'0.weight' in model 1 contains 0 NaN and 1 Inf"):
        result.merged_state_dict(bad)
    with pytest.raises(ValueError, match=r"'0.weight' in model 1 contains 0 NaN and 1 Inf"):
        get_alignment("weight_matching").solve(bad, spec)
    nets = _nets(float("nan"))
    with pytest.raises(ValueError, match=r"'0.weight' in model 1 contains 1 NaN"):
        align_then_merge("ties", "anchor", nets, [torch.randn(32, 4)], alignment="weight_matching")


# ------------------------------------------------------------------ integer tensors in merge_tensor


@pytest.mark.parametrize("values", [torch.tensor([11, 20, 31]), torch.tensor([True, False, True])])
def test_merge_tensor_refuses_integer_tensors(values: torch.Tensor) -> None:
    """task_arithmetic 0.5/0.5 gave [11, 20, 31] for [11.5, 20.5, 31.5]: the same refusal as
    ``plan_merge``'s, naming the tensor."""
    base = torch.zeros(3, dtype=values.dtype)
    branches = [values, values]
    with pytest.raises(ValueError) as planned:
        plan_merge(StateDictSource({"ids": base}), [StateDictSource({"ids": b}) for b in branches])
    with pytest.raises(ValueError) as direct:
        merge_tensor(
            get_method("task_arithmetic"), "fallback", base, branches, [0.5, 0.5], name="ids"
        )
    message = (
        f"'ids' in base has non-float dtype {values.dtype}; only floating tensors can be merged"
    )
    assert message in str(direct.value) and message in str(planned.value)
    with pytest.raises(ValueError, match=r"'ids' in branch 0 has non-float dtype"):
        merge_tensor(
            get_method("ties"), "fallback", torch.zeros(3), branches, [0.5, 0.5], name="ids"
        )
    with pytest.raises(ValueError, match="compute_dtype must be one of"):
        merge_tensor(
            get_method("ties"),
            "fallback",
            torch.zeros(3),
            [torch.ones(3)],
            [1.0],
            compute_dtype=torch.int64,
        )


# ------------------------------------------------------- normalising by a sum of the coefficients


ZERO_SUM = r"normalises by the sum of the coefficients, which must be > 0; got 0"


def _sd(seed: int) -> dict[str, torch.Tensor]:
    return {"w": torch.randn(4, 3, generator=torch.Generator().manual_seed(seed))}


@pytest.mark.parametrize(("name", "params"), [("linear", {}), ("ties", {"convention": "mergekit"})])
def test_zero_coefficients_refused_where_the_merge_divides_by_them(name: str, params: dict) -> None:
    """``linear`` with every coefficient 0 wrote the base silently."""
    method = get_method(name, **params)
    with pytest.raises(ValueError, match=ZERO_SUM):
        method.merge_fallback(torch.randn(2, 5), torch.zeros(2))
    with pytest.raises(ValueError, match=ZERO_SUM):
        merge_state_dicts(method, _sd(0), [_sd(1), _sd(2)], coefficients=[0.0, 0.0])
    with pytest.raises(ValueError, match=ZERO_SUM):
        merge_tensor(method, "matrix", torch.zeros(4, 3), [torch.ones(4, 3)] * 2, [0.0, 0.0])
    with pytest.raises(ValueError, match=ZERO_SUM):
        plan_merge(
            StateDictSource(_sd(0)), [StateDictSource(_sd(1))], coefficients=[0.0], method=method
        )
    target = nn.Module()
    target.w = nn.Parameter(torch.zeros(4, 3))
    with pytest.raises(ValueError, match=ZERO_SUM):
        merge_module_branches(method, target, _sd(0), [_sd(1), _sd(2)], coefficients=[0.0, 0.0])
    assert not target.w.detach().any()  # nothing written


def test_negative_coefficient_sum_refused_by_linear() -> None:
    """At the method level, where negative coefficients are allowed: a negative sum flipped the
    average's sign back ([-1, -1] gave the plain mean)."""
    with pytest.raises(ValueError, match=r"which must be > 0; got -2"):
        get_method("linear").merge_fallback(torch.randn(2, 5), torch.tensor([-1.0, -1.0]))
    with pytest.raises(ValueError, match=r"which must be > 0; got 0"):
        task_vector_merge(torch.randn(2, 5), torch.tensor([1.0, -1.0]), normalize=True)


@pytest.mark.parametrize("name", ["task_arithmetic", "ties", "dare_ties", "drm"])
def test_zero_coefficients_still_merge_where_nothing_divides_by_them(name: str) -> None:
    """λ = 0 for every branch is a zero delta by definition there (no division by the weights)."""
    out = get_method(name).merge_fallback(torch.randn(2, 5), torch.zeros(2))
    assert torch.equal(out, torch.zeros(5))


def test_config_linear_with_zero_coefficients_fails_at_planning(tmp_path) -> None:
    """The config path refuses it when the job is opened, from metadata, before a weight is read."""
    import yaml
    from safetensors.torch import save_file

    from drm_lightning.cli.command import main
    from drm_lightning.cli.job import open_job
    from drm_lightning.config.loading import load_config

    paths = []
    for i, name in enumerate(["base", "a", "b"]):
        (tmp_path / name).mkdir()
        save_file(_sd(i), str(tmp_path / name / "model.safetensors"), metadata={"format": "pt"})
        paths.append(str(tmp_path / name))
    cfg = tmp_path / "linear.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "method": "linear",
                "base": paths[0],
                "branches": paths[1:],
                "coefficients": [0.0, 0.0],
            }
        )
    )
    with pytest.raises(ValueError, match=ZERO_SUM):
        open_job(load_config(cfg))
    out = tmp_path / "merged"
    assert main([str(cfg), "-o", str(out), "--no-progress"]) == 2
    assert not out.exists()
