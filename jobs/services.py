"""The app's long-lived objects in one place: the store, the job runner, the model hub, the
datasets and indexes loaded in this process. The UI and the CLIs call these; no Gradio here."""
from __future__ import annotations

import json
import os
import shutil
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core import config
from core.datasets import QADataset, load_preset
from core.models import AdapterError, ModelHub, get_hub
from core.schema import InputError, split_of
from core.store import Store, get_store
from jobs.evaluate import evaluation_job
from jobs.finetune import adapter_dir, finetune_argv, result_of
from jobs.finetune_data import FinetuneSpec
from jobs.runner import JobContext, JobKind, JobRunner, job_dir
from pipelines import indexing, spec as pspec
from pipelines.corpus import passages_from_files
from pipelines.query import pipeline_yaml

SPLIT_SEED = 0
EVAL_FRACTION = 0.3


def prepare_models(ctx: JobContext) -> dict[str, Any]:
    """Load (and on first run convert) the default chat model so the first question is fast."""
    ref = ctx.spec.get("model", config.DEFAULT_CHAT_MODEL)
    ctx.progress(0.05, f"loading {ref} (the first run converts the GGUF weights, ~20 s)")
    get_hub().load(ref)
    ctx.log(f"{ref} ready")
    return {"model": ref}


@dataclass
class Services:
    store: Store
    runner: JobRunner | None = None
    datasets: dict[str, QADataset] = field(default_factory=dict)
    indexes: dict[str, indexing.DocumentStoreHandle] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def hub(self) -> ModelHub:
        return get_hub()

    # -- datasets ---------------------------------------------------------------------------
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

    def dataset_ids(self) -> list[str]:
        samples = [f"sample:{name}" for name in ("bioasq", "qasper", "nq")]
        return samples + sorted(set(self.datasets) - set(samples))

    def dataset(self, dataset_id: str) -> QADataset:
        """A dataset loaded in this process; shipped samples load on demand."""
        with self._lock:
            ds = self.datasets.get(dataset_id)
        if ds is not None:
            return ds
        if dataset_id.startswith("sample:"):
            ds = load_preset(dataset_id.split(":", 1)[1], source="sample")
            self.add_dataset(ds)
            return ds
        raise InputError(f"The dataset '{dataset_id}' is not loaded in this session: load it in "
                         "the Data tab first.")

    def eval_examples(self, dataset_id: str):
        return self.dataset(dataset_id).split(SPLIT_SEED, EVAL_FRACTION)[1]

    # -- pipelines and indexes --------------------------------------------------------------
    def start_indexing(self, spec: pspec.PipelineSpec, dataset_id: str | None,
                       files: list[str] | None) -> str:
        spec.validate()
        if not dataset_id and not files:
            raise InputError("Choose a dataset's passages or upload files to index.")
        job_spec = {"pipeline": spec.to_dict(), "dataset_id": None if files else dataset_id,
                    "files": [str(p) for p in files or []]}
        return self.runner.start("index", job_spec)

    def run_indexing(self, ctx: JobContext) -> dict[str, Any]:
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
            passages = self.dataset(ctx.spec["dataset_id"]).corpus
        ctx.log(f"indexing {len(passages)} passages with {spec.retriever} retrieval")
        handle = indexing.build_index(spec, passages, progress=ctx.progress,
                                      should_cancel=lambda: ctx.cancelled)
        pspec.save_spec(spec, pipeline_yaml(spec, handle), store=self.store)
        with self._lock:
            old = self.indexes.pop(spec.name, None)
            self.indexes[spec.name] = handle
        if old is not None and old.document_store is not handle.document_store:
            old.release()
        ctx.log(f"{handle.n_documents} chunks from {handle.n_passages} passages "
                f"in {handle.seconds:.1f} s")
        return {"pipeline": spec.name, "passages": handle.n_passages,
                "chunks": handle.n_documents, "seconds": round(handle.seconds, 2),
                "dataset_id": ctx.spec.get("dataset_id")}

    def index(self, name: str) -> indexing.DocumentStoreHandle:
        with self._lock:
            handle = self.indexes.get(name)
        if handle is None:
            handle = indexing.load_index(name)
            with self._lock:
                handle = self.indexes.setdefault(name, handle)
        return handle

    def delete_pipeline(self, name: str) -> None:
        with self._lock:
            handle = self.indexes.pop(name, None)
        if handle is not None:
            handle.release()
        pspec.delete_spec(name, store=self.store)

    # -- adapters ---------------------------------------------------------------------------
    def adapter_paths(self) -> dict[str, str]:
        return {r["name"]: r["path"] for r in self.store.list_adapters()}

    def adapter_names(self, model_ref: str) -> list[str]:
        return sorted(set(self.adapter_paths()) | set(self.hub.list_adapters(model_ref)))

    def sync_adapters(self) -> list[str]:
        """Register finished adapter folders the table lacks (trained by the CLI while the app
        held the database, or before a crash): nothing trained is lost from the list."""
        known = set(self.adapter_paths())
        added = []
        for folder in sorted(config.subdir("adapters").iterdir()):
            if folder.name in known or not (folder / "metrics.json").is_file():
                continue
            spec = FinetuneSpec.from_dict(json.loads((folder / "spec.json").read_text()))
            metrics = json.loads((folder / "metrics.json").read_text())
            self.store.upsert_adapter(**result_of(spec, folder, metrics))
            added.append(folder.name)
        return added

    def record_adapter(self, job_id: str, result: dict[str, Any]) -> None:
        """A finished fine-tune job's adapter becomes a row (the CLI writes the same row)."""
        self.store.upsert_adapter(job_id=job_id, **result)

    def import_adapter(self, source: str, base_model: str, name: str | None = None) -> str:
        """Register a LoRA folder or hub id after attaching it once (which validates it)."""
        source = (source or "").strip()
        if not source:
            raise InputError("Give an adapter folder or a Hub id (owner/name).")
        name = self.hub.load_adapter(base_model, source, (name or "").strip() or None)
        path = Path(source) if Path(source).is_dir() else None
        self.store.upsert_adapter(name, base_model, str(path or source))
        return name

    def _adapter_row(self, name: str) -> dict[str, Any]:
        row = next((r for r in self.store.list_adapters() if r["name"] == name), None)
        if row is None:
            raise AdapterError(f"No adapter named '{name}'.")
        return row

    def rename_adapter(self, old: str, new: str) -> None:
        row = self._adapter_row(old)
        new = (new or "").strip()
        if not new or new == old or any(r["name"] == new for r in self.store.list_adapters()):
            raise AdapterError(f"Choose a new, unused adapter name (not '{new}').")
        path = Path(row["path"])
        if path.parent == adapter_dir(old).parent:  # ours: the folder follows the name
            path = path.rename(adapter_dir(new))
        self.store.rename_adapter(old, new, str(path))

    def delete_adapter(self, name: str) -> None:
        path = Path(self._adapter_row(name)["path"])
        self.store.delete_adapter(name)
        if path.parent == adapter_dir(name).parent:
            shutil.rmtree(path, ignore_errors=True)

    def zip_adapter(self, name: str) -> Path:
        """The adapter folder as a zip (weights, config, spec, metrics; no checkpoints)."""
        folder = Path(self._adapter_row(name)["path"])
        if not folder.is_dir():
            raise AdapterError(f"The folder of adapter '{name}' is gone ({folder}).")
        out = config.subdir("exports") / f"{name}.zip"
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
            for path in sorted(folder.rglob("*")):
                if path.is_file() and "checkpoints" not in path.relative_to(folder).parts:
                    zf.write(path, path.relative_to(folder))
        return out

    def push_adapter(self, name: str, repo_id: str, token: str | None) -> str:
        """Upload to the Hub with the token given (UI session) or HF_TOKEN; never stored."""
        from huggingface_hub import HfApi

        token = (token or "").strip() or os.environ.get("HF_TOKEN")
        if not token:
            raise InputError("Pushing needs a Hugging Face token: set HF_TOKEN or paste one "
                             "(used for this request only, never stored).")
        if not (repo_id or "").strip() or "/" not in repo_id:
            raise InputError("Give the target repo as owner/name.")
        folder = Path(self._adapter_row(name)["path"])
        try:
            api = HfApi(token=token)
            api.create_repo(repo_id.strip(), exist_ok=True)
            info = api.upload_folder(folder_path=str(folder), repo_id=repo_id.strip(),
                                     ignore_patterns=["checkpoints/*"])
        except Exception as exc:  # offline, bad token, no permission: all user-fixable
            raise InputError(f"Could not push '{name}' to {repo_id}: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else 'no details'} "
                             "(offline or no write access?)") from exc
        return str(getattr(info, "commit_url", repo_id))


def build_services(warm_up: bool = True) -> Services:
    services = Services(store=get_store())
    services.runner = JobRunner(services.store, max_concurrent=2, kinds={
        "prepare": JobKind(thread=prepare_models),
        "index": JobKind(thread=services.run_indexing),
        "finetune": JobKind(argv=finetune_argv, on_done=services.record_adapter),
        "evaluate": JobKind(thread=lambda ctx: evaluation_job(ctx, services)),
    })
    services.sync_adapters()
    if warm_up:
        services.runner.start("prepare", {"model": config.DEFAULT_CHAT_MODEL})
    return services
