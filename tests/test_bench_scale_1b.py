"""benchmarks/scale_1b.py: the 1B model's shapes, the DRM layer-subset routing, and the
measuring harness end to end on a tiny model of the same structure."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import scale_1b


def test_shapes_are_llama_3_2_1b_untied() -> None:
    specs = scale_1b.tensor_specs()
    assert sum(math.prod(s) for _, s in specs) == 1_498_482_688  # 1.236 B tied + 262.7 M lm_head
    assert dict(specs)["model.layers.3.self_attn.k_proj.weight"] == (512, 2048)


def test_subset_routing_sends_exactly_the_chosen_layers_to_the_matrix_path(tmp_path: Path) -> None:
    from drm_lightning.config.loading import load_config

    folders = {k: tmp_path / k for k in ("base", "b1", "b2", "b3")}
    for folder in folders.values():
        folder.mkdir()
    for case, expected in (("drm_h_subset", 14), ("drm_h_none", 0), ("ties", 7 * 16)):
        cfg = load_config(scale_1b.write_config(case, folders, tmp_path, [0, 11]))
        routing = cfg.build_routing()
        matrix = [n for n, s in scale_1b.tensor_specs() if routing.route(n, s) == "matrix"]
        assert len(matrix) == expected, case
        if case == "drm_h_subset":
            assert {n.split(".")[2] for n in matrix} == {"0", "11"}


def test_harness_on_a_tiny_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Build, cold-cache TIES run, 2-rank run: exit 0, times, RSS and bytes recorded."""
    tiny = dict(
        scale_1b.LLAMA_1B,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    )
    monkeypatch.setattr(scale_1b, "LLAMA_1B", tiny)
    folders = scale_1b.build(tmp_path / "w", log=lambda *a: None)
    base = json.loads((folders["base"] / "config.json").read_text())
    assert base["hidden_size"] == 64 and not base["tie_word_embeddings"]
    results = {"cases": {}}
    for case in ("ties", "ties+stored", "ties@2"):
        r = scale_1b.run_case(case, folders, tmp_path / "w", [0], threads=1, timeout_s=120)
        assert r["exit_code"] == 0, r["output_tail"]
        assert r["wall_s"] > 0 and r["cpu_s"] > 0 and r["peak_rss_largest_process"] > 50e6
        data = sum(2 * math.prod(s) for _, s in scale_1b.tensor_specs())  # bf16
        assert 4 * data < r["input_bytes"] < 4 * (data + 2**20)  # + headers
        assert r["output_tensor_bytes"] == r["input_bytes"] // 4
        results["cases"][case] = r
    assert len(results["cases"]["ties@2"]["peak_rss_per_process"]) >= 3  # torchrun + 2 ranks
    # "+stored" ran with the inputs' digests in its store; the others' empty stores are gone
    stored = json.loads((tmp_path / "w" / "digests" / "sha256.json").read_text())
    assert len(stored) == len(scale_1b.input_files(folders))
    assert [p.name for p in (tmp_path / "w").glob("digests*")] == ["digests"]
    derived = scale_1b.derive(results, [0])
    assert derived["ties_speedup_2_ranks"] > 0
    assert "| ties@2 | 2 |" in scale_1b.table(results)
