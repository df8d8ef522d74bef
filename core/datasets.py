"""Datasets as QAExamples plus a corpus: study presets (sample or hub), any hub id, uploaded files.

Every problem a user can cause (bad file, unknown column, unreachable hub) raises DatasetError with a
sentence that says what is wrong and what to do; nothing here shows a stack trace for those.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal

from core import config
from core.names import check_hub_id
from core.dataset_presets import PRESETS, Parsed, Preset, PresetPart
from core.schema import Passage, QAExample, split_of
from core.textfiles import decode_text

__all__ = ["DatasetError", "ColumnMapping", "QADataset", "PRESETS", "Preset", "load_preset", "load_hub",
           "load_upload", "UPLOAD_EXTENSIONS"]

UPLOAD_EXTENSIONS = (".jsonl", ".ndjson", ".json", ".csv", ".parquet")
_PREVIEW_CHARS = 200


class DatasetError(ValueError):
    """A dataset problem the user can fix; the message is a sentence meant for them."""


@dataclass
class ColumnMapping:
    """Which columns of a hub dataset or upload hold the question, answer, gold passages and id."""

    question: str = "question"
    answer: str = "answer"
    contexts: str | None = None  # a str or list[str] of gold passages per row
    id: str | None = None  # else a stable hash of the question text

    def columns(self) -> list[str]:
        return [c for c in (self.question, self.answer, self.contexts, self.id) if c]


@dataclass
class QADataset:
    name: str
    source: str  # "sample:bioasq", "hub:rag-datasets/rag-mini-bioasq", "upload:file.csv"
    examples: list[QAExample]
    corpus: list[Passage]
    skipped: int = 0  # rows without a usable question or answer
    duplicates: int = 0  # rows dropped because their id or question text was already seen

    def split(self, seed: int = 0, eval_fraction: float = 0.3) -> tuple[list[QAExample], list[QAExample]]:
        """(train, eval); each example's side depends only on its id, never on the others."""
        _check_fraction(eval_fraction)
        train: list[QAExample] = []
        evaluation: list[QAExample] = []
        for ex in self.examples:
            (evaluation if split_of(ex.id, seed, eval_fraction) == "eval" else train).append(ex)
        return train, evaluation

    def split_counts(self, seed: int = 0, eval_fraction: float = 0.3) -> dict[str, int]:
        train, evaluation = self.split(seed, eval_fraction)
        return {"train": len(train), "eval": len(evaluation)}

    def preview(self, n: int = 20, seed: int = 0, eval_fraction: float = 0.3) -> list[dict]:
        """Rows for a UI table, long texts shortened."""
        _check_fraction(eval_fraction)
        return [{"id": ex.id, "question": _shorten(ex.question), "answer": _shorten(ex.answer),
                 "n_contexts": len(ex.contexts), "split": split_of(ex.id, seed, eval_fraction)}
                for ex in self.examples[:n]]


def _check_fraction(eval_fraction: float) -> None:
    if not 0.0 <= eval_fraction <= 1.0:
        raise DatasetError(f"The eval fraction must be between 0 and 1, not {eval_fraction}.")


def _shorten(text: str) -> str:
    return text if len(text) <= _PREVIEW_CHARS else text[: _PREVIEW_CHARS - 1] + "…"


def _check_limit(limit: int | None) -> None:
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise DatasetError(f"The example limit must be a positive whole number, not {limit!r}.")


def _dedupe(examples: list[QAExample]) -> tuple[list[QAExample], int]:
    """Keep the first example per id and per question text; return (kept, number dropped)."""
    # A question repeated under two ids could land in both splits; keeping the first copy stops
    # an eval question from leaking into training.
    kept: list[QAExample] = []
    seen: set[str] = set()
    for ex in examples:
        keys = {f"id:{ex.id}", "q:" + " ".join(ex.question.lower().split())}
        if not keys & seen:
            seen |= keys
            kept.append(ex)
    return kept, len(examples) - len(kept)


def _finish(name: str, source: str, examples: list[QAExample], corpus: list[Passage], skipped: int,
            limit: int | None) -> QADataset:
    unique, duplicates = _dedupe(examples)
    if not unique:
        raise DatasetError(f"{source} has no usable examples: every row lacks a question or an answer.")
    return QADataset(name, source, unique[:limit], corpus, skipped=skipped, duplicates=duplicates)


# ---------------------------------------------------------------- presets and the hub

def load_preset(name: str, source: Literal["sample", "hub"] = "sample",
                limit: int | None = None) -> QADataset:
    """A study dataset from its shipped sample (offline) or from the Hugging Face Hub."""
    preset = PRESETS.get(name)
    if preset is None:
        raise DatasetError(f"Unknown dataset preset '{name}'; choose one of: {', '.join(PRESETS)}.")
    if source not in ("sample", "hub"):
        raise DatasetError(f"A preset is loaded from 'sample' or 'hub', not '{source}'.")
    _check_limit(limit)
    origin = f"{source}:{preset.name}" if source == "sample" else f"hub:{preset.hub_id}"
    parts = {key: _preset_rows(preset, part, source) for key, part in preset.parts.items()}
    try:
        parsed: Parsed = preset.parse(parts)
    except (KeyError, TypeError, ValueError) as exc:
        raise DatasetError(f"{origin} is not in the {preset.label} layout this app reads ({exc!r}).") from exc
    return _finish(preset.name, origin, parsed.examples, parsed.corpus, parsed.skipped, limit)


def _preset_rows(preset: Preset, part: PresetPart, source: str) -> Any:
    if source == "sample":
        dataset, where = _sample_dataset(preset, part), f"The {preset.label} sample file {part.sample}"
    else:
        hint = f"The shipped sample of {preset.label} is available: load the preset with source 'sample'."
        dataset, where = _hub_dataset(preset.hub_id, part.config, part.split, hint), f"{preset.hub_id}"
    missing = [c for c in part.columns if c not in dataset.column_names]
    if missing:
        raise DatasetError(f"{where} lacks column(s) {', '.join(missing)}; "
                           f"it has: {', '.join(dataset.column_names)}.")
    return dataset


def _sample_dataset(preset: Preset, part: PresetPart) -> Any:
    import datasets  # heavy import; only the loaders need it

    path = Path(config.SAMPLES_DIR) / part.sample
    if not path.is_file():
        raise DatasetError(f"The shipped sample of {preset.label} is missing ({path}); "
                           "reinstall the app or load the preset from the hub.")
    try:
        return datasets.load_dataset("json", data_files=str(path), split="train",
                                     cache_dir=str(config.subdir("hf_datasets")))
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as exc:
        raise DatasetError(f"The shipped sample of {preset.label} ({path.name}) could not be read: "
                           f"{exc}") from exc


def load_hub(hub_id: str, mapping: ColumnMapping, config: str | None = None, split: str = "train",
             limit: int | None = None) -> QADataset:
    """Any hub dataset, its columns named by `mapping`; the corpus is the unique contexts."""
    hub_id = check_hub_id(hub_id, "Dataset id", DatasetError)
    _refuse_local_folder(hub_id)
    _check_limit(limit)
    dataset = _hub_dataset(hub_id, config, split, "Check the id, or download the file and upload it.")
    return _from_rows(hub_id, f"hub:{hub_id}", dataset, list(dataset.column_names), mapping, limit)


def _refuse_local_folder(hub_id: str) -> None:
    """`datasets` reads a local folder of that name first: a visitor must not get server files."""
    if config.PUBLIC_MODE and Path(hub_id).exists():
        raise DatasetError(f"'{hub_id}' also names a folder on this server; this public server "
                           "loads datasets from the Hugging Face Hub only.")


def _hub_dataset(hub_id: str, config_name: str | None, split: str, hint: str) -> Any:
    import datasets
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        try:
            return datasets.load_dataset(hub_id, config_name, split=split)
        except RuntimeError as exc:
            if "scripts are no longer supported" not in str(exc):
                raise
            # Script-based datasets still have the hub's automatic Parquet conversion.
            return datasets.load_dataset(hub_id, config_name, split=split, revision="refs/convert/parquet")
    except (ConnectionError, TimeoutError, LocalEntryNotFoundError) as exc:
        raise DatasetError(f"The Hugging Face Hub could not be reached to load '{hub_id}' "
                           f"(offline?). {hint}") from exc
    except datasets.exceptions.DatasetNotFoundError as exc:
        raise DatasetError(f"'{hub_id}' was not found on the Hugging Face Hub, is private, or the hub "
                           f"could not be reached. {hint}") from exc
    except (OSError, ValueError, RuntimeError, datasets.exceptions.DatasetsError) as exc:
        raise DatasetError(f"'{hub_id}' (config {config_name or 'default'}, split {split}) could not be "
                           f"loaded from the hub: {exc}. {hint}") from exc


# ---------------------------------------------------------------- rows -> examples

def _from_rows(name: str, source: str, rows: Iterable[dict], columns: list[str], mapping: ColumnMapping,
               limit: int | None = None) -> QADataset:
    missing = [c for c in mapping.columns() if c not in columns]
    if missing:
        raise DatasetError(f"Missing column(s) {', '.join(repr(c) for c in missing)}; "
                           f"the data has: {', '.join(repr(c) for c in columns) or 'no columns'}.")
    examples: list[QAExample] = []
    skipped = 0
    for row in rows:
        example = _example(row, mapping)
        if example is None:
            skipped += 1
        else:
            examples.append(example)
    corpus = {text: Passage(id=_digest("p", text), text=text) for ex in examples for text in ex.contexts}
    return _finish(name, source, examples, list(corpus.values()), skipped, limit)


def _example(row: dict, mapping: ColumnMapping) -> QAExample | None:
    question = _text(row.get(mapping.question))
    answers = _answers(row.get(mapping.answer))
    example_id = _text(row.get(mapping.id)) if mapping.id else _digest("q", question)
    if not question or not answers or not example_id:
        return None
    contexts = _contexts(row.get(mapping.contexts)) if mapping.contexts else []
    meta = {"answers": answers} if len(answers) > 1 else {}
    return QAExample(example_id, question, answers[0], contexts, meta)


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _answers(value: Any) -> list[str]:
    """Answer cells: a string, a list of acceptable answers, or SQuAD's {"text": [...]}."""
    if isinstance(value, dict) and "text" in value:
        value = value["text"]
    if isinstance(value, (list, tuple)):
        return [t for t in (_text(v) for v in value) if t]
    return [t for t in [_text(value)] if t]


def _contexts(value: Any) -> list[str]:
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:  # CSV cells carry lists as JSON
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    items = value if isinstance(value, (list, tuple)) else [value]
    return list(dict.fromkeys(t for t in (_text(v) for v in items) if t))


def _digest(prefix: str, text: str) -> str:
    return prefix + hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------- uploads

def load_upload(path: str | Path, mapping: ColumnMapping | None = None) -> QADataset:
    """A .jsonl/.json/.csv/.parquet file. Without a mapping, the columns question and answer are
    read, plus contexts (or context) and id when the file has them."""
    path = Path(path)
    rows, columns = _read_rows(path)
    if mapping is None:
        mapping = ColumnMapping(contexts=next((c for c in ("contexts", "context") if c in columns), None),
                                id="id" if "id" in columns else None)
    return _from_rows(path.stem, f"upload:{path.name}", rows, columns, mapping)


def _read_rows(path: Path) -> tuple[list[dict], list[str]]:
    """Checks run cheapest first, and the size check runs before anything is read."""
    name = path.name
    if not path.is_file():
        raise DatasetError(f"The file {name} was not found; upload it again.")
    size = path.stat().st_size
    if size > config.MAX_UPLOAD_BYTES:
        raise DatasetError(f"{name} is {size / 2**20:.1f} MB, over the upload limit of "
                           f"{config.MAX_UPLOAD_BYTES / 2**20:.1f} MB (the MAX_UPLOAD_MB setting).")
    if size == 0:
        raise DatasetError(f"{name} is empty.")
    data = path.read_bytes()
    ext = path.suffix.lower()
    text = ""
    if ext != ".parquet":
        text = decode_text(data, name, DatasetError)
        if not text.strip():
            raise DatasetError(f"{name} is empty (only whitespace).")
    if ext not in UPLOAD_EXTENSIONS:
        raise DatasetError(f"{name}: files ending in '{ext or '(none)'}' are not supported; "
                           f"upload one of: {', '.join(UPLOAD_EXTENSIONS)}.")
    if ext == ".parquet":
        rows, columns = _parquet_rows(data, name)
    elif ext == ".csv":
        rows, columns = _csv_rows(text, name)
    else:
        rows = _json_rows(text, name) if ext == ".json" else _jsonl_rows(text, name)
        columns = list(dict.fromkeys(key for row in rows for key in row))
    if not rows:
        raise DatasetError(f"{name} has no rows.")
    return rows, columns



def _jsonl_rows(text: str, name: str) -> list[dict]:
    rows = []
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other line separators.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{name}: line {number} is not valid JSON ({exc.msg}).") from exc
        if not isinstance(row, dict):
            raise DatasetError(f"{name}: line {number} is a JSON {type(row).__name__}, not an object.")
        rows.append(row)
    return rows


def _json_rows(text: str, name: str) -> list[dict]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # several JSON objects, one a line: JSON Lines named .json
            return _jsonl_rows(text, name)
        raise DatasetError(f"{name} is not valid JSON: {exc.msg} on line {exc.lineno}, "
                           f"column {exc.colno}.") from exc
    if isinstance(data, dict):  # {"data": [...]}: take the one list of objects inside
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else data
    if not isinstance(data, list):
        raise DatasetError(f"{name} must hold a list of objects (one per question).")
    for number, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            raise DatasetError(f"{name}: item {number} is a JSON {type(row).__name__}, not an object.")
    return data


def _csv_rows(text: str, name: str) -> tuple[list[dict], list[str]]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows: list[dict] = []
    try:
        header = [h.strip() for h in next((r for r in reader if any(c.strip() for c in r)), [])]
        for cells in reader:
            if not any(c.strip() for c in cells):
                continue
            if len(cells) != len(header):
                raise DatasetError(f"{name}: line {reader.line_num} has {len(cells)} fields but the "
                                   f"header has {len(header)}; check quotes and commas.")
            rows.append(dict(zip(header, cells)))
    except csv.Error as exc:
        raise DatasetError(f"{name} is not valid CSV near line {reader.line_num}: {exc}.") from exc
    return rows, header


def _parquet_rows(data: bytes, name: str) -> tuple[list[dict], list[str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError) as exc:
        raise DatasetError(f"{name} is not a readable Parquet file ({exc}).") from exc
    return table.to_pylist(), list(table.column_names)
