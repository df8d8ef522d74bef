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
import os
import time
from pathlib import Path
from typing import Any

from core import config
from core.names import inside
from core.records import JobRecord
from core.testhooks import gate
from jobs.evaluate import EvalSpec
from jobs.finetune_data import FinetuneSpec
from jobs.runner import TERMINAL, JobCancelled, JobContext, JobError
from jobs.study.export import check_format, write_report
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

    def export(self, spec: StudySpec, fmt: str = "md") -> Path:
        """The report with its figure as a file in the data dir's exports, named by the study and
        its content (two visitors' specs never share a file): fmt "md", or "html" (one
        self-contained page, the figure embedded as a PNG)."""
        name = f"study-{spec.name}-{content_key(spec.to_dict())}.{check_format(fmt)}"
        plan = self.plan(spec)
        return write_report(plan, report_rows(self.res, plan), fmt, inside(config.subdir("exports"), name))

    def run_job(self, ctx: JobContext) -> dict[str, Any]:
        """The runner's entry point for kind "study"."""
        return run_study(ctx, self.res, StudySpec.from_dict(ctx.spec))

    def _job_of(self, spec: StudySpec, statuses: tuple[str, ...]) -> JobRecord | None:
        wanted = spec.to_dict()
        return next((job for job in self.res.jobs.runner.jobs(KIND, limit=10_000)
                     if job.spec == wanted and job.status in statuses), None)


def run_study(ctx: JobContext, res: StudyResources, spec: StudySpec) -> dict[str, Any]:
    """Runs the steps still to do; the result holds each run step's wall and CPU seconds (this
    attempt's: a resumed study times only what it ran) and their sums per step kind."""
    plan = plan_study(spec, res)
    ctx.log(plan.describe())
    total, jobs, times = len(plan.steps), {}, []
    for number, step in enumerate(plan.steps):
        ctx.progress(number / total, f"step {number + 1}/{total}: {step.label}")
        if step.done:
            ctx.log(f"skipped (already done): {step.label}")
            continue
        gate(f"study-{step.kind}")  # tests stop the study before a step starts (core.testhooks)
        ctx.check_cancelled()  # a study cancelled between steps starts no further job
        wall, cpu = time.perf_counter(), _cpu_seconds()
        job_id = _start_or_join(res, step)
        ctx.log(f"{step.label}: job {job_id}")
        _wait(ctx, res, job_id, step, number, total)
        jobs[step.key] = job_id
        times.append({"kind": step.kind, "key": step.key,
                      "wall_s": round(time.perf_counter() - wall, 3),
                      "cpu_s": round(_cpu_seconds() - cpu, 3)})
        ctx.metric(**times[-1])
        ctx.log(f"{step.label}: {times[-1]['wall_s']:.1f} s wall, {times[-1]['cpu_s']:.1f} s CPU")
    ctx.progress(1.0, "done")
    done = sum(s.done for s in plan.steps)
    logger.info("study %s finished: %d steps run, %d reused", spec.name, len(jobs), done)
    return {"study": spec.name, "steps": total, "reused": done, "jobs": jobs,
            "counts": plan.counts, "step_times": times, "seconds_by_kind": _by_kind(times)}


def _cpu_seconds() -> float:
    """CPU seconds of this process (all its threads: the index and evaluation jobs run here) and
    of its finished children (a fine-tune runs in a child, reaped when its job ends). Other jobs
    this process runs at the same time are counted too: time a study on an otherwise idle app."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _by_kind(times: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for entry in times:
        kind = out.setdefault(entry["kind"], {"steps": 0, "wall_s": 0.0, "cpu_s": 0.0})
        kind["steps"] += 1
        kind["wall_s"] = round(kind["wall_s"] + entry["wall_s"], 3)
        kind["cpu_s"] = round(kind["cpu_s"] + entry["cpu_s"], 3)
    return out


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
