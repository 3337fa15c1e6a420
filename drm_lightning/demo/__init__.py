"""The embedded multitask suite: K task branches fine-tuned in one ``Trainer.fit``, merged by
every method with the :class:`~drm_lightning.lightning.MergeCallback`, and reported.

Needs the ``demo`` extra (Lightning, torchmetrics, scikit-learn, matplotlib). Entry point:
``python examples/multitask_demo.py [--large] [--seeds 3] [--out runs/demo]``.

Example:
    >>> from drm_lightning.demo import DemoConfig
    >>> [t.name for t in DemoConfig().tasks][:2]
    ['rot90_digit', 'flip_digit']
"""

from drm_lightning.demo.backbone import ResidualMLP, pretrain_backbone
from drm_lightning.demo.config import (
    DEFAULT_METHODS,
    DEFAULT_TASKS,
    LARGE_TASKS,
    DemoConfig,
    MethodSpec,
)
from drm_lightning.demo.module import MultitaskDemoModule
from drm_lightning.demo.report import (
    format_table,
    format_targets,
    run_to_dict,
    summarize,
    write_report,
)
from drm_lightning.demo.runner import DemoRun, SeedResult, run_demo, run_seed
from drm_lightning.demo.tasks import LABELS, VIEWS, Suite, TaskDef, build_suite

__all__ = [
    "DEFAULT_METHODS",
    "DEFAULT_TASKS",
    "LABELS",
    "LARGE_TASKS",
    "VIEWS",
    "DemoConfig",
    "DemoRun",
    "MethodSpec",
    "MultitaskDemoModule",
    "ResidualMLP",
    "SeedResult",
    "Suite",
    "TaskDef",
    "build_suite",
    "format_table",
    "format_targets",
    "pretrain_backbone",
    "run_demo",
    "run_seed",
    "run_to_dict",
    "summarize",
    "write_report",
]
