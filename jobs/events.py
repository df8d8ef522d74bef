"""The protocol between a subprocess job and the runner: an append-only events file per job.

The child (Reporter) appends one JSON object per line to the file named by LAB_JOB_EVENTS
(data dir /jobs/<id>/events.jsonl): {"progress": fraction, "message": text}, {"metric": {...}}
or {"result": {...}}. The result is also written to result.json next to it (tmp + rename), so a
finished job whose result line got lost still ends done. The runner follows the file while the
child runs (EventReader); a line that is not one of those three shapes is logged and skipped.
The child's stdout and stderr go to the job's log only. This module is imported by the child, so
it stays light: no store, no models.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

JOB_ENV = "LAB_JOB_ID"
EVENTS_ENV = "LAB_JOB_EVENTS"
EVENTS_FILE = "events.jsonl"
RESULT_FILE = "result.json"


def result_path(events: Path) -> Path:
    return events.with_name(RESULT_FILE)


def write_result(path: Path, result: dict[str, Any]) -> None:
    """Write `result` to `path` atomically: a reader sees the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result), encoding="utf-8")
    os.replace(tmp, path)


def read_result(path: Path) -> dict[str, Any] | None:
    """The result a child saved, or None when there is none (or it is not a JSON object)."""
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        logger.warning("unreadable job result %s: %s", path, err)
        return None
    return result if isinstance(result, dict) else None


def parse_event(line: str) -> dict[str, Any] | None:
    """The event on one line, or None (logged) when the line is not a valid event."""
    try:
        event = json.loads(line)
    except ValueError:
        event = None
    problem = _problem(event)
    if problem:
        logger.warning("skipped a job event line (%s): %.200s", problem, line.rstrip("\n"))
        return None
    return event


def _problem(event: Any) -> str | None:
    if not isinstance(event, dict):
        return "not a JSON object"
    kinds = [k for k in ("progress", "metric", "result") if k in event]
    if len(kinds) != 1:
        return "needs exactly one of progress, metric, result"
    allowed = {"progress", "message"} if kinds == ["progress"] else set(kinds)
    if set(event) - allowed:
        return f"unexpected keys {sorted(set(event) - allowed)}"
    if kinds == ["progress"]:
        value = event["progress"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return "progress must be a number"
        if not isinstance(event.get("message", ""), str):
            return "message must be text"
    elif not isinstance(event[kinds[0]], dict):
        return f"{kinds[0]} must be an object"
    return None


class EventReader:
    """Follows a job's events file from where this attempt started, whole lines only."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0
        self._partial = b""

    def read(self, final: bool = False) -> list[dict[str, Any]]:
        """Valid events appended since the last call; `final` also takes an unterminated last
        line (the child has exited, so nothing will complete it)."""
        if not self.path.exists():
            return []
        with self.path.open("rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        self.offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = b"" if final else lines.pop()
        events = (parse_event(line.decode("utf-8", errors="replace")) for line in lines if line.strip())
        return [e for e in events if e is not None]


class Reporter:
    """The child's side of a subprocess job; prints plain progress when run by hand (CLI)."""

    def __init__(self) -> None:
        events = os.environ.get(EVENTS_ENV)
        self.events = Path(events) if events else None
        self.under_runner = self.events is not None

    def progress(self, fraction: float, message: str = "") -> None:
        if self.under_runner:
            self._emit({"progress": fraction, "message": message})
        else:
            print(f"[{fraction:6.1%}] {message}", flush=True)

    def metric(self, **values: Any) -> None:
        """A point for live charts (e.g. step, train_loss, val_loss); silent when run by hand."""
        if self.under_runner:
            self._emit({"metric": values})

    def result(self, result: dict[str, Any]) -> None:
        if self.under_runner:
            write_result(result_path(self.events), result)
            self._emit({"result": result})

    def _emit(self, event: dict[str, Any]) -> None:
        # One write per line on an O_APPEND file: the reader sees whole lines or a growing tail.
        with self.events.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(event) + "\n")
