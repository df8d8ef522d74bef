"""The tabs' tables shaped for a 1280 px screen: pure pandas, no Gradio.

Each table keeps the columns a person reads first at the left (what was measured, then the number
that answers the question), shows scores to 2 decimals (1-5 scales: a third decimal is noise next to
a 95% interval), writes an interval as one "low to high" cell instead of two columns, and drops
columns that are empty in every row (a corpus without titles has no title column)."""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import pandas as pd

CHUNK_COLUMNS = ["rank", "score", "passage_id", "title", "text"]
SUMMARY_COLUMNS = ["system", "metric", "n", "mean", "95% CI", "diff", "diff 95% CI", "vs",
                   "std", "parse failures"]
ITEM_COLUMNS = ["system", "metric", "score", "answer", "reference", "question", "example_id"]
RUN_COMPARE_COLUMNS = ["system", "metric", "mean A", "mean B", "diff (B − A)", "diff 95% CI",
                       "n paired"]
RUN_SYSTEMS_COLUMNS = ["run", "system", "metrics"]
PREVIEW_COLUMNS = ["split", "question", "answer", "n_contexts", "id"]
SCORE_DECIMALS = 2


def drop_empty(df: pd.DataFrame, keep: Iterable[str] = ()) -> pd.DataFrame:
    """`df` without the columns whose every cell is missing or blank (except `keep`)."""
    keep = set(keep)
    empty = [c for c in df.columns if c not in keep and not df.empty
             and df[c].map(lambda v: v is None or (isinstance(v, float) and pd.isna(v))
                           or (isinstance(v, str) and not v.strip())).all()]
    return df.drop(columns=empty)


def interval(low: Any, high: Any, decimals: int = SCORE_DECIMALS) -> str:
    """An interval as one cell ("" when either end is missing, e.g. n < 2)."""
    if low is None or high is None or pd.isna(low) or pd.isna(high):
        return ""
    return f"{low:.{decimals}f} to {high:.{decimals}f}"


def _round(value: Any, decimals: int = SCORE_DECIMALS) -> Any:
    return None if value is None or pd.isna(value) else round(float(value), decimals)


def chunks_table(documents) -> pd.DataFrame:
    """Retrieved chunks, best first (the RAG tab's query box and Compare's shared context);
    the title column only when some chunk has a title."""
    rows = [{"rank": i, "score": round(d.score, 3) if d.score is not None else None,
             "passage_id": d.meta.get("passage_id", ""), "title": d.meta.get("title", ""),
             "text": d.content} for i, d in enumerate(documents, start=1)]
    return drop_empty(pd.DataFrame(rows, columns=CHUNK_COLUMNS), keep=["rank", "text"])


def chunk_widths(df: pd.DataFrame) -> list[str]:
    """Column widths for chunks_table's columns: narrow numbers and ids, the text takes the rest."""
    widths = {"rank": "50px", "score": "70px", "passage_id": "120px", "title": "150px"}
    return [widths.get(c, "auto") for c in df.columns]


def summary_table(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """evaluations.summary rows: per system and metric the mean with its 95% interval, then the
    paired difference to the base system ("vs") with its bootstrap interval."""
    rows = list(rows)
    labels = {r["system_id"]: r["system"] for r in rows}
    out = [{"system": r["system"], "metric": r["metric"], "n": r["n"],
            "mean": _round(r["mean"]), "95% CI": interval(r["ci_low"], r["ci_high"]),
            "diff": _round(r.get("diff")),
            "diff 95% CI": interval(r.get("diff_ci_low"), r.get("diff_ci_high")),
            "vs": labels.get(r.get("base"), r.get("base")) if r.get("diff") is not None else "",
            "std": _round(r.get("std")), "parse failures": r.get("parse_failures")}
           for r in rows]
    return pd.DataFrame(out, columns=SUMMARY_COLUMNS)


def items_table(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """The drill-down: one row per (item, system, metric), the answer and its score first."""
    out = [{"system": r["system"], "metric": r["metric"], "score": _round(r["score"]),
            "answer": r["answer"], "reference": r["reference"], "question": r["question"],
            "example_id": r["example_id"]} for r in rows]
    return pd.DataFrame(out, columns=ITEM_COLUMNS)


def run_comparison(rows: list[Mapping[str, Any]]) -> pd.DataFrame:
    """evaluations.compare rows (run B minus run A per system and metric both runs scored)."""
    out = [{"system": r["system"], "metric": r["metric"], "mean A": _round(r["mean_a"]),
            "mean B": _round(r["mean_b"]), "diff (B − A)": _round(r["diff"]),
            "diff 95% CI": interval(r["diff_ci_low"], r["diff_ci_high"]),
            "n paired": r["n_paired"]} for r in rows]
    return pd.DataFrame(out, columns=RUN_COMPARE_COLUMNS)


def run_systems(runs: Mapping[str, Iterable[Mapping[str, Any]]]) -> pd.DataFrame:
    """What each run scored ({run label: its summary or item rows}): one row per run and system
    with the metrics it has, for when two runs have nothing in common to compare."""
    out = []
    for run, rows in runs.items():
        metrics: dict[str, list[str]] = {}
        for r in rows:
            listed = metrics.setdefault(r["system"], [])
            if r["metric"] not in listed:
                listed.append(r["metric"])
        out += [{"run": run, "system": s, "metrics": ", ".join(m)} for s, m in metrics.items()]
    return pd.DataFrame(out, columns=RUN_SYSTEMS_COLUMNS)


def preview_table(rows: list[Mapping[str, Any]]) -> pd.DataFrame:
    """A dataset's preview rows with the split and the answer before the long question."""
    return pd.DataFrame(rows, columns=PREVIEW_COLUMNS)


def rounded(df: pd.DataFrame, decimals: int = SCORE_DECIMALS) -> pd.DataFrame:
    """Float columns to `decimals` places (counts and text untouched)."""
    return df.round({c: decimals for c in df.columns if pd.api.types.is_float_dtype(df[c])})
