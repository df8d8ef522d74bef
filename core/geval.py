"""G-Eval (Liu et al., 2023) as "Fine-Tuning or Fine-Failing?" used it: a metric's evaluation steps
are written once by the judge (auto chain-of-thought), then a form-filling prompt that ends at the
score slot is scored by probability-weighted logprobs or by sampling. No Gradio, no SQL beyond the
steps cache (through Store).

Rules that keep the numbers honest:
- the score is only ever read at the score slot: from next-token probabilities there, or from a
  reply that STARTS with the score; a digit inside free text (reasoning) is never taken;
- a reply that cannot be parsed is a parse failure (None), counted, never turned into a number;
- a judge without logprobs falls back to sampling and the judgment says "sampling-fallback".
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Iterator, Literal

from core.generation import Prompt
from core.judges import Judge, make_judge  # noqa: F401 (jobs.evaluate takes make_judge from here)
from core.names import check_name
from core.schema import InputError
from core.scoring import TokenScores

if TYPE_CHECKING:
    from core.store import Store

Method = Literal["logprobs", "sampling"]
METHODS = ("logprobs", "sampling")
FALLBACK = "sampling-fallback"
DEFAULT_SAMPLES = 10  # as in the study: each judgment averaged over 10 samples
STEPS_MAX_NEW_TOKENS = 256
SAMPLE_MAX_NEW_TOKENS = 10  # room for an echoed "- Accuracy: 4" and nothing more
REASONING_MAX_NEW_TOKENS = 160
MAX_SCORE_VALUES = 10
# For the UI next to the judge choice: the embedded default is there to work offline, not to be trusted.
WEAK_JUDGE_NOTE = ("The built-in judge is a 135M model: it runs offline but is a weak judge (its "
                   "scores cluster and many sampled replies do not parse). Use a strong model "
                   "through an OpenAI-compatible endpoint for numbers you want to report.")


class MetricError(InputError):
    """A metric definition that cannot be used; the message says what to fix."""


# ---------------------------------------------------------------- metrics


@dataclass(frozen=True)
class Metric:
    """name, criteria text, optional evaluation steps (None: the judge writes them), score range.

    `uses_context` puts the system's retrieved passages into the form (e.g. for faithfulness).
    """

    name: str
    criteria: str
    steps: str | None = None
    score_min: int = 1
    score_max: int = 5
    uses_context: bool = False

    @property
    def label(self) -> str:
        """How the form names it, derived from the name: "accuracy" -> "Accuracy",
        "context_faithfulness" -> "Context faithfulness"."""
        words = self.name.replace("_", " ")
        return words[:1].upper() + words[1:]

    @property
    def scores(self) -> list[int]:
        return list(range(self.score_min, self.score_max + 1))

    @property
    def criteria_hash(self) -> str:
        """Cached steps belong to this exact definition; editing the criteria invalidates them."""
        key = json.dumps([self.criteria, self.score_min, self.score_max, self.uses_context])
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    @property
    def single_digit(self) -> bool:
        """Logprobs read ONE token, so every score must be one digit (1-10 would alias "1"/"10")."""
        return 0 <= self.score_min and self.score_max <= 9

    def validate(self) -> "Metric":
        check_name(self.name, "Metric name", MetricError)
        if not isinstance(self.criteria, str) or not self.criteria.strip():
            raise MetricError(f"Metric '{self.name}' has no criteria: say what the judge should "
                              "check (e.g. 'is every claim supported by the retrieved context?').")
        if self.steps is not None and not str(self.steps).strip():
            raise MetricError(f"Metric '{self.name}' has empty evaluation steps: write some, or "
                              "leave them out to let the judge write them.")
        if not all(isinstance(v, int) and not isinstance(v, bool)
                   for v in (self.score_min, self.score_max)):
            raise MetricError(f"Metric '{self.name}': the score range must be whole numbers.")
        if self.score_min < 0 or self.score_min >= self.score_max:
            raise MetricError(f"Metric '{self.name}': the lowest score ({self.score_min}) must be "
                              f"0 or more and below the highest ({self.score_max}).")
        if len(self.scores) > MAX_SCORE_VALUES:
            raise MetricError(f"Metric '{self.name}': at most {MAX_SCORE_VALUES} score values "
                              f"(got {self.score_min}-{self.score_max}).")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


ACCURACY = Metric("accuracy", "Does the answer state the same facts as the reference answer for "
                              "this question? Facts that contradict the reference lower the score.")
COMPLETENESS = Metric("completeness", "Does the answer cover all key points of the reference "
                                      "answer? Each missing key point lowers the score.")
BUILTIN: dict[str, Metric] = {m.name: m for m in (ACCURACY, COMPLETENESS)}


def metric_from(value: str | dict[str, Any] | Metric) -> Metric:
    """A built-in by name, a built-in with user steps ({"name": "accuracy", "steps": ...}), or a
    user metric dict (name, criteria, optional steps/score_min/score_max/uses_context)."""
    if isinstance(value, Metric):
        return value.validate()
    if isinstance(value, str):
        if value.strip().lower() not in BUILTIN:
            raise MetricError(f"Unknown metric '{value}' (built in: {', '.join(BUILTIN)}); define "
                              "your own with a name and criteria.")
        return BUILTIN[value.strip().lower()]
    if not isinstance(value, dict):
        raise MetricError(f"A metric is a built-in name or a dict with name and criteria, not {value!r}.")
    known = {"name", "criteria", "steps", "score_min", "score_max", "uses_context"}
    unknown = sorted(set(value) - known)
    if unknown:
        raise MetricError(f"Unknown metric field(s): {', '.join(unknown)}.")
    name = str(value.get("name") or "").strip()
    if name.lower() in BUILTIN:
        if set(value) - {"name", "steps"}:
            raise MetricError(f"'{name}' is a built-in metric: only its steps can be given; "
                              "choose another name for your own criteria.")
        steps = value.get("steps")
        return Metric(**{**BUILTIN[name.lower()].to_dict(), "steps": steps}).validate()
    return Metric(**{**value, "name": name}).validate()


# ---------------------------------------------------------------- prompts

_INTRO = ("You will be given a question, its reference answer, and an answer written by a system."
          "\n\nYour task is to rate the answer on one metric.\n\nPlease make sure you read and "
          "understand these instructions carefully.")


def _criteria_block(metric: Metric) -> str:
    return (f"Evaluation Criteria:\n\n{metric.label} ({metric.score_min}-{metric.score_max}) - "
            f"{metric.criteria.strip()}")


def steps_messages(metric: Metric) -> list[dict[str, str]]:
    """The auto chain-of-thought prompt: the judge continues after "Evaluation Steps:"."""
    return [{"role": "user", "content": f"{_INTRO}\n\n{_criteria_block(metric)}\n\nEvaluation Steps:"}]


@dataclass
class FormInput:
    """One answer to judge. `context` is the retrieved text, used by metrics with uses_context."""

    question: str
    reference: str
    answer: str
    context: str | None = None


def form_head(metric: Metric, steps: str) -> str:
    """What every form (and reasoning) prompt of this metric and these steps starts with, ending
    at "Example:": instructions, criteria and steps. A local judge prefills it once per metric
    (core.prefix_cache); ending at the colon keeps its tokens a prefix of every prompt's tokens."""
    return (f"{_INTRO}\n\n{_criteria_block(metric)}\n\nEvaluation Steps:\n\n{steps.strip()}"
            "\n\nExample:")


def _example_block(metric: Metric, item: FormInput) -> str:
    parts = [f"Question:\n\n{item.question.strip()}", f"Reference answer:\n\n{item.reference.strip()}"]
    if metric.uses_context:
        parts.append(f"Retrieved context:\n\n{(item.context or '').strip() or '(none was retrieved)'}")
    parts.append(f"Answer:\n\n{item.answer.strip() or '(empty answer)'}")
    return "\n\n".join(parts)


def score_slot(metric: Metric) -> str:
    return f"- {metric.label}:"


def _form_tail(metric: Metric) -> str:
    return f"Evaluation Form (scores ONLY):\n{score_slot(metric)}"


def form_messages(metric: Metric, steps: str, item: FormInput) -> list[dict[str, str]]:
    """The form-filling prompt; it ends at the score slot ("- Accuracy:")."""
    return [{"role": "user", "content": f"{form_head(metric, steps)}\n\n{_example_block(metric, item)}"
                                        f"\n\n{_form_tail(metric)}"}]


def reasoning_messages(metric: Metric, steps: str, item: FormInput) -> list[dict[str, str]]:
    """First call with reasoning on: the judge follows the steps in free text, no score asked."""
    return [{"role": "user", "content": f"{form_head(metric, steps)}\n\n{_example_block(metric, item)}"
                                        "\n\nFollow the evaluation steps and explain your "
                                        "reasoning briefly. Do not give the score yet."}]


def after_reasoning(first: list[dict[str, str]], reasoning: str, metric: Metric) -> list[dict[str, str]]:
    """Second call: the reasoning becomes the judge's turn, and a new turn ends at the score slot."""
    return first + [{"role": "assistant", "content": reasoning.strip() or "(no reasoning)"},
                    {"role": "user", "content": _form_tail(metric)}]


def prompt_hash(messages: Prompt) -> str:
    text = messages if isinstance(messages, str) else json.dumps(messages, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------- parsing

_FENCE = re.compile(r"^\s*```[A-Za-z]*[ \t]*\n?")
_BOLD = re.compile(r"^[*_`\s]+")


def parse_score(reply: str | None, metric: Metric) -> float | None:
    """The score a reply STARTS with, else None.

    Accepted before the number: whitespace, a code fence, markdown emphasis, an echoed
    "- Accuracy:" or "Score:". Anything may follow the number ("4 - mostly right", "4/5"). A digit
    that only appears later ("I think ... 3") is refused, and so is a score outside the range.
    """
    if not reply:
        return None
    text = _BOLD.sub("", _FENCE.sub("", reply, count=1), count=1)
    label = re.escape(metric.label)
    match = re.match(rf"(?:-?\s*(?:score|{label})\s*[:=]\s*)?[*_`\s]*(\d+(?:\.\d+)?)(?![\d.]*\d)",
                     text, flags=re.IGNORECASE)
    if match is None:
        return None
    value = float(match.group(1))
    return value if metric.score_min <= value <= metric.score_max else None


# ---------------------------------------------------------------- evaluation steps


def generate_steps(judge: Judge, metric: Metric, max_new_tokens: int = STEPS_MAX_NEW_TOKENS) -> str:
    steps = judge.complete([steps_messages(metric)], max_new_tokens)[0].strip()
    # A judge that writes nothing still needs steps; the criteria are the honest minimum.
    return steps or f"1. Check the answer against the criteria: {metric.criteria.strip()}"


def get_steps(store: "Store", metric: Metric, judge: Judge,
              max_new_tokens: int = STEPS_MAX_NEW_TOKENS) -> str:
    """The metric's own steps, else the cached ones for (metric, judge, criteria), else the judge
    writes them once and they are cached."""
    if metric.steps:
        return metric.steps
    cached = store.get_geval_steps(metric.name, judge.id, metric.criteria_hash)
    if cached is not None:
        return cached
    steps = generate_steps(judge, metric, max_new_tokens)
    store.save_geval_steps(metric.name, judge.id, metric.criteria_hash, steps, "generated")
    return steps


def set_steps(store: "Store", metric: Metric, judge_id: str, steps: str) -> None:
    """Edited steps replace the cached ones for this (metric, judge, criteria)."""
    if not (steps or "").strip():
        raise MetricError("The evaluation steps are empty: write at least one step.")
    store.save_geval_steps(metric.name, judge_id, metric.criteria_hash, steps.strip(), "user")


# ---------------------------------------------------------------- judging


@dataclass
class Judgment:
    """One stored judgment (a row of the judgments table, minus its key)."""

    metric: str
    method: str  # logprobs | sampling | sampling-fallback
    judge: str
    prompt_hash: str  # of the form-filling prompt (before any reasoning)
    raw: Any  # replies verbatim (sampling) or the slot probabilities (logprobs)
    parsed_scores: list[float | None] | None  # per sample; None where unparseable
    distribution: dict[str, float]  # score -> probability (logprobs) or frequency (sampling)
    score: float | None  # weighted or mean; None if nothing could be read
    parse_failures: int = 0
    reasoning: str | None = None
    mass: float | None = None  # logprobs: probability the allowed scores got before normalizing

    def to_row(self) -> dict[str, Any]:
        return asdict(self)


def from_probabilities(scores: TokenScores, metric: Metric, judge_id: str, phash: str,
                       reasoning: str | None) -> Judgment:
    raw = {"probs": scores.probs, "mass": scores.mass}
    if scores.mass <= 0:  # none of the allowed scores was a candidate: a parse failure
        return Judgment(metric.name, "logprobs", judge_id, phash, raw, None, {}, None, 1,
                        reasoning, scores.mass)
    dist = scores.normalized()
    weighted = sum(p * float(s) for s, p in dist.items())
    return Judgment(metric.name, "logprobs", judge_id, phash, raw, None, dist, weighted, 0,
                    reasoning, scores.mass)


def from_samples(replies: list[str], metric: Metric, judge_id: str, phash: str, method: str,
                 reasoning: str | None) -> Judgment:
    parsed = [parse_score(r, metric) for r in replies]
    good = [p for p in parsed if p is not None]
    dist: dict[str, float] = {}
    for p in good:
        key = f"{p:g}"
        dist[key] = dist.get(key, 0.0) + 1.0 / len(good)
    score = sum(good) / len(good) if good else None
    return Judgment(metric.name, method, judge_id, phash, replies, parsed, dist, score,
                    len(parsed) - len(good), reasoning, None)


def judge_batch(judge: Judge, metric: Metric, steps: str, items: list[FormInput],
                method: Method = "logprobs", samples: int = DEFAULT_SAMPLES, reasoning: bool = False,
                seed: int = 0, sample_max_new_tokens: int = SAMPLE_MAX_NEW_TOKENS,
                reasoning_max_new_tokens: int = REASONING_MAX_NEW_TOKENS
                ) -> Iterator[tuple[int, Judgment]]:
    """Judge every item on one metric; yields (item index, Judgment) as each one completes.

    logprobs: the slot is read for each item (a local judge reads several items per forward
    pass); items whose judge returns no logprobs are sampled together at the end (method
    "sampling-fallback"). sampling: all items' n samples in one batched call. With reasoning, a
    first batched call writes the reasoning (greedy for logprobs, temperature 1 for sampling) and
    the slot is read in a second turn after it. Every call names the prompts' shared head
    (form_head), which a local judge prefills once and reuses.
    """
    if method not in METHODS:
        raise MetricError(f"Unknown scoring method '{method}': use {' or '.join(METHODS)}.")
    forms = [form_messages(metric, steps, item) for item in items]
    shared = form_head(metric, steps)
    hashes = [prompt_hash(f) for f in forms]
    thoughts: list[str | None] = [None] * len(items)
    prompts: list[Prompt] = list(forms)
    if reasoning:
        first = [reasoning_messages(metric, steps, item) for item in items]
        temperature = 0.0 if method == "logprobs" else 1.0
        thoughts = list(judge.complete(first, reasoning_max_new_tokens, temperature, seed, shared))
        prompts = [after_reasoning(f, t, metric) for f, t in zip(first, thoughts)]
    pending = list(range(len(items)))
    sample_method = method
    if method == "logprobs":
        candidates = [str(s) for s in metric.scores]
        pending = []
        for i, scores in judge.score_slots(prompts, candidates, score_slot(metric), shared):
            if scores is None:
                pending.append(i)
                continue
            yield i, from_probabilities(scores, metric, judge.id, hashes[i], thoughts[i])
        pending.sort()
        sample_method = FALLBACK
    if pending:
        replies = judge.sample([prompts[i] for i in pending], samples, seed, sample_max_new_tokens,
                               shared)
        for i, texts in zip(pending, replies):
            yield i, from_samples(texts, metric, judge.id, hashes[i], sample_method, thoughts[i])
