"""Where runtime files live and the limits a user can hit. No Gradio, no models."""
from __future__ import annotations

import os
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent
SAMPLES_DIR = REPO_DIR / "data" / "samples"

# Uploads above this size are refused before parsing (bytes); override with MAX_UPLOAD_MB.
MAX_UPLOAD_BYTES = int(float(os.environ.get("MAX_UPLOAD_MB", "50")) * 1024 * 1024)
# Questions longer than this (characters) are refused with a clear message.
MAX_QUESTION_CHARS = int(os.environ.get("MAX_QUESTION_CHARS", "4000"))

DEFAULT_CHAT_MODEL = os.environ.get("DEFAULT_CHAT_MODEL", "smollm2-135m-instruct")
DEFAULT_EMBEDDER = os.environ.get("DEFAULT_EMBEDDER", "all-minilm-l6-v2")


def data_dir() -> Path:
    """DATA_DIR env; else /data on a Space with persistent storage; else ./data/runtime."""
    env = os.environ.get("DATA_DIR")
    if env:
        path = Path(env)
    elif os.environ.get("SPACE_ID") and Path("/data").is_dir():
        path = Path("/data")
    else:
        path = REPO_DIR / "data" / "runtime"
    path.mkdir(parents=True, exist_ok=True)
    return path


def subdir(name: str) -> Path:
    path = data_dir() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def models_dir() -> Path:
    """Converted model caches; MODELS_DIR lets tests share one cache across throwaway data dirs."""
    env = os.environ.get("MODELS_DIR")
    path = Path(env) if env else data_dir() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def db_path() -> Path:
    return data_dir() / "app.duckdb"
