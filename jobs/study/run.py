"""The study as ONE job of the runner (kind "study"), and the service the CLI (and a UI) calls.

The job plans the study (jobs.study.plan), then runs its steps in order through the app's own
services (IndexCatalog.start, AdapterCatalog.train, Evaluations.start), each as an ordinary job it
waits on, so every record is the one a person starting those jobs by hand would get. Nothing is
kept about the study's progress but those records: a killed, cancelled or failed study, run again
or resumed, re-plans, skips every step whose index, adapter or finished run exists, resumes the
step's stopped job through that job's own resume (a fine-tune from its newest checkpoint, an
evaluation from its stored answers and judgments) and joins one still running.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from core import config
from core.records import JobRecord
from core.testhooks import gate
from jobs.evaluate import EvalSpec
from jobs.finetune_data import FinetuneSpec
from jobs.runner import TERMINAL, JobCancelled, JobContext, JobError
from jobs.study.plan import StudyPlan, StudyResources, Step, latest_job, plan_study, step_jobs
from jobs.study.report import markdown, report_rows
from jobs.study.spec import KIND, StudySpec, StudySpecError, content_key
from pipelines.spec import PipelineSpec

logger = logging.getLogger(__name__)

STOPPED = ("failed", "cancelled", "interrupted")
WAIT_SECONDS = 0.5


class StudyStepError(RuntimeError):
    """A step's job did not finish; what it made is kept and a resume continues from there."""


class Studies:
    def __init__(self, res: StudyResources) -> None:
        self.res = res

    def plan(self, spec: StudySpec) -> StudyPlan:
        return plan_study(spec, self.res)

    def start(self, spec: StudySpec, visitor: str | None = None) -> str:
        """Plan (every refusal before the job exists), then start the study job; its id."""
        running = self._job_of(spec, ("queued", "running"))
        if running:
            raise StudySpecError(f"Study '{spec.name}' with this spec is already running "
                                 f"(job {running.id}).")
        self.plan(spec)
        return self.res.jobs.admit(KIND, visitor,
                                   lambda: self.res.jobs.runner.start(KIND, spec.to_dict()))

    def resume(self, spec: StudySpec, visitor: str | None = None) -> str:
        """Resume the newest stopped job of this exact spec, or start one (it skips what exists)."""
        stopped = self._job_of(spec, STOPPED)
        if stopped is None:
            return self.start(spec, visitor)
        self.plan(spec)
        return self.res.jobs.resume(stopped.id, visitor)

    def cancel(self, job_id: str, visitor: str | None = None) -> None:
        """Stop a study job: its running step's job is cancelled with it, what it made is kept."""
        self.job(job_id)
        self.res.jobs.cancel(job_id, visitor)

    def job(self, job_id: str) -> tuple[JobRecord, StudySpec]:
        """A study job (its id checked; JobError for an unknown one or another kind) and its spec."""
        job = self.res.jobs.get(job_id)
        if job.kind != KIND:
            raise JobError(f"Job {job.id} is not a study job (its kind is {job.kind}).")
        return job, StudySpec.from_dict(job.spec)

    def step_jobs(self, plan: StudyPlan) -> dict[str, JobRecord]:
        """The newest job of each step (by step key) that made or is making it."""
        return step_jobs(self.res, plan.steps)

    def rows(self, spec: StudySpec, plan: StudyPlan | None = None) -> list[dict[str, Any]]:
        """report_rows of the study (`plan`: one just made for `spec`, not made again)."""
        return report_rows(self.res, plan or self.plan(spec))

    def report(self, spec: StudySpec) -> str:
        """The study's results and verdicts as Markdown."""
        plan = self.plan(spec)
        return markdown(plan, report_rows(self.res, plan))

    def export(self, spec: StudySpec) -> Path:
        """The report as a file in the data dir's exports, named by the study and its content
        (two visitors' specs never share a file). Markdown today: the one place a richer export
        (HTML with the charts as images) plugs in."""
        path = config.subdir("exports") / f"study-{spec.name}-{content_key(spec.to_dict())}.md"
        path.write_text(self.report(spec), encoding="utf-8")
        return path

    def run_job(self, ctx: JobContext) -> dict[str, Any]:
        """The runner's entry point for kind "study"."""
        return run_study(ctx, self.res, StudySpec.from_dict(ctx.spec))

    def _job_of(self, spec: StudySpec, statuses: tuple[str, ...]) -> JobRecord | None:
        wanted = spec.to_dict()
        return next((job for job in self.res.jobs.runner.jobs(KIND, limit=10_000)
                     if job.spec == wanted and job.status in statuses), None)


def run_study(ctx: JobContext, res: StudyResources, spec: StudySpec) -> dict[str, Any]:
    plan = plan_study(spec, res)
    ctx.log(plan.describe())
    total, jobs = len(plan.steps), {}
    for number, step in enumerate(plan.steps):
        ctx.progress(number / total, f"step {number + 1}/{total}: {step.label}")
        if step.done:
            ctx.log(f"skipped (already done): {step.label}")
            continue
        gate(f"study-{step.kind}")  # tests stop the study before a step starts (core.testhooks)
        ctx.check_cancelled()  # a study cancelled between steps starts no further job
        job_id = _start_or_join(res, step)
        ctx.log(f"{step.label}: job {job_id}")
        _wait(ctx, res, job_id, step, number, total)
        jobs[step.key] = job_id
    ctx.progress(1.0, "done")
    done = sum(s.done for s in plan.steps)
    logger.info("study %s finished: %d steps run, %d reused", spec.name, len(jobs), done)
    return {"study": spec.name, "steps": total, "reused": done, "jobs": jobs,
            "counts": plan.counts}


def _start_or_join(res: StudyResources, step: Step) -> str:
    """The job that makes the step: one still running (joined), a stopped one (resumed through
    its own resume; an index is rebuilt, as building it is one piece), else a new one."""
    job = latest_job(res, step.kind, step.key)
    if job is not None and job.status not in TERMINAL:
        return job.id
    if job is not None and job.status in STOPPED and step.kind != "index":
        # The study owns its steps' jobs (it was admitted as a whole): resumed within the caps,
        # as no visitor's, like the ones it starts.
        return res.jobs.admit(step.kind, None, lambda: res.jobs.runner.resume(job.id))
    if step.kind == "index":
        return res.indexes.start(PipelineSpec.from_dict(step.spec["pipeline"]), step.dataset_id, None)
    if step.kind == "finetune":
        return res.adapters.train(FinetuneSpec.from_dict(step.spec))
    return res.evaluations.start(EvalSpec.from_dict(step.spec))


def _wait(ctx: JobContext, res: StudyResources, job_id: str, step: Step, number: int,
          total: int) -> None:
    """Until the step's job ends, its progress shown as the study's; cancelling the study
    cancels the step's job (and raises JobCancelled)."""
    while True:
        try:
            job = res.jobs.runner.wait(job_id, WAIT_SECONDS)
            if job.status in TERMINAL:
                break
            ctx.progress((number + (job.progress or 0.0)) / total,
                         f"step {number + 1}/{total}: {step.label} · {job.message or ''}")
        except JobCancelled:
            try:
                res.jobs.runner.cancel(job_id)
            except JobError:  # it ended meanwhile
                pass
            res.jobs.runner.wait(job_id)
            raise
    if job.status != "done":
        raise StudyStepError(f"Step '{step.label}' {job.status} (job {job_id}): "
                             f"{job.error or job.message}. What it made is kept; "
                             "fix the cause and resume the study.")
