"""Weight sources: every reader round-trips a tiny Llama; metadata
without data; errors; LoRA vs PEFT."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from safetensors.torch import load_file, save_file

import drm_lightning.sources.safetensors_file as st_module
from drm_lightning.sources import (
    HFFolderSource,
    LightningCheckpointSource,
    LoraBranch,
    SafetensorsFileSource,
    StateDictSource,
    TensorMeta,
    TorchFileSource,
    UntrustedPickleError,
    WeightSource,
    open_source,
    sha256_of,
)

transformers = pytest.importorskip("transformers")
from helpers import TINY_LLAMA  # noqa: E402

LLAMA = TINY_LLAMA


def _llama(seed: int = 0, **overrides: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**LLAMA, **overrides}))
    with torch.no_grad():  # non-trivial values everywhere, norms included
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _save_bin_folder(state: dict[str, torch.Tensor], folder: Path, shards: int) -> None:
    """The legacy ``pytorch_model.bin`` layout (transformers 5 only writes safetensors)."""
    folder.mkdir(parents=True)
    names = sorted(state)
    if shards == 1:
        torch.save({k: state[k].clone() for k in names}, folder / "pytorch_model.bin")
        return
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        fname = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save({k: state[k].clone() for k in part}, folder / fname)
        weight_map.update(dict.fromkeys(part, fname))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))


class HyperParams:
    """A custom object in a checkpoint: needs full unpickling (like Lightning's hparams)."""

    def __init__(self, lr: float) -> None:
        self.lr = lr


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A tiny Llama saved in every supported layout."""
    root = tmp_path_factory.mktemp("llama")
    model = _llama()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.save_pretrained(root / "sharded", max_shard_size="50KB")
    model.save_pretrained(root / "single")
    _save_bin_folder(state, root / "bin", 1)
    _save_bin_folder(state, root / "bin_sharded", 3)
    ckpt = {
        "epoch": 2,
        "global_step": 10,
        "state_dict": {
            **{f"model.{k}": v for k, v in state.items()},
            "loss_fn.pos_weight": torch.ones(1),
        },
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1}]}],
        "hyper_parameters": {"lr": 0.1},
    }
    torch.save(ckpt, root / "plain.ckpt")
    torch.save({**ckpt, "hyper_parameters": HyperParams(0.1)}, root / "custom.ckpt")
    torch.save(state, root / "weights.pt")
    return {"root": root, "model": model, "state": state}


def _assert_same_weights(source: WeightSource, state: dict[str, torch.Tensor]) -> None:
    assert source.keys() == sorted(state)
    for name, ref in state.items():
        meta = source.meta(name)
        assert meta == TensorMeta(tuple(ref.shape), ref.dtype), name
        got = source.get(name)
        assert got.shape == ref.shape and got.dtype == ref.dtype
        assert torch.equal(got, ref), name


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    ("layout", "cls", "hf_layout"),
    [
        ("sharded", HFFolderSource, "safetensors-sharded"),
        ("single", HFFolderSource, "safetensors"),
        ("bin", HFFolderSource, "bin"),
        ("bin_sharded", HFFolderSource, "bin-sharded"),
    ],
)
def test_hf_folders_round_trip(llama: dict, layout: str, cls: type, hf_layout: str) -> None:
    source = open_source(llama["root"] / layout)
    assert type(source) is cls and source.layout == hf_layout
    _assert_same_weights(source, llama["state"])
    assert source.origin == str(llama["root"] / layout)
    assert str(llama["root"] / layout) in source.describe()


def test_sharded_folder_lists_index_and_every_shard(llama: dict) -> None:
    folder = llama["root"] / "sharded"
    source = HFFolderSource(folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted({folder / f for f in index["weight_map"].values()})
    assert len(shards) > 1
    assert source.files() == [folder / "model.safetensors.index.json", *shards]
    assert HFFolderSource(llama["root"] / "single").files() == [
        llama["root"] / "single" / "model.safetensors"
    ]


def test_safetensors_file_round_trip(llama: dict) -> None:
    path = llama["root"] / "single" / "model.safetensors"
    source = open_source(path)
    assert isinstance(source, SafetensorsFileSource)
    _assert_same_weights(source, llama["state"])
    assert source.files() == [path]
    assert source.total_bytes() == sum(
        t.numel() * t.element_size() for t in llama["state"].values()
    )


def test_lightning_checkpoint_with_prefix(llama: dict) -> None:
    source = open_source(llama["root"] / "plain.ckpt", prefix="model.")
    assert isinstance(source, LightningCheckpointSource)
    _assert_same_weights(source, llama["state"])
    assert source.skipped == ["loss_fn.pos_weight"]
    assert "prefix 'model.' stripped" in source.describe()
    unprefixed = LightningCheckpointSource(llama["root"] / "plain.ckpt")
    assert "model.lm_head.weight" in unprefixed and "loss_fn.pos_weight" in unprefixed
    with pytest.raises(
        ValueError, match=r"no tensor name in .*plain\.ckpt starts with prefix 'encoder\.'"
    ):
        LightningCheckpointSource(llama["root"] / "plain.ckpt", prefix="encoder.")


def test_lightning_checkpoint_with_python_objects(llama: dict) -> None:
    path = llama["root"] / "custom.ckpt"
    with pytest.raises(
        UntrustedPickleError, match=r"custom\.ckpt holds Python objects.*--trust-pickles"
    ):
        LightningCheckpointSource(path, prefix="model.")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        source = LightningCheckpointSource(path, prefix="model.", trust_pickles=True)
    _assert_same_weights(source, llama["state"])


def test_lightning_checkpoint_refuses_plain_state_dict(llama: dict) -> None:
    with pytest.raises(
        ValueError, match=r"weights\.pt is not a Lightning checkpoint: it has no 'state_dict'"
    ):
        LightningCheckpointSource(llama["root"] / "weights.pt")
    source = open_source(llama["root"] / "weights.pt")
    assert type(source) is TorchFileSource
    _assert_same_weights(source, llama["state"])


def test_state_dict_source_shares_memory(llama: dict) -> None:
    model = llama["model"]
    source = open_source(model)
    assert isinstance(source, StateDictSource) and source.origin == "<in-memory>"
    _assert_same_weights(source, llama["state"])
    live = model.model.embed_tokens.weight
    assert source.get("model.embed_tokens.weight").data_ptr() == live.data_ptr()
    assert not source.get("model.embed_tokens.weight").requires_grad
    assert source.files() == []
    mapping = {"b": torch.zeros(2), "a": torch.ones(1)}
    assert open_source(mapping).keys() == ["a", "b"]
    with pytest.raises(TypeError, match=r"'x' \(int\)"):
        StateDictSource({"x": 3})  # type: ignore[dict-item]


def test_open_source_returns_sources_unchanged(llama: dict) -> None:
    source = HFFolderSource(llama["root"] / "single")
    assert open_source(source) is source
    with pytest.raises(TypeError, match="cannot open weights from a int"):
        open_source(3)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- metadata only


class _NoDataSafeOpen:
    """Wraps ``safe_open``: headers and slices' shape/dtype allowed, tensor data refused."""

    def __init__(self, real: object) -> None:
        self._real = real

    def __call__(self, *args: object, **kwargs: object) -> object:
        handle = self._real(*args, **kwargs)  # type: ignore[operator]
        outer = self

        class Guard:
            def __enter__(self) -> Guard:
                handle.__enter__()
                return self

            def __exit__(self, *exc: object) -> None:
                handle.__exit__(*exc)

            def keys(self) -> list[str]:
                return handle.keys()

            def metadata(self) -> dict[str, str]:
                return handle.metadata()

            def get_slice(self, name: str) -> object:
                sl = handle.get_slice(name)

                class Shape:
                    def get_shape(self) -> list[int]:
                        return sl.get_shape()

                    def get_dtype(self) -> str:
                        return sl.get_dtype()

                return Shape()

            def get_tensor(self, name: str) -> torch.Tensor:
                outer.reads.append(name)
                raise AssertionError(f"tensor data of {name} read")

        return Guard()

    reads: ClassVar[list[str]] = []


def test_meta_reads_no_tensor_data(llama: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    guard = _NoDataSafeOpen(st_module.safe_open)
    guard.reads = []
    monkeypatch.setattr(st_module, "safe_open", guard)

    def no_data(self: SafetensorsFileSource, view: memoryview, offset: int) -> int:
        raise AssertionError(f"tensor data of {self.path.name} read at {offset}")

    monkeypatch.setattr(SafetensorsFileSource, "_read_into", no_data)  # get/get_rows/prefetch
    for layout in ("sharded", "single"):
        source = open_source(llama["root"] / layout)
        metas = {k: source.meta(k) for k in source.keys()}
        assert metas["model.embed_tokens.weight"] == TensorMeta((128, 32), torch.float32)
        assert metas["model.layers.1.mlp.down_proj.weight"].shape == (32, 64)
        assert source.total_bytes() > 0
    assert guard.reads == []
    with pytest.raises(AssertionError, match="tensor data of model.safetensors read"):
        source.get("lm_head.weight")  # the guard works: get() does read


def test_safetensors_dtype_mapping(tmp_path: Path) -> None:
    tensors = {
        "bf16": torch.ones(2, dtype=torch.bfloat16),
        "f16": torch.ones(1, dtype=torch.float16),
        "i64": torch.arange(3),
        "b": torch.tensor([True]),
        "u8": torch.zeros(2, dtype=torch.uint8),
        "f64": torch.zeros((), dtype=torch.float64),
    }
    save_file(tensors, str(tmp_path / "x.safetensors"))
    source = SafetensorsFileSource(tmp_path / "x.safetensors")
    for name, t in tensors.items():
        assert source.meta(name) == TensorMeta(tuple(t.shape), t.dtype)
        assert torch.equal(source.get(name), t)
    assert source.meta("f64").nbytes == 8 and source.meta("b").nbytes == 1


# --------------------------------------------------------------------------- errors


def test_missing_paths_name_the_path_and_what_was_expected(tmp_path: Path, llama: dict) -> None:
    expected = (
        r"expected a \.safetensors file, a folder with model\.safetensors\[\.index\.json\] "
        r"or pytorch_model\.bin, a Lightning \.ckpt, "
        r"or a PEFT adapter folder with adapter_config\.json"
    )
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}/nope does not exist; {expected}"):
        open_source(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(
        FileNotFoundError,
        match=(
            rf"no model weights in {tmp_path}/empty: {expected}; "
            r"the folder holds \['notes.txt'\]"
        ),
    ):
        open_source(tmp_path / "empty")
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"model\.onnx: unsupported file type '\.onnx'"):
        open_source(tmp_path / "model.onnx")
    with pytest.raises(FileNotFoundError, match="safetensors file not found"):
        SafetensorsFileSource(tmp_path / "missing.safetensors")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        SafetensorsFileSource(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="torch checkpoint not found"):
        LightningCheckpointSource(tmp_path / "missing.ckpt")


def test_sharded_folder_with_missing_shard(tmp_path: Path, llama: dict) -> None:
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(llama["root"] / "sharded", folder)
    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"missing from .*broken: \['model-00002-of-00003.safetensors'\]"
    ):
        HFFolderSource(folder)


def test_corrupt_files(tmp_path: Path) -> None:
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(ValueError, match=r"bad\.safetensors is not a valid safetensors file"):
        SafetensorsFileSource(tmp_path / "bad.safetensors")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(ValueError, match="not a valid shard index"):
        HFFolderSource(tmp_path / "bad")


def test_unknown_tensor_name_lists_closest(llama: dict) -> None:
    source = HFFolderSource(llama["root"] / "sharded")
    with pytest.raises(
        KeyError,
        match=r"'model.norm.wieght' not found in .*sharded.*closest: \['model.norm.weight'",
    ):
        source.get("model.norm.wieght")
    with pytest.raises(KeyError, match="not found"):
        SafetensorsFileSource(llama["root"] / "single" / "model.safetensors").meta("nope")


def test_sha256_of(tmp_path: Path) -> None:
    import hashlib

    p = tmp_path / "f.bin"
    p.write_bytes(b"drm" * 1000)
    assert sha256_of(p, chunk_bytes=7) == hashlib.sha256(b"drm" * 1000).hexdigest()
    p.write_bytes(b"other content")  # size changes: the cache must not return the old hash
    assert sha256_of(p) == hashlib.sha256(b"other content").hexdigest()
    with pytest.raises(FileNotFoundError, match="no such file"):
        sha256_of(tmp_path / "nope")


# --------------------------------------------------------------------------- LoRA vs PEFT


def _randomise_lora(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.fixture(scope="module")
def peft_adapters(
    llama: dict, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, dict]]:
    """Adapters saved by PEFT, with the weights PEFT's merge_and_unload gives for each."""
    peft = pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("adapters")
    configs = {
        "patterns": {
            "r": 4,
            "lora_alpha": 8,
            "target_modules": ["q_proj", "v_proj", "down_proj", "embed_tokens"],
            "rank_pattern": {"v_proj": 2, "layers.1.self_attn.q_proj": 3},
            "alpha_pattern": {"down_proj": 3},
        },
        "rslora": {
            "r": 8,
            "lora_alpha": 4,
            "use_rslora": True,
            "target_modules": ["k_proj", "up_proj"],
        },
    }
    out = {}
    for i, (label, kwargs) in enumerate(configs.items()):
        model = _llama()
        peft_model = peft.get_peft_model(model, peft.LoraConfig(**kwargs))
        _randomise_lora(peft_model, seed=i)
        peft_model.save_pretrained(root / label)
        merged = peft_model.merge_and_unload()
        out[label] = (root / label, {k: v.detach().clone() for k, v in merged.state_dict().items()})
    return out


@pytest.mark.parametrize("label", ["patterns", "rslora"])
def test_lora_matches_peft_merge_and_unload(llama: dict, peft_adapters: dict, label: str) -> None:
    adapter_dir, merged = peft_adapters[label]
    base = HFFolderSource(llama["root"] / "sharded")
    branch = open_source(adapter_dir, base=llama["root"] / "sharded")
    assert isinstance(branch, LoraBranch)
    assert branch.keys() == base.keys() == sorted(merged)
    changed = 0
    for name in branch.keys():
        base_t = base.get(name)
        got = branch.get(name)
        assert got.dtype == base_t.dtype
        torch.testing.assert_close(got, merged[name], atol=1e-6, rtol=0, msg=name)
        factors = branch.lowrank(name)
        if factors is None:
            assert name not in branch.targets()
            assert torch.equal(got, base_t) and torch.count_nonzero(branch.delta(name, base_t)) == 0
            continue
        changed += 1
        b, a = factors
        assert b.shape[1] == a.shape[0] == branch.modules[name].rank
        true_delta = merged[name].double() - base_t.double()
        assert true_delta.abs().max() > 1e-3  # the adapter really changes this weight
        torch.testing.assert_close((b @ a).double(), true_delta, atol=1e-6, rtol=0)
        torch.testing.assert_close(
            branch.delta(name, base_t).double(), true_delta, atol=1e-6, rtol=0
        )
    assert changed == len(branch.targets()) > 0


def test_lora_patterns_and_scaling(llama: dict, peft_adapters: dict) -> None:
    branch = LoraBranch(peft_adapters["patterns"][0], HFFolderSource(llama["root"] / "single"))
    mods = branch.modules
    assert mods["model.layers.0.self_attn.v_proj.weight"].rank == 2
    assert mods["model.layers.0.self_attn.v_proj.weight"].scaling == 8 / 2
    assert mods["model.layers.1.self_attn.q_proj.weight"].rank == 3
    assert mods["model.layers.0.self_attn.q_proj.weight"].rank == 4
    assert mods["model.layers.0.mlp.down_proj.weight"].scaling == 3 / 4
    emb = mods["model.embed_tokens.weight"]
    assert emb.kind == "embedding" and emb.transpose
    rs = LoraBranch(peft_adapters["rslora"][0], HFFolderSource(llama["root"] / "single"))
    assert rs.modules["model.layers.0.mlp.up_proj.weight"].scaling == pytest.approx(
        4 / math.sqrt(8)
    )
    assert rs.files() == [
        peft_adapters["rslora"][0] / "adapter_config.json",
        peft_adapters["rslora"][0] / "adapter_model.safetensors",
    ]


def test_lora_gpt2_conv1d_fan_in_fan_out(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=16)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    base = StateDictSource({k: v.detach().clone() for k, v in model.state_dict().items()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that it sets fan_in_fan_out for Conv1D
        peft_model = peft.get_peft_model(
            model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"])
        )
    _randomise_lora(peft_model, seed=5)
    peft_model.save_pretrained(tmp_path / "gpt2")
    merged = peft_model.merge_and_unload().state_dict()
    branch = LoraBranch(tmp_path / "gpt2", base)
    assert branch.targets() == [
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.0.attn.c_proj.weight",
        "transformer.h.0.mlp.c_proj.weight",
    ]
    for name in branch.targets():
        assert branch.modules[name].transpose
        torch.testing.assert_close(branch.get(name), merged[name], atol=1e-6, rtol=0)
        assert not torch.equal(branch.get(name), base.get(name))


def _write_adapter(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2, **config})
    )
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def _factors(
    module: str, out_dim: int, in_dim: int, r: int = 2, adapter: str = ""
) -> dict[str, torch.Tensor]:
    seg = f".{adapter}" if adapter else ""
    return {
        f"base_model.model.{module}.lora_A{seg}.weight": torch.randn(r, in_dim),
        f"base_model.model.{module}.lora_B{seg}.weight": torch.randn(out_dim, r),
    }


def test_lora_base_mismatch_is_caught_at_construction(
    llama: dict, peft_adapters: dict, tmp_path: Path
) -> None:
    adapter_dir = peft_adapters["patterns"][0]
    state = dict(llama["state"])
    state["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(32, 16)
    with pytest.raises(
        ValueError,
        match=(
            r"does not match the base .*\n- module 'model.layers.0.self_attn.q_proj': "
            r"adapter delta shape \[32, 32\] from lora_B \[32, 4\] @ lora_A \[4, 32\] "
            r"vs base 'model.layers.0.self_attn.q_proj.weight' shape \[32, 16\]"
        ),
    ):
        LoraBranch(adapter_dir, StateDictSource(state))
    bigger = _llama(hidden_size=48)
    with pytest.raises(
        ValueError,
        match=(
            r"module 'model.embed_tokens'.*\[128, 32\]"
            r".*vs base 'model.embed_tokens.weight' shape \[128, 48\]"
        ),
    ):
        LoraBranch(adapter_dir, StateDictSource(bigger))
    del state["model.layers.1.mlp.down_proj.weight"]
    with pytest.raises(
        ValueError,
        match=r"1 module\(s\) whose weight is not in the base.*model.layers.1.mlp.down_proj.weight",
    ):
        LoraBranch(adapter_dir, StateDictSource(state))


def test_lora_adapter_name_segments(tmp_path: Path) -> None:
    base = StateDictSource({"fc.weight": torch.zeros(3, 5), "fc.bias": torch.zeros(3)})
    tensors = {**_factors("fc", 3, 5, adapter="task_a"), **_factors("fc", 3, 5, adapter="task_b")}
    folder = _write_adapter(tmp_path / "multi", {}, tensors)
    with pytest.raises(
        ValueError, match=r"several adapters \['task_a', 'task_b'\]; choose one with adapter_name="
    ):
        LoraBranch(folder, base)
    branch = LoraBranch(folder, base, adapter_name="task_b")
    a, b = (
        tensors["base_model.model.fc.lora_A.task_b.weight"],
        tensors["base_model.model.fc.lora_B.task_b.weight"],
    )
    torch.testing.assert_close(branch.get("fc.weight"), b @ a)  # alpha / r = 1
    with pytest.raises(ValueError, match="adapter_name='task_c' not found"):
        LoraBranch(folder, base, adapter_name="task_c")


def test_lora_adapter_bin_and_errors(tmp_path: Path) -> None:
    base = StateDictSource({"fc.weight": torch.zeros(3, 5)})
    tensors = _factors("fc", 3, 5)
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 6})
    )
    torch.save(tensors, folder / "adapter_model.bin")
    branch = LoraBranch(folder, base)
    a, b = (
        tensors["base_model.model.fc.lora_A.weight"],
        tensors["base_model.model.fc.lora_B.weight"],
    )
    torch.testing.assert_close(branch.delta("fc.weight", torch.zeros(3, 5)), 3 * b @ a)
    assert branch.files()[1] == folder / "adapter_model.bin"

    with pytest.raises(ValueError, match="is a PEFT adapter folder; open it with base="):
        open_source(folder)
    wrong_rank = _write_adapter(tmp_path / "rank", {"r": 4}, tensors)
    with pytest.raises(
        ValueError, match=r"module 'fc': factors have rank 2 but the config gives r=4"
    ):
        LoraBranch(wrong_rank, base)
    unpaired = _write_adapter(
        tmp_path / "unpaired", {}, {"base_model.model.fc.lora_A.weight": torch.ones(2, 5)}
    )
    with pytest.raises(ValueError, match=r"unpaired factors: \['fc \(only lora_A\)'\]"):
        LoraBranch(unpaired, base)
    no_weights = tmp_path / "noweights"
    no_weights.mkdir()
    (no_weights / "adapter_config.json").write_text("{}")
    with pytest.raises(NotImplementedError, match="peft_type is None"):
        LoraBranch(no_weights, base)
    (no_weights / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2})
    )
    with pytest.raises(
        FileNotFoundError, match="has no adapter_model.safetensors or adapter_model.bin"
    ):
        LoraBranch(no_weights, base)
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        LoraBranch(tmp_path, base)


@pytest.mark.parametrize(
    ("config", "extra", "match"),
    [
        (
            {"use_dora": True},
            {"base_model.model.fc.lora_magnitude_vector": torch.ones(3)},
            "use_dora=true",
        ),
        ({"modules_to_save": ["head"]}, {}, r"modules_to_save=\['head'\]"),
        ({"bias": "lora_only"}, {}, "bias='lora_only'"),
        ({"init_lora_weights": "pissa"}, {}, "path_initial_model_for_weight_conversion"),
        ({"peft_type": "IA3"}, {}, "peft_type is 'IA3'"),
        (
            {},
            {"base_model.model.fc.lora_magnitude_vector": torch.ones(3)},
            "not plain LoRA factors",
        ),
        ({}, {"base_model.model.fc.lora_B.bias": torch.ones(3)}, r"lora_B\.bias"),
    ],
)
def test_lora_unsupported_variants_are_refused(
    tmp_path: Path, config: dict, extra: dict, match: str
) -> None:
    base = StateDictSource({"fc.weight": torch.zeros(3, 5)})
    folder = _write_adapter(tmp_path / "a", config, {**_factors("fc", 3, 5), **extra})
    with pytest.raises(NotImplementedError, match=match):
        LoraBranch(folder, base)


def test_lora_conv_targets_are_refused(tmp_path: Path) -> None:
    base = StateDictSource({"conv.weight": torch.zeros(4, 3, 3, 3)})
    tensors = {
        "base_model.model.conv.lora_A.weight": torch.ones(2, 3, 3, 3),
        "base_model.model.conv.lora_B.weight": torch.ones(4, 2, 1, 1),
    }
    with pytest.raises(NotImplementedError, match="LoRA on convolution modules is not supported"):
        LoraBranch(_write_adapter(tmp_path / "c", {}, tensors), base)


def test_lora_unknown_name(tmp_path: Path) -> None:
    base = StateDictSource({"fc.weight": torch.zeros(3, 5)})
    branch = LoraBranch(_write_adapter(tmp_path / "a", {}, _factors("fc", 3, 5)), base)
    with pytest.raises(KeyError, match="'fc.wieght' not found"):
        branch.lowrank("fc.wieght")
    assert (
        load_file(str(tmp_path / "a" / "adapter_model.safetensors")).keys()
        == _factors("fc", 3, 5).keys()
    )


def test_lora_saved_embedding_copy_must_equal_base(
    llama: dict, peft_adapters: dict, tmp_path: Path
) -> None:
    import shutil

    adapter_dir = tmp_path / "edited"
    shutil.copytree(peft_adapters["patterns"][0], adapter_dir)
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    copy_key = "base_model.model.model.embed_tokens.base_layer.weight"
    assert torch.equal(
        tensors[copy_key], llama["state"]["model.embed_tokens.weight"]
    )  # PEFT saved the base copy
    tensors[copy_key] = tensors[copy_key] + 1.0  # as if new token rows were trained
    save_file(tensors, str(adapter_dir / "adapter_model.safetensors"))
    with pytest.raises(
        ValueError, match=r"saved its own 'model.embed_tokens.weight' and it differs from the base"
    ):
        LoraBranch(adapter_dir, StateDictSource(llama["state"]))


def test_merge_loop_with_lora_branch_and_writer(
    llama: dict, peft_adapters: dict, tmp_path: Path
) -> None:
    """Sources + merge loop + writer: task arithmetic of one LoRA branch equals PEFT's merge."""
    from drm_lightning.merge.loop import iter_merge
    from drm_lightning.methods import get_method
    from drm_lightning.sources import HFFolderWriter

    adapter_dir, merged = peft_adapters["rslora"]
    base = open_source(llama["root"] / "sharded")
    branch = open_source(adapter_dir, base=base)
    out = tmp_path / "merged"
    with HFFolderWriter(
        out,
        max_shard_bytes=40_000,
        copy_from=llama["root"] / "sharded",
        metadata={
            "method": "task_arithmetic",
            "base": base,
            "branches": [{"source": branch, "coefficient": 1.0}],
        },
    ) as w:
        for name, tensor in iter_merge(get_method("task_arithmetic"), base, [branch]):
            w.add(name, tensor)
    result = HFFolderSource(out)
    assert result.keys() == sorted(merged)
    for name, ref in merged.items():
        torch.testing.assert_close(result.get(name), ref, atol=1e-6, rtol=0, msg=name)
    card = (out / "README.md").read_text()
    assert sha256_of(adapter_dir / "adapter_model.safetensors") in card
    assert (out / "config.json").read_bytes() == (
        llama["root"] / "sharded" / "config.json"
    ).read_bytes()


def test_safetensors_rows_read_from_threads_at_once_open_the_file_once(
    tmp_path: Path, monkeypatch
) -> None:
    # The fused merge's piece threads make their first reads together: one descriptor, not one each.
    import os
    import pickle
    import threading
    import time

    from safetensors.torch import save_file

    import drm_lightning.sources.safetensors_file as module

    save_file({"w": torch.arange(64.0).reshape(16, 4)}, str(tmp_path / "m.safetensors"))
    # a copy in another process (here: unpickled) has no descriptor yet and opens its own
    source = pickle.loads(pickle.dumps(SafetensorsFileSource(tmp_path / "m.safetensors")))
    opened = []
    real_open = os.open

    def slow_open(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if str(path).endswith("m.safetensors"):
            opened.append(path)
            time.sleep(0.05)  # both threads are inside before either has a descriptor
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(module.os, "open", slow_open)
    rows = {}
    threads = [
        threading.Thread(target=lambda a=a: rows.setdefault(a, source.get_rows("w", a, a + 8)))
        for a in (0, 8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(opened) == 1
    assert torch.equal(torch.cat([rows[0], rows[8]]), torch.arange(64.0).reshape(16, 4))
