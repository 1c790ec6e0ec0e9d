"""Reading a YAML file with one-line errors that name the file (and the line, for a syntax error).

A configuration or fleet file is small and written by hand, so the reader refuses what no such file needs and
what would make a few hundred bytes cost gigabytes: aliases whose expansion exceeds `MAX_VALUES` values (a
"billion laughs"), a recursive alias, nesting deeper than `MAX_DEPTH`, a file over `MAX_BYTES`, and a key given
twice in one mapping (YAML would keep the last silently). A control character (a comment's included) is refused
with its line. An integer of any length is read (the settings that take one bound it and name their key), and
an error message shows a long one by its length.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

MAX_BYTES = 1024 * 1024
MAX_DEPTH = 32  # mappings and lists inside each other, aliases expanded
MAX_VALUES = 100_000  # scalars, lists and mappings in the document, aliases expanded
_SHOWN = 60  # characters of a value an error message shows at most


class _Refused(yaml.MarkedYAMLError):
    """A document the reader will not build, with the line where the problem is."""

    def __init__(self, problem: str, mark: Any) -> None:
        super().__init__(problem=problem, problem_mark=mark)


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader with the limits above, checked before any Python object is built."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(f"nested deeper than {MAX_DEPTH} levels", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_mapping_node(self, anchor: str | None) -> MappingNode:
        node = super().compose_mapping_node(anchor)
        first: dict[tuple[str, str], int] = {}
        for key, _ in node.value:
            if not isinstance(key, ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                continue
            ident = (key.tag, key.value)
            if ident in first:
                raise _Refused(f"duplicate key {show(key.value)} (first on line {first[ident]})", key.start_mark)
            first[ident] = key.start_mark.line + 1
        return node

    def construct_yaml_int(self, node: ScalarNode) -> int:
        """PyYAML's integer; a decimal one longer than Python converts from text (`sys.get_int_max_str_digits`)
        becomes a stand-in with as many digits: no setting takes a number that large, so only its size shows."""
        try:
            return super().construct_yaml_int(node)
        except ValueError:
            text = str(node.value).replace("_", "")
            return (-1 if text.startswith("-") else 1) * 10 ** len(text.lstrip("+-"))

    def compose_document(self) -> Node:
        node = super().compose_document()
        _expanded(node, 1, {}, set())
        return node


_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _BoundedLoader.construct_yaml_int)


def _expanded(node: Node, depth: int, known: dict[int, tuple[int, int]], open_: set[int]) -> tuple[int, int]:
    """(values, height) of `node` with its aliases expanded; _Refused past the limits or on a recursive alias.
    Each distinct node is measured once, so a bomb is refused after a few dozen steps."""
    if id(node) in known:
        values, height = known[id(node)]
    elif id(node) in open_:
        raise _Refused("an alias refers to a value that contains it", node.start_mark)
    else:
        open_.add(id(node))
        values, height = 1, 1
        if isinstance(node, (SequenceNode, MappingNode)):
            children = node.value if isinstance(node, SequenceNode) else [n for pair in node.value for n in pair]
            for child in children:
                child_values, child_height = _expanded(child, depth + 1, known, open_)
                values += child_values
                height = max(height, child_height + 1)
                if values > MAX_VALUES:
                    break
        open_.discard(id(node))
        known[id(node)] = values, height
    if values > MAX_VALUES:
        raise _Refused(f"aliases expand to more than {MAX_VALUES} values", node.start_mark)
    if depth - 1 + height > MAX_DEPTH:
        raise _Refused(f"aliases expand to nesting deeper than {MAX_DEPTH} levels", node.start_mark)
    return values, height


def show_key(key: Any) -> str:
    """How an error message names a key read from a file, in a path (`nodes[0].KEY`): a string key bare, cut
    like `show` cuts a value; any other key as `show` shows it."""
    if isinstance(key, str) and key.isprintable():  # a control character or lone surrogate: shown escaped
        return key if len(key) <= _SHOWN else key[:_SHOWN] + "…"
    return show(key)


def show(value: Any) -> str:
    """How an error message shows a value read from a file: its kind for a mapping or list, else its repr,
    cut to a few dozen characters (a value can be as long as the file)."""
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing"
    if isinstance(value, str) and len(value) > _SHOWN:
        return repr(value[:_SHOWN]) + "…"
    if isinstance(value, int) and value.bit_length() > _SHOWN * 3:  # repr() refuses past 4300 digits
        return f"a whole number of about {round(value.bit_length() * 0.30103)} digits"
    text = repr(value)
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "…"


def closest(value: Any, choices: Iterable[str]) -> str | None:
    """The choice a misspelt `value` was probably meant to be, for a did-you-mean; None for a long value
    (difflib's cost grows with the product of the lengths)."""
    if not isinstance(value, str) or len(value) > _SHOWN:
        return None
    found = difflib.get_close_matches(value, list(choices), n=1)
    return found[0] if found else None


def read_yaml(path: str | Path, source: str | None = None) -> Any:
    """The parsed document; ValueError `SOURCE: no such file`, `SOURCE: cannot read: …` or
    `SOURCE: line N: invalid YAML: …`. `source` is the name used in messages (default: the path)."""
    path = Path(path)
    source = source or str(path)
    try:
        with path.open("rb") as file:
            data = file.read(MAX_BYTES + 1)
        if len(data) > MAX_BYTES:
            raise ValueError(f"{source}: larger than {MAX_BYTES // 1024} KiB: refused")
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise ValueError(f"{source}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{source}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        loader = _BoundedLoader(text)
    except yaml.reader.ReaderError as exc:  # checked for the whole text before anything is parsed
        line = text.count("\n", 0, exc.position) + 1
        problem = f"control character U+{exc.character:04X} (only tab, line breaks and printable text are allowed)"
        raise ValueError(f"{source}: line {line}: invalid YAML: {problem}") from None
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        if len(problem) > 4 * _SHOWN:  # a tag or an alias name of any length is quoted whole by PyYAML
            problem = problem[: 4 * _SHOWN] + "…"
        raise ValueError(f"{source}: {where}invalid YAML: {problem}") from None
    finally:
        loader.dispose()
