"""Per-task evaluation with torchmetrics, shared by the Lightning callback and the demo.

Example:
    >>> import torch
    >>> from torchmetrics.classification import MulticlassAccuracy
    >>> from drm_lightning.evaluation import TaskSpec, evaluate_task
    >>> data = [(torch.eye(3), torch.arange(3))]
    >>> spec = TaskSpec(data, {"acc": MulticlassAccuracy(num_classes=3)})
    >>> evaluate_task(torch.nn.Identity(), "diag", spec)
    {'acc': 1.0}
"""

from drm_lightning.evaluation.tasks import (
    PredictFn,
    TaskSpec,
    as_predictions,
    default_predict,
    evaluate_task,
    evaluate_tasks,
    summarize_scores,
)

__all__ = [
    "PredictFn",
    "TaskSpec",
    "as_predictions",
    "default_predict",
    "evaluate_task",
    "evaluate_tasks",
    "summarize_scores",
]
