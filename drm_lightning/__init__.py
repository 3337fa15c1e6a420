"""drm_lightning: model merging (DRM, TIES, DARE, task arithmetic) inside the training loop."""

__version__ = "0.1.0"
