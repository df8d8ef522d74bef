"""The LoRA adapters this app knows: trained here, loaded from a folder or the Hub; their records,
folders, and what they were trained on (for the evaluation's leakage check).

Every adapter name from a request passes core.names.check_name before a row or a folder is
touched, and every folder built from one goes through inside(): renaming to "../x" or exporting
"../x" is refused, never done."""
from __future__ import annotations

import json
import logging
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any, Callable

from core import config
from core.model_files import AdapterError
from core.models import ModelHub
from core.dataset_presets import PRESETS
from core.names import check_hub_id, check_name, inside
from core.records import AdapterRecord
from core.schema import InputError, SplitSetting
from core.secrets import Secret
from core.store import Store
from jobs.desk import JobDesk
from jobs.finetune import adapter_dir, load_tokenizer, result_of
from jobs.finetune_data import FinetuneSpec, TrainData, prepare_data, sample_data

logger = logging.getLogger(__name__)


KIND = "finetune"
LENGTH_STEP = 64  # fitted max_length values are rounded up to a multiple of this


def dataset_id_of(spec: FinetuneSpec) -> str:
    """The catalog id of the dataset a fine-tune reads (the id core.datasets gives it)."""
    if spec.is_file:
        return f"upload:{Path(spec.dataset).name}"
    return f"sample:{spec.dataset}" if spec.source == "sample" else f"hub:{PRESETS[spec.dataset].hub_id}"


def trained_here() -> list[dict[str, Any]]:
    """The adapters-table rows of the finished fine-tunes under the data dir, read from their
    folders (spec.json, metrics.json): what the table holds of them, without opening the database."""
    rows = []
    for folder in sorted(config.subdir("adapters").iterdir()):
        if not (folder / "metrics.json").is_file():
            continue
        spec = FinetuneSpec.from_dict(json.loads((folder / "spec.json").read_text()))
        rows.append(result_of(spec, folder, json.loads((folder / "metrics.json").read_text())))
    return rows


class AdapterCatalog:
    def __init__(self, store: Store, hub: ModelHub, jobs: JobDesk,
                 split_of: Callable[[str], SplitSetting]) -> None:
        """`split_of(dataset_id)` is the dataset's one split setting (the datasets catalog)."""
        self.store, self.hub, self.jobs, self._split_of = store, hub, jobs, split_of

    def training_spec(self, spec: FinetuneSpec) -> FinetuneSpec:
        """The spec with its dataset's recorded split (one split for fine-tuning and evaluation)."""
        split = self._split_of(dataset_id_of(spec))
        return spec.replace(split_seed=split.seed, eval_fraction=split.eval_fraction).check_runnable()

    def train(self, spec: FinetuneSpec, visitor: str | None = None) -> str:
        """Start a fine-tune on the dataset's recorded split, within the job caps (`visitor`: the
        Gradio session asking); returns the job id. What the job would find out in its first
        seconds (too few training examples, prompts longer than max_length) is refused here,
        before any job row or process exists."""
        spec = self.training_spec(spec)  # checks it can run here (public mode: presets only)
        self._prepared(spec)
        return self.jobs.admit(KIND, visitor, lambda: self.jobs.runner.start(KIND, spec.to_dict()))

    def fitted_max_length(self, spec: FinetuneSpec) -> int:
        """The smallest max_length (a multiple of LENGTH_STEP) that holds every prompt and answer
        of the spec's sample; spec.max_length when the prompts are the job's to build."""
        data = self._prepared(self.training_spec(spec).replace(max_length=10**9))
        if data is None:
            return spec.max_length
        longest = max(len(e.input_ids) for e in data.train + data.val)
        return -(-longest // LENGTH_STEP) * LENGTH_STEP

    @staticmethod
    def _prepared(spec: FinetuneSpec) -> TrainData | None:
        """The job's own data checks (jobs.finetune_data), run with the tokenizer only: a second
        or two for the study's sizes. None, after the sample is checked, for context 'retrieved':
        retrieving for every prompt is the job's work."""
        sampled = sample_data(spec, logger.debug)
        if spec.context == "retrieved":
            return None
        tokenizer, _ = load_tokenizer(spec.base_model)
        return prepare_data(spec, tokenizer, logger.debug, sampled)

    def rows(self) -> list[AdapterRecord]:
        return self.store.list_adapters()

    def paths(self) -> dict[str, str]:
        return {r.name: r.path for r in self.store.list_adapters()}

    def names(self, model_ref: str) -> list[str]:
        return sorted(set(self.paths()) | set(self.hub.list_adapters(model_ref)))

    def get(self, name: str) -> AdapterRecord:
        """The adapter's record; AdapterError for a name that breaks the rule or is unknown."""
        check_name(name, "Adapter name", AdapterError)
        row = next((r for r in self.store.list_adapters() if r.name == name), None)
        if row is None:
            raise AdapterError(f"No adapter named '{name}'.")
        return row

    def training_ids(self, name: str) -> tuple[str | None, set[str]]:
        """(dataset id, ids of the examples the adapter was trained on), from the train_ids.json
        its fine-tune wrote; (None, empty) for an adapter trained elsewhere."""
        path = self.paths().get(name)
        record = Path(path) / "train_ids.json" if path else None
        if record is None or not record.is_file():
            return None, set()
        data = json.loads(record.read_text(encoding="utf-8"))
        return data.get("dataset_id"), set(data.get("train") or [])

    def sync(self) -> list[str]:
        """Register finished adapter folders the table lacks (trained by the CLI while the app
        held the database, or before a crash): nothing trained is lost from the list."""
        known = set(self.paths())
        added = []
        for row in trained_here():
            if row["name"] not in known:
                self.store.upsert_adapter(**row)
                added.append(row["name"])
        return added

    def record(self, job_id: str, result: dict[str, Any]) -> None:
        """A finished fine-tune job's adapter becomes a row (the CLI writes the same row)."""
        self.store.upsert_adapter(job_id=job_id, **result)

    def import_(self, source: str, base_model: str, name: str | None = None) -> str:
        """Register a LoRA folder or hub id after attaching it once (which validates it)."""
        source = (source or "").strip()
        if not source:
            raise InputError("Give an adapter folder or a Hub id (owner/name).")
        name = self.hub.load_adapter(base_model, source, (name or "").strip() or None)
        path = Path(source) if not config.PUBLIC_MODE and Path(source).is_dir() else None
        self.store.upsert_adapter(name, base_model, str(path or source))
        return name

    def rename(self, old: str, new: str) -> None:
        row = self.get(old)
        new = check_name((new or "").strip(), "New adapter name", AdapterError)
        if new == old or any(r.name == new for r in self.store.list_adapters()):
            raise AdapterError(f"Choose a new, unused adapter name (not '{new}').")
        path = Path(row.path)
        if self._ours(path, old):  # the folder follows the name
            path = path.rename(adapter_dir(new))
        self.store.rename_adapter(old, new, str(path))
        logger.info("renamed adapter %s to %s", old, new)

    def delete(self, name: str) -> None:
        path = Path(self.get(name).path)
        self.store.delete_adapter(name)
        if self._ours(path, name):
            shutil.rmtree(path, ignore_errors=True)
        logger.info("deleted adapter %s", name)

    @staticmethod
    def _ours(path: Path, name: str) -> bool:
        """The folder is the one this app trained under that name (not an imported one)."""
        return path.resolve() == adapter_dir(name)

    def zip(self, name: str) -> Path:
        """The adapter folder as a zip (weights, config, spec, metrics; no checkpoints)."""
        folder = Path(self.get(name).path)
        if not folder.is_dir():
            raise AdapterError(f"The folder of adapter '{name}' is gone ({folder}).")
        out = inside(config.subdir("exports"), f"{name}.zip")
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
            for path in sorted(folder.rglob("*")):
                if path.is_file() and "checkpoints" not in path.relative_to(folder).parts:
                    zf.write(path, path.relative_to(folder))
        return out

    def push(self, name: str, repo_id: str, token: Secret | None) -> str:
        """Upload to the Hub with the visitor's token (signed in, or typed); without one, the
        operator's HF_TOKEN, but on a public server only if ALLOW_OPERATOR_TOKEN_PUSH=1. Never stored."""
        from huggingface_hub import HfApi

        if token is None:
            if config.PUBLIC_MODE and not config.ALLOW_OPERATOR_TOKEN_PUSH:
                raise InputError("Sign in with Hugging Face to push to your own account (this "
                                 "server does not push with its own token).")
            token = Secret.typed(os.environ.get("HF_TOKEN"))
        if token is None:
            raise InputError("Pushing needs a Hugging Face token: set HF_TOKEN or paste one "
                             "(used for this request only, never stored).")
        folder = Path(self.get(name).path)
        repo_id = check_hub_id(repo_id or "", "Target repo", InputError)
        try:
            api = HfApi(token=token.reveal())
            api.create_repo(repo_id.strip(), exist_ok=True)
            info = api.upload_folder(folder_path=str(folder), repo_id=repo_id.strip(),
                                     ignore_patterns=["checkpoints/*"])
        except Exception as exc:  # offline, bad token, no permission: all user-fixable
            detail = (str(exc).splitlines() or ["no details"])[0].replace(token.reveal(), "***")
            raise InputError(f"Could not push '{name}' to {repo_id}: {type(exc).__name__}: "
                             f"{detail} (offline or no write access?)") from exc
        return str(getattr(info, "commit_url", repo_id))
