"""What drm_lightning trusts in its inputs: tensors yes, code no (unless asked by name).

A pickled checkpoint (``.ckpt``, ``.bin``, ``.pt``, ``.pth``) can run any code when it is
unpickled. Every reader therefore loads pickles with ``torch.load(..., weights_only=True)``,
which accepts tensors, numbers, strings and plain containers only. A file that needs more
(a custom hyper-parameters class, an ``os.system`` planted by an attacker) is refused with
:class:`UntrustedPickleError` unless the caller opted in by name:

* ``drm-merge ... --trust-pickles`` on the command line,
* ``MergeCallback(..., trust_pickles=True)``, ``BranchedModule.load_from_checkpoint(...,
  trust_pickles=True)``,
* ``open_source(path, trust_pickles=True)`` and the readers' ``trust_pickles=True``.

Opting in is the user's act, never a field of a file they were sent: a config file that
sets ``trust_pickles:`` is refused (:func:`drm_lightning.config.parse_config`).

Safetensors files never run code and need no opt-in.

Example:
    >>> err = UntrustedPickleError("ckpt.ckpt", "Unsupported global: GLOBAL __main__.Evil")
    >>> "--trust-pickles" in str(err) and "safetensors" in str(err)
    True
"""

from __future__ import annotations

import os

__all__ = ["TRUST_OPT_IN", "UntrustedPickleError"]

_BOILERPLATE = (
    "weights only load failed",
    "please file an issue",
    "check the documentation",
    "(1) in pytorch 2.6",  # torch >= 2.6: the two ways to load, before the line naming the object
    "(2) alternatively",
)

TRUST_OPT_IN = (
    "--trust-pickles on the drm-merge command line, or trust_pickles=True in your own code "
    "(MergeCallback, open_source, BranchedModule.load_from_checkpoint)"
)
"""How to opt in to full unpickling, named in every refusal."""

SAFE_FORMATS = (
    "safetensors files and HF folders, and torch/Lightning checkpoints that hold only tensors, "
    "numbers, strings and plain containers (weights-only) load without it"
)


class UntrustedPickleError(ValueError):
    """A pickle that needs full unpickling (it could run code), refused by default.

    Args:
        path: the file.
        reason: what ``torch.load(weights_only=True)`` objected to (first line is kept).
        note: a sentence added at the end (what the file is, when known).
    """

    def __init__(self, path: str | os.PathLike[str], reason: str, *, note: str = "") -> None:
        self.path = str(path)
        first = _essence(reason) or "Python objects other than tensors"
        super().__init__(
            f"{self.path} holds Python objects other than tensors ({first}); loading it needs "
            "full unpickling, which can run code from the file, so it was refused. If you "
            f"trust this file, pass {TRUST_OPT_IN}. {SAFE_FORMATS[0].upper()}{SAFE_FORMATS[1:]}; "
            "converting the checkpoint to safetensors avoids the question"
            + (f". {note}" if note else "")
        )


def _essence(reason: str) -> str:
    """The line of torch's weights-only error that names the object, without its boilerplate."""
    lines = [
        line.strip().removeprefix("WeightsUnpickler error:").strip() for line in reason.splitlines()
    ]
    useful = [line for line in lines if line and not line.lower().startswith(_BOILERPLATE)]
    return "; ".join(useful)[:300]
