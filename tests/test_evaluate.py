"""Batch G-Eval as a job: clear refusals of bad requests (no model); then real runs on the 135M
model: cancel + resume without duplicates, statistics against SQL, the CLI writing what the runner
writes, and a judge endpoint that fails, is retried, and later resumes on a real server."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from core.datasets import QADataset
from core.evalstats import summarize_run
from core.model_files import SMOLLM2, model_path
from core.schema import QAExample
from core.store import Store
from core.systems import BASE, System
from core.testhooks import GATE_ENV
from jobs.evaluate import EvalSpec, EvalSpecError, JudgeSpec, preflight, select_examples
from jobs.runner import TERMINAL
from jobs.services import build_services
from pipelines import indexing
from pipelines.spec import PipelineSpec, SpecError, save_spec
from tests.gates import Gate
from tests.app_server import free_port
from tests.servers import served_model

REPO = Path(__file__).resolve().parent.parent
ACCURACY = {"name": "accuracy", "steps": "1. Compare the facts of the answer with the reference "
                                         "answer.\n2. Score 5 if they agree, 1 if they contradict."}
COMPLETENESS = {"name": "completeness", "steps": "1. List the key points of the reference answer."
                                                 "\n2. Score by the share the answer covers."}
BASE_SYSTEM = {"model": SMOLLM2}
RAG_SYSTEM = {"model": SMOLLM2, "rag": True}


def spec_dict(**changes) -> dict:
    spec = {"dataset_id": "sample:bioasq", "n_items": 2, "systems": [BASE_SYSTEM],
            "metrics": [ACCURACY], "repeats": 2, "decoding": {"max_new_tokens": 16},
            "batch_size": 2, "retry_delays": [0.05, 0.1]}
    return {**spec, **changes}


@pytest.fixture(scope="module")
def services():
    # The app's own wiring: build_services registers the "evaluate" job kind.
    return build_services(warm_up=False)


@pytest.fixture(scope="module")
def bm25(services) -> str:
    spec = PipelineSpec(name="eval-bm25", retriever="bm25", top_k=2)
    indexing.build_index(spec, services.datasets.get("sample:bioasq").corpus)
    save_spec(spec, store=services.store)
    return spec.name


def count(store: Store, table: str, run_id: str) -> int:
    return store.query(f"SELECT count(*) AS n FROM {table} WHERE run_id = ?", [run_id])[0]["n"]


# ---------------------------------------------------------------- refusals (no model)


@pytest.mark.parametrize("changes, message", [
    ({"systems": []}, "at least one system"),
    ({"systems": [RAG_SYSTEM]}, "uses RAG but no pipeline is chosen"),
    ({"metrics": [{"name": "faithfulness", "criteria": ""}]}, "has no criteria"),
    ({"metrics": []}, "at least one metric"),
    ({"repeats": 0}, r"repeats: must be a whole number of at least 1 \(got 0\)"),
    ({"n_items": 0}, r"n_items: must be a whole number of at least 1 or null \(got 0\)"),
    ({"method": "vibes"}, r"method: must be one of logprobs, sampling \(got 'vibes'\)"),
    ({"systems": [BASE_SYSTEM, BASE_SYSTEM]}, "Two systems are the same"),
    ({"metrics": [{"name": "style", "criteria": "x", "score_min": 1, "score_max": 10}]},
     "single digits"),
    ({"decoding": {"temperature": -1}}, "temperature"),
    ({"decoding": {"beams": 4}}, "Unknown field.*decoding: beams"),
    ({"judge": {"kind": "oracle", "model": "x"}}, r"judge.kind: must be one of local, openai \(got 'oracle'\)"),
    ({"colour": "red"}, "Unknown field.*colour"),
    ({"systems": [{**BASE_SYSTEM, "colour": "red"}]}, r"Unknown field\(s\) in systems\[0\]: colour\."),
    ({"systems": [{**BASE_SYSTEM, "rag": "maybe"}]}, r"systems\[0\].rag: must be true or false"),
    ({"systems": [{"kind": "cloud", "model": "x"}]}, r"systems\[0\].kind: must be one of local, openai"),
    ({"dataset_id": None}, "Choose a dataset"),
    ({"retry_delays": [1, -2]}, r"retry_delays\[1\]: must be a number of at least 0 \(got -2\)"),
    ({"pipeline": "../p"}, "Pipeline name '../p' is not allowed"),
    ({"metrics": [{"name": "my metric", "criteria": "x"}]}, "Metric name 'my metric' is not allowed"),
])
def test_bad_specs_are_refused_with_a_sentence(changes, message):
    with pytest.raises(EvalSpecError, match=message):
        EvalSpec.from_dict(spec_dict(**changes))


def test_stored_system_keys_and_nulls_read_as_before():
    stored = {**RAG_SYSTEM, "label": "shown", "id": "sys-0123", "adapter": None, "base_url": None}
    spec = EvalSpec.from_dict(spec_dict(systems=[stored, {**BASE_SYSTEM, "rag": None}], pipeline="p",
                                        judge=None, n_items=2.0))
    assert [(s.adapter, s.rag) for s in spec.systems] == [(BASE, True), (BASE, False)]
    assert spec.judge == JudgeSpec() and spec.n_items == 2


def test_spec_round_trips_through_json():
    spec = EvalSpec.from_dict(spec_dict(systems=[BASE_SYSTEM, {**RAG_SYSTEM, "label": "ignored"}],
                                        pipeline="p", method="sampling"))
    again = EvalSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec and again.effective_repeats == 2
    assert EvalSpec.from_dict(spec_dict()).effective_repeats == 1  # logprobs: one judgment per key


def test_datasets_pipelines_and_adapters_are_checked_before_the_job(services):
    empty = [QAExample(f"noref-{i}", f"Question {i}?", "") for i in range(20)]
    services.datasets.add(QADataset("noref", "upload:noref.csv", empty, []))
    res = services.evaluations.resources
    with pytest.raises(EvalSpecError, match=r"have no reference answer \(e.g. 'noref-"):
        select_examples(res, EvalSpec.from_dict(spec_dict(dataset_id="upload:noref.csv")))
    with pytest.raises(EvalSpecError, match="'upload:never.csv' is not loaded"):
        preflight(res, EvalSpec.from_dict(spec_dict(dataset_id="upload:never.csv")))
    with pytest.raises(SpecError, match="No saved pipeline named 'nowhere'"):
        preflight(res, EvalSpec.from_dict(spec_dict(systems=[RAG_SYSTEM], pipeline="nowhere")))
    with pytest.raises(EvalSpecError, match="Unknown adapter 'ghost'"):
        preflight(res, EvalSpec.from_dict(spec_dict(systems=[{"model": SMOLLM2, "adapter": "ghost"}])))
    picked = select_examples(res, EvalSpec.from_dict(spec_dict(n_items=3, seed=7)))
    assert picked == select_examples(res, EvalSpec.from_dict(spec_dict(n_items=3, seed=7)))
    assert len(picked) == 3 and [e.id for e in picked] == sorted(e.id for e in picked)
    assert {e.id for e in picked} <= {e.id for e in services.datasets.eval_examples("sample:bioasq")}


def _cli(args: list[str], data_dir: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "DATA_DIR": str(data_dir)}
    return subprocess.run([sys.executable, "-m", "jobs.evaluate", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_refuses_a_locked_database_and_bad_options(tmp_path):
    held = Store(tmp_path / "app.duckdb")  # as the running app would hold it
    result = _cli(["--dataset", "sample:bioasq", "--system", SMOLLM2], tmp_path)
    assert result.returncode == 2 and "in use by another process" in result.stderr
    held.close()
    result = _cli(["--dataset", "sample:bioasq"], tmp_path)
    assert result.returncode == 2 and "at least one system" in result.stderr
    help_text = _cli(["--help"], tmp_path)
    assert help_text.returncode == 0 and "--resume" in help_text.stdout and "--spec-json" in help_text.stdout


# ---------------------------------------------------------------- real runs


def _rows(store: Store, run_id: str) -> tuple[list, list]:
    answers = store.query("SELECT example_id, system_id, answer, created_at FROM answers WHERE "
                          "run_id = ? ORDER BY ALL", [run_id])
    judgments = store.query("SELECT example_id, system_id, metric, repeat, score, created_at FROM "
                            "judgments WHERE run_id = ? ORDER BY ALL", [run_id])
    return answers, judgments


@pytest.fixture(scope="module")
def resumed_run(services, bm25, tmp_path_factory):
    """2 items x (base, base+RAG) x (accuracy, completeness): cancelled while judging, resumed."""
    spec = EvalSpec.from_dict(spec_dict(systems=[BASE_SYSTEM, RAG_SYSTEM], pipeline=bm25,
                                        metrics=[ACCURACY, COMPLETENESS]))
    store, runner = services.store, services.runner
    judged = Gate(tmp_path_factory.mktemp("gates"), "eval-judgment")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(GATE_ENV, str(judged.folder))
        judged.arm()
        run_id = services.evaluations.start(spec)
        judged.wait_reached(alive=lambda: runner.get(run_id).status not in TERMINAL)
        runner.cancel(run_id)  # lands while the run is held right after its first judgment
        judged.release()
        cancelled = runner.wait(run_id)
    before = _rows(store, run_id)
    run_status = store.get_eval_run(run_id).status
    runner.resume(run_id)
    job = runner.wait(run_id)
    return {"id": run_id, "cancelled": cancelled, "before": before, "run_status": run_status,
            "job": job}


@pytest.mark.integration
def test_cancelled_run_resumes_with_exactly_one_row_per_key(services, resumed_run):
    store, run_id = services.store, resumed_run["id"]
    assert resumed_run["cancelled"].status == "cancelled" and resumed_run["run_status"] == "cancelled"
    answers_before, judgments_before = resumed_run["before"]
    assert len(answers_before) == 4 and 1 <= len(judgments_before) < 8
    job = resumed_run["job"]
    assert job.status == "done", job.error
    assert job.attempts == 2 and job.result["judgments"] == 8
    keys = store.query(
        "SELECT (SELECT count(*) FROM answers WHERE run_id = $1) AS answers, "
        "(SELECT count(DISTINCT (example_id, system_id)) FROM answers WHERE run_id = $1) AS answer_keys, "
        "(SELECT count(*) FROM judgments WHERE run_id = $1) AS judgments, "
        "(SELECT count(DISTINCT (example_id, system_id, metric, repeat)) FROM judgments "
        " WHERE run_id = $1) AS judgment_keys, "
        "(SELECT max(repeat) FROM judgments WHERE run_id = $1) AS max_repeat", [run_id])[0]
    assert keys == {"answers": 4, "answer_keys": 4, "judgments": 8, "judgment_keys": 8,
                    "max_repeat": 0}
    answers_after, judgments_after = _rows(store, run_id)
    assert answers_after == answers_before  # nothing was answered twice
    assert all(row in judgments_after for row in judgments_before)  # nor judged twice
    run = store.get_eval_run(run_id)
    assert run.status == "done" and run.spec["effective_repeats"] == 1
    assert "deterministic" in run.spec["repeats_note"] and run.spec["repeats"] == 2
    retrieved = {r["system_id"]: r["retrieved"] for r in store.eval_answers(run_id)}
    assert retrieved[System(model=SMOLLM2).id] is None
    assert len(retrieved[System(model=SMOLLM2, rag=True, pipeline="eval-bm25").id]) == 2
    methods = store.query("SELECT DISTINCT method, judge FROM judgments WHERE run_id = ?", [run_id])
    assert methods == [{"method": "logprobs", "judge": f"local:{SMOLLM2}"}]
    points = services.runner.metrics(run_id)
    assert points and {"system_id", "system", "metric", "mean", "n"} <= set(points[-1])


@pytest.mark.integration
def test_summary_equals_a_sql_recomputation(services, resumed_run, tmp_path):
    store, run_id = services.store, resumed_run["id"]
    sql = store.query(
        "WITH items AS (SELECT system_id, metric, example_id, avg(score) AS s FROM judgments "
        "WHERE run_id = ? AND score IS NOT NULL GROUP BY ALL) "
        "SELECT system_id, metric, avg(s) AS mean, stddev_samp(s) AS std, count(*) AS n FROM items "
        "GROUP BY ALL", [run_id])
    summary = {(r["system_id"], r["metric"]): r for r in summarize_run(store, run_id)}
    assert len(sql) == len(summary) == 4
    for row in sql:
        mine = summary[(row["system_id"], row["metric"])]
        assert (mine["mean"], mine["std"], mine["n"]) == pytest.approx((row["mean"], row["std"], row["n"]))
        assert mine["ci_low"] < mine["mean"] < mine["ci_high"]
    diffs = store.query(
        "WITH items AS (SELECT j.system_id, s.rag, j.metric, j.example_id, avg(j.score) AS s "
        "FROM judgments j JOIN systems s ON s.id = j.system_id "
        "WHERE j.run_id = ? AND j.score IS NOT NULL GROUP BY ALL) "
        "SELECT t.metric, avg(t.s - b.s) AS diff, count(*) AS n FROM items t JOIN items b "
        "ON t.metric = b.metric AND t.example_id = b.example_id "
        "WHERE t.rag AND NOT b.rag GROUP BY ALL", [run_id])
    for row in diffs:
        mine = summary[(System(model=SMOLLM2, rag=True, pipeline="eval-bm25").id, row["metric"])]
        assert mine["base"] == System(model=SMOLLM2).id
        assert (mine["diff"], mine["n_paired"]) == pytest.approx((row["diff"], row["n"]))
        assert mine["diff_ci_low"] <= mine["diff"] <= mine["diff_ci_high"]
    drill = store.eval_items(run_id, metric="accuracy")
    assert len(drill) == 4 and all(r["question"] and r["reference"] for r in drill)
    paths = store.export_eval_run(run_id, tmp_path, "parquet") + store.export_eval_run(run_id, tmp_path)
    counts = [duckdb.sql(f"SELECT count(*) FROM '{p}'").fetchall()[0][0] for p in paths]
    assert counts == [4, 8, 4, 8]
    listed = next(r for r in store.list_eval_runs() if r.id == run_id)
    assert (listed.n_answers, listed.n_judgments, listed.status) == (4, 8, "done")


@pytest.mark.integration
def test_cli_and_runner_write_the_same_rows(services, tmp_path):
    spec = spec_dict(method="sampling", samples=1, name="cli-vs-runner",
                     decoding={"max_new_tokens": 8})
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    result = _cli(["--spec-json", f"@{tmp_path / 'spec.json'}"], tmp_path / "cli")
    assert result.returncode == 0, result.stderr[-3000:]
    cli_run = result.stdout.split("run ", 1)[1].split()[0]
    assert "accuracy" in result.stdout.splitlines()[-1]
    runner_run = services.evaluations.start(EvalSpec.from_dict(spec))
    assert services.runner.wait(runner_run).status == "done"
    cli_store = Store(tmp_path / "cli" / "app.duckdb")
    try:
        jobs = [store.get_job(run) for store, run in ((cli_store, cli_run), (services.store, runner_run))]
        assert [(j.kind, j.status) for j in jobs] == [("evaluate", "done")] * 2
        assert jobs[0].spec == jobs[1].spec == EvalSpec.from_dict(spec).to_dict()
        answers = [store.query("SELECT example_id, system_id, answer FROM answers WHERE run_id = ? "
                               "ORDER BY ALL", [run]) for store, run in
                   ((cli_store, cli_run), (services.store, runner_run))]
        assert len(answers[0]) == 2 and answers[0] == answers[1]
        judged = [store.query("SELECT example_id, system_id, metric, repeat, method, judge, "
                              "json_array_length(parsed_scores) AS samples FROM judgments "
                              "WHERE run_id = ? ORDER BY ALL", [run]) for store, run in
                  ((cli_store, cli_run), (services.store, runner_run))]
        assert len(judged[0]) == 4 and judged[0] == judged[1]
        assert {r["repeat"] for r in judged[0]} == {0, 1} and {r["samples"] for r in judged[0]} == {1}
        runs = [store.get_eval_run(run) for store, run in ((cli_store, cli_run),
                                                           (services.store, runner_run))]
        assert runs[0].name == runs[1].name == "cli-vs-runner"
        assert runs[0].spec["steps"] == runs[1].spec["steps"]
    finally:
        cli_store.close()


@pytest.mark.integration
def test_failing_judge_is_retried_then_fails_and_later_resumes(services):
    port = free_port()  # nothing listens here yet
    url = f"http://127.0.0.1:{port}/v1"
    spec = EvalSpec.from_dict(spec_dict(judge={"kind": "openai", "model": model_path(SMOLLM2),
                                               "base_url": url}, samples=2,
                                        decoding={"max_new_tokens": 8}))
    store, runner = services.store, services.runner
    run_id = services.evaluations.start(spec)
    job = runner.wait(run_id)
    assert job.status == "failed"
    assert "failed 3 time(s)" in job.error and url in job.error and "resume" in job.error
    log = runner.log_tail(run_id, 200)
    assert "retry 1 in 0.05 s" in log and "retry 2 in 0.1 s" in log
    assert (count(store, "answers", run_id), count(store, "judgments", run_id)) == (2, 0)
    assert store.get_eval_run(run_id).status == "failed"
    answers_before = _rows(store, run_id)[0]
    with served_model(port=port):
        runner.resume(run_id)
        job = runner.wait(run_id)
    assert job.status == "done", job.error
    assert _rows(store, run_id)[0] == answers_before
    judged = store.eval_judgments(run_id)
    assert len(judged) == 2
    for row in judged:  # transformers serve returns no logprobs: sampled, and the row says so
        assert row["method"] == "sampling-fallback" and row["judge"] == f"openai:{model_path(SMOLLM2)}@{url}"
        assert len(row["raw"]) == 2 and len(row["parsed_scores"]) == 2
        assert row["parse_failures"] == sum(p is None for p in row["parsed_scores"])


def test_an_adapter_trained_on_eval_items_is_refused(services, tmp_path):
    """The one-split guarantee, checked where it matters: an adapter whose recorded training ids
    touch the items a run would judge is refused before anything runs, naming the overlap."""
    res = services.evaluations.resources
    eval_ids = sorted(e.id for e in services.datasets.eval_examples("sample:bioasq"))
    for name, dataset_id, trained in (("leaky", "sample:bioasq", eval_ids[:2] + ["x-1"]),
                                      ("clean", "sample:bioasq", ["x-1", "x-2"]),
                                      ("other-data", "sample:nq", eval_ids[:2])):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "train_ids.json").write_text(json.dumps({"dataset_id": dataset_id, "train": trained}))
        services.store.upsert_adapter(name, SMOLLM2, str(folder))
    spec = spec_dict(n_items=None, systems=[BASE_SYSTEM, {"model": SMOLLM2, "adapter": "leaky"}])
    with pytest.raises(EvalSpecError, match=rf"Adapter 'leaky' was trained on 2 of this run's "
                                            rf"{len(eval_ids)} eval items \({eval_ids[0]}, {eval_ids[1]}\)"):
        preflight(res, EvalSpec.from_dict(spec))
    for name in ("clean", "other-data"):
        plan = preflight(res, EvalSpec.from_dict({**spec, "systems": [BASE_SYSTEM, {"model": SMOLLM2,
                                                                                     "adapter": name}]}))
        assert [s.adapter for s in plan.systems] == ["__base__", name]


def test_one_split_per_dataset_is_recorded_and_used_by_evaluation_and_fine_tuning(services):
    from core.dataset_presets import PRESETS  # noqa: F401  (the nq preset must exist)
    from core.datasets import load_preset
    from core.schema import SplitSetting, split_of
    from jobs.finetune_data import FinetuneSpec

    nq = load_preset("nq", source="sample")
    services.datasets.add(nq, SplitSetting(seed=5, eval_fraction=0.5))
    assert services.datasets.split("sample:nq") == SplitSetting(5, 0.5)
    services.datasets.add(nq)  # re-loading keeps the recorded split
    assert services.datasets.split("sample:nq") == SplitSetting(5, 0.5)
    held_out = {e.id for e in services.datasets.eval_examples("sample:nq")}
    assert held_out == {e.id for e in nq.examples if split_of(e.id, 5, 0.5) == "eval"}
    trained = services.adapters.training_spec(FinetuneSpec(dataset="nq", source="sample", n_train=8))
    assert (trained.split_seed, trained.eval_fraction) == (5, 0.5)
    services.datasets.add(nq, SplitSetting())  # back to the default for the other tests
