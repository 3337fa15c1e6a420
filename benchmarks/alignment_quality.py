"""Merging models trained from DIFFERENT random inits: six MuDSC-paper methods and align-then-DRM.

The setting of the paper's MNIST study, on scikit-learn's bundled digits (nothing downloaded):
two MLPs (64 → W → W → W → 10, ReLU) are trained from different random inits, model A on
digits 0-4 and model B on digits 5-9, both with a 10-way output (the shared output space is
not permuted). They are merged without training by every alignment method of
``drm_lightning.alignment`` and by align-then-DRM (MuDSC-Align permutation, then DRM against
the mean of the aligned branches). Reported per seed and as mean ± std over seeds:

* ``acc_A`` / ``acc_B``: task-aware accuracy (argmax over the task's 5 classes) on the
  held-out images of that task; ``avg`` their mean; ``joint``: 10-way accuracy on all.
* paired differences per seed: MuDSC-Zip − ZipIt, MuDSC-Align − A. Align, ZipIt − averaging.
* alignment time against width (W = 64 … 1024), one seed, untrained nets.

    python benchmarks/alignment_quality.py [--seeds 0 1 2] [--width 128] [--timing]

Writes ``benchmarks/results/alignment_quality.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from drm_lightning.alignment import (
    align,
    align_then_merge,
    derive_spec,
    merge_models,
)

METHODS = [
    "weight_average",
    "weight_matching",
    "activation_align",
    "zipit",
    "weight_zip",
    "mudsc_align",
    "mudsc_zip",
]
OUT = Path(__file__).parent / "results" / "alignment_quality.json"


def mlp(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, 10),
    )


def digits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.7 * len(y))
    tr, te = perm[:cut], perm[cut:]
    mean, std = x[tr].mean(0), x[tr].std(0) + 0.1
    x = (x - mean) / std
    return x[tr], y[tr], x[te], y[te]


def train(width: int, x: torch.Tensor, y: torch.Tensor, seed: int, steps: int = 400) -> nn.Module:
    torch.manual_seed(seed)
    net = mlp(width)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(y), (128,), generator=g)
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def scores(net: nn.Module, xte: torch.Tensor, yte: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        logits = net(xte)
    out = {}
    for name, classes in (("acc_A", range(0, 5)), ("acc_B", range(5, 10))):
        cls = torch.tensor(list(classes))
        mask = torch.isin(yte, cls)
        pred = cls[logits[mask][:, cls].argmax(1)]
        out[name] = 100 * float((pred == yte[mask]).float().mean())
    out["avg"] = (out["acc_A"] + out["acc_B"]) / 2
    out["joint"] = 100 * float((logits.argmax(1) == yte).float().mean())
    return out


def one_seed(seed: int, width: int) -> dict[str, dict[str, float]]:
    xtr, ytr, xte, yte = digits()
    a_mask, b_mask = ytr < 5, ytr >= 5
    models = [
        train(width, xtr[a_mask], ytr[a_mask], 1000 + seed),
        train(width, xtr[b_mask], ytr[b_mask], 2000 + seed),
    ]
    batches = list(torch.split(xtr, 256))  # unlabelled calibration images of both tasks
    spec = derive_spec(models[0], xtr[:2])
    rows: dict[str, dict[str, float]] = {
        "model_A": scores(models[0], xte, yte),
        "model_B": scores(models[1], xte, yte),
    }
    for name in METHODS:
        t0 = time.perf_counter()
        merged = merge_models(models, batches, method=name, spec=spec, seed=seed)
        rows[name] = scores(merged, xte, yte) | {"seconds": time.perf_counter() - t0}
    t0 = time.perf_counter()
    state = align_then_merge(
        "drm", "average", models, batches, spec=spec, alignment="mudsc_align", seed=seed
    )
    merged = mlp(width)
    merged.load_state_dict(state)
    rows["mudsc_align+drm"] = scores(merged.eval(), xte, yte) | {
        "seconds": time.perf_counter() - t0
    }
    return rows


def timing(widths: list[int]) -> list[dict[str, float]]:
    out = []
    x = torch.randn(4096, 64)
    batches = list(torch.split(x, 512))
    for w in widths:
        torch.manual_seed(w)
        models = [mlp(w).eval(), mlp(w).eval()]
        spec = derive_spec(models[0], x[:2])
        row: dict[str, float] = {"width": w}
        for name in ("mudsc_align", "mudsc_zip"):
            t0 = time.perf_counter()
            res = align(models, batches, method=name, spec=spec)
            row[f"{name}_s"] = time.perf_counter() - t0
            row[f"{name}_sweeps"] = res.sweeps
        out.append(row)
        print(row, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument(
        "--timing", action="store_true", help="also time the alignment for W = 64..1024"
    )
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    per_seed = {}
    for seed in args.seeds:
        per_seed[seed] = one_seed(seed, args.width)
        print(
            f"seed {seed}: " + ", ".join(f"{k} {v['avg']:.1f}" for k, v in per_seed[seed].items()),
            flush=True,
        )
    names = list(per_seed[args.seeds[0]])
    summary = {}
    print(f"\n{'method':18s} {'acc_A':>12s} {'acc_B':>12s} {'avg':>12s} {'joint':>12s}")
    for n in names:
        summary[n] = {}
        cells = []
        for k in ("acc_A", "acc_B", "avg", "joint"):
            vals = [per_seed[s][n][k] for s in args.seeds]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            summary[n][k] = (statistics.mean(vals), sd)
            cells.append(f"{statistics.mean(vals):6.1f} ± {sd:3.1f}")
        print(f"{n:18s} " + " ".join(f"{c:>12s}" for c in cells))
    pairs = {
        "mudsc_zip - zipit": ("mudsc_zip", "zipit"),
        "mudsc_align - activation_align": ("mudsc_align", "activation_align"),
        "zipit - weight_average": ("zipit", "weight_average"),
        "mudsc_align+drm - mudsc_align": ("mudsc_align+drm", "mudsc_align"),
    }
    diffs = {
        k: [per_seed[s][a]["avg"] - per_seed[s][b]["avg"] for s in args.seeds]
        for k, (a, b) in pairs.items()
    }
    for k, v in diffs.items():
        print(f"paired avg difference {k}: " + ", ".join(f"{d:+.1f}" for d in v))
    result = {
        "width": args.width,
        "seeds": args.seeds,
        "per_seed": per_seed,
        "summary": summary,
        "paired_avg_differences": diffs,
    }
    if args.timing:
        result["timing"] = timing(args.widths)
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
