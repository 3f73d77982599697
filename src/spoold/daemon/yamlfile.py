"""YAML loading that remembers the line of every key, so config errors can name it."""

from __future__ import annotations

from typing import Any

import yaml

from spoold.errors import ConfigError
from spoold.options import YamlPath, format_path


def load_yaml(text: str, file: str) -> tuple[Any, dict[YamlPath, int]]:
    """Parse `text` into plain data plus a map from YAML path to 1-based line number."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        raise ConfigError(f"malformed YAML: {exc.problem or exc.context}", file=file, line=line) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"malformed YAML: {exc}", file=file) from None
    lines: dict[YamlPath, int] = {}
    if node is None:
        return None, lines
    return _to_data(node, (), lines, file), lines


def _to_data(node: yaml.Node, path: YamlPath, lines: dict[YamlPath, int], file: str) -> Any:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = _scalar(key_node, file)
            child: YamlPath = (*path, str(key))
            if key in result:
                raise ConfigError(f"duplicate key {key!r}", file=file, path=format_path(child),
                                  line=key_node.start_mark.line + 1)  # fmt: skip
            result[key] = _to_data(value_node, child, lines, file)
            lines[child] = key_node.start_mark.line + 1
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_to_data(item, (*path, i), lines, file) for i, item in enumerate(node.value)]
    return _scalar(node, file)


def _scalar(node: yaml.Node, file: str) -> Any:
    if not isinstance(node, yaml.ScalarNode):
        raise ConfigError("a key must be a plain value", file=file, line=node.start_mark.line + 1)
    try:
        return yaml.SafeLoader("").construct_object(node)
    except yaml.YAMLError as exc:
        raise ConfigError(f"bad value: {exc}", file=file, line=node.start_mark.line + 1) from None
