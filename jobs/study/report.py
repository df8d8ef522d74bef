"""A study's results as the paper showed them: per dataset and training-set size, base vs
fine-tuned (with and without RAG), each metric's mean with its 95% interval, the paired difference
with its bootstrap interval (core.evalstats, over the items both systems answered), and a verdict
sentence per difference. Only finished or partial runs of the study's own evaluations are read."""
from __future__ import annotations

from typing import Any

from core.evalstats import N_BOOTSTRAP, summarize_run
from jobs.evaluate import KIND as EVAL_KIND, EvalSpec
from jobs.study.plan import StudyPlan, StudyResources, latest_job


def report_rows(res: StudyResources, plan: StudyPlan,
                n_boot: int = N_BOOTSTRAP) -> list[dict[str, Any]]:
    """One row per (dataset, model, system, metric) of every evaluation the study has run: its
    cell (size 0 for the base model, seed, RAG), mean and t interval, n items, and for a
    fine-tuned system the base model's mean, the paired difference, its interval and a verdict."""
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
                   "diff_ci_low": None, "diff_ci_high": None, "n_paired": 0, "verdict": None}
            if cell["adapter"] and s["base"] is not None:
                row.update(base_mean=means.get((s["base"], s["metric"])), diff=s["diff"],
                           diff_ci_low=s["diff_ci_low"], diff_ci_high=s["diff_ci_high"],
                           n_paired=s["n_paired"])
                row["verdict"] = verdict(row, several_seeds=len(plan.spec.finetune_seeds) > 1)
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


def _number(value: float | None, low: float | None = None, high: float | None = None,
            sign: str = "") -> str:
    if value is None:
        return "–"
    text = f"{value:{sign}.2f}"
    return text if low is None or high is None else f"{text} [{low:{sign}.2f}, {high:{sign}.2f}]"


def markdown(plan: StudyPlan, rows: list[dict[str, Any]]) -> str:
    """The report as one Markdown document: settings, then per dataset and model a table and the
    verdicts."""
    spec, evaluation = plan.spec, plan.spec.evaluation
    judge = evaluation.judge
    repeats = next((EvalSpec.from_dict(s.spec).effective_repeats for s in plan.steps
                    if s.kind == EVAL_KIND), evaluation.repeats)
    lines = [f"# Study: {spec.name}", "",
             f"Judge: {judge.kind} {judge.model} · scoring {evaluation.method} · "
             f"{repeats} repeat(s) · split seed {spec.split_seed} "
             f"(eval fraction {spec.eval_fraction:g}) · fine-tune: {spec.finetune.epochs} epoch(s), "
             f"LoRA r {spec.finetune.lora_r}, context {spec.finetune.context}", ""]
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
            verdicts = [r["verdict"] for r in mine if r["verdict"]]
            lines += ["", "Verdict:" if verdicts else "No fine-tuned system to compare.", ""]
            lines += [f"- {v}" for v in verdicts] + ([""] if verdicts else [])
    return "\n".join(lines).rstrip() + "\n"
