"""The running app, driven through its named API endpoints with gradio_client, as a script would."""
import time

import pytest
from gradio_client import Client

from tests.app_server import running_app

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with running_app(tmp_path_factory.mktemp("app-data")) as url:
        yield Client(url, verbose=False)


def test_every_user_action_has_a_named_endpoint(client):
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/load_dataset", "/compare", "/regenerate", "/clear", "/vote_A_better",
            "/vote_B_better", "/vote_tie", "/vote_all_bad", "/preset_2x2", "/build_index",
            "/cancel_index", "/retrieve", "/retrieval_quality", "/load_pipeline",
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
    with pytest.raises(Exception, match="question"):
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
    with pytest.raises(Exception, match=message):
        compare(client, question)


def test_compare_unknown_model_is_reported_in_its_column(client):
    out = compare(client, "hi", model="no-such-org/no-such-model")
    assert "no-such-org/no-such-model" in out[1 + 6]


def test_compare_without_systems_or_pipeline_is_a_clear_error(client):
    with pytest.raises(Exception, match="at least one system"):
        compare(client, "hi", rows=["(off)", False] * 6)
    with pytest.raises(Exception, match="no pipeline"):
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
    with pytest.raises(Exception, match="already ended"):
        client.predict(prepare[0]["id"], api_name="/cancel_job")
