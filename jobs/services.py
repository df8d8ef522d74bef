"""The app's long-lived objects in one place: the store, the job runner, the model hub, and the
datasets loaded in this session. The UI and the CLIs call these functions; nothing here imports
Gradio."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from core import config
from core.datasets import QADataset
from core.models import ModelHub, get_hub
from core.schema import split_of
from core.store import Store, get_store
from jobs.runner import JobContext, JobKind, JobRunner

SPLIT_SEED = 0
EVAL_FRACTION = 0.3


def prepare_models(ctx: JobContext) -> dict[str, Any]:
    """Load (and on first run convert) the default chat model so the first question is fast."""
    ref = ctx.spec.get("model", config.DEFAULT_CHAT_MODEL)
    ctx.progress(0.05, f"loading {ref} (the first run converts the GGUF weights, ~20 s)")
    get_hub().load(ref)
    ctx.log(f"{ref} ready")
    return {"model": ref}


def job_kinds() -> dict[str, JobKind]:
    return {"prepare": JobKind(thread=prepare_models)}


@dataclass
class Services:
    store: Store
    runner: JobRunner
    datasets: dict[str, QADataset] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def hub(self) -> ModelHub:
        return get_hub()

    def add_dataset(self, ds: QADataset) -> str:
        """Keep a loaded dataset for this process and record it (with its split) in DuckDB."""
        dataset_id = ds.source
        rows = [
            {"id": e.id, "question": e.question, "answer": e.answer, "contexts": e.contexts,
             "split": split_of(e.id, SPLIT_SEED, EVAL_FRACTION), "meta": e.meta}
            for e in ds.examples
        ]
        self.store.save_dataset(dataset_id, ds.name, ds.source, rows, len(ds.corpus),
                                {"split_seed": SPLIT_SEED, "eval_fraction": EVAL_FRACTION})
        with self._lock:
            self.datasets[dataset_id] = ds
        return dataset_id


def build_services(warm_up: bool = True) -> Services:
    store = get_store()
    runner = JobRunner(store, job_kinds())
    services = Services(store=store, runner=runner)
    if warm_up:
        runner.start("prepare", {"model": config.DEFAULT_CHAT_MODEL})
    return services
