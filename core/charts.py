"""The app's charts as Vega-Altair specs: gr.Plot renders them in the tabs, the study report
(jobs.study.export) embeds them as PNG. Pure functions from service rows or pandas DataFrames to
charts, no SQL, no models and no Gradio, so any tab or report can draw them and tests can read
their specs (chart.to_dict()).

Every chart has titled axes and legends; scores sit on the metric's own fixed range (1-5 for the
built-in metrics; a user metric's rows carry score_min/score_max), bars start at the lowest score
and are grouped side by side, never stacked, with a rule for the 95% interval (ci_low..ci_high;
none where n < 2). A chart without data shows a sentence saying what to do instead of empty axes.
"""
from __future__ import annotations

import textwrap
from typing import Any, Iterable, Mapping

import altair as alt
import pandas as pd

from core.geval import Metric

SCORE_RANGE = (Metric.score_min, Metric.score_max)  # the built-in metrics' range (1-5)
SETUPS = ["base", "base + RAG", "fine-tuned", "fine-tuned + RAG"]
SETUP_COLORS = ["#c7ced8", "#6b7686", "#93c5fd", "#1d4ed8"]  # base: greys, fine-tuned: blues
QUALITY_METRICS = {"recall": "recall@k", "hit_rate": "hit rate@k", "mrr": "MRR@k"}
HEIGHT = 240
EMPTY_EVALUATION = "Run an evaluation to see scores here (choose a run above)."
EMPTY_STUDY = "Finish an evaluation run to see the study view here."
EMPTY_QUALITY = "Build the index, then click “Retrieval quality” to see recall and MRR by k."
EMPTY_LOSS = "Start fine-tuning (or enter a job id) to see the loss curves here."


def empty(message: str) -> alt.Chart:
    """A text mark in place of a chart: what to do to see one (wrapped to fit narrow columns)."""
    return (alt.Chart(pd.DataFrame({"message": [textwrap.fill(message, 44)]}))
            .mark_text(fontSize=14, color="gray", lineBreak="\n")
            .encode(text=alt.Text("message:N"))
            .properties(width=340, height=80)
            .configure_view(strokeWidth=0))


def evaluation_summary(rows: Iterable[Mapping[str, Any]] | pd.DataFrame) -> alt.TopLevelMixin:
    """A run's summary rows (system, metric, n, mean, ci_low, ci_high, score_min/score_max): one
    panel per metric, one bar per system, named by the colour legend."""
    df = _scores(rows)
    if df.empty:
        return empty(EMPTY_EVALUATION)
    systems = list(dict.fromkeys(df["system"]))
    color = alt.Color("system:N", title="system", scale=alt.Scale(domain=systems),
                      legend=alt.Legend(orient="bottom", columns=1, labelLimit=400))
    panels = []
    for metric, part in df.groupby("metric", sort=False):
        lo, hi = _range(part)
        base = alt.Chart(part).encode(
            # System labels are long ("model (base) · RAG pipeline"): they overlap under
            # narrow bars, so the colour legend below names each bar and the axis shows none.
            x=alt.X("system:N", sort=systems, title="system (colour: see legend)",
                    axis=alt.Axis(labels=False, ticks=False)),
            tooltip=_tooltip("system"))
        panels.append(_bars_with_interval(base, lo, hi, f"mean {metric}", color).properties(
            title=f"{metric} ({lo}-{hi})", width=max(160, 90 * len(systems)), height=HEIGHT))
    return alt.hconcat(*panels).resolve_scale(y="independent", color="shared")


def study(rows: Iterable[Mapping[str, Any]] | pd.DataFrame) -> alt.TopLevelMixin:
    """jobs.evaluations.Evaluations.study_rows as small multiples: a row per dataset, a column per
    training-set size; in each cell the metrics on x and, side by side for each, base, base + RAG,
    fine-tuned and fine-tuned + RAG. The study rows hold one row per (dataset, size, system, RAG,
    metric), the newest run's, so no system repeats in a cell. The base model is drawn in every
    size column of its dataset, next to the adapters it is compared with; a dataset without
    adapters gets a "base only" column, an adapter of unknown size an "n_train ?" one. One axis
    for all cells: the widest score range."""
    df = _scores(rows)
    if df.empty:
        return empty(EMPTY_STUDY)
    df["setup"] = df["system"] + df["rag"].map({True: " + RAG", False: ""})
    df = _spread_base(df)
    order = [_size(n) for n in _sizes(df)] + ["base only"]
    lo, hi = int(df["score_min"].min()), int(df["score_max"].max())
    color = alt.Color("setup:N", title="system", sort=SETUPS,
                      scale=alt.Scale(domain=SETUPS, range=SETUP_COLORS),
                      legend=alt.Legend(orient="bottom"))
    base = alt.Chart().encode(x=alt.X("metric:N", title="metric", axis=alt.Axis(labelAngle=0)),
                              xOffset=alt.XOffset("setup:N", sort=SETUPS),
                              tooltip=[alt.Tooltip("run:N", title="run"), *_tooltip("setup")])
    cell = _bars_with_interval(base, lo, hi, "mean score", color).properties(width=220,
                                                                             height=180)
    return alt.layer(cell, data=df).facet(
        row=alt.Row("dataset:N", title="dataset"),
        column=alt.Column("column:N", title="training-set size", sort=order))


def retrieval_quality(table: pd.DataFrame) -> alt.TopLevelMixin:
    """The RAG tab's table (k, recall, hit_rate, mrr, ...) as lines over an ordinal k axis (the k
    measured are discrete: 1, 3, 5, 10) on a fixed 0-1 scale."""
    present = [m for m in QUALITY_METRICS if m in table.columns]
    if table.empty or not present:
        return empty(EMPTY_QUALITY)
    long = table.melt(id_vars="k", value_vars=present, var_name="metric")
    long["metric"] = long["metric"].map(QUALITY_METRICS)
    return (alt.Chart(long).mark_line(point=True).encode(
        x=alt.X("k:O", title="k (passages retrieved)", axis=alt.Axis(labelAngle=0)),
        y=alt.Y("value:Q", title="score", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("metric:N", title="metric", sort=list(QUALITY_METRICS.values()),
                        legend=alt.Legend(orient="bottom")),
        tooltip=["k:O", "metric:N", alt.Tooltip("value:Q", format=".3f")])
        .properties(width=280, height=200))


def loss(frame: pd.DataFrame) -> alt.TopLevelMixin:
    """Fine-tuning loss points (step, loss, curve: train or validation) as lines."""
    if frame.empty:
        return empty(EMPTY_LOSS)
    return (alt.Chart(frame).mark_line(point=True).encode(
        x=alt.X("step:Q", title="step", axis=alt.Axis(tickMinStep=1, format="d")),
        y=alt.Y("loss:Q", title="loss on answer tokens", scale=alt.Scale(zero=False)),
        color=alt.Color("curve:N", title="curve", sort=["train", "validation"]),
        tooltip=["curve:N", "step:Q", alt.Tooltip("loss:Q", format=".4f")])
        .properties(width=520, height=240))


def _tooltip(system: str) -> list[alt.Tooltip]:
    return [alt.Tooltip(f"{system}:N", title="system"), alt.Tooltip("metric:N", title="metric"),
            alt.Tooltip("mean:Q", title="mean", format=".2f"),
            alt.Tooltip("n:Q", title="n items"), alt.Tooltip("interval:N", title="95% interval")]


def _scores(rows: Iterable[Mapping[str, Any]] | pd.DataFrame) -> pd.DataFrame:
    """Rows with a mean, with score_min/score_max filled in (the built-in range where absent) and
    the interval as text for tooltips."""
    df = rows.copy() if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    if df.empty or "mean" not in df.columns:
        return pd.DataFrame()
    df = df[df["mean"].notna()].copy()
    for column, default in zip(("score_min", "score_max"), SCORE_RANGE):
        df[column] = df[column].fillna(default) if column in df.columns else default
    for column in ("ci_low", "ci_high"):
        df[column] = df[column].astype(float) if column in df.columns else float("nan")
    df["interval"] = [f"{a:.2f} to {b:.2f}" if pd.notna(a) and pd.notna(b) else "none (n < 2)"
                      for a, b in zip(df["ci_low"], df["ci_high"])]
    return df


def _range(df: pd.DataFrame) -> tuple[int, int]:
    return int(df["score_min"].min()), int(df["score_max"].max())


def _bars_with_interval(base: alt.Chart, lo: int, hi: int, title: str,
                        color: alt.Color) -> alt.LayerChart:
    """Bars from the lowest score up to the mean (never stacked) and a rule over the interval, on
    the fixed scale lo..hi."""
    y = alt.Y("mean:Q", title=title, stack=None,
              scale=alt.Scale(domain=[lo, hi], nice=False, zero=False),
              axis=alt.Axis(format="d", values=list(range(lo, hi + 1)) if hi - lo <= 10
                            else alt.Undefined))
    bars = base.mark_bar(clip=True).encode(y=y, y2=alt.datum(lo), color=color)
    rules = (base.mark_rule(clip=True, strokeWidth=2, color="black")
             .encode(y=alt.Y("ci_low:Q", title=title), y2="ci_high:Q")
             .transform_filter("isValid(datum.ci_low) && isValid(datum.ci_high)"))
    return alt.layer(bars, rules)


def _spread_base(df: pd.DataFrame) -> pd.DataFrame:
    """Each dataset's base rows copied into every training-set size column of that dataset."""
    parts = []
    for _, part in df.groupby("dataset", sort=False):
        tuned, base = part[part["system"] != "base"], part[part["system"] == "base"]
        parts.append(tuned.assign(column=[_size(n) for n in tuned["n_train"]]))
        parts += [base.assign(column=_size(n)) for n in _sizes(tuned)] or [
            base.assign(column="base only")]
    return pd.concat(parts, ignore_index=True)


def _sizes(df: pd.DataFrame) -> list[Any]:
    """The fine-tuned rows' training-set sizes, ascending, an unknown size (None) last."""
    sizes = set(df.loc[df["system"] != "base", "n_train"])
    known = sorted(int(n) for n in sizes if pd.notna(n))
    return known + ([None] if len(known) < len(sizes) else [])


def _size(n: Any) -> str:
    return f"n_train {int(n)}" if pd.notna(n) else "n_train ?"
