"""The G-Eval judges (core.geval says what they are asked): a model in this process's ModelHub,
or any OpenAI-compatible endpoint. No Gradio, no SQL.

Prompts handed to a judge together may name `shared`: text every prompt's first message starts
with (G-Eval's instructions, criteria and evaluation steps). The local judge prefills it once and
reuses its cached states for every prompt (core.prefix_cache); a remote judge ignores it.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Protocol

from core.generation import GenParams, Prompt, as_messages
from core.gpu_tasks import generate_task, score_task
from core.schema import InputError
from core.scoring import TokenScores
from core.secrets import OPENAI_URL, Secret
from core.systems import BASE


class Judge(Protocol):
    """A model that writes steps/reasoning, samples short replies, and reads the score slot."""

    id: str

    def complete(self, prompts: list[Prompt], max_new_tokens: int, temperature: float = 0.0,
                 seed: int = 0, shared: str = "") -> list[str]:
        """One reply per prompt (greedy at temperature 0)."""

    def sample(self, prompts: list[Prompt], n: int, seed: int, max_new_tokens: int,
               shared: str = "") -> list[list[str]]:
        """n replies per prompt at temperature 1, seeded."""

    def score_slots(self, prompts: list[Prompt], candidates: list[str], slot: str,
                    shared: str = "") -> Iterator[tuple[int, TokenScores | None]]:
        """(prompt index, scores) for every prompt, in any order, each as soon as it is read:
        P(next token starts each candidate) at the score slot, or None if the judge has no
        logprobs. Every prompt already ends with `slot`; a judge may also open its reply with it."""


class LocalJudge:
    """A model (and optional adapter) in this process's ModelHub, through its GPU tasks (core.gpu:
    a forked worker on ZeroGPU, a plain call elsewhere); `hub`, a ModelHub of its own (tests,
    benches), is called directly instead.

    `score_rows` prompts share one scoring forward pass on top of the cached shared prefix;
    `prefix_cache=False` prefills every prompt whole, one at a time (the bench's baseline)."""

    def __init__(self, model_ref: str, adapter: str = BASE, hub: Any = None,
                 max_rows: int = 40, score_rows: int = 8, prefix_cache: bool = True) -> None:
        self.model_ref, self.adapter = model_ref, adapter or BASE
        self._generate = hub.generate if hub is not None else generate_task
        self._score = hub.score_tokens_batch if hub is not None else score_task
        self._max_rows = max_rows  # rows per generate call: bounds padding memory on CPU
        self._score_rows = score_rows
        self._prefix_cache = prefix_cache
        self.id = f"local:{model_ref}" + ("" if self.adapter == BASE else f"+{self.adapter}")

    def complete(self, prompts: list[Prompt], max_new_tokens: int, temperature: float = 0.0,
                 seed: int = 0, shared: str = "") -> list[str]:
        params = GenParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        shared = shared if self._prefix_cache else ""
        texts: list[str] = []
        for start in range(0, len(prompts), self._max_rows):
            chunk = prompts[start:start + self._max_rows]
            texts += [g.text for g in self._generate(self.model_ref, chunk, [self.adapter] * len(chunk),
                                                     params, shared=shared)]
        return texts

    def sample(self, prompts: list[Prompt], n: int, seed: int, max_new_tokens: int,
               shared: str = "") -> list[list[str]]:
        # Rows are independent draws, so n copies of a prompt in one batch are n samples.
        rows = [p for p in prompts for _ in range(n)]
        flat = self.complete(rows, max_new_tokens, temperature=1.0, seed=seed, shared=shared)
        return [flat[i * n:(i + 1) * n] for i in range(len(prompts))]

    def score_slots(self, prompts: list[Prompt], candidates: list[str], slot: str,
                    shared: str = "") -> Iterator[tuple[int, TokenScores]]:
        # The reply opens with the slot line, so the very next token is the score (mass 0.1 -> 0.4
        # on the 135M model compared with reading the first token of a free reply).
        shared = shared if self._prefix_cache else ""
        rows = self._score_rows if shared else 1
        # Prompts of similar length share a pass, so little of it is padding (characters stand
        # in for tokens).
        order = sorted(range(len(prompts)),
                       key=lambda i: sum(len(m["content"]) for m in as_messages(prompts[i])))
        for start in range(0, len(order), rows):
            chunk = order[start:start + rows]
            yield from zip(chunk, self._score(self.model_ref, [prompts[i] for i in chunk], candidates,
                                              adapter=self.adapter, assistant_prefix=slot, shared=shared))


class OpenAIJudge:
    """Any OpenAI-compatible endpoint. The key is used by the client only, never recorded."""

    def __init__(self, base_url: str | None, api_key: Secret | None, model: str,
                 timeout: float = 60.0, parallel: int = 8) -> None:
        from core.openai_backend import OpenAIBackend

        # No client-side retries: the evaluation job retries with its own backoff and reports.
        self._backend = OpenAIBackend(base_url or None, api_key, model, timeout=timeout, max_retries=0)
        self._parallel = parallel
        self._has_logprobs: bool | None = None
        self.id = f"openai:{model}@{base_url or OPENAI_URL}"

    def complete(self, prompts: list[Prompt], max_new_tokens: int, temperature: float = 0.0,
                 seed: int = 0, shared: str = "") -> list[str]:
        params = GenParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        return [g.text for g in self._backend.generate(prompts, params)]

    def sample(self, prompts: list[Prompt], n: int, seed: int, max_new_tokens: int,
               shared: str = "") -> list[list[str]]:
        # One request per sample, each with its own seed: a server that honours seeds would
        # otherwise return n identical samples.
        def one(job: tuple[int, int]) -> str:
            row, i = job
            params = GenParams(max_new_tokens=max_new_tokens, temperature=1.0, seed=seed + i)
            return self._backend.generate([prompts[row]], params)[0].text

        jobs = [(row, i) for row in range(len(prompts)) for i in range(n)]
        with ThreadPoolExecutor(max(1, min(self._parallel, len(jobs)))) as pool:
            flat = list(pool.map(one, jobs))
        return [flat[i * n:(i + 1) * n] for i in range(len(prompts))]

    def score_slots(self, prompts: list[Prompt], candidates: list[str], slot: str,
                    shared: str = "") -> Iterator[tuple[int, TokenScores | None]]:
        for i, prompt in enumerate(prompts):
            if self._has_logprobs is False:  # learnt once; later judgments go straight to sampling
                yield i, None
                continue
            scores = self._backend.score_tokens(prompt, candidates)  # the prompt ends at the slot
            self._has_logprobs = scores is not None
            yield i, scores


def make_judge(kind: str, model: str, base_url: str | None = None, adapter: str = BASE,
               api_key: Secret | None = None) -> Judge:
    if kind == "local":
        return LocalJudge(model, adapter)
    if kind == "openai":
        return OpenAIJudge(base_url, api_key, model)
    raise InputError(f"Unknown judge kind '{kind}': use 'local' or 'openai'.")
