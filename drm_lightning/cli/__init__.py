"""``drm-merge``: parse the command line, check the config and output, run the job, report.

- :mod:`~drm_lightning.cli.command`: the command (:func:`main`).
- :mod:`~drm_lightning.cli.job`: a config's inputs opened and planned, run to a folder.
- :mod:`~drm_lightning.cli.align_job`: the alignment methods' job (MuDSC and peers).
- :mod:`~drm_lightning.cli.guard`, :mod:`~drm_lightning.cli.report`: output checks; the dry-run
  plan and the model card.
"""

from drm_lightning.cli.command import main

__all__ = ["main"]
