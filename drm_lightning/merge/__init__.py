"""The merge engine's core: plan every input, then merge tensor by tensor.

- :mod:`~drm_lightning.merge.plan`: the planner — every input checked against the base from
  metadata (names, shapes, dtypes, coefficients) before a weight is read, and each tensor's route.
- :mod:`~drm_lightning.merge.tensor`: one tensor merged (:func:`merge_tensor`), inputs and
  result checked; every whole-tensor merge goes through it.
- :mod:`~drm_lightning.merge.pieces`: a large tensor merged in row pieces.
- :mod:`~drm_lightning.merge.loop`: the planned tensors merged one at a time
  (:func:`iter_merge`, :func:`merge_state_dicts`).
- :mod:`~drm_lightning.merge.routing`: which route a tensor takes, from its name and shape.

Example:
    >>> import torch
    >>> from drm_lightning.merge import merge_state_dicts
    >>> from drm_lightning.methods import get_method
    >>> base = {"w": torch.zeros(2, 2)}
    >>> merged = merge_state_dicts(get_method("task_arithmetic"), base, [{"w": torch.ones(2, 2)}])
    >>> merged["w"].tolist()
    [[1.0, 1.0], [1.0, 1.0]]
"""

from drm_lightning.merge.loop import iter_merge, merge_state_dicts
from drm_lightning.merge.plan import PlannedTensor, plan_merge, validate_coefficients
from drm_lightning.merge.routing import Routing
from drm_lightning.merge.tensor import check_finite, merge_tensor, tensor_generator

__all__ = [
    "PlannedTensor",
    "Routing",
    "check_finite",
    "iter_merge",
    "merge_state_dicts",
    "merge_tensor",
    "plan_merge",
    "tensor_generator",
    "validate_coefficients",
]
