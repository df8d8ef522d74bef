"""Summary statistics of G-Eval judgments, per (system, metric).

How the numbers are made (the same for the UI, the CLI and the tests):
- an ITEM is one eval example. Its score for a (system, metric) is the mean over that item's
  repeats of the judgments that produced a score (parse failures are left out and counted);
- mean, std (sample standard deviation, ddof=1) and n are over items, so repeats never inflate n;
- the 95% confidence interval of the mean uses Student's t with n-1 degrees of freedom
  (mean +- t * std / sqrt(n)); it is None for n < 2;
- the difference to the base system is paired: over the items both systems scored,
  d_i = score(system, i) - score(base, i); its 95% interval is a percentile bootstrap over items
  (seeded numpy, 2000 resamples by default), None for fewer than 2 paired items.

Functions take rows as a list of dicts or a pandas DataFrame (e.g. from DuckDB's .df()). Rows are
keyed by `system_id` (core.systems); a `system` column, where present, is the display label.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import numpy as np

from core.systems import System, base_of

if TYPE_CHECKING:
    from core.store import Store

CONFIDENCE = 0.95
N_BOOTSTRAP = 2000


def _records(rows: Any) -> list[dict[str, Any]]:
    if hasattr(rows, "to_dict"):  # a DataFrame
        return rows.to_dict("records")
    return list(rows)


def _is_number(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def item_scores(rows: Any) -> dict[tuple[str, str], dict[str, float]]:
    """{(system_id, metric): {example_id: mean score over its repeats}}; items whose judgments all
    failed are absent."""
    sums: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for row in _records(rows):
        if _is_number(row.get("score")):
            sums[(row["system_id"], row["metric"], row["example_id"])].append(float(row["score"]))
    out: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for (system, metric, example_id), scores in sums.items():
        out[(system, metric)][example_id] = sum(scores) / len(scores)
    return dict(out)


def t_interval(values: Iterable[float], confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    from scipy import stats

    data = np.asarray(list(values), dtype=float)
    if data.size < 2:
        return None
    half = stats.t.ppf(0.5 + confidence / 2, data.size - 1) * data.std(ddof=1) / math.sqrt(data.size)
    return float(data.mean() - half), float(data.mean() + half)


def paired_bootstrap(diffs: Iterable[float], n_boot: int = N_BOOTSTRAP, seed: int = 0,
                     confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Percentile interval of the mean paired difference, resampling items with replacement."""
    data = np.asarray(list(diffs), dtype=float)
    if data.size < 2:
        return None
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(n_boot, data.size))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def default_bases(systems: list[System | Mapping[str, Any]]) -> dict[str, str]:
    """{system_id: base system_id} by core.systems.base_of: a fine-tuned system is compared with
    the base model in the same RAG setting; the first system listed has no base."""
    resolved = [s if isinstance(s, System) else System.from_fields(s) for s in systems]
    return {s.id: base.id for s in resolved if (base := base_of(s, resolved)) is not None}


def summarize(rows: Any, bases: Mapping[str, str] | str | None = None, n_boot: int = N_BOOTSTRAP,
              seed: int = 0, confidence: float = CONFIDENCE) -> list[dict[str, Any]]:
    """One dict per (system_id, metric): system (label), n, mean, std, ci_low/ci_high (t),
    judgments, parse_failures, unscored_items, and base (its system_id), diff,
    diff_ci_low/diff_ci_high, n_paired.

    `bases` maps a system_id to its base's (or one system_id for all); a system is not compared
    with itself.
    """
    records = _records(rows)
    scores = item_scores(records)
    labels = {row["system_id"]: row.get("system") or row["system_id"] for row in records}
    counts: dict[tuple[str, str], dict[str, Any]] = defaultdict(lambda: {"judgments": 0,
                                                                         "parse_failures": 0,
                                                                         "items": set()})
    for row in records:
        c = counts[(row["system_id"], row["metric"])]
        c["judgments"] += 1
        c["parse_failures"] += int(row.get("parse_failures") or 0)
        c["items"].add(row["example_id"])
    out = []
    for (system, metric), c in sorted(counts.items()):
        per_item = scores.get((system, metric), {})
        values = np.asarray(list(per_item.values()), dtype=float)
        ci = t_interval(values, confidence)
        row = {"system_id": system, "system": labels[system], "metric": metric, "n": int(values.size),
               "mean": float(values.mean()) if values.size else None,
               "std": float(values.std(ddof=1)) if values.size > 1 else None,
               "ci_low": ci[0] if ci else None, "ci_high": ci[1] if ci else None,
               "judgments": c["judgments"], "parse_failures": c["parse_failures"],
               "unscored_items": len(c["items"]) - int(values.size)}
        row.update(_paired(system, metric, per_item, scores, bases, n_boot, seed, confidence))
        out.append(row)
    return out


def _paired(system: str, metric: str, per_item: dict[str, float],
            scores: dict[tuple[str, str], dict[str, float]], bases: Mapping[str, str] | str | None,
            n_boot: int, seed: int, confidence: float) -> dict[str, Any]:
    base = bases.get(system) if isinstance(bases, Mapping) else bases
    empty = {"base": None, "diff": None, "diff_ci_low": None, "diff_ci_high": None, "n_paired": 0}
    if base is None or base == system:
        return empty
    base_items = scores.get((base, metric), {})
    common = sorted(set(per_item) & set(base_items))
    if not common:
        return {**empty, "base": base}
    diffs = [per_item[i] - base_items[i] for i in common]
    ci = paired_bootstrap(diffs, n_boot, seed, confidence)
    return {"base": base, "diff": float(np.mean(diffs)), "diff_ci_low": ci[0] if ci else None,
            "diff_ci_high": ci[1] if ci else None, "n_paired": len(common)}


def summarize_run(store: "Store", run_id: str, n_boot: int = N_BOOTSTRAP,
                  seed: int = 0) -> list[dict[str, Any]]:
    """summarize() over a stored run, each system paired with its default base."""
    run = store.get_eval_run(run_id)
    if run is None:
        raise ValueError(f"No evaluation run with id '{run_id}'.")
    systems = (run.spec or {}).get("systems", [])
    return summarize(store.eval_judgments(run_id), default_bases(systems), n_boot, seed)


def compare_runs(store: "Store", run_a: str, run_b: str, n_boot: int = N_BOOTSTRAP,
                 seed: int = 0) -> list[dict[str, Any]]:
    """Run B minus run A per (system_id, metric) present in both, paired over common items (e.g.
    the same eval set judged by two judges, or answered with two decodings)."""
    rows_a, rows_b = store.eval_judgments(run_a), store.eval_judgments(run_b)
    labels = {r["system_id"]: r.get("system") or r["system_id"] for r in rows_a + rows_b}
    a, b = item_scores(rows_a), item_scores(rows_b)
    out = []
    for key in sorted(set(a) & set(b)):
        common = sorted(set(a[key]) & set(b[key]))
        diffs = [b[key][i] - a[key][i] for i in common]
        ci = paired_bootstrap(diffs, n_boot, seed)
        out.append({"system_id": key[0], "system": labels[key[0]], "metric": key[1],
                    "mean_a": float(np.mean(list(a[key].values()))),
                    "mean_b": float(np.mean(list(b[key].values()))),
                    "diff": float(np.mean(diffs)) if diffs else None,
                    "diff_ci_low": ci[0] if ci else None, "diff_ci_high": ci[1] if ci else None,
                    "n_paired": len(common)})
    return out
