"""Saved RAG pipelines and their built indexes: the indexing job and the handles loaded in this
process (one per pipeline, shared by the RAG tab, Compare and evaluations)."""
from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path
from typing import Any, Callable

from core.schema import InputError, Passage
from core.testhooks import gate
from core.store import Store
from jobs.desk import JobDesk
from jobs.runner import JobContext, job_dir
from pipelines import indexing, spec as pspec
from pipelines.corpus import passages_from_files
from pipelines.query import pipeline_yaml

KIND = "index"

logger = logging.getLogger(__name__)


class IndexCatalog:
    def __init__(self, store: Store, jobs: JobDesk,
                 corpus: Callable[[str], list[Passage]]) -> None:
        """`corpus(dataset_id)` gives a dataset's passages (the datasets catalog)."""
        self.store, self.jobs, self._corpus = store, jobs, corpus
        self._handles: dict[str, indexing.DocumentStoreHandle] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        return pspec.list_specs()

    def start(self, spec: pspec.PipelineSpec, dataset_id: str | None,
              files: list[str] | None, visitor: str | None = None) -> str:
        """Check the request, then build the index as a background job within the job caps
        (`visitor`: the Gradio session asking); returns the job id."""
        if not dataset_id and not files:
            raise InputError("Choose a dataset's passages or upload files to index.")
        if not files:
            self._corpus(dataset_id)  # an unknown dataset id is refused here, not in the job
        job_spec = {"pipeline": spec.to_dict(), "dataset_id": None if files else dataset_id,
                    "files": [str(p) for p in files or []]}
        return self.jobs.admit(KIND, visitor, lambda: self.jobs.runner.start(KIND, job_spec))

    def run_job(self, ctx: JobContext) -> dict[str, Any]:
        """The runner's entry point for kind "index"."""
        spec = pspec.PipelineSpec.from_dict(ctx.spec["pipeline"])
        if ctx.spec.get("files"):
            # Uploads live in Gradio's temp dir; the job keeps copies so a resume still has them.
            keep = job_dir(ctx.job_id) / "files"
            keep.mkdir(exist_ok=True)
            paths = []
            for src in ctx.spec["files"]:
                dst = keep / Path(src).name
                if not dst.exists():
                    shutil.copy(src, dst)
                paths.append(dst)
            passages = passages_from_files(paths)
        else:
            passages = self._corpus(ctx.spec["dataset_id"])
        ctx.log(f"indexing {len(passages)} passages with {spec.retriever} retrieval")
        ctx.progress(0.0, f"indexing {len(passages)} passages")
        gate("index-job")  # tests stop the job here (core.testhooks)
        handle = indexing.build_index(spec, passages, progress=ctx.progress,
                                      should_cancel=lambda: ctx.cancelled)
        pspec.save_spec(spec, pipeline_yaml(spec, handle), store=self.store)
        with self._lock:
            old = self._handles.pop(spec.name, None)
            self._handles[spec.name] = handle
        if old is not None and old.document_store is not handle.document_store:
            old.release()
        ctx.log(f"{handle.n_documents} chunks from {handle.n_passages} passages "
                f"in {handle.seconds:.1f} s")
        logger.info("built index %s: %d chunks", spec.name, handle.n_documents)
        return {"pipeline": spec.name, "passages": handle.n_passages,
                "chunks": handle.n_documents, "seconds": round(handle.seconds, 2),
                "dataset_id": ctx.spec.get("dataset_id")}

    def get(self, name: str) -> indexing.DocumentStoreHandle:
        with self._lock:
            handle = self._handles.get(name)
        if handle is None:
            handle = indexing.load_index(name)
            with self._lock:
                handle = self._handles.setdefault(name, handle)
        return handle

    def delete(self, name: str) -> None:
        with self._lock:
            handle = self._handles.pop(name, None)
        if handle is not None:
            handle.release()
        pspec.delete_spec(name, store=self.store)
