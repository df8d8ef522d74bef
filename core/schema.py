"""The records that flow between datasets, pipelines, fine-tuning and evaluation."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields
from typing import Any, Literal

Split = Literal["train", "eval"]


@dataclass
class Passage:
    """One retrievable unit of a corpus."""

    id: str
    text: str
    title: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class QAExample:
    """A question with its reference answer and the gold passages (contexts) that support it."""

    id: str
    question: str
    answer: str
    contexts: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SplitSetting:
    """A dataset's one train/eval split: which examples are held out for evaluation."""

    seed: int = 0
    eval_fraction: float = 0.3


DEFAULT_SPLIT = SplitSetting()


def split_of(example_id: str, seed: int = 0, eval_fraction: float = 0.3) -> Split:
    """Deterministic train/eval assignment from a seeded hash of the id.

    It depends only on (id, seed, eval_fraction), never on order or dataset size, so an eval
    example stays in eval however the dataset is filtered, sampled or re-loaded.
    """
    digest = hashlib.sha256(f"{seed}:{example_id}".encode()).digest()
    bucket = int.from_bytes(digest[:8], "big") / 2**64
    return "eval" if bucket < eval_fraction else "train"


class InputError(ValueError):
    """A problem the user can fix (empty question, bad value); its message is shown as is."""


def validate_question(question: str | None, max_chars: int) -> str:
    text = (question or "").strip()
    if not text:
        raise InputError("Please type a question: it is empty.")
    if len(text) > max_chars:
        raise InputError(
            f"The question is {len(text):,} characters long; the limit is {max_chars:,}. "
            "Shorten it (or raise MAX_QUESTION_CHARS)."
        )
    return text


def unknown_fields(cls: type, data: dict[str, Any]) -> list[str]:
    """Keys of `data` that the dataclass `cls` does not have (refused by name, e.g. decoding keys)."""
    return sorted(set(data) - {f.name for f in fields(cls)})
