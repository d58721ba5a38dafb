"""YAML files whose errors name the line and the field (qanat.yaml, guardrails files): the document as plain
data plus each value's line, kept by its path from the YAML node tree."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from qanat.config import ConfigError

Lines = dict[tuple[str | int, ...], int]  # a value's path in the document -> its line (1-based)


def read_yaml(path: Path) -> tuple[Any, Lines]:
    """The document as plain data (None when empty) and its lines; ConfigError when unreadable or not YAML."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it: {e.strerror}") from e
    try:
        node = yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from e
    lines: Lines = {}
    return (_to_python(node, (), lines) if node is not None else None), lines


def _to_python(node: yaml.Node, path: tuple[str | int, ...], lines: Lines) -> Any:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            out[key] = _to_python(value_node, (*path, key), lines)
            lines[(*path, key)] = key_node.start_mark.line + 1  # the key's line, for errors about it
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_to_python(item, (*path, i), lines) for i, item in enumerate(node.value)]
    return yaml.safe_load(yaml.serialize(node))  # a scalar, typed as YAML types it


def line_of(loc: tuple[Any, ...], lines: Lines) -> int:
    """The line of the deepest part of `loc` that the file has (a missing field: its parent's line)."""
    for n in range(len(loc), -1, -1):
        key = tuple(p for p in loc[:n] if not isinstance(p, str) or not p.startswith("function-"))
        if key in lines:
            return lines[key]
    return 1


def field_name(loc: tuple[Any, ...]) -> str:
    """A pydantic error location as the user wrote it: `models[0].replicas[1].parallel`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and not part.startswith("function-"):
            out += f".{part}" if out else part
    return out
