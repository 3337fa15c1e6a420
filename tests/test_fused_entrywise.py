"""The fused CPU route of the task-vector recipe (methods/_fused.py, methods/task_vector_fused.py)
gives the eager route's results bit for bit, and the merge loop takes it and keeps its checks."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from drm_lightning.merge.pieces import merge_in_pieces
from drm_lightning.merge.pieces_pool import ThreadedPieces
from drm_lightning.merge.plan import PlannedTensor
from drm_lightning.methods import get_method
from drm_lightning.methods.task_vector import task_vector_merge_rows
from drm_lightning.methods.task_vector_fused import task_vector_merge_stored_rows
from drm_lightning.sources import SafetensorsFileSource, StateDictSource

pytest.importorskip("numba")

BITS = {torch.bfloat16: torch.int16, torch.float32: torch.int32}


def _eager(
    base: torch.Tensor, branches: list[torch.Tensor], coef: torch.Tensor, piece_rows: int, **kw
) -> torch.Tensor:
    """What merge_in_pieces made before the fused route: base + merged delta, rounded."""
    wide = base.float()

    def read(a: int, b: int) -> torch.Tensor:
        return torch.stack([x[a:b].float() - wide[a:b] for x in branches])

    out, row = [], 0
    for delta in task_vector_merge_rows(read, base.shape, coef, piece_rows=piece_rows, **kw):
        out.append((wide[row : row + delta.shape[0]] + delta).to(base.dtype))
        row += delta.shape[0]
    return torch.cat(out)


def _fused(
    base: torch.Tensor, branches: list[torch.Tensor], coef: torch.Tensor, piece_rows: int, **kw
) -> torch.Tensor:
    def read(a: int, b: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return base[a:b], [x[a:b] for x in branches]

    pieces = list(
        task_vector_merge_stored_rows(
            read,
            base.shape,
            coef,
            piece_rows=piece_rows,
            out_dtype=base.dtype,
            runner=ThreadedPieces(torch.get_num_threads()),
            **kw,
        )
    )
    assert all(p.inputs_finite for p in pieces)
    return torch.cat([p.merged for p in pieces])


def _inputs(dtype: torch.dtype, n: int, shape: tuple[int, ...], tied: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(dtype)
    if tied:  # deltas on a grid of 0.25: many exact ties at the cut, exact zeros, a -0.0 base
        steps = [torch.randint(-2, 3, shape, generator=g).float() * 0.25 for _ in range(n)]
        base.view(-1)[:5] = -0.0
    else:
        steps = [0.05 * torch.randn(shape, generator=g) for _ in range(n)]
    return base, [(base.float() + s).to(dtype) for s in steps], torch.rand(n, generator=g) + 0.3


CASES = list(
    itertools.product(
        [torch.bfloat16, torch.float32],
        [2, 3, 5],
        ["peft", "mergekit"],
        [0.0, 0.2, 1.0],
        [True, False],
        [True, False],
    )
)


@pytest.mark.parametrize("dtype,n,convention,density,elect,normalize", CASES)
def test_fused_route_equals_the_eager_route_bit_for_bit(
    dtype, n, convention, density, elect, normalize
) -> None:
    for tied, shape, piece_rows in (
        (False, (37, 29), 5),
        (True, (37, 29), 5),
        (True, (11, 3, 4), 2),
        (False, (50,), 7),
    ):
        base, branches, coef = _inputs(dtype, n, shape, tied)
        kw = dict(
            sparsify="magnitude",
            density=density,
            elect_signs=elect,
            normalize=normalize,
            convention=convention,
            scaling=1.3 if tied else 1.0,
        )
        eager = _eager(base, branches, coef, piece_rows, **kw)
        fused = _fused(base, branches, coef, piece_rows, **kw)
        assert torch.equal(eager.view(BITS[dtype]), fused.view(BITS[dtype])), (shape, tied)


@pytest.fixture
def torch_threads():
    """Sets torch's thread count (the fused route's piece threads) for one test."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize(
    "dtype,convention,elect",
    itertools.product([torch.bfloat16, torch.float32], ["peft", "mergekit"], [True, False]),
)
def test_pieces_on_threads_give_the_same_bits(
    torch_threads, threads, dtype, convention, elect
) -> None:
    # Ties at the cut in many small pieces: each piece learns the ties of those before it
    # while the others run.
    torch_threads(threads)
    for tied, shape, piece_rows in ((True, (37, 29), 2), (False, (37, 29), 3), (True, (50,), 3)):
        base, branches, coef = _inputs(dtype, 3, shape, tied)
        kw = dict(
            sparsify="magnitude",
            density=0.2,
            elect_signs=elect,
            normalize=True,
            convention=convention,
        )
        eager = _eager(base, branches, coef, piece_rows, **kw)
        fused = _fused(base, branches, coef, piece_rows, **kw)
        assert torch.equal(eager.view(BITS[dtype]), fused.view(BITS[dtype])), (shape, tied)


@pytest.mark.parametrize("failing_pass", ["count", "merge"])
def test_a_read_failing_on_a_thread_raises_in_the_caller_and_stops_the_threads(
    torch_threads, failing_pass
) -> None:
    import threading

    torch_threads(2)
    base, branches, coef = _inputs(torch.bfloat16, 3, (64, 16), tied=True)
    pass_of_read = {"now": "count"}

    def read(a: int, b: int):
        if pass_of_read["now"] == failing_pass and a == 42:  # not a sampled piece: read on a thread
            raise OSError(f"disk error at row {a}")
        return base[a:b], [x[a:b] for x in branches]

    pieces = task_vector_merge_stored_rows(
        read,
        base.shape,
        coef,
        piece_rows=2,
        sparsify="magnitude",
        density=0.3,
        elect_signs=True,
        normalize=True,
        out_dtype=base.dtype,
        runner=ThreadedPieces(2),
    )
    got = []
    with pytest.raises(OSError, match="disk error at row 42"):
        for piece in pieces:  # the cut's passes run at the first next()
            pass_of_read["now"] = "merge"
            got.append(piece)
    if failing_pass == "merge":
        assert [p.start for p in got] == list(range(0, 42, 2))  # every piece before the bad one
    assert not [t for t in threading.enumerate() if t.name.startswith("drm-pieces")]


def test_ties_at_the_cut_spread_over_pieces_go_to_the_first_entries() -> None:
    # Every magnitude is 0.5 or 0: the cut is 0.5 with ties in every piece; the first ones in
    # flattened order are kept, as largest_mask on the whole tensor keeps them.
    base = torch.zeros(40, 8)
    branch = torch.where(torch.arange(320).reshape(40, 8) % 3 == 0, 0.5, 0.0)
    coef = torch.ones(1)
    merged = _fused(base, [branch], coef, 3, sparsify="magnitude", density=0.1, elect_signs=False)
    kept = torch.nonzero(merged.reshape(-1)).squeeze(1)
    assert kept.tolist() == torch.nonzero(branch.reshape(-1)).squeeze(1)[:32].tolist()


def _files(tmp_path: Path, base: torch.Tensor, branches: list[torch.Tensor]) -> tuple:
    save_file({"w": base.contiguous()}, str(tmp_path / "base.safetensors"))
    for i, b in enumerate(branches):
        save_file({"w": b.contiguous()}, str(tmp_path / f"b{i}.safetensors"))
    return (
        SafetensorsFileSource(tmp_path / "base.safetensors"),
        [SafetensorsFileSource(tmp_path / f"b{i}.safetensors") for i in range(len(branches))],
    )


@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
def test_merge_loop_takes_the_fused_route_and_agrees_with_the_eager_one(
    tmp_path, monkeypatch, method
) -> None:
    from drm_lightning.methods import _fused as kernels

    base_t, branch_ts, _ = _inputs(torch.bfloat16, 3, (64, 48), tied=True)
    base, branches = _files(tmp_path, base_t, branch_ts)
    item = PlannedTensor("w", (64, 48), torch.bfloat16, "matrix")
    m = get_method(method, density=0.3) if method == "ties" else get_method(method)
    calls = []
    real = kernels.merge_piece
    monkeypatch.setattr(kernels, "merge_piece", lambda *a: calls.append(1) or real(*a))
    fused = torch.cat(
        list(merge_in_pieces(m, item, base, branches, [1.0, 0.5, 2.0], piece_rows=10))
    )
    assert len(calls) == 7  # one call a piece: the fused route ran
    monkeypatch.setenv("DRM_LIGHTNING_FUSED", "0")
    eager = torch.cat(
        list(merge_in_pieces(m, item, base, branches, [1.0, 0.5, 2.0], piece_rows=10))
    )
    assert len(calls) == 7
    assert torch.equal(fused.view(torch.int16), eager.view(torch.int16))


@pytest.mark.parametrize(
    "stored,compute,method,fused",
    [
        (torch.bfloat16, torch.float32, "ties", True),
        (torch.float32, torch.float32, "task_arithmetic", True),
        (torch.float16, torch.float32, "ties", False),  # no kernel for float16 inputs
        (torch.bfloat16, torch.float64, "ties", False),  # float64 maths stay eager
        (torch.bfloat16, torch.float32, "dare_ties", False),  # random masks over the whole branch
    ],
)
def test_fused_route_applies_only_where_it_is_exact(stored, compute, method, fused) -> None:
    m = get_method(method) if method == "task_arithmetic" else get_method(method, density=0.5)
    route = m.merge_stored_rows(
        "matrix",
        lambda a, b: (None, []),
        (8, 8),
        torch.ones(2, dtype=compute),
        piece_rows=4,
        stored=[stored] * 3,
        out_dtype=stored,
        compute_dtype=compute,
    )
    assert (route is not None) == fused


def test_non_finite_input_and_overflowing_result_raise_as_on_the_eager_route(tmp_path) -> None:
    base_t, branch_ts, _ = _inputs(torch.bfloat16, 2, (30, 16), tied=False)
    branch_ts[1][17, 3] = float("nan")
    base, branches = _files(tmp_path, base_t, branch_ts)
    item = PlannedTensor("w", (30, 16), torch.bfloat16, "matrix")
    origins = ["base", "branch math", "branch code"]
    with pytest.raises(ValueError, match=r"'w' in branch code contains 1 NaN .*rows 10:20"):
        list(
            merge_in_pieces(
                get_method("ties", density=0.5),
                item,
                base,
                branches,
                [1.0, 1.0],
                piece_rows=10,
                origins=origins,
            )
        )
    huge = [torch.full((30, 16), 3e38).to(torch.bfloat16)] * 2
    base, branches = _files(tmp_path, torch.zeros(30, 16, dtype=torch.bfloat16), huge)
    with pytest.raises(ValueError, match="merged result .*overflowed"):
        list(
            merge_in_pieces(
                get_method("task_arithmetic"), item, base, branches, [1.0, 1.0], piece_rows=10
            )
        )


def test_state_dict_sources_take_the_fused_route_too() -> None:
    base_t, branch_ts, _ = _inputs(torch.float32, 2, (20, 6), tied=False)
    item = PlannedTensor("w", (20, 6), torch.float32, "fallback")
    pieces = merge_in_pieces(
        get_method("ties", density=0.5),
        item,
        StateDictSource({"w": base_t}),
        [StateDictSource({"w": b}) for b in branch_ts],
        [1.0, 1.0],
        piece_rows=6,
    )
    merged = torch.cat(list(pieces))
    expected = _eager(
        base_t,
        branch_ts,
        torch.ones(2),
        6,
        sparsify="magnitude",
        density=0.5,
        elect_signs=True,
        normalize=True,
    )
    assert torch.equal(merged, expected)


def _merge_in_child(queue) -> None:  # runs in a forked process
    # torch's OpenMP pool does not survive fork (a forked rank runs on one thread, as
    # DataLoader workers do); the merge must not hang on anything the parent's threads left.
    torch.set_num_threads(1)
    base_t, branch_ts, coef = _inputs(torch.bfloat16, 3, (40, 32), tied=True)
    merged = _fused(
        base_t,
        branch_ts,
        coef,
        7,
        sparsify="magnitude",
        density=0.3,
        elect_signs=True,
        normalize=True,
    )
    queue.put(merged.view(torch.int16).tolist())


@pytest.mark.parametrize("threads", [2, 3])
def test_pieces_on_threads_then_a_forked_process_merges_the_same(threads) -> None:
    # Pieces run on Python threads (the kernels release the GIL), no numba thread pool: a
    # process forked after a threaded merge merges too, and gets the same bits.
    import multiprocessing

    base_t, branch_ts, coef = _inputs(torch.bfloat16, 3, (40, 32), tied=True)
    kw = dict(sparsify="magnitude", density=0.3, elect_signs=True, normalize=True)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        threaded = _fused(base_t, branch_ts, coef, 7, **kw)
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        child = context.Process(target=_merge_in_child, args=(queue,))
        child.start()
        child_bits = queue.get(timeout=120)
        child.join(timeout=60)
    finally:
        torch.set_num_threads(before)
    assert child.exitcode == 0
    assert threaded.view(torch.int16).tolist() == child_bits
    assert torch.equal(threaded, _eager(base_t, branch_ts, coef, 7, **kw))


@pytest.mark.parametrize("misleading_sample", [False, True])
def test_one_pass_finds_the_cut_when_the_sample_brackets_it(monkeypatch, misleading_sample) -> None:
    from drm_lightning.methods import _fused as kernels
    from drm_lightning.methods.task_vector_fused import sample

    rows, piece_rows = 256, 16  # 16 pieces; the sample holds 4096 entries a branch
    base, branches, coef = _inputs(torch.float32, 2, (rows, 64), tied=False)
    if misleading_sample:  # the sampled pieces' deltas are 1000x smaller than the others'
        spans = [(a, min(a + piece_rows, rows)) for a in range(0, rows, piece_rows)]
        for a, b in sample(spans):
            for x in branches:
                x[a:b] = base[a:b] + (x[a:b] - base[a:b]) * 1e-3
    calls = []
    for name in ("magnitude_sample", "bracket_counts", "digit_counts"):
        real = getattr(kernels, name)
        monkeypatch.setattr(
            kernels, name, lambda *a, name=name, real=real: calls.append(name) or real(*a)
        )
    kw = dict(sparsify="magnitude", density=0.3, elect_signs=True, normalize=True)
    fused = _fused(base, branches, coef, piece_rows, **kw)
    assert torch.equal(fused, _eager(base, branches, coef, piece_rows, **kw))
    # 4 sampled pieces, the bracket's pass (16), and the two radix passes only when it missed
    radix = ["digit_counts"] * 32 if misleading_sample else []
    assert calls == ["magnitude_sample"] * 4 + ["bracket_counts"] * 16 + radix


def test_the_sample_sees_every_column_whatever_the_stride(monkeypatch) -> None:
    # 4 sampled pieces of 256 x 64 entries, 32768 sampled a branch: a stride of 2 would see
    # only the even columns, whose deltas are 100x the others' here, and the bracket would miss.
    import drm_lightning.methods.task_vector_fused as driver
    from drm_lightning.methods import _fused as kernels

    base, branches, coef = _inputs(torch.float32, 2, (4096, 64), tied=False)
    for x in branches:
        x[:, ::2] = base[:, ::2] + (x[:, ::2] - base[:, ::2]) * 100
    monkeypatch.setattr(driver, "SAMPLE_ENTRIES", 32768)
    calls = []
    real = kernels.digit_counts
    monkeypatch.setattr(kernels, "digit_counts", lambda *a: calls.append(1) or real(*a))
    kw = dict(sparsify="magnitude", density=0.3, elect_signs=True, normalize=True)
    assert torch.equal(
        _fused(base, branches, coef, 256, **kw), _eager(base, branches, coef, 256, **kw)
    )
    assert calls == []  # the bracket held the cut: no radix pass


@pytest.mark.parametrize("tied", [False, True])
def test_a_bracket_holding_too_many_entries_falls_back_to_the_radix_passes(
    monkeypatch, tied
) -> None:
    import drm_lightning.methods.task_vector_fused as driver
    from drm_lightning.methods import _fused as kernels

    base, branches, coef = _inputs(torch.bfloat16, 3, (256, 64), tied=tied)
    monkeypatch.setattr(driver, "SAMPLE_ENTRIES", 8)  # room for 512 entries (1/32): too few
    monkeypatch.setattr(driver, "BRACKET_MARGIN", 0.4)  # a wide bracket
    calls = []
    real = kernels.digit_counts
    monkeypatch.setattr(kernels, "digit_counts", lambda *a: calls.append(1) or real(*a))
    kw = dict(sparsify="magnitude", density=0.3, elect_signs=True, normalize=True)
    fused = _fused(base, branches, coef, 16, **kw)
    assert torch.equal(
        fused.view(torch.int16), _eager(base, branches, coef, 16, **kw).view(torch.int16)
    )
    assert len(calls) == 32


def test_bracket_ends_hold_the_cut_and_quantised_deltas_give_one_value() -> None:
    import numpy as np

    from drm_lightning.methods.task_vector_fused import INF_BITS, bracket

    bits = np.arange(1000, dtype=np.uint32)
    low, high = bracket(bits, keep=100, numel=1000)
    assert low < 900 < high  # the 100th largest of 0..999
    assert bracket(bits, keep=1, numel=10**9) == (994, INF_BITS)  # above the sample: up to +inf
    assert bracket(bits, keep=10**9, numel=10**9)[0] == 0  # below it: down to 0
    quantised = np.repeat(np.array([5, 7, 9], np.uint32), [600, 300, 100])
    assert bracket(quantised, keep=250, numel=1000) == (7, 7)  # the cut and its ties: one value


@pytest.mark.parametrize(
    "stored,out", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)]
)
def test_output_dtype_other_than_the_stored_one(stored, out) -> None:
    base, branches, coef = _inputs(stored, 3, (37, 29), tied=True)
    kw = dict(sparsify="magnitude", density=0.3, elect_signs=True, normalize=True)
    wide = base.float()

    def read(a: int, b: int) -> torch.Tensor:
        return torch.stack([x[a:b].float() - wide[a:b] for x in branches])

    eager, row = [], 0
    for delta in task_vector_merge_rows(read, base.shape, coef, piece_rows=5, **kw):
        eager.append((wide[row : row + delta.shape[0]] + delta).to(out))
        row += delta.shape[0]
    pieces = task_vector_merge_stored_rows(
        lambda a, b: (base[a:b], [x[a:b] for x in branches]),
        base.shape,
        coef,
        piece_rows=5,
        out_dtype=out,
        **kw,
    )
    fused = torch.cat([p.merged for p in pieces])
    assert fused.dtype == out and torch.equal(fused, torch.cat(eager))


def test_sources_that_move_rows_to_a_device_stay_on_the_torch_route(monkeypatch) -> None:
    # The disk job's OnDevice moves every read to the GPU; the fused kernels read CPU memory.
    # Here rows go to the "meta" device: the fused route must not be asked for.
    from drm_lightning.methods.task_vector import TaskVectorMethod
    from drm_lightning.sources.on_device import OnDevice

    base_t, branch_ts, _ = _inputs(torch.float32, 2, (20, 6), tied=False)
    moved = [
        OnDevice(StateDictSource({"w": t}), torch.device("meta")) for t in (base_t, *branch_ts)
    ]
    asked = []
    monkeypatch.setattr(
        TaskVectorMethod, "merge_stored_rows", lambda self, *a, **k: asked.append(1)
    )
    item = PlannedTensor("w", (20, 6), torch.float32, "fallback")
    with pytest.raises(Exception):  # the torch route cannot finish on "meta" tensors; it is taken
        list(
            merge_in_pieces(
                get_method("ties", density=0.5), item, moved[0], moved[1:], [1.0, 1.0], piece_rows=6
            )
        )
    assert asked == []
