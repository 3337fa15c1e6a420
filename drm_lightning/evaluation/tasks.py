"""Score a model on named tasks: each task has a validation dataloader and torchmetrics metric(s).

The functions here hold no state between calls: :class:`TaskSpec` describes a task,
:func:`evaluate_task` runs one task, :func:`evaluate_tasks` runs several, and
:func:`summarize_scores` turns merged and per-branch scores into the flat
``merged/<task>/<metric>`` dictionary that the Lightning callback logs.

Under ``torch.distributed`` (DDP), pass ``shard=(rank, world_size)``: each rank scores every
``world_size``-th batch and torchmetrics synchronises the metric states on ``compute()``, so
every rank returns the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection

PredictFn = Callable[[nn.Module, str, Any], tuple[Tensor, Tensor]]
"""``predict(module, task, batch) -> (preds, target)``, the arguments of ``metric.update``."""

MetricsLike = Metric | MetricCollection | Mapping[str, Metric]


def default_predict(module: nn.Module, task: str, batch: Any) -> tuple[Tensor, Tensor]:
    """Predictions and targets for one batch.

    Calls ``module.predict_task(task, batch)`` when the module defines it (as
    :class:`~drm_lightning.lightning.BranchedModule` does); otherwise unpacks ``(x, y) = batch``
    and returns ``(module(x), y)``.

    Example:
        >>> preds, target = default_predict(nn.Identity(), "any",
        ...                                 (torch.ones(2, 3), torch.zeros(2)))
        >>> tuple(preds.shape), tuple(target.shape)
        ((2, 3), (2,))
    """
    predict_task = getattr(module, "predict_task", None)
    if callable(predict_task):
        return predict_task(task, batch)
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(
            f"task {task!r}: cannot split the batch ({type(batch).__name__}) "
            "into (inputs, target); "
            "define predict_task(task, batch) on the module or pass TaskSpec(predict=...)"
        )
    x, y = batch
    return module(x), y


def _as_collection(metrics: MetricsLike) -> MetricCollection:
    if isinstance(metrics, MetricCollection):
        return metrics
    if isinstance(metrics, Metric):
        return MetricCollection([metrics])
    if isinstance(metrics, Mapping):
        bad = [
            f"{k!r}: {type(v).__name__}" for k, v in metrics.items() if not isinstance(v, Metric)
        ]
        if bad:
            raise TypeError(f"metrics must be torchmetrics.Metric objects; got {', '.join(bad)}")
        if not metrics:
            raise ValueError("metrics is an empty mapping; give at least one torchmetrics.Metric")
        return MetricCollection(dict(metrics))
    raise TypeError(
        "metrics must be a torchmetrics Metric, a MetricCollection or a mapping of names to "
        f"Metrics, got {type(metrics).__name__}"
    )


@dataclass
class TaskSpec:
    """One task to score: its validation data, its metric(s), and how to get predictions.

    Args:
        dataloader: An iterable of batches (usually a ``DataLoader``), a zero-argument
            callable returning one (called at every evaluation), or the name (``str``) or
            index (``int``) of one of the validation dataloaders the training framework knows
            (a Lightning datamodule's ``val_dataloader()``), resolved by the front end with
            :meth:`resolve` — so that a task can be written in a config file.
        metrics: A torchmetrics ``Metric``, a ``MetricCollection`` or a mapping
            ``{name: Metric}``. A single metric is named after its class, as in
            ``MetricCollection`` (``merged/a/MulticlassAccuracy``), unless ``name`` is given.
            The metric objects are reset before and after each evaluation.
        predict: ``predict(module, task, batch) -> (preds, target)``; default
            :func:`default_predict`.
        primary: Name of the metric used for averages across tasks; default the first one.
            Higher must mean better for the normalised score (merged ÷ branch) to make sense.
        name: The name of a single ``Metric`` in the log keys (``merged/<task>/<name>``);
            a collection or mapping names its metrics itself.

    Example:
        >>> from torchmetrics.classification import MulticlassAccuracy
        >>> spec = TaskSpec([], MulticlassAccuracy(num_classes=2))
        >>> spec.metric_names, spec.primary_name
        (['MulticlassAccuracy'], 'MulticlassAccuracy')
        >>> TaskSpec([], MulticlassAccuracy(num_classes=2), name="acc").metric_names
        ['acc']
    """

    dataloader: Iterable[Any] | Callable[[], Iterable[Any]] | str | int | None
    metrics: MetricsLike | None
    predict: PredictFn | None = None
    primary: str | None = None
    name: str | None = None
    collection: MetricCollection = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.dataloader is None:
            raise ValueError("TaskSpec.dataloader is None; give the task's validation dataloader")
        if self.metrics is None:
            raise ValueError("TaskSpec.metrics is None; give at least one torchmetrics.Metric")
        metrics = self.metrics
        if self.name is not None:
            if not isinstance(self.name, str) or not self.name or "/" in self.name:
                raise ValueError(
                    f"TaskSpec.name={self.name!r}: give a non-empty metric name without '/' "
                    "(it is the last part of merged/<task>/<name>)"
                )
            if not isinstance(metrics, Metric):
                raise TypeError(
                    "TaskSpec.name names a single Metric; a MetricCollection or a mapping "
                    f"names its metrics itself (got {type(metrics).__name__})"
                )
            metrics = {self.name: metrics}
        self.collection = _as_collection(metrics)
        if self.primary is not None and self.primary not in self.metric_names:
            raise ValueError(
                f"TaskSpec.primary={self.primary!r} is not one of the metric names "
                f"{self.metric_names}"
            )
        if self.predict is not None and not callable(self.predict):
            raise TypeError(f"TaskSpec.predict must be callable, got {type(self.predict).__name__}")

    @property
    def metric_names(self) -> list[str]:
        """The metric names, in order: the keys of ``merged/<task>/<metric>``."""
        return list(self.collection.keys())

    @property
    def primary_name(self) -> str:
        """The metric averaged across tasks."""
        return self.primary or self.metric_names[0]

    @property
    def reference(self) -> str | int | None:
        """The dataloader's name or index when it still has to be :meth:`resolve`-d, else
        ``None``."""
        loader = self.dataloader
        if isinstance(loader, (str, int)) and not isinstance(loader, bool):
            return loader
        return None

    def resolve(self, loaders: Any) -> None:
        """Bind a named or indexed dataloader to one of ``loaders`` (a mapping, a sequence or one
        loader).

        Raises:
            ValueError: the name or index is not among ``loaders`` (the valid ones are listed).

        Example:
            >>> from torchmetrics.regression import MeanSquaredError
            >>> spec = TaskSpec("b", MeanSquaredError())
            >>> spec.resolve({"a": [1], "b": [2]})
            >>> spec.dataloader
            [2]
        """
        ref = self.reference
        if ref is None:
            return
        if loaders is None:
            raise ValueError(
                f"TaskSpec(dataloader={ref!r}) names a validation dataloader, but there is none"
            )
        if isinstance(loaders, Mapping):
            keys: list[Any] = list(loaders)
            if isinstance(ref, int) and ref not in loaders and 0 <= ref < len(keys):
                ref = keys[ref]
            if ref not in loaders:
                raise ValueError(
                    f"TaskSpec(dataloader={ref!r}): no validation dataloader of that name; "
                    f"have {keys}"
                )
            self.dataloader = loaders[ref]
            return
        seq = list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]
        if not isinstance(ref, int) or not 0 <= ref < len(seq):
            raise ValueError(
                f"TaskSpec(dataloader={ref!r}): the validation dataloaders are a sequence of "
                f"{len(seq)}; give an index 0..{len(seq) - 1}"
            )
        self.dataloader = seq[ref]

    def batches(self) -> Iterable[Any]:
        """The validation batches (calls ``dataloader`` if it is a factory)."""
        loader = self.dataloader
        if self.reference is not None:
            raise ValueError(
                f"TaskSpec(dataloader={loader!r}) names a validation dataloader that was never "
                "resolved; the Lightning callback resolves it from the datamodule at setup"
            )
        if callable(loader) and not hasattr(loader, "__iter__"):
            loader = loader()
        assert loader is not None
        return loader


def _to_device(batch: Any, device: torch.device | None) -> Any:
    """``batch`` with every tensor moved to ``device`` (mappings, sequences and objects with
    ``.to``)."""
    if device is None:
        return batch
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        moved = {k: _to_device(v, device) for k, v in batch.items()}
        try:
            return type(batch)(moved)  # dict, OrderedDict, transformers BatchEncoding
        except TypeError:
            return moved
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    to = getattr(batch, "to", None)
    return to(device) if callable(to) else batch


def as_predictions(output: Any) -> Any:
    """The tensor a metric takes from a model output: ``.logits`` of a transformers ``ModelOutput``.

    Tensors pass through; objects with a ``logits`` attribute (``SequenceClassifierOutput``, ...)
    and mappings with a ``"logits"`` key give their logits; anything else is returned as is.

    Example:
        >>> from types import SimpleNamespace
        >>> as_predictions(SimpleNamespace(loss=None, logits=torch.ones(2, 3))).shape
        torch.Size([2, 3])
        >>> as_predictions({"logits": torch.zeros(1)}).tolist()
        [0.0]
    """
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    logits = getattr(output, "logits", None)
    return logits if logits is not None else output


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode inside the block; on exit ``module.train(was_training)`` as before.

    Switches nothing when every submodule is already in eval mode (``train(False)`` would
    change nothing then), so an outer ``eval_mode`` around many evaluations makes the inner
    ones cost one traversal instead of two recursive mode switches each.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
        >>> with eval_mode(net):
        ...     net[1].training
        False
        >>> net[1].training
        True
    """
    if not any(m.training for m in module.modules()):
        yield
        return
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _on_device(collection: MetricCollection, device: torch.device) -> MetricCollection:
    """``collection`` moved to ``device`` (no ``.to`` walk when every metric is already there)."""
    if all(
        m.device == device for m in collection.modules() if isinstance(m, Metric)
    ):  # no compute-group side effects
        return collection
    return collection.to(device)


def _scalar(task: str, name: str, value: Any) -> float:
    tensor = torch.as_tensor(value)
    if tensor.numel() != 1:
        raise ValueError(
            f"task {task!r}: metric {name!r} returned a tensor of shape {tuple(tensor.shape)}; "
            "only scalar metrics can be logged (use average='macro' or similar)"
        )
    return float(tensor.item())


def evaluate_task(
    module: nn.Module,
    task: str,
    spec: TaskSpec,
    *,
    device: torch.device | str | None = None,
    shard: tuple[int, int] | None = None,
    pad_to: int | None = None,
    per_rank: bool = False,
    batches: Iterable[Any] | None = None,
) -> dict[str, float]:
    """Score ``module`` on one task; returns ``{metric_name: value}``.

    The module is put in eval mode under ``torch.no_grad()`` and its previous mode restored.

    Args:
        module: The model; called through ``spec.predict`` (default :func:`default_predict`).
        task: The task name passed to ``predict``.
        spec: The task's data and metrics.
        device: Where batches and metrics go; default the device of the module's first parameter.
        shard: ``(rank, world_size)``: score only batches ``i`` with ``i % world_size == rank``.
            Metric states are synchronised by torchmetrics on ``compute()``, so every rank must
            call this function for the same tasks in the same order.
        pad_to: After scoring, run forwards on the last batch (not scored) until this many
            batches were seen: ranks whose own dataloaders differ in length then run the same
            number of forwards (needed when forwards are collective, as under ZeRO-3).
        per_rank: The dataloader is this rank's own share (e.g. prepared by Accelerate): every
            batch is scored, torchmetrics combines the ranks on ``compute()``, and an empty share
            is allowed (the other ranks' batches make the score).
        batches: The batches to score instead of ``spec.batches()`` (e.g. a
            :class:`~drm_lightning.evaluation.replay.ReplayBatches` over them).

    The module's output may be a tensor or a transformers ``ModelOutput`` (its ``.logits`` are
    scored, see :func:`as_predictions`).

    Raises:
        ValueError: the dataloader yielded no batch, or a metric is not a scalar.

    Example:
        >>> from torchmetrics.regression import MeanSquaredError
        >>> spec = TaskSpec([(torch.zeros(4), torch.ones(4))], {"mse": MeanSquaredError()})
        >>> evaluate_task(nn.Identity(), "regress", spec)
        {'mse': 1.0}
    """
    if device is None:
        first = next(iter(module.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    predict = spec.predict or default_predict
    loader = spec.batches() if batches is None else batches
    if shard is not None:
        length = loader_length(loader)
        if length is None or length < shard[1]:
            shard = None  # too few batches to split: every rank scores everything
    collection = _on_device(spec.collection, device)
    collection.reset()
    seen = 0
    last: Any = None
    try:
        with eval_mode(module), torch.no_grad():
            for index, batch in enumerate(loader):
                if shard is not None and index % shard[1] != shard[0]:
                    continue
                preds, target = predict(module, task, _to_device(batch, device))
                collection.update(as_predictions(preds), target)
                seen += 1
                last = batch
            # Ranks with fewer batches repeat forwards without scoring them, so that collective
            # forwards (ZeRO-3 gathers) run as often on every rank.
            for _ in range(max(0, (pad_to or 0) - seen)):
                if last is None:  # pragma: no cover - needs an empty ZeRO-3 rank
                    raise ValueError(
                        f"task {task!r}: this rank's validation dataloader is empty "
                        f"but other ranks have {pad_to} batches; "
                        "under ZeRO-3 every rank needs at least one batch"
                    )
                predict(module, task, _to_device(last, device))
        if seen == 0 and shard is None and not per_rank:
            raise ValueError(f"task {task!r}: the validation dataloader yielded no batches")
        values = collection.compute()
    finally:
        collection.reset()
    return {name: _scalar(task, name, value) for name, value in values.items()}


def loader_length(loader: Any) -> int | None:
    """``len(loader)``, or ``None`` when it has no length (an iterable dataset, a generator)."""
    try:
        return len(loader)
    except TypeError:
        return None


def evaluate_tasks(
    module: nn.Module,
    tasks: Mapping[str, TaskSpec],
    *,
    device: torch.device | str | None = None,
    shard: tuple[int, int] | None = None,
) -> dict[str, dict[str, float]]:
    """Score ``module`` on every task; returns ``{task: {metric: value}}``.

    Example:
        >>> from torchmetrics.regression import MeanSquaredError
        >>> tasks = {"a": TaskSpec([(torch.zeros(2), torch.zeros(2))], {"mse": MeanSquaredError()})}
        >>> evaluate_tasks(nn.Identity(), tasks)
        {'a': {'mse': 0.0}}
    """
    return {
        task: evaluate_task(module, task, spec, device=device, shard=shard)
        for task, spec in tasks.items()
    }


def summarize_scores(
    merged: Mapping[str, Mapping[str, float]],
    branch: Mapping[str, Mapping[str, float]] | None = None,
    *,
    primary: Mapping[str, str] | None = None,
) -> dict[str, float]:
    """Flatten scores into the names the callback logs.

    Keys: ``merged/<task>/<metric>``, ``branch/<task>/<metric>``,
    ``normalized/<task>/<metric>`` (merged ÷ branch, when the branch score is non-zero), and
    ``merged/average``, ``branch/average``, ``normalized/average``: means over tasks of each
    task's primary metric (default: its first metric).

    Args:
        merged: ``{task: {metric: value}}`` for the merged model.
        branch: The same for each task's own branch (may miss tasks).
        primary: ``{task: metric name}`` used for the averages.

    Example:
        >>> out = summarize_scores({"a": {"acc": 0.8}, "b": {"acc": 0.6}},
        ...                        {"a": {"acc": 1.0}, "b": {"acc": 0.6}})
        >>> out["merged/average"], out["normalized/a/acc"], out["normalized/average"]
        (0.7, 0.8, 0.9)
    """
    branch = branch or {}
    primary = primary or {}
    out: dict[str, float] = {}
    merged_primary: list[float] = []
    branch_primary: list[float] = []
    normalized_primary: list[float] = []
    for task, scores in merged.items():
        main = primary.get(task) or next(iter(scores))
        own = branch.get(task, {})
        for name, value in scores.items():
            out[f"merged/{task}/{name}"] = value
            if name in own:
                out[f"branch/{task}/{name}"] = own[name]
                if own[name] != 0 and math.isfinite(own[name]):
                    out[f"normalized/{task}/{name}"] = value / own[name]
        merged_primary.append(scores[main])
        if main in own:
            branch_primary.append(own[main])
        if f"normalized/{task}/{main}" in out:
            normalized_primary.append(out[f"normalized/{task}/{main}"])
    for prefix, values in (
        ("merged", merged_primary),
        ("branch", branch_primary),
        ("normalized", normalized_primary),
    ):
        if values:
            out[f"{prefix}/average"] = math.fsum(values) / len(values)
    return out
