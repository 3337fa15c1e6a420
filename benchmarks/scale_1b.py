#!/usr/bin/env python
"""1B-shaped disk-to-disk merges with ``drm-merge`` on this machine: time, CPU, RSS, bytes.

Builds (once, under ``--workdir``, default ``/tmp/drm_bench_1b``) a Llama-3.2-1B-shaped base
(hidden 2048, MLP 8192, 16 layers, 32 heads / 8 KV heads, vocab 128256, embeddings NOT tied:
1.50 B parameters, 3.0 GB in bf16) and 3 branches (base + a rank-16 update of 1e-2·‖W‖ + noise
of 1e-3·‖W‖ per tensor, as ``merge_core.py``), bf16 sharded HF folders written by the
package's own streaming ``HFFolderWriter``. Then runs the real CLI
(``python -m drm_lightning.cli CONFIG -o OUT``, or under ``torchrun --nproc_per_node 2``) once
per case, each in a fresh process tree, with the input files dropped from the page cache first
(``posix_fadvise(DONTNEED)``, our files only) so reads come from the disk, and records:

* wall seconds, CPU seconds (user + system of the whole tree, ``wait4``),
* peak RSS: of the largest process (``wait4``'s ``ru_maxrss``) and of each process (polled),
* bytes read from and written to storage (``ru_inblock``/``ru_oublock`` × 512),
* the disk's own cold read speed, ``dd if=<a 2 GiB input shard> of=/dev/null bs=16M``.

DRM runs on a subset of layers (``--drm-layers``, default 0,1: their 7 matrices take the DRM
matrix path, every other tensor DRM's cheap element-wise fallback), beside a run where no
tensor takes the matrix path (``drm_*_none``); the difference over the subset gives DRM's
time per layer, and the whole-model DRM time is extrapolated as
``none + 16 × per-layer``.

Usage::

    python benchmarks/scale_1b.py                       # build if needed, every case
    python benchmarks/scale_1b.py --cases ties,ties@2   # some cases
    python benchmarks/scale_1b.py --build-only

Results: ``benchmarks/results/scale_1b.json`` and a table on stdout. The 1-minute load
average is recorded before and after each case.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LLAMA_1B = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
N_BRANCHES = 3
FORMAT_VERSION = 1
LAYER_MATRICES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
# case -> (method, parameters, ranks, which layers take the matrix path: None = default routing)
CASES: dict[str, tuple[str, dict[str, Any], int, str | None]] = {
    "ties": ("ties", {"density": 0.2}, 1, None),
    "ties@2": ("ties", {"density": 0.2}, 2, None),
    "task_arithmetic": ("task_arithmetic", {}, 1, None),
    # A re-merge: the model card's input digests found in the digest store (every other case
    # starts from an empty store and hashes its 12 GB of inputs, ≈ 1.2 GB/s on one core).
    "ties+stored": ("ties", {"density": 0.2}, 1, None),
    # The two 128256×2048 tensors copied from the base, not merged: the peak RSS of the rest.
    "ties_no_vocab": ("ties", {"density": 0.2}, 1, "no_vocab"),
    "ties_no_vocab@2": ("ties", {"density": 0.2}, 2, "no_vocab"),
    # The whole model, default routing (every layer matrix on DRM's matrix path).
    "drm_h": ("drm", {"direction": "horizontal", "drop_rate": 0.8}, 1, None),
    "drm_v": ("drm", {"direction": "vertical", "drop_rate": 0.8}, 1, None),
    "drm_h_none": ("drm", {"direction": "horizontal", "drop_rate": 0.8}, 1, "none"),
    "drm_h_subset": ("drm", {"direction": "horizontal", "drop_rate": 0.8}, 1, "subset"),
    "drm_v_subset": ("drm", {"direction": "vertical", "drop_rate": 0.8}, 1, "subset"),
    # The same pair without the vocabulary tensors (before they were merged in row pieces,
    # DRM's fallback on them peaked at ≈ 21 GiB).
    "drm_none_no_vocab": ("drm", {"direction": "vertical", "drop_rate": 0.8}, 1, "none+no_vocab"),
    "drm_v_subset_no_vocab": (
        "drm",
        {"direction": "vertical", "drop_rate": 0.8},
        1,
        "subset+no_vocab",
    ),
    "drm_h_subset_no_vocab": (
        "drm",
        {"direction": "horizontal", "drop_rate": 0.8},
        1,
        "subset+no_vocab",
    ),
}


# Not in the default list: DRM-H/DRM-V on layers 0 and 1 with the vocabulary tensors (the
# *_no_vocab subset cases measure the same per-layer time; these add the pieced fallback).
DEFAULT_CASES = [c for c in CASES if c not in ("drm_h_subset", "drm_v_subset")]


# --------------------------------------------------------------------------- models


def tensor_specs() -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the 1B model, in ``LlamaForCausalLM.state_dict()`` order."""
    c = LLAMA_1B
    h, mlp = c["hidden_size"], c["intermediate_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    shapes = {
        "q_proj": (h, h),
        "k_proj": (kv, h),
        "v_proj": (kv, h),
        "o_proj": (h, h),
        "gate_proj": (mlp, h),
        "up_proj": (mlp, h),
        "down_proj": (h, mlp),
    }
    out = [("model.embed_tokens.weight", (c["vocab_size"], h))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(f"{p}{m}.weight", shapes[m.split(".")[1]]) for m in LAYER_MATRICES]
        out += [(f"{p}input_layernorm.weight", (h,)), (f"{p}post_attention_layernorm.weight", (h,))]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (c["vocab_size"], h))]
    return out


def build(workdir: Path, log=print) -> dict[str, Path]:
    """Base + branches as bf16 HF folders (streamed, one tensor at a time); reused if present."""
    import torch
    import transformers

    from drm_lightning.sources import HFFolderWriter

    folders = {
        "base": workdir / "base",
        **{f"b{i}": workdir / f"b{i}" for i in range(1, N_BRANCHES + 1)},
    }
    marker = workdir / "bench_1b.json"
    if marker.exists() and json.loads(marker.read_text()).get("format_version") == FORMAT_VERSION:
        return folders
    workdir.mkdir(parents=True, exist_ok=True)
    config = transformers.LlamaConfig(**LLAMA_1B)
    cfg_dir = workdir / "config"
    cfg_dir.mkdir(exist_ok=True)
    config.to_json_file(cfg_dir / "config.json")
    t0 = time.perf_counter()
    writers = {
        k: HFFolderWriter(p, overwrite=True, copy_from=cfg_dir, metadata={"method": "bench_1b"})
        for k, p in folders.items()
    }
    for w in writers.values():
        w.__enter__()
    try:
        specs = tensor_specs()
        for j, (name, shape) in enumerate(specs):
            gen = torch.Generator().manual_seed(common._seed("bench_1b", name))
            base = (
                1.0 + 0.05 * torch.randn(shape, generator=gen)
                if len(shape) == 1
                else 0.02 * torch.randn(shape, generator=gen)
            )
            base = base.to(torch.bfloat16)
            writers["base"].add(name, base)
            for b in range(1, N_BRANCHES + 1):
                delta = common.branch_delta(base, b, name)
                writers[f"b{b}"].add(name, (base.float() + delta).to(torch.bfloat16))
                del delta
            if j % 20 == 0:
                log(f"  built {j + 1}/{len(specs)} tensors ({time.perf_counter() - t0:.0f} s)")
    except BaseException:
        for w in writers.values():
            w.__exit__(*sys.exc_info())
        raise
    for w in writers.values():
        w.__exit__(None, None, None)
    marker.write_text(
        json.dumps(
            {
                "format_version": FORMAT_VERSION,
                "config": LLAMA_1B,
                "build_s": time.perf_counter() - t0,
            }
        )
    )
    return folders


def input_files(folders: dict[str, Path]) -> list[Path]:
    return sorted(f for p in folders.values() for f in p.glob("*.safetensors"))


def drop_from_page_cache(files: list[Path]) -> None:
    """Evict these files' clean pages (our files only), so the next read hits the disk."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def dd_read_speed(path: Path) -> dict[str, Any]:
    """Cold sequential read of one file with ``dd`` (bytes/s as dd reports it)."""
    drop_from_page_cache([path])
    t0 = time.perf_counter()
    run = subprocess.run(
        ["dd", f"if={path}", "of=/dev/null", "bs=16M"], capture_output=True, text=True, check=True
    )
    wall = time.perf_counter() - t0
    size = path.stat().st_size
    return {
        "file": str(path),
        "bytes": size,
        "seconds": wall,
        "bytes_per_s": size / wall,
        "dd_says": run.stderr.strip().splitlines()[-1],
    }


# --------------------------------------------------------------------------- one case


def write_config(case: str, folders: dict[str, Path], workdir: Path, drm_layers: list[int]) -> Path:
    method, params, _, layers = CASES[case]
    routing: dict[str, Any] = {}
    parts = set((layers or "").split("+"))
    if "no_vocab" in parts:
        routing["ignore"] = [r"model\.embed_tokens\.weight$", r"lm_head\.weight$"]
    if "none" in parts:
        routing["include"] = ["^$"]  # no tensor takes the matrix path
    if "subset" in parts:
        alt = "|".join(str(i) for i in drm_layers)
        routing["include"] = [rf"model\.layers\.({alt})\.(self_attn|mlp)\.[a-z_]+_proj\.weight$"]
    cfg = {
        "method": method,
        "base": str(folders["base"]),
        "branches": [{"path": str(folders[f"b{i}"])} for i in range(1, N_BRANCHES + 1)],
        "parameters": params,
        "compute_dtype": "float32",
    }
    if routing:
        cfg["routing"] = routing
    path = workdir / "configs" / f"{case}.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(cfg, indent=1))  # JSON is YAML
    return path


def _describe(layers: str | None, drm_layers: list[int]) -> str:
    parts = set((layers or "").split("+"))
    text = (
        "no tensor"
        if "none" in parts
        else f"layers {drm_layers}"
        if "subset" in parts
        else "default"
    )
    return text + ("; embed/lm_head copied" if "no_vocab" in parts else "")


class _TreePoller(threading.Thread):
    """Peak RSS of every process in a tree, sampled every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        import psutil

        self._root = psutil.Process(pid)
        self.interval = interval
        self.peaks: dict[int, dict[str, Any]] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        import psutil

        while not self._halt.is_set():
            try:
                procs = [self._root, *self._root.children(recursive=True)]
            except psutil.Error:
                break
            for p in procs:
                try:
                    rss = p.memory_info().rss
                    entry = self.peaks.setdefault(
                        p.pid, {"cmd": " ".join(p.cmdline()[1:4]), "peak_rss": 0}
                    )
                    entry["peak_rss"] = max(entry["peak_rss"], rss)
                except psutil.Error:
                    pass
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def digest_store(workdir: Path, files: list[Path], *, stored: bool) -> Path:
    """The digest store a case runs with: the inputs' digests in it (``stored``; hashed
    here, untimed) or empty (the merge hashes every input, as a first merge does)."""
    from drm_lightning.sources import sha256_of

    store = workdir / ("digests" if stored else f"digests-empty-{os.getpid()}-{time.time_ns()}")
    shutil.rmtree(store, ignore_errors=True)
    if stored:
        before = os.environ.get("DRM_LIGHTNING_CACHE")
        os.environ["DRM_LIGHTNING_CACHE"] = str(store)
        try:
            for f in files:
                sha256_of(f)
        finally:
            if before is None:
                del os.environ["DRM_LIGHTNING_CACHE"]
            else:
                os.environ["DRM_LIGHTNING_CACHE"] = before
    return store


def run_case(
    case: str,
    folders: dict[str, Path],
    workdir: Path,
    drm_layers: list[int],
    threads: int,
    timeout_s: float,
) -> dict[str, Any]:
    method, params, ranks, layers = CASES[case]
    cfg = write_config(case, folders, workdir, drm_layers)
    out = workdir / "out" / case
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(exist_ok=True)
    cli = ["-m", "drm_lightning.cli", str(cfg), "-o", str(out), "--no-progress"]
    cmd = common.python_command(cli, ranks)
    env = common.limit_threads_env(threads if ranks == 1 else 1)  # OMP_NUM_THREADS=1 per rank
    files = input_files(folders)
    env["DRM_LIGHTNING_CACHE"] = str(digest_store(workdir, files, stored=case.endswith("+stored")))
    drop_from_page_cache(files)
    load_before = [round(x, 2) for x in common.load_average()]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    poller = _TreePoller(proc.pid)
    poller.start()
    output_lines: list[str] = []
    reader = threading.Thread(target=lambda: output_lines.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    deadline = t0 + timeout_s
    while True:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            proc.kill()
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    poller.stop()
    reader.join(timeout=5)
    out_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors")) if out.exists() else 0
    result = {
        "case": case,
        "method": method,
        "params": params,
        "ranks": ranks,
        "threads_per_rank": threads if ranks == 1 else 1,
        "matrix_path": _describe(layers, drm_layers),
        "exit_code": proc.returncode,
        "wall_s": wall,
        "cpu_s": ru.ru_utime + ru.ru_stime,
        "peak_rss_largest_process": ru.ru_maxrss * 1024,
        "peak_rss_per_process": sorted(
            (v for v in poller.peaks.values()), key=lambda v: -v["peak_rss"]
        ),
        "read_bytes": ru.ru_inblock * 512,
        "written_bytes": ru.ru_oublock * 512,
        "input_bytes": sum(f.stat().st_size for f in files),
        "output_tensor_bytes": out_bytes,
        "load_before": load_before,
        "load_after": [round(x, 2) for x in common.load_average()],
        "output_tail": "".join(output_lines)[-2000:],
    }
    if not case.endswith("+stored"):
        shutil.rmtree(env["DRM_LIGHTNING_CACHE"], ignore_errors=True)
    if proc.returncode == 0:
        shutil.rmtree(out, ignore_errors=True)  # 3 GB each; keep the disk free
    return result


def derive(results: dict[str, Any], drm_layers: list[int]) -> dict[str, Any]:
    """Per-layer DRM time and the whole-model extrapolation; TIES seconds per GB read."""
    cases = results["cases"]
    n_layers = LLAMA_1B["num_hidden_layers"]
    out: dict[str, Any] = {}
    ok = {k: c for k, c in cases.items() if c["exit_code"] == 0}
    whole_base = ok.get("drm_h_none")  # every tensor read, merged by DRM's fallback, written
    for d in ("h", "v"):
        # (with the vocabulary tensors, without them): subset run minus the no-matrix run
        for suffix, none_key in (("", "drm_h_none"), ("_no_vocab", "drm_none_no_vocab")):
            sub, none = ok.get(f"drm_{d}_subset{suffix}"), ok.get(none_key)
            if not (sub and none):
                continue
            per_layer = (sub["wall_s"] - none["wall_s"]) / len(drm_layers)
            entry = {
                "from": [f"drm_{d}_subset{suffix}", none_key],
                "per_layer_wall_s": per_layer,
                "per_layer_cpu_s": (sub["cpu_s"] - none["cpu_s"]) / len(drm_layers),
            }
            if whole_base:
                entry["whole_model_wall_s_extrapolated"] = (
                    whole_base["wall_s"] + n_layers * per_layer
                )
            out.setdefault(f"drm_{d}", entry)
    for key in (
        "ties",
        "ties+stored",
        "ties@2",
        "ties_no_vocab",
        "ties_no_vocab@2",
        "task_arithmetic",
    ):
        c = cases.get(key)
        if c and c["exit_code"] == 0:
            out[f"{key}_s_per_input_gb"] = c["wall_s"] / (c["input_bytes"] / 1e9)
    for one in ("ties", "ties_no_vocab"):
        if one in cases and f"{one}@2" in cases:
            out[f"{one}_speedup_2_ranks"] = cases[one]["wall_s"] / cases[f"{one}@2"]["wall_s"]
    return out


def table(results: dict[str, Any]) -> str:
    gib = 2**30
    lines = [
        (
            "| case | ranks | matrix path | wall s | CPU s | peak RSS GiB (largest proc) | "
            "read GB | written GB | load 1-min before→after |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in results["cases"].values():
        lines.append(
            f"| {c['case']} | {c['ranks']} | {c['matrix_path']} | "
            f"{c['wall_s']:.1f} | {c['cpu_s']:.1f} | "
            f"{c['peak_rss_largest_process'] / gib:.2f} | {c['read_bytes'] / 1e9:.2f} | "
            f"{c['written_bytes'] / 1e9:.2f} | "
            f"{c['load_before'][0]}→{c['load_after'][0]} |"
            + ("" if c["exit_code"] == 0 else f" FAILED ({c['exit_code']})")
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/drm_bench_1b"))
    parser.add_argument(
        "--cases", default=",".join(DEFAULT_CASES), help=f"comma list of {list(CASES)}"
    )
    parser.add_argument(
        "--drm-layers", default="0,1", help="layers whose matrices take DRM's matrix path"
    )
    parser.add_argument("--threads", type=int, default=2, help="threads of a 1-rank run")
    parser.add_argument("--timeout-s", type=float, default=3600)
    parser.add_argument("--build-only", action="store_true")
    parser.add_argument(
        "--json", type=Path, default=ROOT / "benchmarks" / "results" / "scale_1b.json"
    )
    args = parser.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    drm_layers = [int(x) for x in args.drm_layers.split(",")]
    folders = build(args.workdir)
    if args.build_only:
        return 0
    results: dict[str, Any] = json.loads(args.json.read_text()) if args.json.exists() else {}
    results.setdefault("cases", {})
    results["system"] = common.system_info(args.threads)
    results["model"] = {
        "config": LLAMA_1B,
        "n_branches": N_BRANCHES,
        "bytes_per_folder": sum(f.stat().st_size for f in folders["base"].glob("*.safetensors")),
    }
    results["dd"] = dd_read_speed(min(folders["b1"].glob("*.safetensors")))
    print(f"dd cold read: {results['dd']['dd_says']}", flush=True)
    for case in cases:
        print(f"== {case}", flush=True)
        results["cases"][case] = r = run_case(
            case, folders, args.workdir, drm_layers, args.threads, args.timeout_s
        )
        print(
            f"   wall {r['wall_s']:.1f} s, cpu {r['cpu_s']:.1f} s, "
            f"peak RSS {r['peak_rss_largest_process'] / 2**30:.2f} GiB, "
            f"exit {r['exit_code']}, load {r['load_before'][0]}→{r['load_after'][0]}",
            flush=True,
        )
        results["derived"] = derive(results, drm_layers)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    print(json.dumps(results["derived"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
