"""Configuration of the demo suite: tasks, backbone, schedule, seeds and the compared methods."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from drm_lightning.demo.tasks import TaskDef
from drm_lightning.methods import get_method

DEFAULT_TASKS: tuple[TaskDef, ...] = (
    TaskDef("rot90", "digit"),
    TaskDef("flip", "digit"),
    TaskDef("invert", "digit"),
    TaskDef("perm", "digit"),
    TaskDef("rot180", "parity"),
    TaskDef("transpose", "mod3"),
)
"""Six tasks: four domain shifts of digit recognition and two new label spaces."""

LARGE_TASKS: tuple[TaskDef, ...] = DEFAULT_TASKS + (
    TaskDef("rot270", "ge5"),
    TaskDef("identity", "loops"),
)
"""Eight tasks for ``--large``."""


@dataclass(frozen=True)
class MethodSpec:
    """One merge method of the comparison: a registered name with its parameters.

    Parameters not given here keep the library default of the registered method; the
    resolved values are written to the results (``method.params``).

    Example:
        >>> MethodSpec("drm_h", "drm", {"direction": "horizontal"},
        ...            "DRM-H").build().params.drop_rate
        0.8
    """

    label: str
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    display: str = ""

    def build(self) -> Any:
        """The :class:`~drm_lightning.methods.MergeMethod` instance."""
        return get_method(self.method, **self.params)


DEFAULT_METHODS: tuple[MethodSpec, ...] = (
    MethodSpec("linear", "linear", {}, "Linear average"),
    MethodSpec("task_arithmetic", "task_arithmetic", {}, "Task arithmetic"),
    MethodSpec("ties", "ties", {}, "TIES"),
    MethodSpec("dare_ties", "dare_ties", {}, "DARE-TIES"),
    MethodSpec("dare_linear", "dare_linear", {}, "DARE-linear"),
    MethodSpec("drm_h", "drm", {"direction": "horizontal"}, "DRM-H"),
    MethodSpec("drm_v", "drm", {"direction": "vertical"}, "DRM-V"),
    MethodSpec(
        "drm_h_norenorm",
        "drm",
        {"direction": "horizontal", "renormalize": False},
        "DRM-H w/o renorm",
    ),
    MethodSpec(
        "drm_v_norenorm", "drm", {"direction": "vertical", "renormalize": False}, "DRM-V w/o renorm"
    ),
    MethodSpec("tsv_m", "tsv_m", {}, "TSV-M"),
    MethodSpec("iso_c", "iso_c", {}, "Iso-C"),
    MethodSpec("iso_cts", "iso_cts", {}, "Iso-CTS"),
    MethodSpec("breadcrumbs_ties", "breadcrumbs_ties", {}, "Breadcrumbs-TIES"),
    MethodSpec("della", "della", {}, "DELLA"),
    MethodSpec("model_stock", "model_stock", {}, "Model Stock"),
)
"""Every method that merges any number of branches, at its library defaults; only DRM's
direction (default: horizontal) and renorm switch are set (slerp and nuslerp merge two
models)."""

REFERENCE_ROWS: dict[str, str] = {
    "branch": "Branch alone",
    "joint": "Joint multitask",
    "base_heads": "Pretrained + heads",
}
"""Rows that are not merges: each task's own branch, the joint model, and the pretrained
backbone with each task's fine-tuned head (what merging starts from)."""


@dataclass(frozen=True)
class DemoConfig:
    """Everything that defines a demo run.

    Args:
        tasks: The K tasks.
        hidden: Width of the backbone's residual stream.
        depth: Residual blocks in the backbone.
        pretrain_steps: Steps of the backbone's supervised pretraining (run once per run).
        pretrain_lr: Learning rate of pretraining.
        pretrain_seed: Seed of pretraining (the pretrained model is the same for every seed).
        finetune_steps: Optimizer steps of the one ``Trainer.fit`` of each seed.
        finetune_lr: AdamW learning rate of the branches and of the joint model.
        batch_size: Per-task mini-batch size.
        merges: Merges per fit, evenly spaced; the last one at the final step.
        seeds: Fine-tuning seeds (head initialisation, batch order, DARE masks).
        data_seed: Seed of the pretrain/train/val split.
        methods: The compared merge methods.
        consolidate: Labels of methods that also get a periodic-consolidation fit of their
            own (``adopt=True``: after every merge the branches and the base restart from the
            merged backbone); rows ``<label>_consolidated``.
        threads: Threads of torch and of the BLAS/LAPACK pools during the run (default 1: the
            demo's matrices are small, and one thread is the fastest on a shared 2-core
            machine); ``None`` keeps the process's settings.

    Example:
        >>> DemoConfig.tiny().finetune_steps
        20
        >>> len(DemoConfig.large().tasks)
        8
    """

    tasks: tuple[TaskDef, ...] = DEFAULT_TASKS
    hidden: int = 128
    depth: int = 2
    pretrain_steps: int = 1500
    pretrain_lr: float = 1e-3
    pretrain_seed: int = 0
    finetune_steps: int = 300
    finetune_lr: float = 3e-4
    batch_size: int = 64
    merges: int = 4
    seeds: tuple[int, ...] = (0, 1, 2)
    data_seed: int = 0
    methods: tuple[MethodSpec, ...] = DEFAULT_METHODS
    consolidate: tuple[str, ...] = ("ties", "drm_h")
    threads: int | None = 1

    def __post_init__(self) -> None:
        problems = []
        if len(self.tasks) < 2:
            problems.append(f"tasks: merging needs at least 2 tasks, got {len(self.tasks)}")
        for name in ("hidden", "depth", "pretrain_steps", "finetune_steps", "batch_size", "merges"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "pretrain_steps" else 1):
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.merges, int) and self.merges >= 1 and self.finetune_steps % self.merges:
            problems.append(
                f"finetune_steps={self.finetune_steps} must be a multiple of merges={self.merges} "
                "so that the last merge falls on the final step"
            )
        if not self.seeds:
            problems.append("seeds is empty")
        labels = [m.label for m in self.methods]
        if len(set(labels)) != len(labels) or set(labels) & set(REFERENCE_ROWS):
            problems.append(
                f"method labels must be unique and differ from {list(REFERENCE_ROWS)}: {labels}"
            )
        unknown = [c for c in self.consolidate if c not in labels]
        if unknown:
            problems.append(f"consolidate names unknown method labels {unknown} (valid: {labels})")
        if problems:
            raise ValueError("DemoConfig: " + "; ".join(problems))

    @property
    def merge_every(self) -> int:
        """Optimizer steps between two merges."""
        return self.finetune_steps // self.merges

    @classmethod
    def large(cls, **overrides: Any) -> DemoConfig:
        """The larger suite: 8 tasks, a wider and deeper backbone, longer training, 5 seeds."""
        values: dict[str, Any] = dict(
            tasks=LARGE_TASKS,
            hidden=256,
            depth=3,
            pretrain_steps=3000,
            finetune_steps=600,
            merges=6,
            seeds=(0, 1, 2, 3, 4),
        )
        values.update(overrides)
        return cls(**values)

    @classmethod
    def tiny(cls, **overrides: Any) -> DemoConfig:
        """A seconds-long configuration for tests: narrow backbone, few steps, one seed."""
        values: dict[str, Any] = dict(
            tasks=DEFAULT_TASKS[:4],
            hidden=16,
            depth=1,
            pretrain_steps=30,
            finetune_steps=20,
            merges=2,
            seeds=(0,),
            consolidate=(),
        )
        values.update(overrides)
        return cls(**values)

    def with_seeds(self, n: int) -> DemoConfig:
        """The same configuration with seeds ``0 .. n-1``."""
        return replace(self, seeds=tuple(range(n)))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (tasks by name, methods with their given parameters)."""
        out = asdict(self)
        out["tasks"] = [t.name for t in self.tasks]
        out["methods"] = [
            {"label": m.label, "method": m.method, "params": m.params} for m in self.methods
        ]
        out["seeds"] = list(self.seeds)
        out["consolidate"] = list(self.consolidate)
        return out


CONSOLIDATED_SUFFIX = "_consolidated"
"""Row suffix of a method's periodic-consolidation fit (``adopt=True``)."""
