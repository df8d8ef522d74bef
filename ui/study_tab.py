"""Study tab: pick or edit a study spec, see its plan, start, cancel and resume it, and watch a
grid of its cells fill while the figure and the verdicts follow the finished evaluations.

The grid, the figure and the verdicts are read from the records on a timer (the study job, its
steps' jobs, the judgments), never kept in the page: a reload or a second browser shows the same.
"""
from __future__ import annotations

import json
from typing import Any

import gradio as gr
import pandas as pd

from core import charts
from core.records import JobRecord
from jobs.runner import TERMINAL
from jobs.services import Services
from jobs.study import KIND, StudyPlan, StudySpec, StudySpecError
from jobs.study.plan import Step
from jobs.study.report import figure_rows
from jobs.study.spec import parse_spec, shipped_spec_text, shipped_specs
from ui.common import START_JOB, follow_job, job_status, on_show, user_errors, visitor

GRID_COLUMNS = ["dataset", "model", "pairs", "seed", "index", "fine-tune", "evaluation"]
VERDICT_COLUMNS = ["dataset", "model", "pairs", "seed", "RAG", "metric", "base", "fine-tuned",
                   "difference [95% CI]", "verdict"]
DEFAULT_SPEC = "cpu-mini"
MAX_SPEC_CHARS = 20_000  # a study spec is a page of JSON, not a payload


# ---------------------------------------------------------------- pure helpers (tested alone)


def step_status(done: bool, job: JobRecord | None, study: JobRecord | None) -> str:
    """What a grid cell says about one step: "queued" or "running 40%" while its job runs;
    "reused" for a step made before this study job began (or by no job, e.g. an imported
    adapter), "done" for one it made; a stopped job's status ("failed", "cancelled", ...);
    else "queued" while the study runs, "to do" before it starts, "not run" after it stopped."""
    if job is not None and job.status not in TERMINAL:
        return "queued" if job.status == "queued" else f"running {job.progress:.0%}"
    if done:
        made_here = study is not None and job is not None and job.created_at >= study.created_at
        return "done" if made_here else "reused"
    if job is not None and job.status != "done" and (study is None
                                                     or job.created_at >= study.created_at):
        return job.status
    if study is None:
        return "to do"
    return "queued" if study.status not in TERMINAL else "not run"


def grid_frame(plan: StudyPlan, jobs: dict[str, JobRecord],
               study: JobRecord | None) -> pd.DataFrame:
    """One row per cell (dataset x model x training-set size x seed) with the status of the
    steps it needs: its dataset's index, its fine-tune and its model's evaluation. `jobs`: each
    step's newest job by step key (Studies.step_jobs); `study`: the study job, if one runs it."""
    def status(step: Step | None) -> str:
        return step_status(step.done, jobs.get(step.key), study) if step else "–"

    def steps(kind: str, dataset_id: str, model: str | None = None) -> list[Step]:
        return [s for s in plan.steps if s.kind == kind and s.dataset_id == dataset_id and (
            model is None or model == (s.spec.get("base_model") or s.systems[0]["model"]))]

    rows = []
    for dataset_id in plan.spec.datasets:
        index = next(iter(steps("index", dataset_id)), None)
        for model in plan.spec.base_models:
            evaluation = next(iter(steps("evaluate", dataset_id, model)), None)
            for tune in steps("finetune", dataset_id, model) or [None]:
                rows.append({"dataset": dataset_id, "model": model,
                             "pairs": tune.spec["n_train"] if tune else "–",
                             "seed": tune.spec["seed"] if tune else "–",
                             "index": status(index), "fine-tune": status(tune),
                             "evaluation": status(evaluation)})
    return pd.DataFrame(rows, columns=GRID_COLUMNS)


def verdict_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Each fine-tuned system's paired difference to the base model, with its verdict."""
    def number(value, low=None, high=None):
        if value is None:
            return "–"
        return f"{value:+.2f}" + ("" if low is None or high is None else f" [{low:+.2f}, {high:+.2f}]")

    return pd.DataFrame([{
        "dataset": r["dataset"], "model": r["model"], "pairs": r["size"], "seed": r["seed"],
        "RAG": "yes" if r["rag"] else "no", "metric": r["metric"],
        "base": "–" if r["base_mean"] is None else f"{r['base_mean']:.2f}",
        "fine-tuned": f"{r['mean']:.2f}",
        "difference [95% CI]": number(r["diff"], r["diff_ci_low"], r["diff_ci_high"]),
        "verdict": r["verdict"] or ""} for r in rows if r["adapter"]], columns=VERDICT_COLUMNS)


def spec_of(spec_json: str) -> StudySpec:
    """The study spec in the code box (or an API call), checked like a spec file."""
    text = spec_json or ""
    if not text.strip():
        raise StudySpecError("Pick a shipped spec or paste a study spec (JSON) first.")
    if len(text) > MAX_SPEC_CHARS:
        raise StudySpecError(f"The spec is {len(text)} characters long; a study spec fits in "
                             f"{MAX_SPEC_CHARS}.")
    return StudySpec.from_dict(parse_spec(text, "The spec"))


def plan_markdown(plan: StudyPlan) -> str:
    done = sum(s.done for s in plan.steps)
    c = plan.counts
    return (f"**{plan.spec.name}**: {len(plan.steps)} steps ({done} already done). To do: "
            f"{c['indexes']} index(es), {c['finetunes']} fine-tune(s), {c['answers']} answers, "
            f"{c['judgments']} judgments; {plan.estimate()}.\n\n```\n{plan.describe()}\n```")


# ---------------------------------------------------------------- the tab


def build(services: Services, page: gr.Blocks, tab: gr.Tab) -> None:
    studies = services.studies
    shipped = shipped_specs()
    gr.Markdown("The study as one job: datasets × training-set sizes × fine-tune seeds, each "
                "fine-tuned adapter evaluated beside its base model, with and without RAG, on the "
                "same eval items. What already exists (an index, an adapter, a finished run) is "
                "reused; a stopped study resumes where it stopped. `python -m jobs.study` runs "
                "the same specs from a shell.")
    with gr.Row():
        pick = gr.Dropdown(list(shipped), value=DEFAULT_SPEC if DEFAULT_SPEC in shipped else None,
                           label="Shipped spec (studies/)", scale=1)
        with gr.Column(scale=3):
            spec_box = gr.Code(shipped_spec_text(DEFAULT_SPEC), language="json", lines=14,
                               label="Study spec (JSON; edit it or paste your own)")
    with gr.Row():
        plan_btn = gr.Button("Plan")
        start = gr.Button("Start study", variant="primary")
        resume = gr.Button("Resume")
        cancel = gr.Button("Cancel", variant="stop")
        job_box = gr.Textbox(label="Study job", placeholder="started, resumed or pasted job id",
                            scale=2)
    plan_md = gr.Markdown()
    status_md = gr.Markdown()
    grid = gr.Dataframe(label="Cells: the status of each step a cell needs", interactive=False,
                        wrap=True)
    chart = gr.Plot(charts.study([]), label="Base vs fine-tuned per dataset and training-set "
                    "size, mean with 95% interval")
    verdicts = gr.Dataframe(label="Paired differences to the base model (bootstrap 95% CI) and "
                            "verdicts", interactive=False, wrap=True)
    with gr.Row():
        report_fmt = gr.Radio([("HTML page (figure embedded)", "html"), ("Markdown", "md")],
                              value="html", label="Report format")
        report_btn = gr.Button("Download report")
        report_file = gr.File(label="Report", interactive=False)

    @user_errors
    def do_plan(spec_json):
        spec = spec_of(spec_json)
        plan = studies.plan(spec)
        rows = studies.rows(spec, plan)
        return (plan_markdown(plan), grid_frame(plan, studies.step_jobs(plan), None),
                charts.study(figure_rows(spec, rows)), verdict_frame(rows), "")

    @user_errors
    def do_start(spec_json, request: gr.Request):
        job = studies.start(spec_of(spec_json), visitor(request))
        return job, f"Started study job `{job}`."

    @user_errors
    def do_resume(spec_json, request: gr.Request):
        job = studies.resume(spec_of(spec_json), visitor(request))
        return job, f"Resumed study job `{job}`: steps already done are skipped."

    @user_errors
    def do_cancel(job_id, request: gr.Request):
        studies.cancel((job_id or "").strip(), visitor(request))
        return "Cancel requested: the running step stops; what the study made is kept."

    def watch(job_id: str, seen: str | None):
        """The study job's status line, grid, figure and verdicts, and what they show. The
        timer passes `seen` (what this page shows now) and gets the last three only when they
        changed, so it does not redraw them; None (the API) gets them always."""
        jid = (job_id or "").strip()
        unchanged = (gr.skip(),) * 3 if seen is not None else (
            pd.DataFrame(columns=GRID_COLUMNS), charts.study([]),
            pd.DataFrame(columns=VERDICT_COLUMNS))
        keep = seen or ""  # what the page shows: the skipped outputs, or nothing drawn yet
        if not jid:
            return "", *unchanged, keep
        job, text = job_status(services.jobs, jid)
        if job is None:
            return text, *unchanged, keep
        try:
            _, spec = studies.job(jid)
            plan = studies.plan(spec)
        except ValueError as exc:  # not a study, or a spec this store now refuses: said inline
            return f"{text}\n\n{exc}", *unchanged, keep
        cells = grid_frame(plan, studies.step_jobs(plan), job)
        # The figure changes only as an evaluation's cell moves (its progress, then done): the
        # statistics are computed again then, not on every tick.
        drawn = json.dumps([jid, job.status, cells.to_dict("records")], default=str)
        if drawn == seen:
            return text, *unchanged, keep
        rows = studies.rows(spec, plan)
        return text, cells, charts.study(figure_rows(spec, rows)), verdict_frame(rows), drawn

    @user_errors
    def do_report(spec_json, fmt="md"):
        return str(studies.export(spec_of(spec_json), fmt))

    def show_shipped(name):
        return shipped_spec_text(name) if name else gr.skip()

    # What the grid, figure and verdicts show now (watch); a plan draws them too, so it resets it.
    seen = gr.State("")
    pick.change(show_shipped, inputs=pick, outputs=spec_box, api_name="study_spec")
    plan_btn.click(do_plan, inputs=spec_box, outputs=[plan_md, grid, chart, verdicts, seen],
                   api_name="study_plan")
    start.click(do_start, inputs=spec_box, outputs=[job_box, status_md], api_name="start_study",
                **START_JOB)
    resume.click(do_resume, inputs=spec_box, outputs=[job_box, status_md], api_name="resume_study",
                 **START_JOB)
    cancel.click(do_cancel, inputs=job_box, outputs=status_md, api_name="cancel_study")
    watched = [status_md, grid, chart, verdicts, seen]
    def study_status(job_id):
        return watch(job_id, None)

    job_box.change(study_status, inputs=job_box, outputs=watched, api_name="study_status")
    gr.Timer(3.0).tick(watch, inputs=[job_box, seen], outputs=watched, api_name=False,
                       show_progress="hidden")
    report_btn.click(do_report, inputs=[spec_box, report_fmt], outputs=report_file,
                     api_name="study_report")

    def show(current_job):
        return (follow_job(services.jobs, KIND, current_job),
                gr.update(choices=list(shipped_specs())))

    on_show(page, tab, show, inputs=[job_box], outputs=[job_box, pick])

