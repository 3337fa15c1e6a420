r"""Where the branches come from: one protocol, three kinds.

A provider knows the model's layout and its branches; the backend
(:mod:`~drm_lightning.inloop.backends`) knows how weights are held. Together they give the
core everything it merges, scores and adopts, whatever the strategy:

* :class:`LiveBranches` — a model with K backbones ``branches[task]``, a frozen ``base`` and
  per-task ``heads`` (:class:`~drm_lightning.inloop.BranchedModel`, or the Lightning
  ``BranchedModule``): backbones are merged against the base; heads stay per task.
* :class:`SingleModelBranches` — one model: earlier checkpoints (``paths``), snapshots of the
  live model captured during training, and optionally the live model itself, merged against
  a base (the weights at the start, or ``base=``). Tensors that ``routing`` sends to
  ``"ignore"`` (e.g. ``Routing(ignore=[r"heads\."])``) are per task: when the merge is scored
  on task *t* they come from *t*'s own branch.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import Tensor, nn

from drm_lightning.distributed import TensorSet
from drm_lightning.inloop.backends import Backend, Merged, Zero3Backend
from drm_lightning.inloop.weights import check_paths, cpu_clone, float_state, load_weights
from drm_lightning.sources import StateDictSource, open_source
from drm_lightning.sources.hf_folder import SAFETENSORS_INDEX

Kind = Literal["live", "snapshots", "checkpoints"]


@dataclass
class Branch:
    """One merge input: task label, a stable key (caches frozen branches' scores), weights."""

    task: str
    key: str
    source: Any
    live: bool = False


@dataclass
class Snapshot:
    """A captured copy of the live model: its task label and where its weights are kept."""

    task: str
    step: int
    epoch: int
    delta: dict[str, Tensor] | None = None  # dense, in memory ...
    path: str | None = None  # ... or a safetensors file of the delta
    shards: Any = None  # ... or, under ZeRO-3, this rank's partitions (a ShardSnapshot)

    @property
    def stored(self) -> Any:
        """What the backend stored."""
        return (
            self.shards
            if self.shards is not None
            else (self.path if self.path is not None else self.delta)
        )


def is_safetensors(path: Path) -> bool:
    """A ``.safetensors`` file or an HF folder of them (readable row-wise under ZeRO-3)."""
    if path.is_dir():
        return any((path / f).is_file() for f in ("model.safetensors", SAFETENSORS_INDEX))
    return path.suffix == ".safetensors"


class BranchProvider(ABC):
    """The branches of one model, in the form the backend holds them."""

    kind: Kind
    #: Per-task tensors (routing ``ignore``) come from each task's own branch when scoring.
    per_task_ignored: bool = False

    @abstractmethod
    def check_model(self, model: nn.Module) -> None:
        """Raise ``TypeError`` if ``model`` does not have the layout this provider needs."""

    @abstractmethod
    def setup(self, model: nn.Module, backend: Backend) -> None:
        """Record the base and check every input from metadata (before the first step)."""

    @abstractmethod
    def base(self, model: nn.Module, backend: Backend) -> Any:
        """The merge base."""

    @abstractmethod
    def branches(self, model: nn.Module, backend: Backend) -> list[Branch]:
        """The merge inputs, in merge order."""

    @abstractmethod
    def target(self, model: nn.Module) -> nn.Module:
        """The module whose tensor names the merge result uses."""

    @abstractmethod
    def swap_values(self, model: nn.Module, merged: Merged) -> dict[str, Tensor]:
        """The merged values as ``backend.swap(model).load`` takes them."""

    @abstractmethod
    def adopt_modules(self, model: nn.Module) -> list[nn.Module]:
        """The modules that receive the merged values on adoption."""

    def tasks(self, model: nn.Module) -> list[str] | None:
        """The task names the model defines, if it defines them."""
        return None

    def heads(self, model: nn.Module) -> dict[str, Tensor]:
        """Per-task tensors written beside an export (``heads.safetensors``)."""
        return {}

    def capture(
        self, model: nn.Module, backend: Backend, *, task: str | None, step: int, epoch: int
    ) -> Snapshot:
        """Capture the live model (snapshots only), labelled ``task`` (default: the live
        model's task, else ``snapshot_<i>``)."""
        raise NotImplementedError(f"branches={self.kind!r} takes no snapshots")

    def payload(self, backend: Backend | None) -> dict[str, Any] | None:
        """Tensors for a checkpoint (``None``: nothing to store)."""
        return {"mode": self.kind}

    def load_payload(self, payload: Mapping[str, Any]) -> None:
        """Restore :meth:`payload`."""

    def reset(self, model: nn.Module, backend: Backend | None) -> str:
        """Forget restored state if a checkpoint holds none of ours; say what the merge uses now."""
        return "the branches and the base are those of the loaded model"

    @property
    def snapshots(self) -> list[Snapshot]:
        """The snapshots captured so far."""
        return []


class LiveBranches(BranchProvider):
    """K live backbones ``model.branches[task]`` merged against ``model.base``; heads per task."""

    kind: Kind = "live"

    def check_model(self, model: nn.Module) -> None:  # noqa: D102
        if not isinstance(
            getattr(model, "branches", None), (Mapping, nn.ModuleDict)
        ) or not isinstance(getattr(model, "base", None), nn.Module):
            raise TypeError(
                "branches='live' needs a model with a frozen `base` module and a `branches` "
                "ModuleDict (BranchedModule or drm_lightning.inloop.BranchedModel); got "
                f"{type(model).__name__}. Use branches='snapshots' or a list of checkpoint paths "
                "for a single model"
            )

    def tasks(self, model: nn.Module) -> list[str]:  # noqa: D102
        return list(getattr(model, "task_names", None) or list(model.branches))  # type: ignore[arg-type]

    def setup(self, model: nn.Module, backend: Backend) -> None:  # noqa: D102
        self.check_model(model)
        inputs = [b.source for b in self.branches(model, backend)]
        backend.check(self.target(model), self.base(model, backend), inputs)

    def base(self, model: nn.Module, backend: Backend) -> Any:  # noqa: D102
        return backend.module_input(model.base, "base")  # type: ignore[arg-type]

    def branches(self, model: nn.Module, backend: Backend) -> list[Branch]:  # noqa: D102
        return [
            Branch(
                t, f"live:{t}", backend.module_input(model.branches[t], f"branch {t!r}"), live=True
            )  # type: ignore[index]
            for t in self.tasks(model)
        ]

    def target(self, model: nn.Module) -> nn.Module:  # noqa: D102
        return model.branches[self.tasks(model)[0]]  # type: ignore[index]

    def swap_values(self, model: nn.Module, merged: Merged) -> dict[str, Tensor]:  # noqa: D102
        return {f"branches.{t}.{k}": v for t in self.tasks(model) for k, v in merged.values.items()}

    def adopt_modules(self, model: nn.Module) -> list[nn.Module]:  # noqa: D102
        return [model.base] + [model.branches[t] for t in self.tasks(model)]  # type: ignore[index,list-item]

    def heads(self, model: nn.Module) -> dict[str, Tensor]:  # noqa: D102
        heads = getattr(model, "heads", None)
        return (
            {f"heads.{k}": v for k, v in float_state(heads).items()}
            if isinstance(heads, nn.Module)
            else {}
        )


class SingleModelBranches(BranchProvider):
    """One model: checkpoints, snapshots and (optionally) the live model, merged against a base.

    Args:
        kind: ``"snapshots"`` or ``"checkpoints"`` (what the front end was given).
        paths: ``{task: checkpoint path}``.
        include_live: Merge the live model as one more branch.
        live_task: Task label of the live model (else ``model.current_task``, else ``"live"``).
        base: A path or a state dict; default the model's weights at :meth:`setup`.
        snapshot_dir: Keep snapshot deltas as safetensors files here (dense only).
        snapshot_dtype: Store snapshots in this dtype.
        trust_pickles: Allow full unpickling of ``base`` / checkpoint files.
    """

    per_task_ignored = True

    def __init__(
        self,
        kind: Kind,
        *,
        paths: Mapping[str, Path] | None = None,
        include_live: bool = True,
        live_task: str | None = None,
        base: str | os.PathLike[str] | Mapping[str, Tensor] | None = None,
        snapshot_dir: Path | None = None,
        snapshot_dtype: torch.dtype | None = None,
        trust_pickles: bool = False,
    ) -> None:
        self.kind = kind
        self.paths = dict(paths or {})
        self.include_live = include_live
        self.live_task = live_task
        self.base_arg = base
        self.snapshot_dir = snapshot_dir
        self.snapshot_dtype = snapshot_dtype
        self.trust_pickles = trust_pickles
        self._base: Any = None
        self._checkpoints: dict[str, Any] = {}
        self._snapshots: list[Snapshot] = []

    @property
    def snapshots(self) -> list[Snapshot]:  # noqa: D102
        return self._snapshots

    @snapshots.setter
    def snapshots(self, value: list[Snapshot]) -> None:
        self._snapshots = list(value)

    @property
    def base_tensors(self) -> dict[str, Tensor] | None:
        """The dense base as a mapping (``None`` before :meth:`setup` or under ZeRO-3)."""
        if self._base is None or isinstance(self._base, TensorSet):
            return None
        return {k: self._base.get(k) for k in self._base.keys()}

    def check_model(self, model: nn.Module) -> None:  # noqa: D102
        return None

    def zero3_problems(self) -> list[str]:
        """What the ZeRO-3 backend cannot read or store (one line each)."""
        problems: list[str] = []
        if self.snapshot_dir is not None:
            problems.append(
                "snapshot_dir= (ZeRO-3 snapshots stay in CPU memory, each rank its own partition)"
            )
        check_paths(self.paths)
        problems += [
            f"checkpoint {task!r} ({os.fspath(path)}) is not safetensors: under ZeRO-3 branches "
            "are read row-wise from a .safetensors file or a folder with "
            "model.safetensors[.index.json]"
            for task, path in self.paths.items()
            if not is_safetensors(path)
        ]
        if self.base_arg is not None and not isinstance(self.base_arg, Mapping):
            path = Path(self.base_arg)
            if not path.exists():
                raise FileNotFoundError(f"base={os.fspath(path)!r}: the file does not exist")
            if not is_safetensors(path):
                problems.append(
                    f"base={os.fspath(path)!r} is not safetensors (read shard-wise under ZeRO-3)"
                )
        return problems

    def _read(self, backend: Backend, path: Path, origin: str) -> Any:
        if isinstance(backend, Zero3Backend):
            return open_source(path)
        return StateDictSource(load_weights(path, trust_pickles=self.trust_pickles), origin=origin)

    def setup(self, model: nn.Module, backend: Backend) -> None:  # noqa: D102
        if isinstance(self.base_arg, Mapping):
            floats = cpu_clone(
                {k: v for k, v in self.base_arg.items() if torch.is_floating_point(v)}
            )
            self._base = StateDictSource(floats, origin="base")
        elif self.base_arg is not None:
            path = Path(self.base_arg)
            if not path.exists():
                raise FileNotFoundError(f"base={os.fspath(path)!r}: the file does not exist")
            self._base = self._read(backend, path, "base")
        else:
            self._base = backend.frozen_copy(model, "base (weights at the start of training)")
        self._snapshots = []
        check_paths(self.paths)
        self._checkpoints = {
            task: self._read(backend, path, f"checkpoint {task!r} ({os.fspath(path)})")
            for task, path in self.paths.items()
        }
        live = backend.module_input(model, "live model", device="cpu")
        backend.check(model, self._base, [*self._checkpoints.values(), live])
        if self.snapshot_dir is not None:
            self.snapshot_dir.mkdir(parents=True, exist_ok=True)

    def base(self, model: nn.Module, backend: Backend) -> Any:  # noqa: D102
        assert self._base is not None, "setup() was not called"
        return self._base

    def live_label(self, model: nn.Module, default: str) -> str:
        """The live model's task label."""
        label = self.live_task or getattr(model, "current_task", None)
        return str(label) if label is not None else default

    def branches(self, model: nn.Module, backend: Backend) -> list[Branch]:  # noqa: D102
        out = [Branch(t, f"checkpoint:{t}", source) for t, source in self._checkpoints.items()]
        out += [
            Branch(
                s.task,
                f"snapshot:{i}",
                backend.snapshot_input(s.stored, self._base, f"snapshot {i} ({s.task})"),
            )
            for i, s in enumerate(self._snapshots)
        ]
        if self.include_live:
            source = backend.module_input(model, "live model", device="cpu")
            out.append(Branch(self.live_label(model, "live"), "live", source, live=True))
        return out

    def target(self, model: nn.Module) -> nn.Module:  # noqa: D102
        return model

    def swap_values(self, model: nn.Module, merged: Merged) -> dict[str, Tensor]:  # noqa: D102
        return merged.values

    def adopt_modules(self, model: nn.Module) -> list[nn.Module]:  # noqa: D102
        return [model]

    def capture(
        self, model: nn.Module, backend: Backend, *, task: str | None, step: int, epoch: int
    ) -> Snapshot:  # noqa: D102
        index = len(self._snapshots)
        task = task or self.live_label(model, f"snapshot_{index}")
        stored = backend.capture(
            model, self._base, dtype=self.snapshot_dtype, origin=f"snapshot {index} ({task})"
        )
        snapshot = Snapshot(task=task, step=step, epoch=epoch)
        if isinstance(backend, Zero3Backend):
            snapshot.shards = stored
        elif self.snapshot_dir is None:
            snapshot.delta = stored
        else:
            path = self.snapshot_dir / f"snapshot_{index:04d}_{task}.safetensors"
            active = dist.is_available() and dist.is_initialized()
            if not active or dist.get_rank() == 0:
                save_file(stored, str(path))
            if active:
                dist.barrier(group=backend.group)
            snapshot.path = str(path)
        self._snapshots.append(snapshot)
        return snapshot

    def payload(self, backend: Backend | None) -> dict[str, Any] | None:  # noqa: D102
        if isinstance(
            backend, Zero3Backend
        ):  # per-rank partitions: the checkpoint is written by one rank
            return {"mode": self.kind, "zero3": True}
        if self._base is None:
            return None  # never set up: nothing to store
        out: dict[str, Any] = {"mode": self.kind}
        if self.base_arg is None:
            out["base"] = self.base_tensors
        out["snapshots"] = [
            {"task": s.task, "step": s.step, "epoch": s.epoch, "path": s.path, "delta": s.delta}
            for s in self._snapshots
        ]
        return out

    def load_payload(self, payload: Mapping[str, Any]) -> None:  # noqa: D102
        if payload.get("zero3"):
            self._snapshots = []  # ZeRO-3 checkpoints hold no snapshot; setup records the base
            return
        if payload.get("base") is not None:
            self._base = StateDictSource(payload["base"], origin="base (from the checkpoint)")
        self._snapshots = [Snapshot(**s) for s in payload.get("snapshots", [])]
        missing = [
            s.path for s in self._snapshots if s.path is not None and not Path(s.path).exists()
        ]
        if missing:
            raise FileNotFoundError(f"snapshot file(s) of the checkpoint are gone: {missing}")

    def reset(self, model: nn.Module, backend: Backend | None) -> str:  # noqa: D102
        self._snapshots = []
        if isinstance(backend, Zero3Backend):
            return "the merge base is the weights at the start of fit and no snapshot is restored"
        if self.base_arg is None and backend is not None:
            self._base = backend.frozen_copy(model, "base (weights loaded from the checkpoint)")
        given = "the given base" if self.base_arg is not None else "the weights just loaded from it"
        return f"the merge base is {given} and no snapshot is restored"


def coefficient_list(
    coefficients: Sequence[float] | Mapping[str, float] | None, branches: Sequence[Branch]
) -> list[float] | None:
    """One coefficient per branch: a sequence in branch order or ``{task: weight}`` (missing: 1)."""
    if coefficients is None:
        return None
    if isinstance(coefficients, Mapping):
        return [float(coefficients.get(b.task, 1.0)) for b in branches]
    return [float(c) for c in coefficients]


def parse_branches(branches: Any) -> tuple[Kind, dict[str, Path]]:
    """``(kind, {task: path})`` of a front end's ``branches`` argument.

    Example:
        >>> parse_branches(["runs/a.safetensors", "runs/b.safetensors"])[0]
        'checkpoints'
    """
    if isinstance(branches, str):
        if branches not in ("live", "snapshots"):
            raise ValueError(
                f"branches={branches!r}: use 'live', 'snapshots', a list of checkpoint paths or "
                "{task: path}"
            )
        return branches, {}  # type: ignore[return-value]
    if isinstance(branches, Mapping):
        paths = {str(task): Path(p) for task, p in branches.items()}
    else:
        listed = [Path(p) for p in branches]
        paths = {p.stem: p for p in listed}
        if len(paths) != len(listed):
            raise ValueError("checkpoint file names must differ; pass {task: path} to label them")
    if not paths:
        raise ValueError("branches is an empty list of checkpoint paths")
    return "checkpoints", paths
