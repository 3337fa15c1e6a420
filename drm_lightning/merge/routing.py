"""Route every tensor of a model to the matrix path, the fallback path, or leave it alone.

Patterns are Python regular expressions matched with :func:`re.match` (anchored at the
start, as in the DRM reference). A tensor is

* ``"ignore"`` — kept at the base value bit for bit — if its name matches ``ignore``
  (task-specific heads, frozen buffers);
* ``"matrix"`` — merged by the method's matrix path (DRM's joint SVD) — if it is 2-D,
  matches ``include`` and matches no ``exclude`` pattern;
* ``"fallback"`` — everything else (biases, norms, conv kernels, embeddings, lm_head).

The default ``exclude`` list sends token/position embeddings and output heads of the usual
Hugging Face architectures (Llama, Mistral, Qwen, GPT-2, BERT, T5) to the fallback path:
their rows are vocabulary entries, not a linear map worth a joint basis.

``fused_qkv`` names matrices that stack Q, K and V along their rows (open_clip's and
``nn.MultiheadAttention``'s ``in_proj_weight``; the DRM reference's ``native_stacked_QKV``,
spec §3): a matrix-route tensor matching one is merged as three equal row blocks, each on
its own, and the results are stacked back (:meth:`Routing.row_blocks`).

Example:
    >>> r = Routing(ignore=[r"classifier\\."])
    >>> r.route("model.layers.0.self_attn.q_proj.weight", (64, 64))
    'matrix'
    >>> r.route("model.embed_tokens.weight", (128, 64))
    'fallback'
    >>> r.route("classifier.weight", (2, 64))
    'ignore'
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from drm_lightning.methods.base import Route

DEFAULT_INCLUDE: tuple[str, ...] = (r".*weight.*",)
DEFAULT_EXCLUDE: tuple[str, ...] = (
    r".*embed_tokens.*",
    r".*lm_head.*",
    r".*embed_positions.*",
    r".*word_embeddings.*",
    r".*position_embeddings.*",
    r".*token_type_embeddings.*",
    r".*wte\..*",
    r".*wpe\..*",
    r"(.*\.)?shared\.weight",
)


def _compile(patterns: Sequence[str], field_name: str) -> tuple[re.Pattern[str], ...]:
    compiled = []
    for i, pattern in enumerate(patterns):
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            raise ValueError(
                f"routing.{field_name}[{i}]: invalid regex {pattern!r}: {err}"
            ) from None
    return tuple(compiled)


@dataclass(frozen=True)
class Routing:
    """Name patterns that decide how each tensor is merged (see the module docstring)."""

    include: Sequence[str] = DEFAULT_INCLUDE
    exclude: Sequence[str] = DEFAULT_EXCLUDE
    ignore: Sequence[str] = ()
    fused_qkv: Sequence[str] = ()
    _compiled: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("include", "exclude", "ignore", "fused_qkv"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise TypeError(
                    f"routing.{name} must be a list of regexes, got the string {value!r}"
                )
            object.__setattr__(self, name, tuple(value))
        object.__setattr__(
            self,
            "_compiled",
            tuple(
                _compile(getattr(self, n), n) for n in ("include", "exclude", "ignore", "fused_qkv")
            ),
        )

    def route(self, name: str, shape: Sequence[int]) -> Route:
        """The path for tensor ``name`` of the given shape."""
        include, exclude, ignore, _ = self._compiled
        if any(p.match(name) for p in ignore):
            return "ignore"
        if (
            len(shape) == 2
            and any(p.match(name) for p in include)
            and not any(p.match(name) for p in exclude)
        ):
            return "matrix"
        return "fallback"

    def row_blocks(self, name: str, shape: Sequence[int]) -> int:
        """Number of row blocks merged separately: 3 for a fused-QKV matrix, else 1.

        Example:
            >>> Routing(fused_qkv=[r".*in_proj_weight"]).row_blocks("attn.in_proj_weight", (96, 32))
            3
        """
        if self.route(name, shape) != "matrix" or not any(p.match(name) for p in self._compiled[3]):
            return 1
        return 3

    def row_split_problem(self, name: str, shape: Sequence[int]) -> str | None:
        """Why ``name`` cannot be split into its row blocks, or ``None`` when it can."""
        blocks = self.row_blocks(name, shape)
        if blocks > 1 and int(shape[0]) % blocks:
            return (
                f"{name!r} matches routing.fused_qkv but its {shape[0]} rows do not split into "
                f"{blocks} equal blocks (Q, K, V); remove it from fused_qkv"
            )
        return None
