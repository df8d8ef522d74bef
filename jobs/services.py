"""The one place the app is wired together: the store, the job runner, the model hub and the
services the UI and the CLIs call. Jobs receive only the few things they use (see EvalResources,
IndexCatalog), never this container; nothing below jobs/ imports it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core import config
from core.models import ModelHub, get_hub
from core.store import Store, get_store
from jobs import evaluate, finetune
from jobs.adapters import KIND as FINETUNE_KIND, AdapterCatalog
from jobs.catalog import DatasetCatalog
from jobs.desk import JobDesk
from jobs.evaluations import Evaluations
from jobs.indexes import KIND as INDEX_KIND, IndexCatalog
from jobs.runner import JobContext, JobKind, JobRunner
from jobs.study import KIND as STUDY_KIND, Studies, StudyResources

MAX_CONCURRENT_JOBS = 2


@dataclass(frozen=True)
class Services:
    store: Store
    runner: JobRunner
    jobs: JobDesk
    hub: ModelHub
    datasets: DatasetCatalog
    adapters: AdapterCatalog
    indexes: IndexCatalog
    evaluations: Evaluations
    studies: Studies


def prepare_models(hub: ModelHub):
    """A job that loads (and on first run converts) a chat model so the first question is fast."""
    def run(ctx: JobContext) -> dict[str, Any]:
        ref = ctx.spec.get("model", config.DEFAULT_CHAT_MODEL)
        ctx.progress(0.05, f"loading {ref} (the first run converts the GGUF weights, ~20 s)")
        hub.load(ref)
        ctx.log(f"{ref} ready")
        return {"model": ref}
    return run


def build_services(warm_up: bool = True, store: Store | None = None) -> Services:
    store = store or get_store()
    hub = get_hub()
    runner = JobRunner(store, kinds={}, max_concurrent=MAX_CONCURRENT_JOBS)
    # Public mode: at most MAX_RUNNING_JOBS visitor jobs, one fine-tune and one study per visitor
    # session, and a visitor cancels or resumes only their own jobs.
    jobs = JobDesk(runner, config.MAX_RUNNING_JOBS,
                   frozenset({FINETUNE_KIND, STUDY_KIND}) if config.PUBLIC_MODE else frozenset(),
                   owners_only=config.PUBLIC_MODE)
    datasets = DatasetCatalog(store)
    adapters = AdapterCatalog(store, hub, jobs, split_of=datasets.split)
    indexes = IndexCatalog(store, jobs, corpus=lambda dataset_id: datasets.get(dataset_id).corpus)
    resources = evaluate.EvalResources(store=store, hub=hub, eval_examples=datasets.eval_examples,
                                       index=indexes.get, adapter_paths=adapters.paths,
                                       training_ids=adapters.training_ids)
    evaluations = Evaluations(store, jobs, resources, adapter_rows=adapters.rows)
    studies = Studies(StudyResources(store, jobs, datasets, adapters, indexes, evaluations))
    runner.register("prepare", JobKind(thread=prepare_models(hub)))
    runner.register(INDEX_KIND, JobKind(thread=indexes.run_job))
    runner.register(FINETUNE_KIND, JobKind(argv=finetune.finetune_argv, on_done=adapters.record))
    runner.register(evaluate.KIND, JobKind(thread=evaluate.evaluation_job(resources)))
    # A study only starts its steps' jobs and waits for them: it takes no slot of its own.
    runner.register(STUDY_KIND, JobKind(thread=studies.run_job, slot=False))
    adapters.sync()
    if warm_up:
        runner.start("prepare", {"model": config.DEFAULT_CHAT_MODEL})
    return Services(store, runner, jobs, hub, datasets, adapters, indexes, evaluations, studies)
