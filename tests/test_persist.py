"""Results that survive a restart: a snapshot (every table as Parquet, the adapters' files) written
to a local folder standing in for the dataset repo, a fresh data dir restored from it on a real
DuckDB, the Evaluate tab's runs and summaries the same; a snapshot taken while jobs write is one
moment of the database; the scheduled upload (huggingface_hub's CommitScheduler) sends only what
changed. No model loads here, except in the one test on the running app."""
from __future__ import annotations

import json
import shutil
import threading

import pytest
from gradio_client import Client

from core import config, persistence
from core.snapshot import ADAPTER_FILES, MANIFEST, SnapshotError, read_manifest, restore_snapshot, write_snapshot
from core.store import Store
from core.systems import System
from jobs.finetune import _SUMMARY
from jobs.finetune_data import FinetuneSpec
from jobs.services import build_services
from tests.app_server import running_app
from tests.gates import Gate

BASE_SYS, TUNED = System(model="m"), System(model="m", adapter="ft-nq")


def judgment(score: float) -> dict:
    return {"metric": "accuracy", "method": "logprobs", "judge": "local:j", "prompt_hash": "h",
            "raw": {"reply": "4"}, "parsed_scores": [score], "distribution": {"4": 0.7, "5": 0.3},
            "score": score, "parse_failures": 0, "reasoning": None, "mass": 0.9}


def fill(store: Store, data_dir) -> str:
    """An evaluation run with answers and judgments, a trained adapter (with the checkpoints and
    stray files a folder can hold), an imported one, a saved pipeline, and a job whose child
    process was recorded."""
    store.save_dataset("sample:nq", "nq", "sample", [
        {"id": f"q{i}", "question": f"question {i}?", "answer": f"answer {i}", "contexts": ["c"],
         "split": "eval", "meta": {}} for i in range(3)], n_passages=3)
    run = store.create_job("evaluate", {"name": "first run"})  # a run's id is its job's
    store.update_job(run, status="done", progress=1.0)
    job = store.create_job("finetune", {"name": "ft-nq"})
    store.update_job(job, status="running", pid=4242, pgid=4242)
    store.save_systems([BASE_SYS, TUNED])
    store.create_eval_run(run, run, "first run", "sample:nq",
                          {"systems": [{**s.fields(), "id": s.id} for s in (BASE_SYS, TUNED)],
                           "metrics": ["accuracy"]})
    for i in range(3):
        for system, score in ((BASE_SYS, 4.0 + i / 4), (TUNED, 3.0 + i / 3)):
            store.save_answer(run, f"q{i}", system.id, f"ans {i}", [{"role": "user", "content": "q"}],
                              None, 10, 3, 0.5)
            store.save_judgment(run, f"q{i}", system.id, 0, judgment(score))
    store.set_eval_run_status(run, "done")
    folder = data_dir / "adapters" / "ft-nq"
    (folder / "checkpoints" / "step-000002").mkdir(parents=True)
    (folder / "checkpoints" / "step-000002" / "optimizer.pt").write_bytes(b"optimizer")
    (folder / "notes.env").write_text("HF_TOKEN=hf_not_for_the_repo")
    for name in ADAPTER_FILES:
        (folder / name).write_text(json.dumps({"file": name}))
    (folder / "adapter_model.safetensors").write_bytes(b"adapter weights")
    (folder / "train_ids.json").write_text(json.dumps({"dataset_id": "sample:nq", "train": ["q7", "q8"]}))
    (folder / "spec.json").write_text(json.dumps(
        FinetuneSpec.from_dict({"name": "ft-nq", "base_model": "m", "dataset": "nq", "n_train": 16}).to_dict()))
    (folder / "metrics.json").write_text(json.dumps({key: 1.5 for key in _SUMMARY}))
    store.upsert_adapter("ft-nq", "m", str(folder), {"n_train": 16}, {"final_train_loss": 1.5}, job)
    store.upsert_adapter("from-hub", "m", "someone/lora")
    (data_dir / "pipelines").mkdir()
    for name in ("nq-bm25.json", "nq-bm25.yaml", "notes.txt"):
        (data_dir / "pipelines" / name).write_text(f"{name} text")
    store.save_pipeline("nq-bm25", {"name": "nq-bm25"}, "nq-bm25.yaml text")
    return run


def table_rows(store: Store) -> dict[str, list]:
    names = [r["table_name"] for r in store.query(
        "SELECT table_name FROM duckdb_tables() WHERE table_name <> 'schema_migrations'")]
    return {name: store.query(f'SELECT * EXCLUDE ({", ".join(ignored(name))}) FROM "{name}" ORDER BY ALL')
            if ignored(name) else store.query(f'SELECT * FROM "{name}" ORDER BY ALL') for name in names}


def ignored(table: str) -> list[str]:
    return {"adapters": ["path"], "jobs": ["pid", "pgid"]}.get(table, [])


@pytest.fixture
def source(tmp_path, monkeypatch):
    data = tmp_path / "before"
    monkeypatch.setenv("DATA_DIR", str(data))
    store = Store(config.db_path())
    run = fill(store, data)
    yield store, data, run
    store.close()


def test_a_fresh_data_dir_restored_from_the_snapshot_shows_the_same_runs(source, tmp_path, monkeypatch):
    store, before, run = source
    repo = tmp_path / "repo"  # stands in for the dataset repo's files
    manifest = write_snapshot(store, before, repo)
    snapshotted = table_rows(store)
    assert manifest["tables"]["judgments"] == 6 and manifest["adapters"] == {"ft-nq": list(ADAPTER_FILES)}
    shipped = sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file())
    assert "adapters/ft-nq/notes.env" not in shipped and not any("checkpoints" in p for p in shipped)
    assert sorted(p for p in shipped if p.startswith("adapters/")) == sorted(
        f"adapters/ft-nq/{name}" for name in ADAPTER_FILES)
    assert manifest["pipelines"] == ["nq-bm25.json", "nq-bm25.yaml"]
    services = build_services(warm_up=False, store=store)  # marks the running job interrupted
    runs, summary = services.evaluations.runs(), services.evaluations.summary(run, n_boot=200)

    after = tmp_path / "after"
    monkeypatch.setenv("DATA_DIR", str(after))
    restore_snapshot(repo, after)
    restored = Store(config.db_path())
    try:
        assert table_rows(restored) == snapshotted
        rows = {r.name: r.path for r in restored.list_adapters()}
        assert rows == {"ft-nq": str(after / "adapters" / "ft-nq"), "from-hub": "someone/lora"}
        assert (after / "adapters" / "ft-nq" / "adapter_model.safetensors").read_bytes() == \
            b"adapter weights"
        assert sorted(p.name for p in (after / "pipelines").iterdir()) == ["nq-bm25.json", "nq-bm25.yaml"]
        assert restored.job_processes() == []  # no pid from the old machine gets signalled here
        again = build_services(warm_up=False, store=restored)
        assert again.adapters.sync() == []  # the restored folder is the restored row
        assert [(r.id, r.name, r.status, r.n_answers, r.n_judgments) for r in again.evaluations.runs()] == \
            [(r.id, r.name, r.status, r.n_answers, r.n_judgments) for r in runs]
        assert again.evaluations.summary(run, n_boot=200) == summary
        assert again.adapters.training_ids("ft-nq") == ("sample:nq", {"q7", "q8"})
    finally:
        restored.close()


def test_a_snapshot_is_one_moment_while_jobs_write(source, tmp_path, monkeypatch):
    store, before, run = source
    gates = tmp_path / "gates"
    monkeypatch.setenv("LAB_TEST_GATE_DIR", str(gates))
    gate = Gate(gates, "snapshot-tables").arm()
    snapshot = threading.Thread(target=write_snapshot, args=(store, before, tmp_path / "repo"))
    snapshot.start()
    gate.wait_reached(timeout=60, alive=snapshot.is_alive)  # the first table is written
    store.create_eval_run("run-2", None, "second run", "sample:nq", {"systems": []})
    store.save_judgment(run, "q0", BASE_SYS.id, 1, judgment(1.0))
    gate.release()
    snapshot.join(60)
    manifest = read_manifest(tmp_path / "repo")
    assert manifest["tables"]["judgments"] == 6 and manifest["tables"]["eval_runs"] == 1
    assert store.query("SELECT count(*) AS n FROM judgments") == [{"n": 7}]


def test_an_older_snapshot_gets_the_current_migrations(tmp_path):
    old = Store(tmp_path / "old.duckdb", upto=5)  # before jobs had pid/pgid (006)
    job = old.create_job("evaluate", {"name": "x"})
    write_snapshot(old, tmp_path, tmp_path / "repo")
    old.close()
    assert read_manifest(tmp_path / "repo")["schema_version"] == 5
    restore_snapshot(tmp_path / "repo", tmp_path / "new")
    new = Store(tmp_path / "new" / "app.duckdb")
    try:
        assert new.schema_version() == Store(tmp_path / "fresh.duckdb").schema_version()
        assert new.get_job(job).status == "queued"
        assert new.query("SELECT pid FROM jobs") == [{"pid": None}]
    finally:
        new.close()


def test_a_restore_refuses_an_existing_database_or_a_broken_snapshot(source, tmp_path):
    store, before, run = source
    repo = tmp_path / "repo"
    write_snapshot(store, before, repo)
    with pytest.raises(SnapshotError, match="never overwrites"):
        restore_snapshot(repo, before)
    target = tmp_path / "new" / "app.duckdb"
    target.parent.mkdir()
    manifest = json.loads((repo / MANIFEST).read_text())
    (repo / MANIFEST).write_text(json.dumps({**manifest, "tables": {**manifest["tables"], "judgments": 99}}))
    with pytest.raises(SnapshotError, match="judgments.parquet holds 6 rows; the manifest says 99"):
        restore_snapshot(repo, target.parent)
    assert not target.exists() and list(target.parent.iterdir()) == []  # whole or nothing
    (repo / MANIFEST).write_text(json.dumps({**manifest, "adapters": {"../escape": ["spec.json"]}}))
    with pytest.raises(ValueError):
        restore_snapshot(repo, target.parent)
    (repo / MANIFEST).write_text(json.dumps({**manifest, "schema_version": 999}))
    with pytest.raises(SnapshotError, match="Update the app first"):
        restore_snapshot(repo, target.parent)


class RecordingApi:
    """Stands in for huggingface_hub.HfApi (no network here): records the commits."""

    def __init__(self) -> None:
        self.commits: list[list[str]] = []

    def create_repo(self, repo_id, private=None, repo_type=None, exist_ok=False):
        from huggingface_hub import RepoUrl
        return RepoUrl(f"https://huggingface.co/datasets/{repo_id}")

    def create_commit(self, repo_id, repo_type, operations, commit_message, revision):
        assert repo_type == "dataset"
        self.commits.append(sorted(op.path_in_repo for op in operations))
        return commit_message

    def run_as_future(self, fn):  # the scheduler's own pushes: the test pushes by hand instead
        from concurrent.futures import Future
        future = Future()
        future.set_result(None)
        return future


def test_the_scheduled_upload_writes_the_snapshot_and_sends_only_what_changed(source, tmp_path):
    store, before, run = source
    api = RecordingApi()
    scheduler = persistence.SnapshotScheduler(store, before, repo_id="me/lab-results",
                                              folder_path=tmp_path / "snapshot", every=0.001, hf_api=api)
    try:
        scheduler.push_to_hub()
        assert MANIFEST in api.commits[0] and "tables/judgments.parquet" in api.commits[0]
        assert "adapters/ft-nq/adapter_model.safetensors" in api.commits[0]
        assert scheduler.push_to_hub() is None and len(api.commits) == 1  # nothing changed
        store.save_judgment(run, "q1", TUNED.id, 1, judgment(2.0))
        scheduler.push_to_hub()
        assert api.commits[1] == [MANIFEST, "tables/judgments.parquet"]
    finally:
        scheduler.stop()
        scheduler._scheduler_thread.join(10)  # its loop ends within `every`; nothing outlives the test


def test_at_start_an_empty_data_dir_is_restored_and_a_full_one_left_alone(source, tmp_path, monkeypatch):
    store, before, run = source
    repo = tmp_path / "repo"
    write_snapshot(store, before, repo)
    calls = []

    def download(repo_id, repo_type, local_dir, token):  # the dataset repo, as a local folder
        calls.append((repo_id, repo_type, token))
        shutil.copytree(repo, local_dir, dirs_exist_ok=True)

    env = {"PERSIST_REPO": "me/lab-results", "HF_TOKEN": "hf_operator"}
    assert persistence.restore_at_start(env, download).restored is None and calls == []  # has a db
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "after"))
    state = persistence.restore_at_start(env, download)
    assert calls == [("me/lab-results", "dataset", "hf_operator")] and state.error is None
    assert state.restored["tables"]["judgments"] == 6 and config.db_path().is_file()

    monkeypatch.setenv("DATA_DIR", str(tmp_path / "broken"))
    (repo / "tables" / "judgments.parquet").write_bytes(b"not parquet")
    state = persistence.restore_at_start(env, download)
    assert "restore failed" in state.error and not config.db_path().exists()
    state.start(store)  # a failed restore never uploads over the repo's results
    assert state.scheduler is None and "failed" in state.banner({"SPACE_ID": "me/lab"})


def test_the_storage_line_says_where_results_go(monkeypatch, tmp_path):
    monkeypatch.setattr(config, "SPACE_VOLUME", tmp_path / "absent")
    space = {"SPACE_ID": "me/lab"}
    assert persistence.repo_of({**space, "PERSIST_REPO": " me/lab-results "}) == "me/lab-results"
    assert persistence.repo_of(space) is None
    with pytest.raises(ValueError):
        persistence.repo_of({"PERSIST_REPO": "../etc"})
    saving = persistence.Persistence(repo="me/lab-results", every=5.0)
    assert "me/lab-results" in saving.banner(space) and "every 5 min" in saving.banner(space)
    failed = persistence.Persistence(repo="me/lab-results", every=5.0, error="401 Unauthorized")
    assert "401 Unauthorized" in failed.banner(space) and "vanish" in failed.banner(space)
    assert "vanish" in persistence.Persistence().banner(space)
    assert persistence.Persistence().banner({}) is None  # off a Space the disk is the operator's


def test_the_app_shows_where_results_are_saved(source):
    from app import build_app

    store, _, _ = source
    demo = build_app(build_services(warm_up=False, store=store),
                     persistence.Persistence(repo="me/lab-results", every=5.0))
    markdown = [c["props"].get("value") for c in demo.config["components"] if c["type"] == "markdown"]
    assert any("me/lab-results" in str(text) for text in markdown)


@pytest.mark.integration
def test_the_running_app_on_a_restored_data_dir_lists_the_same_runs(source, tmp_path, monkeypatch):
    store, before, run = source
    write_snapshot(store, before, tmp_path / "repo")
    services = build_services(warm_up=False, store=store)
    expected = [[r.id, r.name] for r in services.evaluations.runs()]
    after = tmp_path / "after"
    after.mkdir()
    restore_snapshot(tmp_path / "repo", after)
    with running_app(after) as url:
        client = Client(url, verbose=False)
        choices = client.view_api(return_format="dict")  # the app answers its API
        assert "/list_runs" in choices["named_endpoints"]
        listed = client.predict(api_name="/list_runs")
        assert [c[1] for c in listed["choices"]] == [run_id for run_id, _ in expected]
        table = client.predict(run, api_name="/eval_summary")
        assert "ft-nq" in json.dumps(table) and "4.25" in json.dumps(table)
