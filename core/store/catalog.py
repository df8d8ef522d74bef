"""What the app builds and keeps by name: datasets (with their examples and split setting),
pipeline specs and LoRA adapters."""
from __future__ import annotations

import json
from typing import Any

from core.records import AdapterRecord
from core.schema import DEFAULT_SPLIT, QAExample, SplitSetting
from core.store.database import Database, now


class CatalogTables(Database):
    # -- datasets ---------------------------------------------------------------------------
    def save_dataset(self, dataset_id: str, name: str, source: str, examples: list[dict],
                     n_passages: int, split: SplitSetting = DEFAULT_SPLIT) -> None:
        """Replace a dataset's row and its examples (dicts with id, question, answer, contexts,
        split, meta) in one transaction; `split` is the setting that assigned their splits."""
        with self.transaction() as cur:
            cur.execute("DELETE FROM examples WHERE dataset_id = ?", [dataset_id])
            cur.execute("DELETE FROM datasets WHERE id = ?", [dataset_id])
            cur.execute(
                "INSERT INTO datasets (id, name, source, n_examples, n_passages, meta, split_seed, "
                "eval_fraction, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [dataset_id, name, source, len(examples), n_passages, json.dumps({}), split.seed,
                 split.eval_fraction, now()],
            )
            cur.executemany(
                "INSERT INTO examples VALUES (?, ?, ?, ?, ?, ?, ?)",
                [[dataset_id, e["id"], e["question"], e["answer"], e["contexts"],
                  e["split"], json.dumps(e.get("meta") or {})] for e in examples],
            )

    def list_datasets(self) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM datasets ORDER BY created_at DESC")

    def dataset_split(self, dataset_id: str) -> SplitSetting | None:
        rows = self.query("SELECT split_seed, eval_fraction FROM datasets WHERE id = ?", [dataset_id])
        return SplitSetting(rows[0]["split_seed"], rows[0]["eval_fraction"]) if rows else None

    def eval_split(self, dataset_id: str) -> list[QAExample] | None:
        """The recorded eval examples of a dataset; None when the dataset was never recorded."""
        if self.dataset_split(dataset_id) is None:
            return None
        rows = self.query("SELECT id, question, answer, contexts FROM examples WHERE "
                          "dataset_id = ? AND split = 'eval' ORDER BY id", [dataset_id])
        return [QAExample(r["id"], r["question"], r["answer"] or "", list(r["contexts"] or []))
                for r in rows]

    # -- pipelines ----------------------------------------------------------------------------
    def save_pipeline(self, name: str, spec: dict[str, Any], haystack_yaml: str | None) -> None:
        self.execute(
            "INSERT INTO pipelines (name, spec, haystack_yaml, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET spec = excluded.spec, "
            "haystack_yaml = excluded.haystack_yaml, updated_at = excluded.updated_at",
            [name, json.dumps(spec), haystack_yaml, now()])

    def delete_pipeline(self, name: str) -> None:
        self.execute("DELETE FROM pipelines WHERE name = ?", [name])

    # -- adapters ---------------------------------------------------------------------------
    def list_adapters(self) -> list[AdapterRecord]:
        rows = self.query("SELECT * FROM adapters ORDER BY created_at DESC")
        return [AdapterRecord.from_row(r) for r in rows]

    def upsert_adapter(self, name: str, base_model: str, path: str, spec: dict | None = None,
                       metrics: dict | None = None, job_id: str | None = None) -> None:
        self.execute(
            "INSERT INTO adapters (name, base_model, path, spec, metrics, job_id, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
            "base_model = excluded.base_model, path = excluded.path, spec = excluded.spec, "
            "metrics = excluded.metrics, job_id = excluded.job_id",
            [name, base_model, path, json.dumps(spec), json.dumps(metrics), job_id, now()],
        )

    def rename_adapter(self, old: str, new: str, path: str) -> None:
        self.execute("UPDATE adapters SET name = ?, path = ? WHERE name = ?", [new, path, old])

    def delete_adapter(self, name: str) -> None:
        self.execute("DELETE FROM adapters WHERE name = ?", [name])
