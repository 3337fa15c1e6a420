"""mergekit's ``slices:`` with one full-range slice, against mergekit 0.1.5's ``run_merge``.

mergekit's planner turns ``models:`` into exactly one slice whose sources span ``[0, L]``
(``MergePlanner.normalize_config``; it adds ``base_model`` as a source when it is not listed),
and evaluates gradients the same way in both forms: layer ``i`` of the slice's ``L`` at
``i/(L-1)``, the tensors before and after the layers (embeddings, final norm, ``lm_head``) at
0. So one slice of whole models gives the tensors of ``models:``; drm-merge translates it
into that and refuses the rest (several slices, partial ranges: frankenmerges).

Oracles: ``run_merge`` on the slices file, ``run_merge`` on the same models under ``models:``
(bit-equal to it), and ``drm-merge`` on the slices file, on a tiny Llama of 4 layers (so a
gradient's interior values are reached). Bounds (measured): float32 models, ``dtype: float32``:
slerp 7.5e-9 max abs, ties (no ``dtype``) bit-equal; bound 1e-6. bfloat16 models, ``dtype:
bfloat16``: slerp 0.004 % of the entries one bfloat16 step apart (mergekit sums the norms in
another order), ties 0.17 %, where tied magnitudes meet the density cut (the 0.5 % bound of
tests/test_mergekit_format.py). ``linear`` in float64: 1e-15.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers import tiny_llama_config

from drm_lightning.cli import command as cli
from drm_lightning.config.errors import ConfigError
from drm_lightning.config.loading import load_config
from drm_lightning.config.mergekit import MergekitConfig

transformers = pytest.importorskip("transformers")
mk_config = pytest.importorskip("mergekit.config")
mk_merge = pytest.importorskip("mergekit.merge")
mk_options = pytest.importorskip("mergekit.options")
safetensors_torch = pytest.importorskip("safetensors.torch")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
LAYERS = 4
FLOAT32_BOUND = 1e-6
FLOAT64_BOUND = 1e-15
BF16_DIFFERING = 0.005  # fraction of entries (tests/test_mergekit_format.py TIES_BF16_BOUND)
T_FILTERED = [
    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
    {"value": 0.5},
]


def _read(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(safetensors_torch.load_file(f))
    return out


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama (4 layers) as ``a`` and two fine-tunes ``b``, ``c``, each in float32
    (``zoo/f32``) and bfloat16 (``zoo/bf16``); ``short``: a 2-layer config.json only."""
    root = tmp_path_factory.mktemp("mkslices")
    config = tiny_llama_config(num_hidden_layers=LAYERS)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    models = {"a": state}
    for i, name in enumerate(("b", "c")):
        g = torch.Generator().manual_seed(10 + i)
        models[name] = {
            k: v + 0.02 * (i + 1) * torch.randn(v.shape, generator=g) for k, v in state.items()
        }
    for dtype, folder in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
        for name, tensors in models.items():
            base.load_state_dict(tensors)
            base.to(dtype).save_pretrained(root / folder / name)
            base.to(torch.float32)
    (root / "short").mkdir()
    (root / "short" / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
    return root


def _slices(*sources: tuple[Path, dict[str, Any] | None], **top: Any) -> dict[str, Any]:
    """A mergekit config of one slice whose sources span every layer."""
    listed = []
    for model, params in sources:
        entry: dict[str, Any] = {"model": str(model), "layer_range": [0, LAYERS]}
        if params:
            entry["parameters"] = params
        listed.append(entry)
    return {"slices": [{"sources": listed}], **top}


def _as_models(case: dict[str, Any]) -> dict[str, Any]:
    """The same config with the slice's sources under ``models:``."""
    out = {k: v for k, v in case.items() if k != "slices"}
    out["models"] = [
        {k: v for k, v in s.items() if k != "layer_range"} for s in case["slices"][0]["sources"]
    ]
    return out


def _write(case: dict[str, Any], folder: Path, name: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(case, sort_keys=False))
    return path


def _run_all(case: dict[str, Any], folder: Path, name: str) -> tuple[dict, dict, dict]:
    """mergekit on the slices file and on its ``models:`` form, drm-merge on the slices file."""
    options = mk_options.MergeOptions(quiet=True, random_seed=0, copy_tokenizer=False)
    outs = []
    for label, data in (("slices", case), ("models", _as_models(case))):
        out = folder / f"mk-{name}-{label}"
        mk_merge.run_merge(mk_config.MergeConfiguration.model_validate(data), str(out), options)
        outs.append(_read(out))
    path = _write(case, folder, name)
    assert cli.main([str(path), "-o", str(folder / f"ours-{name}"), "--no-progress"]) == 0
    return outs[0], outs[1], _read(folder / f"ours-{name}")


def _compare(theirs: dict, ours: dict, dtype: str) -> None:
    assert sorted(theirs) == sorted(ours)
    assert all(ours[k].dtype == theirs[k].dtype for k in theirs)
    if dtype == "bfloat16":
        n = sum(t.numel() for t in theirs.values())
        differing = sum(int((theirs[k] != ours[k]).sum()) for k in theirs) / n
        assert differing < BF16_DIFFERING, differing
    else:
        worst = max(float((theirs[k].double() - ours[k].double()).abs().max()) for k in theirs)
        assert worst <= (FLOAT64_BOUND if dtype == "float64" else FLOAT32_BOUND), worst


def _same_translation(case: dict[str, Any], folder: Path) -> None:
    """drm-merge reads the slice as the same merge as its ``models:`` form."""
    ours = [
        load_config(_write(data, folder, f"same-{i}")).model_dump(exclude={"text"})
        for i, data in enumerate((case, _as_models(case)))
    ]
    assert ours[0] == ours[1]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_slerp_full_range_slice_equals_mergekit(zoo: Path, tmp_path: Path, dtype: str) -> None:
    """The usual mergekit slerp file: ``t`` filtered per module, a gradient over the layers."""
    z = zoo / ("bf16" if dtype == "bfloat16" else "f32")
    case = _slices(
        (z / "a", None),
        (z / "b", None),
        merge_method="slerp",
        base_model=str(z / "a"),
        parameters={"t": T_FILTERED},
        dtype=dtype,
    )
    sliced, listed, ours = _run_all(case, tmp_path, "slerp")
    assert all(torch.equal(sliced[k], listed[k]) for k in listed)  # mergekit: the same merge
    _compare(sliced, ours, dtype)
    _same_translation(case, tmp_path)
    # an interior value: attention of layer 1 of 4 sits at 1/3, between 0.5 and 0.3 of the list
    cfg = load_config(_write(case, tmp_path, "cfg"))
    assert isinstance(cfg, MergekitConfig) and cfg.num_layers == LAYERS
    method = cfg.build_method()
    t = method.for_tensor("model.layers.1.self_attn.q_proj.weight").params.t
    assert abs(t - (0.5 + (0.3 - 0.5) / 3)) < 1e-12
    assert method.for_tensor("model.embed_tokens.weight").params.t == 0.5


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ties_full_range_slice_equals_mergekit(zoo: Path, tmp_path: Path, dtype: str) -> None:
    """A task-vector method: per-source weight and density, the base listed among the sources
    (mergekit requires it there), a default density from the top level."""
    z = zoo / ("bf16" if dtype == "bfloat16" else "f32")
    case = _slices(
        (z / "a", None),
        (z / "b", {"weight": 1.0, "density": 0.5}),
        (z / "c", {"weight": 0.6}),
        merge_method="ties",
        base_model=str(z / "a"),
        parameters={"density": 0.7},
        **({"dtype": dtype} if dtype == "bfloat16" else {}),
    )
    sliced, listed, ours = _run_all(case, tmp_path, "ties")
    assert all(torch.equal(sliced[k], listed[k]) for k in listed)
    _compare(sliced, ours, dtype)
    _same_translation(case, tmp_path)
    cfg = load_config(_write(case, tmp_path, "cfg"))
    assert cfg.branch_densities == [0.5, 0.7]


def test_linear_slice_averages_the_sources_only(zoo: Path, tmp_path: Path) -> None:
    """In a slice mergekit's linear averages the sources (``models:`` adds ``base_model``)."""
    z = zoo / "f32"
    case = _slices(
        (z / "b", {"weight": 0.3}),
        (z / "c", {"weight": 0.7}),
        merge_method="linear",
        base_model=str(z / "a"),
        dtype="float64",
    )
    options = mk_options.MergeOptions(quiet=True, random_seed=0, copy_tokenizer=False)
    mk_out = tmp_path / "mk"
    mk_merge.run_merge(mk_config.MergeConfiguration.model_validate(case), str(mk_out), options)
    path = _write(case, tmp_path, "linear")
    assert [b.coefficient for b in load_config(path).branches] == [0.3, 0.7]
    assert cli.main([str(path), "-o", str(tmp_path / "ours"), "--no-progress"]) == 0
    _compare(_read(mk_out), _read(tmp_path / "ours"), "float64")


def test_dry_run_shows_t_per_tensor(
    zoo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The plan's parameters line says how ``t`` varies, not its unused default."""
    z = zoo / "f32"
    for t, want in (
        (
            T_FILTERED,
            "t=per tensor, 0 … 1 (parameters.t: self_attn [0, 0.5, 0.3, 0.7, 1], mlp [1, 0.5, "
            "0.7, 0.3, 0], other tensors 0.5; lists over the 4 layers)",
        ),
        ([0.2, 0.9], "t=per layer, 0.2 … 0.9 (parameters.t: [0.2, 0.9] over the 4 layers; 0.2"),
        (0.35, "parameters: t=0.35"),
    ):
        case = _slices(
            (z / "a", None), (z / "b", None), merge_method="slerp", base_model=str(z / "a")
        )
        case["parameters"] = {"t": t}
        path = _write(case, tmp_path, "dry")
        assert cli.main([str(path), "-o", str(tmp_path / "o"), "--dry-run"]) == 0
        plan = " ".join(capsys.readouterr().out.split())
        assert want in plan
        assert "t=0.5 (default)" not in plan
    assert not (tmp_path / "o").exists()


def _refusal(zoo: Path, tmp_path: Path, **changes: Any) -> str:
    """The refusal of the ties slice file with ``changes``, checked through the CLI too."""
    z = zoo / "f32"
    data = _slices(
        (z / "a", None),
        (z / "b", {"weight": 1.0}),
        merge_method="ties",
        base_model=str(z / "a"),
    )
    data.update(changes)
    path = _write({k: v for k, v in data.items() if v is not None}, tmp_path, "bad")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert cli.main([str(path), "-o", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()
    return str(info.value)


def _source(model: Path, start: int = 0, end: int = LAYERS, **params: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"model": str(model), "layer_range": [start, end]}
    return {**entry, "parameters": params} if params else entry


def test_refusals_name_the_slice_and_field(zoo: Path, tmp_path: Path) -> None:
    z = zoo / "f32"
    a, b = _source(z / "a"), _source(z / "b", weight=1.0)
    msg = _refusal(zoo, tmp_path, slices=[{"sources": [a, b]}, {"sources": [a, b]}])
    assert "slices: 2 layer slices (a frankenmerge" in msg and "line 2" in msg
    msg = _refusal(zoo, tmp_path, slices=[{"sources": [_source(z / "a", 0, 2), b]}])
    assert "slices[0].sources[0].layer_range: layers 0 to 2 of" in msg
    assert "a partial range (a frankenmerge) is not supported" in msg and "give [0, 4]" in msg
    msg = _refusal(zoo, tmp_path, slices=[{"sources": [a, _source(z / "b", 0, 5, weight=1.0)]}])
    assert "slices[0].sources[1].layer_range: layers 0 to 5" in msg
    msg = _refusal(zoo, tmp_path, slices=[{"sources": [a, {"model": str(z / "b")}]}])
    assert "slices[0].sources[1].layer_range: two whole numbers [START, END] required" in msg
    msg = _refusal(zoo, tmp_path, slices=[{"sources": [a, dict(b, layer_range="0-4")]}])
    assert "slices[0].sources[1].layer_range: two whole numbers" in msg
    short = {"model": str(zoo / "short"), "layer_range": [0, 2], "parameters": {"weight": 1.0}}
    msg = _refusal(zoo, tmp_path, slices=[{"sources": [a, short]}])
    assert "slices[0].sources: the models have different layer counts" in msg
    msg = _refusal(zoo, tmp_path, slices=[{"sources": [b]}])
    assert "slices[0].sources: base_model" in msg and "is not among the sources" in msg
    msg = _refusal(zoo, tmp_path, slices=[{"sources": [a, b], "parameters": {"density": 0.5}}])
    assert "slices[0].parameters: a slice's own parameters is not supported" in msg
    msg = _refusal(zoo, tmp_path, slices=[{"sources": [a, b], "base_model": str(z / "a")}])
    assert "slices[0].base_model: a slice's own base_model is not supported" in msg
    msg = _refusal(zoo, tmp_path, slices=[{"sources": [a, b], "residual_weight": 0.5}])
    assert "slices[0].residual_weight: not supported" in msg
    msg = _refusal(zoo, tmp_path, slices=[{"source": [a, b]}])
    assert "slices[0].source: unknown key (did you mean 'sources'?" in msg
    assert "slices[0]: sources: a non-empty list of {model: PATH, layer_range: [0, L]}" in msg
    msg = _refusal(zoo, tmp_path, slices=[[a, b]])
    assert "slices[0]: a slice is a mapping {sources:" in msg
    msg = _refusal(zoo, tmp_path, models=[{"model": str(z / "b")}])
    assert "slices: layer slices and models both given" in msg
    msg = _refusal(zoo, tmp_path, slices=[{"sources": [a, _source(z / "b")]}])
    assert "slices[0].sources[1].parameters.weight: required by mergekit's ties" in msg
    msg = _refusal(zoo, tmp_path, slices=[{"sources": [a, dict(b, weight=1.0)]}])
    assert "slices[0].sources[1].weight: unknown key (valid: model, layer_range, parameters)" in msg
    c = _source(z / "c")
    msg = _refusal(
        zoo, tmp_path, merge_method="slerp", parameters={"t": 0.5}, slices=[{"sources": [a, b, c]}]
    )
    assert "slices[0].sources: slerp interpolates base_model and one other model; got 2" in msg


def test_layer_count_from_a_regular_config_json_only(zoo: Path, tmp_path: Path) -> None:
    """A source whose config.json gives no layer count, or is a FIFO (a reader that opened
    it would block), is refused at its layer_range without hanging."""
    z = zoo / "f32"
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"hidden_size": 32}))
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / "config.json")
    for model in (odd, fifo):
        source = {"model": str(model), "layer_range": [0, LAYERS], "parameters": {"weight": 1.0}}
        msg = _refusal(zoo, tmp_path, slices=[{"sources": [_source(z / "a"), source]}])
        assert "slices[0].sources[1].layer_range:" in msg
        assert "config.json gives no num_hidden_layers" in msg
