"""The jobs table: every background job (runner, CLIs) with its spec, status, progress and result."""
from __future__ import annotations

import json
from typing import Any

from core.names import new_id
from core.records import JobRecord
from core.store.database import Database, now


class JobTables(Database):
    def create_job(self, kind: str, spec: dict[str, Any]) -> str:
        job_id = new_id(kind)
        self.execute(
            "INSERT INTO jobs (id, kind, status, spec, created_at, updated_at) "
            "VALUES (?, ?, 'queued', ?, ?, ?)",
            [job_id, kind, json.dumps(spec), now(), now()],
        )
        return job_id

    def update_job(self, job_id: str, **fields: Any) -> None:
        """Set the given columns (JSON columns take Python objects) and touch updated_at."""
        fields["updated_at"] = now()
        for col in JobRecord.JSON_COLUMNS:
            if col in fields and fields[col] is not None:
                fields[col] = json.dumps(fields[col])
        cols = ", ".join(f"{name} = ?" for name in fields)
        self.execute(f"UPDATE jobs SET {cols} WHERE id = ?", [*fields.values(), job_id])

    def get_job(self, job_id: str) -> JobRecord | None:
        rows = self.query("SELECT * FROM jobs WHERE id = ?", [job_id])
        return JobRecord.from_row(rows[0]) if rows else None

    def list_jobs(self, kind: str | None = None, limit: int = 50) -> list[JobRecord]:
        where, params = ("WHERE kind = ?", [kind]) if kind else ("", [])
        rows = self.query(
            f"SELECT * FROM jobs {where} ORDER BY created_at DESC LIMIT ?", [*params, limit]
        )
        return [JobRecord.from_row(r) for r in rows]

    def job_processes(self) -> list[JobRecord]:
        """Jobs with a recorded child process group: running, or left by an app that died."""
        rows = self.query("SELECT * FROM jobs WHERE pgid IS NOT NULL ORDER BY id")
        return [JobRecord.from_row(r) for r in rows]

    def mark_interrupted(self) -> list[str]:
        """Jobs left running or queued by a process that died: interrupted, resumable."""
        rows = self.query("SELECT id FROM jobs WHERE status IN ('running', 'queued')")
        ids = [r["id"] for r in rows]
        for job_id in ids:
            self.update_job(
                job_id, status="interrupted", message="interrupted: the app stopped while it ran"
            )
        return ids
