"""Fused QKV (spec §3, the reference's ``native_stacked_QKV``): ``routing.fused_qkv`` merges a
row-stacked Q/K/V matrix as three blocks, each exactly as DRM merges a separate matrix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from drm_lightning.cli.command import main
from drm_lightning.config.loading import load_config
from drm_lightning.distributed import merge_module_branches
from drm_lightning.merge.loop import merge_state_dicts
from drm_lightning.merge.routing import Routing
from drm_lightning.merge.tensor import merge_tensor
from drm_lightning.methods import get_method

F64 = torch.float64
FUSED = Routing(fused_qkv=[r".*in_proj_weight"])
D = 24


def _attention_states(n_branches: int = 3, dtype: torch.dtype = F64) -> tuple[dict, list[dict]]:
    """Base and branches of one ``nn.MultiheadAttention`` (fused ``in_proj_weight`` 3D × D)."""
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(D, 4).to(dtype)
    base = {f"attn.{k}": v.detach().clone() for k, v in attn.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    branches = [
        {k: v + 0.05 * torch.randn(v.shape, generator=g, dtype=dtype) for k, v in base.items()}
        for _ in range(n_branches)
    ]
    return base, branches


def _split(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same weights with Q, K and V as three separate matrices."""
    out = {k: v for k, v in state.items() if k != "attn.in_proj_weight"}
    for part, block in zip("qkv", state["attn.in_proj_weight"].chunk(3)):
        out[f"attn.{part}_proj.weight"] = block
    return out


@pytest.mark.parametrize("direction", ["vertical", "horizontal"])
def test_fused_equals_drm_on_the_three_blocks_apart(direction: str) -> None:
    base, branches = _attention_states()
    method = get_method("drm", drop_rate=0.7, direction=direction)
    fused = merge_state_dicts(method, base, branches, routing=FUSED, compute_dtype=F64)
    apart = merge_state_dicts(
        method, _split(base), [_split(b) for b in branches], compute_dtype=F64
    )
    expected = torch.cat([apart[f"attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.allclose(fused["attn.in_proj_weight"], expected, rtol=0, atol=1e-12)
    # Without the option the fused matrix takes one joint basis: a different merge.
    joint = merge_state_dicts(method, base, branches, compute_dtype=F64)
    assert not torch.allclose(joint["attn.in_proj_weight"], expected, atol=1e-6)
    # The other tensors do not change with the option.
    for name in ("attn.out_proj.weight", "attn.in_proj_bias"):
        assert torch.equal(fused[name], joint[name])


def test_lora_factors_split_like_the_dense_delta() -> None:
    g = torch.Generator().manual_seed(2)
    base = torch.randn(3 * D, D, generator=g, dtype=F64)
    factors = [
        (torch.randn(3 * D, 4, generator=g, dtype=F64), torch.randn(4, D, generator=g, dtype=F64))
        for _ in range(2)
    ]
    method = get_method("drm", drop_rate=0.5)
    lowrank = merge_tensor(
        method, "matrix", base, factors, [1.0, 1.0], compute_dtype=F64, row_blocks=3
    )
    dense = merge_tensor(
        method,
        "matrix",
        base,
        [base + b @ a for b, a in factors],
        [1.0, 1.0],
        compute_dtype=F64,
        row_blocks=3,
    )
    assert torch.allclose(lowrank, dense, rtol=0, atol=1e-10)


def test_module_merge_engine_splits_too() -> None:
    """The callback's entry point (DistributedMerger, single engine) honours the routing."""
    base, branches = _attention_states(dtype=torch.float32)
    method = get_method("drm", drop_rate=0.7)
    target = nn.Module()
    target.attn = nn.MultiheadAttention(D, 4)
    result = merge_module_branches(method, target, base, branches, routing=FUSED, collect=True)
    expected = merge_state_dicts(method, base, branches, routing=FUSED)
    for name, value in expected.items():
        assert torch.allclose(result.merged[name], value, rtol=0, atol=1e-6), name


def test_rows_not_divisible_by_three_are_refused() -> None:
    base = {"x.in_proj_weight": torch.zeros(10, 4)}
    branches = [{"x.in_proj_weight": torch.ones(10, 4)}]
    with pytest.raises(
        ValueError, match=r"'x.in_proj_weight' matches routing.fused_qkv but its 10 rows"
    ):
        merge_state_dicts(get_method("drm"), base, branches, routing=FUSED)
    with pytest.raises(ValueError, match=r"its 10 rows do not split into 3"):
        target = nn.Module()
        target.x = nn.Module()
        target.x.in_proj_weight = nn.Parameter(torch.zeros(10, 4))
        merge_module_branches(get_method("drm"), target, base, branches, routing=FUSED)


def test_cli_yaml_fused_qkv(tmp_path: Path) -> None:
    base, branches = _attention_states(dtype=torch.float32)
    save_file({k: v.contiguous() for k, v in base.items()}, tmp_path / "base.safetensors")
    for i, b in enumerate(branches):
        save_file({k: v.contiguous() for k, v in b.items()}, tmp_path / f"b{i}.safetensors")
    cfg = tmp_path / "drm.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "method": "drm",
                "base": str(tmp_path / "base.safetensors"),
                "branches": [str(tmp_path / f"b{i}.safetensors") for i in range(len(branches))],
                "parameters": {"drop_rate": 0.7},
                "routing": {"fused_qkv": [".*in_proj_weight"]},
            }
        )
    )
    assert load_config(cfg).build_routing().fused_qkv == (".*in_proj_weight",)
    out = tmp_path / "merged"
    assert main([str(cfg), "-o", str(out), "--no-progress"]) == 0
    merged = {}
    for f in out.glob("*.safetensors"):
        merged.update(load_file(f))
    expected = merge_state_dicts(get_method("drm", drop_rate=0.7), base, branches, routing=FUSED)
    assert torch.allclose(
        merged["attn.in_proj_weight"], expected["attn.in_proj_weight"], rtol=0, atol=1e-6
    )
