"""The one rule for names people choose (adapters, pipelines, runs, metrics, studies), and the one
way to turn user input into a path that stays inside its folder.

Names become file and folder names, table keys and peft adapter names, and in public mode anyone
can send one: a single strict rule, checked where the name enters, keeps "../x", "/abs", NUL and
peft's reserved "__base__" out everywhere. `inside` is the second fence for paths built from input:
it resolves symlinks and refuses anything that ends up outside its root.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from core.schema import InputError

NAME_RULE = "use 1-64 letters, digits, '_' or '-', starting with a letter or digit"
# ASCII only, first character alphanumeric: no hidden files, no "..", no "__base__" (peft's name
# for the plain base model), nothing a shell or a URL would have to quote. No "." either: an
# adapter name is a key of torch ModuleDicts inside peft, which refuse dots.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_SHOWN = 40  # characters of a refused value quoted back in the message


class InvalidNameError(InputError):
    """A name that breaks the rule; the message quotes it and states the rule."""


class OutsideRootError(InputError):
    """A path built from user input that would leave the folder it belongs in."""


def check_name(value: Any, what: str, error: type[InputError] = InvalidNameError) -> str:
    """`value` if it is a valid name, else `error` ("Adapter name '../x' is not allowed: ...").

    `what` starts the message: "Adapter name", "Pipeline name", "Metric name"; `error` lets a
    module raise the error class its callers already catch (SpecError, MetricError)."""
    if isinstance(value, str) and _NAME.fullmatch(value):
        return value
    raise error(f"{what} {_shown(value)} is not allowed: {NAME_RULE}.")


def inside(root: str | Path, *parts: str) -> Path:
    """root/parts..., resolved (symlinks followed); OutsideRootError unless it lies below root
    (root itself is refused too: a name of "." must never stand for the whole folder)."""
    base = Path(root).resolve()
    if any("\x00" in str(part) for part in parts):
        raise OutsideRootError(f"The path {_shown('/'.join(map(str, parts)))} contains a NUL character.")
    path = base.joinpath(*parts).resolve()
    if path == base or not path.is_relative_to(base):
        raise OutsideRootError(f"The path {_shown('/'.join(map(str, parts)))} does not stay below {base}.")
    return path


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN else text[:_SHOWN - 1] + "…"
