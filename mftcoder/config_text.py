"""Config text read safely: YAML (YAML 1.2 booleans; alias bombs, recursive aliases, deep nesting and duplicate keys
refused before anything is built) and JSON (duplicate keys, deep nesting), each refusal with its line; bounded
reprs of values for error messages; ConfigError, a config problem (defined here, below every module that checks a
config, and imported through mftcoder.config)."""

from __future__ import annotations

import json
import re
import reprlib
from typing import Any

import yaml


class _Loader(yaml.SafeLoader):
    """YAML 1.2-style booleans: only true/false, so `evaluation_strategy: no` stays the string 'no'."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


MAX_YAML_VALUES = 100_000  # nodes a config may expand to (aliases counted each time they are used)
MAX_YAML_DEPTH = 50  # lists and mappings nested in each other


class ConfigError(ValueError):
    """A config problem a user can fix; the message names the key."""


class YamlProblem(ValueError):
    """A YAML text this project refuses before building it: `line` (1-based, or None) and the reason."""

    def __init__(self, line: int | None, reason: str):
        super().__init__(reason)
        self.line, self.reason = line, reason

    def at(self, where: str) -> str:
        """The message with its location: 'file:line: reason' (or 'where: reason' without a line)."""
        return f"{where}:{self.line}: {self.reason}" if self.line else f"{where}: {self.reason}"


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _check_duplicates(node: yaml.MappingNode) -> None:
    seen: dict[str, int] = {}
    for key, _ in node.value:
        if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
            if key.value in seen:
                raise YamlProblem(key.start_mark.line + 1, f"duplicate key {brief(key.value)} (first at line "
                                                           f"{seen[key.value]}); keep one of them")
            seen[key.value] = key.start_mark.line + 1


def _expanded_size(root: yaml.Node, sizes: dict[int, int], cap: int) -> int:
    """Nodes `root` expands to (capped at cap + 1), each alias counted where it is used; iterative, shared
    nodes sized once, so an alias bomb costs its written size. Refuses recursive aliases and duplicate keys."""
    stack, open_nodes = [(root, False)], set()
    while stack:
        node, finished = stack.pop()
        if id(node) in sizes:
            continue
        if finished:
            open_nodes.discard(id(node))
            sizes[id(node)] = min(cap + 1, 1 + sum(sizes[id(child)] for child in _children(node)))
            continue
        if id(node) in open_nodes:
            raise YamlProblem(node.start_mark.line + 1, "a YAML alias refers to a value that contains it (recursive)")
        if isinstance(node, yaml.MappingNode):
            _check_duplicates(node)
        open_nodes.add(id(node))
        stack.append((node, True))
        stack += [(child, False) for child in _children(node) if id(child) not in sizes]
    return sizes[id(root)]


def _check_yaml_nodes(root: yaml.Node) -> None:
    """Refuse, before anything is built from it, a document with duplicate keys, recursive aliases or a value
    that expands past MAX_YAML_VALUES nodes (an alias bomb)."""
    sizes: dict[int, int] = {}
    pairs = root.value if isinstance(root, yaml.MappingNode) else [(None, root)]
    for key, value in pairs:
        if _expanded_size(value, sizes, MAX_YAML_VALUES) > MAX_YAML_VALUES:
            name = f"key {brief(key.value)}" if isinstance(key, yaml.ScalarNode) else "the value"
            line = (key or value).start_mark.line + 1
            raise YamlProblem(line, f"{name} expands to more than {MAX_YAML_VALUES:,} values (nested YAML aliases?); "
                                    "write the value out")
    if isinstance(root, yaml.MappingNode):
        _expanded_size(root, sizes, MAX_YAML_VALUES)


def read_yaml(text: str) -> Any:
    """Parse YAML text (YamlProblem or yaml.YAMLError for what is refused), checking its nodes before building them."""
    depth = 0
    for event in yaml.parse(text, Loader=_Loader):  # the event parser is iterative; the node composer recurses
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise YamlProblem(event.start_mark.line + 1, f"nested more than {MAX_YAML_DEPTH} levels deep")
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            depth -= 1
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_yaml_nodes(node)
        return loader.construct_document(node)
    except RecursionError:
        raise YamlProblem(None, "nested too deeply") from None
    except YamlProblem:
        raise
    except ValueError as exc:  # a value the constructor cannot make: a 5000-digit integer, the date 2001-13-45
        raise YamlProblem(None, f"cannot read a value: {str(exc).split(';')[0]}") from None
    finally:
        loader.dispose()


def yaml_error(exc: yaml.YAMLError) -> YamlProblem:
    """A PyYAML error as one line: its problem and where (PyYAML's own text spans several lines)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return YamlProblem(mark.line + 1 if mark else None, f"not valid YAML: {problem}")


def brief(value: Any, limit: int = 60) -> str:
    """A bounded repr of a value for an error message: long strings, lists, mappings and numbers are cut."""
    shown = reprlib.Repr()
    shown.maxstring = shown.maxother = shown.maxlong = limit
    shown.maxlist = shown.maxtuple = shown.maxdict = shown.maxset = 6
    shown.maxlevel = 3
    try:
        text = shown.repr(value)
    except ValueError:  # an integer too long to print (over 4300 digits)
        return f"<a {value.bit_length()}-bit integer>" if isinstance(value, int) else f"<{type(value).__name__}>"
    return text if len(text) <= 4 * limit else text[:4 * limit] + "..."  # nested lists: 6 x 6 x 6 items otherwise


def read_json(text: str) -> Any:
    """Parse a JSON config (YamlProblem for what is refused: invalid JSON, duplicate keys, deep nesting)."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
        seen = set()
        for key, _ in pairs:
            if key in seen:
                spelled = re.escape(json.dumps(key)) + r"\s*:"
                places = [m.start() for m in re.finditer(spelled, text)]
                line = text.count("\n", 0, places[1]) + 1 if len(places) > 1 else None
                raise YamlProblem(line, f"duplicate key {brief(key)}; keep one of them")
            seen.add(key)
        return dict(pairs)

    try:
        return json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as exc:
        raise YamlProblem(exc.lineno, f"not valid JSON: {exc.msg} (column {exc.colno})") from None
    except RecursionError:
        raise YamlProblem(None, "not valid JSON: nested too deeply") from None
    except YamlProblem:
        raise
    except ValueError as exc:  # an integer of over 4300 digits
        raise YamlProblem(None, f"not valid JSON: {str(exc).split(';')[0]}") from None
