"""Apply per-group unit matrices to parameter axes: permutations, merges, unmerges.

Every transform of the alignment layer is one call of :func:`map_axis` per grouped axis:
``new[..., c', ...] = sum_c mat[c, c'] * t[..., c, ...]``. A permutation is a one-hot
``mat``; the merge and unmerge matrices of a matching are others.

Example (a function-preserving permutation of an MLP's hidden units):
    >>> import torch
    >>> from drm_lightning.alignment.spec import PermSpec
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> spec = PermSpec.declare({"h": {"out": ["0.weight", "0.bias"], "in": ["2.weight"]}})
    >>> perms = random_permutations(spec, {"h": 4}, torch.Generator().manual_seed(0))
    >>> moved = permute_state_dict(net.state_dict(), spec, perms)
    >>> x = torch.randn(5, 3)
    >>> y = torch.func.functional_call(net, moved, (x,))
    >>> bool(torch.allclose(y, net(x), atol=1e-6))
    True
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from drm_lightning.alignment.spec import Member, PermSpec

Pick = Callable[[Member, str], "Tensor | None"]
"""``pick(member, group) -> (C, C') matrix`` for that member's axis, or ``None`` (unchanged)."""


def map_axis(t: Tensor, axis: int, mat: Tensor) -> Tensor:
    """``new[..., c', ...] = sum_c mat[c, c'] t[..., c, ...]`` along ``axis`` (computed in
    ``mat``'s dtype)."""
    moved = torch.tensordot(t.to(mat.dtype), mat, dims=([axis], [0]))
    return torch.movedim(moved, -1, axis)


def map_param(t: Tensor, axes: Mapping[int, list[tuple[Member, str]]], pick: Pick) -> Tensor:
    """Map every grouped axis of one parameter; blocks of a split axis are mapped separately."""
    out = t
    for axis, entries in axes.items():
        ax = axis % t.dim()
        n = entries[0][0].block[1]
        mats = [None] * n
        for member, group in entries:
            mats[member.block[0]] = pick(member, group)
        if all(m is None for m in mats):
            continue
        if n == 1:
            out = map_axis(out, ax, mats[0])  # type: ignore[arg-type]
            continue
        chunks = list(torch.chunk(out, n, dim=ax))
        for k, mat in enumerate(mats):
            if mat is not None:
                chunks[k] = map_axis(chunks[k], ax, mat)
        dtype = functools.reduce(torch.promote_types, [c.dtype for c in chunks])
        out = torch.cat([c.to(dtype) for c in chunks], dim=ax)
    return out


def transform_state_dict(
    state_dict: Mapping[str, Tensor],
    spec: PermSpec,
    pick: Pick,
    *,
    dtype: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """Apply ``pick``'s matrices to every grouped parameter; others are returned as they are.

    Results are cast back to each parameter's dtype unless ``dtype`` is given.
    """
    index = spec.axes()
    out: dict[str, Tensor] = {}
    for name, t in state_dict.items():
        if name in index and t.is_floating_point():
            out[name] = map_param(t, index[name], pick).to(dtype or t.dtype)
        else:
            out[name] = t
    return out


def permutation_matrix(perm: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """One-hot ``(C, C)`` matrix moving unit ``perm[j]`` to position ``j``.

    Example:
        >>> permutation_matrix(torch.tensor([2, 0, 1]), torch.float32)
        tensor([[0., 1., 0.],
                [0., 0., 1.],
                [1., 0., 0.]])
    """
    c = perm.numel()
    mat = torch.zeros(c, c, dtype=dtype)
    mat[perm.long(), torch.arange(c)] = 1
    return mat


def random_permutations(
    spec: PermSpec, sizes: Mapping[str, int], generator: torch.Generator
) -> dict[str, Tensor]:
    """A random function-preserving permutation per group.

    Head groups move heads as wholes plus independent moves within each head; groups that
    share a ``link`` get the same head permutation (so Q·K and V·O stay paired).
    """
    head_perms: dict[str, Tensor] = {}
    perms: dict[str, Tensor] = {}
    for g in spec.groups:
        c, h = sizes[g.name], g.num_groups
        size = c // h
        if g.link is not None and g.link in head_perms:
            heads = head_perms[g.link]
        else:
            heads = torch.randperm(h, generator=generator)
            if g.link is not None:
                head_perms[g.link] = heads
        parts = [int(hd) * size + torch.randperm(size, generator=generator) for hd in heads]
        perms[g.name] = torch.cat(parts)
    return perms


def permute_state_dict(
    state_dict: Mapping[str, Tensor], spec: PermSpec, perms: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Move unit ``perms[g][j]`` of every group ``g`` to position ``j`` (exact: one-hot
    matrices)."""
    mats = {g: permutation_matrix(p) for g, p in perms.items()}
    return transform_state_dict(state_dict, spec, lambda m, g: mats.get(g))
