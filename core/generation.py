"""One batch of prompts answered together, streamed: prompts and their chat text, decoding
parameters, per-row timings, cancellation, and the iterator that hands growing texts to another
thread. generate_grouped prefills similar-length prompts apart (no padding waste, short prompts'
first tokens early) and decodes all rows together, greedy rows leaving the batch as they finish
(core.greedy_decode; sampled rows in one `generate` call); generate_batch runs one padded
`generate` call (for models whose caches cannot be joined, and for batches on a cached prefix).

It knows nothing about which model or adapters run: ModelHub (core.models) picks those and holds
the model's lock around both. OpenAI-compatible backends reuse the prompt types,
GenParams, Generation and GenerationStream, so every backend looks the same to callers.
"""
from __future__ import annotations

import queue
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Union

import torch
from transformers import (StoppingCriteria, StoppingCriteriaList, TemperatureLogitsWarper,
                          TopPLogitsWarper)
from transformers.generation.streamers import BaseStreamer

from core.batch_prefill import distinct_rows, join, length_groups, prefill_group
from core.greedy_decode import decode, plain_greedy

Message = dict[str, str]
Prompt = Union[str, list[Message]]


@dataclass
class GenParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 means greedy decoding
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1.")
        if self.temperature < 0:
            raise ValueError("temperature must be 0 (greedy) or positive.")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1].")


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    new_tokens: int  # decoding steps this row used, its end-of-turn token included
    seconds: float  # from the start of the batch call until this row finished
    first_token_seconds: float


def as_messages(prompt: Prompt) -> list[Message]:
    """A prompt as chat messages: a plain string is one user message."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if not prompt or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                             and m.get("role") in ("system", "user", "assistant") for m in prompt):
        raise ValueError("A prompt is a string or a non-empty list of {'role', 'content'} messages "
                         "with role system, user or assistant.")
    return prompt


def chat_text(tokenizer: Any, prompt: Prompt) -> str:
    """The exact text a local model generates from (fine-tuning trains on the same text)."""
    turns = as_messages(prompt)
    if tokenizer.chat_template is None:  # a plain base model: the messages are the text
        return "\n\n".join(m["content"] for m in turns)
    return tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)


def encode(tokenizer: Any, prompts: list[Prompt], device: torch.device) -> Any:
    """The left-padded batch of chat texts (the tokenizer pads on the left)."""
    return tokenizer([chat_text(tokenizer, p) for p in prompts], return_tensors="pt",
                     padding=True, add_special_tokens=False).to(device)


# Sampling draws from torch's global generator: one seeded run at a time keeps seeds repeatable
# even when two different models sample in two threads.
_SAMPLING_LOCK = threading.Lock()


@contextmanager
def _decoding(params: GenParams) -> Iterator[None]:
    """Inference mode, and for sampling the seeded global generator held for the whole call."""
    if params.temperature > 0:
        with _SAMPLING_LOCK, torch.inference_mode():
            torch.manual_seed(params.seed)
            yield
    else:
        with torch.inference_mode():
            yield


def _generate(model: Any, tokenizer: Any, enc: Any, eos_ids: list[int], params: GenParams,
              max_new_tokens: int, model_kwargs: dict[str, Any], streamer: "_BatchStreamer",
              stop: "_StopCriteria") -> None:
    kwargs: dict[str, Any] = dict(
        model_kwargs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos_ids, streamer=streamer, stopping_criteria=StoppingCriteriaList([stop]))
    if params.temperature > 0:
        kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
    else:
        kwargs.update(do_sample=False)
    model.generate(**enc, **kwargs)


def _generations(streamer: "_BatchStreamer", prompt_tokens: list[int]) -> list[Generation]:
    return [Generation(streamer.text(i), int(prompt_tokens[i]), len(streamer.tokens[i]),
                       float(streamer.finish[i] or 0.0), float(streamer.first[i] or 0.0))
            for i in range(len(prompt_tokens))]


def generate_batch(model: Any, tokenizer: Any, enc: Any, eos_ids: list[int], params: GenParams,
                   model_kwargs: dict[str, Any], on_update: Callable[[list[str]], None] | None,
                   cancel: threading.Event) -> list[Generation]:
    """Run one generate call over the encoded (padded) batch; the caller holds the model's lock.
    `model_kwargs` go to generate as they are (peft's adapter_names)."""
    streamer = _BatchStreamer(tokenizer, enc["input_ids"].shape[0], eos_ids, on_update)
    with _decoding(params):
        _generate(model, tokenizer, enc, eos_ids, params, params.max_new_tokens, model_kwargs,
                  streamer, _StopCriteria(cancel))
    return _generations(streamer, enc["attention_mask"].sum(dim=1).tolist())


def generate_grouped(model: Any, tokenizer: Any, ids: list[list[int]], eos_ids: list[int],
                     params: GenParams, row_kwargs: dict[str, list],
                     on_update: Callable[[list[str]], None] | None,
                     cancel: threading.Event, device: torch.device) -> list[Generation]:
    """Like generate_batch on these prompt ids, without padding waste (core.batch_prefill): each
    group of similar-length prompts is prefilled apart, shortest first, and its rows' first tokens
    stream at once; then all rows decode together. `row_kwargs` hold one value per row (peft's
    adapter_names) and are sliced per group. The model must be `joinable`."""
    streamer = _BatchStreamer(tokenizer, len(ids), eos_ids, on_update)
    source = distinct_rows(ids, row_kwargs)
    distinct = [i for i, s in enumerate(source) if s == i]
    first: dict[int, int] = {}
    parts = []
    with _decoding(params):
        for group in length_groups([len(ids[i]) for i in distinct]):
            if cancel.is_set():
                break
            rows = [distinct[g] for g in group]
            part = prefill_group(model, ids, rows, tokenizer.pad_token_id, device,
                                 {k: [v[r] for r in rows] for k, v in row_kwargs.items()})
            parts.append(part)
            first.update(zip(rows, _next_tokens(part.logits, params).tolist()))
            streamer.add({i: first[s] for i, s in enumerate(source) if s in rows})
        done = [streamer.finish[i] is not None for i in range(len(ids))]
        if len(first) == len(distinct) and params.max_new_tokens > 1 and not all(done):
            enc = join(parts, source, ids, [first[s] for s in source], tokenizer.pad_token_id,
                       device, params.max_new_tokens - 1)
            if params.temperature == 0 and plain_greedy(model):
                decode(model, enc, params.max_new_tokens - 1, row_kwargs, streamer.add,
                       lambda row: streamer.finish[row] is not None, cancel)
                streamer.end()
            else:
                _generate(model, tokenizer, enc, eos_ids, params, params.max_new_tokens - 1,
                          row_kwargs, streamer, _StopCriteria(cancel, torch.tensor(done, device=device)))
        else:
            streamer.end()
    return _generations(streamer, [len(row) for row in ids])


def _next_tokens(logits: torch.Tensor, params: GenParams) -> torch.Tensor:
    """The token generate would pick from these next-token logits (greedy, or sampled with the
    same temperature and top-p warpers)."""
    if params.temperature == 0:
        return logits.argmax(-1)
    warped = TemperatureLogitsWarper(params.temperature)(None, logits)
    if params.top_p < 1:
        warped = TopPLogitsWarper(params.top_p)(None, warped)
    return torch.multinomial(warped.softmax(-1), 1).squeeze(1)


class _BatchStreamer(BaseStreamer):
    """Collects each row's new tokens from generate, with per-row first-token and finish times.

    generate calls put() once with the prompt ids, then once per step with a (batch,) tensor.
    """

    def __init__(self, tokenizer: Any, rows: int, eos_ids: list[int],
                 on_update: Callable[[list[str]], None] | None) -> None:
        self._tokenizer, self._eos, self._on_update = tokenizer, set(eos_ids), on_update
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.first: list[float | None] = [None] * rows
        self.finish: list[float | None] = [None] * rows
        self._texts = [""] * rows
        self._prompt_seen = False
        self.start = time.perf_counter()

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.add(dict(enumerate(value.reshape(-1).tolist())))

    def add(self, tokens: dict[int, int]) -> None:
        """The next token of each of these rows."""
        now = time.perf_counter() - self.start
        for row, token in tokens.items():
            if self.finish[row] is not None:
                continue  # finished rows receive padding
            if self.first[row] is None:
                self.first[row] = now
            self.tokens[row].append(token)
            if token in self._eos:
                self.finish[row] = now
        if self._on_update is not None:
            self._on_update(self._partial_texts())

    def end(self) -> None:
        now = time.perf_counter() - self.start
        self.finish = [now if t is None else t for t in self.finish]

    def text(self, row: int) -> str:
        return self._tokenizer.decode(self.tokens[row], skip_special_tokens=True)

    def _partial_texts(self) -> list[str]:
        for row in range(len(self.tokens)):
            text = self.text(row)
            if not text.endswith("\ufffd"):  # hold back half a multi-byte character
                self._texts[row] = text
        return list(self._texts)


class _StopCriteria(StoppingCriteria):
    """Stops every row on cancel, and the rows in `done` (finished before generate) at once."""

    def __init__(self, cancel: threading.Event, done: torch.Tensor | None = None) -> None:
        self.cancel, self.done = cancel, done

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        stop = torch.full((input_ids.shape[0],), self.cancel.is_set(), dtype=torch.bool,
                          device=input_ids.device)
        return stop if self.done is None else stop | self.done


class GenerationStream(Iterator[list[str]]):
    """Iterates over the growing texts of all rows (only the newest snapshot when the consumer is
    slower than the model); the last item equals the final texts. After the iteration ends,
    `generations` holds the final Generations. Closing it (or leaving a `with` block) cancels."""

    _DONE = object()

    def __init__(self, run: Callable[[Callable[[list[str]], None], threading.Event], list[Generation]]):
        self._queue: queue.Queue = queue.Queue()
        self._cancel = threading.Event()
        self._result: dict[str, Any] = {}
        self._done = False
        self.generations: list[Generation] | None = None
        # The worker holds no reference to self, so dropping the stream lets __del__ cancel it.
        self._thread = threading.Thread(target=self._work, daemon=True,
                                        args=(run, self._queue, self._cancel, self._result))
        self._thread.start()

    @classmethod
    def _work(cls, run: Callable, out: queue.Queue, cancel: threading.Event, result: dict) -> None:
        try:
            generations = run(out.put, cancel)
            out.put([g.text for g in generations])
            result["generations"] = generations
        except BaseException as err:  # re-raised in the consumer's thread
            result["error"] = err
        finally:
            out.put(cls._DONE)

    def __next__(self) -> list[str]:
        if not self._done:
            latest = self._queue.get()
            while latest is not self._DONE:
                try:
                    newer = self._queue.get_nowait()
                except queue.Empty:
                    return latest
                if newer is self._DONE:
                    self._done = True
                    return latest
                latest = newer
            self._done = True
        self._thread.join()
        error = self._result.pop("error", None)
        if error is not None:
            raise error
        self.generations = self._result.get("generations")
        raise StopIteration

    def close(self) -> None:
        self._cancel.set()

    def __enter__(self) -> "GenerationStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        self._cancel.set()
