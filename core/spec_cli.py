"""Command-line flags generated from a Spec's fields, and the override dict they give back.

One flag per field, so a new field is on the CLI with its help the moment it exists:
--n-train (help = the field's description and default), nested specs flattened (--judge-model),
lists comma-separated (--target-modules q_proj,v_proj), booleans as --x/--no-x, Literal fields
as choices. A flag left out is no override: the spec's default (or --spec-json) stands, and the
spec itself checks every value, so the CLI and the UI refuse the same things with the same words.
"""
from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from typing import Any, Literal, get_args, get_origin

from core.specs import Spec, expectation, plain_type


def add_spec_arguments(parser: argparse.ArgumentParser, spec: type[Spec], prefix: str = "",
                       exclude: Iterable[str] = (), aliases: Mapping[str, str] | None = None) -> None:
    """Add a flag for each field of `spec` (but `exclude`, which the caller parses itself; a
    nested spec's field is excluded by its dotted name, "evaluation.decoding").

    `aliases` maps a field to an extra flag kept for old command lines ({"dataset_id": "--dataset"}).
    """
    skipped, aliases = set(exclude), aliases or {}
    for name, info in spec.model_fields.items():
        if name in skipped:
            continue
        annotation, _, _ = plain_type(info.annotation, info.metadata)
        dest = prefix + name
        if isinstance(annotation, type) and issubclass(annotation, Spec):
            inner = [n.split(".", 1)[1] for n in skipped if n.startswith(name + ".")]
            add_spec_arguments(parser, annotation, prefix=f"{dest}_", exclude=inner)
            continue
        flags = ["--" + dest.replace("_", "-")] + ([aliases[name]] if name in aliases else [])
        default = info.get_default(call_default_factory=True)
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        # Numbers say their bounds too: "LoRA dropout: a number of at least 0 and below 1".
        bounds = f": {expectation(info.annotation, info.metadata)}" if annotation in (int, float) else ""
        help_text = (info.description or "") + bounds + (
            "" if shown in ("", None) else f" (default: {shown})")
        # argparse %-formats help: a default holding "%" (a prompt template) must be escaped.
        options: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS,
                                   "help": help_text.replace("%", "%%")}
        if annotation is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif get_origin(annotation) is Literal:
            options["choices"] = get_args(annotation)
        elif get_origin(annotation) is list:
            item = plain_type(get_args(annotation)[0])[0]
            options.update(type=_comma_separated(item), metavar=f"{name.upper()}[,...]")
        elif annotation in (int, float, str):
            options.update(type=annotation, metavar=name.upper())
        else:
            raise TypeError(f"{spec.__name__}.{name} has no flag form; exclude it and parse it yourself.")
        parser.add_argument(*flags, **options)


def spec_overrides(args: argparse.Namespace, spec: type[Spec], base: dict[str, Any] | None = None,
                   prefix: str = "") -> dict[str, Any]:
    """`base` (e.g. from --spec-json) with the values of the flags given; nested specs merge
    key by key, so --judge-model keeps the judge's other keys from `base`."""
    given = vars(args)
    values = dict(base or {})
    for name, info in spec.model_fields.items():
        annotation = plain_type(info.annotation, info.metadata)[0]
        dest = prefix + name
        if isinstance(annotation, type) and issubclass(annotation, Spec):
            inner = values.get(name)
            nested = spec_overrides(args, annotation, inner if isinstance(inner, dict) else {},
                                    prefix=f"{dest}_")
            if nested != (inner if isinstance(inner, dict) else {}):
                values[name] = nested
        elif dest in given:
            values[name] = given[dest]
    return values


def _comma_separated(item: Any) -> Any:
    convert = item if item in (int, float) else str

    def parse(text: str) -> list[Any]:
        return [convert(part.strip()) for part in text.split(",") if part.strip()]
    parse.__name__ = f"comma-separated {convert.__name__}"  # argparse names it in its error
    return parse
