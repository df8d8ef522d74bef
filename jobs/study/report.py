"""A study's results as the paper showed them: per dataset and training-set size, base vs
fine-tuned (with and without RAG), each metric's mean with its 95% interval, the paired difference
with its bootstrap interval (core.evalstats, over the items both systems answered), and a verdict
sentence per difference, beside the paper's published figure for the same setting (jobs.study.paper).
With several fine-tune seeds per cell, the spread of the per-seed means and differences. Only
finished or partial runs of the study's own evaluations are read. jobs.study.export writes the
Markdown with the figure (and an HTML page) to a file."""
from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

from core.evalstats import N_BOOTSTRAP, summarize_run
from core.geval import metric_from
from jobs.evaluate import KIND as EVAL_KIND, EvalSpec
from jobs.evaluations import score_ranges
from jobs.study.paper import paper_note, reference_markdown
from jobs.study.plan import StudyPlan, StudyResources, latest_job
from jobs.study.spec import StudySpec


def report_rows(res: StudyResources, plan: StudyPlan,
                n_boot: int = N_BOOTSTRAP) -> list[dict[str, Any]]:
    """One row per (dataset, model, system, metric) of every evaluation the study has run: its
    cell (size 0 for the base model, seed, RAG), mean and t interval, n items, and for a
    fine-tuned system the base model's mean, the paired difference, its interval, a verdict and
    the paper's figure for the same dataset, size and metric ("paper: ...", None if it has none)."""
    rows = []
    for step in (s for s in plan.steps if s.kind == EVAL_KIND):
        job = latest_job(res, EVAL_KIND, step.key)
        run = res.store.get_eval_run(job.id) if job else None
        if run is None:
            continue
        cells = {s["id"]: s for s in step.systems}
        summary = [row for row in summarize_run(res.store, run.id, n_boot=n_boot)
                   if row["system_id"] in cells]
        means = {(r["system_id"], r["metric"]): r["mean"] for r in summary}
        for s in summary:
            cell = cells[s["system_id"]]
            row = {"dataset": step.dataset_id, "model": cell["model"],
                   "system": "fine-tuned" if cell["adapter"] else "base", "adapter": cell["adapter"],
                   "size": cell["size"], "seed": cell["seed"], "rag": cell["rag"],
                   "metric": s["metric"], "mean": s["mean"], "ci_low": s["ci_low"],
                   "ci_high": s["ci_high"], "n": s["n"], "run_id": run.id,
                   "run_status": run.status, "base_mean": None, "diff": None,
                   "diff_ci_low": None, "diff_ci_high": None, "n_paired": 0, "verdict": None,
                   "paper": None}
            if cell["adapter"] and s["base"] is not None:
                row.update(base_mean=means.get((s["base"], s["metric"])), diff=s["diff"],
                           diff_ci_low=s["diff_ci_low"], diff_ci_high=s["diff_ci_high"],
                           n_paired=s["n_paired"])
                row["verdict"] = verdict(row, several_seeds=len(plan.spec.finetune_seeds) > 1)
            row["paper"] = paper_note(row)
            rows.append(row)
    return rows


def verdict(row: dict[str, Any], several_seeds: bool = False) -> str:
    """"fine-tuning on 200 pairs lowered accuracy with RAG by 0.42 [0.15, 0.71]: worse"."""
    who = f"fine-tuning on {row['size']} pairs" + (f" (seed {row['seed']})" if several_seeds else "")
    what = f"{row['metric']} {'with' if row['rag'] else 'without'} RAG"
    diff, low, high = row["diff"], row["diff_ci_low"], row["diff_ci_high"]
    if diff is None:
        return f"{who}: no item was scored for both it and the base model ({what})"
    if low is None or high is None:
        return (f"{who} changed {what} by {diff:+.2f} on {row['n_paired']} paired item(s): too few "
                "items to tell")
    if high < 0:
        return f"{who} lowered {what} by {-diff:.2f} [{-high:.2f}, {-low:.2f}]: worse"
    if low > 0:
        return f"{who} raised {what} by {diff:.2f} [{low:.2f}, {high:.2f}]: better"
    return f"{who} changed {what} by {diff:+.2f} [{low:+.2f}, {high:+.2f}]: no significant difference"


def figure_rows(spec: StudySpec, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The study's report rows as charts.study draws them: a facet row per dataset (and model,
    and fine-tune seed, where the study has several: the base model is repeated beside each
    seed's adapters), a column per training-set size, the metrics' own score ranges."""
    ranges = score_ranges({"metrics": spec.evaluation.to_dict()["metrics"]})
    several_models, seeds = len(spec.base_models) > 1, spec.finetune_seeds
    out = []
    for row in rows:
        for seed in (seeds if len(seeds) > 1 and row["adapter"] is None else [row["seed"]]):
            label = row["dataset"] + (f" · {row['model']}" if several_models else "")
            label += f" · seed {seed}" if len(seeds) > 1 else ""
            out.append({**row, **ranges.get(row["metric"], {}), "dataset": label,
                        "n_train": row["size"], "run": row["run_id"]})
    return out


def seed_spread(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per fine-tuned cell (dataset, model, size, RAG, metric) trained with several seeds: how many,
    and the mean, sample sd, min and max of the per-seed means and of the paired differences (None
    where fewer than two seeds have a value)."""
    cells: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["adapter"]:
            cells[(row["dataset"], row["model"], row["size"], row["rag"], row["metric"])].append(row)
    out = []
    for (dataset, model, size, rag, metric), group in cells.items():
        if len(group) < 2:
            continue
        spread = {"dataset": dataset, "model": model, "size": size, "rag": rag, "metric": metric,
                  "seeds": len(group)}
        for field in ("mean", "diff"):
            values = [r[field] for r in group if r[field] is not None]
            several = len(values) > 1
            spread.update({f"{field}_mean": statistics.fmean(values) if several else None,
                           f"{field}_sd": statistics.stdev(values) if several else None,
                           f"{field}_min": min(values) if several else None,
                           f"{field}_max": max(values) if several else None})
        out.append(spread)
    return out


def _number(value: float | None, low: float | None = None, high: float | None = None,
            sign: str = "") -> str:
    if value is None:
        return "–"
    text = f"{value:{sign}.2f}"
    return text if low is None or high is None else f"{text} [{low:{sign}.2f}, {high:{sign}.2f}]"


def _spread_text(spread: dict[str, Any], field: str, sign: str = "") -> str:
    if spread[f"{field}_mean"] is None:
        return "–"
    return (f"{spread[f'{field}_mean']:{sign}.2f} ± {spread[f'{field}_sd']:.2f} "
            f"({spread[f'{field}_min']:{sign}.2f} to {spread[f'{field}_max']:{sign}.2f})")


def spec_summary(plan: StudyPlan) -> list[str]:
    """The study's settings as Markdown bullet lines: what a reader needs to redo it."""
    spec, evaluation, tune = plan.spec, plan.spec.evaluation, plan.spec.finetune
    judge = evaluation.judge
    repeats = next((EvalSpec.from_dict(s.spec).effective_repeats for s in plan.steps
                    if s.kind == EVAL_KIND), evaluation.repeats)
    pipe = spec.pipeline
    items = {len(ids) for ids in plan.items.values()}
    return [
        f"- Base models: {', '.join(spec.base_models)}",
        f"- Datasets: {', '.join(spec.datasets)} (split seed {spec.split_seed}, eval fraction "
        f"{spec.eval_fraction:g})",
        f"- Training-set sizes: {', '.join(map(str, spec.sizes))} pairs · fine-tune seeds: "
        f"{', '.join(map(str, spec.finetune_seeds))}",
        f"- Fine-tune: LoRA r {tune.lora_r}, alpha {tune.lora_alpha:g}, {tune.epochs} epoch(s), "
        f"lr {tune.lr:g}, batch {tune.micro_batch_size} x {tune.grad_accum}, context {tune.context}",
        f"- Pipeline: {pipe.retriever}, top-k {pipe.top_k}"
        + (f" (own pipelines for {', '.join(spec.pipelines)})" if spec.pipelines else ""),
        f"- Systems per cell: {', '.join(spec.systems)}",
        f"- Evaluation: {' or '.join(map(str, sorted(items))) or evaluation.n_items} eval item(s) "
        f"per dataset, the same for every system · judge {judge.kind} {judge.model} · metrics "
        f"{', '.join(metric_from(m).name for m in evaluation.metrics)} · scoring {evaluation.method} · "
        f"{repeats} repeat(s)"]


def markdown(plan: StudyPlan, rows: list[dict[str, Any]], figure: str | None = None) -> str:
    """The report as one Markdown document: settings, the figure (`figure`: an image URL, e.g. a
    data: URL; none in a plain-text report), then per dataset and model a table, the spread
    across seeds and the verdicts, and last the paper's published figures."""
    spec = plan.spec
    lines = [f"# Study: {spec.name}", "", *spec_summary(plan), ""]
    if figure:
        lines += ["## Figure", "", "![Base vs fine-tuned per dataset and training-set size, mean "
                  f"with 95% interval]({figure})", ""]
    spreads = seed_spread(rows)
    for dataset_id in spec.datasets:
        for model in spec.base_models:
            mine = [r for r in rows if r["dataset"] == dataset_id and r["model"] == model]
            lines += [f"## {dataset_id} · {model}", ""]
            if not mine:
                lines += ["No evaluation has run yet.", ""]
                continue
            lines += [f"Run `{mine[0]['run_id']}` ({mine[0]['run_status']}), "
                      f"{len(plan.items.get(dataset_id, []))} eval items for every system.", "",
                      "| system | pairs | seed | RAG | metric | mean [95% CI] | n | base | "
                      "difference [95% CI] |", "|---|---|---|---|---|---|---|---|---|"]
            for r in mine:
                lines.append(
                    f"| {r['system']} | {r['size'] or '–'} | "
                    f"{'–' if r['seed'] is None else r['seed']} | {'yes' if r['rag'] else 'no'} | "
                    f"{r['metric']} | {_number(r['mean'], r['ci_low'], r['ci_high'])} | {r['n']} | "
                    f"{_number(r['base_mean'])} | "
                    f"{_number(r['diff'], r['diff_ci_low'], r['diff_ci_high'], '+')} |")
            lines += _spread_lines([s for s in spreads
                                    if s["dataset"] == dataset_id and s["model"] == model])
            verdicts = [r for r in mine if r["verdict"]]
            lines += ["", "Verdict:" if verdicts else "No fine-tuned system to compare.", ""]
            lines += [f"- {r['verdict']}" + (f" ({r['paper']})" if r["paper"] else "")
                      for r in verdicts] + ([""] if verdicts else [])
    lines += reference_markdown()
    return "\n".join(lines).rstrip() + "\n"


def _spread_lines(spreads: list[dict[str, Any]]) -> list[str]:
    if not spreads:
        return []
    lines = ["", "Spread across fine-tune seeds (mean ± sd, min to max, of the per-seed values):",
             "", "| pairs | RAG | metric | seeds | fine-tuned mean | difference |",
             "|---|---|---|---|---|---|"]
    return lines + [f"| {s['size']} | {'yes' if s['rag'] else 'no'} | {s['metric']} | "
                    f"{s['seeds']} | {_spread_text(s, 'mean')} | {_spread_text(s, 'diff', '+')} |"
                    for s in spreads]
