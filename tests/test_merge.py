"""The merge loop: routing, validation before heavy work, end-to-end on a tiny MLP (spec §13.18)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from drm_lightning.merge.loop import merge_state_dicts
from drm_lightning.merge.plan import plan_merge, validate_coefficients
from drm_lightning.merge.routing import Routing
from drm_lightning.merge.tensor import merge_tensor, tensor_generator
from drm_lightning.methods import get_method
from drm_lightning.methods.drm import drm_merge


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(12, 16),
        nn.LayerNorm(16),
        nn.ReLU(),
        nn.Linear(16, 16),
        nn.ReLU(),
        nn.Linear(16, 3),
    )


def _finetunes(base: nn.Module, n: int, scale: float = 0.05) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(100 + i)
        out.append(
            {k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.state_dict().items()}
        )
    return out


def test_routing_defaults_for_hf_decoders() -> None:
    r = Routing()
    assert r.route("model.layers.0.mlp.gate_proj.weight", (64, 32)) == "matrix"
    assert r.route("model.layers.0.input_layernorm.weight", (32,)) == "fallback"
    assert r.route("model.embed_tokens.weight", (128, 32)) == "fallback"
    assert r.route("lm_head.weight", (128, 32)) == "fallback"
    assert r.route("bert.embeddings.word_embeddings.weight", (128, 32)) == "fallback"
    assert r.route("conv.weight", (8, 4, 3, 3)) == "fallback"
    assert r.route("model.layers.0.mlp.gate_proj.bias", (64,)) == "fallback"
    assert Routing(ignore=[r"lm_head"]).route("lm_head.weight", (128, 32)) == "ignore"
    with pytest.raises(ValueError, match=r"routing.ignore\[0\]"):
        Routing(ignore=["("])
    with pytest.raises(TypeError, match="list of regexes"):
        Routing(ignore="head")  # type: ignore[arg-type]


def test_end_to_end_mlp_routes_and_oracles() -> None:
    merge_utils = pytest.importorskip("peft.utils.merge_utils")
    base = _mlp(0)
    branches = _finetunes(base, 3)
    routing = Routing(ignore=[r"5\."])  # the task head stays at the base value
    method = get_method("drm", drop_rate=0.8)
    merged = merge_state_dicts(method, base, branches, routing=routing, compute_dtype=torch.float64)
    base_sd = base.state_dict()
    assert set(merged) == set(base_sd)
    assert torch.equal(merged["5.weight"], base_sd["5.weight"])
    assert torch.equal(merged["5.bias"], base_sd["5.bias"])
    for name in ("0.weight", "3.weight"):
        deltas = torch.stack([b[name].double() - base_sd[name].double() for b in branches])
        expected = base_sd[name].double() + drm_merge(
            deltas, torch.ones(3, dtype=torch.float64), drop_rate=0.8
        )
        assert torch.allclose(merged[name].double(), expected, atol=1e-6)
        assert not torch.equal(merged[name], base_sd[name])
    for name in ("0.bias", "1.weight", "1.bias", "3.bias"):
        deltas = [b[name].double() - base_sd[name].double() for b in branches]
        ties = merge_utils.ties(
            deltas, torch.ones(3, dtype=torch.float64), density=1.0, majority_sign_method="total"
        )
        assert torch.allclose(merged[name].double(), base_sd[name].double() + ties, atol=1e-6)
    # inputs untouched
    assert all(torch.equal(v, _mlp(0).state_dict()[k]) for k, v in base.state_dict().items())


def test_coefficients_change_the_result_and_are_validated() -> None:
    base = _mlp(1)
    branches = _finetunes(base, 2)
    method = get_method("drm")
    a = merge_state_dicts(method, base, branches)
    b = merge_state_dicts(method, base, branches, coefficients=[1.0, 0.0])
    assert not torch.equal(a["0.weight"], b["0.weight"])
    with pytest.raises(ValueError, match="2 branches"):
        merge_state_dicts(method, base, branches, coefficients=[1.0])
    with pytest.raises(ValueError, match=r"branches\[1\].coefficient=-1.0"):
        validate_coefficients([1.0, -1.0], 2)
    with pytest.raises(ValueError, match="at least one branch"):
        validate_coefficients(None, 0)


def test_validation_lists_every_problem_before_reading() -> None:
    base = {
        "a.weight": torch.zeros(4, 3),
        "b.weight": torch.zeros(5, 3),
        "step": torch.zeros(1, dtype=torch.long),
    }
    good = {k: v.clone() for k, v in base.items()}
    bad_shape = {"a.weight": torch.zeros(4, 2), "b.weight": torch.zeros(6, 3), "step": base["step"]}
    missing = {"a.weight": torch.zeros(4, 3), "step": base["step"], "extra": torch.zeros(1)}
    with pytest.raises(ValueError) as err:
        merge_state_dicts(get_method("drm"), base, [good, bad_shape, missing])
    text = str(err.value)
    assert "a.weight: base [4, 3], branch 0 [4, 3], branch 1 [4, 2]" in text
    assert "b.weight: base [5, 3], branch 0 [5, 3], branch 1 [6, 3]" in text
    assert "branch 2" in text and "missing 1 key(s)" in text and "'b.weight'" not in text
    assert "extra" in text
    assert "'step'" in text and "non-float" in text


def test_vocab_mismatch_and_dtype_errors() -> None:
    base = {"model.embed_tokens.weight": torch.zeros(10, 4)}
    branch = {"model.embed_tokens.weight": torch.zeros(12, 4)}
    with pytest.raises(ValueError, match="vocabulary size differs"):
        plan_merge(_src(base), [_src(branch)])
    f8 = getattr(torch, "float8_e4m3fn", None)
    if f8 is not None:
        base = {"w": torch.zeros(2, 2).to(f8)}
        with pytest.raises(ValueError, match="unsupported dtype"):
            plan_merge(_src(base), [_src(base)])
    ok = plan_merge(
        _src({"w": torch.zeros(2, 2, dtype=torch.long)}),
        [_src({"w": torch.zeros(2, 2, dtype=torch.long)})],
        routing=Routing(ignore=["w"]),
    )
    assert ok[0].route == "ignore"


def _src(d):
    from drm_lightning.sources import StateDictSource

    return StateDictSource(d, origin="test")


def test_nan_in_branch_is_named() -> None:
    base = _mlp(2)
    branches = _finetunes(base, 2)
    branches[1]["3.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'3.weight' in branch 1 .* 1 NaN"):
        merge_state_dicts(get_method("drm"), base, branches)


def test_tensor_generator_is_deterministic_per_name() -> None:
    a = torch.rand(4, generator=tensor_generator(0, "x"))
    b = torch.rand(4, generator=tensor_generator(0, "x"))
    c = torch.rand(4, generator=tensor_generator(0, "y"))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_merge_tensor_ignore_is_bit_identical_and_lowrank_mix() -> None:
    base = torch.randn(6, 5, dtype=torch.bfloat16)
    out = merge_tensor(get_method("drm"), "ignore", base, [], [])
    assert torch.equal(out, base) and out.data_ptr() != base.data_ptr()
    g = torch.Generator().manual_seed(3)
    b64 = torch.zeros(6, 5, dtype=torch.float64)
    lora = (
        torch.randn(6, 2, generator=g, dtype=torch.float64),
        torch.randn(2, 5, generator=g, dtype=torch.float64),
    )
    dense = torch.randn(6, 5, generator=g, dtype=torch.float64)
    method = get_method("drm", drop_rate=0.5)
    mixed = merge_tensor(
        method, "matrix", b64, [lora, dense, None], [1, 1, 1], compute_dtype=torch.float64
    )
    expected = merge_tensor(
        method,
        "matrix",
        b64,
        [lora[0] @ lora[1], dense, b64],
        [1, 1, 1],
        compute_dtype=torch.float64,
    )
    assert torch.allclose(mixed, expected, atol=1e-12)
