"""Alignment of models trained from different inits: MuDSC, ZipIt, Git Re-Basin, averaging.

Hidden units of independently trained networks are only defined up to permutation. This
package finds the correspondence (permutation specs, activation and weight similarities,
Align / Zip solvers, MuDSC's dual-space coordinate ascent), builds the merged model, or
permutes branches into one coordinate system for any merge method of
:mod:`drm_lightning.methods` (align-then-merge). The math (``spec``, ``similarity``,
``solvers``, ``transforms``, ``core``) imports no framework beyond torch, numpy and scipy.

Example:
    >>> from drm_lightning.alignment import available_alignments
    >>> "mudsc_zip" in available_alignments()
    True
"""

from drm_lightning.alignment.activations import (
    activation_similarity,
    default_forward,
    reset_batchnorm,
)
from drm_lightning.alignment.api import align, align_models, align_then_merge, merge_models
from drm_lightning.alignment.core import (
    AlignmentMethod,
    AlignmentParams,
    AlignmentResult,
    available_alignments,
    get_alignment,
    register_alignment,
)
from drm_lightning.alignment.similarity import (
    CorrelationAccumulator,
    row_correlation,
    weight_similarity,
)
from drm_lightning.alignment.solvers import Matching, align_match, identity_matching, zip_match
from drm_lightning.alignment.spec import Member, PermGroup, PermSpec, Probe
from drm_lightning.alignment.trace import derive_spec
from drm_lightning.alignment.transforms import (
    permutation_matrix,
    permute_state_dict,
    random_permutations,
)

__all__ = [
    "AlignmentMethod",
    "AlignmentParams",
    "AlignmentResult",
    "CorrelationAccumulator",
    "Matching",
    "Member",
    "PermGroup",
    "PermSpec",
    "Probe",
    "activation_similarity",
    "align",
    "align_match",
    "align_models",
    "align_then_merge",
    "available_alignments",
    "default_forward",
    "derive_spec",
    "get_alignment",
    "identity_matching",
    "merge_models",
    "permutation_matrix",
    "permute_state_dict",
    "random_permutations",
    "register_alignment",
    "reset_batchnorm",
    "row_correlation",
    "weight_similarity",
    "zip_match",
]
