"""The DuckDB file: numbered migrations and the queries every other module uses.

One process owns the file read-write (DuckDB allows one writer process); inside it, threads share
one connection through per-thread cursors. Writes go through one lock so that concurrent jobs never
hit DuckDB's write-write conflicts on the same rows.
"""
from __future__ import annotations

import importlib.util
import json
import threading
from datetime import datetime, timezone
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import duckdb

from core import config
from core.names import inside, new_id
from core.records import AdapterRecord, EvalRunRecord, JobRecord
from core.schema import DEFAULT_SPLIT, QAExample, SplitSetting

MIGRATIONS_DIR = Path(__file__).parent / "migrations"

# An eval run's row with its stored answer and judgment counts (core.records.EvalRunRecord).
EVAL_RUN_SELECT = ("SELECT r.*, (SELECT count(*) FROM answers a WHERE a.run_id = r.id) AS n_answers, "
                   "(SELECT count(*) FROM judgments g WHERE g.run_id = r.id) AS n_judgments "
                   "FROM eval_runs r")


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


class Store:
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

    # -- datasets ---------------------------------------------------------------------------
    def save_dataset(self, dataset_id: str, name: str, source: str, examples: list[dict],
                     n_passages: int, split: SplitSetting = DEFAULT_SPLIT) -> None:
        """Replace a dataset's row and its examples (dicts with id, question, answer, contexts,
        split, meta) in one transaction; `split` is the setting that assigned their splits."""
        with self.transaction() as cur:
            cur.execute("DELETE FROM examples WHERE dataset_id = ?", [dataset_id])
            cur.execute("DELETE FROM datasets WHERE id = ?", [dataset_id])
            cur.execute(
                "INSERT INTO datasets (id, name, source, n_examples, n_passages, meta, split_seed, "
                "eval_fraction, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [dataset_id, name, source, len(examples), n_passages, json.dumps({}), split.seed,
                 split.eval_fraction, now()],
            )
            cur.executemany(
                "INSERT INTO examples VALUES (?, ?, ?, ?, ?, ?, ?)",
                [[dataset_id, e["id"], e["question"], e["answer"], e["contexts"],
                  e["split"], json.dumps(e.get("meta") or {})] for e in examples],
            )

    def list_datasets(self) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM datasets ORDER BY created_at DESC")

    def dataset_split(self, dataset_id: str) -> SplitSetting | None:
        rows = self.query("SELECT split_seed, eval_fraction FROM datasets WHERE id = ?", [dataset_id])
        return SplitSetting(rows[0]["split_seed"], rows[0]["eval_fraction"]) if rows else None

    def eval_split(self, dataset_id: str) -> list[QAExample] | None:
        """The recorded eval examples of a dataset; None when the dataset was never recorded."""
        if self.dataset_split(dataset_id) is None:
            return None
        rows = self.query("SELECT id, question, answer, contexts FROM examples WHERE "
                          "dataset_id = ? AND split = 'eval' ORDER BY id", [dataset_id])
        return [QAExample(r["id"], r["question"], r["answer"] or "", list(r["contexts"] or []))
                for r in rows]

    # -- pipelines ----------------------------------------------------------------------------
    def save_pipeline(self, name: str, spec: dict[str, Any], haystack_yaml: str | None) -> None:
        self.execute(
            "INSERT INTO pipelines (name, spec, haystack_yaml, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET spec = excluded.spec, "
            "haystack_yaml = excluded.haystack_yaml, updated_at = excluded.updated_at",
            [name, json.dumps(spec), haystack_yaml, now()])

    def delete_pipeline(self, name: str) -> None:
        self.execute("DELETE FROM pipelines WHERE name = ?", [name])

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
    def list_adapters(self) -> list[AdapterRecord]:
        rows = self.query("SELECT * FROM adapters ORDER BY created_at DESC")
        return [AdapterRecord.from_row(r) for r in rows]

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

    # -- evaluation -------------------------------------------------------------------------
    # G-Eval runs (jobs/evaluate), their systems, answers and judgments, the steps cache
    # (core/geval.py), exports, and the copy the read-only SQL box reads (core/sqlbox.py).
    # Keys: answers (run_id, example_id, system_id); judgments (run_id, example_id, system_id,
    # metric, repeat); inserts never overwrite, so a resumed run cannot duplicate or change
    # finished work.
    def get_geval_steps(self, metric: str, judge: str, criteria_hash: str) -> str | None:
        rows = self.query("SELECT steps FROM geval_steps WHERE metric = ? AND judge = ? AND "
                          "criteria_hash = ?", [metric, judge, criteria_hash])
        return rows[0]["steps"] if rows else None

    def save_geval_steps(self, metric: str, judge: str, criteria_hash: str, steps: str,
                         source: str) -> None:
        self.execute(
            "INSERT INTO geval_steps (metric, judge, criteria_hash, steps, source, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (metric, judge, criteria_hash) DO UPDATE SET "
            "steps = excluded.steps, source = excluded.source, created_at = excluded.created_at",
            [metric, judge, criteria_hash, steps, source, now()])

    def list_geval_steps(self) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM geval_steps ORDER BY metric, judge, created_at DESC")

    def create_eval_run(self, run_id: str, job_id: str | None, name: str, dataset_id: str,
                        spec: dict[str, Any]) -> EvalRunRecord:
        """Insert the run unless it exists; returns the stored row (a resume gets the original)."""
        self.execute(
            "INSERT INTO eval_runs (id, job_id, name, dataset_id, spec, status, created_at, "
            "updated_at) VALUES (?, ?, ?, ?, ?, 'running', ?, ?) ON CONFLICT (id) DO NOTHING",
            [run_id, job_id, name, dataset_id, json.dumps(spec), now(), now()])
        return self.get_eval_run(run_id)

    def get_eval_run(self, run_id: str) -> EvalRunRecord | None:
        rows = self.query(f"{EVAL_RUN_SELECT} WHERE r.id = ?", [run_id])
        return EvalRunRecord.from_row(rows[0]) if rows else None

    def set_eval_run_status(self, run_id: str, status: str) -> None:
        self.execute("UPDATE eval_runs SET status = ?, updated_at = ? WHERE id = ?",
                     [status, now(), run_id])

    def list_eval_runs(self, limit: int = 100) -> list[EvalRunRecord]:
        """Newest first, with answer/judgment counts (the job's progress is on its JobRecord)."""
        rows = self.query(f"{EVAL_RUN_SELECT} ORDER BY r.created_at DESC LIMIT ?", [limit])
        return [EvalRunRecord.from_row(r) for r in rows]

    def delete_eval_run(self, run_id: str) -> None:
        with self.transaction() as cur:
            for table, key in (("judgments", "run_id"), ("answers", "run_id"), ("eval_runs", "id")):
                cur.execute(f"DELETE FROM {table} WHERE {key} = ?", [run_id])

    def save_systems(self, systems: list[Any]) -> None:
        """Record each core.systems.System under its id (the label is refreshed, never a key)."""
        for system in systems:
            self.execute(
                "INSERT INTO systems (id, kind, model, adapter, rag, base_url, pipeline, label, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
                "label = excluded.label",
                [system.id, system.kind, system.model, system.adapter, system.rag, system.base_url,
                 system.pipeline, system.label, now()])

    def save_answer(self, run_id: str, example_id: str, system_id: str, answer: str, prompt: Any,
                    retrieved: Any, prompt_tokens: int, new_tokens: int, seconds: float,
                    error: str | None = None) -> None:
        self.execute(
            "INSERT INTO answers (run_id, example_id, system_id, answer, prompt, retrieved, "
            "prompt_tokens, new_tokens, seconds, error, created_at) VALUES "
            "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            [run_id, example_id, system_id, answer, _json_or_null(prompt), _json_or_null(retrieved),
             prompt_tokens, new_tokens, seconds, error, now()])

    def answer_keys(self, run_id: str) -> set[tuple[str, str]]:
        rows = self.query("SELECT example_id, system_id FROM answers WHERE run_id = ?", [run_id])
        return {(r["example_id"], r["system_id"]) for r in rows}

    def eval_answers(self, run_id: str) -> list[dict[str, Any]]:
        rows = self.query("SELECT a.*, s.label AS system FROM answers a LEFT JOIN systems s ON "
                          "s.id = a.system_id WHERE a.run_id = ? ORDER BY a.example_id, a.system_id",
                          [run_id])
        return [_decode_json(r, ("retrieved",)) for r in rows]

    def save_judgment(self, run_id: str, example_id: str, system_id: str, repeat: int,
                      judgment: dict[str, Any]) -> None:
        """`judgment`: metric, method, judge, prompt_hash, raw, parsed_scores, distribution,
        score, parse_failures, reasoning, mass (core.geval.Judgment.to_row())."""
        j = judgment
        self.execute(
            "INSERT INTO judgments (run_id, example_id, system_id, metric, repeat, method, judge, "
            "prompt_hash, raw, parsed_scores, distribution, score, parse_failures, reasoning, "
            "mass, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT DO NOTHING",
            [run_id, example_id, system_id, j["metric"], repeat, j["method"], j["judge"],
             j["prompt_hash"], _json_or_null(j["raw"]), _json_or_null(j["parsed_scores"]),
             _json_or_null(j["distribution"]), j["score"], j["parse_failures"], j["reasoning"],
             j["mass"], now()])

    def judgment_keys(self, run_id: str) -> set[tuple[str, str, str, int]]:
        rows = self.query("SELECT example_id, system_id, metric, repeat FROM judgments "
                          "WHERE run_id = ?", [run_id])
        return {(r["example_id"], r["system_id"], r["metric"], r["repeat"]) for r in rows}

    def eval_judgments(self, run_id: str) -> list[dict[str, Any]]:
        """Every judgment of a run with its system's label as `system` (the input of
        core.evalstats.summarize, which keys on system_id)."""
        rows = self.query("SELECT j.*, s.label AS system FROM judgments j LEFT JOIN systems s ON "
                          "s.id = j.system_id WHERE j.run_id = ? ORDER BY j.system_id, j.metric, "
                          "j.example_id, j.repeat", [run_id])
        return [_decode_json(r, ("raw", "parsed_scores", "distribution")) for r in rows]

    def eval_running_means(self, run_id: str) -> list[dict[str, Any]]:
        """Mean over items of each item's mean score so far, per (system, metric); the same rule
        as core.evalstats (parse failures left out)."""
        return self.query(
            "SELECT i.system_id, s.label AS system, i.metric, avg(i.item_score) AS mean, "
            "count(*) AS n FROM (SELECT system_id, metric, example_id, avg(score) AS item_score "
            "FROM judgments WHERE run_id = ? AND score IS NOT NULL GROUP BY ALL) i "
            "LEFT JOIN systems s ON s.id = i.system_id GROUP BY ALL ORDER BY i.system_id, i.metric",
            [run_id])

    def eval_items(self, run_id: str, system_id: str | None = None,
                   metric: str | None = None) -> list[dict[str, Any]]:
        """Drill-down: one row per (item, system, metric) with the question, reference answer,
        the system's answer, the mean score over repeats, every repeat's score and failures."""
        where, params = ["g.run_id = ?"], [run_id]
        for column, value in (("g.system_id", system_id), ("g.metric", metric)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        return self.query(
            "SELECT g.example_id, g.system_id, s.label AS system, g.metric, e.question, "
            "e.answer AS reference, a.answer, avg(g.score) AS score, "
            "list(g.score ORDER BY g.repeat) AS scores, "
            "count(*) AS judgments, sum(g.parse_failures) AS parse_failures, "
            "any_value(g.method) AS method, any_value(g.reasoning) AS reasoning "
            "FROM judgments g JOIN eval_runs r ON r.id = g.run_id "
            "LEFT JOIN systems s ON s.id = g.system_id "
            "LEFT JOIN answers a ON a.run_id = g.run_id AND a.example_id = g.example_id "
            "AND a.system_id = g.system_id "
            "LEFT JOIN examples e ON e.dataset_id = r.dataset_id AND e.id = g.example_id "
            f"WHERE {' AND '.join(where)} "
            "GROUP BY ALL ORDER BY g.system_id, g.metric, g.example_id", params)

    def export_eval_run(self, run_id: str, folder: str | Path, fmt: str = "csv") -> list[Path]:
        """Write the run's answers and judgments as <run>_answers.<fmt> and <run>_judgments.<fmt>."""
        if fmt not in ("csv", "parquet"):
            raise ValueError(f"Export format must be csv or parquet, not '{fmt}'.")
        if self.get_eval_run(run_id) is None:
            raise ValueError(f"No evaluation run with id '{run_id}'.")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for table in ("answers", "judgments"):
            path = inside(folder, f"{run_id}_{table}.{fmt}")
            relation = self._cursor().sql(
                f"SELECT * FROM {table} WHERE run_id = ? ORDER BY ALL", params=[run_id])
            (relation.write_csv if fmt == "csv" else relation.write_parquet)(str(path))
            paths.append(path)
        return paths

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


def _json_or_null(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


def _decode_json(row: dict[str, Any], columns: Iterable[str]) -> dict[str, Any]:
    for col in columns:
        if isinstance(row.get(col), str):
            row[col] = json.loads(row[col])
    return row


_store: Store | None = None
_store_lock = threading.Lock()


def get_store() -> Store:
    """The process-wide store on config.db_path()."""
    global _store
    with _store_lock:
        if _store is None or _store.path != config.db_path():
            _store = Store()
        return _store
