"""Spec: the one base of every request a user fills in (fine-tune, pipeline, evaluation).

Why one base: each spec used to check itself by hand in its own style, with help texts kept apart
from the fields. Here a field carries its type, its bounds (ge/gt/le/lt), its choices (Literal)
and its help (Field(description=...)); cross-field rules are model validators. A spec is checked
when it is built (constructor or from_dict) and is frozen afterwards, so there is no separate
validate() to forget. A spec keeps a check for later only when it depends on the machine it runs
on (FinetuneSpec.check_runnable: the dataset file, CUDA for QLoRA).

Every failure becomes ONE sentence in the spec's own error class (an InputError the UI and CLI
already show as is): "n_train: must be a whole number of at least 1 (got 0).",
"Unknown field(s) in the fine-tune spec: foo.", or the sentence a validator raised.

Numbers keep the strictness users relied on: True is not a number, text is not a number, and a
float with no fraction (3.0 from a UI number box) is the whole number 3.
"""
from __future__ import annotations

import contextvars
import dataclasses
import types
from typing import Annotated, Any, ClassVar, Literal, Self, Union, get_args, get_origin, get_type_hints

import annotated_types
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Strict,
                      ValidationError)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from core.names import check_name
from core.schema import InputError

_SHOWN = 60  # characters of a refused value quoted back
_depth: contextvars.ContextVar[int] = contextvars.ContextVar("spec_depth", default=0)


def _whole(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _not_blank(value: str) -> str:
    if not value.strip():
        raise PydanticCustomError("blank_text", "empty text")
    return value


def _comma_list(value: Any) -> Any:
    return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value


_NOT_BLANK = AfterValidator(_not_blank)

WholeNumber = Annotated[int, BeforeValidator(_whole), Strict()]
"""An int; 3.0 becomes 3; True, 3.5 and "3" are refused."""
Number = Annotated[float, Strict()]
"""A finite float (ints accepted); True and "0.5" are refused."""
Text = Annotated[str, _NOT_BLANK]
"""Text that is not empty or blank."""
CommaList = Annotated[list[Text], BeforeValidator(_comma_list)]
"""A list of non-blank strings; "a, b" is read as ["a", "b"] (CLI flags, form boxes)."""


def name_of(what: str, blank_ok: bool = False) -> Any:
    """A str type checked by core.names.check_name ("Adapter name", "Pipeline name", ...);
    with blank_ok, "" and None also pass (an optional name: derived or none)."""
    def check(value: Any) -> Any:
        return value if blank_ok and value in ("", None) else check_name(value, what)
    return Annotated[str | None if blank_ok else str, AfterValidator(check)]


# The names specs carry (module-level, so annotations stay plain names that tools can read).
PipelineName = name_of("Pipeline name")
PipelineRef = name_of("Pipeline name", blank_ok=True)
"""A saved pipeline a spec uses, or ""/None for none."""
AdapterNameOrDerived = name_of("Adapter name", blank_ok=True)
"""An adapter name, or "" to derive one from the spec."""


class Spec(BaseModel):
    """Base of the specs: extra keys refused, frozen, checked on construction.

    Subclasses set `noun` ("fine-tune spec") and `error` (the InputError subclass callers catch).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    noun: ClassVar[str] = "spec"
    error: ClassVar[type[InputError]] = InputError

    def __init__(self, /, **data: Any) -> None:
        # pydantic calls __init__ for nested specs too: only the outermost one words the error,
        # so the message names the full location ("judge.kind", not "kind").
        outermost = _depth.get() == 0
        token = _depth.set(_depth.get() + 1)
        try:
            super().__init__(**data)
        except ValidationError as err:
            if not outermost:
                raise
            raise type(self).error(user_message(err, type(self))) from err
        finally:
            _depth.reset(token)

    @classmethod
    def from_dict(cls, data: Any) -> Self:
        """From JSON (a request, a stored row, a spec.json file)."""
        if not isinstance(data, dict):
            raise cls.error(f"The {cls.noun} must be a JSON object, not {type(data).__name__}.")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values, the same keys from_dict reads."""
        return self.model_dump(mode="json")

    def replace(self, **changes: Any) -> Self:
        """A checked copy with some fields changed (the spec itself is frozen)."""
        return type(self)(**{**dict(self), **changes})


# ---------------------------------------------------------------- one sentence per failure


def user_message(err: ValidationError, spec: type[Spec]) -> str:
    """The first problem of a ValidationError as one sentence; unknown and missing fields are
    listed together, since a misspelled key is usually the cause of the other errors."""
    problems = err.errors(include_url=False)
    for kinds, heading in ((("extra_forbidden", "unexpected_keyword_argument"), "Unknown"),
                           (("missing", "missing_argument", "missing_keyword_only_argument"), "Missing")):
        hits = [p for p in problems if p["type"] in kinds]
        if hits:
            parent = hits[0]["loc"][:-1]
            names = [str(p["loc"][-1]) for p in hits if p["loc"][:-1] == parent]
            where = _path(spec, parent) or f"the {spec.noun}"
            return f"{heading} field(s) in {where}: {', '.join(names)}."
    problem = problems[0]
    error = (problem.get("ctx") or {}).get("error")
    if problem["type"] == "value_error" and isinstance(error, Exception):
        return str(error)  # a validator's own sentence
    annotation, metadata, shown = _walk(spec, problem["loc"])
    return (f"{''.join(shown) or spec.noun}: must be {expectation(annotation, metadata)} "
            f"(got {_shown(problem['input'])}).")


def expectation(annotation: Any, metadata: list[Any] | tuple[Any, ...] = ()) -> str:
    """What a value of this type must be, in words: "a whole number from 1 to 100"."""
    annotation, metadata = _unwrap(annotation, metadata)
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        words = " or ".join(expectation(a, metadata) for a in members)
        return words + (" or null" if len(members) < len(get_args(annotation)) else "")
    if origin is Literal:
        return "one of " + ", ".join(str(choice) for choice in get_args(annotation))
    if annotation is bool:
        return "true or false"
    if annotation in (int, float):
        return ("a whole number" if annotation is int else "a number") + _bounds(metadata)
    if annotation is str:
        return "text that is not empty" if _NOT_BLANK in metadata else "text"
    if origin is list:
        short = any(isinstance(m, annotated_types.MinLen) and m.min_length > 0 for m in metadata)
        return "a non-empty list" if short else "a list"
    return "a JSON object" if dict in (origin, annotation) or _fields_of(annotation) else "valid"


def _bounds(metadata: list[Any]) -> str:
    """" from 1 to 100", " of at least 1", " above 0", " of at least 0 and below 1", or ""."""
    found = {kind: getattr(m, kind) for m in metadata for kind in ("ge", "gt", "le", "lt")
             if isinstance(m, getattr(annotated_types, kind.capitalize()))}
    if "ge" in found and "le" in found:
        return f" from {found['ge']:g} to {found['le']:g}"
    low = (f"of at least {found['ge']:g}" if "ge" in found
           else f"above {found['gt']:g}" if "gt" in found else "")
    high = (f"at most {found['le']:g}" if "le" in found
            else f"below {found['lt']:g}" if "lt" in found else "")
    if low and high:
        return f" {low} and {high}"
    if high.startswith("at most"):
        return f" of {high}"
    return f" {low or high}" if low or high else ""


def _unwrap(annotation: Any, metadata: Any) -> tuple[Any, list[Any]]:
    """Annotated[X, ...] -> X with its metadata (a nested FieldInfo's constraints included)."""
    found = list(metadata)
    while get_origin(annotation) is Annotated:
        annotation, *extra = get_args(annotation)
        for item in extra:
            found.extend(item.metadata if isinstance(item, FieldInfo) else [item])
    return annotation, found


def plain_type(annotation: Any, metadata: Any = ()) -> tuple[Any, list[Any], bool]:
    """(type without Annotated and Optional, its metadata, whether None is allowed)."""
    annotation, metadata = _unwrap(annotation, metadata)
    members = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) in (Union, types.UnionType) and len(members) == 1:
        inner, metadata = _unwrap(members[0], metadata)
        return inner, metadata, True
    return annotation, metadata, False


def _fields_of(annotation: Any) -> dict[str, tuple[Any, list[Any]]]:
    """field name -> (annotation, metadata) of a model or a stdlib dataclass, else {}."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return {name: (info.annotation, list(info.metadata))
                for name, info in annotation.model_fields.items()}
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return {name: (hint, []) for name, hint in get_type_hints(annotation).items()}
    return {}


def _walk(spec: type[Spec], loc: tuple[Any, ...]) -> tuple[Any, list[Any], list[str]]:
    """Follow an error location through fields and list items: (annotation, metadata, the parts
    of the location a person reads: "judge", ".model" or "[0]"; union member tags left out)."""
    annotation, metadata, shown = spec, [], []
    for part in loc:
        annotation, metadata, _ = plain_type(annotation, metadata)
        origin = get_origin(annotation)
        if isinstance(part, int):
            shown.append(f"[{part}]")
            annotation, metadata = (get_args(annotation)[0] if origin is list else Any), []
        elif origin in (Union, types.UnionType):
            continue  # pydantic names the union member it tried: not a place in the spec
        else:
            shown.append(("." if shown else "") + str(part))
            annotation, metadata = _fields_of(annotation).get(str(part), (Any, []))
    return annotation, metadata, shown


def _path(spec: type[Spec], loc: tuple[Any, ...]) -> str:
    """("judge", "model") -> "judge.model"; ("systems", 0, "rag") -> "systems[0].rag"."""
    return "".join(_walk(spec, loc)[2])


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN else text[:_SHOWN - 1] + "…"
