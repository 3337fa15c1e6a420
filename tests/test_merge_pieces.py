"""Large tensors merged in row pieces (issue 13): the same result as the whole-tensor merge,
memory bounded by a piece, errors located, output written piece by piece."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from drm_lightning.cli.job import open_job, run_job
from drm_lightning.config.loading import load_config
from drm_lightning.merge.loop import iter_merge
from drm_lightning.merge.pieces import merge_in_pieces, merges_in_pieces
from drm_lightning.merge.plan import PlannedTensor
from drm_lightning.methods import get_method
from drm_lightning.methods.ops import largest_mask
from drm_lightning.methods.rowwise import MagnitudeCut, row_spans
from drm_lightning.methods.selection import (
    count_digits,
    from_ordered_bits,
    keep_largest,
    ordered_bits,
    radix_select,
)
from drm_lightning.sources import HFFolderWriter, RowPieces, SafetensorsFileSource, StateDictSource

ROWS, COLS = 37, 11  # odd sizes: pieces of 4 rows end in a short piece

# Every preset that merges in pieces, with settings that exercise each step.
PIECE_METHODS: list[tuple[str, dict[str, Any]]] = [
    ("task_arithmetic", {"scaling": 0.7}),
    ("linear", {}),
    ("ties", {"density": 0.3}),
    ("ties", {"density": 0.3, "convention": "mergekit"}),
    ("ties", {"density": 0.3, "normalize": False, "scaling": 1.5}),
    ("ties", {"density": 0.001}),  # keeps nothing (peft's floor)
    ("ties", {"density": 0.001, "convention": "mergekit"}),  # keeps one per branch
    ("dare_ties", {"density": 1.0}),  # no random drop: entry-wise
    ("drm", {}),
    ("drm", {"fallback_trim_rate": 0.6}),
    ("drm", {"fallback_trim_rate": 0.6, "tie_break": "positive", "disjoint_mean": False}),
]


def _quantised(gen: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Values on a coarse grid: many exact ties at every cut and many zero mass sums."""
    return (torch.randint(-3, 4, shape, generator=gen) * 0.25).to(dtype)


def _inputs(
    dtype: torch.dtype, *, quantised: bool, n: int = 3, seed: int = 0
) -> tuple[dict, list[dict]]:
    gen = torch.Generator().manual_seed(seed)
    draw = (
        (lambda s: _quantised(gen, s, dtype))
        if quantised
        else (lambda s: torch.randn(s, generator=gen, dtype=dtype))
    )
    base = {
        "emb.weight": draw((ROWS, COLS)),
        "norm.weight": draw((COLS,)),
        "lin.weight": draw((COLS, COLS)),
    }
    branches = [{k: v + draw(tuple(v.shape)) for k, v in base.items()} for _ in range(n)]
    return base, branches


def _merge(
    method: Any, base: dict, branches: list[dict], piece_elements: int | None, **kw: Any
) -> dict:
    out = {}
    for name, value in iter_merge(
        method,
        StateDictSource(base),
        [StateDictSource(b) for b in branches],
        piece_elements=piece_elements,
        **kw,
    ):
        out[name] = value.materialize() if isinstance(value, RowPieces) else value
    return out


@pytest.mark.parametrize(("name", "params"), PIECE_METHODS)
@pytest.mark.parametrize("quantised", [False, True])
def test_pieces_equal_the_whole_tensor_in_float64(name: str, params: dict, quantised: bool) -> None:
    method = get_method(name, **params)
    base, branches = _inputs(torch.float64, quantised=quantised)
    coefficients = [1.0, 0.5, 2.0]
    whole = _merge(
        method, base, branches, None, coefficients=coefficients, compute_dtype=torch.float64
    )
    pieces = _merge(
        method, base, branches, 4 * 3 * COLS, coefficients=coefficients, compute_dtype=torch.float64
    )
    plan = [PlannedTensor("emb.weight", (ROWS, COLS), torch.float64, "fallback")]
    assert merges_in_pieces(
        method, plan[0], StateDictSource(base), [StateDictSource(b) for b in branches], 4 * 3 * COLS
    )
    for key in whole:
        scale = float(whole[key].abs().max()) or 1.0
        # Same operations on the same entries in the same order: equal to rounding (bit-equal here).
        assert float((whole[key] - pieces[key]).abs().max()) <= 1e-12 * scale, (name, params, key)


@pytest.mark.parametrize(("name", "params"), [PIECE_METHODS[2], PIECE_METHODS[9]])
def test_pieces_of_bf16_inputs_in_float32_within_rounding(name: str, params: dict) -> None:
    """bf16 checkpoints, float32 maths: the pieces' result against the whole tensor's, and both
    against float64 within the float32 bound (the cut itself is exact in any dtype)."""
    method = get_method(name, **params)
    base, branches = _inputs(torch.bfloat16, quantised=False, seed=3)
    whole = _merge(method, base, branches, None, out_dtype=torch.float32)
    pieces = _merge(method, base, branches, 5 * 3 * COLS, out_dtype=torch.float32)
    for key in whole:
        scale = float(whole[key].abs().max())
        assert float((whole[key].double() - pieces[key].double()).abs().max()) <= 1e-6 * scale, key


def test_ties_at_the_cut_go_to_the_first_entries_across_pieces() -> None:
    """All magnitudes equal: the cut keeps the first k entries in flattened order, wherever
    the piece boundaries fall — as largest_mask on the whole tensor does."""
    deltas = torch.ones(2, 10, 3)
    deltas[1, 4:] = -1.0
    read = lambda a, b: deltas[:, a:b]  # noqa: E731
    for step in (1, 3, 4, 10):
        cut = MagnitudeCut(read, row_spans(10, step), [7, 29], 30, torch.float32)
        apply = cut.masks()
        masks = torch.cat([apply(read(a, b)) for a, b in row_spans(10, step)], dim=1)
        for i, keep in enumerate((7, 29)):
            assert torch.equal(masks[i], largest_mask(deltas[i], keep)), (step, i)
            assert int(masks[i].sum()) == keep


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_radix_select_is_the_sorted_order(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    lanes = [
        torch.randn(5000, generator=gen).abs().to(dtype),
        (torch.randint(0, 5, (3000,), generator=gen) * 0.5).to(dtype),
    ]
    lanes.append(torch.zeros(100, dtype=dtype))
    for k in (1, 2, 77, 2999, 3000):
        ks = [k, k, min(k, 100)]
        bits = [ordered_bits(v) for v in lanes]
        width = bits[0][1]

        def count(
            shift: int, prefixes: list[int], bits: list = bits, width: int = width
        ) -> torch.Tensor:
            return torch.stack(
                [count_digits(b, shift, p, width) for (b, _), p in zip(bits, prefixes, strict=True)]
            )

        for lane, (pattern, ties) in enumerate(radix_select(ks, width, count)):
            values = lanes[lane].double().sort(descending=True).values
            kth = values[ks[lane] - 1]
            assert float(from_ordered_bits(pattern, width, dtype)) == float(kth)
            assert ties == ks[lane] - int((values > kth).sum())
    mask, left = keep_largest(torch.tensor([1.0, 2.0, 1.0]), torch.tensor(1.0), 5)
    assert mask.tolist() == [True, True, True] and left == 3


def test_nan_in_a_late_piece_names_the_tensor_the_branch_and_the_rows() -> None:
    base, branches = _inputs(torch.float32, quantised=False)
    branches[2]["emb.weight"][30, 4] = float("nan")
    with pytest.raises(ValueError, match=r"'emb.weight' in branch 2 .*1 NaN.* \(rows 28:32\)"):
        _merge(get_method("ties"), base, branches, 4 * 3 * COLS)


def test_lora_branches_in_pieces_equal_the_whole_tensor() -> None:
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(ROWS, COLS, generator=gen, dtype=torch.float64)
    dense = base + torch.randn(ROWS, COLS, generator=gen, dtype=torch.float64)
    factors = (
        torch.randn(ROWS, 2, generator=gen, dtype=torch.float64),
        torch.randn(2, COLS, generator=gen, dtype=torch.float64),
    )

    class Lora:
        def lowrank(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
            return factors

    item = PlannedTensor("w", (ROWS, COLS), torch.float64, "matrix")
    srcs = [StateDictSource({"w": dense}), Lora()]
    pieces = torch.cat(
        list(
            merge_in_pieces(
                get_method("ties", density=0.4),
                item,
                StateDictSource({"w": base}),
                srcs,
                [1.0, 1.0],
                compute_dtype=torch.float64,
                piece_rows=5,
            )
        )
    )
    deltas = torch.stack([dense - base, factors[0] @ factors[1]])
    whole = base + get_method("ties", density=0.4).merge_matrix(
        deltas, torch.ones(2, dtype=torch.float64)
    )
    assert float((pieces - whole).abs().max()) <= 1e-12 * float(whole.abs().max())


def test_methods_that_need_the_whole_tensor_are_not_pieced() -> None:
    item = PlannedTensor("w", (1000, 100), torch.float32, "matrix")
    src = StateDictSource({"w": torch.zeros(1000, 100)})
    assert not merges_in_pieces(get_method("dare_ties", density=0.5), item, src, [src, src], 1000)
    assert not merges_in_pieces(
        get_method("dare_linear", density=0.5, convention="mergekit"), item, src, [src], 1000
    )
    assert not merges_in_pieces(get_method("drm"), item, src, [src, src], 1000)  # the matrix path
    fallback = PlannedTensor("w", (1000, 100), torch.float32, "fallback")
    assert merges_in_pieces(get_method("drm"), fallback, src, [src, src], 1000)
    assert not merges_in_pieces(
        get_method("drm"), fallback, src, [src, src], 10**6
    )  # fits one piece

    class Pickled(StateDictSource):
        def reads_rows(self, name: str) -> bool:
            return False  # e.g. a source that would read the whole tensor for every piece

    assert not merges_in_pieces(
        get_method("ties"), fallback, src, [Pickled({"w": torch.zeros(1000, 100)})], 1000
    )


def test_writer_streams_row_pieces_into_the_file(tmp_path: Path) -> None:
    whole = torch.arange(48.0).reshape(12, 4).to(torch.bfloat16)
    odd = torch.arange(15.0).reshape(5, 3).to(torch.float16)  # 30 bytes: held, written at the end
    with HFFolderWriter(tmp_path / "m") as w:
        w.add("a", RowPieces((12, 4), torch.bfloat16, iter(whole.split(5))))
        w.add("odd", RowPieces((5, 3), torch.float16, iter(odd.split(2))))
        w.add("b", torch.ones(3))
    loaded = load_file(tmp_path / "m" / "model.safetensors")
    assert (
        torch.equal(loaded["a"], whole)
        and torch.equal(loaded["odd"], odd)
        and torch.equal(loaded["b"], torch.ones(3))
    )
    with pytest.raises(ValueError, match="cover 11 rows"), HFFolderWriter(tmp_path / "n") as w:
        w.add("a", RowPieces((12, 4), torch.bfloat16, iter(whole[:11].split(5))))
    assert not (tmp_path / "n").exists()


def _folder(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("method", ["ties", "drm"])
def test_disk_job_in_pieces_writes_the_whole_merge(tmp_path: Path, method: str) -> None:
    base, branches = _inputs(torch.bfloat16, quantised=True)
    paths = [_folder(tmp_path / "base", base)] + [
        _folder(tmp_path / f"b{i}", b) for i, b in enumerate(branches)
    ]
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(
        f"method: {method}\nbase: {paths[0]}\nbranches:\n"
        + "".join(f"  - path: {p}\n" for p in paths[1:])
    )
    job = open_job(load_config(cfg))
    run_job(job, tmp_path / "whole", progress=False, piece_elements=None)
    run_job(
        open_job(load_config(cfg)), tmp_path / "pieces", progress=False, piece_elements=4 * 3 * COLS
    )
    whole = load_file(tmp_path / "whole" / "model.safetensors")
    pieces = load_file(tmp_path / "pieces" / "model.safetensors")
    assert sorted(whole) == sorted(pieces)
    for k in whole:
        assert whole[k].dtype == pieces[k].dtype == torch.bfloat16
        assert float((whole[k].float() - pieces[k].float()).abs().max()) <= 1e-2 * float(
            whole[k].float().abs().max()
        ), k
    assert isinstance(
        SafetensorsFileSource(paths[0] / "model.safetensors").reads_rows("emb.weight"), bool
    )


_PEAK_SCRIPT = """
import json, re, sys, pathlib, torch
from drm_lightning.merge import PlannedTensor, merge_tensor
from drm_lightning.merge.pieces import merge_in_pieces
from drm_lightning.methods import get_method
from drm_lightning.sources import HFFolderWriter, RowPieces, SafetensorsFileSource
root = pathlib.Path(sys.argv[1])
def peak():  # VmHWM: this process's own high-water mark (ru_maxrss keeps the parent's across exec)
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
def sources(folder):
    return [SafetensorsFileSource(folder / f"{i}.safetensors") for i in range(4)]
def pieced(folder, rows):
    srcs = sources(folder)
    item = PlannedTensor("w", (rows, 1024), torch.bfloat16, "fallback")
    with HFFolderWriter(root / f"out-{rows}-pieced") as w:
        w.add("w", RowPieces(item.shape, torch.bfloat16, merge_in_pieces(
            get_method("ties"), item, srcs[0], srcs[1:], [1.0] * 3
        )))
def whole(folder, rows):
    srcs = sources(folder)
    with HFFolderWriter(root / f"out-{rows}-whole") as w:
        w.add("w", merge_tensor(
            get_method("ties"), "fallback", srcs[0].get("w"),
            [s.get("w") for s in srcs[1:]], [1.0] * 3,
        ))
# The fused kernels compile (or load from numba's cache) at first use: warm them up on a small
# tensor first, so that the high-water mark measures the merge's working set, not the JIT.
pieced(root / "64", 64)
before = peak()
growth = {}
# The high-water mark only rises: the smaller pieced merge first, the whole merge last.
for run, rows in ((pieced, 8192), (pieced, 65536), (whole, 8192)):
    run(root / str(rows), rows)
    growth[f"{run.__name__} {rows}"] = peak() - before
print(json.dumps(growth))
"""


def test_peak_memory_of_a_pieced_merge_does_not_grow_with_the_tensor(tmp_path: Path) -> None:
    """TIES of 3 bf16 branches of a 65536×1024 tensor (128 MiB each, 256 MiB in float32) in
    pieces raises peak RSS by a few pieces' working sets (35-40 MiB measured once the kernels
    are compiled), about as much as for a tensor 8× smaller; merged whole, that smaller tensor
    alone raises it by ≈ 465 MiB (the 65536-row one by ≈ 3.7 GiB). One process measures all
    three merges, in the order in which its high-water mark can only rise."""
    gen = torch.Generator().manual_seed(0)
    for rows in (64, 8192, 65536):
        folder = tmp_path / str(rows)
        folder.mkdir()
        for i in range(4):
            save_file(
                {"w": torch.randn(rows, 1024, generator=gen).to(torch.bfloat16)},
                str(folder / f"{i}.safetensors"),
            )
    run = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    growth = json.loads(run.stdout.strip().splitlines()[-1])
    print(growth)
    mib = 1024 * 1024
    assert growth["pieced 65536"] < 96 * mib, growth  # a few pieces' working sets (4 MiB stacks)
    assert growth["pieced 65536"] - growth["pieced 8192"] < 64 * mib, growth
    assert growth["whole 8192"] > 256 * mib, growth  # what the pieces save: ≈ 465 MiB whole


def test_cli_refuses_a_negative_piece_size(capsys: pytest.CaptureFixture[str]) -> None:
    from drm_lightning.cli.command import main

    with pytest.raises(SystemExit) as exit_info:
        main(["any.yaml", "-o", "out", "--piece-size", "-1"])
    assert exit_info.value.code == 2
    assert "--piece-size must be >= 0" in capsys.readouterr().err


def test_nan_in_a_piece_of_a_disk_job_leaves_no_output(tmp_path: Path) -> None:
    base, branches = _inputs(torch.float32, quantised=False)
    branches[1]["emb.weight"][33, 0] = float("inf")
    paths = [_folder(tmp_path / "base", base)] + [
        _folder(tmp_path / f"b{i}", b) for i, b in enumerate(branches)
    ]
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(
        "method: ties\nbase: "
        + str(paths[0])
        + "\nbranches:\n"
        + "".join(f"  - path: {p}\n" for p in paths[1:])
    )
    with pytest.raises(ValueError, match=r"'emb.weight' in branch 1 .*1 Inf.* \(rows 32:36\)"):
        run_job(
            open_job(load_config(cfg)),
            tmp_path / "out",
            progress=False,
            piece_elements=4 * 3 * COLS,
        )
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))
