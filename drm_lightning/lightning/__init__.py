"""Lightning integration: merge task branches inside ``Trainer.fit``.

* :class:`MergeCallback` — merges live branches, snapshots or checkpoints on a schedule and
  scores the merged model on every task.
* :class:`BranchedModule` — K branches of one backbone with per-task heads, trained side by side.
* :class:`CPUDeepSpeedStrategy` — DeepSpeed ZeRO-3 on CPU ranks (gloo): the testing route.

Example:
    >>> from drm_lightning.lightning import MergeCallback
    >>> MergeCallback("drm", every_n_epochs=1).should_merge(epoch_idx=0)
    True
"""

from drm_lightning.lightning.branched import BranchedModule
from drm_lightning.lightning.callback import MergeCallback
from drm_lightning.lightning.cpu_deepspeed import CPUDeepSpeedStrategy

__all__ = ["BranchedModule", "CPUDeepSpeedStrategy", "MergeCallback"]
