"""Permutation specs: derivation from torch.fx, manual declaration,
function preservation, bad input."""

from __future__ import annotations

import pytest
import torch
from _alignment_nets import MLP, ResNet, TinyBert, inputs, seeded
from torch import nn
from torch.func import functional_call

from drm_lightning.alignment import (
    Member,
    PermSpec,
    derive_spec,
    permute_state_dict,
    random_permutations,
)
from drm_lightning.demo.backbone import ResidualMLP

NETS = {
    "mlp": (MLP, "mlp", {}),
    "resnet_bn": (ResNet, "resnet", {}),
    "resnet_gn": (ResNet, "resnet", {"groupnorm": 4}),
    "bert": (TinyBert, "bert", {}),
}


def members(spec: PermSpec, group: str) -> set[tuple[str, int, str, bool]]:
    return {(m.param, m.axis, m.role, m.ignore) for m in spec[group].members}


def test_mlp_groups_and_frozen_output() -> None:
    net = seeded(MLP, 0)
    spec = derive_spec(net, inputs("mlp"))
    assert [g.name for g in spec.groups] == ["fc1", "fc2", "fc3"]
    assert members(spec, "fc2") == {
        ("fc2.weight", 0, "out", False),
        ("fc2.bias", 0, "out", False),
        ("fc3.weight", 1, "in", False),
    }
    assert spec["fc3"].probes[0].module == "fc4"
    assert any("fc4" in n and "model output" in n for n in spec.notes)


def test_manual_declaration_equals_derived() -> None:
    declared = PermSpec.declare(
        {
            f"fc{i}": {"out": [f"fc{i}.weight", f"fc{i}.bias"], "in": [f"fc{i + 1}.weight"]}
            for i in (1, 2, 3)
        }
    )
    derived = derive_spec(seeded(MLP, 0), inputs("mlp"))
    for a, b in zip(declared.groups, derived.groups):
        assert set(a.members) == set(b.members) and a.probes[0].module == b.probes[0].module


def test_resnet_residual_stream_is_one_group() -> None:
    spec = derive_spec(seeded(ResNet, 0), inputs("resnet"))
    stream = members(spec, "conv1")  # stage 1: stem, block-1 output, readers of stage 1
    assert {
        ("conv1.weight", 0, "out", False),
        ("layer1.conv2.weight", 0, "out", False),
        ("layer1.conv1.weight", 1, "in", False),
        ("layer2.conv1.weight", 1, "in", False),
        ("layer2.shortcut.0.weight", 1, "in", False),
        ("bn1.running_var", 0, "out", True),
    } <= stream
    stage2 = members(spec, "layer2.conv2")
    assert ("layer2.shortcut.0.weight", 0, "out", False) in stage2 and (
        "fc.weight",
        1,
        "in",
        False,
    ) in stage2
    assert spec["layer2.conv2"].probes[0].module == "fc"


def test_groupnorm_sets_head_groups() -> None:
    spec = derive_spec(seeded(ResNet, 0, groupnorm=4), inputs("resnet"))
    assert {g.num_groups for g in spec.groups} == {4}


def test_bert_block_from_config_heads_linked() -> None:
    spec = derive_spec(seeded(TinyBert, 0), inputs("bert"))
    qk, vo = spec["layers.0.attention.self.qk"], spec["layers.0.attention.self.vo"]
    assert qk.num_groups == vo.num_groups == 4 and qk.link == vo.link
    assert {m.param for m in qk.members} >= {
        "layers.0.attention.self.query.weight",
        "layers.0.attention.self.key.weight",
    }
    assert [p.module for p in qk.probes] == [
        "layers.0.attention.self.query",
        "layers.0.attention.self.key",
    ]
    assert ("layers.0.attention.output.dense.weight", 1, "in", False) in members(spec, vo.name)
    assert ("layers.1.output.LayerNorm.weight", 0, "out", False) in members(spec, "inp")


@pytest.mark.parametrize("net", sorted(NETS))
def test_function_preserving_permutation(net: str) -> None:
    cls, kind, kw = NETS[net]
    model = seeded(cls, 0, **kw)
    x = inputs(kind)
    spec = derive_spec(model, x)
    sd = model.state_dict()
    perms = random_permutations(spec, spec.check([sd]), torch.Generator().manual_seed(3))
    moved = permute_state_dict(sd, spec, perms)
    assert any(not torch.equal(moved[k], sd[k]) for k in sd)
    assert (functional_call(model, moved, (x,)) - model(x)).abs().max() <= 1e-6
    # float32 too
    model32 = model.float()
    moved32 = permute_state_dict(model32.state_dict(), spec, perms)
    y = functional_call(model32, moved32, (x.float(),))
    assert (y - model32(x.float())).abs().max() <= 1e-5


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = ResidualMLP(hidden=16, depth=2)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def test_demo_backbone() -> None:
    torch.manual_seed(0)
    bare = ResidualMLP(hidden=16, depth=2).double()
    x = torch.randn(8, 64, dtype=torch.float64)
    spec = derive_spec(bare, x)  # features are the output: the residual stream stays in place
    assert [g.name for g in spec.groups] == ["blocks.0.fc1", "blocks.1.fc1"]
    net = Head().double()
    spec = derive_spec(net, x)  # with its head, the stream is permutable too
    assert "backbone.embed" in [g.name for g in spec.groups]
    sd = net.state_dict()
    moved = permute_state_dict(
        sd, spec, random_permutations(spec, spec.check([sd]), torch.Generator().manual_seed(0))
    )
    assert (functional_call(net, moved, (x,)) - net(x)).abs().max() <= 1e-6


def test_fused_block_identity_is_bit_exact() -> None:
    qkv = torch.randn(12, 4)
    spec = PermSpec.declare(
        {
            "q": {"out": [Member("qkv", 0, "out", block=(0, 3))]},
            "v": {"out": [Member("qkv", 0, "out", block=(2, 3))]},
        }
    )
    ident = {"q": torch.arange(4), "v": torch.arange(4)}
    assert torch.equal(permute_state_dict({"qkv": qkv}, spec, ident)["qkv"], qkv)
    moved = permute_state_dict(
        {"qkv": qkv}, spec, {"q": torch.tensor([1, 0, 2, 3]), "v": torch.arange(4)}
    )
    assert torch.equal(moved["qkv"][4:], qkv[4:]) and torch.equal(moved["qkv"][0], qkv[1])


class WithLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.rnn = nn.LSTM(8, 8, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(self.fc(x))[0]


class WithMHA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return self.attn(h, h, h)[0]


def test_no_spec_names_first_unsupported_module() -> None:
    with pytest.raises(NotImplementedError, match=r"module 'rnn' \(LSTM\).*PermSpec.declare"):
        derive_spec(WithLSTM(), torch.randn(2, 3, 4))
    with pytest.raises(NotImplementedError, match=r"module 'attn' \(MultiheadAttention\).*declare"):
        derive_spec(WithMHA(), torch.randn(2, 3, 8))
    with pytest.raises(
        NotImplementedError, match=r"could not trace TransformerEncoderLayer.*declare"
    ):
        derive_spec(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), torch.randn(2, 3, 8))


def test_different_widths_refused() -> None:
    spec = derive_spec(seeded(MLP, 0), inputs("mlp"))
    with pytest.raises(ValueError) as err:
        spec.check([MLP(32).state_dict(), MLP(16).state_dict()])
    assert "'fc1.weight': model 1 has shape (16, 20), model 0 (32, 20)" in str(err.value)
    assert "different widths" in str(err.value)


def test_bad_declaration_listed() -> None:
    spec = PermSpec.declare(
        {"h": {"out": ["fc1.weight", "nope.weight"], "in": ["fc2.weight"], "heads": 5}}
    )
    with pytest.raises(
        ValueError, match=r"'nope.weight' is not in the state dict(.|\n)*5 heads do not divide 32"
    ):
        spec.check([MLP().state_dict()])
    with pytest.raises(ValueError, match="unknown key"):
        PermSpec.declare({"h": {"outs": ["fc1.weight"]}})
