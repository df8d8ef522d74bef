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
