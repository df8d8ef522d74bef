"""A system: what answers a question. Its id is derived from its fields; its label is for people.

Stored rows (answers, judgments, votes) and every pairing (system vs its base, run vs run) use the
id, so rewording a label never breaks a resume or a comparison. The id is a short hash of the
canonical fields, the same in every process and on every machine.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from core import config

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch; here: the plain base model
KINDS = ("local", "openai")


@dataclass(frozen=True)
class System:
    """A local model (+ adapter) or an OpenAI-compatible model, with or without RAG.

    `pipeline` names the saved RAG pipeline a RAG system retrieves with (None without RAG).
    """

    kind: Literal["local", "openai"] = "local"
    model: str = config.DEFAULT_CHAT_MODEL
    adapter: str = BASE
    rag: bool = False
    base_url: str | None = None
    pipeline: str | None = None

    def __post_init__(self) -> None:
        # Canonical form: the same system always has the same fields, hence the same id.
        set_ = object.__setattr__
        set_(self, "model", (self.model or "").strip())
        set_(self, "adapter", (self.adapter or BASE).strip() if self.kind == "local" else BASE)
        set_(self, "base_url", ((self.base_url or "").strip() or None) if self.kind == "openai" else None)
        set_(self, "rag", bool(self.rag))
        set_(self, "pipeline", ((self.pipeline or "").strip() or None) if self.rag else None)

    @property
    def id(self) -> str:
        return system_id(self.fields())

    @property
    def is_base(self) -> bool:
        return self.kind == "local" and self.adapter == BASE

    @property
    def label(self) -> str:
        """E.g. "m (base) · no RAG" or "qa · RAG p"; a served model names its server's host, so an
        adapter served by vLLM and the same adapter run here read apart."""
        if self.kind == "openai":
            who = f"{self.model} @ {_host(self.base_url)}" if self.base_url else self.model
        else:
            who = f"{self.model} (base)" if self.adapter == BASE else self.adapter
        rag = f"RAG {self.pipeline}" if self.rag and self.pipeline else ("RAG" if self.rag else "no RAG")
        return f"{who} · {rag}"

    def fields(self) -> dict[str, Any]:
        return asdict(self)

    def with_pipeline(self, pipeline: str | None) -> "System":
        """The same system retrieving with `pipeline` (no change without RAG or when it has one)."""
        if not self.rag or self.pipeline:
            return self
        return System(**{**self.fields(), "pipeline": pipeline})

    @classmethod
    def from_fields(cls, data: dict[str, Any]) -> "System":
        """From stored fields; extra keys such as `id` or `label` are ignored."""
        return cls(**{k: data[k] for k in ("kind", "model", "adapter", "rag", "base_url", "pipeline")
                      if k in data})


def _host(base_url: str) -> str:
    """host[:port] of a URL, never its user or password."""
    return urlsplit(base_url).netloc.rpartition("@")[2] or base_url


def system_id(fields: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of the fields, shortened: 'sys-' + 16 hex digits."""
    canonical = json.dumps({k: fields.get(k) for k in ("kind", "model", "adapter", "rag", "base_url",
                                                      "pipeline")}, sort_keys=True)
    return "sys-" + hashlib.sha256(canonical.encode()).hexdigest()[:16]


def base_of(system: System, systems: list[System]) -> System | None:
    """The system `system` is compared with: the base model (no adapter) on the same model, with the
    same RAG setting and pipeline; a system that is its own base, or has none in the list, is
    compared with the first system listed; the first system itself has none."""
    twin = next((s for s in systems if s.is_base and s.model == system.model
                 and s.rag == system.rag and s.pipeline == system.pipeline), None)
    if twin is None or twin.id == system.id:
        twin = systems[0] if systems else None
    return None if twin is None or twin.id == system.id else twin
