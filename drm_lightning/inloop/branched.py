"""K task branches of one backbone with per-task heads, as a plain ``nn.Module``."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

Features = Callable[[Any], Any]


def check_heads(backbone: Any, heads: Any) -> None:
    """Raise ``TypeError`` / ``ValueError`` for a backbone or heads a branched model cannot use."""
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"backbone must be an nn.Module, got {type(backbone).__name__}")
    if not isinstance(heads, Mapping) or not heads:
        raise ValueError("heads must be a non-empty mapping {task name: head module}")
    bad = [f"{name!r}" for name in heads if not isinstance(name, str) or not name or "." in name]
    bad += [
        f"{name!r} ({type(h).__name__})"
        for name, h in heads.items()
        if not isinstance(h, nn.Module)
    ]
    if bad:
        raise ValueError(
            "heads must map non-empty task names without '.' to nn.Module heads; invalid: "
            + ", ".join(bad)
        )


def check_features(features: Any) -> None:
    """Raise ``TypeError`` / ``ValueError`` for a ``features=`` a branched model cannot use.

    A module with weights is refused: they would be neither merged nor kept per task (a
    trainable pooling layer belongs in each head).
    """
    if features is None:
        return
    if not callable(features):
        raise TypeError(
            "features must be a callable from the backbone's output to the heads' input, got "
            f"{type(features).__name__}"
        )
    if isinstance(features, nn.Module) and (
        any(True for _ in features.parameters()) or any(True for _ in features.buffers())
    ):
        raise ValueError(
            f"features ({type(features).__name__}) holds weights, which would be neither merged "
            "nor kept per task; put a trainable pooling layer in each head"
        )


def backbone_features(output: Any) -> Any:
    """The heads' input from a backbone's output when no ``features=`` is given.

    A transformers ``ModelOutput`` (found by class, without importing transformers) gives its
    ``pooler_output`` when it has one (BERT-like encoders), else the first token of
    ``last_hidden_state`` (``[CLS]`` of an encoder; decoder-only models such as Llama attend
    causally, so pass ``features=`` there, e.g. the last token). Anything else — a tensor, a
    tuple — is passed to the heads as it is.

    Example:
        >>> import torch
        >>> backbone_features(torch.ones(2, 3)).shape
        torch.Size([2, 3])
    """
    if not any(cls.__name__ == "ModelOutput" for cls in type(output).__mro__):
        return output
    pooled = getattr(output, "pooler_output", None)
    if pooled is not None:
        return pooled
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is not None:
        return hidden[:, 0]
    raise TypeError(
        f"the backbone returned a {type(output).__name__} with neither pooler_output nor "
        f"last_hidden_state (fields: {list(output.keys())}); pass features= a callable from "
        "the backbone's output to the heads' input"
    )


def head_input(features: Features | None, output: Any) -> Any:
    """``features(output)``, or :func:`backbone_features` when ``features`` is ``None``."""
    return backbone_features(output) if features is None else features(output)


def split_batch(batch: Any, known: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """``[(task, batch), ...]`` from a ``{task: batch}`` mapping or a ``(task, batch)`` tuple.

    Example:
        >>> split_batch({"a": 1, "b": None}, {"a": 0, "b": 0})
        [('a', 1)]
    """
    if isinstance(batch, Mapping):
        items = [(task, b) for task, b in batch.items() if b is not None]
    elif isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], str):
        items = [(batch[0], batch[1])]
    else:
        raise TypeError(
            f"a branched model cannot route a batch of type {type(batch).__name__}: give a "
            "mapping {task: batch} (a dict of dataloaders) or a tuple (task, batch)"
        )
    unknown = [task for task, _ in items if task not in known]
    if unknown:
        raise KeyError(f"batch for unknown task(s) {unknown}; known tasks: {list(known)}")
    return items


class BranchedModel(nn.Module):
    """K copies of one backbone ("branches") with one head per task, and a frozen ``base``.

    The framework-free twin of :class:`~drm_lightning.lightning.BranchedModule` (same parameter
    names: ``base.*``, ``branches.<task>.*``, ``heads.<task>.*``), for raw loops such as the
    Accelerate hook's. ``branches[task]`` and ``heads[task]`` form the model of ``task``; the
    merge merges the branches against ``base``. Memory: K + 1 copies of the backbone.

    A transformers backbone works as it is: its output reaches the heads through
    :func:`backbone_features` (the pooled output, else the first token), or ``features=``.

    Args:
        backbone: The shared starting point, copied K + 1 times.
        heads: ``{task: head}``; task names must be valid ``nn.ModuleDict`` keys (no ``.``).
        features: ``features(backbone_output) -> head_input``; default
            :func:`backbone_features`. It must hold no weights.

    Example:
        >>> import torch
        >>> model = BranchedModel(nn.Linear(4, 8), {"a": nn.Linear(8, 2), "b": nn.Linear(8, 3)})
        >>> model(torch.zeros(5, 4), "b").shape
        torch.Size([5, 3])
        >>> model.task_names
        ['a', 'b']
    """

    def __init__(
        self,
        backbone: nn.Module,
        heads: Mapping[str, nn.Module],
        *,
        features: Features | None = None,
    ) -> None:
        super().__init__()
        check_heads(backbone, heads)
        check_features(features)
        self.task_names: list[str] = list(heads)
        self.base = copy.deepcopy(backbone).requires_grad_(False)
        self.branches = nn.ModuleDict({task: copy.deepcopy(backbone) for task in self.task_names})
        self.heads = nn.ModuleDict(dict(heads))
        self.features = features

    def forward(self, x: Any, task: str) -> Tensor:
        """Output of ``task``'s head on the features of ``task``'s branch."""
        return self.heads[task](head_input(self.features, self.branches[task](x)))

    def predict_task(self, task: str, batch: Any) -> tuple[Tensor, Tensor]:
        """``(preds, target)`` for the task's metrics; default ``(self(x, task), y)``."""
        x, y = batch
        return self(x, task), y

    def split_batch(self, batch: Any) -> list[tuple[str, Any]]:
        """``[(task, batch), ...]`` (see :func:`split_batch`)."""
        return split_batch(batch, self.heads)
