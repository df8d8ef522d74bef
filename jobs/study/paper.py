"""The study's published figures (Barnett et al. 2024, "Fine-Tuning or Fine-Failing? Debunking
Performance Myths in Large Language Models", arXiv 2406.11201), shown beside a user's own result.

Only figures this project could source are listed; each says where it comes from. The paper's
comparison is base vs fine-tuned inside the same RAG pipeline, judged by G-Eval on a 1-5 scale,
so every figure here is "with RAG". A figure whose dataset the source does not name is shown as a
reference only, never matched to a user's dataset.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jobs.study.spec import preset_of

# Where the numbers below come from: the project's issue 11 and docs DESIGN.md ("What it is for"),
# both quoting the paper's figures. The paper's own tables could not be read offline here (the
# reference corpora searched on 2026-12-02 held no copy), so no other cell is listed.
SOURCE = "Barnett et al. 2024, arXiv 2406.11201"


@dataclass(frozen=True)
class Published:
    model: str
    dataset: str | None  # a preset name (core.dataset_presets), None where the source omits it
    size: int  # fine-tuning pairs
    metric: str
    base: float
    tuned: float

    @property
    def label(self) -> str:
        return f"{self.model}, {self.size} pairs: {self.metric} {self.base:.2f} -> {self.tuned:.2f}"


PUBLISHED = (
    Published("Llama-2", "qasper", 200, "accuracy", 4.38, 3.14),  # issue 11, DESIGN.md
    Published("Llama-2", "qasper", 200, "completeness", 4.55, 2.35),  # issue 11, DESIGN.md
    Published("Mixtral", None, 1000, "accuracy", 4.04, 3.28),  # issue 11, DESIGN.md; no dataset named
)


def published_for(row: dict[str, Any]) -> list[Published]:
    """The paper's figures for a fine-tuned report row's setting: the same preset dataset, size
    and metric, with RAG (the only setting the paper reports)."""
    if not row.get("adapter") or not row.get("rag"):
        return []
    preset = preset_of(row["dataset"])[0]
    return [p for p in PUBLISHED
            if (p.dataset, p.size, p.metric) == (preset, row["size"], row["metric"])]


def paper_note(row: dict[str, Any]) -> str | None:
    """"paper: Llama-2, 200 pairs: accuracy 4.38 -> 3.14" for a matched row, else None."""
    found = published_for(row)
    return "paper: " + "; ".join(p.label for p in found) if found else None


def reference_markdown() -> list[str]:
    """The published figures as a Markdown table (lines)."""
    lines = [f"## The paper's figures ({SOURCE})", "",
             "Base vs fine-tuned inside the same RAG pipeline, G-Eval 1-5.", "",
             "| model | dataset | pairs | metric | base | fine-tuned | difference |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {p.model} | {p.dataset or 'not stated'} | {p.size} | {p.metric} | {p.base:.2f} | "
              f"{p.tuned:.2f} | {p.tuned - p.base:+.2f} |" for p in PUBLISHED]
    return lines + [""]
