"""The drm-merge YAML schema: mergekit shape, located errors, closest names, example configs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from drm_lightning.config.errors import ConfigError
from drm_lightning.config.loading import load_config, parse_config
from drm_lightning.config.schema import MergeConfig
from drm_lightning.merge.routing import DEFAULT_EXCLUDE, DEFAULT_INCLUDE
from drm_lightning.methods import available_methods, get_method

CONFIGS = Path(__file__).resolve().parents[1] / "drm_lightning" / "cli" / "example_configs"


@pytest.fixture()
def models(tmp_path: Path) -> dict[str, Path]:
    """Folders standing in for a base and three branches (validation checks only existence)."""
    out = {}
    for name in ("base", "b0", "b1", "b2"):
        (tmp_path / name).mkdir()
        out[name] = tmp_path / name
    return out


def _write(tmp_path: Path, data: dict[str, Any] | str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def _config(models: dict[str, Path], **overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "method": "drm",
        "base": str(models["base"]),
        "branches": [str(models["b0"]), {"path": str(models["b1"]), "coefficient": 0.5}],
    }
    data.update(overrides)
    return data


def _error(tmp_path: Path, data: dict[str, Any] | str) -> str:
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message, "every config error names the file"
    return message


# ------------------------------------------------------------------------------- valid shapes


def test_minimal_config_defaults(models: dict[str, Path], tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, _config(models)))
    assert cfg.method == "drm"
    assert cfg.base == models["base"]
    assert [b.path for b in cfg.branches] == [models["b0"], models["b1"]]
    assert cfg.resolved_coefficients() == [1.0, 0.5]
    assert cfg.compute_torch_dtype == torch.float32 and cfg.out_torch_dtype is None
    assert cfg.resolved_seed() == 0
    routing = cfg.build_routing()
    assert tuple(routing.include) == DEFAULT_INCLUDE and tuple(routing.exclude) == DEFAULT_EXCLUDE
    assert tuple(routing.ignore) == ()
    assert cfg.build_method().params == get_method("drm").params


def test_parameters_reach_the_method(models: dict[str, Path], tmp_path: Path) -> None:
    """Regression for the reference's B8: nested settings are read, not replaced by defaults."""
    data = _config(
        models,
        parameters={
            "drop_rate": 0.3,
            "direction": "horizontal",
            "renormalize": False,
            "rank_rtol": 0.05,
            "reference_compat": True,
        },
    )
    method = load_config(_write(tmp_path, data)).build_method()
    p = method.params
    assert (p.drop_rate, p.direction, p.renormalize, p.rank_rtol, p.reference_compat) == (
        0.3,
        "horizontal",
        False,
        0.05,
        True,
    )


def test_mergekit_spelling_is_accepted(models: dict[str, Path], tmp_path: Path) -> None:
    """A mergekit-format file (``merge_method``) runs with mergekit's semantics and defaults."""
    text = f"""
merge_method: ties
base_model: {models["base"]}
models:
  - model: {models["b0"]}
    parameters:
      weight: 0.7
  - model: {models["b1"]}
    parameters: {{weight: 0.2}}
  - model: {models["b2"]}
dtype: float64
out_dtype: bfloat16
parameters:
  density: 0.4
  weight: 1.0
"""
    cfg = load_config(_write(tmp_path, text))
    assert cfg.method == "ties" and cfg.base == models["base"]
    assert cfg.resolved_coefficients() == [0.7, 0.2, 1.0]
    assert cfg.compute_torch_dtype == torch.float64 and cfg.out_torch_dtype == torch.bfloat16
    method = cfg.build_method()
    assert method.params.density == 0.4 and method.params.convention == "mergekit"


def test_coefficients_as_a_list(models: dict[str, Path], tmp_path: Path) -> None:
    data = _config(models, branches=[str(models["b0"]), str(models["b1"])], coefficients=[0.25, 2])
    assert load_config(_write(tmp_path, data)).resolved_coefficients() == [0.25, 2.0]


def test_routing_and_seed(models: dict[str, Path], tmp_path: Path) -> None:
    data = _config(
        models, method="dare_ties", routing={"ignore": ["lm_head"], "exclude": []}, seed=7
    )
    cfg = load_config(_write(tmp_path, data))
    routing = cfg.build_routing()
    assert routing.route("lm_head.weight", (8, 4)) == "ignore"
    assert routing.route("model.embed_tokens.weight", (8, 4)) == "matrix"  # exclude emptied
    assert cfg.resolved_seed() == 7
    data = _config(models, method="dare_ties", parameters={"seed": 3})
    assert load_config(_write(tmp_path, data)).resolved_seed() == 3


def test_lora_branch_detected(models: dict[str, Path], tmp_path: Path) -> None:
    (models["b1"] / "adapter_config.json").write_text("{}")
    cfg = load_config(_write(tmp_path, _config(models)))
    assert [b.is_lora for b in cfg.branches] == [False, True]


@pytest.mark.parametrize("example", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_validate(example: Path, tmp_path: Path) -> None:
    """Every example config (drm-merge --example) is valid once its paths exist; all methods."""
    data = yaml.safe_load(example.read_text())
    base = tmp_path / "base"
    base.mkdir()
    data["base"] = str(base)
    for i, branch in enumerate(data["branches"]):
        folder = tmp_path / f"branch{i}"
        folder.mkdir()
        if "lora" in example.name:
            (folder / "adapter_config.json").write_text("{}")
        if isinstance(branch, dict):
            branch["path"] = str(folder)
        else:
            data["branches"][i] = str(folder)
    cfg = load_config(_write(tmp_path, data))
    cfg.build_method()
    assert cfg.method in available_methods()
    if "lora" in example.name:
        assert all(b.is_lora for b in cfg.branches)


def test_every_method_has_an_example() -> None:
    methods = {yaml.safe_load(p.read_text())["method"] for p in CONFIGS.glob("*.yaml")}
    assert methods == {"drm", "ties", "task_arithmetic", "dare_ties", "dare_linear", "linear"}
    directions = {
        (yaml.safe_load(p.read_text()).get("parameters") or {}).get("direction")
        for p in CONFIGS.glob("drm*.yaml")
    }
    assert {"vertical", "horizontal"} <= directions


# ---------------------------------------------------------------------------- located errors


def test_unknown_method_lists_closest(models: dict[str, Path], tmp_path: Path) -> None:
    msg = _error(tmp_path, _config(models, method="tie"))
    assert "method: unknown merge method 'tie'" in msg and "did you mean 'ties'" in msg
    assert "dare_linear" in msg  # the valid names are listed


def test_unknown_parameter_lists_closest(models: dict[str, Path], tmp_path: Path) -> None:
    msg = _error(tmp_path, _config(models, parameters={"drop_rat": 0.5, "densty": 0.2}))
    assert "parameters.drop_rat: unknown parameter for method 'drm'" in msg
    assert "did you mean 'drop_rate'" in msg
    assert "parameters.densty" in msg  # both reported at once
    msg = _error(tmp_path, _config(models, method="ties", parameters={"drop_rate": 0.5}))
    assert "parameters.drop_rate: unknown parameter for method 'ties'" in msg and "density" in msg


def test_parameter_fixed_by_the_method_name(models: dict[str, Path], tmp_path: Path) -> None:
    msg = _error(tmp_path, _config(models, method="ties", parameters={"sparsify": "random"}))
    assert "parameters.sparsify: fixed to 'magnitude' by method 'ties'" in msg


@pytest.mark.parametrize(
    "value, expected", [(1.0, "must be < 1"), (-0.1, "must be >= 0"), (1.5, "must be < 1")]
)
def test_drop_rate_outside_unit_interval(
    models: dict[str, Path], tmp_path: Path, value: float, expected: str
) -> None:
    msg = _error(tmp_path, _config(models, parameters={"drop_rate": value}))
    assert f"parameters.drop_rate: {expected}" in msg and repr(value) in msg


def test_bad_parameter_values(models: dict[str, Path], tmp_path: Path) -> None:
    msg = _error(
        tmp_path, _config(models, parameters={"direction": "diagonal", "renormalize": "maybe"})
    )
    assert "parameters.direction:" in msg and "'diagonal'" in msg and "horizontal" in msg
    assert "parameters.renormalize:" in msg
    msg = _error(tmp_path, _config(models, method="ties", parameters={"density": 0.0}))
    assert "parameters.density:" in msg and "(0, 1]" in msg


def test_negative_and_non_finite_coefficients(models: dict[str, Path], tmp_path: Path) -> None:
    data = _config(models)
    data["branches"][1]["coefficient"] = -0.5
    msg = _error(tmp_path, data)
    assert "branches[1].coefficient: must be >= 0" in msg and "-0.5" in msg
    data["branches"][1]["coefficient"] = float("nan")
    assert "branches[1].coefficient: must be a finite number" in _error(tmp_path, data)
    data = _config(
        models, branches=[str(models["b0"]), str(models["b1"])], coefficients=[1.0, -2.0]
    )
    assert "coefficients[1]: must be a finite number >= 0 (got -2.0)" in _error(tmp_path, data)


def test_coefficient_list_length(models: dict[str, Path], tmp_path: Path) -> None:
    data = _config(
        models, branches=[str(models["b0"]), str(models["b1"])], coefficients=[1.0, 0.5, 0.2]
    )
    msg = _error(tmp_path, data)
    assert "coefficients: has 3 value(s) but there are 2 branches" in msg
    msg = _error(tmp_path, _config(models, coefficients=[1.0, 0.5]))  # branches[1] has one too
    assert "given both as a list and per branch (branches [1])" in msg


def test_missing_paths(models: dict[str, Path], tmp_path: Path) -> None:
    data = _config(models, base=str(tmp_path / "nope"))
    data["branches"][1]["path"] = str(tmp_path / "missing-branch")
    msg = _error(tmp_path, data)
    assert f"base: base not found: '{tmp_path / 'nope'}'" in msg
    assert f"branches[1].path: branch not found: '{tmp_path / 'missing-branch'}'" in msg


def test_base_must_not_be_an_adapter(models: dict[str, Path], tmp_path: Path) -> None:
    (models["base"] / "adapter_config.json").write_text("{}")
    assert "is a LoRA adapter; the base must be a full model" in _error(tmp_path, _config(models))


def test_unknown_keys_with_closest_names(models: dict[str, Path], tmp_path: Path) -> None:
    data = _config(models, paramters={"drop_rate": 0.5}, merging_config={})
    data["branches"][1]["coef"] = 1.0
    data["routing"] = {"ignroe": ["x"]}
    msg = _error(tmp_path, data)
    assert "paramters: unknown key (did you mean 'parameters'?" in msg
    assert "merging_config: unknown key (valid: " in msg
    assert "branches[1].coef: unknown key (did you mean 'coefficient'?" in msg
    assert "routing.ignroe: unknown key (did you mean 'ignore'?" in msg
    assert "(4 problems)" in msg


def test_required_keys(tmp_path: Path) -> None:
    msg = _error(tmp_path, {"parameters": {}})
    for key in ("method", "base", "branches"):
        assert f"{key}: required field is missing" in msg
    (tmp_path / "b").mkdir()
    msg = _error(tmp_path, {"method": "drm", "base": str(tmp_path / "b"), "branches": []})
    assert "branches: needs at least 1 item(s)" in msg


def test_alias_and_name_both_given(models: dict[str, Path], tmp_path: Path) -> None:
    msg = _error(tmp_path, _config(models, dtype="float32", compute_dtype="float64"))
    assert "dtype: both 'dtype' and 'compute_dtype' given" in msg


def test_dtypes(models: dict[str, Path], tmp_path: Path) -> None:
    msg = _error(tmp_path, _config(models, compute_dtype="bfloat16", out_dtype="float8_e4m3fn"))
    assert "compute_dtype: unsupported dtype 'bfloat16' (valid: float32, float64)" in msg
    assert (
        "out_dtype: unsupported dtype 'float8_e4m3fn' (valid: float16, bfloat16, float32, float64)"
        in msg
    )
    assert "int8" in _error(tmp_path, _config(models, out_dtype="int8"))


def test_routing_errors(models: dict[str, Path], tmp_path: Path) -> None:
    msg = _error(
        tmp_path, _config(models, routing={"exclude": "lm_head", "ignore": ["ok", "(bad"]})
    )
    assert "routing.exclude: must be a list of regexes, e.g. ['lm_head']" in msg
    assert "routing.ignore[1]: invalid regular expression" in msg and "'(bad'" in msg


def test_seed_conflict(models: dict[str, Path], tmp_path: Path) -> None:
    msg = _error(tmp_path, _config(models, method="dare_ties", seed=1, parameters={"seed": 2}))
    assert "parameters.seed: differs from the top-level seed 1" in msg


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    text = "method: drm\nbase: x\nbranches: [a, b\nparameters: {}\n"
    msg = _error(tmp_path, text)
    assert re.search(r"cfg\.yaml:\d+:\d+: YAML syntax error", msg), msg
    text = "method: drm\nbase: x\n  branches: - a\n"
    assert "cfg.yaml:3:" in _error(tmp_path, text)


def test_not_a_mapping(tmp_path: Path) -> None:
    assert "the file is empty" in _error(tmp_path, "")
    assert "the file is a list" in _error(tmp_path, "- method: drm\n")


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_parse_config_programmatic(models: dict[str, Path]) -> None:
    cfg = parse_config(yaml.safe_dump(_config(models)))
    assert isinstance(cfg, MergeConfig)
    with pytest.raises(ConfigError, match=r"<config>"):
        parse_config("method: [")
