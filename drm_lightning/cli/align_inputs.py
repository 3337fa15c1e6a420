"""What a config-driven alignment reads besides weights: architecture, calibration batches, spec.

* :func:`build_model` — ``module:function`` returning an ``nn.Module``, or a folder with a
  transformers ``config.json`` (the class named by its ``architectures``, else ``AutoModel``,
  built with ``from_config``: random weights, no download);
* :func:`load_batches` — ``module:function`` returning a DataLoader, a tensor or a list of
  batches, or a ``.safetensors`` / ``.pt`` file (loaded weights-only) holding one tensor (or
  ``inputs``), split into batches of ``batch_size`` rows; with ``model=`` the first batch's
  dtype is checked against the model's first layer (:func:`check_input_dtype`), before any
  tracing;
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

import contextlib
import copy
import inspect
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from drm_lightning.alignment.activations import default_forward
from drm_lightning.alignment.spec import PermSpec
from drm_lightning.config.align import resolve_callable

__all__ = [
    "build_model",
    "build_spec",
    "check_fits",
    "check_input_dtype",
    "load_batches",
    "load_into",
]

_EXACT_DTYPE = (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd)  # input dtype == weight dtype
_FLOATING = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)  # any floating input
_INDICES = (nn.Embedding, nn.EmbeddingBag)  # integer indices


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
        built = resolve_callable(model)()
    if not isinstance(built, nn.Module):
        raise TypeError(
            f"model: {model!r} returned a {type(built).__name__}, not a torch.nn.Module"
        )
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
        raise ValueError(
            f"{what} holds {sorted(tensors)}: keep one tensor, or name the inputs 'inputs'"
        )
    if isinstance(obj, (torch.utils.data.DataLoader, list, tuple)):
        return obj  # type: ignore[return-value]
    if isinstance(obj, Iterable):
        return list(obj)  # a generator: read once, kept for the second pass (BatchNorm reset)
    raise TypeError(
        f"{what} gave a {type(obj).__name__}; expected a DataLoader, a tensor or a list of batches"
    )


def load_batches(
    batches: str,
    *,
    batch_size: int = 64,
    call_args: Sequence[Any] = (),
    model: nn.Module | None = None,
) -> Sequence[Any]:
    """Re-iterable calibration batches from a reference or a tensor file.

    With ``model``, the first batch is checked to fit its input dtype (:func:`check_input_dtype`).

    Raises:
        ValueError: the file holds several tensors and none named ``inputs``, or nothing; the
            batches' dtype is not what ``model``'s first layer takes.
        TypeError: the function returned something that is not batches.
    """
    path = Path(batches)
    if path.is_file():
        if path.suffix == ".safetensors":
            loaded: Any = load_file(str(path))
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        what = f"batches file {str(path)!r}"
        out = _from_loaded(loaded, batch_size, what)
    else:
        what = f"batches {batches!r}"
        out = _from_loaded(resolve_callable(batches)(*call_args), batch_size, what)
    if isinstance(out, (list, tuple)) and not out:
        raise ValueError(f"batches {batches!r} gave no batch")
    if model is not None:
        check_input_dtype(model, next(iter(out)), what)
    return out


class _Reached(Exception):
    """Stops the probe forward of :func:`check_input_dtype` at the first layer."""


def _tensors(inputs: Any) -> list[Tensor]:
    if isinstance(inputs, Tensor):
        return [inputs]
    if isinstance(inputs, Mapping):
        return [v for v in inputs.values() if isinstance(v, Tensor)]
    if isinstance(inputs, (tuple, list)):
        return [v for v in inputs if isinstance(v, Tensor)]
    return []


def check_input_dtype(model: nn.Module, batch: Any, what: str) -> None:
    """Refuse a batch whose dtype the model's first layer cannot take (an int tensor into a
    ``Linear``, ``float32`` into a ``float64`` model, floats into an ``Embedding``).

    The model runs on ``batch`` (fed as
    :func:`~drm_lightning.alignment.activations.default_forward` does) only up to its first
    ``Linear``/``Conv``/norm/``Embedding`` layer: a forward pre-hook stops it there. Only a
    layer that receives a tensor of the batch itself is checked, so a model that converts its
    input first is never refused; any other failure of the forward is left to the alignment,
    which reports it.

    Raises:
        ValueError: naming ``what`` (the batches file or function), the layer, the batch's dtype
            and the dtype expected.

    Example:
        >>> check_input_dtype(nn.Linear(3, 2), torch.ones(4, 3), "batches 'x'")
        >>> check_input_dtype(nn.Linear(3, 2), torch.ones(4, 3, dtype=torch.long), "batches 'x'")
        Traceback (most recent call last):
        ...
        ValueError: batches 'x': the calibration batch is torch.int64, but the model's first...
    """
    inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
    ids = {id(t) for t in _tensors(inputs)}
    layers = (*_EXACT_DTYPE, *_FLOATING, *_INDICES)
    names = {m: n for n, m in model.named_modules() if isinstance(m, layers)}
    problem: list[str] = []

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        given = next((a for a in (*args, *kwargs.values()) if id(a) in ids), None)
        if isinstance(given, Tensor):
            expected = _expected(module, given.dtype)
            if expected is not None:
                takes, target = expected
                name, kind = names[module], type(module).__name__
                layer = f"{name} ({kind})" if name else f"(the model itself, a {kind})"
                floats = target.is_floating_point and given.dtype.is_floating_point
                problem.append(
                    f"{what}: the calibration batch is {given.dtype}, but the model's first layer "
                    f"{layer} takes {takes}; convert the batches to {target}"
                    + (f" or build the model in {given.dtype}" if floats else "")
                )
        raise _Reached

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in names]
    try:  # _Reached, or a failure that is not this check's: the alignment reports it
        with contextlib.suppress(Exception), torch.no_grad():
            default_forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    if problem:
        raise ValueError(problem[0])


def _expected(module: nn.Module, given: torch.dtype) -> tuple[str, torch.dtype] | None:
    """What ``module`` takes instead of ``given`` and the dtype to convert to; ``None``: it fits."""
    if isinstance(module, _INDICES):
        if given.is_floating_point or given.is_complex or given == torch.bool:
            return "integer indices", torch.int64
        return None
    weight = next((p for p in module.parameters(recurse=False) if p.is_floating_point()), None)
    dtype = weight.dtype if weight is not None else torch.get_default_dtype()
    if not given.is_floating_point:
        return f"floating-point inputs ({dtype}, the dtype of its weight)", dtype
    if isinstance(module, _EXACT_DTYPE) and given != dtype:
        return f"{dtype} inputs (the dtype of its weight)", dtype
    return None


def build_spec(spec: str, model: nn.Module) -> PermSpec:
    """The :class:`PermSpec` of ``spec`` (``module:function``, called with ``model`` if it takes
    an argument)."""
    fn = resolve_callable(spec)
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
            f"{label} does not fit the architecture of model: {model_ref!r} "
            f"({'; '.join(problems)}); "
            "name the architecture the branches were trained with (or set prefix: on the branch)"
        )


def load_into(model: nn.Module, source: Any) -> nn.Module:
    """A copy of ``model`` holding ``source``'s weights (checked by :func:`check_fits` first)."""
    copied = copy.deepcopy(model)
    state = {k: source.get(k) for k in source.keys()}  # noqa: SIM118 - a WeightSource
    copied.load_state_dict(state, strict=False)
    return copied.eval()
