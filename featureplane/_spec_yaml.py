"""Reading one spec file as YAML, in bounded time and memory whatever it holds.

`read_yaml(file)` returns the document, the line of every mapping key and
list item, and the problems that do not stop the reading (a duplicate key),
or raises `SpecError` with one problem located at the line where reading
stopped. A spec is small and shallow (a group is ~30 nodes, 6 levels
deep), so the limits below refuse only hostile or broken files, before they
cost anything: PyYAML alone spent 3 GB and then raised MemoryError on a
billion-laughs alias bomb, and RecursionError on 5,000-deep nesting.

Events come from libyaml (`CParser`, in PyYAML's wheels); the nodes are
composed in Python by a `Composer` subclass that counts every node as it is
made, an alias counting as all the nodes it stands for, so a bomb is refused
after a few hundred events. Only PyYAML's safe constructor runs (no
`!!python/...` tags).
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from yaml._yaml import CParser
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.resolver import Resolver

from featureplane.errors import SpecError, SpecProblem, quote

__all__ = ["MAX_DEPTH", "MAX_FILE_BYTES", "MAX_NODES", "Document", "field_of", "read_yaml"]

MAX_FILE_BYTES = 4 << 20
"""A larger spec file is refused unread (a group takes ~300 bytes)."""
MAX_NODES = 50_000
"""YAML nodes per file, aliases counted expanded: ~1,500 groups of ~33 nodes. Composing
100k nodes took 1.2-1.5 s on a busy 2-core machine; 50k keeps `validate` of a hostile
file under 2 s with start-up. A larger catalog is split into several files."""
MAX_DEPTH = 32
"""Levels of nesting per file, aliases counted expanded (a spec needs 6)."""


class _Refused(yaml.MarkedYAMLError):
    def __init__(self, problem: str, mark: Any) -> None:
        super().__init__(problem=problem, problem_mark=mark)


class _Loader(Composer, CParser, SafeConstructor, Resolver):
    """libyaml's events, composed in Python with a budget of nodes and depth."""

    def __init__(self, text: str) -> None:
        CParser.__init__(self, text)
        Composer.__init__(self)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)
        self.nodes = 0  # composed so far, expanded
        self.level = 0  # of the node being composed; the root is 1
        self.deepest = 0  # deepest level reached under the node being composed
        self.shapes: dict[str, tuple[int, int]] = {}  # anchor -> (nodes, height), once composed
        self.duplicates: dict[int, list[tuple[ScalarNode, int, bool]]] = {}  # id -> keys

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        event: Any = self.peek_event()
        level = self.level + 1
        if isinstance(event, yaml.AliasEvent):
            anchor = str(event.anchor)
            if anchor in self.anchors and anchor not in self.shapes:
                raise _Refused(f"alias *{anchor[:60]} is inside its own node", event.start_mark)
            nodes, height = self.shapes.get(anchor, (0, 1))  # undefined: the composer says so
            self._count(nodes, level + height - 1, event.start_mark)
            return super().compose_node(parent, index)
        before, deepest = self.nodes, self.deepest
        self._count(1, level, event.start_mark)
        self.level, self.deepest = level, level
        node = super().compose_node(parent, index)
        if event.anchor is not None:
            self.shapes[event.anchor] = (self.nodes - before, self.deepest - level + 1)
        self.level, self.deepest = level - 1, max(deepest, self.deepest)
        return node

    def _count(self, nodes: int, level: int, mark: Any) -> None:
        self.nodes += nodes
        if level > self.deepest:
            self.deepest = level
        if level > MAX_DEPTH:
            raise _Refused(f"nested more than {MAX_DEPTH} levels deep", mark)
        if self.nodes > MAX_NODES:
            raise _Refused(
                f"more than {MAX_NODES:,} YAML nodes (aliases counted expanded); "
                "split the spec into several files",
                mark,
            )

    def compose_mapping_node(self, anchor: Any) -> MappingNode:
        node = super().compose_mapping_node(anchor)
        seen: dict[tuple[str, str], int] = {}  # (tag, text) -> index in kept
        kept: list[tuple[Node, Node]] = []
        dropped: list[tuple[ScalarNode, int, bool]] = []
        for key, value in node.value:
            if not isinstance(key, ScalarNode):
                kept.append((key, value))
            elif (at := seen.get((key.tag, key.value))) is None:
                seen[key.tag, key.value] = len(kept)
                kept.append((key, value))
            else:
                # The first one counts. A top-level list given twice (two `feature_groups:`
                # in files pasted together) is read as one, so its entries are checked too.
                first_key, first = kept[at]
                merge = self.level == 1 and all(isinstance(v, SequenceNode) for v in (first, value))
                if merge:
                    items = first.value + value.value
                    kept[at] = first_key, SequenceNode(first.tag, items, first.start_mark)
                dropped.append((key, first_key.start_mark.line + 1, merge))
        if dropped:  # reported where the walk finds them, with their path
            node.value = kept
            self.duplicates[id(node)] = dropped
        return node

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except Exception as exc:  # PyYAML's constructors on hostile scalars: 2024-13-45 and an
            # int of 5,000 digits (ValueError), `!!bool maybe` (KeyError), `!!timestamp x`
            # (AttributeError)
            detail = f": {exc}" if isinstance(exc, ValueError) else ""
            tag = node.tag.rsplit(":", 1)[-1]
            raise _Refused(f"not a valid {tag}{detail}", node.start_mark) from None


@dataclass(frozen=True, slots=True)
class Document:
    """One spec file as read: its data, where each part is, and what reading found wrong."""

    data: Any
    """The document's value, None for an empty file."""
    lines: dict[tuple[Any, ...], int]
    """Path in the document (keys and list indexes) -> its line, 1-based."""
    problems: list[SpecProblem]
    """Problems that did not stop the reading (a duplicate key: the first one counts)."""


def read_yaml(file: Path) -> Document:
    """Parse one YAML file and record the line (1-based) of every mapping key and list item.

    A problem that leaves the document's meaning clear (a duplicate key) is returned with it;
    one that does not (bad syntax, a budget exceeded) raises `SpecError`.
    """
    name = str(file)
    text = _read_text(file)
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        data = None if node is None else loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise SpecError([SpecProblem(name, _line(exc, text), "-", _yaml_message(exc))]) from None
    finally:
        loader.dispose()
    if node is None:
        return Document(None, {}, [])
    lines: dict[tuple[Any, ...], int] = {(): node.start_mark.line + 1}
    problems: list[SpecProblem] = []

    def walk(n: Node, path: tuple[Any, ...]) -> None:  # depth <= MAX_DEPTH
        if isinstance(n, MappingNode):
            # Popped: a mapping reached again through an alias is reported once.
            for k, first, merged in loader.duplicates.pop(id(n), ()):
                where = field_of((*path, k.value))
                message = f"duplicate key (first at line {first})"
                if merged:
                    message += "; its items are checked as if they followed the first's"
                problems.append(SpecProblem(name, k.start_mark.line + 1, where, message))
            for k, v in n.value:
                key = (*path, k.value if isinstance(k, ScalarNode) else None)
                lines[key] = k.start_mark.line + 1
                walk(v, key)
        elif isinstance(n, SequenceNode):
            for i, v in enumerate(n.value):
                lines[(*path, i)] = v.start_mark.line + 1
                walk(v, (*path, i))

    walk(node, ())
    return Document(data, lines, problems)


def field_of(path: tuple[Any, ...]) -> str:
    """A path in a document as a problem names it: `feature_groups[0].ttl.soft`, `-` for none.

    Keys are quoted when they are not short text: a key can be anything (100 KB long, a
    list), and a problem line stays short whatever the file holds.
    """
    out = ""
    for part in path:
        if not isinstance(part, int):
            part = part if isinstance(part, str) and len(part) <= 60 else quote(part, 60)
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "-"


def _read_text(file: Path) -> str:
    def refuse(line: int, message: str) -> SpecError:
        return SpecError([SpecProblem(str(file), line, "-", message)])

    try:
        if not stat.S_ISREG(file.stat().st_mode):  # a FIFO or a device would never end
            raise refuse(1, "not a regular file")
        with file.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:  # unreadable, a dangling symlink, a symlink loop
        raise refuse(1, f"cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise refuse(1, f"larger than {MAX_FILE_BYTES >> 20} MiB; split the spec into files")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise refuse(line, f"not UTF-8 text (byte 0x{raw[exc.start]:02x})") from None


def _line(exc: yaml.YAMLError, text: str) -> int:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if mark is not None:
        return int(mark.line) + 1
    position = getattr(exc, "position", None)  # a ReaderError: a control character
    return text.count("\n", 0, position) + 1 if isinstance(position, int) else 1


def _yaml_message(exc: yaml.YAMLError) -> str:
    if isinstance(exc, _Refused):
        text = str(exc.problem)
    else:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        context, mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if context and mark is not None:  # "while scanning a quoted scalar (line 3): ..."
            problem = f"{context} (line {mark.line + 1}): {problem}"
        text = f"not valid YAML: {problem}"
    return text if len(text) <= 200 else text[:197] + "..."  # it may quote an anchor, a tag
