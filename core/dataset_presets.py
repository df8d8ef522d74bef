"""The three study datasets: where they live on the hub and how their native rows become QAExamples.

The shipped samples under data/samples use the same columns as the hub copies, so one parse
function serves both. Parsers take rows as plain dicts (what iterating a `datasets.Dataset` gives)
and raise KeyError/TypeError/ValueError on a foreign layout; core.datasets turns those into
DatasetError with the source named.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from core.schema import Passage, QAExample

Rows = Iterable[dict[str, Any]]


class Parsed(NamedTuple):
    examples: list[QAExample]
    corpus: list[Passage]
    skipped: int  # source rows that could not become an example (no usable answer)


@dataclass(frozen=True)
class PresetPart:
    """One table of a preset: a hub (config, split) and its shipped sample file."""

    config: str | None
    split: str
    sample: str  # path relative to config.SAMPLES_DIR
    columns: tuple[str, ...]  # columns the parser needs; checked before parsing


@dataclass(frozen=True)
class Preset:
    name: str
    label: str
    hub_id: str
    description: str
    parts: Mapping[str, PresetPart]  # key -> the rows handed to parse under that key
    parse: Callable[[dict[str, Rows]], Parsed]


def _id_list(value: Any) -> list[str]:
    # The hub copy of BioASQ stores some id lists as the string "[1, 2]".
    if isinstance(value, str):
        value = json.loads(value) if value.strip() else []
    return [str(item) for item in value or []]


def parse_bioasq(parts: dict[str, Rows]) -> Parsed:
    corpus: list[Passage] = []
    text_by_id: dict[str, str] = {}
    for row in parts["text-corpus"]:
        text, pid = row["passage"], str(row["id"])
        if not text or not str(text).strip() or pid in text_by_id:
            continue  # the hub copy has null passages
        text_by_id[pid] = str(text)
        corpus.append(Passage(id=pid, text=str(text)))
    examples: list[QAExample] = []
    skipped = 0
    for row in parts["question-answer-passages"]:
        question, answer = str(row["question"] or "").strip(), str(row["answer"] or "").strip()
        if not question or not answer:
            skipped += 1
            continue
        ids = _id_list(row["relevant_passage_ids"])
        contexts = [text_by_id[pid] for pid in ids if pid in text_by_id]
        meta = {"relevant_passage_ids": ids, "missing_passages": len(ids) - len(contexts)}
        examples.append(QAExample(str(row["id"]), question, answer, contexts, meta))
    return Parsed(examples, corpus, skipped)


def _records(value: Any) -> list[dict[str, Any]]:
    """HF stores a sequence of dicts as a dict of lists; raw JSON has a list of dicts. Accept both."""
    if isinstance(value, dict):
        keys = list(value)
        return [dict(zip(keys, items)) for items in zip(*(value[k] for k in keys))]
    return list(value or [])


def _qasper_answer(answers: Any) -> tuple[str, list[str]] | None:
    """The first answerable annotator answer and its evidence, or None if all are unanswerable."""
    annotator_answers = answers["answer"] if isinstance(answers, dict) else [a["answer"] for a in answers]
    for ans in annotator_answers:
        if ans.get("unanswerable"):
            continue
        spans = [s for s in ans.get("extractive_spans") or [] if s and s.strip()]
        yes_no = ans.get("yes_no")
        if (ans.get("free_form_answer") or "").strip():
            text = ans["free_form_answer"].strip()
        elif spans:
            text = "; ".join(s.strip() for s in spans)
        elif yes_no is not None:
            text = "Yes" if yes_no else "No"
        else:
            continue
        evidence = list(dict.fromkeys(e for e in ans.get("evidence") or [] if e and e.strip()))
        return text, evidence
    return None


def parse_qasper(parts: dict[str, Rows]) -> Parsed:
    examples: list[QAExample] = []
    corpus: list[Passage] = []
    skipped = 0
    for paper in parts["papers"]:
        paper_id, title = str(paper["id"]), paper.get("title") or ""
        for si, section in enumerate(_records(paper["full_text"])):
            for pi, paragraph in enumerate(section["paragraphs"] or []):
                if paragraph and paragraph.strip():
                    corpus.append(Passage(
                        id=f"{paper_id}:{si}:{pi}", text=paragraph,
                        title=f"{title} / {section['section_name']}", meta={"paper_id": paper_id}))
        for qa in _records(paper["qas"]):
            found = _qasper_answer(qa["answers"])
            if found is None or not (qa["question"] or "").strip():
                skipped += 1
                continue
            answer, evidence = found
            meta = {"paper_id": paper_id, "title": title}
            examples.append(QAExample(str(qa["question_id"]), qa["question"].strip(), answer, evidence, meta))
    return Parsed(examples, corpus, skipped)


def parse_nq(parts: dict[str, Rows]) -> Parsed:
    examples: list[QAExample] = []
    corpus: list[Passage] = []
    seen_passages: set[str] = set()
    skipped = 0
    for row in parts["questions"]:
        answers = [str(a).strip() for a in row["answers"] or [] if str(a).strip()]
        question, text = str(row["question"] or "").strip(), str(row["text"] or "")
        if not question or not answers:
            skipped += 1
            continue
        passage_id = str(row["idx_gold_in_corpus"])
        if text.strip() and passage_id not in seen_passages:
            seen_passages.add(passage_id)
            corpus.append(Passage(id=passage_id, text=text))
        contexts = [text] if text.strip() else []
        meta = {"answers": answers, "passage_id": passage_id}
        examples.append(QAExample(str(row["example_id"]), question, answers[0], contexts, meta))
    return Parsed(examples, corpus, skipped)


PRESETS: dict[str, Preset] = {
    "bioasq": Preset(
        name="bioasq", label="BioASQ", hub_id="rag-datasets/rag-mini-bioasq",
        description="Biomedical questions with PubMed abstracts as passages.",
        parts={
            "question-answer-passages": PresetPart(
                "question-answer-passages", "test", "bioasq/question-answer-passages/test.jsonl",
                ("question", "answer", "id", "relevant_passage_ids")),
            "text-corpus": PresetPart(
                "text-corpus", "passages", "bioasq/text-corpus/passages.jsonl", ("passage", "id")),
        },
        parse=parse_bioasq),
    "qasper": Preset(
        name="qasper", label="Qasper", hub_id="allenai/qasper",
        description="Questions about NLP papers; the papers' paragraphs are the corpus.",
        parts={"papers": PresetPart(
            None, "train", "qasper/train.jsonl", ("id", "title", "full_text", "qas"))},
        parse=parse_qasper),
    "nq": Preset(
        name="nq", label="Natural Questions", hub_id="florin-hf/nq_open_gold",
        description="Open-domain questions with the gold Wikipedia passage.",
        parts={"questions": PresetPart(
            None, "test", "nq/test.jsonl",
            ("example_id", "question", "answers", "text", "idx_gold_in_corpus"))},
        parse=parse_nq),
}
