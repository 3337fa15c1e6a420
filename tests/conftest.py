"""Test-wide settings: CPU DeepSpeed, one thread per process, offline hubs."""

import os
import signal
import tempfile

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# input digests kept across runs go to a fresh folder, not the user's ~/.cache
os.environ.setdefault("DRM_LIGHTNING_CACHE", tempfile.mkdtemp(prefix="drm-lightning-test-cache-"))

# A suite started in the background (`nohup`, `cmd &` without job control) inherits SIGINT
# ignored; the Ctrl-C tests need Python's default handler, as a run from a terminal has.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import torch  # noqa: E402

torch.set_num_threads(1)
