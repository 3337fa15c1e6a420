"""Accelerate integration: merge task branches inside a raw ``accelerate`` training loop.

* :class:`MergeHook` — a ``LocalSGD``-shaped context manager: ``step()`` after every
  ``optimizer.step()``; merges on a schedule through the in-loop core
  (:mod:`drm_lightning.inloop`), scores every task, logs through ``accelerator.log``.

Example:
    >>> from drm_lightning.accelerate import MergeHook
    >>> MergeHook.__name__
    'MergeHook'
"""

from drm_lightning.accelerate.hook import SUPPORTED, MergeHook, check_accelerator

__all__ = ["SUPPORTED", "MergeHook", "check_accelerator"]
