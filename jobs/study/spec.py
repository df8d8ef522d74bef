"""The study spec: the paper's grid as one object, checked when it is built.

A study is datasets x base models x training-set sizes x fine-tune seeds, with ONE split setting,
one pipeline per dataset (or one for all), the same eval items for every system of a dataset and
one judge. Its parts reuse the other specs instead of copying their fields: `finetune` is the
fine-tune spec without the fields a cell fills in (model, dataset, size, seed, split, pipeline,
name), `evaluation` is the evaluation spec without the fields a run fills in (dataset, systems,
pipeline, name). The spec composes the full FinetuneSpec and EvalSpec of every cell, so a setting
that would fail in a cell fails here, with that spec's own sentence.

Everything the study builds is named by its content (core.names' rule, a short hash of the spec):
an index, an adapter or an evaluation with the same spec is found again instead of redone.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, create_model, model_validator

from core import config
from core.dataset_presets import PRESETS
from core.schema import InputError, SplitSetting
from core.specs import Number, Spec, Text, WholeNumber, name_of, user_message
from jobs.evaluate.spec import EvalSpec
from jobs.finetune_data import FinetuneSpec
from pipelines.spec import PipelineSpec

KIND = "study"
SPECS_DIR = config.REPO_DIR / "studies"
SystemChoice = Literal["base", "base+rag", "finetuned", "finetuned+rag"]
SYSTEM_CHOICES: tuple[str, ...] = ("base", "base+rag", "finetuned", "finetuned+rag")
StudyName = name_of("Study name")
# What a cell (or a run) fills in; everything else is shared by the whole grid.
FINETUNE_CELL_FIELDS = ("base_model", "dataset", "source", "n_train", "seed", "split_seed",
                        "eval_fraction", "pipeline", "name")
EVAL_RUN_FIELDS = ("dataset_id", "systems", "pipeline", "name")


class StudySpecError(InputError):
    """A study spec that cannot run; the message says what to change."""


def _partial(full: type[Spec], leave_out: tuple[str, ...], name: str, noun: str) -> type[Spec]:
    """`full`'s fields (types, bounds, help, defaults) but `leave_out`, as a Spec of its own."""
    base = type(name + "Base", (Spec,), {"noun": noun, "error": StudySpecError,
                                         "__module__": __name__})
    fields: dict[str, Any] = {n: (info.annotation, info) for n, info in full.model_fields.items()
                              if n not in leave_out}
    return create_model(name, __base__=base, __module__=__name__, **fields)


FinetuneSettings = _partial(FinetuneSpec, FINETUNE_CELL_FIELDS, "FinetuneSettings",
                            "fine-tune settings")
EvalSettings = _partial(EvalSpec, EVAL_RUN_FIELDS, "EvalSettings", "evaluation settings")


def preset_of(dataset_id: str) -> tuple[str, Literal["sample", "hub"]]:
    """("nq", "sample") for "sample:nq", (preset, "hub") for "hub:<the preset's hub id>"."""
    kind, _, rest = dataset_id.partition(":")
    for name, preset in PRESETS.items():
        if (kind, rest) in (("sample", name), ("hub", preset.hub_id)):
            return name, kind  # type: ignore[return-value]
    known = [f"sample:{n}" for n in PRESETS] + [f"hub:{p.hub_id}" for p in PRESETS.values()]
    raise StudySpecError(f"Unknown dataset '{dataset_id}': a study fine-tunes and evaluates on the "
                         f"presets, one of {', '.join(known)}.")


def content_key(data: Any, length: int = 8) -> str:
    """A short hash of canonical JSON: equal specs, equal keys, on every machine."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:length]


def slug(text: str, length: int) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-_")[:length] or "x"


def _compose(spec: type[Spec], values: dict[str, Any], where: str) -> Any:
    """spec(**values), its failure as ONE StudySpecError sentence saying where it comes from."""
    try:
        return spec(**values)
    except ValidationError as err:  # composed while the study spec itself is being checked
        raise StudySpecError(f"{where}: {user_message(err, spec)}") from err
    except InputError as err:
        raise StudySpecError(f"{where}: {err}") from err


class StudySpec(Spec):
    noun = "study spec"
    error = StudySpecError

    name: StudyName = Field("study", description="the study's name (shown in its runs and report)")
    base_models: list[Text] = Field([config.DEFAULT_CHAT_MODEL], min_length=1,
                                    description="base models: alias, local folder or hub id")
    datasets: list[Text] = Field(["sample:nq"], min_length=1, description="dataset ids: "
                                 "sample:<preset> (shipped) or hub:<the preset's hub id>")
    sizes: list[Annotated[WholeNumber, Field(ge=1)]] = Field(
        [200, 500, 1000], min_length=1, description="training-set sizes (pairs from the train split)")
    finetune_seeds: list[Annotated[WholeNumber, Field(ge=0)]] = Field(
        [0], min_length=1, description="fine-tune seeds; one adapter per size and seed")
    split_seed: WholeNumber = Field(0, ge=0, description="seed of every dataset's train/eval split")
    eval_fraction: Number = Field(0.3, gt=0, lt=1, description="share of each dataset held out "
                                  "for evaluation (never trained on)")
    finetune: FinetuneSettings = Field(default_factory=FinetuneSettings,  # type: ignore[valid-type]
                                       description="fine-tune settings shared by the grid")
    pipeline: PipelineSpec = Field(default_factory=lambda: PipelineSpec(name="study"),
                                   description="the RAG pipeline of every dataset (its name "
                                   "prefixes each dataset's index)")
    pipelines: dict[str, PipelineSpec] = Field(default_factory=dict, description="per dataset id, "
                                               "a pipeline replacing the shared one")
    systems: list[SystemChoice] = Field(list(SYSTEM_CHOICES), description="systems per cell: the "
                                        "base model and each adapter, with and without RAG")
    evaluation: EvalSettings = Field(default_factory=EvalSettings,  # type: ignore[valid-type]
                                     description="eval items, judge, metrics, scoring, repeats, "
                                     "decoding")

    @model_validator(mode="after")
    def _consistent(self) -> "StudySpec":
        if not self.systems:
            raise StudySpecError("Choose at least one system per cell: base, base+rag, finetuned "
                                 "or finetuned+rag.")
        for field in ("base_models", "datasets", "sizes", "finetune_seeds", "systems"):
            values = getattr(self, field)
            twice = sorted({str(v) for v in values if values.count(v) > 1})
            if twice:
                raise StudySpecError(f"{field} lists {', '.join(twice)} more than once.")
        for dataset_id in self.datasets:
            preset_of(dataset_id)
        stray = sorted(set(self.pipelines) - set(self.datasets))
        if stray:
            raise StudySpecError(f"pipelines names dataset(s) the study does not use: "
                                 f"{', '.join(stray)}.")
        # Compose one cell of each kind: a shared setting a cell cannot run with fails now.
        model, dataset_id = self.base_models[0], self.datasets[0]
        adapter = self.finetune_spec(model, dataset_id, self.sizes[0], self.finetune_seeds[0])
        self.eval_spec(model, dataset_id, [adapter.output_name])
        return self

    @property
    def split(self) -> SplitSetting:
        return SplitSetting(self.split_seed, self.eval_fraction)

    @property
    def finetunes(self) -> bool:
        return any(s.startswith("finetuned") for s in self.systems)

    def pipeline_for(self, dataset_id: str) -> PipelineSpec:
        """The dataset's pipeline, named by its content and the dataset (its index's name)."""
        spec = self.pipelines.get(dataset_id, self.pipeline)
        key = content_key([{**spec.to_dict(), "name": ""}, dataset_id])
        return spec.replace(name=f"{slug(spec.name, 30)}-{slug(dataset_id, 20)}-{key}")

    def finetune_spec(self, model: str, dataset_id: str, size: int, seed: int) -> FinetuneSpec:
        """The cell's full fine-tune spec, named by its content."""
        preset, source = preset_of(dataset_id)
        values = {**self.finetune.to_dict(), "base_model": model, "dataset": preset,
                  "source": source, "n_train": size, "seed": seed, "split_seed": self.split_seed,
                  "eval_fraction": self.eval_fraction, "pipeline": self.pipeline_for(dataset_id).name}
        where = f"fine-tune of {model} on {dataset_id} ({size} pairs, seed {seed})"
        spec = _compose(FinetuneSpec, values, where)
        key = content_key({**spec.to_dict(), "name": ""})
        return spec.replace(name=f"{slug(spec.output_name, 55)}-{key}")

    def eval_spec(self, model: str, dataset_id: str, adapters: list[str]) -> EvalSpec:
        """The one evaluation of `model` on `dataset_id`: every system on the same items."""
        pipeline = self.pipeline_for(dataset_id).name
        systems = []
        for choice in self.systems:
            rag = choice.endswith("+rag")
            for adapter in (adapters if choice.startswith("finetuned") else [None]):
                systems.append({"kind": "local", "model": model, "adapter": adapter, "rag": rag,
                                "pipeline": pipeline if rag else None})
        values = {**self.evaluation.to_dict(), "dataset_id": dataset_id, "systems": systems,
                  "pipeline": pipeline, "name": f"{self.name} · {dataset_id} · {model}"}
        return _compose(EvalSpec, values, f"evaluation of {model} on {dataset_id}")


def shipped_specs() -> dict[str, Path]:
    """The specs shipped in studies/ by name (the file's stem): cpu-mini, paper, ..."""
    return {path.stem: path for path in sorted(SPECS_DIR.glob("*.json"))}


def shipped_spec_text(name: str) -> str:
    """A shipped spec's JSON text; "" for a name that is not one (never a path)."""
    path = shipped_specs().get(name)
    return path.read_text(encoding="utf-8") if path else ""


def parse_spec(text: str, where: str, yaml_text: bool = False) -> dict[str, Any]:
    """The spec object in JSON (or YAML) text: a StudySpecError naming `where` (a file, "the
    spec") when the text is not one object. Build the StudySpec with StudySpec.from_dict."""
    if yaml_text:
        import yaml  # PyYAML comes with huggingface_hub

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise StudySpecError(f"{where} is not valid YAML: {' '.join(str(exc).split())}") from exc
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise StudySpecError(f"{where} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise StudySpecError(f"{where} must hold one object (the study spec).")
    return data


def eval_key(spec: EvalSpec) -> str:
    """An evaluation's content key: its spec without the display name."""
    return content_key({**spec.to_dict(), "name": ""}, 12)
