"""In-loop alignment (issue 11): ``MergeCore(aligner=BranchAligner(...))``.

Oracle: live branches one of which is a permuted copy merge, after alignment, exactly as the
unpermuted branches merge without it (DRM in float64); the per-task heads stay valid.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _alignment_nets import MLP, inputs, seeded
from torch import nn

from drm_lightning.alignment import derive_spec, permute_state_dict, random_permutations
from drm_lightning.inloop import BranchAligner, BranchedModel, LiveBranches, MergeCore, method_from


def _model(states: list[dict[str, torch.Tensor]], base: nn.Module) -> BranchedModel:
    heads = {t: nn.Linear(10, 2).double() for t in ("a", "b")}
    model = BranchedModel(base, heads)
    for task, state in zip(("a", "b"), states, strict=True):
        model.branches[task].load_state_dict(state)
    return model


def _merge(model: BranchedModel, aligner: BranchAligner | None) -> dict[str, torch.Tensor]:
    core = MergeCore(
        method_from("drm", None), LiveBranches(), compute_dtype=torch.float64, aligner=aligner
    )
    core.start(model, core.make_backend(partitioned=False))
    core.merge(model, step=1, epoch=0)
    assert core.last_merged is not None
    return core.last_merged


@pytest.mark.parametrize("method", ["mudsc_align", "weight_matching"])
def test_aligned_merge_of_a_permuted_branch_equals_the_unpermuted_merge(method: str) -> None:
    base = seeded(MLP, 0)
    states = []
    for s in (1, 2):
        g = torch.Generator().manual_seed(s)
        states.append(
            {
                k: v + 0.01 * torch.randn(v.shape, generator=g, dtype=v.dtype)
                for k, v in base.state_dict().items()
            }
        )
    spec = derive_spec(base, inputs("mlp"))
    perms = random_permutations(
        spec, spec.check([base.state_dict()]), torch.Generator().manual_seed(3)
    )
    moved = permute_state_dict(states[1], spec, perms)
    want = _merge(_model(states, base), None)
    loader = [inputs("mlp", 32, seed=s) for s in (1, 2, 3)]
    permuted = _model([states[0], moved], base)
    live_b = copy.deepcopy(permuted.branches["b"].state_dict())
    got = _merge(permuted, BranchAligner(method, loader))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert all(
        torch.equal(permuted.branches["b"].state_dict()[k], v) for k, v in live_b.items()
    )  # untouched
    unaligned = _merge(_model([states[0], moved], base), None)
    assert not torch.equal(unaligned["fc1.weight"], want["fc1.weight"])


def test_aligner_refusals() -> None:
    with pytest.raises(ValueError, match="merges units within a model"):
        BranchAligner("mudsc_zip", [torch.zeros(2, 20)])
    with pytest.raises(ValueError, match="reads activations: pass loader="):
        BranchAligner("activation_align")
    with pytest.raises(ValueError, match="did you mean 'mudsc_align'"):
        BranchAligner("mudsc_alig")

    class Zero3:
        partitioned = True

    with pytest.raises(NotImplementedError, match="ZeRO-3"):
        BranchAligner("weight_matching").permute(nn.Linear(2, 2), [], Zero3())
    with pytest.raises(ValueError, match="anchor 3 is out of range for 0 branches"):
        BranchAligner("weight_matching", anchor=3).permute(nn.Linear(2, 2), [], None)
