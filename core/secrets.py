"""Keys and tokens: the one type that carries them, and which endpoint may get the operator's key.

A `Secret` shows '***' when printed, logged or put in an error, and refuses to be pickled, deep
copied into JSON or dumped by pydantic, so it cannot end up in DuckDB, a job record, a log or an
export by accident; `.reveal()` is the one way to the value, called where it is handed to a client.

The operator's OPENAI_API_KEY goes only to the endpoint the operator configured (OPENAI_BASE_URL,
default OpenAI's). Any other base URL gets the key its visitor typed, or none at all.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, NoReturn
from urllib.parse import urlsplit

OPENAI_URL = "https://api.openai.com/v1"
OPERATOR_KEY_ENV = "OPENAI_API_KEY"
_DEFAULT_PORTS = {"http": 80, "https": 443}


class Secret:
    """A key or token: '***' everywhere but `.reveal()`."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str) or not value.strip():
            raise ValueError("A secret must be non-empty text.")
        self._value = value.strip()

    @classmethod
    def typed(cls, text: str | None) -> Secret | None:
        """What a person typed into a key box; None when the box is empty."""
        return cls(text) if text and text.strip() else None

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __copy__(self) -> Secret:
        return self  # immutable: Gradio copies session state, a copy would change nothing

    def __deepcopy__(self, memo: dict[int, Any]) -> Secret:
        return self

    def __reduce_ex__(self, protocol: Any) -> NoReturn:
        raise TypeError("A Secret cannot be pickled: keys are never written anywhere.")

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> NoReturn:
        # Specs are dumped into job records and DuckDB: a model that could hold a key is refused
        # when it is defined, so no model_dump can ever write one.
        raise TypeError("A Secret cannot be a pydantic field: specs are stored, keys never are.")


def endpoint(base_url: str | None, env: Mapping[str, str] = os.environ) -> str:
    """The base URL in one spelling (scheme and host lower case, default port and trailing
    slash dropped), so two spellings of one server compare equal; None or blank: the operator's."""
    url = (base_url or "").strip() or env.get("OPENAI_BASE_URL", "").strip() or OPENAI_URL
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:  # a port that is not a number: kept as typed, so it matches nothing else
        return url
    host = (parts.hostname or "") + (f":{port}" if port and port != _DEFAULT_PORTS.get(scheme) else "")
    user = f"{parts.username or ''}{':' if parts.password else ''}{parts.password or ''}@" \
        if parts.username or parts.password else ""
    query = f"?{parts.query}" if parts.query else ""
    return f"{scheme}://{user}{host}{parts.path.rstrip('/')}{query}"


def is_operator_endpoint(base_url: str | None, env: Mapping[str, str] = os.environ) -> bool:
    return endpoint(base_url, env) == endpoint(None, env)


def api_key_for(base_url: str | None, typed: Secret | None,
                env: Mapping[str, str] = os.environ) -> Secret | None:
    """The key to send to `base_url`: the visitor's typed key, else the operator's
    OPENAI_API_KEY when `base_url` is the operator's endpoint, else None."""
    if typed is not None:
        return typed
    operator_key = env.get(OPERATOR_KEY_ENV, "")
    return Secret(operator_key) if operator_key.strip() and is_operator_endpoint(base_url, env) else None
