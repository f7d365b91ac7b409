"""What the KV store and admission share to talk to Upstash Redis: Lua scripts declared as named
data.

A script names its KEYS and ARGV at its top, generated from its declaration here, so Python
passes them by name and the two sides cannot disagree on a position. Every script opens with
`#!lua flags=allow-key-locking`: without it Upstash runs a script under the database-wide lock;
with it every key the script touches must be passed in KEYS (and is).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

KEY_LOCKING = "#!lua flags=allow-key-locking"


@dataclass(frozen=True)
class LuaScript:
    """A script with named keys and arguments. `more_keys`/`more_args`: the name of a Lua table
    holding the KEYS/ARGV after the named ones. `returns` says what it answers, in words."""

    name: str
    keys: tuple[str, ...]
    args: tuple[str, ...]
    body: str
    returns: str
    more_keys: str | None = None
    more_args: str | None = None
    source: str = field(init=False, repr=False)
    sha: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        lines = [KEY_LOCKING]
        lines += [f"local {key} = KEYS[{i}]" for i, key in enumerate(self.keys, 1)]
        if self.more_keys:
            lines.append(f"local {self.more_keys} = {{unpack(KEYS, {len(self.keys) + 1})}}")
        lines += [f"local {arg} = ARGV[{i}]" for i, arg in enumerate(self.args, 1)]
        if self.more_args:
            lines.append(f"local {self.more_args} = {{unpack(ARGV, {len(self.args) + 1})}}")
        source = "\n".join(lines) + "\n" + self.body.strip() + "\n"
        object.__setattr__(self, "source", source)
        object.__setattr__(self, "sha", hashlib.sha1(source.encode()).hexdigest())

    def bind(
        self,
        keys: Mapping[str, str | None],
        args: Mapping[str, str | None],
        *,
        more_keys: Sequence[str] = (),
        more_args: Sequence[str] = (),
    ) -> tuple[list[str], list[str]]:
        """KEYS and ARGV in the script's order; a trailing None (an optional key or argument)
        is left out, so the script sees it as nil."""
        if (more_keys and not self.more_keys) or (more_args and not self.more_args):
            raise ValueError(f"script {self.name} takes no further keys or arguments")
        return (
            _positional(self.name, self.keys, keys) + list(more_keys),
            _positional(self.name, self.args, args) + list(more_args),
        )


def _positional(script: str, names: tuple[str, ...], given: Mapping[str, str | None]) -> list[str]:
    if set(given) != set(names):
        raise ValueError(f"script {script} takes {names}, not {tuple(given)}")
    values = [given[name] for name in names]
    while values and values[-1] is None:
        values.pop()
    if None in values:
        raise ValueError(f"script {script}: only trailing keys or arguments may be left out")
    return [value for value in values if value is not None]
