"""Matching solvers: Align (Hungarian) and Zip (ZipIt greedy), plain and head-grouped.

A solver takes a joint similarity ``S`` of shape ``(N·C, N·C)`` (model ``i``'s units are rows
``i·C … (i+1)·C − 1``) and returns a :class:`Matching`: a one-hot assignment
``P (N·C, C)`` of every original unit to one merged unit, plus the scalar "merge value" the
coordinate ascent maximises. The merged width is always ``C`` (reduce ratio ``1 − 1/N``).
Pure tensor math (scipy's ``linear_sum_assignment``); no modules, no I/O.

Paper: Xu et al., "Training-Free Pretrained Model Merging" (MuDSC), CVPR 2024, §5 of
``shared/spec/mudsc.md``; Zip follows Stoica et al., "ZipIt!", ICLR 2024.

Example:
    >>> import torch
    >>> s = torch.eye(4, dtype=torch.float64).repeat(2, 2)   # two identical 4-unit models
    >>> m = align_match([s], 2, 4)[0]
    >>> m.assign.argmax(dim=1).tolist()
    [0, 1, 2, 3, 0, 1, 2, 3]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor


@dataclass(frozen=True)
class Matching:
    """A one-hot assignment ``(N·C, C)`` of original units to merged units, and its value."""

    assign: Tensor
    n_models: int
    value: float

    @property
    def units(self) -> int:
        """Units per model (``C``)."""
        return self.assign.shape[0] // self.n_models

    def unmerge(self, i: int) -> Tensor:
        """``U_i`` (C, C'): model ``i``'s block of the assignment."""
        c = self.units
        return self.assign[i * c : (i + 1) * c]

    def merge(self, i: int, eps: float = 0.0) -> Tensor:
        """``M_i = N · U_i / (colsum(P) + eps)``: with it, the mean over models is the unit mean.

        ``eps = 1e-5`` reproduces the reference implementation; the default divides exactly.
        """
        colsum = self.assign.sum(dim=0)
        return self.n_models * self.unmerge(i) / (colsum + eps)

    def permutation(self, i: int) -> Tensor:
        """For an Align matching: ``perm[j]`` = model ``i``'s unit merged into unit ``j``."""
        return self.unmerge(i).argmax(dim=0)


def identity_matching(n_models: int, units: int, dtype: torch.dtype = torch.float64) -> Matching:
    """Unit ``j`` of every model merges with unit ``j`` of the others (weight averaging)."""
    return Matching(torch.eye(units, dtype=dtype).repeat(n_models, 1), n_models, 0.0)


def _hungarian(block: Tensor) -> tuple[np.ndarray, float]:
    """Column matched to every row maximising the sum, and the mean matched similarity."""
    arr = block.detach().cpu().double().numpy()
    rows, cols = linear_sum_assignment(arr, maximize=True)
    return cols[np.argsort(rows)], float(arr[rows, cols].mean())


def _head_pairing(
    sims: Sequence[Tensor], c: int, i: int, heads: int
) -> tuple[list[np.ndarray], np.ndarray, list[np.ndarray]]:
    """Pair model 0's heads with model ``i``'s (Hungarian on the summed head scores).

    Returns the within-pair unit matchings per similarity, the head pairing and the per-sim
    head score matrices.
    """
    g = c // heads
    scores = [np.zeros((heads, heads)) for _ in sims]
    within: list[dict[tuple[int, int], np.ndarray]] = [{} for _ in sims]
    for k, s in enumerate(sims):
        cross = s[:c, i * c : (i + 1) * c]
        for a in range(heads):
            for b in range(heads):
                cols, val = _hungarian(cross[a * g : (a + 1) * g, b * g : (b + 1) * g])
                within[k][(a, b)] = cols
                scores[k][a, b] = val
    total = np.sum(scores, axis=0)
    r, pair = linear_sum_assignment(total, maximize=True)
    pair = pair[np.argsort(r)]
    units = []
    for k in range(len(sims)):
        perm = np.concatenate([pair[a] * g + within[k][(a, int(pair[a]))] for a in range(heads)])
        units.append(perm)
    return units, pair, scores


def align_match(
    sims: Sequence[Tensor], n_models: int, units: int, heads: int = 1
) -> list[Matching]:
    """Align: match every model to model 0 one-to-one (Hungarian), per similarity in ``sims``.

    With ``heads > 1`` the units are ``heads`` contiguous groups: heads are paired by a
    Hungarian on the head-pair scores (summed over ``sims``, so linked groups share one
    pairing) and units are matched within each chosen pair only.
    """
    c = units
    assigns = [torch.zeros(n_models * c, c, dtype=torch.float64) for _ in sims]
    values = [[] for _ in sims]
    for a in assigns:
        a[torch.arange(c), torch.arange(c)] = 1
    for i in range(1, n_models):
        if heads == 1:
            perms, vals = [], []
            for s in sims:
                cols, val = _hungarian(s[:c, i * c : (i + 1) * c])
                perms.append(cols)
                vals.append(val)
        else:
            perms, pair, scores = _head_pairing(sims, c, i, heads)
            vals = [float(sc[np.arange(heads), pair].mean()) for sc in scores]
        for k, perm in enumerate(perms):
            assigns[k][i * c + torch.as_tensor(perm), torch.arange(c)] = 1
            values[k].append(vals[k])
    return [Matching(a, n_models, float(np.mean(v)) if v else 0.0) for a, v in zip(assigns, values)]


def _zip_greedy(
    sim: np.ndarray, labels: np.ndarray, n_models: int, target: int, decay: float, budget: float
) -> tuple[list[list[int]], list[float]]:
    """ZipIt greedy on a (n, n) similarity: merge the most similar pair until ``target`` clusters.

    ``labels`` is each unit's model. Merged rows are min-linked and multiplied by ``decay``
    (``decay <= 0``: a cluster never takes a second unit of a model it holds, and a
    within-model cluster takes no other unit; per-cluster model sets, not the reference's
    stale block offsets, spec §12.14).
    Within-model merges are limited to ``floor(floor(R / N) · budget)`` per model.
    """
    s = sim.astype(np.float64).copy()
    n = s.shape[0]
    np.fill_diagonal(s, -np.inf)
    labels = labels.copy()
    clusters: list[list[int]] = [[u] for u in range(n)]
    models = [{int(lab)} for lab in labels]
    alive = np.ones(n, dtype=bool)
    merges = n - target
    left = {m: math.floor(math.floor(merges / n_models) * budget) for m in range(n_models)}
    for m, b in left.items():
        if b <= 0:
            same = labels == m
            s[np.ix_(same, same)] = -np.inf
    values: list[float] = []
    for _ in range(merges):
        flat = int(np.argmax(s))
        x, y = divmod(flat, n)
        if not np.isfinite(s[x, y]):
            raise ValueError(
                f"zip: no admissible pair left after {len(values)} of {merges} merges "
                "(within-model budget too small); raise the budget or use the Align solver"
            )
        x, y = min(x, y), max(x, y)
        values.append(float(s[x, y]))
        clusters[x] += clusters[y]
        models[x] |= models[y]
        row = np.minimum(s[x], s[y])
        if decay > 0:
            row = np.where(np.isfinite(row), row * decay, row)
        elif labels[x] == labels[y]:
            row[:] = -np.inf  # a within-model cluster takes no other model's unit
        else:  # no second unit of a model already in the cluster
            row[[u for u in range(n) if alive[u] and models[u] & models[x]]] = -np.inf
        s[x, :] = row
        s[:, x] = row
        s[x, x] = -np.inf
        s[y, :] = -np.inf
        s[:, y] = -np.inf
        alive[y] = False
        if labels[x] == labels[y]:
            lab = int(labels[x])
            left[lab] -= 1
            if left[lab] <= 0:
                same = (labels == lab) & alive
                s[np.ix_(same, same)] = -np.inf
    return [clusters[u] for u in range(n) if alive[u]], values


def zip_match(
    sims: Sequence[Tensor],
    n_models: int,
    units: int,
    heads: int = 1,
    *,
    decay: float = 0.5,
    budget: float = 1.0,
) -> list[Matching]:
    """Zip: greedy merges across AND within models down to ``units`` merged units.

    With ``heads > 1`` the heads are first paired with model 0's (as in :func:`align_match`,
    summed over ``sims``); every head tuple is then zipped on its own into ``units / heads``
    merged units, placed contiguously, so merged head ``t`` only holds units of tuple ``t``.
    """
    c = units
    labels = np.repeat(np.arange(n_models), c)
    if heads == 1:
        tuples = [np.arange(n_models * c)]
    else:
        g = c // heads
        pairs = [np.arange(heads)]
        for i in range(1, n_models):
            pairs.append(_head_pairing(sims, c, i, heads)[1])
        tuples = [
            np.concatenate([i * c + int(pairs[i][t]) * g + np.arange(g) for i in range(n_models)])
            for t in range(heads)
        ]
    out = []
    for s in sims:
        arr = s.detach().cpu().double().numpy()
        assign = torch.zeros(n_models * c, c, dtype=torch.float64)
        col, vals = 0, []
        for idx in tuples:
            target = len(idx) // n_models
            clusters, v = _zip_greedy(
                arr[np.ix_(idx, idx)], labels[idx], n_models, target, decay, budget
            )
            vals += v
            for cl in sorted(clusters, key=min):
                assign[torch.as_tensor(idx[cl]), col] = 1
                col += 1
        out.append(Matching(assign, n_models, float(np.mean(vals)) if vals else 0.0))
    return out
