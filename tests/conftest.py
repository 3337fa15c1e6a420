"""Test-wide settings: CPU DeepSpeed, one thread per process, offline hubs."""

import os
import tempfile

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# input digests kept across runs go to a fresh folder, not the user's ~/.cache
os.environ.setdefault("DRM_LIGHTNING_CACHE", tempfile.mkdtemp(prefix="drm-lightning-test-cache-"))

import torch  # noqa: E402

torch.set_num_threads(1)
