"""ModelHub and OpenAIBackend: resolution and clear errors without a model; generation, adapters,
streaming, scoring and concurrency on the real embedded 135M model."""
from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch

from core import config
from core.config import models_dir
from core.generation import GenParams
from core.model_files import (MINILM, SMOLLM2, AdapterError, ModelNotAllowedError, ModelNotFoundError,
                              UnsupportedModelError, check_allowed, ensure_converted, model_path,
                              resolve)
from core.models import ModelHub
from core.openai_backend import (BackendRequestError, BackendUnreachableError, MissingApiKeyError,
                                 OpenAIBackend)
from core.systems import BASE
from tests import servers
from tests.app_server import free_port
from tests.servers import make_lora_adapters

EIFFEL = ("Answer the question using the context.\n\nContext: The Eiffel Tower is a wrought-iron "
          "lattice tower in Paris. It was completed in 1889 for the World's Fair.\n\n"
          "Question: When was the Eiffel Tower completed?")
SHORT = GenParams(max_new_tokens=12)  # enough for answers to differ between adapters


# ---------------------------------------------------------------- resolution (no model)


def test_aliases_resolve_to_the_shipped_models():
    smol = resolve(SMOLLM2)
    assert (smol.kind, Path(smol.path)) == ("alias", models_dir() / SMOLLM2)
    assert smol.source is not None and smol.source.is_file()
    minilm = resolve(MINILM)
    assert minilm.kind == "alias" and Path(minilm.path, "config.json").is_file()


def test_alias_beats_folder_beats_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / SMOLLM2).mkdir()
    (tmp_path / "org" / "model").mkdir(parents=True)
    assert resolve(SMOLLM2).kind == "alias"
    folder = resolve("org/model")
    assert (folder.kind, folder.path) == ("folder", str((tmp_path / "org" / "model").resolve()))
    assert resolve("org/other-model").kind == "hub"


@pytest.mark.parametrize("ref", ["", "no such/model with spaces", "a/b/c", "../nowhere/x"])
def test_garbage_ids_get_a_sentence_naming_them(ref):
    with pytest.raises(ModelNotFoundError, match="not a built-in alias") as err:
        resolve(ref)
    assert f"'{ref.strip()}'" in str(err.value)


def test_unknown_hub_id_offline_is_a_clear_error():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set by conftest: tests never download
    with pytest.raises(ModelNotFoundError) as err:
        ModelHub().load("nobody-xyz/no-such-model")
    assert "'nobody-xyz/no-such-model'" in str(err.value) and "offline?" in str(err.value)


def test_embedder_alias_is_refused_as_a_chat_model():
    with pytest.raises(UnsupportedModelError, match="not a text-generation model"):
        ModelHub().load(MINILM)


def test_adapter_folder_is_refused_as_a_model(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(UnsupportedModelError, match="LoRA adapter folder"):
        ModelHub().load(str(tmp_path))


# ---------------------------------------------------------------- adapter checks (no model)


def _lora_config(folder: Path, peft_type: str = "LORA") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type}))


def test_adapter_with_only_pickle_weights_is_refused(tmp_path):
    _lora_config(tmp_path / "ad")
    (tmp_path / "ad" / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(AdapterError, match="pickle") as err:
        ModelHub().load_adapter(SMOLLM2, str(tmp_path / "ad"))
    assert "adapter_model.bin" in str(err.value)


def test_non_lora_and_incomplete_adapters_are_refused(tmp_path):
    _lora_config(tmp_path / "ia3", "IA3")
    (tmp_path / "ia3" / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(AdapterError, match="not a LoRA adapter"):
        ModelHub().load_adapter(SMOLLM2, str(tmp_path / "ia3"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        ModelHub().load_adapter(SMOLLM2, str(tmp_path / "empty"))


def test_hub_adapter_offline_is_a_clear_error():
    with pytest.raises(AdapterError, match="'nobody-xyz/some-adapter'.*offline"):
        ModelHub().load_adapter(SMOLLM2, "nobody-xyz/some-adapter")


def test_bad_adapter_name_and_params_are_refused(tmp_path):
    _lora_config(tmp_path / "ad")
    (tmp_path / "ad" / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(AdapterError, match="not allowed"):
        ModelHub().load_adapter(SMOLLM2, str(tmp_path / "ad"), name=BASE)
    with pytest.raises(ValueError, match="temperature"):
        GenParams(temperature=-1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenParams(max_new_tokens=0)


# ---------------------------------------------------------------- public-server settings (no model)


def test_public_mode_follows_the_env_and_a_space():
    assert config.public_mode({}) is False
    assert config.public_mode({"SPACE_ID": "me/lab"}) is True
    assert config.public_mode({"SPACE_ID": "me/lab", "PUBLIC_MODE": "0"}) is False
    assert config.public_mode({"PUBLIC_MODE": "1"}) is True
    with pytest.raises(ValueError, match="PUBLIC_MODE must be 1 or 0"):
        config.public_mode({"PUBLIC_MODE": "maybe"})


def test_model_cap_and_allowlist_parse_from_the_env():
    assert config.max_loaded_models({}) == 2
    assert config.max_loaded_models({"MAX_LOADED_MODELS": " 3 "}) == 3
    for bad in ("0", "two", "-1"):
        with pytest.raises(ValueError, match="MAX_LOADED_MODELS must be a whole number"):
            config.max_loaded_models({"MAX_LOADED_MODELS": bad})
    assert config.allowed_models({}) == ()
    assert config.allowed_models({"ALLOWED_MODELS": " org/a, ./b ,,org/a"}) == ("org/a", "./b")


@pytest.fixture
def public(monkeypatch):
    monkeypatch.setattr(config, "PUBLIC_MODE", True)
    monkeypatch.setattr(config, "ALLOWED_MODELS", ("nobody-xyz/allowed-model",))


def test_public_mode_refuses_models_outside_the_allowlist(public, tmp_path):
    for ref in (str(tmp_path), "/etc", "nobody-xyz/other-model"):
        with pytest.raises(ModelNotAllowedError) as err:
            ModelHub().load(ref)
        message = str(err.value)
        assert f"'{ref}'" in message and "ALLOWED_MODELS (nobody-xyz/allowed-model)" in message
        assert "\n" not in message
    with pytest.raises(ModelNotAllowedError):
        model_path(str(tmp_path))  # what fine-tuning trains on goes through the same check
    with pytest.raises(ModelNotAllowedError):
        ModelHub().stream(str(tmp_path), ["hi"])
    # Allowed refs get past the check: this one then fails as any unknown hub id does offline.
    with pytest.raises(ModelNotFoundError, match="offline"):
        ModelHub().load("nobody-xyz/allowed-model")
    check_allowed(SMOLLM2)  # the embedded aliases are always allowed
    with pytest.raises(UnsupportedModelError, match="not a text-generation model"):
        ModelHub().load(MINILM)


# ---------------------------------------------------------------- OpenAI backend (no model)


def test_openai_without_key_is_refused(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(MissingApiKeyError, match="OPENAI_API_KEY"):
        OpenAIBackend(None, None, "gpt-4o-mini")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-real")
    backend = OpenAIBackend(None, None, "gpt-4o-mini")
    assert "sk-test" not in repr(backend)
    assert OpenAIBackend("http://127.0.0.1:1/v1", None, "local").model == "local"


def test_unreachable_server_names_the_url():
    url = f"http://127.0.0.1:{free_port()}/v1"
    backend = OpenAIBackend(url, None, "m", timeout=5, max_retries=0)
    with pytest.raises(BackendUnreachableError, match=url):
        backend.generate(["hi"])
    with pytest.raises(BackendUnreachableError, match=url):
        list(backend.stream([[{"role": "user", "content": "hi"}]]))
    with pytest.raises(BackendUnreachableError, match=url):
        backend.score_tokens("hi", ["1", "2"])


# ---------------------------------------------------------------- the real 135M model


@pytest.fixture(scope="module")
def hub() -> ModelHub:
    # Its own hub, not get_hub(): adapters other tests attach must not leak into these checks.
    hub = ModelHub()
    hub.load(SMOLLM2)
    return hub


@pytest.fixture(scope="module")
def plain_answer(hub) -> str:
    """The answer of the model before any adapter is attached (no peft wrapper at all)."""
    assert hub.list_adapters(SMOLLM2) == []
    return hub.generate(SMOLLM2, [EIFFEL], params=SHORT)[0].text


@pytest.mark.integration
def test_greedy_answer_uses_the_context(hub):
    generation = hub.generate(SMOLLM2, [EIFFEL], params=GenParams(max_new_tokens=24))[0]
    assert "1889" in generation.text
    assert generation.prompt_tokens > 20 and 0 < generation.new_tokens <= 24
    assert 0 < generation.first_token_seconds <= generation.seconds


@pytest.fixture(scope="module")
def adapters(hub, plain_answer, tmp_path_factory) -> dict[str, Path]:
    folders = make_lora_adapters(tmp_path_factory.mktemp("adapters"), ["a1", "a2", "a3", "a4", "a5"])
    for name, folder in folders.items():
        assert hub.load_adapter(SMOLLM2, str(folder), name=name) == name
    return folders


@pytest.mark.integration
def test_mixed_batch_gives_each_row_its_adapter(hub, plain_answer, adapters):
    rows = [BASE, "a1", BASE, "a2"]
    texts = [g.text for g in hub.generate(SMOLLM2, [EIFFEL] * 4, rows, SHORT)]
    assert texts[0] == texts[2] == plain_answer
    assert texts[1] != plain_answer and texts[3] != plain_answer and texts[1] != texts[3]
    alone = {name: hub.generate(SMOLLM2, [EIFFEL], [name], SHORT)[0].text for name in ("a1", "a2")}
    assert (texts[1], texts[3]) == (alone["a1"], alone["a2"])


@pytest.mark.integration
def test_adapter_loading_is_idempotent_and_unknown_names_are_refused(hub, adapters):
    before = hub.list_adapters(SMOLLM2)
    assert hub.load_adapter(SMOLLM2, str(adapters["a1"]), name="a1") == "a1"
    assert hub.list_adapters(SMOLLM2) == before == ["a1", "a2", "a3", "a4", "a5"]
    with pytest.raises(AdapterError, match="nope.*not attached"):
        hub.generate(SMOLLM2, [EIFFEL], ["nope"], SHORT)
    with pytest.raises(AdapterError, match="nope.*not attached"):
        list(hub.stream(SMOLLM2, [EIFFEL], ["nope"], SHORT))


@pytest.mark.integration
def test_retrained_adapter_folder_is_reloaded(hub, adapters, tmp_path):
    folder = make_lora_adapters(tmp_path / "v1", ["swap"])["swap"]
    hub.load_adapter(SMOLLM2, str(folder), name="swap")
    first = hub.generate(SMOLLM2, [EIFFEL], ["swap"], SHORT)[0].text
    replacement = make_lora_adapters(tmp_path / "v2", ["other", "swap"])["swap"]  # other weights
    shutil.rmtree(folder)
    shutil.copytree(replacement, folder)
    hub.load_adapter(SMOLLM2, str(folder), name="swap")
    assert hub.generate(SMOLLM2, [EIFFEL], ["swap"], SHORT)[0].text != first
    assert hub.generate(SMOLLM2, [EIFFEL], ["a1"], SHORT)[0].text == hub.generate(
        SMOLLM2, [EIFFEL] * 2, [BASE, "a1"], SHORT)[1].text


@pytest.mark.integration
def test_adapter_for_another_model_is_refused_and_changes_nothing(hub, plain_answer, tmp_path):
    tiny = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=1000)
    folder = make_lora_adapters(tmp_path, ["tiny"], tiny)["tiny"]
    with pytest.raises(AdapterError, match="made for another model"):
        hub.load_adapter(SMOLLM2, str(folder))
    assert "tiny" not in hub.list_adapters(SMOLLM2)
    assert hub.generate(SMOLLM2, [EIFFEL], [BASE], SHORT)[0].text == plain_answer


@pytest.mark.integration
def test_stream_ends_with_the_generate_texts(hub, adapters):
    prompts = [EIFFEL, [{"role": "user", "content": "Name a colour."}], EIFFEL]
    rows = [BASE, BASE, "a1"]
    expected = [g.text for g in hub.generate(SMOLLM2, prompts, rows, SHORT)]
    with hub.stream(SMOLLM2, prompts, rows, SHORT) as stream:
        snapshots = list(stream)
    assert len(snapshots) > 1 and all(len(s) == 3 for s in snapshots)
    assert snapshots[-1] == expected
    assert [g.text for g in stream.generations] == expected
    assert all(0 < g.first_token_seconds <= g.seconds for g in stream.generations)


@pytest.mark.integration
def test_closing_a_stream_stops_the_generation(hub):
    stream = hub.stream(SMOLLM2, ["Write a long story about a dragon and a knight."],
                        params=GenParams(max_new_tokens=400))
    next(stream)
    stream.close()
    for _ in stream:
        pass
    assert stream.generations[0].new_tokens < 100


COLOUR = [{"role": "user", "content": "Name a colour."}]


def held_first_batch(hub, tmp_path, monkeypatch):
    """Start a request whose batch is held at the batcher's gate, so the next requests queue
    behind it and share the batch after it (core.testhooks)."""
    from core.testhooks import GATE_ENV
    from tests.gates import Gate

    monkeypatch.setenv(GATE_ENV, str(tmp_path / "gates"))
    gate = Gate(tmp_path / "gates", "batcher-run").arm()
    first = hub.stream(SMOLLM2, [EIFFEL], ["a2"], SHORT)
    gate.wait_reached()
    return first, gate


@pytest.mark.integration
def test_visitors_queued_behind_a_batch_share_one_and_get_their_solo_answers(hub, adapters, tmp_path,
                                                                           monkeypatch, caplog):
    requests = [([EIFFEL], ["a1"]), ([COLOUR, EIFFEL], [BASE, "a3"])]  # two lengths, three adapters
    alone = [[hub.generate(SMOLLM2, [p], [a], SHORT)[0].text for p, a in zip(*r)] for r in requests]
    first, gate = held_first_batch(hub, tmp_path, monkeypatch)
    with caplog.at_level("INFO", logger="core.batcher"):
        streams = [hub.stream(SMOLLM2, prompts, names, SHORT) for prompts, names in requests]
        gate.release()
        answers = [list(stream)[-1] for stream in streams]
        list(first)
    assert answers == alone
    assert "batch of 2 requests, 3 rows" in caplog.text


@pytest.mark.integration
def test_a_visitor_who_leaves_drops_only_their_request(hub, adapters, tmp_path, monkeypatch, caplog):
    kept_alone = hub.generate(SMOLLM2, [COLOUR], ["a1"], SHORT)[0].text
    first, gate = held_first_batch(hub, tmp_path, monkeypatch)
    with caplog.at_level("INFO", logger="core.batcher"):
        queued = hub.stream(SMOLLM2, [EIFFEL], [BASE], SHORT)  # leaves before its batch
        leaving = hub.stream(SMOLLM2, [EIFFEL], ["a4"], SHORT)  # leaves mid-batch
        kept = hub.stream(SMOLLM2, [COLOUR], ["a1"], SHORT)
        queued.close()
        assert list(queued) == [[""]]
        gate.release()
        next(leaving)
        leaving.close()
        list(leaving)
        assert list(kept)[-1] == [kept_alone]
        list(first)
    assert "batch of 2 requests, 2 rows" in caplog.text  # leaving and kept; queued never ran
    assert hub._batchers[hub.load(SMOLLM2).resolved.path].queued() == 0


@pytest.mark.integration
def test_seeded_sampling_repeats(hub):
    def sample(seed: int) -> str:
        params = GenParams(max_new_tokens=12, temperature=1.2, seed=seed)
        return hub.generate(SMOLLM2, ["Tell me something about cats."], params=params)[0].text

    assert sample(7) == sample(7)
    assert len({sample(7), sample(1), sample(2)}) > 1


@pytest.mark.integration
def test_score_tokens_gives_probabilities(hub, adapters):
    judge = [{"role": "user", "content": "Question: When was the Eiffel Tower completed?\n"
                                         "Reference answer: 1889\nAnswer: 1889\n\nRate the accuracy "
                                         "of the answer from 1 to 5.\n\nEvaluation Form (scores ONLY):"}]
    digits = ["1", "2", "3", "4", "5"]
    scores = hub.score_tokens(SMOLLM2, judge, digits, assistant_prefix="- Accuracy:")
    assert set(scores.probs) == set(digits)
    assert all(0 <= p <= 1 for p in scores.probs.values())
    assert 0 < scores.mass <= 1
    assert sum(scores.normalized().values()) == pytest.approx(1.0)
    with_adapter = hub.score_tokens(SMOLLM2, judge, digits, adapter="a1", assistant_prefix="- Accuracy:")
    assert with_adapter.probs != scores.probs


@pytest.mark.integration
def test_concurrent_requests_get_their_own_adapter(hub, adapters, tmp_path):
    names = [BASE, "a1", "a2", "a3", "a4", "a5"]
    alone = {name: hub.generate(SMOLLM2, [EIFFEL], [name], SHORT)[0].text for name in names}
    assert len(set(alone.values())) > 1
    late = make_lora_adapters(tmp_path, ["late"])["late"]
    results: dict[str, str] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(names) + 1)

    def ask(name: str) -> None:
        try:
            start.wait()
            results[name] = hub.generate(SMOLLM2, [EIFFEL], [name], SHORT)[0].text
        except BaseException as err:  # surfaced by the assertion below
            errors.append(err)

    def attach() -> None:
        start.wait()
        hub.load_adapter(SMOLLM2, str(late), name="late")  # while the others generate

    threads = [threading.Thread(target=ask, args=(n,)) for n in names] + [threading.Thread(target=attach)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert results == alone
    assert "late" in hub.list_adapters(SMOLLM2)


@pytest.mark.integration
def test_threads_loading_one_model_share_one_copy():
    hub = ModelHub()
    loaded = []
    threads = [threading.Thread(target=lambda: loaded.append(hub.load(SMOLLM2))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(loaded) == 3 and all(entry is loaded[0] for entry in loaded)
    assert not loaded[0].model.training and loaded[0].tokenizer.padding_side == "left"


@pytest.mark.integration
def test_conversion_builds_a_complete_folder_and_clears_stale_temp_dirs(tmp_path):
    target = tmp_path / SMOLLM2
    stale = tmp_path / f"{SMOLLM2}.tmp-killed"
    stale.mkdir()
    ensure_converted(target, resolve(SMOLLM2).source)
    assert not stale.exists() and not list(tmp_path.glob("*.tmp-*"))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in target.iterdir()}
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(target).chat_template


# ---------------------------------------------------------------- the cap on loaded models

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> list[str]:
    """Four random-init Llama folders (a few MB each, cheap to load) with the 135M tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(model_path(SMOLLM2))
    root = tmp_path_factory.mktemp("tiny")
    folders = []
    for seed in range(4):
        torch.manual_seed(seed)
        model_config = LlamaConfig(**TINY, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id)
        folder = root / f"tiny{seed}"
        AutoModelForCausalLM.from_config(model_config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders.append(str(folder))
    return folders


@pytest.mark.integration
def test_loading_past_the_cap_evicts_the_least_recently_used(tiny_models):
    a, b, c = tiny_models[:3]
    hub = ModelHub(max_loaded=2)
    first_a = hub.load(a)
    hub.load(b)
    hub.generate(a, ["hi"], params=GenParams(max_new_tokens=2))  # a call makes a recent again
    assert hub.loaded_models() == [b, a]
    hub.load(c)
    assert hub.loaded_models() == [a, c]
    assert hub.load(a) is first_a  # kept, not reloaded
    hub.load(b)
    assert hub.loaded_models() == [a, b]


@pytest.mark.integration
def test_a_model_mid_call_is_never_evicted(tiny_models):
    a, b, c, d = tiny_models
    hub = ModelHub(max_loaded=2)
    entry_a = hub.load(a)
    hub.load(b)
    with entry_a.lock:  # as a running generate or score_tokens holds it: a is busy, b is not
        hub.load(c)
        assert hub.loaded_models() == [a, c]
    # Both busy: the load waits for the least recently used one (a) to finish its call.
    entry_c = hub.load(c)
    entry_a.lock.acquire()
    entry_c.lock.acquire()
    loader = threading.Thread(target=hub.load, args=(d,))
    loader.start()
    entry_a.lock.release()
    loader.join()
    assert hub.loaded_models() == [c, d]  # c is still mid-call: it stays
    entry_c.lock.release()


@pytest.mark.integration
def test_an_adapter_comes_back_with_its_evicted_model(tiny_models, tmp_path):
    a, b = tiny_models[:2]
    folder = make_lora_adapters(tmp_path, ["ad"], dict(TINY))["ad"]
    hub = ModelHub(max_loaded=1)
    hub.load_adapter(a, str(folder), name="ad")
    params = GenParams(max_new_tokens=8)
    base, tuned = [g.text for g in hub.generate(a, ["hi", "hi"], [BASE, "ad"], params)]
    assert base != tuned
    hub.load(b)
    assert hub.loaded_models() == [b] and hub.list_adapters(a) == []
    # A job that attached "ad" before the eviction goes on naming it: the hub attaches it again.
    assert [g.text for g in hub.generate(a, ["hi", "hi"], [BASE, "ad"], params)] == [base, tuned]
    assert hub.list_adapters(a) == ["ad"] and hub.loaded_models() == [a]
    shutil.rmtree(folder)  # a deleted adapter is not brought back
    hub.load(b)
    with pytest.raises(AdapterError, match="ad.*not attached"):
        hub.generate(a, ["hi"], ["ad"], params)


# ---------------------------------------------------------------- OpenAI backend, real server


@pytest.fixture(scope="module")
def served_model():
    """`transformers serve` on the converted 135M model: a real OpenAI-compatible server."""
    with servers.served_model() as served:
        yield served


@pytest.mark.integration
def test_openai_backend_on_a_real_server(served_model):
    url, name = served_model
    backend = OpenAIBackend(url, None, name)
    generations = backend.generate([EIFFEL, "Name a colour."], GenParams(max_new_tokens=24))
    assert "1889" in generations[0].text and generations[1].text
    with backend.stream([EIFFEL], SHORT) as stream:
        snapshots = list(stream)
    assert len(snapshots) > 1 and snapshots[-1] == [stream.generations[0].text]
    # transformers serve ignores logprobs: the judge must learn that and fall back to sampling.
    assert backend.score_tokens(EIFFEL, ["1", "2"]) is None
    with pytest.raises(BackendRequestError, match=url):
        OpenAIBackend(url, None, "nobody/no-such-model").generate(["hi"], SHORT)
