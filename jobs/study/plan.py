"""A study spec expanded into steps: indexes to build, adapters to train, evaluations to run.

Every step is named by its content (jobs.study.spec), so what already exists is found, not planned
again: an index whose folder holds its manifest, an adapter whose folder holds metrics.json
(written last by a fine-tune that finished), an evaluation run whose status is done. Planning also
refuses, before anything starts, what could only fail or mislead later: a dataset whose recorded
split differs from the study's, a size beyond the train split, an adapter trained on an eval item.
"""
from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass, field
from typing import Any

from core import config
from core.datasets import QADataset, load_preset
from core.model_files import check_allowed
from core.schema import DEFAULT_SPLIT, InputError
from core.records import JobRecord
from core.store import Store
from jobs.adapters import AdapterCatalog
from jobs.catalog import DatasetCatalog
from jobs.desk import JobDesk
from jobs.evaluate import KIND as EVAL_KIND, EvalSpec, Plan, check_no_leakage, select_examples
from jobs.evaluations import Evaluations
from jobs.finetune import adapter_dir
from jobs.finetune_data import FinetuneError, draw_sample
from jobs.indexes import KIND as INDEX_KIND, IndexCatalog
from jobs.adapters import KIND as FINETUNE_KIND
from jobs.study.spec import StudySpec, StudySpecError, eval_key, preset_of
from pipelines.spec import index_dir, list_specs

# Rates used until this machine has measured its own (embedded 135M model on 2 CPU cores).
DEFAULT_SECONDS = {"index": 0.02, "finetune": 0.5, "evaluate": 1.0}
UNIT = {"index": "passage", "finetune": "example x epoch", "evaluate": "answer or judgment"}
NOUNS = {"index": "index builds", "finetune": "fine-tunes", "evaluate": "evaluations"}


@dataclass
class StudyResources:
    """The services a study calls, wired in jobs/services.py."""

    store: Store
    jobs: JobDesk
    datasets: DatasetCatalog
    adapters: AdapterCatalog
    indexes: IndexCatalog
    evaluations: Evaluations


@dataclass
class Step:
    kind: str  # "index" | "finetune" | "evaluate" (the job kind it starts)
    key: str  # pipeline name, adapter name or evaluation key
    label: str
    spec: dict[str, Any]  # what the step's job is started with
    dataset_id: str
    units: int  # work in UNIT[kind]
    done: bool = False
    answers: int = 0  # evaluate: of its units, the answers (the rest are judgments)
    systems: list[dict[str, Any]] = field(default_factory=list)  # evaluate: each system's cell


@dataclass
class StudyPlan:
    spec: StudySpec
    steps: list[Step]
    items: dict[str, list[str]]  # dataset id -> the eval item ids every system answers
    counts: dict[str, int]  # fine-tunes, answers, judgments still to do
    seconds: float  # rough time for the steps still to do
    unmeasured: tuple[str, ...] = ()  # step kinds to do whose rate this machine has not measured

    def describe(self) -> str:
        """The plan as lines a person reads before starting it."""
        lines = [f"study '{self.spec.name}': {len(self.steps)} steps, "
                 f"{sum(s.done for s in self.steps)} already done"]
        lines += [f"  [{'done' if s.done else 'todo'}] {s.kind:<8} {s.label}" for s in self.steps]
        lines.append(f"to do: {self.counts['finetunes']} fine-tune(s), {self.counts['answers']} "
                     f"answers, {self.counts['judgments']} judgments; {self.estimate()}")
        return "\n".join(lines)

    def estimate(self) -> str:
        """The time to expect, only where this machine measured the rate of every kind of step
        still to do; else which rates are missing (a default rate would be a guess)."""
        if all(s.done for s in self.steps):
            return "nothing left to do"
        if not self.unmeasured:
            return f"about {self.seconds / 60:.0f} min at this machine's rates"
        missing = ", ".join(NOUNS[kind] for kind in self.unmeasured)
        return (f"no time estimate yet: this machine has not measured its rate for {missing} "
                "(it does with the first of each that finishes)")


def plan_study(spec: StudySpec, res: StudyResources) -> StudyPlan:
    """The steps of `spec` in order, each marked done when what it makes already exists; a
    StudySpecError (one sentence) for what would fail or void the comparison."""
    judge = spec.evaluation.judge
    for model in [*spec.base_models, *([judge.model] if judge.kind == "local" else [])]:
        check_allowed(model)  # public mode: refused now, not in a step's job minutes later
    res.adapters.sync()  # adapters finished while no app was watching count as done
    steps: list[Step] = []
    items: dict[str, list[str]] = {}
    for dataset_id in spec.datasets:
        dataset = _dataset(res, spec, dataset_id)
        pipeline = spec.pipeline_for(dataset_id)
        steps.append(Step(INDEX_KIND, pipeline.name, f"index {dataset_id} ({pipeline.retriever})",
                          {"pipeline": pipeline.to_dict(), "dataset_id": dataset_id}, dataset_id,
                          len(dataset.corpus), done=_index_built(pipeline.name)))
        for model in spec.base_models:
            cells = _finetune_steps(spec, dataset, model)
            steps += [step for step, _ in cells]
            evaluation = spec.eval_spec(model, dataset_id, [step.key for step, _ in cells])
            items[dataset_id] = _check_items(res, evaluation,
                                             {step.key: trained for step, trained in cells})
            steps.append(_eval_step(res, evaluation, model, cells, len(items[dataset_id])))
    seconds, unmeasured = _seconds(res, steps)
    return StudyPlan(spec, steps, items, _counts(steps), seconds, unmeasured)


def _dataset(res: StudyResources, spec: StudySpec, dataset_id: str) -> QADataset:
    """The dataset, recorded with the study's split; refused if it is recorded with another
    (its adapters and runs use that one: moving examples between splits would void them)."""
    recorded = res.store.dataset_split(dataset_id)
    if recorded is None and config.PUBLIC_MODE and spec.split != DEFAULT_SPLIT:
        # Planning records the split for everyone: a visitor may not pin another one.
        raise StudySpecError(
            f"On this public server {dataset_id} uses split seed {DEFAULT_SPLIT.seed} and eval "
            f"fraction {DEFAULT_SPLIT.eval_fraction:g}; set the study's split_seed and "
            "eval_fraction to those values.")
    if recorded is not None and recorded != spec.split:
        raise StudySpecError(
            f"{dataset_id} is recorded with split seed {recorded.seed} and eval fraction "
            f"{recorded.eval_fraction:g} (its fine-tunes and evaluations use that split); set the "
            "study's split_seed and eval_fraction to those values.")
    try:
        if recorded is not None:
            return res.datasets.get(dataset_id)
    except InputError:
        pass  # a hub dataset not loaded in this session: loaded below, keeping its split
    preset, source = preset_of(dataset_id)
    try:
        dataset = load_preset(preset, source)
    except (InputError, ValueError) as err:  # offline, gone from the hub
        raise StudySpecError(f"Could not load {dataset_id}: {err}") from err
    res.datasets.add(dataset, spec.split)
    return dataset


def _finetune_steps(spec: StudySpec, dataset: QADataset,
                    model: str) -> list[tuple[Step, tuple[str, set[str]]]]:
    """One step per size and seed, each with (dataset id, the ids it trains on)."""
    if not spec.finetunes:
        return []
    cells = []
    for size in spec.sizes:
        for seed in spec.finetune_seeds:
            finetune = spec.finetune_spec(model, dataset.source, size, seed)
            try:
                sample = draw_sample(finetune, dataset)
            except FinetuneError as err:
                raise StudySpecError(f"Size {size} does not fit {dataset.source}: {err}") from err
            done = (adapter_dir(finetune.output_name) / "metrics.json").is_file()
            step = Step(FINETUNE_KIND, finetune.output_name,
                        f"fine-tune {model} on {dataset.source}: {size} pairs, seed {seed}",
                        finetune.to_dict(), dataset.source, size * finetune.epochs, done=done)
            cells.append((step, (dataset.source, {e.id for e in sample.train})))
    return cells


def _check_items(res: StudyResources, evaluation: EvalSpec,
                 planned: dict[str, tuple[str, set[str]]]) -> list[str]:
    """The eval item ids, after the evaluation's own leakage check: a finished adapter with its
    recorded training ids, one still to train with the ids its sample will hold."""
    resources = res.evaluations.resources
    where = f"evaluation of {evaluation.dataset_id}"
    try:
        examples = select_examples(resources, evaluation)
        recorded = {name: resources.training_ids(name) for name in planned}
        lookup = {name: recorded[name] if recorded[name][0] else ids for name, ids in planned.items()}
        check_no_leakage(dataclasses.replace(resources, training_ids=lookup.__getitem__), evaluation,
                         Plan(examples, list(evaluation.systems)))
    except InputError as err:
        raise StudySpecError(f"{where}: {err}") from err
    return [e.id for e in examples]


def _eval_step(res: StudyResources, evaluation: EvalSpec, model: str,
               cells: list[tuple[Step, Any]], n_items: int) -> Step:
    key = eval_key(evaluation)
    cell_of = {step.key: step for step, _ in cells}
    systems = []
    for system in evaluation.systems:
        cell = cell_of.get(system.adapter)
        systems.append({"id": system.id, "model": model, "rag": system.rag,
                        "adapter": None if system.is_base else system.adapter,
                        "size": cell.spec["n_train"] if cell else 0,
                        "seed": cell.spec["seed"] if cell else None})
    job = latest_job(res, EVAL_KIND, key)
    run = res.store.get_eval_run(job.id) if job else None
    answers = n_items * len(evaluation.systems)
    judgments = answers * len(evaluation.metrics) * evaluation.effective_repeats
    return Step(EVAL_KIND, key, f"evaluate {model} on {evaluation.dataset_id}: "
                f"{len(evaluation.systems)} systems x {n_items} items", evaluation.to_dict(),
                evaluation.dataset_id, answers + judgments,
                done=bool(run and run.status == "done"), answers=answers, systems=systems)


def _index_built(name: str) -> bool:
    folder = index_dir(name)
    return name in list_specs() and all((folder / f).is_file() for f in ("manifest.json", "store.json"))


def job_key(kind: str, spec: dict[str, Any]) -> str | None:
    """The content key of a stored job's spec (what a step of that kind is named by)."""
    if kind == INDEX_KIND:
        return (spec.get("pipeline") or {}).get("name")
    if kind == FINETUNE_KIND:
        return spec.get("name")
    try:
        return eval_key(EvalSpec.from_dict(spec))
    except InputError:  # a run stored by an older version: never one of this study's
        return None


def latest_job(res: StudyResources, kind: str, key: str) -> JobRecord | None:
    """The newest job of `kind` that made (or is making) the step named `key`."""
    return next((job for job in res.jobs.runner.jobs(kind, limit=10_000)
                 if job_key(kind, job.spec or {}) == key), None)


def step_jobs(res: StudyResources, steps: list[Step]) -> dict[str, JobRecord]:
    """latest_job of every step at once (one read per kind), by step key; a step no job made
    (not started yet, or found made, like an imported adapter) is absent."""
    newest: dict[tuple[str, str | None], JobRecord] = {}
    for kind in dict.fromkeys(s.kind for s in steps):
        for job in res.jobs.runner.jobs(kind, limit=10_000):  # newest first: the first one wins
            newest.setdefault((kind, job_key(kind, job.spec or {})), job)
    return {s.key: newest[(s.kind, s.key)] for s in steps if (s.kind, s.key) in newest}


def _counts(steps: list[Step]) -> dict[str, int]:
    todo = [s for s in steps if not s.done]
    evals = [s for s in todo if s.kind == EVAL_KIND]
    answers = sum(s.answers for s in evals)
    return {"finetunes": sum(s.kind == FINETUNE_KIND for s in todo), "answers": answers,
            "judgments": sum(s.units for s in evals) - answers,
            "indexes": sum(s.kind == INDEX_KIND for s in todo)}


def _seconds(res: StudyResources, steps: list[Step]) -> tuple[float, tuple[str, ...]]:
    """Rough seconds for the steps to do: work units times the rate this machine measured in its
    newest finished jobs of each kind (DEFAULT_SECONDS until it has some); and the kinds to do
    whose rate is such a default."""
    todo = [s for s in steps if not s.done]
    measured = {kind: _measured_rate(res, kind) for kind in dict.fromkeys(s.kind for s in todo)}
    rates = {kind: rate or DEFAULT_SECONDS[kind] for kind, rate in measured.items()}
    return (sum(s.units * rates[s.kind] for s in todo),
            tuple(kind for kind, rate in measured.items() if rate is None))


def _measured_rate(res: StudyResources, kind: str) -> float | None:
    """Median seconds per unit over the newest finished jobs of `kind` (one attempt each)."""
    rates = []
    for job in res.jobs.runner.jobs(kind, limit=20):
        result, spec = job.result or {}, job.spec or {}
        if job.status != "done" or job.attempts != 1 or not job.started_at or not job.finished_at:
            continue
        seconds = (job.finished_at - job.started_at).total_seconds()
        units = {INDEX_KIND: result.get("passages"),
                 FINETUNE_KIND: spec.get("n_train", 0) * spec.get("epochs", 0),
                 EVAL_KIND: (result.get("answers") or 0) + (result.get("judgments") or 0)}[kind]
        if units:
            rates.append(seconds / units)
    return statistics.median(rates) if rates else None
