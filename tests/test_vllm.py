"""Serving at scale through vLLM, checked without vLLM and without model weights: the command that
serves the app's adapters (`python -m jobs.vllm_command`), and the client side against a real local
OpenAI-compatible HTTP server that lists a base model and two LoRA adapters as vLLM does (each
adapter a model whose `parent` is the base): listing, adapters as systems in Compare and
Evaluate (each request names its adapter), and the operator's key never sent to a typed URL."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from core import config
from core.generation import GenParams
from core.openai_backend import (BackendRequestError, BackendUnreachableError, ServedModel,
                                 list_models)
from core.schema import InputError
from core.secrets import Secret
from core.store import Store
from core.systems import System
from jobs import vllm_command as vc
from jobs.finetune import _SUMMARY
from jobs.finetune_data import FinetuneSpec
from pipelines.compare import compare
from tests.app_server import free_port
from tests.servers import key_recording_server

REPO = Path(__file__).resolve().parent.parent
CANARY = "sk-canary-operator-5d1e0c77"  # the operator's OPENAI_API_KEY
VISITOR = "sk-visitor-typed-9b3f2a10"
PLACEHOLDER = "Bearer no-key-needed"
VLLM_MODELS = {"base-lm": None, "qa-200": "base-lm", "qa-1000": "base-lm"}


# ---------------------------------------------------------------- the vLLM command


def lora_folder(root: Path, name: str, r: int, rank_pattern: dict | None = None) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "rank_pattern": rank_pattern or {}, "lora_alpha": 16}))
    (folder / "adapter_model.safetensors").write_bytes(b"")
    return folder


@pytest.fixture
def rows(tmp_path) -> list[dict]:
    return [{"name": "qa-200", "base_model": "org/base-lm", "path": str(lora_folder(tmp_path, "a", 8))},
            {"name": "qa-1000", "base_model": "org/base-lm",
             "path": str(lora_folder(tmp_path, "b", 16, {"model.layers.0.self_attn.q_proj": 24}))},
            {"name": "other", "base_model": "org/other-lm", "path": str(lora_folder(tmp_path, "c", 4))}]


def test_the_command_serves_the_base_models_adapters_with_their_rank(rows, tmp_path):
    adapters = [vc.served_adapter(row) for row in vc.pick_adapters(rows, "org/base-lm", None)]
    assert [(a.name, a.rank) for a in adapters] == [("qa-1000", 24), ("qa-200", 8)]
    argv = vc.vllm_command("org/base-lm", "org/base-lm", adapters, port=8001)
    assert argv == ["vllm", "serve", "org/base-lm", "--enable-lora", "--lora-modules",
                    f"qa-1000={tmp_path / 'b'}", f"qa-200={tmp_path / 'a'}",
                    "--max-lora-rank", "32", "--max-loras", "2", "--port", "8001"]
    # A local folder is served under the app's name for it, so the listing names it the same.
    argv = vc.vllm_command("/models/base", "base-alias", adapters[1:])
    assert argv[:5] == ["vllm", "serve", "/models/base", "--served-model-name", "base-alias"]
    assert argv[-4:] == ["--max-lora-rank", "8", "--max-loras", "1"]


def test_named_adapters_must_exist_be_well_named_and_share_the_base(rows):
    assert [r["name"] for r in vc.pick_adapters(rows, "org/base-lm", ["qa-200", "qa-200"])] == ["qa-200"]
    with pytest.raises(ValueError, match="Adapter 'other' belongs to base model 'org/other-lm', not 'org/base-lm'"):
        vc.pick_adapters(rows, "org/base-lm", ["qa-200", "other"])
    with pytest.raises(ValueError, match="No adapter named 'ghost' \\(known: other, qa-1000, qa-200\\)"):
        vc.pick_adapters(rows, "org/base-lm", ["ghost"])
    with pytest.raises(ValueError, match="Adapter name '../x' is not allowed"):
        vc.pick_adapters(rows, "org/base-lm", ["../x"])
    with pytest.raises(ValueError, match="Adapter name 'a=b' is not allowed"):  # stored elsewhere
        vc.served_adapter({**rows[0], "name": "a=b"})
    with pytest.raises(InputError, match="No adapter of base model 'org/none'"):
        vc.pick_adapters(rows, "org/none", None)


def test_ranks_round_up_to_what_vllm_accepts_and_odd_paths_use_json(tmp_path):
    assert [vc.vllm_max_rank([r]) for r in (1, 2, 8, 9, 33, 300, 512)] == [1, 8, 8, 16, 64, 320, 512]
    with pytest.raises(ValueError, match="LoRA rank 600 is above the largest vLLM serves"):
        vc.vllm_max_rank([600])
    odd = vc.ServedAdapter("qa", tmp_path / "run=1,2", 8)
    assert json.loads(vc.lora_module(odd)) == {"name": "qa", "path": str(tmp_path / "run=1,2")}
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no adapter_config.json"):
        vc.lora_rank(tmp_path / "empty")


def test_cli_prints_and_starts_the_command_for_the_stored_adapters(rows, tmp_path, capsys,
                                                                   monkeypatch):
    store = Store()
    for row in rows:
        store.upsert_adapter(row["name"], row["base_model"], row["path"])
    store.close()
    assert vc.main(["--base", "org/base-lm", "--adapters", "qa-200"]) == 0
    assert shlex.split(capsys.readouterr().out) == [
        "vllm", "serve", "org/base-lm", "--enable-lora", "--lora-modules",
        f"qa-200={tmp_path / 'a'}", "--max-lora-rank", "8", "--max-loras", "1"]
    assert vc.main(["--base", "org/base-lm", "--adapters", "other"]) == 2
    assert "belongs to base model 'org/other-lm'" in capsys.readouterr().err
    with monkeypatch.context() as env:
        env.setenv("PATH", str(tmp_path))  # no vllm here
        assert vc.main(["--base", "org/base-lm", "--start"]) == 2
    assert "vllm is not installed here" in capsys.readouterr().err

    bin_dir = tmp_path / "bin"  # a stand-in `vllm` that records the argv it was started with
    bin_dir.mkdir()
    fake = bin_dir / "vllm"
    fake.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {tmp_path / 'argv.txt'}\n")
    fake.chmod(0o755)
    # While the app holds the database, the adapters trained here are read from their folders.
    trained = lora_folder(config.subdir("adapters"), "ft-here", 16)
    spec = FinetuneSpec(base_model="org/base-lm", name="ft-here")
    (trained / "spec.json").write_text(json.dumps(spec.to_dict()))
    (trained / "metrics.json").write_text(json.dumps(dict.fromkeys(_SUMMARY, 0)))
    held = Store()
    started = subprocess.run([sys.executable, "-m", "jobs.vllm_command", "--base", "org/base-lm",
                              "--start"], cwd=REPO, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    held.close()
    assert started.returncode == 0, started.stderr
    assert "only adapters trained here are listed" in started.stderr
    printed = shlex.split(started.stdout)
    assert printed == ["vllm", "serve", "org/base-lm", "--enable-lora", "--lora-modules",
                       f"ft-here={trained}", "--max-lora-rank", "16", "--max-loras", "1"]
    assert (tmp_path / "argv.txt").read_text().splitlines() == printed[1:]


# ---------------------------------------------------------------- listing a server's models


def test_listing_tells_base_models_from_adapters(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    models = {"qa-200": "base-lm", "base-lm": None, "qa-1000": "base-lm", "plain": None}
    with key_recording_server(models=models) as server:
        listed = list_models(server.url, None)
    assert listed == [ServedModel("base-lm"), ServedModel("plain"), ServedModel("qa-200", "base-lm"),
                      ServedModel("qa-1000", "base-lm")]
    assert [m.is_adapter for m in listed] == [False, False, True, True]


def test_listing_sends_the_operators_key_only_to_the_operators_endpoint(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", CANARY)
    with key_recording_server(models=VLLM_MODELS) as visitor, key_recording_server() as operator:
        monkeypatch.setenv("OPENAI_BASE_URL", operator.url)
        assert [m.name for m in list_models(visitor.url, None)] == list(VLLM_MODELS)
        list_models(visitor.url + "/", Secret(VISITOR))
        list_models(None, None)
        list_models(operator.url.upper().replace("/V1", "/v1"), None)
    assert visitor.auth == [PLACEHOLDER, f"Bearer {VISITOR}"]
    assert operator.auth == [f"Bearer {CANARY}"] * 2


def test_listing_failures_are_one_line_messages(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", CANARY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(BackendUnreachableError, match="Could not reach the OpenAI-compatible server"):
        list_models(f"http://127.0.0.1:{free_port()}/v1", None)
    with key_recording_server(key=VISITOR) as server:
        with pytest.raises(BackendRequestError, match="rejected the API key: enter yours"):
            list_models(server.url, None)
        with pytest.raises(BackendRequestError, match="has no model list \\(/models\\)"):
            list_models(server.url.replace("/v1", "/v2"), Secret(VISITOR))
    assert server.auth == [PLACEHOLDER]


# ---------------------------------------------------------------- adapters as systems


def test_compare_sends_each_served_adapters_name(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", CANARY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with key_recording_server(reply="Mary Shelley", models=VLLM_MODELS) as server:
        systems = [System("openai", m.name, base_url=server.url) for m in list_models(server.url, None)]
        *_, state = compare("Who wrote Frankenstein?", systems, GenParams(max_new_tokens=8))
    assert [c.error for c in state.columns] == [None] * 3
    assert [c.text for c in state.columns] == ["Mary Shelley"] * 3
    assert sorted(server.asked) == sorted(VLLM_MODELS)
    assert set(server.auth) == {PLACEHOLDER}
    # The adapter served by vLLM and the same adapter run here read apart in every table.
    port = server.url.split(":")[2].split("/")[0]
    assert systems[1].label == f"qa-200 @ 127.0.0.1:{port} · no RAG"
    assert System("local", "base-lm", "qa-200").label == "qa-200 · no RAG"


@pytest.fixture(scope="module")
def app():
    """The app's own Blocks and wiring in this process (no model is loaded: no warm-up, and only
    served systems and an OpenAI-compatible judge are used), for gradio_client."""
    from gradio_client import Client

    from app import build_app
    from jobs.services import build_services

    services = build_services(warm_up=False)
    demo = build_app(services).queue()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(),
                quiet=True)
    try:
        yield services, lambda: Client(demo.local_url, verbose=False)
    finally:
        demo.close()


def test_the_app_lists_a_servers_adapters_and_uses_each_as_a_system(app, monkeypatch):
    services, client = app
    monkeypatch.setenv("OPENAI_API_KEY", CANARY)  # read per request: never for a typed URL
    with key_recording_server(reply="3", key=VISITOR, models=VLLM_MODELS) as server:
        alice = client()
        table = alice.predict(server.url, VISITOR, api_name="/list_server_models")
        assert table["data"] == [["base-lm", "base model", ""], ["qa-200", "adapter", "base-lm"],
                                 ["qa-1000", "adapter", "base-lm"]]
        out = alice.predict("Who wrote Frankenstein?", "smollm2-135m-instruct", None, server.url,
                            "", "", 8, 0.0, 1.0, 0, "served: qa-200", False, "served: qa-1000",
                            False, *["(off)", False] * 4, api_name="/compare")
        assert [out[1]["value"], out[2]["value"]] == ["3", "3"]
        assert server.asked == ["qa-200", "qa-1000"] or server.asked == ["qa-1000", "qa-200"]

        table = alice.predict(server.url, "", api_name="/list_eval_server_models")  # key kept
        port = server.url.split(":")[2].split("/")[0]
        status, run = alice.predict(
            "sample:nq", 1, 0, "", "smollm2-135m-instruct", None, 8,
            [f"qa-200 @ 127.0.0.1:{port} · no RAG", f"base-lm @ 127.0.0.1:{port} · no RAG"],
            "openai", "judge-lm", server.url, "", ["accuracy"], "logprobs", 1, 1, False, "", "",
            "", api_name="/start_eval")
        assert services.runner.wait(run["value"], timeout=300).status == "done"
        asked = server.asked[2:]
        assert asked.count("qa-200") == asked.count("base-lm") == 1 and "judge-lm" in asked
        assert {"qa-200", "base-lm"} == {row["system"].split(" @ ")[0]
                                         for row in services.evaluations.summary(run["value"])}
    assert set(server.auth) == {f"Bearer {VISITOR}"}  # never the operator's key
