r"""Merge task branches inside an Accelerate training loop, in the shape of ``LocalSGD``."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from drm_lightning.evaluation import TaskSpec
from drm_lightning.inloop import MergeOptions
from drm_lightning.inloop.alpha import AlphaGridArg
from drm_lightning.inloop.backends import gloo_group
from drm_lightning.inloop.options import BranchesArg, PathLike
from drm_lightning.merge.routing import Routing
from drm_lightning.methods import MergeMethod

Predicate = Callable[[int | None, int | None], bool]
SUPPORTED = (
    "NO (one process), MULTI_CPU, MULTI_GPU (DDP) and DEEPSPEED (ZeRO-3; ZeRO-1/2 with adopt=False)"
)
logger = logging.getLogger(__name__)


class MergeHook:
    r"""Merge task branches on a schedule inside an Accelerate loop; score the merge on every task.

    Used like ``accelerate.local_sgd.LocalSGD``: a context manager around the loop, with
    ``enabled=`` to switch it off, :meth:`step` called after every ``optimizer.step()``, and the
    final work on exit. On schedule (:meth:`should_merge`: ``every_n_steps`` /
    ``every_n_epochs``, or ``should_merge=`` a predicate ``(step_idx, epoch_idx) -> bool``) it
    merges through the in-loop core (:class:`~drm_lightning.inloop.MergeCore`, every merge one
    call to :class:`~drm_lightning.distributed.DistributedMerger`), scores every task of
    ``tasks``, logs the scores through ``accelerator.log`` and one line on the main process
    (to the ``drm_lightning.accelerate.hook`` logger when it is enabled for ``INFO``, else
    printed by ``accelerator.print``: visible without configuring logging), then swaps the live
    weights back or, with ``adopt=True``, keeps the merge. On exit it warns if it never merged,
    writes the last merge to ``export_dir`` as a Hugging Face folder, and with
    ``final_weights="merged"`` leaves the merged weights in the model.

    Branches (``branches=``), as for the Lightning callback: ``"live"`` — the model holds
    ``base``, ``branches[task]`` and ``heads[task]``
    (:class:`~drm_lightning.inloop.BranchedModel`); ``"snapshots"`` — copies of the live model
    taken by :meth:`snapshot` or every ``snapshot_every_n_steps``; a list or ``{task: path}`` of
    checkpoints merged with the live model. Task-specific tensors of a single model are those
    ``routing`` ignores.

    Distributed types: ``NO``, ``MULTI_CPU``, ``MULTI_GPU`` (DDP: every rank merges its share,
    merged weights are identical on every rank) and ``DEEPSPEED`` ZeRO-3 (merged on the
    partitions, never gathered; ZeRO-1/2 only with ``adopt=False``); every other type is refused
    with ``NotImplementedError``. Call every method on every rank.

    Evaluation data: a plain dataloader is shared out by batch index (every rank holds all of
    it); a dataloader prepared by ``accelerator.prepare`` is each rank's own share, and shares
    of different lengths never hang — torchmetrics reduces once per task and, under ZeRO-3,
    shorter ranks **pad** with unscored forwards on their last batch (prepare with
    ``even_batches=True``, Accelerate's default, to have no uneven shares at all).

    Checkpoints: ``accelerator.register_for_checkpointing(hook)`` makes ``save_state`` /
    ``load_state`` round-trip the counters, the history and (single-model branches) the base and
    the snapshots exactly; a save while merged weights are swapped in is refused.

    Args:
        accelerator: The ``Accelerator``.
        model: The model returned by ``accelerator.prepare`` (refused otherwise).
        method: A method name or a :class:`~drm_lightning.methods.MergeMethod`.
        tasks: ``{task: TaskSpec}`` scored at every merge.
        branches: ``"live"``, ``"snapshots"``, checkpoint paths or ``{task: path}``.
        every_n_steps: Merge after every n-th optimizer step.
        every_n_epochs: Merge after every n-th epoch (call :meth:`end_epoch`).
        should_merge: A predicate replacing the periodic schedule.
        snapshot_every_n_steps: Capture a snapshot every n-th optimizer step.
        adopt: Make the merged weights the live weights after each merge.
        include_live: Merge the live model too (default: with checkpoints).
        live_task: Task label of the live model.
        base: The merge base of a single model (path or state dict; default: weights at entry).
        routing: Which tensors are merged and which stay per task.
        coefficients: Per-branch weights (branch order) or ``{task: weight}``.
        compute_dtype: dtype of the merge arithmetic.
        seed: Seed of random methods; merge *i* uses ``seed + i``.
        evaluate_branches: Also score each task's own branch.
        export_dir: Write the last merge there on exit (not under ZeRO-3).
        final_weights: ``"live"`` or ``"merged"`` (adopt the last merge on exit).
        method_params: Parameters of ``method`` given by name.
        trust_pickles: Allow full unpickling of base / checkpoint files.
        enabled: ``False`` turns every call into a no-op (the loop runs unchanged).
        alpha_grid: Search the scale α of the merged delta at every merge (a list of α > 0 or
            ``"default"``: 0.1, …, 1.0): one merge, ``base + α·Δ`` scored on ``tasks`` for each
            α, the best ``merged/average`` kept (a tie: the smaller α) and logged as ``alpha``
            with every α's ``alpha/<α>/…`` scores; kept in :meth:`state_dict`. As for the
            callback (``MergeCallback(alpha_grid=)``).

    Example:
        >>> from accelerate import Accelerator
        >>> from drm_lightning.inloop import BranchedModel
        >>> accelerator = Accelerator(cpu=True)
        >>> model = BranchedModel(nn.Linear(4, 8), {"a": nn.Linear(8, 2), "b": nn.Linear(8, 2)})
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> model, optimizer = accelerator.prepare(model, optimizer)
        >>> hook = MergeHook(
        ...     accelerator, model, "ties", method_params={"density": 0.5}, every_n_steps=2
        ... )
        >>> with hook:
        ...     for _ in range(4):
        ...         loss = sum(model(torch.randn(3, 4), t).pow(2).mean() for t in "ab")
        ...         accelerator.backward(loss)
        ...         optimizer.step()
        ...         optimizer.zero_grad()
        ...         _ = hook.step()
        MergeHook: merge 1 at step 2 (epoch 0): ties of 2 branches ['a', 'b'] in ... s ...
        MergeHook: merge 2 at step 4 (epoch 0): ties of 2 branches ['a', 'b'] in ... s ...
        >>> [record["step"] for record in hook.history]
        [2, 4]
    """

    def __init__(
        self,
        accelerator: Any,
        model: nn.Module,
        method: str | MergeMethod = "drm",
        *,
        tasks: Mapping[str, TaskSpec] | None = None,
        branches: BranchesArg = "live",
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        should_merge: Predicate | None = None,
        snapshot_every_n_steps: int | None = None,
        adopt: bool = False,
        include_live: bool | None = None,
        live_task: str | None = None,
        base: PathLike | Mapping[str, Tensor] | None = None,
        routing: Routing | None = None,
        coefficients: Sequence[float] | Mapping[str, float] | None = None,
        compute_dtype: torch.dtype = torch.float32,
        seed: int = 0,
        evaluate_branches: bool = True,
        export_dir: PathLike | None = None,
        final_weights: Literal["live", "merged"] = "live",
        method_params: Mapping[str, Any] | None = None,
        trust_pickles: bool = False,
        enabled: bool = True,
        alpha_grid: AlphaGridArg = None,
    ) -> None:
        self.accelerator = accelerator
        self.model = model
        self.enabled = bool(enabled)
        #: The options shared with ``MergeCallback`` (:class:`~drm_lightning.inloop.MergeOptions`).
        self.options = MergeOptions.from_arguments(locals())
        self.core = self.options.build_core(name="MergeHook", warn=self._warn, info=self._info)
        self._predicate = should_merge
        self.num_steps = 0
        self.epoch = 0
        self.zero3 = False
        self._pending: Mapping[str, Any] | None = (
            None  # a payload loaded before the base was recorded
        )
        self._inside = False  # between __enter__ and __exit__

    # ------------------------------------------------------------------ views
    method = property(lambda self: self.options.merge_method, doc="The merge method.")
    mode = property(lambda self: self.options.mode, doc="'live', 'snapshots' or 'checkpoints'.")
    history = property(
        lambda self: self.core.history, doc="One record per merge (step, epoch, scores)."
    )
    last_merged = property(
        lambda self: self.core.last_merged, doc="Full tensors of the latest merge (dense)."
    )
    last_merged_shards = property(
        lambda self: self.core.last_merged_shards, doc="ZeRO-3: this rank's share."
    )

    @property
    def unwrapped(self) -> nn.Module:
        """The model without its DDP / DeepSpeed wrapper (what is merged and scored)."""
        if isinstance(self.model, DistributedDataParallel):
            return self.model.module
        if type(self.model).__name__ == "DeepSpeedEngine":
            return self.model.module  # type: ignore[return-value]
        return self.model

    def _warn(self, message: str) -> None:
        if self.accelerator.is_main_process:
            warnings.warn(message, UserWarning, stacklevel=3)

    def _info(self, message: str) -> None:
        # logging is WARNING by default (and Accelerate configures none): print the line then
        if not self.accelerator.is_main_process:
            return
        if logger.isEnabledFor(logging.INFO):
            logger.info(message)
        else:
            self.accelerator.print(message)

    # ------------------------------------------------------------------ context manager

    def __enter__(self) -> MergeHook:
        """Check the distributed type and the model, record the base, check every input."""
        if not self.enabled:
            return self
        self.zero3 = check_accelerator(self.accelerator, adopt=self.core.adopt)
        prepared = getattr(self.accelerator, "_models", None)
        inner = self.unwrapped
        if prepared is not None and not any(
            m is self.model or m is inner or getattr(m, "module", None) is inner for m in prepared
        ):
            raise ValueError(
                f"MergeHook: the model ({type(self.model).__name__}) was not prepared by this "
                "accelerator; pass the model returned by accelerator.prepare(model, ...)"
            )
        if self.zero3:
            self.options.refuse_under_zero3(self.core.provider, name="MergeHook")
        model = self.unwrapped
        self.core.check_model(model)
        group = gloo_group(self.accelerator.num_processes)
        if self.core.backend is None:
            self.core.start(model, self.core.make_backend(partitioned=self.zero3, group=group))
            if self._pending is not None:
                self.core.load_payload(self._pending)
                self._pending = None
        if self.core.merge_schedule.empty and self._predicate is None:
            self.core.warn_once(
                "never",
                "MergeHook has no schedule (every_n_steps, every_n_epochs, should_merge): it never "
                "merges unless merge() is called",
            )
        self.accelerator.register_save_state_pre_hook(self._refuse_swapped_save)
        self._inside = True
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        """On exit (unless an exception propagates): warn if never merged, export, final weights."""
        self._inside = False
        if not self.enabled or exc_type is not None:
            return
        if self.core.num_merges == 0:
            self.core.warn_once(
                "never", f"MergeHook never merged in {self.num_steps} optimizer steps"
            )
        if self.options.export_dir is not None:
            self.core.export(
                self.unwrapped,
                self.options.export_dir,
                step=self.num_steps,
                front_end="MergeHook",
                write=self.accelerator.is_main_process,
            )
            self.accelerator.wait_for_everyone()
        if self.options.final_weights == "merged":
            self.core.adopt_into(
                self.unwrapped, self.core.latest(self.unwrapped, step=self.num_steps)
            )

    def _need_inside(self, method: str) -> None:
        """Refuse a call outside ``with MergeHook(...)`` at once, not at the first merge."""
        if not self._inside:
            raise RuntimeError(
                f"MergeHook.{method}() called outside `with MergeHook(...)`: enter the hook around "
                "the training loop (`with MergeHook(accelerator, model, ...) as hook:`); entering "
                "records the merge base and checks every input"
            )

    def _refuse_swapped_save(self, *args: Any) -> None:
        if self.core.swapped:
            raise RuntimeError(
                "MergeHook: save_state while merged weights are swapped in for evaluation"
            )

    # ------------------------------------------------------------------ the loop

    def should_merge(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        """Whether to merge after this optimizer step (zero-based) or epoch: ``should_merge=`` or
        the period."""
        if self._predicate is not None:
            return bool(self._predicate(step_idx, epoch_idx))
        return self.core.merge_schedule.fires(step_idx, epoch_idx)

    def step(self) -> dict[str, Any] | None:
        """Call after ``optimizer.step()``: counts optimizer steps (not accumulation micro-steps),
        snapshots and merges when due; returns the merge record, if one ran. Raises
        ``RuntimeError`` outside ``with MergeHook(...)`` (as :meth:`end_epoch`, :meth:`snapshot`
        and :meth:`merge` do)."""
        if not self.enabled:
            return None
        self._need_inside("step")
        if not getattr(self.accelerator, "sync_gradients", True):
            return None
        self.num_steps += 1
        if self.mode == "snapshots" and self.core.snapshot_schedule.due(step=self.num_steps):
            self.snapshot()
        if self.core.merge_schedule.due(step=self.num_steps, predicate=self.should_merge):
            return self.merge()
        return None

    def end_epoch(self) -> dict[str, Any] | None:
        """Call after each epoch for ``every_n_epochs``; returns the merge record, if one ran."""
        if not self.enabled:
            return None
        self._need_inside("end_epoch")
        epoch, self.epoch = self.epoch, self.epoch + 1
        if self.core.merge_schedule.due(epoch=epoch, predicate=self.should_merge):
            return self.merge()
        return None

    def snapshot(self, task: str | None = None) -> None:
        """Capture the live model now (``branches="snapshots"``), labelled ``task``."""
        if not self.enabled:
            return
        self._need_inside("snapshot")
        self.core.capture(self.unwrapped, task=task, step=self.num_steps, epoch=self.epoch)

    def merge(self) -> dict[str, Any] | None:
        """Merge now, score, log through ``accelerator.log``; returns the history record."""
        if not self.enabled:
            return None
        self._need_inside("merge")
        record = self.core.merge(self.unwrapped, step=self.num_steps, epoch=self.epoch)
        if record is not None:
            logged = {
                k: float(v) for k, v in record.items() if k not in ("step", "epoch", "branches")
            }
            self.accelerator.log(logged, step=self.num_steps)
        return record

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Counters, history and (single-model branches, not under ZeRO-3) base and snapshots."""
        return {
            "num_steps": self.num_steps,
            "epoch": self.epoch,
            "core": self.core.state_dict(),
            "payload": self.core.payload() if self.core.backend is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (call after entering the context, or before: both work)."""
        self.num_steps = int(state["num_steps"])
        self.epoch = int(state["epoch"])
        self.core.load_state_dict(state["core"])
        payload = state.get("payload")
        if payload is not None and self.core.backend is None:
            self._pending = payload  # applied once __enter__ has recorded the base
        elif payload is not None:
            self.core.load_payload(payload)


def check_accelerator(accelerator: Any, *, adopt: bool) -> bool:
    """Refuse unsupported distributed types; returns whether the run is DeepSpeed ZeRO-3."""
    from accelerate import DistributedType

    kind = accelerator.distributed_type
    if kind in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        return False
    if kind == DistributedType.DEEPSPEED:
        stage = int(getattr(accelerator.state.deepspeed_plugin, "zero_stage", 0) or 0)
        if stage == 3:
            return True
        if adopt:
            raise NotImplementedError(
                f"MergeHook(adopt=True) is not supported with DeepSpeed ZeRO-{stage}: the "
                "optimizer's fp32 master "
                "weights would overwrite the adopted weights. Use adopt=False, ZeRO-3 or DDP."
            )
        return False
    raise NotImplementedError(
        f"MergeHook does not support distributed type {kind}; supported: {SUPPORTED}"
    )
