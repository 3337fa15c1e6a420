"""Solvers and similarities against slow, obvious oracles (spec §14 items 4-6, 8-10)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from drm_lightning.alignment import (
    CorrelationAccumulator,
    PermSpec,
    align_match,
    weight_similarity,
    zip_match,
)


def sym(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    return (a + a.T) / 2


@pytest.mark.parametrize("c", [2, 3, 4, 5, 6])
def test_hungarian_equals_brute_force(c: int) -> None:
    for seed in range(3):
        s = sym(2 * c, seed + 10 * c)
        m = align_match([s], 2, c)[0]
        cross = s[:c, c:]
        best = max(
            itertools.permutations(range(c)), key=lambda p: sum(cross[j, p[j]] for j in range(c))
        )
        assert m.permutation(1).tolist() == list(best)
        assert m.value == pytest.approx(float(sum(cross[j, best[j]] for j in range(c))) / c)


def test_group_align_pairs_heads_optimally_and_never_splits() -> None:
    heads, g = 4, 3
    c = heads * g
    for seed in range(3):
        s = sym(2 * c, seed)
        m = align_match([s], 2, c, heads)[0]
        perm = m.permutation(1)
        pairing = []
        for a in range(heads):  # merged head a takes one whole head of model 1
            src = set((perm[a * g : (a + 1) * g] // g).tolist())
            assert len(src) == 1
            pairing.append(src.pop())
        cross = s[:c, c:]

        def score(a: int, b: int) -> float:
            blk = cross[a * g : (a + 1) * g, b * g : (b + 1) * g]
            return (
                max(sum(blk[i, p[i]] for i in range(g)) for p in itertools.permutations(range(g)))
                / g
            )

        scores = np.array([[score(a, b) for b in range(heads)] for a in range(heads)])
        best = max(
            itertools.permutations(range(heads)),
            key=lambda p: sum(scores[a, p[a]] for a in range(heads)),
        )
        assert pairing == list(best)


def test_linked_groups_share_the_head_pairing() -> None:
    c, heads = 8, 4
    qk, vo = sym(2 * c, 1), sym(2 * c, 2)
    for solve in (lambda s: align_match(s, 2, c, heads), lambda s: zip_match(s, 2, c, heads)):
        a, b = solve([qk, vo])
        for t in range(heads):
            cols = slice(t * 2, (t + 1) * 2)
            heads_a = {int(u) // 2 for u in a.assign[:, cols].nonzero()[:, 0]}
            heads_b = {int(u) // 2 for u in b.assign[:, cols].nonzero()[:, 0]}
            assert heads_a == heads_b and len(heads_a) <= 2  # one head per model, the same in both


@pytest.mark.parametrize("n_models", [2, 3])
def test_zip_structure(n_models: int) -> None:
    c = 6
    m = zip_match([sym(n_models * c, n_models)], n_models, c, decay=0.5, budget=0.5)[0]
    p = m.assign
    assert p.shape == (n_models * c, c)  # width kept: reduce ratio 1 - 1/N
    assert torch.all(p.sum(1) == 1) and torch.all(p.sum(0) >= 1)  # one-hot rows, no empty unit


def test_zip_without_budget_or_decay_is_a_matching() -> None:
    c = 6
    m = zip_match([sym(2 * c, 5)], 2, c, decay=0.0, budget=0.0)[0]
    assert torch.all(m.unmerge(0).sum(0) == 1) and torch.all(m.unmerge(1).sum(0) == 1)


def test_zip_budget_limits_within_model_merges() -> None:
    c = 6
    s = -torch.ones(2 * c, 2 * c, dtype=torch.float64)
    s[:c, :c] = 1.0  # model 0's units are alike; cross-model pairs are not
    s[c:, c:] = 1.0
    m = zip_match([s], 2, c, decay=0.9, budget=0.5)[0]
    limit = math.floor(math.floor(c / 2) * 0.5)
    for i in range(2):
        assert c - int((m.unmerge(i).sum(0) > 0).sum()) <= limit


def test_zip_forbid_mode_keeps_models_apart() -> None:
    c = 5
    s = sym(2 * c, 7)
    m = zip_match([s], 2, c, decay=0.0, budget=1.0)[0]
    for col in range(c):
        rows = m.assign[:, col].nonzero()[:, 0]
        from_a, from_b = int((rows < c).sum()), int((rows >= c).sum())
        assert not (max(from_a, from_b) >= 2 and min(from_a, from_b) >= 1)


def test_group_zip_heads_never_split() -> None:
    c, heads = 12, 3
    g = c // heads
    m = zip_match([sym(2 * c, 3)], 2, c, heads)[0]
    for t in range(heads):
        rows = m.assign[:, t * g : (t + 1) * g].nonzero()[:, 0]
        assert (
            len({int(r) // g for r in rows if r < c}) <= 1
            and len({int(r) // g for r in rows if r >= c}) <= 1
        )


def test_streaming_correlation_equals_corrcoef_constant_memory() -> None:
    x = torch.randn(300, 7, dtype=torch.float64)
    x[:, 3] = 2.0  # a dead unit
    acc = CorrelationAccumulator(7)
    sizes = [(acc.mean.shape, acc.comoment.shape)]
    for chunk in torch.split(x, [10, 90, 1, 199]):
        acc.update(chunk)
        sizes.append((acc.mean.shape, acc.comoment.shape))
    assert len(set(sizes)) == 1  # state does not grow with the number of batches
    corr = acc.correlation()
    assert torch.isfinite(corr).all() and torch.all(corr[3] == 0)
    keep = [0, 1, 2, 4, 5, 6]
    ref = np.corrcoef(x[:, keep].numpy().T)
    assert np.allclose(corr[keep][:, keep].numpy(), ref, atol=1e-12)


def test_weight_similarity_equals_corrcoef_of_rows() -> None:
    sds = [
        {"a.weight": torch.randn(4, 3), "a.bias": torch.randn(4), "b.weight": torch.randn(2, 4)}
        for _ in range(2)
    ]
    spec = PermSpec.declare({"h": {"out": ["a.weight", "a.bias"], "in": ["b.weight"]}})
    s = weight_similarity(sds, spec, spec["h"], {})
    rows = torch.cat(
        [torch.cat([sd["a.weight"], sd["a.bias"][:, None], sd["b.weight"].T], 1) for sd in sds]
    )
    assert np.allclose(s.numpy(), np.corrcoef(rows.double().numpy()), atol=1e-12)
