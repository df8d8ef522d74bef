from datetime import datetime

import duckdb
import pytest

from core import config
from core.records import JobRecord
from core.store import Store, database

EXPECTED_TABLES = {"datasets", "examples", "pipelines", "adapters", "jobs", "eval_runs", "answers", "systems",
                   "judgments", "votes", "schema_migrations"}


def test_migrations_create_every_table_and_record_versions(tmp_path):
    s = Store(tmp_path / "a.duckdb")
    tables = {r["table_name"] for r in s.query("SELECT table_name FROM information_schema.tables")}
    assert EXPECTED_TABLES <= tables
    versions = [v for v, _, _ in database.migrations()]
    assert s.schema_version() == max(versions)
    assert [r["version"] for r in s.query("SELECT version FROM schema_migrations ORDER BY 1")] == versions


def test_migrate_is_idempotent_and_keeps_data(tmp_path):
    path = tmp_path / "a.duckdb"
    s = Store(path)
    job_id = s.create_job("index", {"x": 1})
    s.close()
    s2 = Store(path)
    assert s2.migrate() == []
    assert s2.get_job(job_id).spec == {"x": 1}


def test_rows_come_back_as_typed_records(tmp_path):
    s = Store(tmp_path / "a.duckdb")
    job_id = s.create_job("index", {"x": 1})
    s.update_job(job_id, status="done", progress=1.0, result={"chunks": 3})
    job = s.get_job(job_id)
    assert isinstance(job, JobRecord) and s.list_jobs() == [job]
    assert (job.spec, job.result, job.error, job.attempts) == ({"x": 1}, {"chunks": 3}, None, 0)
    assert isinstance(job.created_at, datetime) and isinstance(job.progress, float)
    columns = [r["column_name"] for r in s.query(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'jobs' "
        "ORDER BY ordinal_position")]
    assert list(job.to_dict()) == columns  # every column, no more
    s.upsert_adapter("a1", "m", "/p", spec=None, metrics={"n_train": 8})
    (adapter,) = s.list_adapters()
    assert (adapter.name, adapter.spec, adapter.metrics) == ("a1", None, {"n_train": 8})
    run = s.create_eval_run("r1", job_id, "run", "sample:nq", {"systems": []})
    s.save_answer("r1", "q1", "sys", "a", None, None, 1, 1, 0.1)
    assert s.list_eval_runs() == [s.get_eval_run("r1")]
    assert (run.spec, run.n_answers, s.get_eval_run("r1").n_answers) == ({"systems": []}, 0, 1)
    assert s.get_job("missing") is None and s.get_eval_run("missing") is None


def test_new_migration_is_applied_once(tmp_path, monkeypatch):
    path = tmp_path / "a.duckdb"
    Store(path).close()
    extra = tmp_path / "migrations"
    extra.mkdir()
    for p in database.MIGRATIONS_DIR.glob("[0-9]*"):
        (extra / p.name).write_text(p.read_text())
    (extra / "999_add_note.sql").write_text("ALTER TABLE votes ADD COLUMN note VARCHAR;")
    monkeypatch.setattr(database, "MIGRATIONS_DIR", extra)
    s = Store(path)
    assert s.schema_version() == 999
    cols = {r["column_name"] for r in s.query(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'votes'")}
    assert "note" in cols
    assert s.migrate() == []


def test_failed_migration_rolls_back(tmp_path, monkeypatch):
    extra = tmp_path / "migrations"
    extra.mkdir()
    (extra / "001_bad.sql").write_text("CREATE TABLE t (a INT); SELECT * FROM no_such_table;")
    monkeypatch.setattr(database, "MIGRATIONS_DIR", extra)
    with pytest.raises(duckdb.Error):
        Store(tmp_path / "a.duckdb")
    monkeypatch.undo()
    s = Store(tmp_path / "a.duckdb")
    assert not s.query("SELECT * FROM information_schema.tables WHERE table_name = 't'")


def test_second_process_gets_clear_lock_error(tmp_path):
    import subprocess, sys
    path = tmp_path / "a.duckdb"
    s = Store(path)
    code = ("import sys; from core.store import Store, StoreLockedError\n"
            f"try:\n    Store({str(path)!r})\nexcept StoreLockedError as e:\n    print('LOCKED', e); sys.exit(0)\n"
            "sys.exit(1)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=config.REPO_DIR)
    assert out.returncode == 0, out.stderr
    assert "in use by another process" in out.stdout
    s.close()


def test_save_dataset_replaces_examples(tmp_path):
    s = Store(tmp_path / "a.duckdb")
    ex = [{"id": "1", "question": "q", "answer": "a", "contexts": ["c"], "split": "train"}]
    s.save_dataset("sample:x", "x", "sample", ex, n_passages=1)
    s.save_dataset("sample:x", "x", "sample", ex * 1 + [{**ex[0], "id": "2", "split": "eval"}], 1)
    assert s.query("SELECT count(*) AS n FROM examples")[0]["n"] == 2
    assert s.list_datasets()[0]["n_examples"] == 2


def test_system_ids_migration_converts_label_keyed_rows(tmp_path, monkeypatch):
    """A database from before migration 004 (answers and judgments keyed by a display label)
    keeps every row, now under the system's stable id; the run's spec lists the ids."""
    import json

    from core.systems import System

    old = tmp_path / "old-migrations"
    old.mkdir()
    for p in sorted(database.MIGRATIONS_DIR.glob("[0-9]*"))[:2]:  # 001 and 002 only
        (old / p.name).write_text(p.read_text())
    monkeypatch.setattr(database, "MIGRATIONS_DIR", old)
    path = tmp_path / "a.duckdb"
    s = Store(path)
    systems = [{"kind": "local", "model": "m", "adapter": "__base__", "rag": False, "base_url": None,
                "label": "m (base) · no RAG"},
               {"kind": "local", "model": "m", "adapter": "ft", "rag": True, "base_url": None,
                "label": "ft · RAG"}]
    s.execute("INSERT INTO eval_runs (id, name, dataset_id, spec, status) VALUES "
              "('r1', 'old run', 'sample:nq', ?, 'done')",
              [json.dumps({"pipeline": "p", "systems": systems})])
    for label in ("m (base) · no RAG", "ft · RAG", "vanished · RAG"):
        s.execute("INSERT INTO answers (run_id, example_id, system, answer) VALUES ('r1', 'q1', ?, 'a')",
                  [label])
        s.execute("INSERT INTO judgments (run_id, example_id, system, metric, repeat, method, judge, "
                  "score) VALUES ('r1', 'q1', ?, 'accuracy', 0, 'logprobs', 'j', 4.0)", [label])
    s.close()
    monkeypatch.undo()
    s = Store(path)
    base, tuned = System(model="m"), System(model="m", adapter="ft", rag=True, pipeline="p")
    ids = {r["system_id"] for r in s.query("SELECT system_id FROM judgments")}
    assert ids == {base.id, tuned.id, "legacy-vanished · RAG"}
    assert {r["system_id"] for r in s.query("SELECT system_id FROM answers")} == ids
    stored = s.query("SELECT id, adapter, rag, pipeline FROM systems ORDER BY adapter")
    assert stored == [{"id": base.id, "adapter": "__base__", "rag": False, "pipeline": None},
                      {"id": tuned.id, "adapter": "ft", "rag": True, "pipeline": "p"}]
    spec = s.get_eval_run("r1").spec
    assert [d["id"] for d in spec["systems"]] == [base.id, tuned.id]
    s.save_judgment("r1", "q1", base.id, 0, {"metric": "accuracy", "method": "logprobs", "judge": "j",
                                               "prompt_hash": None, "raw": None, "parsed_scores": None,
                                               "distribution": None, "score": 1.0, "parse_failures": 0,
                                               "reasoning": None, "mass": None})
    assert s.query("SELECT score FROM judgments WHERE system_id = ?", [base.id]) == [{"score": 4.0}]


def test_transaction_rolls_back_on_error(tmp_path):
    s = Store(tmp_path / "a.duckdb")
    with pytest.raises(ZeroDivisionError):
        with s.transaction() as cur:
            cur.execute("INSERT INTO votes (id, question, systems, answers, choice) "
                        "VALUES ('v', 'q', '[]', '[]', 'tie')")
            1 / 0
    assert s.query("SELECT count(*) AS n FROM votes") == [{"n": 0}]
