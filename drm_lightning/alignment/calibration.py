"""What a config-driven alignment reads besides weights: architecture, calibration batches, spec.

* :func:`build_model` — ``module:function`` returning an ``nn.Module``, or a folder with a
  transformers ``config.json`` (the class named by its ``architectures``, else ``AutoModel``,
  built with ``from_config``: random weights, no download);
* :func:`load_batches` — ``module:function`` returning a DataLoader, a tensor or a list of
  batches, or a ``.safetensors`` / ``.pt`` file (loaded weights-only) holding one tensor (or
  ``inputs``), split into batches of ``batch_size`` rows;
* :func:`check_fits` — the model's names and shapes against a branch's metadata (no weight
  read); :func:`load_into` — a branch's weights into a copy of the model.

``module:function`` references import the user's own module because the user named it.

Example:
    >>> import torch
    >>> batches = load_batches("torch:eye", batch_size=2, call_args=(5,))
    >>> [tuple(b.shape) for b in batches]
    [(2, 5), (2, 5), (1, 5)]
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from drm_lightning.alignment.spec import PermSpec

__all__ = ["build_model", "build_spec", "check_fits", "load_batches", "load_into"]


def _resolve(reference: str) -> Any:
    from drm_lightning.align_config import resolve_callable

    return resolve_callable(reference)


def build_model(model: str) -> nn.Module:
    """The architecture named by ``model`` (its weights are replaced by each branch's).

    Raises:
        TypeError: ``module:function`` returned something other than an ``nn.Module``.
    """
    path = Path(model)
    if path.is_dir():
        import transformers

        config = transformers.AutoConfig.from_pretrained(path)
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        built = cls(config) if cls is not None else transformers.AutoModel.from_config(config)
    else:
        built = _resolve(model)()
    if not isinstance(built, nn.Module):
        raise TypeError(f"model: {model!r} returned a {type(built).__name__}, not a torch.nn.Module")
    return built.eval()


def _split(tensor: Tensor, batch_size: int) -> list[Tensor]:
    if tensor.dim() == 0:
        raise ValueError("is a scalar tensor; give samples along the first dimension")
    return list(torch.split(tensor, batch_size))


def _from_loaded(obj: Any, batch_size: int, what: str) -> Sequence[Any]:
    if isinstance(obj, Tensor):
        return _split(obj, batch_size)
    if isinstance(obj, Mapping):
        tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
        if len(tensors) == 1:
            return _split(next(iter(tensors.values())), batch_size)
        if "inputs" in tensors:
            return _split(tensors["inputs"], batch_size)
        raise ValueError(f"{what} holds {sorted(tensors)}: keep one tensor, or name the inputs 'inputs'")
    if isinstance(obj, (torch.utils.data.DataLoader, list, tuple)):
        return obj  # type: ignore[return-value]
    if isinstance(obj, Iterable):
        return list(obj)  # a generator: read once, kept for the second pass (BatchNorm reset)
    raise TypeError(f"{what} gave a {type(obj).__name__}; expected a DataLoader, a tensor or a list of batches")


def load_batches(batches: str, *, batch_size: int = 64, call_args: Sequence[Any] = ()) -> Sequence[Any]:
    """Re-iterable calibration batches from a reference or a tensor file.

    Raises:
        ValueError: the file holds several tensors and none named ``inputs``, or nothing.
        TypeError: the function returned something that is not batches.
    """
    path = Path(batches)
    if path.is_file():
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded: Any = load_file(str(path))
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        out = _from_loaded(loaded, batch_size, f"batches file {str(path)!r}")
    else:
        out = _from_loaded(_resolve(batches)(*call_args), batch_size, f"batches {batches!r}")
    if isinstance(out, (list, tuple)) and not out:
        raise ValueError(f"batches {batches!r} gave no batch")
    return out


def build_spec(spec: str, model: nn.Module) -> PermSpec:
    """The :class:`PermSpec` of ``spec`` (``module:function``, called with ``model`` if it takes an argument)."""
    fn = _resolve(spec)
    try:
        takes = bool(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        takes = True
    built = fn(model) if takes else fn()
    if not isinstance(built, PermSpec):
        raise TypeError(f"spec: {spec!r} returned a {type(built).__name__}, not a PermSpec")
    return built


def _shared(state: Mapping[str, Tensor], name: str, present: set[str]) -> bool:
    """True when ``name`` shares storage with a tensor in ``present`` (tied weights)."""
    ptr = state[name].data_ptr()
    return any(state[k].data_ptr() == ptr for k in present if k != name)


def check_fits(model: nn.Module, source: Any, label: str, model_ref: str) -> None:
    """Raise ``ValueError`` naming every missing, unexpected or mis-shaped tensor (metadata only).

    A name of the model missing from the file is accepted when it is tied to a name the
    file has (an output head sharing the embedding).
    """
    state = model.state_dict()
    keys = set(source.keys())
    missing = [k for k in state if k not in keys and not _shared(state, k, keys & set(state))]
    extra = sorted(keys - set(state))
    shapes = [
        f"{k}: model {list(state[k].shape)}, file {list(source.meta(k).shape)}"
        for k in state
        if k in keys and tuple(source.meta(k).shape) != tuple(state[k].shape)
    ]
    problems = []
    for what, items in (("missing", missing), ("unexpected", extra), ("shape", shapes)):
        if items:
            shown = ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")
            problems.append(f"{what}: {shown}")
    if problems:
        raise ValueError(
            f"{label} does not fit the architecture of model: {model_ref!r} ({'; '.join(problems)}); "
            "name the architecture the branches were trained with (or set prefix: on the branch)"
        )


def load_into(model: nn.Module, source: Any) -> nn.Module:
    """A copy of ``model`` holding ``source``'s weights (checked by :func:`check_fits` first)."""
    copied = copy.deepcopy(model)
    state = {k: source.get(k) for k in source.keys()}  # noqa: SIM118 - a WeightSource
    copied.load_state_dict(state, strict=False)
    return copied.eval()
