"""The one rule for names people choose (adapters, pipelines, runs, metrics, studies), and the one
way to turn user input into a path that stays inside its folder.

Names become file and folder names, table keys and peft adapter names, and in public mode anyone
can send one: a single strict rule, checked where the name enters, keeps "../x", "/abs", NUL and
peft's reserved "__base__" out everywhere. `inside` is the second fence for paths built from input:
it resolves symlinks and refuses anything that ends up outside its root. Ids the app makes (jobs,
evaluation runs) have their own strict shape, made by `new_id` and checked by `check_id`.
"""
from __future__ import annotations

import re
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from core.schema import InputError

NAME_RULE = "use 1-64 letters, digits, '_' or '-', starting with a letter or digit"
# ASCII only, first character alphanumeric: no hidden files, no "..", no "__base__" (peft's name
# for the plain base model), nothing a shell or a URL would have to quote. No "." either: an
# adapter name is a key of torch ModuleDicts inside peft, which refuse dots.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
# A Hugging Face Hub repo id: owner/name, each part starting with a letter or digit, no "..".
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")
# new_id's shape: "<kind>-<UTC date>-<UTC time>-<6 hex>", e.g. "finetune-20250101-120000-a1b2c3".
_ID = re.compile(r"[a-z][a-z0-9_]{0,31}-[0-9]{8}-[0-9]{6}-[0-9a-f]{6}")
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


def check_hub_id(value: Any, what: str, error: type[ValueError] = InvalidNameError) -> str:
    """`value` (stripped) if it is a Hub repo id "owner/name", else `error`; such an id never
    climbs out of a folder, so libraries that try a local path first stay inside the cwd."""
    text = value.strip() if isinstance(value, str) else value
    if isinstance(text, str) and _HUB_ID.fullmatch(text) and ".." not in text:
        return text
    raise error(f"{what} {_shown(value)} is not a Hugging Face Hub id: ids look like owner/name.")


def new_id(prefix: str) -> str:
    """A fresh id for a job (and the evaluation run it drives); `prefix` is the job kind."""
    job_id = f"{prefix}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
    return check_id(job_id, "Id", ValueError)


def check_id(value: Any, what: str, error: type[ValueError] = InvalidNameError) -> str:
    """`value` if it has the shape new_id gives, else `error` ("Job id '../x' is not valid: ...")."""
    if isinstance(value, str) and _ID.fullmatch(value):
        return value
    raise error(f"{what} {_shown(value)} is not valid: ids look like "
                "'finetune-20250101-120000-a1b2c3' (pick one from the list).")


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
