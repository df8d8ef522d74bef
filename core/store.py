"""The DuckDB file: numbered migrations and the queries every other module uses.

One process owns the file read-write (DuckDB allows one writer process); inside it, threads share
one connection through per-thread cursors. Writes go through one lock so that concurrent jobs never
hit DuckDB's write-write conflicts on the same rows.
"""
from __future__ import annotations

import json
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import duckdb

from core import config

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
JOB_JSON_COLUMNS = ("spec", "result")


class StoreLockedError(RuntimeError):
    """Another process holds the database file read-write."""


def new_id(prefix: str) -> str:
    return f"{prefix}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every core/migrations/NNN_name.sql, in order."""
    found = []
    for path in sorted(MIGRATIONS_DIR.glob("[0-9][0-9][0-9]_*.sql")):
        version, name = path.stem.split("_", 1)
        found.append((int(version), name, path.read_text()))
    return found


class Store:
    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else config.db_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = duckdb.connect(str(self.path))
        except duckdb.IOException as exc:
            raise StoreLockedError(
                f"The database {self.path} is in use by another process (the app or a job). "
                "Stop that process, or run this through the app's job runner."
            ) from exc
        self._write_lock = threading.RLock()
        self._local = threading.local()
        self.migrate()

    # -- plumbing ---------------------------------------------------------------------------
    def _cursor(self) -> duckdb.DuckDBPyConnection:
        cur = getattr(self._local, "cursor", None)
        if cur is None:
            cur = self._local.cursor = self._conn.cursor()
        return cur

    def execute(self, sql: str, params: Iterable[Any] = ()) -> None:
        with self._write_lock:
            self._cursor().execute(sql, list(params))

    def query(self, sql: str, params: Iterable[Any] = ()) -> list[dict[str, Any]]:
        cur = self._cursor().execute(sql, list(params))
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]

    def close(self) -> None:
        self._conn.close()

    def migrate(self) -> list[int]:
        """Apply the migrations not yet applied, each in its own transaction. Returns them."""
        with self._write_lock:
            cur = self._cursor()
            cur.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                "version INTEGER PRIMARY KEY, name VARCHAR, applied_at TIMESTAMP)"
            )
            done = {r[0] for r in cur.execute("SELECT version FROM schema_migrations").fetchall()}
            applied = []
            for version, name, sql in migrations():
                if version in done:
                    continue
                cur.execute("BEGIN TRANSACTION")
                try:
                    cur.execute(sql)
                    cur.execute(
                        "INSERT INTO schema_migrations VALUES (?, ?, ?)", [version, name, now()]
                    )
                    cur.execute("COMMIT")
                except Exception:
                    cur.execute("ROLLBACK")
                    raise
                applied.append(version)
            return applied

    def schema_version(self) -> int:
        row = self.query("SELECT max(version) AS v FROM schema_migrations")
        return row[0]["v"] or 0

    # -- jobs -------------------------------------------------------------------------------
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
        for col in JOB_JSON_COLUMNS:
            if col in fields and fields[col] is not None:
                fields[col] = json.dumps(fields[col])
        cols = ", ".join(f"{name} = ?" for name in fields)
        self.execute(f"UPDATE jobs SET {cols} WHERE id = ?", [*fields.values(), job_id])

    def get_job(self, job_id: str) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM jobs WHERE id = ?", [job_id])
        return _decode_job(rows[0]) if rows else None

    def list_jobs(self, kind: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        where, params = ("WHERE kind = ?", [kind]) if kind else ("", [])
        rows = self.query(
            f"SELECT * FROM jobs {where} ORDER BY created_at DESC LIMIT ?", [*params, limit]
        )
        return [_decode_job(r) for r in rows]

    def mark_interrupted(self) -> list[str]:
        """Jobs left running or queued by a process that died: interrupted, resumable."""
        rows = self.query("SELECT id FROM jobs WHERE status IN ('running', 'queued')")
        ids = [r["id"] for r in rows]
        for job_id in ids:
            self.update_job(
                job_id, status="interrupted", message="interrupted: the app stopped while it ran"
            )
        return ids

    # -- datasets ---------------------------------------------------------------------------
    def save_dataset(self, dataset_id: str, name: str, source: str, examples: list[dict],
                     n_passages: int, meta: dict[str, Any] | None = None) -> None:
        """Replace a dataset's row and its examples (dicts with id, question, answer, contexts,
        split, meta) in one transaction."""
        with self._write_lock:
            cur = self._cursor()
            cur.execute("BEGIN TRANSACTION")
            try:
                cur.execute("DELETE FROM examples WHERE dataset_id = ?", [dataset_id])
                cur.execute("DELETE FROM datasets WHERE id = ?", [dataset_id])
                cur.execute(
                    "INSERT INTO datasets (id, name, source, n_examples, n_passages, meta, "
                    "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [dataset_id, name, source, len(examples), n_passages,
                     json.dumps(meta or {}), now()],
                )
                cur.executemany(
                    "INSERT INTO examples VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [[dataset_id, e["id"], e["question"], e["answer"], e["contexts"],
                      e["split"], json.dumps(e.get("meta") or {})] for e in examples],
                )
                cur.execute("COMMIT")
            except Exception:
                cur.execute("ROLLBACK")
                raise

    def list_datasets(self) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM datasets ORDER BY created_at DESC")

    # -- votes ------------------------------------------------------------------------------
    def add_vote(self, question: str, systems: list[Any], answers: list[str], choice: str,
                 decoding: dict[str, Any] | None = None, retrieved: list[Any] | None = None) -> str:
        vote_id = new_id("vote")
        self.execute(
            "INSERT INTO votes (id, question, systems, answers, decoding, retrieved, choice, "
            "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [vote_id, question, json.dumps(systems), json.dumps(answers), json.dumps(decoding),
             json.dumps(retrieved), choice, now()],
        )
        return vote_id

    # -- adapters ---------------------------------------------------------------------------
    def list_adapters(self) -> list[dict[str, Any]]:
        rows = self.query("SELECT * FROM adapters ORDER BY created_at DESC")
        return [_decode_json(r, ("spec", "metrics")) for r in rows]

    def upsert_adapter(self, name: str, base_model: str, path: str, spec: dict | None = None,
                       metrics: dict | None = None, job_id: str | None = None) -> None:
        self.execute(
            "INSERT INTO adapters (name, base_model, path, spec, metrics, job_id, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
            "base_model = excluded.base_model, path = excluded.path, spec = excluded.spec, "
            "metrics = excluded.metrics, job_id = excluded.job_id",
            [name, base_model, path, json.dumps(spec), json.dumps(metrics), job_id, now()],
        )

    def rename_adapter(self, old: str, new: str, path: str) -> None:
        self.execute("UPDATE adapters SET name = ?, path = ? WHERE name = ?", [new, path, old])

    def delete_adapter(self, name: str) -> None:
        self.execute("DELETE FROM adapters WHERE name = ?", [name])


def _decode_json(row: dict[str, Any], columns: Iterable[str]) -> dict[str, Any]:
    for col in columns:
        if isinstance(row.get(col), str):
            row[col] = json.loads(row[col])
    return row


def _decode_job(row: dict[str, Any]) -> dict[str, Any]:
    return _decode_json(row, JOB_JSON_COLUMNS)


_store: Store | None = None
_store_lock = threading.Lock()


def get_store() -> Store:
    """The process-wide store on config.db_path()."""
    global _store
    with _store_lock:
        if _store is None or _store.path != config.db_path():
            _store = Store()
        return _store
