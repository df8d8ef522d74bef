import duckdb
import pytest

from core import store as store_mod
from core.store import Store, StoreLockedError

EXPECTED_TABLES = {"datasets", "examples", "pipelines", "adapters", "jobs", "eval_runs", "answers",
                   "judgments", "votes", "schema_migrations"}


def test_migrations_create_every_table_and_record_versions(tmp_path):
    s = Store(tmp_path / "a.duckdb")
    tables = {r["table_name"] for r in s.query("SELECT table_name FROM information_schema.tables")}
    assert EXPECTED_TABLES <= tables
    versions = [v for v, _, _ in store_mod.migrations()]
    assert s.schema_version() == max(versions)
    assert [r["version"] for r in s.query("SELECT version FROM schema_migrations ORDER BY 1")] == versions


def test_migrate_is_idempotent_and_keeps_data(tmp_path):
    path = tmp_path / "a.duckdb"
    s = Store(path)
    job_id = s.create_job("index", {"x": 1})
    s.close()
    s2 = Store(path)
    assert s2.migrate() == []
    assert s2.get_job(job_id)["spec"] == {"x": 1}


def test_new_migration_is_applied_once(tmp_path, monkeypatch):
    path = tmp_path / "a.duckdb"
    Store(path).close()
    extra = tmp_path / "migrations"
    extra.mkdir()
    for p in store_mod.MIGRATIONS_DIR.glob("*.sql"):
        (extra / p.name).write_text(p.read_text())
    (extra / "999_add_note.sql").write_text("ALTER TABLE votes ADD COLUMN note VARCHAR;")
    monkeypatch.setattr(store_mod, "MIGRATIONS_DIR", extra)
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
    monkeypatch.setattr(store_mod, "MIGRATIONS_DIR", extra)
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
                         cwd=store_mod.config.REPO_DIR)
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
