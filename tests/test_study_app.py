"""One tiny study on the 135M model (one dataset, sizes 4 and 8, two eval items, one repeat), run
ONCE through the app's named endpoints (gradio_client) and the CLI, killed -9 twice on the way:
started in the app, the app and its fine-tune child killed mid-training; the app restarted and
the study resumed there, stopped where the evaluation would start (the grid checked) and killed
after the evaluation's first judgment; resumed to the end by the CLI. Then: the killed fine-tune
resumed from its checkpoint, the adapters were not trained again, every answer and judgment key
was written exactly once, nothing finished was redone; the app's grid, figure and report, whose
numbers equal a SQL recomputation from the judgments table; the CLI's report on the same data; the
study's own rows and its HTML export. (The suite's one run of this study: keep it that way;
tests/test_study.py tests the spec and the plan without a model, tests/test_browser.py runs a
smaller, one-size study from the tab.)"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from contextlib import suppress
from pathlib import Path

import duckdb
import pytest
from gradio_client import Client

from core.model_files import SMOLLM2
from core.systems import BASE
from core.testhooks import GATE_ENV
from jobs.finetune import adapter_dir
from jobs.services import build_services
from jobs.study import StudySpec
from tests.app_server import REPO, app_process, running_app
from tests.gates import Gate
from tests.test_study import TINY

pytestmark = pytest.mark.integration
# a checkpoint after every step, so that the kill after step 1 leaves one to resume from
SPEC_DICT = {**TINY, "finetune": {**TINY["finetune"], "checkpoint_every": 1}}
SPEC = json.dumps(SPEC_DICT)


def cli(data: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DATA_DIR": str(data)}
    return subprocess.run([sys.executable, "-m", "jobs.study", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1800)


def records(table: dict) -> list[dict]:
    """A Dataframe output of gradio_client as rows."""
    return [dict(zip(table["headers"], row)) for row in table["data"]]


def sql(client: Client, query: str) -> list[dict]:
    table, _ = client.predict(query, api_name="/sql")
    return records(table)


def plotted(chart: dict) -> list[dict]:
    """The rows an Altair chart (a gr.Plot output) draws: every inline dataset's rows."""
    spec = json.loads(chart["plot"])
    return [row for rows in spec.get("datasets", {}).values() for row in rows]


def status(client: Client, job_id: str) -> tuple[str, list[dict], dict | None, list[dict]]:
    text, grid, chart, verdicts = client.predict(job_id, api_name="/study_status")
    return text, records(grid), chart, records(verdicts)


def adapter_files(names: list[str]) -> dict[str, bytes]:
    return {name: (adapter_dir(name) / "adapter_model.safetensors").read_bytes() for name in names}


def judgment_keys(data: Path) -> dict[str, int]:
    """Judgments and distinct judgment keys in the study's database, read while no app runs."""
    with duckdb.connect(str(data / "app.duckdb"), read_only=True) as db:
        n, keys = db.execute("SELECT count(*), count(DISTINCT (run_id, example_id, system_id, "
                             "metric, repeat)) FROM judgments").fetchone()
    return {"n": n, "keys": keys}


@pytest.mark.timeout(3000)  # three app starts, the CLI four times, two fine-tunes and 24 judgments
def test_a_tiny_study_killed_in_the_app_twice_and_finished_by_the_cli(tmp_path, monkeypatch):
    data, gates = tmp_path / "data", tmp_path / "gates"
    data.mkdir()
    monkeypatch.setenv("DATA_DIR", str(data))  # adapter_dir() reads the study's data dir
    spec_file = tmp_path / "tiny.json"
    spec_file.write_text(SPEC)
    spec = StudySpec.from_dict(SPEC_DICT)
    adapters = [spec.finetune_spec(SMOLLM2, "sample:nq", n, 0).name for n in (4, 8)]

    # 1. started in the app; the app and its fine-tune child killed after the first step
    step = Gate(gates, "finetune-step-1").arm()
    with app_process(data, env={GATE_ENV: str(gates)}) as (url, app):
        client = Client(url, verbose=False)
        shipped = client.predict("cpu-mini", api_name="/study_spec")
        assert json.loads(shipped) == json.loads((REPO / "studies" / "cpu-mini.json").read_text())
        plan, grid, _, _ = client.predict(SPEC, api_name="/study_plan")
        assert "4 steps (0 already done)" in plan and "12 answers, 24 judgments" in plan
        assert [(r["pairs"], r["fine-tune"], r["evaluation"]) for r in records(grid)] == [
            (4, "to do", "to do"), (8, "to do", "to do")]
        job_id, _ = client.predict(SPEC, api_name="/start_study")
        trainer = step.wait_reached(timeout=900, alive=lambda: app.poll() is None)
        assert trainer != app.pid  # a child process trains
        os.kill(app.pid, signal.SIGKILL)  # the app first: its runner records nothing more
        app.wait()
        with suppress(ProcessLookupError):  # the child may already be gone (it dies with the app)
            os.kill(trainer, signal.SIGKILL)
    checkpoint = adapter_dir(adapters[0]) / "checkpoints"
    assert [p.name for p in checkpoint.glob("step-*")] == ["step-000001"]  # killed mid-training
    assert not (adapter_dir(adapters[0]) / "metrics.json").exists()

    # 2. the app restarted, the study resumed there, stopped before its evaluation and killed
    #    after the evaluation's first judgment (the app itself judges)
    evaluate = Gate(gates, "study-evaluate").arm()
    with app_process(data, env={GATE_ENV: str(gates)}) as (url, app):
        client = Client(url, verbose=False)
        resumed_id, _ = client.predict(SPEC, api_name="/resume_study")
        assert resumed_id == job_id  # the interrupted study job, resumed
        assert evaluate.wait_reached(timeout=1800, alive=lambda: app.poll() is None) == app.pid
        text, grid, _, _ = status(client, job_id)
        assert "**running**" in text
        assert [(r["index"], r["fine-tune"], r["evaluation"]) for r in grid] == [
            ("done", "done", "queued")] * 2
        judged = Gate(gates, "eval-judgment").arm()
        evaluate.release()
        assert judged.wait_reached(timeout=900, alive=lambda: app.poll() is None) == app.pid
        os.kill(app.pid, signal.SIGKILL)
        app.wait()
    made = adapter_files(adapters)
    assert 1 <= judgment_keys(data)["n"] < 24  # killed mid-evaluation

    # 3. resumed to the end by the CLI, which prints the report
    resumed = cli(data, "resume", str(spec_file))
    assert resumed.returncode == 0, resumed.stderr[-3000:] + resumed.stdout[-2000:]
    assert f"study job {job_id}" in resumed.stdout
    text = resumed.stdout[resumed.stdout.index("# Study: tiny"):]  # the report, printed at the end
    assert "## sample:nq · smollm2-135m-instruct" in text and "Verdict:" in text
    assert adapter_files(adapters) == made  # the same adapters, not trained again
    assert judgment_keys(data) == {"n": 24, "keys": 24}  # 2 items x 6 systems x 2 metrics x 1

    # 4. the app on the finished study: grid, jobs, figure, verdicts, plan and report
    with running_app(data) as url:
        client = Client(url, verbose=False)
        status_text, grid, chart, verdicts = status(client, job_id)
        assert "**done**" in status_text
        assert [(r["index"], r["fine-tune"], r["evaluation"]) for r in grid] == [
            ("done", "done", "done")] * 2
        jobs = sql(client, "SELECT kind, status, attempts FROM jobs WHERE kind <> 'prepare' "
                           "ORDER BY kind, created_at")
        assert [(j["kind"], j["status"], j["attempts"]) for j in jobs] == [
            ("evaluate", "done", 2), ("finetune", "done", 2), ("finetune", "done", 1),
            ("index", "done", 1), ("study", "done", 3)]  # only the killed jobs ran twice
        [run] = sql(client, "SELECT id FROM eval_runs")
        keys = sql(client, "SELECT count(*) AS n, count(DISTINCT (example_id, system_id, metric, "
                           f"repeat)) AS k FROM judgments WHERE run_id = '{run['id']}'")
        assert keys == [{"n": 24, "k": 24}]  # 2 items x 6 systems x 2 metrics, one repeat
        # the figure's means, recomputed from the judgments: per item over repeats, then items
        means = {(r["adapter"], r["rag"], r["metric"]): (r["mean"], r["n"]) for r in sql(
            client, "SELECT s.adapter, s.rag, j.metric, avg(j.item) AS mean, count(*) AS n FROM "
                    "(SELECT system_id, metric, example_id, avg(score) AS item FROM judgments "
                    f"WHERE run_id = '{run['id']}' AND score IS NOT NULL GROUP BY ALL) AS j "
                    "JOIN systems AS s ON s.id = j.system_id GROUP BY ALL")}
        assert len(means) == 12  # 6 systems x 2 metrics
        drawn = plotted(chart)
        assert len(drawn) == 16  # 2 sizes x (fine-tuned + the base beside it) x RAG x 2 metrics
        for row in drawn:
            mean, n = means[(row["adapter"] or BASE, row["rag"], row["metric"])]
            assert row["mean"] == pytest.approx(mean, abs=1e-9) and row["n"] == n
        assert {(r["n_train"], r["system"]) for r in drawn} == {
            (0, "base"), (4, "fine-tuned"), (8, "fine-tuned")}
        assert len(verdicts) == 8 and all(v["verdict"] for v in verdicts)  # 2 sizes x RAG x 2

        plan, grid, _, _ = client.predict(SPEC, api_name="/study_plan")
        assert "4 steps (4 already done)" in plan
        assert {r["evaluation"] for r in records(grid)} == {"reused"}
        report = Path(client.predict(SPEC, "md", api_name="/study_report")).read_text()

    assert report.startswith("# Study: tiny\n") and "Verdict:" in report
    for verdict in verdicts:
        assert verdict["verdict"] in report
    out = data / "cli-report.md"
    printed = cli(data, "report", str(spec_file), "--out", str(out))
    assert printed.returncode == 0, printed.stderr[-3000:]
    assert out.read_text() == report  # the app's download and the CLI's report: the same file
    printed = cli(data, "report", str(spec_file))  # on stdout: the same text without the figure
    assert printed.returncode == 0 and "Verdict:" in printed.stdout, printed.stderr[-3000:]
    assert "## Figure" in report and "## Figure" not in printed.stdout

    # 5. the study's records through the services (no app runs now)
    services = build_services(warm_up=False)
    again = services.studies.plan(spec)  # everything exists: nothing to redo
    assert all(step.done for step in again.steps) and again.counts["finetunes"] == 0
    rows = services.studies.rows(spec)
    store = services.store
    assert {r["run_id"] for r in rows} == {run["id"]}
    run_jobs = {kind: [(j.status, j.attempts) for j in services.runner.jobs(kind)]
                for kind in ("study", "index", "finetune", "evaluate")}
    assert run_jobs == {"study": [("done", 3)], "index": [("done", 1)],
                        "finetune": [("done", 1), ("done", 2)], "evaluate": [("done", 2)]}
    killed = services.runner.jobs("finetune")[-1]
    assert killed.spec["name"] == adapters[0] and killed.result["metrics"]["resumed_from"] == [1]
    answers = store.query("SELECT count(*) AS n, count(DISTINCT (example_id, system_id)) AS keys "
                          "FROM answers WHERE run_id = ?", [run["id"]])[0]
    assert answers == {"n": 12, "keys": 12}
    # the report's means, recomputed from the judgments table: per item over repeats, then items
    by_id = {(r["system_id"], r["metric"]): (r["mean"], r["n"]) for r in store.query(
        "SELECT system_id, metric, avg(item) AS mean, count(*) AS n FROM (SELECT system_id, metric,"
        " example_id, avg(score) AS item FROM judgments WHERE run_id = ? AND score IS NOT NULL "
        "GROUP BY ALL) GROUP BY ALL", [run["id"]])}
    systems = {(s["adapter"], s["rag"]): s["id"]
               for s in store.get_eval_run(run["id"]).spec["systems"]}
    assert len(rows) == len(by_id) == 12  # 6 systems x 2 metrics
    for row in rows:
        mean, n = by_id[(systems[(row["adapter"] or BASE, row["rag"])], row["metric"])]
        assert row["mean"] == pytest.approx(mean) and row["n"] == n
        assert f"{row['mean']:.2f}" in text
        if row["system"] == "fine-tuned":
            base = next(r for r in rows if r["system"] == "base" and r["rag"] == row["rag"]
                        and r["metric"] == row["metric"])
            assert row["base_mean"] == base["mean"] and row["verdict"] in text
            if row["n_paired"] == row["n"] == base["n"]:  # every item scored on both sides
                assert row["diff"] == pytest.approx(row["mean"] - base["mean"])
    assert {r["size"] for r in rows} == {0, 4, 8}
    study = services.runner.jobs("study")[0].result
    assert [t["kind"] for t in study["step_times"]] == ["evaluate"]  # the last attempt's step
    assert set(study["seconds_by_kind"]) == {"evaluate"}
    page = services.studies.export(spec, "html").read_text()
    assert page.count('<img src="data:image/png;base64,') == 1
    assert all(f"{row['mean']:.2f}" in page for row in rows)
