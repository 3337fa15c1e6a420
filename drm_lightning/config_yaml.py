"""Strict YAML for ``drm-merge`` configs: duplicate keys refused, every value's line known.

``yaml.safe_load`` keeps the last of two equal keys without a word (``method:`` given twice
silently merges with the second one). :func:`load_yaml` refuses that, naming both lines, and
returns with the data a :class:`Lines` lookup from a field path (as pydantic reports it:
``("branches", 1, "coefficient")``) to the line of the value in the file, so validation
errors can say where to look.

Example:
    >>> data, lines = load_yaml("method: drm\\nbranches:\\n  - {path: a, coefficient: 1}\\n")
    >>> lines.of(("branches", 0, "coefficient"))
    3
    >>> load_yaml("method: drm\\nmethod: ties\\n")
    Traceback (most recent call last):
    ...
    yaml.constructor.ConstructorError: duplicate key 'method' (first at line 1)...
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

__all__ = ["Lines", "load_yaml"]


class _StrictLoader(yaml.SafeLoader):
    """``SafeLoader`` that refuses a key given twice in one mapping."""

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
                raise yaml.constructor.ConstructorError(
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
        yaml.YAMLError: invalid YAML or a duplicate key (with its ``problem_mark``).
    """
    data = yaml.load(text, Loader=_StrictLoader)
    return data, Lines(yaml.compose(text, Loader=yaml.SafeLoader))
