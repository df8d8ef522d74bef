"""The evaluation spec: what a batch G-Eval run answers and judges, checked before it starts."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from core import config
from core.geval import DEFAULT_SAMPLES, METHODS, STEPS_MAX_NEW_TOKENS, Metric, MetricError, metric_from
from core.models import GenParams
from core.schema import InputError, is_int, unknown_fields
from core.systems import BASE, System

KIND = "evaluate"
REPEATS_NOTE = ("logprobs judgments are deterministic (one forward pass at the score slot, greedy "
                "reasoning), so each (item, system, metric) is judged once, as repeat 0; repeats "
                "apply to sampling")


class EvalSpecError(InputError):
    """An evaluation request that cannot run; the message says what to change."""


# ---------------------------------------------------------------- the spec


@dataclass
class JudgeSpec:
    kind: str = "local"  # local (ModelHub) | openai (any OpenAI-compatible endpoint)
    model: str = config.DEFAULT_CHAT_MODEL
    base_url: str | None = None
    adapter: str = BASE


@dataclass
class EvalSpec:
    dataset_id: str
    systems: list[System]
    judge: JudgeSpec = field(default_factory=JudgeSpec)
    metrics: list[str | dict[str, Any]] = field(default_factory=lambda: ["accuracy", "completeness"])
    n_items: int | None = None  # None: every eval example; else a seeded sample of that many
    seed: int = 0
    pipeline: str | None = None  # the saved RAG pipeline the RAG systems use
    repeats: int = 10
    method: str = "logprobs"
    samples: int = DEFAULT_SAMPLES
    reasoning: bool = False
    decoding: dict[str, Any] = field(default_factory=dict)  # GenParams fields for the answers
    name: str = ""
    batch_size: int = 8  # items per answer batch and per judgment batch
    retry_delays: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])
    steps_max_new_tokens: int = STEPS_MAX_NEW_TOKENS

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EvalSpec":
        if not isinstance(data, dict):
            raise EvalSpecError("An evaluation spec is a JSON object.")
        _check_keys(cls, data, "evaluation spec")
        systems = [_system(s) for s in data.get("systems") or []]  # none: validate() says so
        judge = data.get("judge") or {}
        if not isinstance(judge, (dict, JudgeSpec)):
            raise EvalSpecError("judge must be an object with kind, model and base_url.")
        if isinstance(judge, dict):
            _check_keys(JudgeSpec, judge, "judge")
            judge = JudgeSpec(**judge)
        return cls(**{**data, "dataset_id": data.get("dataset_id") or "", "systems": systems,
                      "judge": judge})

    @property
    def effective_repeats(self) -> int:
        return 1 if self.method == "logprobs" else self.repeats

    def metric_list(self) -> list[Metric]:
        return [metric_from(m) for m in self.metrics]

    def gen_params(self) -> GenParams:
        return GenParams(**self.decoding)

    def validate(self) -> "EvalSpec":
        if not (self.dataset_id or "").strip():
            raise EvalSpecError("Choose a dataset to evaluate on.")
        self._validate_systems()
        self._validate_metrics()
        for name, value, low in (("repeats", self.repeats, 1), ("samples", self.samples, 1),
                                 ("batch_size", self.batch_size, 1),
                                 ("steps_max_new_tokens", self.steps_max_new_tokens, 1)):
            if not is_int(value) or value < low:
                raise EvalSpecError(f"{name} must be a whole number of at least {low} (got {value!r}).")
        if self.n_items is not None and (not is_int(self.n_items) or self.n_items < 1):
            raise EvalSpecError(f"n_items must be at least 1, or empty for every eval item "
                                f"(got {self.n_items!r}).")
        if self.method not in METHODS:
            raise EvalSpecError(f"Unknown scoring method '{self.method}': use logprobs or sampling.")
        if self.judge.kind not in ("local", "openai") or not (self.judge.model or "").strip():
            raise EvalSpecError("The judge needs kind 'local' or 'openai' and a model name.")
        if not all(isinstance(d, (int, float)) and d >= 0 for d in self.retry_delays):
            raise EvalSpecError("retry_delays must be a list of seconds (0 or more).")
        _check_keys(GenParams, self.decoding, "decoding")
        try:
            self.gen_params()
        except (TypeError, ValueError) as exc:
            raise EvalSpecError(f"Decoding: {exc}") from exc
        return self

    def _validate_systems(self) -> None:
        if not self.systems:
            raise EvalSpecError("Choose at least one system to evaluate.")
        ids = [s.with_pipeline(self.pipeline).id for s in self.systems]
        twice = sorted({s.label for s, i in zip(self.systems, ids) if ids.count(i) > 1})
        if twice:
            raise EvalSpecError(f"Two systems are the same ({', '.join(twice)}): each system must "
                                "differ in model, adapter or RAG.")
        for system in self.systems:
            if system.kind not in ("local", "openai") or not (system.model or "").strip():
                raise EvalSpecError(f"System '{system.label}' needs kind 'local' or 'openai' and a model.")
            if system.rag and not (self.pipeline or "").strip():
                raise EvalSpecError(f"System '{system.label}' uses RAG but no pipeline is chosen: "
                                    "pick a saved pipeline (RAG tab) or turn RAG off.")

    def _validate_metrics(self) -> None:
        if not self.metrics:
            raise EvalSpecError("Choose at least one metric (accuracy, completeness, or your own).")
        try:
            metrics = self.metric_list()
        except MetricError as exc:
            raise EvalSpecError(str(exc)) from exc
        names = [m.name for m in metrics]
        if len(set(names)) != len(names):
            raise EvalSpecError(f"A metric is listed twice ({', '.join(names)}).")
        if self.method == "logprobs":
            wide = [m.name for m in metrics if not m.single_digit]
            if wide:
                raise EvalSpecError(f"Metric(s) {', '.join(wide)}: logprobs read one token, so "
                                    "scores must be single digits (0-9); use sampling for a wider scale.")


def _check_keys(cls: type, data: dict[str, Any], what: str) -> None:
    unknown = unknown_fields(cls, data)
    if unknown:
        raise EvalSpecError(f"Unknown field(s) in the {what}: {', '.join(unknown)}.")


def _system(value: System | dict[str, Any]) -> System:
    if isinstance(value, System):
        return value
    if not isinstance(value, dict):
        raise EvalSpecError(f"A system is an object with kind, model, adapter, rag, base_url; got {value!r}.")
    data = {k: v for k, v in value.items() if k != "label"}  # labels are derived, not input
    _check_keys(System, data, "system")
    return System(**data)


