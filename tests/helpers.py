"""Helpers shared by the test modules (no tests here): a free port, the tiny Llama config, a
DeepSpeed CPU rank's set-up, the end of an earlier test's background hashing, a safetensors
reader that counts the bytes it reads."""

from __future__ import annotations

import socket
import threading
from typing import Any

TINY_LLAMA: dict[str, int] = {
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}
"""The tiny Llama every CLI, writer and source test builds (≈ 25 k parameters)."""


def free_port() -> int:
    """A free TCP port on localhost for a process-group rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fork_ranks(worker: Any, world: int, *args: Any) -> None:
    """Run ``worker(rank, world, port, *args)`` on ``world`` forked ranks and wait for them.

    Forked, not spawned: a fork skips each rank's imports (seconds per rank). The one place
    to go back to ``"spawn"`` if a fork ever misbehaves under a threaded test worker.
    """
    import torch.multiprocessing as mp

    mp.start_processes(
        worker, args=(world, free_port(), *args), nprocs=world, join=True, start_method="fork"
    )


def cpu_deepspeed_rank(rank: int, world: int, port: int) -> None:
    """Make this spawned process rank ``rank`` of ``world`` CPU ranks for DeepSpeed (the CPU
    recipe): the launcher's environment, one thread, and no JIT build of DeepSpeed's shm op
    (95 s, unused with gloo)."""
    import importlib
    import os

    import torch

    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        NODE_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def tiny_llama_config(**overrides: Any) -> Any:
    """A ``transformers.LlamaConfig`` of :data:`TINY_LLAMA` with ``overrides`` (no download)."""
    import transformers

    return transformers.LlamaConfig(**{**TINY_LLAMA, **overrides})


def wait_for_background_hashing(timeout: float = 60.0) -> None:
    """Let the model-card hashing threads of earlier tests finish (``HFFolderWriter`` starts one
    per output and does not wait for it): they read the digest store that the environment names
    *now*, so one still running would warn about, or write to, the next test's store."""
    for thread in threading.enumerate():
        if thread.name == "drm-lightning-sha256":
            thread.join(timeout)


def counting_source(path: Any) -> Any:
    """A safetensors file reader whose ``bytes_read`` counts the tensor bytes read."""
    from drm_lightning.sources import SafetensorsFileSource

    class Counting(SafetensorsFileSource):
        bytes_read = 0

        def get(self, name: str) -> Any:
            return self._count(super().get(name))

        def get_rows(self, name: str, start: int, stop: int) -> Any:
            return self._count(super().get_rows(name, start, stop))

        def _count(self, out: Any) -> Any:
            self.bytes_read += out.numel() * out.element_size()
            return out

    return Counting(path)
