"""The running app, driven through its named API endpoints with gradio_client, as a script would."""
import json
import time

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from core.testhooks import GATE_ENV
from tests.app_server import REPO, running_app
from tests.gates import Gate

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gate_dir(tmp_path_factory):
    """The app's core.testhooks folder: a gate blocks only once a test arms it."""
    return tmp_path_factory.mktemp("gates")


@pytest.fixture(scope="module")
def client(tmp_path_factory, gate_dir):
    with running_app(tmp_path_factory.mktemp("app-data"), env={GATE_ENV: str(gate_dir)}) as url:
        yield Client(url, verbose=False)


def test_every_user_action_has_a_named_endpoint(client):
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/load_dataset", "/compare", "/regenerate", "/clear", "/vote_A_better",
            "/vote_B_better", "/vote_tie", "/vote_all_bad", "/preset_2x2", "/build_index",
            "/index_status", "/cancel_index", "/retrieve", "/retrieval_quality", "/load_pipeline",
            "/delete_pipeline", "/list_jobs", "/cancel_job", "/resume_job", "/job_log"} <= names


def test_load_each_shipped_sample(client):
    for preset in ("bioasq", "qasper", "nq"):
        summary, preview = client.predict(
            "Shipped sample", preset, "", "", "train", None, "question", "answer", "", "",
            api_name="/load_dataset")
        assert "train" in summary and "eval" in summary
        assert len(preview["data"]) == 20


def test_upload_with_wrong_columns_gives_clear_error(client, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("q,a\nwhat,that\n")
    from gradio_client import handle_file
    with pytest.raises(AppError, match="question"):
        client.predict("Upload a file", "bioasq", "", "", "train", handle_file(str(bad)),
                       "question", "answer", "", "", api_name="/load_dataset")


BASE_ONLY = ["base", False] + ["(off)", False] * 5


def compare(client, question, model="smollm2-135m-instruct", rows=BASE_ONLY, max_tokens=24):
    return client.predict(question, model, None, "", "", "", max_tokens, 0.0, 1.0, 0, *rows,
                          api_name="/compare")


def test_compare_streams_an_answer_from_the_default_model(client):
    out = compare(client, "Context: The Eiffel Tower was completed in 1889 for the World's "
                          "Fair.\nQuestion: When was the Eiffel Tower completed?")
    answer, stats = out[1], out[1 + 6]
    assert "1889" in answer["value"] and "(base)" in answer["label"]
    assert "tokens/s" in stats


@pytest.mark.parametrize("question, message", [("   ", "empty"), ("x" * 5000, "limit")])
def test_compare_rejects_bad_questions(client, question, message):
    with pytest.raises(AppError, match=message):
        compare(client, question)


def test_compare_unknown_model_is_reported_in_its_column(client):
    out = compare(client, "hi", model="no-such-org/no-such-model")
    assert "no-such-org/no-such-model" in out[1 + 6]


def test_compare_without_systems_or_pipeline_is_a_clear_error(client):
    with pytest.raises(AppError, match="at least one system"):
        compare(client, "hi", rows=["(off)", False] * 6)
    with pytest.raises(AppError, match="no pipeline"):
        compare(client, "hi", rows=["base", True] + ["(off)", False] * 5)


def test_jobs_panel_shows_the_warm_up_job(client):
    end = time.time() + 120
    while time.time() < end:
        table = client.predict(api_name="/list_jobs")
        rows = [dict(zip(table["headers"], r)) for r in table["data"]]
        prepare = [r for r in rows if r["kind"] == "prepare"]
        if prepare and prepare[0]["status"] == "done":
            break
        time.sleep(1)
    assert prepare and prepare[0]["status"] == "done", rows
    assert "ready" in client.predict(prepare[0]["id"], api_name="/job_log")
    with pytest.raises(AppError, match="already ended"):
        client.predict(prepare[0]["id"], api_name="/cancel_job")


# ---------------------------------------------------------------- RAG and compare through the API

SPEC = ["app-nq", "word", 150, 20, "all-minilm-l6-v2", "bm25", 3, ""]


@pytest.fixture(scope="module")
def template():
    from pipelines.spec import DEFAULT_TEMPLATE
    return DEFAULT_TEMPLATE


def index_status(client, job_id):
    """Poll the RAG tab's status endpoint until the indexing job ends: (status, saved, graph)."""
    end = time.time() + 300
    while time.time() < end:
        status, saved, graph = client.predict(job_id, api_name="/index_status")[:3]
        if not status.startswith(("**queued**", "**running**")):
            return status, saved, graph
        time.sleep(0.5)
    raise TimeoutError(status)


@pytest.fixture(scope="module")
def built_index(client, template):
    job_id = client.predict("sample:nq", [], *SPEC, template, api_name="/build_index")
    status, saved, graph = index_status(client, job_id)
    assert "52 passages" in status and job_id in status and "flowchart" in graph
    return "app-nq"


def test_index_build_can_be_cancelled_while_it_runs(client, gate_dir, template):
    gate = Gate(gate_dir, "index-job").arm()
    spec = ["app-cancelled", *SPEC[1:]]
    job_id = client.predict("sample:nq", [], *spec, template, api_name="/build_index")
    gate.wait_reached()  # the id came back while the job runs: it stands at the gate
    assert client.predict(job_id, api_name="/index_status")[0].startswith("**running**")
    assert client.predict(job_id, api_name="/cancel_index") == "Cancel requested."
    gate.release()
    status, saved, graph = index_status(client, job_id)
    assert status.startswith("**cancelled**"), status
    with pytest.raises(AppError, match="already ended"):
        client.predict(job_id, api_name="/cancel_index")


def test_retrieve_and_retrieval_quality(client, built_index, template):
    chunks = client.predict("who wrote the novel frankenstein", *SPEC, template,
                            api_name="/retrieve")
    best = dict(zip(chunks["headers"], chunks["data"][0]))
    assert "Frankenstein" in best["text"] and "title" not in chunks["headers"]  # NQ: no titles
    table, plot = client.predict("sample:nq", *SPEC, template, api_name="/retrieval_quality")
    rows = {r[0]: dict(zip(table["headers"], r)) for r in table["data"]}
    # Measured on the shipped NQ sample: BM25 puts the gold passage first for nearly every question.
    assert rows[3]["hit_rate"] >= 0.9 and rows[1]["mrr"] <= rows[3]["mrr"]
    assert json.loads(plot["plot"])["encoding"]["x"]["type"] == "ordinal"  # k: 1, 3, ...


@pytest.fixture(scope="module")
def app_adapters(client, tmp_path_factory):
    from tests.servers import make_lora_adapters
    folders = make_lora_adapters(tmp_path_factory.mktemp("app-adapters"), ["appA", "appB", "appC"])
    for name, folder in folders.items():
        table, status = client.predict(str(folder), "smollm2-135m-instruct",
                                       api_name="/load_adapter")
        assert name in status
    return list(folders)


def rows_for(*systems):
    rows = [v for name, rag in systems for v in (name, rag)]
    return rows + ["(off)", False] * (6 - len(systems))


def test_compare_base_and_adapter_columns_through_the_api(client, built_index, app_adapters):
    q = "who wrote the novel frankenstein"
    base_only = compare(client, q, rows=rows_for(("base", False)), max_tokens=12)
    out = client.predict(q, "smollm2-135m-instruct", built_index, "", "", "", 12, 0.0, 1.0, 0,
                         *rows_for(("base", False), ("appA", False), ("base", True),
                                   ("appA", True)), api_name="/compare")
    chunks, answers = out[0], out[1:7]
    table = chunks["value"]  # NQ passages have no title: that column is dropped
    assert chunks["visible"] and "Frankenstein" in table["data"][0][table["headers"].index("text")]
    assert answers[0]["value"] == base_only[1]["value"]
    assert answers[1]["value"] != answers[0]["value"]
    assert answers[3]["value"] != answers[2]["value"]
    assert "appA · RAG" in answers[3]["label"]
    assert "Vote recorded" in client.predict(1, 2, api_name="/vote_tie")


def test_preset_2x2_fills_the_four_systems(client, built_index, app_adapters):
    values = client.predict("smollm2-135m-instruct", built_index, api_name="/preset_2x2")
    assert list(values[:8]) == ["base", False, "base", True, "appA", False, "appA", True]


def test_concurrent_clients_never_get_another_clients_adapter(client, app_adapters):
    from concurrent.futures import ThreadPoolExecutor
    url = client.src
    q = "Name three colours."
    choices = ["base", *app_adapters]
    alone = {c: compare(client, q, rows=rows_for((c, False)), max_tokens=10)[1]["value"]
             for c in choices}
    assert len(set(alone.values())) == len(choices), "the adapters must answer differently"

    def ask(choice):
        return choice, compare(Client(url, verbose=False), q, rows=rows_for((choice, False)),
                               max_tokens=10)[1]["value"]

    with ThreadPoolExecutor(len(choices) * 2) as pool:
        results = list(pool.map(ask, choices * 2))
    assert all(text == alone[choice] for choice, text in results), results


# ---------------------------------------------------------------- evaluation through the API

def test_evaluation_run_summary_export_and_read_only_sql(client):
    status, run = client.predict(
        "sample:nq", 2, 0, "api-run", "smollm2-135m-instruct", None, 12,
        ["smollm2-135m-instruct (base) · no RAG"], "local", "smollm2-135m-instruct", "", "",
        ["accuracy"], "logprobs", 1, 1, False, "", "", "", api_name="/start_eval")
    run_id = run["value"]
    end = time.time() + 600
    while time.time() < end:
        state, summary, chart, items = client.predict(run_id, api_name="/eval_summary")
        if "**done**" in state or "**failed**" in state:
            break
        time.sleep(2)
    assert "**done**" in state, state
    row = dict(zip(summary["headers"], summary["data"][0]))
    assert row["n"] == 2 and 1 <= row["mean"] <= 5
    panel, = json.loads(chart["plot"])["hconcat"]  # core.charts.evaluation_summary: one metric
    assert panel["title"] == "accuracy (1-5)"
    table, _ = client.predict(f"SELECT avg(score) AS m, count(*) AS n FROM judgments "
                              f"WHERE run_id = '{run_id}'", api_name="/sql")
    # the summary shows 2 decimals (ui.tables.SCORE_DECIMALS)
    assert table["data"][0][1] == 2 and round(table["data"][0][0], 2) == row["mean"]
    with pytest.raises(AppError, match="read-only"):
        client.predict("DELETE FROM judgments", api_name="/sql")
    files = client.predict(run_id, "parquet", api_name="/export_eval")
    assert sorted(f.rsplit("_", 1)[-1] for f in files) == ["answers.parquet", "judgments.parquet"]


def test_evaluation_without_systems_is_refused(client):
    with pytest.raises(AppError, match="at least one system"):
        client.predict("sample:nq", 2, 0, "", "smollm2-135m-instruct", None, 12, [], "local",
                       "smollm2-135m-instruct", "", "", ["accuracy"], "logprobs", 1, 1, False,
                       "", "", "", api_name="/start_eval")


# ---------------------------------------------------------------- fine-tuning through the API

def tiny_form(name):
    """/start_finetune's keyword arguments for a two-step fine-tune (every field given)."""
    return dict(base_model="smollm2-135m-instruct", dataset="nq", source="sample", n_train=8,
                context="none", pipeline=None, lora_r=8, lora_alpha=16.0, lora_dropout=0.0,
                target_modules="q_proj,v_proj", qlora=False, epochs=1, lr=5e-3,
                lr_schedule="constant", warmup_ratio=0.0, micro_batch_size=4, grad_accum=1,
                max_length=256, seed=0, val_size=4, val_every=1, checkpoint_every=100, name=name)


def test_finetune_from_the_ui_and_the_cli_create_the_same_records(client, tmp_path):
    import os
    import subprocess
    import sys

    from core.store import Store
    from jobs.finetune_data import FinetuneSpec
    from ui.finetune_tab import spec_from_form

    job_id, status = client.predict(**tiny_form("ui-tiny"), api_name="/start_finetune")
    end = time.time() + 600
    while time.time() < end:
        text, chart = client.predict(job_id, api_name="/finetune_status")
        if "**done**" in text or "**failed**" in text:
            break
        time.sleep(2)
    assert "**done**" in text, text
    plotted = json.loads(chart["plot"])  # gr.Plot: the Vega-Lite spec of core.charts.loss
    curves = [row["curve"] for rows in plotted["datasets"].values() for row in rows]
    assert curves.count("train") == 2 and "validation" in curves  # live points, 2 steps
    ui_row = client.predict("ui-tiny", api_name="/adapter_details")

    spec = spec_from_form(tiny_form("ui-tiny")).to_dict()
    env = {**os.environ, "DATA_DIR": str(tmp_path)}
    env.pop("LAB_JOB_ID", None)
    out = subprocess.run([sys.executable, "-m", "jobs.finetune", "--spec-json", json.dumps(spec)],
                         env=env, capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    store = Store(tmp_path / "app.duckdb")
    cli_row = store.list_adapters()[0]
    store.close()
    assert cli_row.name == "ui-tiny" and cli_row.spec == ui_row["spec"]
    assert FinetuneSpec.from_dict(cli_row.spec) == FinetuneSpec.from_dict(spec)
    for key in ("n_train", "steps", "final_train_loss", "final_val_loss"):
        assert cli_row.metrics[key] == pytest.approx(ui_row["metrics"][key], rel=1e-3), key


def test_finetune_bad_values_are_refused_before_starting(client):
    with pytest.raises(AppError, match="r"):
        client.predict(**{**tiny_form("bad"), "lora_r": 0}, api_name="/start_finetune")
    with pytest.raises(AppError, match="learning rate|lr"):
        client.predict(**{**tiny_form("bad"), "lr": 5.0}, api_name="/start_finetune")
