"""Typed rows that leave core/store/ for the services and the UI: a background job, an adapter,
an evaluation run. The store builds each from its row (`from_row`, which decodes the JSON columns);
`to_dict()` gives the plain form back where one is serialized (JSON output, exports). Timestamps
are naive UTC datetimes, as the store writes them (core.store.now)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from typing import Any, ClassVar, Self


class _Record:
    JSON_COLUMNS: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Self:
        """The record of a row with (at least) this record's columns; JSON text is decoded."""
        return cls(**{f.name: _decoded(row[f.name]) if f.name in cls.JSON_COLUMNS else row[f.name]
                      for f in fields(cls)})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _decoded(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


@dataclass(frozen=True)
class JobRecord(_Record):
    """One row of the jobs table: a background job's state, request (spec) and result."""

    JSON_COLUMNS: ClassVar[tuple[str, ...]] = ("spec", "result")

    id: str
    kind: str
    status: str  # queued | running | done | failed | cancelled | interrupted
    progress: float
    message: str | None
    eta_seconds: float | None
    spec: dict[str, Any]
    result: dict[str, Any] | None
    error: str | None
    attempts: int
    created_at: datetime
    started_at: datetime | None
    updated_at: datetime | None
    finished_at: datetime | None
    pid: int | None  # the child process of a running subprocess job
    pgid: int | None


@dataclass(frozen=True)
class AdapterRecord(_Record):
    """One row of the adapters table: a LoRA adapter, its folder (or Hub id) and, when trained
    here, its fine-tune spec and metrics."""

    JSON_COLUMNS: ClassVar[tuple[str, ...]] = ("spec", "metrics")

    name: str
    base_model: str
    path: str
    spec: dict[str, Any] | None
    metrics: dict[str, Any] | None
    job_id: str | None
    created_at: datetime


@dataclass(frozen=True)
class EvalRunRecord(_Record):
    """One row of the eval_runs table with how many answers and judgments it has stored."""

    JSON_COLUMNS: ClassVar[tuple[str, ...]] = ("spec",)

    id: str
    job_id: str | None
    name: str | None
    dataset_id: str
    spec: dict[str, Any]
    status: str
    created_at: datetime
    updated_at: datetime | None
    n_answers: int
    n_judgments: int
