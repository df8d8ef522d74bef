"""Jobs panel: every background job with status, progress, ETA and log tail.

Progress is read from the job records on a timer, not kept in the page, so a reload or a second
browser shows the same state."""
from __future__ import annotations

import gradio as gr
import pandas as pd

from jobs.services import Services
from ui.common import empty_note, eta_of, fmt_seconds, on_show, user_errors, visitor
from ui.tables import drop_empty

# What went wrong (error) comes right after the state, the bookkeeping last; ETA and error
# columns show only while some job has one, so the rest keep their room at 1280 px.
COLUMNS = ["id", "kind", "status", "progress", "error", "message", "eta", "created", "attempts"]


def jobs_table(services: Services) -> pd.DataFrame:
    rows = [
        {
            "id": j.id, "kind": j.kind, "status": j.status,
            "progress": f"{j.progress:.0%}", "message": j.message or "",
            "eta": fmt_seconds(eta_of(j)), "attempts": j.attempts,
            "created": f"{j.created_at:%m-%d %H:%M}", "error": j.error or "",
        }
        for j in services.jobs.jobs(limit=100)
    ]
    return drop_empty(pd.DataFrame(rows, columns=COLUMNS), keep=["id", "kind", "status"])


def build(services: Services, page: gr.Blocks, tab: gr.Tab) -> None:
    gr.Markdown("Background work (model preparation, fine-tuning, evaluation) runs here. "
                "Closing the browser does not stop a job; a job that was running when the app "
                "stopped shows as *interrupted* and can be resumed.")
    table = gr.Dataframe(value=jobs_table(services), label="Jobs", interactive=False,
                         wrap=True, elem_id="jobs-table")
    empty_note(table, "No jobs yet: loading the models, fine-tuning, index builds and "
               "evaluations appear here when they start.")
    with gr.Row():
        job_id = gr.Textbox(label="Job id", placeholder="click a row or paste an id", scale=3)
        refresh = gr.Button("Refresh", scale=1)
        cancel = gr.Button("Cancel", variant="stop", scale=1)
        resume = gr.Button("Resume", scale=1)
    status = gr.Markdown()
    log = gr.Code(label="Log tail", language=None, lines=12, interactive=False)

    @user_errors
    def show_log(job_id: str) -> str:
        return services.jobs.log_tail(job_id, lines=60) if job_id.strip() else ""

    @user_errors
    def do_cancel(job_id: str, request: gr.Request) -> tuple[pd.DataFrame, str]:
        services.jobs.cancel(job_id, visitor(request))
        return jobs_table(services), f"Cancel requested for `{job_id.strip()}`."

    @user_errors
    def do_resume(job_id: str, request: gr.Request) -> tuple[pd.DataFrame, str]:
        services.jobs.resume(job_id, visitor(request))
        return jobs_table(services), f"Resumed `{job_id.strip()}`."

    def pick(evt: gr.SelectData, df: pd.DataFrame) -> str:
        return str(df.iloc[evt.index[0]]["id"])

    timer = gr.Timer(2.0)
    timer.tick(lambda: jobs_table(services), outputs=table, api_name=False, show_progress="hidden")
    timer.tick(show_log, inputs=job_id, outputs=log, api_name=False, show_progress="hidden")
    refresh.click(lambda: jobs_table(services), outputs=table, api_name="list_jobs")
    table.select(pick, inputs=table, outputs=job_id, api_name=False)
    job_id.change(show_log, inputs=job_id, outputs=log, api_name="job_log")
    cancel.click(do_cancel, inputs=job_id, outputs=[table, status], api_name="cancel_job")
    resume.click(do_resume, inputs=job_id, outputs=[table, status], api_name="resume_job")
    on_show(page, tab, lambda: jobs_table(services), inputs=[], outputs=[table])
