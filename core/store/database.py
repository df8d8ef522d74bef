"""The DuckDB file itself: the connection, transactions and the numbered migrations.

One process owns the file read-write (DuckDB allows one writer process); inside it, threads share
one connection through per-thread cursors. Writes go through one lock so that concurrent jobs never
hit DuckDB's write-write conflicts on the same rows. The tables' queries are in the modules beside
this one (core/store/__init__.py lists them); each builds on Database.
"""
from __future__ import annotations

import importlib.util
import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

import duckdb

from core import config

MIGRATIONS_DIR = Path(__file__).parent.parent / "migrations"


class StoreLockedError(RuntimeError):
    """Another process holds the database file read-write."""


def now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def migrations() -> list[tuple[int, str, Path]]:
    """(version, name, path) for every core/migrations/NNN_name.sql or .py, in order.

    A .sql migration is run as it is; a .py one defines `migrate(cursor)` for changes SQL cannot
    express alone (e.g. ids computed by Python code). Both run inside the same transaction as the
    version row that records them."""
    found = []
    for path in sorted(MIGRATIONS_DIR.glob("[0-9][0-9][0-9]_*.*")):
        if path.suffix in (".sql", ".py"):
            version, name = path.stem.split("_", 1)
            found.append((int(version), name, path))
    return found


def _apply(cur: duckdb.DuckDBPyConnection, path: Path) -> None:
    if path.suffix == ".sql":
        cur.execute(path.read_text())
        return
    module_spec = importlib.util.spec_from_file_location(f"migration_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    module.migrate(cur)


class Database:
    def __init__(self, path: str | Path | None = None, upto: int | None = None):
        """`upto`: apply the migrations up to that version only (a snapshot taken at that version
        is loaded before the later ones run, core.snapshot)."""
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
        self._generation = 0
        self._local = threading.local()
        self.migrate(upto)

    # -- plumbing ---------------------------------------------------------------------------
    def _cursor(self) -> duckdb.DuckDBPyConnection:
        cur = getattr(self._local, "cursor", None)
        if cur is None:
            cur = self._local.cursor = self._conn.cursor()
        return cur

    @property
    def generation(self) -> int:
        """Counts finished writes: a copy taken at generation g is stale once this moves on."""
        return self._generation

    def execute(self, sql: str, params: Iterable[Any] = ()) -> None:
        with self._write_lock:
            self._cursor().execute(sql, list(params))
            self._generation += 1

    def query(self, sql: str, params: Iterable[Any] = ()) -> list[dict[str, Any]]:
        cur = self._cursor().execute(sql, list(params))
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A cursor inside BEGIN ... COMMIT under the write lock; any error rolls back."""
        with self._write_lock:
            cur = self._cursor()
            cur.execute("BEGIN TRANSACTION")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")
            self._generation += 1

    @contextmanager
    def read_transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A cursor of its own inside one transaction, for reading: everything read through it is
        the database as of one moment, whatever jobs write meanwhile (DuckDB's MVCC). Nothing
        waits for it, and it writes nothing (rolled back at the end)."""
        cur = self._conn.cursor()
        try:
            cur.execute("BEGIN TRANSACTION")
            yield cur
            cur.execute("ROLLBACK")
        finally:
            cur.close()

    def close(self) -> None:
        self._conn.close()

    def migrate(self, upto: int | None = None) -> list[int]:
        """Apply the migrations not yet applied (up to version `upto` when given), each in its own
        transaction. Returns them."""
        with self._write_lock:
            cur = self._cursor()
            cur.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                "version INTEGER PRIMARY KEY, name VARCHAR, applied_at TIMESTAMP)"
            )
            done = {r[0] for r in cur.execute("SELECT version FROM schema_migrations").fetchall()}
            applied = []
            for version, name, path in migrations():
                if version in done or (upto is not None and version > upto):
                    continue
                with self.transaction() as tx:
                    _apply(tx, path)
                    tx.execute("INSERT INTO schema_migrations VALUES (?, ?, ?)", [version, name, now()])
                applied.append(version)
            return applied

    def schema_version(self) -> int:
        row = self.query("SELECT max(version) AS v FROM schema_migrations")
        return row[0]["v"] or 0

    def copy_to(self, path: str | Path) -> int:
        """Copy every table and view into a new DuckDB file at `path` (the SQL box's sandbox,
        core/sqlbox.py) in one consistent read; returns the write generation the copy reflects."""
        generation = self._generation
        cur = self._conn.cursor()
        try:
            source = cur.execute("SELECT current_database()").fetchone()[0]
            quoted = str(path).replace("'", "''")
            cur.execute(f"ATTACH '{quoted}' AS sqlbox_copy")
            try:
                cur.execute(f'COPY FROM DATABASE "{source}" TO sqlbox_copy')
            finally:
                cur.execute("DETACH sqlbox_copy")
        finally:
            cur.close()
        return generation
