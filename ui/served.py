"""'List server models' beside an OpenAI-compatible endpoint (Compare and Evaluate tabs): the
server's base models and LoRA adapters (vLLM --enable-lora), each usable as a system."""
from __future__ import annotations

import pandas as pd

from core.openai_backend import ServedModel, list_models
from ui.keys import KeyRing, remember

COLUMNS = ["model", "kind", "parent"]


def listing(ring: KeyRing | None, base_url: str | None = None,
            api_key: str | None = None) -> tuple[pd.DataFrame, list[str], KeyRing]:
    """The server's models as a table (base models first), their names, and the session's keys
    with the one typed (the same key then serves this endpoint's systems)."""
    url = (base_url or "").strip() or None
    ring, secret = remember(ring, url, api_key)
    models = list_models(url, secret)
    return frame(models), [m.name for m in models], ring


def frame(models: list[ServedModel]) -> pd.DataFrame:
    return pd.DataFrame([[m.name, "adapter" if m.is_adapter else "base model", m.parent or ""]
                         for m in models], columns=COLUMNS)
