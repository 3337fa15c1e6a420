#!/usr/bin/env python
"""Merge-core benchmark: disk-to-disk wall time and peak RSS of every merge method.

What it measures, on locally built Llama-shaped models (~15M and ~107M parameters) with
N=3 fine-tuned branches (a rank-16 update of 1e-2·||W|| plus 1e-3·||W|| Gaussian noise per
tensor, different per branch, fixed seeds):

* for each method (DRM vertical, DRM horizontal, TIES, task arithmetic, DARE-TIES,
  DARE-linear, linear), in a fresh subprocess so the peak RSS is that method's alone: the
  time from opening the sources to the finished output folder — lazy reads with
  ``drm_lightning.sources.open_source``, the package merge loop (``plan_merge`` +
  ``iter_merge``), writing with ``drm_lightning.sources.writer.HFFolderWriter`` — without
  the imports, split into read / merge / write; and the child's peak RSS (``ru_maxrss``,
  imports included; the RSS right after the imports is reported too);
* for DRM, in the same run and in its own subprocess, the bare ``torch.linalg.svd``
  (``full_matrices=False``) time of the same stacked matrices (row stacks ``[Δ_1;…;Δ_N]``
  for DRM-V, stacks of the transposes for DRM-H), and the ratio of DRM's whole merge to it.
  The same child also times the package's ``shared_basis`` on those stacks, which says how
  much of DRM's time is the basis;
* a LoRA micro-benchmark: ``drm_merge_lowrank`` (exact factored path) against ``drm_merge``
  on the dense ``B·A`` deltas of the same factors: time ratio and max abs difference.

Usage::

    python benchmarks/merge_core.py                 # 15m and 107m, every method, 2 threads
    python benchmarks/merge_core.py --quick         # smoke run: 15m only, small LoRA case
    python benchmarks/merge_core.py --sizes 107m --methods drm_v,ties --threads 2

Results go to ``benchmarks/results/merge_core.json`` (``--json`` to change) and a table on
stdout. Models are cached under ``--workdir`` (default ``/tmp/drm_bench``) and reused.

Timings are only meaningful on an otherwise idle machine: every child runs with exactly
``--threads`` BLAS/OpenMP threads, and any other process competing for those cores
inflates the times arbitrarily (the 1-minute load average before and after the run is
recorded in the JSON; if it exceeds the core count, discard the numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

# benchmark name -> (registered method, parameters). Densities match DRM's drop_rate 0.8.
METHODS: dict[str, tuple[str, dict]] = {
    "drm_v": ("drm", {"direction": "vertical", "drop_rate": 0.8}),
    "drm_h": ("drm", {"direction": "horizontal", "drop_rate": 0.8}),
    # The basis in the compute dtype (float32): the default before issue 8, faster, less exact.
    "drm_v_basis32": (
        "drm",
        {"direction": "vertical", "drop_rate": 0.8, "basis_precision": "compute"},
    ),
    "drm_h_basis32": (
        "drm",
        {"direction": "horizontal", "drop_rate": 0.8, "basis_precision": "compute"},
    ),
    # A float32 SVD, as the DRM reference library computes the basis.
    "drm_h_svd32": (
        "drm",
        {
            "direction": "horizontal",
            "drop_rate": 0.8,
            "solver": "svd",
            "basis_precision": "compute",
        },
    ),
    # The float64 basis from a float32 eigh refined in float64 (issue 22): faster at low kept rank.
    "drm_v_refined": (
        "drm",
        {"direction": "vertical", "drop_rate": 0.8, "solver": "refined"},
    ),
    "drm_h_refined": (
        "drm",
        {"direction": "horizontal", "drop_rate": 0.8, "solver": "refined"},
    ),
    "ties": ("ties", {"density": 0.2}),
    "task_arithmetic": ("task_arithmetic", {}),
    "dare_ties": ("dare_ties", {"density": 0.2}),
    "dare_linear": ("dare_linear", {"density": 0.2}),
    "linear": ("linear", {}),
}
# Candidate fixes measured beside the package's own code (monkeypatched in the child only).
VARIANTS: dict[str, tuple[str, str]] = {
    "drm_v+torch_eigh": ("drm_v", "torch_eigh"),
    "drm_h+torch_eigh": ("drm_h", "torch_eigh"),
}
ALIASES = {
    "drm": ["drm_v", "drm_h"],
    "drm_vertical": ["drm_v"],
    "drm_horizontal": ["drm_h"],
    "all": list(METHODS),
}

# Targets of issue 3, for the 107M model, 2 cores, fp32.
TARGETS_107M = {"ties_s": 9.0, "drm_s": 40.0, "peak_rss_bytes": 1.3e9, "drm_over_svd": 0.4}
REFERENCE_107M = {
    "mergekit TIES": "46 s",
    "PEFT TIES functions": "18 s",
    "DRM reference (horizontal)": "202 s, of which 183 s SVDs",
    "Gram + eigh, same shapes": "57 s",
    "peak RSS (all)": "2.5-2.9 GB",
}


# =========================================================================== children


class _TimedSource:
    """Delegates to a weight source and accumulates the time spent reading tensors."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.read_s = 0.0

    def __getattr__(self, name):  # keys, meta, files, describe, origin, lowrank...
        attr = getattr(self._inner, name)
        if name in ("get", "lowrank") and callable(attr):

            def timed(*args, **kwargs):
                t0 = time.perf_counter()
                try:
                    return attr(*args, **kwargs)
                finally:
                    self.read_s += time.perf_counter() - t0

            return timed
        return attr


def _cpu_seconds() -> float:
    """User + system CPU time of this process (all threads)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass


def child_merge(spec: dict) -> dict:
    """One method, disk to disk, through the same calls as ``drm-merge CONFIG -o OUT``.

    ``load_config`` -> ``open_job`` (lazy sources, ``plan_merge`` from metadata) ->
    ``run_job`` (``iter_merge`` streamed into ``HFFolderWriter``: shards, config copy, model
    card with the SHA-256 of every input file, atomic rename). Sources are wrapped to time
    the reads, the writer's methods to time the writes; the rest is merge compute.
    """
    import yaml

    from drm_lightning.cli.job import open_job, run_job
    from drm_lightning.config.loading import load_config
    from drm_lightning.sources import writer as writer_mod

    _set_threads(spec["threads"])
    if spec.get("patch") == "torch_eigh":
        # Candidate fix, benchmark-local: skip scipy's syevr, use torch.linalg.eigh (MKL).
        import drm_lightning.methods.drm as drm_module

        drm_module._top_eigenpairs_scipy = lambda gram, rank_rtol: None
    rss_imports = common.current_rss_bytes()
    out_dir = Path(spec["out"])
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    config_path = out_dir.with_name(out_dir.name + ".yaml")
    config_path.write_text(
        yaml.safe_dump(
            {
                "method": spec["method"],
                "base": spec["base"],
                "branches": [{"path": p, "coefficient": 1.0} for p in spec["branches"]],
                "parameters": spec["params"],
                "compute_dtype": "float32",
            }
        )
    )

    timers = {"add": 0.0, "finish": 0.0}

    def timed(key, fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timers[key] += time.perf_counter() - t

        return wrapper

    cls = writer_mod.HFFolderWriter
    cls.add = timed("add", cls.add)  # copy into the shard buffer, flush full shards
    cls._finish = timed("finish", cls._finish)  # last shard, index, side files, card, rename
    profiler = None
    if spec.get("profile"):
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()

    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    job = open_job(load_config(config_path))
    job.base = _TimedSource(job.base)
    job.branches = [_TimedSource(b) for b in job.branches]
    t_plan = time.perf_counter()
    run_job(job, out_dir, overwrite=True, progress=False)
    total = time.perf_counter() - t0
    cpu_s = _cpu_seconds() - cpu0

    profile_text = None
    if profiler is not None:
        import io
        import pstats

        profiler.disable()
        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).sort_stats("tottime").print_stats(30)
        profile_text = buf.getvalue()
    read_s = job.base.read_s + sum(b.read_s for b in job.branches)
    write_s = timers["add"] + timers["finish"]
    out_bytes = sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file())
    shutil.rmtree(out_dir, ignore_errors=True)
    config_path.unlink(missing_ok=True)
    return {
        "kind": "merge",
        "wall_s": total,
        "cpu_s": cpu_s,
        "plan_s": t_plan - t0,
        "read_s": read_s,
        "write_s": write_s,
        "write_finish_s": timers["finish"],
        "merge_s": total - (t_plan - t0) - read_s - write_s,
        "tensors": len(job.plan),
        "output_bytes": out_bytes,
        "rss_after_imports_bytes": rss_imports,
        "peak_rss_bytes": common.peak_rss_bytes(),
        "profile": profile_text,
    }


def _gram_basis_torch_eigh(deltas):
    """The Gram route with a full ``torch.linalg.eigh`` (the alternative to scipy's syevr)."""
    import torch

    n_br, n, m = deltas.shape
    if n_br * n >= m:
        gram = torch.zeros(m, m, dtype=deltas.dtype)
        for d in deltas:
            gram.addmm_(d.mT, d)
    else:
        stack = deltas.reshape(n_br * n, m)
        gram = stack @ stack.mT
    return torch.linalg.eigh(gram)


def child_svd(spec: dict) -> dict:
    """Bare ``torch.linalg.svd`` of the stacked deltas of every matrix-routed tensor.

    Reads base and branches with the package sources (not timed), forms the stacks exactly
    as DRM sees them, and times (a) ``torch.linalg.svd(stack, full_matrices=False)`` and
    (b) the package's ``shared_basis`` (the route DRM takes) and (c) the Gram route with
    ``torch.linalg.eigh`` instead (a candidate fix), each on the same stack.
    """
    import torch

    from drm_lightning.merge.plan import plan_merge
    from drm_lightning.methods.drm import shared_basis
    from drm_lightning.sources import open_source

    _set_threads(spec["threads"])
    base = open_source(spec["base"])
    branches = [open_source(p) for p in spec["branches"]]
    plan = plan_merge(base, branches)
    svd_s = basis_s = eigh_s = 0.0
    per_shape: dict[str, dict] = {}
    for item in plan:
        if item.route != "matrix":
            continue
        b = base.get(item.name).to(torch.float32)
        deltas = torch.stack([br.get(item.name).to(torch.float32) - b for br in branches])
        del b
        if spec["direction"] == "horizontal":
            deltas = deltas.mT.contiguous()
        n_br, n, m = deltas.shape
        stack = deltas.reshape(n_br * n, m)
        t0 = time.perf_counter()
        torch.linalg.svd(stack, full_matrices=False)
        t1 = time.perf_counter()
        basis = shared_basis(deltas)
        t2 = time.perf_counter()
        _gram_basis_torch_eigh(deltas)
        t3 = time.perf_counter()
        svd_s += t1 - t0
        basis_s += t2 - t1
        eigh_s += t3 - t2
        key = f"{n_br * n}x{m}"
        row = per_shape.setdefault(
            key, {"count": 0, "svd_s": 0.0, "basis_s": 0.0, "gram_torch_eigh_s": 0.0, "rank": []}
        )
        row["count"] += 1
        row["svd_s"] += t1 - t0
        row["basis_s"] += t2 - t1
        row["gram_torch_eigh_s"] += t3 - t2
        row["rank"].append(basis.rank)
        del deltas, stack, basis
    for row in per_shape.values():
        ranks = row.pop("rank")
        row["rank_min_max"] = [min(ranks), max(ranks)]
    return {
        "kind": "svd",
        "direction": spec["direction"],
        "svd_s": svd_s,
        "shared_basis_s": basis_s,
        "gram_torch_eigh_s": eigh_s,
        "per_shape": per_shape,
        "peak_rss_bytes": common.peak_rss_bytes(),
    }


def child_lora(spec: dict) -> dict:
    """DRM on LoRA deltas: exact factored path against the dense path on the same B·A."""
    import torch

    from drm_lightning.methods.drm import drm_merge, drm_merge_lowrank

    _set_threads(spec["threads"])
    rows = []
    for case in spec["cases"]:
        n, m, rank, n_br = case["n"], case["m"], case["rank"], case["branches"]
        for dtype_name in case["dtypes"]:
            dtype = getattr(torch, dtype_name)
            gen = torch.Generator().manual_seed(1234 + n + m)
            factors = []
            for _ in range(n_br):
                b = torch.randn(n, rank, generator=gen, dtype=torch.float64) * 0.01
                a = torch.randn(rank, m, generator=gen, dtype=torch.float64) / rank**0.5
                factors.append((b.to(dtype), a.to(dtype)))
            coef = torch.ones(n_br, dtype=dtype)
            # Factored: best of 3 (it is short, so take the least-noisy repetition).
            fac_times = []
            for _ in range(3):
                t0 = time.perf_counter()
                merged_f = drm_merge_lowrank(factors, coef, (n, m))
                fac_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            dense = torch.stack([b @ a for b, a in factors])
            merged_d = drm_merge(dense, coef)
            dense_s = time.perf_counter() - t0
            diff = (merged_f - merged_d).abs().max().item()
            scale = merged_d.abs().max().item()
            rel_fro = ((merged_f - merged_d).norm() / merged_d.norm().clamp_min(1e-300)).item()
            rows.append(
                {
                    "shape": [n, m],
                    "rank": rank,
                    "branches": n_br,
                    "dtype": dtype_name,
                    "factored_s": min(fac_times),
                    "dense_s": dense_s,
                    "speedup": dense_s / max(min(fac_times), 1e-9),
                    "max_abs_diff": diff,
                    "max_abs_merged": scale,
                    "rel_fro_diff": rel_fro,
                }
            )
            del dense, merged_d, merged_f
    return {"kind": "lora", "rows": rows, "peak_rss_bytes": common.peak_rss_bytes()}


CHILDREN = {"merge": child_merge, "svd": child_svd, "lora": child_lora}


# =========================================================================== parent


def run_child(spec: dict, threads: int, timeout: float) -> dict:
    """Run one measurement in a fresh interpreter; returns its JSON result."""
    result_path = Path(spec["result"])
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    env = common.limit_threads_env(threads)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd, env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=timeout
    )
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0 or not result_path.exists():
        tail = (proc.stderr or proc.stdout)[-3000:]
        return {
            "error": f"child exited with {proc.returncode}: {tail.strip()}",
            "process_s": elapsed,
        }
    out = json.loads(result_path.read_text())
    result_path.unlink(missing_ok=True)
    out["process_s"] = elapsed
    return out


def resolve_methods(text: str) -> list[str]:
    names: list[str] = []
    for raw in text.split(","):
        raw = raw.strip()
        if not raw:
            continue
        for name in ALIASES.get(raw, [raw]):
            if name not in METHODS:
                raise SystemExit(
                    f"unknown method {raw!r}; valid: {', '.join(METHODS)} "
                    f"(aliases: {', '.join(ALIASES)})"
                )
            if name not in names:
                names.append(name)
    return names


def method_params(registered: str, wanted: dict) -> tuple[dict, list[str]]:
    """Keep the parameters the registered method declares (the task-vector family may differ)."""
    from drm_lightning.methods import method_parameters

    declared = method_parameters(registered)
    kept = {k: v for k, v in wanted.items() if k in declared}
    return kept, sorted(set(wanted) - set(kept))


def bench_size(size: str, args, log) -> dict:
    model = common.build_models(
        size, args.workdir, n_branches=args.branches, log=log, noise=args.noise
    )
    shapes = {}
    for _, shape in model.matrix_shapes:
        shapes[f"{shape[0]}x{shape[1]}"] = shapes.get(f"{shape[0]}x{shape[1]}", 0) + 1
    log(
        f"\n== {size}: {model.n_params / 1e6:.2f} M parameters, {args.branches} branches, "
        f"matrices {shapes}"
    )
    res: dict = {
        "n_params": model.n_params,
        "branches": args.branches,
        "matrix_shapes": shapes,
        "methods": {},
        "bare_svd": {},
    }
    tmp = args.workdir / "results_tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    common_spec = {
        "base": str(model.base),
        "branches": [str(p) for p in model.branches],
        "threads": args.threads,
    }
    from drm_lightning.methods import available_methods

    registered = set(available_methods())
    runs = [(name, None) for name in args.methods]
    if args.variants:
        runs += [(v, patch) for v, (name, patch) in VARIANTS.items() if name in args.methods]
    for name, patch in runs:
        reg, wanted = METHODS[VARIANTS[name][0] if patch else name]
        if reg not in registered:
            res["methods"][name] = {"error": f"method {reg!r} is not registered in this checkout"}
            log(f"  {name:16s} skipped: {reg!r} not registered")
            continue
        params, dropped = method_params(reg, wanted)
        spec = {
            **common_spec,
            "child": "merge",
            "method": reg,
            "params": params,
            "out": str(args.workdir / "out" / f"{size}_{name}"),
            "result": str(tmp / f"{size}_{name}.json"),
            "profile": args.profile,
            "patch": patch,
        }
        r = run_child(spec, args.threads, args.timeout)
        r.update(method=reg, params=params, params_not_declared=dropped)
        res["methods"][name] = r
        if "error" in r:
            log(f"  {name:16s} FAILED: {r['error'][-400:]}")
        else:
            log(
                f"  {name:16s} {r['wall_s']:8.2f} s, cpu {r['cpu_s']:6.2f} s  "
                f"(read {r['read_s']:.2f}, merge "
                f"{r['merge_s']:.2f}, write {r['write_s']:.2f})  peak RSS "
                f"{common.fmt_bytes(r['peak_rss_bytes'])}"
            )
            if args.profile and r.get("profile"):
                log(r["profile"])
    for name, direction in (("drm_v", "vertical"), ("drm_h", "horizontal")):
        if name not in args.methods or args.no_svd:
            continue
        spec = {
            **common_spec,
            "child": "svd",
            "direction": direction,
            "result": str(tmp / f"{size}_svd_{direction}.json"),
        }
        r = run_child(spec, args.threads, args.timeout)
        res["bare_svd"][direction] = r
        if "error" in r:
            log(f"  bare SVD ({direction}) FAILED: {r['error'][-400:]}")
            continue
        for key in (name, f"{name}+torch_eigh"):
            m = res["methods"].get(key, {})
            if "wall_s" in m:
                m["bare_svd_s"] = r["svd_s"]
                m["ratio_to_bare_svd"] = m["wall_s"] / r["svd_s"]
        m = res["methods"].get(name, {})
        log(
            f"  bare SVD {direction:10s} {r['svd_s']:8.2f} s   package shared_basis on the "
            f"same stacks {r['shared_basis_s']:.2f} s "
            f"(Gram + torch eigh {r['gram_torch_eigh_s']:.2f} s)"
            + (
                f"   -> DRM / SVD = {m['ratio_to_bare_svd']:.3f}"
                if "ratio_to_bare_svd" in m
                else ""
            )
        )
    return res


def lora_cases(quick: bool) -> list[dict]:
    if quick:
        return [{"n": 1024, "m": 2816, "rank": 16, "branches": 4, "dtypes": ["float32", "float64"]}]
    return [
        {"n": 4096, "m": 4096, "rank": 16, "branches": 4, "dtypes": ["float32"]},
        {"n": 1024, "m": 2816, "rank": 16, "branches": 4, "dtypes": ["float32", "float64"]},
    ]


def check_targets(results: dict) -> list[dict]:
    """Issue-3 targets, evaluated on the 107M model only."""
    big = results["sizes"].get("107m")
    if not big:
        return []
    out = []
    methods = big["methods"]

    def add(what, value, target, unit):
        if value is None:
            return
        out.append(
            {
                "check": what,
                "value": value,
                "target": target,
                "unit": unit,
                "met": bool(value <= target),
            }
        )

    add("ties wall time", methods.get("ties", {}).get("wall_s"), TARGETS_107M["ties_s"], "s")
    for name in ("drm_v", "drm_h"):
        m = methods.get(name, {})
        add(f"{name} wall time", m.get("wall_s"), TARGETS_107M["drm_s"], "s")
        add(f"{name} / bare SVD", m.get("ratio_to_bare_svd"), TARGETS_107M["drm_over_svd"], "x")
    for name, m in methods.items():
        add(f"{name} peak RSS", m.get("peak_rss_bytes"), TARGETS_107M["peak_rss_bytes"], "B")
    return out


def print_table(results: dict, log) -> str:
    lines = []
    info = results["system"]
    lines.append(
        f"CPU: {info['cpu']} ({info['logical_cpus']} logical), threads={info['threads']}, "
        f"torch {info['torch']}, load avg before {results['load_before']} / after "
        f"{results['load_after']}"
    )
    lines.append("")
    lines.append(
        "| model | method | wall s | CPU s | read s | merge s | write s | peak RSS | "
        "RSS after imports | bare SVD s | DRM / SVD |"
    )
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size, res in results["sizes"].items():
        label = f"{size} ({res['n_params'] / 1e6:.1f} M)"
        for name, m in res["methods"].items():
            if "error" in m:
                lines.append(f"| {label} | {name} | failed | | | | | | | | |")
                continue
            svd = f"{m['bare_svd_s']:.2f}" if "bare_svd_s" in m else ""
            ratio = f"{m['ratio_to_bare_svd']:.3f}" if "ratio_to_bare_svd" in m else ""
            lines.append(
                f"| {label} | {name} | {m['wall_s']:.2f} | {m['cpu_s']:.2f} | "
                f"{m['read_s']:.2f} | {m['merge_s']:.2f} | "
                f"{m['write_s']:.2f} | {common.fmt_bytes(m['peak_rss_bytes'])} | "
                f"{common.fmt_bytes(m['rss_after_imports_bytes'])} | {svd} | {ratio} |"
            )
    if results.get("lora"):
        lines.append("")
        lines.append(
            "| LoRA DRM | rank | N | dtype | factored s | dense s | dense / factored | "
            "max abs diff | max abs merged | rel Frobenius diff |"
        )
        lines.append("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
        for r in results["lora"].get("rows", []):
            lines.append(
                f"| {r['shape'][0]}x{r['shape'][1]} | {r['rank']} | {r['branches']} | "
                f"{r['dtype']} | "
                f"{r['factored_s']:.4f} | {r['dense_s']:.3f} | {r['speedup']:.0f}x | "
                f"{r['max_abs_diff']:.2e} | {r['max_abs_merged']:.2e} | {r['rel_fro_diff']:.2e} |"
            )
    if results.get("targets"):
        lines.append("")
        lines.append("| target (107M, issue 3) | value | target | met |")
        lines.append("|---|---:|---:|---|")
        for t in results["targets"]:
            fmt = common.fmt_bytes if t["unit"] == "B" else (lambda v, u=t["unit"]: f"{v:.3g} {u}")
            lines.append(
                f"| {t['check']} | {fmt(t['value'])} | {fmt(t['target'])} | "
                f"{'yes' if t['met'] else 'NO'} |"
            )
    text = "\n".join(lines)
    log("\n" + text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Results under CPU contention are meaningless: run on "
        "an idle machine; the load average is recorded.",
    )
    parser.add_argument("--sizes", default="15m,107m", help="comma list of 15m, 107m")
    parser.add_argument(
        "--methods", default="all", help=f"comma list of {', '.join(METHODS)} (or drm, all)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="BLAS/OpenMP threads of every child (default 2, the target machine)",
    )
    parser.add_argument("--branches", type=int, default=3)
    parser.add_argument(
        "--noise",
        type=float,
        default=common.NOISE_SCALE,
        help="Gaussian noise of each delta, relative to ||W||_F (default 1e-3: the "
        "kept DRM rank is then near full, as for full fine-tunes; 1e-4 keeps "
        "only the 3x16 low-rank directions)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("/tmp/drm_bench"),
        help="model cache and scratch output (default /tmp/drm_bench)",
    )
    parser.add_argument(
        "--json", type=Path, default=ROOT / "benchmarks" / "results" / "merge_core.json"
    )
    parser.add_argument(
        "--markdown",
        type=Path,
        default=None,
        help="also write the table (with machine, threads, load) to this .md file",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 15m only, small LoRA case")
    parser.add_argument("--no-svd", action="store_true", help="skip the bare-SVD reference")
    parser.add_argument("--no-lora", action="store_true", help="skip the LoRA micro-benchmark")
    parser.add_argument(
        "--variants",
        action="store_true",
        help="also run candidate fixes (DRM with torch.linalg.eigh instead of scipy syevr)",
    )
    parser.add_argument("--profile", action="store_true", help="cProfile each merge child")
    parser.add_argument("--timeout", type=float, default=1800.0, help="per-child limit in seconds")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        spec = json.loads(args.child)
        out = CHILDREN[spec["child"]](spec)
        Path(spec["result"]).write_text(json.dumps(out))
        return 0

    sizes = ["15m"] if args.quick else [s.strip() for s in args.sizes.split(",") if s.strip()]
    for s in sizes:
        if s not in common.MODEL_SIZES:
            parser.error(f"unknown size {s!r}; valid: {', '.join(common.MODEL_SIZES)}")
    args.methods = resolve_methods(args.methods)
    args.workdir = args.workdir.resolve()
    sys.path.insert(0, str(ROOT))
    log = lambda *a: print(*a, flush=True)  # noqa: E731

    results: dict = {
        "system": common.system_info(args.threads),
        "load_before": [round(x, 2) for x in common.load_average()],
        "command": " ".join(
            [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
        ),
        "delta_model": {
            "rank": common.DELTA_RANK,
            "scale": common.DELTA_SCALE,
            "noise": args.noise,
            "branches": args.branches,
        },
        "reference_107m": REFERENCE_107M,
        "targets_107m": TARGETS_107M,
        "sizes": {},
    }
    if results["load_before"][0] > (os.cpu_count() or 1) * 0.5:
        log(
            f"WARNING: load average {results['load_before']} on {os.cpu_count()} CPUs - "
            "timings under contention are meaningless"
        )
    for size in sizes:
        results["sizes"][size] = bench_size(size, args, log)
    if not args.no_lora:
        tmp = args.workdir / "results_tmp"
        spec = {
            "child": "lora",
            "threads": args.threads,
            "cases": lora_cases(args.quick),
            "result": str(tmp / "lora.json"),
        }
        results["lora"] = run_child(spec, args.threads, args.timeout)
        if "error" in results["lora"]:
            log(f"LoRA micro-benchmark FAILED: {results['lora']['error'][-400:]}")
    results["load_after"] = [round(x, 2) for x in common.load_average()]
    results["targets"] = check_targets(results)
    results["table_markdown"] = print_table(results, log)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    log(f"\nwrote {args.json}")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(
            f"Command: `python benchmarks/{results['command']}`\n\n{results['table_markdown']}\n"
        )
        log(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
