"""One tiny study on the 135M model (one dataset, sizes 4 and 8, two eval items, one repeat),
run ONCE through the app's named endpoints (gradio_client) and the CLI: started in the app, the
app killed (-9) where the evaluation would start, resumed by the CLI; then the app's grid, figure
and report, whose numbers equal a SQL recomputation from the judgments table, and the CLI's
report on the same data. (The only full study run of the test suite: keep it that way.)"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from gradio_client import Client

from core.testhooks import GATE_ENV
from tests.app_server import REPO, running_app
from tests.gates import Gate
from tests.test_study import TINY

pytestmark = pytest.mark.integration
SPEC = json.dumps(TINY)


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


@pytest.mark.timeout(2400)  # about 10 min on an idle 2-core machine; two fine-tunes dominate
def test_a_tiny_study_through_the_app_and_the_cli(tmp_path):
    data, gates = tmp_path / "data", tmp_path / "gates"
    data.mkdir()
    spec_file = tmp_path / "tiny.json"
    spec_file.write_text(SPEC)
    evaluate = Gate(gates, "study-evaluate").arm()
    with running_app(data, env={GATE_ENV: str(gates)}) as url:
        client = Client(url, verbose=False)
        shipped = client.predict("cpu-mini", api_name="/study_spec")
        assert json.loads(shipped) == json.loads((REPO / "studies" / "cpu-mini.json").read_text())
        plan, grid, _, _ = client.predict(SPEC, api_name="/study_plan")
        assert "4 steps (0 already done)" in plan and "12 answers, 24 judgments" in plan
        assert [(r["pairs"], r["fine-tune"], r["evaluation"]) for r in records(grid)] == [
            (4, "to do", "to do"), (8, "to do", "to do")]
        job_id, _ = client.predict(SPEC, api_name="/start_study")
        app_pid = evaluate.wait_reached(timeout=1800)  # index and both fine-tunes done in the app
        text, grid, _, _ = status(client, job_id)
        assert "**running**" in text
        assert [(r["index"], r["fine-tune"], r["evaluation"]) for r in grid] == [
            ("done", "done", "queued")] * 2
        os.kill(app_pid, signal.SIGKILL)

    resumed = cli(data, "resume", str(spec_file))  # the interrupted study job, resumed
    assert resumed.returncode == 0, resumed.stderr[-3000:] + resumed.stdout[-2000:]
    assert f"study job {job_id}" in resumed.stdout

    with running_app(data) as url:
        client = Client(url, verbose=False)
        text, grid, chart, verdicts = status(client, job_id)
        assert "**done**" in text
        assert [(r["index"], r["fine-tune"], r["evaluation"]) for r in grid] == [
            ("done", "done", "done")] * 2
        jobs = sql(client, "SELECT kind, status, attempts FROM jobs WHERE kind <> 'prepare' "
                           "ORDER BY kind, created_at")
        assert [(j["kind"], j["status"], j["attempts"]) for j in jobs] == [
            ("evaluate", "done", 1), ("finetune", "done", 1), ("finetune", "done", 1),
            ("index", "done", 1), ("study", "done", 2)]  # nothing redone after the kill
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
            mean, n = means[(row["adapter"] or "__base__", row["rag"], row["metric"])]
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
