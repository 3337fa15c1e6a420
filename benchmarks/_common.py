"""Shared helpers for the benchmark scripts: machine description, peak memory, test models.

Nothing here is part of the package. The models are built locally from a
``transformers.LlamaConfig`` with deterministic seeds, saved as Hugging Face folders
(sharded safetensors + index + config.json) and reused from the work directory when present.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Llama-shaped test models. Untied embeddings, vocab chosen so the total lands on the target.
MODEL_SIZES: dict[str, dict] = {
    # 4 x (4·512² + 3·512·1408) + 2·2048·512 + norms = 14.95 M
    "15m": dict(
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=2048,
    ),
    # 8 x (4·1024² + 3·1024·2816) + 2·2048·1024 + norms = 107.0 M
    "107m": dict(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=2048,
    ),
}

DELTA_RANK = 16
DELTA_SCALE = 1e-2  # ||low-rank update||_F = DELTA_SCALE * ||W||_F
NOISE_SCALE = 1e-3  # ||Gaussian noise||_F = NOISE_SCALE * ||W||_F
FORMAT_VERSION = 2  # bump to invalidate cached models


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:  # pragma: no cover - not on Linux
        return (float("nan"),) * 3


def system_info(threads: int) -> dict:
    import torch

    return {
        "cpu": cpu_name(),
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "load_average_1_5_15": [round(x, 2) for x in load_average()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (``ru_maxrss``, KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def current_rss_bytes() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:  # pragma: no cover
        return peak_rss_bytes()


def python_command(args: list[str], ranks: int = 1) -> list[str]:
    """``python ARGS``, or ``python -m torch.distributed.run --standalone --nproc_per_node=R ARGS``
    for ``ranks > 1`` (``ARGS``: a script and its arguments, or ``-m module ...``)."""
    if ranks == 1:
        return [sys.executable, *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={ranks}",
        *args,
    ]


def limit_threads_env(threads: int) -> dict[str, str]:
    """Environment for a child process pinned to ``threads`` BLAS/OpenMP threads."""
    env = dict(os.environ)
    for var in (
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "NUMEXPR_NUM_THREADS",
        "VECLIB_MAXIMUM_THREADS",
    ):
        env[var] = str(threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


# --------------------------------------------------------------------------- test models


@dataclass(frozen=True)
class BenchModel:
    size: str
    base: Path
    branches: tuple[Path, ...]
    n_params: int
    matrix_shapes: tuple[tuple[str, tuple[int, int]], ...]


def _seed(*parts: object) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little")


def branch_delta(weight, branch: int, name: str, noise: float = NOISE_SCALE):
    """A realistic fine-tuning delta for one tensor: rank-16 update plus small noise.

    2-D: ``U V`` with ``||UV||_F = 1e-2·||W||_F`` plus Gaussian noise of ``1e-3·||W||_F``.
    1-D (norm weights): Gaussian noise of ``1e-2·||W||_F``. Different and deterministic per
    (branch, tensor name).
    """
    import torch

    gen = torch.Generator().manual_seed(_seed("delta", branch, name))
    w = weight.float()
    w_norm = float(w.norm())
    if w.dim() == 2:
        n, m = w.shape
        rank = min(DELTA_RANK, n, m)
        u = torch.randn(n, rank, generator=gen)
        v = torch.randn(rank, m, generator=gen)
        low = u @ v
        low *= DELTA_SCALE * w_norm / float(low.norm())
        gauss = torch.randn(n, m, generator=gen)
        gauss *= noise * w_norm / float(gauss.norm())
        return low + gauss
    noise = torch.randn(w.shape, generator=gen)
    return noise * (DELTA_SCALE * w_norm / max(float(noise.norm()), 1e-30))


def _folder_ok(path: Path) -> bool:
    marker = path / "bench_model.json"
    if not marker.exists():
        return False
    try:
        ok = json.loads(marker.read_text()).get("format_version") == FORMAT_VERSION
    except (OSError, ValueError):
        return False
    return ok and any(path.glob("*.safetensors"))


def _save_folder(config, state: dict, path: Path, shard_bytes: int, info: dict) -> None:
    """Write an HF folder by hand: sharded safetensors + index + config.json (temp + rename)."""
    import shutil

    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map = {}
    for k, names in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: state[n] for n in names}, str(tmp / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in names})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    config.save_pretrained(tmp)
    (tmp / "bench_model.json").write_text(json.dumps({**info, "format_version": FORMAT_VERSION}))
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


def build_models(
    size: str, workdir: Path, n_branches: int = 3, log=print, noise: float = NOISE_SCALE
) -> BenchModel:
    """Build (or reuse) the base and ``n_branches`` fine-tuned folders of model ``size``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg_kwargs = MODEL_SIZES[size]
    root = workdir / (f"llama_{size}" if noise == NOISE_SCALE else f"llama_{size}_noise{noise:g}")
    base_dir = root / "base"
    branch_dirs = tuple(root / f"branch_{i}" for i in range(n_branches))
    config = LlamaConfig(**cfg_kwargs, tie_word_embeddings=False, max_position_embeddings=512)
    # Shards of ~1/3 of the model so the sharded index path is exercised.
    shard = 20 * 2**20 if size == "15m" else 160 * 2**20
    model = None
    state = None
    if not all(_folder_ok(p) for p in (base_dir, *branch_dirs)):
        root.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        torch.manual_seed(_seed("base", size) % (2**63))
        with torch.no_grad():
            model = LlamaForCausalLM(config).float()
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        del model
        n_params = sum(v.numel() for v in state.values())
        info = {"size": size, "n_params": n_params, "config": cfg_kwargs, "noise": noise}
        if not _folder_ok(base_dir):
            _save_folder(config, state, base_dir, shard, {**info, "role": "base"})
        for i, path in enumerate(branch_dirs):
            if _folder_ok(path):
                continue
            with torch.no_grad():
                tuned = {
                    k: (v + branch_delta(v, i, k, noise)).contiguous() for k, v in state.items()
                }
            _save_folder(config, tuned, path, shard, {**info, "role": f"branch {i}"})
            del tuned
        log(f"built {size} model folders under {root} in {time.perf_counter() - t0:.1f} s")
    meta = json.loads((base_dir / "bench_model.json").read_text())
    shapes = _matrix_shapes(base_dir)
    return BenchModel(size, base_dir, branch_dirs, int(meta["n_params"]), shapes)


def _matrix_shapes(folder: Path) -> tuple[tuple[str, tuple[int, int]], ...]:
    """Names and shapes of the 2-D tensors of an HF safetensors folder (header only)."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    out = []
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                shape = tuple(h.get_slice(k).get_shape())
                if len(shape) == 2:
                    out.append((k, (int(shape[0]), int(shape[1]))))
    return tuple(sorted(out))


def fmt_bytes(n: float) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def demo_seed(config: Any, seed: int) -> tuple[Any, Any]:
    """One seed of the multitask demo, as the demo runs it: ``(suite, trained module)``.

    The module holds the base (``module.base``), the K branches and their heads.
    """
    from drm_lightning.demo.runner import pretrain, run_seed
    from drm_lightning.demo.tasks import build_suite

    suite = build_suite(config.tasks, data_seed=config.data_seed)
    module = run_seed(suite, pretrain(suite, config), seed, config, keep_module=True).module
    return suite, module
