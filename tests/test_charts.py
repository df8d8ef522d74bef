"""The charts' specs (chart.to_dict(), what gr.Plot sends to Vega-Lite), not their pixels: grouped
bars on the metric's fixed range with interval rules, one panel per metric, the study grid without
repeated systems, an ordinal k axis, titled axes and legends, and a sentence when there is no data."""
from __future__ import annotations

import pandas as pd
import pytest

from core import charts
from core.store import Store
from core.systems import System
from jobs.evaluations import Evaluations

BASE, TUNED = "m (base) · no RAG", "ft · RAG"
SUMMARY = [
    {"system": BASE, "metric": "accuracy", "n": 5, "mean": 3.2, "ci_low": 2.1, "ci_high": 4.3,
     "score_min": 1, "score_max": 5},
    {"system": TUNED, "metric": "accuracy", "n": 5, "mean": 4.0, "ci_low": 3.5, "ci_high": 4.5,
     "score_min": 1, "score_max": 5},
    {"system": BASE, "metric": "completeness", "n": 1, "mean": 2.0, "ci_low": None,
     "ci_high": None},  # no range carried: the built-in 1-5; n = 1: no interval
    {"system": TUNED, "metric": "completeness", "n": 5, "mean": 4.8, "ci_low": 4.5, "ci_high": 5.0},
]


def units(spec: dict) -> list[dict]:
    """Every single-mark view in a spec, however nested (layer, hconcat, facet)."""
    if "mark" in spec:
        return [spec]
    children = spec.get("layer", []) + spec.get("hconcat", [])
    children += [spec["spec"]] if "spec" in spec else []
    return [u for child in children for u in units(child)]


def by_mark(spec: dict, mark: str) -> list[dict]:
    return [u for u in units(spec) if u["mark"]["type"] == mark]


def data(spec: dict) -> list[dict]:
    return [row for rows in spec["datasets"].values() for row in rows]


def test_summary_has_one_panel_per_metric_with_grouped_bars_on_the_fixed_scale():
    spec = charts.evaluation_summary(SUMMARY).to_dict()
    assert [p["title"] for p in spec["hconcat"]] == ["accuracy (1-5)", "completeness (1-5)"]
    bars = by_mark(spec, "bar")
    assert len(bars) == 2
    for bar in bars:
        y = bar["encoding"]["y"]
        assert y["stack"] is None and y["field"] == "mean"
        assert y["scale"]["domain"] == [1, 5] and y["axis"]["values"] == [1, 2, 3, 4, 5]
        assert bar["encoding"]["y2"] == {"datum": 1}  # bars start at the lowest score, not 0
        x = bar["encoding"]["x"]
        assert x["field"] == "system" and x["title"].startswith("system") and x["sort"] == [BASE, TUNED]
        assert bar["encoding"]["color"]["title"] == "system"
        assert y["title"].startswith("mean ")
        tips = {t["field"]: t["title"] for t in bar["encoding"]["tooltip"]}
        assert tips["n"] == "n items" and tips["interval"] == "95% interval"


def test_summary_interval_rules_are_bound_to_ci_low_and_ci_high_and_skip_n_below_2():
    spec = charts.evaluation_summary(SUMMARY).to_dict()
    rules = by_mark(spec, "rule")
    assert len(rules) == 2
    for rule in rules:
        assert rule["encoding"]["y"]["field"] == "ci_low"
        assert rule["encoding"]["y2"]["field"] == "ci_high"
        assert rule["transform"] == [{"filter": "isValid(datum.ci_low) && isValid(datum.ci_high)"}]
    intervals = {(r["system"], r["metric"]): r["interval"] for r in data(spec)}
    assert intervals[(BASE, "completeness")] == "none (n < 2)"
    assert intervals[(BASE, "accuracy")] == "2.10 to 4.30"


def test_a_user_metric_keeps_its_own_range():
    rows = [{"system": BASE, "metric": "faithfulness", "n": 3, "mean": 6.0, "ci_low": 5.0,
             "ci_high": 7.0, "score_min": 0, "score_max": 9}, SUMMARY[0]]
    spec = charts.evaluation_summary(rows).to_dict()
    domains = [b["encoding"]["y"]["scale"]["domain"] for b in by_mark(spec, "bar")]
    assert domains == [[0, 9], [1, 5]]
    assert spec["resolve"]["scale"]["y"] == "independent"


@pytest.mark.parametrize("draw, message", [
    (lambda: charts.evaluation_summary([]), charts.EMPTY_EVALUATION),
    (lambda: charts.evaluation_summary([{**SUMMARY[0], "mean": None}]), charts.EMPTY_EVALUATION),
    (lambda: charts.study([]), charts.EMPTY_STUDY),
    (lambda: charts.retrieval_quality(pd.DataFrame()), charts.EMPTY_QUALITY),
    (lambda: charts.loss(pd.DataFrame(columns=["step", "loss", "curve"])), charts.EMPTY_LOSS),
])
def test_no_data_shows_what_to_do(draw, message):
    spec = draw().to_dict()
    assert spec["mark"]["type"] == "text" and spec["encoding"]["text"]["field"] == "message"
    assert [r["message"].replace("\n", " ") for r in data(spec)] == [message]
    assert spec["mark"]["lineBreak"] == "\n"
    assert "Run an evaluation to see scores here" in charts.EMPTY_EVALUATION


def study_row(dataset, n_train, system, rag, metric, mean, run="r1"):
    return {"dataset": dataset, "n_train": n_train, "system": system, "rag": rag, "metric": metric,
            "mean": mean, "ci_low": mean - 0.5, "ci_high": mean + 0.5, "n": 5, "score_min": 1,
            "score_max": 5, "run": run}


def test_study_is_a_grid_of_datasets_by_training_size_with_base_beside_each_adapter():
    rows = [study_row("nq", 0, "base", False, "accuracy", 3.0),
            study_row("nq", 0, "base", True, "accuracy", 3.5),
            study_row("nq", 200, "fine-tuned", False, "accuracy", 3.2),
            study_row("nq", 500, "fine-tuned", True, "accuracy", 3.9),
            study_row("nq", None, "fine-tuned", False, "accuracy", 2.0),  # imported, size unknown
            study_row("bioasq", 0, "base", False, "accuracy", 2.5)]
    spec = charts.study(rows).to_dict()
    assert spec["facet"]["row"]["field"] == "dataset" and spec["facet"]["row"]["title"] == "dataset"
    column = spec["facet"]["column"]
    assert column["title"] == "training-set size"
    assert column["sort"] == ["n_train 200", "n_train 500", "n_train ?", "base only"]
    bar, = by_mark(spec["spec"], "bar")
    enc = bar["encoding"]
    assert enc["y"]["stack"] is None and enc["y"]["scale"]["domain"] == [1, 5]
    assert enc["xOffset"]["field"] == "setup" and enc["color"]["field"] == "setup"
    assert enc["color"]["title"] == "system" and enc["x"]["title"] == "metric"
    assert enc["color"]["scale"]["domain"] == charts.SETUPS  # RAG or not: its own colour
    rule, = by_mark(spec["spec"], "rule")
    assert (rule["encoding"]["y"]["field"], rule["encoding"]["y2"]["field"]) == ("ci_low", "ci_high")
    cells = [(r["dataset"], r["column"], r["setup"], r["metric"]) for r in data(spec)]
    assert len(cells) == len(set(cells))  # no system twice in a cell
    nq = {(c, s) for d, c, s, _ in cells if d == "nq"}
    for size in ("n_train 200", "n_train 500", "n_train ?"):
        assert {(size, "base"), (size, "base + RAG")} <= nq
    assert {c for d, c, _, _ in cells if d == "bioasq"} == {"base only"}


def test_retrieval_quality_has_an_ordinal_k_axis_and_labelled_metrics():
    table = pd.DataFrame([{"k": k, "recall": 0.5, "hit_rate": 0.6, "mrr": 0.4, "n": 9, "skipped": 0}
                          for k in (1, 3, 5, 10)])
    spec = charts.retrieval_quality(table).to_dict()
    enc = spec["encoding"]
    assert enc["x"]["field"] == "k" and enc["x"]["type"] == "ordinal"
    assert enc["x"]["title"] == "k (passages retrieved)"
    assert enc["y"]["scale"]["domain"] == [0, 1] and enc["y"]["title"] == "score"
    assert enc["color"]["title"] == "metric"
    assert sorted({r["metric"] for r in data(spec)}) == ["MRR@k", "hit rate@k", "recall@k"]
    assert sorted({r["k"] for r in data(spec)}) == [1, 3, 5, 10]


def test_loss_chart_titles():
    frame = pd.DataFrame([{"step": 1, "loss": 2.0, "curve": "train"},
                          {"step": 2, "loss": 1.7, "curve": "validation"}])
    enc = charts.loss(frame).to_dict()["encoding"]
    assert enc["x"]["title"] == "step" and enc["x"]["axis"]["tickMinStep"] == 1
    assert enc["y"]["title"] == "loss on answer tokens"
    assert enc["color"]["title"] == "curve"


def test_study_rows_keep_the_newest_run_per_system_with_ranges(tmp_path):
    """Two runs score the same base and adapter: the study shows each once, from the newer run,
    with its interval and the metric's range (a user metric's own)."""
    store = Store(tmp_path / "lab.duckdb")
    base, tuned = System(model="m"), System(model="m", adapter="ft", rag=True, pipeline="p")
    systems = [{**s.fields(), "id": s.id} for s in (base, tuned)]
    metrics = ["accuracy", {"name": "faithful", "criteria": "c", "score_min": 0, "score_max": 9}]
    old, new = "evaluate-20260101-120000-aaaaaa", "evaluate-20260201-120000-bbbbbb"
    for run_id, score, created in ((old, 2.0, "2026-01-01"), (new, 4.0, "2026-02-01")):
        store.create_eval_run(run_id, None, "new-run" if run_id == new else "", "sample:nq",
                              {"systems": systems, "metrics": metrics})
        store.execute("UPDATE eval_runs SET created_at = ? WHERE id = ?", [created, run_id])
        for system, metric in ((s, m) for s in (base, tuned) for m in ("accuracy", "faithful")):
            for example, bump in (("q1", 0.0), ("q2", 1.0)):
                store.save_judgment(run_id, example, system.id, 0, {
                    "metric": metric, "method": "logprobs", "judge": "j", "prompt_hash": None,
                    "raw": None, "parsed_scores": None, "distribution": None,
                    "score": score + bump, "parse_failures": 0, "reasoning": None, "mass": None})
    store.upsert_adapter("ft", "m", str(tmp_path / "ft"), metrics={"n_train": 200})
    evaluations = Evaluations(store, None, None, adapter_rows=store.list_adapters)
    rows = evaluations.study_rows()
    keys = [(r["n_train"], r["system"], r["rag"], r["metric"]) for r in rows]
    assert sorted(keys, key=str) == sorted([(0, "base", False, "accuracy"),
                                            (0, "base", False, "faithful"),
                                            (200, "fine-tuned", True, "accuracy"),
                                            (200, "fine-tuned", True, "faithful")], key=str)
    assert {r["run"] for r in rows} == {"new-run"} and {r["mean"] for r in rows} == {4.5}
    assert all(r["n"] == 2 and r["ci_low"] < 4.5 < r["ci_high"] for r in rows)
    ranges = {r["metric"]: (r["score_min"], r["score_max"]) for r in rows}
    assert ranges == {"accuracy": (1, 5), "faithful": (0, 9)}
    summary = evaluations.summary(new, n_boot=10)
    assert {(r["metric"], r["score_min"], r["score_max"]) for r in summary} == {
        ("accuracy", 1, 5), ("faithful", 0, 9)}
    store.close()
