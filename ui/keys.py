"""The API keys a visitor types: kept in that visitor's Gradio session (one gr.State per browser
session, gone when the session ends), handed to comparisons and evaluation jobs in memory, and
never written to DuckDB, job records, logs, run folders or exports."""
from __future__ import annotations

import gradio as gr

from core.secrets import Secret, endpoint

KeyRing = dict[str, Secret]
"""Endpoint (core.secrets.endpoint of a base URL) -> the key this visitor typed for it."""


def keyring() -> gr.State:
    """This browser session's keys; Gradio gives every session its own."""
    return gr.State({})


def remember(keys: KeyRing | None, base_url: str | None, typed: str | None) -> tuple[KeyRing, Secret | None]:
    """The session's keys with the one just typed for `base_url` (an empty box keeps the one
    typed before), and the key to use for `base_url` (None: the visitor has given none)."""
    keys = dict(keys or {})
    where = endpoint(base_url)
    secret = Secret.typed(typed)
    if secret is not None:
        keys[where] = secret
    return keys, keys.get(where)
