"""YAML/JSON files with the line of every key, for messages that name the file, the line and the
key (`path: line 7, fixed.lr: ...`). One reader for the sweep files (`pipeline.spec`) and the
single-run CLI's `--config` (`perl_core.train`). A `.json` file is read as JSON (a tab indent,
valid JSON, is no YAML); its key lines come from the YAML reading of the same text."""

from __future__ import annotations

import json
from typing import Any, Iterable

import yaml


class ConfigFileError(ValueError):
    """A config or sweep file is invalid; `problems` are (location, message) pairs, all at once."""

    what = "config file"

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source, self.problems = source, problems
        lines = [f"{source}: {loc}: {msg}" if loc else f"{source}: {msg}" for loc, msg in problems]
        head = f"invalid {self.what} ({len(problems)} problems):\n  " if len(problems) > 1 else ""
        super().__init__(head + "\n  ".join(lines))


def read_yaml(text: str, source: str) -> tuple[Any, dict[tuple, int]]:
    """Parse YAML (JSON for a `.json` source) -> (data, {key path: line}); syntax errors and
    duplicate keys raise ConfigFileError with the line."""
    if source.lower().endswith(".json"):
        return _read_json(text, source)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        msg = f"YAML syntax error: {e.problem or e}" + (f" ({e.context})" if e.context else "")
        raise ConfigFileError(source, [(where, msg)]) from None
    except yaml.YAMLError as e:
        raise ConfigFileError(source, [("", f"YAML error: {e}")]) from None
    lines: dict[tuple, int] = {}
    problems: list[tuple[tuple, str]] = []

    def walk(n: Any, path: tuple) -> None:
        if isinstance(n, yaml.MappingNode):
            seen: set = set()
            for k, v in n.value:
                key = k.value
                lines.setdefault(path + (key,), k.start_mark.line + 1)
                if key in seen:
                    problems.append((path + (key,), f"duplicate key {key!r} (line "
                                                     f"{k.start_mark.line + 1})"))
                seen.add(key)
                walk(v, path + (key,))
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                lines[path + (i,)] = v.start_mark.line + 1
                walk(v, path + (i,))

    if node is not None:
        walk(node, ())
    if problems:
        where = Locator(lines)
        raise ConfigFileError(source, [(where(p), m) for p, m in problems])
    return raw, lines


def _read_json(text: str, source: str) -> tuple[Any, dict[tuple, int]]:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigFileError(source, [(f"line {e.lineno}, column {e.colno}",
                                        f"JSON syntax error: {e.msg}")]) from None
    # JSON allows tabs between tokens (YAML does not), and a raw tab inside a JSON string is
    # an error already: as spaces, the same text gives the lines (and duplicate keys) as YAML
    try:
        _, lines = read_yaml(text.replace("\t", " "), source + ".yaml")
    except ConfigFileError as e:
        if any(m.startswith("duplicate key") for _, m in e.problems):
            raise ConfigFileError(source, e.problems) from None
        lines = {}  # (JSON that PyYAML reads otherwise: the messages name keys without lines)
    return raw, lines


class Locator:
    """Key path -> 'line N, a.b[2]' using the nearest known line of the path or a parent; a line
    from another file (a `base:` include) is (file, line) and is named with that file."""

    def __init__(self, lines: dict[tuple, Any]):
        self.lines = lines

    def __call__(self, path: tuple) -> str:
        dotted = format_path(path)
        for n in range(len(path), 0, -1):
            at = self.lines.get(path[:n])
            if at is None:
                continue
            if isinstance(at, tuple):  # (file, line) of an included file, or ("--set", "")
                return f"{at[0]}" + (f" line {at[1]}" if at[1] else "") + f", {dotted}"
            return f"line {at}, {dotted}"
        return dotted


def format_path(path: Iterable) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out
