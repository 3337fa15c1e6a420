"""Merge methods: pure tensor math, one file a method, one registry.

Example:
    >>> from drm_lightning.methods import available_methods, get_method
    >>> "drm" in available_methods()
    True
"""

from drm_lightning.methods.base import (
    LowRankFactors,
    MergeMethod,
    MethodParams,
    Route,
    available_methods,
    get_method,
    method_parameters,
    register_method,
)
from drm_lightning.methods.drm import DRM, drm_merge, drm_merge_lowrank, shared_basis
from drm_lightning.methods.model_stock import ModelStock
from drm_lightning.methods.slerp import NuSlerp, Slerp
from drm_lightning.methods.svd_merge import IsoMerge, TSVMerge
from drm_lightning.methods.task_vector import (
    BreadcrumbsMethod,
    DellaMethod,
    TaskVectorMethod,
    task_vector_merge,
)

register_method("drm", DRM)
register_method("task_arithmetic", TaskVectorMethod, sparsify="none", elect_signs=False)
register_method("ties", TaskVectorMethod, sparsify="magnitude", elect_signs=True)
register_method("dare_ties", TaskVectorMethod, sparsify="random", elect_signs=True)
register_method("dare_linear", TaskVectorMethod, sparsify="random", elect_signs=False)
register_method("linear", TaskVectorMethod, sparsify="none", elect_signs=False, normalize=True)
register_method("breadcrumbs", BreadcrumbsMethod, sparsify="magnitude_outliers", elect_signs=False)
register_method(
    "breadcrumbs_ties", BreadcrumbsMethod, sparsify="magnitude_outliers", elect_signs=True
)
register_method("della", DellaMethod, sparsify="magprune", elect_signs=True)
register_method("della_linear", DellaMethod, sparsify="magprune", elect_signs=False)
register_method("slerp", Slerp)
register_method("nuslerp", NuSlerp)
register_method("model_stock", ModelStock)
register_method("tsv_m", TSVMerge)
register_method("iso_c", IsoMerge, common_space_fraction=1.0)
register_method("iso_cts", IsoMerge)

__all__ = [
    "DRM",
    "IsoMerge",
    "LowRankFactors",
    "MergeMethod",
    "MethodParams",
    "Route",
    "TSVMerge",
    "TaskVectorMethod",
    "available_methods",
    "drm_merge",
    "drm_merge_lowrank",
    "get_method",
    "method_parameters",
    "register_method",
    "shared_basis",
    "task_vector_merge",
]
