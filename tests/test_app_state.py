"""State from the server, checks before the start, one-line errors: the running app through
gradio_client, one app session for the module."""
import time

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from tests.app_server import running_app
from tests.test_app import tiny_form

pytestmark = pytest.mark.integration
BASE = "smollm2-135m-instruct (base) · no RAG"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with running_app(tmp_path_factory.mktemp("state-data")) as url:
        yield Client(url, verbose=False)


def finetune_outcome(client, job_id, timeout=600):
    """The Fine-tune tab's status line once the job has ended."""
    end = time.time() + timeout
    while time.time() < end:
        text, _ = client.predict(job_id, api_name="/finetune_status")
        if not text.startswith(("**queued**", "**running**")):
            return text
        time.sleep(1)
    raise TimeoutError(text)


def job_rows(client):
    table = client.predict(api_name="/list_jobs")
    return [dict(zip(table["headers"], r)) for r in table["data"]]


@pytest.fixture(scope="module")
def tiny_adapter(client):
    """An adapter trained through the API after the app started (its choices predate it)."""
    job_id, _ = client.predict(**tiny_form("state-tiny"), api_name="/start_finetune")
    text = finetune_outcome(client, job_id)
    assert text.startswith("**done**"), text
    return "state-tiny"


@pytest.mark.parametrize("field, value, message", [
    ("n_train", 1_000_000, r"^sample:nq has \d+ examples in its train split .* n_train=1000000 plus "
                   r"val_size=4 needs 1000004\."),
    ("max_length", 16, r"^max_length=16 is too short: the prompt of example \S+ alone is \d+ tokens"),
])
def test_impossible_finetunes_are_refused_before_any_job_row(client, field, value, message):
    before = len(job_rows(client))
    with pytest.raises(AppError, match=message):
        client.predict(**{**tiny_form("state-refused"), field: value}, api_name="/start_finetune")
    assert len(job_rows(client)) == before


def test_an_adapter_trained_after_start_up_can_be_evaluated(client, tiny_adapter):
    status, run = client.predict(
        "sample:nq", 1, 0, "state-run", "smollm2-135m-instruct", None, 8,
        [BASE, f"{tiny_adapter} · no RAG"], "local", "smollm2-135m-instruct", "", "",
        ["accuracy"], "logprobs", 1, 1, False, "", "", "", api_name="/start_eval")
    assert status.startswith("Started run") and "2 systems" in status
    end = time.time() + 600
    while time.time() < end:
        state, summary, _, _ = client.predict(run["value"], api_name="/eval_summary")
        if not state.startswith(("**queued**", "**running**")):
            break
        time.sleep(2)
    assert state.startswith("**done**"), state
    assert {row[0] for row in summary["data"]} == {BASE, f"{tiny_adapter} · no RAG"}


def test_an_unknown_system_is_refused_by_name(client):
    with pytest.raises(AppError, match=r"^Unknown system 'ghost · no RAG' for base model "
                                        r"'smollm2-135m-instruct': choose from "):
        client.predict("sample:nq", 1, 0, "", "smollm2-135m-instruct", None, 8,
                       [BASE, "ghost · no RAG"], "local", "smollm2-135m-instruct", "", "",
                       ["accuracy"], "logprobs", 1, 1, False, "", "", "", api_name="/start_eval")


def test_a_failed_finetune_says_one_sentence(client, tiny_adapter):
    """The child refuses to overwrite the finished adapter: its status and row carry that
    sentence, not the command line, the spec JSON, a traceback or the last progress step."""
    job_id, _ = client.predict(**tiny_form(tiny_adapter), api_name="/start_finetune")
    text = finetune_outcome(client, job_id)
    assert text.startswith("**failed** · ") and "ETA" not in text, text
    assert f"An adapter named '{tiny_adapter}' already exists" in text
    for internal in ("Traceback", "$ ", "--spec-json", "{", "loading"):
        assert internal not in text, text
    row = next(r for r in job_rows(client) if r["id"] == job_id)
    assert (row["message"], row.get("eta", "")) == ("failed", "")  # an all-empty ETA column is dropped
    assert row["error"] in text
