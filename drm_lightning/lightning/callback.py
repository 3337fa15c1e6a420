r"""Merge task branches inside ``Trainer.fit`` and score the merged model on every task.

The callback holds state and schedule only; every merge is one call to
:func:`drm_lightning.merge.merge_state_dicts` and every score one call to
:func:`drm_lightning.evaluation.evaluate_task`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import Tensor

from drm_lightning.distributed import (
    CheckpointShards,
    DistributedMerger,
    EngineStats,
    ParamSet,
    ShardSnapshot,
    TensorDictSet,
    TensorSet,
)
from drm_lightning.evaluation import TaskSpec, evaluate_task, summarize_scores
from drm_lightning.lightning._weights import (
    DeltaSource,
    WeightSwap,
    check_paths,
    compute_delta,
    cpu_clone,
    float_state,
    load_weights,
)
from drm_lightning.lightning._zero3 import MergedShards, adopt_values, local_values, metrics_unsynced, swapped
from drm_lightning.lightning.branched import BranchedModule
from drm_lightning.merge import merge_state_dicts, plan_merge
from drm_lightning.methods import MergeMethod, get_method
from drm_lightning.routing import Routing
from drm_lightning.sources import StateDictSource

PathLike = str | os.PathLike[str]
BranchesArg = Literal["live", "snapshots"] | Sequence[PathLike] | Mapping[str, PathLike]
CHECKPOINT_KEY = "merge_callback"


@dataclass
class _Snapshot:
    """A captured copy of the live model: its task label and its delta to the base."""

    task: str
    step: int
    epoch: int
    delta: dict[str, Tensor] | None = None  # in memory ...
    path: str | None = None  # ... or a safetensors file of the delta
    shards: ShardSnapshot | None = None  # ... or, under ZeRO-3, this rank's partitions

    def source(self, base: Mapping[str, Tensor], index: int) -> DeltaSource:
        delta: Any = Path(self.path) if self.path is not None else self.delta
        return DeltaSource(base, delta, f"snapshot {index} ({self.task}, step {self.step})")


@dataclass
class _Branch:
    """One merge input as the callback sees it."""

    task: str
    key: str  # stable identity, for caching the scores of frozen branches
    source: Any  # a weight source for the merge loop, or None for the live model
    live: bool = False


class MergeCallback(Callback):
    r"""Merge task branches during training and evaluate the merge on every task.

    Adding this callback to a ``Trainer`` gives periodic multitask merging (DRM, TIES, DARE,
    task arithmetic, ...) with the merged model scored on each task's validation data. Where
    the branches come from is set by ``branches``:

    * ``"live"`` — the module is a :class:`~drm_lightning.lightning.BranchedModule`: its K
      backbones are merged against its frozen ``base``; heads stay per task. With
      ``adopt=True`` this is *periodic consolidation*: after each merge every branch **and the
      base** are reset to the merged backbone, so the next merge sees the progress made since
      (optimizer moments are kept).
    * ``"snapshots"`` — the live model is captured whenever :meth:`should_snapshot` says so
      (``snapshot_every_n_steps`` / ``snapshot_every_n_epochs``), e.g. at the end of each task
      phase of sequential multitask fine-tuning. Snapshots are kept as deltas to the base,
      only for tensors that changed, on CPU or (``snapshot_dir``) as safetensors files.
    * a list of paths, or ``{task: path}`` — earlier checkpoints (Lightning ``.ckpt``,
      ``.safetensors``) merged with the live model. A missing path fails at ``setup``.

    In the two single-model modes the base is the model's weights when ``fit`` starts (or
    ``base=``), each branch carries a task label (``{task: path}`` keys, ``live_task``, or the
    module's ``current_task`` attribute), and task-specific tensors are those that ``routing``
    sends to ``"ignore"`` (e.g. ``Routing(ignore=[r"heads\."])``): when the merged model is
    scored on task *t* they come from *t*'s own branch. ``adopt=True`` copies the merged
    weights into the live model (ignored tensors stay live); base and stored branches stay.

    Each merge scores the merged model on every task of ``tasks`` (each task's metrics, with
    its own head), and each task's own branch, then logs ``merged/<task>/<metric>``,
    ``branch/<task>/<metric>``, ``normalized/<task>/<metric>`` and the ``.../average`` of each
    task's primary metric to every logger and to ``trainer.callback_metrics``; the same record
    is appended to :attr:`history`. Scores of frozen branches (snapshots, checkpoints) are
    cached. Afterwards the live weights are restored bit for bit unless ``adopt=True``.

    When it merges is decided by :meth:`should_merge` (default: ``every_n_steps`` /
    ``every_n_epochs``), the one method to override, as ``WeightAveraging.should_update``.

    Hooks, in the order they run:

    * ``setup("fit")`` — refuses unsupported strategies, checks tasks, branch parameter sets
      and checkpoint paths (all before the first step), records the base.
    * ``on_fit_start`` — warns once if the schedule can never fire; under ZeRO-3 (the first hook
      where parameters are partitioned) records the base as shards and checks every input's
      names and shapes from metadata, still before the first step.
    * ``on_train_batch_end`` — after each optimizer step (``global_step`` guards gradient
      accumulation): snapshot if :meth:`should_snapshot`, then merge if :meth:`should_merge`.
    * ``on_train_epoch_end`` — the same with ``epoch_idx``.
    * ``on_train_end`` — warns if no merge ever ran; exports the final merge to
      ``export_dir``.
    * ``state_dict`` / ``load_state_dict`` — small counters and the history;
      ``on_save_checkpoint`` / ``on_load_checkpoint`` — base and snapshot tensors under
      ``checkpoint["merge_callback"]``; refuses to save while merged weights are swapped in.

    Strategies:

    * single device: :func:`~drm_lightning.merge.merge_state_dicts`.
    * DDP (``ddp``, ``ddp_spawn``): the replica engine of
      :class:`~drm_lightning.distributed.DistributedMerger` — each rank merges its share of the
      tensors (a cost-balanced plan), owners broadcast the results, so the merged weights are
      bit-identical on every rank; each rank scores a share of the validation batches
      (torchmetrics synchronises).
    * DeepSpeed ZeRO-3: the ``zero3`` engine, on the partitions where they live — the whole
      model is never gathered (one tensor at a time reaches its owner rank, or none for the
      sharded DRM route). Live branches are the partitioned parameter sets
      ``BranchedModule.branches[t]``; snapshots are
      :class:`~drm_lightning.distributed.ShardSnapshot` copies (each rank keeps its own
      partitions, in CPU memory); checkpoint branches and a ``base=`` path are read shard-wise
      from ``.safetensors`` files or folders. Scoring writes the merged partitions into the
      working parameters only (never the fp32 master) and restores them bit for bit; every
      rank runs the same number of forward passes (batches are split only when they divide
      evenly, otherwise every rank scores every batch with torchmetrics' sync off), so scores
      are identical on every rank. ``adopt=True`` writes the merged partitions *and* the
      optimizer's fp32 master (``safe_set_local_fp32_param``), so the next step continues from
      them; optimizer moments are kept. Caveats: only parameters are merged (buffers keep their
      live values); persistent parameters (``stage3_param_persistence_threshold``) are
      re-partitioned around a swap or an adoption and fetched again by the next forward;
      :attr:`last_merged` stays ``None`` (this rank's share is in :attr:`last_merged_shards`);
      checkpoints keep counters and history but not the base or snapshots (per-rank
      partitions): after a resume the base is the module's weights when ``fit`` starts, before
      DeepSpeed loads the checkpoint (the original base if the module is built the same way),
      and snapshots start afresh; MiCS/hpZ partition groups
      are refused by the engine. Not supported under ZeRO-3 (``NotImplementedError`` at
      ``setup``): ``export_dir`` (it would assemble the whole model on one rank),
      ``snapshot_dir``, ``.ckpt``/``.bin`` checkpoint branches or base (not readable
      shard-wise).
    * DeepSpeed ZeRO-1/2: as DDP, only with ``adopt=False`` (the optimizer's fp32 master copy
      would overwrite adopted weights).
    * FSDP and model-parallel strategies: ``NotImplementedError`` at ``setup`` (no silent
      whole-model gather).

    Paper: *Decom-Renorm-Merge: Model Merging on the Right Space Improves Multitasking*
    (DRM); TIES-Merging (Yadav et al., 2023); DARE (Yu et al., 2024); task arithmetic
    (Ilharco et al., 2023).

    Args:
        method: A registered method name (see ``drm_lightning.methods.available_methods()``)
            or a :class:`~drm_lightning.methods.MergeMethod` instance.
        tasks: ``{task: TaskSpec(dataloader, metrics)}`` scored at every merge; ``None``
            merges without scoring. With ``branches="live"`` it must name every branch.
        branches: ``"live"``, ``"snapshots"``, a list of checkpoint paths (task label = file
            stem) or ``{task: path}``.
        every_n_steps: Merge after every n-th optimizer step.
        every_n_epochs: Merge after every n-th training epoch.
        snapshot_every_n_steps: Capture a snapshot after every n-th optimizer step.
        snapshot_every_n_epochs: Capture a snapshot after every n-th epoch.
        adopt: Make the merged weights the live weights after each merge (see above).
        include_live: Merge the live model as one more branch; default ``True`` with
            checkpoint paths, ``False`` with snapshots. Ignored with ``"live"``.
        live_task: Task label of the live model; default ``pl_module.current_task`` if the
            module has it, else ``"live"`` (``"snapshot_<i>"`` for snapshots).
        base: The merge base for the single-model modes: a path or a state dict; default the
            module's weights at the start of ``fit``.
        routing: Which tensors are merged, how, and which stay per task (``ignore``).
        coefficients: One weight per branch (a sequence in branch order: checkpoints,
            snapshots, live) or ``{task: weight}`` (missing tasks get 1.0).
        compute_dtype: dtype of the merge arithmetic.
        seed: Seed of random methods (DARE); merge *i* uses ``seed + i``.
        snapshot_dir: Keep snapshot deltas as safetensors files here (visible to every rank)
            instead of in CPU memory.
        snapshot_dtype: Store snapshot deltas in this dtype (default: the weights' dtype).
        evaluate_branches: Also score each task's own branch (needed for normalised scores).
        export_dir: On ``on_train_end``, merge once more (unless the last step just merged) and
            write the merged weights there as a Hugging Face folder through
            :class:`~drm_lightning.sources.writer.HFFolderWriter` (``model.safetensors`` or
            shards + index, model card; replaced atomically). Per-task heads of a
            ``BranchedModule`` go to ``heads.safetensors`` beside it.
        method_params: Parameters of ``method`` when it is given by name.
        trust_pickles: Allow full unpickling of ``base`` / checkpoint branch files that hold
            more than tensors (they can run code). Default: pickles load weights-only and
            anything else is refused (see :mod:`drm_lightning.sources.trust`).

    Raises:
        ValueError: at construction, for invalid schedules or method parameters.

    Example::

        import lightning.pytorch as pl
        from torchmetrics.classification import MulticlassAccuracy
        from drm_lightning.evaluation import TaskSpec
        from drm_lightning.lightning import BranchedModule, MergeCallback

        model = BranchedModule(backbone, {"a": head_a, "b": head_b})
        merge = MergeCallback(
            "drm", method_params={"drop_rate": 0.8},
            tasks={"a": TaskSpec(val_a, MulticlassAccuracy(num_classes=10)),
                   "b": TaskSpec(val_b, MulticlassAccuracy(num_classes=10))},
            every_n_steps=200, adopt=True,            # periodic consolidation
        )
        pl.Trainer(callbacks=[merge], max_steps=1000).fit(model, {"a": train_a, "b": train_b})
        merge.history[-1]["merged/average"]
    """

    def __init__(
        self,
        method: str | MergeMethod = "drm",
        *,
        tasks: Mapping[str, TaskSpec] | None = None,
        branches: BranchesArg = "live",
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        snapshot_every_n_steps: int | None = None,
        snapshot_every_n_epochs: int | None = None,
        adopt: bool = False,
        include_live: bool | None = None,
        live_task: str | None = None,
        base: PathLike | Mapping[str, Tensor] | None = None,
        routing: Routing | None = None,
        coefficients: Sequence[float] | Mapping[str, float] | None = None,
        compute_dtype: torch.dtype = torch.float32,
        seed: int = 0,
        snapshot_dir: PathLike | None = None,
        snapshot_dtype: torch.dtype | None = None,
        evaluate_branches: bool = True,
        export_dir: PathLike | None = None,
        method_params: Mapping[str, Any] | None = None,
        trust_pickles: bool = False,
    ) -> None:
        if isinstance(method, MergeMethod):
            if method_params:
                raise ValueError("method_params is only used with a method name, not a MergeMethod instance")
            self.method = method
        elif isinstance(method, str):
            self.method = get_method(method, **dict(method_params or {}))
        else:
            raise TypeError(f"method must be a method name or a MergeMethod, got {type(method).__name__}")
        for name, value in (
            ("every_n_steps", every_n_steps),
            ("every_n_epochs", every_n_epochs),
            ("snapshot_every_n_steps", snapshot_every_n_steps),
            ("snapshot_every_n_epochs", snapshot_every_n_epochs),
        ):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if tasks is not None:
            if not isinstance(tasks, Mapping):
                raise TypeError(f"tasks must be a mapping {{task: TaskSpec}}, got {type(tasks).__name__}")
            bad = [f"{k!r} ({type(v).__name__})" for k, v in tasks.items() if not isinstance(v, TaskSpec)]
            if bad:
                raise TypeError("tasks values must be TaskSpec(dataloader, metrics); invalid: " + ", ".join(bad))
        self.tasks: dict[str, TaskSpec] = dict(tasks or {})
        self._paths: dict[str, Path] = {}
        if isinstance(branches, str):
            if branches not in ("live", "snapshots"):
                raise ValueError(
                    f"branches={branches!r}: use 'live', 'snapshots', a list of checkpoint paths or {{task: path}}"
                )
            self.mode: Literal["live", "snapshots", "checkpoints"] = branches  # type: ignore[assignment]
        else:
            self.mode = "checkpoints"
            if isinstance(branches, Mapping):
                self._paths = {str(task): Path(p) for task, p in branches.items()}
            else:
                paths = [Path(p) for p in branches]
                self._paths = {p.stem: p for p in paths}
                if len(self._paths) != len(paths):
                    raise ValueError("checkpoint file names must differ; pass {task: path} to label them")
            if not self._paths:
                raise ValueError("branches is an empty list of checkpoint paths")
        if self.mode != "snapshots" and (snapshot_every_n_steps or snapshot_every_n_epochs):
            raise ValueError("snapshot_every_n_steps/epochs are only used with branches='snapshots'")
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self.snapshot_every_n_steps = snapshot_every_n_steps
        self.snapshot_every_n_epochs = snapshot_every_n_epochs
        self.adopt = adopt
        self.include_live = (self.mode == "checkpoints") if include_live is None else include_live
        self.live_task = live_task
        self._base_arg = base
        self.routing = routing or Routing()
        self.coefficients = coefficients
        self.compute_dtype = compute_dtype
        self.seed = seed
        self.snapshot_dir = Path(snapshot_dir) if snapshot_dir is not None else None
        self.snapshot_dtype = snapshot_dtype
        self.evaluate_branches = evaluate_branches
        self.export_dir = Path(export_dir) if export_dir is not None else None
        self.trust_pickles = bool(trust_pickles)

        #: One record per merge: step, epoch, branch labels, timings and logged scores.
        self.history: list[dict[str, Any]] = []
        #: The weights of the latest merge (merge scope only), on the device they were merged on.
        self.last_merged: dict[str, Tensor] | None = None

        #: Under ZeRO-3: this rank's share of the latest merge (partitions; full persistent params).
        self.last_merged_shards: MergedShards | None = None
        #: DDP / ZeRO-3: this rank's engine statistics of the latest merge (items owned, the most
        #: elements of full tensors held at once, communication time and bytes).
        self.last_merge_stats: EngineStats | None = None

        self._fitting = False
        self._swapped = False
        self._zero3 = False
        self._group: Any = None  # gloo group for the merge engines (None: the default group)
        self._base_set: TensorSet | None = None  # ZeRO-3 single-model modes
        self._checkpoint_sets: dict[str, TensorSet] = {}
        self._warned_zero3_ckpt = False
        self._base: dict[str, Tensor] | None = None  # single-model modes, CPU
        self._snapshots: list[_Snapshot] = []
        self._checkpoints: dict[str, dict[str, Tensor]] = {}
        self._score_cache: dict[str, dict[str, float]] = {}
        self._warned_never = False
        self._warned_empty = False
        # Like WeightAveraging: 0 and -1 so that the first step / epoch may already act.
        self._latest_merge_step = 0
        self._latest_merge_epoch = -1
        self._latest_snapshot_step = 0
        self._latest_snapshot_epoch = -1
        self._num_merges = 0
        self._merges_this_fit = 0

    @property
    def state_key(self) -> str:
        """Unique per configuration, so that several merge callbacks can share a checkpoint."""
        return self._generate_state_key(
            method=getattr(self.method, "registered_name", self.method.name),
            params=repr(sorted(self.method.params.model_dump().items())),
            branches=self.mode if self.mode != "checkpoints" else sorted(self._paths),
            every_n_steps=self.every_n_steps,
            every_n_epochs=self.every_n_epochs,
        )

    # ------------------------------------------------------------------ extension points

    def should_merge(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        """Whether to merge after this optimizer step or epoch; override to customise.

        Called with ``step_idx`` (zero-based index of the last optimizer step) after every step
        and with ``epoch_idx`` after every training epoch. The default merges after every
        ``every_n_steps``-th step and every ``every_n_epochs``-th epoch (counted from one).

        Example:
            >>> cb = MergeCallback("drm", every_n_steps=10)
            >>> [s for s in range(30) if cb.should_merge(step_idx=s)]
            [9, 19, 29]
        """
        if step_idx is not None and self.every_n_steps:
            return (step_idx + 1) % self.every_n_steps == 0
        if epoch_idx is not None and self.every_n_epochs:
            return (epoch_idx + 1) % self.every_n_epochs == 0
        return False

    def should_snapshot(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        """Whether to capture the live model (``branches="snapshots"`` only); override to customise.

        Same calling convention as :meth:`should_merge`; it runs first, so a merge at the same
        step includes the new snapshot. The default uses ``snapshot_every_n_steps/epochs``.
        """
        if step_idx is not None and self.snapshot_every_n_steps:
            return (step_idx + 1) % self.snapshot_every_n_steps == 0
        if epoch_idx is not None and self.snapshot_every_n_epochs:
            return (epoch_idx + 1) % self.snapshot_every_n_epochs == 0
        return False

    # ------------------------------------------------------------------ Lightning hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check strategy, tasks, branches and paths; record the base (``fit`` only)."""
        if stage != "fit":
            return
        self._zero3 = _check_strategy(trainer, adopt=self.adopt, live=self.mode == "live")
        self._check_tasks(pl_module)
        if self._zero3:
            self._check_zero3_arguments(pl_module)
        elif self.mode == "live":
            self._setup_live(pl_module)
        else:
            self._setup_single(pl_module)
        self._merges_this_fit = 0
        self._fitting = True

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Leave the ``fit`` state; the history and the last merge stay available."""
        if stage == "fit":
            self._fitting = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Warn once when the merge schedule can never fire; under ZeRO-3, record the base and check inputs.

        Under ZeRO-3 this is the first hook where the parameters are partitioned (the strategy
        wraps the model after ``setup``), so the base snapshot and the plan check happen here,
        still before the first training step.
        """
        self._group = None
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_backend() != "gloo":  # the merge engines exchange CPU tensors
                self._group = torch.distributed.new_group(backend="gloo")
        if self._zero3:
            self._setup_zero3(pl_module)
        reason = self._never_fires_reason(trainer)
        if reason:
            self._warn_never(reason)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: STEP_OUTPUT, batch: Any, batch_idx: int
    ) -> None:
        """Snapshot and/or merge after an optimizer step, as the predicates decide."""
        step = trainer.global_step
        if self.mode == "snapshots" and step > self._latest_snapshot_step and self.should_snapshot(step_idx=step - 1):
            self._capture(trainer, pl_module)
            self._latest_snapshot_step = step
        if step > self._latest_merge_step and self.should_merge(step_idx=step - 1):
            self._merge_and_evaluate(trainer, pl_module)
            self._latest_merge_step = step

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Snapshot and/or merge after an epoch, as the predicates decide."""
        epoch = trainer.current_epoch
        if self.mode == "snapshots" and epoch > self._latest_snapshot_epoch and self.should_snapshot(epoch_idx=epoch):
            self._capture(trainer, pl_module)
            self._latest_snapshot_epoch = epoch
        if epoch > self._latest_merge_epoch and self.should_merge(epoch_idx=epoch):
            self._merge_and_evaluate(trainer, pl_module)
            self._latest_merge_epoch = epoch

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Warn if nothing was merged; export the final merge if ``export_dir`` is set."""
        if self._num_merges == 0:
            self._warn_never(
                f"MergeCallback never merged (every_n_steps={self.every_n_steps}, "
                f"every_n_epochs={self.every_n_epochs}, {trainer.global_step} optimizer steps, "
                f"{trainer.current_epoch} epochs completed)"
            )
        if self.export_dir is not None:
            self._export(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        """Small counters, the snapshot index and the history (tensors go to the checkpoint)."""
        return {
            "latest_merge_step": self._latest_merge_step,
            "latest_merge_epoch": self._latest_merge_epoch,
            "latest_snapshot_step": self._latest_snapshot_step,
            "latest_snapshot_epoch": self._latest_snapshot_epoch,
            "num_merges": self._num_merges,
            "snapshots": [
                {"task": s.task, "step": s.step, "epoch": s.epoch, "path": s.path} for s in self._snapshots
            ],
            "history": list(self.history),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the counters and history written by :meth:`state_dict`."""
        self._latest_merge_step = int(state_dict["latest_merge_step"])
        self._latest_merge_epoch = int(state_dict["latest_merge_epoch"])
        self._latest_snapshot_step = int(state_dict["latest_snapshot_step"])
        self._latest_snapshot_epoch = int(state_dict["latest_snapshot_epoch"])
        self._num_merges = int(state_dict["num_merges"])
        self.history = list(state_dict.get("history", []))

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Store base and snapshot tensors under ``checkpoint["merge_callback"]``.

        Raises:
            RuntimeError: merged weights are swapped into the module (a checkpoint now would
                hold the merged weights as if they were the live ones).
        """
        if self._swapped:
            raise RuntimeError(
                "a checkpoint was requested while MergeCallback has the merged weights swapped into the "
                "module for evaluation; it would store merged weights as the live ones. Save from a hook "
                "that runs outside the merge evaluation (e.g. ModelCheckpoint)."
            )
        if self._zero3:
            # Snapshots and the base are per-rank partitions; the checkpoint dict is written by one rank.
            if self.mode != "live" and not self._warned_zero3_ckpt:
                self._warned_zero3_ckpt = True
                rank_zero_warn(
                    "MergeCallback under ZeRO-3: the checkpoint stores the merge counters and history but not "
                    "the base or the snapshots (they are per-rank partitions); after a resume the base is the "
                    "module's weights when fit starts, before DeepSpeed loads the checkpoint (the original base "
                    "if the module is built the same way), and snapshots start afresh."
                )
            checkpoint.setdefault(CHECKPOINT_KEY, {})[self.state_key] = {"mode": self.mode, "zero3": True}
            return
        if self.mode != "live" and self._base is None:
            return  # never set up for fit: nothing to store
        payload: dict[str, Any] = {"mode": self.mode}
        if self.mode != "live":
            if self._base_arg is None:
                payload["base"] = self._base
            payload["snapshots"] = [
                {"task": s.task, "step": s.step, "epoch": s.epoch, "path": s.path, "delta": s.delta}
                for s in self._snapshots
            ]
        checkpoint.setdefault(CHECKPOINT_KEY, {})[self.state_key] = payload

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Restore base and snapshots; handles the outside-fit, ours and foreign cases."""
        if not self._fitting:
            rank_zero_warn(
                "MergeCallback: loading a checkpoint outside fit; the merge state (base, snapshots, "
                "counters) is not restored. Ignore this if you only validate/test/predict, or remove "
                "the callback."
            )
            return
        payload = checkpoint.get(CHECKPOINT_KEY, {}).get(self.state_key)
        if payload is None:
            if self.mode == "live":
                detail = "the branches and the base are those of the loaded BranchedModule"
            elif self._zero3:
                detail = "the merge base is the weights at the start of fit and no snapshot is restored"
            else:
                if self._base_arg is None:
                    self._base = cpu_clone(float_state(pl_module))
                detail = (
                    "the merge base is "
                    + ("the given base" if self._base_arg is not None else "the weights just loaded from it")
                    + " and no snapshot is restored"
                )
            self._snapshots = []
            others = list(checkpoint.get(CHECKPOINT_KEY, {}))
            origin = (
                f"holds the merge state of other MergeCallback configurations {others}, not of {self.state_key}"
                if others
                else "was not written with this callback"
            )
            rank_zero_warn(f"MergeCallback: the checkpoint {origin}; {detail}; merge counters start from zero.")
            return
        if payload.get("mode") != self.mode:
            raise ValueError(
                f"MergeCallback: checkpoint written with branches mode {payload.get('mode')!r}, this "
                f"callback uses {self.mode!r}; use the same mode to resume"
            )
        if self.mode != "live" and payload.get("zero3"):
            self._snapshots = []  # ZeRO-3 checkpoints hold no snapshot; on_fit_start records the base
        elif self.mode != "live":
            if "base" in payload and payload["base"] is not None:
                self._base = payload["base"]
            self._snapshots = [_Snapshot(**s) for s in payload.get("snapshots", [])]
            missing = [s.path for s in self._snapshots if s.path is not None and not Path(s.path).exists()]
            if missing:
                raise FileNotFoundError(f"MergeCallback: snapshot file(s) of the checkpoint are gone: {missing}")
        self._score_cache.clear()
        rank_zero_info(
            f"MergeCallback: restored the merge state ({len(self._snapshots)} snapshot(s)) from the checkpoint."
        )

    # ------------------------------------------------------------------ setup helpers

    def _check_tasks(self, pl_module: pl.LightningModule) -> None:
        problems: list[str] = []
        if self.mode == "live" and isinstance(pl_module, BranchedModule) and self.tasks:
            missing = [t for t in pl_module.task_names if t not in self.tasks]
            unknown = [t for t in self.tasks if t not in pl_module.task_names]
            if missing:
                problems.append(
                    f"branch task(s) {missing} have no TaskSpec (validation dataloader + metric) in tasks=; "
                    "every branch must be scored"
                )
            if unknown:
                problems.append(f"tasks= names {unknown} that are not branches of the module {pl_module.task_names}")
        if problems:
            raise ValueError("MergeCallback: " + "; ".join(problems))
        if not self.tasks:
            rank_zero_info("MergeCallback: no tasks= given; merges run without evaluation.")

    def _setup_live(self, pl_module: pl.LightningModule) -> None:
        if not isinstance(pl_module, BranchedModule):
            raise TypeError(
                f"branches='live' needs a BranchedModule (got {type(pl_module).__name__}); use "
                "branches='snapshots' or a list of checkpoint paths for a single model"
            )
        sources = [
            StateDictSource(float_state(pl_module.branches[t]), origin=f"branch {t!r}")
            for t in pl_module.task_names
        ]
        base = StateDictSource(float_state(pl_module.base), origin="BranchedModule.base")
        plan_merge(base, sources, routing=self.routing)
        if self.adopt:
            rank_zero_warn(
                "MergeCallback(adopt=True) with live branches: after every merge, each of the "
                f"{len(pl_module.task_names)} branches and the base are overwritten with the merged backbone "
                "(periodic consolidation). Each branch's own progress survives only through the merge; heads "
                "and optimizer moments are kept. Use adopt=False to only evaluate merges."
            )

    def _setup_single(self, pl_module: pl.LightningModule) -> None:
        if isinstance(self._base_arg, Mapping):
            self._base = cpu_clone({k: v for k, v in self._base_arg.items() if torch.is_floating_point(v)})
        elif self._base_arg is not None:
            path = Path(self._base_arg)
            if not path.exists():
                raise FileNotFoundError(f"MergeCallback(base={os.fspath(path)!r}): the file does not exist")
            self._base = load_weights(path, trust_pickles=self.trust_pickles)
        else:
            self._base = cpu_clone(float_state(pl_module))
        self._snapshots = []
        self._score_cache.clear()
        live = StateDictSource(float_state(pl_module), origin="live model")
        sources: list[Any] = [live]
        if self.mode == "checkpoints":
            check_paths(self._paths)
            self._checkpoints = {
                task: load_weights(p, trust_pickles=self.trust_pickles) for task, p in self._paths.items()
            }
            sources += [
                StateDictSource(w, origin=f"checkpoint {t!r} ({self._paths[t]})")
                for t, w in self._checkpoints.items()
            ]
        plan_merge(StateDictSource(self._base, origin="base"), sources, routing=self.routing)
        if self.snapshot_dir is not None:
            self.snapshot_dir.mkdir(parents=True, exist_ok=True)
        self._check_snapshot_schedule()

    def _check_snapshot_schedule(self) -> None:
        if (
            self.mode == "snapshots"
            and not self.include_live
            and self.snapshot_every_n_steps is None
            and self.snapshot_every_n_epochs is None
            and not is_overridden("should_snapshot", self, MergeCallback)
        ):
            raise ValueError(
                "branches='snapshots' without a snapshot schedule: set snapshot_every_n_steps or "
                "snapshot_every_n_epochs, override should_snapshot, or pass include_live=True"
            )

    def _check_zero3_arguments(self, pl_module: pl.LightningModule) -> None:
        """Refuse, at ``setup``, what the ZeRO-3 route cannot do (one message listing all of it)."""
        problems: list[str] = []
        if self.mode == "live" and not isinstance(pl_module, BranchedModule):
            raise TypeError(
                f"branches='live' needs a BranchedModule (got {type(pl_module).__name__}); use "
                "branches='snapshots' or a list of checkpoint paths for a single model"
            )
        if self.export_dir is not None:
            problems.append(
                "export_dir= (exporting would assemble the whole merged model on one rank; export after "
                "training from a consolidated checkpoint instead)"
            )
        if self.snapshot_dir is not None:
            problems.append("snapshot_dir= (ZeRO-3 snapshots stay in CPU memory, each rank its own partition)")
        if self.mode == "checkpoints":
            check_paths(self._paths)
            problems += [
                f"checkpoint {task!r} ({os.fspath(path)}) is not safetensors: under ZeRO-3 branches are read "
                "shard-wise from .safetensors files or folders only"
                for task, path in self._paths.items()
                if not _is_safetensors(path)
            ]
        if self._base_arg is not None and not isinstance(self._base_arg, Mapping):
            path = Path(self._base_arg)
            if not path.exists():
                raise FileNotFoundError(f"MergeCallback(base={os.fspath(path)!r}): the file does not exist")
            if not _is_safetensors(path):
                problems.append(f"base={os.fspath(path)!r} is not safetensors (read shard-wise under ZeRO-3)")
        if problems:
            raise NotImplementedError("MergeCallback under DeepSpeed ZeRO-3 does not support:\n- " + "\n- ".join(problems))
        self._check_snapshot_schedule()
        if self.mode == "live" and self.adopt:
            rank_zero_warn(
                "MergeCallback(adopt=True) with live branches: after every merge, each branch and the base "
                "are overwritten with the merged backbone (periodic consolidation); heads and optimizer "
                "moments are kept."
            )

    def _merger(self, *, seed: int | None = None) -> DistributedMerger:
        return DistributedMerger(
            self.method,
            routing=self.routing,
            compute_dtype=self.compute_dtype,
            seed=self.seed if seed is None else seed,
            engine="zero3",
            group=self._group,
        )

    def _setup_zero3(self, pl_module: pl.LightningModule) -> None:
        """Record the base as shards and check every input's names and shapes from metadata."""
        params = ParamSet.from_module(pl_module, origin="live model")
        if self.mode == "live":
            assert isinstance(pl_module, BranchedModule)
            first = pl_module.branches[pl_module.task_names[0]]
            target = MergedShards(dict(first.named_parameters()), "merged backbone")
            base: TensorSet = ParamSet.from_module(pl_module.base, origin="BranchedModule.base")
            inputs: list[TensorSet] = [
                ParamSet.from_module(pl_module.branches[t], origin=f"branch {t!r}") for t in pl_module.task_names
            ]
        else:
            if isinstance(self._base_arg, Mapping):
                floats = {k: v for k, v in self._base_arg.items() if torch.is_floating_point(v)}
                self._base_set = TensorDictSet(cpu_clone(floats), "base")
            elif self._base_arg is not None:
                self._base_set = CheckpointShards(Path(self._base_arg), origin="base")
            else:
                self._base_set = ShardSnapshot.capture(params, origin="base (weights at the start of fit)")
            self._snapshots = []
            self._score_cache.clear()
            self._checkpoint_sets = {
                task: CheckpointShards(path, origin=f"checkpoint {task!r} ({os.fspath(path)})")
                for task, path in self._paths.items()
            }
            target = MergedShards(params.params, "merged model")
            base = self._base_set
            inputs = [*self._checkpoint_sets.values(), params]
        self._merger().plan(target, base, inputs)  # metadata only, no collective: raises ValueError early

    def _never_fires_reason(self, trainer: pl.Trainer) -> str | None:
        if is_overridden("should_merge", self, MergeCallback):
            return None
        if self.every_n_steps is None and self.every_n_epochs is None:
            return (
                "MergeCallback has no schedule (every_n_steps=None, every_n_epochs=None) and should_merge "
                "is not overridden: it will never merge"
            )
        limits: list[str] = []
        if self.every_n_steps is not None:
            try:
                total = float(trainer.estimated_stepping_batches)
            except Exception:  # no train dataloader length known
                return None
            if total >= self.every_n_steps:
                return None
            limits.append(f"every_n_steps={self.every_n_steps} > {int(total)} optimizer steps in this fit")
        if self.every_n_epochs is not None:
            max_epochs = trainer.max_epochs
            if max_epochs is None or max_epochs < 0 or max_epochs >= self.every_n_epochs:
                return None
            limits.append(f"every_n_epochs={self.every_n_epochs} > max_epochs={max_epochs}")
        return "MergeCallback's schedule never fires: " + " and ".join(limits)

    def _warn_never(self, message: str) -> None:
        if not self._warned_never:
            self._warned_never = True
            rank_zero_warn(message)

    # ------------------------------------------------------------------ branches

    def _live_label(self, pl_module: pl.LightningModule, default: str) -> str:
        label = self.live_task or getattr(pl_module, "current_task", None)
        return str(label) if label is not None else default

    def _branches(self, pl_module: pl.LightningModule) -> list[_Branch]:
        if self._zero3:
            return self._zero3_branches(pl_module)
        if self.mode == "live":
            assert isinstance(pl_module, BranchedModule)
            return [
                _Branch(
                    t, f"live:{t}",
                    StateDictSource(float_state(pl_module.branches[t]), origin=f"branch {t!r}"), live=True,
                )
                for t in pl_module.task_names
            ]
        assert self._base is not None
        out = [
            _Branch(t, f"checkpoint:{t}", StateDictSource(w, origin=f"checkpoint {t!r}"))
            for t, w in self._checkpoints.items()
        ]
        out += [_Branch(s.task, f"snapshot:{i}", s.source(self._base, i)) for i, s in enumerate(self._snapshots)]
        if self.include_live:
            out.append(
                _Branch(
                    self._live_label(pl_module, "live"),
                    "live",
                    StateDictSource(float_state(pl_module), origin="live model", device="cpu"),
                    live=True,
                )
            )
        return out

    def _zero3_branches(self, pl_module: pl.LightningModule) -> list[_Branch]:
        """The same branches as tensor sets that hold this rank's partitions (no gather)."""
        if self.mode == "live":
            assert isinstance(pl_module, BranchedModule)
            return [
                _Branch(t, f"live:{t}", ParamSet.from_module(pl_module.branches[t], origin=f"branch {t!r}"), live=True)
                for t in pl_module.task_names
            ]
        out = [_Branch(t, f"checkpoint:{t}", source) for t, source in self._checkpoint_sets.items()]
        out += [_Branch(s.task, f"snapshot:{i}", s.shards) for i, s in enumerate(self._snapshots)]
        if self.include_live:
            live = ParamSet.from_module(pl_module, origin="live model")
            out.append(_Branch(self._live_label(pl_module, "live"), "live", live, live=True))
        return out

    def _coefficient_list(self, branches: Sequence[_Branch]) -> list[float] | None:
        if self.coefficients is None:
            return None
        if isinstance(self.coefficients, Mapping):
            return [float(self.coefficients.get(b.task, 1.0)) for b in branches]
        return [float(c) for c in self.coefficients]

    def _capture(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        index = len(self._snapshots)
        task = self._live_label(pl_module, f"snapshot_{index}")
        snapshot = _Snapshot(task=task, step=trainer.global_step, epoch=trainer.current_epoch)
        if self._zero3:  # each rank copies its own partitions; no delta (that would need the full base)
            snapshot.shards = ShardSnapshot.capture(
                ParamSet.from_module(pl_module), dtype=self.snapshot_dtype, origin=f"snapshot {index} ({task})"
            )
            self._snapshots.append(snapshot)
            return
        assert self._base is not None
        delta = compute_delta(float_state(pl_module), self._base, self.snapshot_dtype)
        if self.snapshot_dir is None:
            snapshot.delta = delta
        else:
            path = self.snapshot_dir / f"snapshot_{index:04d}_{task}.safetensors"
            if trainer.is_global_zero:
                from safetensors.torch import save_file

                save_file(delta, str(path))
            trainer.strategy.barrier("merge_callback_snapshot")
            snapshot.path = str(path)
        self._snapshots.append(snapshot)

    # ------------------------------------------------------------------ merge

    def _compute_merge(self, trainer: pl.Trainer, pl_module: pl.LightningModule, branches: list[_Branch]) -> dict[str, Tensor]:
        if self.mode == "live":
            assert isinstance(pl_module, BranchedModule)
            base: Mapping[str, Tensor] = float_state(pl_module.base)
        else:
            assert self._base is not None
            base = self._base
        distributed = trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
        if not distributed:
            return merge_state_dicts(
                self.method,
                StateDictSource(base, origin="base"),
                [b.source for b in branches],
                coefficients=self._coefficient_list(branches),
                routing=self.routing,
                compute_dtype=self.compute_dtype,
                seed=self.seed + self._num_merges,
            )
        # DDP: every rank merges its share of the tensors (the plan), owners broadcast the results.
        result = DistributedMerger(
            self.method,
            routing=self.routing,
            compute_dtype=self.compute_dtype,
            seed=self.seed + self._num_merges,
            engine="replica",
            group=self._group,
        ).merge(
            None,
            StateDictSource(base, origin="base"),
            [b.source for b in branches],
            coefficients=self._coefficient_list(branches),
            collect=True,
        )
        assert result.merged is not None
        self.last_merge_stats = result.stats
        return result.merged

    def _compute_merge_zero3(self, pl_module: pl.LightningModule, branches: list[_Branch]) -> MergedShards:
        """Merge on the partitions where they live; returns this rank's share of the result."""
        if self.mode == "live":
            assert isinstance(pl_module, BranchedModule)
            first = pl_module.branches[pl_module.task_names[0]]
            target = MergedShards(dict(first.named_parameters()), "merged backbone")
            base: TensorSet = ParamSet.from_module(pl_module.base, origin="BranchedModule.base")
        else:
            assert self._base_set is not None
            target = MergedShards(dict(pl_module.named_parameters()), "merged model")
            base = self._base_set
        result = self._merger(seed=self.seed + self._num_merges).merge(
            target, base, [b.source for b in branches], coefficients=self._coefficient_list(branches)
        )
        self.last_merge_stats = result.stats
        return target

    def _merge_and_evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        start = time.perf_counter()
        branches = self._branches(pl_module)
        if not branches:
            if not self._warned_empty:
                self._warned_empty = True
                rank_zero_warn(
                    f"MergeCallback: merge skipped at step {trainer.global_step}: no snapshot captured yet and "
                    "include_live=False (should_merge fired before should_snapshot)"
                )
            return
        merged: Any = (
            self._compute_merge_zero3(pl_module, branches)
            if self._zero3
            else self._compute_merge(trainer, pl_module, branches)
        )
        merge_seconds = time.perf_counter() - start
        scores: dict[str, float] = {}
        if self.tasks:
            merged_scores = self._score_merged(trainer, pl_module, merged, branches)
            branch_scores = self._score_branches(trainer, pl_module, branches) if self.evaluate_branches else {}
            primary = {t: spec.primary_name for t, spec in self.tasks.items()}
            scores = summarize_scores(merged_scores, branch_scores, primary=primary)
        if self.adopt:
            self._adopt(pl_module, merged)
        if self._zero3:
            self.last_merged_shards = merged
        else:
            self.last_merged = merged
        self._num_merges += 1
        self._merges_this_fit += 1
        record: dict[str, Any] = {
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "branches": [b.task for b in branches],
            "merge/seconds": merge_seconds,
            "merge/total_seconds": time.perf_counter() - start,
            **scores,
        }
        self.history.append(record)
        logged = {k: float(v) for k, v in record.items() if k not in ("step", "epoch", "branches")}
        for logger in trainer.loggers:
            logger.log_metrics(logged, step=trainer.global_step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in logged.items()})

    @contextmanager
    def _swap(self, pl_module: pl.LightningModule) -> Iterator[Any]:
        """Weights loaded for scoring, restored bit for bit on exit.

        Under ZeRO-3 only the working partitions are touched (never the fp32 master), so the
        restore is exact and the optimizer never sees the swapped values.
        """
        self._swapped = True
        try:
            if self._zero3:
                with swapped(ParamSet.from_module(pl_module)) as zero3_swap:
                    yield zero3_swap
            else:
                swap = WeightSwap(pl_module)
                try:
                    yield swap
                finally:
                    swap.restore()
        finally:
            self._swapped = False

    def _values(self, pl_module: pl.LightningModule, source: Any, names: Sequence[str]) -> dict[str, Tensor]:
        """``names`` read from a branch source, as :meth:`_swap`'s ``load`` takes them."""
        if self._zero3:
            return local_values(source, ParamSet.from_module(pl_module), names)
        return {k: source.get(k) for k in names}

    def _shard(self, trainer: pl.Trainer) -> tuple[int, int] | None:
        return (trainer.global_rank, trainer.world_size) if trainer.world_size > 1 else None

    def _score(self, trainer: pl.Trainer, pl_module: pl.LightningModule, task: str) -> dict[str, float]:
        spec = self.tasks[task]
        if not self._zero3 or trainer.world_size == 1:
            return evaluate_task(pl_module, task, spec, device=pl_module.device, shard=self._shard(trainer))
        # ZeRO-3: every forward gathers parameters collectively, so every rank must run the same
        # number of forwards. Split the batches only when they divide evenly; otherwise every
        # rank scores every batch with torchmetrics' sync off (identical weights: identical scores).
        loader = spec.batches()
        length = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
        if length is not None and length % trainer.world_size == 0:
            return evaluate_task(pl_module, task, spec, device=pl_module.device, shard=self._shard(trainer))
        with metrics_unsynced(spec.collection):
            return evaluate_task(pl_module, task, spec, device=pl_module.device, shard=None)

    def _own_branch(self, branches: Sequence[_Branch], task: str) -> _Branch | None:
        own = [b for b in branches if b.task == task]
        return own[-1] if own else None

    def _score_merged(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, merged: Any, branches: list[_Branch]
    ) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        values: Mapping[str, Tensor] = merged.values if self._zero3 else merged
        with self._swap(pl_module) as swap:
            if self.mode == "live":
                assert isinstance(pl_module, BranchedModule)
                swap.load({f"branches.{t}.{k}": v for t in pl_module.task_names for k, v in values.items()})
                for task in self.tasks:
                    out[task] = self._score(trainer, pl_module, task)
                return out
            if self._zero3:  # merged holds no ignored tensor: find them among the parameters
                params = ParamSet.from_module(pl_module)
                ignored = [k for k in params.names() if self.routing.route(k, params.shape(k)) == "ignore"]
                live_ignored = {k: v.clone() for k, v in local_values(params, params, ignored).items()}
            else:
                ignored = [k for k, v in values.items() if self.routing.route(k, tuple(v.shape)) == "ignore"]
                live_ignored = {k: v.clone() for k, v in float_state(pl_module).items() if k in ignored}
            swap.load(values)
            for task in self.tasks:
                own = self._own_branch(branches, task)
                if ignored:
                    heads = live_ignored if own is None or own.live else self._values(pl_module, own.source, ignored)
                    swap.load(heads)
                out[task] = self._score(trainer, pl_module, task)
        return out

    def _score_branches(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, branches: list[_Branch]
    ) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for task in self.tasks:
            own = self._own_branch(branches, task)
            if own is None or own.live:
                out[task] = self._score(trainer, pl_module, task)  # the live weights as they are
            elif own.key in self._score_cache:
                out[task] = self._score_cache[own.key]
            else:
                with self._swap(pl_module) as swap:
                    names = own.source.names() if self._zero3 else own.source.keys()
                    if self._zero3:  # parameters only: ZeRO-3 merges and swaps parameters, not buffers
                        names = [k for k in names if k in ParamSet.from_module(pl_module).params]
                    swap.load(self._values(pl_module, own.source, names))
                    out[task] = self._score_cache[own.key] = self._score(trainer, pl_module, task)
        return out

    @torch.no_grad()
    def _adopt(self, pl_module: pl.LightningModule, merged: Any) -> None:
        if self._zero3:  # partitions and fp32 masters (so the next optimizer step starts from them)
            if self.mode == "live":
                assert isinstance(pl_module, BranchedModule)
                modules = [pl_module.base] + [pl_module.branches[t] for t in pl_module.task_names]
                adopt_values([ParamSet.from_module(m) for m in modules], merged.values)
            else:
                adopt_values([ParamSet.from_module(pl_module)], merged.values)  # ignored tensors are not in it
            return
        if self.mode == "live":
            assert isinstance(pl_module, BranchedModule)
            targets = [pl_module.base] + [pl_module.branches[t] for t in pl_module.task_names]
            for target in targets:
                state = target.state_dict(keep_vars=True)
                for name, value in merged.items():
                    state[name].copy_(value.to(state[name].device, state[name].dtype))
            return
        state = pl_module.state_dict(keep_vars=True)
        for name, value in merged.items():
            if self.routing.route(name, tuple(value.shape)) != "ignore":
                state[name].copy_(value.to(state[name].device, state[name].dtype))

    # ------------------------------------------------------------------ export

    def _export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.export_dir is not None
        if self.last_merged is None or self._latest_merge_step != trainer.global_step:
            merged = self._compute_merge(trainer, pl_module, self._branches(pl_module))
        else:
            merged = self.last_merged
        if not trainer.is_global_zero:
            return
        heads: dict[str, Tensor] = {}
        if isinstance(pl_module, BranchedModule):
            heads = {f"heads.{k}": v for k, v in float_state(pl_module.heads).items()}
        metadata = {
            "method": getattr(self.method, "registered_name", self.method.name),
            "parameters": self.method.params.model_dump(),
            "trained with": f"drm_lightning MergeCallback, step {trainer.global_step}",
        }
        _write_export(self.export_dir, merged, heads, metadata)
        rank_zero_info(f"MergeCallback: exported the merged model to {self.export_dir}")


def _write_export(
    folder: Path, merged: Mapping[str, Tensor], heads: Mapping[str, Tensor], metadata: Mapping[str, Any]
) -> None:
    from safetensors.torch import save_file

    from drm_lightning.sources.writer import HFFolderWriter

    with HFFolderWriter(folder, overwrite=True, metadata=metadata) as writer:
        for name, tensor in merged.items():
            writer.add(name, tensor.detach().to("cpu").contiguous())
    if heads:
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in heads.items()}
        save_file(tensors, str(folder / "heads.safetensors"))


def _is_safetensors(path: Path) -> bool:
    return path.suffix == ".safetensors" or (path.is_dir() and any(path.glob("*.safetensors")))


def _check_strategy(trainer: pl.Trainer, *, adopt: bool, live: bool) -> bool:
    """Refuse unsupported strategies; returns whether the strategy is DeepSpeed ZeRO-3."""
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, SingleDeviceStrategy

    strategy = trainer.strategy
    name = type(strategy).__name__
    if isinstance(strategy, DeepSpeedStrategy):
        if strategy.zero_stage_3:
            return True
        if adopt:
            raise NotImplementedError(
                "MergeCallback(adopt=True) is not supported with DeepSpeed ZeRO-1/2: the optimizer's fp32 "
                "master weights would overwrite the adopted weights at the next step. Use adopt=False, "
                "ZeRO-3 or DDP."
            )
        return False
    try:
        from lightning.pytorch.strategies import ModelParallelStrategy
    except ImportError:  # older Lightning
        ModelParallelStrategy = FSDPStrategy  # type: ignore[misc,assignment]
    if isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)):
        raise NotImplementedError(
            f"MergeCallback does not support {name}: parameters are sharded across ranks. Use DDP or a "
            "single device."
        )
    if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        raise NotImplementedError(
            f"MergeCallback supports single-device, DDP (ddp, ddp_spawn) and DeepSpeed (ZeRO-1/2/3) "
            f"strategies; got {name}"
        )
    return False
