"""Activation similarity from forward hooks, and the REPAIR-style BatchNorm reset.

:func:`activation_similarity` runs all N models on the same unlabelled batches, reads each
group's activations at its probes (a module's input or output) and streams them into one
:class:`~drm_lightning.alignment.similarity.CorrelationAccumulator` per group: memory does
not grow with the number of batches. Every spatial position and token is a sample; several
probes of one group (Q and K) are stacked as extra samples.

Example:
    >>> import torch
    >>> from drm_lightning.alignment.spec import PermSpec
    >>> nets = [torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    ...         for _ in range(2)]
    >>> spec = PermSpec.declare({"h": {"out": ["0.weight", "0.bias"], "in": ["2.weight"]}})
    >>> sims = activation_similarity(nets, spec, [torch.randn(16, 3) for _ in range(2)])
    >>> sims["h"].shape
    torch.Size([8, 8])
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from drm_lightning.alignment.similarity import CorrelationAccumulator
from drm_lightning.alignment.spec import PermSpec, Probe

Forward = Callable[[nn.Module, Any], Any]
"""``forward(model, batch)``: how one batch is fed to a model."""

_CHANNEL_FIRST = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
)


def default_forward(model: nn.Module, batch: Any) -> Any:
    """``model(batch[0])`` for an ``(inputs, target)`` pair or list, else ``model(batch)``."""
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    if isinstance(batch, dict):
        return model(**batch)
    return model(batch)


def _features(t: Tensor, probe: Probe, module: nn.Module) -> Tensor:
    axis = probe.axis
    if axis is None:
        axis = 1 if t.dim() >= 3 and isinstance(module, _CHANNEL_FIRST) else -1
    moved = torch.movedim(t, axis, -1)
    k, n = probe.block
    moved = torch.chunk(moved, n, dim=-1)[k]
    return moved.reshape(-1, moved.shape[-1])


def activation_similarity(
    models: Sequence[nn.Module],
    spec: PermSpec,
    batches: Iterable[Any],
    *,
    forward: Forward = default_forward,
    groups: Sequence[str] | None = None,
) -> dict[str, Tensor]:
    """``{group: (N·C, N·C) activation correlation}`` over all samples of ``batches``.

    Models run in eval mode under ``no_grad``; their modes are restored afterwards.

    Raises:
        ValueError: a probe names a missing module, a probe's width differs from the
            group's, or an activation is NaN/Inf (the group, probe, model and batch named).

    Warns:
        UserWarning: a group saw fewer samples than it has units (N·C): its correlation
            matrix is rank-deficient and the matching partly arbitrary.
    """
    wanted = [g for g in spec.groups if groups is None or g.name in groups]
    missing = [g.name for g in wanted if not g.probes]
    if missing:
        raise ValueError(
            f"group(s) {missing} have no activation probe: declare 'probe' (a module whose input "
            "carries the units) or use a weight-only method"
        )
    n = len(models)
    current: list[dict[str, list[Tensor]]] = [{} for _ in models]
    handles = []
    for i, model in enumerate(models):
        named = dict(model.named_modules())
        for g in wanted:
            for p in g.probes:
                if p.module not in named:
                    raise ValueError(
                        f"group {g.name!r}: probe module {p.module!r} is not in model {i}"
                    )
                module = named[p.module]

                def hook(mod, args, out=None, *, _i=i, _g=g.name, _p=p):
                    t = (
                        args[0]
                        if _p.site == "input"
                        else (out[0] if isinstance(out, (tuple, list)) else out)
                    )
                    current[_i].setdefault(_g, []).append(_features(t, _p, mod))

                if p.site == "input":
                    handles.append(module.register_forward_pre_hook(hook))
                else:
                    handles.append(module.register_forward_hook(hook))
    accs: dict[str, CorrelationAccumulator] = {}
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        with torch.no_grad():
            for b, batch in enumerate(batches):
                for store in current:
                    store.clear()
                for model in models:
                    forward(model, batch)
                for g in wanted:
                    per_model = []
                    for i in range(n):
                        x = torch.cat(current[i].get(g.name, []) or [torch.empty(0, 0)], dim=0)
                        if not torch.isfinite(x).all():
                            raise ValueError(
                                f"non-finite activations in group {g.name!r} (probe "
                                f"{[p.module for p in g.probes]}) of model {i} on batch {b}: "
                                "check the inputs and the model for NaN/Inf"
                            )
                        per_model.append(x)
                    rows = {x.shape for x in per_model}
                    if len(rows) != 1:
                        raise ValueError(
                            f"group {g.name!r}: the models gave activations of shapes "
                            f"{sorted(rows)}"
                        )
                    joint = torch.cat(per_model, dim=1)
                    acc = accs.setdefault(g.name, CorrelationAccumulator(joint.shape[1]))
                    if joint.shape[1] != acc.features:
                        raise ValueError(f"group {g.name!r}: probe width changed between batches")
                    acc.update(joint)
    finally:
        for h in handles:
            h.remove()
        for m, mode in zip(models, modes):
            m.train(mode)
    out = {}
    for g in wanted:
        if g.name not in accs:
            raise ValueError(
                f"group {g.name!r}: no activations reached probe(s) {[p.module for p in g.probes]}"
            )
        acc = accs[g.name]
        if acc.count < acc.features:
            warnings.warn(
                f"group {g.name!r}: {acc.count} activation samples for {acc.features} units "
                "(N models x C): the correlation is rank-deficient; pass more batches",
                stacklevel=2,
            )
        out[g.name] = acc.correlation()
    return out


def reset_batchnorm(
    model: nn.Module, batches: Iterable[Any], *, forward: Forward = default_forward
) -> int:
    """Recompute every BatchNorm's running statistics from ``batches`` (REPAIR-style reset).

    Sets ``momentum=None`` (cumulative average), resets the statistics, runs one pass in
    train mode under ``no_grad``, then restores momentum and mode. Returns the number of
    BatchNorm layers reset (0: nothing to do, e.g. LayerNorm/GroupNorm nets).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        >>> x = torch.randn(32, 3)
        >>> reset_batchnorm(net, [x])
        1
        >>> bool(torch.allclose(net[1].running_mean, net[0](x).mean(0).detach()))
        True
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    mode = model.training
    for m in norms:
        m.momentum = None
        m.reset_running_stats()
    model.train()
    try:
        with torch.no_grad():
            for batch in batches:
                forward(model, batch)
    finally:
        for m, mom in zip(norms, momenta):
            m.momentum = mom
        model.train(mode)
    return len(norms)
