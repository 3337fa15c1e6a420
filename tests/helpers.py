"""Helpers shared by the test modules (no tests here): a free port, the tiny Llama config."""

from __future__ import annotations

import socket
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


def tiny_llama_config(**overrides: Any) -> Any:
    """A ``transformers.LlamaConfig`` of :data:`TINY_LLAMA` with ``overrides`` (no download)."""
    import transformers

    return transformers.LlamaConfig(**{**TINY_LLAMA, **overrides})
