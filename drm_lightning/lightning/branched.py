"""A LightningModule holding K task branches of one backbone, for merging live branches."""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.cloud_io import _load as pl_load
from torch import Tensor, nn
from torch.nn import functional as F

from drm_lightning.inloop.branched import BranchedModel, Features
from drm_lightning.sources.trust import UntrustedPickleError

LossFn = Callable[[Tensor, Tensor], Tensor]
ARCHITECTURE_KEY = "branched_module_architecture"
FEATURES_KEY = "branched_module_features"  # the name of features= (a string), or None


class BranchedModule(BranchedModel, pl.LightningModule):
    """K copies of one backbone ("branches") with one head per task, trained side by side.

    :class:`~drm_lightning.inloop.BranchedModel` (its layout, ``forward``, :meth:`predict_task`
    and :meth:`split_batch`) as a ``LightningModule``, with a loss, an optimizer and
    checkpoints.

    ``branches[task]`` and ``heads[task]`` form the model of ``task``; ``base`` is a frozen copy
    of the backbone as given (the merge base: task vectors are ``branch - base``). The module
    is what :class:`~drm_lightning.lightning.MergeCallback` merges with ``branches="live"``:
    only backbones are merged, heads stay per task. Memory: K + 1 copies of the backbone.

    Batches routed by :meth:`training_step`:

    * a mapping ``{task: batch}`` — what Lightning's ``CombinedLoader`` yields when ``fit`` gets
      a dict of dataloaders (tasks missing from the dict, or ``None``, are skipped);
    * a tuple ``(task, batch)`` from one dataloader that tags its batches. Under DDP, a step
      that trains only some branches needs ``strategy="ddp_find_unused_parameters_true"``.

    Checkpoints hold the hyperparameters and the architecture (as bytes, one more copy of the
    backbone and heads), so ``BranchedModule.load_from_checkpoint(path, trust_pickles=True)``
    rebuilds the module from a trusted checkpoint alone (see :meth:`load_from_checkpoint`).

    Every task's loss is summed: branches share no parameter, so each one gets exactly the
    gradient of its own task.

    A transformers backbone works as it is (``BranchedModule(BertModel(config), heads)``): its
    ``ModelOutput`` reaches the heads as the pooled output, else the first token of
    ``last_hidden_state`` (:func:`~drm_lightning.inloop.branched.backbone_features`); pass
    ``features=`` for anything else, e.g. ``lambda out: out.last_hidden_state[:, -1]`` for a
    decoder-only model such as Llama. A tensor output reaches the heads unchanged.

    Override :meth:`task_loss` and :meth:`predict_task` for batches that are not ``(x, y)``,
    and :meth:`configure_optimizers` for another optimizer (default ``AdamW``).

    Args:
        backbone: The shared starting point, copied K + 1 times (it is not used afterwards).
        heads: ``{task: head}``; task names must be valid ``nn.ModuleDict`` keys (no ``.``).
        features: ``features(backbone_output) -> head_input``, holding no weights; default the
            pooled output / first token of a transformers output, any other output unchanged.
            Like ``backbone=``, pass it again to :meth:`load_from_checkpoint` (unless it is
            rebuilt with ``trust_pickles=True`` and could be pickled: not a lambda).
        loss_fn: ``loss_fn(logits, target)``; default cross-entropy.
        lr: Learning rate of the default optimizer.
        weight_decay: Weight decay of the default optimizer.

    Example:
        >>> model = BranchedModule(nn.Linear(4, 8), {"a": nn.Linear(8, 2), "b": nn.Linear(8, 3)})
        >>> model.task_names
        ['a', 'b']
        >>> model(torch.zeros(5, 4), "b").shape
        torch.Size([5, 3])
        >>> batch = {"a": (torch.zeros(5, 4), torch.zeros(5, dtype=torch.long)), "b": None}
        >>> [task for task, _ in model.split_batch(batch)]
        ['a']
    """

    def __init__(
        self,
        backbone: nn.Module,
        heads: Mapping[str, nn.Module],
        *,
        features: Features | None = None,
        loss_fn: LossFn = F.cross_entropy,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(backbone, heads, features=features)
        # modules and callables: on_save_checkpoint
        self.save_hyperparameters(ignore=["backbone", "heads", "loss_fn", "features"])
        self.loss_fn = loss_fn
        self.lr = lr
        self.weight_decay = weight_decay

    def task_loss(self, task: str, batch: Any) -> Tensor:
        """Loss of one task's batch; default ``loss_fn(self(x, task), y)`` for ``batch=(x, y)``."""
        x, y = batch
        return self.loss_fn(self(x, task), y)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store backbone, heads, loss and features pickled, for :meth:`load_from_checkpoint`.

        Bytes keep the checkpoint loadable weights-only (resuming ``fit`` is unaffected); they are
        unpickled only by ``load_from_checkpoint(..., trust_pickles=True)``. Skipped when the
        parameters are ZeRO-3 partitions. A ``loss_fn`` or ``features`` that cannot be pickled
        (a lambda, a local function) is left out: pass it again at load. The name of
        ``features`` is stored as a string, so a load that forgets it fails by name.
        """
        checkpoint[FEATURES_KEY] = _callable_name(self.features)
        if any(hasattr(p, "ds_id") for p in self.parameters()):
            return
        parts: dict[str, Any] = {"backbone": self.base, "heads": dict(self.heads), "unstored": {}}
        for name in ("loss_fn", "features"):
            value = getattr(self, name)
            try:
                pickle.dumps(value)
            except (pickle.PicklingError, AttributeError, TypeError):
                parts["unstored"][name] = _callable_name(value)
            else:
                parts[name] = value
        buffer = io.BytesIO()
        torch.save(parts, buffer)
        checkpoint[ARCHITECTURE_KEY] = buffer.getvalue()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint trained with ``features=`` loaded into a module without it."""
        stored = checkpoint.get(FEATURES_KEY)
        if stored is not None and self.features is None:
            raise _FeaturesMissing(
                f"the checkpoint was trained with features={stored}; pass features= (the same "
                "callable) when loading it, as backbone= and heads="
            )

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: Any,
        map_location: Any = None,
        hparams_file: Any = None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        *,
        trust_pickles: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Lightning's ``load_from_checkpoint``, backbone and heads rebuilt from the checkpoint.

        Pass ``backbone=`` and ``heads=`` (modules of the same architecture; the weights come from
        the checkpoint) and the ``features=`` it was trained with, or ``trust_pickles=True`` to
        unpickle the architecture stored by :meth:`on_save_checkpoint` (that runs code from the
        file: trusted files only; a lambda ``features``/``loss_fn`` must still be passed).

        The checkpoint is loaded weights-only wherever it is (a local path, an ``http(s)://``
        URL, which Lightning would fully unpickle, or an fsspec path such as ``s3://``) unless
        ``trust_pickles=True``; ``weights_only=False`` alone is refused (the opt-in is
        ``trust_pickles``).

        Raises:
            UntrustedPickleError: (a ``ValueError``) the checkpoint holds Python objects other
                than tensors and ``trust_pickles`` is false; the message names the file.
            ValueError: neither ``backbone``/``heads`` nor ``trust_pickles=True`` is given, the
                checkpoint holds no architecture (written by another module or under ZeRO-3),
                or it was trained with a ``features=`` (or an unpicklable ``loss_fn``) not given.
        """
        if weights_only is False and not trust_pickles:
            raise ValueError(
                f"{checkpoint_path}: weights_only=False unpickles the checkpoint, which can run "
                "code from it; pass trust_pickles=True to opt in (trusted files only)"
            )
        if weights_only is None:
            weights_only = not trust_pickles
        if "backbone" not in kwargs or "heads" not in kwargs:
            with _refusing_pickles(checkpoint_path):
                stored = pl_load(checkpoint_path, map_location="cpu", weights_only=True)
            stored = stored.get(ARCHITECTURE_KEY)
            if stored is None:
                raise ValueError(
                    f"{checkpoint_path}: the checkpoint holds no BranchedModule architecture; pass "
                    "backbone= and heads= (modules of the trained architecture; the weights come "
                    "from the checkpoint)"
                )
            if not trust_pickles:
                raise ValueError(
                    f"{checkpoint_path}: rebuilding the backbone and heads unpickles them from the "
                    "checkpoint, which can run code; pass trust_pickles=True if you trust the "
                    "file, or backbone= and heads="
                )
            parts = torch.load(io.BytesIO(stored), map_location="cpu", weights_only=False)
            missing = {k: v for k, v in parts.get("unstored", {}).items() if k not in kwargs}
            if missing:
                raise ValueError(
                    f"{checkpoint_path}: "
                    + ", ".join(f"{k}={v}" for k, v in missing.items())
                    + " could not be stored in the checkpoint (not picklable, e.g. a lambda); "
                    + "pass "
                    + " and ".join(f"{k}=" for k in missing)
                    + " again"
                )
            for name in ("backbone", "heads", "loss_fn", "features"):
                if name in parts:
                    kwargs.setdefault(name, parts[name])
        try:
            with _refusing_pickles(checkpoint_path):
                return super().load_from_checkpoint(
                    checkpoint_path, map_location, hparams_file, strict, weights_only, **kwargs
                )
        except _FeaturesMissing as err:
            raise ValueError(f"{checkpoint_path}: {err}") from None

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Sum of the per-task losses of the batch; logs ``train/<task>/loss``."""
        total: Tensor | None = None
        for task, task_batch in self.split_batch(batch):
            loss = self.task_loss(task, task_batch)
            self.log(f"train/{task}/loss", loss.detach(), on_step=True, on_epoch=False)
            total = loss if total is None else total + loss
        if total is None:
            raise ValueError("the batch holds no task data (every entry is None)")
        return total

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """``AdamW`` over the branches and heads (the base stays frozen)."""
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)


class _FeaturesMissing(ValueError):
    """A checkpoint trained with ``features=`` loaded into a module without one."""


def _callable_name(fn: Any) -> str | None:
    """``module.qualname`` of a callable (what messages name), ``None`` for ``None``."""
    if fn is None:
        return None
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    module = getattr(fn, "__module__", None)
    return f"{module}.{name}" if module else name


@contextmanager
def _refusing_pickles(path: Any) -> Iterator[None]:
    """Turn torch's weights-only refusal into :class:`UntrustedPickleError` naming ``path``."""
    try:
        yield
    except pickle.UnpicklingError as err:
        raise UntrustedPickleError(str(path), str(err)) from None
