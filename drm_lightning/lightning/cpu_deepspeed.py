"""DeepSpeed ZeRO-3 under Lightning on CPU ranks: the testing route.

Lightning's ``DeepSpeedStrategy`` refuses the CPU accelerator ("The DeepSpeed strategy is only
supported on CUDA GPUs"). :class:`CPUDeepSpeedStrategy` lifts that check so that a ZeRO-3 fit,
and :class:`~drm_lightning.lightning.MergeCallback` inside it, runs on CPU processes over gloo:
for tests, CI and trying a configuration out. Real runs use Lightning's own strategy on GPUs
(``strategy="deepspeed_stage_3"``).
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy`` on the CPU accelerator (default ZeRO stage 3, gloo).

    For testing: ``Trainer(accelerator="cpu", devices=2, strategy=CPUDeepSpeedStrategy())``.
    Real runs use Lightning's own strategy on GPUs. Every argument is ``DeepSpeedStrategy``'s;
    what differs:

    * ``DS_ACCELERATOR=cpu`` is set (if unset) before DeepSpeed is imported, and setup refuses
      an accelerator other than DeepSpeed's CPU one or Lightning's ``CPUAccelerator``;
    * the process group is gloo (the only backend accepted) and ranks are CPU devices;
    * DeepSpeed's ``deepspeed_shm_comm`` op is not built: ``deepspeed.init_distributed`` would
      JIT-compile it (about 95 s, once per machine) and gloo does not use it;
    * precision is the Trainer's; fp32 (the default ``"32-true"``) is the tested one.

    Parameters with fewer elements than ``stage3_param_persistence_threshold`` (DeepSpeed's
    default: 100000) stay whole on every rank; for partitioned toy models pass a config with
    ``"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}``.
    """

    def __init__(self, *args: Any, stage: int = 3, **kwargs: Any) -> None:
        backend = kwargs.setdefault("process_group_backend", "gloo")
        if backend != "gloo":
            raise ValueError(
                f"CPUDeepSpeedStrategy: process_group_backend must be 'gloo' (CPU ranks), "
                f"got {backend!r}"
            )
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        super().__init__(*args, stage=stage, **kwargs)

    def setup_environment(self) -> None:
        """Check the accelerators, then DDP's environment setup (skipping the CUDA-only check)."""
        if not isinstance(self.accelerator, CPUAccelerator):
            raise RuntimeError(
                "CPUDeepSpeedStrategy runs on the CPU accelerator only, got "
                f"{type(self.accelerator).__name__}; on GPUs use Lightning's DeepSpeedStrategy "
                "(strategy='deepspeed_stage_3')"
            )
        from deepspeed.accelerator import get_accelerator

        name = get_accelerator().device_name()
        if name != "cpu":
            raise RuntimeError(
                f"CPUDeepSpeedStrategy: DeepSpeed selected the {name!r} accelerator; set "
                "DS_ACCELERATOR=cpu before deepspeed is first imported"
            )
        DDPStrategy.setup_environment(self)

    @property
    def root_device(self) -> torch.device:
        """``cpu:<local rank>``: ``deepspeed.initialize`` reads the device index as the rank."""
        return torch.device("cpu", self.local_rank)

    def setup_distributed(self) -> None:
        """Lightning's, without the device-index check (CPU devices have none) and without
        building DeepSpeed's shm op."""
        comm = importlib.import_module("deepspeed.comm.torch")  # a module named like torch
        if hasattr(comm, "build_shm_op"):
            comm.build_shm_op = lambda: None
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()
