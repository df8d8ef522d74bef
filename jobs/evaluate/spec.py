"""The evaluation spec: what a batch G-Eval run answers and judges, checked when it is built."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from core import config
from core.geval import DEFAULT_SAMPLES, STEPS_MAX_NEW_TOKENS, Method, Metric, metric_from
from core.generation import GenParams
from core.schema import InputError, unknown_fields
from core.specs import Number, PipelineRef, Spec, Text, WholeNumber
from core.systems import BASE, System

KIND = "evaluate"
REPEATS_NOTE = ("logprobs judgments are deterministic (one forward pass at the score slot, greedy "
                "reasoning), so each (item, system, metric) is judged once, as repeat 0; repeats "
                "apply to sampling")
DERIVED_SYSTEM_KEYS = ("label", "id")  # stored runs carry them; they are derived, never input


class EvalSpecError(InputError):
    """An evaluation request that cannot run; the message says what to change."""


def _system_input(value: Any) -> Any:
    """A stored or typed system dict, as System's fields: derived keys dropped, and a null adapter
    or rag read as the default (the base model, no RAG), as System itself does."""
    if not isinstance(value, dict):
        return value
    return {k: v for k, v in value.items()
            if k not in DERIVED_SYSTEM_KEYS and not (k in ("adapter", "rag") and v is None)}


def _none_is_default(default: Any) -> BeforeValidator:
    return BeforeValidator(lambda value: default() if value is None else value)


class JudgeSpec(Spec):
    noun = "judge"
    error = EvalSpecError

    kind: Literal["local", "openai"] = Field(
        "local", description="local (ModelHub) or openai (any OpenAI-compatible endpoint)")
    model: Text = Field(config.DEFAULT_CHAT_MODEL, description="the judge model")
    base_url: str | None = Field(None, description="OpenAI-compatible base URL ending in /v1 "
                                 "(empty: the app's endpoint and key)")
    adapter: str | None = Field(BASE, description="LoRA adapter of a local judge")


class EvalSpec(Spec):
    noun = "evaluation spec"
    error = EvalSpecError

    dataset_id: Annotated[str, _none_is_default(str)] = Field(
        "", description="dataset id, e.g. sample:bioasq")
    systems: list[Annotated[System, BeforeValidator(_system_input)]] = Field(
        default_factory=list, description="the systems that answer")
    judge: Annotated[JudgeSpec, _none_is_default(JudgeSpec)] = Field(
        default_factory=JudgeSpec, description="the G-Eval judge")
    metrics: list[str | dict[str, Any]] = Field(
        default_factory=lambda: ["accuracy", "completeness"],
        description="built-in metric names or {name, criteria, steps?, score_min?, score_max?, "
        "uses_context?}")
    n_items: WholeNumber | None = Field(None, ge=1, description="how many eval items to sample "
                                        "(seeded; none: every eval item)")
    seed: WholeNumber = Field(0, description="seed of the item sample")
    pipeline: PipelineRef = Field(
        None, description="saved RAG pipeline the RAG systems retrieve with")
    repeats: WholeNumber = Field(10, ge=1, description="judgments per answer and metric (sampling)")
    method: Method = Field("logprobs", description="how the score is read: logprobs (the "
                           "probability-weighted score at the slot) or sampling")
    samples: WholeNumber = Field(DEFAULT_SAMPLES, ge=1, description="samples per judgment with sampling")
    reasoning: bool = Field(False, description="the judge reasons first, then the score slot is read")
    decoding: dict[str, Any] = Field(default_factory=dict,
                                     description="GenParams fields for the answers")
    name: str = Field("", description="a name for the run (shown in lists; runs are keyed by id)")
    batch_size: WholeNumber = Field(8, ge=1, description="items per answer batch and judgment batch")
    retry_delays: list[Annotated[Number, Field(ge=0)]] = Field(
        default_factory=lambda: [1.0, 2.0, 4.0],
        description="seconds between retries of a failing endpoint")
    steps_max_new_tokens: WholeNumber = Field(STEPS_MAX_NEW_TOKENS, ge=1,
                                              description="length limit of generated evaluation steps")

    @field_validator("dataset_id")
    @classmethod
    def _dataset_chosen(cls, dataset_id: str) -> str:
        if not dataset_id.strip():
            raise EvalSpecError("Choose a dataset to evaluate on.")
        return dataset_id

    @field_validator("decoding")
    @classmethod
    def _decoding(cls, decoding: dict[str, Any]) -> dict[str, Any]:
        unknown = unknown_fields(GenParams, decoding)
        if unknown:
            raise EvalSpecError(f"Unknown field(s) in the decoding: {', '.join(unknown)}.")
        try:
            GenParams(**decoding)
        except (TypeError, ValueError) as exc:
            raise EvalSpecError(f"Decoding: {exc}") from exc
        return decoding

    @model_validator(mode="after")
    def _runnable(self) -> "EvalSpec":
        self._check_systems()
        self._check_metrics()
        return self

    @property
    def effective_repeats(self) -> int:
        return 1 if self.method == "logprobs" else self.repeats

    def metric_list(self) -> list[Metric]:
        return [metric_from(m) for m in self.metrics]

    def gen_params(self) -> GenParams:
        return GenParams(**self.decoding)

    def _check_systems(self) -> None:
        if not self.systems:
            raise EvalSpecError("Choose at least one system to evaluate.")
        ids = [s.with_pipeline(self.pipeline).id for s in self.systems]
        twice = sorted({s.label for s, i in zip(self.systems, ids) if ids.count(i) > 1})
        if twice:
            raise EvalSpecError(f"Two systems are the same ({', '.join(twice)}): each system must "
                                "differ in model, adapter or RAG.")
        for system in self.systems:
            if not system.model:
                raise EvalSpecError(f"System '{system.label}' needs a model.")
            if system.rag and not (self.pipeline or "").strip():
                raise EvalSpecError(f"System '{system.label}' uses RAG but no pipeline is chosen: "
                                    "pick a saved pipeline (RAG tab) or turn RAG off.")

    def _check_metrics(self) -> None:
        if not self.metrics:
            raise EvalSpecError("Choose at least one metric (accuracy, completeness, or your own).")
        metrics = self.metric_list()  # a MetricError's sentence reaches the user as is
        names = [m.name for m in metrics]
        if len(set(names)) != len(names):
            raise EvalSpecError(f"A metric is listed twice ({', '.join(names)}).")
        if self.method == "logprobs":
            wide = [m.name for m in metrics if not m.single_digit]
            if wide:
                raise EvalSpecError(f"Metric(s) {', '.join(wide)}: logprobs read one token, so "
                                    "scores must be single digits (0-9); use sampling for a wider scale.")
