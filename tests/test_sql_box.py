"""The SQL box's sandbox (core/sqlbox.py) on a real DuckDB file: visitors' SQL reads the app's
tables and nothing else (no files, extensions, settings or writes), one statement at a time, stopped
after its time limit and cut at its row cap; the app's own connection keeps writing exports. One
test drives the refusals through the running app's /sql endpoint."""
from __future__ import annotations

import duckdb
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from core.sqlbox import ReadOnlyQueryError, SqlBox
from core.store import Store
from tests.app_server import running_app


@pytest.fixture
def store(tmp_path):
    store = Store(tmp_path / "app.duckdb")
    store.create_job("evaluate", {"name": "first"})
    store.create_job("finetune", {"name": "second"})
    yield store
    store.close()


@pytest.fixture
def box(store):
    box = SqlBox(store, timeout_s=60, max_rows=3)
    yield box
    box.close()


def test_a_select_over_the_app_tables_returns_rows(box):
    result = box.run("SELECT kind, count(*) AS n FROM jobs GROUP BY ALL ORDER BY kind")
    assert result.columns == ["kind", "n"]
    assert result.rows == [("evaluate", 1), ("finetune", 1)] and not result.cut
    assert result.note() == "2 rows."
    assert box.run("SHOW TABLES").rows[0] == ("adapters",)
    assert box.run("SELECT database_name FROM duckdb_tables()").rows[0] == ("app",)
    assert box.run("WITH t AS (SELECT 2 AS x) SELECT x FROM t").rows == [(2,)]
    assert box.run("SELECT count(*) FROM duckdb_columns() WHERE table_name = 'jobs'").rows[0][0] > 3


def test_the_copy_follows_the_stores_writes(store, box):
    assert box.run("SELECT count(*) FROM jobs").rows == [(2,)]
    store.create_job("evaluate", {"name": "third"})
    assert box.run("SELECT count(*) FROM jobs").rows == [(3,)]


def test_the_row_cap_cuts_and_says_so(box):
    result = box.run("SELECT * FROM range(10)")
    assert result.rows == [(0,), (1,), (2,)] and result.cut
    assert result.note() == ("Showing the first 3 rows: the result was cut at the SQL box's row "
                             "limit (SQL_MAX_ROWS).")
    assert not box.run("SELECT * FROM range(3)").cut


def test_a_runaway_query_is_stopped_at_the_time_limit(store):
    box = SqlBox(store, timeout_s=0.5)
    with pytest.raises(ReadOnlyQueryError,
                       match=r"^Query stopped after 0\.5 s: the SQL box's time limit \(SQL_TIMEOUT_S\)\.$"):
        box.run("SELECT count(*) FROM range(1000000000000)")
    assert box.run("SELECT 1").rows == [(1,)]
    box.close()
    assert not box.path.parent.exists()


def test_a_query_over_the_memory_limit_is_refused(store):
    box = SqlBox(store, memory_limit="64MB")
    with pytest.raises(ReadOnlyQueryError, match=r"^The query needs more memory than the SQL box "
                                                 r"allows \(64MB, SQL_MEMORY_LIMIT\)\.$"):
        box.run("SELECT list(range) FROM range(100000000)")
    box.close()


REFUSALS = [
    ("SELECT content FROM read_text('/proc/self/environ')",
     r"^read_text\(\) reads files: the SQL box reads only the app's own tables\.$"),
    ("SELECT * FROM read_csv('/etc/passwd')", r"^read_csv\(\) reads files"),
    ("SELECT * FROM glob('/root/*')", r"^glob\(\) reads files"),
    ("SELECT (SELECT count(*) FROM read_blob('/etc/hostname')) AS n", r"^read_blob\(\) reads files"),
    ("SELECT * FROM '/etc/passwd'", r"^'/etc/passwd' looks like a file or URL"),
    ("SELECT * FROM query('SELECT 1')", r"^The table function query\(\) is not available"),
    ("ATTACH '/tmp/other.duckdb' AS other",
     r"^ATTACH is not allowed: the SQL box reads only the app's own tables\.$"),
    ("DETACH other", r"^DETACH is not allowed"),
    ("INSTALL httpfs", r"^INSTALL is not allowed: the SQL box cannot install or load extensions\.$"),
    ("LOAD httpfs", r"^LOAD is not allowed: the SQL box cannot install or load extensions\.$"),
    ("COPY jobs TO '{tmp}/out.csv'", r"^COPY is not allowed: the SQL box neither reads nor writes files"),
    ("EXPORT DATABASE '{tmp}/dump'", r"^EXPORT is not allowed: the SQL box neither reads nor writes"),
    ("IMPORT DATABASE '{tmp}/dump'", r"^IMPORT is not allowed"),
    ("SET enable_external_access = true", r"^SET is not allowed: the SQL box's settings are fixed\.$"),
    ("RESET memory_limit", r"^RESET is not allowed: the SQL box's settings are fixed\.$"),
    ("SELECT current_setting('secret_directory')",
     r"^current_setting\(\) is not available: the SQL box's settings are fixed\.$"),
    ("SELECT * FROM duckdb_settings()", r"^The table function duckdb_settings\(\) is not available"),
    ("PRAGMA version", r"^PRAGMA is not allowed: use SELECT on DuckDB's catalog functions"),
    ("CALL pragma_version()", r"^CALL is not allowed"),
    ("SELECT 1; DROP TABLE jobs",
     r"^Give exactly one statement \(got 2\): the SQL box runs one SELECT at a time\.$"),
    ("", r"^Give exactly one statement \(got 0\)"),
    ("DELETE FROM jobs", r"^Only SELECT queries are allowed here, not DELETE: the SQL box is read-only\.$"),
    ("CREATE TABLE pwned AS SELECT 1", r"not CREATE: the SQL box is read-only"),
    ("UPDATE EXTENSIONS", r"not UPDATE: the SQL box is read-only"),
    ("SELEC 1", r"^The SQL does not parse: Parser Error: syntax error at or near \"SELEC\"$"),
]


@pytest.mark.parametrize("sql, message", REFUSALS)
def test_each_escape_is_refused_with_its_reason(box, tmp_path, sql, message):
    with pytest.raises(ReadOnlyQueryError, match=message):
        box.run(sql.format(tmp=tmp_path))
    assert not (tmp_path / "out.csv").exists() and not (tmp_path / "dump").exists()


def test_the_sandbox_itself_refuses_files_extensions_and_settings(box):
    """Below the checks: the instance's own settings refuse what a missed check would let through."""
    sandbox = box.sandbox()
    with pytest.raises(duckdb.PermissionException, match="disabled by configuration"):
        sandbox.execute("SELECT content FROM read_text('/proc/self/environ')")
    with pytest.raises(duckdb.PermissionException, match="disabled through configuration"):
        sandbox.execute("LOAD httpfs")
    with pytest.raises(duckdb.InvalidInputException, match="the configuration has been locked"):
        sandbox.execute("SET enable_external_access = true")
    with pytest.raises(duckdb.InvalidInputException, match="attached in read-only mode"):
        sandbox.execute("DELETE FROM jobs")


def test_the_apps_own_connection_still_exports(store, box, tmp_path):
    store.create_eval_run("run-1", None, "run", "sample:nq", {})
    store.save_answer("run-1", "q1", "sys", "an answer", None, None, 3, 2, 0.1)
    assert box.run("SELECT answer FROM answers").rows == [("an answer",)]
    paths = store.export_eval_run("run-1", tmp_path / "exports", "parquet")
    paths += store.export_eval_run("run-1", tmp_path / "exports", "csv")
    assert [p.name for p in paths] == ["run-1_answers.parquet", "run-1_judgments.parquet",
                                       "run-1_answers.csv", "run-1_judgments.csv"]
    assert duckdb.sql(f"SELECT answer FROM '{paths[0]}'").fetchall() == [("an answer",)]


@pytest.mark.integration
def test_the_apps_sql_endpoint_refuses_escapes_and_leaves_the_tables(tmp_path):
    settings = {"SQL_TIMEOUT_S": "0.5", "SQL_MAX_ROWS": "50", "SQL_BOX_CANARY": "canary-4242"}
    with running_app(tmp_path, env=settings) as url:
        client = Client(url, verbose=False)
        tables = "SELECT table_name FROM duckdb_tables() ORDER BY ALL"
        before, _ = client.predict(tables, api_name="/sql")
        assert ["jobs"] in before["data"]
        for sql, message in (
                ("SELECT content FROM read_text('/proc/self/environ')", r"read_text\(\) reads files"),
                ("SELECT * FROM read_csv('/etc/passwd')", r"read_csv\(\) reads files"),
                ("SELECT * FROM glob('/root/*')", r"glob\(\) reads files"),
                (f"ATTACH '{tmp_path}/other.duckdb' AS other", "ATTACH is not allowed"),
                (f"COPY jobs TO '{tmp_path}/out.csv'", "COPY is not allowed"),
                ("SET enable_external_access = true", "SET is not allowed"),
                ("SELECT 1; DROP TABLE jobs", r"exactly one statement \(got 2\)"),
                ("DROP TABLE votes", "read-only"),
                ("SELECT count(*) FROM range(1000000000000)", r"Query stopped after 0\.5 s")):
            with pytest.raises(AppError, match=message) as refused:
                client.predict(sql, api_name="/sql")
            assert "canary-4242" not in str(refused.value)
        after, _ = client.predict(tables, api_name="/sql")
        assert after["data"] == before["data"]
        assert not (tmp_path / "out.csv").exists() and not (tmp_path / "other.duckdb").exists()
        cut, note = client.predict("SELECT * FROM range(5000)", api_name="/sql")
        assert len(cut["data"]) == 50 and "the result was cut" in note
