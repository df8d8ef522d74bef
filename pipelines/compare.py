"""One question, several systems, side by side.

Retrieval runs once; every RAG system gets the same prompt built from those chunks, every non-RAG
system the same prompt without them, and all share one set of decoding parameters. Local systems
on one base model are answered as one batch with per-row adapters: prompts of similar length are
prefilled together, shortest (closed-book) first, so those columns start streaming before the long
RAG prompts are read, and then every row decodes together (core.batch_prefill). OpenAI-compatible
systems run concurrently beside it. A failing system (unknown adapter, unreachable server) shows its
error in its own column while the others answer.
"""
from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

from haystack import Document

from core import config
from core.generation import GenerationStream, GenParams
from core.models import get_hub
from core.openai_backend import OpenAIBackend
from core.schema import InputError, validate_question
from core.secrets import Secret
from core.systems import BASE, System
from pipelines.indexing import DocumentStoreHandle
from pipelines.query import build_prompt, retrieve
from pipelines.spec import PipelineSpec

MAX_SYSTEMS = 6
# Without retrieval the question goes to the model as it is (closed-book), as in the study.
CLOSED_BOOK_SYSTEM = "Answer the question concisely: a few words or one sentence."


@dataclass
class Column:
    system: System
    text: str = ""
    error: str | None = None
    done: bool = False
    seconds: float | None = None
    first_token_seconds: float | None = None
    new_tokens: int | None = None

    @property
    def stats(self) -> str:
        if self.error:
            return f"error: {self.error}"
        if not self.done:
            return "generating…"
        rate = (self.new_tokens or 0) / max(self.seconds or 0, 1e-9)
        return (f"{self.seconds:.2f} s · first token {self.first_token_seconds:.2f} s · "
                f"{self.new_tokens} tokens · {rate:.1f} tokens/s")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "label": self.system.label}


@dataclass
class Comparison:
    """The state every yield of `compare` carries; the last one is final."""

    question: str
    params: GenParams | None = None
    documents: list[Document] = field(default_factory=list)
    columns: list[Column] = field(default_factory=list)
    rag_messages: list[dict[str, str]] | None = None
    plain_messages: list[dict[str, str]] | None = None

    @property
    def done(self) -> bool:
        return all(c.done for c in self.columns)


def closed_book_messages(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": CLOSED_BOOK_SYSTEM}, {"role": "user", "content": question}]


def check_systems(systems: list[System], spec: PipelineSpec | None) -> None:
    if not systems:
        raise InputError("Choose at least one system to answer.")
    if len(systems) > MAX_SYSTEMS:
        raise InputError(f"At most {MAX_SYSTEMS} systems can be compared at once.")
    if any(s.rag for s in systems) and spec is None:
        raise InputError("A system has RAG on but no pipeline is chosen: pick a built index "
                         "(RAG tab) or turn RAG off.")


def compare(question: str, systems: list[System], params: GenParams,
            spec: PipelineSpec | None = None, index: DocumentStoreHandle | None = None,
            api_key: Secret | None = None, documents: list[Document] | None = None,
            adapter_paths: dict[str, str] | None = None,
            poll_seconds: float = 0.1) -> Iterator[Comparison]:
    """Yield the comparison as it fills. `documents` skips retrieval (regenerate on fixed chunks);
    `adapter_paths` maps adapter names to folders, attached on first use; `api_key` is the key the
    visitor typed for the OpenAI-compatible columns."""
    question = validate_question(question, config.MAX_QUESTION_CHARS)
    check_systems(systems, spec)
    state = Comparison(question, params, columns=[Column(s) for s in systems])
    if any(s.rag for s in systems):
        if index is None:
            raise InputError(f"The pipeline '{spec.name}' has no index yet: build it in the RAG tab.")
        state.documents = documents if documents is not None else retrieve(spec, index, question)
        state.rag_messages = build_prompt(spec, question, state.documents)
    state.plain_messages = closed_book_messages(question)
    yield state

    workers = [threading.Thread(target=_answer_group, args=(state, cols, params, api_key, adapter_paths or {}),
                                daemon=True) for cols in _groups(state)]
    for w in workers:
        w.start()
    last = None
    while any(w.is_alive() for w in workers):
        snapshot = [(c.text, c.done, c.error) for c in state.columns]
        if snapshot != last:
            last = snapshot
            yield state
        time.sleep(poll_seconds)
    yield state


def _groups(state: Comparison) -> list[list[Column]]:
    """Local columns grouped by base model (one batch each); every remote column on its own."""
    local: dict[str, list[Column]] = {}
    groups: list[list[Column]] = []
    for col in state.columns:
        if col.system.kind == "local":
            local.setdefault(col.system.model, []).append(col)
        else:
            groups.append([col])
    return list(local.values()) + groups


def _answer_group(state: Comparison, cols: list[Column], params: GenParams,
                  api_key: Secret | None, adapter_paths: dict[str, str]) -> None:
    try:
        cols = _attach_adapters(cols, adapter_paths)
        if not cols:
            return
        prompts = [state.rag_messages if c.system.rag else state.plain_messages for c in cols]
        stream = _open_stream(cols, prompts, params, api_key)
        with stream:
            for texts in stream:
                for col, text in zip(cols, texts):
                    col.text = text
        for col, gen in zip(cols, stream.generations or []):
            col.text, col.seconds = gen.text, gen.seconds
            col.first_token_seconds, col.new_tokens = gen.first_token_seconds, gen.new_tokens
    except Exception as exc:  # shown in these columns; the other systems keep answering
        message = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
        for col in cols:
            col.error = message
    finally:
        for col in cols:
            col.done = True


def _attach_adapters(cols: list[Column], adapter_paths: dict[str, str]) -> list[Column]:
    """Attach the adapters local columns need; a column whose adapter is unknown or broken gets
    its own error and leaves the batch, so the rest of the batch still answers."""
    if cols[0].system.kind != "local":
        return cols
    hub, ready = get_hub(), []
    for col in cols:
        name = col.system.adapter
        try:
            if name != BASE and name not in hub.list_adapters(col.system.model):
                if name not in adapter_paths:
                    raise InputError(f"Unknown adapter '{name}': train it in the Fine-tune tab "
                                     "or load it from a folder or the Hub first.")
                hub.load_adapter(col.system.model, adapter_paths[name], name)
            ready.append(col)
        except ValueError as exc:
            col.error, col.done = str(exc), True
    return ready


def _open_stream(cols: list[Column], prompts: list[list[dict[str, str]]], params: GenParams,
                 api_key: Secret | None) -> GenerationStream:
    system = cols[0].system
    if system.kind == "openai":
        return OpenAIBackend(system.base_url or None, api_key, system.model).stream(prompts, params)
    return get_hub().stream(system.model, prompts, [c.system.adapter for c in cols], params)
