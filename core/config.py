"""Where runtime files live and the limits a user can hit. No Gradio, no models."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

REPO_DIR = Path(__file__).resolve().parent.parent
SAMPLES_DIR = REPO_DIR / "data" / "samples"

# Uploads above this size are refused before parsing (bytes); override with MAX_UPLOAD_MB.
MAX_UPLOAD_BYTES = int(float(os.environ.get("MAX_UPLOAD_MB", "50")) * 1024 * 1024)
# Questions longer than this (characters) are refused with a clear message.
MAX_QUESTION_CHARS = int(os.environ.get("MAX_QUESTION_CHARS", "4000"))

# The Evaluate tab's SQL box (core/sqlbox.py): a query is stopped after SQL_TIMEOUT_S seconds,
# shows at most SQL_MAX_ROWS rows and may use SQL_MEMORY_LIMIT of memory (a DuckDB size).
SQL_TIMEOUT_S = float(os.environ.get("SQL_TIMEOUT_S", "5"))
SQL_MAX_ROWS = int(os.environ.get("SQL_MAX_ROWS", "1000"))
SQL_MEMORY_LIMIT = os.environ.get("SQL_MEMORY_LIMIT", "512MB")

DEFAULT_CHAT_MODEL = os.environ.get("DEFAULT_CHAT_MODEL", "smollm2-135m-instruct")
DEFAULT_EMBEDDER = os.environ.get("DEFAULT_EMBEDDER", "all-minilm-l6-v2")


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    value = env.get(name, "").strip().lower()
    if not value:
        return default
    if value not in ("1", "0", "true", "false"):
        raise ValueError(f"{name} must be 1 or 0 (or true/false), not '{env[name]}'.")
    return value in ("1", "true")


def public_mode(env: Mapping[str, str] = os.environ) -> bool:
    """PUBLIC_MODE=1/0; unset, public inside a Space (SPACE_ID is set there), private elsewhere."""
    return _flag(env, "PUBLIC_MODE", bool(env.get("SPACE_ID")))


def allow_operator_token_push(env: Mapping[str, str] = os.environ) -> bool:
    """ALLOW_OPERATOR_TOKEN_PUSH=1 lets visitors of a public server push adapters with the
    operator's HF_TOKEN (to any repo it can write); default 0: they sign in with their own."""
    return _flag(env, "ALLOW_OPERATOR_TOKEN_PUSH", False)


def max_loaded_models(env: Mapping[str, str] = os.environ) -> int:
    """MAX_LOADED_MODELS, default 2: two 135M-1.5B float32 models fit a 16 GB Space beside the
    embedder."""
    value = env.get("MAX_LOADED_MODELS", "").strip() or "2"
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"MAX_LOADED_MODELS must be a whole number of at least 1, not '{value}'.")
    return int(value)


def batch_window_ms(env: Mapping[str, str] = os.environ) -> float:
    """BATCH_WINDOW_MS, default 50: how long a request for an idle model waits for others to join
    its batch (core/batcher.py); 0 turns merging off (each request is its own batch)."""
    value = env.get("BATCH_WINDOW_MS", "").strip() or "50"
    try:
        window = float(value)
    except ValueError:
        window = -1.0
    if not 0 <= window <= 10_000:
        raise ValueError(f"BATCH_WINDOW_MS must be a number of milliseconds from 0 to 10000, not '{value}'.")
    return window


def batch_max_rows(env: Mapping[str, str] = os.environ) -> int:
    """BATCH_MAX_ROWS, default 16: the most rows a merged batch takes (a larger request runs alone)."""
    value = env.get("BATCH_MAX_ROWS", "").strip() or "16"
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"BATCH_MAX_ROWS must be a whole number of at least 1, not '{value}'.")
    return int(value)


def torch_threads(env: Mapping[str, str] = os.environ) -> int | None:
    """TORCH_THREADS: torch's thread count; unset, core.threads picks one by a quick probe."""
    value = env.get("TORCH_THREADS", "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"TORCH_THREADS must be a whole number of at least 1, not '{value}'.")
    return int(value)


def allowed_models(env: Mapping[str, str] = os.environ) -> tuple[str, ...]:
    """ALLOWED_MODELS: comma-separated model refs a visitor may load in public mode, besides the
    embedded aliases."""
    return tuple(dict.fromkeys(r.strip() for r in env.get("ALLOWED_MODELS", "").split(",") if r.strip()))


def max_running_jobs(env: Mapping[str, str] = os.environ) -> int | None:
    """MAX_RUNNING_JOBS: how many visitor-started jobs may be queued or running at once; default 3
    in public mode, no cap locally (None)."""
    value = env.get("MAX_RUNNING_JOBS", "").strip()
    if not value:
        return 3 if public_mode(env) else None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"MAX_RUNNING_JOBS must be a whole number of at least 1, not '{value}'.")
    return int(value)


# On a shared server anyone can name a model: only allowed refs load, and at most this many at once.
# Visitors share the machine too: a cap on running jobs, one fine-tune per visitor session.
PUBLIC_MODE = public_mode()
MAX_LOADED_MODELS = max_loaded_models()
ALLOWED_MODELS = allowed_models()
MAX_RUNNING_JOBS = max_running_jobs()
# Concurrent visitors' generations on one model share batches (core/batcher.py).
BATCH_WINDOW_MS = batch_window_ms()
BATCH_MAX_ROWS = batch_max_rows()
ALLOW_OPERATOR_TOKEN_PUSH = allow_operator_token_push()
# Inside a Hugging Face Space visitors can sign in with their own account (hub pushes).
ON_SPACE = bool(os.environ.get("SPACE_ID"))


# A Space's legacy persistent disk; newer Spaces mount a volume where the operator says (DATA_DIR).
SPACE_VOLUME = Path("/data")


def storage_persistent(env: Mapping[str, str] = os.environ) -> bool:
    """Whether results outlive a restart. False only on a Space (SPACE_ID set) with neither DATA_DIR
    (taken to be a mounted volume) nor the legacy /data disk: a Space's own disk is wiped when it
    restarts. Off a Space the disk is the operator's own."""
    return not env.get("SPACE_ID") or bool(env.get("DATA_DIR")) or SPACE_VOLUME.is_dir()


def data_dir() -> Path:
    """DATA_DIR env; else /data on a Space with persistent storage; else ./data/runtime."""
    env = os.environ.get("DATA_DIR")
    if env:
        path = Path(env)
    elif os.environ.get("SPACE_ID") and SPACE_VOLUME.is_dir():
        path = SPACE_VOLUME
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


DB_FILE = "app.duckdb"


def db_path() -> Path:
    return data_dir() / DB_FILE
