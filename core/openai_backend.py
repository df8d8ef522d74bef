"""Generation on any OpenAI-compatible server (OpenAI, vLLM, TGI, `transformers serve`, Ollama),
in the shape of ModelHub's generate/stream/score_tokens. There are no adapter arguments: the
served model name selects the adapter (e.g. vLLM --enable-lora serves each adapter by name), and
list_models tells a server's base models from its adapters.

The API key is handed to the client and nowhere else: never logged, stored or shown in errors.
The operator's OPENAI_API_KEY goes only to the operator's endpoint (core.secrets.api_key_for); a
base URL a visitor typed gets that visitor's key, or a stand-in for servers that check none.
"""
from __future__ import annotations

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from itertools import islice
from typing import Any, Callable, Iterator

import openai

from core.generation import GenerationStream, GenParams, Generation, Message, Prompt, as_messages
from core.scoring import TokenScores
from core.secrets import Secret, api_key_for, endpoint, is_operator_endpoint
# Local servers do not check the key, but the client refuses to start without one.
_PLACEHOLDER_KEY = "no-key-needed"
_MAX_PARALLEL_REQUESTS = 8
MAX_LISTED_MODELS = 500


class MissingApiKeyError(ValueError):
    pass


class BackendUnreachableError(ValueError):
    pass


class BackendRequestError(ValueError):
    """The server answered but refused the request (bad key, unknown model, bad parameters)."""


@dataclass(frozen=True)
class ServedModel:
    """One entry of a server's model list. vLLM (--enable-lora) lists each LoRA adapter as a model
    whose `parent` is the base model it was loaded on; base models, and every model of servers that
    know no adapters (OpenAI, Ollama, TGI), have none."""

    name: str
    parent: str | None = None

    @property
    def is_adapter(self) -> bool:
        return self.parent is not None


def list_models(base_url: str | None, api_key: Secret | None,
                timeout: float = 15.0) -> list[ServedModel]:
    """GET {base_url}/models: base models first, then adapters, each group in the server's order;
    at most MAX_LISTED_MODELS (a server's list is whatever it says). Same key rules and error
    sentences as generating."""
    server = _Server(base_url, api_key, timeout, max_retries=0)
    with server.errors():
        try:
            models = [_served(card) for card in islice(server.client.models.list(), MAX_LISTED_MODELS)]
        except (openai.APIResponseValidationError, ValueError, TypeError, AttributeError) as err:
            raise BackendRequestError(f"The server at {server.where} did not answer with a model "
                                      "list.") from err
    return sorted((m for m in models if m.name), key=lambda m: m.is_adapter)


def _served(card: Any) -> ServedModel:
    """A model card as ServedModel; a card without a usable id gets the name '' (left out)."""
    name = card.id.strip() if isinstance(card.id, str) else ""
    parent = (card.model_extra or {}).get("parent")
    parent = parent.strip() if isinstance(parent, str) else ""
    return ServedModel(name, parent if parent and parent != name else None)


class OpenAIBackend:
    def __init__(self, base_url: str | None, api_key: Secret | None, model: str,
                 timeout: float = 60.0, max_retries: int = 1) -> None:
        """`api_key`: the key the visitor typed, if any; base_url None is the operator's endpoint."""
        self._server = _Server(base_url, api_key, timeout, max_retries)
        if not model:
            raise ValueError("Name the served model (for vLLM with --enable-lora: the adapter's name).")
        self.base_url = base_url
        self.model = model
        self._client = self._server.client

    def __repr__(self) -> str:
        return f"OpenAIBackend(base_url={self._server.where!r}, model={self.model!r})"

    def generate(self, prompts: list[Prompt], params: GenParams | None = None) -> list[Generation]:
        """One request per prompt, sent concurrently; texts in prompt order."""
        stream = self.stream(prompts, params)
        for _ in stream:
            pass
        return stream.generations or []

    def stream(self, prompts: list[Prompt], params: GenParams | None = None) -> GenerationStream:
        """Iterate for the growing texts of all prompts; `.generations` after the end.

        prompt_tokens is 0 and new_tokens counts text chunks when the server reports no usage.
        """
        gen_params = params or GenParams()
        conversations = [as_messages(p) for p in prompts]  # bad prompts fail here, not in a thread
        return GenerationStream(lambda push, cancel: self._run(conversations, gen_params, push, cancel))

    def score_tokens(self, prompt: Prompt, candidates: list[str],
                     assistant_prefix: str = "") -> TokenScores | None:
        """Next-token probabilities from the top 20 logprobs, or None when the server returns no
        logprobs (transformers serve ignores them): the caller then falls back to sampling.

        Chat APIs cannot continue a half-written assistant turn, so `assistant_prefix` ends the
        last message instead. A candidate outside the top 20 gets 0.
        """
        messages = _with_suffix(as_messages(prompt), assistant_prefix)
        with self._errors():
            reply = self._client.chat.completions.create(
                model=self.model, messages=messages, logprobs=True, top_logprobs=20,
                **self._length(1))
        logprobs = reply.choices[0].logprobs if reply.choices else None
        if logprobs is None or not logprobs.content:
            return None
        top = [(t.token.strip(), t.logprob) for t in logprobs.content[0].top_logprobs]
        probs = {c: sum(math.exp(lp) for piece, lp in top
                        if piece and c.strip().startswith(piece)) for c in candidates}
        return TokenScores(probs, sum(probs.values()))

    def _run(self, conversations: list[list[Message]], params: GenParams,
             push: Callable[[list[str]], None], cancel: threading.Event) -> list[Generation]:
        texts = [""] * len(conversations)
        lock = threading.Lock()

        def append(row: int, delta: str) -> None:
            with lock:
                texts[row] += delta
                push(list(texts))

        def one(row: int) -> Generation:
            return self._one(conversations[row], params, lambda d: append(row, d), cancel)

        if not conversations:
            return []
        with ThreadPoolExecutor(min(_MAX_PARALLEL_REQUESTS, len(conversations))) as pool:
            return list(pool.map(one, range(len(conversations))))

    def _one(self, messages: list[Message], params: GenParams, on_delta: Callable[[str], None],
             cancel: threading.Event) -> Generation:
        start = time.perf_counter()
        first: float | None = None
        text, chunks, usage = "", 0, None
        sampling: dict[str, Any] = {"temperature": params.temperature, "seed": params.seed}
        if params.temperature > 0:
            sampling["top_p"] = params.top_p
        with self._errors():
            with self._client.chat.completions.create(
                    model=self.model, messages=messages, stream=True,
                    stream_options={"include_usage": True}, **sampling, **self._length(params.max_new_tokens)) as response:
                for chunk in response:
                    if cancel.is_set():
                        break
                    usage = getattr(chunk, "usage", None) or usage
                    delta = chunk.choices[0].delta.content if chunk.choices else None
                    if delta:
                        first = first if first is not None else time.perf_counter() - start
                        text += delta
                        chunks += 1
                        on_delta(delta)
        seconds = time.perf_counter() - start
        return Generation(text, usage.prompt_tokens if usage else 0,
                          usage.completion_tokens if usage else chunks, seconds,
                          first if first is not None else seconds)

    def _length(self, tokens: int) -> dict[str, int]:
        # OpenAI's newer models accept only max_completion_tokens; local servers know max_tokens.
        return {"max_completion_tokens" if self.base_url is None else "max_tokens": tokens}

    def _errors(self) -> AbstractContextManager[None]:
        return self._server.errors(self.model)


class _Server:
    """One OpenAI-compatible server: the key it gets (core.secrets rules), the client, and the
    sentences its errors become."""

    def __init__(self, base_url: str | None, api_key: Secret | None, timeout: float,
                 max_retries: int) -> None:
        self.base_url, self.typed = base_url, api_key is not None
        key = api_key_for(base_url, api_key)
        if key is None:
            if is_operator_endpoint(base_url):
                raise MissingApiKeyError("This endpoint needs an API key and the app has none "
                                         "(OPENAI_API_KEY): enter yours (kept for this browser "
                                         "session only, never stored).")
            key = Secret(_PLACEHOLDER_KEY)
        self.where = base_url or endpoint(None)
        self.key = key
        self.client = openai.OpenAI(api_key=key.reveal(), base_url=self.where, timeout=timeout,
                                    max_retries=max_retries)

    @contextmanager
    def errors(self, model: str | None = None) -> Iterator[None]:
        """Turn client exceptions into sentences; none of them repeats the key. `model`: the
        served model a request named (None: the model list)."""
        try:
            yield
        except openai.APIConnectionError as err:  # includes timeouts
            raise BackendUnreachableError(
                f"Could not reach the OpenAI-compatible server at {self.where}: is it running, "
                "and does the base URL end in /v1?") from err
        except openai.AuthenticationError as err:
            hint = ("" if self.typed or is_operator_endpoint(self.base_url) else
                    ": enter yours (this app sends its own key only to the endpoint it was set up for)")
            raise BackendRequestError(f"The server at {self.where} rejected the API key{hint}.") from err
        except openai.NotFoundError as err:
            what = f"does not serve model '{model}'" if model else "has no model list (/models)"
            raise BackendRequestError(f"The server at {self.where} {what} (404 Not Found).") from err
        except openai.APIStatusError as err:
            # A server's error text may quote the request back: the key never goes further.
            reason = err.message.replace(self.key.reveal(), "***")
            raise BackendRequestError(f"The server at {self.where} refused the request "
                                      f"({err.status_code}): {reason}") from err


def _with_suffix(messages: list[Message], suffix: str) -> list[Message]:
    if not suffix:
        return messages
    last = messages[-1]
    return messages[:-1] + [{**last, "content": last["content"] + "\n" + suffix}]
