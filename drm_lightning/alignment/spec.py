"""Permutation specs: which (parameter, axis) pairs move together when hidden units are permuted.

A :class:`PermGroup` is one set of hidden units ("zip units" in MuDSC). Its members are the
parameter axes indexed by those units: *producers* (``role="out"``, the group indexes the axis
that writes the units: a Linear's rows, a bias, a norm's scale) and *consumers*
(``role="in"``, the axis that reads them: the next Linear's columns). Permuting every member of
a group by the same permutation leaves the network's function unchanged. A :class:`PermSpec`
is the list of groups of one architecture; parameters in no group are averaged.

Head groups (attention heads, GroupNorm groups) set ``num_groups``: units may only move
within a group and groups move as wholes. Groups sharing a ``link`` (the Q·K and V·O groups
of one attention) are given the same head pairing.

Example (a spec declared by hand in a few lines):
    >>> spec = PermSpec.declare({
    ...     "h1": {"out": ["fc1.weight", "fc1.bias"], "in": ["fc2.weight"]},
    ...     "h2": {"out": ["fc2.weight", "fc2.bias"], "in": ["fc3.weight"]},
    ... })
    >>> [g.name for g in spec.groups], spec.groups[0].probes[0].module
    (['h1', 'h2'], 'fc2')
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import Tensor

Role = Literal["out", "in"]
Site = Literal["input", "output"]


@dataclass(frozen=True)
class Member:
    """One parameter axis of a group.

    Args:
        param: State-dict key of the parameter.
        axis: The axis indexed by the group's units.
        role: ``"out"`` for producers (merged with the merge matrix), ``"in"`` for consumers
            (mapped with the unmerge matrix; a merged unit's input weights are summed).
        ignore: Left out of the weight similarity, still transformed (BatchNorm running stats).
        block: ``(k, n)``: the member is the k-th of n equal blocks of the axis (fused QKV).
    """

    param: str
    axis: int = 0
    role: Role = "out"
    ignore: bool = False
    block: tuple[int, int] = (0, 1)


@dataclass(frozen=True)
class Probe:
    """Where a group's activations are read: a module's input or output.

    ``axis`` is the channel axis of that tensor (``None``: 1 for 3-D+ inputs of conv / norm
    layers, else the last axis); ``block`` selects the k-th of n equal blocks of the channels.
    """

    module: str
    site: Site = "input"
    axis: int | None = None
    block: tuple[int, int] = (0, 1)


@dataclass(frozen=True)
class PermGroup:
    """A set of hidden units permuted together (see the module docstring)."""

    name: str
    members: tuple[Member, ...]
    probes: tuple[Probe, ...] = ()
    num_groups: int = 1
    link: str | None = None

    def size(self, shapes: Mapping[str, Sequence[int]]) -> int:
        """Number of units, read from the first member's axis (checked by
        :meth:`PermSpec.check`)."""
        m = self.members[0]
        return int(shapes[m.param][m.axis]) // m.block[1]


@dataclass(frozen=True)
class PermSpec:
    """The permutation groups of one architecture.

    Build one with :func:`~drm_lightning.alignment.derive_spec` (traced from the module) or
    :meth:`declare` (by hand). :meth:`check` validates it against the models' state dicts.
    """

    groups: tuple[PermGroup, ...]
    notes: tuple[str, ...] = field(default=(), compare=False)

    def __getitem__(self, name: str) -> PermGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"no permutation group {name!r}; groups: {[g.name for g in self.groups]}")

    @classmethod
    def declare(cls, groups: Mapping[str, Mapping[str, Any]]) -> PermSpec:
        """A spec from a compact mapping ``{group: {"out": [...], "in": [...], ...}}``.

        Keys of each group: ``out`` (producers, axis 0 by default), ``in`` (consumers, axis 1
        by default), ``ignore`` (producers left out of the weight similarity), ``probe`` (a
        module name, or a list; default: the module of the last ``in`` member, read at its
        input), ``heads`` (``num_groups``) and ``link``. A member is ``"name"``,
        ``"name:axis"`` or a :class:`Member`.

        Example:
            >>> s = PermSpec.declare({"c": {"out": ["conv.weight"], "ignore": ["bn.running_mean"],
            ...                             "in": ["fc.weight"], "heads": 2}})
            >>> [(m.param, m.axis, m.role, m.ignore) for m in s.groups[0].members]
            ... # doctest: +NORMALIZE_WHITESPACE
            [('conv.weight', 0, 'out', False), ('bn.running_mean', 0, 'out', True),
             ('fc.weight', 1, 'in', False)]
        """
        out: list[PermGroup] = []
        for name, body in groups.items():
            unknown = sorted(set(body) - {"out", "in", "ignore", "probe", "heads", "link"})
            if unknown:
                raise ValueError(
                    f"group {name!r}: unknown key(s) {unknown}; "
                    "valid: out, in, ignore, probe, heads, link"
                )
            members = [_member(m, "out", False) for m in body.get("out", ())]
            members += [_member(m, "out", True) for m in body.get("ignore", ())]
            members += [_member(m, "in", False) for m in body.get("in", ())]
            if not members:
                raise ValueError(
                    f"group {name!r} has no members: give 'out' and/or 'in' parameters"
                )
            probe = body.get("probe")
            if probe is None:
                consumers = [m for m in members if m.role == "in"]
                probes = (Probe(_module_of(consumers[-1].param)),) if consumers else ()
            else:
                names = [probe] if isinstance(probe, (str, Probe)) else list(probe)
                probes = tuple(p if isinstance(p, Probe) else Probe(p) for p in names)
            out.append(
                PermGroup(name, tuple(members), probes, int(body.get("heads", 1)), body.get("link"))
            )
        return cls(tuple(out))

    def check(self, state_dicts: Sequence[Mapping[str, Tensor]]) -> dict[str, int]:
        """Validate the spec against N state dicts; return ``{group: units}``.

        Raises:
            ValueError: a listed parameter is missing, the models' shapes differ (different
                widths), a group's members disagree on the unit count, or a head count does
                not divide it. Every problem is listed at once.
        """
        problems: list[str] = []
        ref = state_dicts[0]
        keys = set(ref)
        for i, sd in enumerate(state_dicts[1:], start=1):
            if set(sd) != keys:
                extra, missing = sorted(set(sd) - keys)[:5], sorted(keys - set(sd))[:5]
                problems.append(
                    f"model {i} has different parameters than model 0 "
                    f"(extra {extra}, missing {missing})"
                )
                continue
            for k, v in sd.items():
                if tuple(v.shape) != tuple(ref[k].shape):
                    problems.append(
                        f"{k!r}: model {i} has shape {tuple(v.shape)}, "
                        f"model 0 {tuple(ref[k].shape)} "
                        "(models of different widths cannot be aligned unit for unit)"
                    )
        sizes: dict[str, int] = {}
        seen: dict[tuple[str, int, int], str] = {}
        for g in self.groups:
            counts = set()
            for m in g.members:
                if m.param not in ref:
                    problems.append(
                        f"group {g.name!r}: parameter {m.param!r} is not in the state dict"
                    )
                    continue
                shape = tuple(ref[m.param].shape)
                if not -len(shape) <= m.axis < len(shape) or shape[m.axis] % m.block[1]:
                    problems.append(
                        f"group {g.name!r}: {m.param!r} {shape} has no axis {m.axis} "
                        f"in {m.block[1]} block(s)"
                    )
                    continue
                counts.add(shape[m.axis] // m.block[1])
                slot = (m.param, m.axis % len(shape), m.block[0])
                if slot in seen and seen[slot] != g.name:
                    problems.append(
                        f"{m.param!r} axis {m.axis} is in groups {seen[slot]!r} and {g.name!r}"
                    )
                seen[slot] = g.name
            if len(counts) > 1:
                problems.append(
                    f"group {g.name!r}: members disagree on the number of units {sorted(counts)}"
                )
            elif counts:
                sizes[g.name] = counts.pop()
                if sizes[g.name] % g.num_groups:
                    problems.append(
                        f"group {g.name!r}: {g.num_groups} heads do not divide "
                        f"{sizes[g.name]} units"
                    )
        links: dict[str, tuple[str, int, int]] = {}
        for g in self.groups:
            if g.link is None or g.name not in sizes:
                continue
            shape = (g.name, sizes[g.name], g.num_groups)
            first = links.setdefault(g.link, shape)
            if first[1:] != shape[1:]:
                problems.append(
                    f"linked groups {first[0]!r} and {g.name!r} (link {g.link!r}) differ in units "
                    f"or heads: {first[1:]} vs {shape[1:]}"
                )
        if problems:
            raise ValueError("invalid permutation spec / models:\n  " + "\n  ".join(problems))
        return sizes

    def axes(self) -> dict[str, dict[int, list[tuple[Member, str]]]]:
        """``{param: {axis: [(member, group name), ...]}}`` (axes normalised to >= 0 later)."""
        index: dict[str, dict[int, list[tuple[Member, str]]]] = {}
        for g in self.groups:
            for m in g.members:
                index.setdefault(m.param, {}).setdefault(m.axis, []).append((m, g.name))
        return index


def _module_of(param: str) -> str:
    return param.rsplit(".", 1)[0] if "." in param else ""


def _member(item: str | Member, role: Role, ignore: bool) -> Member:
    if isinstance(item, Member):
        return item
    name, _, axis = item.partition(":")
    default = 1 if role == "in" else 0
    return Member(name, int(axis) if axis else default, role, ignore)
