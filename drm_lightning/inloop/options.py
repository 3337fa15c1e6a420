"""The options both in-loop front ends share: checked once, and the core built from them.

:class:`MergeOptions` holds what ``MergeCallback`` and ``MergeHook`` are both given (method,
tasks, branches, schedules, adoption, routing, export, ...). The front ends pass their keyword
arguments in (:meth:`MergeOptions.from_arguments`), keep their own (Lightning:
``validate_merged``; Accelerate: ``accelerator``, ``model``, ``should_merge``, ``enabled``) and
ask for a :class:`~drm_lightning.inloop.MergeCore` with :meth:`MergeOptions.build_core`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from drm_lightning.evaluation import TaskSpec
from drm_lightning.inloop.alpha import AlphaGridArg, check_alpha_grid
from drm_lightning.inloop.core import MergeCore, method_from
from drm_lightning.inloop.providers import (
    BranchProvider,
    Kind,
    LiveBranches,
    SingleModelBranches,
    parse_branches,
)
from drm_lightning.inloop.schedule import Schedule, check_every
from drm_lightning.merge.routing import Routing
from drm_lightning.methods import MergeMethod

PathLike = str | os.PathLike[str]
BranchesArg = Literal["live", "snapshots"] | Sequence[PathLike] | Mapping[str, PathLike]
Message = Callable[[str], None]
SNAPSHOT_SCHEDULE = ("snapshot_every_n_steps", "snapshot_every_n_epochs")


@dataclass(frozen=True)
class MergeOptions:
    """What to merge, when, and what to do with the merge — shared by both front ends.

    The arguments are those of ``MergeCallback`` / ``MergeHook`` of the same names (see their
    docstrings). Construction checks them all, before any training: the method and its
    parameters, the schedules, ``final_weights``, ``branches`` and snapshot settings outside
    ``branches="snapshots"``, ``alpha_grid`` (normalised to a tuple); ``tasks``, and whether
    an α search can score with them, are checked when the core is built.

    Attributes set at construction (not arguments): ``merge_method`` (the
    :class:`~drm_lightning.methods.MergeMethod`), ``mode`` (``"live"``, ``"snapshots"`` or
    ``"checkpoints"``) and ``paths`` (``{task: checkpoint path}``).

    Example:
        >>> options = MergeOptions("ties", method_params={"density": 0.5}, every_n_steps=10)
        >>> options.mode, options.merge_method.params.density
        ('live', 0.5)
        >>> MergeOptions(snapshot_every_n_steps=2)
        Traceback (most recent call last):
        ...
        ValueError: snapshot_every_n_steps is only used with branches='snapshots'
    """

    method: str | MergeMethod = "drm"
    _: KW_ONLY
    tasks: Mapping[str, TaskSpec] | None = None
    branches: BranchesArg = "live"
    every_n_steps: int | None = None
    every_n_epochs: int | None = None
    snapshot_every_n_steps: int | None = None
    snapshot_every_n_epochs: int | None = None
    adopt: bool = False
    include_live: bool | None = None
    live_task: str | None = None
    base: PathLike | Mapping[str, Tensor] | None = None
    routing: Routing | None = None
    coefficients: Sequence[float] | Mapping[str, float] | None = None
    compute_dtype: torch.dtype = torch.float32
    seed: int = 0
    snapshot_dir: PathLike | None = None
    snapshot_dtype: torch.dtype | None = None
    evaluate_branches: bool = True
    export_dir: PathLike | None = None
    final_weights: Literal["live", "merged"] = "live"
    method_params: Mapping[str, Any] | None = None
    trust_pickles: bool = False
    alpha_grid: AlphaGridArg = None
    merge_method: MergeMethod = field(init=False, repr=False, compare=False)
    mode: Kind = field(init=False, repr=False, compare=False)
    paths: dict[str, Path] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise and derive once, here
        set_(self, "merge_method", method_from(self.method, self.method_params))
        for name in ("every_n_steps", "every_n_epochs", *SNAPSHOT_SCHEDULE):
            check_every(name, getattr(self, name))
        if self.final_weights not in ("live", "merged"):
            raise ValueError(
                f"final_weights must be 'live' or 'merged', got {self.final_weights!r}"
            )
        mode, paths = parse_branches(self.branches)
        set_(self, "mode", mode)
        set_(self, "paths", paths)
        snapshot_settings = [name for name in SNAPSHOT_SCHEDULE if getattr(self, name)]
        if mode != "snapshots" and snapshot_settings:
            verb = "is" if len(snapshot_settings) == 1 else "are"
            raise ValueError(
                f"{' and '.join(snapshot_settings)} {verb} only used with branches='snapshots'"
            )
        set_(self, "routing", self.routing or Routing())
        set_(self, "alpha_grid", check_alpha_grid(self.alpha_grid))
        for name in ("export_dir", "snapshot_dir"):
            value = getattr(self, name)
            set_(self, name, Path(value) if value is not None else None)

    @classmethod
    def from_arguments(cls, arguments: Mapping[str, Any]) -> MergeOptions:
        """The options among a front end's ``arguments`` (its ``locals()``), taken by name;
        the others (the front end's own) are left out, options it does not take keep their
        defaults.

        Example:
            >>> MergeOptions.from_arguments({"method": "ties", "model": None}).method
            'ties'
        """
        return cls(
            **{f.name: arguments[f.name] for f in fields(cls) if f.init and f.name in arguments}
        )

    @property
    def live_included(self) -> bool:
        """Whether the live model is a branch: ``include_live``, default with checkpoints."""
        return self.mode == "checkpoints" if self.include_live is None else self.include_live

    def provider(self) -> BranchProvider:
        """A new provider of the branches (each front end holds its own)."""
        if self.mode == "live":
            return LiveBranches()
        return SingleModelBranches(
            self.mode,
            paths=self.paths,
            include_live=self.live_included,
            live_task=self.live_task,
            base=self.base,
            snapshot_dir=self.snapshot_dir,  # type: ignore[arg-type]  # a Path since __post_init__
            snapshot_dtype=self.snapshot_dtype,
            trust_pickles=self.trust_pickles,
        )

    def build_core(self, *, name: str, warn: Message, info: Message) -> MergeCore:
        """The in-loop core of a front end called ``name`` (used in messages), with schedules.

        Example:
            >>> core = MergeOptions("drm", every_n_steps=5).build_core(
            ...     name="MyLoop", warn=print, info=print
            ... )
            >>> core.name, core.merge_schedule.every_n_steps
            ('MyLoop', 5)
        """
        core = MergeCore(
            self.merge_method,
            self.provider(),
            tasks=self.tasks,
            routing=self.routing,
            coefficients=self.coefficients,
            compute_dtype=self.compute_dtype,
            seed=self.seed,
            evaluate_branches=self.evaluate_branches,
            adopt=self.adopt,
            name=name,
            warn=warn,
            info=info,
            alpha_grid=self.alpha_grid,
        )
        core.merge_schedule = Schedule(self.every_n_steps, self.every_n_epochs)
        core.snapshot_schedule = Schedule(self.snapshot_every_n_steps, self.snapshot_every_n_epochs)
        return core

    def refuse_under_zero3(self, provider: BranchProvider, *, name: str) -> None:
        """Refuse what the ZeRO-3 route cannot do: one ``NotImplementedError`` listing all."""
        problems: list[str] = []
        if self.export_dir is not None:
            problems.append(
                "export_dir= (exporting would assemble the whole merged model on one rank; "
                "export after training from a consolidated checkpoint instead)"
            )
        if self.final_weights == "merged":
            problems.append(
                "final_weights='merged' (use adopt=True: ZeRO-3 adoption writes the fp32 masters)"
            )
        if self.alpha_grid is not None:
            problems.append(
                "alpha_grid= (the α search rescales whole merged tensors; under ZeRO-3 a merge "
                "is this rank's partitions)"
            )
        if isinstance(provider, SingleModelBranches):
            problems += provider.zero3_problems()
        if problems:
            raise NotImplementedError(
                f"{name} under DeepSpeed ZeRO-3 does not support:\n- " + "\n- ".join(problems)
            )
