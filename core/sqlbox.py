"""The SQL box's sandbox: a visitor's SQL runs on a read-only copy of the app's tables, in a DuckDB
instance of its own that cannot reach files, extensions or its own settings; one SELECT at a time,
stopped after a time limit, with a capped number of rows.

Why a copy: DuckDB opens a database file in one configuration per process, and settings such as
enable_external_access belong to the whole instance, so the app's own connection (which writes
exports) cannot be the one that runs visitors' SQL. The copy (Store.copy_to, into a private
temporary folder removed on close or exit) is refreshed before a query whenever the store has
written since the last one.

The instance's settings are the guarantee; the checks before it (DuckDB's own parser: statement
type, table functions) exist to refuse with a clear one-line reason of our own.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import threading
import weakref
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import duckdb

from core import config
from core.schema import InputError
from core.store import Store

logger = logging.getLogger(__name__)

# Shown in the SQL box: they double as documentation of how the tables join.
EXAMPLE_QUERIES = {
    "Runs with counts": "SELECT r.id, r.name, r.dataset_id, r.status, count(g.score) AS judgments "
                        "FROM eval_runs r LEFT JOIN judgments g ON g.run_id = r.id "
                        "GROUP BY ALL ORDER BY r.id DESC",
    "Mean score per system and metric": "SELECT j.run_id, s.label AS system, j.metric, "
                                        "round(avg(j.score), 3) AS mean, count(*) AS n FROM "
                                        "judgments j JOIN systems s ON s.id = j.system_id "
                                        "GROUP BY ALL ORDER BY ALL",
    "Parse failures": "SELECT j.run_id, s.label AS system, j.metric, sum(j.parse_failures) AS "
                      "failures FROM judgments j JOIN systems s ON s.id = j.system_id "
                      "GROUP BY ALL HAVING failures > 0",
    "Adapters and their losses": "SELECT name, base_model, metrics->>'final_train_loss' AS "
                                 "train_loss, metrics->>'n_train' AS n_train FROM adapters",
    "Votes": "SELECT choice, count(*) AS n FROM votes GROUP BY ALL",
}

# Readers of files or URLs, refused by name with the reason (the sandbox would refuse them anyway).
FILE_READERS = frozenset({
    "read_text", "read_blob", "read_csv", "read_csv_auto", "sniff_csv", "read_json",
    "read_json_auto", "read_json_objects", "read_json_objects_auto", "read_ndjson",
    "read_ndjson_auto", "read_ndjson_objects", "read_parquet", "parquet_scan", "parquet_metadata",
    "parquet_schema", "parquet_file_metadata", "parquet_kv_metadata", "parquet_bloom_probe", "glob",
    "read_xlsx", "iceberg_scan", "delta_scan", "sqlite_scan", "st_read", "read_duckdb",
})
# The table functions a query may use: generators and the catalog of the app's own tables.
TABLE_FUNCTIONS = frozenset({
    "range", "generate_series", "unnest", "json_each", "json_tree", "duckdb_tables",
    "duckdb_columns", "duckdb_views", "duckdb_constraints", "duckdb_indexes", "duckdb_schemas",
    "duckdb_types", "duckdb_functions", "duckdb_keywords",
})
_FILES = "the SQL box neither reads nor writes files (the Export button writes CSV or Parquet)"
_SETTINGS = "the SQL box's settings are fixed"
_EXTENSIONS = "the SQL box cannot install or load extensions"
_OWN_TABLES = "the SQL box reads only the app's own tables"
_PRAGMA = "use SELECT on DuckDB's catalog functions instead, e.g. FROM duckdb_tables()"
# Statements refused by their first keyword, with the reason.
REFUSED = {"ATTACH": _OWN_TABLES, "DETACH": _OWN_TABLES, "INSTALL": _EXTENSIONS,
           "LOAD": _EXTENSIONS, "FORCE": _EXTENSIONS, "COPY": _FILES, "EXPORT": _FILES, "IMPORT": _FILES,
           "SET": _SETTINGS, "RESET": _SETTINGS, "USE": _SETTINGS, "PRAGMA": _PRAGMA,
           "CALL": _PRAGMA, "CHECKPOINT": _PRAGMA}


class ReadOnlyQueryError(InputError):
    """A query the SQL box refuses, stops or cannot run; the message says which and why."""


@dataclass(frozen=True)
class SqlResult:
    columns: list[str]
    rows: list[tuple]
    cut: bool  # the query returned more rows than `rows` holds

    def note(self) -> str:
        if not self.cut:
            return f"{len(self.rows):,} rows."
        return (f"Showing the first {len(self.rows):,} rows: the result was cut at the SQL box's "
                "row limit (SQL_MAX_ROWS).")


def sandbox_config(memory_limit: str) -> dict[str, Any]:
    """DuckDB settings of the instance that runs visitors' SQL; lock_configuration last, so that
    no SET can undo the others."""
    return {"enable_external_access": False, "autoinstall_known_extensions": False,
            "autoload_known_extensions": False, "python_enable_replacements": False,
            "temp_directory": "", "memory_limit": memory_limit, "lock_configuration": True}


def first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def leading_keyword(statement_text: str) -> str:
    match = re.match(r"\s*([A-Za-z_]+)", statement_text)
    return match.group(1).upper() if match else "?"


def relations(tree: Any) -> tuple[list[str], list[str], list[str]]:
    """(table functions, base table names, other functions) named anywhere in a
    json_serialize_sql tree."""
    functions, tables, calls = [], [], []
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("type") == "TABLE_FUNCTION":
                functions.append(str(node["function"].get("function_name", "")).lower())
            elif node.get("type") == "BASE_TABLE":
                tables.append(str(node.get("table_name", "")))
            elif node.get("class") == "FUNCTION":
                calls.append(str(node.get("function_name", "")).lower())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return functions, tables, calls


@contextmanager
def time_limit(cur: duckdb.DuckDBPyConnection, seconds: float) -> Iterator[None]:
    """Interrupt `cur`'s query once `seconds` have passed, and again until the block ends (DuckDB
    forgets an interrupt that lands before a query starts): the query raises InterruptException."""
    done = threading.Event()

    def watch() -> None:
        if done.wait(seconds):
            return
        while not done.is_set():
            with suppress(duckdb.Error):
                cur.interrupt()
            done.wait(0.05)

    watcher = threading.Thread(target=watch, name="sqlbox-time-limit", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()


class SqlBox:
    """Runs the Evaluate tab's SQL on a sandboxed copy of `store`'s tables, one query at a time."""

    def __init__(self, store: Store, timeout_s: float = config.SQL_TIMEOUT_S,
                 max_rows: int = config.SQL_MAX_ROWS,
                 memory_limit: str = config.SQL_MEMORY_LIMIT) -> None:
        self.store, self.timeout_s, self.max_rows = store, timeout_s, max_rows
        folder = tempfile.mkdtemp(prefix="sqlbox-")
        self.path = Path(folder) / store.path.name  # the same database name as the store's
        self._remove_folder = weakref.finalize(self, shutil.rmtree, folder, ignore_errors=True)
        self._config = sandbox_config(memory_limit)
        self._parser = duckdb.connect(":memory:", config=self._config)
        self._conn: duckdb.DuckDBPyConnection | None = None
        self._generation = -1
        self._lock = threading.Lock()

    def check(self, sql: str) -> str:
        """The one statement in `sql` if the SQL box may run it; else ReadOnlyQueryError."""
        try:
            statements = duckdb.extract_statements(sql or "")
        except duckdb.Error as exc:
            raise ReadOnlyQueryError(f"The SQL does not parse: {first_line(exc)}") from exc
        if len(statements) != 1:
            raise ReadOnlyQueryError(f"Give exactly one statement (got {len(statements)}): the "
                                     "SQL box runs one SELECT at a time.")
        text = statements[0].query
        try:
            kind = statements[0].type
        except ValueError:  # a statement type the Python API has no name for (UPDATE EXTENSIONS)
            kind = None
        verb = leading_keyword(text)
        if kind != duckdb.StatementType.SELECT:
            if verb in REFUSED:
                raise ReadOnlyQueryError(f"{verb} is not allowed: {REFUSED[verb]}.")
            raise ReadOnlyQueryError(f"Only SELECT queries are allowed here, not {verb}: the SQL "
                                     "box is read-only.")
        with self._parser.cursor() as parser:  # a cursor per call: checks run in parallel
            tree = json.loads(parser.execute("SELECT json_serialize_sql(?::VARCHAR)",
                                             [text]).fetchone()[0])
        if tree.get("error"):
            raise ReadOnlyQueryError(f"The SQL does not parse: {tree.get('error_message')}")
        functions, tables, calls = relations(tree)
        for name in functions:
            if name in FILE_READERS:
                raise ReadOnlyQueryError(f"{name}() reads files: {_OWN_TABLES}.")
            if name not in TABLE_FUNCTIONS:
                raise ReadOnlyQueryError(f"The table function {name}() is not available in the "
                                         "SQL box; query the app's tables (SHOW TABLES lists them).")
        for name in tables:
            if any(ch in name for ch in "/\\:."):
                raise ReadOnlyQueryError(f"'{name}' looks like a file or URL: {_OWN_TABLES}.")
        if "current_setting" in calls:  # settings name server paths (home, temp, extensions)
            raise ReadOnlyQueryError(f"current_setting() is not available: {_SETTINGS}.")
        return text

    def run(self, sql: str) -> SqlResult:
        """Check `sql`, then run it on a fresh enough copy under the time limit and row cap."""
        statement = self.check(sql)
        with self._lock:
            cur = self.sandbox().cursor()
            try:
                with time_limit(cur, self.timeout_s):
                    result = cur.execute(statement)
                    columns = [d[0] for d in result.description]
                    rows = result.fetchmany(self.max_rows + 1)
            except duckdb.InterruptException as exc:  # only time_limit interrupts
                raise ReadOnlyQueryError(f"Query stopped after {self.timeout_s:g} s: the SQL "
                                         "box's time limit (SQL_TIMEOUT_S).") from exc
            except duckdb.OutOfMemoryException as exc:
                raise ReadOnlyQueryError("The query needs more memory than the SQL box allows "
                                         f"({self._config['memory_limit']}, SQL_MEMORY_LIMIT).") from exc
            except duckdb.PermissionException as exc:
                logger.info("SQL box refused %r: %s", statement[:200], exc)
                raise ReadOnlyQueryError("The query tried to reach a file or setting outside the "
                                         "SQL box, which reads only the app's own tables.") from exc
            except duckdb.Error as exc:
                raise ReadOnlyQueryError(f"The query failed: {first_line(exc)}") from exc
            finally:
                cur.close()
        return SqlResult(columns, rows[:self.max_rows], len(rows) > self.max_rows)

    def close(self) -> None:
        with self._lock:
            self._close_copy()
            self._parser.close()
        self._remove_folder()

    def sandbox(self) -> duckdb.DuckDBPyConnection:
        """The sandboxed instance on a copy of the store's tables as of its latest write; its
        caller holds the lock (run does), since a refresh closes the previous one."""
        if self._conn is None or self._generation != self.store.generation:
            self._close_copy()
            for stale in (self.path, self.path.with_name(self.path.name + ".wal")):
                stale.unlink(missing_ok=True)
            self._generation = self.store.copy_to(self.path)
            self._conn = duckdb.connect(str(self.path), read_only=True, config=self._config)
        return self._conn

    def _close_copy(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
