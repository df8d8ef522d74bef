"""Keys and tokens: the Secret type, the operator's OpenAI key only for the operator's endpoint
(checked on a real HTTP server that records the key each request carries), visitor keys in memory
for a job's life, hub pushes never with the operator's token in public mode, and the running app:
two gradio_client sessions never share a key, and no key is written under the data dir."""
from __future__ import annotations

import copy
import json
import pickle
import time
from pathlib import Path
from types import SimpleNamespace

import duckdb
import pytest
from pydantic import BaseModel

from core import config
from core.openai_backend import BackendRequestError, MissingApiKeyError, OpenAIBackend
from core.secrets import Secret, api_key_for, endpoint
from core.store import Store
from jobs.adapters import AdapterCatalog
from jobs.runner import JobError, JobKind, JobRunner
from pipelines.compare import MAX_SYSTEMS
from pipelines.spec import PipelineSpec
from tests.servers import key_recording_server

CANARY = "sk-canary-operator-7f3a9e51"  # the operator's OPENAI_API_KEY
VISITOR = "sk-visitor-typed-41c2d8b0"  # a key a visitor types
PLACEHOLDER = "Bearer no-key-needed"


# ---------------------------------------------------------------- the Secret type


def test_a_secret_prints_as_stars_and_refuses_to_be_stored():
    secret = Secret(f" {VISITOR} ")
    assert secret.reveal() == VISITOR
    assert repr(secret) == "Secret('***')" and str(secret) == f"{secret}" == "***"
    assert VISITOR not in repr({"key": secret}) and VISITOR not in str([secret])
    with pytest.raises(TypeError, match="A Secret cannot be pickled"):
        pickle.dumps(secret)
    with pytest.raises(TypeError, match="Object of type Secret is not JSON serializable"):
        json.dumps({"key": secret})
    with pytest.raises(TypeError, match="A Secret cannot be a pydantic field"):
        class Leaky(BaseModel):  # a spec that could hold a key, and so dump it, is refused
            key: Secret
    assert copy.deepcopy({"key": secret})["key"] is secret  # Gradio copies session state
    assert Secret.typed("   ") is None and Secret.typed(None) is None
    with pytest.raises(ValueError, match="A secret must be non-empty text"):
        Secret("")


def test_endpoints_are_compared_after_normalising():
    none: dict[str, str] = {}
    assert endpoint("HTTPS://API.OpenAI.com:443/v1/", none) == endpoint(None, none) == "https://api.openai.com/v1"
    assert endpoint("http://127.0.0.1:80/v1/") == "http://127.0.0.1/v1"
    for other in ("http://api.openai.com/v1", "https://api.openai.com:8443/v1",
                  "https://api.openai.com.evil.example/v1", "https://me@api.openai.com/v1",
                  "https://api.openai.com/v2", "https://api.openai.com:x/v1"):
        assert endpoint(other, none) != endpoint(None, none), other

    operator = {"OPENAI_BASE_URL": "http://10.0.0.5:8000/v1/", "OPENAI_API_KEY": CANARY}
    assert api_key_for("HTTP://10.0.0.5:8000/v1", None, operator).reveal() == CANARY
    assert api_key_for(None, None, operator).reveal() == CANARY
    assert api_key_for("https://api.openai.com/v1", None, operator) is None  # not this operator's
    assert api_key_for("http://10.0.0.5:8001/v1", None, operator) is None
    typed = Secret(VISITOR)
    assert api_key_for("http://10.0.0.5:8000/v1", typed, operator) is typed


# ---------------------------------------------------------------- requests on a real server


def test_the_env_key_reaches_only_the_operators_endpoint(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", CANARY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with key_recording_server() as visitor, key_recording_server() as operator:
        assert OpenAIBackend(visitor.url, None, "m").generate(["hi"])[0].text == "3"
        OpenAIBackend(visitor.url + "/", Secret(VISITOR), "m").generate(["hi"])
        assert visitor.auth == [PLACEHOLDER, f"Bearer {VISITOR}"]

        monkeypatch.setenv("OPENAI_BASE_URL", operator.url)
        OpenAIBackend(None, None, "m").generate(["hi"])
        OpenAIBackend(operator.url.upper().replace("/V1", "/v1/"), None, "m").generate(["hi"])
        OpenAIBackend(visitor.url, None, "m").generate(["hi"])
        assert operator.auth == [f"Bearer {CANARY}"] * 2
        assert visitor.auth[-1] == PLACEHOLDER


def test_missing_and_rejected_keys_are_one_line_messages(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(MissingApiKeyError, match=r"^This endpoint needs an API key and the app "
                                                 r"has none \(OPENAI_API_KEY\): enter yours"):
        OpenAIBackend(None, None, "gpt-4o-mini")
    monkeypatch.setenv("OPENAI_API_KEY", CANARY)
    with key_recording_server(key=VISITOR) as server:
        with pytest.raises(BackendRequestError, match=r"rejected the API key: enter yours \(this "
                                                      r"app sends its own key only to the endpoint"):
            OpenAIBackend(server.url, None, "m").generate(["hi"])
        assert server.auth == [PLACEHOLDER]


# ---------------------------------------------------------------- jobs and stored specs


def test_a_job_gets_the_keys_in_memory_for_its_run_only(tmp_path):
    store = Store(tmp_path / "jobs.duckdb")
    seen = {}

    def job(ctx):
        seen["ctx"], seen["key"] = ctx, ctx.secrets["http://h/v1"].reveal()
        return {}

    runner = JobRunner(store, {"thread": JobKind(thread=job),
                               "process": JobKind(argv=lambda spec, resume: ["true"])})
    job_id = runner.start("thread", {"judge": "http://h/v1"}, secrets={"http://h/v1": Secret(VISITOR)})
    record = runner.wait(job_id)
    assert record.status == "done" and seen["key"] == VISITOR
    assert dict(seen["ctx"].secrets) == {}  # dropped when the run ended
    assert VISITOR not in json.dumps(record.to_dict(), default=str)
    with pytest.raises(JobError, match="Jobs of kind 'process' run in a subprocess and take no keys"):
        runner.start("process", {}, secrets={"http://h/v1": Secret(VISITOR)})


def test_a_stored_pipeline_spec_naming_a_key_variable_still_loads(caplog):
    stored = {"name": "old", "generator": {"kind": "openai", "model": "m", "base_url": None,
                                           "api_key_env": "AWS_SECRET_ACCESS_KEY"}}
    with caplog.at_level("INFO", logger="pipelines.spec"):
        spec = PipelineSpec.from_dict(stored)
    assert "api_key_env" not in spec.to_dict()["generator"]
    assert "Ignoring api_key_env='AWS_SECRET_ACCESS_KEY'" in caplog.text


# ---------------------------------------------------------------- hub pushes


class RecordingHfApi:
    """Stands in for huggingface_hub.HfApi: records the token, never contacts the Hub."""

    tokens: list[str | None] = []

    def __init__(self, token=None):
        RecordingHfApi.tokens.append(token)

    def create_repo(self, repo_id, exist_ok=False):
        return repo_id

    def upload_folder(self, folder_path, repo_id, ignore_patterns=()):
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/1")


@pytest.fixture
def adapters(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHfApi)
    RecordingHfApi.tokens = []
    monkeypatch.setenv("HF_TOKEN", "hf_operator_canary")
    store = Store(tmp_path / "push.duckdb")
    (tmp_path / "a1").mkdir()
    store.upsert_adapter("a1", "smollm2-135m-instruct", str(tmp_path / "a1"))
    return AdapterCatalog(store, None, None, split_of=lambda dataset_id: None)


def test_public_mode_never_pushes_with_the_operators_token(adapters, monkeypatch):
    monkeypatch.setattr(config, "PUBLIC_MODE", True)
    monkeypatch.setattr(config, "ALLOW_OPERATOR_TOKEN_PUSH", False)
    with pytest.raises(ValueError, match="^Sign in with Hugging Face to push to your own account"):
        adapters.push("a1", "me/a1", None)
    assert RecordingHfApi.tokens == []
    assert adapters.push("a1", "me/a1", Secret("hf_visitor")).endswith("/me/a1/commit/1")
    monkeypatch.setattr(config, "ALLOW_OPERATOR_TOKEN_PUSH", True)
    adapters.push("a1", "me/a1", None)
    assert RecordingHfApi.tokens == ["hf_visitor", "hf_operator_canary"]


def test_private_mode_pushes_with_the_typed_token_or_hf_token(adapters, monkeypatch):
    monkeypatch.setattr(config, "PUBLIC_MODE", False)
    adapters.push("a1", "me/a1", Secret("hf_typed"))
    adapters.push("a1", "me/a1", None)
    assert RecordingHfApi.tokens == ["hf_typed", "hf_operator_canary"]
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(ValueError, match="^Pushing needs a Hugging Face token: set HF_TOKEN"):
        adapters.push("a1", "me/a1", None)


def test_operator_token_push_flag_parses_like_the_other_flags():
    assert config.allow_operator_token_push({}) is False
    assert config.allow_operator_token_push({"ALLOW_OPERATOR_TOKEN_PUSH": "1"}) is True
    with pytest.raises(ValueError, match="ALLOW_OPERATOR_TOKEN_PUSH must be 1 or 0"):
        config.allow_operator_token_push({"ALLOW_OPERATOR_TOKEN_PUSH": "yes"})


# ---------------------------------------------------------------- the running app


def compare_remote(client, url: str, key: str) -> tuple[str, str]:
    """/compare with one OpenAI-compatible column; returns its answer and its stats line."""
    out = client.predict("Which gene is mutated in cystic fibrosis?", "smollm2-135m-instruct", None,
                         url, "served-model", key, 16, 0.0, 1.0, 0, "OpenAI-compatible", False,
                         *["(off)", False] * 5, api_name="/compare")
    return out[1]["value"], out[1 + MAX_SYSTEMS]


def start_eval(client, url: str, key: str) -> str:
    status, run = client.predict(
        "sample:nq", 1, 0, "", "smollm2-135m-instruct", None, 8,
        ["smollm2-135m-instruct (base) · no RAG"], "openai", "judge-model", url, key,
        ["accuracy"], "logprobs", 1, 1, False, "", "", "", api_name="/start_eval")
    return run["value"]


def wait_for_end(client, run_id: str) -> str:
    end = time.monotonic() + 600
    while time.monotonic() < end:
        state = client.predict(run_id, api_name="/eval_summary")[0]
        if any(f"**{s}**" in state for s in ("done", "failed", "cancelled")):
            return state
        time.sleep(1)
    raise TimeoutError(f"run {run_id} did not end: {state}")


def text_everywhere(data_dir: Path) -> str:
    """Every file under the data dir as text, plus every DuckDB table's rows (DuckDB compresses
    strings on disk, so its file is also read through DuckDB)."""
    parts = [p.read_bytes().decode("utf-8", "replace") for p in data_dir.rglob("*") if p.is_file()]
    with duckdb.connect(str(data_dir / "app.duckdb"), read_only=True) as con:
        for (table,) in con.execute("SELECT table_name FROM information_schema.tables").fetchall():
            parts.append(repr(con.execute(f'SELECT * FROM "{table}"').fetchall()))
    return "\n".join(parts)


@pytest.mark.integration
def test_two_sessions_never_share_a_key_and_no_key_is_written(tmp_path, monkeypatch):
    from gradio_client import Client

    from tests.app_server import running_app

    monkeypatch.setenv("OPENAI_API_KEY", CANARY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    data_dir = tmp_path / "app-data"
    data_dir.mkdir()
    with key_recording_server(key=VISITOR) as server, running_app(data_dir) as url:
        alice, bob = Client(url, verbose=False), Client(url, verbose=False)
        assert compare_remote(alice, server.url, VISITOR)[0] == "3"
        assert compare_remote(alice, server.url + "/", "")[0] == "3"  # kept in her session
        seen = len(server.auth)
        answer, stats = compare_remote(bob, server.url, "")
        assert not answer and "rejected the API key: enter yours" in stats, stats
        assert server.auth[seen:] == [PLACEHOLDER]  # Bob's request carried neither key

        run_a = start_eval(alice, server.url, "")  # the key she typed in the Compare tab
        assert "**done**" in wait_for_end(alice, run_a)
        seen = len(server.auth)
        run_b = start_eval(bob, server.url, "")
        state = wait_for_end(bob, run_b)
        assert "**failed**" in state and "rejected the API key" in state, state
        assert set(server.auth[seen:]) == {PLACEHOLDER}
        assert alice.predict(run_a, "csv", api_name="/export_eval")
    assert f"Bearer {CANARY}" not in server.auth  # the operator's key never left for a typed URL
    written = text_everywhere(data_dir)
    assert "3" in written and run_a in written  # the scan does read the runs
    assert CANARY not in written and VISITOR not in written
