"""Which functions a project has and which one serves a path: Vercel's filesystem routing.

Each ``api/**/*.py`` file is a function (files and folders starting with ``_`` or ``.`` are not).
``api/items/[itemId].py`` serves ``/api/items/<one segment>`` and receives the segment as the
query parameter ``itemId``; ``index.py`` serves its folder's path. Static segments win over
dynamic ones. vercel.json ``rewrites`` with a literal ``source`` apply after the filesystem, as
on Vercel; the function still sees the path the client asked for.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

DEFAULT_MAX_DURATION = 300.0
_APP_VARIABLES = ("app", "application", "handler")
_DYNAMIC = re.compile(r"^\[([A-Za-z_][A-Za-z0-9_]*)\]$")


@dataclass(frozen=True)
class FunctionSpec:
    """One function: an ``api/`` file and how to host it."""

    file: str  # project-relative POSIX path, e.g. "api/items/[itemId].py"
    entry: Path  # absolute path of the file
    module: str  # module name as `vercel dev` derives it, e.g. "api.items.[itemId]"
    variable: str  # the top-level app object: app, application or handler
    max_duration: float  # seconds, from vercel.json


@dataclass(frozen=True)
class Route:
    spec: FunctionSpec
    segments: tuple[str, ...]

    @property
    def sort_key(self) -> tuple[int, ...]:
        # Compared position by position: a static segment (0) beats a dynamic one (1).
        return tuple(1 if _DYNAMIC.match(s) else 0 for s in self.segments)

    def match(self, parts: list[str]) -> dict[str, str] | None:
        if len(parts) != len(self.segments):
            return None
        params: dict[str, str] = {}
        for segment, part in zip(self.segments, parts, strict=True):
            dynamic = _DYNAMIC.match(segment)
            if dynamic:
                params[dynamic.group(1)] = part
            elif segment != part:
                return None
        return params


class Router:
    def __init__(
        self, specs: list[FunctionSpec], rewrites: Mapping[str, str] | None = None
    ) -> None:
        routes = [Route(spec, _route_segments(spec.file)) for spec in specs]
        self.routes = sorted(routes, key=lambda r: (r.sort_key, r.segments))
        self.rewrites = dict(rewrites or {})

    def resolve(self, path: str) -> tuple[FunctionSpec, dict[str, str]] | None:
        resolved = self._match(path)
        if resolved is None and path in self.rewrites:
            resolved = self._match(self.rewrites[path])
        return resolved

    def _match(self, path: str) -> tuple[FunctionSpec, dict[str, str]] | None:
        parts = [part for part in path.split("/") if part]
        for route in self.routes:
            params = route.match(parts)
            if params is not None:
                return route.spec, params
        return None


def discover_functions(root: Path) -> list[FunctionSpec]:
    """Every function under ``root/api``, with its ``maxDuration`` from ``root/vercel.json``."""
    durations = _function_durations(root)
    specs = []
    for entry in sorted((root / "api").rglob("*.py")):
        rel = entry.relative_to(root)
        if any(part.startswith(("_", ".")) for part in rel.parts):
            continue
        file = rel.as_posix()
        specs.append(
            FunctionSpec(
                file=file,
                entry=entry.resolve(),
                module=file.removesuffix(".py").replace("/", "."),
                variable=_app_variable(entry),
                max_duration=_max_duration(file, durations),
            )
        )
    return specs


def discover_rewrites(root: Path) -> dict[str, str]:
    """``root/vercel.json``'s rewrites from one literal path to another (patterns are skipped)."""
    rules = _vercel_json(root).get("rewrites")
    rewrites: dict[str, str] = {}
    for rule in rules if isinstance(rules, list) else []:
        if not isinstance(rule, Mapping):
            continue
        source, destination = rule.get("source"), rule.get("destination")
        if _is_literal_path(source) and _is_literal_path(destination):
            rewrites[source] = destination
    return rewrites


def _is_literal_path(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and value.startswith("/") and not any(c in value for c in ":*(?[")


def _vercel_json(root: Path) -> Mapping[str, Any]:
    config_path = root / "vercel.json"
    if not config_path.is_file():
        return {}
    config: Any = json.loads(config_path.read_text(encoding="utf-8"))
    return config if isinstance(config, Mapping) else {}


def _route_segments(file: str) -> tuple[str, ...]:
    segments = file.removesuffix(".py").split("/")
    if segments[-1] == "index":
        segments.pop()
    return tuple(segments)


def _function_durations(root: Path) -> dict[str, float]:
    functions = _vercel_json(root).get("functions")
    if not isinstance(functions, Mapping):
        return {}
    return {
        str(pattern): float(options["maxDuration"])
        for pattern, options in functions.items()
        if isinstance(options, Mapping) and isinstance(options.get("maxDuration"), int | float)
    }


def _max_duration(file: str, durations: dict[str, float]) -> float:
    if file in durations:
        return durations[file]
    for pattern, seconds in durations.items():
        if _glob_regex(pattern).fullmatch(file):
            return seconds
    return DEFAULT_MAX_DURATION


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """A ``functions`` key as a regex: ``**/`` any folders, ``*`` and ``?`` within one segment.

    Brackets are literal, so keys such as ``api/quotes/[runId].py`` name that file.
    """
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def _app_variable(entry: Path) -> str:
    """The first of app / application / handler defined at the file's top level ("app" if none)."""
    try:
        tree = ast.parse(entry.read_text(encoding="utf-8"), filename=str(entry))
    except (SyntaxError, UnicodeDecodeError):
        return "app"  # the instance reports the real error when it imports the file
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.ImportFrom | ast.Import):
            names.update(alias.asname or alias.name.split(".")[0] for alias in node.names)
    return next((name for name in _APP_VARIABLES if name in names), "app")
