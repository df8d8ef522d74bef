"""Shared fixtures. Every test session gets a throwaway data dir (DuckDB, jobs, adapters); the
converted model cache is shared across sessions (MODELS_DIR) so the 20 s GGUF conversion runs once."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("MODELS_DIR", str(REPO / "data" / "runtime" / "models"))
os.environ["DATA_DIR"] = tempfile.mkdtemp(prefix="lab-test-data-")
atexit.register(shutil.rmtree, os.environ["DATA_DIR"], ignore_errors=True)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402  (the environment above must be set before anything imports config)


@pytest.fixture(scope="module", autouse=True)
def module_data_dir(tmp_path_factory):
    """Each test module writes into its own data dir (DuckDB file, jobs, adapters, pipelines), so
    no module sees another's rows or names. Tests that need more isolation use tmp_path."""
    path = tmp_path_factory.mktemp("data")
    patch = pytest.MonkeyPatch()
    patch.setenv("DATA_DIR", str(path))
    yield path
    patch.undo()


@pytest.fixture(autouse=True)
def no_model_weights_outside_integration(request, monkeypatch):
    """`make test-fast` promises no model: a test not marked integration (or browser) that loads
    weights in this process fails here, naming itself, instead of silently converting the GGUF."""
    if request.node.get_closest_marker("integration") or request.node.get_closest_marker("browser"):
        return
    from transformers import PreTrainedModel

    def refuse(cls, *args, **kwargs):
        raise RuntimeError(f"{request.node.nodeid} loads model weights ({cls.__name__}): "
                           "mark it @pytest.mark.integration")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))
