"""drm_lightning: model merging (DRM, TIES, DARE, task arithmetic) inside the training loop.

The names a user starts from; the Lightning and Accelerate front ends load only when used
(their frameworks are optional dependencies).

Example:
    >>> import torch, drm_lightning as dl
    >>> base = {"w": torch.zeros(4, 3)}
    >>> merged = dl.merge_state_dicts(dl.get_method("drm", drop_rate=0.5), base,
    ...                               [{"w": torch.randn(4, 3)}, {"w": torch.randn(4, 3)}])
    >>> merged["w"].shape
    torch.Size([4, 3])
"""

from __future__ import annotations

from typing import Any

from drm_lightning.distributed import DistributedMerger, merge_module_branches
from drm_lightning.merge.loop import merge_state_dicts
from drm_lightning.merge.routing import Routing
from drm_lightning.methods import available_methods, get_method
from drm_lightning.sources.writer import package_version

__version__ = package_version()  # from the installed metadata (pyproject.toml)

_LAZY = {
    "MergeCallback": "drm_lightning.lightning",
    "BranchedModule": "drm_lightning.lightning",
    "MergeHook": "drm_lightning.accelerate",
    "TaskSpec": "drm_lightning.evaluation",
}

__all__ = [
    "BranchedModule",
    "DistributedMerger",
    "MergeCallback",
    "MergeHook",
    "Routing",
    "TaskSpec",
    "__version__",
    "available_methods",
    "get_method",
    "merge_module_branches",
    "merge_state_dicts",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'drm_lightning' has no attribute {name!r}")
