"""Strict YAML for ``drm-merge`` configs: duplicate keys refused, every value's line known.

``yaml.safe_load`` keeps the last of two equal keys without a word (``method:`` given twice
silently merges with the second one). :func:`load_yaml` refuses that, naming both lines, and
returns with the data a :class:`Lines` lookup from a field path (as pydantic reports it:
``("branches", 1, "coefficient")``) to the line of the value in the file, so validation
errors can say where to look.

Hostile files are refused before they cost anything: :func:`read_config_text` reads only a
regular file (a FIFO would block the read forever) of at most :data:`MAX_CONFIG_BYTES`, and
the loader stops at :data:`MAX_ALIASES` aliases or :data:`MAX_EXPANDED_NODES` values with
every alias expanded (a 2 KB "billion laughs" would otherwise be validated as 10^9 values).

Example:
    >>> data, lines = load_yaml("method: drm\\nbranches:\\n  - {path: a, coefficient: 1}\\n")
    >>> lines.of(("branches", 0, "coefficient"))
    3
    >>> load_yaml("method: drm\\nmethod: ties\\n")
    Traceback (most recent call last):
    ...
    drm_lightning.config.yaml_file.StrictYAMLError: duplicate key 'method' (first at line 1)...
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

__all__ = [
    "MAX_ALIASES",
    "MAX_EXPANDED_NODES",
    "Lines",
    "StrictYAMLError",
    "load_yaml",
]

#: Most aliases (``*name``) in one document.
MAX_ALIASES = 1000
#: Most values (scalars, lists, mappings) of one document with every alias expanded.
MAX_EXPANDED_NODES = 100_000


class StrictYAMLError(yaml.constructor.ConstructorError):
    """A refusal of the strict loader (duplicate key, alias bomb); ``problem`` is the message."""


class _StrictLoader(yaml.SafeLoader):
    """``SafeLoader`` that refuses a key given twice in one mapping, and alias bombs.

    While composing it counts the aliases and the values the document would have with every
    alias expanded (an alias adds the whole value it names): a few nested anchors of ten
    aliases each make 10^9 values that validation would walk one by one.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._aliases = 0
        self._expanded = 0  # values composed so far, every alias counted as its whole value
        self._sizes: dict[int, int] = {}  # id(anchored node) -> its expanded size

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        if self.check_event(yaml.AliasEvent):  # type: ignore[no-untyped-call]
            mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
            node: Node = super().compose_node(parent, index)  # type: ignore[no-untyped-call]
            self._aliases += 1
            self._expanded += self._sizes.get(id(node), 1)  # 1: an alias of an enclosing value
            if self._aliases > MAX_ALIASES or self._expanded > MAX_EXPANDED_NODES:
                what = (
                    f"more than {MAX_ALIASES} in one document"
                    if self._aliases > MAX_ALIASES
                    else f"expanded, they would make more than {MAX_EXPANDED_NODES:,} values"
                )
                raise StrictYAMLError(
                    None,
                    None,
                    f"too many YAML aliases: {what} "
                    "(a config needs few; this looks like an alias bomb)",
                    mark,
                )
            return node
        anchored = self.peek_event().anchor is not None  # type: ignore[no-untyped-call]
        start = self._expanded
        node = super().compose_node(parent, index)  # type: ignore[no-untyped-call]
        self._expanded += 1
        if anchored:
            self._sizes[id(node)] = self._expanded - start
        return node

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader's own error follows
                continue
            if first is not None:
                raise StrictYAMLError(
                    None,
                    None,
                    f"duplicate key {key!r} (first at line {first + 1}); a key may appear once "
                    "per mapping, otherwise the last one would silently win",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


class Lines:
    """Line numbers (1-based) of the values of a composed YAML document."""

    def __init__(self, root: Node | None) -> None:
        self._root = root

    def of(self, loc: Sequence[str | int]) -> int | None:
        """The line of the value at ``loc``, or of its nearest enclosing value; None if unknown."""
        node = self._root
        line = None if node is None else node.start_mark.line + 1
        for part in loc:
            child = _child(node, part)
            if child is None:
                break
            node, line = child, child.start_mark.line + 1
        return line


def _child(node: Node | None, part: str | int) -> Node | None:
    if isinstance(node, MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, ScalarNode) and key_node.value == str(part):
                return value_node
    if isinstance(node, SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
        return node.value[part]
    return None


def load_yaml(text: str) -> tuple[Any, Lines]:
    """Parse ``text`` strictly; returns the data and its :class:`Lines`.

    Raises:
        yaml.YAMLError: invalid YAML; :class:`StrictYAMLError` for a duplicate key or an alias
            bomb (each with its ``problem_mark``).
    """
    data = yaml.load(text, Loader=_StrictLoader)
    return data, Lines(yaml.compose(text, Loader=yaml.SafeLoader))
