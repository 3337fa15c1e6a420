"""Alignment end to end: recovery of permuted copies, self-merge, α
limits, BN reset, align-then-DRM."""

from __future__ import annotations

import copy

import pytest
import torch
from _alignment_nets import MLP, ResNet, TinyBert, inputs, seeded
from torch import nn
from torch.func import functional_call

from drm_lightning.alignment import (
    activation_similarity,
    align,
    align_models,
    align_then_merge,
    available_alignments,
    derive_spec,
    get_alignment,
    merge_models,
    permute_state_dict,
    random_permutations,
    reset_batchnorm,
)
from drm_lightning.merge.loop import merge_state_dicts
from drm_lightning.methods import get_method

NETS = {
    "mlp": (MLP, "mlp", {}),
    "resnet_bn": (ResNet, "resnet", {}),
    "resnet_gn": (ResNet, "resnet", {"groupnorm": 4}),
    "bert": (TinyBert, "bert", {}),
}
ALIGNERS = ["activation_align", "mudsc_align", "weight_matching"]
MATCHERS = ALIGNERS + ["zipit", "mudsc_zip", "weight_zip"]


def batches(kind: str, n: int = 3) -> list[torch.Tensor]:
    return [inputs(kind, 32, seed=s + 1) for s in range(n)]


def permuted_copy(net: str, seed: int = 5):
    cls, kind, kw = NETS[net]
    a = seeded(cls, 0, **kw)
    spec = derive_spec(a, inputs(kind))
    perms = random_permutations(
        spec, spec.check([a.state_dict()]), torch.Generator().manual_seed(seed)
    )
    b = copy.deepcopy(a)
    b.load_state_dict(permute_state_dict(a.state_dict(), spec, perms))
    return a, b, spec, perms, kind


@pytest.mark.parametrize("net", sorted(NETS))
def test_permuted_copy_is_recovered_exactly(net: str) -> None:
    a, b, spec, perms, kind = permuted_copy(net)
    data = batches(kind)
    sims = activation_similarity([a, b], spec, data)
    sds = [a.state_dict(), b.state_dict()]
    x = inputs(kind)
    for name in MATCHERS:
        result = get_alignment(name).solve(sds, spec, sims)
        assert result.is_permutation(), name
        for g, perm in perms.items():  # the recovered assignment is the inverse permutation
            assert torch.equal(result.matchings[g].permutation(1), torch.argsort(perm)), (name, g)
        back = result.aligned_state_dicts(sds)[1]
        assert all(torch.equal(back[k], v) for k, v in sds[0].items()), name  # heads included
        merged = result.merged_state_dict(sds)
        assert (functional_call(a, merged, (x,)) - a(x)).abs().max() <= 1e-10, name


@pytest.mark.parametrize("name", sorted(set(available_alignments())))
def test_self_merge_returns_the_model(name: str) -> None:
    a = seeded(MLP, 1)
    merged = merge_models([a, copy.deepcopy(a)], batches("mlp"), method=name)
    assert all(torch.equal(merged.state_dict()[k], v) for k, v in a.state_dict().items())


def test_reference_eps_is_a_compat_flag() -> None:
    a = seeded(MLP, 1)
    x = inputs("mlp")
    merged = merge_models(
        [a, copy.deepcopy(a)], batches("mlp"), method="mudsc_align", merge_eps=1e-5
    )
    err = (merged(x) - a(x)).abs().max()
    assert 0 < err <= 1e-4


@pytest.mark.parametrize(
    ("dual", "single"), [("mudsc_align", "activation_align"), ("mudsc_zip", "zipit")]
)
def test_alpha_zero_equals_activation_only(dual: str, single: str) -> None:
    models = [seeded(TinyBert, 0), seeded(TinyBert, 1)]
    data = batches("bert")
    ours = align(models, data, method=dual, fix_rate=0.0)
    ref = align(models, data, method=single)
    assert all(
        torch.equal(ours.matchings[g].assign, ref.matchings[g].assign) for g in ref.matchings
    )
    weighted = align(models, data, method=dual, fix_rate=1.0)
    assert any(
        not torch.equal(weighted.matchings[g].assign, ref.matchings[g].assign)
        for g in ref.matchings
    )


def test_coordinate_ascent_is_seeded_and_bounded() -> None:
    models = [seeded(MLP, 0), seeded(MLP, 1)]
    data = batches("mlp")
    r1 = align(models, data, method="mudsc_zip", seed=3)
    r2 = align(models, data, method="mudsc_zip", seed=3)
    assert r1.history == r2.history and r1.objective == max(r1.history)
    assert all(torch.equal(r1.matchings[g].assign, r2.matchings[g].assign) for g in r1.matchings)
    short = align(models, data, method="weight_matching", max_sweeps=2)
    assert short.sweeps <= 2 and len(short.history) <= 2
    patient = align(models, data, method="mudsc_align", patience=1)
    assert patient.history[-1] <= max(patient.history[:-1] or [float("inf")])


def test_heads_never_split_between_different_models() -> None:
    models = [seeded(TinyBert, 0), seeded(TinyBert, 7)]
    spec = derive_spec(models[0], inputs("bert"))
    for name in ("mudsc_zip", "mudsc_align"):
        result = align(models, batches("bert"), method=name, spec=spec)
        for layer in ("layers.0", "layers.1"):
            qk = result.matchings[f"{layer}.attention.self.qk"]
            vo = result.matchings[f"{layer}.attention.self.vo"]
            c, g = qk.units, qk.units // 4
            for t in range(4):
                cols = slice(t * g, (t + 1) * g)
                src = [
                    {(int(r) // c, int(r) % c // g) for r in m.assign[:, cols].nonzero()[:, 0]}
                    for m in (qk, vo)
                ]
                assert src[0] == src[1] and len({mdl for mdl, _ in src[0]}) == len(src[0])


def test_merged_models_run_for_every_method_and_three_models() -> None:
    models = [seeded(ResNet, s) for s in range(3)]
    x = inputs("resnet")
    for name in available_alignments():
        merged = merge_models(models, batches("resnet"), method=name)
        y = merged(x)
        assert y.shape == (16, 5) and torch.isfinite(y).all()


def test_batchnorm_reset_is_the_cumulative_average() -> None:
    net = seeded(ResNet, 0)
    data = batches("resnet", 3)
    seen: list[torch.Tensor] = []
    handle = net.layer1.bn2.register_forward_pre_hook(
        lambda m, a: seen.append(a[0].detach().clone())
    )
    assert reset_batchnorm(net, data) == 6
    handle.remove()
    means = torch.stack([s.mean(dim=(0, 2, 3)) for s in seen]).mean(0)
    variances = torch.stack([s.var(dim=(0, 2, 3), unbiased=True) for s in seen]).mean(0)
    assert torch.allclose(net.layer1.bn2.running_mean, means, atol=1e-12)
    assert torch.allclose(net.layer1.bn2.running_var, variances, atol=1e-12)
    assert not net.training and net.layer1.bn2.momentum == 0.1
    gn = seeded(ResNet, 0, groupnorm=4)
    before = {k: v.clone() for k, v in gn.state_dict().items()}
    assert reset_batchnorm(gn, data) == 0
    assert all(torch.equal(before[k], v) for k, v in gn.state_dict().items())


def test_merge_models_resets_batchnorm_on_given_batches() -> None:
    models = [seeded(ResNet, 0), seeded(ResNet, 1)]
    data = batches("resnet")
    merged = merge_models(models, data, method="zipit")
    ref = copy.deepcopy(merged)
    reset_batchnorm(ref, data)
    assert torch.allclose(merged.bn1.running_mean, ref.bn1.running_mean, atol=1e-12)


def test_align_then_drm_of_permuted_copy_equals_drm() -> None:
    torch.manual_seed(0)
    base = seeded(MLP, 0)
    branches = []
    for s in (1, 2):
        b = copy.deepcopy(base)
        g = torch.Generator().manual_seed(s)
        with torch.no_grad():
            for p in b.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        branches.append(b)
    spec = derive_spec(base, inputs("mlp"))
    perms = random_permutations(
        spec, spec.check([base.state_dict()]), torch.Generator().manual_seed(9)
    )
    moved = copy.deepcopy(branches[1])
    moved.load_state_dict(permute_state_dict(branches[1].state_dict(), spec, perms))
    drm = get_method("drm")
    want = merge_state_dicts(
        drm, base.state_dict(), [b.state_dict() for b in branches], compute_dtype=torch.float64
    )
    got = align_then_merge(
        drm,
        base.state_dict(),
        [branches[0], moved],
        batches("mlp"),
        spec=spec,
        merge_kwargs={"compute_dtype": torch.float64},
    )
    assert all(torch.equal(got[k], want[k]) for k in want)
    ties = align_then_merge(
        "ties", "anchor", [branches[0], moved], batches("mlp"), alignment="weight_matching"
    )
    assert set(ties) == set(want)


def test_align_models_keeps_anchor_and_refuses_zip() -> None:
    a, b, spec, perms, kind = permuted_copy("mlp")
    out = align_models([b, a], batches(kind), anchor=1, spec=spec)
    assert all(torch.equal(out[1][k], v) for k, v in a.state_dict().items())
    assert all(torch.equal(out[0][k], v) for k, v in a.state_dict().items())
    with pytest.raises(ValueError, match="not permutations"):
        align_models([a, seeded(MLP, 3)], batches(kind), method="mudsc_zip", spec=spec)


def test_nan_activations_located() -> None:
    models = [seeded(MLP, 0), seeded(MLP, 1)]
    data = batches("mlp")
    data[1][3, 0] = float("nan")
    with pytest.raises(
        ValueError, match=r"non-finite activations in group 'fc1'.*model 0 on batch 1"
    ):
        align(models, data, method="zipit")
    # NaN weights are refused by name before any activation is computed (issue 20)
    with torch.no_grad():
        models[1].fc2.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'fc2.weight' in model 1 contains 1 NaN"):
        align(models, batches("mlp"), method="zipit")


def test_fewer_samples_than_units_warns() -> None:
    models = [seeded(MLP, 0), seeded(MLP, 1)]
    with pytest.warns(UserWarning, match=r"group 'fc1': 8 activation samples for 64 units"):
        align(models, [inputs("mlp", 8)], method="activation_align")


def test_bad_names_and_missing_data() -> None:
    with pytest.raises(ValueError, match="did you mean 'mudsc_zip'"):
        get_alignment("mudsc_zipp")
    with pytest.raises(ValueError, match="unknown parameter 'fixrate'"):
        get_alignment("mudsc_zip", fixrate=0.5)
    with pytest.raises(ValueError, match="fixed by alignment method"):
        get_alignment("zipit", solver="align")
    models = [seeded(MLP, 0), seeded(MLP, 1)]
    spec = derive_spec(models[0], inputs("mlp"))
    with pytest.raises(ValueError, match="pass calibration batches"):
        align(models, None, method="mudsc_zip", spec=spec)
    with pytest.raises(ValueError, match="at least 2 models"):
        align(models[:1], batches("mlp"))
    wide = [seeded(MLP, 0), seeded(MLP, 1, width=16)]
    with pytest.raises(ValueError, match="different widths"):
        align(wide, batches("mlp"), spec=spec)


def test_weight_only_methods_need_no_data() -> None:
    models = [seeded(MLP, 0), seeded(MLP, 1)]
    spec = derive_spec(models[0], inputs("mlp"))
    merged = merge_models(models, method="weight_matching", spec=spec)
    assert isinstance(merged, nn.Module) and not merged.training
