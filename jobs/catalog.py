"""The datasets this app knows: loaded QA datasets, recorded in DuckDB with their one split setting.

A dataset's train/eval split (seed and eval fraction) is stored with the dataset when it is first
recorded; fine-tuning and evaluation both read it from here, so they can never disagree about
which examples are eval examples.
"""
from __future__ import annotations

import logging
import threading

from core.datasets import QADataset, load_preset
from core.schema import DEFAULT_SPLIT, InputError, QAExample, SplitSetting, split_of
from core.store import Store

logger = logging.getLogger(__name__)

SAMPLE_IDS = tuple(f"sample:{name}" for name in ("bioasq", "qasper", "nq"))


class DatasetCatalog:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._loaded: dict[str, QADataset] = {}
        self._lock = threading.Lock()

    def add(self, ds: QADataset, split: SplitSetting | None = None) -> str:
        """Keep a loaded dataset for this process and record it with its split in DuckDB.

        Without `split`, a dataset recorded before keeps its split (re-loading never moves an
        example between train and eval); a new one gets the default."""
        dataset_id = ds.source
        split = split or self.split(dataset_id)
        rows = [{"id": e.id, "question": e.question, "answer": e.answer, "contexts": e.contexts,
                 "split": split_of(e.id, split.seed, split.eval_fraction), "meta": e.meta}
                for e in ds.examples]
        self.store.save_dataset(dataset_id, ds.name, ds.source, rows, len(ds.corpus), split)
        with self._lock:
            self._loaded[dataset_id] = ds
        logger.info("recorded dataset %s (%d examples)", dataset_id, len(rows))
        return dataset_id

    def ids(self) -> list[str]:
        with self._lock:
            loaded = set(self._loaded)
        recorded = {r["id"] for r in self.store.list_datasets()}
        return list(SAMPLE_IDS) + sorted((loaded | recorded) - set(SAMPLE_IDS))

    def split(self, dataset_id: str) -> SplitSetting:
        """The dataset's recorded split setting; the default for a dataset never recorded."""
        return self.store.dataset_split(dataset_id) or DEFAULT_SPLIT

    def get(self, dataset_id: str) -> QADataset:
        """A dataset loaded in this process; shipped samples load on demand."""
        with self._lock:
            ds = self._loaded.get(dataset_id)
        if ds is not None:
            return ds
        if dataset_id in SAMPLE_IDS:
            ds = load_preset(dataset_id.split(":", 1)[1], source="sample")
            self.add(ds)
            return ds
        raise InputError(f"The dataset '{dataset_id}' is not loaded in this session: load it in "
                         "the Data tab first.")

    def eval_examples(self, dataset_id: str) -> list[QAExample]:
        """The eval split: from the loaded dataset, else from the examples DuckDB recorded (a
        dataset loaded by an earlier app session, or the CLI)."""
        try:
            split = self.split(dataset_id)
            return self.get(dataset_id).split(split.seed, split.eval_fraction)[1]
        except InputError:
            examples = self.store.eval_split(dataset_id)
            if examples is None:
                raise InputError(f"The dataset '{dataset_id}' is not loaded: load it in the Data "
                                 "tab first.") from None
            return examples
