r"""Merge task branches inside ``Trainer.fit``: a Lightning adapter over the in-loop core.

:class:`MergeCallback` builds :class:`~drm_lightning.inloop.MergeOptions` from its arguments and
holds the :class:`~drm_lightning.inloop.MergeCore` they build; its hooks say when to act.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import Tensor

from drm_lightning.evaluation import TaskSpec
from drm_lightning.inloop import MergeOptions
from drm_lightning.inloop.alpha import AlphaGridArg
from drm_lightning.inloop.backends import gloo_group
from drm_lightning.inloop.options import BranchesArg, PathLike
from drm_lightning.inloop.providers import Snapshot
from drm_lightning.lightning._support import (
    SAVE_WHILE_SWAPPED,
    ZERO3_CHECKPOINT,
    check_strategy,
    resolve_tasks,
)
from drm_lightning.merge.routing import Routing
from drm_lightning.methods import MergeMethod

CHECKPOINT_KEY = "merge_callback"


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

    One line per merge goes to the ``lightning.pytorch`` logger (``INFO``): step, method,
    branches, seconds, averages. ``tasks`` may name the datamodule's validation dataloaders
    instead of holding them (``TaskSpec("a", metric)`` or ``TaskSpec(0, metric)``: by key of a
    dict returned by ``val_dataloader()``, or by index), so the callback can be configured
    from a LightningCLI YAML file.

    Each merge scores the merged model on every task of ``tasks`` (with the task's own head),
    and each task's own branch, then logs ``merged/<task>/<metric>``, ``branch/…``,
    ``normalized/…`` and the ``…/average`` of each task's primary metric to every logger and
    ``trainer.callback_metrics``, and appends the record to :attr:`history` (frozen branches'
    scores cached). The live weights are then restored bit for bit unless ``adopt=True``.

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
      ``export_dir``; with ``final_weights="merged"`` leaves the merged weights in the module
      (as ``WeightAveraging`` leaves the average), otherwise the live branches stay.
    * ``on_validation_epoch_start`` / ``on_test_epoch_start`` (``validate_merged=True``) — swap
      the latest merge in, so that the module's own ``validation_step``/``test_step`` and
      ``self.log`` score the merge (per-task tensors stay live; before the first merge of
      ``trainer.validate``/``test`` a merge is computed, under ZeRO-3 too: the backend starts
      there, once the strategy has partitioned the module); ``..._epoch_end`` swaps back, before
      ``ModelCheckpoint`` saves.
    * ``state_dict`` / ``load_state_dict`` — small counters and the history;
      ``on_save_checkpoint`` / ``on_load_checkpoint`` — base and snapshot tensors under
      ``checkpoint["merge_callback"]``; refuses to save while merged weights are swapped in.

    Strategies (every merge goes through :class:`~drm_lightning.distributed.DistributedMerger`,
    which picks its engine; the callback only picks how weights are held,
    :mod:`~drm_lightning.inloop.backends`):

    * single device, DDP (``ddp``, ``ddp_spawn``), DeepSpeed ZeRO-1/2 (``adopt=False`` only: the
      fp32 master would overwrite adopted weights): whole tensors. Under DDP each rank merges
      its share of the tensors and the owners broadcast, so merged weights are bit-identical on
      every rank; each rank scores a share of the validation batches (torchmetrics syncs).
    * DeepSpeed ZeRO-3: on the partitions where they live, never gathering the model. Scoring
      writes the working partitions only and restores them bit for bit, with the same number of
      forwards on every rank; ``adopt=True`` also writes the fp32 master. Only parameters are
      merged; :attr:`last_merged` stays ``None`` (this rank's share: :attr:`last_merged_shards`);
      checkpoints keep counters and history, not the base or snapshots. Refused at ``setup``
      (``NotImplementedError``): ``export_dir``, ``snapshot_dir``, ``final_weights="merged"``,
      non-safetensors checkpoint branches or base. Details: ``docs/architecture.md``.
    * FSDP and model-parallel strategies: ``NotImplementedError`` at ``setup``.

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
            shards + index, model card; replaced atomically). When the backbone is (or holds)
            a transformers model, the folder has its ``config.json`` and its own tensor names,
            so ``AutoModel.from_pretrained(export_dir)`` loads it; per-task heads (and other
            tensors outside the transformers model) go to ``heads.safetensors`` beside it.
        method_params: Parameters of ``method`` when it is given by name.
        validate_merged: Swap the latest merge in around validation and test epochs (above).
        final_weights: ``"live"`` (default) or ``"merged"``: what the module holds after
            ``fit`` (``"merged"``: one last merge, unless the last step merged, adopted into the
            module; ignored tensors stay live).
        trust_pickles: Allow full unpickling of ``base`` / checkpoint branch files that hold
            more than tensors (they can run code). Default: pickles load weights-only and
            anything else is refused (see :mod:`drm_lightning.sources.trust`).
        alpha_grid: Search the scale α of the merged delta at every merge: the merge is computed
            once and ``base + α·Δ`` scored on ``tasks`` for each α of the list (``"default"``:
            0.1, 0.2, …, 1.0); the best ``merged/average`` is kept (a tie: the smaller α),
            logged as ``alpha`` beside every α's ``alpha/<α>/merged/…`` and
            ``alpha/<α>/normalized/…`` scores, and kept in :meth:`state_dict` (a merge made
            later outside the schedule, e.g. the export of a resumed run, uses it). For the
            task-vector family α is its ``scaling`` (leave it at 1.0). Needs ``tasks``; not
            under ZeRO-3 (:mod:`~drm_lightning.inloop.alpha`).

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
        validate_merged: bool = False,
        final_weights: Literal["live", "merged"] = "live",
        alpha_grid: AlphaGridArg = None,
    ) -> None:
        #: The options shared with ``MergeHook`` (:class:`~drm_lightning.inloop.MergeOptions`).
        self.options = MergeOptions.from_arguments(locals())
        self.validate_merged = validate_merged
        self.core = self.options.build_core(
            name="MergeCallback", warn=rank_zero_warn, info=rank_zero_info
        )
        self.tasks: dict[str, TaskSpec] = self.core.tasks
        self._zero3 = False
        self._fitting = False
        self._validation = ExitStack()

    # ------------------------------------------------------------------ views of options and core
    #: The :class:`~drm_lightning.methods.MergeMethod`.
    method = property(lambda self: self.options.merge_method)
    #: ``"live"``, ``"snapshots"`` or ``"checkpoints"``.
    mode = property(lambda self: self.options.mode)
    every_n_steps = property(lambda self: self.core.merge_schedule.every_n_steps)
    every_n_epochs = property(lambda self: self.core.merge_schedule.every_n_epochs)
    snapshot_every_n_steps = property(lambda self: self.core.snapshot_schedule.every_n_steps)
    snapshot_every_n_epochs = property(lambda self: self.core.snapshot_schedule.every_n_epochs)
    #: The weights of the latest merge (merge scope only; ``None`` under ZeRO-3).
    last_merged = property(lambda self: self.core.last_merged)
    #: Under ZeRO-3: this rank's share of the latest merge (partitions; full persistent params).
    last_merged_shards = property(lambda self: self.core.last_merged_shards)
    #: This rank's engine statistics of the latest merge (items owned, elements held, traffic).
    last_merge_stats = property(lambda self: self.core.last_merge_stats)
    _snapshots = property(lambda self: self.core.provider.snapshots)
    _base = property(lambda self: getattr(self.core.provider, "base_tensors", None))
    _num_merges = property(lambda self: self.core.num_merges)

    @property
    def history(self) -> list[dict[str, Any]]:
        """One record per merge: step, epoch, branch labels, timings and logged scores."""
        return self.core.history

    @history.setter
    def history(self, value: list[dict[str, Any]]) -> None:
        self.core.history = list(value)

    @property
    def state_key(self) -> str:
        """Unique per configuration, so that several merge callbacks can share a checkpoint."""
        return self._generate_state_key(
            method=getattr(self.method, "registered_name", self.method.name),
            params=repr(sorted(self.method.params.model_dump().items())),
            branches=self.mode if self.mode != "checkpoints" else sorted(self.options.paths),
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
        return self.core.merge_schedule.fires(step_idx, epoch_idx)

    def should_snapshot(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        """Whether to capture the live model (``branches="snapshots"`` only); override to customise.

        Same calling convention as :meth:`should_merge`; it runs first, so a merge at the same
        step includes the new snapshot. The default uses ``snapshot_every_n_steps/epochs``.
        """
        return self.core.snapshot_schedule.fires(step_idx, epoch_idx)

    # ------------------------------------------------------------------ Lightning hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check strategy, tasks, branches and paths; record the base (``fit``; validate/test too
        with ``validate_merged``)."""
        if stage != "fit" and not (self.validate_merged and self.core.backend is None):
            return
        self._zero3 = check_strategy(trainer, adopt=self.options.adopt, live=self.mode == "live")
        resolve_tasks(trainer, self.tasks)
        self.core.check_model(pl_module)
        if not self.tasks:
            rank_zero_info("MergeCallback: no tasks= given; merges run without evaluation.")
        if self._zero3:
            self.options.refuse_under_zero3(self.core.provider, name="MergeCallback")
        else:
            self.core.start(pl_module, self.core.make_backend(partitioned=False))
        if self.mode == "live" and self.options.adopt:
            rank_zero_warn(
                "MergeCallback(adopt=True) with live branches: after every merge, each of the "
                f"{len(self.core.provider.tasks(pl_module) or [])} branches and the base are "
                "overwritten with the merged backbone (periodic consolidation). Each branch's own "
                "progress survives only through the merge; heads and optimizer moments are kept. "
                "Use adopt=False to only evaluate merges."
            )
        if (
            self.mode == "snapshots"
            and not self.options.live_included
            and self.core.snapshot_schedule.empty
            and not is_overridden("should_snapshot", self, MergeCallback)
        ):
            raise ValueError(
                "branches='snapshots' without a snapshot schedule: set snapshot_every_n_steps or "
                "snapshot_every_n_epochs, override should_snapshot, or pass include_live=True"
            )
        self._fitting = stage == "fit"

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Leave the ``fit`` state; the history and the last merge stay available."""
        self._validation.close()
        if stage == "fit":
            self._fitting = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Warn once if the schedule can never fire; under ZeRO-3, record the base and check inputs.

        Under ZeRO-3 this is the first hook where the parameters are partitioned (the strategy
        wraps the model after ``setup``), still before the first training step.
        """
        group = gloo_group(trainer.world_size)
        backend = self.core.make_backend(partitioned=self._zero3, group=group)
        if self._zero3:
            self.core.start(pl_module, backend)
        elif self.core.backend is not None:
            self.core.backend.group = group
        if is_overridden("should_merge", self, MergeCallback):
            return
        try:
            total: float | None = float(trainer.estimated_stepping_batches)
        except Exception:  # no train dataloader length known
            total = None
        reason = self.core.merge_schedule.never_fires(total, trainer.max_epochs)
        if reason and self.core.merge_schedule.empty:
            self.core.warn_once(
                "never",
                f"MergeCallback has {reason} and should_merge is not overridden: "
                "it will never merge",
            )
        elif reason:
            self.core.warn_once(
                "never", f"MergeCallback's schedule never fires: {reason} in this fit"
            )

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: STEP_OUTPUT,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Snapshot and/or merge after an optimizer step, as the predicates decide."""
        self._act(trainer, pl_module, step=trainer.global_step)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Snapshot and/or merge after an epoch, as the predicates decide."""
        self._act(trainer, pl_module, epoch=trainer.current_epoch)

    def _act(self, trainer: pl.Trainer, pl_module: pl.LightningModule, **when: int) -> None:
        core = self.core
        snap = lambda s, e: self.should_snapshot(step_idx=s, epoch_idx=e)  # noqa: E731
        if self.mode == "snapshots" and core.snapshot_schedule.due(predicate=snap, **when):
            core.capture(pl_module, step=trainer.global_step, epoch=trainer.current_epoch)
        if core.merge_schedule.due(
            predicate=lambda s, e: self.should_merge(step_idx=s, epoch_idx=e), **when
        ):
            record = core.merge(pl_module, step=trainer.global_step, epoch=trainer.current_epoch)
            if record is not None:
                logged = {
                    k: float(v) for k, v in record.items() if k not in ("step", "epoch", "branches")
                }
                for logger in trainer.loggers:
                    logger.log_metrics(logged, step=trainer.global_step)
                trainer.callback_metrics.update({k: torch.tensor(v) for k, v in logged.items()})

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Warn if nothing was merged; export; leave the merge in if ``final_weights="merged"``."""
        if self.core.num_merges == 0:
            self.core.warn_once(
                "never",
                f"MergeCallback never merged (every_n_steps={self.every_n_steps}, "
                f"every_n_epochs={self.every_n_epochs}, {trainer.global_step} optimizer steps, "
                f"{trainer.current_epoch} epochs completed)",
            )
        step = trainer.global_step
        export_dir = self.options.export_dir
        if export_dir is not None:
            self.core.export(
                pl_module,
                export_dir,
                step=step,
                front_end="MergeCallback",
                write=trainer.is_global_zero,
            )
            rank_zero_info(f"MergeCallback: exported the merged model to {export_dir}")
        if self.options.final_weights == "merged":
            self.core.adopt_into(pl_module, self.core.latest(pl_module, step=step))
            rank_zero_info(
                "MergeCallback: the module now holds the merged weights (final_weights='merged')."
            )

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """With ``validate_merged``: the latest merge goes into the module for the epoch."""
        if (
            self.validate_merged and self.core.backend is None and self._zero3
        ):  # validate/test outside fit:
            group = gloo_group(
                trainer.world_size
            )  # the parameters are partitioned only from here on
            self.core.start(pl_module, self.core.make_backend(partitioned=True, group=group))
        if not self.validate_merged or self.core.backend is None:
            return
        merged = None
        if self.core.num_merges == 0 and not self._fitting:  # trainer.validate/test: merge now
            merged = self.core.latest(pl_module, step=trainer.global_step)
        self._validation.enter_context(self.core.merged_in(pl_module, merged))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put the live weights back (before ``ModelCheckpoint`` saves)."""
        self._validation.close()

    on_test_epoch_start = on_validation_epoch_start
    on_test_epoch_end = on_validation_epoch_end

    def state_dict(self) -> dict[str, Any]:
        """Small counters, the snapshot index and the history (tensors go to the checkpoint)."""
        return self.core.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the counters and history written by :meth:`state_dict`."""
        self.core.load_state_dict(state_dict)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Store base and snapshot tensors under ``checkpoint["merge_callback"]``.

        Raises:
            RuntimeError: merged weights are swapped into the module (a checkpoint now would
                hold the merged weights as if they were the live ones).
        """
        if self.core.swapped:
            raise RuntimeError(SAVE_WHILE_SWAPPED)
        if self._zero3 and self.mode != "live":
            self.core.warn_once("zero3-ckpt", ZERO3_CHECKPOINT)
        payload = self.core.payload()
        if payload is not None:
            checkpoint.setdefault(CHECKPOINT_KEY, {})[self.state_key] = payload

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Restore base and snapshots; handles the outside-fit, ours and foreign cases."""
        if not self._fitting:
            rank_zero_warn(
                "MergeCallback: loading a checkpoint outside fit; the merge state (base, "
                "snapshots, counters) is not restored. Ignore this if you only "
                "validate/test/predict, or remove the callback."
            )
            return
        payload = checkpoint.get(CHECKPOINT_KEY, {}).get(self.state_key)
        if payload is None:
            detail = self.core.provider.reset(pl_module, self.core.backend)
            others = list(checkpoint.get(CHECKPOINT_KEY, {}))
            origin = (
                f"holds the merge state of other MergeCallback configurations {others}, not of "
                f"{self.state_key}"
                if others
                else "was not written with this callback"
            )
            rank_zero_warn(
                f"MergeCallback: the checkpoint {origin}; {detail}; merge counters start from zero."
            )
            return
        try:
            self.core.load_payload(payload)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"MergeCallback: {err}") from None
        rank_zero_info(
            f"MergeCallback: restored the merge state ({len(self._snapshots)} snapshot(s)) from "
            "the checkpoint."
        )


__all__ = ["CHECKPOINT_KEY", "MergeCallback", "Snapshot"]
